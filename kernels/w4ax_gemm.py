"""W4Ax GEMM in Triton: INT4 weights x mixed INT4/INT8 activation blocks, int32 tensor-core dots.

``y[m, n] = sum_segments a_scale[m, s] * w_scale[n, s] * (x_int[m, seg] . w_int[n, seg]) (+ bias[n])``
(the spec is :func:`cometq.reference.w4ax_gemm`; integer partial sums are exact).
Asymmetric weights (``w_offsets``, the ``ASYM`` kernels) add
``a_scale[m, s] * w_offset[n, s] * asum[m, s]`` per segment, ``asum`` the sum of
the segment's activation integers (see ``_block_segments``).

Operand layouts in global memory (see cometq.layout)::

    qweight uint8 [N, K_pad/2]   byte (n, b*64 + j) = w[n, b*128+2j] (lo nibble) | w[n, b*128+2j+1] (hi)
    q4      uint8 [M, n4*64]     INT4 blocks, same nibble order, in ascending block order
    q8      int8  [M, n8*128]    INT8 blocks in ascending block order
    order   int32 [NB]           host-built list: the n8 INT8 block ids, then the n4 INT4 block ids
                                 (position i < n8 -> q8 slot i; i >= n8 -> q4 slot i-n8)

The key layout observation: because weights and INT4 activations share the
nibble order, a 64-byte chunk of either unpacks into an "even-K" and an "odd-K"
int8 ``[*, 64]`` half with two shifts, and::

    x . w = x_even . w_even + x_odd . w_odd        (two tl.dot int8 -> int32, K=64 each)

so *no* register shuffle (interleave) is needed on either side.  For INT8
activation blocks the even/odd halves are loaded with stride 2 from the same
128-byte row segment (two loads hitting the same L1/L2 lines), or, with the
``interleave8`` config flag, loaded contiguously while the weight nibbles are
interleaved back into K order in registers (one K=128 dot).  The ``swap_ab``
flag computes the transposed tile ``W x^T`` so the unpacked weights are the
MMA's A operand (see ``_block_segments``).  Hopper has no
INT4 MMA (``mma .s4`` is emulated, wgmma rejects s4), so both activation
precisions run on int8 MMA: an INT8 block and an INT4 block cost the same MMA
work; INT4 blocks only halve activation bytes.  Weight bytes are identical.

Scales (the "scale placement" question, see docs/KERNELS.md):

* "block" mode: each block's int32 partial sum is converted and rescaled
  (``acc_f += float(acc_blk) * a_scale[m, b] * w_scale[n, g]``): one FMA-ish
  epilogue per block per output, in registers.
* "class" mode with per-channel weights: the whole INT8 run and the whole INT4
  run are accumulated in int32 (``|sum| < K*127*8 < 2**31`` for K < 2**21) and
  rescaled once each, after the loops.  With weight groups the group scale
  changes inside the run, so class mode falls back to per-segment rescaling.
* weight group ``G < 128``: a block holds ``128/G`` segments.  For ``G >= 64``
  each segment is its own pair of dots (K = G/2 >= 32, the int8 ``tl.dot``
  minimum); for ``G = 16/32`` the segment is cut out of a 32-wide chunk by
  zeroing the other activation columns (costs 2x/4x MMA work; such small
  groups are not a target configuration).

Three launch paths share one per-(tile, block-range) body ``_accumulate``:

* tiled: grid ``(m_tiles * n_tiles,)``, grouped tile order for L2 reuse.
* split-K (decode, M <= 16): grid ``(m_tiles * n_tiles, SPLIT)``: each program
  streams ``NB/SPLIT`` blocks of weights (``evict_first``: weights are used once)
  and adds its fp32 partial into a zeroed fp32 buffer with ``tl.atomic_add``
  (summation order varies run to run: within tolerance, not bitwise).
* persistent: grid ``(P,)`` programs; a host-side stream-K schedule gives each
  program a contiguous list of (tile, block-range) work items with equal
  *weighted* cost (INT8 block ``cost8``, INT4 block ``cost4``), so no SM ends up
  with only INT8-heavy tiles.  Split tiles are combined with fp32 atomics.

Deterministic reduction (``deterministic=True`` or ``COMETQ_DETERMINISTIC=1``): the
split-K and persistent kernels are compiled with ``WORKSPACE`` instead of ``ATOMIC``;
every piece of a split tile stores its fp32 partial (no bias) into its own slot of a
workspace (one ``[BLOCK_M, BLOCK_N]`` fp32 tile per piece, only valid elements
written)::

    split-K:     slot = tile * C + j            j = chunk index 0..C-1, C = cdiv(NB, cdiv(NB, SPLIT))
    persistent:  slot = stream_k_slots(items)   pieces of a tile consecutive, in block order

and ``w4ax_reduce_kernel`` (one program per split tile) computes
``out = cast(((P_0 + P_1) + ... + P_{C-1}) + bias)`` in that fixed order.  Each
``P_j`` is the same ``_accumulate`` over block-list positions ``[i_lo, i_hi)``, so the
result depends only on where the tile's block list is cut: identical across runs,
across SPLIT values with the same chunk size, and between split-K and a stream-K
schedule that cut a tile at the same positions.  Unsplit tiles are stored
directly as on the tiled path (``cast(P_0 + bias)``).  Cost: one ``[C, M, N]`` fp32
write + read (L2-resident at decode) and one small launch, instead of the atomic
path's zero fill + fp32 atomics + cast.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import triton
import triton.language as tl

from cometq._counters import _COUNTERS, tile_counters  # noqa: F401  (_COUNTERS: the GPU tests read it)
from cometq.layout import BLOCK_K, SCALE_MODES, check_tensor
from cometq.reference import FLOAT_DTYPES, check_group_size

from ._common import (checks_with_sync, cometq_autotune, derived, dummy, interpreting, next_pow2, nonempty,
                      unpack_hi, unpack_lo)
from .act_quant import split_rows_triton

__all__ = [
    "GemmConfig",
    "chosen_config",
    "gen_configs",
    "m_bucket",
    "select_config",
    "stream_k_schedule",
    "stream_k_slots",
    "resolve_deterministic",
    "ENV_DETERMINISTIC",
    "ENV_SPLITK_FIXUP",
    "ENV_TMA",
    "w4ax_gemm_triton",
    "w4ax_reduce_kernel",
    "w4ax_gemm_kernel",
    "w4ax_gemm_persistent_kernel",
    "w4ax_gemm_tma_kernel",
    "tma_available",
    "PATHS",
]

PATHS = ("auto", "tiled", "splitk", "persistent", "tma", "dequant")


# ==========================================================================
# kernel body
# ==========================================================================
@triton.jit
def _outer(u_m, v_n, SWAP_AB: tl.constexpr):
    """``u[m] * v[n]`` laid out like the accumulator: ``[BM, BN]``, or ``[BN, BM]`` when swapped."""
    if SWAP_AB:
        return v_n[:, None] * u_m[None, :]
    else:
        return u_m[:, None] * v_n[None, :]


@triton.jit
def _grid_ptrs(base, rm, rn, stride_m, stride_n, SWAP_AB: tl.constexpr):
    if SWAP_AB:
        return base + rn[:, None] * stride_n + rm[None, :] * stride_m
    else:
        return base + rm[:, None] * stride_m + rn[None, :] * stride_n


@triton.jit
def _grid_mask(m_mask, n_mask, SWAP_AB: tl.constexpr):
    if SWAP_AB:
        return n_mask[:, None] & m_mask[None, :]
    else:
        return m_mask[:, None] & n_mask[None, :]


@triton.jit
def _mma(acc, a_e, a_o, a_full, wp, FULL: tl.constexpr, SWAP_AB: tl.constexpr):
    """``acc + x . w`` for one segment (int32), in the accumulator's orientation.

    FULL=False: ``x_even . w_even + x_odd . w_odd`` (two dots, K = H each).
    FULL=True (INT8 activations loaded contiguously as ``a_full`` [BM, 2H]): the
    weight nibbles are interleaved back into K order in registers
    (``join(lo, hi)`` -> ``[BN, H, 2]`` -> reshape ``[BN, 2H]``: each thread already
    holds both nibbles of its bytes) and one K = 2H dot runs.
    """
    if FULL:
        w_full = tl.reshape(tl.join(unpack_lo(wp), unpack_hi(wp)), (wp.shape[0], 2 * wp.shape[1]))
        if SWAP_AB:
            acc = tl.dot(w_full, tl.trans(a_full), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a_full, tl.trans(w_full), acc, out_dtype=tl.int32)
    else:
        if SWAP_AB:
            acc = tl.dot(unpack_lo(wp), tl.trans(a_e), acc, out_dtype=tl.int32)
            acc = tl.dot(unpack_hi(wp), tl.trans(a_o), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a_e, tl.trans(unpack_lo(wp)), acc, out_dtype=tl.int32)
            acc = tl.dot(a_o, tl.trans(unpack_hi(wp)), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _block_segments(
    acc_f, acc_i, asum_i, sa, b, slot,
    q_ptr, w_ptr, ws_ptr, wo_ptr, dbg_ptr, dsum_ptr,
    rm, rn, m_mask, n_mask,
    stride_qm, stride_wn, stride_wb, stride_wsn, stride_won, stride_dm, stride_dn, stride_dsm,
    GROUP,
    IS8: tl.constexpr, SEGS: tl.constexpr, SEG_H: tl.constexpr, H_LOAD: tl.constexpr,
    INT_ACC: tl.constexpr, DEBUG: tl.constexpr, EVICT_W: tl.constexpr, SWAP_AB: tl.constexpr,
    INTERLEAVE8: tl.constexpr, ASYM: tl.constexpr,
):
    """All segments of one 128-block: int8 dots -> int32, then rescale (or int32 accumulate).

    SWAP_AB computes ``acc^T = W x^T``: the unpacked weights (produced in registers)
    become the MMA's A operand, which wgmma may take from registers, and the
    activations (loaded as-is) the B operand it reads from shared memory; the
    token dimension becomes the MMA's N (8..256) so small M wastes less of a
    64-row wgmma tile.  Unswapped, the unpacked weights are the B operand and
    must be written back to shared memory before every wgmma.

    INTERLEAVE8 (INT8 blocks, G >= 64): load the activations contiguously (16-byte
    vectors / cp.async) and interleave the weight nibbles instead of loading the
    activations' even/odd K values with stride 2 (byte loads).

    ASYM (asymmetric weights ``w = scale * q + offset``): the offset term of a
    segment is ``a_scale[m] * offset[n] * asum[m]`` with ``asum`` the row sum of the
    segment's activation integers, a rank-1 update.  ``asum`` comes from the
    activation tile already loaded (after the SEG_H < H_LOAD mask, so it is the
    segment's sum, not the chunk's), as one small MMA against a ones tile
    (:func:`_row_sum`); one per segment, independent of BLOCK_N.  ASYM=False
    compiles none of it.
    """
    for s in tl.static_range(SEGS):
        # the H_LOAD-byte chunk (packed weight columns) holding segment s
        c0 = (s * SEG_H // H_LOAD) * H_LOAD  # constexpr (s is a static_range index)
        j = c0 + tl.arange(0, H_LOAD)
        a_e = None
        a_o = None
        a_full = None
        if IS8 and INTERLEAVE8 and SEG_H == H_LOAD:
            # INT8 block, contiguous: the 2*H K values of this segment in K order
            jj = 2 * c0 + tl.arange(0, 2 * H_LOAD)
            a_full = tl.load(q_ptr + rm[:, None] * stride_qm + slot * 128 + jj[None, :], mask=m_mask[:, None],
                             other=0)
        elif IS8:
            # INT8 block: even / odd K values straight from q8 (stride-2 loads, same lines)
            a_base = q_ptr + rm[:, None] * stride_qm + slot * 128 + 2 * j[None, :]
            a_e = tl.load(a_base, mask=m_mask[:, None], other=0)
            a_o = tl.load(a_base + 1, mask=m_mask[:, None], other=0)
        else:
            # INT4 block: one byte load gives both halves (lo nibble = even K)
            ap = tl.load(q_ptr + rm[:, None] * stride_qm + slot * 64 + j[None, :], mask=m_mask[:, None], other=0)
            a_e = unpack_lo(ap)
            a_o = unpack_hi(ap)
        if SEG_H < H_LOAD:
            keep = (j >= s * SEG_H) & (j < (s + 1) * SEG_H)
            a_e = tl.where(keep[None, :], a_e, 0).to(tl.int8)
            a_o = tl.where(keep[None, :], a_o, 0).to(tl.int8)
        if ASYM:
            # row sums of the segment's activation integers ([BLOCK_M] int32, exact:
            # |sum| <= 128 * 128); rows beyond M loaded as 0
            # (on the tensor cores, _row_sum: x @ ones)
            if IS8 and INTERLEAVE8 and SEG_H == H_LOAD:
                asum = _row_sum(a_full)
            else:
                asum = _row_sum(a_e) + _row_sum(a_o)
            if DEBUG:
                tl.store(dsum_ptr + rm * stride_dsm + (b * SEGS + s), asum, mask=m_mask)
            if INT_ACC:
                asum_i += asum
        # weights: H_LOAD contiguous bytes per row (16-byte vector loads), used once
        wp = tl.load(w_ptr + rn[:, None] * stride_wn + b * stride_wb + j[None, :], mask=n_mask[:, None], other=0,
                     eviction_policy=EVICT_W)
        if INT_ACC and not DEBUG:
            # class mode, per-channel weights: chain the int32 accumulator through the
            # dots (acc = dot(a, b, acc)) so the MMAs of a whole run never stop for a rescale
            acc_i = _mma(acc_i, a_e, a_o, a_full, wp, IS8 and INTERLEAVE8 and SEG_H == H_LOAD, SWAP_AB)
        else:
            acc_s = _mma(tl.zeros(acc_f.shape, dtype=tl.int32), a_e, a_o, a_full, wp,
                         IS8 and INTERLEAVE8 and SEG_H == H_LOAD, SWAP_AB)
            if DEBUG:
                tl.store(_grid_ptrs(dbg_ptr + (b * SEGS + s), rm, rn, stride_dm, stride_dn, SWAP_AB), acc_s,
                         mask=_grid_mask(m_mask, n_mask, SWAP_AB))
            if INT_ACC:
                acc_i += acc_s
        if not INT_ACC:
            wcol = (b * 128 + s * (2 * SEG_H)) // GROUP
            sw = tl.load(ws_ptr + rn * stride_wsn + wcol, mask=n_mask, other=0.0)
            acc_f += acc_s.to(tl.float32) * _outer(sa, sw, SWAP_AB)
            if ASYM:
                wo = tl.load(wo_ptr + rn * stride_won + wcol, mask=n_mask, other=0.0)
                acc_f += _outer(sa * asum.to(tl.float32), wo, SWAP_AB)
    return acc_f, acc_i, asum_i


@triton.jit
def _accumulate(
    i_lo, i_hi, N8,
    order_ptr, q4_ptr, q8_ptr, as_ptr, w_ptr, ws_ptr, wo_ptr, dbg_ptr, dsum_ptr,
    rm, rn, m_mask, n_mask,
    stride_q4m, stride_q8m, stride_asm, stride_wn, stride_wb, stride_wsn, stride_won, stride_dm, stride_dn, stride_dsm,
    GROUP,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CLASS_MODE: tl.constexpr, SEGS: tl.constexpr, SEG_H: tl.constexpr, H_LOAD: tl.constexpr,
    INT_ACC: tl.constexpr, DEBUG: tl.constexpr, EVICT_W: tl.constexpr, SWAP_AB: tl.constexpr,
    INTERLEAVE8: tl.constexpr, ASYM: tl.constexpr, ORDERED: tl.constexpr,
):
    """fp32 partial result (``[BLOCK_M, BLOCK_N]``, transposed if SWAP_AB) of block-list positions ``[i_lo, i_hi)``.

    ORDERED: the map already lists its INT8 blocks first (what calibration writes), so
    list position i *is* block i -- the weight address is affine in the loop counter
    instead of depending on a load of ``order[i]`` in the same iteration (an indirect
    address the software pipeliner cannot issue stages ahead)."""
    if SWAP_AB:
        acc_f = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if CLASS_MODE:
        sa4 = tl.load(as_ptr + rm * stride_asm, mask=m_mask, other=0.0)
        sa8 = tl.load(as_ptr + rm * stride_asm + 1, mask=m_mask, other=0.0)
    # ---- INT8 blocks: list positions [i_lo, min(i_hi, N8)), q8 slot = position
    acc_i = tl.zeros(acc_f.shape, dtype=tl.int32)
    asum_i = tl.zeros((BLOCK_M,), dtype=tl.int32)  # ASYM + INT_ACC: the run's activation sum
    for i in range(i_lo, tl.minimum(i_hi, N8)):
        if ORDERED:
            b = i
        else:
            b = tl.load(order_ptr + i)
        if CLASS_MODE:
            sa = sa8
        else:
            sa = tl.load(as_ptr + rm * stride_asm + b, mask=m_mask, other=0.0)
        acc_f, acc_i, asum_i = _block_segments(
            acc_f, acc_i, asum_i, sa, b, i, q8_ptr, w_ptr, ws_ptr, wo_ptr, dbg_ptr, dsum_ptr, rm, rn, m_mask, n_mask,
            stride_q8m, stride_wn, stride_wb, stride_wsn, stride_won, stride_dm, stride_dn, stride_dsm, GROUP,
            True, SEGS, SEG_H, H_LOAD, INT_ACC, DEBUG, EVICT_W, SWAP_AB, INTERLEAVE8, ASYM)
    if INT_ACC:
        # class mode, per-channel weights: one rescale for the whole INT8 run
        sw = tl.load(ws_ptr + rn * stride_wsn, mask=n_mask, other=0.0)
        acc_f += acc_i.to(tl.float32) * _outer(sa8, sw, SWAP_AB)
        if ASYM:  # and one offset term: a_scale * offset * (sum of the run's activation integers)
            wo = tl.load(wo_ptr + rn * stride_won, mask=n_mask, other=0.0)
            acc_f += _outer(sa8 * asum_i.to(tl.float32), wo, SWAP_AB)
    # ---- INT4 blocks: list positions [max(i_lo, N8), i_hi), q4 slot = position - N8
    acc_i = tl.zeros(acc_f.shape, dtype=tl.int32)
    asum_i = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for i in range(tl.maximum(i_lo, N8), i_hi):
        if ORDERED:
            b = i
        else:
            b = tl.load(order_ptr + i)
        if CLASS_MODE:
            sa = sa4
        else:
            sa = tl.load(as_ptr + rm * stride_asm + b, mask=m_mask, other=0.0)
        acc_f, acc_i, asum_i = _block_segments(
            acc_f, acc_i, asum_i, sa, b, i - N8, q4_ptr, w_ptr, ws_ptr, wo_ptr, dbg_ptr, dsum_ptr, rm, rn, m_mask,
            n_mask, stride_q4m, stride_wn, stride_wb, stride_wsn, stride_won, stride_dm, stride_dn, stride_dsm, GROUP,
            False, SEGS, SEG_H, H_LOAD, INT_ACC, DEBUG, EVICT_W, SWAP_AB, INTERLEAVE8, ASYM)
    if INT_ACC:
        sw = tl.load(ws_ptr + rn * stride_wsn, mask=n_mask, other=0.0)
        acc_f += acc_i.to(tl.float32) * _outer(sa4, sw, SWAP_AB)
        if ASYM:
            wo = tl.load(wo_ptr + rn * stride_won, mask=n_mask, other=0.0)
            acc_f += _outer(sa4 * asum_i.to(tl.float32), wo, SWAP_AB)
    return acc_f


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped ordering: GROUP_M row tiles sweep the N tiles together so their
    # weight columns stay in L2 while the group is in flight
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    gid = tile // width
    first_m = gid * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % gsize
    pid_n = (tile % width) // gsize
    return pid_m, pid_n


@triton.jit
def _epilogue(acc_f, add_bias, out_ptr, bias_ptr, rm, rn, m_mask, n_mask, stride_om, stride_on, keep,
              HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, SWAP_AB: tl.constexpr):
    # keep: scalar, False suppresses the store (persistent deterministic items that go to the workspace)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_mask & add_bias, other=0.0).to(tl.float32)
        if SWAP_AB:
            acc_f += bias[:, None]
        else:
            acc_f += bias[None, :]
    ptrs = _grid_ptrs(out_ptr, rm, rn, stride_om, stride_on, SWAP_AB)
    mask = _grid_mask(m_mask, n_mask, SWAP_AB) & keep
    if ATOMIC:
        tl.atomic_add(ptrs, acc_f, mask=mask)
    else:
        tl.store(ptrs, acc_f.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_partial(acc_f, part_ptr, slot, lm, ln, m_mask, n_mask, keep,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr):
    """Deterministic mode: write the fp32 partial of one (tile, block range) into workspace slot ``slot``.

    A slot is one row-major ``[BLOCK_M, BLOCK_N]`` fp32 tile (``lm``/``ln`` = row/column
    inside the tile); rows >= M and columns >= N are masked, so the bytes moved are
    the valid ``M x N`` elements only.  Plain stores: no atomics, no zero fill.
    """
    base = part_ptr + slot.to(tl.int64) * (BLOCK_M * BLOCK_N)
    tl.store(_grid_ptrs(base, lm, ln, BLOCK_N, 1, SWAP_AB), acc_f, mask=_grid_mask(m_mask, n_mask, SWAP_AB) & keep)


@triton.jit
def _reduce_tile(part_ptr, first, count, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om, stride_on,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, CACHE: tl.constexpr):
    """``out[tile] = cast(((P_first + P_first+1) + ...) + bias)`` over ``count`` workspace slots, in slot order.
    CACHE ".cg": the slots were written by other programs of the same launch -- read them from L2,
    never from a possibly stale L1 line ("" otherwise)."""
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + lm
    rn = pid_n * BLOCK_N + ln
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = lm[:, None] * BLOCK_N + ln[None, :]
    acc = tl.load(part_ptr + first.to(tl.int64) * (BLOCK_M * BLOCK_N) + offs, mask=mask, other=0.0,
                  cache_modifier=CACHE)
    for j in range(1, count):
        acc += tl.load(part_ptr + (first + j).to(tl.int64) * (BLOCK_M * BLOCK_N) + offs, mask=mask, other=0.0,
                       cache_modifier=CACHE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def w4ax_reduce_kernel(
    red_ptr, part_ptr, bias_ptr, out_ptr, M, N, SLOTS, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TABLE: tl.constexpr,
):
    """Deterministic split-K / stream-K reduction: ``out = cast(((P_0 + P_1) + ... + P_{c-1}) + bias)``.

    One program per output tile that was computed in pieces.  ``HAS_TABLE=False``
    (split-K): tile = program id, its ``c = SLOTS`` partials in slots
    ``tile*SLOTS .. tile*SLOTS + SLOTS - 1`` (chunk order).  ``HAS_TABLE=True``
    (persistent stream-K): ``red`` int32 ``[n, 3]`` = (tile, first slot, count), the
    slots in schedule order (= ascending block ranges).  The sum runs in slot order
    in fp32, one fixed sequence per element: the result does not depend on which
    program finished first.
    """
    p = tl.program_id(0)
    if HAS_TABLE:
        tile = tl.load(red_ptr + 3 * p)
        first = tl.load(red_ptr + 3 * p + 1)
        count = tl.load(red_ptr + 3 * p + 2)
    else:
        tile = p
        first = p * SLOTS
        count = SLOTS
    pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    _reduce_tile(part_ptr, first, count, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om, stride_on,
                 BLOCK_M, BLOCK_N, HAS_BIAS, "")


@triton.jit
def _splitk_fixup(tile, pid_m, pid_n, count, part_ptr, cnt_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Split-K without the reduce launch (FIXUP): after this piece's partial is in its workspace
    slot, one gpu-scope acq_rel atomic per program counts the tile's pieces; the last one to
    arrive sums the ``count`` slots itself -- :func:`w4ax_reduce_kernel`'s loads and adds in its
    order, so the same bits -- and sets the counter back to 0 for the next GEMM of the stream.
    Ordering (CUTLASS's serial split-K pattern): every thread's slot stores, a CTA barrier, then
    the release half of the atomic (cumulative over the barrier); the last program's acquire half
    orders its ``.cg`` loads after every other piece's release.  Why: a decode GEMM's reduce
    kernel is one more launch (and its gap) per split GEMM in a decode step."""
    tl.debug_barrier()
    prev = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if prev == count - 1:
        tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
        _reduce_tile(part_ptr, tile * count, count, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om, stride_on,
                     BLOCK_M, BLOCK_N, HAS_BIAS, ".cg")


