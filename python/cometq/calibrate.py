"""Calibration: forward hooks over calibration batches, per ``nn.Linear`` input.

Collected per target Linear (by module name):

* ``absmax`` float32 ``[K]``: per-channel max |x| over all calibration tokens (the
  statistic :func:`cometq.reference.fmpq_calibrate` sorts by);
* ``hessian`` float32 ``[K, K]`` (only with ``hessian=True``, i.e. GPTQ):
  ``H = 2/n * sum_t x_t x_t^T``, the proxy Hessian of the layer's squared output error;
* ``groups``: lists of Linear names that read the very same input tensor (q/k/v,
  gate/up): they must share one activation layout.

The statistics come from one pass over the floating-point model (layers are not
re-calibrated after earlier layers are quantized).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["CalibrationStats", "collect_stats"]


@dataclass
class CalibrationStats:
    absmax: Dict[str, torch.Tensor] = field(default_factory=dict)
    hessian: Dict[str, torch.Tensor] = field(default_factory=dict)
    n_tokens: Dict[str, int] = field(default_factory=dict)
    groups: List[List[str]] = field(default_factory=list)

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
) -> CalibrationStats:
    """Run ``calib_data`` through ``model`` and collect input statistics of the Linears in ``names``."""
    batches = _as_batches(calib_data)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"modules not found in the model: {missing[:5]}")
    stats = CalibrationStats()
    first_inputs: Dict[str, torch.Tensor] = {}
    state = {"first": True}
    handles = []

    # Linears called back to back on the very same tensor (q/k/v, gate/up) share
    # its statistics: computed once, aliased for the others.
    last = {"x": None, "owner": None}
    alias: Dict[str, str] = {}
    h_sum: Dict[str, torch.Tensor] = {}

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
            stats.n_tokens[name] = stats.n_tokens.get(name, 0) + xf.shape[0]
        return hook

    for n in names:
        handles.append(modules[n].register_forward_pre_hook(make_hook(n)))
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    try:
        it = batches
        if progress:
            try:
                from tqdm.auto import tqdm

                it = tqdm(batches, desc="cometq calibration", unit="batch", leave=False)
            except ImportError:  # pragma: no cover - tqdm ships with transformers
                pass
        for i, b in enumerate(it):
            model(b.to(dev))
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
    for n, owner in alias.items():
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
