"""Register the Triton implementations into :mod:`cometq.ops` (imported lazily by ops).

Importing this module raises ImportError where triton is missing, which
``cometq.ops`` reports when the "triton" backend is asked for.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401
except Exception as e:  # pragma: no cover - exercised where triton is absent
    raise ImportError(f"the cometq triton backend needs triton: {type(e).__name__}: {e}") from e

from cometq.ops import register_impl

from .act_quant import fake_quant_act_triton, quantize_act_triton
from .w4ax_gemm import w4ax_gemm_triton
from .w16_gemm import w16_gemm


def _triton_quantize_act(x, perm, block_bits, n_int8: int, scale_mode: str, int4_clip: float = 1.0):
    return quantize_act_triton(x, perm, block_bits, n_int8, scale_mode, int4_clip=float(int4_clip))


def _triton_fake_quant_act(x, perm, block_bits, n_int8: int, scale_mode: str, int4_clip: float, out_dtype):
    return fake_quant_act_triton(x, perm, block_bits, n_int8, scale_mode, out_dtype=out_dtype,
                                 int4_clip=float(int4_clip))


def _triton_w4ax_gemm(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, group_size, bias, out_dtype,
                      scale_mode):
    return w4ax_gemm_triton(q4, q8, a_scales, block_bits, qweight, w_scales, group_size, bias, out_dtype, scale_mode,
                            w_offsets=w_offsets)


register_impl("quantize_act", "triton", _triton_quantize_act)
register_impl("fake_quant_act", "triton", _triton_fake_quant_act)
register_impl("w4ax_gemm", "triton", _triton_w4ax_gemm)
register_impl("w16_gemm", "triton", w16_gemm)
