"""Triton: the W4Ax GEMM for large M as dequantize + cuBLAS (the ``dequant`` path).

At prefill sizes (M in the thousands) a GEMM is compute-bound and 4-bit weights save no
time; what matters is tensor-core throughput.  This path turns both quantized operands
back into fp16/bf16 -- ``A'[m, k] = q_a[m, k] * s_a[m, block(k)]`` and
``W'[n, k] = q_w[n, k] * s_w[n, group(k)] (+ offset)``, both in the permuted K order (and,
inside each 128-channel block, even channels before odd ones: see below) -- and runs
``A' @ W'^T`` on cuBLAS: the W4Ax product (activations still quantized to
INT4/INT8, weights still INT4) at FP16-GEMM speed, plus one pass over the weights
(2 bytes written per weight; ~5 % of the GEMM at M = 8192).  The AWQ/GPTQ kernels in
vLLM do the same above a batch threshold.  Numerics: the integer-exact kernels sum
``q_a * q_w`` exactly and scale once per block; here every operand element is rounded
to the 16-bit dtype first (relative 2^-11 for fp16), so results agree with the reference
within :data:`DEQUANT_GEMM_RTOL` (per dtype) of the output's scale, not bit for bit.
``GemmConfig(dequant=True)`` is the untuned first candidate of the M >= 1024 buckets (run
1 measured the best integer kernel there at 0.25x cuBLAS FP16); the integer and TMA
kernels stay candidates the autotuner times, ``path="dequant"`` forces this one.

Layouts (cometq.layout): ``q4`` holds the INT4 blocks in ascending block order (64
bytes per block, low nibble = even K), ``q8`` the INT8 blocks (128 bytes); block ``b``'s
slot is its rank among the blocks of its own precision, counted in-kernel from
``block_bits`` (at most a few dozen blocks: no host-side table, no extra launch).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import unpack_hi, unpack_lo

__all__ = ["w4ax_gemm_dequant", "w4ax_linear_dequant", "dequant_weight_gemm", "dequant_act_kernel",
           "dequant_weight_kernel", "DEQUANT_GEMM_RTOL"]

#: dequant path vs the integer-exact reference, relative to max |y|, per output dtype: the
#: operands are rounded to it (fp16 2^-11, bf16 2^-8 each) and so is the output; measured
#: worst cases on random layers: fp16 6e-4, bf16 4.8e-3 (fp32 outputs use fp32 operands)
DEQUANT_GEMM_RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-3}


# K order of A' and W' inside each 128-channel block: the 64 even channels, then the 64 odd
# ones ("half-split").  y = A' @ W'^T only needs the SAME order in both operands, and this one
# is what the packed nibbles give for free (low nibble = even channel): each half is a
# contiguous [rows, 64] store, where restoring the natural interleaved order (tl.join +
# reshape) cost a register shuffle through shared memory per tile.
#
#     block b of A' / W':  | ch 0, 2, 4, ..., 126 | ch 1, 3, 5, ..., 127 |
#                          0                      64                    128


@triton.jit
def _row_tile(ROWS: tl.constexpr, limit):
    """This program's rows (axis 0, ``ROWS`` each), their mask and int64 offsets, and its block (axis 1)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    return r < limit, r.to(tl.int64), tl.program_id(1)


@triton.jit
def block_values(q4_ptr, q8_ptr, as_ptr, bits_ptr, slot_ptr, b, rm64, mm, stride_q4m, stride_q8m, stride_asm,
                 CLASS_MODE: tl.constexpr):
    """The integers of activation block ``b`` for the rows ``rm64`` (mask ``mm``) as two int8
    ``[rows, 64]`` halves -- even channels, odd channels: the low / high nibbles of a packed INT4
    block, every other byte of an INT8 one -- with the rows' scale of the block and its bits
    (shared by the dequant and FP8 operand kernels)."""
    bits = tl.load(bits_ptr + b)
    slot = tl.load(slot_ptr + b)
    if CLASS_MODE:
        s = tl.load(as_ptr + rm64 * stride_asm + (bits == 8).to(tl.int32), mask=mm, other=0.0)
    else:
        s = tl.load(as_ptr + rm64 * stride_asm + b, mask=mm, other=0.0)
    j = tl.arange(0, 64)
    if bits == 8:
        base = q8_ptr + rm64[:, None] * stride_q8m + slot * 128 + 2 * j[None, :]
        ev = tl.load(base, mask=mm[:, None], other=0)
        od = tl.load(base + 1, mask=mm[:, None], other=0)
    else:
        p = tl.load(q4_ptr + rm64[:, None] * stride_q4m + slot * 64 + j[None, :], mask=mm[:, None], other=0)
        ev = unpack_lo(p)
        od = unpack_hi(p)
    return ev, od, s, bits


