"""A 4-bit KV cache for Hugging Face ``transformers`` (5.x): ``KV4Cache``.

Usage (any Llama-family model with only full-attention layers)::

    from cometq.kvcache import KV4Cache
    out = model.generate(ids, past_key_values=KV4Cache(model.config), max_new_tokens=64)

Storage per layer (one :class:`KV4Layer`), KIVI style:

* a quantized store: K and V as :class:`cometq.reference.KV4Tensor` data
  (packed uint8 ``[B, H, Tq, D/2]`` + float16 scale/zero), appended in whole
  groups of ``group_size`` tokens, never re-quantized;
* a full-precision residual ``[B, H, Tr, D]`` holding the most recent tokens.
  After every update the oldest tokens beyond ``residual_length`` are moved to
  the quantized store in multiples of ``group_size``, so
  ``residual_length <= Tr < residual_length + group_size`` once the sequence is
  long enough.  With ``residual_length=0`` only the last partial group
  (``< group_size`` tokens) stays in full precision, which is what per-channel
  quantization needs anyway (a channel group is ``group_size`` tokens).

Each ``update`` returns ``cat(dequantize(quantized store), residual, new states)``
computed *before* the flush: the tokens of the current forward pass attend to
their own exact K/V (they are in registers anyway), every older token beyond the
residual window is read back from 4 bits.  Quantization math is exactly
:func:`cometq.reference.quantize_kv4` (asymmetric, fp16 scale and zero).

This is the accuracy / drop-in path: it dequantizes the store at every step
(O(T) work, like transformers' own ``QuantizedLayer``).  The serving path, which
never materializes a dequantized copy, is :mod:`cometq.paged` + the
``cometq::kv4_decode_attention`` op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .reference import KV4_AXES, KV4Tensor, dequantize_kv4, quantize_kv4

__all__ = ["KV4Config", "KV4Layer", "KV4Cache", "DEFAULT_KV4_CONFIG", "kv4_config_for"]


@dataclass(frozen=True)
class KV4Config:
    """Options of the 4-bit KV cache.

    * ``key_axis`` / ``value_axis``: ``"channel"`` (groups of ``group_size``
      tokens per channel) or ``"token"`` (groups of ``group_size`` channels per
      token).  Defaults chosen by measurement (docs/KV4.md): keys per channel,
      values per token, as in KIVI/COMET.
    * ``group_size``: G; with ``"token"`` it must divide head_dim.
    * ``residual_length``: recent tokens always kept in full precision (>= 0).
    """

    key_axis: str = "channel"
    value_axis: str = "token"
    group_size: int = 32
    residual_length: int = 0

    def __post_init__(self):
        for name in ("key_axis", "value_axis"):
            v = getattr(self, name)
            if v not in KV4_AXES:
                raise ValueError(f"{name} must be one of {KV4_AXES}, got {v!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2:
            raise ValueError(f"group_size must be an even int >= 2, got {g!r}")
        r = self.residual_length
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"residual_length must be an int >= 0, got {r!r}")


DEFAULT_KV4_CONFIG = KV4Config()


def kv4_config_for(model, **overrides) -> KV4Config:
    """The :class:`KV4Config` a model asks for (see :meth:`KV4Cache.for_model`)."""
    import dataclasses

    cfg = getattr(model, "cometq_config", None)
    base = DEFAULT_KV4_CONFIG
    if cfg is not None and getattr(cfg, "kv4", False):
        base = KV4Config(key_axis=cfg.kv_key_axis, value_axis=cfg.kv_value_axis, group_size=cfg.kv_group_size,
                         residual_length=cfg.kv_residual_length)
    return dataclasses.replace(base, **overrides) if overrides else base


def _cat_kv4(a: Optional[KV4Tensor], b: KV4Tensor) -> KV4Tensor:
    """Concatenate two KV4 tensors along tokens (both axes store groups along dim -2)."""
    if a is None:
        return b
    return KV4Tensor(
        torch.cat([a.packed, b.packed], dim=-2),
        torch.cat([a.scale, b.scale], dim=-2),
        torch.cat([a.zero, b.zero], dim=-2),
        a.axis,
        a.group_size,
    )


def _map_kv4(t: Optional[KV4Tensor], fn) -> Optional[KV4Tensor]:
    if t is None:
        return None
    return KV4Tensor(fn(t.packed), fn(t.scale), fn(t.zero), t.axis, t.group_size)


class KV4Layer(DynamicLayer):
    """One attention layer of :class:`KV4Cache` (see the module doc for the layout)."""

    is_croppable = False  # quantized groups cannot be un-quantized exactly

    def __init__(self, config: KV4Config = DEFAULT_KV4_CONFIG, **kwargs):
        super().__init__()
        if not isinstance(config, KV4Config):
            raise TypeError(f"config must be a KV4Config, got {type(config).__name__}")
        self.config = config
        self.cumulative_length = 0
        self.qkeys: Optional[KV4Tensor] = None
        self.qvalues: Optional[KV4Tensor] = None

    # -- transformers API ---------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        g = self.config.group_size
        for name, axis, x in (("key", self.config.key_axis, key_states), ("value", self.config.value_axis, value_states)):
            if x.shape[-1] % 2:
                raise ValueError(f"{name} head_dim must be even for 4-bit packing, got shape {tuple(x.shape)}")
            if axis == "token" and x.shape[-1] % g:
                raise ValueError(
                    f"{name}_axis='token' needs head_dim % group_size == 0, got head_dim={x.shape[-1]}, group_size={g}"
                )
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape != value_states.shape:
            raise ValueError(f"key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)} differ")
        self.cumulative_length += key_states.shape[-2]
        dtype = key_states.dtype
        parts_k = [self.keys, key_states]
        parts_v = [self.values, value_states]
        if self.qkeys is not None:
            parts_k.insert(0, dequantize_kv4(self.qkeys, dtype))
            parts_v.insert(0, dequantize_kv4(self.qvalues, dtype))
        keys_out = torch.cat(parts_k, dim=-2)
        values_out = torch.cat(parts_v, dim=-2)
        # new residual, then move the oldest whole groups beyond the window to 4 bits
        res_k = torch.cat([self.keys, key_states], dim=-2)
        res_v = torch.cat([self.values, value_states], dim=-2)
        g, r = self.config.group_size, self.config.residual_length
        n_q = max(0, (res_k.shape[-2] - r) // g * g)
        if n_q:
            self.qkeys = _cat_kv4(self.qkeys, quantize_kv4(res_k[..., :n_q, :].contiguous(), g, self.config.key_axis))
            self.qvalues = _cat_kv4(self.qvalues, quantize_kv4(res_v[..., :n_q, :].contiguous(), g, self.config.value_axis))
            res_k, res_v = res_k[..., n_q:, :].contiguous(), res_v[..., n_q:, :].contiguous()
        self.keys, self.values = res_k, res_v
        return keys_out, values_out

    def get_seq_length(self) -> int:
        return self.cumulative_length

    @property
    def quantized_length(self) -> int:
        """Tokens currently held in 4 bits."""
        return 0 if self.qkeys is None else self.qkeys.packed.shape[-2]

    def reset(self) -> None:
        if self.is_initialized:
            self.keys = self.keys[..., :0, :]
            self.values = self.values[..., :0, :]
        self.qkeys = self.qvalues = None
        self.cumulative_length = 0

    def _apply_batch(self, fn) -> None:
        if self.get_seq_length() > 0:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.qkeys, self.qvalues = _map_kv4(self.qkeys, fn), _map_kv4(self.qvalues, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KV4Cache cannot be cropped: quantized groups are not reversible")

    def offload(self):
        super().offload()
        self.qkeys = _map_kv4(self.qkeys, lambda t: t.to("cpu", non_blocking=True))
        self.qvalues = _map_kv4(self.qvalues, lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        super().prefetch()
        if self.is_initialized:
            self.qkeys = _map_kv4(self.qkeys, lambda t: t.to(self.device, non_blocking=True))
            self.qvalues = _map_kv4(self.qvalues, lambda t: t.to(self.device, non_blocking=True))

    def nbytes(self) -> int:
        """Bytes held by this layer (quantized store + full-precision residual)."""
        n = 0
        for t in (self.qkeys, self.qvalues):
            if t is not None:
                n += sum(x.numel() * x.element_size() for x in (t.packed, t.scale, t.zero))
        if self.is_initialized:
            n += self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return n


class KV4Cache(Cache):
    """4-bit KV cache: ``model.generate(..., past_key_values=KV4Cache(model.config))``.

    ``config`` is the model config (used for the layer count and a check that all
    layers are full attention); ``kv4`` a :class:`KV4Config`, or pass its fields
    as keyword arguments (``key_axis``, ``value_axis``, ``group_size``,
    ``residual_length``).
    """

    def __init__(self, config=None, kv4: Optional[KV4Config] = None, **kwargs):
        if kv4 is not None and kwargs:
            raise ValueError(f"pass either kv4= or KV4Config fields, not both (got {sorted(kwargs)})")
        kv4 = kv4 if kv4 is not None else KV4Config(**kwargs)
        if not isinstance(kv4, KV4Config):
            raise TypeError(f"kv4 must be a KV4Config, got {type(kv4).__name__}")
        self.kv4 = kv4
        if config is None:
            super().__init__(layer_class_to_replicate=lambda: KV4Layer(kv4))
            return
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        types = getattr(text, "layer_types", None)
        if types is not None:
            bad = sorted(set(types) - {"full_attention"})
            if bad:
                raise ValueError(f"KV4Cache supports full-attention layers only, the model has layer types {bad}")
        n = getattr(text, "num_hidden_layers", None)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"config.num_hidden_layers must be a positive int, got {n!r}")
        super().__init__(layers=[KV4Layer(kv4) for _ in range(n)])

    @classmethod
    def for_model(cls, model, **overrides) -> "KV4Cache":
        """A KV4 cache for ``model``: the KV4 options of its cometq config
        (``W4AxConfig.kv_*``) when it was quantized with ``kv4=True``, else the
        defaults; keyword ``overrides`` replace single :class:`KV4Config` fields."""
        return cls(getattr(model, "config", None), kv4=kv4_config_for(model, **overrides))

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
