"""Triton: fused quantize-and-append of new K or V rows into the paged KV4 pool.

One program per (row, kv head): it loads the row's ``T`` tokens x ``D`` channels,
computes the asymmetric 4-bit scale/zero of each group, quantizes, packs two
channels per byte and writes packed data, scale and zero straight into the
row's destination block -- the new tokens never exist dequantized or in an
intermediate buffer.  Numerics are bit-identical to
:func:`cometq.reference.quantize_kv4` (fp32 min/max, IEEE division, fp16
scale/zero re-read as fp32, round-half-to-even).

Channel pairs are loaded as two strided halves (even channels -> low nibble,
odd -> high nibble), so packing is an elementwise ``lo | hi << 4`` with no
register shuffles::

    x[t, 0] x[t, 1] | x[t, 2] x[t, 3] | ...      (row of D channels)
      lo      hi    |   lo      hi    |
      byte 0        |   byte 1        |  ...      (row of D/2 packed bytes)
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import FAST_DIV, quotient_rn, rint_rne

from cometq._counters import tile_counters


@triton.jit
def _quantize_store(x_lo, x_hi, packed_ptr, scale_ptr, zero_ptr, blk, off, h, t, j,
                    stride_pb, stride_ph, stride_pt, stride_sb, stride_sh, stride_st,
                    T_IN: tl.constexpr, HALF_D: tl.constexpr, GROUP: tl.constexpr, AXIS_CHANNEL: tl.constexpr,
                    g0):
    """Quantize ``T_IN`` tokens of one head -- fp32 halves ``x_lo`` (channels 2j) / ``x_hi``
    (2j+1), ``[T_IN, HALF_D]`` -- and store data, scales and zeros at token rows
    ``off + t`` of pool block ``blk`` (shared by the append and the decode-append kernels).
    ``HALF_D`` channel pairs from pair ``j[0]`` on: the head's whole width, or a chunk of it (the
    decode append's group flush); token-axis groups of a chunk start at group ``g0``."""
    if AXIS_CHANNEL:
        # one group = the T_IN (== GROUP) tokens of each channel: reduce over tokens
        mn_lo = tl.min(x_lo, axis=0)[None, :]
        mx_lo = tl.max(x_lo, axis=0)[None, :]
        mn_hi = tl.min(x_hi, axis=0)[None, :]
        mx_hi = tl.max(x_hi, axis=0)[None, :]
        s_lo = tl.math.div_rn(mx_lo - mn_lo, 15.0).to(tl.float16)
        s_hi = tl.math.div_rn(mx_hi - mn_hi, 15.0).to(tl.float16)
        z_lo = mn_lo.to(tl.float16)
        z_hi = mn_hi.to(tl.float16)
    else:
        # groups of GROUP channels per token: GROUP/2 even + GROUP/2 odd channels of
        # the halves, i.e. contiguous runs of GROUP/2 along j
        NG: tl.constexpr = 2 * HALF_D // GROUP
        lo3 = tl.reshape(x_lo, [T_IN, NG, GROUP // 2])
        hi3 = tl.reshape(x_hi, [T_IN, NG, GROUP // 2])
        mn = tl.minimum(tl.min(lo3, axis=2), tl.min(hi3, axis=2))  # [T_IN, NG]
        mx = tl.maximum(tl.max(lo3, axis=2), tl.max(hi3, axis=2))
        s_g = tl.math.div_rn(mx - mn, 15.0).to(tl.float16)
        z_g = mn.to(tl.float16)
        # store the per-group scale/zero: [T_IN, NG] at token rows off + t
        g = g0 + tl.arange(0, NG)
        sp = blk * stride_sb + h * stride_sh + (off + t)[:, None] * stride_st + g[None, :]
        tl.store(scale_ptr + sp, s_g)
        tl.store(zero_ptr + sp, z_g)
    # (the fast division pays for its per-scale reciprocal and range check over >= 16 tokens; a
    # single token per call -- unstaged pools, decode -- keeps the IEEE division per value)
    FAST: tl.constexpr = FAST_DIV and T_IN >= 16
    # quantize with the fp16-rounded scale/zero (what dequantization will see); the quotient by
    # quotient_rn with the scales at their own granularity ([1, HALF_D] per channel, [T_IN, NG, 1]
    # per group): one reciprocal per scale and three FFMAs per value on the GPU instead of an IEEE
    # division per value (the same bits); rint_rne is exact here (|quotient| <= 15 + rounding)
    if AXIS_CHANNEL:
        sf_lo = s_lo.to(tl.float32)
        sf_hi = s_hi.to(tl.float32)
        q_lo = rint_rne(quotient_rn(x_lo - z_lo.to(tl.float32), tl.where(sf_lo == 0.0, 1.0, sf_lo), FAST))
        q_hi = rint_rne(quotient_rn(x_hi - z_hi.to(tl.float32), tl.where(sf_hi == 0.0, 1.0, sf_hi), FAST))
    else:
        sf3 = s_g.to(tl.float32)[:, :, None]
        d3 = tl.where(sf3 == 0.0, 1.0, sf3)
        zf3 = z_g.to(tl.float32)[:, :, None]
        q_lo = tl.reshape(rint_rne(quotient_rn(lo3 - zf3, d3, FAST)), [T_IN, HALF_D])
        q_hi = tl.reshape(rint_rne(quotient_rn(hi3 - zf3, d3, FAST)), [T_IN, HALF_D])
    q_lo = tl.minimum(tl.maximum(q_lo, 0.0), 15.0).to(tl.uint8)
    q_hi = tl.minimum(tl.maximum(q_hi, 0.0), 15.0).to(tl.uint8)
    packed = q_lo | (q_hi << 4)
    pp = packed_ptr + blk * stride_pb + h * stride_ph + (off + t)[:, None] * stride_pt + j[None, :]
    tl.store(pp, packed)
    if AXIS_CHANNEL:
        # scales [NB, H, BS/G, D]: row off // GROUP, channels 2j (lo) and 2j+1 (hi)
        sb = blk * stride_sb + h * stride_sh + (off // GROUP) * stride_st
        tl.store(scale_ptr + sb + 2 * j, tl.reshape(s_lo, [HALF_D]))
        tl.store(scale_ptr + sb + 2 * j + 1, tl.reshape(s_hi, [HALF_D]))
        tl.store(zero_ptr + sb + 2 * j, tl.reshape(z_lo, [HALF_D]))
        tl.store(zero_ptr + sb + 2 * j + 1, tl.reshape(z_hi, [HALF_D]))


@triton.jit
def kv4_append_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, block_ptr, offset_ptr,
    stride_xn, stride_xh, stride_xt, stride_xd,
    stride_pb, stride_ph, stride_pt,
    stride_sb, stride_sh, stride_st,
    T_IN: tl.constexpr, HALF_D: tl.constexpr, GROUP: tl.constexpr, AXIS_CHANNEL: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.program_id(1)
    blk = tl.load(block_ptr + row).to(tl.int64)
    off = tl.load(offset_ptr + row)
    t = tl.arange(0, T_IN)
    j = tl.arange(0, HALF_D)
    xb = x_ptr + row.to(tl.int64) * stride_xn + h * stride_xh + t[:, None] * stride_xt
    # each token's D channels in one contiguous load (16-byte vectors when stride_xd == 1), split
    # into even / odd channels in registers: two stride-2 gathers before (run 7/9: ~85-90 us per
    # prefill call for ~21 MB), and the token-axis reductions of key groups then stay mostly
    # inside a thread (the static main body at T_IN = 32: 2710 instructions per thread before)
    d = tl.arange(0, 2 * HALF_D)
    x = tl.load(xb + d[None, :] * stride_xd).to(tl.float32)
    x_lo, x_hi = tl.split(tl.reshape(x, [T_IN, HALF_D, 2]))  # [T_IN, HALF_D]: channels 2j, 2j+1
    _quantize_store(x_lo, x_hi, packed_ptr, scale_ptr, zero_ptr, blk, off, h, t, j,
                    stride_pb, stride_ph, stride_pt, stride_sb, stride_sh, stride_st,
                    T_IN, HALF_D, GROUP, AXIS_CHANNEL, 0)


def kv4_quantize_append_triton(x, packed, scale, zero, block_ids, offsets, group_size: int, axis: str) -> None:
    """Launch :func:`kv4_append_kernel` (arguments as ``cometq.ops.kv4_quantize_append``)."""
    n, h, t, d = x.shape
    if n == 0:
        return
    half = d // 2
    if half & (half - 1) or t & (t - 1) or group_size & (group_size - 1):
        raise ValueError(f"triton kv4 append needs power-of-two head_dim, T and group_size, got x shape "
                         f"{tuple(x.shape)}, group_size={group_size}")
    if packed.stride(3) != 1 or scale.stride(3) != 1 or zero.stride() != scale.stride():
        raise ValueError("triton kv4 append needs pool tensors contiguous in the last dimension")
    kv4_append_kernel[(n, h)](
        x, packed, scale, zero, block_ids, offsets,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        packed.stride(0), packed.stride(1), packed.stride(2),
        scale.stride(0), scale.stride(1), scale.stride(2),
        T_IN=t, HALF_D=half, GROUP=group_size, AXIS_CHANNEL=(axis == "channel"),
    )


@triton.jit
def _decode_token(src_ptr, tail_ptr, tb, tlen, stride_tt, full, packed_ptr, scale_ptr, zero_ptr, blk, off, h, t, d,
                  stride_pb, stride_ph, stride_pt, stride_sb, stride_sh, stride_st,
                  HALF_D: tl.constexpr, GROUP: tl.constexpr, AXIS_CHANNEL: tl.constexpr, CHUNK: tl.constexpr):
    """One head's K or V token of a staged decode append: tail row ``tlen`` <- the token (rounded
    to the tail dtype like ``Tensor.to``, nearest even); if it completes the group (``full``), the
    group's ``GROUP`` tokens -- tail rows ``0..tlen-1`` from memory plus the token as just rounded,
    in registers (no thread reads another's store) -- quantized into row ``off`` of block ``blk``,
    ``CHUNK`` channels at a time (groups never straddle a chunk: per-channel groups trivially,
    per-token groups because CHUNK is a multiple of GROUP), so one ``GROUP x CHUNK`` fp32 tile is
    live instead of ``GROUP x D``.  Rows are loaded whole (16-byte vectors) and split into even /
    odd channels in registers."""
    x = tl.load(src_ptr + d).to(tail_ptr.dtype.element_ty)  # [2 * HALF_D]
    tl.store(tail_ptr + tb + tlen * stride_tt + d, x)
    if full:
        old = (t < tlen)[:, None]
        c = tl.arange(0, CHUNK)
        for c0 in range(0, 2 * HALF_D, CHUNK):  # (a loop, not unrolled: one chunk's tile live at a time)
            xc = tl.load(src_ptr + c0 + c).to(tail_ptr.dtype.element_ty)  # (the token's chunk, as stored)
            g = tl.load(tail_ptr + tb + t[:, None] * stride_tt + c0 + c[None, :], mask=old, other=0.0)
            g = tl.where((t == tlen)[:, None], xc.to(tl.float32)[None, :], g.to(tl.float32))
            g_lo, g_hi = tl.split(tl.reshape(g, [GROUP, CHUNK // 2, 2]))  # channels c0 + 2j, + 1
            _quantize_store(g_lo, g_hi, packed_ptr, scale_ptr, zero_ptr, blk, off, h, t,
                            c0 // 2 + tl.arange(0, CHUNK // 2),
                            stride_pb, stride_ph, stride_pt, stride_sb, stride_sh, stride_st,
                            GROUP, CHUNK // 2, GROUP, AXIS_CHANNEL, c0 // GROUP)


@triton.jit
def kv4_decode_append_kernel(
    k_ptr, v_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, tk_ptr, tv_ptr, bt_ptr, lens_ptr, slot_ptr, cnt_ptr,
    H, HPP,
    stride_kb, stride_kh, stride_vb, stride_vh,
    stride_pb, stride_ph, stride_pt,
    stride_ksb, stride_ksh, stride_kst,
    stride_vsb, stride_vsh, stride_vst,
    stride_ts, stride_th, stride_tt,
    stride_bts, stride_l2, stride_ls,
    HALF_D: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    STAGED: tl.constexpr, K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr, PER_HEAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """The whole decode append of one token per sequence, on the device: row ``b`` appends
    ``k[b], v[b]`` ``[H, D]`` to slot ``slots[b]`` of a one-layer pool (``-1``: a padding row,
    nothing happens) and advances the slot's lengths ``lens [2, S]`` itself.

    Nothing comes from the host but the slot ids, so a decode step (append + attention for
    every layer) can be captured in one CUDA graph: where the token goes and whether it
    completes a quantization group are read from the lengths in device memory.

    Staged pools (an axis is ``"channel"``): the token goes to tail row ``t = tail_len``;
    when ``t == G - 1`` it completes a group and the tail's G tokens are quantized into block
    ``block_tables[s, q // BS]`` at row ``q % BS`` (``q = quant_len``), then ``q += G, t = 0``
    (:func:`_decode_token`).  The tail row is written either way (the reference writes it before
    quantizing; the state stays bit-identical).  Token-axis pools quantize the token straight
    into row ``q % BS``.

    ``PER_HEAD``: one program per (row, ``HPP`` heads) -- grid ``(B, cdiv(H, HPP))`` -- instead of
    one per row looping over all heads.  A group flush quantizes ``2 H`` tiles of ``G x D``
    values; in one program per row that ran serially on one SM while the rest of the grid had
    finished (H200 runs 9 and 10, batch-64 serving at G = 64: every step in which sequences
    crossed a group took ~7 ms longer than the ~8.5 ms of the others, 8 steps in every 64).  The
    programs of a row then share its lengths: each reads them first, and the row's last program
    to finish -- counted by ``atomic_add`` on ``cnt_ptr[slot]`` (acq_rel: every other program's
    reads of ``lens`` precede its count) -- advances them and resets the counter to zero (the
    buffer is zero between launches: ``cometq._counters``).  ``HPP`` > 1 keeps the grid small on
    the steps that flush nothing (the flush's registers allow ~1 program per SM: 8 heads x 64
    rows as 512 programs would be ~4 waves of near-empty programs).

    A row whose destination block is missing (no reservation: the pool's host checks make
    that impossible) is skipped whole instead of writing through a ``-1`` block id."""
    b = tl.program_id(0)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    if slot >= 0:
        ql = tl.load(lens_ptr + slot * stride_ls)
        tlen = tl.load(lens_ptr + stride_l2 + slot * stride_ls)
        j = tl.arange(0, HALF_D)
        d = tl.arange(0, 2 * HALF_D)
        b64 = b.to(tl.int64)
        if PER_HEAD:
            h_lo = tl.program_id(1) * HPP
            h_hi = tl.minimum(h_lo + HPP, H)
        else:
            h_lo = 0
            h_hi = H
        if STAGED:
            full = tlen == GROUP - 1
            blk = tl.load(bt_ptr + slot * stride_bts + ql // BLOCK_SIZE, mask=full, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_ptr + slot * stride_bts + ql // BLOCK_SIZE).to(tl.int64)
        if blk >= 0:
            off = ql % BLOCK_SIZE
            for h in range(h_lo, h_hi):
                kb = k_ptr + b64 * stride_kb + h * stride_kh
                vb = v_ptr + b64 * stride_vb + h * stride_vh
                if STAGED:
                    t = tl.arange(0, GROUP)
                    tb = slot * stride_ts + h * stride_th
                    # K's group, then V's: one G x D tile pair live at a time
                    _decode_token(kb, tk_ptr, tb, tlen, stride_tt, full, kp_ptr, ks_ptr, kz_ptr, blk, off, h, t, d,
                                  stride_pb, stride_ph, stride_pt, stride_ksb, stride_ksh, stride_kst,
                                  HALF_D, GROUP, K_CHANNEL, CHUNK)
                    _decode_token(vb, tv_ptr, tb, tlen, stride_tt, full, vp_ptr, vs_ptr, vz_ptr, blk, off, h, t, d,
                                  stride_pb, stride_ph, stride_pt, stride_vsb, stride_vsh, stride_vst,
                                  HALF_D, GROUP, V_CHANNEL, CHUNK)
                else:
                    t = tl.arange(0, 1)
                    xk_lo, xk_hi = tl.split(tl.reshape(tl.load(kb + d).to(tl.float32), [1, HALF_D, 2]))
                    _quantize_store(xk_lo, xk_hi, kp_ptr, ks_ptr, kz_ptr, blk, off, h, t, j,
                                    stride_pb, stride_ph, stride_pt, stride_ksb, stride_ksh, stride_kst,
                                    1, HALF_D, GROUP, False, 0)
                    xv_lo, xv_hi = tl.split(tl.reshape(tl.load(vb + d).to(tl.float32), [1, HALF_D, 2]))
                    _quantize_store(xv_lo, xv_hi, vp_ptr, vs_ptr, vz_ptr, blk, off, h, t, j,
                                    stride_pb, stride_ph, stride_pt, stride_vsb, stride_vsh, stride_vst,
                                    1, HALF_D, GROUP, False, 0)
            last = True
            if PER_HEAD:
                # every warp of this program has read the lengths (and done its part) before the
                # count: a scalar atomic is one thread's, and nothing else here is a barrier on the
                # steps that flush nothing (the classic __syncthreads-then-atomic of a split reduction)
                tl.debug_barrier()
                last = tl.atomic_add(cnt_ptr + slot, 1) == tl.cdiv(H, HPP) - 1
            if last:
                if PER_HEAD:
                    tl.store(cnt_ptr + slot, 0)
                if STAGED:
                    if full:
                        tl.store(lens_ptr + slot * stride_ls, ql + GROUP)
                        tl.store(lens_ptr + stride_l2 + slot * stride_ls, 0)
                    else:
                        tl.store(lens_ptr + stride_l2 + slot * stride_ls, tlen + 1)
                else:
                    tl.store(lens_ptr + slot * stride_ls, ql + 1)


def decode_append_chunk(head_dim: int, group_size: int) -> int:
    """Channels a staged group flush quantizes at a time: 64, or the group when wider (token-axis
    groups must not straddle chunks), at most the head."""
    return min(head_dim, max(64, group_size))


def decode_append_heads_per_program(heads: int) -> int:
    """KV heads per decode-append program (with counters): a quarter of them, at least 1 -- 4
    programs per row (Llama-3-8B's 8 KV heads: 2 each, 256 programs at batch 64)."""
    return max(1, heads // 4)


def decode_append_warps(staged: bool, group_size: int) -> int:
    """Warps of a decode-append program.  A staged pool's group flush holds a ``G x CHUNK`` fp32
    tile (and its quantization temporaries) in registers: ptxas, sm_90, at G = 64 (bench_serving's
    pools) 4 warps spill (255 registers; the one-program-per-row kernel this replaced spilled 1016
    bytes), 8 warps do not (235 registers with the loop over a program's heads; G = 32: 175).
    Token-axis pools touch one token: 4.
    ``group_size`` is kept for the record: 8 warps serve both group sizes in use."""
    del group_size
    return 8 if staged else 4


def kv4_decode_append_triton(k, v, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v,
                             block_tables, lens, slots, group_size: int, key_axis: str, value_axis: str) -> None:
    """Launch :func:`kv4_decode_append_kernel` (arguments as ``cometq.ops.kv4_decode_append``)."""
    bsz, h, d = k.shape
    if bsz == 0:
        return
    half = d // 2
    if half & (half - 1) or group_size & (group_size - 1):
        raise ValueError(f"triton kv4 decode append needs power-of-two head_dim and group_size, got k shape "
                         f"{tuple(k.shape)}, group_size={group_size}")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_packed.stride(3) != 1 or k_scale.stride(3) != 1:
        raise ValueError("triton kv4 decode append needs k, v and pool tensors contiguous in the last dimension")
    if (k_packed.stride() != v_packed.stride() or k_zero.stride() != k_scale.stride()
            or v_zero.stride() != v_scale.stride() or tail_k.stride() != tail_v.stride()
            or (tail_k.numel() and tail_k.stride(3) != 1)):
        raise ValueError("triton kv4 decode append needs k/v pools, scales/zeros and tails with matching strides")
    staged = "channel" in (key_axis, value_axis)
    # one program per (row, head) when the row's programs can count themselves in (see the kernel)
    cnt = tile_counters(k.device, lens.shape[1]) if h > 1 else None
    per_head = cnt is not None
    hpp = decode_append_heads_per_program(h)
    kv4_decode_append_kernel[(bsz, triton.cdiv(h, hpp)) if per_head else (bsz,)](
        k, v, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables, lens, slots,
        cnt if per_head else lens,
        h, hpp,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_packed.stride(0), k_packed.stride(1), k_packed.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
        tail_k.stride(0), tail_k.stride(1), tail_k.stride(2) if staged else 0,
        block_tables.stride(0), lens.stride(0), lens.stride(1),
        HALF_D=half, GROUP=group_size, BLOCK_SIZE=k_packed.shape[2], STAGED=staged,
        K_CHANNEL=key_axis == "channel", V_CHANNEL=value_axis == "channel", PER_HEAD=per_head,
        CHUNK=decode_append_chunk(d, group_size), num_warps=decode_append_warps(staged, group_size),
    )
