"""Register the compiled CUDA kernels (``cometq._C``) as the ``"cuda"`` backend.

``cometq.ops`` imports this module lazily the first time the ``cuda`` backend
is asked for.  The extension defines raw ops in its own namespace
``torch.ops.cometq_C`` (see ``csrc/torch_bindings.cpp``); this module

* registers their fake (meta) implementations so ``torch.compile`` and
  ``torch.library.opcheck`` can trace them, and
* registers thin wrappers with the exact tensor-level signatures of
  ``ops._ref_quantize_act`` / ``ops._ref_w4ax_gemm`` via ``ops.register_impl``.

The wrappers only adapt arguments (dtype/contiguity/alignment, string scale
mode -> int); the block table (which class buffer and slot each block uses) is
built inside the kernels from ``block_bits``, so no extra launches are needed.

Importing this module without the built extension raises ``ImportError``.
"""
from __future__ import annotations

import torch

from .layout import BLOCK_K

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.cometq_C.*)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        "cometq._C (the CUDA extension) is not built, so the 'cuda' backend is unavailable. "
        "Build it on a machine with nvcc and a CUDA build of torch: "
        "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`); "
        f"COMETQ_SKIP_CUDA=1 disables it. Original error: {e}"
    ) from e

import os

from . import _cuda_checks, _cuda_split, ops
from ._counters import COUNTERS_MIN as CUDA_COUNTERS_MIN
from ._counters import tile_counters as cuda_tile_counters  # (shared with the Triton GEMMs' reduction)
from ._cuda_checks import (W16_TILE_IDS, W16_WGMMA_TILE_IDS, check_kv4_attention_inputs, check_quantize_act_inputs,
                           check_w4ax_gemm_inputs, check_w16_gemm_inputs, gemm_extent_problem,
                           kv4_attention_unsupported, w16_extent_problem)

__all__ = ["SCALE_MODE_CODES", "MMA_PATHS", "cuda_quantize_act", "cuda_fake_quant_act", "cuda_w4ax_gemm", "cuda_w16_gemm",
           "cuda_kv4_decode_attention",
           "kv4_attention_cuda_enabled", "check_quantize_act_inputs", "check_w4ax_gemm_inputs",
           "cuda_splitk_fixup_enabled", "cuda_tile_counters"]

#: scale_mode strings -> the int codes of the cometq_C ops
SCALE_MODE_CODES = {"block": 0, "class": 1}
#: mma_path names -> codes ("auto": s4 on sm_8x, s8 elsewhere)
MMA_PATHS = {"auto": 0, "s4": 1, "s8": 2}
#: tile variants (csrc/cometq_kernels.h COMETQ_TILE_*): 0 = by M; 1 = the 64 x 64 tile with 3
#: stages (4 CTAs per SM instead of 3), M <= 64 only -- a tuning knob like split_k
TILES = (0, 1)
TILE_MID3_MAX_M = 64
#: w16 GEMM tile variants (COMETQ_W16_TILE_*): 0 = by M (16 / 32 / 64 tokens x 128 weight rows),
#: 1 = 64 tokens x 256 weight rows (8 warps), 2 / 3 = 32 / 16 tokens x 128 rows whatever M (H200 run
#: 10: the 64-token tile ran gate_up at M = 64 with ~7 warps per SM, ~40 % of the f16 MMA peak --
#: latency-bound; the narrow tiles give the tuner more, lighter CTAs to try); 4 / 5 / 6 / 7 / 8 = the
#: wgmma kernel (sm_90 only, weight groups >= 128 channels): 64 tokens x 128 rows, 64 x 64, 32 x 128,
#: 64 x 256, 16 x 128
W16_TILES = W16_TILE_IDS
W16_WGMMA_TILES = W16_WGMMA_TILE_IDS
#: tiles offered to the tuner only above this M (the narrow ones are the by-M tile below it; a
#: wgmma tile pads M up to 32 or 64 tokens, and M <= 16 is weight-bound: the 16-token tile's case)
W16_TILE_ABOVE_M = {2: 32, 3: 16, 4: 16, 5: 16, 6: 16, 7: 16}
#: ... and only up to this M (the 16-token wgmma tile: M <= 16, where the weight bytes are the bound)
W16_TILE_UP_TO_M = {8: 16}


