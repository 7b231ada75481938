"""The single cometq op namespace (``torch.ops.cometq.*``) and backend dispatch.

Every op is registered once here with ``torch.library``: a schema, a fake
(meta) implementation that carries the shape checks so ``torch.compile`` can
trace through it, and a real implementation that dispatches to a backend:

* ``reference``: plain torch (:mod:`cometq.reference`), any device;
* ``triton``: kernels in ``cometq.kernels`` (CUDA devices; on CPU only under
  ``TRITON_INTERPRET=1``, which is how CI tests them);
* ``cuda``: the compiled extension ``cometq._C`` (CUDA devices).

Backends register implementations with :func:`register_impl`; the Triton and
CUDA backends are imported lazily the first time they are asked for.  The
choice is per call: ``backend=`` argument > ``COMETQ_BACKEND`` environment
variable > ``"auto"`` (on CUDA tensors: the available backends of cuda,
triton, reference; when two GPU backends can run an op, the fastest for the
case is measured once and cached, :mod:`cometq.autotune`; reference on CPU).  Asking for a backend that cannot run raises a clear error.

Tensor-level signatures (the dataclasses of :mod:`cometq.reference` are
unpacked into plain tensors so the ops are traceable):

* ``quantize_act(x[M,K], perm[K], block_bits[NB], n_int8, scale_mode, int4_clip) -> (q4, q8, scales)``
* ``w4ax_gemm(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets?, group_size, bias?, out_dtype, scale_mode) -> y[M,N]``
* ``fake_quant_act(x[M,K], perm[K], block_bits[NB], n_int8, scale_mode, int4_clip, out_dtype) -> a[M,K_pad]``:
  the quantized activation dequantized again (``q * scale`` rounded once to ``out_dtype``) in the
  half-split K order (:func:`cometq.layout.half_split_blocks`) -- the operand of the 16-bit
  routes (large-M dequant, small-M w16), made in one pass

A backend implementation that cannot run a particular *case* (a feature its
kernels do not have) raises :class:`BackendUnsupported`; under
``auto`` the next backend in the order is tried, a forced backend reports it.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from . import autotune as _autotune  # measured choice under "auto" (issue #4)
from . import reference as R
from .layout import BLOCK_K, SCALE_MODES, ActivationLayout, half_split_blocks, padded_k

__all__ = [
    "BACKENDS",
    "register_impl",
    "registered_backends",
    "resolve_backend",
    "quantize_act",
    "fake_quant_act",
    "w4ax_gemm",
    "quantize_activation",
    "w4ax_gemm_q",
    "BackendUnsupported",
]


class BackendUnsupported(NotImplementedError):
    """Raised by a backend implementation for a case it does not handle (see module doc)."""

BACKENDS = ("auto", "reference", "triton", "cuda")
_ENV = "COMETQ_BACKEND"

# op name -> backend -> implementation (same signature as the op)
_IMPLS: Dict[str, Dict[str, Callable]] = {}
_LAZY = {"triton": ("cometq.kernels._register", "cometq.kernels._register_kv4"), "cuda": "cometq._cuda_register"}
_LAZY_ERRORS: Dict[str, str] = {}


def register_impl(op: str, backend: str, fn: Callable) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = fn


def _load_backend(backend: str) -> None:
    mods = _LAZY.get(backend)
    if mods is None or backend in _LAZY_ERRORS:
        return
    for mod in (mods,) if isinstance(mods, str) else mods:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - reported when the backend is asked for
            _LAZY_ERRORS[backend] = f"{type(e).__name__}: {e}"


def _triton_on_cpu_ok() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def registered_backends(op: str) -> Tuple[str, ...]:
    for b in ("triton", "cuda"):
        _load_backend(b)
    return tuple(_IMPLS.get(op, {}))


def candidate_backends(op: str, device: torch.device, requested: Optional[str] = None) -> Tuple[str, ...]:
    """Backends to try for ``op`` on ``device``, in order: one for a forced backend,
    the available ones of cuda > triton > reference under ``auto`` (the fixed order;
    :func:`_dispatch` lets :mod:`cometq.autotune` put the measured-fastest first)."""
    req = requested or os.environ.get(_ENV, "auto")
    if req not in BACKENDS:
        raise ValueError(f"unknown backend {req!r} (from {'argument' if requested else _ENV}); choose one of {BACKENDS}")
    device = torch.device(device)
    if req != "auto":
        return (resolve_backend(op, device, req),)
    out = []
    if device.type == "cuda":
        for b in ("cuda", "triton"):
            _load_backend(b)
            if b in _IMPLS.get(op, {}):
                out.append(b)
    out.append("reference")
    return tuple(out)


def _dispatch(op: str, device, requested: Optional[str], *args):
    """Run ``op`` on the first candidate backend that supports this case."""
    cands = candidate_backends(op, device, requested)
    # --- measured auto choice (issue #4, cometq.autotune): with two or more
    # non-reference candidates, the fastest for this case goes first.
    if len(cands) > 1:
        cands = _autotune.order(op, device, cands, _IMPLS[op], args, requested)
    # --- end measured auto choice
    for i, b in enumerate(cands):
        try:
            return _IMPLS[op][b](*args)
        except BackendUnsupported as e:
            if len(cands) == 1:
                raise RuntimeError(f"backend {b!r} cannot run op {op!r} for these arguments: {e}") from None
            if i == len(cands) - 1:  # pragma: no cover - the reference supports every case
                raise


def resolve_backend(op: str, device: torch.device, requested: Optional[str] = None) -> str:
    """Pick the backend that runs ``op`` on ``device`` (see module doc)."""
    req = requested or os.environ.get(_ENV, "auto")
    if req not in BACKENDS:
        raise ValueError(f"unknown backend {req!r} (from {'argument' if requested else _ENV}); choose one of {BACKENDS}")
    device = torch.device(device)
    if req == "auto":
        return candidate_backends(op, device, req)[0]
    if req != "reference":
        _load_backend(req)
        if req not in _IMPLS.get(op, {}):
            why = _LAZY_ERRORS.get(req, "no implementation registered")
            raise RuntimeError(f"backend {req!r} is not available for op {op!r}: {why}")
        if device.type != "cuda" and not (req == "triton" and _triton_on_cpu_ok()):
            hint = " (the triton backend runs on CPU only with TRITON_INTERPRET=1)" if req == "triton" else ""
            raise RuntimeError(f"backend {req!r} needs a CUDA tensor for op {op!r}, got device {device}{hint}")
    return req


# --------------------------------------------------------------------------
# reference implementations (tensor-level), registered as the "reference" backend
# --------------------------------------------------------------------------
def _ref_quantize_act(x, perm, block_bits, n_int8: int, scale_mode: str, int4_clip: float = 1.0):
    qa = R.quantize_activation(x, ActivationLayout(perm, block_bits, int4_clip), scale_mode)
    return qa.q4, qa.q8, qa.scales


def _ref_w4ax_gemm(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, group_size, bias, out_dtype, scale_mode):
    k_pad = qweight.shape[1] * 2
    # the GEMM never needs the permutation: it was applied at quantize time and
    # folded into the weight columns.  K is only known up to padding here.
    lay = ActivationLayout(torch.arange(k_pad, device=qweight.device), block_bits)
    qa = R.QuantizedActivation(q4, q8, a_scales, lay, scale_mode)
    qw = R.QuantizedWeight(qweight, w_scales, k_pad, group_size, w_offsets)
    return R.w4ax_gemm(qa, qw, bias, out_dtype)


def _ref_fake_quant_act(x, perm, block_bits, n_int8: int, scale_mode: str, int4_clip: float, out_dtype: torch.dtype):
    # the reference quantizer's integers and block scales; the fp32 product rounded once to
    # out_dtype (what dequantizing the packed blocks gives), in the half-split K order.  The
    # integers go through int32 as in the packed round trip: rint(-0.3) = -0.0 must come back +0
    q, _, bscale = R.quantize_activation_blocks(x, ActivationLayout(perm, block_bits, int4_clip), scale_mode)
    v = q.to(torch.int32).to(torch.float32) * bscale[..., None]
    return half_split_blocks(v.reshape(x.shape[0], q.shape[1] * BLOCK_K)).to(out_dtype)


def _ref_w16_gemm(a, qweight, w_scales, w_offsets, group: int, bias, out_dtype: torch.dtype,
                  stride_wb: Optional[int] = None):
    """The w16 route's GEMM half (``w16_gemm``): ``y = A' @ W'^T (+ bias)`` for the activation
    operand ``a [M, K_pad]`` (16-bit or fp32, half-split K order, :func:`fake_quant_act`) and
    ``W'[n, k] = v * s (+ o)`` of the nibble ``v`` at half-split position ``k``, with ``s`` / ``o``
    rounded to ``a``'s dtype and the product (+ offset) rounded once to it; the sum in float64
    here, fp32 in the kernels, then ``+ bias`` and one rounding to ``out_dtype``.  ``qweight``:
    ``[N, K_pad/2]`` or the block-major ``[N, NB, 64]`` view; ``group`` the resolved width
    (K_pad for per-channel weights); ``stride_wb`` is a kernel launch detail (unused here)."""
    n = qweight.shape[0]
    q = qweight.reshape(n, -1).to(torch.int32)
    nb = q.shape[1] // (BLOCK_K // 2)
    lo, hi = q & 0xF, (q >> 4) & 0xF
    v = torch.cat([lo.view(n, nb, 64), hi.view(n, nb, 64)], dim=2).reshape(n, nb * BLOCK_K)
    v = torch.where(v >= 8, v - 16, v).to(torch.float64)
    pos = torch.arange(BLOCK_K, device=q.device)
    chan = (torch.arange(nb, device=q.device)[:, None] * BLOCK_K + 2 * (pos % 64) + (pos >= 64)).reshape(-1)
    grp = chan // int(group)
    dt = a.dtype
    w = v * w_scales.to(dt).to(torch.float64)[:, grp]
    if w_offsets is not None:
        w = w + w_offsets.to(dt).to(torch.float64)[:, grp]
    y = a.to(torch.float64) @ w.to(dt).to(torch.float64).T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype)


register_impl("quantize_act", "reference", _ref_quantize_act)
register_impl("fake_quant_act", "reference", _ref_fake_quant_act)
register_impl("w4ax_gemm", "reference", _ref_w4ax_gemm)
register_impl("w16_gemm", "reference", _ref_w16_gemm)


# --------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def _check_quantize_act_args(x, perm, block_bits, n_int8, scale_mode, int4_clip=1.0):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    torch._check(perm.dim() == 1 and perm.shape[0] == x.shape[1],
                 lambda: f"perm shape {tuple(perm.shape)} must be ({x.shape[1]},) for x shape {tuple(x.shape)}")
    nb = padded_k(int(x.shape[1])) // BLOCK_K
    torch._check(block_bits.dim() == 1 and block_bits.shape[0] == nb,
                 lambda: f"block_bits shape {tuple(block_bits.shape)} must be ({nb},) for K={x.shape[1]}")
    torch._check(0 <= n_int8 <= nb, lambda: f"n_int8={n_int8} out of range [0, {nb}]")
    torch._check(scale_mode in SCALE_MODES, lambda: f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    torch._check(0.0 < int4_clip <= 1.0, lambda: f"int4_clip must be in (0, 1], got {int4_clip}")
    return nb


@torch.library.custom_op("cometq::quantize_act", mutates_args=())
def _quantize_act_op(
    x: torch.Tensor, perm: torch.Tensor, block_bits: torch.Tensor, n_int8: int, scale_mode: str, int4_clip: float,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_quantize_act_args(x, perm, block_bits, n_int8, scale_mode, int4_clip)
    return _dispatch("quantize_act", x.device, backend or None, x, perm, block_bits, n_int8, scale_mode, int4_clip)


@_quantize_act_op.register_fake
def _(x, perm, block_bits, n_int8, scale_mode, int4_clip, backend):
    nb = _check_quantize_act_args(x, perm, block_bits, n_int8, scale_mode, int4_clip)
    m = x.shape[0]
    q4 = x.new_empty((m, (nb - n_int8) * BLOCK_K // 2), dtype=torch.uint8)
    q8 = x.new_empty((m, n_int8 * BLOCK_K), dtype=torch.int8)
    scales = x.new_empty((m, nb if scale_mode == "block" else 2), dtype=torch.float32)
    return q4, q8, scales


@torch.library.custom_op("cometq::fake_quant_act", mutates_args=())
def _fake_quant_act_op(
    x: torch.Tensor, perm: torch.Tensor, block_bits: torch.Tensor, n_int8: int, scale_mode: str, int4_clip: float,
    out_dtype_code: int, backend: str,
) -> torch.Tensor:
    _check_quantize_act_args(x, perm, block_bits, n_int8, scale_mode, int4_clip)
    torch._check(out_dtype_code in _CODE_DTYPES, lambda: f"bad out_dtype code {out_dtype_code}")
    return _dispatch("fake_quant_act", x.device, backend or None, x, perm, block_bits, n_int8, scale_mode, int4_clip,
                     _CODE_DTYPES[out_dtype_code])


@_fake_quant_act_op.register_fake
def _(x, perm, block_bits, n_int8, scale_mode, int4_clip, out_dtype_code, backend):
    nb = _check_quantize_act_args(x, perm, block_bits, n_int8, scale_mode, int4_clip)
    torch._check(out_dtype_code in _CODE_DTYPES, lambda: f"bad out_dtype code {out_dtype_code}")
    return x.new_empty((x.shape[0], nb * BLOCK_K), dtype=_CODE_DTYPES[out_dtype_code])


def _check_gemm_args(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, group_size, bias, out_dtype_code,
                     scale_mode):
    m = a_scales.shape[0]
    k_pad = qweight.shape[1] * 2
    nb = block_bits.shape[0]
    torch._check(k_pad == nb * BLOCK_K, lambda: f"qweight shape {tuple(qweight.shape)} holds K_pad={k_pad} but block_bits has {nb} blocks")
    torch._check(q4.dim() == 2 and q4.shape[0] == m, lambda: f"q4 shape {tuple(q4.shape)} must have {m} rows")
    torch._check(q8.dim() == 2 and q8.shape[0] == m, lambda: f"q8 shape {tuple(q8.shape)} must have {m} rows")
    torch._check(q4.shape[1] * 2 + q8.shape[1] == k_pad,
                 lambda: f"q4 {tuple(q4.shape)} + q8 {tuple(q8.shape)} do not cover K_pad={k_pad}")
    torch._check(scale_mode in SCALE_MODES, lambda: f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    ns = nb if scale_mode == "block" else 2
    torch._check(a_scales.dim() == 2 and a_scales.shape[1] == ns, lambda: f"a_scales shape {tuple(a_scales.shape)} needs {ns} columns")
    g = R.check_group_size(group_size, k_pad)
    n = qweight.shape[0]
    torch._check(tuple(w_scales.shape) == (n, k_pad // g), lambda: f"w_scales shape {tuple(w_scales.shape)} != {(n, k_pad // g)}")
    if w_offsets is not None:
        torch._check(tuple(w_offsets.shape) == (n, k_pad // g),
                     lambda: f"w_offsets shape {tuple(w_offsets.shape)} != w_scales shape {(n, k_pad // g)}")
        torch._check(w_offsets.dtype == torch.float32, lambda: f"w_offsets must be float32, got {w_offsets.dtype}")
    if bias is not None:
        torch._check(tuple(bias.shape) == (n,), lambda: f"bias shape {tuple(bias.shape)} != ({n},)")
    torch._check(out_dtype_code in _CODE_DTYPES, lambda: f"bad out_dtype code {out_dtype_code}")
    return m, n


@torch.library.custom_op("cometq::w4ax_gemm", mutates_args=())
def _w4ax_gemm_op(
    q4: torch.Tensor,
    q8: torch.Tensor,
    a_scales: torch.Tensor,
    block_bits: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    w_offsets: Optional[torch.Tensor],
    group_size: int,
    bias: Optional[torch.Tensor],
    out_dtype_code: int,
    scale_mode: str,
    backend: str,
) -> torch.Tensor:
    _check_gemm_args(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, group_size, bias, out_dtype_code,
                     scale_mode)
    return _dispatch("w4ax_gemm", qweight.device, backend or None, q4, q8, a_scales, block_bits, qweight, w_scales,
                     w_offsets, group_size, bias, _CODE_DTYPES[out_dtype_code], scale_mode)


@_w4ax_gemm_op.register_fake
def _(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, group_size, bias, out_dtype_code, scale_mode, backend):
    m, n = _check_gemm_args(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, group_size, bias,
                            out_dtype_code, scale_mode)
    return qweight.new_empty((m, n), dtype=_CODE_DTYPES[out_dtype_code])


# --------------------------------------------------------------------------
# Python-level entry points
# --------------------------------------------------------------------------
def quantize_act(x, perm, block_bits, n_int8: int, scale_mode: str = "block", backend: Optional[str] = None,
                 int4_clip: float = 1.0):
    """Tensor-level activation quantization through ``torch.ops.cometq.quantize_act``."""
    return torch.ops.cometq.quantize_act(x, perm, block_bits, int(n_int8), scale_mode, float(int4_clip), backend or "")


def fake_quant_act(x, perm, block_bits, n_int8: int, scale_mode: str = "block", out_dtype: torch.dtype = torch.float16,
                   backend: Optional[str] = None, int4_clip: float = 1.0):
    """The 16-bit routes' activation operand through ``torch.ops.cometq.fake_quant_act``:
    ``[M, K_pad]`` in ``out_dtype`` (fp16 / bf16 / fp32), each block's ``q * scale`` in the
    half-split K order -- bit for bit the dequantized :func:`quantize_act` (module doc)."""
    if out_dtype not in _DTYPE_CODES:
        raise TypeError(f"out_dtype must be one of {tuple(_DTYPE_CODES)}, got {out_dtype}")
    return torch.ops.cometq.fake_quant_act(x, perm, block_bits, int(n_int8), scale_mode, float(int4_clip),
                                           _DTYPE_CODES[out_dtype], backend or "")


def w4ax_gemm(q4, q8, a_scales, block_bits, qweight, w_scales, group_size: int, bias=None,
              out_dtype: torch.dtype = torch.float16, scale_mode: str = "block", backend: Optional[str] = None,
              w_offsets: Optional[torch.Tensor] = None):
    """Tensor-level W4Ax GEMM through ``torch.ops.cometq.w4ax_gemm`` (``w_offsets``: asymmetric weights)."""
    if out_dtype not in _DTYPE_CODES:
        raise TypeError(f"out_dtype must be one of {tuple(_DTYPE_CODES)}, got {out_dtype}")
    return torch.ops.cometq.w4ax_gemm(
        q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, int(group_size), bias, _DTYPE_CODES[out_dtype],
        scale_mode, backend or ""
    )


def w4ax_linear_eager(x, perm, block_bits, n_int8: int, scale_mode: str, int4_clip: float, qweight, w_scales,
                      w_offsets, group_size: int, bias, out_dtype: torch.dtype, backend: Optional[str] = None):
    """``quantize_act`` then ``w4ax_gemm`` in eager mode, without the custom-op machinery.

    Same backend choice and fallback order (:func:`_dispatch`), same kernels, so the result
    is bit-identical to the two ``torch.ops.cometq`` calls -- on the quantize + GEMM route
    ("split"); on CUDA the tuner may instead keep a 16-bit route where it measures faster (the
    fused dequant route from 1024 rows, the w16 route up to 256 rows), whose results agree with
    it within the dequant path's tolerance (``DEQUANT_GEMM_RTOL``), not bit for bit.  What it skips is the per-call
    dispatcher / ``torch._check`` validation layer and the dataclass wrappers (~40 % of
    a decode step's Python time in the serving engine, measured with the kernels stubbed
    out).  For callers that own and have validated the weight-side tensors (a
    :class:`cometq.nn.W4AxLinear`); each backend still checks the tensors it launches on.
    Not traceable: under ``torch.compile`` use the ops.
    """
    if out_dtype not in _DTYPE_CODES:
        raise TypeError(f"out_dtype must be one of {tuple(_DTYPE_CODES)}, got {out_dtype}")
    if x.dim() != 2 or x.shape[1] != perm.shape[0]:
        raise ValueError(f"x shape {tuple(x.shape)} must be [M, {perm.shape[0]}] (the layout's K)")
    args = (x, perm, block_bits, int(n_int8), scale_mode, float(int4_clip), qweight, w_scales, w_offsets,
            int(group_size), bias, out_dtype, backend or None)
    m = x.shape[0]
    if m >= FUSED_DEQUANT_MIN_M and _fused_dequant_applies(*args):
        # large M: the fused dequant route (one pass from x to the 16-bit activation operand) beside
        # quantize + GEMM, timed per case like a backend; first untuned where the GEMM's own first
        # candidate is the dequant path anyway (M >= 4096: same result, two passes fewer)
        cands = ("fused", "split") if _autotune.bucket_m(m) >= 4096 else ("split", "fused")
        if _fp8_route_applies(args) and _fp8_agrees(args):
            cands += ("fp8",)  # FP8 tensor cores (kernels/fp8_gemm.py): never first until timed
        route = _autotune.order("w4ax_linear_route", x.device, cands, _LINEAR_ROUTES, args)[0]
        return _LINEAR_ROUTES[route](*args)
    if (0 < m <= W16_MAX_M and os.environ.get(ENV_W16, "1") != "0" and _fused_dequant_applies(*args)
            and _w16_agrees(args)):
        # small M: the w16 route (activations fake-quantized once, weights dequantized in
        # registers, 16-bit MMA: kernels/w16_gemm.py) beside quantize + GEMM; split stays first
        # untuned (integer-exact), the tuner keeps w16 only where it measures faster.  Timed as
        # graph replays whatever the caller's mode: the two routes round differently, so an eager
        # step and a CUDA-graph replay of it must make the same choice (one decision per case)
        with _autotune.timing("graph"):
            route = _autotune.order("w4ax_linear_route", x.device, ("split", "w16"), _LINEAR_ROUTES, args)[0]
        return _LINEAR_ROUTES[route](*args)
    if (W16_MAX_M < m < FUSED_DEQUANT_MIN_M and _fused_dequant_applies(*args) and _fp8_route_applies(args)
            and _fp8_agrees(args)):
        # between the w16 and the large-M routes: the fp8 route beside split (its 1 B/weight
        # operand pass is a larger share of a smaller GEMM: only the timing can tell)
        route = _autotune.order("w4ax_linear_route", x.device, ("split", "fp8"), _LINEAR_ROUTES, args)[0]
        return _LINEAR_ROUTES[route](*args)
    return _LINEAR_ROUTES["split"](*args)


#: per (route, GPU, case): did a 16-bit or FP8 route's result agree with the integer-exact split
#: route's (within the dequant path's tolerance) when the case was first tuned -- the tuner times
#: speed only, and a fast wrong route must never be kept
_ROUTE_AGREES: dict = {}


def _route_agrees(route: str, args) -> bool:
    """Check ``route`` against "split" once per case, before the tuner may time it (one device
    sync, at tuning time only).  Where nothing is timed (no measurable device, tuning off) split
    runs first anyway: True.  While a CUDA graph is captured or tuning is frozen no check can
    run: False (split) until one has.  A route that raises disagrees (and says why)."""
    x, out_dtype = args[0], args[11]
    if not (_autotune._measurable(x.device) and _autotune.enabled()):
        return True
    key = (route, _autotune._device_name(x.device), _key_linear_route(*args))
    ok = _ROUTE_AGREES.get(key)
    if ok is None:
        if _autotune._tracing_or_capturing(x.device) or _autotune.frozen_now():
            return False
        from cometq.kernels.dequant_gemm import DEQUANT_GEMM_RTOL

        ref = _LINEAR_ROUTES["split"](*args).float()
        try:
            got = _LINEAR_ROUTES[route](*args).float()
        except Exception as e:  # noqa: BLE001 - a route that cannot run this case is not used for it
            got, why = None, f"it raised {type(e).__name__}: {str(e)[:200]}"
        if got is not None:
            err = float((got - ref).abs().max()) if ref.numel() else 0.0
            tol_dtype = out_dtype
            if route == "fp8":  # (fp16 outputs computed as bf16 where the device's GEMM has no fp16 one)
                from cometq.kernels.fp8_gemm import fp8_gemm_out_dtype

                tol_dtype = fp8_gemm_out_dtype(x.device, out_dtype)
            tol = DEQUANT_GEMM_RTOL.get(tol_dtype, DEQUANT_GEMM_RTOL[torch.float32]) * float(ref.abs().max()) \
                if ref.numel() else 0.0
            why = f"max error {err:.3g} > {tol:.3g}"
        ok = _ROUTE_AGREES[key] = got is not None and bool(err <= tol)  # (NaN: False)
        if not ok:
            warnings.warn(f"cometq: the {route} route disagrees with quantize + GEMM on this case ({why}: "
                          f"M={x.shape[0]}, N={args[6].shape[0]}, K={x.shape[1]}); it is not used for it",
                          RuntimeWarning, stacklevel=3)
    return ok


def _w16_agrees(args) -> bool:
    return _route_agrees("w16", args)


def _fp8_agrees(args) -> bool:
    return _route_agrees("fp8", args)


def _fp8_route_applies(args) -> bool:
    """The large-M FP8 route (:mod:`cometq.kernels.fp8_gemm`) may run this call: a Triton route
    may (:func:`_fused_dequant_applies`, checked by the caller), weight groups that span whole
    blocks, N a multiple of 16 (FP8 GEMM operand alignment), an fp16 / bf16 output (what torch's
    FP8 GEMMs all support), and a GPU whose block-scaled FP8 GEMM passed its probe
    (``fp8_route_unavailable``)."""
    x, qweight, group_size, out_dtype = args[0], args[6], args[9], args[11]
    if qweight.shape[0] % 16 or out_dtype not in (torch.float16, torch.bfloat16):
        return False
    if group_size not in (None, -1) and int(group_size) % BLOCK_K:
        return False
    try:
        from cometq.kernels.fp8_gemm import fp8_route_unavailable

        return fp8_route_unavailable(x.device) is None
    except Exception:  # noqa: BLE001 - no Triton, or the probe itself broke: no route (the others run)
        return False


#: rows from which :func:`w4ax_linear_eager` on CUDA also considers the fused dequant route
#: (:func:`cometq.kernels.dequant_gemm.w4ax_linear_dequant`): the GEMM's own dequant path starts
#: at the 1024 bucket, and there quantizing the activations and dequantizing them again costs two
#: passes over [M, K] (run 6, 8 x 1024-token prefill step: 44 of 259 ms)
FUSED_DEQUANT_MIN_M = 1024


def _linear_split(x, perm, block_bits, n_int8, scale_mode, int4_clip, qweight, w_scales, w_offsets, group_size,
                  bias, out_dtype, be):
    q4, q8, sc = _dispatch("quantize_act", x.device, be, x, perm, block_bits, n_int8, scale_mode, int4_clip)
    return _dispatch("w4ax_gemm", qweight.device, be, q4, q8, sc, block_bits, qweight, w_scales, w_offsets,
                     group_size, bias, out_dtype, scale_mode)


def _linear_16bit(gemm, x, perm, block_bits, n_int8, scale_mode, int4_clip, qweight, w_scales, w_offsets, group_size,
                  bias, out_dtype, be):
    """A 16-bit-operand route: the activation operand ``A'`` by ``fake_quant_act`` (whichever
    backend measures faster for the case, under ``be``), then ``gemm`` (the Triton dequant + cuBLAS
    or w16 GEMM) with the resolved group width (K_pad for per-channel weights) and the weights'
    block stride (block-major views)."""
    from cometq.kernels.dequant_gemm import _operand_dtype

    a = _dispatch("fake_quant_act", x.device, be, x, perm, block_bits, n_int8, scale_mode, int4_clip,
                  _operand_dtype(out_dtype))
    k_pad = block_bits.shape[0] * BLOCK_K
    group = k_pad if group_size in (None, -1) else int(group_size)
    return gemm(a, qweight, w_scales, w_offsets, group, bias, out_dtype,
                stride_wb=qweight.stride(1) if qweight.dim() == 3 else None)


def _linear_fused(*args):
    from cometq.kernels.dequant_gemm import dequant_weight_gemm

    return _linear_16bit(dequant_weight_gemm, *args)


def _linear_w16(*args):
    be = args[-1]

    def gemm(a, qweight, w_scales, w_offsets, group, bias, out_dtype, stride_wb=None):
        # the GEMM half by backend (Triton / CUDA kernels, timed per case under auto).  One decision
        # per case whatever the caller's timing mode (graph-replay timings): the kernels round
        # differently (summation order), so an eager step and a graph replay must pick the same one.
        with _autotune.timing("graph"):
            return _dispatch("w16_gemm", a.device, be, a, qweight, w_scales, w_offsets, group, bias, out_dtype,
                             stride_wb)

    return _linear_16bit(gemm, *args)


#: rows up to which :func:`w4ax_linear_eager` on CUDA also times the w16 route
#: (:mod:`cometq.kernels.w16_gemm`; same value as ``W16_MAX_M`` there, kept here so this module
#: imports without Triton); ``COMETQ_LINEAR_W16=0`` takes the route out of the choice
W16_MAX_M = 256
ENV_W16 = "COMETQ_LINEAR_W16"

def _linear_fp8(x, perm, block_bits, n_int8, scale_mode, int4_clip, qweight, w_scales, w_offsets, group_size, bias,
                out_dtype, be):
    """quantize_act (whichever backend, under ``be``), then the FP8 block form of both operands and
    cuBLAS's block-scaled FP8 GEMM (:func:`cometq.kernels.fp8_gemm.w4ax_gemm_fp8`)."""
    from cometq.kernels.fp8_gemm import w4ax_gemm_fp8

    q4, q8, sc = _dispatch("quantize_act", x.device, be, x, perm, block_bits, n_int8, scale_mode, int4_clip)
    group = block_bits.shape[0] * BLOCK_K if group_size in (None, -1) else int(group_size)
    return w4ax_gemm_fp8(q4, q8, sc, block_bits, qweight, w_scales, group, bias, out_dtype, scale_mode,
                         stride_wb=qweight.stride(1) if qweight.dim() == 3 else None, w_offsets=w_offsets)


