#!/usr/bin/env python
"""W4Ax GEMM benchmark on one NVIDIA GPU, with its peers timed in the same run.

For Llama-3-8B/70B layer shapes (y = x W^T, N = out, K = in features), M in
{1, 16, 64, 256, 1024, 4096}, an INT8 block share of 0 / 12.5 / 25 % (INT8
blocks first, as calibration lays them out) and the weight formats of
``--weights`` (default: symmetric group ``--group``, asymmetric group 32 and
asymmetric group 128 with fp32 offsets), it times:

* ours: the cometq W4Ax GEMM per backend (``--backend``, default triton plus cuda
  when ``cometq._C`` is built), the Triton persistent stream-K variant
  (``triton-persistent``, M > 16), the Triton deterministic split-K reduction
  (``triton-det``, M <= 64, same config as ``triton``), the Hopper TMA kernel
  (``triton-tma``: symmetric weights with groups >= 128, split-K with the deterministic
  reduction at decode; the ``triton`` column times the pointer-load kernels only), and the
  whole linear
  (activation quantization + GEMM, ``+aq``);
* peers: cuBLAS FP16 (``x @ w.T``), cuBLASLt INT8 (``torch._int_mm``, M > 16),
  FP8 row-wise (``torch._scaled_mm``; at M > 64 also with 1x128 x 1x128 block scales, column "FP8 1x128":
  the fp8-block route's GEMM alone), W4A16 tinygemm (``torch._weight_int4pack_mm``).

Every time is a ``triton.testing.do_bench`` median; beside it: TFLOP/s (TOPS for
integer GEMMs) and achieved GB/s over the bytes each kernel must move at least:
weight nibbles + weight scales (+ offsets for asymmetric formats: at group 32
the fp32 scales and offsets add 0.25 B/weight to the 0.5 B/weight of nibbles),
activations and their scales, the fp16 output.  Rows carry ``bytes`` and
``w_bytes_per_weight``.  Writes ``gemm.json`` (rewritten after every row, so a
run cut short keeps what it measured), ``gemm.md`` (a table with ratios vs FP16
and FP8) and ``gemm.png`` (if matplotlib is installed) into ``--out`` (default
``$OUT`` or the current folder).  ``--what act_quant`` times the fused activation
quantizer against the copy bandwidth instead/as well.

``--quick`` (what bench/gpu_check.sh runs): 2 shapes, M in {1, 16, 1024}, INT8
share 12.5 %, the three weight formats; only the symmetric format is autotuned,
the other variants reuse its config (``--tune sym``); ``--time-budget`` stops
starting new rows when the time is spent.  ``--dry-run`` runs the same code on
the CPU (Triton interpreter, one tiny shape, one timed call instead of
do_bench): it checks the script, not the speed.

    python bench/bench_gemm.py --quick            # ~2 shapes, 3 M values
    python bench/bench_gemm.py --backend triton,cuda --out results/
    python bench/bench_gemm.py --dry-run --out /tmp/bench_dry
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
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
QUICK_SHARES = (0.125,)
#: weight formats: "sym" = symmetric with --group; "sym-gG" / "asym-gG" (G = 32, 64, 128, ..., -1 per channel)
WEIGHTS = ("sym", "asym-g32", "asym-g128")
DRY_SHAPES = {"tiny": (200, 576)}  # --dry-run: N not a multiple of the tile, K = 4.5 blocks
DRY_MS = (1, 17)
_WFMT = re.compile(r"^(sym|asym)(?:-g(-1|\d+))?$")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder (default: $OUT or .)")
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, M {QUICK_MS}, shares {QUICK_SHARES}")
    ap.add_argument("--backend", default="auto",
                    help="comma list of cometq backends to time: triton, cuda; auto = triton (+ cuda if cometq._C "
                         "is built)")
    ap.add_argument("--weights", default=",".join(WEIGHTS),
                    help="comma list of weight formats: sym (group --group), sym-gG, asym-gG (fp32 offsets)")
    ap.add_argument("--tune", choices=("all", "sym"), default=None,
                    help="autotune every variant (all) or only the first weight format, the others reusing its "
                         "config (sym; default with --quick)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: start no new row after this (what was measured is written)")
    ap.add_argument("--no-det", action="store_true", help="skip the deterministic split-K column")
    ap.add_argument("--no-tma", action="store_true", help="skip the Hopper TMA kernel column (triton-tma)")
    ap.add_argument("--no-wbm", action="store_true",
                    help="skip the block-major weight column (triton-wbm, M <= 64: the triton config with the "
                         "weights stored block-major)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU smoke run under the Triton interpreter (tiny shape, one call per timing)")
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
    ap.add_argument("--graph", action="store_true",
                    help="for M <= 64 also time every GEMM replayed from a CUDA graph (`<col>-graph` keys in the JSON)")
    a = ap.parse_args(argv)
    shapes = DRY_SHAPES if a.dry_run else SHAPES
    a.shapes = a.shapes.split(",") if a.shapes else list(shapes if a.dry_run else (QUICK_SHAPES if a.quick else SHAPES))
    for s in a.shapes:
        if s not in shapes:
            ap.error(f"unknown shape {s!r}; choose from {', '.join(shapes)}")
    a.ms = ([int(v) for v in a.ms.split(",")] if a.ms
            else list(DRY_MS if a.dry_run else (QUICK_MS if a.quick else MS)))
    if any(m < 1 for m in a.ms):
        ap.error(f"M values must be >= 1, got {a.ms}")
    a.shares = ([float(v) for v in a.shares.split(",")] if a.shares
                else list(QUICK_SHARES if (a.quick or a.dry_run) else SHARES))
    if any(not 0.0 <= s <= 1.0 for s in a.shares):
        ap.error(f"shares must lie in [0, 1], got {a.shares}")
    a.backend = [b.strip() for b in a.backend.split(",") if b.strip()]
    for b in a.backend:
        if b not in ("triton", "cuda", "auto"):
            ap.error(f"unknown backend {b!r} (triton, cuda, auto)")
    a.weights = [w.strip() for w in a.weights.split(",") if w.strip()]
    if not a.weights:
        ap.error("--weights is empty")
    for w in a.weights:
        mt = _WFMT.match(w)
        if not mt:
            ap.error(f"unknown weight format {w!r} (sym, sym-gG, asym-gG)")
        if mt.group(2) is not None:
            gs = int(mt.group(2))
            if gs != -1 and gs not in (16, 32, 64) and (gs < 128 or gs % 128):
                ap.error(f"weight format {w!r}: the group must be -1, 16, 32, 64 or a multiple of 128")
    if a.tune is None:
        a.tune = "sym" if (a.quick or a.dry_run) else "all"
    if a.time_budget is not None and a.time_budget <= 0:
        ap.error(f"--time-budget must be > 0, got {a.time_budget}")
    a.what = [w.strip() for w in a.what.split(",") if w.strip()]
    for w in a.what:
        if w not in ("gemm", "act_quant"):
            ap.error(f"unknown --what {w!r} (gemm, act_quant)")
    return a


# --------------------------------------------------------------------------
# helpers (import torch lazily so --help works anywhere)
# --------------------------------------------------------------------------
def _bench(fn, args, graph=False):
    if args.dry_run:  # interpreter: one warm call, one timed call (checks the code path, not the speed)
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:  # replayed from a CUDA graph: GPU time without the Python launch cost
        import torch

        fn()  # compile / tune before the capture
        torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()):
            return do_bench_cudagraph(fn, rep=args.rep, return_mode="median") * 1e-3
    return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median") * 1e-3  # seconds


@contextlib.contextmanager
def _env(name: str, value: str):
    """``os.environ[name] = value`` inside the block (the previous state restored after)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _try(row, key, fn, args, flops=None, nbytes=None):
    """Time ``fn`` into ``row[key + "_us"]`` (+ TFLOP/s, GB/s); with ``--graph`` and M <= 64
    also ``row[key + "-graph_us"]`` (CUDA-graph replay: at small M the eager time is the
    CPU's launch cost, measured on the H100 at 2-10x the GPU time)."""
    if getattr(args, "graph", False) and not args.dry_run and row.get("M", 1 << 30) <= 64:
        _try_one(row, key + "-graph", fn, args, flops, nbytes, graph=True)
    return _try_one(row, key, fn, args, flops, nbytes)


