"""``cometq.quantize_``: turn a model's ``nn.Linear`` layers into :class:`W4AxLinear`, in place.

Pipeline (for a :class:`~cometq.config.W4AxConfig`):

1. pick the target Linears (every ``nn.Linear`` not matched by ``skip_modules``);
2. calibrate (only if needed: FMPQ activations or GPTQ): per-channel input absmax,
   the GPTQ Hessian, and which Linears read the same input tensor (q/k/v,
   gate/up);
3. one FMPQ layout per *input*: Linears sharing an input share one layout;
4. fold permutations that are exactly valid offline:

   * always: the consumer's weight columns (``W[:, perm]``), so the GEMM sees
     activations and weights in the same permuted order;
   * ``down_proj``: its input is ``act(gate(x)) * up(x)``, elementwise in the
     channel index, so permuting the *output rows* of ``gate_proj`` and ``up_proj``
     (and their biases) by ``perm_down`` hands ``down_proj`` its input already
     permuted: no run-time permute for ``down_proj``.

   Everything else keeps a run-time permutation inside the activation-quantize
   op.  Folding into the producing RMSNorm is *not* done: the norm's output order
   follows its input (the residual stream), which other layers read in the
   original order, so a norm-weight permutation alone cannot reorder it.
   ``o_proj``'s input (attention output) can only be permuted within the head
   structure; not folded.
5. weights -> INT4 (RTN, RTN with clip search, or GPTQ), modules replaced.

With ``gptq_sequential`` steps 2-5 run per decoder layer, each calibrated on the
outputs of the already-quantized layers before it (:func:`_quantize_sequential`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import reference as R
from .calibrate import (
    CalibrationStats,
    search_act_clip,
    capture_layer_inputs,
    collect_stats,
    collect_stats_with,
    find_decoder_layers,
    layer_output,
)
from .config import W4AxConfig, get_quantize_handler, register_quantize_handler
from .layout import BLOCK_K, INT4_QMAX, ActivationLayout, pack_int4, pad_last_dim, padded_k
from .nn import W4AxLinear, set_fast_path

__all__ = [
    "quantize_",
    "quantize_w4ax",
    "target_linears",
    "mlp_triples",
    "fold_mlp_permutation",
    "quantize_weight_clip_search",
    "CLIP_SEARCH_RATIOS",
]

#: Clip ratios tried per (row, group) by ``clip_search``: the one with the least
#: squared weight error wins (1.0 included, so it never does worse than RTN).
CLIP_SEARCH_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(13))  # 1.0 .. 0.7
#: Calibration input rows kept per layer input for ``act_clip="search"``.
ACT_CLIP_SAMPLES = 1024


def _clip_samples(config: W4AxConfig) -> int:
    return ACT_CLIP_SAMPLES if (config.clip == "search" and config.act_bits in ("fmpq", 4)) else 0


def _is_skipped(name: str, skip) -> bool:
    for s in skip:
        if name == s or name.endswith("." + s) or name.startswith(s + ".") or ("." + s + ".") in name:
            return True
    return False


def target_linears(model: nn.Module, config: W4AxConfig) -> List[str]:
    """Names of the ``nn.Linear`` modules ``quantize_`` replaces (skip list applied)."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n and not _is_skipped(n, config.skip_modules)]


def mlp_triples(model: nn.Module, names) -> List[Tuple[str, str, str, str]]:
    """(mlp, gate, up, down) names of gated MLPs ``down(act(gate(x)) * up(x))`` whose
    three projections are all targets: the ones whose down_proj permutation folds."""
    names = set(names)
    out = []
    for n, m in model.named_modules():
        if not type(m).__name__.endswith("MLP") or not hasattr(m, "act_fn"):
            continue
        parts = [getattr(m, a, None) for a in ("gate_proj", "up_proj", "down_proj")]
        if not all(type(p) is nn.Linear for p in parts):
            continue
        full = [f"{n}.{a}" if n else a for a in ("gate_proj", "up_proj", "down_proj")]
        if all(f in names for f in full):
            out.append((n, *full))
    return out


@torch.no_grad()
def fold_mlp_permutation(mlp: nn.Module, perm: torch.Tensor) -> None:
    """Permute ``gate_proj``/``up_proj`` output rows and ``down_proj`` input columns by ``perm``.

    The MLP computes the same function afterwards (exactly, up to float summation
    order in ``down_proj``): ``down``'s input channel j is now old channel perm[j],
    and so is its weight column j.
    """
    perm = perm.to(mlp.down_proj.weight.device).long()
    inter = mlp.down_proj.in_features
    if perm.shape != (inter,):
        raise ValueError(f"perm shape {tuple(perm.shape)} must be ({inter},) for this MLP")
    for lin in (mlp.gate_proj, mlp.up_proj):
        lin.weight.data = lin.weight.data[perm].contiguous()
        if lin.bias is not None:
            lin.bias.data = lin.bias.data[perm].contiguous()
    mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, perm].contiguous()