@triton.jit
def w4ax_gemm_kernel(
    order_ptr, q4_ptr, q8_ptr, as_ptr, w_ptr, ws_ptr, wo_ptr, bias_ptr, out_ptr, dbg_ptr, dsum_ptr, part_ptr,
    M, N, NB, N8, GROUP, SPLIT,
    stride_q4m, stride_q8m, stride_asm, stride_wn, stride_wb, stride_wsn, stride_won, stride_om, stride_on, stride_dm, stride_dn,
    stride_dsm, cnt_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, ATOMIC: tl.constexpr,
    CLASS_MODE: tl.constexpr, SEGS: tl.constexpr, SEG_H: tl.constexpr, H_LOAD: tl.constexpr,
    INT_ACC: tl.constexpr, HAS_BIAS: tl.constexpr, DEBUG: tl.constexpr, EVICT_W: tl.constexpr,
    SWAP_AB: tl.constexpr, INTERLEAVE8: tl.constexpr, ASYM: tl.constexpr, WORKSPACE: tl.constexpr,
    ORDERED: tl.constexpr = False, FIXUP: tl.constexpr = False,
):
    """Tiled (ATOMIC=WORKSPACE=False: whole block list, direct store) and split-K W4Ax GEMM.

    Split-K: program_id(1) takes chunk ``j`` (``cdiv(NB, SPLIT)`` consecutive list
    positions) of the block list, and either adds its fp32 partial into a zeroed fp32
    buffer (ATOMIC: fast, order varies run to run) or stores it into workspace slot
    ``tile * SPLIT + j`` (WORKSPACE: deterministic; ``w4ax_reduce_kernel`` sums the
    slots in chunk order -- or, FIXUP, the tile's last piece does, :func:`_splitk_fixup`).
    SPLIT is a runtime value so every split factor shares one compiled kernel."""
    tile = tl.program_id(0)
    pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + lm
    rn = pid_n * BLOCK_N + ln
    m_mask = rm < M
    n_mask = rn < N
    if not (ATOMIC or WORKSPACE):
        i_lo = 0
        i_hi = NB
    else:
        chunk = tl.cdiv(NB, SPLIT)
        i_lo = tl.program_id(1) * chunk
        i_hi = tl.minimum(i_lo + chunk, NB)
    acc_f = _accumulate(
        i_lo, i_hi, N8, order_ptr, q4_ptr, q8_ptr, as_ptr, w_ptr, ws_ptr, wo_ptr, dbg_ptr, dsum_ptr,
        rm, rn, m_mask, n_mask,
        stride_q4m, stride_q8m, stride_asm, stride_wn, stride_wb, stride_wsn, stride_won, stride_dm, stride_dn, stride_dsm,
        GROUP, BLOCK_M, BLOCK_N, CLASS_MODE, SEGS, SEG_H, H_LOAD, INT_ACC, DEBUG, EVICT_W, SWAP_AB, INTERLEAVE8, ASYM,
        ORDERED)
    if WORKSPACE:
        _store_partial(acc_f, part_ptr, tile * SPLIT + tl.program_id(1), lm, ln, m_mask, n_mask, True,
                       BLOCK_M, BLOCK_N, SWAP_AB)
        if FIXUP:
            _splitk_fixup(tile, pid_m, pid_n, SPLIT, part_ptr, cnt_ptr, bias_ptr, out_ptr, M, N, stride_om,
                          stride_on, BLOCK_M, BLOCK_N, HAS_BIAS)
    else:
        _epilogue(acc_f, i_lo == 0, out_ptr, bias_ptr, rm, rn, m_mask, n_mask, stride_om, stride_on, True,
                  HAS_BIAS, ATOMIC, SWAP_AB)


