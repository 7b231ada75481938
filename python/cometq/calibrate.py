"""Calibration: forward hooks over calibration batches, per ``nn.Linear`` input.

Collected per target Linear (by module name):

* ``absmax`` float32 ``[K]``: per-channel max |x| over all calibration tokens (the
  statistic :func:`cometq.reference.fmpq_calibrate` sorts by);
* ``hessian`` float32 ``[K, K]`` (only with ``hessian=True``, i.e. GPTQ):
  ``H = 2/n * sum_t x_t x_t^T``, the proxy Hessian of the layer's squared output error;
* ``groups``: lists of Linear names that read the very same input tensor (q/k/v,
  gate/up): they must share one activation layout;
* ``samples`` float32 ``[S, K]`` (only with ``samples=S > 0``): input rows drawn at
  an even stride from every batch, for the activation clip search
  (:func:`search_act_clip`).

:func:`collect_stats` makes one pass over the floating-point model.  Sequential
GPTQ (``W4AxConfig.gptq_sequential``, in :mod:`cometq.quantize`) instead uses
:func:`capture_layer_inputs` + :func:`collect_stats_with` to calibrate decoder
layer i on the outputs of the already-quantized layers 0..i-1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "CalibrationStats",
    "collect_stats",
    "collect_stats_with",
    "find_decoder_layers",
    "capture_layer_inputs",
    "search_act_clip",
    "ACT_CLIP_RATIOS",
]

#: INT4 clip ratios tried by :func:`search_act_clip` (1.0 first: ties keep no clip).
ACT_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


@dataclass
class CalibrationStats:
    absmax: Dict[str, torch.Tensor] = field(default_factory=dict)
    hessian: Dict[str, torch.Tensor] = field(default_factory=dict)
    n_tokens: Dict[str, int] = field(default_factory=dict)
    groups: List[List[str]] = field(default_factory=list)
    samples: Dict[str, torch.Tensor] = field(default_factory=dict)

    def group_of(self, name: str) -> List[str]:
        for g in self.groups:
            if name in g:
                return g
        return [name]


def _as_batches(calib_data) -> List[torch.Tensor]:
    if isinstance(calib_data, torch.Tensor):
        calib_data = [calib_data] if calib_data.dim() == 2 and calib_data.shape[0] == 1 else list(calib_data.split(1))
    try:
        batches = list(calib_data)
    except TypeError:
        raise TypeError(f"calib_data must be a list of [1, T] LongTensors, got {type(calib_data).__name__}") from None
    if not batches:
        raise ValueError("calib_data is empty: pass at least one [1, T] LongTensor of token ids")
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"calib_data[{i}] must be a LongTensor of token ids, got {type(b).__name__}")
        if b.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"calib_data[{i}] must hold integer token ids, got dtype {b.dtype} (shape {tuple(b.shape)})")
        if b.dim() == 1:
            b = b.unsqueeze(0)
        if b.dim() != 2 or b.shape[1] == 0:
            raise ValueError(f"calib_data[{i}] must be [batch, T] with T >= 1, got shape {tuple(b.shape)}")
        out.append(b.long())
    return out


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    calib_data,
    names: Sequence[str],
    *,
    hessian: bool = False,
    progress: bool = True,
    samples: int = 0,
) -> CalibrationStats:
    """Run ``calib_data`` through ``model`` and collect input statistics of the Linears in ``names``."""
    batches = _as_batches(calib_data)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"modules not found in the model: {missing[:5]}")
    dev = _device_of(model)
    return collect_stats_with(
        {n: modules[n] for n in names}, len(batches), lambda i: model(batches[i].to(dev)),
        hessian=hessian, progress=progress, samples=samples,
    )


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def collect_stats_with(
    modules: Dict[str, nn.Module],
    n_batches: int,
    run: Callable[[int], object],
    *,
    hessian: bool = False,
    progress: bool = False,
    samples: int = 0,
) -> CalibrationStats:
    """Statistics of the inputs of ``modules`` (name -> Linear) while ``run(i)`` runs batch ``i``.

    ``samples``: keep about this many input rows per input (an even stride through
    every batch, ``ceil(samples / n_batches)`` rows each) in ``stats.samples``.

    ``run`` is anything that calls the modules: the whole model (one-pass
    calibration) or a single decoder layer (sequential GPTQ).
    """
    names = list(modules)
    stats = CalibrationStats()
    first_inputs: Dict[str, torch.Tensor] = {}
    state = {"first": True}
    handles = []

    # Linears called back to back on the very same tensor (q/k/v, gate/up) share
    # its statistics: computed once, aliased for the others.
    last = {"x": None, "owner": None}
    alias: Dict[str, str] = {}
    h_sum: Dict[str, torch.Tensor] = {}
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be an int >= 0, got {samples!r}")
    per_batch = -(-samples // max(n_batches, 1)) if samples else 0
    rows: Dict[str, List[torch.Tensor]] = {}

    def make_hook(name: str):
        def hook(mod, args):
            x = args[0]
            if state["first"] and name not in first_inputs:
                first_inputs[name] = x  # kept alive so identity comparison is safe
            if x is last["x"] and alias.get(name, last["owner"]) == last["owner"]:
                alias[name] = last["owner"]
                return
            last["x"], last["owner"] = x, name
            xf = x.detach().reshape(-1, x.shape[-1]).float()
            am = xf.abs().amax(dim=0)
            prev = stats.absmax.get(name)
            stats.absmax[name] = am if prev is None else torch.maximum(prev, am)
            if hessian:
                h = h_sum.get(name)
                if h is None:
                    h = h_sum[name] = torch.zeros(xf.shape[1], xf.shape[1], dtype=torch.float32, device=xf.device)
                h.addmm_(xf.T, xf)  # sum of x x^T; scaled to GPTQ's 2/n once at the end
            if per_batch:
                step = max(1, xf.shape[0] // per_batch)
                rows.setdefault(name, []).append(xf[::step][:per_batch].clone())
            stats.n_tokens[name] = stats.n_tokens.get(name, 0) + xf.shape[0]
        return hook

    for n in names:
        handles.append(modules[n].register_forward_pre_hook(make_hook(n)))
    try:
        it = range(n_batches)
        if progress:
            try:
                from tqdm.auto import tqdm

                it = tqdm(it, desc="cometq calibration", unit="batch", leave=False)
            except ImportError:  # pragma: no cover - tqdm ships with transformers
                pass
        for i in it:
            run(i)
            if i == 0:
                state["first"] = False
                stats.groups = _shared_input_groups(names, first_inputs)
                first_inputs.clear()
    finally:
        for h in handles:
            h.remove()
    last["x"] = None
    for n, h in h_sum.items():
        stats.hessian[n] = h.mul_(2.0 / stats.n_tokens[n])
    for n, r in rows.items():
        stats.samples[n] = torch.cat(r)[:samples]
    for n, owner in alias.items():
        if owner in stats.samples:
            stats.samples[n] = stats.samples[owner]
        stats.absmax[n] = stats.absmax[owner]
        stats.n_tokens[n] = stats.n_tokens[owner]
        if hessian:
            stats.hessian[n] = stats.hessian[owner]
    not_seen = [n for n in names if n not in stats.absmax]
    if not_seen:
        raise RuntimeError(f"calibration never reached these modules (not called by forward): {not_seen[:5]}")
    for n in names:
        if not bool(torch.isfinite(stats.absmax[n]).all()):
            raise ValueError(f"calibration produced non-finite activations at {n}")
    return stats


# ----------------------------------------------------------------------
# sequential (layer-by-layer) calibration helpers
# ----------------------------------------------------------------------
def find_decoder_layers(model: nn.Module, names: Sequence[str]) -> Optional[Tuple[str, nn.ModuleList]]:
    """The ``nn.ModuleList`` holding the most target Linears (the decoder layers), or None."""
    best = None
    for n, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or not n:
            continue
        cnt = sum(1 for t in names if t.startswith(n + "."))
        if cnt and (best is None or cnt > best[2]):
            best = (n, m, cnt)
    return None if best is None else (best[0], best[1])


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, calib_data, layers: Sequence[nn.Module]):
    """One forward per calibration batch up to the last of ``layers``.

    Returns ``(hidden, calls)``: ``hidden[i]`` the hidden states entering
    ``layers[0]`` for batch ``i``, and ``calls[j][i] = (extra_args, kwargs)`` what
    ``layers[j]`` was called with besides the hidden states (position embeddings,
    attention mask, ...; recorded per layer because models with mixed attention
    types hand each layer its own mask).  Run with ``use_cache=False`` so no layer
    writes a KV cache that later re-runs would extend.
    """
    batches = _as_batches(calib_data)
    dev = _device_of(model)
    hidden: List[torch.Tensor] = []
    calls: List[List] = [[] for _ in layers]
    handles = []

    def make(j: int):
        def hook(mod, args, kwargs):
            kw = dict(kwargs)
            if args:
                h, extra = args[0], tuple(args[1:])
            elif "hidden_states" in kw:
                h, extra = kw.pop("hidden_states"), ()
            else:
                raise RuntimeError(f"decoder layer {j} was called without hidden states (args={len(args)}, kwargs={sorted(kw)})")
            if j == 0:
                hidden.append(h.detach())
            calls[j].append((extra, kw))
            if j == len(layers) - 1:
                raise _StopForward
        return hook

    for j, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(make(j), with_kwargs=True))
    try:
        for b in batches:
            try:
                try:
                    model(b.to(dev), use_cache=False)
                except TypeError as e:  # a plain nn.Module without a use_cache argument
                    if "use_cache" not in str(e):
                        raise
                    model(b.to(dev))
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    bad = [j for j, c in enumerate(calls) if len(c) != len(batches)]
    if bad:
        raise RuntimeError(f"decoder layers {bad[:5]} were not called once per calibration batch")
    return hidden, calls


def layer_output(out) -> torch.Tensor:
    """Hidden states from a decoder layer's return value (a tensor or a tuple starting with one)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _shared_input_groups(names: Sequence[str], first_inputs: Dict[str, torch.Tensor]) -> List[List[str]]:
    groups: List[List[str]] = []
    reps: List[torch.Tensor] = []
    for n in names:
        x = first_inputs.get(n)
        if x is None:
            continue
        for g, r in zip(groups, reps):
            if r is x:
                g.append(n)
                break
        else:
            groups.append([n])
            reps.append(x)
    return [g for g in groups if len(g) > 1]


