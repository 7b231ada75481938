"""Decode-path diagnostics on one GPU: where the small-M time goes.

The first GPU run (bench/RESULTS.md, 2026-11-26) measured the Triton W4Ax GEMM
at M = 1 slower than cuBLAS FP16 and the fused activation quantization adding
~275 us per call -- far above what the bytes need.  This script separates the
causes in one short run:

* ``gemm``: for Llama-3-8B o_proj / gate_up shapes at M in {1, 16}, every
  candidate config of the decode bucket (``gen_configs``; on Hopper the TMA kernel's too) timed eagerly
  (``do_bench``: includes Python launch overhead whenever the CPU is slower than
  the GPU) and replayed from a CUDA graph (``do_bench_cudagraph``: GPU time
  only), beside cuBLAS FP16 timed both ways; achieved GB/s over the weight bytes.
* ``w4ax_unordered``: the first candidate on the same blocks with the INT8 ones last (the
  kernel's ORDERED fast path off: block order read from a table inside the loop).
* ``act_quant``: the fused activation quantization alone, eager vs graph.
* ``attention``: the KV4 paged decode kernel over a sweep of split counts and
  warps (Llama-3-8B heads) vs SDPA, kernel launcher only.
* ``profile``: ``torch.profiler`` table (CPU and CUDA time per op) of the
  quantize + GEMM pair at M = 1.

Never asserts speed; writes ``diag_decode.json`` (+ the profiler table as text).

    python bench/diag_decode.py --out DIR [--what gemm,act_quant,attention,profile]
    python bench/diag_decode.py --dry-run      # CPU smoke run under the Triton interpreter
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

SHAPES = {"8B.o": (4096, 4096), "8B.gate_up": (28672, 4096)}


def _time(fn, graph: bool, dry: bool):
    import torch
    from triton.testing import do_bench, do_bench_cudagraph

    if dry:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    fn()  # compile / tune outside the timing (and before any capture)
    torch.cuda.synchronize()
    if graph:
        with torch.cuda.stream(torch.cuda.Stream()):
            return do_bench_cudagraph(fn, rep=30, return_mode="median")
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def _both(row, key, fn, dry, nbytes=None):
    for graph in (False, True):
        k = f"{key}_{'graph' if graph else 'eager'}_us"
        try:
            row[k] = round(_time(fn, graph, dry) * 1e3, 2)
            if nbytes:
                row[k.replace("_us", "_gbps")] = round(nbytes / (row[k] * 1e-6) / 1e9, 1)
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            row[k + "_err"] = f"{type(e).__name__}: {str(e)[:200]}"
        if dry:
            break


def gemm_rows(dev, dry, ms, shapes):
    import torch

    from cometq import reference as R
    from cometq.kernels.act_quant import quantize_act_triton
    from cometq.kernels.w4ax_gemm import gen_configs, m_bucket, tma_available, w4ax_gemm_triton
    from cometq.layout import ActivationLayout

    rows = []
    for sname in shapes:
        n, k = SHAPES[sname]
        if dry:
            n, k = 128, 256
        g = torch.Generator(device=dev).manual_seed(0)
        w = torch.randn(n, k, device=dev, generator=g) * k ** -0.5
        qw = R.quantize_weight_rtn(w, 128, sym=True)
        nb = k // 128
        bits = torch.full((nb,), 4, dtype=torch.int32, device=dev)
        bits[: max(1, nb // 8)] = 8
        lay = ActivationLayout(torch.randperm(k, device=dev), bits, 0.9)
        w16 = w.half()
        wbytes = qw.qweight.numel() + qw.scales.numel() * 4
        for m in ms:
            x = torch.randn(m, k, device=dev, generator=g).half()
            qa = R.quantize_activation(x.float(), lay, "block")
            q4, q8, sc = qa.q4, qa.q8, qa.scales
            base = dict(shape=sname, M=m, N=n, K=k, n_int8=lay.n_int8, weight_bytes=wbytes)
            row = dict(base, what="fp16")
            if not dry:
                _both(row, "fp16", lambda: x @ w16.T, dry, nbytes=2 * n * k)
                rows.append(row)
            row = dict(base, what="act_quant")
            _both(row, "aq", lambda: quantize_act_triton(x, lay.perm, lay.block_bits, lay.n_int8, "block",
                                                           int4_clip=0.9), dry, nbytes=2 * m * k)
            rows.append(row)
            cands = gen_configs(m_bucket(m), n, k, lay.n_int8)
            if tma_available(torch.device(dev)) is None:  # Hopper (or the interpreter): the TMA kernel's too
                cands += gen_configs(m_bucket(m), n, k, lay.n_int8, tma="only")
            for ci, cfg in enumerate(cands):
                row = dict(base, what="w4ax", cand=ci, config=repr(cfg))
                _both(row, "w4ax", lambda: w4ax_gemm_triton(q4, q8, sc, lay.block_bits, qw.qweight, qw.scales, 128,
                                                              None, torch.float16, "block", config=cfg,
                                                              deterministic=False), dry, nbytes=wbytes)
                rows.append(row)
                print(json.dumps(row), flush=True)
            # ORDERED A/B: the same blocks with the INT8 ones last (not INT8-first: the kernel then
            # reads the block order table inside its loop) on the first candidate
            cfg = cands[0]
            nb_ = lay.block_bits.numel()
            bits_last = torch.full((nb_,), 4, dtype=torch.int32, device=dev)
            bits_last[nb_ - lay.n_int8:] = 8
            qa_l = R.quantize_activation(x.float(), ActivationLayout(lay.perm, bits_last, 0.9), "block")
            row = dict(base, what="w4ax_unordered", config=repr(cfg))
            _both(row, "w4ax", lambda: w4ax_gemm_triton(qa_l.q4, qa_l.q8, qa_l.scales, bits_last, qw.qweight,
                                                          qw.scales, 128, None, torch.float16, "block", config=cfg,
                                                          deterministic=False), dry, nbytes=wbytes)
            rows.append(row)
            print(json.dumps(row), flush=True)
            # the deterministic reduction and the whole linear on the first candidate
            row = dict(base, what="w4ax_det+aq", config=repr(cfg))
            _both(row, "w4ax_det", lambda: w4ax_gemm_triton(q4, q8, sc, lay.block_bits, qw.qweight, qw.scales, 128,
                                                              None, torch.float16, "block", config=cfg,
                                                              deterministic=True), dry, nbytes=wbytes)

            def e2e():
                a, b, c = quantize_act_triton(x, lay.perm, lay.block_bits, lay.n_int8, "block", int4_clip=0.9)
                return w4ax_gemm_triton(a, b, c, lay.block_bits, qw.qweight, qw.scales, 128, None, torch.float16,
                                        "block", config=cfg, deterministic=False)

            _both(row, "e2e", e2e, dry, nbytes=wbytes)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def profile_table(dev, dry):
    import torch

    from cometq import reference as R
    from cometq.kernels.act_quant import quantize_act_triton
    from cometq.kernels.w4ax_gemm import gen_configs, m_bucket, w4ax_gemm_triton
    from cometq.layout import ActivationLayout

    n, k = (128, 256) if dry else SHAPES["8B.o"]
    w = torch.randn(n, k, device=dev) * k ** -0.5
    qw = R.quantize_weight_rtn(w, 128, sym=True)
    nb = k // 128
    bits = torch.full((nb,), 4, dtype=torch.int32, device=dev)
    bits[: max(1, nb // 8)] = 8
    lay = ActivationLayout(torch.randperm(k, device=dev), bits, 0.9)
    x = torch.randn(1, k, device=dev).half()
    cfg = gen_configs(m_bucket(1), n, k, lay.n_int8)[0]

    def e2e():
        a, b, c = quantize_act_triton(x, lay.perm, lay.block_bits, lay.n_int8, "block", int4_clip=0.9)
        return w4ax_gemm_triton(a, b, c, lay.block_bits, qw.qweight, qw.scales, 128, None, torch.float16, "block",
                                config=cfg)

    e2e()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    iters = 2 if dry else 50
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            e2e()
        if dev == "cuda":
            torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) / iters * 1e6
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    return {"iters": iters, "wall_us_per_call_profiled": round(wall_us, 1)}, table


def attention_rows(dev, dry):
    import torch
    from triton.testing import do_bench

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_attention import build_pool

    from cometq.kernels.kv4_attention import AttnConfig, attention_configs, kv4_decode_attention_triton
    from cometq.paged import default_num_splits

    hq, h, d, bs, grp = (4, 2, 32, 16, 16) if dry else (32, 8, 128, 64, 32)
    cases = [(2, 64)] if dry else [(16, 4096), (64, 4096), (1, 4096)]
    rows = []
    for b, t in cases:
        pool = build_pool(b, t, h, d, bs, grp, "channel", "token", dev)
        q = torch.randn(b, hq, d, device=dev, dtype=torch.float16 if dev == "cuda" else torch.float32)
        kvb = 2 * b * h * t * (d // 2) + 2 * 2 * b * h * t * d // grp * 2  # nibbles + fp16 scale/zero (both axes)
        row = dict(what="attention", batch=b, context=t, kv4_bytes=kvb)
        if not dry:
            k16 = torch.randn(b, h, t, d, device=dev, dtype=torch.float16)
            v16 = torch.randn_like(k16)
            qq = q[:, :, None, :]
            row["sdpa_us"] = round(do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                qq, k16, v16, enable_gqa=True), warmup=10, rep=40, return_mode="median") * 1e3, 2)
        ds = default_num_splits(b, h, -(-t // bs))
        for ns in sorted({ds, max(1, ds // 2), ds * 2, ds * 4}):
            # every launch config the tuner considers, plus the folded-key variant at 4 warps
            cfgs = [(c, False) for c in attention_configs(bs, grp, False, "channel", "token")]
            cfgs.append((AttnConfig(4, cfgs[0][0].tile), True))
            for cfg, fold in cfgs:
                args = (q,) + tuple(pool[k] for k in ("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero",
                                                       "tail_k", "tail_v", "block_tables", "quant_lens", "tail_lens",
                                                       "seq_ids")) + (grp, "channel", "token", d ** -0.5, ns)
                key = (f"kv4_s{ns}_w{cfg.num_warps}_t{cfg.tile}{'_lazy' if cfg.lazy else ''}"
                       f"{'_fold' if fold else ''}_us")
                try:
                    ms = _time(lambda: kv4_decode_attention_triton(*args, config=cfg, fold_k=fold), False, dry)
                    row[key] = round(ms * 1e3, 2)
                except Exception as e:  # noqa: BLE001
                    row[key + "_err"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["default_splits"] = ds
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--what", default="gemm,act_quant,attention,profile")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--shapes", default="8B.o,8B.gate_up")
    ap.add_argument("--dry-run", action="store_true", help="CPU smoke run under the Triton interpreter")
    args = ap.parse_args(argv)
    what = set(args.what.split(","))
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    dev = "cpu" if args.dry_run else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run for a CPU smoke run)")
    os.makedirs(args.out, exist_ok=True)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)",
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__, "rows": []}
    path = os.path.join(args.out, "diag_decode.json")

    def flush():
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)

    ms = [int(v) for v in args.ms.split(",")]
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")
    if "gemm" in what or "act_quant" in what:
        res["rows"] += gemm_rows(dev, args.dry_run, ms, shapes[:1] if args.dry_run else shapes)
        flush()
    if "attention" in what:
        res["rows"] += attention_rows(dev, args.dry_run)
        flush()
    if "profile" in what:
        meta, table = profile_table(dev, args.dry_run)
        res["profile"] = meta
        with open(os.path.join(args.out, "diag_profile.txt"), "w") as fh:
            fh.write(table)
        print(table)
        flush()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
