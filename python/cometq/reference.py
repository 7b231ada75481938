"""Pure-torch reference ops: the numerical source of truth of cometq.

Every kernel (Triton, CUDA) is tested against these functions: integer results
exactly, float results within the tolerances named in ``cometq.testing``.  They
run on any device torch runs on (CPU included) and favour clarity over speed.

Conventions (the formats themselves are owned by :mod:`cometq.layout`):

* Quantization is symmetric for weights and activations: ``scale = absmax / qmax``
  and ``q = clamp(round(x / scale), -qmax, qmax)``, computed in float32 with an
  IEEE division and round-half-to-even (``torch.round``).  A group whose absmax
  is 0 gets scale 0 and q = 0.
* KV4 is asymmetric: ``scale = (max - min) / 15`` and ``zero = min``, both stored
  in float16; ``q = clamp(round((x - zero) / scale), 0, 15)`` computed with the
  float16-rounded scale and zero (so dequantization ``q * scale + zero`` sees the
  same numbers the quantizer used).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .layout import (
    BLOCK_K,
    FP8_INT_MIN,
    INT4_QMAX,
    INT8_QMAX,
    SCALE_MODES,
    UINT4_MAX,
    ActivationLayout,
    check_tensor,
    fp8_block_sources,
    fp8_e4m3_int_codes,
    half_split_blocks,
    num_blocks,
    pack_int4,
    pack_uint4,
    pad_last_dim,
    padded_k,
    unpack_int4,
    unpack_uint4,
)

__all__ = [
    "FLOAT_DTYPES",
    "QuantizedWeight",
    "QuantizedActivation",
    "KV4Tensor",
    "check_group_size",
    "quantize_weight_rtn",
    "dequantize_weight",
    "quantize_activation_blocks",
    "quantize_activation",
    "dequantize_activation",
    "w4ax_int_accumulators",
    "w4ax_segment_scales",
    "w4ax_gemm",
    "w4ax_linear",
    "fp8_block_applies",
    "fp8_block_operands",
    "fp8_offset_operands",
    "fp8_block_mm",
    "fmpq_calibrate",
    "quantize_kv4",
    "dequantize_kv4",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _div_const(x: torch.Tensor, d: float) -> torch.Tensor:
    """``x / d`` as a true IEEE division on every device.

    Dividing by a Python number lets torch's CUDA kernels multiply by the
    reciprocal instead (one ulp off); the spec is a real division, so divide by a
    tensor holding ``d``.
    """
    return x / torch.full_like(x, float(d))


def _safe_div(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x / s with s == 0 treated as 1 (its group is all zeros, so q = 0 either way)."""
    return x / torch.where(s == 0, torch.ones_like(s), s)


# ==========================================================================
# weights: INT4 symmetric, per output channel or per group of input channels
# ==========================================================================
def check_group_size(group_size: Optional[int], k_pad: int) -> int:
    """Validate ``group_size`` and return the effective group width for rows of ``k_pad``.

    ``None`` or ``-1`` means per output channel (one group spans the padded row).
    Otherwise a power of two >= 16 that divides ``BLOCK_K`` (16/32/64/128) or a
    multiple of ``BLOCK_K`` that divides ``k_pad``; that keeps a group inside one
    activation block, or a whole number of blocks inside one group, which is
    what lets kernels apply both scales at block boundaries.
    """
    if group_size is None or group_size == -1:
        return k_pad
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int or None, got {group_size!r}")
    ok_small = group_size >= 16 and BLOCK_K % group_size == 0 and (group_size & (group_size - 1)) == 0
    ok_large = group_size % BLOCK_K == 0 and group_size > 0 and k_pad % group_size == 0
    if not (ok_small or ok_large):
        raise ValueError(
            f"group_size={group_size} is not supported for K_pad={k_pad}: use -1/None (per channel), "
            f"16, 32, 64, 128, or a multiple of {BLOCK_K} that divides K_pad"
        )
    return group_size


