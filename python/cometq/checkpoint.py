"""Saving and loading quantized models (safetensors + versioned JSON config).

A saved directory holds:

* ``model.safetensors``: the state dict (each :class:`W4AxLinear` contributes
  ``qweight`` uint8, ``w_scales`` float32, ``w_offsets`` float32 (asymmetric weights
  only), ``act_clip`` float32 ``[1]``, ``perm`` int64, ``block_bits`` int32 and
  optionally ``bias``; unquantized modules keep their tensors);
* ``config.json``: the model's Hugging Face config with ``quantization_config`` =
  the :class:`W4AxConfig` dict (``quant_method: "cometq"``, ``format_version``);
* ``cometq_config.json``: the same config, plus the cometq version that wrote it;
* the tokenizer files when a tokenizer is given.

``AutoModelForCausalLM.from_pretrained(dir)`` loads it after ``import cometq``
(see :mod:`cometq.hf`); :func:`load_quantized` is the same call with the
registration made explicit and the format version checked first.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from .config import FORMAT_VERSION, QUANT_METHOD, W4AxConfig
from .nn import W4AxLinear

__all__ = ["save_quantized", "load_quantized", "read_cometq_config", "COMETQ_CONFIG_NAME"]

COMETQ_CONFIG_NAME = "cometq_config.json"


def _model_config(model: nn.Module) -> W4AxConfig:
    cfg = getattr(model, "cometq_config", None)
    if isinstance(cfg, W4AxConfig):
        return cfg
    raise ValueError(
        f"{type(model).__name__} carries no cometq config: quantize it with cometq.quantize_ "
        "(or load it with cometq.load_quantized) before saving"
    )


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns its storage: safetensors refuses tensors sharing memory, which row
    views do (e.g. the projections a serving runner fused, ``cometq.nn.fuse_linears``)."""
    t = t.detach().contiguous().cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def save_quantized(model: nn.Module, *args, tokenizer=None, save_directory: Optional[str] = None) -> str:
    """Save a model quantized by :func:`cometq.quantize_`.

    Call as ``save_quantized(model, dir)``, ``save_quantized(model, tokenizer, dir)``
    or with keywords.  Returns the directory.
    """
    if len(args) == 1:
        save_directory = args[0] if save_directory is None else save_directory
    elif len(args) == 2:
        tokenizer, save_directory = args
    elif len(args) > 2:
        raise TypeError("save_quantized(model, [tokenizer,] save_directory)")
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path, got {save_directory!r}")
    cfg = _model_config(model)
    if not any(isinstance(m, W4AxLinear) for m in model.modules()):
        raise ValueError("the model has no W4AxLinear layers: nothing quantized to save")
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "quant_method": QUANT_METHOD, "config": cfg.to_dict()}
    try:
        from . import __version__

        meta["cometq_version"] = __version__
    except ImportError:  # pragma: no cover
        pass

    hf_config = getattr(model, "config", None)
    if hasattr(model, "save_pretrained") and hf_config is not None:
        from .hf import register

        if not register():
            raise ImportError("saving a transformers model needs transformers")
        from .hf import CometqQuantizationConfig

        old = getattr(hf_config, "quantization_config", None)
        hf_config.quantization_config = CometqQuantizationConfig.from_w4ax(cfg)
        try:
            model.save_pretrained(save_directory, safe_serialization=True)
        finally:
            if old is None:
                try:
                    del hf_config.quantization_config
                except AttributeError:
                    pass
            else:
                hf_config.quantization_config = old
    else:
        from safetensors.torch import save_file

        sd = {k: _owned(v) for k, v in model.state_dict().items()}
        save_file(sd, os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(save_directory, COMETQ_CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    return save_directory


def read_cometq_config(directory: str) -> W4AxConfig:
    """The :class:`W4AxConfig` of a saved directory (clear errors for missing/unknown versions)."""
    path = os.path.join(directory, COMETQ_CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no {COMETQ_CONFIG_NAME}: not a cometq checkpoint")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or "format_version" not in meta or "config" not in meta:
        raise ValueError(f"{path} lacks format_version/config: not a cometq checkpoint config")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"unknown cometq format_version {meta['format_version']!r} in {path}: this cometq reads version {FORMAT_VERSION}"
        )
    return W4AxConfig.from_dict(meta["config"])


def load_quantized(directory: str, *, dtype=None, device: Optional[str] = None, **kwargs):
    """Load a directory written by :func:`save_quantized` (a transformers causal LM).

    Same as ``AutoModelForCausalLM.from_pretrained(directory)`` after ``import cometq``,
    with the format version checked first.  ``dtype`` defaults to float32.
    """
    read_cometq_config(directory)  # version / presence check before anything is built
    from .hf import register

    if not register():
        raise ImportError("load_quantized needs transformers")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()
