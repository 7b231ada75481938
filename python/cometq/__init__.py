"""cometq: W4Ax-KV4 inference (INT4 weights, mixed INT4/INT8 activations, 4-bit KV cache)."""
from . import layout, reference
from .layout import BLOCK_K, ActivationLayout
from .reference import QuantizedActivation, QuantizedWeight, KV4Tensor
from .config import W4AxConfig, register_quantize_handler

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "layout",
    "reference",
    "BLOCK_K",
    "ActivationLayout",
    "QuantizedActivation",
    "QuantizedWeight",
    "KV4Tensor",
    "W4AxConfig",
    "register_quantize_handler",
    "quantize_",
    "W4AxLinear",
    "save_quantized",
    "load_quantized",
    "KV4Cache",
]

# Heavier pieces load on first use; `import cometq` never imports transformers.
_LAZY = {
    "quantize_": ("quantize", "quantize_"),
    "W4AxLinear": ("nn", "W4AxLinear"),
    "save_quantized": ("checkpoint", "save_quantized"),
    "load_quantized": ("checkpoint", "load_quantized"),
    "KV4Cache": ("kvcache", "KV4Cache"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'cometq' has no attribute {name!r}")


# Register the transformers quantizer as soon as transformers is imported (or now,
# if it already is), so AutoModelForCausalLM.from_pretrained reads cometq checkpoints.
from .hf import install_import_hook as _install_hf_hook  # noqa: E402

_install_hf_hook()
