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


@triton.jit
def _rne(y):
    # round-half-to-even like torch.round; libdevice.rint is not available under
    # the interpreter, and this is exact for the small magnitudes seen here
    f = tl.floor(y)
    d = y - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


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
    x_lo = tl.load(xb + (2 * j)[None, :] * stride_xd).to(tl.float32)      # [T_IN, HALF_D] channels 2j
    x_hi = tl.load(xb + (2 * j + 1)[None, :] * stride_xd).to(tl.float32)  # channels 2j+1
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
        g = tl.arange(0, NG)
        sp = blk * stride_sb + h * stride_sh + (off + t)[:, None] * stride_st + g[None, :]
        tl.store(scale_ptr + sp, s_g)
        tl.store(zero_ptr + sp, z_g)
        s_lo = tl.reshape(tl.broadcast_to(s_g[:, :, None], [T_IN, NG, GROUP // 2]), [T_IN, HALF_D])
        z_lo = tl.reshape(tl.broadcast_to(z_g[:, :, None], [T_IN, NG, GROUP // 2]), [T_IN, HALF_D])
        s_hi = s_lo
        z_hi = z_lo
    # quantize with the fp16-rounded scale/zero (what dequantization will see)
    sf_lo = s_lo.to(tl.float32)
    sf_hi = s_hi.to(tl.float32)
    q_lo = _rne(tl.math.div_rn(x_lo - z_lo.to(tl.float32), tl.where(sf_lo == 0.0, 1.0, sf_lo)))
    q_hi = _rne(tl.math.div_rn(x_hi - z_hi.to(tl.float32), tl.where(sf_hi == 0.0, 1.0, sf_hi)))
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
def kv4_tail_write_kernel(
    k_ptr, v_ptr, tk_ptr, tv_ptr, slot_ptr, tpos_ptr, lens_ptr, new_ptr,
    B, H, D,
    stride_kb, stride_kh, stride_vb, stride_vh,
    stride_ts, stride_th, stride_tt,
    stride_l2, stride_ls,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One decode token per sequence into a staged pool's full-precision tails, plus the
    layer's two length rows, in one launch (was three ``index_put`` launches per layer per
    decode step): program ``b`` copies ``k[b], v[b]`` ``[H, D]`` to tail position
    ``tpos[b]`` of slot ``slots[b]`` (cast to the tail dtype: round to nearest even, as
    ``Tensor.to``) and stores the slot's new quant / tail lengths ``new[b]`` / ``new[B + b]``."""
    b = tl.program_id(0)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    t = tl.load(tpos_ptr + b).to(tl.int64)
    hh = tl.arange(0, BLOCK_H)
    dd = tl.arange(0, BLOCK_D)
    mask = (hh < H)[:, None] & (dd < D)[None, :]
    src_k = k_ptr + b.to(tl.int64) * stride_kb + hh[:, None] * stride_kh + dd[None, :]
    src_v = v_ptr + b.to(tl.int64) * stride_vb + hh[:, None] * stride_vh + dd[None, :]
    dst = slot * stride_ts + hh[:, None] * stride_th + t * stride_tt + dd[None, :]
    tl.store(tk_ptr + dst, tl.load(src_k, mask=mask).to(tk_ptr.dtype.element_ty), mask=mask)
    tl.store(tv_ptr + dst, tl.load(src_v, mask=mask).to(tv_ptr.dtype.element_ty), mask=mask)
    tl.store(lens_ptr + slot * stride_ls, tl.load(new_ptr + b))
    tl.store(lens_ptr + stride_l2 + slot * stride_ls, tl.load(new_ptr + B + b))


def kv4_tail_write_triton(k, v, tail_k, tail_v, slots, tpos, lens, new_lens) -> None:
    """Launch :func:`kv4_tail_write_kernel`.  ``k, v [B, H, D]`` (last dim contiguous), ``tail_k /
    tail_v [S, H, G, D]`` (one layer, same strides, last dim contiguous), ``slots / tpos [B]``
    ints, ``lens [2, S]`` int32 (quant, tail rows of one layer), ``new_lens [2 * B]`` int32."""
    bsz, h, d = k.shape
    if bsz == 0:
        return
    if (tuple(v.shape) != tuple(k.shape) or tail_k.stride() != tail_v.stride() or k.stride(2) != 1
            or v.stride(2) != 1 or tail_k.stride(3) != 1 or tuple(tail_k.shape[1::2]) != (h, d)):
        raise ValueError(f"tail write: k {tuple(k.shape)} / v {tuple(v.shape)} / tails {tuple(tail_k.shape)} "
                         f"(strides {tail_k.stride()} / {tail_v.stride()}) do not match")
    if slots.numel() != bsz or tpos.numel() != bsz or new_lens.numel() != 2 * bsz or lens.dim() != 2:
        raise ValueError(f"tail write: slots {tuple(slots.shape)}, tpos {tuple(tpos.shape)}, new_lens "
                         f"{tuple(new_lens.shape)}, lens {tuple(lens.shape)} for a batch of {bsz}")
    kv4_tail_write_kernel[(bsz,)](
        k, v, tail_k, tail_v, slots, tpos, lens, new_lens, bsz, h, d,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        tail_k.stride(0), tail_k.stride(1), tail_k.stride(2), lens.stride(0), lens.stride(1),
        BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d), num_warps=4,
    )
