"""``W4AxLinear``: the quantized drop-in for ``nn.Linear``.

State (all buffers, so ``state_dict``/safetensors carry them):

* ``qweight`` uint8 ``[N, K_pad/2]`` and ``w_scales`` float32 ``[N, K_pad/G]``: the INT4
  weight with the FMPQ permutation folded into its columns (see
  :class:`cometq.reference.QuantizedWeight`);
* ``perm`` int64 ``[K]`` and ``block_bits`` int32 ``[K_pad/128]``: the activation
  layout (:class:`cometq.layout.ActivationLayout`); an identity ``perm`` means the
  permutation was folded upstream (or there is none);
* ``bias`` ``[N]`` (optional, in the model's dtype).

Buffer shapes depend only on (K, N, group size, bias), never on calibration
results, so an empty module can be built on the meta device from the config
and the original ``nn.Linear`` shapes (this is how checkpoints are loaded).

``forward`` flattens to 2-D, quantizes through ``cometq.ops.quantize_activation``
and multiplies through ``cometq.ops.w4ax_gemm_q`` (backend from the config),
reshapes back, returns the input dtype.  ``act_bits=16`` (weight-only) computes
``x @ dequantized(W)^T`` instead.

CPU fast path (``fast_path=True``, off by default): the reference GEMM loops over
K segments in float64, too slow for perplexity runs on CPU.  The fast path uses
the same quantized integers and scales (same op for the activations) and does one
float32 matmul of the dequantized operands.  It equals the reference up to
float32 rounding; tests hold it to ``cometq.testing.FAST_PATH_RTOL/ATOL``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from . import reference as R
from .layout import BLOCK_K, ActivationLayout, num_blocks, padded_k

__all__ = ["W4AxLinear", "set_fast_path", "fake_quantize_activation", "fuse_linears"]

ACT_MODES = ("fmpq", 4, 8, 16)


def _version_of(t: torch.Tensor):
    """A tensor's in-place version for cache keys.  Inference tensors (made under
    ``torch.inference_mode``) keep no version counter: their key never matches, so a cache
    keyed on one is rebuilt per call instead of raising."""
    return object() if t.is_inference() else t._version


class W4AxLinear(nn.Module):
    """INT4-weight linear layer with FMPQ (INT4/INT8 block) activations."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        group_size: int = 128,
        act_bits: Union[str, int] = "fmpq",
        scale_mode: str = "block",
        backend: str = "auto",
        bias_dtype: torch.dtype = torch.float32,
        asym: bool = False,
        device=None,
    ):
        super().__init__()
        if not isinstance(asym, bool):
            raise TypeError(f"asym must be a bool, got {asym!r}")
        if isinstance(act_bits, bool) or act_bits not in ACT_MODES:
            raise ValueError(f"act_bits must be one of {ACT_MODES}, got {act_bits!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        k_pad = padded_k(in_features)
        g = R.check_group_size(group_size, k_pad)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = -1 if group_size in (None, -1) else group_size
        self.act_bits = act_bits
        self.scale_mode = scale_mode
        self.backend = backend
        self.fast_path = False
        self.register_buffer("qweight", torch.zeros(out_features, k_pad // 2, dtype=torch.uint8, device=device))
        self.register_buffer("w_scales", torch.zeros(out_features, k_pad // g, dtype=torch.float32, device=device))
        if asym:  # asymmetric weights: w = scale * q + offset (reference.QuantizedWeight)
            self.register_buffer("w_offsets", torch.zeros(out_features, k_pad // g, dtype=torch.float32, device=device))
        else:
            self.w_offsets = None
        # INT4-block activation clip ratio (layout.ActivationLayout.int4_clip), a
        # buffer so it is saved with the model
        self.register_buffer("act_clip", torch.ones(1, dtype=torch.float32, device=device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int64, device=device))
        self.register_buffer(
            "block_bits", torch.full((num_blocks(in_features),), 4, dtype=torch.int32, device=device)
        )
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        self._layout_key = None
        self._layout = None
        self._wdeq_key = None
        self._wdeq = None

    # ------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        layout: Optional[ActivationLayout],
        qweight: R.QuantizedWeight,
        *,
        act_bits: Union[str, int] = "fmpq",
        scale_mode: str = "block",
        backend: str = "auto",
    ) -> "W4AxLinear":
        """Wrap ``linear``'s bias with an already quantized weight (columns in ``layout`` order).

        ``layout`` None means identity permutation; for act_bits 4/8 its block bits
        must be all 4 / all 8.  The weight's columns must already be permuted by
        ``layout.perm`` (or by the permutation folded upstream).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        if not isinstance(qweight, R.QuantizedWeight):
            raise TypeError(f"qweight must be a QuantizedWeight, got {type(qweight).__name__}")
        k, n = linear.in_features, linear.out_features
        if qweight.in_features != k or qweight.out_features != n:
            raise ValueError(
                f"quantized weight is [{qweight.out_features}, {qweight.in_features}] but the linear is [{n}, {k}]"
            )
        dev = linear.weight.device
        mod = cls(
            k, n, bias=linear.bias is not None, group_size=qweight.group_size, act_bits=act_bits,
            scale_mode=scale_mode, backend=backend,
            bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32,
            asym=qweight.offsets is not None, device=dev,
        )
        if layout is None:
            layout = ActivationLayout.identity(k, 8 if act_bits == 8 else 4, device=dev)
        if not isinstance(layout, ActivationLayout):
            raise TypeError(f"layout must be an ActivationLayout or None, got {type(layout).__name__}")
        if layout.in_features != k:
            raise ValueError(f"layout has K={layout.in_features} but the linear has in_features={k}")
        if act_bits in (4, 8) and bool((layout.block_bits != act_bits).any()):
            raise ValueError(f"act_bits={act_bits} needs all blocks at {act_bits} bits, got {layout!r}")
        with torch.no_grad():
            mod.qweight.copy_(qweight.qweight)
            mod.w_scales.copy_(qweight.scales)
            if qweight.offsets is not None:
                mod.w_offsets.copy_(qweight.offsets)
            mod.act_clip.fill_(layout.int4_clip)
            mod.perm.copy_(layout.perm)
            mod.block_bits.copy_(layout.block_bits)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        return mod

    # ------------------------------------------------------------------
    def layout(self) -> ActivationLayout:
        """The activation layout (validated once, cached until the buffers change)."""
        key = (self.perm.device, self.perm.data_ptr(), _version_of(self.perm), self.block_bits.data_ptr(),
               _version_of(self.block_bits), self.act_clip.data_ptr(), _version_of(self.act_clip))
        if self._layout is None or self._layout_key != key:
            self._layout = ActivationLayout(self.perm, self.block_bits, float(self.act_clip[0]))
            self._layout_key = key
        return self._layout

    def quantized_weight(self) -> R.QuantizedWeight:
        return R.QuantizedWeight(self.qweight, self.w_scales, self.in_features, self.group_size, self.w_offsets)

    def _dequantized_weight(self) -> torch.Tensor:
        """float32 ``[N, K_pad]`` (permuted column order).

        Cached on CPU (the fast path's whole point), recomputed per call on other
        devices so a GPU model never holds a float copy of its INT4 weights."""
        if self.qweight.device.type != "cpu":
            return R.dequantize_weight(self.quantized_weight(), trim=False)
        key = (self.qweight.device, self.qweight.data_ptr(), _version_of(self.qweight),
               self.w_scales.data_ptr(), _version_of(self.w_scales),
               None if self.w_offsets is None else (self.w_offsets.data_ptr(), _version_of(self.w_offsets)))
        if self._wdeq is None or self._wdeq_key != key:
            self._wdeq = R.dequantize_weight(self.quantized_weight(), trim=False)
            self._wdeq_key = key
        return self._wdeq

    def _backend(self) -> Optional[str]:
        return None if self.backend == "auto" else self.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"W4AxLinear expects {self.in_features} input features, got input shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        dtype = x.dtype
        x2 = x.reshape(-1, self.in_features)
        if dtype not in R.FLOAT_DTYPES:
            raise TypeError(f"W4AxLinear input must be fp16/bf16/fp32, got {dtype}")
        if self.act_bits == 16:
            y = self._forward_weight_only(x2)
        elif self.fast_path and x2.device.type == "cpu":
            y = self._forward_fast(x2)
        elif torch.compiler.is_compiling():
            # traced: through the torch.ops (fake implementations carry the shapes)
            qa = ops.quantize_activation(x2, self.layout(), self.scale_mode, self._backend())
            y = ops.w4ax_gemm_q(qa, self.quantized_weight(), self.bias, out_dtype=dtype, backend=self._backend())
        else:
            # eager: same backends and kernels, minus the per-call op-dispatch layer
            lay = self.layout()
            gs = self.group_size if self.group_size not in (None, -1) else -1
            y = ops.w4ax_linear_eager(x2, lay.perm, lay.block_bits, lay.n_int8, self.scale_mode, lay.int4_clip,
                                      self.qweight, self.w_scales, self.w_offsets, gs, self.bias, dtype,
                                      self._backend())
        return y.to(dtype).reshape(*lead, self.out_features)

    def _forward_weight_only(self, x2: torch.Tensor) -> torch.Tensor:
        lay = self.layout()
        xp = x2 if lay.is_identity_perm else x2[:, lay.perm]
        w = self._dequantized_weight()[:, : self.in_features]
        if self.fast_path or x2.device.type == "cpu":
            y = xp.float() @ w.T
        else:
            y = xp @ w.to(x2.dtype).T
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _forward_fast(self, x2: torch.Tensor) -> torch.Tensor:
        # Same integers and scales as the reference path (fake_quantize_activation
        # is the reference quantizer's math without the packing); only the
        # accumulation differs: one fp32 matmul instead of exact per-segment
        # integer dots with a float64 epilogue.
        xd = fake_quantize_activation(x2, self.layout(), self.scale_mode)  # fp32 [M, K_pad], permuted
        y = xd @ self._dequantized_weight().T
        if self.bias is not None:
            y = y + self.bias.float()
        return y

    def extra_repr(self) -> str:
        lay = self.layout() if self.perm.device.type != "meta" else None
        n8 = lay.n_int8 if lay is not None else "?"
        perm = ("identity" if lay.is_identity_perm else "runtime") if lay is not None else "?"
        act = {16: "A16 (weight-only)", 4: "A4", 8: "A8"}.get(self.act_bits, "A4/A8 FMPQ")
        return (
            f"K={self.in_features}, N={self.out_features}, K_pad={padded_k(self.in_features)}, "
            f"group={self.group_size}{'' if self.w_offsets is None else ' asym'}, act={act}, "
            f"int8_blocks={n8}/{num_blocks(self.in_features)}, "
            f"int4_clip={'?' if lay is None else format(lay.int4_clip, 'g')}, "
            f"perm={perm}, scale_mode={self.scale_mode}, bias={self.bias is not None}, backend={self.backend}"
        )


def set_fast_path(model: nn.Module, enabled: bool = True) -> int:
    """Turn the CPU fast path of every :class:`W4AxLinear` in ``model`` on/off; returns how many."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, W4AxLinear):
            m.fast_path = enabled
            n += 1
    return n


def fake_quantize_activation(x: torch.Tensor, layout: ActivationLayout, scale_mode: str = "block") -> torch.Tensor:
    """``dequantize_activation(quantize_activation(x, layout, scale_mode))`` without packing.

    float32 ``[M, K_pad]`` in permuted order.  The integers and scales come from
    :func:`cometq.reference.quantize_activation_blocks`, the reference quantizer's
    own step, so the result is bit-identical to the reference round trip (tests
    check ``torch.equal``).
    """
    q, _, bscale = R.quantize_activation_blocks(x, layout, scale_mode)
    m = q.shape[0]
    return (q * bscale[..., None]).view(m, layout.k_pad)


def _fusable_w4ax(mods: Sequence["W4AxLinear"]) -> bool:
    a = mods[0]
    for m in mods[1:]:
        if (m.in_features, m.group_size, m.act_bits, m.scale_mode, m.backend, m.fast_path) != \
                (a.in_features, a.group_size, a.act_bits, a.scale_mode, a.backend, a.fast_path):
            return False
        if (m.w_offsets is None) != (a.w_offsets is None):
            return False
        if m.qweight.device != a.qweight.device:
            return False
        if not (torch.equal(m.perm, a.perm) and torch.equal(m.block_bits, a.block_bits)
                and torch.equal(m.act_clip, a.act_clip)):
            return False  # a different activation layout: the input would be quantized differently
        if (m.bias is None) != (a.bias is None) or (m.bias is not None and m.bias.dtype != a.bias.dtype):
            return False
    return True


def fuse_linears(mods: Sequence[nn.Module]) -> Optional[nn.Module]:
    """One module computing ``cat([m(x) for m in mods], -1)`` for linears that read the same input
    (q/k/v, gate/up), or None when they cannot be fused.

    Why: one GEMM with ``N = sum(N_i)`` instead of several, and for :class:`W4AxLinear` one
    activation quantization instead of one per projection (they share the input's FMPQ layout,
    see ``quantize_``): fewer launches per decode step and wider GEMMs.  Fusable: all
    ``nn.Linear`` with one input size, dtype and device, or all :class:`W4AxLinear` with the same
    activation layout (permutation, block map, INT4 clip), group size, scale mode, activation
    mode, backend and weight symmetry.

    No weight is duplicated: the fused module owns the concatenated tensors and each original
    module's weights become row views of them, so both stay usable and in sync (an in-place
    update of either is seen by both).
    """
    mods = list(mods)
    if len(mods) < 2:
        return None
    if all(type(m) is nn.Linear for m in mods):
        a = mods[0]
        if any(m.in_features != a.in_features or m.weight.dtype != a.weight.dtype or m.weight.device != a.weight.device
               for m in mods):
            return None
        n = sum(m.out_features for m in mods)
        has_bias = any(m.bias is not None for m in mods)
        fused = nn.Linear(a.in_features, n, bias=has_bias, device="meta")
        with torch.no_grad():
            fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in mods]), requires_grad=False)
            if has_bias:
                fused.bias = nn.Parameter(torch.cat([
                    m.bias.detach() if m.bias is not None
                    else torch.zeros(m.out_features, dtype=a.weight.dtype, device=a.weight.device) for m in mods]),
                    requires_grad=False)
            o = 0
            for m in mods:
                m.weight = nn.Parameter(fused.weight[o:o + m.out_features], requires_grad=m.weight.requires_grad)
                if m.bias is not None:
                    m.bias = nn.Parameter(fused.bias[o:o + m.out_features], requires_grad=m.bias.requires_grad)
                o += m.out_features
        return fused
    if not (all(isinstance(m, W4AxLinear) for m in mods) and _fusable_w4ax(mods)):
        return None
    a = mods[0]
    n = sum(m.out_features for m in mods)
    dev = a.qweight.device
    fused = W4AxLinear(a.in_features, n, bias=a.bias is not None, group_size=a.group_size, act_bits=a.act_bits,
                       scale_mode=a.scale_mode, backend=a.backend,
                       bias_dtype=a.bias.dtype if a.bias is not None else torch.float32,
                       asym=a.w_offsets is not None, device="meta")
    fused.fast_path = a.fast_path
    names: List[str] = ["qweight", "w_scales"] + (["w_offsets"] if a.w_offsets is not None else []) + \
        (["bias"] if a.bias is not None else [])
    with torch.no_grad():
        for name in names:
            fused._buffers[name] = torch.cat([getattr(m, name) for m in mods])
        for name in ("act_clip", "perm", "block_bits"):  # the shared layout (a copy: it is small)
            fused._buffers[name] = getattr(a, name).clone()
        o = 0
        for m in mods:
            for name in names:
                m._buffers[name] = fused._buffers[name][o:o + m.out_features]
            m._wdeq = m._wdeq_key = None  # a CPU fast-path cache keyed on the old storage
            o += m.out_features
    return fused
