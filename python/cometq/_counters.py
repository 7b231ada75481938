"""Tile counters of the in-kernel split-K reductions: the Triton GEMMs' (``COMETQ_SPLITK_FIXUP``,
:mod:`cometq.kernels.w4ax_gemm`) and the CUDA GEMM's (``COMETQ_CUDA_SPLITK_FIXUP``,
csrc/w4ax_gemm.cu).  Each split GEMM's tile counts its pieces in, the last one reduces and resets
its counter, so one zeroed int32 buffer per device serves every such GEMM in stream order.  The
KV4 decode append (:mod:`cometq.kernels.kv4_append`) uses the same buffer, one counter per pool
slot: a sequence's programs count themselves in and the last advances its lengths."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

__all__ = ["COUNTERS_MIN", "tile_counters"]

#: counters per device at least (one per output tile of a split launch; the launches that split
#: have fewer tiles than SMs, or are decode GEMMs: N / 64 tiles)
COUNTERS_MIN = 1 << 16
_COUNTERS: Dict[str, torch.Tensor] = {}
_OLD_COUNTERS: List[torch.Tensor] = []  # replaced buffers stay alive: a captured graph may hold their address


def tile_counters(device, tiles: int = 0) -> Optional[torch.Tensor]:
    """The int32 tile counters on ``device`` (at least ``tiles``), or None (then the launch reduces
    with its separate kernel).  Zero between GEMMs -- each tile's last piece resets its own -- so one
    buffer serves every GEMM in stream order, CUDA graphs included (a replay keeps the captured
    address: the buffer is never freed or replaced while it is big enough).  Allocated outside a
    capture only (an allocation inside one would belong to that graph's private pool): while
    capturing without a big enough buffer, None.  Not for split GEMMs running concurrently on two
    streams (they would share counters)."""
    device = torch.device(device)
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= tiles:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if buf is not None:
        _OLD_COUNTERS.append(buf)
    n = max(COUNTERS_MIN, 1 << max(0, int(tiles) - 1).bit_length())  # a power of two: few replacements
    buf = _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return buf
