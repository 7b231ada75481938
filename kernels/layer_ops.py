"""Triton: the elementwise pieces of a Llama layer, one kernel each (spec: :mod:`cometq.layers`).

Why: inside a decode step's CUDA graph the unfused HF code is ~25 tiny kernels per layer
(RMSNorm alone is 8); each costs a launch slot and a ramp of a few microseconds whatever
its size.  One program per token row; the row fits one block (hidden sizes up to 16K,
``BLOCK_C`` = next power of two), math in fp32, one rounding per stored value.

``rope_qkv_kernel`` reads a fused q/k/v projection row ``[(n_q + 2 n_kv) * D]`` as a
``[heads, D]`` tile and writes three contiguous outputs; rotate-half pairs channel ``d``
with ``d +- D/2`` of the same head::

    out[d]       = x[d] * cos[d]       - x[d + D/2] * sin[d]        d <  D/2
    out[d]       = x[d] * cos[d]       + x[d - D/2] * sin[d]        d >= D/2

(the partner is a second load of the same row, shifted by ``D/2`` modulo ``D``: L1 hits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, C, eps,
                    stride_x, stride_r, stride_y, stride_h,
                    BLOCK_C: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    m = c < C
    x = tl.load(x_ptr + row * stride_x + c, mask=m, other=0.0)
    if HAS_RES:
        # the residual sum is rounded to the storage dtype first: what `h = h + o` stores and
        # what the unfused norm then reads
        x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + c, mask=m, other=0.0).to(tl.float32)).to(
            h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + c, x, mask=m)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / C
    xn = (xf * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)  # HF: cast back before the weight
    w = tl.load(w_ptr + c, mask=m, other=0.0)
    tl.store(y_ptr + row * stride_y + c, (w.to(tl.float32) * xn.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=m)


def _check_rows(name, x):
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} must be [T, C] with a contiguous last dim, got {tuple(x.shape)} strides {x.stride()}")


def rms_norm_triton(x, weight, eps: float):
    _check_rows("x", x)
    t, c = x.shape
    y = torch.empty((t, c), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if t:
        rms_norm_kernel[(t,)](x, x, weight, y, y, c, float(eps), x.stride(0), 0, y.stride(0), 0,
                              BLOCK_C=triton.next_power_of_2(c), HAS_RES=False, num_warps=_warps(c))
    return y


def add_rms_norm_triton(x, residual, weight, eps: float):
    _check_rows("x", x)
    _check_rows("residual", residual)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} must match x {x.dtype} {tuple(x.shape)}")
    t, c = x.shape
    h = torch.empty((t, c), dtype=x.dtype, device=x.device)
    y = torch.empty((t, c), dtype=torch.promote_types(h.dtype, weight.dtype), device=x.device)
    if t:
        rms_norm_kernel[(t,)](x, residual, weight, y, h, c, float(eps), x.stride(0), residual.stride(0), y.stride(0),
                              h.stride(0), BLOCK_C=triton.next_power_of_2(c), HAS_RES=True, num_warps=_warps(c))
    return y, h


def _warps(c: int) -> int:
    return 4 if c <= 4096 else 8


@triton.jit
def rope_qkv_kernel(x_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                    stride_x, stride_c, stride_q, stride_k, stride_v,
                    NQ: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)  # 0: q heads, 1: k heads, 2: v heads
    hh = tl.arange(0, BLOCK_H)
    d = tl.arange(0, D)
    if part == 0:
        n = NQ
        h0 = 0
        out_ptr = q_ptr
        stride_o = stride_q
    elif part == 1:
        n = NKV
        h0 = NQ
        out_ptr = k_ptr
        stride_o = stride_k
    else:
        n = NKV
        h0 = NQ + NKV
        out_ptr = v_ptr
        stride_o = stride_v
    hm = (hh < n)[:, None]
    base = x_ptr + row * stride_x + (h0 + hh)[:, None] * D
    x = tl.load(base + d[None, :], mask=hm, other=0.0)
    dst = out_ptr + row * stride_o + hh[:, None] * D + d[None, :]
    if part == 2:
        tl.store(dst, x, mask=hm)
    else:
        half: tl.constexpr = D // 2
        partner = tl.load(base + ((d + half) % D)[None, :], mask=hm, other=0.0).to(tl.float32)
        sign = tl.where(d < half, -1.0, 1.0)
        c = tl.load(cos_ptr + row * stride_c + d).to(tl.float32)
        s = tl.load(sin_ptr + row * stride_c + d).to(tl.float32)
        y = x.to(tl.float32) * c[None, :] + (sign * s)[None, :] * partner
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=hm)


def rope_qkv_triton(qkv, cos, sin, n_q: int, n_kv: int):
    _check_rows("qkv", qkv)
    t, width = qkv.shape
    d = width // (n_q + 2 * n_kv)
    if cos.shape != (t, d) or sin.shape != (t, d) or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError(f"cos / sin must be [T, D] = ({t}, {d}) with equal strides and a contiguous last dim, got "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)}")
    if d & (d - 1):
        raise ValueError(f"triton rope_qkv needs a power-of-two head_dim, got {d}")
    if cos.dtype != qkv.dtype or sin.dtype != qkv.dtype:
        raise ValueError(f"triton rope_qkv needs cos / sin in the activations' dtype {qkv.dtype}, got {cos.dtype} / "
                         f"{sin.dtype}")
    q = torch.empty(t, n_q, d, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(t, n_kv, d, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty(t, n_kv, d, dtype=qkv.dtype, device=qkv.device)
    if t:
        rope_qkv_kernel[(t, 3)](qkv, cos, sin, q, k, v, qkv.stride(0), cos.stride(0), q.stride(0), k.stride(0),
                                v.stride(0), NQ=n_q, NKV=n_kv, D=d, BLOCK_H=triton.next_power_of_2(max(n_q, n_kv)),
                                num_warps=4)
    return q, k, v


@triton.jit
def silu_mul_kernel(x_ptr, y_ptr, I, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < I
    g = tl.load(x_ptr + row * stride_x + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + c, mask=m, other=0.0).to(tl.float32)
    # silu rounded to the storage dtype first (F.silu's output), then the product
    sg = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + c, (sg * u).to(y_ptr.dtype.element_ty), mask=m)


def silu_mul_triton(x):
    _check_rows("x", x)
    t, two_i = x.shape
    if two_i % 2:
        raise ValueError(f"silu_mul needs an even last dim (gate | up), got {tuple(x.shape)}")
    i = two_i // 2
    y = torch.empty(t, i, dtype=x.dtype, device=x.device)
    if t:
        block = min(2048, triton.next_power_of_2(i))
        silu_mul_kernel[(t, triton.cdiv(i, block))](x, y, i, x.stride(0), y.stride(0), BLOCK=block, num_warps=4)
    return y
