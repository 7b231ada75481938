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
* ``("kv4", scheme)``: ``scheme`` with the 4-bit KV cache
  (:class:`cometq.kvcache.KV4Cache`, the model's ``kv_*`` options), scored with the
  decode protocol of :func:`perplexity_decode` (a single forward pass never reads
  the cache back); its ratio is to the ``("fpcache", "fp")`` row: the unquantized
  model through the same protocol with a full-precision ``DynamicCache``;
* ``("act_fmpq", fraction[, act_clip[, granularity]])``: activation-only
  FMPQ (weights kept in float); ``act_clip`` a float or "search" and
  ``granularity`` the permutation run length, as in :class:`W4AxConfig`.

Command line (what docs/ACCURACY.md was produced with)::

    python -m cometq.eval --windows 8 --seq-len 512 --calib 8
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import reference as R
from .calibrate import CalibrationStats, collect_stats, search_act_clip
from .config import W4AxConfig
from .layout import ActivationLayout
from .nn import fake_quantize_activation, set_fast_path
from .quantize import _set_module, quantize_, target_linears

__all__ = ["perplexity", "perplexity_decode", "nll_decode", "compare_schemes", "default_schemes", "FakeQuantLinear",
           "format_table", "main"]

#: Decode protocol of :func:`perplexity_decode` (docs/KV4.md): tokens prefilled
#: before scoring starts, and tokens fed per forward pass after that.
DECODE_PREFIX = 64
DECODE_CHUNK = 8


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


@torch.no_grad()
def nll_decode(model: nn.Module, windows: Sequence[torch.Tensor], cache_fn, prefix: int = DECODE_PREFIX,
               chunk: int = DECODE_CHUNK) -> Tuple[float, int]:
    """(sum of NLL, count) over tokens ``prefix..T-1`` of every window, scored through a cache.

    Each window's first ``prefix`` tokens are prefilled into ``cache_fn()``, then the
    rest is fed ``chunk`` tokens per forward pass: every scored token attends to the
    older tokens *through the cache*, as in generation."""
    if prefix < 1 or chunk < 1:
        raise ValueError(f"prefix and chunk must be >= 1, got prefix={prefix}, chunk={chunk}")
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    tot, n = 0.0, 0
    for i, w in enumerate(windows):
        if w.dim() == 1:
            w = w.unsqueeze(0)
        if w.dim() != 2 or w.shape[1] <= prefix:
            raise ValueError(f"windows[{i}] shape {tuple(w.shape)}: need [B, T] with T > prefix={prefix}")
        w = w.long().to(dev)
        cache = cache_fn()
        out = model(w[:, :prefix], past_key_values=cache, use_cache=True)
        last = out.logits[:, -1:]
        pos = prefix
        while pos < w.shape[1]:
            ids = w[:, pos : pos + chunk]
            out = model(ids, past_key_values=cache, use_cache=True)
            # predictions for ids[0] come from `last`, for ids[1:] from out.logits[:, :-1]
            pred = torch.cat([last, out.logits[:, :-1]], dim=1).float()
            lp = torch.log_softmax(pred, dim=-1)
            tot -= float(lp.gather(-1, ids[..., None]).sum())
            n += ids.numel()
            last = out.logits[:, -1:]
            pos += chunk
    return tot, n


def perplexity_decode(model: nn.Module, windows: Sequence[torch.Tensor], cache_fn=None, *,
                      prefix: int = DECODE_PREFIX, chunk: int = DECODE_CHUNK) -> float:
    """Perplexity through a KV cache (:func:`nll_decode`); ``cache_fn`` defaults to
    ``KV4Cache.for_model(model)`` (``"fp"`` for a full-precision DynamicCache)."""
    if cache_fn is None or cache_fn == "kv4":
        from .kvcache import KV4Cache

        cache_fn = lambda: KV4Cache.for_model(model)  # noqa: E731
    elif cache_fn == "fp":
        from transformers import DynamicCache

        cache_fn = DynamicCache
    tot, n = nll_decode(model, windows, cache_fn, prefix, chunk)
    mean = tot / n
    return math.exp(mean) if math.isfinite(mean) else float("inf")


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
    layouts: Dict[str, ActivationLayout] = {}
    for n in names:
        lin = model.get_submodule(n)
        if scheme == "w8a8":
            lay = ActivationLayout.identity(lin.in_features, 8, device=lin.weight.device)
            new = FakeQuantLinear(lin, lay, scale_mode="class", weight_bits=8)  # class mode, all INT8 = per token
        else:
            frac, clip = scheme[1], (scheme[2] if len(scheme) > 2 else 1.0)
            gran = scheme[3] if len(scheme) > 3 else 1
            if n not in layouts:  # one layout per shared input (q/k/v, gate/up), like quantize_
                group = [g for g in stats.group_of(n) if g in names]
                lay = R.fmpq_calibrate(stats.absmax[n].to(lin.weight.device), int8_fraction=float(frac),
                                       granularity=int(gran))
                if clip == "search":
                    ws = [model.get_submodule(g).weight for g in group]
                    lay = lay.with_clip(search_act_clip(stats.samples[n].to(lin.weight.device), lay, ws))
                elif float(clip) != 1.0:
                    lay = lay.with_clip(float(clip))
                for g in group:
                    layouts[g] = lay
            new = FakeQuantLinear(lin, layouts[n])
        _set_module(model, n, new)


def scheme_name(s: Scheme) -> str:
    if isinstance(s, tuple) and s[0] == "kv4":
        return scheme_name(s[1]) + " + KV4 cache (decode protocol)"
    if isinstance(s, tuple) and s[0] == "fpcache":
        return scheme_name(s[1]) + ", fp cache (decode protocol)"
    if s == "fp":
        return "unquantized (fp32)"
    if s == "w8a8":
        return "W8A8 (INT8 per-channel W, per-token A; fake-quant)"
    if isinstance(s, tuple):
        clip = s[2] if len(s) > 2 else 1.0
        c = "" if clip == 1.0 else (" INT4 clip-search" if clip == "search" else f" INT4 clip {float(clip):g}")
        if len(s) > 3 and s[3] != 1:
            c += f", channels moved in runs of {s[3]}"
        return f"A-only FMPQ {100 * s[1]:.1f}% INT8 blocks{c} (fp32 W; fake-quant)"
    meth = s.weight_method.upper()
    if s.weight_method == "gptq":
        meth += " seq" if s.gptq_sequential else " one-pass"
        if s.gptq_sequential and s.gptq_true_sequential:
            meth += " true-seq"
        if s.gptq_act_order:
            meth += " act-order"
        if s.mse:
            meth += " mse"
    w = f"W4{'' if s.weight_sym else ' asym'} {meth} g{s.group_size if s.group_size != -1 else 'chan'}"
    if s.clip_search:
        w += " clip-search"
    if s.act_bits in ("fmpq", 4) and s.clip != 1.0:
        w += " A-clip-search" if s.clip == "search" else f" A-clip {s.clip:g}"
    if s.act_bits in ("fmpq", 4, 8) and s.scale_mode == "class":
        w += " class-scales"
    if s.act_bits == "fmpq" and s.granularity > 1:
        w += f" perm-runs-{s.granularity}"
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


def V1(**kw) -> W4AxConfig:
    """A config with the recipe defaults the pre-v2 tables of docs/ACCURACY.md were measured
    with (symmetric weights, no activation clip), so their commands still reproduce them."""
    return W4AxConfig(**{"weight_sym": True, "act_clip": 1.0, "gptq_true_sequential": False, "gptq_mse": False, **kw})


def default_schemes() -> List[Scheme]:
    g = dict(group_size=128)
    return [
        "fp",
        "w8a8",
        ("act_fmpq", 0.125),
        ("act_fmpq", 0.25),
        ("act_fmpq", 0.375),
        V1(act_bits=16, weight_method="rtn", **g),
        V1(act_bits=4, weight_method="rtn", **g),
        V1(int8_blocks=1, weight_method="gptq", gptq_sequential=False, gptq_act_order=False, **g),
        V1(int8_fraction=0.25, weight_method="rtn", **g),
        V1(int8_fraction=0.125, weight_method="gptq", gptq_sequential=False, gptq_act_order=False, **g),
        V1(int8_fraction=0.25, weight_method="gptq", gptq_sequential=False, gptq_act_order=False, **g),
        V1(int8_fraction=0.375, weight_method="gptq", gptq_sequential=False, gptq_act_order=False, **g),
    ]


def gptq_study_schemes() -> List[Scheme]:
    """GPTQ variants of docs/ACCURACY.md's "GPTQ study" table (``--gptq-study``), most
    informative first.  The one-pass GPTQ rows they compare with are in ``--extra`` /
    the main table."""
    seq = dict(weight_method="gptq", gptq_sequential=True)
    nat = dict(gptq_act_order=False, **seq)  # columns in stored (FMPQ-sorted or natural) order
    act = dict(gptq_act_order=True, **seq)
    return [
        V1(act_bits=16, **nat),
        V1(act_bits=16, group_size=32, **nat),
        V1(int8_fraction=0.25, **nat),
        V1(int8_fraction=0.25, group_size=32, **nat),
        V1(act_bits=16, **act),
        V1(act_bits=16, group_size=64, **nat),
        V1(int8_fraction=0.25, **act),
        V1(act_bits=16, group_size=32, **act),
        V1(int8_fraction=0.25, group_size=32, **act),
    ]


def v2_study_schemes() -> List[Scheme]:
    """Rows of docs/ACCURACY.md's "format v2" table (``--v2-study``): the INT4 activation
    clip, asymmetric weights, the permutation granularity, and the full W4Ax-KV4 pipeline."""
    rtn_a = dict(weight_method="rtn", group_size=32, weight_sym=False)
    # act_clip "auto" = search for FMPQ; true-sequential only where named (it became the default after)
    gptq = dict(weight_method="gptq", int8_fraction=0.25, gptq_true_sequential=False, gptq_mse=False)
    best = W4AxConfig(group_size=32, weight_sym=False, **gptq)
    best_ts = dataclasses.replace(best, gptq_true_sequential=True)
    return [
        "fp",
        ("act_fmpq", 0.25, 0.9),
        ("act_fmpq", 0.25, "search"),
        ("act_fmpq", 0.125, "search"),
        ("act_fmpq", 0.25, "search", 16),
        ("act_fmpq", 0.25, "search", 32),
        W4AxConfig(act_bits=16, **rtn_a),
        W4AxConfig(act_bits=16, **{**rtn_a, "group_size": 128}),
        W4AxConfig(int8_fraction=0.25, act_clip=1.0, **rtn_a),
        W4AxConfig(int8_fraction=0.25, **rtn_a),
        W4AxConfig(int8_fraction=0.25, scale_mode="class", **rtn_a),
        best,
        W4AxConfig(group_size=32, weight_sym=True, **gptq),
        W4AxConfig(group_size=128, weight_sym=True, **gptq),
        W4AxConfig(group_size=128, weight_sym=False, **gptq),
        best_ts,
        ("fpcache", "fp"),
        ("kv4", "fp"),
        ("kv4", dataclasses.replace(best, kv4=True)),
        ("kv4", dataclasses.replace(best_ts, kv4=True)),
    ]


def mse_study_schemes() -> List[Scheme]:
    """Rows of docs/ACCURACY.md's "GPTQ MSE ranges" table (``--mse-study``): the default
    recipe with and without ``gptq_mse``, group-128 weight formats, and the W4Ax-KV4
    pipeline through the decode protocol."""
    ts = W4AxConfig(group_size=32, weight_sym=False, weight_method="gptq", int8_fraction=0.25)  # the defaults
    return [
        "fp",
        dataclasses.replace(ts, gptq_mse=False),
        ts,
        ("fpcache", "fp"),
        ("fpcache", ts),
        ("kv4", dataclasses.replace(ts, kv4=True)),
        dataclasses.replace(ts, group_size=128),
        dataclasses.replace(ts, group_size=128, weight_sym=True),
    ]


def crux_study_schemes() -> List[Scheme]:
    """Rows of docs/ACCURACY.md's "kernel formats" table (``--crux-study``): the accuracy side of
    the scale-placement question (issue #3) for the formats the Hopper TMA kernel runs --
    symmetric weights, groups of 128 or one per output channel, block or class activation
    scales -- with the default recipe otherwise (true-sequential GPTQ with MSE ranges, INT4
    clip search, FMPQ 25%).  Class scales + per-channel weights is the case that accumulates
    whole precision runs in int32."""
    base = W4AxConfig(weight_method="gptq", weight_sym=True, int8_fraction=0.25)
    return [
        "fp",
        dataclasses.replace(base, group_size=128),
        dataclasses.replace(base, group_size=128, scale_mode="class"),
        dataclasses.replace(base, group_size=-1),
        dataclasses.replace(base, group_size=-1, scale_mode="class"),
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
    wrapped = lambda s: isinstance(s, tuple) and s[0] in ("kv4", "fpcache")  # noqa: E731
    inner = lambda s: s[1] if wrapped(s) else s  # noqa: E731
    seq = lambda s: isinstance(inner(s), W4AxConfig) and inner(s).weight_method == "gptq" and inner(s).gptq_sequential  # noqa: E731
    need_stats = any(inner(s) != "fp" and inner(s) != "w8a8" and not seq(s) for s in schemes)
    need_h = any(isinstance(inner(s), W4AxConfig) and inner(s).weight_method == "gptq" and not seq(s) for s in schemes)
    need_samples = any((isinstance(inner(s), tuple) and len(inner(s)) > 2 and inner(s)[2] == "search")
                       or (isinstance(inner(s), W4AxConfig) and inner(s).clip == "search" and not seq(s))
                       for s in schemes)
    stats = None
    if need_stats:
        t = time.time()
        names = target_linears(model, W4AxConfig(act_bits=16))
        from .quantize import ACT_CLIP_SAMPLES

        stats = collect_stats(model, calib_data, names, hessian=need_h, progress=progress,
                              samples=ACT_CLIP_SAMPLES if need_samples else 0)
        log(f"calibration: {len(names)} linears, {time.time() - t:.1f}s")
    rows: List[Dict] = []
    base = None
    base_decode = None
    cache: dict = {}
    for s in schemes:
        t = time.time()
        q = inner(s)
        if q == "fp":
            m = model
        else:
            m = copy.deepcopy(model)
            if seq(s):
                # layer-by-layer calibration on the partly quantized copy: no shared stats
                quantize_(m, q, calib_data=calib_data, progress=False, weight_cache=cache)
                set_fast_path(m, True)
            elif isinstance(q, W4AxConfig):
                quantize_(m, q, calib_stats=stats, progress=False, weight_cache=cache)
                set_fast_path(m, True)
            else:
                _apply_fake(m, q, stats)
        if wrapped(s):
            kind = "kv4" if s[0] == "kv4" else "fp"
            if kind == "kv4" and not (isinstance(q, W4AxConfig) and q.kv4):
                from .kvcache import KV4Cache

                mm = m
                ppl = perplexity_decode(m, windows, lambda: KV4Cache(getattr(mm, "config", None)))
            else:
                ppl = perplexity_decode(m, windows, kind)
            if s[0] == "fpcache" and q == "fp" and base_decode is None:
                base_decode = ppl
            ref = base_decode
        else:
            ppl = perplexity(m, windows, progress=progress)
            if s == "fp" and base is None:
                base = ppl
            ref = base
        row = {"scheme": scheme_name(s), "ppl": ppl, "ratio": (ppl / ref) if ref else None, "seconds": time.time() - t}
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
    p.add_argument("--v2-study", action="store_true",
                   help="format v2 rows: INT4 activation clip, asymmetric weights, KV4 pipeline (docs/ACCURACY.md)")
    p.add_argument("--mse-study", action="store_true",
                   help="GPTQ MSE group ranges: default recipe with/without, g128 formats, W4Ax-KV4 (docs/ACCURACY.md)")
    p.add_argument("--gptq-study", action="store_true",
                   help="GPTQ rows: one-pass vs sequential, act_order, group size 128/64/32")
    p.add_argument("--crux-study", action="store_true",
                   help="kernel formats: symmetric g128 / per-channel weights x block / class activation scales")
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
        schemes = ["fp", ("act_fmpq", 0.25), V1(int8_fraction=0.25, weight_method="gptq", gptq_sequential=False, gptq_act_order=False)]
    elif a.extra:
        schemes = ["fp", V1(act_bits=16, weight_method="gptq", gptq_sequential=False, gptq_act_order=False), V1(act_bits=16, clip_search=True),
                   V1(int8_fraction=0.25, clip_search=True), V1(act_bits=16, group_size=32, clip_search=True),
                   V1(int8_fraction=0.25, group_size=32, clip_search=True)]
    if a.gptq_study:
        schemes = gptq_study_schemes()
    if a.v2_study:
        schemes = v2_study_schemes()
    if a.mse_study:
        schemes = mse_study_schemes()
    if a.crux_study:
        schemes = crux_study_schemes()
    rows = compare_schemes(model, calib, wins, schemes)
    print(format_table(rows))
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
