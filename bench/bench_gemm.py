#!/usr/bin/env python
"""W4Ax GEMM benchmark on one NVIDIA GPU, with its peers timed in the same run.

For Llama-3-8B/70B layer shapes (y = x W^T, N = out, K = in features), M in
{1, 16, 64, 256, 1024, 4096} and an INT8 block share of 0 / 12.5 / 25 % (INT8
blocks first, as calibration lays them out), it times:

* ours: the cometq W4Ax GEMM per backend (``--backend triton[,cuda]``), the
  Triton persistent stream-K variant (``triton-persistent``), and the whole
  linear (activation quantization + GEMM, ``+aq``);
* peers: cuBLAS FP16 (``x @ w.T``), cuBLASLt INT8 (``torch._int_mm``, M > 16),
  FP8 row-wise (``torch._scaled_mm``), W4A16 tinygemm (``torch._weight_int4pack_mm``).

Every time is a ``triton.testing.do_bench`` median; beside it: TFLOP/s (TOPS for
integer GEMMs) and achieved GB/s (bytes each kernel must move at least: weights,
activations, scales, output).  Writes ``gemm.json``, ``gemm.md`` (a table with
ratios vs FP16 and FP8) and ``gemm.png`` (if matplotlib is installed) into
``--out`` (default ``$OUT`` or the current folder).  ``--what act_quant`` times
the fused activation quantizer against the copy bandwidth instead/as well.

    python bench/bench_gemm.py --quick            # ~2 shapes, 3 M values
    python bench/bench_gemm.py --backend triton,cuda --out results/
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

SHAPES = {
    "8B.qkv": (6144, 4096), "8B.o": (4096, 4096), "8B.gate_up": (28672, 4096), "8B.down": (4096, 14336),
    "70B.qkv": (10240, 8192), "70B.gate_up": (57344, 8192), "70B.down": (8192, 28672),
}
MS = (1, 16, 64, 256, 1024, 4096)
SHARES = (0.0, 0.125, 0.25)
QUICK_SHAPES = ("8B.o", "8B.gate_up")
QUICK_MS = (1, 16, 1024)
QUICK_SHARES = (0.0, 0.125)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder (default: $OUT or .)")
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, M {QUICK_MS}, shares {QUICK_SHARES}")
    ap.add_argument("--backend", default="triton", help="comma list of cometq backends to time: triton, cuda")
    ap.add_argument("--what", default="gemm", help="comma list: gemm, act_quant")
    ap.add_argument("--shapes", help=f"comma list of shape names (default all: {', '.join(SHAPES)})")
    ap.add_argument("--ms", help="comma list of M values")
    ap.add_argument("--shares", help="comma list of INT8 block shares in [0, 1]")
    ap.add_argument("--group", type=int, default=128, help="weight group size (-1: per channel)")
    ap.add_argument("--scale-mode", default="block", choices=("block", "class"))
    ap.add_argument("--no-persistent", action="store_true", help="skip the persistent stream-K variant")
    ap.add_argument("--no-peers", action="store_true", help="skip the peer GEMMs")
    ap.add_argument("--warmup", type=int, default=10, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=50, help="do_bench repetitions (ms)")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    a.shapes = a.shapes.split(",") if a.shapes else list(QUICK_SHAPES if a.quick else SHAPES)
    for s in a.shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    a.ms = [int(v) for v in a.ms.split(",")] if a.ms else list(QUICK_MS if a.quick else MS)
    a.shares = [float(v) for v in a.shares.split(",")] if a.shares else list(QUICK_SHARES if a.quick else SHARES)
    if any(not 0.0 <= s <= 1.0 for s in a.shares):
        ap.error(f"shares must lie in [0, 1], got {a.shares}")
    a.backend = [b.strip() for b in a.backend.split(",") if b.strip()]
    for b in a.backend:
        if b not in ("triton", "cuda"):
            ap.error(f"unknown backend {b!r} (triton, cuda)")
    a.what = [w.strip() for w in a.what.split(",") if w.strip()]
    for w in a.what:
        if w not in ("gemm", "act_quant"):
            ap.error(f"unknown --what {w!r} (gemm, act_quant)")
    return a


# --------------------------------------------------------------------------
# helpers (import torch lazily so --help works anywhere)
# --------------------------------------------------------------------------
def _bench(fn, args):
    from triton.testing import do_bench

    return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median") * 1e-3  # seconds


def _try(row, key, fn, args, flops=None, nbytes=None):
    try:
        t = _bench(fn, args)
    except Exception as e:  # noqa: BLE001 - a peer missing on this build is reported, not fatal
        row[key + "_err"] = f"{type(e).__name__}: {str(e)[:160]}"
        return None
    row[key + "_us"] = round(t * 1e6, 2)
    if flops:
        row[key + "_tflops"] = round(flops / t / 1e12, 1)
    if nbytes:
        row[key + "_gbps"] = round(nbytes / t / 1e9, 1)
    return t


def _layout(k, share, device):
    import torch

    from cometq.layout import ActivationLayout, num_blocks

    nb = num_blocks(k)
    n8 = int(round(share * nb))
    bits = [8] * n8 + [4] * (nb - n8)
    return ActivationLayout(torch.arange(k, device=device), torch.tensor(bits, dtype=torch.int32, device=device))


def bench_gemm(args, rows, errors):
    import torch

    from cometq import ops
    from cometq.kernels.act_quant import quantize_act_triton
    from cometq.layout import padded_k
    from cometq.kernels.w4ax_gemm import w4ax_gemm_triton

    dev = torch.device("cuda")
    for sname in args.shapes:
        n, k = SHAPES[sname]
        k_pad = padded_k(k)
        g = k_pad if args.group == -1 else args.group
        try:
            w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
            qweight = torch.randint(0, 256, (n, k_pad // 2), device=dev, dtype=torch.uint8)
            w_scales = torch.rand(n, k_pad // g, device=dev) * 0.01
            peers = {}
            if not args.no_peers:
                peers["int8_w"] = torch.randint(-8, 8, (k, n), device=dev, dtype=torch.int8).t().contiguous().t()
                peers["fp8_w"] = w16.to(torch.float8_e4m3fn)
                try:
                    peers["w4p"] = torch._convert_weight_to_int4pack(
                        torch.randint(0, 16, (n, k // 2), device=dev, dtype=torch.uint8), 8)
                    peers["sz"] = torch.randn(k // 128, n, 2, device=dev, dtype=torch.bfloat16)
                except Exception as e:  # noqa: BLE001
                    errors.append(f"{sname} int4pack: {type(e).__name__}: {str(e)[:160]}")
            for m in args.ms:
                flops = 2.0 * m * n * k
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                base = dict(shape=sname, N=n, K=k, M=m)
                # ---- peers (independent of the INT8 share)
                prow = dict(base, share=None, kind="peers")
                _try(prow, "fp16", lambda: x @ w16.t(), args, flops, 2 * n * k + 2 * m * k + 2 * m * n)
                if not args.no_peers:
                    if m > 16:
                        xi = torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8)
                        wi = peers["int8_w"]
                        _try(prow, "int8", lambda: torch._int_mm(xi, wi), args, flops, n * k + m * k + 4 * m * n)
                    x8 = torch.randn(max(m, 16), k, device=dev).to(torch.float8_e4m3fn)
                    sa = torch.ones(x8.shape[0], 1, device=dev)
                    sb = torch.ones(1, n, device=dev)
                    w8 = peers["fp8_w"]
                    _try(prow, "fp8", lambda: torch._scaled_mm(x8, w8.t(), sa, sb, out_dtype=torch.bfloat16), args,
                         flops, n * k + m * k + 2 * m * n)
                    if "w4p" in peers:
                        xb = x.bfloat16()
                        w4p, sz = peers["w4p"], peers["sz"]
                        _try(prow, "w4a16", lambda: torch._weight_int4pack_mm(xb, w4p, 128, sz), args, flops,
                             n * k // 2 + n * k // 128 * 4 + 2 * m * k + 2 * m * n)
                rows.append(prow)
                # ---- ours, per INT8 share
                for share in args.shares:
                    lay = _layout(k, share, dev)
                    q4, q8, a_sc = quantize_act_triton(x, lay.perm, lay.block_bits, lay.n_int8, args.scale_mode,
                                                       identity_perm=True)
                    nbytes = (n * k // 2 + w_scales.numel() * 4 + q4.numel() + q8.numel() + a_sc.numel() * 4
                              + 2 * m * n)
                    row = dict(base, share=share, n_int8=lay.n_int8, kind="ours")
                    for be in args.backend:
                        fn = (lambda: ops.w4ax_gemm(q4, q8, a_sc, lay.block_bits, qweight, w_scales, args.group, None,
                                                    torch.float16, args.scale_mode, backend=be))
                        if be == "triton":  # call the kernel entry directly: no op dispatch overhead
                            fn = (lambda: w4ax_gemm_triton(q4, q8, a_sc, lay.block_bits, qweight, w_scales, args.group,
                                                           None, torch.float16, args.scale_mode))
                        try:
                            fn()  # first call autotunes (cached per shape bucket)
                            torch.cuda.synchronize()
                        except Exception as e:  # noqa: BLE001
                            row[f"{be}_err"] = f"{type(e).__name__}: {str(e)[:160]}"
                            continue
                        _try(row, be, fn, args, flops, nbytes)

                        def e2e(be=be):
                            a, b, c = ops.quantize_act(x, lay.perm, lay.block_bits, lay.n_int8, args.scale_mode,
                                                       backend=be)
                            return ops.w4ax_gemm(a, b, c, lay.block_bits, qweight, w_scales, args.group, None,
                                                 torch.float16, args.scale_mode, backend=be)

                        _try(row, be + "+aq", e2e, args, flops, nbytes + 2 * m * k)
                    if "triton" in args.backend and not args.no_persistent and m > 16:
                        pf = (lambda: w4ax_gemm_triton(q4, q8, a_sc, lay.block_bits, qweight, w_scales, args.group,
                                                       None, torch.float16, args.scale_mode, path="persistent"))
                        try:
                            pf()
                            _try(row, "triton-persistent", pf, args, flops, nbytes)
                        except Exception as e:  # noqa: BLE001
                            row["triton-persistent_err"] = f"{type(e).__name__}: {str(e)[:160]}"
                    rows.append(row)
                    print(_fmt(prow, row), flush=True)
            del w16, qweight, w_scales, peers
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            errors.append(f"{sname}: {type(e).__name__}: {str(e)[:200]}")


def _fmt(prow, row):
    keys = [k for k in list(prow) + list(row) if k.endswith("_us")]
    vals = {**prow, **row}
    return f"{row['shape']:12s} M={row['M']:5d} share={row['share']:.3f} " + " ".join(f"{k[:-3]}={vals[k]}" for k in keys)


def bench_act_quant(args, rows, errors):
    import torch

    from cometq.kernels.act_quant import quantize_act_triton

    dev = torch.device("cuda")
    ks = sorted({SHAPES[s][1] for s in args.shapes})
    for k in ks:
        for m in args.ms:
            for share in args.shares:
                try:
                    lay = _layout(k, share, dev)
                    perm = torch.randperm(k, device=dev)
                    x = torch.randn(m, k, device=dev, dtype=torch.float16)
                    row = dict(kind="act_quant", K=k, M=m, share=share)
                    nbytes = 2 * m * k + m * (k // 2 + lay.n_int8 * 64) + 4 * m * lay.n_blocks
                    _try(row, "copy", lambda: x.clone(), args, None, 4 * m * k)
                    for mode in ("block", "class"):
                        _try(row, f"aq_{mode}", lambda: quantize_act_triton(x, perm, lay.block_bits, lay.n_int8, mode),
                             args, None, nbytes)
                    _try(row, "aq_block_identity", lambda: quantize_act_triton(x, lay.perm, lay.block_bits, lay.n_int8,
                                                                               "block", identity_perm=True), args, None, nbytes)
                    rows.append(row)
                    print(row, flush=True)
                except Exception as e:  # noqa: BLE001
                    errors.append(f"act_quant K={k} M={m}: {type(e).__name__}: {str(e)[:200]}")


# --------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------
def markdown(rows, backends):
    out = []
    peers = {(r["shape"], r["M"]): r for r in rows if r.get("kind") == "peers"}
    ours = [r for r in rows if r.get("kind") == "ours"]
    if ours:
        cols = backends + ["triton-persistent"] if "triton" in backends else list(backends)
        head = ["shape", "M", "INT8 share", "FP16", "INT8", "FP8", "W4A16"] + cols + [f"{b}+aq" for b in backends]
        head += [f"{c} vs FP16" for c in cols] + [f"{c} vs FP8" for c in cols]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in ours:
            p = peers.get((r["shape"], r["M"]), {})

            def t(d, key):
                v = d.get(key + "_us")
                return "–" if v is None else f"{v:.1f}"

            def ratio(a, b):
                if a is None or b is None:
                    return "–"
                return f"{b / a:.2f}x"

            cells = [r["shape"], str(r["M"]), f"{100 * r['share']:.1f}%", t(p, "fp16"), t(p, "int8"), t(p, "fp8"),
                     t(p, "w4a16")]
            cells += [t(r, c) for c in cols] + [t(r, f"{b}+aq") for b in backends]
            cells += [ratio(r.get(c + "_us"), p.get("fp16_us")) for c in cols]
            cells += [ratio(r.get(c + "_us"), p.get("fp8_us")) for c in cols]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out.append("Times in microseconds (do_bench medians). `x vs FP16` = FP16 time / x time (> 1: faster than FP16). "
                   "`+aq` includes the fused activation quantization. TFLOP/s and GB/s per kernel are in gemm.json.")
    aq = [r for r in rows if r.get("kind") == "act_quant"]
    if aq:
        out.append("")
        out.append("| K | M | INT8 share | copy GB/s | block GB/s | class GB/s | block (identity perm) GB/s |")
        out.append("|---|---|---|---|---|---|---|")
        for r in aq:
            out.append(f"| {r['K']} | {r['M']} | {100 * r['share']:.1f}% | {r.get('copy_gbps', '–')} | "
                       f"{r.get('aq_block_gbps', '–')} | {r.get('aq_class_gbps', '–')} | {r.get('aq_block_identity_gbps', '–')} |")
    return "\n".join(out) + "\n"


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        print("matplotlib not installed: skipping the plot")
        return False
    peers = {(r["shape"], r["M"]): r for r in rows if r.get("kind") == "peers"}
    ours = [r for r in rows if r.get("kind") == "ours" and r.get("triton_us")]
    shapes = sorted({r["shape"] for r in ours})
    if not shapes:
        return False
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.6), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        for share in sorted({r["share"] for r in ours}):
            pts = [(r["M"], peers[(s, r["M"])]["fp16_us"] / r["triton_us"]) for r in ours
                   if r["shape"] == s and r["share"] == share and peers.get((s, r["M"]), {}).get("fp16_us")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"W4Ax {100 * share:.1f}% INT8")
        for key, lab in (("fp8", "FP8"), ("int8", "INT8"), ("w4a16", "W4A16")):
            pts = [(m, p["fp16_us"] / p[key + "_us"]) for (sh, m), p in sorted(peers.items())
                   if sh == s and p.get(key + "_us") and p.get("fp16_us")]
            if pts:
                ax.plot(*zip(*pts), linestyle="--", label=lab)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(s)
        ax.set_xlabel("M")
        ax.set_ylabel("speedup vs cuBLAS FP16")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        print(f"bench_gemm: torch is not importable ({e}); nothing to measure", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_gemm: no CUDA GPU visible (torch.cuda.is_available() is False). This benchmark times GPU "
              "kernels; run it on a machine with an NVIDIA GPU (sm_80/sm_90).", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("bench_gemm: TRITON_INTERPRET=1 is set; unset it to time compiled kernels", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    p = torch.cuda.get_device_properties(0)
    import triton

    meta = dict(device=p.name, sms=p.multi_processor_count, capability=list(torch.cuda.get_device_capability()),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                args={k: v for k, v in vars(args).items()}, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(meta, flush=True)
    rows, errors = [], []
    t0 = time.time()
    if "gemm" in args.what:
        bench_gemm(args, rows, errors)
    if "act_quant" in args.what:
        bench_act_quant(args, rows, errors)
    meta["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, "gemm.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, errors=errors), f, indent=1)
    md = f"# W4Ax GEMM on {p.name} ({meta['started']}, torch {torch.__version__}, triton {triton.__version__})\n\n"
    md += markdown(rows, args.backend)
    if errors:
        md += "\nErrors:\n" + "\n".join(f"- {e}" for e in errors) + "\n"
    with open(os.path.join(args.out, "gemm.md"), "w") as f:
        f.write(md)
    print(md)
    if not args.no_plot and "gemm" in args.what:
        if plot(rows, os.path.join(args.out, "gemm.png")):
            print(f"plot: {os.path.join(args.out, 'gemm.png')}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