@dataclass(eq=False)
class QuantizedWeight:
    """An INT4 weight: ``qweight`` uint8 ``[N, K_pad/2]`` (see layout.pack_int4),
    ``scales`` float32 ``[N, K_pad/G]`` (``G = K_pad`` per channel) and, for the
    asymmetric format, ``offsets`` float32 ``[N, K_pad/G]``.

    * symmetric (``offsets is None``): ``w = scale * q``, q in [-7, 7] from the
      quantizers here (kernels accept -8);
    * asymmetric: ``w = scale * q + offset``, q in [-8, 7] (all 16 levels; the
      GGUF Q4_1 / AWQ-style "min + scale" grid with the min folded into the
      offset: ``offset = min + 8 * scale``).  The GEMM adds
      ``offset[n, g] * sum_{k in g} x[m, k]`` per group (see :func:`w4ax_gemm`).

    Columns are in the layer's permuted order (the FMPQ permutation is folded in
    before quantization); the stored integers of columns ``K..K_pad`` are zero
    (they meet zero activations, so their offset never contributes).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    in_features: int
    group_size: int = -1
    offsets: Optional[torch.Tensor] = None

    def __post_init__(self):
        check_tensor("qweight", self.qweight, dtypes=(torch.uint8,), ndim=2)
        check_tensor("scales", self.scales, dtypes=(torch.float32,), ndim=2)
        k_pad = padded_k(self.in_features)
        if self.qweight.shape[1] * 2 != k_pad:
            raise ValueError(
                f"qweight shape {tuple(self.qweight.shape)} does not hold K_pad={k_pad} "
                f"packed columns (in_features={self.in_features})"
            )
        g = check_group_size(self.group_size, k_pad)
        want = (self.qweight.shape[0], k_pad // g)
        if tuple(self.scales.shape) != want:
            raise ValueError(f"scales shape {tuple(self.scales.shape)} != expected {want} for group_size={self.group_size}")
        if self.scales.device != self.qweight.device:
            raise ValueError(f"scales on {self.scales.device} but qweight on {self.qweight.device}")
        if self.offsets is not None:
            check_tensor("offsets", self.offsets, dtypes=(torch.float32,), ndim=2)
            if tuple(self.offsets.shape) != want:
                raise ValueError(
                    f"offsets shape {tuple(self.offsets.shape)} != scales shape {want} for group_size={self.group_size}"
                )
            if self.offsets.device != self.qweight.device:
                raise ValueError(f"offsets on {self.offsets.device} but qweight on {self.qweight.device}")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def k_pad(self) -> int:
        return padded_k(self.in_features)

    @property
    def group_width(self) -> int:
        return check_group_size(self.group_size, self.k_pad)

    @property
    def asymmetric(self) -> bool:
        return self.offsets is not None

    def to(self, device) -> "QuantizedWeight":
        off = None if self.offsets is None else self.offsets.to(device)
        return QuantizedWeight(self.qweight.to(device), self.scales.to(device), self.in_features, self.group_size, off)


def quantize_weight_rtn(
    w: torch.Tensor,
    group_size: Optional[int] = 128,
    *,
    clip_ratio: float = 1.0,
    sym: bool = True,
) -> QuantizedWeight:
    """Round-to-nearest INT4 quantization of ``w [N, K]`` (already in the layer's
    permuted column order).

    ``sym=True``: ``scale = absmax * clip_ratio / 7``, q in [-7, 7].
    ``sym=False`` (asymmetric): per group ``scale = (max - min) * clip_ratio / 15``
    over the group's real columns (the range shrinks about its centre when
    ``clip_ratio < 1``), ``q = clamp(round((w - lo) / scale), 0, 15) - 8`` and
    ``offset = lo + 8 * scale``.  Values beyond the clipped range saturate.
    """
    check_tensor("weight", w, dtypes=FLOAT_DTYPES, ndim=2)
    if not (0.0 < float(clip_ratio) <= 1.0):
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(w.shape)}")
    k_pad = padded_k(k)
    g = check_group_size(group_size, k_pad)
    gs = -1 if group_size is None else group_size
    wp = pad_last_dim(w.float(), k_pad).view(n, k_pad // g, g)
    if sym:
        absmax = wp.abs().amax(dim=-1)
        scales = _div_const(absmax * float(clip_ratio), INT4_QMAX)
        q = torch.round(_safe_div(wp, scales[..., None])).clamp_(-INT4_QMAX, INT4_QMAX)
        qweight = pack_int4(q.view(n, k_pad).to(torch.int8))
        return QuantizedWeight(qweight, scales.contiguous(), k, gs)
    scales, offsets = asym_group_params(wp, real_columns_mask(k, k_pad, g, w.device), clip_ratio)
    q = asym_round(wp, scales[..., None], offsets[..., None])
    q = q.view(n, k_pad)
    q[:, k:] = 0
    return QuantizedWeight(pack_int4(q.to(torch.int8)), scales.contiguous(), k, gs, offsets.contiguous())


def real_columns_mask(k: int, k_pad: int, g: int, device) -> torch.Tensor:
    """bool ``[K_pad/G, G]``: which columns of each group are real (not padding)."""
    return (torch.arange(k_pad, device=device) < k).view(k_pad // g, g)


def asym_group_params(wg: torch.Tensor, real: torch.Tensor, clip_ratio: float = 1.0):
    """Asymmetric (scale, offset) of groups ``wg [..., G]`` over the columns where
    ``real [G]`` (or broadcastable) is True.  Groups with no real column or a
    constant value get scale 0 (or the value's exactness: offset = the value)."""
    big = torch.finfo(torch.float32).max
    lo = torch.where(real, wg, big).amin(dim=-1)
    hi = torch.where(real, wg, -big).amax(dim=-1)
    empty = lo > hi
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    if float(clip_ratio) != 1.0:
        mid = (hi + lo) * 0.5
        half = (hi - lo) * (0.5 * float(clip_ratio))
        lo, hi = mid - half, mid + half
    scales = _div_const(hi - lo, UINT4_MAX)
    offsets = lo + 8.0 * scales
    return scales, offsets


def asym_round(w: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Asymmetric INT4 integers (float, in [-8, 7]) of ``w`` for broadcastable scales/offsets."""
    lo = offsets - 8.0 * scales
    return (torch.round(_safe_div(w - lo, scales)).clamp_(0, UINT4_MAX) - 8.0)


def weight_scales_per_column(qw: QuantizedWeight) -> torch.Tensor:
    """float32 ``[N, K_pad]``: the scale that applies to each stored weight element."""
    return qw.scales.repeat_interleave(qw.group_width, dim=1)


def dequantize_weight(qw: QuantizedWeight, *, trim: bool = True) -> torch.Tensor:
    """float32 ``[N, K]`` (``[N, K_pad]`` if ``trim=False``) in the permuted column order.

    Asymmetric padding columns (``K..K_pad``) dequantize to their group's offset:
    they only ever meet zero activations."""
    w = unpack_int4(qw.qweight).float() * weight_scales_per_column(qw)
    if qw.offsets is not None:
        w = w + qw.offsets.repeat_interleave(qw.group_width, dim=1)
    return w[:, : qw.in_features] if trim else w


# ==========================================================================
# activations: FMPQ, per-token symmetric, INT4/INT8 per 128-channel block
# ==========================================================================
@dataclass(eq=False)
class QuantizedActivation:
    """Packed mixed-precision activations of ``M`` tokens.

    * ``q4``: uint8 ``[M, n_int4 * 64]``: the INT4 blocks in ascending block order,
      each 128 values packed with :func:`~cometq.layout.pack_int4`.
    * ``q8``: int8 ``[M, n_int8 * 128]``: the INT8 blocks in ascending block order.
    * ``scales``: float32, ``[M, n_blocks]`` ("block" mode) or ``[M, 2]`` ("class"
      mode: column 0 the INT4 class, column 1 the INT8 class).
    """

    q4: torch.Tensor
    q8: torch.Tensor
    scales: torch.Tensor
    layout: ActivationLayout
    scale_mode: str = "block"

    def __post_init__(self):
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        check_tensor("q4", self.q4, dtypes=(torch.uint8,), ndim=2)
        check_tensor("q8", self.q8, dtypes=(torch.int8,), ndim=2)
        check_tensor("scales", self.scales, dtypes=(torch.float32,), ndim=2)
        m = self.scales.shape[0]
        lay = self.layout
        if tuple(self.q4.shape) != (m, lay.n_int4 * BLOCK_K // 2):
            raise ValueError(f"q4 shape {tuple(self.q4.shape)} != {(m, lay.n_int4 * BLOCK_K // 2)} for {lay}")
        if tuple(self.q8.shape) != (m, lay.n_int8 * BLOCK_K):
            raise ValueError(f"q8 shape {tuple(self.q8.shape)} != {(m, lay.n_int8 * BLOCK_K)} for {lay}")
        ns = lay.n_blocks if self.scale_mode == "block" else 2
        if self.scales.shape[1] != ns:
            raise ValueError(f"scales shape {tuple(self.scales.shape)} needs {ns} columns in {self.scale_mode!r} mode")

    @property
    def m(self) -> int:
        return self.scales.shape[0]

    def block_scales(self) -> torch.Tensor:
        """float32 ``[M, n_blocks]``: the scale of every block (expands class mode)."""
        if self.scale_mode == "block":
            return self.scales
        is8 = (self.layout.block_bits == 8).long().to(self.scales.device)
        return self.scales[:, is8]

    def int_blocks(self) -> torch.Tensor:
        """int8 ``[M, K_pad]``: the integer values of every block, in block order."""
        lay = self.layout
        out = torch.empty(self.m, lay.n_blocks, BLOCK_K, dtype=torch.int8, device=self.q4.device)
        if lay.n_int4:
            out[:, lay.int4_blocks.to(out.device)] = unpack_int4(self.q4).view(self.m, lay.n_int4, BLOCK_K)
        if lay.n_int8:
            out[:, lay.int8_blocks.to(out.device)] = self.q8.view(self.m, lay.n_int8, BLOCK_K)
        return out.view(self.m, lay.k_pad)


def quantize_activation_blocks(x: torch.Tensor, layout: ActivationLayout, scale_mode: str = "block"):
    """The quantization step of :func:`quantize_activation`, before packing.

    Returns ``(q, scales, block_scales)``: ``q`` float32 ``[M, n_blocks, 128]`` holding
    the integers, ``scales`` as stored (see :class:`QuantizedActivation`), and
    ``block_scales`` float32 ``[M, n_blocks]``.  Shared by the packer below and by
    fake-quantization paths (e.g. ``cometq.nn``'s CPU fast path), so the numerics
    exist once.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    if not isinstance(layout, ActivationLayout):
        raise TypeError(f"layout must be an ActivationLayout, got {type(layout).__name__}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    m, k = x.shape
    if k != layout.in_features:
        raise ValueError(f"x has K={k} channels (shape {tuple(x.shape)}) but the layout has K={layout.in_features}")
    if layout.perm.device != x.device:
        raise ValueError(f"layout is on {layout.perm.device} but x is on {x.device}")
    nb = layout.n_blocks
    xp = x.float()
    if not layout.is_identity_perm:
        xp = xp[:, layout.perm]
    xb = pad_last_dim(xp, layout.k_pad).view(m, nb, BLOCK_K)
    absmax = xb.abs().amax(dim=-1)  # [M, nb]
    is8 = layout.block_bits == 8
    qmax = torch.where(is8, INT8_QMAX, INT4_QMAX).to(torch.float32)  # [nb]
    clip = layout.int4_clip
    if scale_mode == "block":
        if clip != 1.0:  # INT4 blocks: (absmax * clip) / 7; INT8 blocks untouched
            absmax = torch.where(is8, absmax, absmax * clip)
        scales = absmax / qmax
        bscale = scales
    else:
        zero = torch.zeros(m, device=x.device)
        a4 = absmax[:, ~is8].amax(dim=1) if layout.n_int4 else zero
        if clip != 1.0:
            a4 = a4 * clip
        a8 = absmax[:, is8].amax(dim=1) if layout.n_int8 else zero
        scales = torch.stack((_div_const(a4, INT4_QMAX), _div_const(a8, INT8_QMAX)), dim=1)
        bscale = scales[:, is8.long()]
    q = torch.round(_safe_div(xb, bscale[..., None]))
    q = torch.maximum(torch.minimum(q, qmax[:, None]), -qmax[:, None])
    return q, scales, bscale


def quantize_activation(
    x: torch.Tensor, layout: ActivationLayout, scale_mode: str = "block"
) -> QuantizedActivation:
    """Permute, cut into 128-channel blocks, quantize each block to its precision, pack.

    ``x`` is ``[M, K]`` (fp16/bf16/fp32), in the layer's *original* channel order.
    """
    q, scales, _ = quantize_activation_blocks(x, layout, scale_mode)
    m = q.shape[0]
    is8 = layout.block_bits == 8
    q = q.to(torch.int8)
    q4 = pack_int4(q[:, ~is8].reshape(m, layout.n_int4 * BLOCK_K))
    q8 = q[:, is8].reshape(m, layout.n_int8 * BLOCK_K).contiguous()
    return QuantizedActivation(q4, q8, scales.contiguous(), layout, scale_mode)


def dequantize_activation(qa: QuantizedActivation, *, original_order: bool = False) -> torch.Tensor:
    """float32 ``[M, K_pad]`` in permuted order, or ``[M, K]`` in the original order."""
    lay = qa.layout
    x = qa.int_blocks().float().view(qa.m, lay.n_blocks, BLOCK_K) * qa.block_scales()[..., None]
    x = x.view(qa.m, lay.k_pad)
    if not original_order:
        return x
    out = torch.empty(qa.m, lay.in_features, device=x.device)
    out[:, lay.perm] = x[:, : lay.in_features]
    return out


# ==========================================================================
# the W4Ax GEMM: y = x W^T with integer dot products per K segment
# ==========================================================================
def _segment_width(qw: QuantizedWeight) -> int:
    # A segment is the longest run of K over which both the activation scale
    # (per 128-block) and the weight scale (per group) are constant.
    return min(BLOCK_K, qw.group_width)


def _check_gemm_operands(qa: QuantizedActivation, qw: QuantizedWeight) -> None:
    if not isinstance(qa, QuantizedActivation):
        raise TypeError(f"activation must be a QuantizedActivation, got {type(qa).__name__}")
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"weight must be a QuantizedWeight, got {type(qw).__name__}")
    if qa.layout.in_features != qw.in_features:
        raise ValueError(
            f"activation has K={qa.layout.in_features} but weight has K={qw.in_features} "
            f"(qweight shape {tuple(qw.qweight.shape)})"
        )
    if qa.q4.device != qw.qweight.device:
        raise ValueError(f"activation on {qa.q4.device} but weight on {qw.qweight.device}")


def w4ax_int_accumulators(qa: QuantizedActivation, qw: QuantizedWeight) -> torch.Tensor:
    """int32 ``[M, N, S]``: the exact integer dot product of every K segment.

    ``S = K_pad / min(128, G)``.  Every |partial sum| is below 128*127*8 < 2**17, so
    the float64 matmul used here is exact (tests check it against int64).
    """
    _check_gemm_operands(qa, qw)
    seg = _segment_width(qw)
    s = qa.layout.k_pad // seg
    xi = qa.int_blocks().to(torch.float64).view(qa.m, s, seg).transpose(0, 1)  # [S, M, seg]
    wi = unpack_int4(qw.qweight).to(torch.float64).view(qw.out_features, s, seg).permute(1, 2, 0)  # [S, seg, N]
    acc = torch.bmm(xi, wi)  # [S, M, N]
    return acc.permute(1, 2, 0).round().to(torch.int32)


def w4ax_act_sums(qa: QuantizedActivation, qw: QuantizedWeight) -> torch.Tensor:
    """int32 ``[M, S]``: the sum of the activation integers over every K segment
    (what an asymmetric weight's offset multiplies; ``|sum| <= 128 * 127``)."""
    seg = _segment_width(qw)
    s = qa.layout.k_pad // seg
    return qa.int_blocks().to(torch.int32).view(qa.m, s, seg).sum(dim=-1, dtype=torch.int32)


def w4ax_segment_scales(qa: QuantizedActivation, qw: QuantizedWeight):
    """(activation scale ``[M, S]``, weight scale ``[N, S]``) of every K segment."""
    seg = _segment_width(qw)
    a = qa.block_scales().repeat_interleave(BLOCK_K // seg, dim=1)
    w = qw.scales.repeat_interleave(qw.group_width // seg, dim=1)
    return a, w


def w4ax_gemm(
    qa: QuantizedActivation,
    qw: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``y[m, n] = sum_s a_scale[m, s] * (w_scale[n, s] * acc[m, n, s] + w_offset[n, s] * asum[m, s]) (+ bias[n])``.

    ``asum`` (:func:`w4ax_act_sums`) and the offset term only exist for an
    asymmetric weight (``qw.offsets``); the symmetric GEMM is the first term.

    The integer accumulators are exact; the epilogue runs in float64 and the result
    is rounded once to ``out_dtype`` (float64 allowed here, for tests).  This is the
    spec the kernels are held to.
    """
    _check_gemm_operands(qa, qw)
    if out_dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES + (torch.float64,)}, got {out_dtype}")
    n = qw.out_features
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, device=qw.qweight.device)
        if bias.shape[0] != n:
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({n},)")
    seg = _segment_width(qw)
    s = qa.layout.k_pad // seg
    a_sc, w_sc = w4ax_segment_scales(qa, qw)
    xi = qa.int_blocks().to(torch.float64)
    wi = unpack_int4(qw.qweight).to(torch.float64)
    y = torch.zeros(qa.m, n, dtype=torch.float64, device=xi.device)
    off = None
    if qw.offsets is not None:
        off = qw.offsets.repeat_interleave(qw.group_width // seg, dim=1).double()  # [N, S]
        asum = w4ax_act_sums(qa, qw).double()  # [M, S]
    for j in range(s):  # one exact integer matmul per segment, scaled in the epilogue
        sl = slice(j * seg, (j + 1) * seg)
        acc = xi[:, sl] @ wi[:, sl].T
        y += acc * a_sc[:, j, None].double() * w_sc[None, :, j].double()
        if off is not None:
            y += (asum[:, j] * a_sc[:, j].double())[:, None] * off[None, :, j]
    if bias is not None:
        y += bias.double()
    return y.to(out_dtype)


def w4ax_linear(
    x: torch.Tensor,
    qw: QuantizedWeight,
    layout: ActivationLayout,
    bias: Optional[torch.Tensor] = None,
    scale_mode: str = "block",
) -> torch.Tensor:
    """Quantize ``x [..., K]`` with ``layout`` and run :func:`w4ax_gemm`; output in x's dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    lead = x.shape[:-1]
    qa = quantize_activation(x.reshape(-1, x.shape[-1]), layout, scale_mode)
    y = w4ax_gemm(qa, qw, bias, out_dtype=x.dtype)
    return y.view(*lead, qw.out_features)


# ==========================================================================
# the FP8 block form of the W4Ax GEMM (cometq.layout.fp8_block_sources)
# ==========================================================================
def fp8_block_applies(qw: QuantizedWeight) -> Optional[str]:
    """None if the FP8 block form holds ``qw``, else why not: weight groups that span whole
    128-channel blocks (group 128, 256, ... or per channel) -- one weight scale per (row, block),
    what 1x128 block scaling multiplies.  (An asymmetric weight's offset term is no product of
    FP8 integers: :func:`fp8_offset_operands` carries it beside the GEMM.)"""
    if qw.group_width % BLOCK_K:
        return f"weight group {qw.group_width} (not a multiple of {BLOCK_K})"
    return None


def fp8_block_operands(qa: QuantizedActivation, qw: QuantizedWeight):
    """The FP8 block form of a W4Ax product: ``(a8, sa, w8, sb)``.

    ``a8`` uint8 ``[M, 128 nb']`` and ``w8`` uint8 ``[N, 128 nb']``: e4m3 bytes of the integers
    (:func:`cometq.layout.fp8_e4m3_int_codes`), blocks as :func:`cometq.layout.fp8_block_sources`
    says, half-split inside each block; ``sa`` float32 ``[nb', M]`` and ``sb`` float32 ``[nb', N]``:
    the scale of every (block, token) and (block, weight row), block-major (the layout a
    block-scaled GEMM reads: the non-K index contiguous).  INT8 "hi" blocks carry 16x the
    activation scale (exact: a power of two).  ValueError where :func:`fp8_block_applies` says no.
    (An asymmetric weight's offsets are not part of it: :func:`fp8_offset_operands`.)
    """
    _check_gemm_operands(qa, qw)
    why = fp8_block_applies(qw)
    if why is not None:
        raise ValueError(f"the FP8 block form does not hold {why}")
    lay = qa.layout
    src = fp8_block_sources(lay.block_bits).long().to(qa.q4.device)
    nb, m = lay.n_blocks, qa.m
    codes = fp8_e4m3_int_codes(qa.q4.device)
    q = qa.int_blocks().view(m, nb, BLOCK_K)
    is8 = (lay.block_bits == 8).to(q.device)
    a = q[:, src]  # [M, nb', 128]
    a[:, :nb][:, is8] = a[:, :nb][:, is8] >> 4          # INT8 hi digits, -8..7
    a[:, nb:] = a[:, nb:] & 15                           # INT8 lo digits, 0..15
    a8 = codes[half_split_blocks(a.reshape(m, -1)).long() - FP8_INT_MIN]
    sa = qa.block_scales()[:, src].clone()
    sa[:, :nb][:, is8] *= 16.0
    w = unpack_int4(qw.qweight).view(qw.out_features, nb, BLOCK_K)[:, src]
    w8 = codes[half_split_blocks(w.reshape(qw.out_features, -1)).long() - FP8_INT_MIN]
    sb = qw.scales[:, (src * BLOCK_K) // qw.group_width]
    return a8.contiguous(), sa.t().contiguous(), w8.contiguous(), sb.t().contiguous()


def fp8_offset_operands(qa: QuantizedActivation, qw: QuantizedWeight):
    """``(xs, ob)`` of an asymmetric weight's offset term in the FP8 route,
    ``sum_b xs[m, b] * ob[n, b]``: ``xs`` float32 ``[M, nb]`` = the block's activation scale times
    the integer sum of its values (one fp32 multiply; the sum is exact), ``ob`` float32 ``[N, nb]``
    = the offset of the group holding block b."""
    _check_gemm_operands(qa, qw)
    if qw.offsets is None:
        raise ValueError("symmetric weights have no offset term")
    why = fp8_block_applies(qw)
    if why is not None:
        raise ValueError(f"the FP8 block form does not hold {why}")
    nb = qa.layout.n_blocks
    xs = qa.block_scales() * w4ax_act_sums(qa, qw).float()  # (segments are whole blocks here)
    blk = torch.arange(nb, device=qw.offsets.device)
    return xs.contiguous(), qw.offsets[:, (blk * BLOCK_K) // qw.group_width].contiguous()


def fp8_block_mm(a8: torch.Tensor, sa: torch.Tensor, w8: torch.Tensor, sb: torch.Tensor,
                 xs: Optional[torch.Tensor] = None, ob: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float64 ``[M, N]``: ``sum_j sa[j, m] * sb[j, n] * (A[m, block j] . W[n, block j])`` for the
    e4m3 bytes ``a8 [M, 128 nb']`` / ``w8 [N, 128 nb']`` and the block-major scales of
    :func:`fp8_block_operands` -- what a 1x128 x 1x128 block-scaled FP8 GEMM computes, in exact
    arithmetic (the emulation CPU tests hold the route's operands to) -- plus, given, the offset
    term ``xs @ ob^T`` of :func:`fp8_offset_operands`."""
    check_tensor("a8", a8, dtypes=(torch.uint8,), ndim=2)
    check_tensor("w8", w8, dtypes=(torch.uint8,), ndim=2)
    check_tensor("sa", sa, dtypes=(torch.float32,), ndim=2)
    check_tensor("sb", sb, dtypes=(torch.float32,), ndim=2)
    nbp = sa.shape[0]
    if a8.shape[1] != w8.shape[1] or a8.shape[1] != nbp * BLOCK_K or tuple(sa.shape) != (nbp, a8.shape[0]) \
            or tuple(sb.shape) != (nbp, w8.shape[0]):
        raise ValueError(f"a8 {tuple(a8.shape)}, sa {tuple(sa.shape)}, w8 {tuple(w8.shape)}, sb {tuple(sb.shape)} "
                         f"are not [M, 128 nb'], [nb', M], [N, 128 nb'], [nb', N]")
    a = a8.view(torch.float8_e4m3fn).to(torch.float32).double().view(a8.shape[0], nbp, BLOCK_K)
    w = w8.view(torch.float8_e4m3fn).to(torch.float32).double().view(w8.shape[0], nbp, BLOCK_K)
    acc = torch.einsum("mjk,njk->jmn", a, w)  # exact: integers, |block sum| <= 128 * 16 * 8
    y = (acc * sa.double()[:, :, None] * sb.double()[:, None, :]).sum(0)
    if xs is not None:
        y = y + xs.double() @ ob.double().t()
    return y


# ==========================================================================
# FMPQ calibration math: statistics -> permutation + block precision map
# ==========================================================================
def fmpq_calibrate(
    channel_absmax: torch.Tensor,
    *,
    int8_blocks: Optional[int] = None,
    int8_fraction: Optional[float] = None,
    outlier_ratio: Optional[float] = None,
    max_int8_blocks: Optional[int] = None,
    granularity: int = 1,
) -> ActivationLayout:
    """Turn per-channel activation statistics into an :class:`ActivationLayout`.

    Channels are sorted by ``channel_absmax`` (descending, stable) so outliers are
    packed into the fewest blocks, and blocks of similar magnitude share scales.

    ``granularity`` G > 1 moves channels in runs of G consecutive channels (runs
    sorted by their largest absmax; a last partial run stays last): permuted
    column groups of G are then whole original groups, so weights that already
    sit on a group-G grid (e.g. GGUF Q4_1, G = 32) keep it after the permutation
    is folded into their columns.  G must divide 128.
    How many leading blocks become INT8 is set by exactly one of:

    * ``int8_blocks``: a block budget;
    * ``int8_fraction``: a budget as a share of all blocks (rounded to nearest);
    * ``outlier_ratio``: channels whose absmax exceeds ``ratio * median`` are
      outliers; INT8 covers them (``ceil(n_outliers / 128)`` blocks), capped by
      ``max_int8_blocks``.
    """
    check_tensor("channel_absmax", channel_absmax, dtypes=FLOAT_DTYPES, ndim=1)
    k = channel_absmax.numel()
    if k == 0:
        raise ValueError("channel_absmax must not be empty")
    stats = channel_absmax.float()
    if not bool(torch.isfinite(stats).all()) or bool((stats < 0).any()):
        raise ValueError("channel_absmax must be finite and non-negative")
    given = [v is not None for v in (int8_blocks, int8_fraction, outlier_ratio)]
    if sum(given) != 1:
        raise ValueError("pass exactly one of int8_blocks, int8_fraction, outlier_ratio")
    nb = num_blocks(k)
    if int8_blocks is not None:
        if isinstance(int8_blocks, bool) or not isinstance(int8_blocks, int):
            raise TypeError(f"int8_blocks must be an int, got {int8_blocks!r}")
        if not 0 <= int8_blocks <= nb:
            raise ValueError(f"int8_blocks={int8_blocks} out of range [0, {nb}] for K={k}")
        n8 = int8_blocks
    elif int8_fraction is not None:
        if not 0.0 <= float(int8_fraction) <= 1.0:
            raise ValueError(f"int8_fraction must be in [0, 1], got {int8_fraction}")
        n8 = int(math.floor(float(int8_fraction) * nb + 0.5))
    else:
        if not float(outlier_ratio) > 0:
            raise ValueError(f"outlier_ratio must be > 0, got {outlier_ratio}")
        med = float(stats.median())
        n_out = int((stats > float(outlier_ratio) * med).sum())
        n8 = (n_out + BLOCK_K - 1) // BLOCK_K
    if max_int8_blocks is not None:
        if not 0 <= int(max_int8_blocks):
            raise ValueError(f"max_int8_blocks must be >= 0, got {max_int8_blocks}")
        n8 = min(n8, int(max_int8_blocks))
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1 or BLOCK_K % granularity:
        raise ValueError(f"granularity must be an int dividing {BLOCK_K}, got {granularity!r}")
    if granularity == 1:
        perm = torch.sort(stats, descending=True, stable=True).indices
    else:
        full = k // granularity
        runs = stats[: full * granularity].view(full, granularity).amax(dim=1)
        order = torch.sort(runs, descending=True, stable=True).indices
        perm = (order[:, None] * granularity + torch.arange(granularity, device=stats.device)).flatten()
        perm = torch.cat([perm, torch.arange(full * granularity, k, device=stats.device)])
        if outlier_ratio is not None:  # INT8 must cover whole runs holding outliers
            med = float(stats.median())
            n_out = int((runs > float(outlier_ratio) * med).sum()) * granularity
            n8 = (n_out + BLOCK_K - 1) // BLOCK_K
            if max_int8_blocks is not None:
                n8 = min(n8, int(max_int8_blocks))
    bits = torch.full((nb,), 4, dtype=torch.int32, device=stats.device)
    bits[:n8] = 8
    return ActivationLayout(perm, bits)


# ==========================================================================
# KV4: asymmetric 4-bit K/V with float16 scale and zero
# ==========================================================================
KV4_AXES = ("token", "channel")


@dataclass(eq=False)
class KV4Tensor:
    """A 4-bit K or V tensor of logical shape ``[..., T, D]``.

    * ``packed``: uint8 ``[..., T, D/2]`` (unsigned nibbles, even index low, along D).
    * ``scale``, ``zero``: float16. ``axis="token"``: ``[..., T, D/G]`` (groups of G
      along head_dim); ``axis="channel"``: ``[..., T/G, D]`` (groups of G tokens per
      channel).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    axis: str
    group_size: int

    def __post_init__(self):
        check_tensor("packed", self.packed, dtypes=(torch.uint8,))
        check_tensor("scale", self.scale, dtypes=(torch.float16,))
        check_tensor("zero", self.zero, dtypes=(torch.float16,))
        if self.axis not in KV4_AXES:
            raise ValueError(f"axis must be one of {KV4_AXES}, got {self.axis!r}")
        if self.scale.shape != self.zero.shape:
            raise ValueError(f"scale shape {tuple(self.scale.shape)} != zero shape {tuple(self.zero.shape)}")
        want = list(self.packed.shape)
        t, d = want[-2], want[-1] * 2
        if self.axis == "token":
            want[-1] = d // self.group_size
        else:
            want[-2], want[-1] = t // self.group_size, d
        if list(self.scale.shape) != want:
            raise ValueError(f"scale shape {tuple(self.scale.shape)} != expected {tuple(want)} ({self.axis}, G={self.group_size})")

    @property
    def shape(self):
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)


def _check_kv_group(x: torch.Tensor, group_size: int, axis: str) -> None:
    if axis not in KV4_AXES:
        raise ValueError(f"axis must be one of {KV4_AXES}, got {axis!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    t, d = x.shape[-2], x.shape[-1]
    if d % 2:
        raise ValueError(f"head_dim must be even to pack 4-bit pairs, got shape {tuple(x.shape)}")
    n = d if axis == "token" else t
    if n % group_size:
        dim = "head_dim" if axis == "token" else "token count"
        raise ValueError(f"{dim}={n} is not a multiple of group_size={group_size} (shape {tuple(x.shape)})")


def quantize_kv4(x: torch.Tensor, group_size: int = 64, axis: str = "token") -> KV4Tensor:
    """Asymmetric 4-bit quantization of K or V ``[..., T, D]`` (see :class:`KV4Tensor`)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"x must be at least 2-D [..., T, D], got shape {tuple(x.shape)}")
    _check_kv_group(x, group_size, axis)
    xf = x.float()
    *lead, t, d = xf.shape
    if axis == "token":
        g = xf.reshape(*lead, t, d // group_size, group_size)
        red = -1
    else:
        g = xf.reshape(*lead, t // group_size, group_size, d)
        red = -2
    mn = g.amin(dim=red, keepdim=True)
    mx = g.amax(dim=red, keepdim=True)
    scale16 = _div_const(mx - mn, UINT4_MAX).to(torch.float16)
    zero16 = mn.to(torch.float16)
    if not (bool(torch.isfinite(scale16).all()) and bool(torch.isfinite(zero16).all())):
        raise ValueError("KV4 scale/zero overflow float16: |x| too large or non-finite values in x")
    q = torch.round(_safe_div(g - zero16.float(), scale16.float())).clamp_(0, UINT4_MAX)
    q = q.to(torch.uint8).reshape(*lead, t, d)
    return KV4Tensor(pack_uint4(q), scale16.squeeze(red), zero16.squeeze(red), axis, group_size)


def dequantize_kv4(kv: KV4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale + zero`` (float32 math) as ``[..., T, D]`` in ``dtype``."""
    if not isinstance(kv, KV4Tensor):
        raise TypeError(f"kv must be a KV4Tensor, got {type(kv).__name__}")
    q = unpack_uint4(kv.packed).float()
    *lead, t, d = q.shape
    sc, zr = kv.scale.float(), kv.zero.float()
    if kv.axis == "token":
        q = q.view(*lead, t, d // kv.group_size, kv.group_size)
        x = q * sc[..., None] + zr[..., None]
    else:
        q = q.view(*lead, t // kv.group_size, kv.group_size, d)
        x = q * sc[..., None, :] + zr[..., None, :]
    return x.reshape(*lead, t, d).to(dtype)
