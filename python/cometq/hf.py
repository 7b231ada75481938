"""Hugging Face ``transformers`` integration: ``from_pretrained`` of a cometq checkpoint.

``import cometq`` does not import transformers.  It installs a post-import hook
(:func:`install_import_hook`): when transformers is (or already was) imported,
:func:`register` registers

* ``CometqQuantizationConfig`` (a ``QuantizationConfigMixin``, ``quant_method="cometq"``)
  with ``register_quantization_config``, and
* ``CometqHfQuantizer`` (an ``HfQuantizer``) with ``register_quantizer``,

so ``AutoModelForCausalLM.from_pretrained(dir)`` of a directory written by
:func:`cometq.checkpoint.save_quantized` rebuilds the quantized model: the
quantizer swaps every target ``nn.Linear`` for an empty :class:`W4AxLinear`
while the model is on the meta device, checks the checkpoint's tensor names,
shapes and dtypes against it *before* any weight is loaded (so a bad file
raises instead of leaving random or half-loaded weights), keeps ``w_scales`` in
float32 whatever ``dtype=`` is asked for, and validates every layout after
loading.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Dict, List, Optional

__all__ = ["register", "install_import_hook", "check_checkpoint_against_model", "CheckpointError"]

_STATE: Dict[str, object] = {"registered": False, "classes": None}


class CheckpointError(ValueError):
    """A cometq checkpoint does not match the model it is loaded into (or is corrupted)."""


# safetensors dtype strings of the tensors cometq owns
_ST_DTYPES = {
    "U8": "torch.uint8", "I8": "torch.int8", "I16": "torch.int16", "I32": "torch.int32", "I64": "torch.int64",
    "F16": "torch.float16", "BF16": "torch.bfloat16", "F32": "torch.float32", "F64": "torch.float64", "BOOL": "torch.bool",
}
_STRICT_DTYPE_SUFFIXES = (".qweight", ".w_scales", ".w_offsets", ".act_clip", ".perm", ".block_bits")


def check_checkpoint_against_model(model, checkpoint_files: List[str], allowed_missing=()) -> None:
    """Compare safetensors headers with ``model.state_dict()`` (meta is fine); raise :class:`CheckpointError`.

    Names must match exactly (``allowed_missing``: tied weights); shapes must match;
    the cometq tensors (qweight/w_scales/perm/block_bits) must have their exact dtypes.
    """
    from safetensors import safe_open

    expected = {k: v for k, v in model.state_dict().items()}
    found: Dict[str, tuple] = {}
    for f in checkpoint_files:
        if not str(f).endswith(".safetensors"):
            raise CheckpointError(f"cometq checkpoints are safetensors files, got {f}")
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    found[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except CheckpointError:
            raise
        except Exception as e:  # truncated/corrupted file
            raise CheckpointError(f"cannot read checkpoint file {f}: {type(e).__name__}: {e}") from None
    missing = sorted(k for k in expected if k not in found and k not in set(allowed_missing))
    extra = sorted(k for k in found if k not in expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[:4]})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors (e.g. {extra[:4]})")
    for k, (shape, dt) in sorted(found.items()):
        if k not in expected:
            continue
        want = expected[k]
        if tuple(want.shape) != shape:
            problems.append(f"{k}: shape {shape} in the checkpoint, model expects {tuple(want.shape)}")
        if k.endswith(_STRICT_DTYPE_SUFFIXES) and _ST_DTYPES.get(dt) != str(want.dtype):
            problems.append(f"{k}: dtype {dt} in the checkpoint, model expects {want.dtype}")
    if problems:
        raise CheckpointError("cometq checkpoint does not match the model: " + "; ".join(problems[:8]))


def _define_classes():
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .config import QUANT_METHOD, W4AxConfig

    class CometqQuantizationConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a cometq checkpoint (a serialized :class:`W4AxConfig`)."""

        def __init__(self, **kwargs):
            qm = kwargs.pop("quant_method", QUANT_METHOD)
            if qm != QUANT_METHOD:
                raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {qm!r}")
            cfg = W4AxConfig.from_dict(kwargs)  # validates, refuses unknown format_version
            self.quant_method = QUANT_METHOD
            for k, v in cfg.to_dict().items():
                setattr(self, k, v)

        @classmethod
        def from_w4ax(cls, cfg: "W4AxConfig") -> "CometqQuantizationConfig":
            return cls(**cfg.to_dict())

        def w4ax_config(self) -> W4AxConfig:
            d = {k: v for k, v in self.to_dict().items()}
            return W4AxConfig.from_dict(d)

    class CometqHfQuantizer(HfQuantizer):
        """Loads cometq W4Ax checkpoints (pre-quantized only: quantize with ``cometq.quantize_``)."""

        requires_calibration = True

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)

        def validate_environment(self, *args, **kwargs):
            return

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from .nn import W4AxLinear
            from .quantize import _set_module, target_linears

            cfg = self.quantization_config.w4ax_config()
            for n in target_linears(model, cfg):
                lin = model.get_submodule(n)
                new = W4AxLinear(
                    lin.in_features, lin.out_features, bias=lin.bias is not None, group_size=cfg.group_size,
                    act_bits=cfg.act_bits, scale_mode=cfg.scale_mode, backend=cfg.backend,
                    bias_dtype=lin.weight.dtype, asym=not cfg.weight_sym, device=lin.weight.device,
                )
                _set_module(model, n, new)
            # scales must stay float32 under dtype=float16/bfloat16
            strict = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
            strict.update(("w_scales", "w_offsets", "act_clip"))
            model._keep_in_fp32_modules_strict = strict
            if checkpoint_files:
                tied = getattr(model, "all_tied_weights_keys", None) or {}
                check_checkpoint_against_model(model, list(checkpoint_files), allowed_missing=tuple(tied))
            model.cometq_config = cfg
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .nn import W4AxLinear

            for n, m in model.named_modules():
                if isinstance(m, W4AxLinear):
                    if m.perm.device.type == "meta" or m.qweight.device.type == "meta":
                        raise CheckpointError(f"{n}: quantized tensors were not loaded")
                    try:
                        m.layout()
                    except (ValueError, TypeError) as e:
                        raise CheckpointError(f"{n}: corrupted activation layout: {e}") from None
                    if m.act_bits in (4, 8) and bool((m.block_bits != m.act_bits).any()):
                        raise CheckpointError(f"{n}: block_bits disagree with act_bits={m.act_bits}")
            model.cometq_config = self.quantization_config.w4ax_config()
            return model

        def is_serializable(self):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    return CometqQuantizationConfig, CometqHfQuantizer