@triton.jit
def w4ax_gemm_persistent_kernel(
    items_ptr, starts_ptr, slots_ptr,
    order_ptr, q4_ptr, q8_ptr, as_ptr, w_ptr, ws_ptr, wo_ptr, bias_ptr, out_ptr, dbg_ptr, dsum_ptr, part_ptr,
    M, N, NB, N8, GROUP,
    stride_q4m, stride_q8m, stride_asm, stride_wn, stride_wb, stride_wsn, stride_won, stride_om, stride_on, stride_dm, stride_dn,
    stride_dsm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, ATOMIC: tl.constexpr,
    CLASS_MODE: tl.constexpr, SEGS: tl.constexpr, SEG_H: tl.constexpr, H_LOAD: tl.constexpr,
    INT_ACC: tl.constexpr, HAS_BIAS: tl.constexpr, DEBUG: tl.constexpr, EVICT_W: tl.constexpr,
    SWAP_AB: tl.constexpr, INTERLEAVE8: tl.constexpr, ASYM: tl.constexpr, WORKSPACE: tl.constexpr,
    ORDERED: tl.constexpr = False,
):
    """Persistent stream-K W4Ax GEMM: program p runs work items ``starts[p] .. starts[p+1]``.

    ``items`` int32 ``[n_items, 3]`` = (tile, i_lo, i_hi) over the block list.
    Split tiles: ATOMIC adds fp32 partials into a zeroed buffer; WORKSPACE (deterministic)
    stores item w's partial into slot ``slots[w]`` (the pieces of a tile get consecutive
    slots in schedule order) and ``w4ax_reduce_kernel`` sums them; an item with
    ``slots[w] = -1`` covers its whole tile and is stored directly (bias, cast).
    """
    p = tl.program_id(0)
    w_lo = tl.load(starts_ptr + p)
    w_hi = tl.load(starts_ptr + p + 1)
    for w in range(w_lo, w_hi):
        tile = tl.load(items_ptr + 3 * w)
        i_lo = tl.load(items_ptr + 3 * w + 1)
        i_hi = tl.load(items_ptr + 3 * w + 2)
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = rm < M
        n_mask = rn < N
        acc_f = _accumulate(
            i_lo, i_hi, N8, order_ptr, q4_ptr, q8_ptr, as_ptr, w_ptr, ws_ptr, wo_ptr, dbg_ptr, dsum_ptr,
            rm, rn, m_mask, n_mask,
            stride_q4m, stride_q8m, stride_asm, stride_wn, stride_wb, stride_wsn, stride_won, stride_dm, stride_dn, stride_dsm,
            GROUP, BLOCK_M, BLOCK_N, CLASS_MODE, SEGS, SEG_H, H_LOAD, INT_ACC, DEBUG, EVICT_W, SWAP_AB, INTERLEAVE8,
            ASYM, ORDERED)
        if WORKSPACE:
            # one scalar per item decides where the tile goes; both stores are issued,
            # the masks keep exactly one of them (no divergent control flow)
            slot = tl.load(slots_ptr + w)
            _store_partial(acc_f, part_ptr, tl.maximum(slot, 0), rm - pid_m * BLOCK_M, rn - pid_n * BLOCK_N,
                           m_mask, n_mask, slot >= 0, BLOCK_M, BLOCK_N, SWAP_AB)
            _epilogue(acc_f, i_lo == 0, out_ptr, bias_ptr, rm, rn, m_mask, n_mask, stride_om, stride_on, slot < 0,
                      HAS_BIAS, False, SWAP_AB)
        else:
            _epilogue(acc_f, i_lo == 0, out_ptr, bias_ptr, rm, rn, m_mask, n_mask, stride_om, stride_on, True,
                      HAS_BIAS, ATOMIC, SWAP_AB)


