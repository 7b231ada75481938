"""``W4AxConfig``: what :func:`cometq.quantize_` does to a model, and how it is saved.

One frozen dataclass, validated in ``__post_init__`` (bad values raise
ValueError/TypeError naming the field and the value).  ``to_dict``/``from_dict``
round-trip through JSON; the dict is what a checkpoint's ``config.json`` carries
as ``quantization_config`` (with ``quant_method: "cometq"``).

A small registry maps config types to the function that applies them, the way
torchao's ``quantize_`` does: :func:`register_quantize_handler`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

from .layout import BLOCK_K, SCALE_MODES

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "W4AxConfig",
    "register_quantize_handler",
    "get_quantize_handler",
]

#: Version of the saved-checkpoint format (tensor names, shapes, dtypes, config keys).
#: Loading a checkpoint with another version is refused with a clear error.
FORMAT_VERSION = 2
#: ``quant_method`` written into the Hugging Face ``quantization_config``.
QUANT_METHOD = "cometq"

WEIGHT_METHODS = ("rtn", "gptq")
ACT_MODES = ("fmpq", 4, 8, 16)
BACKENDS = ("auto", "reference", "triton", "cuda")
KV_AXES = ("token", "channel")
#: FMPQ default when no budget is given: a quarter of the 128-channel blocks INT8.
DEFAULT_INT8_FRACTION = 0.25


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_group(name: str, g) -> None:
    """Group-size rules of :func:`cometq.reference.check_group_size` that do not depend on K.

    A multiple of 128 must also divide each layer's K_pad; that is checked per
    layer at quantize time (the error names the layer).
    """
    if not _is_int(g):
        raise TypeError(f"{name} must be an int (-1 = per output channel), got {g!r} ({type(g).__name__})")
    if g == -1:
        return
    ok_small = g >= 16 and BLOCK_K % g == 0 and (g & (g - 1)) == 0
    ok_large = g > 0 and g % BLOCK_K == 0
    if not (ok_small or ok_large):
        raise ValueError(f"{name}={g} is not supported: use -1 (per channel), 16, 32, 64, 128 or a multiple of {BLOCK_K}")


@dataclass(frozen=True)
class W4AxConfig:
    """Quantization recipe of a W4Ax(-KV4) model.

    Weights: ``weight_bits`` (4), ``group_size`` (-1 = per output channel, else
    16/32/64/128 or a multiple of 128), ``weight_method`` ("rtn" | "gptq"),
    ``clip_ratio`` (scale shrink for RTN) or ``clip_search`` (per-group grid search
    of the clip ratio minimizing the weight error), GPTQ ``gptq_damp`` (fraction of
    the mean Hessian diagonal added) and ``gptq_act_order`` (columns processed by
    decreasing Hessian diagonal, static group scales in stored column order; off by
    default: with FMPQ activations the FMPQ sort already orders the columns and
    act-order measured no gain on SmolLM2 (16.19 vs 16.16 g128, 14.84 vs 14.69 g32);
    turn it on for weight-only (act_bits=16): 13.25 vs 15.49 g128, docs/ACCURACY.md).
    ``gptq_true_sequential`` (with ``gptq_sequential``): inside a decoder layer,
    quantize in call order -- q/k/v, then o_proj calibrated on the outputs of the
    quantized q/k/v, then the MLP calibrated on the quantized attention -- instead of
    taking every Hessian of the layer from the layer in floating point.  On by
    default: SmolLM2 asym g32 + FMPQ 25% 13.07 (1.179x) vs 13.34 (1.204x); costs two
    more calibration passes per layer.
    ``gptq_mse``: each weight group's range is shrunk by the factor (1.0 .. 0.8)
    with the least Hessian-weighted rounding error when GPTQ reaches the group
    (``cometq.gptq.gptq_quantize(mse=True)``).  "auto" (default) = on, except
    with ``gptq_act_order`` (static ranges fixed before GPTQ's updates; shrinking
    them clips the updated weights).  SmolLM2 full pipeline (asym g32 true-seq +
    FMPQ 25% + clip): 12.81 = 1.156x (1 thread; 12.60 = 1.137x with 2) vs 13.07 =
    1.179x without; with the KV4 cache (decode protocol) 1.171x vs 1.210x
    (docs/ACCURACY.md).
    ``weight_sym``: symmetric INT4 weights (``scale * q``, q in [-7, 7]) or, when
    False (default), asymmetric (``scale * q + offset``, q in [-8, 7]; the GEMM adds
    the offset times per-group activation sums).  Asymmetric measured better at
    both group sizes on SmolLM2 (GPTQ + FMPQ 25%: g32 1.204x vs 1.270x, g128 1.330x
    vs 1.358x fp32 perplexity); it costs fp32 offsets (4 bytes per group: +6% weight
    bytes at g128).  ``gptq_sequential``: calibrate decoder layer i on the outputs of the
    already-quantized layers 0..i-1 (standard GPTQ practice) instead of taking
    every Hessian from the floating-point model; needs ``calib_data`` (not
    one-pass ``calib_stats``).  Only used with ``weight_method="gptq"``.  On by
    default: SmolLM2-135M weight-only g128 perplexity 15.49 vs 16.05 one-pass
    (docs/ACCURACY.md).

    Activations: ``act_bits`` = "fmpq" (mixed INT4/INT8 blocks), 4 (all INT4),
    8 (all INT8) or 16 (weight-only: activations stay in floating point).  With
    "fmpq" exactly one budget: ``int8_fraction`` | ``int8_blocks`` |
    ``outlier_ratio`` (+ optional ``max_int8_blocks``); none given means
    ``int8_fraction=0.25``.  ``scale_mode``: "block" (one scale per token per
    block) or "class" (one per token per precision class).  ``act_clip``: the
    INT4-block clip ratio of every layer (``ActivationLayout.int4_clip``), a
    float in (0, 1], "search" (per layer input, the ratio of
    :data:`cometq.calibrate.ACT_CLIP_RATIOS` with the least output error on
    calibration samples, :func:`cometq.calibrate.search_act_clip`) or "auto"
    (default): "search" for FMPQ, which calibrates anyway (activation-only FMPQ
    25% on SmolLM2: 1.090x fp32 perplexity vs 1.143x unclipped), 1.0 otherwise
    (plain W4A4 needs no calibration data; pass "search" with calib data).
    ``perm_granularity``: the FMPQ permutation moves channels in runs of this many
    consecutive channels (``reference.fmpq_calibrate(granularity=...)``; an int
    dividing 128; default 1).  With runs of ``group_size`` the permuted weight
    groups stay whole original groups, so a model already on a group grid (like
    SmolLM2's Q4_1 g32) keeps it under asymmetric weights, but on SmolLM2 the
    activations pay far more than the weights gain (activation-only FMPQ 25%:
    1.090x with single channels, 1.259x with runs of 16, 1.350x with runs of
    32; docs/ACCURACY.md), so the default moves single channels.

    ``kv4`` (+ ``kv_group_size``, ``kv_key_axis``, ``kv_value_axis``,
    ``kv_residual_length``; the fields of :class:`cometq.kvcache.KV4Config`, same
    defaults, chosen by measurement in docs/KV4.md) asks for the 4-bit KV cache:
    ``KV4Cache.for_model(model)`` builds it from the model's config, the CLI's
    ``generate``/``eval-ppl``/``serve`` use it; stored here so it is saved with the model.
    ``skip_modules``: module names (or name suffixes) left in floating point.
    ``fold_permutations``: fold the FMPQ permutation of ``down_proj`` into the
    output rows of ``gate_proj``/``up_proj`` (exact; no run-time permute there).
    ``backend``: op backend used by the quantized layers.
    ``calib_n_samples``/``calib_seq_len``: calibration size used by helpers that
    draw calibration data themselves (the CLI).
    """

    weight_bits: int = 4
    group_size: int = 128
    weight_method: str = "rtn"
    clip_ratio: float = 1.0
    clip_search: bool = False
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    gptq_sequential: bool = True
    gptq_true_sequential: bool = True
    gptq_mse: Union[bool, str] = "auto"
    weight_sym: bool = False
    act_bits: Union[str, int] = "fmpq"
    int8_fraction: Optional[float] = None
    int8_blocks: Optional[int] = None
    outlier_ratio: Optional[float] = None
    max_int8_blocks: Optional[int] = None
    scale_mode: str = "block"
    act_clip: Union[float, str] = "auto"
    perm_granularity: int = 1
    kv4: bool = False
    kv_group_size: int = 32
    kv_key_axis: str = "channel"
    kv_value_axis: str = "token"
    kv_residual_length: int = 0
    skip_modules: Tuple[str, ...] = ("lm_head",)
    fold_permutations: bool = True
    backend: str = "auto"
    calib_n_samples: int = 16
    calib_seq_len: int = 512
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not _is_int(self.weight_bits) or self.weight_bits != 4:
            raise ValueError(f"weight_bits must be 4 (the only supported weight precision), got {self.weight_bits!r}")
        _check_group("group_size", self.group_size)
        if self.weight_method not in WEIGHT_METHODS:
            raise ValueError(f"weight_method must be one of {WEIGHT_METHODS}, got {self.weight_method!r}")
        if not _is_number(self.clip_ratio):
            raise TypeError(f"clip_ratio must be a float, got {self.clip_ratio!r}")
        if not (0.0 < float(self.clip_ratio) <= 1.0) or not math.isfinite(float(self.clip_ratio)):
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        for name in ("clip_search", "gptq_act_order", "gptq_sequential", "gptq_true_sequential", "weight_sym", "kv4",
                     "fold_permutations"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {v!r} ({type(v).__name__})")
        if self.clip_search and float(self.clip_ratio) != 1.0:
            raise ValueError(f"clip_search=True searches the clip ratio; clip_ratio must stay 1.0, got {self.clip_ratio!r}")
        if not isinstance(self.gptq_mse, bool) and self.gptq_mse != "auto":
            raise TypeError(f"gptq_mse must be a bool or 'auto', got {self.gptq_mse!r}")
        if self.gptq_mse is True and self.gptq_act_order:
            raise ValueError("gptq_mse=True picks each group's range when GPTQ reaches it; gptq_act_order=True fixes the "
                             "ranges up front: use one of them (gptq_mse='auto' turns it off under act-order)")
        if self.clip_search and not self.weight_sym:
            raise ValueError("clip_search searches symmetric scales; it needs weight_sym=True")
        if not _is_number(self.gptq_damp) or not (0.0 < float(self.gptq_damp) < 1.0):
            raise ValueError(f"gptq_damp must be a float in (0, 1), got {self.gptq_damp!r}")
        if isinstance(self.act_bits, bool) or self.act_bits not in ACT_MODES:
            raise ValueError(f"act_bits must be one of {ACT_MODES} (16 = weight-only), got {self.act_bits!r}")
        self._validate_fmpq()
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        c = self.act_clip
        if isinstance(c, str):
            if c not in ("search", "auto"):
                raise ValueError(f"act_clip must be a float in (0, 1], 'search' or 'auto', got {c!r}")
        elif not _is_number(c):
            raise TypeError(f"act_clip must be a float in (0, 1], 'search' or 'auto', got {c!r}")
        elif not (0.0 < float(c) <= 1.0):
            raise ValueError(f"act_clip must be in (0, 1], got {c!r}")
        else:
            object.__setattr__(self, "act_clip", float(c))
        pg = self.perm_granularity
        if not _is_int(pg) or pg < 1 or BLOCK_K % pg:
            raise ValueError(f"perm_granularity must be an int dividing {BLOCK_K}, got {pg!r}")
        if not _is_int(self.kv_group_size) or self.kv_group_size < 2 or self.kv_group_size % 2:
            raise ValueError(f"kv_group_size must be an even int >= 2, got {self.kv_group_size!r}")
        for name in ("kv_key_axis", "kv_value_axis"):
            if getattr(self, name) not in KV_AXES:
                raise ValueError(f"{name} must be one of {KV_AXES}, got {getattr(self, name)!r}")
        if not _is_int(self.kv_residual_length) or self.kv_residual_length < 0:
            raise ValueError(f"kv_residual_length must be an int >= 0, got {self.kv_residual_length!r}")
        skip = self.skip_modules
        if isinstance(skip, str) or not isinstance(skip, (tuple, list)):
            raise TypeError(f"skip_modules must be a tuple of module names, got {skip!r}")
        for s in skip:
            if not isinstance(s, str) or not s:
                raise TypeError(f"skip_modules entries must be non-empty strings, got {s!r}")
        object.__setattr__(self, "skip_modules", tuple(skip))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("calib_n_samples", "calib_seq_len"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not _is_int(self.format_version):
            raise TypeError(f"format_version must be an int, got {self.format_version!r}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"unknown cometq format_version {self.format_version!r}: this cometq reads version {FORMAT_VERSION}"
            )

    def _validate_fmpq(self) -> None:
        budgets = {"int8_fraction": self.int8_fraction, "int8_blocks": self.int8_blocks, "outlier_ratio": self.outlier_ratio}
        given = [k for k, v in budgets.items() if v is not None]
        if self.act_bits != "fmpq":
            extra = given + (["max_int8_blocks"] if self.max_int8_blocks is not None else [])
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply to act_bits='fmpq', got act_bits={self.act_bits!r}")
            return
        if len(given) > 1:
            raise ValueError(f"pass exactly one FMPQ budget (int8_fraction, int8_blocks, outlier_ratio), got {given}")
        if not given:
            object.__setattr__(self, "int8_fraction", DEFAULT_INT8_FRACTION)
        if self.int8_fraction is not None:
            f = self.int8_fraction
            if not _is_number(f):
                raise TypeError(f"int8_fraction must be a float, got {f!r}")
            if not 0.0 <= float(f) <= 1.0:
                raise ValueError(f"int8_fraction must be in [0, 1], got {f!r}")
            object.__setattr__(self, "int8_fraction", float(f))
        if self.int8_blocks is not None and (not _is_int(self.int8_blocks) or self.int8_blocks < 0):
            raise ValueError(f"int8_blocks must be an int >= 0, got {self.int8_blocks!r}")
        if self.outlier_ratio is not None:
            r = self.outlier_ratio
            if not _is_number(r) or not float(r) > 0 or not math.isfinite(float(r)):
                raise ValueError(f"outlier_ratio must be a finite float > 0, got {r!r}")
            object.__setattr__(self, "outlier_ratio", float(r))
        if self.max_int8_blocks is not None:
            if self.outlier_ratio is None:
                raise ValueError(f"max_int8_blocks caps outlier_ratio; it needs outlier_ratio, got max_int8_blocks={self.max_int8_blocks!r}")
            if not _is_int(self.max_int8_blocks) or self.max_int8_blocks < 0:
                raise ValueError(f"max_int8_blocks must be an int >= 0, got {self.max_int8_blocks!r}")

    # ------------------------------------------------------------------
    @property
    def weight_only(self) -> bool:
        return self.act_bits == 16

    @property
    def clip(self) -> Union[float, str]:
        """The resolved ``act_clip``: a float or "search" ("auto" resolved)."""
        if self.act_clip == "auto":
            return "search" if self.act_bits == "fmpq" else 1.0
        return self.act_clip

    @property
    def mse(self) -> bool:
        """The resolved ``gptq_mse`` ("auto": on unless ``gptq_act_order``)."""
        return (not self.gptq_act_order) if self.gptq_mse == "auto" else bool(self.gptq_mse)

    @property
    def granularity(self) -> int:
        return int(self.perm_granularity)

    def fmpq_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for :func:`cometq.reference.fmpq_calibrate`."""
        g = {"granularity": self.granularity}
        if self.int8_blocks is not None:
            return {"int8_blocks": self.int8_blocks, **g}
        if self.outlier_ratio is not None:
            return {"outlier_ratio": self.outlier_ratio, "max_int8_blocks": self.max_int8_blocks, **g}
        return {"int8_fraction": self.int8_fraction, **g}

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip_modules"] = list(self.skip_modules)
        d["quant_method"] = QUANT_METHOD
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "W4AxConfig":
        if not isinstance(d, dict):
            raise TypeError(f"W4AxConfig.from_dict needs a dict, got {type(d).__name__}")
        d = dict(d)
        qm = d.pop("quant_method", QUANT_METHOD)
        if qm != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {qm!r}")
        if "format_version" not in d:
            raise ValueError("quantization config has no format_version: not a cometq checkpoint config")
        # checkpoints written before gptq_mse existed were quantized without it
        d.setdefault("gptq_mse", False)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown W4AxConfig keys {unknown} (format_version {d.get('format_version')!r})")
        if isinstance(d.get("skip_modules"), list):
            d["skip_modules"] = tuple(d["skip_modules"])
        # validate the version first so an unknown version is reported as such
        fv = d["format_version"]
        if fv != FORMAT_VERSION:
            raise ValueError(f"unknown cometq format_version {fv!r}: this cometq reads version {FORMAT_VERSION}")
        return cls(**d)


# ----------------------------------------------------------------------
# config type -> handler registry (torchao-style quantize_)
# ----------------------------------------------------------------------
_HANDLERS: Dict[type, Callable] = {}


def register_quantize_handler(config_type: type) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(model, config, **kwargs)`` applies configs of ``config_type``."""
    if not isinstance(config_type, type):
        raise TypeError(f"register_quantize_handler needs a config class, got {config_type!r}")

    def deco(fn: Callable) -> Callable:
        if not callable(fn):
            raise TypeError(f"handler must be callable, got {fn!r}")
        _HANDLERS[config_type] = fn
        return fn

    return deco


def get_quantize_handler(config) -> Callable:
    for t in type(config).__mro__:
        if t in _HANDLERS:
            return _HANDLERS[t]
    raise TypeError(
        f"no quantize handler registered for config type {type(config).__name__}; "
        f"known: {[t.__name__ for t in _HANDLERS]}"
    )
