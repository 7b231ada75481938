"""cometq: W4Ax-KV4 inference (INT4 weights, mixed INT4/INT8 activations, 4-bit KV cache)."""
from . import layout, reference
from .layout import BLOCK_K, ActivationLayout
from .reference import QuantizedActivation, QuantizedWeight, KV4Tensor

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "layout",
    "reference",
    "BLOCK_K",
    "ActivationLayout",
    "QuantizedActivation",
    "QuantizedWeight",
    "KV4Tensor",
]
