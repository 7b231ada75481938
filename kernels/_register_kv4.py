"""Register the Triton KV4 implementations into :mod:`cometq.ops` (imported lazily by ops).

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

register_impl("kv4_quantize_append", "triton", kv4_quantize_append_triton)
register_impl("kv4_decode_attention", "triton", kv4_decode_attention_triton)
register_impl("kv4_decode_append", "triton", kv4_decode_append_triton)