def _try_one(row, key, fn, args, flops=None, nbytes=None, graph=False):
    try:
        t = _bench(fn, args, graph)
    except Exception as e:  # noqa: BLE001 - a peer missing on this build is reported, not fatal
        row[key + "_err"] = f"{type(e).__name__}: {str(e)[:160]}"
        return None
    row[key + "_us"] = round(t * 1e6, 2)
    if flops:
        row[key + "_tflops"] = round(flops / t / 1e12, 1)
    if nbytes:
        row[key + "_gbps"] = round(nbytes / t / 1e9, 1)
    return t


def _cuda_tuned(row, C, q4, q8, a_sc, lay, qweight, w_sc, w_off, group, args, flops, nbytes, dev):
    """``cuda-tuned`` column: the CUDA GEMM with the (split, tile) pair ``cometq._cuda_split`` picks for
    this shape (tuned here under the bench's timing mode: graph replays with ``--graph``), recorded in
    ``row["cuda_tuned_choice"]``; the ``cuda`` column is the kernel's own rule on the tile by M."""
    import torch

    from cometq import _cuda_split, autotune

    def launch(choice):
        return C.cuda_w4ax_gemm(q4, q8, a_sc, lay.block_bits, qweight, w_sc, group, None, torch.float16,
                                args.scale_mode, w_offsets=w_off, split_k=choice[0], tile=choice[1])

    try:
        with autotune.timing("graph" if args.graph else "eager"):
            choice = _cuda_split.tuned_split(q4.shape[0], qweight.shape[0], lay.n_blocks, lay.n_int8,
                                             -1 if group is None else int(group), w_off is not None, False, dev,
                                             launch)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        row["cuda-tuned_err"] = f"{type(e).__name__}: {str(e)[:160]}"
        return
    row["cuda_tuned_choice"] = list(choice)
    _try(row, "cuda-tuned", lambda: launch(choice), args, flops, nbytes)


def _layout(k, share, device):
    import torch

    from cometq.layout import ActivationLayout, num_blocks

    nb = num_blocks(k)
    n8 = int(round(share * nb))
    bits = [8] * n8 + [4] * (nb - n8)
    return ActivationLayout(torch.arange(k, device=device), torch.tensor(bits, dtype=torch.int32, device=device))


def weight_format(fmt: str, default_group: int):
    """``"sym"`` / ``"sym-gG"`` / ``"asym-gG"`` -> (asym, group)."""
    mt = _WFMT.match(fmt)
    if not mt:
        raise ValueError(f"unknown weight format {fmt!r} (sym, sym-gG, asym-gG)")
    return mt.group(1) == "asym", int(mt.group(2)) if mt.group(2) is not None else default_group


def weight_bytes(n: int, k_pad: int, group: int, asym: bool) -> int:
    """Bytes of one INT4 weight matrix: nibbles + fp32 scales (+ fp32 offsets when asymmetric)."""
    g = k_pad if group == -1 else group
    return n * k_pad // 2 + n * (k_pad // g) * 4 * (2 if asym else 1)


