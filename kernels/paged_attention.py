"""Triton: decode attention over a paged *full-precision* K/V cache (the FP16 baseline).

The serving engine's unquantized pool (:class:`cometq.serve.kv.PagedFPPool`) is the
baseline W4Ax-KV4 is measured against, so it gets the same kind of kernel: one query row
per sequence reads its K/V history once, straight from the pool.  Before this kernel the
pool gathered a padded ``[B, T_max, Hkv, D]`` copy of K and V for every layer, expanded it
``Hq / Hkv`` times for SDPA and masked the padding (H100 run 7, Llama-3-8B geometry,
batch 64, 1024 + 512 tokens: 148.7 ms per output token against HF ``generate``'s 71.8) --
a baseline that slow flatters every ratio taken against it.

Work split, grid ``(batch, kv_heads, num_splits)`` (flash-decoding, as ``kv4_attention.py``)::

    row b:  tokens [0, lengths[b])  cut into TILE-token tiles, tiles cut into num_splits runs

* One program serves the ``QPK = Hq / Hkv`` query heads of one KV head (padded to BLOCK_H >= 16
  rows: ``tl.dot`` needs M >= 16): each K/V tile is loaded once for all of them.
* A tile's tokens are looked up one by one in the block table (``slot = table[t // BS] * BS +
  t % BS``), so any block size works, and tiles may straddle blocks; the table row is a few
  hundred bytes that stay in L1.
* Each token's ``[D]`` row of one KV head is ``D * 2`` contiguous bytes (pool layout
  ``[slots, Hkv, D]``): 16-byte vector loads, 256 bytes per row at D = 128 fp16.
* Softmax in the exp2 domain (``q`` pre-scaled by ``sm_scale * log2 e``); partial (max, sum,
  acc) per split, merged by the KV4 kernel's reduce (same partial layout); with one split the
  program writes ``acc / sum`` itself (no reduce launch).

Dot operands in the query's dtype on the GPU (fp16 / bf16 tensor cores, fp32 accumulate); fp32
with ``input_precision="ieee"`` under the CPU interpreter tests.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from cometq.paged import check_paged_tables, default_num_splits

from ._common import checks_with_sync, interpreting
from .kv4_attention import _DOT, _NEG, _dot, kv4_attn_reduce_kernel

#: tokens per tile (the dot's N); D = 128 fp16 K and V tiles of 32 tokens are 8 KB each, in
#: registers across 4 warps without spills
TILE = 32
NUM_WARPS = 4


@triton.jit
def paged_attn_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr,
    po_ptr, pm_ptr, pl_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_btb,
    stride_pob, stride_poh, stride_pos,
    QPK: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DIRECT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    lq = tl.load(len_ptr + b).to(tl.int32)
    n_tiles = tl.cdiv(lq, TILE)
    per = tl.cdiv(n_tiles, num_splits)
    it_lo = split * per
    it_hi = tl.minimum(it_lo + per, n_tiles)

    hh = tl.arange(0, BLOCK_H)
    hmask = hh < QPK
    heads = kvh * QPK + hh
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=hmask[:, None],
                other=0.0).to(tl.float32) * qk_scale
    q = q.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_H], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    tt = tl.arange(0, TILE)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    for it in range(it_lo, it_hi):
        pos = it * TILE + tt
        tmask = pos < lq
        phys = tl.load(bt_row + pos // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        slot = phys * BLOCK_SIZE + pos % BLOCK_SIZE
        k = tl.load(k_ptr + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :], mask=tmask[:, None], other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=tmask[:, None], other=0.0)
        s = _dot(q, tl.trans(k.to(DOT_DTYPE)), DOT_DTYPE)  # [BLOCK_H, TILE]
        s = tl.where(tmask[None, :], s, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.where(tmask[None, :], tl.math.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), DOT_DTYPE)
        m_i = m_new

    ob = po_ptr + b.to(tl.int64) * stride_pob + heads[:, None] * stride_poh + split * stride_pos + d[None, :]
    if DIRECT:
        # one split (po_ptr is the output [B, Hq, D]): acc / l here, no reduce launch; a row
        # of length 0 has l = 0 and acc = 0 -> zeros
        den = tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(ob, (acc / den).to(po_ptr.dtype.element_ty), mask=hmask[:, None])
    else:
        tl.store(ob, acc, mask=hmask[:, None])
        mo = (b.to(tl.int64) * (QPK * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(pm_ptr + mo, m_i, mask=hmask)
        tl.store(pl_ptr + mo, l_i, mask=hmask)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, lengths, block_size: int, sm_scale: float,
                                  num_splits: int = 0) -> torch.Tensor:
    """``cometq::paged_decode_attention`` in Triton (arguments and result as
    :func:`cometq.paged.paged_decode_attention_reference`; ``num_splits`` 0: one split per
    ~6 programs per SM, :func:`cometq.paged.default_num_splits` over TILE-token tiles).
    Shapes are the op's checks (done by the caller); head_dim must be a power of two >= 16."""
    from cometq.ops import BackendUnsupported

    bsz, hq, d = q.shape
    hkv = k_cache.shape[1]
    if d < 16 or d & (d - 1):
        raise BackendUnsupported(f"head_dim {d} is not a power of two >= 16")
    for nm, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(2) != 1:
            raise BackendUnsupported(f"{nm} rows must be contiguous along head_dim, strides {t.stride()}")
    if q.stride(2) != 1:
        q = q.contiguous()
    if checks_with_sync() or q.device.type != "cuda":  # content checks: free on CPU, a sync on CUDA (opt-in)
        check_paged_tables(block_tables, lengths, block_size, k_cache.shape[0])
    out = torch.empty_like(q)
    if bsz == 0:
        return out
    qpk = hq // hkv
    nt = triton.cdiv(block_tables.shape[1] * block_size, TILE)  # bound on the tiles of the longest row
    ns = int(num_splits) or default_num_splits(bsz, hkv, nt, _num_sms(q.device))
    ns = max(1, min(ns, nt))
    dot = tl.float32 if interpreting() else _DOT[q.dtype]
    meta = dict(QPK=qpk, BLOCK_H=max(16, triton.next_power_of_2(qpk)), D=d, BLOCK_SIZE=int(block_size), TILE=TILE,
                DOT_DTYPE=dot, num_warps=NUM_WARPS)
    qk = float(sm_scale) * math.log2(math.e)
    common = (q, k_cache, v_cache, block_tables, lengths)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
               block_tables.stride(0))
    grid = (bsz, hkv, ns)
    if ns == 1:
        paged_attn_split_kernel[grid](*common, out, out, out, qk, *strides, out.stride(0), out.stride(1), 0,
                                      DIRECT=True, **meta)
        return out
    po = torch.empty(bsz, hq, ns, d, dtype=torch.float32, device=q.device)
    pm = torch.empty(bsz, hq, ns, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    paged_attn_split_kernel[grid](*common, po, pm, pl, qk, *strides, po.stride(0), po.stride(1), po.stride(2),
                                  DIRECT=False, **meta)
    kv4_attn_reduce_kernel[(bsz, hq)](po, pm, pl, out, po.stride(0), po.stride(1), po.stride(2), out.stride(0),
                                      out.stride(1), ns, HQ=hq, SPLITS_P2=triton.next_power_of_2(ns), D=d)
    return out