#: ``COMETQ_W16_WGMMA=0``: the tuner never offers the wgmma tiles (bench/gpu_check.sh sets it when
#: their GPU tests fail; a direct ``tile=4..8`` launch still runs them)
W16_WGMMA_ENV = "COMETQ_W16_WGMMA"


#: ``COMETQ_W16_PDL=1``: the wgmma tiles launch as programmatic dependents of the stream's previous
#: kernel (the CUDA act-quant kernels let them start early: their weight prefetch overlaps the
#: activation pass).  Off by default until a GPU run has measured it (bench/diag_pdl.py).
W16_PDL_ENV = "COMETQ_W16_PDL"


def w16_pdl_enabled() -> bool:
    return os.environ.get(W16_PDL_ENV, "0") == "1"


def w16_tiles(device, group: int) -> tuple:
    """The tiles of :data:`W16_TILES` the "cuda" w16 GEMM may launch on ``device`` for resolved weight
    group ``group``: the wgmma tiles only on an sm_90 device, for ``group >= 128``, and unless
    ``COMETQ_W16_WGMMA=0``."""
    dev = torch.device(device)
    wg = (dev.type == _cuda_checks.DEVICE_TYPE and group >= BLOCK_K and os.environ.get(W16_WGMMA_ENV, "1") != "0"
          and _cuda_checks.capability_of(dev) == (9, 0))
    return tuple(t for t in W16_TILES if wg or t not in W16_WGMMA_TILES)


#: launch variants of the CUDA KV4 attention kernel (csrc/kv4_attention.cu): 0 = 4 CTAs per SM,
#: each tile loaded when it starts; 1 = 3 CTAs per SM, the next tile loaded while one computes;
#: 2 / 3 = 0 / 1 with each warp's next key group prefetched into L2; 4 = 4 CTAs per SM, each warp
#: streaming its tiles through a 4-slot shared-memory ring (cp.async, 3 tiles in flight). Same
#: results, bit for bit.
KV4_ATTN_VARIANTS = (0, 1, 2, 3, 4)
#: the ring variant, and ``COMETQ_KV4_ATTN_RING=0``: the "auto" mode (and the benchmarks) leave it
#: out -- bench/gpu_check.sh sets that when the ring's own GPU test fails, so a broken ring cannot take
#: the other variants (and the CUDA kernel as a whole) down with it
KV4_ATTN_RING_VARIANT = 4
KV4_ATTN_RING_ENV = "COMETQ_KV4_ATTN_RING"


def kv4_attention_variants() -> tuple:
    """The launch variants "auto" times: all of :data:`KV4_ATTN_VARIANTS`, less the ring when
    ``COMETQ_KV4_ATTN_RING=0``."""
    ring = os.environ.get(KV4_ATTN_RING_ENV, "1")
    if ring not in ("0", "1"):
        raise ValueError(f"{KV4_ATTN_RING_ENV} must be '0' or '1', got {ring!r}")
    return KV4_ATTN_VARIANTS if ring == "1" else tuple(v for v in KV4_ATTN_VARIANTS if v != KV4_ATTN_RING_VARIANT)


