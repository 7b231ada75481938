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
variable > ``"auto"`` (cuda, then triton, then reference, on CUDA tensors;
reference on CPU).  Asking for a backend that cannot run raises a clear error.

Tensor-level signatures (the dataclasses of :mod:`cometq.reference` are
unpacked into plain tensors so the ops are traceable):

* ``quantize_act(x[M,K], perm[K], block_bits[NB], n_int8, scale_mode) -> (q4, q8, scales)``
* ``w4ax_gemm(q4, q8, a_scales, block_bits, qweight, w_scales, group_size, bias?, out_dtype, scale_mode) -> y[M,N]``
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference as R
from .layout import BLOCK_K, SCALE_MODES, ActivationLayout, padded_k

__all__ = [
    "BACKENDS",
    "register_impl",
    "registered_backends",
    "resolve_backend",
    "quantize_act",
    "w4ax_gemm",
    "quantize_activation",
    "w4ax_gemm_q",
]

BACKENDS = ("auto", "reference", "triton", "cuda")
_ENV = "COMETQ_BACKEND"

# op name -> backend -> implementation (same signature as the op)
_IMPLS: Dict[str, Dict[str, Callable]] = {}
_LAZY = {"triton": "cometq.kernels._register", "cuda": "cometq._cuda_register"}
_LAZY_ERRORS: Dict[str, str] = {}


def register_impl(op: str, backend: str, fn: Callable) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = fn


def _load_backend(backend: str) -> None:
    mod = _LAZY.get(backend)
    if mod is None or backend in _LAZY_ERRORS:
        return
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


def resolve_backend(op: str, device: torch.device, requested: Optional[str] = None) -> str:
    """Pick the backend that runs ``op`` on ``device`` (see module doc)."""
    req = requested or os.environ.get(_ENV, "auto")
    if req not in BACKENDS:
        raise ValueError(f"unknown backend {req!r} (from {'argument' if requested else _ENV}); choose one of {BACKENDS}")
    device = torch.device(device)
    if req == "auto":
        if device.type == "cuda":
            for b in ("cuda", "triton"):
                _load_backend(b)
                if b in _IMPLS.get(op, {}):
                    return b
        return "reference"
    if req != "reference":
        _load_backend(req)
        if req not in _IMPLS.get(op, {}):
            why = _LAZY_ERRORS.get(req, "no implementation registered")
            raise RuntimeError(f"backend {req!r} is not available for op {op!r}: {why}")
        if device.type != "cuda" and not (req == "triton" and _triton_on_cpu_ok()):
            raise RuntimeError(
                f"backend {req!r} needs a CUDA tensor for op {op!r}, got device {device} "
                f"(the triton backend runs on CPU only with TRITON_INTERPRET=1)"
            )
    return req


# --------------------------------------------------------------------------
# reference implementations (tensor-level), registered as the "reference" backend
# --------------------------------------------------------------------------
def _layout_from(perm: torch.Tensor, block_bits: torch.Tensor) -> ActivationLayout:
    return ActivationLayout(perm, block_bits)


def _ref_quantize_act(x, perm, block_bits, n_int8: int, scale_mode: str):
    qa = R.quantize_activation(x, _layout_from(perm, block_bits), scale_mode)
    return qa.q4, qa.q8, qa.scales


def _ref_w4ax_gemm(q4, q8, a_scales, block_bits, qweight, w_scales, group_size, bias, out_dtype, scale_mode):
    k_pad = qweight.shape[1] * 2
    # the GEMM never needs the permutation: it was applied at quantize time and
    # folded into the weight columns.  K is only known up to padding here.
    lay = ActivationLayout(torch.arange(k_pad, device=qweight.device), block_bits)
    qa = R.QuantizedActivation(q4, q8, a_scales, lay, scale_mode)
    qw = R.QuantizedWeight(qweight, w_scales, k_pad, group_size)
    return R.w4ax_gemm(qa, qw, bias, out_dtype)


register_impl("quantize_act", "reference", _ref_quantize_act)
register_impl("w4ax_gemm", "reference", _ref_w4ax_gemm)


