"""Register the Triton KV4 implementations -- and the Llama-layer elementwise kernels the
serving runner uses beside them (``layer_ops.py``) -- into :mod:`cometq.ops` (imported lazily by ops).

Separate from ``_register.py`` (owned by the GEMM kernels) so the two features
can evolve independently; ``cometq.ops._LAZY["triton"]`` imports both.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401
except Exception as e:  # pragma: no cover - exercised where triton is absent
    raise ImportError(f"the cometq triton backend needs triton: {type(e).__name__}: {e}") from e

from cometq.ops import register_impl

from .kv4_append import kv4_decode_append_triton, kv4_quantize_append_triton
from .kv4_attention import kv4_decode_attention_triton
from .layer_ops import add_rms_norm_triton, rms_norm_triton, rope_qkv_triton, silu_mul_triton
from .paged_attention import paged_decode_attention_triton

register_impl("kv4_quantize_append", "triton", kv4_quantize_append_triton)
register_impl("kv4_decode_attention", "triton", kv4_decode_attention_triton)
register_impl("kv4_decode_append", "triton", kv4_decode_append_triton)
register_impl("paged_decode_attention", "triton", paged_decode_attention_triton)
register_impl("rms_norm", "triton", rms_norm_triton)
register_impl("add_rms_norm", "triton", add_rms_norm_triton)
register_impl("rope_qkv", "triton", rope_qkv_triton)
register_impl("silu_mul", "triton", silu_mul_triton)