# --------------------------------------------------------------------------
# fake (meta) implementations of the raw ops: output shapes only
# --------------------------------------------------------------------------
@torch.library.register_fake("cometq_C::quantize_act")
def _quantize_act_fake(x, perm, block_bits, n_int8, scale_mode, int4_clip):
    torch._check(0.0 < int4_clip <= 1.0, lambda: f"int4_clip must be in (0, 1], got int4_clip={int4_clip}")
    m, k = x.shape
    nb = (k + BLOCK_K - 1) // BLOCK_K
    q4 = x.new_empty((m, (nb - n_int8) * BLOCK_K // 2), dtype=torch.uint8)
    q8 = x.new_empty((m, n_int8 * BLOCK_K), dtype=torch.int8)
    scales = x.new_empty((m, nb if scale_mode == 0 else 2), dtype=torch.float32)
    return q4, q8, scales


#: the extension has the FAKE act-quant op (a library built before it lacks it: the "cuda" backend
#: then has no fake_quant_act implementation and the Triton one runs)
HAS_FAKE_QUANT = hasattr(torch.ops.cometq_C, "fake_quant_act")

if HAS_FAKE_QUANT:
    @torch.library.register_fake("cometq_C::fake_quant_act")
    def _fake_quant_act_fake(x, perm, block_bits, n_int8, scale_mode, int4_clip, out_dtype):
        torch._check(0.0 < int4_clip <= 1.0, lambda: f"int4_clip must be in (0, 1], got int4_clip={int4_clip}")
        torch._check(out_dtype in (torch.float16, torch.bfloat16, torch.float32),
                     lambda: f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
        m, k = x.shape
        return x.new_empty((m, (k + BLOCK_K - 1) // BLOCK_K * BLOCK_K), dtype=out_dtype)


@torch.library.register_fake("cometq_C::w4ax_gemm")
def _w4ax_gemm_fake(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, group_size, bias, out_dtype,
                    scale_mode, split_k, mma_path, tile=0, tile_counters=None):
    if tile_counters is not None:
        torch._check(tile_counters.dtype == torch.int32 and tile_counters.dim() == 1,
                     lambda: f"tile_counters must be 1-D int32, got {tile_counters.dtype} {tuple(tile_counters.shape)}")
    torch._check(tile in TILES, lambda: f"tile must be 0 (by M) or 1 (64x64, 3 stages), got tile={tile}")
    torch._check(tile == 0 or a_scales.shape[0] <= TILE_MID3_MAX_M,
                 lambda: f"tile=1 (the 64x64 3-stage tile) needs M <= 64, got M={a_scales.shape[0]}")
    if w_offsets is not None:
        torch._check(w_offsets.dtype == torch.float32, lambda: f"w_offsets must be float32, got {w_offsets.dtype}")
        torch._check(tuple(w_offsets.shape) == tuple(w_scales.shape),
                     lambda: f"w_offsets shape {tuple(w_offsets.shape)} != w_scales shape {tuple(w_scales.shape)}")
    return qweight.new_empty((a_scales.shape[0], qweight.shape[0]), dtype=out_dtype)


#: the extension has the w16 GEMM (csrc/w16_gemm.cu; a library built before it lacks it)
HAS_W16 = hasattr(torch.ops.cometq_C, "w16_gemm")

if HAS_W16:
    @torch.library.register_fake("cometq_C::w16_gemm")
    def _w16_gemm_fake(a, qweight, w_scales, w_offsets, group_size, bias, out_dtype, split_k, tile=0,
                       tile_counters=None, pdl=False):
        if tile_counters is not None:
            torch._check(tile_counters.dtype == torch.int32 and tile_counters.dim() == 1,
                         lambda: f"tile_counters must be 1-D int32, got {tile_counters.dtype} "
                                 f"{tuple(tile_counters.shape)}")
        torch._check(a.dtype in (torch.float16, torch.bfloat16),
                     lambda: f"a must be float16 or bfloat16, got {a.dtype}")
        torch._check(tile in W16_TILES, lambda: f"tile must be 0 (by M), 1 (64 x 256, 8 warps), 2 (32 x 128), 3 "
                                                f"(16 x 128) or a wgmma tile 4 (64 x 128), 5 (64 x 64), 6 (32 x 128), "
                                                f"7 (64 x 256), 8 (16 x 128), got tile={tile}")
        torch._check(split_k >= 0, lambda: f"split_k must be >= 0 (0 = auto), got {split_k}")
        torch._check(not pdl or tile in W16_WGMMA_TILES,
                     lambda: f"pdl=True (a programmatic dependent launch) applies to the wgmma tiles 4-8 only, "
                             f"got tile={tile}")
        return qweight.new_empty((a.shape[0], qweight.shape[0]), dtype=out_dtype)


@torch.library.register_fake("cometq_C::kv4_decode_attention")
def _kv4_decode_attention_fake(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables,
                               quant_lens, tail_lens, seq_ids, group_size, sm_scale, num_splits, variant=0):
    torch._check(q.dim() == 3 and q.dtype in (torch.float16, torch.bfloat16),
                 lambda: f"q must be float16 or bfloat16 [B, Hq, D], got {q.dtype} {tuple(q.shape)}")
    torch._check(1 <= num_splits <= 1024, lambda: f"num_splits must be in [1, 1024], got {num_splits}")
    torch._check(variant in KV4_ATTN_VARIANTS, lambda: f"variant must be one of {KV4_ATTN_VARIANTS}, got {variant}")
    return torch.empty_like(q)


# --------------------------------------------------------------------------
# argument adaptation
# --------------------------------------------------------------------------
def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the GEMM streams tiles with 16-byte cp.async)."""
    t = t.contiguous()
    if t.numel() and t.data_ptr() % 16:
        t = t.clone()
    return t


def _scale_mode_code(scale_mode: str) -> int:
    if scale_mode not in SCALE_MODE_CODES:
        raise ValueError(f"scale_mode must be one of {tuple(SCALE_MODE_CODES)}, got {scale_mode!r}")
    return SCALE_MODE_CODES[scale_mode]


def cuda_quantize_act(x, perm, block_bits, n_int8: int, scale_mode: str, int4_clip: float = 1.0):
    """Same contract as ``ops._ref_quantize_act``: returns ``(q4, q8, scales)``."""
    return torch.ops.cometq_C.quantize_act(*_act_args(x, perm, block_bits, n_int8, scale_mode, int4_clip))


def _act_args(x, perm, block_bits, n_int8, scale_mode, int4_clip) -> tuple:
    """Checked, and adapted to the raw act-quant ops' argument types (both outputs' ops)."""
    check_quantize_act_inputs(x, perm, block_bits, n_int8, scale_mode, int4_clip)
    return (x.contiguous(), perm.to(torch.int64).contiguous(), block_bits.to(torch.int32).contiguous(), int(n_int8),
            _scale_mode_code(scale_mode), float(int4_clip))


def cuda_fake_quant_act(x, perm, block_bits, n_int8: int, scale_mode: str, int4_clip: float = 1.0,
                        out_dtype: torch.dtype = torch.float16):
    """Same contract as ``ops._ref_fake_quant_act``: the dequantized activation ``[M, K_pad]`` in
    ``out_dtype``, half-split K order (csrc/act_quant.cu, FAKE output)."""
    args = _act_args(x, perm, block_bits, n_int8, scale_mode, int4_clip)
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    return torch.ops.cometq_C.fake_quant_act(*args, out_dtype)


#: ``COMETQ_CUDA_SPLITK_FIXUP`` -- "1": a split-K CUDA GEMM sums its slabs in the kernel (each tile's
#: last split, csrc/w4ax_gemm.cu) instead of launching the finalize kernel after it: the same bits,
#: one launch less per split GEMM (H100 run 7: 96 finalize launches per batch-64 decode step,
#: 0.30 ms of its 8.43 ms of kernels).  "0" (default): the finalize kernel.  Off by
#: default until GPU-tested: bench/gpu_check.sh turns it on for its later stages when its
#: bit-identity test passes (the counters' memory ordering cannot be exercised without a GPU).
CUDA_FIXUP_ENV = "COMETQ_CUDA_SPLITK_FIXUP"


def cuda_splitk_fixup_enabled() -> bool:
    v = os.environ.get(CUDA_FIXUP_ENV, "0")
    if v not in ("0", "1"):
        raise ValueError(f"{CUDA_FIXUP_ENV} must be 0 or 1, got {v!r}")
    return v == "1"


def _tiles_upper_bound(m: int, n: int) -> int:
    """Output tiles of any CUDA GEMM launch of M x N (its smallest tile: 16 x 64)."""
    return -(-m // 16) * -(-n // 64)


def _check_counters(tile_counters, device) -> None:
    if tile_counters is not None:
        if not isinstance(tile_counters, torch.Tensor):
            raise TypeError(f"tile_counters must be a tensor or None, got {type(tile_counters).__name__}")
        if tile_counters.dtype != torch.int32 or tile_counters.dim() != 1 or tile_counters.device != device:
            raise ValueError(f"tile_counters must be 1-D int32 on {device}, got {tile_counters.dtype} "
                             f"shape {tuple(tile_counters.shape)} on {tile_counters.device}")


def cuda_w4ax_gemm(q4, q8, a_scales, block_bits, qweight, w_scales, group_size, bias, out_dtype, scale_mode,
                   *, w_offsets=None, split_k: int = 0, mma_path: str = "auto", tile: int = 0, tile_counters=None):
    """Same contract as ``ops._ref_w4ax_gemm`` (``w_offsets``: asymmetric weights, float32 like
    ``w_scales``); ``split_k`` / ``mma_path`` / ``tile`` are test and tuning knobs;
    ``tile_counters`` (:func:`cuda_tile_counters`): a split launch reduces its slabs in-kernel."""
    if mma_path not in MMA_PATHS:
        raise ValueError(f"mma_path must be one of {tuple(MMA_PATHS)}, got {mma_path!r}")
    if tile not in TILES:
        raise ValueError(f"tile must be one of {TILES} (0 = by M, 1 = 64x64 with 3 stages), got {tile!r}")
    if tile and a_scales.shape[0] > TILE_MID3_MAX_M:
        raise ValueError(f"tile=1 (the 64x64 3-stage tile) needs M <= {TILE_MID3_MAX_M}, "
                         f"got a_scales of shape {tuple(a_scales.shape)}")
    check_w4ax_gemm_inputs(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, group_size, bias,
                           out_dtype, scale_mode, split_k)
    _check_counters(tile_counters, qweight.device)
    return torch.ops.cometq_C.w4ax_gemm(
        _aligned(q4),
        _aligned(q8),
        a_scales.contiguous(),
        block_bits.to(torch.int32).contiguous(),
        qweight if qweight.dim() == 3 else _aligned(qweight),  # 3-D: the block-major view, checked by the op
        w_scales.contiguous(),
        None if w_offsets is None else w_offsets.contiguous(),
        -1 if group_size is None else int(group_size),
        None if bias is None else bias.contiguous(),
        out_dtype,
        _scale_mode_code(scale_mode),
        int(split_k),
        MMA_PATHS[mma_path],
        int(tile),
        tile_counters,
    )


def cuda_w16_gemm(a, qweight, w_scales, w_offsets, group, bias, out_dtype, stride_wb=None, config=None, *,
                  split_k: int = 0, tile: int = 0, tile_counters=None, pdl: bool = False):
    """The w16 route's GEMM in CUDA (csrc/w16_gemm.cu): same contract as
    :func:`cometq.kernels.w16_gemm.w16_gemm` for fp16 / bf16 ``a`` (``group``: the resolved width;
    ``stride_wb`` / ``config`` are the Triton kernel's launch details, ignored); ``split_k`` (0 =
    the kernel's rule) and ``tile`` (:data:`W16_TILES`) are tuning knobs; ``tile_counters``
    (:func:`cuda_tile_counters`): a split launch sums its slabs in-kernel (same bits); ``pdl``
    (wgmma tiles): launched as a programmatic dependent of the stream's previous kernel -- its
    weight prefetch overlaps that kernel, same result."""
    a = _aligned(a)
    check_w16_gemm_inputs(a, qweight, w_scales, w_offsets, group, bias, out_dtype, split_k, tile)
    _check_counters(tile_counters, qweight.device)
    if pdl and tile not in W16_WGMMA_TILES:
        raise ValueError(f"pdl=True (a programmatic dependent launch) applies to the wgmma tiles "
                         f"{W16_WGMMA_TILES} only, got tile={tile}")
    extra = (True,) if pdl else ()  # (an extension built before the flag still runs the others)
    return torch.ops.cometq_C.w16_gemm(
        a, qweight if qweight.dim() == 3 else _aligned(qweight), w_scales.contiguous(),
        None if w_offsets is None else w_offsets.contiguous(), int(group),
        None if bias is None else bias.contiguous(), out_dtype, int(split_k), int(tile), tile_counters, *extra)


#: ``(split_k, tile)`` candidates the "cuda" w16 GEMM times per case (split 0: the kernel's rule)
W16_CHOICES = tuple((s, t) for t in W16_TILES for s in (0, 1, 2, 4, 8))


def _w16_impl(a, qweight, w_scales, w_offsets, group, bias, out_dtype, stride_wb=None):
    if a.dtype not in (torch.float16, torch.bfloat16):
        raise ops.BackendUnsupported(f"the CUDA w16 GEMM takes float16 / bfloat16 operands, got {a.dtype}")
    why = w16_extent_problem(a, qweight, w_scales)
    if why is not None:
        raise ops.BackendUnsupported(why)
    nb = a.shape[1] // BLOCK_K

    # (the tiles of any launch of this M x N: the 16-token tile's count bounds the others')
    counters = (cuda_tile_counters(qweight.device, -(-a.shape[0] // 16) * -(-qweight.shape[0] // 128))
                if cuda_splitk_fixup_enabled() else None)

    pdl = w16_pdl_enabled()

    def launch(choice):
        return cuda_w16_gemm(a, qweight, w_scales, w_offsets, group, bias, out_dtype, split_k=choice[0],
                             tile=choice[1], tile_counters=counters, pdl=pdl and choice[1] in W16_WGMMA_TILES)

    m = a.shape[0]
    tiles = w16_tiles(a.device, int(group))
    cands = [c for c in W16_CHOICES
             if c[1] in tiles and c[0] <= max(1, nb // 2) and W16_TILE_ABOVE_M.get(c[1], -1) < m
             <= W16_TILE_UP_TO_M.get(c[1], m)]
    key = ("w16",) + _cuda_split.split_key(a.shape[0], qweight.shape[0], nb, 0, int(group), w_offsets is not None,
                                           qweight.dim() == 3, "graph") + (str(a.dtype), bias is not None)
    choice = _cuda_split.tuned_choice(key, cands, a.device, launch, check=_w16_outputs_agree)
    return launch(choice)


def _w16_outputs_agree(ref, y) -> bool:
    """The tuner's check of a candidate launch's output ``y`` against the first candidate's ``ref``
    (the tile by M, the kernel's own split rule): each is within DEQUANT_GEMM_RTOL (of the output
    dtype) of the reference, so they may differ by twice it.  Runs only while tuning."""
    from cometq.kernels.dequant_gemm import DEQUANT_GEMM_RTOL

    if ref.numel() == 0:
        return True
    rtol = 2 * DEQUANT_GEMM_RTOL.get(ref.dtype, DEQUANT_GEMM_RTOL[torch.float32])
    err = float((y.float() - ref.float()).abs().max())
    return err <= rtol * float(ref.float().abs().max())  # (NaN: False)


def _act_impl(x, perm, block_bits, n_int8, scale_mode, int4_clip=1.0):
    return cuda_quantize_act(x, perm, block_bits, n_int8, scale_mode, int4_clip)


def _gemm_impl(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, group_size, bias, out_dtype, scale_mode):
    why = gemm_extent_problem(q4, q8, a_scales, qweight, w_scales)
    if why is not None:
        raise ops.BackendUnsupported(why)  # (under auto the Triton GEMM runs it)
    counters = (cuda_tile_counters(qweight.device, _tiles_upper_bound(a_scales.shape[0], qweight.shape[0]))
                if cuda_splitk_fixup_enabled() else None)

    def launch(choice):
        split, tile = choice
        return cuda_w4ax_gemm(q4, q8, a_scales, block_bits, qweight, w_scales, group_size, bias, out_dtype,
                              scale_mode, w_offsets=w_offsets, split_k=split, tile=tile, tile_counters=counters)

    # M <= 64: the (split count, tile variant) timed once per shape and timing mode (cometq._cuda_split)
    choice = _cuda_split.tuned_split(a_scales.shape[0], w_scales.shape[0], block_bits.numel(),
                                     q8.shape[1] // BLOCK_K, -1 if group_size is None else int(group_size),
                                     w_offsets is not None, qweight.dim() == 3, a_scales.device, launch)
    return launch(choice)


#: ``COMETQ_KV4_ATTN_CUDA`` -- which kernel the "cuda" backend runs for KV4 decode attention on the
#: pools the CUDA kernel handles (the rest always run the Triton kernel):
#:   "0": the Triton kernel;  "1": the CUDA kernel (csrc/kv4_attention.cu);
#:   "auto" / unset: both timed on first use per (device, head_dim, group, GQA ratio, program-count
#:   bucket, timing mode) -- the CUDA kernel in all five launch variants at 1x / 2x / 4x the caller's split
#:   count -- and the fastest kept.
#: "auto" is the default since H100 run 6 (2026-11-27): the kernel passed its GPU tests and won all 6
#: buckets the batch-64 serving run timed (decode-step attention 2.28 ms vs run 5's Triton 3.44 ms).
KV4_ATTN_ENV = "COMETQ_KV4_ATTN_CUDA"
KV4_ATTN_MODES = ("0", "1", "auto")
KV4_ATTN_DEFAULT = "auto"
#: multiples of the caller's split count the "auto" mode times the CUDA kernel at
KV4_ATTN_SPLIT_FACTORS = (1, 2, 4)
#: CTAs per SM of each launch variant (csrc/kv4_attention.cu __launch_bounds__: 4, or 3 with the
#: next tile's registers): "auto" also times the split count that makes the grid one full wave of
#: them ("wave"), since (batch x KV heads x splits) CTAs a little above a wave run a second, mostly
#: empty one -- batch 16 x 8 heads x the default 6 splits is 768 CTAs for 528 slots (1.45 waves)
KV4_ATTN_CTAS_PER_SM = {0: 4, 1: 3, 2: 4, 3: 3, 4: 4}  # (4: 54 KB of shared memory per CTA, 4 fit sm_90's 228 KB)
#: "auto" choices: key -> ("cuda", split factor, variant), ("cuda", "wave", variant) or ("triton", 1, 0)
_ATTN_CHOICE: dict = {}
_NUM_SMS: dict = {}


def _num_sms(device) -> int:
    if getattr(device, "type", None) != "cuda":
        return 132  # (the CPU stand-in of the routing test: an H100's count)
    n = _NUM_SMS.get(device)
    if n is None:
        n = _NUM_SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def kv4_attention_wave_splits(batch: int, kv_heads: int, variant: int, num_sms: int) -> int:
    """The split count whose grid fills the GPU's resident CTA slots of ``variant`` once (>= 1)."""
    return max(1, min(1024, num_sms * KV4_ATTN_CTAS_PER_SM[variant] // max(1, batch * kv_heads)))


def _attn_splits(choice, ns: int, batch: int, kv_heads: int, device) -> int:
    if choice[1] == "wave":
        return kv4_attention_wave_splits(batch, kv_heads, choice[2], _num_sms(device))
    return ns * choice[1]


def kv4_attention_mode() -> str:
    v = os.environ.get(KV4_ATTN_ENV, KV4_ATTN_DEFAULT)
    if v not in KV4_ATTN_MODES:
        raise ValueError(f"{KV4_ATTN_ENV} must be one of {KV4_ATTN_MODES}, got {v!r}")
    return v


def kv4_attention_cuda_enabled() -> bool:
    """Whether the CUDA kernel may run (``COMETQ_KV4_ATTN_CUDA`` "1" or "auto")."""
    return kv4_attention_mode() != "0"


def kv4_attention_choices() -> dict:
    """The "auto" mode's kept choices, keys as strings (for benchmark reports)."""
    names = ("device", "head_dim", "group", "qpk", "programs", "mode")
    return {" ".join(f"{n}={v}" for n, v in zip(names, k)): list(c) for k, c in sorted(_ATTN_CHOICE.items(), key=repr)}


def cuda_kv4_decode_attention(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables,
                              quant_lens, tail_lens, seq_ids, group_size: int, key_axis: str, value_axis: str,
                              sm_scale: float, num_splits: int = 1, *, variant: int = 0):
    """The CUDA kernel itself (csrc/kv4_attention.cu), arguments as ``cometq.ops.kv4_decode_attention``
    (``variant``: :data:`KV4_ATTN_VARIANTS`, a tuning knob); raises ValueError for a pool format or
    query it does not handle (see :func:`cometq._cuda_checks.kv4_attention_unsupported`)."""
    if variant not in KV4_ATTN_VARIANTS:
        raise ValueError(f"variant must be one of {KV4_ATTN_VARIANTS}, got {variant!r}")
    why = kv4_attention_unsupported(q, k_packed, tail_k, group_size, key_axis, value_axis)
    if why is not None:
        raise ValueError(f"the CUDA KV4 attention kernel does not handle {why}")
    check_kv4_attention_inputs(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables,
                               quant_lens, tail_lens, seq_ids, group_size, num_splits)
    return torch.ops.cometq_C.kv4_decode_attention(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k,
                                                   tail_v, block_tables, quant_lens, tail_lens, seq_ids,
                                                   int(group_size), float(sm_scale), int(num_splits), int(variant))


def _kv4_attn_impl(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables, quant_lens,
                   tail_lens, seq_ids, group_size, key_axis, value_axis, sm_scale, num_splits):
    args = (q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables, quant_lens,
            tail_lens, seq_ids, group_size, key_axis, value_axis, sm_scale, num_splits)
    ops._load_backend("triton")
    impls = ops._IMPLS["kv4_decode_attention"]
    triton_impl = impls.get("triton", impls["reference"])  # the reference only where Triton is missing
    mode = kv4_attention_mode()
    if mode == "0" or kv4_attention_unsupported(q, k_packed, tail_k, group_size, key_axis, value_axis) is not None:
        return triton_impl(*args)
    if mode == "1":
        return cuda_kv4_decode_attention(*args)
    # "auto": the faster of the two for this shape class, timed once
    from . import autotune

    ns = int(num_splits)
    tmode = autotune.timing_mode()
    programs = 1 << max(0, (q.shape[0] * k_packed.shape[1] * ns - 1).bit_length())
    key = (str(q.device), q.shape[2], int(group_size), q.shape[1] // k_packed.shape[1], programs, tmode)
    choice = _ATTN_CHOICE.get(key)
    if choice is None:
        if (q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()) or autotune.frozen_now():
            return triton_impl(*args)  # no timing inside a capture / a frozen region (nothing cached)
        triton_impl(*args)  # its own launch-config tuner runs on first use: not part of the timing
        timer = autotune.cuda_graph_timer if tmode == "graph" else autotune.cuda_event_timer
        times = [(timer(lambda: triton_impl(*args), q.device, warmup=2, reps=8), ("triton", 1, 0))]
        tried = set()
        for v in kv4_attention_variants():
            for f in KV4_ATTN_SPLIT_FACTORS + ("wave",):
                c = ("cuda", f, v)
                splits = _attn_splits(c, ns, q.shape[0], k_packed.shape[1], q.device)
                if splits > 1024 or (splits, v) in tried:
                    continue
                tried.add((splits, v))
                cargs = args[:-1] + (splits,)
                times.append((timer(lambda: cuda_kv4_decode_attention(*cargs, variant=v), q.device, warmup=2,
                                    reps=8), c))
        choice = _ATTN_CHOICE[key] = min(times, key=lambda t: t[0])[1]
    if choice[0] == "cuda":
        return cuda_kv4_decode_attention(*args[:-1], _attn_splits(choice, ns, q.shape[0], k_packed.shape[1], q.device),
                                         variant=choice[2])
    return triton_impl(*args)


ops.register_impl("quantize_act", "cuda", _act_impl)
#: ``COMETQ_CUDA_FAKE_QUANT=0``: the "cuda" backend offers no ``fake_quant_act`` (the Triton FAKE pass
#: serves the 16-bit routes; bench/gpu_check.sh sets it when the kernel's GPU test fails)
CUDA_FAKE_QUANT_ENV = "COMETQ_CUDA_FAKE_QUANT"
if HAS_FAKE_QUANT and os.environ.get(CUDA_FAKE_QUANT_ENV, "1") != "0":
    ops.register_impl("fake_quant_act", "cuda", cuda_fake_quant_act)
#: ``COMETQ_CUDA_W16=0``: the "cuda" backend offers no ``w16_gemm`` (the w16 route runs the Triton
#: kernel; bench/gpu_check.sh sets it when the CUDA kernel's GPU test fails)
CUDA_W16_ENV = "COMETQ_CUDA_W16"
if HAS_W16 and os.environ.get(CUDA_W16_ENV, "1") != "0":
    ops.register_impl("w16_gemm", "cuda", _w16_impl)
ops.register_impl("kv4_decode_attention", "cuda", _kv4_attn_impl)
ops.register_impl("w4ax_gemm", "cuda", _gemm_impl)
