"""Triton: decode attention straight from the paged KV4 pool (flash-decoding).

Decode attention is a bandwidth problem: one query row per sequence reads the
whole K/V history once.  Reading 4-bit K/V (+ fp16 scale/zero per group) moves
~3.5x fewer bytes than fp16 K/V, and dequantizing in registers right after the
load keeps that saving -- no dequantized copy ever touches global memory.

Work split (``kv4_attn_split_kernel``), grid ``(batch, kv_heads, num_splits)``::

    sequence b:  [ blk0 blk1 | blk2 blk3 | blk4 ..  ] [tail]
                   split 0     split 1     split S-1  (+ tail on the last split)

* One program serves *all query heads of one KV head* (GQA ratio QPK = Hq/H):
  the K/V tile is loaded and dequantized once and reused by QPK query rows,
  padded to BLOCK_H >= 16 rows because ``tl.dot`` needs M >= 16 on tensor cores.
* Split-K over the sequence's blocks (each sequence is cut into ``num_splits``
  equal runs of blocks) gives enough programs to fill the SMs at small batch /
  long context; ``kv4_attn_reduce_kernel`` merges the partial (max, sum, acc)
  triples with the usual log-sum-exp rescaling.
* A tile is one pool block: ``BLOCK_SIZE`` tokens x ``D/2`` packed bytes.  Even
  and odd channels are kept as separate halves (low / high nibbles) through
  both dots, so unpacking is a mask and a shift, never a register shuffle:
  ``s = q_even . k_lo^T + q_odd . k_hi^T`` and ``acc_even += p . v_lo``,
  ``acc_odd += p . v_hi``.
* Scale/zero addressing is one formula for both axes:
  ``scale[blk, h, t // TOK_DIV, c // CH_DIV]`` with (TOK_DIV, CH_DIV) = (1, G)
  for per-token groups and (G, 1) for per-channel groups.
* The full-precision tail (< G tokens, channel-axis pools) is attended by the
  last split after its blocks.

Softmax runs in the exp2 domain (``q`` pre-scaled by ``sm_scale * log2 e``).
Dot operands are the query's dtype: fp16/bf16 on tensor cores on the GPU, or
fp32 with ``input_precision="ieee"`` (what the CPU interpreter tests use, so
they match the float32 reference within summation-order error).  K/V tiles are
dequantized straight into that dtype (``n * scale + zero`` as one FMA in fp16 /
bf16, nibbles converted by the magic-number trick of :func:`_nib`): no int->float
or fp32->fp16 conversion instructions in the loop.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl

from ._common import _ASM_UNPACK, cometq_autotune, dummy, interpreting

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp2(_NEG - m) == 0 without inf - inf NaNs
_LAZY = tl.constexpr(8.0)  # log2 headroom of the lazy softmax rescale (probabilities <= 256)


@triton.jit
def _compact(TOK_DIV: tl.constexpr, CH_DIV: tl.constexpr, TILE: tl.constexpr):
    """True when a tile's scales/zeros are one contiguous block at their own granularity:
    per-token groups (a ``[TILE, D/G]`` block) or per-channel groups of >= TILE tokens (one
    ``[D]`` row for the whole tile).  Per-channel groups shorter than the tile (G < 16) are
    gathered per element instead."""
    return (TOK_DIV == 1) or (CH_DIV == 1 and TOK_DIV >= TILE)


@triton.jit
def _load_scales(scale_ptr, zero_ptr, sbase, t0, t, tmask, valid, stride_st,
                 TOK_DIV: tl.constexpr, CH_DIV: tl.constexpr, TILE: tl.constexpr, HALF_D: tl.constexpr):
    """The compact scale and zero block of the tile starting at token ``t0`` (fp16, as stored):
    per-channel ``[D]`` (16-byte loads of one row), per-token ``[TILE, D/G]``.  ``valid`` False
    (a prefetch past the last tile) loads nothing.  Non-compact layouts return placeholders
    (:func:`_dequant_tile` gathers those itself)."""
    if CH_DIV == 1 and TOK_DIV >= TILE:
        c = tl.arange(0, 2 * HALF_D)
        row = sbase + (t0 // TOK_DIV) * stride_st
        s = tl.load(scale_ptr + row + c, mask=valid & (c >= 0), other=0.0)
        z = tl.load(zero_ptr + row + c, mask=valid & (c >= 0), other=0.0)
    elif TOK_DIV == 1:
        NG: tl.constexpr = 2 * HALF_D // CH_DIV
        so = sbase + t[:, None] * stride_st + tl.arange(0, NG)[None, :]
        s = tl.load(scale_ptr + so, mask=tmask[:, None] & valid, other=0.0)
        z = tl.load(zero_ptr + so, mask=tmask[:, None] & valid, other=0.0)
    else:
        s = 0.0
        z = 0.0
    return s, z


@triton.jit
def _nib(p, HI: tl.constexpr, DT: tl.constexpr):
    """uint8 -> the low (``HI`` False) or high nibble (0..15) as ``DT``, exactly, with no
    int -> float conversion instruction.

    The magic-number trick: ``as_fp16(0x6400 | n) = 1024 + n``, ``as_bf16(0x4300 | n) = 128 + n``,
    ``as_fp32(0x4B000000 | n) = 2**23 + n`` (n below the mantissa range), so an OR, a bitcast and
    one subtraction give n.  Why (SASS of the AOT cubin, ``nvdisasm``; docs/KV4.md): the plain
    ``.to(tl.float32)`` is an ``I2F`` and the fp32 result needs an ``F2F`` pack to fp16 for the
    tensor cores -- conversions Hopper issues at 1/8 of the FP32 rate, ~100 per thread per
    32-token tile.  Dequantizing in the dot's own dtype (fp16/bf16) also lets the compiler pair
    the subtraction and the scale FMA into ``HADD2``/``HFMA2``."""
    if DT == tl.float16:
        n = (p.to(tl.uint16) >> 4) if HI else (p.to(tl.uint16) & 0xF)
        return (n | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    elif DT == tl.bfloat16:
        n = (p.to(tl.uint16) >> 4) if HI else (p.to(tl.uint16) & 0xF)
        return (n | 0x4300).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        n = (p.to(tl.uint32) >> 4) if HI else (p.to(tl.uint32) & 0xF)
        return (n | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


# Word-wide nibble -> fp16/bf16 (GPU only; the interpreter runs ``_nib``).  Triton packs four
# uint8 elements per 32-bit register (``pack=4``); each output is four 16-bit values in two
# registers, element k in lane k.  ``prmt`` spreads bytes 0,1 (2,3) into the two 16-bit lanes,
# then one ``lop3`` masks a nibble and ORs the magic exponent:
#
#     w  = [b3 b2 b1 b0]             prmt(w, 0, 0x4140) = [00 b1 00 b0]
#     lo : (t & 0x000F000F) | 0x64006400  -> fp16 lanes 1024 + (b & 15)
#     hi : (t & 0x00F000F0) | 0x54005400  -> fp16 lanes   64 + (b >> 4)   (nibble lands on
#          mantissa bits 4..7, whose unit under exponent 2**6 is 1/16: no shift needed)
#
# bf16 has only 7 mantissa bits (bits 4..7 would reach the exponent), so its high nibble is
# shifted down first: ((t >> 4) & 0x000F000F) | 0x43004300 -> 128 + (b >> 4).
# 6 (fp16) / 8 (bf16) instructions per four bytes, where the elementwise form compiles to
# ~36 (``PRMT`` byte extracts, 16-bit moves; SASS of the AOT cubin).  Checked exhaustively
# by executing the PTX text (tests/test_kv4_attention.py).
_ASM_NIB_F16 = tl.constexpr("""{
.reg .b32 t, u, m, h;
mov.b32 m, 0x64006400;
mov.b32 h, 0x54005400;
prmt.b32 t, $4, 0, 0x4140;
prmt.b32 u, $4, 0, 0x4342;
lop3.b32 $0, t, 0x000F000F, m, 0xEA;
lop3.b32 $1, u, 0x000F000F, m, 0xEA;
lop3.b32 $2, t, 0x00F000F0, h, 0xEA;
lop3.b32 $3, u, 0x00F000F0, h, 0xEA;
}""")

_ASM_NIB_BF16 = tl.constexpr("""{
.reg .b32 t, u, m;
mov.b32 m, 0x43004300;
prmt.b32 t, $4, 0, 0x4140;
prmt.b32 u, $4, 0, 0x4342;
lop3.b32 $0, t, 0x000F000F, m, 0xEA;
lop3.b32 $1, u, 0x000F000F, m, 0xEA;
shr.u32 t, t, 4;
shr.u32 u, u, 4;
lop3.b32 $2, t, 0x000F000F, m, 0xEA;
lop3.b32 $3, u, 0x000F000F, m, 0xEA;
}""")


@triton.jit
def _nib2(p, DT: tl.constexpr):
    """uint8 -> (low nibble, high nibble) as ``DT``, exactly (0..15); one pass over the bytes."""
    if _ASM_UNPACK and DT == tl.float16:
        lo, hi = tl.inline_asm_elementwise(_ASM_NIB_F16, "=r,=r,=r,=r,r", [p], dtype=(tl.uint16, tl.uint16),
                                           is_pure=True, pack=4)
        return lo.to(tl.float16, bitcast=True) - 1024.0, hi.to(tl.float16, bitcast=True) - 64.0
    elif _ASM_UNPACK and DT == tl.bfloat16:
        lo, hi = tl.inline_asm_elementwise(_ASM_NIB_BF16, "=r,=r,=r,=r,r", [p], dtype=(tl.uint16, tl.uint16),
                                           is_pure=True, pack=4)
        return lo.to(tl.bfloat16, bitcast=True) - 128.0, hi.to(tl.bfloat16, bitcast=True) - 128.0
    else:
        return _nib(p, False, DT), _nib(p, True, DT)


@triton.jit
def _pairs(row, HALF_D: tl.constexpr, DT: tl.constexpr = tl.float32):
    """A ``[D]`` per-channel row -> (even channels, odd channels), ``DT`` ``[D/2]`` each."""
    return tl.split(tl.reshape(row.to(DT), (HALF_D, 2)))


@triton.jit
def _dequant_tile(packed_ptr, scale_ptr, zero_ptr, pbase, sbase, s, z, t, j, tmask, stride_pt, stride_st,
                  TOK_DIV: tl.constexpr, CH_DIV: tl.constexpr, TILE: tl.constexpr, HALF_D: tl.constexpr,
                  DT: tl.constexpr):
    """A K or V tile as two halves [TILE, HALF_D] in ``DT`` (the dot's dtype): channels 2j (low
    nibbles), 2j+1 (high); ``n * scale + zero`` is computed in ``DT`` (one rounding: an FMA).

    ``s``/``z``: the tile's compact scale/zero block from :func:`_load_scales` (loaded one
    tile ahead, so its latency hides behind the previous tile's math), broadcast here:
    a per-channel row splits into even/odd halves; per-token ``[TILE, D/G]`` scales apply to
    the tile viewed as ``[TILE, D/G, G/2]`` (the G/2 channels of a group inside a half).
    The packed bytes are one 16-byte-vectorizable row of D/2 bytes per token; masked tokens
    read 0."""
    p = tl.load(packed_ptr + pbase + t[:, None] * stride_pt + j[None, :], mask=tmask[:, None], other=0)
    if CH_DIV == 1 and TOK_DIV >= TILE:
        s_lo, s_hi = _pairs(s, HALF_D, DT)
        z_lo, z_hi = _pairs(z, HALF_D, DT)
        n_lo, n_hi = _nib2(p, DT)
        lo = n_lo * s_lo[None, :] + z_lo[None, :]
        hi = n_hi * s_hi[None, :] + z_hi[None, :]
    elif TOK_DIV == 1:
        NG: tl.constexpr = 2 * HALF_D // CH_DIV
        GH: tl.constexpr = CH_DIV // 2
        s3 = s.to(DT)[:, :, None]
        z3 = z.to(DT)[:, :, None]
        n_lo, n_hi = _nib2(p, DT)
        lo = tl.reshape(tl.reshape(n_lo, (TILE, NG, GH)) * s3 + z3, (TILE, HALF_D))
        hi = tl.reshape(tl.reshape(n_hi, (TILE, NG, GH)) * s3 + z3, (TILE, HALF_D))
    else:
        # per-channel groups shorter than the tile: gather scale/zero per element
        srow = sbase + (t // TOK_DIV)[:, None] * stride_st
        s_lo = tl.load(scale_ptr + srow + 2 * j[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        z_lo = tl.load(zero_ptr + srow + 2 * j[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        s_hi = tl.load(scale_ptr + srow + 2 * j[None, :] + 1, mask=tmask[:, None], other=0.0).to(tl.float32)
        z_hi = tl.load(zero_ptr + srow + 2 * j[None, :] + 1, mask=tmask[:, None], other=0.0).to(tl.float32)
        lo = _nib(p, False, tl.float32) * s_lo + z_lo
        hi = _nib(p, True, tl.float32) * s_hi + z_hi
    return lo, hi


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr):
    if DOT_DTYPE == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


@triton.jit
def _move_max(m_i, m_tile, l_i, acc_lo, acc_hi):
    """Raise the running reference max to include ``m_tile``; rescale the sums to it."""
    m_new = tl.maximum(m_i, m_tile)
    alpha = tl.math.exp2(m_i - m_new)
    return m_new, l_i * alpha, acc_lo * alpha[:, None], acc_hi * alpha[:, None]


@triton.jit
def _softmax_step(s, tmask, m_i, l_i, acc_lo, acc_hi, v_lo, v_hi, DOT_DTYPE: tl.constexpr, LAZY: tl.constexpr):
    """One online-softmax step over a tile of keys: scores ``s [BLOCK_H, T]`` (columns with
    ``tmask`` False get weight 0), values ``v_lo / v_hi [T, D/2]`` -> updated ``(m, l, acc_lo, acc_hi)``.

    ``LAZY``: the running reference max ``m`` only moves when a row's tile max exceeds it by
    more than ``2**_LAZY`` (then every ``exp2`` below stays <= 2**_LAZY: no overflow in the
    fp16/bf16 probabilities or the fp32 sums).  ``acc`` and ``l`` always share ``m``, so
    ``o = acc / l`` and the split merge (log-sum-exp over ``(m, l, acc)``) are exact for any
    reference max.  Most tiles then skip the ``[BLOCK_H, D]`` accumulator rescale behind a
    CTA-uniform branch: ~100 of ~700 SASS instructions per 16-token tile at one warp
    (tests/test_kv4_attention.py).  With 4 warps the branch's cross-warp "any row moved"
    costs about what it saves, so the 4-warp config rescales every tile."""
    s = tl.where(tmask[None, :], s, _NEG)
    m_tile = tl.max(s, axis=1)
    if LAZY:
        if tl.max((m_tile > m_i + _LAZY).to(tl.int32), axis=0) > 0:
            m_i, l_i, acc_lo, acc_hi = _move_max(m_i, m_tile, l_i, acc_lo, acc_hi)
    else:
        m_i, l_i, acc_lo, acc_hi = _move_max(m_i, m_tile, l_i, acc_lo, acc_hi)
    # masked columns: exp2(_NEG - m) underflows to 0 unless the whole row is masked (a tail
    # with no tokens): the where makes that case 0 too
    p = tl.where(tmask[None, :], tl.math.exp2(s - m_i[:, None]), 0.0)
    l_i = l_i + tl.sum(p, axis=1)
    acc_lo = acc_lo + _dot(p, v_lo, DOT_DTYPE)
    acc_hi = acc_hi + _dot(p, v_hi, DOT_DTYPE)
    return m_i, l_i, acc_lo, acc_hi


@triton.jit
def kv4_attn_split_kernel(
    q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, tk_ptr, tv_ptr,
    bt_ptr, qlen_ptr, tlen_ptr, sid_ptr,
    po_ptr, pm_ptr, pl_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_pb, stride_ph, stride_pt,
    stride_ksb, stride_ksh, stride_kst,
    stride_vsb, stride_vsh, stride_vst,
    stride_tks, stride_tkh, stride_tkt,
    stride_tvs, stride_tvh, stride_tvt,
    stride_bts,
    stride_pob, stride_poh, stride_pos,
    QPK: tl.constexpr, BLOCK_H: tl.constexpr, HALF_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TAIL_N: tl.constexpr,
    K_TOK_DIV: tl.constexpr, K_CH_DIV: tl.constexpr, V_TOK_DIV: tl.constexpr, V_CH_DIV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, FOLD_K: tl.constexpr = False, TILE: tl.constexpr = 16,
    LAZY_RESCALE: tl.constexpr = False, DIRECT: tl.constexpr = False,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # the split count is the grid's third dimension, not a constexpr: a decode batch's split count
    # follows its size and length (paged.default_num_splits), and a constexpr compiled a new kernel
    # (and, untuned, a whole launch-config sweep) for every new count -- the likeliest cause of
    # GPU run 5's 2-10 s prefill steps
    num_splits = tl.num_programs(2)
    slot = tl.load(sid_ptr + b)
    lq = tl.load(qlen_ptr + slot)
    n_blocks = tl.cdiv(lq, BLOCK_SIZE)
    per = tl.cdiv(n_blocks, num_splits)
    blk_start = split * per
    blk_end = tl.minimum(blk_start + per, n_blocks)

    hh = tl.arange(0, BLOCK_H)
    hmask = hh < QPK
    heads = kvh * QPK + hh
    j = tl.arange(0, HALF_D)
    qb = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q_lo = tl.load(qb + 2 * j[None, :], mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
    q_hi = tl.load(qb + 2 * j[None, :] + 1, mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
    q_lo_f = q_lo
    q_hi_f = q_hi
    q_lo = q_lo.to(DOT_DTYPE)
    q_hi = q_hi.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_H], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc_lo = tl.zeros([BLOCK_H, HALF_D], tl.float32)
    acc_hi = tl.zeros([BLOCK_H, HALF_D], tl.float32)
    # the loop walks token tiles of TILE tokens (TILE divides BLOCK_SIZE): a pool block of 64
    # tokens in one tile held [64, D/2] fp32 K/V halves plus their scale/zero gathers in
    # registers -- 255 registers and spills at 4 warps (ptxas, sm_90a) -- where 32-token tiles
    # need ~150 and no spills; a runtime loop (not a static unroll over a block's tiles) keeps
    # the compiler from hoisting the next tile's loads into the same register budget
    NSUB: tl.constexpr = BLOCK_SIZE // TILE
    tt = tl.arange(0, TILE)
    bt_row = bt_ptr + slot.to(tl.int64) * stride_bts
    it_lo = blk_start * NSUB
    it_hi = blk_end * NSUB
    # scales/zeros are prefetched one tile ahead (software pipelining by hand): Triton's
    # pipeliner streams the packed bytes through shared memory but leaves these small loads in
    # place, where each tile would wait a full memory round trip for them before its math
    valid = it_lo < it_hi
    phys = tl.load(bt_row + it_lo // NSUB, mask=valid, other=0).to(tl.int64)
    tok = (it_lo % NSUB) * TILE + tt
    tmask = ((it_lo // NSUB) * BLOCK_SIZE + tok) < lq
    ks, kz = _load_scales(ks_ptr, kz_ptr, phys * stride_ksb + kvh * stride_ksh, (it_lo % NSUB) * TILE, tok, tmask,
                          valid, stride_kst, K_TOK_DIV, K_CH_DIV, TILE, HALF_D)
    vs, vz = _load_scales(vs_ptr, vz_ptr, phys * stride_vsb + kvh * stride_vsh, (it_lo % NSUB) * TILE, tok, tmask,
                          valid, stride_vst, V_TOK_DIV, V_CH_DIV, TILE, HALF_D)
    for it in range(it_lo, it_hi):
        i = it // NSUB
        sub = it % NSUB
        phys = tl.load(bt_row + i).to(tl.int64)  # same entry for the NSUB tiles of a block (L1 hit)
        tok = sub * TILE + tt  # token rows within the block
        tmask = (i * BLOCK_SIZE + tok) < lq
        pbase = phys * stride_pb + kvh * stride_ph
        # the next tile's scales (consumed next iteration)
        nxt = it + 1
        valid = nxt < it_hi
        phys_n = tl.load(bt_row + nxt // NSUB, mask=valid, other=0).to(tl.int64)
        tok_n = (nxt % NSUB) * TILE + tt
        tmask_n = ((nxt // NSUB) * BLOCK_SIZE + tok_n) < lq
        ks_n, kz_n = _load_scales(ks_ptr, kz_ptr, phys_n * stride_ksb + kvh * stride_ksh, (nxt % NSUB) * TILE, tok_n,
                                  tmask_n, valid, stride_kst, K_TOK_DIV, K_CH_DIV, TILE, HALF_D)
        vs_n, vz_n = _load_scales(vs_ptr, vz_ptr, phys_n * stride_vsb + kvh * stride_vsh, (nxt % NSUB) * TILE, tok_n,
                                  tmask_n, valid, stride_vst, V_TOK_DIV, V_CH_DIV, TILE, HALF_D)
        if FOLD_K:
            # per-channel key groups (the tile lies inside one group: one scale/zero row of D
            # channels): fold them into the query instead of dequantizing K,
            #     q . (k * sc + z) = (q * sc) . k + q . z
            # a [BLOCK_H, D/2] multiply replaces the FMA over the K tile; the nibbles feed the
            # dot as they are (0..15 is exact in fp16/bf16)
            kq = tl.load(kp_ptr + pbase + tok[:, None] * stride_pt + j[None, :], mask=tmask[:, None], other=0)
            sc_lo, sc_hi = _pairs(ks, HALF_D)
            z_lo, z_hi = _pairs(kz, HALF_D)
            bias = tl.sum(q_lo_f * z_lo[None, :] + q_hi_f * z_hi[None, :], axis=1)  # [BLOCK_H]
            n_lo, n_hi = _nib2(kq, DOT_DTYPE)
            s = _dot(q_lo_f * sc_lo[None, :], tl.trans(n_lo), DOT_DTYPE) \
                + _dot(q_hi_f * sc_hi[None, :], tl.trans(n_hi), DOT_DTYPE) + bias[:, None]
        else:
            k_lo, k_hi = _dequant_tile(kp_ptr, ks_ptr, kz_ptr, pbase, phys * stride_ksb + kvh * stride_ksh, ks, kz,
                                       tok, j, tmask, stride_pt, stride_kst, K_TOK_DIV, K_CH_DIV, TILE, HALF_D,
                                       DOT_DTYPE)
            s = _dot(q_lo, tl.trans(k_lo), DOT_DTYPE) + _dot(q_hi, tl.trans(k_hi), DOT_DTYPE)  # [BLOCK_H, TILE]
        v_lo, v_hi = _dequant_tile(vp_ptr, vs_ptr, vz_ptr, pbase, phys * stride_vsb + kvh * stride_vsh, vs, vz,
                                   tok, j, tmask, stride_pt, stride_vst, V_TOK_DIV, V_CH_DIV, TILE, HALF_D,
                                   DOT_DTYPE)
        m_i, l_i, acc_lo, acc_hi = _softmax_step(s, tmask, m_i, l_i, acc_lo, acc_hi, v_lo, v_hi, DOT_DTYPE,
                                                 LAZY_RESCALE)
        ks, kz, vs, vz = ks_n, kz_n, vs_n, vz_n

    if TAIL_N > 0:
        if split == num_splits - 1:
            lt = tl.load(tlen_ptr + slot)
            tn = tl.arange(0, TAIL_N)
            tm = tn < lt
            tkb = tk_ptr + slot.to(tl.int64) * stride_tks + kvh * stride_tkh + tn[:, None] * stride_tkt
            tvb = tv_ptr + slot.to(tl.int64) * stride_tvs + kvh * stride_tvh + tn[:, None] * stride_tvt
            k_lo = tl.load(tkb + 2 * j[None, :], mask=tm[:, None], other=0.0).to(tl.float32)
            k_hi = tl.load(tkb + 2 * j[None, :] + 1, mask=tm[:, None], other=0.0).to(tl.float32)
            s = _dot(q_lo, tl.trans(k_lo), DOT_DTYPE) + _dot(q_hi, tl.trans(k_hi), DOT_DTYPE)
            v_lo = tl.load(tvb + 2 * j[None, :], mask=tm[:, None], other=0.0).to(tl.float32)
            v_hi = tl.load(tvb + 2 * j[None, :] + 1, mask=tm[:, None], other=0.0).to(tl.float32)
            m_i, l_i, acc_lo, acc_hi = _softmax_step(s, tm, m_i, l_i, acc_lo, acc_hi, v_lo, v_hi, DOT_DTYPE,
                                                     LAZY_RESCALE)

    # partials: acc [B, Hq, S, D] (even/odd channels interleaved back), m/l [B, Hq, S]
    ob = po_ptr + b.to(tl.int64) * stride_pob + heads[:, None] * stride_poh + split * stride_pos
    if DIRECT:
        # one split (po_ptr is the output [B, Hq, D]): the reduce kernel's merge of a single
        # partial is o = acc / l (its weight exp2(m - m) is exactly 1), so it is done here and the
        # reduce launch and the partial buffers are skipped -- same float ops, same bits
        den = tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(ob + 2 * j[None, :], (acc_lo / den).to(po_ptr.dtype.element_ty), mask=hmask[:, None])
        tl.store(ob + 2 * j[None, :] + 1, (acc_hi / den).to(po_ptr.dtype.element_ty), mask=hmask[:, None])
    else:
        tl.store(ob + 2 * j[None, :], acc_lo, mask=hmask[:, None])
        tl.store(ob + 2 * j[None, :] + 1, acc_hi, mask=hmask[:, None])
        mo = (b.to(tl.int64) * (QPK * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(pm_ptr + mo, m_i, mask=hmask)
        tl.store(pl_ptr + mo, l_i, mask=hmask)


@triton.jit
def kv4_attn_reduce_kernel(
    po_ptr, pm_ptr, pl_ptr, out_ptr,
    stride_pob, stride_poh, stride_pos, stride_ob, stride_oh, num_splits,
    HQ: tl.constexpr, SPLITS_P2: tl.constexpr, D: tl.constexpr,
):
    # num_splits at run time (SPLITS_P2, its power-of-two bound, stays a constexpr: 7 variants)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_P2)
    smask = s < num_splits
    mo = (b.to(tl.int64) * HQ + h) * num_splits + s
    m = tl.load(pm_ptr + mo, mask=smask, other=_NEG)
    l = tl.load(pl_ptr + mo, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(smask, tl.math.exp2(m - m_max), 0.0)
    denom = tl.sum(w * l, axis=0)
    d = tl.arange(0, D)
    acc = tl.load(po_ptr + b.to(tl.int64) * stride_pob + h * stride_poh + s[:, None] * stride_pos + d[None, :],
                  mask=smask[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty))


_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _axis_divs(axis: str, group_size: int):
    return (1, group_size) if axis == "token" else (group_size, 1)


#: opt-in switch for the folded-key variant (FOLD_K) until the GPU measures it against the
#: dequantizing one: "1" on, anything else off; the ``fold_k`` argument overrides it
ENV_FOLD_K = "COMETQ_KV4_FOLD_K"


def fold_k_eligible(key_axis: str, group_size: int) -> bool:
    """FOLD_K needs per-channel key groups (one scale row per G tokens) of G >= 16 tokens
    (a sub-tile is a ``tl.dot`` operand: N, K >= 16)."""
    return key_axis == "channel" and group_size >= 16


def attention_tile(block_size: int, group_size: int, fold_k: bool, key_axis: str = "token",
                   value_axis: str = "token") -> int:
    """Tokens per loop iteration: min(32, block size) (see the kernel's register note), cut to
    the group size when a per-channel group (G >= 16) is shorter, so every tile lies inside one
    scale row (compact scale loads, and FOLD_K folds exactly one row into q)."""
    tile = min(32, block_size)
    if (fold_k or "channel" in (key_axis, value_axis)) and 16 <= group_size < tile:
        tile = group_size
    return tile


@dataclass(frozen=True)
class AttnConfig:
    """Launch config of the split kernel: warps per program, tokens per loop iteration, and
    whether the online softmax rescales lazily (``_softmax_step``)."""

    num_warps: int
    tile: int
    lazy: bool = False

    def __post_init__(self):
        if isinstance(self.num_warps, bool) or self.num_warps not in (1, 2, 4, 8):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, got {self.num_warps!r}")
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 16 or self.tile & (self.tile - 1):
            raise ValueError(f"tile must be a power of two >= 16 (a tl.dot operand dimension), got {self.tile!r}")
        if not isinstance(self.lazy, bool):
            raise TypeError(f"lazy must be a bool, got {self.lazy!r}")


def attention_configs(block_size: int, group_size: int, fold_k: bool, key_axis: str = "token",
                      value_axis: str = "token") -> List[AttnConfig]:
    """Candidate launch configs, the untuned default first.

    Why fewer warps are candidates (SASS of the AOT sm_90a cubins, ``kv4_aot``; per 32 tokens,
    fp16, K per channel / V per token, GQA 4): a program's query rows are padded to 16 for the
    MMA, so with 4 warps each warp recomputes row statistics the others also hold and the
    probabilities / V tile cross warps through shared memory (13 barriers per tile): ~1920 warp
    instructions per 32 tokens at 4 warps, ~1630 at 2, ~1240 at 1 (the probabilities then stay
    in registers).  Fewer warps per program need more programs (splits) to fill the SMs and
    more registers per thread (1 warp: ~250), so which one wins per batch / context is timed
    (:func:`kv4_decode_attention_triton` tunes on first use; ``bench_attention.py --sweep``).
    The first config -- the 4-warp kernel measured on the H100 -- runs untuned."""
    base = attention_tile(block_size, group_size, fold_k, key_axis, value_axis)
    out = [AttnConfig(4, base, False), AttnConfig(2, base, True), AttnConfig(1, base, True)]
    if base > 16:
        out.append(AttnConfig(1, 16, True))
    return list(dict.fromkeys(out))


def attention_meta(dot_dtype, qpk: int, head_dim: int, block_size: int, group_size: int, tail_g: int,
                   key_axis: str, value_axis: str, num_splits: int, fold_k: bool = False,
                   config: Optional[AttnConfig] = None, direct: bool = False):
    """constexprs of :func:`kv4_attn_split_kernel` for one call (shared with the AOT test);
    ``config`` None: the default tile, eager rescaling."""
    kt, kc = _axis_divs(key_axis, group_size)
    vt, vc = _axis_divs(value_axis, group_size)
    tile = attention_tile(block_size, group_size, fold_k, key_axis, value_axis) if config is None else config.tile
    if tile > block_size or ("channel" in (key_axis, value_axis) and 16 <= group_size < tile):
        raise ValueError(f"tile {tile} must fit the pool block ({block_size} tokens) and a per-channel group "
                         f"(group_size={group_size})")
    return dict(QPK=qpk, BLOCK_H=max(16, triton.next_power_of_2(qpk)), HALF_D=head_dim // 2,
                BLOCK_SIZE=block_size, TAIL_N=0 if tail_g == 0 else max(16, triton.next_power_of_2(tail_g)),
                K_TOK_DIV=kt, K_CH_DIV=kc, V_TOK_DIV=vt, V_CH_DIV=vc, DOT_DTYPE=_DOT[dot_dtype], FOLD_K=bool(fold_k),
                TILE=tile, LAZY_RESCALE=bool(config.lazy) if config is not None else False,
                DIRECT=bool(direct) and num_splits == 1)


#: "0": no timing on first use (each shape takes the first candidate of
#: :func:`attention_configs`, or a choice tuned earlier in the process)
ENV_TUNE = "COMETQ_ATTN_TUNE"
_TUNED: Dict[tuple, AttnConfig] = {}
_SPLIT_FACTOR: Dict[tuple, int] = {}  # tuned multiple of the caller's split count (per _TUNED key)
#: multiples of the caller's split count the tuner tries (capped by the block-table width and 64).
#: 8x since 2026-11-27: at a batch-64 decode step (one split) 4x still left ~16 one- or two-warp
#: programs per SM for a kernel whose loop is latency-bound (run 5: 392 GB/s at one split)
SPLIT_FACTORS = (1, 2, 4, 8)
_META: Dict[tuple, dict] = {}


_LAST: List[Optional[AttnConfig]] = [None]


def last_config() -> Optional[AttnConfig]:
    """The config of this process's most recent split-kernel launch (for benchmark reports)."""
    return _LAST[0]


def tuned_configs() -> Dict[str, dict]:
    """The configs chosen so far in this process (for benchmark reports)."""
    return {repr(k): dict(dataclasses.asdict(v), split_factor=_SPLIT_FACTOR.get(k, 1)) for k, v in _TUNED.items()}


def _capturing(dev: torch.device) -> bool:
    return dev.type == "cuda" and bool(torch.cuda.is_current_stream_capturing())


def kv4_decode_attention_triton(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v,
                                block_tables, quant_lens, tail_lens, seq_ids, group_size: int, key_axis: str,
                                value_axis: str, sm_scale: float, num_splits: int, *,
                                config: Optional[AttnConfig] = None, num_warps: Optional[int] = None,
                                num_stages: int = None, fold_k: Optional[bool] = None,
                                direct_store: Optional[bool] = None):
    """Launch split + reduce (arguments as ``cometq.ops.kv4_decode_attention``).

    Launch config (:class:`AttnConfig`): ``config`` if given; else ``num_warps`` if given
    (default tile, lazy rescaling below 4 warps); else the one chosen for this shape class --
    on a GPU the candidates of :func:`attention_configs` are timed on first use, each at 1x,
    2x, 4x and 8x ``num_splits`` (:data:`SPLIT_FACTORS`; at most the block-table width and 64), and the fastest pair is
    kept per (pool format, dtype, GQA ratio, program-count bucket, timing mode), unless
    ``COMETQ_ATTN_TUNE=0`` or a CUDA graph is being captured (then the first candidate at
    ``num_splits``).  A forced ``config`` / ``num_warps`` always runs ``num_splits``.
    ``num_stages``: keyword extra for benchmark sweeps (None: Triton's default).
    ``fold_k``: fold per-channel key scales into the query (FOLD_K) instead of dequantizing
    K; None: the ``COMETQ_KV4_FOLD_K`` environment variable (off unless "1"), and only where
    :func:`fold_k_eligible`; True on an ineligible pool is an error.
    ``direct_store`` (None: when ``num_splits == 1``): the split kernel normalizes and writes the
    output itself -- one launch and no partial buffers (a batch-64 decode step uses one split);
    bit-identical to the reduce kernel's merge of one partial."""
    if fold_k is None:
        fold_k = os.environ.get(ENV_FOLD_K, "0") == "1" and fold_k_eligible(key_axis, group_size)
    elif fold_k and not fold_k_eligible(key_axis, group_size):
        raise ValueError(f"fold_k needs key_axis 'channel' and group_size >= 16, got {key_axis!r} / {group_size}")
    bsz, hq, d = q.shape
    nb, h, bs, half = k_packed.shape
    if half & (half - 1) or half < 16 or bs & (bs - 1) or bs < 16:
        raise ValueError(f"triton kv4 attention needs power-of-two head_dim >= 32 and block size >= 16, got pool {tuple(k_packed.shape)}")
    if q.stride(2) != 1 or k_packed.stride(3) != 1 or tail_k.stride(3) != 1 or tail_v.stride(3) != 1:
        raise ValueError("triton kv4 attention needs q, pool and tails contiguous in the last dimension")
    if k_packed.stride() != v_packed.stride():
        raise ValueError("k_packed and v_packed must have the same strides")
    if bsz == 0:
        return torch.empty_like(q)
    ns = int(num_splits)
    # the CPU interpreter computes bf16 tl.dot wrongly (numpy has no bf16); there the
    # dots run in fp32 -- the GPU bf16 variant is covered by the AOT compile test
    dot_dtype = torch.float32 if (q.device.type == "cpu" and q.dtype == torch.bfloat16) else q.dtype
    qpk, tail_g = hq // h, tail_k.shape[2]

    def run(cfg: AttnConfig, n_split: int) -> torch.Tensor:
        """Split kernel (+ reduce) with ``n_split`` splits into a fresh output."""
        out = torch.empty_like(q)
        direct = (n_split == 1) if direct_store is None else (bool(direct_store) and n_split == 1)
        if direct:  # the split kernel writes `out` (po strides = out's, split stride 0)
            po, pm, pl = out, dummy(q.device), dummy(q.device)
            po_strides = (out.stride(0), out.stride(1), 0)
        else:
            po = torch.empty(bsz, hq, n_split, d, dtype=torch.float32, device=q.device)
            pm = torch.empty(bsz, hq, n_split, dtype=torch.float32, device=q.device)
            pl = torch.empty_like(pm)
            po_strides = (po.stride(0), po.stride(1), po.stride(2))
        mkey = (dot_dtype, qpk, d, bs, group_size, tail_g, key_axis, value_axis, bool(fold_k), cfg, direct)
        meta = _META.get(mkey)
        if meta is None:  # built once per shape class (a decode step launches this per layer)
            if len(_META) > 1024:
                _META.clear()
            meta = _META[mkey] = attention_meta(dot_dtype, qpk, d, bs, group_size, tail_g, key_axis, value_axis,
                                                n_split, fold_k, cfg, direct)
        kv4_attn_split_kernel[(bsz, h, n_split)](
            q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v,
            block_tables, quant_lens, tail_lens, seq_ids, po, pm, pl,
            float(sm_scale) * math.log2(math.e),
            q.stride(0), q.stride(1),
            k_packed.stride(0), k_packed.stride(1), k_packed.stride(2),
            k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
            v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
            tail_k.stride(0), tail_k.stride(1), tail_k.stride(2),
            tail_v.stride(0), tail_v.stride(1), tail_v.stride(2),
            block_tables.stride(0),
            *po_strides,
            num_warps=cfg.num_warps, **({} if num_stages is None else dict(num_stages=num_stages)), **meta,
        )
        if not direct:
            kv4_attn_reduce_kernel[(bsz, hq)](
                po, pm, pl, out, po.stride(0), po.stride(1), po.stride(2), out.stride(0), out.stride(1), n_split,
                HQ=hq, SPLITS_P2=triton.next_power_of_2(n_split), D=d, num_warps=4,
            )
        return out

    if config is None and num_warps is not None:
        w = int(num_warps)
        config = AttnConfig(w, attention_tile(bs, group_size, fold_k, key_axis, value_axis), w < 4)
    factor = 1
    if config is None:
        at = cometq_autotune()
        # program-count bucket: what decides occupancy (and so the best warps per program); the
        # timing mode (cometq.autotune.timing): a step replayed from a CUDA graph is timed as
        # graph replays, GPU time only (eager timing includes the launch)
        mode = at.timing_mode()
        key = (str(q.device), dot_dtype, qpk, d, bs, group_size, tail_g > 0, key_axis, value_axis, bool(fold_k),
               triton.next_power_of_2(bsz * h * ns), mode)
        config = _TUNED.get(key)
        if config is None:
            cands = attention_configs(bs, group_size, fold_k, key_axis, value_axis)
            config = cands[0]
            tune = (q.device.type == "cuda" and not interpreting() and os.environ.get(ENV_TUNE, "1") != "0"
                    and len(cands) > 1)
            if tune and at.frozen_now():
                pass  # cometq.autotune.frozen(): the default now, nothing cached (a later call tunes)
            elif not tune:
                _TUNED[key] = config  # the untuned choice is fixed too: no candidate list per call
            elif not _capturing(q.device):
                # CUDA events, not triton.testing.do_bench: that allocates a 256 MB L2-flush buffer
                # per call, which a serving process whose KV pool holds the free memory may not have
                # (and a decode step's K/V reads dwarf L2 anyway).  The split count is tuned with the
                # config (SPLIT_FACTORS x the caller's, at most the block-table width): the caller's count
                # (paged.default_num_splits) was sized for 4-warp programs, and the 1-2-warp configs
                # leave an SM with few warps at a batch-64 step's one split (H100 run 5: 392 GB/s)
                timer = at.cuda_graph_timer if mode == "graph" else at.cuda_event_timer
                cap = max(ns, min(64, block_tables.shape[1]))
                factors = sorted({f for f in SPLIT_FACTORS if ns * f <= cap})
                times = []
                for f in factors:
                    for c in cands:
                        try:
                            times.append((timer(lambda: run(c, ns * f), q.device, warmup=2, reps=8), c, f))
                        except Exception:  # noqa: BLE001 - a config the compiler rejects (e.g. out of resources)
                            continue
                if times:
                    _, config, factor = min(times, key=lambda t: t[0])
                    _SPLIT_FACTOR[key] = factor
                _TUNED[key] = config
        factor = _SPLIT_FACTOR.get(key, 1)
    out = run(config, ns * factor)
    _LAST[0] = config
    return out