_LINEAR_ROUTES = {"split": _linear_split, "fused": _linear_fused, "w16": _linear_w16, "fp8": _linear_fp8}


def _fused_dequant_applies(x, perm, block_bits, n_int8, scale_mode, int4_clip, qweight, w_scales, w_offsets,
                           group_size, bias, out_dtype, be) -> bool:
    """A 16-bit Triton route (fused dequant, w16) may run this call: a CUDA input, the Triton
    backend allowed and loaded, and weight tensors of the shapes the split route's GEMM would
    accept (else that route runs and its checks name the problem)."""
    if x.device.type != "cuda" or qweight.device != x.device or (be or os.environ.get(_ENV, "auto")) not in ("auto",
                                                                                                        "triton"):
        return False
    try:
        _load_backend("triton")
    except Exception:  # noqa: BLE001 - no Triton here: the split route (its own error if forced)
        return False
    if "w4ax_gemm" not in _IMPLS or "triton" not in _IMPLS["w4ax_gemm"]:
        return False
    return _fused_shapes_ok(block_bits, qweight, w_scales, w_offsets, group_size)


def _fused_shapes_ok(block_bits, qweight, w_scales, w_offsets, group_size) -> bool:
    """Weight-side shapes the fused route indexes without further checks (row-major or block-major
    ``qweight``, scales / offsets ``[N, K_pad / G]``)."""
    nb = block_bits.shape[0]
    n = qweight.shape[0]  # (block-major weights: the [N, NB, 64] view, layout.weights_block_major)
    k2 = qweight.shape[1] if qweight.dim() == 2 else qweight.shape[1] * qweight.shape[2]
    group = nb * BLOCK_K if group_size in (None, -1) else int(group_size)
    return (k2 * 2 == nb * BLOCK_K and group > 0 and (nb * BLOCK_K) % group == 0 and w_scales.dim() == 2
            and tuple(w_scales.shape) == (n, nb * BLOCK_K // group)
            and (w_offsets is None or w_offsets.shape == w_scales.shape))


def _key_linear_route(x, perm, block_bits, n_int8, scale_mode, int4_clip, qweight, w_scales, w_offsets, group_size,
                      bias, out_dtype, be):
    return (("M", _autotune.bucket_m(x.shape[0])), ("N", int(qweight.shape[0])), ("K", int(x.shape[1])),
            ("dtype", str(out_dtype).replace("torch.", "")), ("x_dtype", str(x.dtype).replace("torch.", "")),
            ("n_int8", _autotune.bucket_count(n_int8)), ("scale_mode", str(scale_mode)), ("group", int(group_size)),
            ("offsets", w_offsets is not None), ("bias", bias is not None), ("clip", float(int4_clip) != 1.0),
            ("block_major", qweight.dim() == 3))


_autotune.register_key_fn("w4ax_linear_route", _key_linear_route)


def _key_fake_quant_act(x, perm, block_bits, n_int8, scale_mode, int4_clip, out_dtype):
    return (("M", _autotune.bucket_m(x.shape[0])), ("K", int(x.shape[1])),
            ("x_dtype", str(x.dtype).replace("torch.", "")), ("dtype", str(out_dtype).replace("torch.", "")),
            ("n_int8", _autotune.bucket_count(n_int8)), ("scale_mode", str(scale_mode)),
            ("clip", float(int4_clip) != 1.0))


_autotune.register_key_fn("fake_quant_act", _key_fake_quant_act)


def _key_w16_gemm(a, qweight, w_scales, w_offsets, group, bias, out_dtype, stride_wb=None):
    return (("M", _autotune.bucket_m(a.shape[0])), ("N", int(qweight.shape[0])), ("K", int(a.shape[1])),
            ("a_dtype", str(a.dtype).replace("torch.", "")), ("dtype", str(out_dtype).replace("torch.", "")),
            ("group", int(group)), ("offsets", w_offsets is not None), ("bias", bias is not None),
            ("block_major", qweight.dim() == 3))


_autotune.register_key_fn("w16_gemm", _key_w16_gemm)


def quantize_activation(x: torch.Tensor, layout: ActivationLayout, scale_mode: str = "block",
                        backend: Optional[str] = None) -> R.QuantizedActivation:
    """Dataclass-level :func:`quantize_act` (same contract as the reference function)."""
    R.check_tensor("x", x, dtypes=R.FLOAT_DTYPES, ndim=2)
    q4, q8, sc = quantize_act(x, layout.perm, layout.block_bits, layout.n_int8, scale_mode, backend, layout.int4_clip)
    return R.QuantizedActivation(q4, q8, sc, layout, scale_mode)


def w4ax_gemm_q(qa: R.QuantizedActivation, qw: R.QuantizedWeight, bias=None,
                out_dtype: torch.dtype = torch.float16, backend: Optional[str] = None) -> torch.Tensor:
    """Dataclass-level :func:`w4ax_gemm`."""
    R._check_gemm_operands(qa, qw)
    gs = qw.group_size if qw.group_size not in (None, -1) else -1
    return w4ax_gemm(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, gs, bias,
                     out_dtype, qa.scale_mode, backend, w_offsets=qw.offsets)


# ==========================================================================
# KV4 paged cache ops (feature: 4-bit KV cache, issue 6)
# --------------------------------------------------------------------------
# * kv4_quantize_append(x[n,H,T,D], packed, scale, zero, block_ids[n], offsets[n], group_size, axis)
#     quantizes rows of new K or V and scatters them into a paged pool, in place
#     (layout: cometq.paged module doc);
# * kv4_decode_attention(q[B,Hq,D], k_packed, k_scale, k_zero, v_packed, v_scale, v_zero,
#     tail_k, tail_v, block_tables[S,MB], quant_lens[S], tail_lens[S], seq_ids[B],
#     group_size, key_axis, value_axis, sm_scale, num_splits) -> out[B,Hq,D]
#     single-query attention that reads the packed pool directly;
# * kv4_decode_append(k[B,H,D], v[B,H,D], k_packed, k_scale, k_zero, v_packed, v_scale, v_zero,
#     tail_k, tail_v, block_tables[S,MB], lens[2,S], slots[B], group_size, key_axis, value_axis)
#     one decode token per sequence, lengths advanced on the device (CUDA-graph capturable).
# Triton impls are registered by cometq.kernels._register_kv4 (lazy "triton" backend).
# ==========================================================================
def _kv4_scale_shape(axis: str, nb: int, h: int, bs: int, d: int, g: int):
    return (nb, h, bs, d // g) if axis == "token" else (nb, h, bs // g, d)


def _check_kv4_pool(name, packed, scale, zero, group_size, axis):
    torch._check(axis in R.KV4_AXES, lambda: f"{name}: axis must be one of {R.KV4_AXES}, got {axis!r}")
    torch._check(packed.dim() == 4 and packed.dtype == torch.uint8,
                 lambda: f"{name}_packed must be uint8 [NB, H, BS, D/2], got {packed.dtype} {tuple(packed.shape)}")
    nb, h, bs, d2 = packed.shape
    d = d2 * 2
    torch._check(group_size >= 2 and group_size % 2 == 0, lambda: f"group_size must be even >= 2, got {group_size}")
    torch._check(bs % group_size == 0, lambda: f"block size {bs} is not a multiple of group_size={group_size}")
    if axis == "token":
        torch._check(d % group_size == 0, lambda: f"head_dim {d} is not a multiple of group_size={group_size}")
    want = _kv4_scale_shape(axis, nb, h, bs, d, group_size)
    for sn, t in (("scale", scale), ("zero", zero)):
        torch._check(t.dtype == torch.float16 and tuple(t.shape) == want,
                     lambda: f"{name}_{sn} must be float16 {want} for axis {axis!r}, got {t.dtype} {tuple(t.shape)}")
    return nb, h, bs, d


def _check_kv4_append_args(x, packed, scale, zero, block_ids, offsets, group_size, axis):
    nb, h, bs, d = _check_kv4_pool("pool", packed, scale, zero, group_size, axis)
    torch._check(x.dim() == 4 and x.dtype in R.FLOAT_DTYPES, lambda: f"x must be float [n, H, T, D], got {x.dtype} {tuple(x.shape)}")
    torch._check(x.shape[1] == h and x.shape[3] == d, lambda: f"x shape {tuple(x.shape)} does not match pool heads {h} / head_dim {d}")
    t = x.shape[2]
    if axis == "channel":
        torch._check(t == group_size, lambda: f"axis 'channel' appends whole groups: x shape {tuple(x.shape)} needs T == {group_size}")
    else:
        torch._check(1 <= t <= bs, lambda: f"x shape {tuple(x.shape)}: T must be in [1, block size {bs}]")
    n = x.shape[0]
    for nm, ix in (("block_ids", block_ids), ("offsets", offsets)):
        torch._check(ix.dim() == 1 and ix.shape[0] == n and ix.dtype == torch.int32,
                     lambda: f"{nm} must be int32 [{n}], got {ix.dtype} {tuple(ix.shape)}")


def _check_kv4_attn_args(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v,
                         block_tables, quant_lens, tail_lens, seq_ids, group_size, key_axis, value_axis, num_splits):
    nb, h, bs, d = _check_kv4_pool("k", k_packed, k_scale, k_zero, group_size, key_axis)
    torch._check(tuple(v_packed.shape) == tuple(k_packed.shape),
                 lambda: f"v_packed shape {tuple(v_packed.shape)} != k_packed shape {tuple(k_packed.shape)}")
    _check_kv4_pool("v", v_packed, v_scale, v_zero, group_size, value_axis)
    torch._check(q.dim() == 3 and q.dtype in R.FLOAT_DTYPES, lambda: f"q must be float [B, Hq, D], got {q.dtype} {tuple(q.shape)}")
    torch._check(q.shape[2] == d, lambda: f"q head_dim {q.shape[2]} != pool head_dim {d}")
    torch._check(q.shape[1] % h == 0, lambda: f"q heads {q.shape[1]} not a multiple of kv heads {h}")
    s = block_tables.shape[0]
    torch._check(block_tables.dim() == 2 and block_tables.dtype == torch.int32,
                 lambda: f"block_tables must be int32 [S, MB], got {block_tables.dtype} {tuple(block_tables.shape)}")
    for nm, t in (("quant_lens", quant_lens), ("tail_lens", tail_lens)):
        torch._check(t.dim() == 1 and t.shape[0] == s and t.dtype == torch.int32,
                     lambda: f"{nm} must be int32 [{s}], got {t.dtype} {tuple(t.shape)}")
    torch._check(seq_ids.dim() == 1 and seq_ids.shape[0] == q.shape[0] and seq_ids.dtype == torch.int32,
                 lambda: f"seq_ids must be int32 [{q.shape[0]}], got {seq_ids.dtype} {tuple(seq_ids.shape)}")
    for nm, t in (("q", q), ("seq_ids", seq_ids), ("block_tables", block_tables), ("quant_lens", quant_lens),
                  ("tail_lens", tail_lens)):
        torch._check(t.device == k_packed.device, lambda: f"{nm} is on {t.device}, the pool on {k_packed.device}")
    for nm, t in (("tail_k", tail_k), ("tail_v", tail_v)):
        torch._check(t.dim() == 4 and t.shape[0] == s and t.shape[1] == h and t.shape[3] == d and t.dtype in R.FLOAT_DTYPES,
                     lambda: f"{nm} must be float [{s}, {h}, G, {d}], got {t.dtype} {tuple(t.shape)}")
    torch._check(num_splits >= 1, lambda: f"num_splits must be >= 1, got {num_splits}")


def _check_kv4_attn_query(q, k_packed, tail_k, seq_ids, num_splits):
    """The per-call part of :func:`_check_kv4_attn_args` (the query, the batch ids, the split count)
    for a caller that vouches for the pool tensors."""
    _, h, _, d2 = k_packed.shape
    torch._check(q.dim() == 3 and q.dtype in R.FLOAT_DTYPES, lambda: f"q must be float [B, Hq, D], got {q.dtype} {tuple(q.shape)}")
    torch._check(q.shape[2] == 2 * d2, lambda: f"q head_dim {q.shape[2]} != pool head_dim {2 * d2}")
    torch._check(q.shape[1] % h == 0, lambda: f"q heads {q.shape[1]} not a multiple of kv heads {h}")
    torch._check(q.device == k_packed.device, lambda: f"q is on {q.device}, the pool on {k_packed.device}")
    torch._check(seq_ids.dim() == 1 and seq_ids.shape[0] == q.shape[0] and seq_ids.dtype == torch.int32,
                 lambda: f"seq_ids must be int32 [{q.shape[0]}], got {seq_ids.dtype} {tuple(seq_ids.shape)}")
    torch._check(seq_ids.device == k_packed.device,
                 lambda: f"seq_ids are on {seq_ids.device}, the pool on {k_packed.device}")
    torch._check(num_splits >= 1, lambda: f"num_splits must be >= 1, got {num_splits}")


def _check_kv4_decode_append_rows(k, v, k_packed, slots):
    """The per-call part of the decode-append checks (the new rows and their slots)."""
    _, h, _, d2 = k_packed.shape
    for nm, t in (("k", k), ("v", v)):
        torch._check(t.dim() == 3 and t.dtype in R.FLOAT_DTYPES and tuple(t.shape[1:]) == (h, 2 * d2),
                     lambda: f"{nm} must be float [B, {h}, {2 * d2}], got {t.dtype} {tuple(t.shape)}")
        torch._check(t.device == k_packed.device, lambda: f"{nm} is on {t.device}, the pool on {k_packed.device}")
    torch._check(tuple(v.shape) == tuple(k.shape), lambda: f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    torch._check(slots.dim() == 1 and slots.shape[0] == k.shape[0] and slots.dtype == torch.int32,
                 lambda: f"slots must be int32 [{k.shape[0]}], got {slots.dtype} {tuple(slots.shape)}")
    torch._check(slots.device == k_packed.device, lambda: f"slots are on {slots.device}, the pool on {k_packed.device}")


def _check_kv4_decode_append_args(k, v, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v,
                                  block_tables, lens, slots, group_size, key_axis, value_axis):
    nb, h, bs, d = _check_kv4_pool("k", k_packed, k_scale, k_zero, group_size, key_axis)
    torch._check(tuple(v_packed.shape) == tuple(k_packed.shape),
                 lambda: f"v_packed shape {tuple(v_packed.shape)} != k_packed shape {tuple(k_packed.shape)}")
    _check_kv4_pool("v", v_packed, v_scale, v_zero, group_size, value_axis)
    _check_kv4_decode_append_rows(k, v, k_packed, slots)
    torch._check(block_tables.dim() == 2 and block_tables.dtype == torch.int32,
                 lambda: f"block_tables must be int32 [S, MB], got {block_tables.dtype} {tuple(block_tables.shape)}")
    s = block_tables.shape[0]
    torch._check(lens.dim() == 2 and tuple(lens.shape) == (2, s) and lens.dtype == torch.int32,
                 lambda: f"lens must be int32 [2, {s}] (quant, tail lengths), got {lens.dtype} {tuple(lens.shape)}")
    tg = group_size if "channel" in (key_axis, value_axis) else 0
    for nm, t in (("tail_k", tail_k), ("tail_v", tail_v)):
        torch._check(t.dim() == 4 and tuple(t.shape) == (s, h, tg, d) and t.dtype in R.FLOAT_DTYPES,
                     lambda: f"{nm} must be float [{s}, {h}, {tg}, {d}], got {t.dtype} {tuple(t.shape)}")
    for nm, t in (("block_tables", block_tables), ("lens", lens), ("tail_k", tail_k), ("tail_v", tail_v)):
        torch._check(t.device == k_packed.device, lambda: f"{nm} is on {t.device}, the pool on {k_packed.device}")


def _ref_kv4_quantize_append(x, packed, scale, zero, block_ids, offsets, group_size, axis):
    from .paged import kv4_quantize_append_reference

    kv4_quantize_append_reference(x, packed, scale, zero, block_ids, offsets, group_size, axis)


def _ref_kv4_decode_attention(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables,
                              quant_lens, tail_lens, seq_ids, group_size, key_axis, value_axis, sm_scale, num_splits):
    from .paged import kv4_decode_attention_reference

    # num_splits only changes the kernel's work partition, never the math
    return kv4_decode_attention_reference(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v,
                                          block_tables, quant_lens, tail_lens, seq_ids, group_size, key_axis,
                                          value_axis, sm_scale)


def _ref_kv4_decode_append(k, v, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables,
                           lens, slots, group_size, key_axis, value_axis):
    from .paged import kv4_decode_append_reference

    kv4_decode_append_reference(k, v, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v,
                                block_tables, lens, slots, group_size, key_axis, value_axis)


register_impl("kv4_quantize_append", "reference", _ref_kv4_quantize_append)
register_impl("kv4_decode_append", "reference", _ref_kv4_decode_append)
register_impl("kv4_decode_attention", "reference", _ref_kv4_decode_attention)


@torch.library.custom_op("cometq::kv4_quantize_append", mutates_args=("packed", "scale", "zero"))
def _kv4_quantize_append_op(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, block_ids: torch.Tensor,
    offsets: torch.Tensor, group_size: int, axis: str, backend: str,
) -> None:
    _check_kv4_append_args(x, packed, scale, zero, block_ids, offsets, group_size, axis)
    b = resolve_backend("kv4_quantize_append", packed.device, backend or None)
    _IMPLS["kv4_quantize_append"][b](x, packed, scale, zero, block_ids, offsets, group_size, axis)


@_kv4_quantize_append_op.register_fake
def _(x, packed, scale, zero, block_ids, offsets, group_size, axis, backend):
    _check_kv4_append_args(x, packed, scale, zero, block_ids, offsets, group_size, axis)
    return None


@torch.library.custom_op("cometq::kv4_decode_append",
                         mutates_args=("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero", "tail_k",
                                       "tail_v", "lens"))
def _kv4_decode_append_op(
    k: torch.Tensor, v: torch.Tensor, k_packed: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
    v_packed: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
    block_tables: torch.Tensor, lens: torch.Tensor, slots: torch.Tensor, group_size: int, key_axis: str,
    value_axis: str, backend: str,
) -> None:
    args = (k, v, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables, lens, slots,
            group_size, key_axis, value_axis)
    _check_kv4_decode_append_args(*args)
    _IMPLS["kv4_decode_append"][resolve_backend("kv4_decode_append", k_packed.device, backend or None)](*args)


@_kv4_decode_append_op.register_fake
def _(k, v, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables, lens, slots,
      group_size, key_axis, value_axis, backend):
    _check_kv4_decode_append_args(k, v, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v,
                                  block_tables, lens, slots, group_size, key_axis, value_axis)
    return None


@torch.library.custom_op("cometq::kv4_decode_attention", mutates_args=())
def _kv4_decode_attention_op(
    q: torch.Tensor, k_packed: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor, v_packed: torch.Tensor,
    v_scale: torch.Tensor, v_zero: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
    block_tables: torch.Tensor, quant_lens: torch.Tensor, tail_lens: torch.Tensor, seq_ids: torch.Tensor,
    group_size: int, key_axis: str, value_axis: str, sm_scale: float, num_splits: int, backend: str,
) -> torch.Tensor:
    _check_kv4_attn_args(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables,
                         quant_lens, tail_lens, seq_ids, group_size, key_axis, value_axis, num_splits)
    b = resolve_backend("kv4_decode_attention", q.device, backend or None)
    return _IMPLS["kv4_decode_attention"][b](q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v,
                                             block_tables, quant_lens, tail_lens, seq_ids, group_size, key_axis,
                                             value_axis, sm_scale, num_splits)


@_kv4_decode_attention_op.register_fake
def _(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables, quant_lens, tail_lens,
      seq_ids, group_size, key_axis, value_axis, sm_scale, num_splits, backend):
    _check_kv4_attn_args(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables,
                         quant_lens, tail_lens, seq_ids, group_size, key_axis, value_axis, num_splits)
    return torch.empty_like(q)


def _kv4_validate_eager(kind, fn, *args):
    # torch._check raises RuntimeError; eager callers get the ValueError the style guide asks for.
    # Under torch.compile the op's fake impl runs the same checks while tracing.
    if torch.compiler.is_compiling():
        return
    try:
        fn(*args)
    except RuntimeError as e:
        raise ValueError(f"{kind}: {e}") from None


def kv4_quantize_append(x, packed, scale, zero, block_ids, offsets, group_size: int, axis: str,
                        backend: Optional[str] = None) -> None:
    """Quantize rows ``x [n, H, T, D]`` into a paged KV4 pool in place (``torch.ops.cometq.kv4_quantize_append``)."""
    R.check_tensor("x", x, dtypes=R.FLOAT_DTYPES)
    _kv4_validate_eager("kv4_quantize_append", _check_kv4_append_args, x, packed, scale, zero, block_ids, offsets,
                        int(group_size), axis)
    if torch.compiler.is_compiling():
        torch.ops.cometq.kv4_quantize_append(x, packed, scale, zero, block_ids, offsets, int(group_size), axis,
                                             backend or "")
        return
    # eager: validated once above; the op layer would run the same checks again (its
    # dispatcher + torch._check cost ~as much as a decode step's kernel launches)
    b = resolve_backend("kv4_quantize_append", packed.device, backend or None)
    _IMPLS["kv4_quantize_append"][b](x, packed, scale, zero, block_ids, offsets, int(group_size), axis)


def kv4_decode_attention(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables,
                         quant_lens, tail_lens, seq_ids, group_size: int, key_axis: str, value_axis: str,
                         sm_scale: float, num_splits: int = 1, backend: Optional[str] = None, *,
                         check_pool: bool = True) -> torch.Tensor:
    """Decode attention over a paged KV4 pool (``torch.ops.cometq.kv4_decode_attention``); see cometq.paged.

    ``check_pool=False``: the caller built the pool tensors (k/v packed, scales, zeros, tails,
    block tables, lengths) and vouches for their shapes -- :class:`cometq.paged.MultiLayerKV4Pool`
    does, per layer per decode step, where the full check cost ~80 us of Python per call (a
    third of a layer's eager attention time with the kernels stubbed out).  ``q``, ``seq_ids``
    and ``num_splits`` are still checked, with the same messages."""
    R.check_tensor("q", q, dtypes=R.FLOAT_DTYPES)
    args = (q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables, quant_lens,
            tail_lens, seq_ids, int(group_size), key_axis, value_axis)
    if check_pool or torch.compiler.is_compiling():
        _kv4_validate_eager("kv4_decode_attention", _check_kv4_attn_args, *args, int(num_splits))
    else:
        _kv4_validate_eager("kv4_decode_attention", _check_kv4_attn_query, q, k_packed, tail_k, seq_ids,
                            int(num_splits))
    if torch.compiler.is_compiling():
        return torch.ops.cometq.kv4_decode_attention(*args, float(sm_scale), int(num_splits), backend or "")
    # eager: validated once above, straight to the backend (same impl the op would run)
    b = resolve_backend("kv4_decode_attention", q.device, backend or None)
    return _IMPLS["kv4_decode_attention"][b](*args, float(sm_scale), int(num_splits))


def kv4_decode_append(k, v, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables, lens,
                      slots, group_size: int, key_axis: str, value_axis: str, backend: Optional[str] = None, *,
                      check_pool: bool = True) -> None:
    """Append one decode token per sequence to a one-layer paged KV4 pool and advance its lengths,
    all on the device (``torch.ops.cometq.kv4_decode_append``; spec:
    :func:`cometq.paged.kv4_decode_append_reference`).  ``slots [B]`` int32, distinct, ``-1`` =
    padding row.  The caller guarantees every slot has the block its token lands in reserved
    (:class:`cometq.paged.MultiLayerKV4Pool` checks that on its host ledger); with nothing else
    read from the host, a CUDA graph can hold the call.  ``check_pool=False``: as for
    :func:`kv4_decode_attention`, only ``k``, ``v`` and ``slots`` are checked."""
    R.check_tensor("k", k, dtypes=R.FLOAT_DTYPES)
    args = (k, v, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v, block_tables, lens, slots,
            int(group_size), key_axis, value_axis)
    if check_pool or torch.compiler.is_compiling():
        _kv4_validate_eager("kv4_decode_append", _check_kv4_decode_append_args, *args)
    else:
        _kv4_validate_eager("kv4_decode_append", _check_kv4_decode_append_rows, k, v, k_packed, slots)
    if torch.compiler.is_compiling():
        torch.ops.cometq.kv4_decode_append(*args, backend or "")
        return
    _IMPLS["kv4_decode_append"][resolve_backend("kv4_decode_append", k_packed.device, backend or None)](*args)


# ==========================================================================
# paged full-precision decode attention (the FP16 serving baseline's pool,
# cometq.serve.kv.PagedFPPool; spec cometq.paged.paged_decode_attention_reference):
# * paged_decode_attention(q[B,Hq,D], k_cache[S,Hkv,D], v_cache[S,Hkv,D],
#       block_tables[B,NB] int, lengths[B] int, block_size, sm_scale, num_splits) -> [B,Hq,D]
# ==========================================================================
def _check_paged_attn_args(q, k_cache, v_cache, block_tables, lengths, block_size, num_splits):
    torch._check(q.dim() == 3 and q.dtype in R.FLOAT_DTYPES,
                 lambda: f"q must be a float [B, Hq, D] tensor, got {q.dtype} {tuple(q.shape)}")
    torch._check(k_cache.dim() == 3 and k_cache.dtype in R.FLOAT_DTYPES,
                 lambda: f"k_cache must be a float [slots, Hkv, D] tensor, got {k_cache.dtype} {tuple(k_cache.shape)}")
    torch._check(v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype,
                 lambda: f"v_cache {v_cache.dtype} {tuple(v_cache.shape)} must match k_cache {k_cache.dtype} "
                         f"{tuple(k_cache.shape)}")
    bsz, hq, d = q.shape
    torch._check(k_cache.shape[2] == d, lambda: f"k_cache head_dim {k_cache.shape[2]} != q head_dim {d} "
                                                f"(q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)})")
    torch._check(k_cache.shape[1] >= 1 and hq % k_cache.shape[1] == 0,
                 lambda: f"q heads {hq} must be a multiple of kv heads {k_cache.shape[1]}")
    torch._check(block_size >= 1, lambda: f"block_size must be >= 1, got {block_size}")
    torch._check(k_cache.shape[0] % block_size == 0,
                 lambda: f"k_cache holds {k_cache.shape[0]} slots, not a whole number of blocks of {block_size}")
    torch._check(block_tables.dim() == 2 and block_tables.shape[0] == bsz
                 and block_tables.dtype in (torch.int32, torch.int64),
                 lambda: f"block_tables must be int32/int64 [{bsz}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    torch._check(lengths.dim() == 1 and lengths.shape[0] == bsz and lengths.dtype in (torch.int32, torch.int64),
                 lambda: f"lengths must be int32/int64 [{bsz}], got {lengths.dtype} {tuple(lengths.shape)}")
    torch._check(num_splits >= 0, lambda: f"num_splits must be >= 0 (0 = default), got {num_splits}")
    for nm, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables), ("lengths", lengths)):
        torch._check(t.device == q.device, lambda nm=nm, t=t: f"{nm} is on {t.device}, q on {q.device}")


def _ref_paged_decode_attention(q, k_cache, v_cache, block_tables, lengths, block_size, sm_scale, num_splits):
    from .paged import paged_decode_attention_reference

    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, lengths, block_size, sm_scale)