# --------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def _check_quantize_act_args(x, perm, block_bits, n_int8, scale_mode):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    torch._check(perm.dim() == 1 and perm.shape[0] == x.shape[1],
                 lambda: f"perm shape {tuple(perm.shape)} must be ({x.shape[1]},) for x shape {tuple(x.shape)}")
    nb = padded_k(int(x.shape[1])) // BLOCK_K
    torch._check(block_bits.dim() == 1 and block_bits.shape[0] == nb,
                 lambda: f"block_bits shape {tuple(block_bits.shape)} must be ({nb},) for K={x.shape[1]}")
    torch._check(0 <= n_int8 <= nb, lambda: f"n_int8={n_int8} out of range [0, {nb}]")
    torch._check(scale_mode in SCALE_MODES, lambda: f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    return nb


@torch.library.custom_op("cometq::quantize_act", mutates_args=())
def _quantize_act_op(
    x: torch.Tensor, perm: torch.Tensor, block_bits: torch.Tensor, n_int8: int, scale_mode: str, backend: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_quantize_act_args(x, perm, block_bits, n_int8, scale_mode)
    b = resolve_backend("quantize_act", x.device, backend or None)
    return _IMPLS["quantize_act"][b](x, perm, block_bits, n_int8, scale_mode)


@_quantize_act_op.register_fake
def _(x, perm, block_bits, n_int8, scale_mode, backend):
    nb = _check_quantize_act_args(x, perm, block_bits, n_int8, scale_mode)
    m = x.shape[0]
    q4 = x.new_empty((m, (nb - n_int8) * BLOCK_K // 2), dtype=torch.uint8)
    q8 = x.new_empty((m, n_int8 * BLOCK_K), dtype=torch.int8)
    scales = x.new_empty((m, nb if scale_mode == "block" else 2), dtype=torch.float32)
    return q4, q8, scales


def _check_gemm_args(q4, q8, a_scales, block_bits, qweight, w_scales, group_size, bias, out_dtype_code, scale_mode):
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
    group_size: int,
    bias: Optional[torch.Tensor],
    out_dtype_code: int,
    scale_mode: str,
    backend: str,
) -> torch.Tensor:
    _check_gemm_args(q4, q8, a_scales, block_bits, qweight, w_scales, group_size, bias, out_dtype_code, scale_mode)
    b = resolve_backend("w4ax_gemm", qweight.device, backend or None)
    return _IMPLS["w4ax_gemm"][b](
        q4, q8, a_scales, block_bits, qweight, w_scales, group_size, bias, _CODE_DTYPES[out_dtype_code], scale_mode
    )


@_w4ax_gemm_op.register_fake
def _(q4, q8, a_scales, block_bits, qweight, w_scales, group_size, bias, out_dtype_code, scale_mode, backend):
    m, n = _check_gemm_args(q4, q8, a_scales, block_bits, qweight, w_scales, group_size, bias, out_dtype_code, scale_mode)
    return qweight.new_empty((m, n), dtype=_CODE_DTYPES[out_dtype_code])


# --------------------------------------------------------------------------
# Python-level entry points
# --------------------------------------------------------------------------
def quantize_act(x, perm, block_bits, n_int8: int, scale_mode: str = "block", backend: Optional[str] = None):
    """Tensor-level activation quantization through ``torch.ops.cometq.quantize_act``."""
    return torch.ops.cometq.quantize_act(x, perm, block_bits, int(n_int8), scale_mode, backend or "")


def w4ax_gemm(q4, q8, a_scales, block_bits, qweight, w_scales, group_size: int, bias=None,
              out_dtype: torch.dtype = torch.float16, scale_mode: str = "block", backend: Optional[str] = None):
    """Tensor-level W4Ax GEMM through ``torch.ops.cometq.w4ax_gemm``."""
    if out_dtype not in _DTYPE_CODES:
        raise TypeError(f"out_dtype must be one of {tuple(_DTYPE_CODES)}, got {out_dtype}")
    return torch.ops.cometq.w4ax_gemm(
        q4, q8, a_scales, block_bits, qweight, w_scales, int(group_size), bias, _DTYPE_CODES[out_dtype], scale_mode, backend or ""
    )


def quantize_activation(x: torch.Tensor, layout: ActivationLayout, scale_mode: str = "block",
                        backend: Optional[str] = None) -> R.QuantizedActivation:
    """Dataclass-level :func:`quantize_act` (same contract as the reference function)."""
    R.check_tensor("x", x, dtypes=R.FLOAT_DTYPES, ndim=2)
    q4, q8, sc = quantize_act(x, layout.perm, layout.block_bits, layout.n_int8, scale_mode, backend)
    return R.QuantizedActivation(q4, q8, sc, layout, scale_mode)


def w4ax_gemm_q(qa: R.QuantizedActivation, qw: R.QuantizedWeight, bias=None,
                out_dtype: torch.dtype = torch.float16, backend: Optional[str] = None) -> torch.Tensor:
    """Dataclass-level :func:`w4ax_gemm`."""
    R._check_gemm_operands(qa, qw)
    gs = qw.group_size if qw.group_size not in (None, -1) else -1
    return w4ax_gemm(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, gs, bias,
                     out_dtype, qa.scale_mode, backend)