def resolve_backends(requested, device_type: str):
    """``auto`` -> triton, plus cuda when the extension imports (CUDA devices only)."""
    out = []
    for b in requested:
        if b == "auto":
            out.append("triton")
            if device_type == "cuda":
                try:
                    import cometq._C  # noqa: F401
                    import cometq._cuda_register  # noqa: F401

                    out.append("cuda")
                except Exception as e:  # noqa: BLE001
                    print(f"bench_gemm: cuda backend not timed ({type(e).__name__}: {str(e)[:120]})", flush=True)
        else:
            out.append(b)
    seen = []
    for b in out:
        if b not in seen:
            seen.append(b)
    return seen


class Budget:
    """``--time-budget``: after it is spent, no new row starts (the current one finishes)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.t0 = time.time()
        self.hit = False
        self.notes = []  # what was not run (not an error: the exit status stays 0)

    def note(self, what: str):
        self.notes.append(f"time budget ({self.seconds} s) spent: {what} not run")

    def spent(self) -> bool:
        if self.seconds is not None and time.time() - self.t0 > self.seconds:
            self.hit = True
        return self.hit


def bench_gemm(args, rows, errors, dev, budget=None, flush=lambda: None):
    import torch

    from cometq.kernels.act_quant import quantize_act_triton
    from cometq.kernels.w4ax_gemm import chosen_config, w4ax_gemm_triton
    from cometq.kernels.w16_gemm import W16_MAX_M
    from cometq.layout import padded_k, weights_block_major

    budget = budget or Budget(None)
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    C = None
    if "cuda" in args.backend:
        from cometq import _cuda_register as C
    formats = []
    for f in args.weights:  # labels name the group: "sym" -> "sym-g128"
        asym, group = weight_format(f, args.group)
        label = f"{'asym' if asym else 'sym'}-g{group}"
        if label not in [x[0] for x in formats]:
            formats.append((label, asym, group))
    tensors = {}

    def shape_tensors(sname):
        """Weights and peer operands of one shape, built on first use and kept (M is the outer
        loop, so the decode rows of every shape come first when --time-budget cuts the run)."""
        if sname in tensors:
            return tensors[sname]
        n, k = shapes[sname]
        k_pad = padded_k(k)
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        # one random nibble matrix serves every format (speed does not depend on the values);
        # scales / offsets per format, fp32 [N, K_pad / G]
        qweight = torch.randint(0, 256, (n, k_pad // 2), device=dev, dtype=torch.uint8)
        # the same weights stored block-major (layout.weights_block_major): the triton-wbm column
        qweight_bm = weights_block_major(qweight) if not args.no_wbm else None
        wsc = {}
        for fmt, asym, group in formats:
            g = k_pad if group == -1 else group
            sc = torch.rand(n, k_pad // g, device=dev) * 0.01
            off = (torch.rand(n, k_pad // g, device=dev) - 0.5) * 0.01 if asym else None
            wsc[fmt] = (sc, off)
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
        tensors[sname] = (w16, qweight, qweight_bm, wsc, peers)
        return tensors[sname]

    for m in args.ms:
        for sname in args.shapes:
            if budget.spent():
                budget.note(f"M={m} {sname} and later")
                return
            try:
                n, k = shapes[sname]
                k_pad = padded_k(k)
                w16, qweight, qweight_bm, wsc, peers = shape_tensors(sname)
                flops = 2.0 * m * n * k
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                base = dict(shape=sname, N=n, K=k, M=m)
                # ---- peers (independent of the INT8 share and the weight format)
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
                    if m > 64 and k % 128 == 0:
                        # the same FP8 GEMM with 1x128 x 1x128 block scales (what the fp8-block route's
                        # GEMM is, without its operand passes): the route's ceiling
                        from cometq.kernels.fp8_gemm import fp8_gemm_out_dtype, fp8_route_unavailable, scaled_mm_block

                        why = fp8_route_unavailable(dev)
                        if why is None:
                            sab = torch.ones(k // 128, m, device=dev)
                            sbb = torch.ones(k // 128, n, device=dev)
                            xu, wu = x8[:m].view(torch.uint8), w8.view(torch.uint8)
                            odt = fp8_gemm_out_dtype(dev, torch.float16)  # (bf16 where cuBLAS has no fp16 one)
                            _try(prow, "fp8-blk", lambda: scaled_mm_block(xu, sab, wu, sbb, odt), args,
                                 flops, n * k + m * k + 2 * m * n)
                        else:
                            prow["fp8-blk_err"] = why
                    if "w4p" in peers:
                        xb = x.bfloat16()
                        w4p, sz = peers["w4p"], peers["sz"]
                        _try(prow, "w4a16", lambda: torch._weight_int4pack_mm(xb, w4p, 128, sz), args, flops,
                             n * k // 2 + n * k // 128 * 4 + 2 * m * k + 2 * m * n)
                rows.append(prow)
                flush()
                # ---- ours, per INT8 share and weight format
                for share in args.shares:
                    lay = _layout(k, share, dev)
                    q4, q8, a_sc = quantize_act_triton(x, lay.perm, lay.block_bits, lay.n_int8, args.scale_mode,
                                                       identity_perm=True)
                    tuned = None  # the first format's Triton config (reused by the others with --tune sym)
                    for fi, (fmt, asym, group) in enumerate(formats):
                        if budget.spent():
                            budget.note(f"{sname} M={m} share={share} {fmt} and later")
                            break
                        w_sc, w_off = wsc[fmt]
                        # bytes the GEMM must move at least: weight nibbles + scales (+ offsets),
                        # activations + their scales, the fp16 output
                        wb = weight_bytes(n, k_pad, group, asym)
                        nbytes = wb + q4.numel() + q8.numel() + a_sc.numel() * 4 + 2 * m * n
                        row = dict(base, share=share, n_int8=lay.n_int8, kind="ours", weights=fmt, group=group,
                                   asym=asym, bytes=nbytes, w_bytes_per_weight=round(wb / (n * k), 4))
                        reuse = tuned if (args.tune == "sym" and fi > 0) else None
                        for be in args.backend:
                            if be == "triton":  # the kernel entries directly: no op dispatch overhead
                                # the triton column keeps the fp32-atomic split-K reduction (the default
                                # until the first H100 run; comparable across runs), triton-det the
                                # deterministic one (the default since)
                                # and the pointer kernels only (tma=False): the TMA kernel has its
                                # own column, triton-tma
                                fn = (lambda: w4ax_gemm_triton(q4, q8, a_sc, lay.block_bits, qweight, w_sc, group,
                                                               None, torch.float16, args.scale_mode, w_offsets=w_off,
                                                               config=reuse, deterministic=False, tma=False))

                                def e2e():
                                    a, b, c = quantize_act_triton(x, lay.perm, lay.block_bits, lay.n_int8,
                                                                  args.scale_mode)
                                    return w4ax_gemm_triton(a, b, c, lay.block_bits, qweight, w_sc, group, None,
                                                            torch.float16, args.scale_mode, w_offsets=w_off,
                                                            config=reuse, deterministic=False, tma=False)
                            else:
                                fn = (lambda: C.cuda_w4ax_gemm(q4, q8, a_sc, lay.block_bits, qweight, w_sc, group,
                                                               None, torch.float16, args.scale_mode, w_offsets=w_off))

                                def e2e():
                                    a, b, c = C.cuda_quantize_act(x, lay.perm, lay.block_bits, lay.n_int8,
                                                                  args.scale_mode)
                                    return C.cuda_w4ax_gemm(a, b, c, lay.block_bits, qweight, w_sc, group, None,
                                                            torch.float16, args.scale_mode, w_offsets=w_off)
                            try:
                                fn()  # first call autotunes (cached per shape bucket and variant)
                                if dev.type == "cuda":
                                    torch.cuda.synchronize()
                            except Exception as e:  # noqa: BLE001
                                row[f"{be}_err"] = f"{type(e).__name__}: {str(e)[:160]}"
                                continue
                            _try(row, be, fn, args, flops, nbytes)
                            _try(row, be + "+aq", e2e, args, flops, nbytes + 2 * m * k)
                            if be == "cuda" and qweight_bm is not None and m <= 64:
                                # the CUDA kernel over block-major weights (one contiguous run per tile and block)
                                _try(row, "cuda-wbm", lambda: C.cuda_w4ax_gemm(
                                    q4, q8, a_sc, lay.block_bits, qweight_bm, w_sc, group, None, torch.float16,
                                    args.scale_mode, w_offsets=w_off), args, flops, nbytes)
                            if be == "cuda" and m <= 64 and not args.dry_run:
                                # what the ops layer runs: the (split count, tile variant) its tuner keeps
                                # (cometq._cuda_split; timed in this bench's mode), and that choice timed
                                _cuda_tuned(row, C, q4, q8, a_sc, lay, qweight, w_sc, w_off, group, args, flops,
                                            nbytes, dev)
                        if "triton" not in args.backend or "triton_err" in row:
                            rows.append(row)
                            flush()
                            print(_fmt(prow, row), flush=True)
                            continue
                        cfg = reuse or chosen_config(m, n, k_pad, lay.n_int8, scale_mode=args.scale_mode,
                                                     group_size=group, asym=asym, deterministic=False)
                        if fi == 0:
                            tuned = cfg
                        row["triton_config"] = str(cfg)
                        if not args.no_persistent and m > 16:
                            pf = (lambda: w4ax_gemm_triton(q4, q8, a_sc, lay.block_bits, qweight, w_sc, group, None,
                                                           torch.float16, args.scale_mode, w_offsets=w_off,
                                                           path="persistent", deterministic=False,
                                                           config=cfg if args.tune == "sym" else None))
                            try:
                                pf()
                                _try(row, "triton-persistent", pf, args, flops, nbytes)
                            except Exception as e:  # noqa: BLE001
                                row["triton-persistent_err"] = f"{type(e).__name__}: {str(e)[:160]}"
                        if not args.no_tma and (group == -1 or group >= 128):
                            # the Hopper TMA kernel, autotuned over its own configs (groups >= 128;
                            # asymmetric weights since the ninth session: the offset term per block)
                            tf = (lambda: w4ax_gemm_triton(q4, q8, a_sc, lay.block_bits, qweight, w_sc, group, None,
                                                           torch.float16, args.scale_mode, w_offsets=w_off,
                                                           path="tma"))
                            try:
                                tf()
                                _try(row, "triton-tma", tf, args, flops, nbytes)
                                tcfg = chosen_config(m, n, k_pad, lay.n_int8, path="tma", scale_mode=args.scale_mode,
                                                     group_size=group, asym=asym)
                                row["triton-tma_config"] = str(tcfg)
                                if qweight_bm is not None and m <= 64 and tcfg is not None:
                                    # the same TMA config over block-major weights (one contiguous box per block)
                                    tbf = (lambda: w4ax_gemm_triton(q4, q8, a_sc, lay.block_bits, qweight_bm, w_sc,
                                                                    group, None, torch.float16, args.scale_mode,
                                                                    w_offsets=w_off, path="tma", config=tcfg))
                                    tbf()
                                    _try(row, "triton-tma-wbm", tbf, args, flops, nbytes)
                            except Exception as e:  # noqa: BLE001
                                row["triton-tma_err"] = f"{type(e).__name__}: {str(e)[:160]}"
                        if m > 64:
                            # the dequant path (both operands to fp16, then cuBLAS): an autotune
                            # candidate at M >= 1024 -- FP16-GEMM speed minus one pass over the weights
                            qf = (lambda: w4ax_gemm_triton(q4, q8, a_sc, lay.block_bits, qweight, w_sc, group, None,
                                                           torch.float16, args.scale_mode, w_offsets=w_off,
                                                           path="dequant"))
                            try:
                                qf()
                                _try(row, "triton-dequant", qf, args, flops, nbytes)
                            except Exception as e:  # noqa: BLE001
                                row["triton-dequant_err"] = f"{type(e).__name__}: {str(e)[:160]}"
                            _fp8_block(row, q4, q8, a_sc, lay, qweight, w_sc, w_off, group, k_pad, qf, args, flops,
                                       nbytes)
                        if m <= W16_MAX_M:
                            # the w16 route (kernels/w16_gemm.py): weights dequantized in registers, 16-bit
                            # MMA on the fake-quantized activations -- the GEMM alone from a ready A'
                            # (triton-w16; block-major weights: triton-w16-wbm) and the whole linear from x
                            # with its one-pass activation quantize-dequantize (triton-w16+aq); not
                            # integer-exact (the dequant path's tolerance)
                            from cometq.kernels.act_quant import fake_quant_act_triton
                            from cometq.kernels.w16_gemm import w16_gemm, w4ax_linear_w16

                            a16 = fake_quant_act_triton(x, lay.perm, lay.block_bits, lay.n_int8, args.scale_mode)
                            grp = k_pad if group == -1 else group
                            wf = (lambda: w16_gemm(a16, qweight, w_sc, w_off, grp, None, torch.float16))
                            we = (lambda: w4ax_linear_w16(x, lay.perm, lay.block_bits, lay.n_int8, args.scale_mode,
                                                          1.0, qweight, w_sc, w_off, grp, None, torch.float16))
                            try:
                                wf()
                                _try(row, "triton-w16", wf, args, flops, nbytes)
                                _try(row, "triton-w16+aq", we, args, flops, nbytes + 2 * m * k)
                                if qweight_bm is not None and m <= 64:
                                    wb = (lambda: w16_gemm(a16, qweight_bm, w_sc, w_off, grp, None, torch.float16))
                                    _try(row, "triton-w16-wbm", wb, args, flops, nbytes)
                            except Exception as e:  # noqa: BLE001
                                row["triton-w16_err"] = f"{type(e).__name__}: {str(e)[:160]}"
                            if "cuda" in args.backend:
                                # the same GEMM in CUDA (csrc/w16_gemm.cu; split and tile tuned per case
                                # as the route runs it), from the same A'
                                try:
                                    import cometq._cuda_register as CR

                                    if CR.HAS_W16:
                                        cf = (lambda: CR._w16_impl(a16, qweight, w_sc, w_off, grp, None,
                                                                   torch.float16))
                                        cf()
                                        _try(row, "cuda-w16", cf, args, flops, nbytes)
                                        if qweight_bm is not None and m <= 64:
                                            cb = (lambda: CR._w16_impl(a16, qweight_bm, w_sc, w_off, grp, None,
                                                                       torch.float16))
                                            cb()
                                            _try(row, "cuda-w16-wbm", cb, args, flops, nbytes)
                                        wt = 8 if m <= 16 else 4
                                        if wt in CR.w16_tiles(a16.device, grp) and m <= 64:
                                            # the wgmma tile (sm_90) with the kernel's split rule, untuned:
                                            # what the kernel does on its own beside the tuned choice
                                            cw = (lambda: CR.cuda_w16_gemm(a16, qweight_bm if qweight_bm is not None
                                                                           else qweight, w_sc, w_off, grp, None,
                                                                           torch.float16, tile=wt))
                                            cw()
                                            _try(row, "cuda-wgmma", cw, args, flops, nbytes)
                                except Exception as e:  # noqa: BLE001
                                    row["cuda-w16_err"] = f"{type(e).__name__}: {str(e)[:160]}"
                        if qweight_bm is not None and m <= 64 and cfg is not None:
                            # same config as the triton column, weights block-major: each tile's block
                            # is one contiguous BN x 64-byte run instead of BN pieces 2K bytes apart
                            bf = (lambda: w4ax_gemm_triton(q4, q8, a_sc, lay.block_bits, qweight_bm, w_sc, group,
                                                           None, torch.float16, args.scale_mode, w_offsets=w_off,
                                                           config=cfg, deterministic=False, tma=False))
                            try:
                                bf()
                                _try(row, "triton-wbm", bf, args, flops, nbytes)
                            except Exception as e:  # noqa: BLE001
                                row["triton-wbm_err"] = f"{type(e).__name__}: {str(e)[:160]}"
                        if not args.no_det and m <= 64 and cfg is not None:
                            if cfg.split > 1:
                                # same config as the triton column: the reduction's cost (workspace
                                # write + read, one launch) against zero fill + fp32 atomics + cast
                                df = (lambda: w4ax_gemm_triton(q4, q8, a_sc, lay.block_bits, qweight, w_sc, group,
                                                               None, torch.float16, args.scale_mode, w_offsets=w_off,
                                                               config=cfg, deterministic=True))
                                try:
                                    df()
                                    _try(row, "triton-det", df, args, flops, nbytes)
                                except Exception as e:  # noqa: BLE001
                                    row["triton-det_err"] = f"{type(e).__name__}: {str(e)[:160]}"
                            else:
                                row["triton-det_note"] = "chosen config does not split K: already deterministic"
                        rows.append(row)
                        flush()
                        print(_fmt(prow, row), flush=True)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                errors.append(f"{sname} M={m}: {type(e).__name__}: {str(e)[:200]}")


def _fmt(prow, row):
    keys = [k for k in list(prow) + list(row) if k.endswith("_us")]
    vals = {**prow, **row}
    return (f"{row['shape']:12s} M={row['M']:5d} share={row['share']:.3f} {row.get('weights', ''):10s} "
            + " ".join(f"{k[:-3]}={vals[k]}" for k in keys)
            + (f" triton_GB/s={row['triton_gbps']}" if "triton_gbps" in row else ""))


def bench_act_quant(args, rows, errors, dev, budget=None, flush=lambda: None):
    import torch

    from cometq.kernels.act_quant import fake_quant_act_triton, quantize_act_triton

    cuda_aq = cuda_fq = None
    if not args.dry_run:
        try:
            from cometq._cuda_register import cuda_quantize_act as cuda_aq
            from cometq._cuda_register import HAS_FAKE_QUANT, cuda_fake_quant_act
            cuda_fq = cuda_fake_quant_act if HAS_FAKE_QUANT else None
        except ImportError:
            pass
    budget = budget or Budget(None)
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    ks = sorted({shapes[s][1] for s in args.shapes})
    for k in ks:
        for m in args.ms:
            for share in args.shares:
                if budget.spent():
                    budget.note(f"act_quant K={k} M={m} and later")
                    return
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
                        # the one-row-per-program kernel that permutes on chip vs the older kernels
                        # (block: the per-block / by-rows grid by M; class: the two-pass walk)
                        _try(row, f"aq_{mode}_gather",
                             lambda: quantize_act_triton(x, perm, lay.block_bits, lay.n_int8, mode, gather=True),
                             args, None, nbytes)
                        _try(row, f"aq_{mode}_nogather",
                             lambda: quantize_act_triton(x, perm, lay.block_bits, lay.n_int8, mode, gather=False),
                             args, None, nbytes)
                    _try(row, "aq_block_identity", lambda: quantize_act_triton(x, lay.perm, lay.block_bits, lay.n_int8,
                                                                               "block", identity_perm=True), args, None, nbytes)
                    # block mode's two grids (the default picks by M: kernels/act_quant.py ROWS_MIN_M), the
                    # fused dequant route's FAKE pass (x in, 16-bit A' out) and the CUDA kernel
                    for grid in (True, False):  # (an explicit grid never takes the gather kernel)
                        _try(row, f"aq_block_{'rows' if grid else 'blocks'}",
                             lambda: quantize_act_triton(x, perm, lay.block_bits, lay.n_int8, "block", rows=grid),
                             args, None, nbytes)
                    _try(row, "aq_fake", lambda: fake_quant_act_triton(x, perm, lay.block_bits, lay.n_int8, "block"),
                         args, None, 2 * m * k + 2 * m * lay.n_blocks * 128)
                    _try(row, "aq_fake_nogather",
                         lambda: fake_quant_act_triton(x, perm, lay.block_bits, lay.n_int8, "block", gather=False),
                         args, None, 2 * m * k + 2 * m * lay.n_blocks * 128)
                    if cuda_aq is not None:
                        _try(row, "aq_cuda", lambda: cuda_aq(x, perm, lay.block_bits, lay.n_int8, "block"), args, None,
                             nbytes)
                        # the rows kernel's (M >= 256) three row loaders side by side, same run (the
                        # default picks async2 or async1 by resident CTAs: csrc/act_quant.cu)
                        for load in ("sync", "async1", "async2"):
                            with _env("COMETQ_ACT_QUANT_ROWS_LOAD", load):
                                _try(row, f"aq_cuda_{load}",
                                     lambda: cuda_aq(x, perm, lay.block_bits, lay.n_int8, "block"), args, None,
                                     nbytes)
                    if cuda_fq is not None:
                        _try(row, "aq_cuda_fake", lambda: cuda_fq(x, perm, lay.block_bits, lay.n_int8, "block"), args,
                             None, 2 * m * k + 2 * m * lay.n_blocks * 128)
                    rows.append(row)
                    flush()
                    print(row, flush=True)
                except Exception as e:  # noqa: BLE001
                    errors.append(f"act_quant K={k} M={m}: {type(e).__name__}: {str(e)[:200]}")


# --------------------------------------------------------------------------
# reports
def _fp8_block(row, q4, q8, a_sc, lay, qweight, w_sc, w_off, group, k_pad, ref_fn, args, flops, nbytes):
    """Column ``fp8-block`` (M > 64, weight groups of whole blocks): the large-M FP8
    route (kernels/fp8_gemm.py: the W4Ax integers as e4m3 operands of cuBLAS's 1x128 x 1x128
    block-scaled FP8 GEMM, operand passes included), after checking its output against the dequant
    path's (``fp8-block_maxrel``: max |difference| / max |y|); why not, where it cannot run."""
    from cometq.kernels.dequant_gemm import DEQUANT_GEMM_RTOL
    from cometq.kernels.fp8_gemm import fp8_route_unavailable, w4ax_gemm_fp8

    grp = k_pad if group == -1 else group
    why = f"group {group}" if grp % 128 else fp8_route_unavailable(qweight.device)
    if why is not None:
        row["fp8-block_err"] = why
        return
    ff = (lambda: w4ax_gemm_fp8(q4, q8, a_sc, lay.block_bits, qweight, w_sc, grp, None, torch.float16,
                                args.scale_mode, w_offsets=w_off))
    try:
        ref = ref_fn().float()
        rel = float((ff().float() - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)
        row["fp8-block_maxrel"] = rel
        if not rel <= 2 * DEQUANT_GEMM_RTOL[torch.float16]:
            row["fp8-block_err"] = f"disagrees with the dequant path (max rel {rel:.3g})"
            return
        _try(row, "fp8-block", ff, args, flops, nbytes)
    except Exception as e:  # noqa: BLE001
        row["fp8-block_err"] = f"{type(e).__name__}: {str(e)[:160]}"


# --------------------------------------------------------------------------
def markdown(rows, backends):
    out = []
    peers = {(r["shape"], r["M"]): r for r in rows if r.get("kind") == "peers"}
    order = {name: i for i, name in enumerate(list(SHAPES) + list(DRY_SHAPES))}
    # table order: shape, M, share (rows are measured M-major; the sort is stable: format order kept)
    ours = sorted((r for r in rows if r.get("kind") == "ours"),
                  key=lambda r: (order.get(r["shape"], len(order)), r["M"], r["share"]))
    if ours:
        cols = (backends + ["triton-persistent", "triton-tma", "triton-dequant", "fp8-block", "triton-det", "triton-wbm",
                            "triton-tma-wbm", "triton-w16", "triton-w16-wbm", "triton-w16+aq"]
                if "triton" in backends
                else list(backends))
        if "cuda" in backends:
            cols += ["cuda-wbm", "cuda-tuned", "cuda-w16", "cuda-w16-wbm", "cuda-wgmma"]
        head = ["shape", "M", "INT8 share", "weights", "MB moved", "FP16", "INT8", "FP8", "FP8 1x128", "W4A16"] + cols
        head += [f"{b}+aq" for b in backends] + [f"{b} GB/s" for b in backends]
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

            cells = [r["shape"], str(r["M"]), f"{100 * r['share']:.1f}%", r.get("weights", "–"),
                     f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else "–", t(p, "fp16"), t(p, "int8"), t(p, "fp8"),
                     t(p, "fp8-blk"), t(p, "w4a16")]
            cells += [t(r, c) for c in cols] + [t(r, f"{b}+aq") for b in backends]
            cells += [str(r.get(f"{b}_gbps", "–")) for b in backends]
            cells += [ratio(r.get(c + "_us"), p.get("fp16_us")) for c in cols]
            cells += [ratio(r.get(c + "_us"), p.get("fp8_us")) for c in cols]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out.append("Times in microseconds (do_bench medians). `x vs FP16` = FP16 time / x time (> 1: faster than FP16). "
                   "`+aq` includes the fused activation quantization. `weights`: sym = symmetric, asym = fp32 "
                   "offsets, gG = group size. `MB moved` = the bytes the GEMM must move at least (weight nibbles + "
                   "scales + offsets, activations + scales, fp16 output); `GB/s` = MB moved / time. `triton-det`: "
                   "deterministic split-K reduction on the same config as `triton` (M <= 64, when it splits; the default "
                   "since 2026-11-26, while the `triton` column keeps the fp32-atomic reduction). `triton`: "
                   "the pointer-load kernels (comparable with the first runs); `triton-tma`: the Hopper TMA "
                   "kernel (symmetric weights, groups >= 128), autotuned over its own configs; `triton-wbm`: "
                   "the `triton` config with the weights stored block-major (layout.weights_block_major, M <= 64; "
                   "`triton-tma-wbm` / `cuda-wbm`: the same for the `triton-tma` config / the CUDA kernel); "
                   "`triton-dequant` (M > 64): both operands dequantized to fp16, then cuBLAS (an autotune "
                   "candidate at M >= 1024; not integer-exact); `fp8-block` (M > 64, weight groups "
                   ">= 128; asymmetric: + the offset term in one fp32 pass): the W4Ax integers as e4m3 operands of cuBLAS's 1x128 x 1x128 block-scaled FP8 GEMM "
                   "(kernels/fp8_gemm.py; INT8 blocks as two exact digits; operand passes included); `cuda`: the CUDA kernel with its own split rule "
                   "on the tile chosen by M; `cuda-tuned` (M <= 64): with the (split, tile) the ops layer's "
                   "tuner keeps (`cuda_tuned_choice` in gemm.json; tile 1 = the 3-stage 64x64 pipeline); "
                   "path='auto' picks between both; `triton-w16` (M <= 256): weights dequantized in registers, "
                   "16-bit MMA on the activations quantized and dequantized once (kernels/w16_gemm.py; GEMM "
                   "alone, `-wbm` block-major weights, `+aq` with the one-pass activation quantize-dequantize; "
                   "not integer-exact); `cuda-w16`: the same GEMM in CUDA (csrc/w16_gemm.cu, split and tile "
                   "tuned per case); `cuda-wgmma` (sm_90, G >= 128, M <= 64): its wgmma kernel (64 -- at M <= 16: "
                   "16 -- tokens x 128 weight rows, the kernel's split rule, block-major weights where the row has "
                   "them). "
                   "TFLOP/s and the configs are in gemm.json.")
    graphed = [r for r in ours if any(k.endswith("-graph_us") for k in r)]
    if graphed:
        gcols = [c for c in backends] + [f"{b}+aq" for b in backends]
        for extra in ("triton-tma", "triton-wbm", "triton-tma-wbm", "cuda-wbm", "cuda-tuned", "triton-w16",
                      "triton-w16-wbm", "triton-w16+aq", "cuda-w16", "cuda-w16-wbm", "cuda-wgmma"):
            if any(f"{extra}-graph_us" in r for r in graphed):
                gcols.append(extra)
        out.append("")
        out.append("CUDA-graph replay (`--graph`, M <= 64): GPU time without the Python launch cost, us")
        out.append("")
        head = ["shape", "M", "INT8 share", "weights", "FP16 graph"] + [f"{c} graph" for c in gcols]
        head += [f"{b} graph vs FP16 graph" for b in backends]
        head += ["FP8 graph", "best graph vs FP16 graph", "best graph vs FP8 graph"]  # (#3: M <= 16, >= 3x / 1.5x)
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in graphed:
            p = peers.get((r["shape"], r["M"]), {})
            f16, f8 = p.get("fp16-graph_us"), p.get("fp8-graph_us")
            cells = [r["shape"], str(r["M"]), f"{100 * r['share']:.1f}%", r.get("weights", "–"),
                     "–" if f16 is None else f"{f16:.1f}"]
            cells += ["–" if r.get(c + "-graph_us") is None else f"{r[c + '-graph_us']:.1f}" for c in gcols]
            cells += ["–" if (f16 is None or r.get(b + "-graph_us") is None) else f"{f16 / r[b + '-graph_us']:.2f}x"
                      for b in backends]
            # the best GEMM-alone column (not the +aq ones: the peers get no activation quantization)
            times = [r[c + "-graph_us"] for c in gcols if not c.endswith("+aq") and r.get(c + "-graph_us")]
            best = min(times) if times else None
            cells += ["–" if f8 is None else f"{f8:.1f}",
                      "–" if (best is None or f16 is None) else f"{f16 / best:.2f}x",
                      "–" if (best is None or f8 is None) else f"{f8 / best:.2f}x"]
            out.append("| " + " | ".join(cells) + " |")
    aq = [r for r in rows if r.get("kind") == "act_quant"]
    if aq:
        out.append("")
        cols = ("copy", "aq_block", "aq_class", "aq_block_gather", "aq_block_nogather", "aq_class_gather",
                "aq_class_nogather", "aq_block_identity", "aq_block_rows", "aq_block_blocks", "aq_fake",
                "aq_fake_nogather", "aq_cuda", "aq_cuda_sync", "aq_cuda_async1", "aq_cuda_async2", "aq_cuda_fake")
        out.append("| K | M | INT8 share | copy GB/s | block GB/s | class GB/s | block, gather kernel GB/s "
                   "| block, older kernels GB/s | class, gather kernel GB/s | class, two-pass kernel GB/s "
                   "| block (identity perm) GB/s "
                   "| block, by rows GB/s | block, per-block grid GB/s | FAKE (x -> 16-bit A') GB/s "
                   "| FAKE, older kernels GB/s | CUDA GB/s "
                   "| CUDA rows, sync loads GB/s | CUDA rows, 1 cp.async buffer GB/s | CUDA rows, 2 buffers GB/s "
                   "| CUDA FAKE GB/s |")
        out.append("|" + "---|" * (len(cols) + 3))
        for r in aq:
            out.append(f"| {r['K']} | {r['M']} | {100 * r['share']:.1f}% | "
                       + " | ".join(str(r.get(c + "_gbps", "–")) for c in cols) + " |")
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
            for wf in sorted({r.get("weights", "") for r in ours}):
                pts = [(r["M"], peers[(s, r["M"])]["fp16_us"] / r["triton_us"]) for r in ours
                       if r["shape"] == s and r["share"] == share and r.get("weights", "") == wf
                       and peers.get((s, r["M"]), {}).get("fp16_us")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"W4Ax {wf} {100 * share:.1f}% INT8")
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
    if args.dry_run:
        # before anything imports a @triton.jit module: run the kernels in the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
        args.no_peers = True  # fp8 / int4pack / _int_mm peers are GPU kernels
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        print(f"bench_gemm: torch is not importable ({e}); nothing to measure", file=sys.stderr)
        return 2
    if not args.dry_run:
        if not torch.cuda.is_available():
            print("bench_gemm: no CUDA GPU visible (torch.cuda.is_available() is False). This benchmark times GPU "
                  "kernels; run it on a machine with an NVIDIA GPU (sm_80/sm_90), or use --dry-run to check the "
                  "script on the CPU.", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("bench_gemm: TRITON_INTERPRET=1 is set; unset it to time compiled kernels", file=sys.stderr)
            return 2
    dev = torch.device("cpu" if args.dry_run else "cuda")
    args.backend = resolve_backends(args.backend, dev.type)
    os.makedirs(args.out, exist_ok=True)
    import triton

    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        dev_meta = dict(device=p.name, sms=p.multi_processor_count, capability=list(torch.cuda.get_device_capability()))
    else:
        dev_meta = dict(device="cpu (dry run: Triton interpreter, times are meaningless)", sms=0, capability=None)
    meta = dict(**dev_meta, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                args={k: v for k, v in vars(args).items()}, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                # the switches that change which kernels run (gpu_check.sh sets them after its smoke tests)
                env={k: os.environ.get(k) for k in ("COMETQ_SPLITK_FIXUP", "COMETQ_DETERMINISTIC", "COMETQ_GEMM_TUNE",
                                                    "COMETQ_CUDA_SPLIT_TUNE", "COMETQ_BACKEND")})
    print(meta, flush=True)
    rows, errors = [], []
    t0 = time.time()
    budget = Budget(args.time_budget)
    path = os.path.join(args.out, "gemm.json")

    def flush():
        meta["seconds"] = round(time.time() - t0, 1)
        meta["complete"] = False
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(meta=meta, rows=rows, errors=errors), f, indent=1)
        os.replace(tmp, path)  # a kill mid-write never leaves a broken file

    if "gemm" in args.what:
        bench_gemm(args, rows, errors, dev, budget, flush)
    if "act_quant" in args.what:
        bench_act_quant(args, rows, errors, dev, budget, flush)
    meta["seconds"] = round(time.time() - t0, 1)
    meta["budget_hit"] = budget.hit
    meta["not_run"] = budget.notes
    flush()
    meta["complete"] = True
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows, errors=errors), f, indent=1)
    md = (f"# W4Ax GEMM on {meta['device']} ({meta['started']}, torch {torch.__version__}, "
          f"triton {triton.__version__})\n\n")
    md += markdown(rows, args.backend)
    if budget.notes:
        md += "\nNot run (--time-budget):\n" + "\n".join(f"- {e}" for e in budget.notes) + "\n"
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