register_impl("paged_decode_attention", "reference", _ref_paged_decode_attention)


@torch.library.custom_op("cometq::paged_decode_attention", mutates_args=())
def _paged_decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, lengths: torch.Tensor, block_size: int, sm_scale: float,
                               num_splits: int, backend: str) -> torch.Tensor:
    _check_paged_attn_args(q, k_cache, v_cache, block_tables, lengths, block_size, num_splits)
    return _impl("paged_decode_attention", q.device, backend)(q, k_cache, v_cache, block_tables, lengths, block_size,
                                                              sm_scale, num_splits)


@_paged_decode_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, lengths, block_size, sm_scale, num_splits, backend):
    _check_paged_attn_args(q, k_cache, v_cache, block_tables, lengths, block_size, num_splits)
    return torch.empty_like(q)


def paged_decode_attention(q, k_cache, v_cache, block_tables, lengths, block_size: int, sm_scale: float,
                           num_splits: int = 0, backend: Optional[str] = None) -> torch.Tensor:
    """Decode attention of one query per row over a paged full-precision K/V cache
    (``torch.ops.cometq.paged_decode_attention``; spec
    :func:`cometq.paged.paged_decode_attention_reference`): the FP16 serving baseline reads its
    pool in place instead of gathering a padded copy.  ``num_splits`` 0: the kernel's default
    (split the sequence only when the batch leaves SMs idle)."""
    R.check_tensor("q", q, dtypes=R.FLOAT_DTYPES)
    args = (q, k_cache, v_cache, block_tables, lengths, int(block_size))
    _kv4_validate_eager("paged_decode_attention", _check_paged_attn_args, *args, int(num_splits))
    if torch.compiler.is_compiling():
        return torch.ops.cometq.paged_decode_attention(*args, float(sm_scale), int(num_splits), backend or "")
    return _impl("paged_decode_attention", q.device, backend)(*args, float(sm_scale), int(num_splits))