# ----------------------------------------------------------------------
# activation clip search
# ----------------------------------------------------------------------
@torch.no_grad()
def search_act_clip(
    x: torch.Tensor,
    layout,
    weights: Sequence[torch.Tensor],
    *,
    scale_mode: str = "block",
    ratios: Sequence[float] = ACT_CLIP_RATIOS,
) -> float:
    """The INT4 clip ratio (from ``ratios``) whose fake-quantized activations give the
    least output error ``sum_W ||(Q(x) - x) W^T||^2`` on samples ``x [S, K]``.

    ``weights`` are the float weights ``[N, K]`` (original column order) of every
    Linear reading this input: the error is measured where it matters, in the
    layer outputs, so channels with large weights count more.  Layouts without
    INT4 blocks return 1.0.
    """
    from . import reference as R
    from .layout import ActivationLayout
    from .nn import fake_quantize_activation

    if not isinstance(layout, ActivationLayout):
        raise TypeError(f"layout must be an ActivationLayout, got {type(layout).__name__}")
    R.check_tensor("x", x, dtypes=R.FLOAT_DTYPES, ndim=2)
    if x.shape[1] != layout.in_features or x.shape[0] == 0:
        raise ValueError(f"samples shape {tuple(x.shape)} do not match the layout's K={layout.in_features}")
    if not weights:
        raise ValueError("search_act_clip needs the weights of the Linears reading this input")
    ratios = [float(r) for r in ratios]
    for r in ratios:
        if not (0.0 < r <= 1.0):
            raise ValueError(f"clip ratios must be in (0, 1], got {r}")
    if layout.n_int4 == 0:
        return 1.0
    perm = layout.perm.to(x.device)
    w = torch.cat([wt.detach().float().to(x.device) for wt in weights], dim=0)
    if w.shape[1] != layout.in_features:
        raise ValueError(f"weights have {w.shape[1]} input features but the layout has K={layout.in_features}")
    wp = R.pad_last_dim(w[:, perm], layout.k_pad)  # [N, K_pad], permuted like the quantized x
    xf = x.float()
    xp = R.pad_last_dim(xf[:, perm], layout.k_pad)
    ref = xp @ wp.T
    best, best_err = 1.0, float("inf")
    for r in ratios:
        xq = fake_quantize_activation(xf, layout.with_clip(r), scale_mode)
        err = float(((xq @ wp.T) - ref).pow(2).sum())
        if err < best_err:
            best, best_err = r, err
    return best