@triton.jit
def dequant_act_kernel(q4_ptr, q8_ptr, as_ptr, bits_ptr, slot_ptr, out_ptr, M,
                       stride_q4m, stride_q8m, stride_asm, stride_om,
                       BLOCK_M: tl.constexpr, CLASS_MODE: tl.constexpr):
    """``A'[m, b*128 : +128] = q[m, block b] * scale[m, b]`` for ``BLOCK_M`` tokens of block ``b``.
    ``slot_ptr``: block ``b``'s rank among the blocks of its precision (the class slot table of
    :mod:`cometq.kernels.act_quant`, cached per block map).  (It was counted here, one scalar load
    per earlier block in a loop: a program of block 100 waited 100 dependent loads.)"""
    mm, rm64, b = _row_tile(BLOCK_M, M)
    lo, hi, s, bits = block_values(q4_ptr, q8_ptr, as_ptr, bits_ptr, slot_ptr, b, rm64, mm, stride_q4m, stride_q8m,
                                   stride_asm, CLASS_MODE)
    j = tl.arange(0, 64)
    dst = out_ptr + rm64[:, None] * stride_om + b * 128 + j[None, :]  # half-split K order (above)
    ty = out_ptr.dtype.element_ty
    tl.store(dst, (lo.to(tl.float32) * s[:, None]).to(ty), mask=mm[:, None])
    tl.store(dst + 64, (hi.to(tl.float32) * s[:, None]).to(ty), mask=mm[:, None])