def quantize_weight_clip_search(w: torch.Tensor, group_size: Optional[int] = 128, ratios=CLIP_SEARCH_RATIOS) -> R.QuantizedWeight:
    """RTN with, per (row, group), the clip ratio from ``ratios`` of least squared error."""
    R.check_tensor("weight", w, dtypes=R.FLOAT_DTYPES, ndim=2)
    n, k = w.shape
    k_pad = padded_k(k)
    g = R.check_group_size(group_size, k_pad)
    wp = pad_last_dim(w.float(), k_pad).view(n, k_pad // g, g)
    absmax = wp.abs().amax(dim=-1)
    best_err = torch.full_like(absmax, float("inf"))
    best_s = absmax / INT4_QMAX
    for r in ratios:
        if not (0.0 < float(r) <= 1.0):
            raise ValueError(f"clip ratios must be in (0, 1], got {r}")
        s = absmax * float(r) / INT4_QMAX
        safe = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.round(wp / safe[..., None]).clamp_(-INT4_QMAX, INT4_QMAX)
        err = ((q * s[..., None] - wp) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    safe = torch.where(best_s == 0, torch.ones_like(best_s), best_s)
    q = torch.round(wp / safe[..., None]).clamp_(-INT4_QMAX, INT4_QMAX)
    qweight = pack_int4(q.view(n, k_pad).to(torch.int8))
    return R.QuantizedWeight(qweight, best_s.contiguous(), k, -1 if group_size in (None, -1) else group_size)


def _quantize_weight(w: torch.Tensor, config: W4AxConfig, hessian: Optional[torch.Tensor]) -> R.QuantizedWeight:
    if config.weight_method == "gptq":
        from .gptq import gptq_quantize

        return gptq_quantize(w, hessian, config.group_size, damp=config.gptq_damp,
                             act_order=config.gptq_act_order, clip_ratio=config.clip_ratio, sym=config.weight_sym,
                             mse=config.mse)
    if config.clip_search:
        return quantize_weight_clip_search(w, config.group_size)
    return R.quantize_weight_rtn(w, config.group_size, clip_ratio=config.clip_ratio, sym=config.weight_sym)


def _layout_for(config: W4AxConfig, k: int, absmax: Optional[torch.Tensor], device) -> ActivationLayout:
    if config.act_bits == "fmpq":
        return R.fmpq_calibrate(absmax.to(device), **config.fmpq_kwargs())
    bits = 8 if config.act_bits == 8 else 4
    return ActivationLayout.identity(k, bits, device=device)


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha1(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_groups_fit(model: nn.Module, names: List[str], config: W4AxConfig) -> None:
    for n in names:
        lin = model.get_submodule(n)
        try:
            R.check_group_size(config.group_size, padded_k(lin.in_features))
        except ValueError as e:
            raise ValueError(f"layer {n} (in_features={lin.in_features}): {e}") from None


def quantize_(model: nn.Module, config, calib_data=None, **kwargs) -> nn.Module:
    """Quantize ``model`` in place with ``config`` (dispatched on the config type); returns it.

    For :class:`W4AxConfig`: ``calib_data`` is a list of ``[1, T]`` LongTensors of token
    ids (needed for FMPQ activations and GPTQ).  Keyword arguments: ``calib_stats``
    (a :class:`~cometq.calibrate.CalibrationStats` from an earlier run on the same,
    unmodified model, to skip calibration), ``progress`` (tqdm bar, default True),
    ``weight_cache`` (a dict reused across calls to skip re-quantizing identical weights).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    handler = get_quantize_handler(config)
    return handler(model, config, calib_data=calib_data, **kwargs)


@register_quantize_handler(W4AxConfig)
@torch.no_grad()
def quantize_w4ax(
    model: nn.Module,
    config: W4AxConfig,
    calib_data=None,
    *,
    calib_stats: Optional[CalibrationStats] = None,
    progress: bool = True,
    weight_cache: Optional[dict] = None,
) -> nn.Module:
    names = target_linears(model, config)
    if not names:
        raise ValueError(f"no nn.Linear to quantize in {type(model).__name__} (skip_modules={config.skip_modules})")
    _check_groups_fit(model, names, config)
    if config.weight_method == "gptq" and config.gptq_sequential:
        if calib_stats is not None:
            raise ValueError(
                "gptq_sequential=True calibrates layer by layer on the partly quantized model; one-pass calib_stats "
                "cannot be used: pass calib_data (or use gptq_sequential=False)"
            )
        if calib_data is None:
            raise ValueError("GPTQ needs calibration data: pass calib_data=[LongTensor [1, T], ...]")
        _quantize_sequential(model, config, calib_data, names, progress=progress, weight_cache=weight_cache)
        model.cometq_config = config
        return model
    need_samples = _clip_samples(config) > 0
    need_calib = config.act_bits == "fmpq" or config.weight_method == "gptq" or need_samples
    stats = calib_stats
    if need_calib and stats is None:
        if calib_data is None:
            why = "FMPQ activations" if config.act_bits == "fmpq" else "GPTQ"
            raise ValueError(f"{why} need calibration data: pass calib_data=[LongTensor [1, T], ...]")
        stats = collect_stats(model, calib_data, names, hessian=config.weight_method == "gptq", progress=progress,
                              samples=_clip_samples(config))
    if stats is not None and need_calib:
        lacking = [n for n in names if n not in stats.absmax or (config.weight_method == "gptq" and n not in stats.hessian)]
        if lacking:
            raise ValueError(f"calib_stats lacks statistics for {lacking[:5]} (collected for another model or without hessian)")
        if need_samples and any(n not in stats.samples for n in names):
            raise ValueError("act_clip='search' needs input samples: calib_stats was collected without samples= "
                             "(collect_stats(..., samples=N)) or pass calib_data instead")
    _quantize_names(model, names, config, stats if need_calib else None, progress=progress, weight_cache=weight_cache)
    model.cometq_config = config
    return model


def _quantize_sequential(model: nn.Module, config: W4AxConfig, calib_data, names: List[str], *,
                         progress: bool, weight_cache: Optional[dict]) -> None:
    """Sequential GPTQ: decoder layer i is calibrated on what layers 0..i-1, already
    quantized (weights *and* activations, as configured), hand it.

    Per decoder layer: its Linears' input statistics are collected with the layer
    itself still in floating point (so q/k/v and gate/up share one Hessian each;
    o_proj/down_proj see fp attention/MLP inputs of this layer), the layer's
    Linears are quantized and replaced, and the layer is re-run to produce the
    next layer's inputs.  Targets outside the decoder layers (rare: lm_head is
    skipped by default) are calibrated one-pass on the floating-point model.
    """
    found = find_decoder_layers(model, names)
    if found is None:
        raise ValueError(
            f"gptq_sequential=True needs the target Linears inside an nn.ModuleList of decoder layers; "
            f"none found in {type(model).__name__}"
        )
    list_name, layers = found
    per_layer = [[n for n in names if n.startswith(f"{list_name}.{j}.")] for j in range(len(layers))]
    inside = {n for ln in per_layer for n in ln}
    outside = [n for n in names if n not in inside]
    out_stats = (collect_stats(model, calib_data, outside, hessian=True, progress=False, samples=_clip_samples(config))
                 if outside else None)
    hidden, calls = capture_layer_inputs(model, calib_data, list(layers))
    it = range(len(layers))
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="cometq sequential GPTQ", unit="layer", leave=False)
        except ImportError:  # pragma: no cover
            pass
    for j in it:
        layer = layers[j]

        def run(i, layer=layer, j=j):
            extra, kw = calls[j][i]
            return layer_output(layer(hidden[i], *extra, **kw))

        lnames = per_layer[j]
        prev = {}
        if lnames:
            mods = {n: model.get_submodule(n) for n in lnames}
            stats = collect_stats_with(mods, len(hidden), run, hessian=True, samples=_clip_samples(config))
            stages = _true_sequential_stages(model, lnames, stats, run) if config.gptq_true_sequential else [lnames]
            for k, stage in enumerate(stages):
                if k > 0:
                    # this stage's inputs with the earlier stages of the layer already quantized
                    smods = {n: model.get_submodule(n) for n in stage}
                    stats = collect_stats_with(smods, len(hidden), run, hessian=True, samples=_clip_samples(config))
                _quantize_names(model, stage, config, stats, progress=False, weight_cache=weight_cache)
                # propagate on the CPU fast path (same integers and scales as the
                # reference op); restored afterwards so the model's default is unchanged
                for m in layer.modules():
                    if isinstance(m, W4AxLinear) and m not in prev:
                        prev[m] = m.fast_path
                set_fast_path(layer, True)
        try:
            hidden = [run(i) for i in range(len(hidden))]
        finally:
            for m, f in prev.items():
                m.fast_path = f
    if outside:
        _quantize_names(model, outside, config, out_stats, progress=False, weight_cache=weight_cache)


def _true_sequential_stages(model: nn.Module, lnames: List[str], stats: CalibrationStats, run) -> List[List[str]]:
    """``lnames`` cut into stages in call order: Linears sharing an input form one stage,
    and a gated MLP's gate/up/down stay together (down_proj's permutation is folded into
    gate/up rows, so their layouts are decided at once)."""
    order: List[str] = []
    mods = {n: model.get_submodule(n) for n in lnames}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
               for n, m in mods.items()]
    try:
        run(0)
    finally:
        for h in handles:
            h.remove()
    order += [n for n in lnames if n not in order]
    triples = {x: t[1:] for t in mlp_triples(model, lnames) for x in t[1:]}
    stages: List[List[str]] = []
    seen = set()
    for n in order:
        if n in seen:
            continue
        stage = list(triples[n]) if n in triples else [g for g in stats.group_of(n) if g in lnames]
        stage = [x for x in stage if x not in seen]
        seen.update(stage)
        stages.append(stage)
    return stages


def _quantize_names(model: nn.Module, names: List[str], config: W4AxConfig, stats: Optional[CalibrationStats], *,
                    progress: bool, weight_cache: Optional[dict]) -> None:
    """Layouts, the down_proj fold, INT4 weights and module replacement for ``names``."""
    # one layout per input: shared-input groups share the layout of their first member
    layouts: Dict[str, ActivationLayout] = {}
    for n in names:
        if n in layouts:
            continue
        lin = model.get_submodule(n)
        absmax = stats.absmax[n] if (stats is not None and config.act_bits == "fmpq") else None
        group = stats.group_of(n) if stats is not None else [n]
        if absmax is not None and len(group) > 1:
            absmax = torch.stack([stats.absmax[g] for g in group if g in stats.absmax]).amax(0)
        lay = _layout_for(config, lin.in_features, absmax, lin.weight.device)
        if config.act_bits in ("fmpq", 4) and lay.n_int4:
            if config.clip == "search":
                members = [g for g in group if g in names]
                lay = lay.with_clip(search_act_clip(
                    stats.samples[n].to(lin.weight.device), lay,
                    [model.get_submodule(g).weight for g in members], scale_mode=config.scale_mode))
            elif config.clip != 1.0:
                lay = lay.with_clip(config.clip)
        for g in group:
            if g in names:
                layouts[g] = lay

    # exact offline fold: down_proj's permutation into gate/up output rows
    folded = set()
    if config.fold_permutations and config.act_bits == "fmpq":
        for mlp_name, gate, up, down in mlp_triples(model, names):
            lay = layouts[down]
            if lay.is_identity_perm:
                continue
            mlp = model.get_submodule(mlp_name) if mlp_name else model
            perm = lay.perm
            # gate/up rows reordered; down's columns are permuted below with its layout
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight.data = lin.weight.data[perm.to(lin.weight.device)].contiguous()
                if lin.bias is not None:
                    lin.bias.data = lin.bias.data[perm.to(lin.bias.device)].contiguous()
            folded.add(down)

    it = names
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(names, desc="cometq quantize", unit="layer", leave=False)
        except ImportError:  # pragma: no cover
            pass
    for n in it:
        lin = model.get_submodule(n)
        lay = layouts[n]
        perm = lay.perm.to(lin.weight.device)
        w = lin.weight.data.float()
        if not lay.is_identity_perm:
            w = w[:, perm]
        h = None
        if config.weight_method == "gptq":
            h = stats.hessian[n].to(w.device)
            if not lay.is_identity_perm:
                h = h[perm][:, perm]
        if weight_cache is not None:
            # identical (layer, weight in stored order, recipe) -> identical result;
            # lets benchmark sweeps reuse GPTQ across INT8 budgets (the FMPQ sort,
            # hence the column order, does not depend on the budget)
            key = (n, config.weight_method, config.group_size, config.clip_ratio, config.clip_search,
                   config.gptq_damp, config.gptq_act_order, config.mse, config.weight_sym, _digest(w),
                   None if h is None else _digest(h))
            qw = weight_cache.get(key)
            if qw is None:
                qw = weight_cache[key] = _quantize_weight(w, config, h)
        else:
            qw = _quantize_weight(w, config, h)
        run_layout = (ActivationLayout(torch.arange(lin.in_features, device=perm.device), lay.block_bits, lay.int4_clip)
                      if n in folded else lay)
        new = W4AxLinear.from_linear(
            lin, run_layout, qw, act_bits=config.act_bits, scale_mode=config.scale_mode, backend=config.backend
        )
        _set_module(model, n, new)
