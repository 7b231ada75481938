"""Tune the Triton W4Ax GEMM configs a serving decode step uses, and keep them in a file.

The serving bench (and a short GPU lease) runs the GEMMs untuned (``COMETQ_GEMM_TUNE=0``: the
first candidate of each shape bucket), because autotuning every bucket of four Llama-3-8B
shapes inside a timed run does not fit.  Tuned choices persist in the JSON file named by
``COMETQ_GEMM_CONFIG_CACHE`` (kernels/w4ax_gemm.py), and an untuned process reads them back:
this script fills that file for the decode buckets ahead of time, calling the ``triton``
backend exactly the way a quantized linear does (``cometq.ops``' implementation: path
"auto", the default split-K reduction, TMA where it applies) and in the timing mode serving's
decode-graph warm-up uses (``--timing graph``: each config timed as CUDA-graph replays, kept
under the graph key), so the cache keys match what serving looks up.  Commit the resulting file as ``bench/results/gemm_configs.json``
(``bench/gpu_check.sh`` seeds every run from it).

    COMETQ_GEMM_CONFIG_CACHE=bench/results/gemm_configs.json python bench/tune_decode.py
    python bench/tune_decode.py --ms 64 --weights asym-g128 --time-budget 120
    python bench/tune_decode.py --dry-run     # CPU smoke run (interpreter, tiny shape, no tuning)

Shapes: Llama-3-8B's four projections (qkv 6144x4096, o 4096x4096, gate_up 28672x4096,
down 4096x14336); M in ``--ms`` (decode buckets: 16 = batch <= 16, 64 = batch 17..64);
weights ``--weights`` (asym-gG = ``W4AxConfig()``'s default format, sym-gG the TMA kernels');
INT8 block share ``--share`` (``W4AxConfig()``'s FMPQ default 25 %).  Prints one line per
case with the chosen config and writes ``tune_decode.json`` (chosen configs, seconds spent)
into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"8B.qkv": (6144, 4096), "8B.o": (4096, 4096), "8B.gate_up": (28672, 4096), "8B.down": (4096, 14336)}
DRY_SHAPES = {"tiny": (200, 576)}
_WFMT = re.compile(r"^(sym|asym)-g(-1|\d+)$")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of shape names")
    ap.add_argument("--ms", default="64,16", help="comma list of M values (one per decode bucket)")
    ap.add_argument("--weights", default="asym-g128,sym-g128", help="comma list of sym-gG / asym-gG")
    ap.add_argument("--share", type=float, default=0.25, help="INT8 block share (default 0.25, FMPQ's default)")
    ap.add_argument("--timing", choices=("graph", "eager"), default="graph",
                    help="time configs as CUDA-graph replays (default: serving replays its decode steps "
                         "from graphs, and looks their configs up under the graph key) or eagerly")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds: start no new case after this")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for tune_decode.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU smoke run: interpreter, tiny shape, no tuning")
    a = ap.parse_args(argv)
    shapes = DRY_SHAPES if a.dry_run else SHAPES
    a.shapes = list(shapes) if a.dry_run else [s.strip() for s in a.shapes.split(",") if s.strip()]
    for s in a.shapes:
        if s not in shapes:
            ap.error(f"unknown shape {s!r}; choose from {', '.join(shapes)}")
    try:
        a.ms = [int(v) for v in a.ms.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--ms must be a comma list of ints, got {a.ms!r}")
    if not a.ms or any(m < 1 for m in a.ms):
        ap.error(f"--ms values must be >= 1, got {a.ms}")
    a.formats = []
    for f in (v.strip() for v in a.weights.split(",") if v.strip()):
        m = _WFMT.match(f)
        if not m:
            ap.error(f"weight format {f!r} is not sym-gG / asym-gG")
        a.formats.append((f, m.group(1) == "asym", int(m.group(2))))
    if not a.formats:
        ap.error("--weights is empty")
    if not 0.0 <= a.share <= 1.0:
        ap.error(f"--share must lie in [0, 1], got {a.share}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    sys.path.insert(0, os.path.join(ROOT, "python"))
    from cometq import autotune, ops
    from cometq import reference as R
    from cometq.kernels.w4ax_gemm import m_bucket
    from cometq.layout import BLOCK_K, ActivationLayout, padded_k
    from cometq.testing import rand_activation, rand_weight

    dev = "cpu" if a.dry_run else "cuda"
    if not a.dry_run:
        if not torch.cuda.is_available():
            print("tune_decode: needs a CUDA GPU (or --dry-run)", file=sys.stderr)
            return 2
        os.environ["COMETQ_GEMM_TUNE"] = "1"  # this script's whole point
        if not os.environ.get("COMETQ_GEMM_CONFIG_CACHE"):
            print("tune_decode: COMETQ_GEMM_CONFIG_CACHE is not set: the choices live only in this process",
                  file=sys.stderr)
    ops._load_backend("triton")
    gemm = ops._IMPLS["w4ax_gemm"]["triton"]  # what a quantized linear's "triton" backend calls
    from cometq.kernels import w4ax_gemm as G

    t0 = time.time()
    rows, skipped = [], []
    g = torch.Generator().manual_seed(0)
    for sname in a.shapes:
        n, k = (DRY_SHAPES if a.dry_run else SHAPES)[sname]
        nb = padded_k(k) // BLOCK_K
        n8 = round(a.share * nb)
        bits = torch.tensor([8] * n8 + [4] * (nb - n8), dtype=torch.int32)
        lay = ActivationLayout(torch.randperm(k, generator=g), bits, 1.0)
        w = rand_weight(n, k, generator=g)
        for fmt, asym, group in a.formats:
            qw = R.quantize_weight_rtn(lay.permute_columns(w), group, sym=not asym).to(dev)
            for m in a.ms:
                if a.time_budget is not None and time.time() - t0 > a.time_budget:
                    skipped.append(f"{sname} {fmt} M={m}")
                    continue
                qa = R.quantize_activation(rand_activation(m, k, generator=g), lay)
                args = (qa.q4.to(dev), qa.q8.to(dev), qa.scales.to(dev), lay.block_bits.to(dev), qw.qweight,
                        qw.scales, qw.offsets, qw.group_size if qw.group_size is not None else -1, None,
                        torch.float16 if dev == "cuda" else torch.float32, "block")
                ts = time.time()
                with autotune.timing(a.timing):  # the mode serving's decode-graph warm-up tunes in
                    y = gemm(*args)  # tunes (and saves) this bucket's config on first use
                if dev == "cuda":
                    torch.cuda.synchronize()
                cfg = G.chosen_config(m, n, padded_k(k), n8, scale_mode="block",
                                      group_size=qw.group_size if qw.group_size is not None else -1, asym=asym,
                                      graph=a.timing == "graph")
                rows.append({"shape": sname, "n": n, "k": k, "m": m, "m_bucket": m_bucket(m), "weights": fmt,
                             "n_int8": n8, "config": None if cfg is None else str(cfg),
                             "seconds": round(time.time() - ts, 2), "out_shape": list(y.shape)})
                print(f"{sname:<11} {fmt:<10} M={m:<4} -> {rows[-1]['config']} ({rows[-1]['seconds']} s)",
                      flush=True)
    os.makedirs(a.out, exist_ok=True)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)",
           "config_cache": os.environ.get("COMETQ_GEMM_CONFIG_CACHE"), "share": a.share, "timing": a.timing,
           "rows": rows,
           "skipped_for_time": skipped, "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(a.out, "tune_decode.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    if skipped:
        print(f"tune_decode: time budget spent, not tuned: {', '.join(skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
