"""Where does a prefill step's time go?  One serving-runner forward over fresh prompts
(the shape the serving benchmark's prefill steps have: ``--seqs`` prompts of ``--len`` tokens in
one step), own FP16 runner vs the W4Ax-KV4 runner, timed (synced) and under ``torch.profiler``.

    python bench/diag_prefill.py --shapes 8x1024,32x256          # GPU: Llama-3-8B geometry, random weights
    python bench/diag_prefill.py --quick                         # CPU smoke run, tiny model

Writes ``prefill.json`` (per system and shape: ms per step, tokens/s, top kernels, top CPU ops)
under ``--out``.  Why it exists: at 1024-token prompts the serving run's prefill steps took
~2 s per 8192 tokens (HF prefills all 65536 in 2 s).
"""
import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))


def _shapes(text: str):
    out = []
    for part in text.split(","):
        seqs, _, n = part.strip().partition("x")
        if not seqs.isdigit() or not n.isdigit() or int(seqs) < 1 or int(n) < 2:
            raise ValueError(f"--shapes wants SEQSxLEN items (LEN >= 2), got {part!r}")
        out.append((int(seqs), int(n)))
    return out


def run_shape(runner, seqs: int, n: int, device: str, reps: int, profile: bool):
    import torch

    from cometq.serve.bench import top_kernels
    from cometq.serve.runner import Chunk

    g = torch.Generator().manual_seed(seqs * 7919 + n)
    chunks = [Chunk(i, torch.randint(0, runner.vocab_size, (n,), generator=g).tolist(), 0) for i in range(seqs)]

    def step():
        for c in chunks:
            runner.pool.reserve(c.seq_id, n)
        runner.forward(chunks)
        if device == "cuda":
            torch.cuda.synchronize()
        for c in chunks:
            runner.pool.free(c.seq_id)

    t = time.monotonic()
    step()  # first call: compiles / tunes what this shape needs
    first_ms = (time.monotonic() - t) * 1e3
    step()
    times = []
    for _ in range(reps):
        t = time.monotonic()
        step()
        times.append((time.monotonic() - t) * 1e3)
    ms = sorted(times)[len(times) // 2]
    res = {"seqs": seqs, "len": n, "tokens": seqs * n, "first_ms": first_ms, "ms": ms,
           "tokens_per_s": seqs * n / ms * 1e3}
    if profile:
        from torch.profiler import ProfilerActivity, profile as tprofile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with tprofile(activities=acts) as prof:
            step()
        by_name, cpu_ops, busy = {}, {}, 0.0
        for e in prof.events():
            if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
                us = e.time_range.elapsed_us()
                busy += us
                agg = by_name.setdefault(e.name[:120], [0.0, 0])
                agg[0] += us
                agg[1] += 1
        for a in prof.key_averages():
            us = getattr(a, "self_cpu_time_total", 0.0)
            if us > 0 and getattr(a, "device_type", None) != torch.autograd.DeviceType.CUDA:
                cpu_ops[a.key[:120]] = [us, a.count]
        res.update(gpu_busy_ms=busy / 1e3, top_kernels=top_kernels(by_name, 1, k=20),
                   top_cpu_ops=top_kernels(cpu_ops, 1, k=15))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8x1024,32x256", help="SEQSxLEN, comma-separated (one prefill step each)")
    ap.add_argument("--systems", default="w4ax,fp", help="w4ax (W4Ax-KV4 runner), fp (own FP16 runner), in order")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny random model (CPU smoke run)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    shapes = _shapes(args.shapes)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in ("fp", "w4ax")]
    if bad or not systems or len(set(systems)) != len(systems):
        raise ValueError(f"--systems takes fp and/or w4ax, got {args.systems!r}")
    if args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")

    import torch

    from cometq import W4AxConfig, quantize_
    from cometq.serve.bench import _load
    from cometq.serve.runner import ModelRunner

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    model, _tok, name = _load(None, device, args.quick)
    max_tokens = max(s * n for s, n in shapes)
    max_seqs = max(s for s, _ in shapes)
    results = {"model": name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": [],
               # kernel switches of this run (the fused dequant route's choice is in "autotune":
               # op w4ax_linear_route)
               "env": {k: os.environ.get(k) for k in ("COMETQ_ACT_QUANT_ROWS", "COMETQ_BACKEND", "COMETQ_GEMM_TUNE",
                                                      "COMETQ_AUTOTUNE", "COMETQ_SPLITK_FIXUP")}}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "prefill.json")
    for system in systems:  # in the order given (the first gets the time a capped run has)
        if system == "w4ax":
            t = time.monotonic()
            calib = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(1))
            # quantize_ works in place: a copy when the FP16 system still has to run
            qmodel = copy.deepcopy(model) if "fp" in systems[systems.index(system):] else model
            quantize_(qmodel, W4AxConfig(), calib_data=calib.to(device))
            print(f"quantized in {time.monotonic() - t:.1f} s", flush=True)
        else:
            qmodel = model
        kw = dict(group_size=64) if system == "w4ax" else {}
        runner = ModelRunner.build(qmodel, kv4=system == "w4ax", num_blocks=max_tokens // 64 + 2 * max_seqs,
                                   block_size=64, max_seqs=max_seqs, **kw)
        for seqs, n in shapes:
            with torch.no_grad():
                r = run_shape(runner, seqs, n, device, args.reps, not args.no_profile)
            r["system"] = system
            results["rows"].append(r)
            print(f"{system} {seqs}x{n}: {r['ms']:.1f} ms/step ({r['tokens_per_s']:.0f} tok/s), "
                  f"first {r['first_ms']:.0f} ms, GPU busy {r.get('gpu_busy_ms', float('nan')):.1f} ms", flush=True)
            for k in r.get("top_kernels", [])[:8]:
                print(f"    {k['ms_per_step']:9.2f} ms x{k['launches_per_step']:<5.0f} {k['name'][:90]}")
            for k in r.get("top_cpu_ops", [])[:5]:
                print(f"    cpu {k['ms_per_step']:9.2f} ms x{k['launches_per_step']:<5.0f} {k['name'][:90]}")
            # which backend each quantized projection's GEMM / act-quant measured fastest at this M
            from cometq import autotune

            results["autotune"] = autotune.report()
            with open(path, "w") as f:
                json.dump(results, f, indent=1, default=str)
        del runner, qmodel
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
