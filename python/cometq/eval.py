"""Perplexity harness and the accuracy table of docs/ACCURACY.md.

* :func:`perplexity`: ``exp(mean token cross-entropy)`` over non-overlapping
  windows (each ``[1, T]``; every window predicts its tokens 1..T-1).
* :func:`compare_schemes`: one calibration pass, then each scheme on a fresh
  copy of the model, perplexity on the same windows.

Schemes are either a :class:`W4AxConfig` (the real quantized layers, CPU fast
path on) or one of the fake-quantized baselines below (floating-point weights
or INT8 weights, activations quantized and dequantized in the reference math):

* ``"fp"``: unquantized;
* ``"w8a8"``: INT8 per-output-channel weights, INT8 per-token activations;
* ``("act_fmpq", fraction)``: activation-only FMPQ (weights kept in float).

Command line (what docs/ACCURACY.md was produced with)::

    python -m cometq.eval --windows 8 --seq-len 512 --calib 8
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import reference as R
from .calibrate import CalibrationStats, collect_stats
from .config import W4AxConfig
from .layout import ActivationLayout
from .nn import fake_quantize_activation, set_fast_path
from .quantize import _set_module, quantize_, target_linears

__all__ = ["perplexity", "compare_schemes", "default_schemes", "FakeQuantLinear", "format_table", "main"]


@torch.no_grad()
def perplexity(model: nn.Module, windows: Sequence[torch.Tensor], *, progress: bool = False) -> float:
    """``exp`` of the mean next-token cross-entropy over all windows' tokens."""
    if isinstance(windows, torch.Tensor):
        windows = [windows] if windows.dim() == 2 else [w.unsqueeze(0) for w in windows]
    windows = list(windows)
    if not windows:
        raise ValueError("perplexity needs at least one window")
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    it = windows
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(windows, desc="perplexity", unit="win", leave=False)
    total, count = 0.0, 0
    for i, w in enumerate(it):
        if not isinstance(w, torch.Tensor) or w.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"windows[{i}] must be a LongTensor of token ids, got {getattr(w, 'dtype', type(w).__name__)}")
        if w.dim() == 1:
            w = w.unsqueeze(0)
        if w.dim() != 2 or w.shape[1] < 2:
            raise ValueError(f"windows[{i}] must be [B, T] with T >= 2, got shape {tuple(w.shape)}")
        w = w.long().to(dev)
        logits = model(w).logits[:, :-1].float()
        tgt = w[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum")
        total += float(ce)
        count += tgt.numel()
    mean = total / count
    if not math.isfinite(mean):
        return float("inf")
    return math.exp(mean)


class FakeQuantLinear(nn.Module):
    """Baseline layer for the table: float (or INT8-fake) weights, fake-quantized activations.

    Activations go through :func:`cometq.nn.fake_quantize_activation` (the reference
    quantizer's math) with ``layout``; ``weight`` is given in the original column
    order and permuted here once.
    """

    def __init__(self, linear: nn.Linear, layout: ActivationLayout, scale_mode: str = "block", weight_bits: Optional[int] = None):
        super().__init__()
        w = linear.weight.detach().float()
        if weight_bits == 8:  # symmetric per output channel
            s = w.abs().amax(dim=1, keepdim=True) / 127
            w = torch.round(R._safe_div(w, s)).clamp_(-127, 127) * s
        elif weight_bits is not None:
            raise ValueError(f"weight_bits must be None or 8, got {weight_bits!r}")
        self.layout = layout
        self.scale_mode = scale_mode
        wp = w[:, layout.perm] if not layout.is_identity_perm else w
        self.register_buffer("weight_p", R.pad_last_dim(wp, layout.k_pad).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        lead = x.shape[:-1]
        xd = fake_quantize_activation(x.reshape(-1, self.in_features), self.layout, self.scale_mode)
        y = xd @ self.weight_p.T
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)


Scheme = Union[str, Tuple[str, float], W4AxConfig]


def _apply_fake(model: nn.Module, scheme, stats: Optional[CalibrationStats]) -> None:
    names = target_linears(model, W4AxConfig(act_bits=16))
    for n in names:
        lin = model.get_submodule(n)
        if scheme == "w8a8":
            lay = ActivationLayout.identity(lin.in_features, 8, device=lin.weight.device)
            new = FakeQuantLinear(lin, lay, scale_mode="class", weight_bits=8)  # class mode, all INT8 = per token
        else:
            _, frac = scheme
            lay = R.fmpq_calibrate(stats.absmax[n].to(lin.weight.device), int8_fraction=float(frac))
            new = FakeQuantLinear(lin, lay)
        _set_module(model, n, new)


def scheme_name(s: Scheme) -> str:
    if s == "fp":
        return "unquantized (fp32)"
    if s == "w8a8":
        return "W8A8 (INT8 per-channel W, per-token A; fake-quant)"
    if isinstance(s, tuple):
        return f"A-only FMPQ {100 * s[1]:.1f}% INT8 blocks (fp32 W; fake-quant)"
    meth = s.weight_method.upper()
    if s.weight_method == "gptq":
        meth += " seq" if s.gptq_sequential else " one-pass"
        if s.gptq_act_order:
            meth += " act-order"
    w = f"W4 {meth} g{s.group_size if s.group_size != -1 else 'chan'}"
    if s.clip_search:
        w += " clip-search"
    if s.act_bits == 16:
        return f"{w} A16 (weight-only)"
    if s.act_bits == 4:
        return f"{w} A4 (plain W4A4)"
    if s.act_bits == 8:
        return f"{w} A8"
    if s.int8_blocks is not None:
        return f"{w} FMPQ {s.int8_blocks} INT8 block(s) = {128 * s.int8_blocks} outlier ch. (Atom-style)"
    if s.outlier_ratio is not None:
        return f"{w} FMPQ outliers > {s.outlier_ratio} x median"
    return f"{w} FMPQ {100 * s.int8_fraction:.1f}% INT8 blocks"


def default_schemes() -> List[Scheme]:
    g = dict(group_size=128)
    return [
        "fp",
        "w8a8",
        ("act_fmpq", 0.125),
        ("act_fmpq", 0.25),
        ("act_fmpq", 0.375),
        W4AxConfig(act_bits=16, weight_method="rtn", **g),
        W4AxConfig(act_bits=4, weight_method="rtn", **g),
        W4AxConfig(int8_blocks=1, weight_method="gptq", gptq_sequential=False, gptq_act_order=False, **g),
        W4AxConfig(int8_fraction=0.25, weight_method="rtn", **g),
        W4AxConfig(int8_fraction=0.125, weight_method="gptq", gptq_sequential=False, gptq_act_order=False, **g),
        W4AxConfig(int8_fraction=0.25, weight_method="gptq", gptq_sequential=False, gptq_act_order=False, **g),
        W4AxConfig(int8_fraction=0.375, weight_method="gptq", gptq_sequential=False, gptq_act_order=False, **g),
    ]


def gptq_study_schemes() -> List[Scheme]:
    """GPTQ variants of docs/ACCURACY.md's "GPTQ study" table (``--gptq-study``), most
    informative first.  The one-pass GPTQ rows they compare with are in ``--extra`` /
    the main table."""
    seq = dict(weight_method="gptq", gptq_sequential=True)
    nat = dict(gptq_act_order=False, **seq)  # columns in stored (FMPQ-sorted or natural) order
    act = dict(gptq_act_order=True, **seq)
    return [
        W4AxConfig(act_bits=16, **nat),
        W4AxConfig(act_bits=16, group_size=32, **nat),
        W4AxConfig(int8_fraction=0.25, **nat),
        W4AxConfig(int8_fraction=0.25, group_size=32, **nat),
        W4AxConfig(act_bits=16, **act),
        W4AxConfig(act_bits=16, group_size=64, **nat),
        W4AxConfig(int8_fraction=0.25, **act),
        W4AxConfig(act_bits=16, group_size=32, **act),
        W4AxConfig(int8_fraction=0.25, group_size=32, **act),
    ]


def compare_schemes(
    model: nn.Module,
    calib_data,
    windows: Sequence[torch.Tensor],
    schemes: Optional[Sequence[Scheme]] = None,
    *,
    progress: bool = True,
    log=print,
) -> List[Dict]:
    """Perplexity of each scheme on ``windows`` (one calibration pass shared by all).

    Returns rows ``{"scheme", "ppl", "ratio" (to the first "fp" row, if any), "seconds"}``.
    ``model`` itself is not modified (each scheme quantizes a deep copy).
    """
    schemes = list(default_schemes() if schemes is None else schemes)
    seq = lambda s: isinstance(s, W4AxConfig) and s.weight_method == "gptq" and s.gptq_sequential  # noqa: E731
    need_stats = any(s != "fp" and s != "w8a8" and not seq(s) for s in schemes)
    need_h = any(isinstance(s, W4AxConfig) and s.weight_method == "gptq" and not s.gptq_sequential for s in schemes)
    stats = None
    if need_stats:
        t = time.time()
        names = target_linears(model, W4AxConfig(act_bits=16))
        stats = collect_stats(model, calib_data, names, hessian=need_h, progress=progress)
        log(f"calibration: {len(names)} linears, {time.time() - t:.1f}s")
    rows: List[Dict] = []
    base = None
    cache: dict = {}
    for s in schemes:
        t = time.time()
        if s == "fp":
            m = model
        else:
            m = copy.deepcopy(model)
            if isinstance(s, W4AxConfig) and s.weight_method == "gptq" and s.gptq_sequential:
                # layer-by-layer calibration on the partly quantized copy: no shared stats
                quantize_(m, s, calib_data=calib_data, progress=False, weight_cache=cache)
                set_fast_path(m, True)
            elif isinstance(s, W4AxConfig):
                quantize_(m, s, calib_stats=stats, progress=False, weight_cache=cache)
                set_fast_path(m, True)
            else:
                _apply_fake(m, s, stats)
        ppl = perplexity(m, windows, progress=progress)
        if s == "fp" and base is None:
            base = ppl
        row = {"scheme": scheme_name(s), "ppl": ppl, "ratio": (ppl / base) if base else None, "seconds": time.time() - t}
        rows.append(row)
        log(f"{row['scheme']}: ppl {ppl:.3f}" + (f" ({row['ratio']:.3f}x)" if row["ratio"] else "") + f" [{row['seconds']:.0f}s]")
        if m is not model:
            del m
    return rows


def format_table(rows: List[Dict]) -> str:
    out = ["| scheme | perplexity | vs unquantized |", "|---|---:|---:|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}x" if r["ratio"] else "-"
        out.append(f"| {r['scheme']} | {r['ppl']:.2f} | {ratio} |")
    return "\n".join(out)


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description="cometq perplexity table (SmolLM2-135M on the pydoc_data corpus)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows (non-overlapping)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib", type=int, default=8, help="calibration windows of --seq-len tokens")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--quick", action="store_true", help="only fp, A-only FMPQ 25%%, W4 GPTQ FMPQ 25%%")
    p.add_argument("--extra", action="store_true", help="supplementary rows: weight-only GPTQ, clip search")
    p.add_argument("--gptq-study", action="store_true",
                   help="GPTQ rows: one-pass vs sequential, act_order, group size 128/64/32")
    a = p.parse_args(argv)
    from . import data
    from .models import load_model

    torch.manual_seed(0)
    model, tok = load_model(a.model)
    toks = data.corpus_tokens(tok)
    calib = data.calibration_batches(toks, a.seq_len, a.calib)
    wins = data.evaluation_windows(toks, a.seq_len, a.windows)
    print(f"model {a.model}: {len(calib)} x {a.seq_len} calibration tokens (first {data.CALIB_FRACTION:.0%} of the corpus), "
          f"{len(wins)} x {a.seq_len} evaluation tokens (from {data.EVAL_START:.0%} on)")
    schemes = None
    if a.quick:
        schemes = ["fp", ("act_fmpq", 0.25), W4AxConfig(int8_fraction=0.25, weight_method="gptq", gptq_sequential=False, gptq_act_order=False)]
    elif a.extra:
        schemes = ["fp", W4AxConfig(act_bits=16, weight_method="gptq", gptq_sequential=False, gptq_act_order=False), W4AxConfig(act_bits=16, clip_search=True),
                   W4AxConfig(int8_fraction=0.25, clip_search=True), W4AxConfig(act_bits=16, group_size=32, clip_search=True),
                   W4AxConfig(int8_fraction=0.25, group_size=32, clip_search=True)]
    if a.gptq_study:
        schemes = gptq_study_schemes()
    rows = compare_schemes(model, calib, wins, schemes)
    print(format_table(rows))
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