# ==========================================================================
# Llama-layer elementwise ops (cometq.layers: references = the HF math; Triton
# kernels in kernels/layer_ops.py, registered by cometq.kernels._register_kv4):
# * rms_norm(x[T,C], weight[C], eps) -> y[T,C]
# * add_rms_norm(x[T,C], residual[T,C], weight[C], eps) -> (y, h = x + residual)
# * rope_qkv(qkv[T,(Hq+2Hkv)*D], cos[T,D], sin[T,D], n_q, n_kv) -> (q[T,Hq,D], k[T,Hkv,D], v[T,Hkv,D])
# * silu_mul(x[T,2I]) -> silu(x[:, :I]) * x[:, I:]
# ==========================================================================
def _check_layer_rows(name, x):
    torch._check(x.dim() == 2 and x.dtype in R.FLOAT_DTYPES,
                 lambda: f"{name} must be a float [T, C] tensor, got {x.dtype} {tuple(x.shape)}")


def _check_rms_norm_args(x, weight, eps):
    _check_layer_rows("x", x)
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[1] and weight.dtype in R.FLOAT_DTYPES,
                 lambda: f"weight must be float [{x.shape[1]}], got {weight.dtype} {tuple(weight.shape)}")
    torch._check(weight.device == x.device, lambda: f"weight is on {weight.device}, x on {x.device}")
    torch._check(eps >= 0.0, lambda: f"eps must be >= 0, got {eps}")