@triton.jit
def _tma_block_done(acc_f, acc_i, acc_s, sa_cls, b, as_ptr, ws_ptr, dbg_ptr, rm, rn, m_mask, n_mask,
                    stride_asm, stride_wsn, stride_dm, stride_dn, GROUP,
                    CLASS_MODE: tl.constexpr, INT_ACC: tl.constexpr, DEBUG: tl.constexpr):
    """One block's int32 result ``acc_s`` ([BLOCK_N, BLOCK_M], transposed) into the running sums:
    DEBUG stores it (segment b of the ``[M, N, NB]`` int32 debug buffer); INT_ACC adds it to the
    run's int32 sum; else it is rescaled now (``a_scale[m, b] * w_scale[n, g(b)]``)."""
    if DEBUG:
        tl.store(_grid_ptrs(dbg_ptr + b, rm, rn, stride_dm, stride_dn, True), acc_s,
                 mask=_grid_mask(m_mask, n_mask, True))
    if INT_ACC:
        acc_i += acc_s
    else:
        sa = _tma_row_scale(sa_cls, b, as_ptr, rm, m_mask, stride_asm, CLASS_MODE)
        sw = tl.load(ws_ptr + rn * stride_wsn + (b * 128) // GROUP, mask=n_mask, other=0.0)
        acc_f += acc_s.to(tl.float32) * _outer(sa, sw, True)
    return acc_f, acc_i


@triton.jit
def _tma_row_scale(sa_cls, b, as_ptr, rm, m_mask, stride_asm, CLASS_MODE: tl.constexpr):
    """Block ``b``'s activation scale per token: the class scale, or ``a_scale[m, b]`` (block mode)."""
    if CLASS_MODE:
        return sa_cls
    else:
        return tl.load(as_ptr + rm * stride_asm + b, mask=m_mask, other=0.0)


@triton.jit
def _tma_dots_lohi(wp, a_even, a_odd, acc, CHAIN: tl.constexpr):
    """``W x^T`` of one block from its two K = 64 halves: low weight nibbles x even channels +
    high nibbles x odd channels, int32; ``CHAIN``: onto ``acc`` (a run's int32 sum), else fresh."""
    if CHAIN:
        acc = tl.dot(unpack_lo(wp), tl.trans(a_even), acc, out_dtype=tl.int32)
    else:
        acc = tl.dot(unpack_lo(wp), tl.trans(a_even), out_dtype=tl.int32)
    return tl.dot(unpack_hi(wp), tl.trans(a_odd), acc, out_dtype=tl.int32)


@triton.jit
def _tma_weights(w_desc, off_n, b, N, W_BLOCK_MAJOR: tl.constexpr):
    """Block ``b`` of weight rows ``off_n..``: row-major ``[N, K/2]`` (box at column b*64) or
    block-major (``layout.weights_block_major``: the descriptor spans ``[NB * N, 64]``, block b's
    rows start at row b*N, so every box is one contiguous ``BLOCK_N x 64``-byte run)."""
    if W_BLOCK_MAJOR:
        return w_desc.load([b * N + off_n, 0])
    else:
        return w_desc.load([off_n, b * 64])


@triton.jit
def _tma_run_done(acc_f, acc_i, sa, ws_ptr, rn, n_mask, stride_wsn):
    """End of a precision run in class mode with per-channel weights: its int32 sum, rescaled once."""
    sw = tl.load(ws_ptr + rn * stride_wsn, mask=n_mask, other=0.0)
    return acc_f + acc_i.to(tl.float32) * _outer(sa, sw, True)


@triton.jit
def _tma_offset_term(acc_f, acc_o, asum, sa_cls, b, as_ptr, wo_ptr, dsum_ptr, rm, rn, m_mask, n_mask,
                     stride_asm, stride_won, stride_dsm, GROUP,
                     CLASS_MODE: tl.constexpr, INT_ACC: tl.constexpr, DEBUG: tl.constexpr):
    """ASYM: block ``b``'s offset term ``a_scale[m, b] * w_offset[n, g(b)] * asum[m, b]``
    (``asum`` = the block's activation integers summed per token, ``[BLOCK_M]`` int32), a
    rank-1 update of the transposed ``[BLOCK_N, BLOCK_M]`` sum.  INT_ACC (one offset per row
    for the whole K): the sums add up in ``acc_o`` and :func:`_tma_run_offset` applies them once
    per precision run.  DEBUG also stores ``asum`` (segment b of the ``[M, NB]`` buffer)."""
    if DEBUG:
        tl.store(dsum_ptr + rm * stride_dsm + b, asum, mask=m_mask)
    if INT_ACC:
        acc_o += asum
    else:
        sa = _tma_row_scale(sa_cls, b, as_ptr, rm, m_mask, stride_asm, CLASS_MODE)
        wo = tl.load(wo_ptr + rn * stride_won + (b * 128) // GROUP, mask=n_mask, other=0.0)
        acc_f += _outer(sa * asum.to(tl.float32), wo, True)
    return acc_f, acc_o


@triton.jit
def _tma_run_offset(acc_f, acc_o, sa, wo_ptr, rn, n_mask, stride_won):
    """End of a precision run (ASYM + INT_ACC): ``sa * w_offset[n] * (the run's activation sum)``."""
    wo = tl.load(wo_ptr + rn * stride_won, mask=n_mask, other=0.0)
    return acc_f + _outer(sa * acc_o.to(tl.float32), wo, True)


@triton.jit
def _row_sum(x):
    """Per-token sum of a ``[BLOCK_M, K]`` tile of activation integers, int32.  From 64 rows on
    the tensor cores: ``x @ ones[K, 16]`` gives 16 equal columns (an exact int32 dot), one is
    kept; a plain ``tl.sum`` converts and adds every element in registers (and, for an INT8
    tile the MMA reads straight from shared memory, first loads it there).  SASS per K block
    (sm_90a, kernels/aot.py, asymmetric g128): TMA 64x64 667 -> 591, 128x64 735 -> 605, pointer
    64x128 987 -> 852; at 16 rows the dot costs more than it saves (pointer 16x128 461 -> 564),
    so small tiles keep ``tl.sum``."""
    if x.shape[0] >= 64:
        ones = tl.full((x.shape[1], 16), 1, tl.int8)
        return tl.max(tl.dot(x, ones, out_dtype=tl.int32), axis=1)
    else:
        return tl.sum(x.to(tl.int32), axis=1)


@triton.jit
def w4ax_gemm_tma_kernel(
    order_ptr, a4_desc, a8_desc, w_desc, as_ptr, ws_ptr, bias_ptr, out_ptr, dbg_ptr, part_ptr,
    M, N, NB, N8, GROUP, SPLIT,
    stride_asm, stride_wsn, stride_om, stride_on, stride_dm, stride_dn,
    wo_ptr, dsum_ptr, stride_won, stride_dsm, cnt_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    CLASS_MODE: tl.constexpr, INT_ACC: tl.constexpr, HAS_BIAS: tl.constexpr, DEBUG: tl.constexpr,
    ORDERED: tl.constexpr, WORKSPACE: tl.constexpr, A_SPLIT: tl.constexpr = False, W_BLOCK_MAJOR: tl.constexpr = False,
    ASYM: tl.constexpr = False, FIXUP: tl.constexpr = False,
):
    """Hopper W4Ax GEMM: TMA tensor descriptors, weights as the register A operand.

    Why a second tiled kernel: ptxas -v on the pointer-based kernel at BLOCK 128x128 / 8 warps
    (every large-M config, sm_90a) reports 255 registers per thread -> one CTA (8 warps) per SM,
    and every wgmma is followed by ``wgmma.wait_group 0`` (the unpacked operand is rewritten
    each block), so nothing hides the MMA latency.  Here every operand tile comes in by TMA
    (``cp.async.bulk.tensor`` into shared memory, mbarrier-tracked, out-of-range rows zero-filled
    by the copy engine: no address or mask registers for the operands).  A stripped probe of this
    loop with a single int32 accumulator compiles to 106-126 registers at 128x128 / 8 warps; the
    kernel also keeps the fp32 sum (64 more per thread there), so it is the 4-warp tiles that
    reach two CTAs per SM (145-254 registers; ``_tma_configs``) -- one CTA's MMAs can then
    overlap the other's unpacking.  Which tile wins is for the GPU to say.

    Operand flow per 128-channel block (acc is ``[BLOCK_N, BLOCK_M]``: ``W x^T``)::

        weights  [BLOCK_N, 64] u8 --TMA--> smem --ld--> regs: unpack lo/hi --> wgmma A (registers)
        INT8 act [BLOCK_M, 128] i8 --TMA--> smem ---------------------------> wgmma B (as loaded)
        INT4 act [BLOCK_M, 64] u8 --TMA--> smem --ld--> unpack lo/hi --st--> wgmma B (2 dots)

    For INT8 blocks the weight nibbles are interleaved back into K order in registers
    (``join(lo, hi)``: each thread holds both nibbles of its bytes) so the activations go
    from TMA straight into the MMA, one K=128 dot.  INT4 blocks use the even/odd split
    (``x.w = x_even.w_even + x_odd.w_odd``).

    Scales: block mode rescales each block's int32 result; class mode with per-channel
    weights (INT_ACC) chains one int32 accumulator through a whole precision run
    (``acc = dot(a, b, acc)``) and rescales once per run.  Weight groups must be >= 128
    (one scale per block or per run of blocks); smaller groups use ``w4ax_gemm_kernel``.
    ASYM (asymmetric weights, ``w = scale * q + offset``): each block's activation integers
    are also summed per token (one more small int8 MMA against a ones tile, :func:`_row_sum`)
    and the offset term
    ``a_scale * w_offset * asum`` is one rank-1 update per block (INT_ACC: per run).  DEBUG
    additionally stores each block's int32 result (and, ASYM, its activation sums).

    Split-K (decode: few weight-row tiles, so the block list is cut into ``SPLIT`` chunks to
    put every SM on the weight stream): WORKSPACE stores chunk ``j = program_id(1)``'s fp32
    partial into workspace slot ``tile * SPLIT + j`` and ``w4ax_reduce_kernel`` adds the
    slots in chunk order (the deterministic reduction of the pointer kernel, same slots,
    same order) -- or, FIXUP (``COMETQ_SPLITK_FIXUP=1``), the tile's last piece to finish adds
    them itself (:func:`_splitk_fixup`, int32 tile counters ``cnt_ptr``: same bits, no reduce
    launch).  For decode the point of TMA is the weight stream: each stage is one bulk
    copy of a ``[BLOCK_N, 64]``-byte tile, so ``num_stages`` tiles per CTA are in flight
    without a register or an address per byte.
    """
    tile = tl.program_id(0)
    pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    rm = off_m + lm
    rn = off_n + ln
    m_mask = rm < M
    n_mask = rn < N
    if WORKSPACE:
        chunk = tl.cdiv(NB, SPLIT)
        i_lo = tl.program_id(1) * chunk
        i_hi = tl.minimum(i_lo + chunk, NB)
    else:
        i_lo = 0
        i_hi = NB
    acc_f = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    sa8 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sa4 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if CLASS_MODE:
        sa4 = tl.load(as_ptr + rm * stride_asm, mask=m_mask, other=0.0)
        sa8 = tl.load(as_ptr + rm * stride_asm + 1, mask=m_mask, other=0.0)
    # ---- INT8 blocks: list positions [0, N8), q8 slot = position
    acc_i = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    acc_o = tl.zeros((BLOCK_M,), dtype=tl.int32)  # ASYM + INT_ACC: the run's activation sum
    for i in range(i_lo, tl.minimum(i_hi, N8)):
        if ORDERED:
            b = i
        else:
            b = tl.load(order_ptr + i)
        wp = _tma_weights(w_desc, off_n, b, N, W_BLOCK_MAJOR)
        if A_SPLIT:
            # unified int8 rows (a8_desc boxes [BLOCK_M, 64]): position i = [even | odd] channels
            a_e = a8_desc.load([off_m, i * 128])
            a_o = a8_desc.load([off_m, i * 128 + 64])
            if INT_ACC and not DEBUG:
                acc_i = _tma_dots_lohi(wp, a_e, a_o, acc_i, True)
            else:
                acc_s = _tma_dots_lohi(wp, a_e, a_o, acc_i, False)
            if ASYM:
                asum = _row_sum(a_e) + _row_sum(a_o)
        elif BLOCK_M <= 16:
            # INT8 block of a decode tile: split the activation tile into its even / odd channels
            # in registers ([16, 128] bytes) and run the two K = 64 dots of an INT4 block, instead of
            # interleaving the unpacked weights back into K order (below: [BLOCK_N, 128], 8x the
            # bytes).  SASS (sm_90a, 16 x 128, block mode): INT8 loop 491 -> 317 instructions per K
            # block, PRMT 144 -> 4, so an INT8 block costs no more than an INT4 one (323-329).
            # (64-row tiles keep the interleave: there the split also grew the INT4 loop by 16-25.)
            a = a8_desc.load([off_m, i * 128])
            a_e, a_o = tl.split(tl.reshape(a, (BLOCK_M, 64, 2)))
            if INT_ACC and not DEBUG:
                acc_i = _tma_dots_lohi(wp, a_e, a_o, acc_i, True)
            else:
                acc_s = _tma_dots_lohi(wp, a_e, a_o, acc_i, False)
            if ASYM:
                asum = _row_sum(a)
        else:
            a = a8_desc.load([off_m, i * 128])
            w = tl.reshape(tl.join(unpack_lo(wp), unpack_hi(wp)), (BLOCK_N, 128))
            if INT_ACC and not DEBUG:
                acc_i = tl.dot(w, tl.trans(a), acc_i, out_dtype=tl.int32)
            else:
                acc_s = tl.dot(w, tl.trans(a), out_dtype=tl.int32)
            if ASYM:
                asum = _row_sum(a)
        if not (INT_ACC and not DEBUG):
            acc_f, acc_i = _tma_block_done(acc_f, acc_i, acc_s, sa8, b, as_ptr, ws_ptr, dbg_ptr, rm, rn, m_mask,
                                           n_mask, stride_asm, stride_wsn, stride_dm, stride_dn, GROUP,
                                           CLASS_MODE, INT_ACC, DEBUG)
        if ASYM:
            acc_f, acc_o = _tma_offset_term(acc_f, acc_o, asum, sa8, b, as_ptr, wo_ptr, dsum_ptr, rm, rn, m_mask,
                                            n_mask, stride_asm, stride_won, stride_dsm, GROUP,
                                            CLASS_MODE, INT_ACC, DEBUG)
    if INT_ACC:
        acc_f = _tma_run_done(acc_f, acc_i, sa8, ws_ptr, rn, n_mask, stride_wsn)
        if ASYM:
            acc_f = _tma_run_offset(acc_f, acc_o, sa8, wo_ptr, rn, n_mask, stride_won)
    # ---- INT4 blocks: list positions [N8, NB), q4 slot = position - N8
    acc_i = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    acc_o = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for i in range(tl.maximum(i_lo, N8), i_hi):
        if ORDERED:
            b = i
        else:
            b = tl.load(order_ptr + i)
        wp = _tma_weights(w_desc, off_n, b, N, W_BLOCK_MAJOR)
        if A_SPLIT:
            a_lo = a8_desc.load([off_m, i * 128])
            a_hi = a8_desc.load([off_m, i * 128 + 64])
        else:
            ap = a4_desc.load([off_m, (i - N8) * 64])
            a_lo = unpack_lo(ap)
            a_hi = unpack_hi(ap)
        if INT_ACC and not DEBUG:
            acc_i = _tma_dots_lohi(wp, a_lo, a_hi, acc_i, True)
        else:
            acc_s = _tma_dots_lohi(wp, a_lo, a_hi, acc_i, False)
            acc_f, acc_i = _tma_block_done(acc_f, acc_i, acc_s, sa4, b, as_ptr, ws_ptr, dbg_ptr, rm, rn, m_mask,
                                           n_mask, stride_asm, stride_wsn, stride_dm, stride_dn, GROUP,
                                           CLASS_MODE, INT_ACC, DEBUG)
        if ASYM:
            acc_f, acc_o = _tma_offset_term(acc_f, acc_o, _row_sum(a_lo) + _row_sum(a_hi), sa4, b, as_ptr, wo_ptr,
                                            dsum_ptr, rm, rn, m_mask, n_mask, stride_asm, stride_won, stride_dsm,
                                            GROUP, CLASS_MODE, INT_ACC, DEBUG)
    if INT_ACC:
        acc_f = _tma_run_done(acc_f, acc_i, sa4, ws_ptr, rn, n_mask, stride_wsn)
        if ASYM:
            acc_f = _tma_run_offset(acc_f, acc_o, sa4, wo_ptr, rn, n_mask, stride_won)
    if WORKSPACE:
        _store_partial(acc_f, part_ptr, tile * SPLIT + tl.program_id(1), lm, ln, m_mask, n_mask, True,
                       BLOCK_M, BLOCK_N, True)
        if FIXUP:
            _splitk_fixup(tile, pid_m, pid_n, SPLIT, part_ptr, cnt_ptr, bias_ptr, out_ptr, M, N, stride_om,
                          stride_on, BLOCK_M, BLOCK_N, HAS_BIAS)
    else:
        _epilogue(acc_f, True, out_ptr, bias_ptr, rm, rn, m_mask, n_mask, stride_om, stride_on, True,
                  HAS_BIAS, False, True)


# ==========================================================================
# configs ("autotune" per shape bucket)
# ==========================================================================
@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration. ``split`` > 1 selects the split-K path."""

    block_m: int
    block_n: int
    group_m: int = 8
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    #: compute ``acc^T = W x^T`` (unpacked weights as the MMA A operand; see _block_segments)
    swap_ab: bool = False
    #: INT8 blocks: contiguous activation loads + weight nibble interleave (see _mma)
    interleave8: bool = False
    #: the Hopper TMA kernel (``w4ax_gemm_tma_kernel``: tensor descriptors, weights as the
    #: register A operand); implies the swapped orientation, ignores swap_ab/interleave8;
    #: ``split`` > 1 cuts K with the deterministic workspace reduction
    tma: bool = False
    #: large M: dequantize both operands to 16 bits and run cuBLAS (``kernels/dequant_gemm.py``);
    #: the untuned choice of the M >= 1024 buckets (not integer-exact: DEQUANT_GEMM_RTOL)
    dequant: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot minimum), got {v!r}")
        for name in ("group_m", "split", "num_stages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")
        for name in ("swap_ab", "interleave8", "tma", "dequant"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")


def m_bucket(m: int) -> int:
    """Shape bucket of M: 16 (decode), 64, 256, 1024, 4096 (round up, capped)."""
    for b in (16, 64, 256, 1024):
        if m <= b:
            return b
    return 4096


def gen_configs(mb: int, n: int, k: int, n_int8: int, *, interpret: Optional[bool] = None,
                tma: str = "none", asym: bool = False) -> List[GemmConfig]:
    """Candidate configs for one (M-bucket, N, K, n_int8) shape.

    Decode buckets (M <= 16) get split-K configs sized so ``n_tiles * split``
    covers ~2-4 waves of 132 SMs; larger M gets tile shapes around the wgmma
    sweet spot (BM 64..128, BN 64..256).  Under the interpreter: one large-block
    config (interpretation cost is per program).
    ``tma``: "none", "also" (append the Hopper TMA kernel's configs for M > 16) or
    "only" (just those): the caller decides whether the call can use TMA
    (:func:`tma_available`).  ``asym``: the call has weight offsets (the TMA kernel's ASYM
    variant: its 128x128 / 8-warp tile spills 652 B per thread on sm_90a, ptxas -v, and is not
    offered).
    """
    if tma not in ("none", "also", "only"):
        raise ValueError(f"tma must be 'none', 'also' or 'only', got {tma!r}")
    interpret = interpreting() if interpret is None else interpret
    nb = max(1, k // BLOCK_K)
    if interpret:
        bn = max(16, min(128, next_pow2(n)))
        split = 2 if (mb <= 16 and nb >= 2) else 1  # decode bucket: exercise split-K
        if tma == "only":
            return [GemmConfig(block_m=max(16, min(64, next_pow2(mb))), block_n=max(64, bn), group_m=8,
                               split=split, num_warps=4, num_stages=1, tma=True)]
        return [GemmConfig(block_m=max(16, min(64, next_pow2(mb))), block_n=bn, group_m=8, split=split,
                           num_warps=4, num_stages=1)]
    if tma == "only":
        return _tma_configs(mb, n, nb, asym)
    cfgs: List[GemmConfig] = []
    if mb <= 16:
        # first (what runs untuned): BN 128, swapped, ~2 waves -- best or within 8 % of the best
        # of every candidate in the H100's CUDA-graph sweep (bench/results/h100-2026-11-26-run2,
        # 8B.o and 8B.gate_up at M = 1 and 16; the former first, BN 64 unswapped, was the slowest
        # 4-warp config: 18.8 vs 14.9 us at 8B.o, 99.9 vs 78.1 us at gate_up)
        tiles = triton.cdiv(n, 128)
        cfgs.append(GemmConfig(16, 128, 1, max(1, min(nb, 264 // max(tiles, 1))), 4, 4, swap_ab=True))
        for bn, warps in ((64, 4), (128, 4), (32, 2)):
            tiles = triton.cdiv(n, bn)
            for target in (264, 528):
                split = max(1, min(nb, target // max(tiles, 1)))
                cfgs.append(GemmConfig(16, bn, 1, split, warps, 4))
                if bn >= 64:  # weights as the 64-row MMA operand, 16 tokens as its N
                    cfgs.append(GemmConfig(16, bn, 1, split, warps, 4, swap_ab=True))
    elif mb <= 64:
        for bm, bn, w, s in ((64, 64, 4, 4), (64, 128, 4, 4), (32, 128, 4, 4), (64, 256, 8, 3)):
            cfgs.append(GemmConfig(bm, bn, 8, 1, w, s))
        tiles = triton.cdiv(n, 128)
        if tiles < 264:  # few tiles: also try split-K
            cfgs.append(GemmConfig(64, 128, 8, max(1, min(nb, 264 // tiles)), 4, 4))
        cfgs.append(GemmConfig(64, 128, 8, 1, 4, 4, swap_ab=True))
        cfgs.append(GemmConfig(32, 128, 8, 1, 4, 4, swap_ab=True))
        if n_int8:  # contiguous INT8 activation loads only matter when there are INT8 blocks
            cfgs.append(GemmConfig(64, 128, 8, 1, 4, 4, swap_ab=True, interleave8=True))
    elif mb <= 256:
        for bm, bn, w, s in ((64, 128, 4, 4), (128, 128, 8, 3), (128, 64, 4, 4), (64, 256, 8, 3)):
            cfgs.append(GemmConfig(bm, bn, 8, 1, w, s))
        cfgs.append(GemmConfig(128, 128, 8, 1, 8, 3, swap_ab=True))
        if n_int8:
            cfgs.append(GemmConfig(128, 128, 8, 1, 8, 3, interleave8=True))
    else:
        if n_int8:
            # first (untuned): the H100's autotuned winner at M = 1024 for both 8B.o and 8B.gate_up
            # with INT8 blocks, sym and asym (bench/results/h100-2026-11-26-run1/gemm.json)
            cfgs.append(GemmConfig(128, 128, 8, 1, 8, 3, swap_ab=True, interleave8=True))
        for bm, bn, w, s in ((128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 4, 4), (64, 256, 8, 4)):
            cfgs.append(GemmConfig(bm, bn, 8, 1, w, s))
        for bm, bn, w, s in ((128, 128, 8, 3), (128, 256, 8, 3)):
            cfgs.append(GemmConfig(bm, bn, 8, 1, w, s, swap_ab=True))
        if n_int8:
            for bm, bn, w, s, sw in ((128, 128, 8, 3, False), (128, 256, 8, 3, False), (128, 128, 8, 3, True)):
                cfgs.append(GemmConfig(bm, bn, 8, 1, w, s, swap_ab=sw, interleave8=True))
    if mb > 16 and cfgs and cfgs[0].split == 1 and nb >= 2:
        # too few output tiles to fill the SMs (e.g. a batch-64 decode step of o_proj / down_proj:
        # one 64-row M tile x N/64 = 64 tiles on 132 SMs): the first candidate -- what runs untuned
        # (COMETQ_GEMM_TUNE=0) -- splits K so ~2 waves of CTAs stream the weights
        first = cfgs[0]
        tiles = triton.cdiv(mb, first.block_m) * triton.cdiv(n, first.block_n)
        if tiles < 132:
            cfgs.insert(0, dataclasses.replace(first, split=min(nb, triton.cdiv(264, tiles))))
    # dedupe, keep order; drop tiles whose two [BM, BN] accumulators (fp32 result + int32
    # block sum) need more than 64 registers per thread each: ptxas (sm_90a) spills those
    # (128x256 / 256x128 at 8 warps, 128x128 at 4 warps: 1-2.4 KB of spills per thread)
    if tma == "also":
        cfgs += _tma_configs(mb, n, nb, asym)
    if mb >= 1024:
        # dequantize + cuBLAS (compute-bound sizes) first: what runs untuned.  Run 1 (H100,
        # bench/results/h100-2026-11-26-run1) measured the best pointer config here at 0.25x
        # cuBLAS FP16 at M = 1024; this path is FP16-GEMM speed minus one pass over the weights
        # (~0.7x at M = 1024, ~0.95x at 8192 by bytes and FLOPs).  The integer kernels (and the
        # TMA kernel) stay candidates: autotuning picks them where they measure faster.
        cfgs.insert(0, GemmConfig(128, 128, 1, 1, 4, 1, dequant=True))
        if mb == 1024 and tma == "also":
            # ... except in the 1024 bucket (257..1024 rows) where the TMA kernel applies: run 3
            # (H100, 2026-11-27, bench/results/h100-2026-11-27-run3) measured TMA 128x64 at 492 us
            # vs dequant 867 us on 8B.gate_up at M = 1024 (133 vs 142 us on 8B.o): the weight
            # pass of the dequant path is not amortized over so few rows.  Bucket 4096 (> 1024
            # rows, e.g. a prefill chunk) keeps dequant first: its weight pass is amortized and
            # cuBLAS's fp16 speed wins (unmeasured above M = 1024: tuning decides).
            cfgs.insert(0, _tma_configs(mb, n, nb, asym)[0])
    if mb == 64 and tma == "also":
        # the 64 bucket (17..64 rows: a batch-64 decode step) also starts with the TMA kernel
        # where it applies: run 5 (H100, 2026-11-27, bench/results/h100-2026-11-27-run5, CUDA-graph
        # replay, sym-g128) measured TMA 64x64 at 23.3 / 23.4 us on 8B.qkv / 8B.o vs 44.4 / 44.3
        # for the tuned pointer config, and 50.7 (64x128) vs 56.5 on 8B.gate_up
        cfgs.insert(0, next(c for c in _tma_configs(mb, n, nb, asym) if c.block_n == 64))
    seen, out = set(), []
    for c in cfgs:
        if c.block_m * c.block_n > 64 * 32 * c.num_warps and not c.dequant:  # (dequant: no accumulator tile)
            continue
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _tma_configs(mb: int, n: int, nb: int, asym: bool = False) -> List[GemmConfig]:
    """TMA-kernel tiles ("BM x BN" = tokens x weight rows; the MMA is ``[BN, BM]``), chosen by
    ptxas -v for sm_90a (no spills in block mode, class mode per-channel and class mode g128):

    ======================  ==========  ================  ============
    tile / warps / stages   registers   CTAs (warps)/SM   shared mem
    ======================  ==========  ================  ============
    128x64  / 4 / 4         201-222     2 (8)             77 KB
    64x128  / 4 / 4         250-254     2 (8)             57 KB
    64x64   / 4 / 4         145-178     2-3 (8-12)        44 KB
    128x128 / 8 / 3         254-255     1 (8)             64 KB (block mode: 136 B spill)
    64x256  / 8 / 3         250-254     1 (8)             57 KB
    ======================  ==========  ================  ============

    (with the word-wide INT4 unpack; bench/results/static-sm90/gemm_resources.md has every config)

    128x128 / 4 warps, 128x256 and 256x128 spill 0.7-2 KB and are not offered.  The fp32 sum
    and the int32 block / run result (64 registers each per thread at 128x128 / 8 warps) are
    what keeps every tile above 128 registers; which occupancy wins is measured
    (bench_gemm.py, ``triton-tma`` column).

    Decode (M <= 16): 16-token tiles (wgmma N = 16) with split-K sized like the pointer
    kernel's (~2 or ~4 waves of 132 SMs), 4 or 6 weight tiles in flight per CTA."""
    if mb <= 16:
        out = []
        for bn in (128, 64):
            tiles = triton.cdiv(n, bn)
            for target in (264, 528):
                split = max(1, min(nb, target // max(tiles, 1)))
                for stages in (4, 6):
                    out.append(GemmConfig(16, bn, 1, split, 4, stages, tma=True))
        return list(dict.fromkeys(out))
    if mb <= 64:
        return [GemmConfig(64, 128, 8, 1, 4, 4, tma=True), GemmConfig(64, 64, 8, 1, 4, 4, tma=True),
                GemmConfig(64, 256, 8, 1, 8, 3, tma=True)]
    out = [GemmConfig(128, 64, 8, 1, 4, 4, tma=True), GemmConfig(64, 128, 8, 1, 4, 4, tma=True),
           GemmConfig(64, 64, 8, 1, 4, 4, tma=True), GemmConfig(128, 128, 8, 1, 8, 3, tma=True),
           GemmConfig(64, 256, 8, 1, 8, 3, tma=True)]
    # ASYM (offsets): ptxas -v, sm_90a -- 128x128 / 8 warps spills 652 B per thread (the others none)
    return [c for c in out if not (asym and c.block_m == 128 and c.block_n == 128)]


_CONFIG_CACHE: Dict[tuple, GemmConfig] = {}
#: a JSON file that keeps tuned configs across processes (like Triton's own autotune cache):
#: a serving process then starts with every shape bucket it has seen before already tuned
ENV_CONFIG_CACHE = "COMETQ_GEMM_CONFIG_CACHE"
_FILE_CONFIGS: Dict[str, Dict[str, dict]] = {}  # path -> {key string: config fields}


def _file_key(key: tuple, device_name: str) -> str:
    return json.dumps([device_name, triton.__version__, *[str(x) for x in key]])


def _file_configs(path: str) -> Dict[str, dict]:
    if path not in _FILE_CONFIGS:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            entries = data.get("configs", {}) if isinstance(data, dict) else {}
            _FILE_CONFIGS[path] = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):  # missing or unreadable: start empty (never crash a run)
            _FILE_CONFIGS[path] = {}
    return _FILE_CONFIGS[path]


def _save_file_config(path: str, fkey: str, cfg: GemmConfig) -> None:
    entries = _file_configs(path)
    entries[fkey] = dataclasses.asdict(cfg)
    try:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cometq-gemm-configs-", suffix=".json", dir=d)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"format": 1, "configs": entries}, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except OSError as e:
        warnings.warn(f"cometq: could not write the GEMM config cache {path!r}: {e}", UserWarning, stacklevel=3)


def select_config(m: int, n: int, k_pad: int, n_int8: int, bench_fn=None, variant: tuple = (),
                  device_name: str = "", tma: str = "none") -> GemmConfig:
    """Pick (and cache per (M-bucket, N, K, n_int8) + ``variant``) the fastest candidate.

    ``bench_fn(cfg) -> seconds`` times one config (the caller launches it); without
    one, or with a single candidate, the first candidate is used.  ``variant``
    (path, scale mode, group) keeps e.g. the persistent path's choice apart.
    With ``COMETQ_GEMM_CONFIG_CACHE`` set to a JSON path, a tuned choice is also written
    there (keyed by ``device_name`` and the Triton version) and read back by later
    processes, tuning or not -- only while it is still one of the generated candidates.
    ``tma``: whether the TMA kernel's configs are candidates ("none"/"also"/"only", see
    :func:`gen_configs`); part of the cache key.
    """
    key = (m_bucket(m), n, k_pad, n_int8, interpreting()) + tuple(variant) + ((f"tma-{tma}",) if tma != "none" else ())
    hit = _CONFIG_CACHE.get(key)
    if hit is not None:
        return hit
    cands = gen_configs(key[0], n, k_pad, n_int8, tma=tma, asym="asym" in variant)
    # read even when not tuning (COMETQ_GEMM_TUNE=0): a choice tuned earlier beats the first candidate
    path = os.environ.get(ENV_CONFIG_CACHE) if len(cands) > 1 else None
    fkey = _file_key(key, device_name) if path else None
    if path:
        stored = _file_configs(path).get(fkey)
        try:
            cfg = GemmConfig(**stored) if isinstance(stored, dict) else None
        except (TypeError, ValueError):
            cfg = None
        if cfg is not None and cfg in cands:
            _CONFIG_CACHE[key] = cfg
            return cfg
    best = cands[0]
    if bench_fn is not None and len(cands) > 1:
        times = []
        for c in cands:
            try:
                times.append((bench_fn(c), c))
            except Exception:  # a config the compiler rejects (e.g. out of shared memory) is skipped
                continue
        if times:
            best = min(times, key=lambda t: t[0])[1]
            if path:
                _save_file_config(path, fkey, best)
    _CONFIG_CACHE[key] = best
    return best


def chosen_config(m: int, n: int, k_pad: int, n_int8: int, *, path: str = "auto", scale_mode: str = "block",
                  group_size: int = 128, asym: bool = False,
                  deterministic: Optional[bool] = None, graph: bool = False) -> Optional[GemmConfig]:
    """The config :func:`w4ax_gemm_triton` picked (and cached) for this shape and variant, or None
    if that call has not happened yet.  Lets a benchmark time another variant (asymmetric
    weights, the persistent path, the deterministic reduction) on the same config without
    autotuning it again.  ``graph``: the choice made under ``cometq.autotune.timing("graph")``."""
    g = check_group_size(group_size, k_pad)
    det = resolve_deterministic(deterministic)  # None: the same default the GEMM call used
    variant = ((path, scale_mode, g) + (("asym",) if asym else ()) + (("det",) if det else ())
               + (("graph",) if graph else ()))
    key = (m_bucket(m), n, k_pad, n_int8, interpreting()) + variant
    for suffix in ((), ("tma-also",), ("tma-only",)):
        hit = _CONFIG_CACHE.get(key + suffix)
        if hit is not None:
            return hit
    return None


@functools.lru_cache(maxsize=16)
def _capability_cached(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def tma_available(dev: torch.device, *, asym: bool = False, group: int = 128,
                  tensors: tuple = ()) -> Optional[str]:
    """None if a call can run the TMA kernel, else why not (a sentence for error messages).

    Needs Hopper or newer (TMA; the interpreter emulates it), weight groups of >= 128
    channels (one scale -- and, asymmetric, one offset -- per block), and 16-byte aligned
    operand rows (a TMA descriptor's base address and row pitch must be multiples of 16
    bytes).  ``asym`` is accepted for the callers' sake (the kernel has the offset term since
    2026-11-27)."""
    if dev.type == "cuda" and not interpreting():
        cap = _capability_cached(dev.index if dev.index is not None else torch.cuda.current_device())
        if cap < (9, 0):
            return f"TMA needs compute capability >= 9.0, {dev} has {cap[0]}.{cap[1]}"
    elif not interpreting():
        return f"the TMA kernel runs on CUDA devices (or the Triton interpreter), got {dev}"
    if group < BLOCK_K:
        return f"the TMA kernel needs weight groups of >= {BLOCK_K} channels, got group_size={group}"
    for name, t in tensors:
        if t.numel() and (t.data_ptr() % 16 or t.stride(0) % 16):
            return (f"{name} (shape {tuple(t.shape)}, stride {t.stride()}) is not 16-byte aligned "
                    "(TMA descriptor base and row pitch)")
    return None


def tma_split_rows(cfg: GemmConfig, class_mode: bool) -> bool:
    """Whether the TMA kernel reads split activation rows (``A_SPLIT``; the launcher repacks
    the activation once per call, ``layout.split_activation_rows``) instead of q4 / q8.

    Not for decode tiles (16 tokens: their activation unpack is 1 KB per block next to 8 KB of
    weights, and the repack would be a launch per call).  Otherwise by the SASS instruction
    count per block (sm_90a, docs/KERNELS.md): class mode always gains (INT8 / INT4 loops
    236 / 201-265 -> 176 / 177); block mode only when the token tile is the larger side
    (128x64: 484 / 510 -> 425 / 425), where the in-loop unpack of BM activation rows
    outweighs the second TMA wait; at 64x128, 64x64 and 128x128 its INT4 loop grows by 9-17."""
    return cfg.block_m > 16 and (class_mode or cfg.block_m > cfg.block_n)


_TMA_DUMMIES: Dict[tuple, torch.Tensor] = {}


def _tma_desc(t: torch.Tensor, block: List[int]):
    """A TMA descriptor over a 2-D uint8/int8 operand (an empty one -- e.g. ``q8`` of a pure-W4A4
    layer -- gets a cached 1-row stand-in the kernel never reads)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if t.numel() == 0:
        key = (str(t.device), t.dtype)
        t = _TMA_DUMMIES.get(key)
        if t is None:
            t = _TMA_DUMMIES[key] = torch.zeros(1, BLOCK_K, dtype=key[1], device=key[0])
    return TensorDescriptor(t, [t.shape[0], t.shape[1]], [t.stride(0), 1], block)


# ==========================================================================
# persistent stream-K schedule
# ==========================================================================
@functools.lru_cache(maxsize=256)
def _schedule_cached(n_tiles: int, n8: int, n4: int, programs: int, cost8: float, cost4: float):
    nb = n8 + n4
    cost = np.array([cost8] * n8 + [cost4] * n4, dtype=np.float64)
    prefix = np.concatenate(([0.0], np.cumsum(cost)))  # prefix[i] = cost of positions < i
    tile_cost = prefix[-1]
    total = tile_cost * n_tiles
    p = max(1, min(programs, n_tiles * nb))
    # program boundaries in the flattened (tile, position) sequence: equal cost shares
    targets = total * np.arange(1, p) / p
    t = np.minimum((targets // tile_cost).astype(np.int64), n_tiles - 1)
    rem = targets - t * tile_cost
    i = np.searchsorted(prefix, rem, side="left")  # first position whose start reaches the share
    bounds = np.unique(np.concatenate(([0], t * nb + np.minimum(i, nb), [n_tiles * nb])))
    cuts = np.unique(np.concatenate((bounds, np.arange(0, n_tiles * nb + 1, nb))))
    lo, hi = cuts[:-1], cuts[1:]
    tiles = lo // nb
    items = np.stack((tiles, lo - tiles * nb, hi - tiles * nb), axis=1).astype(np.int32)
    owner = np.searchsorted(bounds, lo, side="right") - 1  # program owning each item
    starts = np.searchsorted(owner, np.arange(len(bounds)), side="left").astype(np.int32)
    split = bool(np.any((items[:, 1] != 0) | (items[:, 2] != nb)))
    return items, starts, split


def stream_k_schedule(n_tiles: int, n_int8: int, n_int4: int, programs: int,
                      cost8: float = 2.0, cost4: float = 1.0):
    """Stream-K work split of ``n_tiles`` output tiles over ``programs`` persistent programs.

    Every tile walks the block list (``n_int8`` INT8 positions, then ``n_int4``
    INT4 positions); a position costs ``cost8`` or ``cost4``.  The flattened
    (tile, position) sequence is cut into ``programs`` contiguous pieces of equal
    total cost, then at tile boundaries.  Returns ``(items int32 [n_items, 3] =
    (tile, i_lo, i_hi), starts int32 [P+1], split)`` where program p owns items
    ``starts[p]:starts[p+1]`` and ``split`` says some tile is shared (needs atomics).
    The default 2:1 cost is the A100 ratio from the COMET paper; on Hopper both
    classes use int8 MMA, so the real ratio must be measured (bench_gemm.py).
    """
    for name, v in (("n_tiles", n_tiles), ("programs", programs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    for name, v in (("n_int8", n_int8), ("n_int4", n_int4)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if n_int8 + n_int4 == 0:
        raise ValueError("the block list is empty (n_int8 + n_int4 == 0)")
    if not (cost8 > 0 and cost4 > 0):
        raise ValueError(f"costs must be > 0, got cost8={cost8}, cost4={cost4}")
    items, starts, split = _schedule_cached(n_tiles, n_int8, n_int4, programs, float(cost8), float(cost4))
    return items.copy(), starts.copy(), split


def stream_k_slots(items: np.ndarray, n_tiles: int):
    """Workspace slots of a stream-K schedule for the deterministic reduction.

    ``items`` as returned by :func:`stream_k_schedule` (ascending (tile, i_lo): the
    pieces of a tile are consecutive and in block order).  Returns ``(slots int32
    [n_items], red int32 [n_split, 3])``: ``slots[w] = -1`` when item w covers its
    whole tile (stored directly), else the piece's slot; pieces of one split tile get
    consecutive slots in schedule order, and ``red`` lists each split tile as
    (tile, first slot, piece count) for :func:`w4ax_reduce_kernel`.
    """
    items = np.asarray(items)
    if items.ndim != 2 or items.shape[1] != 3:
        raise ValueError(f"items must be an int [n_items, 3] array of (tile, i_lo, i_hi), got shape {items.shape}")
    tiles = items[:, 0].astype(np.int64)
    if tiles.size and (np.any(np.diff(tiles) < 0) or tiles.min() < 0 or tiles.max() >= n_tiles):
        raise ValueError(f"items must be sorted by tile with tiles in [0, {n_tiles}), got {tiles.tolist()[:16]}...")
    counts = np.bincount(tiles, minlength=n_tiles)
    split_item = counts[tiles] > 1
    slots = np.full(len(items), -1, dtype=np.int32)
    slots[split_item] = np.arange(int(split_item.sum()), dtype=np.int32)
    split_tiles = np.nonzero(counts > 1)[0]
    first = np.searchsorted(tiles, split_tiles, side="left")
    red = np.stack((split_tiles, slots[first] if len(first) else first, counts[split_tiles]), axis=1)
    return slots, red.astype(np.int32).reshape(-1, 3)


@functools.lru_cache(maxsize=16)
def _device_name_cached(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device_name(device: torch.device) -> str:
    """The card's name (the config cache key: a choice tuned on one GPU model is not reused on another)."""
    if device.type == "cuda":
        return _device_name_cached(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3  # interpreter: a few programs, so tiles really get split


# ==========================================================================
# host entry point
# ==========================================================================
_SCHED_DEV_CACHE: Dict[tuple, tuple] = {}


def _int8_first(block_bits: torch.Tensor) -> bool:
    """True when the map lists every INT8 block before every INT4 block (calibration's
    layout): the kernels then address block i directly (ORDERED).  Cached per map, so the
    one device read happens once per layer (e.g. in a warm-up), never per call."""
    def check(t):
        is8 = (t == 8).to(torch.int32)
        return bool(torch.all(is8[1:] <= is8[:-1])) if t.numel() > 1 else True

    return derived(block_bits, "w4ax.int8_first", check)


def _block_order(block_bits: torch.Tensor) -> torch.Tensor:
    """INT8 block ids ascending, then INT4 block ids ascending (int32, on-device, no sync).

    Cached per block_bits *object* (a layer's map is a long-lived tensor) while it is
    alive and unmodified (``_version``), so decode pays no argsort launch per call."""
    return derived(block_bits, "w4ax.block_order",
                   lambda t: torch.argsort((t != 8).to(torch.int32), stable=True).to(torch.int32))


def _schedule_on_device(tiles, n8, n4, p, cost8, cost4, device):
    """(items, starts, split, slots, red) on ``device``, cached: a steady-state call copies nothing."""
    key = (tiles, n8, n4, p, float(cost8), float(cost4), str(device))
    hit = _SCHED_DEV_CACHE.get(key)
    if hit is None:
        items, starts, split = stream_k_schedule(tiles, n8, n4, p, cost8, cost4)
        slots, red = stream_k_slots(items, tiles)
        hit = (torch.as_tensor(items, device=device).contiguous(), torch.as_tensor(starts, device=device), split,
               torch.as_tensor(slots, device=device), torch.as_tensor(red, device=device).contiguous())
        if len(_SCHED_DEV_CACHE) > 256:
            _SCHED_DEV_CACHE.clear()
        _SCHED_DEV_CACHE[key] = hit
    return hit


#: "0" keeps the TMA kernel's configs out of path="auto" (read at every call, ``tma=None``)
ENV_TMA = "COMETQ_GEMM_TMA"

#: environment switch for the deterministic reduction, read at every call (``deterministic=None``)
ENV_DETERMINISTIC = "COMETQ_DETERMINISTIC"


def resolve_deterministic(deterministic: Optional[bool] = None) -> bool:
    """The reduction mode of one call: the ``deterministic`` argument when given, else
    ``COMETQ_DETERMINISTIC`` ("0"/"false"/"no"/"off" -> False, unset/""/"1"/"true"/"yes"/"on" -> True).

    Deterministic is the default since the H100 measured it no slower than the fp32 atomics
    (decode split-K, 8B.o, CUDA-graph replay: 18.3 vs 18.8 us at M=1, 18.8 vs 20.4 us at M=16;
    bench/RESULTS.md): one reduce kernel replaces the zero-fill and the fp16 cast, and the
    output bits no longer depend on the order the programs ran."""
    if deterministic is not None:
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be a bool or None, got {deterministic!r}")
        return deterministic
    raw = os.environ.get(ENV_DETERMINISTIC, "")
    v = raw.strip().lower()
    if v in ("0", "false", "no", "off"):
        return False
    if v in ("", "1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV_DETERMINISTIC} must be 0/1 (or true/false, yes/no, on/off), got {raw!r}")


def _check(q4, q8, a_scales, block_bits, qweight, w_scales, group_size, bias, out_dtype, scale_mode, w_offsets=None):
    check_tensor("q4", q4, dtypes=(torch.uint8,), ndim=2)
    check_tensor("q8", q8, dtypes=(torch.int8,), ndim=2)
    check_tensor("a_scales", a_scales, dtypes=(torch.float32,), ndim=2)
    check_tensor("block_bits", block_bits, ndim=1)
    check_tensor("qweight", qweight, dtypes=(torch.uint8,))
    if qweight.dim() == 3:
        # block-major weights (layout.weights_block_major): a [N, NB, 64] view of [NB, N, 64] storage
        if qweight.shape[2] != BLOCK_K // 2 or qweight.stride() != (BLOCK_K // 2, qweight.shape[0] * BLOCK_K // 2, 1):
            raise ValueError(f"a 3-D qweight must be the block-major view [N, NB, 64] with strides (64, N*64, 1) "
                             f"(layout.weights_block_major), got shape {tuple(qweight.shape)} stride {qweight.stride()}")
    elif qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [N, K_pad/2] (or the 3-D block-major view), got shape {tuple(qweight.shape)}")
    check_tensor("w_scales", w_scales, dtypes=(torch.float32,), ndim=2)
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    dev = qweight.device
    for name, t in (("q4", q4), ("q8", q8), ("a_scales", a_scales), ("block_bits", block_bits), ("w_scales", w_scales)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but qweight is on {dev} (shape {tuple(t.shape)})")
    n = qweight.shape[0]
    k_pad = qweight.shape[1] * 2 if qweight.dim() == 2 else qweight.shape[1] * BLOCK_K
    nb = block_bits.shape[0]
    if k_pad != nb * BLOCK_K:
        raise ValueError(f"qweight shape {tuple(qweight.shape)} holds K_pad={k_pad} but block_bits has {nb} blocks")
    m = a_scales.shape[0]
    if q4.shape[0] != m or q8.shape[0] != m:
        raise ValueError(f"q4 {tuple(q4.shape)} / q8 {tuple(q8.shape)} must have M={m} rows like a_scales")
    if q4.shape[1] % (BLOCK_K // 2) or q8.shape[1] % BLOCK_K or q4.shape[1] * 2 + q8.shape[1] != k_pad:
        raise ValueError(f"q4 {tuple(q4.shape)} + q8 {tuple(q8.shape)} do not cover K_pad={k_pad} in whole blocks")
    ns = nb if scale_mode == "block" else 2
    if a_scales.shape[1] != ns:
        raise ValueError(f"a_scales shape {tuple(a_scales.shape)} needs {ns} columns in {scale_mode!r} mode")
    g = check_group_size(group_size, k_pad)
    if tuple(w_scales.shape) != (n, k_pad // g):
        raise ValueError(f"w_scales shape {tuple(w_scales.shape)} != {(n, k_pad // g)} for group_size={group_size}")
    if w_offsets is not None:
        check_tensor("w_offsets", w_offsets, dtypes=(torch.float32,), ndim=2, device=dev)
        if tuple(w_offsets.shape) != tuple(w_scales.shape):
            raise ValueError(f"w_offsets shape {tuple(w_offsets.shape)} != w_scales shape {tuple(w_scales.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, device=dev)
        if bias.shape[0] != n:
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({n},)")
    for name, t in (("q4", q4), ("q8", q8)) + ((("qweight", qweight),) if qweight.dim() == 2 else ()):
        if t.numel() and t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous along K (stride {t.stride()}, shape {tuple(t.shape)})")
    n8 = q8.shape[1] // BLOCK_K
    if dev.type != "cuda" or checks_with_sync():
        bad = ~((block_bits == 4) | (block_bits == 8))
        if bool(bad.any()):
            raise ValueError(f"block_bits must hold only 4 or 8, got {block_bits.tolist()}")
        got = int((block_bits == 8).sum())
        if got != n8:
            raise ValueError(f"block_bits holds {got} INT8 blocks but q8 {tuple(q8.shape)} holds {n8}")
    return m, n, k_pad, nb, n8, g


def w4ax_gemm_triton(
    q4: torch.Tensor,
    q8: torch.Tensor,
    a_scales: torch.Tensor,
    block_bits: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float16,
    scale_mode: str = "block",
    *,
    path: str = "auto",
    config: Optional[GemmConfig] = None,
    programs: Optional[int] = None,
    cost8: float = 2.0,
    cost4: float = 1.0,
    return_int_acc: bool = False,
    w_offsets: Optional[torch.Tensor] = None,
    deterministic: Optional[bool] = None,
    tma: Optional[bool] = None,
):
    """Tensor-level W4Ax GEMM (signature of ``cometq.ops._ref_w4ax_gemm`` plus keyword extras).

    ``path``: "auto" (the chosen config decides: split-K when its ``split`` > 1, which the
    decode bucket M <= 16 configs are; a TMA config runs the TMA kernel), "tiled", "splitk",
    "persistent", "tma" (the Hopper TMA kernel ``w4ax_gemm_tma_kernel``; ValueError when the
    call cannot use it, see :func:`tma_available`).
    ``tma``: whether "auto" may pick a TMA config (None: ``COMETQ_GEMM_TMA``, default on; the
    TMA configs join the candidates on Hopper for groups >= 128, symmetric or asymmetric).
    ``config``: force a :class:`GemmConfig` (else chosen per shape bucket and cached).
    ``programs``/``cost8``/``cost4``: persistent-path grid size and stream-K costs.
    ``return_int_acc``: also return the int32 ``[M, N, S]`` per-segment accumulators
    (``S = K_pad / min(128, G)``), equal to :func:`cometq.reference.w4ax_int_accumulators`;
    with ``w_offsets`` also the int32 ``[M, S]`` activation sums
    (:func:`cometq.reference.w4ax_act_sums`): ``(y, acc, asum)``.
    ``w_offsets``: float32 ``[N, K_pad/G]`` (like ``w_scales``) for asymmetric weights
    ``w = scale * q + offset``; adds ``a_scale * offset * asum`` per segment (ASYM kernels).
    ``deterministic``: how split-K / split stream-K tiles are combined.  False: fp32
    ``tl.atomic_add`` into a zeroed buffer (last bits vary run to run).  True: every
    piece stores its fp32 partial in a workspace slot and ``w4ax_reduce_kernel`` adds
    them in block order, ``cast(((P_0 + P_1) + ... + P_{c-1}) + bias)``: bit-identical
    across calls, and across launches that cut the tile's block list at the same
    points (see docs/KERNELS.md, "Deterministic reduction").  None (default): the
    ``COMETQ_DETERMINISTIC`` environment variable, read at each call (unset: True).
    The tiled path never splits a tile and is deterministic either way.
    """
    det = resolve_deterministic(deterministic)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if config is not None and not isinstance(config, GemmConfig):
        raise TypeError(f"config must be a GemmConfig, got {type(config).__name__}")
    m, n, k_pad, nb, n8, g = _check(q4, q8, a_scales, block_bits, qweight, w_scales, group_size, bias,
                                     out_dtype, scale_mode, w_offsets)
    asym = w_offsets is not None
    dev = qweight.device
    w_bm = qweight.dim() == 3  # block-major weights: block b of row n at b * N * 64 + n * 64
    w_block_stride = qweight.stride(1) if w_bm else BLOCK_K // 2
    seg = min(BLOCK_K, g)
    segs = BLOCK_K // seg
    seg_h = seg // 2
    h_load = max(seg_h, 32)  # int8 tl.dot needs K >= 32
    class_mode = scale_mode == "class"
    int_acc = class_mode and g == k_pad
    dbg = torch.zeros(m, n, k_pad // seg, dtype=torch.int32, device=dev) if return_int_acc else None
    dsum = torch.zeros(m, k_pad // seg, dtype=torch.int32, device=dev) if (return_int_acc and asym) else None

    def _ret(y):
        if not return_int_acc:
            return y
        return (y, dbg, dsum) if asym else (y, dbg)

    if m == 0:
        return _ret(torch.empty(0, n, dtype=out_dtype, device=dev))
    order = _block_order(block_bits)
    no_tma = tma_available(dev, asym=asym, group=g, tensors=(("q4", q4), ("q8", q8), ("qweight", qweight)))
    if no_tma is not None and (path == "tma" or (config is not None and config.tma)):
        raise ValueError(f"the TMA path cannot run this call: {no_tma}")
    if config is not None and config.tma and path not in ("auto", "tma"):
        raise ValueError(f"config {config} is a TMA config but path={path!r}; use path='tma' or 'auto'")
    if config is not None and path == "tma" and not config.tma:
        raise ValueError(f"path='tma' needs a TMA config (tma=True), got {config}")
    if return_int_acc and (path == "dequant" or (config is not None and config.dequant)):
        raise ValueError("return_int_acc needs an integer-accumulating path; the dequant path has none")
    if path == "dequant":
        config = config or GemmConfig(128, 128, 1, 1, 4, 1, dequant=True)
    if tma is None:
        tma = os.environ.get(ENV_TMA, "1").strip().lower() not in ("0", "false", "no", "off")
    elif not isinstance(tma, bool):
        raise TypeError(f"tma must be a bool or None, got {tma!r}")
    tma_mode = "only" if path == "tma" else ("also" if (path == "auto" and tma and no_tma is None) else "none")
    args_common = dict(
        q4=nonempty(q4), q8=nonempty(q8), bias=bias if bias is not None else dummy(dev),
        dbg=dbg if dbg is not None else dummy(dev, torch.int32),
        dsum=dsum if dsum is not None else dummy(dev, torch.int32),
        wo=w_offsets if asym else dummy(dev),
    )
    strides = (
        q4.stride(0) if q4.numel() else 0, q8.stride(0) if q8.numel() else 0, a_scales.stride(0),
        qweight.stride(0), w_block_stride, w_scales.stride(0), w_offsets.stride(0) if asym else 0,
    )
    dstr = (dbg.stride(0), dbg.stride(1)) if dbg is not None else (0, 0)
    evict = "evict_first" if m <= 64 else ""
    meta = dict(CLASS_MODE=class_mode, SEGS=segs, SEG_H=seg_h, H_LOAD=h_load, INT_ACC=int_acc,
                HAS_BIAS=bias is not None, DEBUG=return_int_acc, EVICT_W=evict, ASYM=asym,
                ORDERED=_int8_first(block_bits))

    def launch(cfg: GemmConfig, which: str):
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        if which == "dequant":
            from .dequant_gemm import w4ax_gemm_dequant

            return w4ax_gemm_dequant(args_common["q4"], args_common["q8"], a_scales, block_bits, qweight, w_scales, g,
                                     bias, out_dtype, scale_mode, w_offsets, stride_wb=w_block_stride)
        if which == "tma":
            # split-K pieces always go through the deterministic workspace (no atomic variant)
            split_k = triton.cdiv(nb, triton.cdiv(nb, cfg.split)) if cfg.split > 1 else 1
            out = torch.empty(m, n, dtype=out_dtype, device=dev)
            part = (torch.empty(tiles * split_k * cfg.block_m * cfg.block_n, dtype=torch.float32, device=dev)
                    if split_k > 1 else dummy(dev))
            a_split = tma_split_rows(cfg, class_mode)
            cnt = tile_counters(dev, tiles) if split_k > 1 and splitk_fixup_enabled() else None
            fixup = cnt is not None
            a8d = (_tma_desc(split_rows_triton(q4, q8), [cfg.block_m, BLOCK_K // 2]) if a_split
                   else _tma_desc(q8, [cfg.block_m, BLOCK_K]))
            w4ax_gemm_tma_kernel[(tiles, split_k)](
                order, _tma_desc(q4, [cfg.block_m, BLOCK_K // 2]), a8d,
                _tma_desc(torch.as_strided(qweight, (nb * n, BLOCK_K // 2), (BLOCK_K // 2, 1)) if w_bm else qweight,
                          [cfg.block_n, BLOCK_K // 2]), a_scales, w_scales, args_common["bias"], out,
                args_common["dbg"], part, m, n, nb, n8, g, split_k, a_scales.stride(0), w_scales.stride(0),
                out.stride(0), out.stride(1), dstr[0], dstr[1],
                args_common["wo"], args_common["dsum"], strides[6], dsum.stride(0) if dsum is not None else 0,
                cnt if fixup else dummy(dev, torch.int32),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, CLASS_MODE=class_mode,
                INT_ACC=int_acc, HAS_BIAS=bias is not None, DEBUG=return_int_acc, ORDERED=meta["ORDERED"],
                WORKSPACE=split_k > 1, A_SPLIT=a_split, W_BLOCK_MAJOR=w_bm, ASYM=asym, FIXUP=fixup,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if split_k > 1 and not fixup:
                _reduce_partials(None, tiles, split_k, part, bias, out, m, n, cfg)
            return out
        red_t = None
        if which == "persistent":
            p = programs or _num_sms(dev)
            items_t, starts_t, split, slots_t, red_t = _schedule_on_device(tiles, n8, nb - n8, p, cost8, cost4, dev)
            n_slots = slots_t.numel() if split else 0  # upper bound (unsplit items take no slot)
        else:
            split_k = cfg.split if which == "splitk" else 1
            if det and split_k > 1:
                # launch only non-empty chunks: splits with the same chunk size give the same partition
                split_k = triton.cdiv(nb, triton.cdiv(nb, split_k))
            split = split_k > 1
            n_slots = tiles * split_k
        workspace = det and split
        atomic = split and not det
        if atomic:
            out = torch.zeros(m, n, dtype=torch.float32, device=dev)
        else:
            out = torch.empty(m, n, dtype=out_dtype, device=dev)
        # deterministic: fp32 partials, one [BLOCK_M, BLOCK_N] slot per piece of a split tile
        # (only valid rows/columns are written and read: S*M*N*4 bytes each way)
        part = (torch.empty(n_slots * cfg.block_m * cfg.block_n, dtype=torch.float32, device=dev)
                if workspace else dummy(dev))
        common = (
            order, args_common["q4"], args_common["q8"], a_scales, qweight, w_scales, args_common["wo"],
            args_common["bias"], out, args_common["dbg"], args_common["dsum"], part, m, n, nb, n8, g,
            *strides, out.stride(0), out.stride(1), dstr[0], dstr[1], dsum.stride(0) if dsum is not None else 0,
        )
        kw = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages, SWAP_AB=cfg.swap_ab,
                  INTERLEAVE8=cfg.interleave8, WORKSPACE=workspace, **meta)
        if which == "persistent":
            w4ax_gemm_persistent_kernel[(starts_t.numel() - 1,)](items_t, starts_t, slots_t, *common, ATOMIC=atomic,
                                                                 **kw)
            if workspace:
                _reduce_partials(red_t, red_t.shape[0], 0, part, bias, out, m, n, cfg)
        else:
            cnt = tile_counters(dev, tiles) if workspace and splitk_fixup_enabled() else None
            w4ax_gemm_kernel[(tiles, split_k)](*common[:17], split_k, *common[17:],
                                               cnt if cnt is not None else dummy(dev, torch.int32), ATOMIC=atomic,
                                               FIXUP=cnt is not None, **kw)
            if workspace and cnt is None:
                _reduce_partials(None, tiles, split_k, part, bias, out, m, n, cfg)
        return out if out.dtype == out_dtype else out.to(out_dtype)

    if config is None:
        bench_fn = None
        # the caller's timing mode (cometq.autotune.timing): "graph" inside the serving runner's
        # decode-graph warm-ups -- configs are then timed as CUDA-graph replays (GPU time) and kept
        # under their own key.  Eager timing includes each call's host work, which for the TMA
        # kernel (descriptors built per call) swamps its GPU time at small M: run 5 measured
        # 8B.gate_up at M = 64 as 179 us eager vs 50.7 us replayed
        graph_mode = cometq_autotune().timing_mode() == "graph"
        # COMETQ_GEMM_TUNE=0 takes each bucket's first candidate untimed (the test suite sets
        # it: timing ~10 compiled candidates per shape would dominate a GPU test run)
        if dev.type == "cuda" and not interpreting() and os.environ.get("COMETQ_GEMM_TUNE", "1") != "0":
            if graph_mode:
                timer = cometq_autotune().cuda_graph_timer
                bench_fn = lambda c: timer(lambda: launch(c, _path_for(c, path)), dev)  # noqa: E731
            else:
                from triton.testing import do_bench

                bench_fn = lambda c: do_bench(lambda: launch(c, _path_for(c, path)), warmup=5, rep=20)  # noqa: E731
        variant = ((path, scale_mode, g) + (("asym",) if asym else ()) + (("det",) if det else ())
                   + (("graph",) if graph_mode else ()))
        config = select_config(m, n, k_pad, n8, bench_fn, variant=variant,
                               device_name=_device_name(dev) if os.environ.get(ENV_CONFIG_CACHE) else "",
                               tma=tma_mode)
    if return_int_acc and config.dequant and path == "auto":
        # the integer accumulators need an integer path: the bucket's first integer candidate
        config = next(c for c in gen_configs(m_bucket(m), n, k_pad, n8, tma=tma_mode, asym=asym) if not c.dequant)
    which = _path_for(config, path)
    if which == "splitk" and config.split == 1 and path == "splitk":
        # forced split-K with a non-split config: split over the blocks anyway
        config = dataclasses.replace(config, split=max(2, min(nb, 4)))
    return _ret(launch(config, which))


#: "1": deterministic split-K (the TMA kernel's and the pointer kernel's) reduces in-kernel (the tile's
#: last piece adds the slots, no reduce launch; :func:`_splitk_fixup`); "0" / unset: the reduce kernel.  Same bits either way.  Opt-in
#: until an H100 run has checked it (its memory ordering cannot be exercised without a GPU);
#: bench/gpu_check.sh turns it on after its GPU test passes.
ENV_SPLITK_FIXUP = "COMETQ_SPLITK_FIXUP"
# (the counters, shared with the CUDA GEMM's in-kernel reduction: cometq._counters.tile_counters)


def splitk_fixup_enabled() -> bool:
    v = os.environ.get(ENV_SPLITK_FIXUP, "0")
    if v not in ("0", "1"):
        raise ValueError(f"{ENV_SPLITK_FIXUP} must be 0 or 1, got {v!r}")
    return v == "1"


def _reduce_partials(red, n_programs: int, slots_per_tile: int, part, bias, out, m: int, n: int, cfg: GemmConfig):
    """Launch the deterministic reduction: ``red`` (persistent: (tile, first, count) rows) or
    ``slots_per_tile`` consecutive slots per tile (split-K, ``n_programs`` = tiles)."""
    if n_programs == 0:
        return
    dev = out.device
    w4ax_reduce_kernel[(n_programs,)](
        red if red is not None else dummy(dev, torch.int32), part, bias if bias is not None else dummy(dev), out,
        m, n, slots_per_tile, out.stride(0), out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, HAS_BIAS=bias is not None,
        HAS_TABLE=red is not None, num_warps=4, num_stages=1)


def _path_for(cfg: GemmConfig, requested: str) -> str:
    if requested == "dequant" or (cfg.dequant and requested == "auto"):
        return "dequant"
    if cfg.tma:
        return "tma"
    if requested in ("tiled", "persistent"):
        return requested
    if requested == "splitk":
        return "splitk"
    return "splitk" if cfg.split > 1 else "tiled"