def register() -> bool:
    """Register the cometq config + quantizer with transformers (idempotent). False if unavailable."""
    if _STATE["registered"]:
        return True
    try:
        from transformers.quantizers import auto as hf_auto
    except ImportError:
        return False
    from .config import QUANT_METHOD

    cfg_cls, q_cls = _define_classes()
    # idempotent across reloads: only register what is not there yet
    if QUANT_METHOD not in hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        hf_auto.register_quantization_config(QUANT_METHOD)(cfg_cls)
    else:
        cfg_cls = hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]
    if QUANT_METHOD not in hf_auto.AUTO_QUANTIZER_MAPPING:
        hf_auto.register_quantizer(QUANT_METHOD)(q_cls)
    else:
        q_cls = hf_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD]
    _STATE["classes"] = (cfg_cls, q_cls)
    _STATE["registered"] = True
    return True


def __getattr__(name):
    if name in ("CometqQuantizationConfig", "CometqHfQuantizer"):
        if not register():
            raise ImportError(f"{name} needs transformers")
        return _STATE["classes"][0 if name == "CometqQuantizationConfig" else 1]
    raise AttributeError(name)


def _register_quietly() -> None:
    try:
        register()
    except Exception as e:  # never break `import transformers`
        warnings.warn(f"cometq: could not register the transformers quantizer: {type(e).__name__}: {e}")


class _TransformersImportHook(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after ``transformers`` finishes importing."""

    def __init__(self):
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        orig = spec.loader.exec_module
        hook = self

        def exec_module(module):
            orig(module)
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)
            _register_quietly()

        spec.loader.exec_module = exec_module
        return spec


def install_import_hook() -> None:
    """Register now if transformers is already imported, else when it gets imported."""
    if "transformers" in sys.modules:
        _register_quietly()
        return
    if not any(isinstance(h, _TransformersImportHook) for h in sys.meta_path):
        sys.meta_path.insert(0, _TransformersImportHook())