def _check_add_rms_norm_args(x, residual, weight, eps):
    _check_rms_norm_args(x, weight, eps)
    torch._check(residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device,
                 lambda: f"residual {residual.dtype} {tuple(residual.shape)} on {residual.device} must match x "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}")


def _check_rope_qkv_args(qkv, cos, sin, n_q, n_kv):
    _check_layer_rows("qkv", qkv)
    torch._check(n_q >= 1 and n_kv >= 1 and n_q % n_kv == 0,
                 lambda: f"n_q / n_kv must be >= 1 with n_q a multiple of n_kv, got {n_q} / {n_kv}")
    heads = n_q + 2 * n_kv
    torch._check(qkv.shape[1] % heads == 0 and (qkv.shape[1] // heads) % 2 == 0,
                 lambda: f"qkv width {qkv.shape[1]} is not (n_q + 2 n_kv) = {heads} heads of an even head_dim")
    d = qkv.shape[1] // heads
    for nm, t in (("cos", cos), ("sin", sin)):
        torch._check(t.shape == (qkv.shape[0], d) and t.dtype == qkv.dtype and t.device == qkv.device,
                     lambda: f"{nm} must be {qkv.dtype} [{qkv.shape[0]}, {d}] on {qkv.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


def _check_silu_mul_args(x):
    _check_layer_rows("x", x)
    torch._check(x.shape[1] % 2 == 0, lambda: f"x must be [T, 2I] (gate | up), got {tuple(x.shape)}")


def _ref_rms_norm(x, weight, eps):
    from .layers import rms_norm_reference

    return rms_norm_reference(x, weight, eps)


def _ref_add_rms_norm(x, residual, weight, eps):
    from .layers import add_rms_norm_reference

    return add_rms_norm_reference(x, residual, weight, eps)


def _ref_rope_qkv(qkv, cos, sin, n_q, n_kv):
    from .layers import rope_qkv_reference

    return rope_qkv_reference(qkv, cos, sin, n_q, n_kv)


def _ref_silu_mul(x):
    from .layers import silu_mul_reference

    return silu_mul_reference(x)


register_impl("rms_norm", "reference", _ref_rms_norm)
register_impl("add_rms_norm", "reference", _ref_add_rms_norm)
register_impl("rope_qkv", "reference", _ref_rope_qkv)
register_impl("silu_mul", "reference", _ref_silu_mul)


def _impl(op: str, device, backend: str):
    return _IMPLS[op][resolve_backend(op, device, backend or None)]


@torch.library.custom_op("cometq::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    _check_rms_norm_args(x, weight, eps)
    return _impl("rms_norm", x.device, backend)(x.contiguous(), weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps, backend):
    _check_rms_norm_args(x, weight, eps)
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("cometq::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_add_rms_norm_args(x, residual, weight, eps)
    return _impl("add_rms_norm", x.device, backend)(x.contiguous(), residual.contiguous(), weight, eps)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, backend):
    _check_add_rms_norm_args(x, residual, weight, eps)
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), torch.empty_like(x)


@torch.library.custom_op("cometq::rope_qkv", mutates_args=())
def _rope_qkv_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int,
                 backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_rope_qkv_args(qkv, cos, sin, n_q, n_kv)
    return _impl("rope_qkv", qkv.device, backend)(qkv.contiguous(), cos.contiguous(), sin.contiguous(), n_q, n_kv)


@_rope_qkv_op.register_fake
def _(qkv, cos, sin, n_q, n_kv, backend):
    _check_rope_qkv_args(qkv, cos, sin, n_q, n_kv)
    t, d = qkv.shape[0], qkv.shape[1] // (n_q + 2 * n_kv)
    return qkv.new_empty(t, n_q, d), qkv.new_empty(t, n_kv, d), qkv.new_empty(t, n_kv, d)


@torch.library.custom_op("cometq::silu_mul", mutates_args=())
def _silu_mul_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    _check_silu_mul_args(x)
    return _impl("silu_mul", x.device, backend)(x.contiguous())


@_silu_mul_op.register_fake
def _(x, backend):
    _check_silu_mul_args(x)
    return x.new_empty(x.shape[0], x.shape[1] // 2)


def _layer_op(op: str, check, args, device, backend):
    """Eager: validate once (ValueError naming the bad value), then straight to the backend;
    under torch.compile: the custom op (its fake impl carries the same checks)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.cometq, op)(*args, backend or "")
    _kv4_validate_eager(op, check, *args)
    fn = _IMPLS[op][resolve_backend(op, device, backend)]
    return fn(*[a.contiguous() if isinstance(a, torch.Tensor) and a.dim() == 2 else a for a in args])


def layer_op_impl(op: str, device, backend: Optional[str] = None) -> Callable:
    """The backend function of a layer op (``rms_norm``, ``add_rms_norm``, ``rope_qkv``,
    ``silu_mul``) for ``device``, to call without the per-call checks -- for a caller that
    builds the arguments itself (the serving runner: four calls per layer per step, where the
    checks cost about as much Python as the kernel launch).  Same arguments as the op minus
    ``backend``; the Triton launchers still check the layouts they launch on."""
    if op not in ("rms_norm", "add_rms_norm", "rope_qkv", "silu_mul"):
        raise ValueError(f"not a layer op: {op!r}")
    return _IMPLS[op][resolve_backend(op, device, backend)]


def rms_norm(x, weight, eps: float, backend: Optional[str] = None) -> torch.Tensor:
    """``LlamaRMSNorm`` of ``x [T, C]`` as one kernel (``torch.ops.cometq.rms_norm``; spec :mod:`cometq.layers`)."""
    R.check_tensor("x", x, dtypes=R.FLOAT_DTYPES)
    return _layer_op("rms_norm", _check_rms_norm_args, (x, weight, float(eps)), x.device, backend)


def add_rms_norm(x, residual, weight, eps: float, backend: Optional[str] = None):
    """``h = x + residual``, ``(rms_norm(h), h)`` as one kernel (``torch.ops.cometq.add_rms_norm``)."""
    R.check_tensor("x", x, dtypes=R.FLOAT_DTYPES)
    return _layer_op("add_rms_norm", _check_add_rms_norm_args, (x, residual, weight, float(eps)), x.device, backend)


def rope_qkv(qkv, cos, sin, n_q: int, n_kv: int, backend: Optional[str] = None):
    """Fused q/k/v projection output -> RoPE'd ``q``, ``k`` and ``v`` heads, contiguous
    (``torch.ops.cometq.rope_qkv``; spec :func:`cometq.layers.rope_qkv_reference`)."""
    R.check_tensor("qkv", qkv, dtypes=R.FLOAT_DTYPES)
    return _layer_op("rope_qkv", _check_rope_qkv_args, (qkv, cos, sin, int(n_q), int(n_kv)), qkv.device, backend)


def silu_mul(x, backend: Optional[str] = None) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up output ``[T, 2I]`` (``torch.ops.cometq.silu_mul``)."""
    R.check_tensor("x", x, dtypes=R.FLOAT_DTYPES)
    return _layer_op("silu_mul", _check_silu_mul_args, (x,), x.device, backend)