@triton.jit
def dequant_weight_kernel(qw_ptr, ws_ptr, wo_ptr, out_ptr, N, GROUP,
                          stride_wn, stride_wb, stride_wsn, stride_won, stride_ow,
                          BLOCK_N: tl.constexpr, ASYM: tl.constexpr, WHOLE_BLOCK_GROUPS: tl.constexpr):
    """``W'[n, b*128 : +128] = q_w * scale[n, group] (+ offset[n, group])`` for ``BLOCK_N`` rows,
    in the half-split K order (above).  ``WHOLE_BLOCK_GROUPS``: groups span whole blocks
    (G >= 128 or per channel): one scale (and offset) per row, loaded once."""
    nm, rn64, b = _row_tile(BLOCK_N, N)
    j = tl.arange(0, 64)
    p = tl.load(qw_ptr + rn64[:, None] * stride_wn + b * stride_wb + j[None, :], mask=nm[:, None], other=0)
    if WHOLE_BLOCK_GROUPS:
        g = (b * 128) // GROUP
        sc = tl.load(ws_ptr + rn64 * stride_wsn + g, mask=nm, other=0.0)[:, None]
        if ASYM:
            of = tl.load(wo_ptr + rn64 * stride_won + g, mask=nm, other=0.0)[:, None]
    else:
        # channels 2j and 2j+1 share a group (G is even): one [rows, 64] gather serves both halves
        g = (b * 128 + 2 * j) // GROUP
        sc = tl.load(ws_ptr + rn64[:, None] * stride_wsn + g[None, :], mask=nm[:, None], other=0.0)
        if ASYM:
            of = tl.load(wo_ptr + rn64[:, None] * stride_won + g[None, :], mask=nm[:, None], other=0.0)
    lo = unpack_lo(p).to(tl.float32) * sc
    hi = unpack_hi(p).to(tl.float32) * sc
    if ASYM:
        lo += of
        hi += of
    dst = out_ptr + rn64[:, None] * stride_ow + b * 128 + j[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(dst, lo.to(ty), mask=nm[:, None])
    tl.store(dst + 64, hi.to(ty), mask=nm[:, None])


def w4ax_gemm_dequant(q4, q8, a_scales, block_bits, qweight, w_scales, group: int, bias,
                      out_dtype: torch.dtype, scale_mode: str, w_offsets: Optional[torch.Tensor] = None,
                      stride_wb: Optional[int] = None) -> torch.Tensor:
    """``y = A' @ W'^T (+ bias)`` (module doc).  Arguments as :func:`cometq.kernels.w4ax_gemm.w4ax_gemm_triton`
    after its checks: ``group`` the resolved weight group width (K_pad for per-channel),
    ``stride_wb`` the weight block stride (64 row-major, N * 64 block-major)."""
    m = a_scales.shape[0]
    nb = block_bits.numel()
    dt = _operand_dtype(out_dtype)
    a = torch.empty(m, nb * 128, dtype=dt, device=qweight.device)
    if m and nb:
        bm = 32
        from .act_quant import block_tables

        bits, slots = block_tables(block_bits)
        dequant_act_kernel[(triton.cdiv(m, bm), nb)](
            q4, q8, a_scales, bits, slots, a, m, q4.stride(0) if q4.numel() else 0,
            q8.stride(0) if q8.numel() else 0, a_scales.stride(0), a.stride(0), BLOCK_M=bm,
            CLASS_MODE=scale_mode == "class", num_warps=4)
    return dequant_weight_gemm(a, qweight, w_scales, w_offsets, group, bias, out_dtype, stride_wb)


def w4ax_linear_dequant(x, perm, block_bits, n_int8: int, scale_mode: str, int4_clip: float, qweight, w_scales,
                        w_offsets, group: int, bias, out_dtype: torch.dtype, *, identity_perm: bool = False,
                        stride_wb: Optional[int] = None) -> torch.Tensor:
    """The whole W4Ax linear on the dequant path from the unquantized input ``x [M, K]``: ``A'``
    by :func:`cometq.kernels.act_quant.fake_quant_act_triton` (quantize and dequantize in one pass:
    no packed activation written and read back -- at M = 8192 the two-kernel route cost ~350 us per
    projection on the H100, run 6), then ``W'`` and cuBLAS as :func:`w4ax_gemm_dequant`.  Bit for bit
    ``w4ax_gemm_dequant(*quantize_act_triton(x, ...))``.  ``group``: the resolved weight group width."""
    from .act_quant import fake_quant_act_triton

    a = fake_quant_act_triton(x, perm, block_bits, n_int8, scale_mode, out_dtype=_operand_dtype(out_dtype),
                              identity_perm=identity_perm, int4_clip=int4_clip)
    return dequant_weight_gemm(a, qweight, w_scales, w_offsets, group, bias, out_dtype, stride_wb)


def _operand_dtype(out_dtype: torch.dtype) -> torch.dtype:
    return out_dtype if out_dtype in (torch.float16, torch.bfloat16) else torch.float32


def dequant_weight_gemm(a, qweight, w_scales, w_offsets, group: int, bias, out_dtype,
                        stride_wb: Optional[int] = None) -> torch.Tensor:
    """``a @ W'^T (+ bias)``: ``W'`` dequantized into ``a``'s dtype and K order, then cuBLAS.
    ``a [M, K_pad]``: the activation operand in the half-split K order (``fake_quant_act``);
    ``group`` the resolved weight group width; ``stride_wb`` the weight block stride (default 64:
    row-major ``[N, K_pad/2]``; a block-major ``[N, NB, 64]`` view's N * 64)."""
    if stride_wb is None:
        stride_wb = qweight.stride(1) if qweight.dim() == 3 else None
    n = qweight.shape[0]
    k_pad = a.shape[1]
    nb = k_pad // 128
    dt = a.dtype
    w = torch.empty(n, k_pad, dtype=dt, device=a.device)
    if n and nb:
        bn = 64  # 64 rows x 64 bytes in, 16 KB (fp16) out per program
        dequant_weight_kernel[(triton.cdiv(n, bn), nb)](
            qweight, w_scales, w_offsets if w_offsets is not None else w_scales, w, n, group,
            qweight.stride(0), 64 if stride_wb is None else stride_wb, w_scales.stride(0),
            w_offsets.stride(0) if w_offsets is not None else 0, w.stride(0),
            BLOCK_N=bn, ASYM=w_offsets is not None, WHOLE_BLOCK_GROUPS=group >= 128, num_warps=4)
    y = torch.addmm(bias.to(dt), a, w.t()) if bias is not None else a @ w.t()
    return y if y.dtype == out_dtype else y.to(out_dtype)
