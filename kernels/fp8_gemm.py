"""Triton + cuBLAS: the W4Ax GEMM for large M on FP8 tensor cores (the ``fp8`` route).

Why: at prefill sizes the GEMM is compute-bound, and the dequant path (:mod:`.dequant_gemm`)
runs it at FP16 tensor-core speed -- issue #3's "M >= 1024: 1.5x cuBLAS FP16" needs a faster
unit.  Hopper has no INT4 MMA and its INT8 one is reached from cuBLAS only for unscaled int32
products (``torch._int_mm``), but its FP8 (e4m3) MMA is ~1.7x BF16 (H100: 1350 vs 788 TFLOP/s
measured) and cuBLAS scales it per 1x128 block of *both* operands -- exactly the W4Ax epilogue
of the "block" scale mode with weight groups of 128 (or per channel):

    y[m, n] = sum_j sa[m, j] * sb[n, j] * (A8[m, block j] . W8[n, block j])

The W4Ax integers go in as e4m3 values, exactly: INT4 values (-8..7) as they are, an INT8 value
``q`` as two exact digits ``q = 16 * (q >> 4) + (q & 15)`` in two blocks (K grows by the INT8
share); every product and every 128-long block sum is an integer below 2^14, exact in the tensor
cores' accumulator, and cuBLAS applies the fp32 scales per block (the FP8 block form:
:func:`cometq.layout.fp8_block_sources`; reference :func:`cometq.reference.fp8_block_operands` /
:func:`cometq.reference.fp8_block_mm`).  Numerics: the integer-exact result up to fp32 rounding of
the scaled block sums -- closer to the reference than the dequant path, which rounds every operand
element to 16 bits.  An asymmetric weight's offset term (``sum_b sa * asum * offset``, no product
of FP8 integers) is a rank-NB product added in fp32 in one pass over the output after the GEMM.

Cost besides the GEMM: one pass writing the e4m3 weight operand (1 byte per weight: half the
dequant path's pass) and one over the quantized activation.  Whether the block-scaled FP8 GEMM
beats cuBLAS FP16 by enough is a measurement (``bench_gemm.py``, M > 64: column ``fp8-block``, and
the peer column ``FP8 1x128`` for cuBLAS's GEMM alone); ``cometq.ops`` offers the route to the
large-M tuner only after it has checked the route's output against the integer route on the same
case.

    K' order of both operands (NB blocks, n8 of them INT8, here blocks 0 and 3):
      | blk 0 hi | blk 1 | blk 2 | blk 3 hi | ... | blk NB-1 | blk 0 lo | blk 3 lo |
      scale:  16 sa      sa      sa     16 sa            sa        sa         sa
      weights: W blk 0 | W blk 1 | ...                         | W blk 0  | W blk 3  |
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from cometq.layout import fp8_block_sources

from ._common import derived, unpack_hi, unpack_lo
from .dequant_gemm import _row_tile, block_values

__all__ = ["fp8_act_operand", "fp8_weight_operand", "fp8_epilogue", "fp8_gemm_out_dtype", "scaled_mm_block", "w4ax_gemm_fp8",
           "fp8_route_unavailable", "FP8_ROUTE_ENV"]

#: ``COMETQ_FP8_ROUTE=0``: never offer the fp8 route (the large-M tuner keeps split / fused)
FP8_ROUTE_ENV = "COMETQ_FP8_ROUTE"


@triton.jit
def e4m3_int_code(v):
    """int32 integers in [-8, 16] -> their float8_e4m3fn bytes (uint8), by arithmetic (no table
    gather): sign | (e + 7) << 3 | mantissa, e = floor(log2 |v|); 0 -> 0."""
    a = tl.abs(v)
    e = (a >= 2).to(tl.int32) + (a >= 4).to(tl.int32) + (a >= 8).to(tl.int32) + (a >= 16).to(tl.int32)
    code = ((v < 0).to(tl.int32) << 7) | ((e + 7) << 3) | (((a << 3) >> e) & 7)
    return tl.where(a == 0, 0, code).to(tl.uint8)


@triton.jit
def fp8_act_operand_kernel(q4_ptr, q8_ptr, as_ptr, bits_ptr, slot_ptr, src_ptr, out_ptr, sa_ptr, xs_ptr, M, NB,
                           stride_q4m, stride_q8m, stride_asm, stride_om, stride_saj,
                           BLOCK_M: tl.constexpr, CLASS_MODE: tl.constexpr, ASYM: tl.constexpr):
    """FP8 block ``j`` (axis 1) of ``BLOCK_M`` tokens: the e4m3 bytes of activation block
    ``src[j]`` (INT4 values; INT8 hi digits for j < NB, lo digits after) in the half-split order,
    and its scale into the block-major ``sa [NB', M]`` (x16 for hi digits).  ``ASYM``: also the
    offset term's ``xs[m, b] = scale * sum of the block's integers`` (``[M, NB]``, j < NB)."""
    mm, rm64, j = _row_tile(BLOCK_M, M)
    b = tl.load(src_ptr + j)
    ev8, od8, s, bits = block_values(q4_ptr, q8_ptr, as_ptr, bits_ptr, slot_ptr, b, rm64, mm, stride_q4m, stride_q8m,
                                     stride_asm, CLASS_MODE)
    ev = ev8.to(tl.int32)  # even channels
    od = od8.to(tl.int32)
    if ASYM:
        if j < NB:  # (exact integer sum, then one fp32 multiply: the reference's fp8_offset_operands)
            tl.store(xs_ptr + rm64 * NB + b, s * tl.sum(ev + od, axis=1).to(tl.float32), mask=mm)
    if bits == 8:
        if j < NB:  # hi digit (arithmetic shift: -8..7), 16x the scale (exact)
            ev = ev >> 4
            od = od >> 4
            s = s * 16.0
        else:  # lo digit, 0..15
            ev = ev & 15
            od = od & 15
    k = tl.arange(0, 64)
    dst = out_ptr + rm64[:, None] * stride_om + j * 128 + k[None, :]
    tl.store(dst, e4m3_int_code(ev), mask=mm[:, None])
    tl.store(dst + 64, e4m3_int_code(od), mask=mm[:, None])
    tl.store(sa_ptr + j * stride_saj + rm64, s, mask=mm)


@triton.jit
def fp8_weight_operand_kernel(qw_ptr, ws_ptr, src_ptr, out_ptr, sb_ptr, N, GROUP,
                              stride_wn, stride_wb, stride_wsn, stride_w8n, BLOCK_N: tl.constexpr):
    """FP8 block ``j`` (axis 1) of ``BLOCK_N`` weight rows: the e4m3 bytes of weight block
    ``src[j]`` in the half-split order, and its group's scale into the block-major ``sb [NB', N]``
    (groups span whole blocks: one scale per row and block)."""
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = r < N
    rn64 = r.to(tl.int64)
    j = tl.program_id(1)
    b = tl.load(src_ptr + j)
    k = tl.arange(0, 64)
    # (both weight strides are multiples of 64 bytes -- K_pad / 2 or 64 per row, 64 or N * 64 per
    # block: said so, the compiler moves each 64-byte piece in 16-byte vectors, not byte by byte)
    off = tl.multiple_of(rn64 * stride_wn + b * stride_wb, 64)
    p = tl.load(qw_ptr + off[:, None] + k[None, :], mask=nm[:, None], other=0)
    dst = out_ptr + tl.multiple_of(rn64 * stride_w8n + j * 128, 64)[:, None] + k[None, :]  # (rows of 128 NB' bytes)
    tl.store(dst, e4m3_int_code(unpack_lo(p).to(tl.int32)), mask=nm[:, None])
    tl.store(dst + 64, e4m3_int_code(unpack_hi(p).to(tl.int32)), mask=nm[:, None])
    sc = tl.load(ws_ptr + rn64 * stride_wsn + (b * 128) // GROUP, mask=nm, other=0.0)
    tl.store(sb_ptr + j * N + rn64, sc, mask=nm)


@triton.jit
def fp8_epilogue_kernel(y_ptr, out_ptr, xs_ptr, wo_ptr, bias_ptr, M, N, NB, GROUP, stride_ym, stride_om, stride_won,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB_P2: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """``out[m, n] = y[m, n] (+ sum_b xs[m, b] * offset[n, group(b)]) (+ bias[n])``, one
    ``BLOCK_M x BLOCK_N`` tile of the FP8 GEMM's output per program, in fp32 with one rounding to
    out's dtype (``out`` may be ``y``: in place).  ``HAS_OFFSETS``: an asymmetric weight's offset
    term (a rank-NB product, K = NB <= a few hundred; ``PRECISION`` "ieee" / "tf32x3": ~fp32
    products on tensor cores), added in the pass the output needs anyway; without it the pass
    only converts (a bf16 GEMM output into fp16, where cuBLAS has no fp16 one) and adds the bias."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, nm = rm < M, rn < N
    msk = mm[:, None] & nm[None, :]
    acc = tl.load(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], mask=msk, other=0.0).to(tl.float32)
    if HAS_OFFSETS:
        b = tl.arange(0, NB_P2)
        bm = b < NB
        xs = tl.load(xs_ptr + rm.to(tl.int64)[:, None] * NB + b[None, :], mask=mm[:, None] & bm[None, :], other=0.0)
        ob = tl.load(wo_ptr + rn.to(tl.int64)[None, :] * stride_won + ((b * 128) // GROUP)[:, None],
                     mask=bm[:, None] & nm[None, :], other=0.0)
        acc = tl.dot(xs, ob, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=msk)


def _sources(block_bits: torch.Tensor) -> torch.Tensor:
    return derived(block_bits, "fp8_gemm.sources", fp8_block_sources)


def fp8_act_operand(q4, q8, a_scales, block_bits, scale_mode: str, offset_term: bool = False,
                    pad_rows_to: int = 1):
    """``(a8 uint8 [M', 128 NB'], sa float32 [NB', M'], xs)``: the FP8 block form of a quantized
    activation (``quantize_act``'s ``q4, q8, scales``), bit for bit
    :func:`cometq.reference.fp8_block_operands`'s; ``xs`` float32 ``[M, NB]`` (the offset term's
    activation side, :func:`cometq.reference.fp8_offset_operands`) when ``offset_term``, else None.
    ``M'``: M rounded up to ``pad_rows_to``, the extra rows zero (bytes and scales)."""
    from .act_quant import block_tables

    m = a_scales.shape[0]
    mp = -(-m // pad_rows_to) * pad_rows_to
    nb = block_bits.numel()
    src = _sources(block_bits)
    nbp = src.numel()
    a8 = torch.empty(mp, nbp * 128, dtype=torch.uint8, device=a_scales.device)
    sa = torch.empty(nbp, mp, dtype=torch.float32, device=a_scales.device)
    if mp > m:
        a8[m:].zero_()
        sa[:, m:].zero_()
    xs = torch.empty(m, nb, dtype=torch.float32, device=a_scales.device) if offset_term else None
    if m and nbp:
        bits, slots = block_tables(block_bits)
        bm = 32
        fp8_act_operand_kernel[(triton.cdiv(m, bm), nbp)](
            q4, q8, a_scales, bits, slots, src, a8, sa, xs if offset_term else sa, m, nb,
            q4.stride(0) if q4.numel() else 0, q8.stride(0) if q8.numel() else 0, a_scales.stride(0), a8.stride(0),
            sa.stride(0), BLOCK_M=bm, CLASS_MODE=scale_mode == "class", ASYM=offset_term, num_warps=4)
    return a8, sa, xs


def fp8_epilogue(y, out_dtype: torch.dtype, xs=None, w_offsets=None, group: int = 128, bias=None) -> torch.Tensor:
    """``y (+ xs @ offsets_by_block^T) (+ bias)`` as ``out_dtype`` in one pass
    (:func:`fp8_epilogue_kernel`): in place when ``y`` already has that dtype.  ``xs`` float32
    ``[M, NB]`` from :func:`fp8_act_operand`, ``w_offsets`` float32 ``[N, K_pad / group]`` (both or
    neither)."""
    from ._common import interpreting

    if (xs is None) != (w_offsets is None):
        raise ValueError("fp8_epilogue: xs and w_offsets come together (the offset term), got one of them")
    m, n = y.shape
    out = y if y.dtype == out_dtype else torch.empty(m, n, dtype=out_dtype, device=y.device)
    nb = xs.shape[1] if xs is not None else 0
    if m and n and (xs is not None or bias is not None or out is not y):
        bm, bn = 64, 64
        fp8_epilogue_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            y, out, xs if xs is not None else y, w_offsets if w_offsets is not None else y,
            bias if bias is not None else y, m, n, nb, group, y.stride(0), out.stride(0),
            w_offsets.stride(0) if w_offsets is not None else 0,
            BLOCK_M=bm, BLOCK_N=bn, NB_P2=max(16, triton.next_power_of_2(nb)), HAS_OFFSETS=xs is not None,
            HAS_BIAS=bias is not None, PRECISION="ieee" if interpreting() else "tf32x3", num_warps=4)
    return out


def fp8_weight_operand(qweight, w_scales, block_bits, group: int, stride_wb: Optional[int] = None):
    """``(w8 uint8 [N, 128 NB'], sb float32 [NB', N])``: the FP8 block form of INT4 weights
    (``qweight [N, K_pad/2]`` or its block-major view; ``group`` the resolved group width, a
    multiple of 128; an asymmetric weight's offsets are not part of it: :func:`fp8_epilogue`),
    bit for bit :func:`cometq.reference.fp8_block_operands`'s."""
    if group % 128:
        raise ValueError(f"the FP8 block form needs weight groups of whole 128-channel blocks, got group={group}")
    if stride_wb is None:
        stride_wb = qweight.stride(1) if qweight.dim() == 3 else 64
    n = qweight.shape[0]
    src = _sources(block_bits)
    nbp = src.numel()
    w8 = torch.empty(n, nbp * 128, dtype=torch.uint8, device=qweight.device)
    sb = torch.empty(nbp, n, dtype=torch.float32, device=qweight.device)
    if n and nbp:
        bn = 64
        fp8_weight_operand_kernel[(triton.cdiv(n, bn), nbp)](
            qweight, w_scales, src, w8, sb, n, group, qweight.stride(0), stride_wb, w_scales.stride(0), w8.stride(0),
            BLOCK_N=bn, num_warps=4)
    return w8, sb


def _recipe_1x128():
    """torch's enum member for 1x128 block scaling, whatever this torch calls it (the C enum of
    torch 2.11 / 2.13: ``BlockWise1x128``; the earlier Python enum of the same values: ``Blockwise_1x128``)."""
    st = torch.nn.functional.ScalingType
    for name, member in st.__members__.items():
        if name.replace("_", "").lower() == "blockwise1x128":
            return member
    raise AttributeError(f"torch.nn.functional.ScalingType has no 1x128 block recipe: {list(st.__members__)}")


def _call_v2(a, b, sa, sb, out_dtype):
    # torch.nn.functional.scaled_mm (recipes named): both scales [rows, NB'], strides (1, rows)
    st = _recipe_1x128()
    return torch.nn.functional.scaled_mm(a, b, sa.t(), st, sb.t(), st, output_dtype=out_dtype)


def _call_v1_kn(a, b, sa, sb, out_dtype):
    # torch._scaled_mm (recipes from the scale shapes): scale_b as [NB', N] (N contiguous)
    return torch._scaled_mm(a, b, scale_a=sa.t(), scale_b=sb, out_dtype=out_dtype)


def _call_v1_nk(a, b, sa, sb, out_dtype):
    # torch._scaled_mm with scale_b as the [N, NB'] view (strides (1, N))
    return torch._scaled_mm(a, b, scale_a=sa.t(), scale_b=sb.t(), out_dtype=out_dtype)


#: the ways torch versions spell the 1x128 x 1x128 call (the probe keeps the first that computes
#: the right thing on the device; torch 2.11's exact convention is not documented for this pair)
_CALLS = {"v2": _call_v2, "v1-kn": _call_v1_kn, "v1-nk": _call_v1_nk}
_CALL_OF: dict = {}


def scaled_mm_block(a8, sa, w8, sb, out_dtype: torch.dtype) -> torch.Tensor:
    """``y [M, N] = sum_j sa[j, m] sb[j, n] (A8[m, block j] . W8[n, block j])`` by cuBLAS's 1x128 x
    1x128 block-scaled FP8 GEMM (sm_90; torch's ``scaled_mm`` / ``_scaled_mm``).  The scales are
    passed as views of the block-major buffers, ``[M, NB']`` with strides ``(1, M)`` (the
    "outer-dim-major" layout block scales are read in), in the call convention the device's probe
    found to work (:func:`fp8_route_unavailable`; before any probe: ``scaled_mm`` where torch has it)."""
    a = a8.view(torch.float8_e4m3fn)
    b = w8.view(torch.float8_e4m3fn).t()  # [K', N], column-major
    name = _CALL_OF.get(a8.device, "v2" if hasattr(torch.nn.functional, "scaled_mm") else "v1-kn")
    return _CALLS[name](a, b, sa, sb, out_dtype)


def w4ax_gemm_fp8(q4, q8, a_scales, block_bits, qweight, w_scales, group: int, bias, out_dtype: torch.dtype,
                  scale_mode: str, stride_wb: Optional[int] = None, w_offsets: Optional[torch.Tensor] = None):
    """The W4Ax GEMM (weight groups of whole blocks) on the FP8 route: both operands in the FP8
    block form, cuBLAS's block-scaled FP8 GEMM into ``out_dtype``; an asymmetric weight's offset
    term and the bias added in one pass over the output after (:func:`fp8_epilogue`), which also
    converts a bf16 GEMM output to fp16 where the device's cuBLAS has no fp16 output for this GEMM
    (:func:`fp8_gemm_out_dtype`)."""
    # (rows padded to a multiple of 4: torch wants the scales' [M, NB'] view with strides exactly
    # (1, M), and cuBLAS 16-byte aligned scale columns -- zero rows, sliced off after)
    a8, sa, xs = fp8_act_operand(q4, q8, a_scales, block_bits, scale_mode, offset_term=w_offsets is not None,
                                 pad_rows_to=4)
    w8, sb = fp8_weight_operand(qweight, w_scales, block_bits, group, stride_wb)
    gemm_dtype = fp8_gemm_out_dtype(a8.device, out_dtype)
    y = scaled_mm_block(a8, sa, w8, sb, gemm_dtype)[: a_scales.shape[0]]
    if w_offsets is not None or gemm_dtype != out_dtype:
        return fp8_epilogue(y, out_dtype, xs, w_offsets, group, bias)
    if bias is not None:
        y += bias.to(y.dtype)
    return y


#: per device: why the block-scaled FP8 GEMM cannot serve the route there (None: it can)
_UNAVAILABLE: dict = {}
#: per device (probed): why the GEMM cannot write fp16 there (None: it can).  torch's own tests of
#: the block-scaled GEMM cover bf16 and fp32 outputs only; where fp16 fails, fp16 outputs are
#: computed as bf16 and converted in the epilogue pass (one more rounding: 2^-9 relative)
_FP16_VIA_BF16: dict = {}


def _index(device) -> int:
    device = torch.device(device)
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0


def fp8_gemm_out_dtype(device, out_dtype: torch.dtype) -> torch.dtype:
    """The output dtype to ask the block-scaled FP8 GEMM for on ``device``: ``out_dtype``, except
    fp16 where the device's probe found the GEMM unable to write fp16 (then bf16, converted to
    fp16 by :func:`fp8_epilogue`)."""
    if out_dtype != torch.float16 or torch.device(device).type != "cuda":
        return out_dtype
    return torch.bfloat16 if _FP16_VIA_BF16.get(_index(device)) else out_dtype


def _fp16_output_problem(dev, want) -> Optional[str]:
    """None if the GEMM (in the spelling just found) writes fp16 matching the emulation, else why not."""
    try:
        got = scaled_mm_block(*dev, torch.float16).double().cpu()
    except Exception as e:  # noqa: BLE001 - the reason is the result
        return f"{type(e).__name__}: {str(e)[:160]}"
    err = float((got - want).abs().max())
    if not err <= 2e-3 * float(want.abs().max()):
        return f"fp16 output disagrees with the emulation (max error {err:.3g})"
    return None


def fp8_route_unavailable(device) -> Optional[str]:
    """None if the fp8 route can run on ``device``, else why not: not a CUDA device of compute
    capability 9.0 (cuBLAS's 1x128 block scaling is Hopper's), ``COMETQ_FP8_ROUTE=0``, or the
    GEMM failed or disagreed with :func:`cometq.reference.fp8_block_mm` on a small probe (run
    once per device)."""
    import os

    if os.environ.get(FP8_ROUTE_ENV, "1") == "0":
        return f"{FP8_ROUTE_ENV}=0"
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    key = _index(device)
    if key in _UNAVAILABLE:
        return _UNAVAILABLE[key]
    why = None
    if torch.cuda.get_device_capability(device) != (9, 0):
        why = f"compute capability {torch.cuda.get_device_capability(device)} (block-scaled FP8 GEMM: 9.0)"
    else:
        why = _probe(device)
    _UNAVAILABLE[key] = why
    return why


def _probe(device) -> Optional[str]:
    """One small block-scaled GEMM on random integer operands (distinct scales per block, row and
    column, so a transposed or mis-strided scale cannot pass) vs the float64 emulation, in each
    call convention until one agrees; None and that convention kept, or every failure."""
    from cometq.layout import fp8_e4m3_int_codes
    from cometq.reference import fp8_block_mm

    g = torch.Generator().manual_seed(0)
    m, n, nbp = 64, 128, 3
    codes = fp8_e4m3_int_codes()
    a8 = codes[torch.randint(0, 25, (m, nbp * 128), generator=g)]
    w8 = codes[torch.randint(0, 16, (n, nbp * 128), generator=g)]
    sa = torch.rand(nbp, m, generator=g) + 0.5
    sb = torch.rand(nbp, n, generator=g) + 0.5
    want = fp8_block_mm(a8, sa, w8, sb)
    dev = (a8.to(device), sa.to(device), w8.to(device), sb.to(device))
    fails = []
    for name in _CALLS:
        _CALL_OF[dev[0].device] = name
        try:  # (bf16 out: what every FP8 GEMM of torch supports; 2^-8 relative rounding)
            got = scaled_mm_block(*dev, torch.bfloat16).double().cpu()
        except Exception as e:  # noqa: BLE001 - the reason is the result
            fails.append(f"{name}: {type(e).__name__}: {str(e)[:160]}")
            continue
        err = float((got - want).abs().max())
        if err <= 8e-3 * float(want.abs().max()):
            _FP16_VIA_BF16[_index(device)] = _fp16_output_problem(dev, want)
            return None
        fails.append(f"{name}: disagrees with the emulation (max error {err:.3g})")
    _CALL_OF.pop(dev[0].device, None)
    return "block-scaled FP8 GEMM unusable: " + "; ".join(fails)
