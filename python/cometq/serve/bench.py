"""End-to-end serving benchmark: throughput, TTFT, TPOT (``cometq bench`` / bench/bench_serving.py).

Systems compared, same request mix (``batch`` requests of ``input_len`` random
prompt tokens, each generating exactly ``output_len`` tokens, all submitted at
once -- offline throughput at a given concurrency):

* ``cometq-w4ax-kv4``: the model quantized with ``cometq.quantize_`` (W4Ax
  linears) served by the cometq engine over the paged KV4 pool;
* ``cometq-fp``: the unquantized model, same engine and runner, full-precision
  paged cache (the "cometq FP16 path": isolates what W4Ax + KV4 buy);
* ``hf-generate``: ``transformers`` ``model.generate`` on the unquantized model
  (static batch, greedy, DynamicCache);
* ``cometq-w4ax-kv4+graphs`` / ``cometq-fp+graphs`` (opt-in, GPU): the cometq systems
  with decode steps replayed from CUDA graphs -- one graph per step (appends and KV4
  attention captured) for the KV4 pool, piecewise graphs (attention eager) for the
  full-precision pool; ``cometq-w4ax-kv4+piecewise``: the KV4 system with piecewise graphs
  (what the full-step graph is measured against).
* ``...+apc`` (``cometq-fp+apc``, ``cometq-w4ax-kv4+apc``, ``...+graphs+apc``): the same engine with
  prefix caching on (``EngineConfig.enable_prefix_caching``); with ``--shared-prefix N`` every
  prompt starts with the same N tokens (a common system prompt), the rest its own.

On a GPU the default model is a Llama-3-8B-shaped random-weight model (no hub
access needed), fp16, batch 1..64, 1024 in / 512 out.  On CPU: the embedded
SmolLM2-135M (fp32) with small sizes.  ``--quick``: a tiny random model and a
few small points (a smoke run).

Metrics per (system, batch): output tokens/s (all requests' generated tokens /
wall time), total tokens/s (prompt + output), mean and p50/p90 TTFT (submission
to first token), mean TPOT ((finish - first token) / (output_len - 1)).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Dict, List, Optional

__all__ = ["build_parser", "main", "run_bench"]

SYSTEMS = ("cometq-w4ax-kv4", "cometq-fp", "hf-generate")
#: also accepted by --systems: the cometq systems with CUDA graphs for decode steps
#: (ModelRunner.enable_cuda_graphs; GPU only): "+graphs" the default scheme (full-step for KV4),
#: "+piecewise" piecewise graphs (attention and appends eager between them)
#: "+graphs-sync" the default scheme with the engine's async scheduling off (EngineConfig)
ALL_SYSTEMS = SYSTEMS + ("cometq-w4ax-kv4+graphs", "cometq-fp+graphs", "cometq-w4ax-kv4+piecewise",
                         "cometq-w4ax-kv4+graphs-sync", "cometq-w4ax-kv4+apc", "cometq-fp+apc",
                         "cometq-w4ax-kv4+graphs+apc", "cometq-fp+graphs+apc")
_GRAPH_SUFFIXES = ("+graphs", "+piecewise", "+graphs-sync")
#: a W4Ax system may name its weight format: "cometq-w4ax-kv4+graphs@sym-g128" (symmetric INT4
#: weights in groups of 128: the Hopper TMA kernel's format), "@asym-g32", ...; without one the
#: system runs ``W4AxConfig()``'s default (asymmetric, groups of 128)
_WFMT = re.compile(r"^(sym|asym)-g(-1|\d+)$")


def _split_apc(base: str):
    """``"cometq-fp+graphs+apc"`` -> ``("cometq-fp+graphs", True)``: the engine system and whether
    it runs with prefix caching."""
    return (base[:-4], True) if base.endswith("+apc") else (base, False)


def parse_system(system: str):
    """``"base[@fmt]"`` -> ``(base, W4AxConfig kwargs or {})``; ValueError naming a bad one."""
    base, _, fmt = system.partition("@")
    if base not in ALL_SYSTEMS:
        raise ValueError(f"unknown system {system!r}; choose from {ALL_SYSTEMS} (W4Ax ones optionally with "
                         "@sym-gG / @asym-gG)")
    if not fmt:
        return base, {}
    if not base.startswith("cometq-w4ax-kv4"):
        raise ValueError(f"system {system!r}: only the cometq-w4ax-kv4 systems take a weight format")
    m = _WFMT.match(fmt)
    if not m:
        raise ValueError(f"system {system!r}: weight format {fmt!r} is not sym-gG / asym-gG (G = -1, 16, 32, ...)")
    return base, {"weight_sym": m.group(1) == "sym", "group_size": int(m.group(2))}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cometq bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help)
    p.add_argument("--model", default=None,
                   help="model directory, 'smollm2-135m', or 'llama3-8b-random' (default: llama3-8b-random on "
                        "GPU, smollm2-135m on CPU, a tiny random model with --quick)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of {','.join(ALL_SYSTEMS)} (+graphs: CUDA graphs for decode, GPU; "
                        "+piecewise: piecewise graphs; a W4Ax system may end in a weight format, e.g. "
                        "cometq-w4ax-kv4+graphs@sym-g128; default: W4AxConfig()'s asymmetric g128)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default: GPU 1,4,16,64; CPU 1,4,8)")
    p.add_argument("--input-len", type=int, default=None, help="prompt tokens (default: GPU 1024, CPU 64)")
    p.add_argument("--output-len", type=int, default=None, help="generated tokens (default: GPU 512, CPU 32)")
    p.add_argument("--block-size", type=int, default=64, help="KV pool block size (tokens)")
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="the first N prompt tokens are the same in every request (a common system prompt; "
                        "compare a system with its +apc twin, which runs with prefix caching)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="engine token budget per step (default: 8192 GPU, 512 CPU)")
    p.add_argument("--quick", action="store_true", help="tiny model, few small points (smoke run)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (CPU; default: torch's choice -- use 1 on a busy machine, where "
                        "OpenMP threads spin against each other)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-step-profile", action="store_true",
                   help="skip the decode-step profile (GPU, +graphs systems: wall time vs GPU-busy time per decode "
                        "step, after the timed run)")
    p.add_argument("--out", default="bench/results", help="directory for serving_<tag>.json/.md/.png")
    p.add_argument("--tag", default=None, help="file name tag (default: device)")
    return p


# --------------------------------------------------------------------------- models
def _llama3_8b_random(device, dtype):
    """Llama-3-8B geometry (hidden 4096, 32 layers, 32/8 heads, vocab 128256), random weights."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
    return random_llama(cfg, device, dtype)


def random_llama(cfg, device, dtype, seed: int = 0):
    """A random-weight causal LM of ``cfg`` built without a CPU copy (meta init, then N(0, 0.02))."""
    import torch
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    # the rotary inv_freq buffers were created on the meta device: build the module again
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(device)
    return model.eval()


def _load(name: str, device: str, quick: bool):
    import torch

    if quick and name is None:
        from .tiny import byte_tokenizer, tiny_model

        return tiny_model(max_positions=1024).to(device), byte_tokenizer(), "tiny-random-llama"
    if name is None:
        name = "llama3-8b-random" if device == "cuda" else "smollm2-135m"
    if name == "llama3-8b-random":
        return _llama3_8b_random(device, torch.float16), None, name
    from ..models import load_model

    dtype = torch.float16 if device == "cuda" else torch.float32
    model, tok = load_model(name, dtype=dtype, device=device)
    return model, tok, name


# --------------------------------------------------------------------------- runs
def _prompts(vocab: int, batch: int, n: int, seed: int, shared: int = 0) -> List[List[int]]:
    """``batch`` random prompts of ``n`` tokens; the first ``shared`` are the same in all of them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, vocab, (min(shared, n),), generator=g).tolist()
    return [head + torch.randint(0, vocab, (n - len(head),), generator=g).tolist() for _ in range(batch)]


def _summ(ttft: List[float], tpot: List[float], wall: float, batch: int, in_len: int, out_len: int) -> Dict:
    ttft_sorted = sorted(ttft)
    return {
        "batch": batch, "input_len": in_len, "output_len": out_len, "wall_s": wall,
        "output_tokens_per_s": batch * out_len / wall, "total_tokens_per_s": batch * (in_len + out_len) / wall,
        "ttft_mean_s": statistics.fmean(ttft), "ttft_p50_s": ttft_sorted[len(ttft) // 2],
        "ttft_p90_s": ttft_sorted[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "tpot_mean_s": statistics.fmean(tpot) if tpot else float("nan"),
    }


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_engine(model, *, kv4: bool, batch: int, in_len: int, out_len: int, block_size: int, budget: int,
               device: str, seed: int, cuda_graphs=False, step_profile: bool = True,
               async_scheduling: bool = True, prefix_caching: bool = False, shared_prefix: int = 0) -> Dict:
    """One engine run.  ``cuda_graphs``: False, True (the runner's default scheme) or
    ``"piecewise"``; ``async_scheduling`` / ``prefix_caching``: the engine's (EngineConfig);
    ``shared_prefix``: leading prompt tokens common to all requests (the warm-up's prompts share
    another prefix, so the timed run starts with a cold cache for its own)."""
    from .engine import Engine, EngineConfig
    from .runner import ModelRunner
    from .sampling import SamplingParams

    blocks = batch * (-(-(in_len + out_len) // block_size))
    kw = dict(group_size=min(block_size, 64)) if kv4 else {}
    runner = ModelRunner.build(model, kv4=kv4, num_blocks=blocks, block_size=block_size, max_seqs=max(batch, 1), **kw)
    if cuda_graphs:  # captured during the warm-up below (first decode step of the batch)
        runner.enable_cuda_graphs(max_batch=max(batch, 1), full=False if cuda_graphs == "piecewise" else None)
    eng = Engine(runner, None, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=budget,
                                            max_model_len=in_len + out_len, async_scheduling=async_scheduling,
                                            enable_prefix_caching=prefix_caching))
    sp = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    # warm-up with the measured batch shape (full prompts, a few decode steps): every
    # kernel specialization and GEMM shape bucket the run hits is compiled (and tuned)
    # here, not inside the timed TTFT / TPOT
    # enough tokens that the first sequences still decode while the last ones prefill: the mixed
    # (prefill + eager decode) steps of the timed run, with their decode batch sizes, are warmed too
    prefill_steps = -(-batch * in_len // max(budget, 1))
    warm_sp = SamplingParams(max_tokens=min(out_len, prefill_steps + 3), temperature=0, ignore_eos=True)
    for p in _prompts(runner.vocab_size, batch, in_len, seed + 1, shared_prefix):
        eng.add_request(p, warm_sp)
    while eng.has_work():
        eng.step()
    _sync(device)
    tuned0 = tuning_counts()
    hits0 = eng.stats["prefix_hit_tokens"]
    t0 = time.monotonic()
    reqs = [eng.add_request(p, sp) for p in _prompts(runner.vocab_size, batch, in_len, seed, shared_prefix)]
    steps = 0
    # host wall time per step (each step ends in a device->host copy of the sampled ids, so it
    # includes the step's GPU time; a slow outlier = a capture, a compile, a tuning, an allocator
    # stall) with what the step ran: (decode sequences, prefill chunks, prefill tokens)
    step_s, step_shapes = [], []
    while eng.has_work():
        ts = time.monotonic()
        eng.step()
        step_s.append(time.monotonic() - ts)
        step_shapes.append(eng.last_step_shape)
        steps += 1
    _sync(device)
    wall = time.monotonic() - t0
    tuned1 = tuning_counts()
    if any(len(r.output_ids) != out_len for r in reqs):
        raise RuntimeError(f"engine produced {[len(r.output_ids) for r in reqs]} tokens, wanted {out_len}")
    ttft = [r.first_token_time - r.arrival for r in reqs]
    tpot = [(r.finish_time - r.first_token_time) / (out_len - 1) for r in reqs if out_len > 1]
    res = _summ(ttft, tpot, wall, batch, in_len, out_len)
    res.update(steps=steps, preemptions=eng.stats["preemptions"], kv_pool_bytes=runner.pool.memory_bytes(),
               shared_prefix=shared_prefix, prefix_caching=prefix_caching,
               prefix_hit_tokens=eng.stats["prefix_hit_tokens"] - hits0)
    if step_s:
        srt = sorted(step_s)
        res.update(step_ms_p50=srt[len(srt) // 2] * 1e3, step_ms_max=srt[-1] * 1e3,
                   step_ms_top3=[round(v * 1e3, 2) for v in srt[-3:][::-1]])
        res.update(step_breakdown(step_s, step_shapes))
    # decisions made inside the timed run (a tuning there is a stall the warm-up should have paid)
    res["tuned_in_timed_run"] = {k: tuned1[k] - tuned0.get(k, 0) for k in tuned1 if tuned1[k] != tuned0.get(k, 0)}
    choices = cuda_gemm_choices()
    if choices:  # what the CUDA GEMM's tuner kept per decode shape: (split count, tile variant)
        res["cuda_gemm_choices"] = choices
    routes = linear_route_choices()
    if routes:  # which linear route (split / fused / w16 / fp8) each case runs, with the timings
        res["linear_routes"] = routes
    reg = sys.modules.get("cometq._cuda_register")
    if reg is not None:  # KV4 attention kernel per shape class under COMETQ_KV4_ATTN_CUDA=auto
        res["kv4_attention_cuda"] = reg.kv4_attention_mode()
        res["kv4_attention_choices"] = reg.kv4_attention_choices()
    # decode steps queued ahead of the host (async scheduling; counted over warm-up + timed run)
    res.update(async_scheduling=async_scheduling, async_steps=eng.async_steps, async_dropped_rows=eng.async_dropped)
    # kernel switches of this run (gpu_check.sh turns the opt-in ones on after their GPU tests pass)
    res["env"] = {k: os.environ.get(k) for k in ("COMETQ_SPLITK_FIXUP", "COMETQ_CUDA_SPLITK_FIXUP",
                                                 "COMETQ_KV4_ATTN_CUDA", "COMETQ_BACKEND",
                                                 "COMETQ_GEMM_TUNE", "COMETQ_ACT_QUANT_ROWS")}
    graphs = getattr(runner, "_graphs", None)
    if graphs is not None:  # which decode-graph scheme ran (full-step or piecewise)
        res["decode_graphs"] = "full-step" if graphs.full else "piecewise"
        if graphs.failed:  # batch buckets whose capture failed (they ran eagerly): bucket -> why
            res["decode_graphs_failed"] = {str(b): why[:300] for b, why in sorted(graphs.failed.items())}
    else:  # none enabled, or captures failed in MAX_CAPTURE_FAILURES buckets (every step eager)
        res["decode_graphs"] = "none"
    if device == "cuda" and step_profile:
        try:
            res.update(_decode_step_profile(eng, runner, batch, in_len, seed))
        except Exception as e:  # noqa: BLE001 - a diagnostic, never fails the benchmark
            res["step_profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return res


def tuning_counts() -> Dict[str, int]:
    """How many tuned choices each tuner holds (backend choice, Triton GEMM configs, KV4 attention
    launch configs); a difference across a timed run = tuning (and compiling) inside it."""
    out = {}
    try:
        from .. import autotune

        out["backend_choices"] = len(autotune._CACHE)
    except Exception:  # noqa: BLE001 - a diagnostic only
        pass
    for name, mod, attr in (("gemm_configs", "cometq.kernels.w4ax_gemm", "_CONFIG_CACHE"),
                            ("kv4_attention_configs", "cometq.kernels.kv4_attention", "_TUNED"),
                            ("cuda_gemm_splits", "cometq._cuda_split", "_CACHE"),
                            ("kv4_attention_backend", "cometq._cuda_register", "_ATTN_CHOICE")):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, attr):
            out[name] = len(getattr(m, attr))
    return out


def linear_route_choices() -> Dict[str, Dict]:
    """The linear route the tuner kept per case (``cometq.ops.w4ax_linear_eager``: "split",
    "fused", "w16" or "fp8"), keys ``"M=8192 N=28672 K=4096 ..."``, values ``{"choice": route,
    "ms": {route: time}}`` (+ ``"skipped"``: a candidate that raised) -- the prefill steps' routes (the fp8 one included) and the decode
    steps' (split / w16); empty when nothing was tuned."""
    try:
        from .. import autotune
    except Exception:  # noqa: BLE001 - a diagnostic only
        return {}
    out = {}
    for r in autotune.report():
        if r["op"] == "w4ax_linear_route":
            key = " ".join(f"{k}={v}" for k, v in r["key"].items())
            out[key] = {"choice": r["choice"], "ms": {b: round(t, 4) for b, t in r["times_ms"].items()}}
            if r.get("skipped"):  # a candidate that raised while timed, and why
                out[key]["skipped"] = r["skipped"]
    return out


def cuda_gemm_choices() -> Dict[str, List[int]]:
    """The CUDA GEMM tuner's kept ``(split, tile)`` per key (``cometq._cuda_split``: M, N, K blocks,
    INT8 blocks, group, asym, block-major, timing mode), keys as ``"M=64 N=4096 ..."`` strings --
    the w16 GEMM's as ``"w16 M=64 N=4096 ... dtype=float16 bias=False"`` (its tiles 4-8 are the
    wgmma kernel); empty when the CUDA backend never ran."""
    m = sys.modules.get("cometq._cuda_split")
    if m is None:
        return {}
    names = ("M", "N", "blocks", "int8", "group", "asym", "block_major", "mode")
    out = {}
    for k, c in sorted(m._CACHE.items(), key=repr):
        if k and k[0] == "w16":
            label = "w16 " + " ".join(f"{n}={v}" for n, v in zip(names + ("dtype", "bias"), k[1:]))
            out[label.replace("torch.", "")] = list(c)
        else:
            out[" ".join(f"{n}={v}" for n, v in zip(names, k))] = list(c)
    return out


def step_breakdown(step_s: List[float], shapes: List[tuple], k: int = 8) -> Dict:
    """Steps with prefill tokens vs decode-only steps: count and total ms, and the ``k`` slowest
    steps with their shape (``decode`` sequences, ``prefill`` chunks, prefill ``tokens``)."""
    pre = [t for t, sh in zip(step_s, shapes) if sh[2] > 0]
    dec = [t for t, sh in zip(step_s, shapes) if sh[2] == 0]
    slow = sorted(range(len(step_s)), key=lambda i: -step_s[i])[:k]
    res = {"prefill_steps": len(pre), "prefill_steps_ms": sum(pre) * 1e3,
           "decode_only_steps": len(dec), "decode_only_steps_ms": sum(dec) * 1e3,
           "slowest_steps": [{"index": i, "ms": round(step_s[i] * 1e3, 2), "decode": shapes[i][0],
                              "prefill": shapes[i][1], "tokens": shapes[i][2]} for i in slow]}
    if dec:
        # the decode-only steps' spread: H100 run 7's averaged 10.0 ms where their median was ~9 ms
        # and the profiled steps 8.4 ms -- a tail (or a drift with context length) to find; the
        # slowest of them and the mean of each tenth of the run, in order
        srt = sorted(dec)
        q = lambda f: round(srt[min(len(srt) - 1, int(f * len(srt)))] * 1e3, 3)  # noqa: E731
        idx = [i for i, sh in enumerate(shapes) if sh[2] == 0]
        tenth = max(1, len(idx) // 10)
        res["decode_only_ms_quantiles"] = {"p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
                                           "max": round(srt[-1] * 1e3, 3)}
        res["decode_only_ms_by_tenth"] = [round(sum(step_s[i] for i in idx[j:j + tenth]) / len(idx[j:j + tenth]) * 1e3,
                                                3) for j in range(0, len(idx), tenth)]
        res["slowest_decode_only_steps"] = [{"index": i, "ms": round(step_s[i] * 1e3, 2), "decode": shapes[i][0]}
                                            for i in sorted(idx, key=lambda i: -step_s[i])[:k]]
    return res


def _decode_step_profile(eng, runner, batch: int, in_len: int, seed: int, steps: int = 6,
                         device: str = "cuda", prefill_profile_steps: int = 3) -> Dict:
    """Is a decode step host-bound?  A fresh batch is prefilled, then ``steps`` decode steps run
    under ``torch.profiler``: wall time per step vs the summed duration of the GPU kernels in it
    (busy time).  Busy much below wall = the GPU waits for Python (launches, bookkeeping)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .sampling import SamplingParams

    sp = SamplingParams(max_tokens=2 * steps + 3, temperature=0, ignore_eos=True)
    for p in _prompts(runner.vocab_size, batch, in_len, seed + 2):
        eng.add_request(p, sp)
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    # the fresh batch's first prefill steps, each profiled on its own: step 0 is prefill chunks
    # only, step 1 adds the first decode rows, step 2 (when the token budget splits a prompt)
    # a continued chunk -- H100 run 7's W4Ax steps of the third kind took ~90 ms more than the
    # first two (343-386 vs 248 ms), its FP16 engine's did not
    pre_steps = []
    while eng.has_work() and len(pre_steps) < prefill_profile_steps:
        with profile(activities=acts) as pprof:
            t0 = time.monotonic()
            eng.step()
            _sync(device)
            pwall = time.monotonic() - t0
        pbusy_us, _, pby_name = _gpu_kernel_times(pprof)
        pre_steps.append({"shape": list(eng.last_step_shape), "wall_ms": pwall * 1e3, "gpu_busy_ms": pbusy_us / 1e3,
                          "top_kernels": top_kernels(pby_name, 1)})
        if not eng.last_step_shape[1]:
            break  # a decode-only step: the prefill is over
    while eng.has_work() and any(not r.output_ids for r in eng.requests.values()):
        eng.step()  # (the rest of the prefill under the token budget)
    eng.step()
    _sync(device)
    n = 0
    with profile(activities=acts) as prof:
        t0 = time.monotonic()
        while eng.has_work() and n < steps:
            eng.step()
            n += 1
        _sync(device)
        wall = time.monotonic() - t0
    busy_us, kernels, by_name = _gpu_kernel_times(prof)
    # GPU-side per-step figures: divided by the steps whose kernels the window holds.  With
    # full-step graphs that is the number of graph launches in it: async scheduling queues each
    # step one ahead, and H100 run 7's window of 6 steps held 5 replays (its busy time per step,
    # 7.03 ms, was 5/6 of the real 8.4 ms: the step was GPU-bound, not gap-bound)
    gpu_steps = n
    graphs = getattr(runner, "_graphs", None)
    if graphs is not None and graphs.full:
        launches = sum(1 for e in prof.events() if e.name == "cudaGraphLaunch")
        gpu_steps = launches or n
    # host side: the CPU ops with the most self time (what the GPU waits for when busy < wall)
    cpu_ops: Dict[str, List[float]] = {}
    try:
        for a in prof.key_averages():
            us = getattr(a, "self_cpu_time_total", 0.0)
            if us > 0 and getattr(a, "device_type", None) != torch.autograd.DeviceType.CUDA:
                cpu_ops[a.key[:120]] = [us, a.count]
    except Exception:  # noqa: BLE001 - a diagnostic only
        pass
    # Python side: a few more decode steps under cProfile (functions by own time; the
    # interpreter's overhead inflates them alike, so the shares are what to read)
    py_funcs: Dict[str, List[float]] = {}
    n_py = 0
    try:
        import cProfile
        import pstats

        cp = cProfile.Profile()
        cp.enable()
        while eng.has_work() and n_py < steps:
            eng.step()
            n_py += 1
        _sync(device)
        cp.disable()
        for (fname, line, func), (_cc, ncalls, tottime, _ct, _callers) in pstats.Stats(cp).stats.items():
            if tottime > 0:
                key = f"{os.path.basename(fname)}:{line}({func})"[:120]
                py_funcs[key] = [tottime * 1e6, ncalls]
    except Exception:  # noqa: BLE001 - a diagnostic only
        pass
    while eng.has_work():
        eng.step()
    n, gpu_steps = max(n, 1), max(gpu_steps, 1)
    return {"decode_step_wall_ms": wall / n * 1e3, "decode_step_gpu_busy_ms": busy_us / gpu_steps / 1e3,
            "decode_step_kernels": kernels / gpu_steps, "decode_step_profiled": n, "decode_step_gpu_steps": gpu_steps,
            "decode_step_top_kernels": top_kernels(by_name, gpu_steps),
            "decode_step_top_cpu_ops": top_kernels(cpu_ops, n, k=10),
            "decode_step_top_python": top_kernels(py_funcs, max(n_py, 1), k=12),
            "prefill_steps_profiled": pre_steps}


def _gpu_kernel_times(prof):
    """``(busy us, kernel count, {name: [us, count]})`` of the CUDA events of a profile."""
    import torch

    busy_us, kernels = 0.0, 0
    by_name: Dict[str, List[float]] = {}
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            us = e.time_range.elapsed_us()
            busy_us += us
            kernels += 1
            agg = by_name.setdefault(e.name[:120], [0.0, 0])
            agg[0] += us
            agg[1] += 1
    return busy_us, kernels, by_name


def top_kernels(by_name: Dict[str, List[float]], steps: int, k: int = 15) -> List[Dict]:
    """The ``k`` entries (kernels, or CPU ops) with the most time: name, ms per step, launches
    (calls) per step, share of the total (where a decode step's time goes)."""
    total = sum(v[0] for v in by_name.values()) or 1.0
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:k]
    return [{"name": name, "ms_per_step": us / steps / 1e3, "launches_per_step": cnt / steps,
             "share": us / total} for name, (us, cnt) in rows]


def run_hf_generate(model, *, batch: int, in_len: int, out_len: int, device: str, seed: int) -> Dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            if scores.is_cuda:  # the logits of this step must exist before we stamp the time
                torch.cuda.synchronize()
            self.times.append(time.monotonic())
            return scores

    ids = torch.tensor(_prompts(model.config.vocab_size, batch, in_len, seed), device=device)
    kw = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids[:1, :16], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        _sync(device)
        clock = _Clock()
        t0 = time.monotonic()
        out = model.generate(ids, logits_processor=LogitsProcessorList([clock]), **kw)
        _sync(device)
        wall = time.monotonic() - t0
    if out.shape[1] != in_len + out_len:
        raise RuntimeError(f"hf generate produced {out.shape[1] - in_len} tokens, wanted {out_len}")
    first = clock.times[0] - t0  # logits of the first token exist after prefill (sync is implicit on CPU)
    tpot = (wall - first) / max(1, out_len - 1)
    return _summ([first] * batch, [tpot] * batch, wall, batch, in_len, out_len)


def run_bench(args, progress=None) -> Dict:
    """Run every (batch, system); ``progress(result_so_far)`` after each row (the caller writes
    partial results: a time-capped GPU run keeps what finished)."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    if args.quick:
        batches, in_len, out_len = [1, 4], 32, 16
    else:
        batches = [1, 4, 16, 64] if gpu else [1, 4, 8]
        in_len, out_len = (1024, 512) if gpu else (64, 32)
    if args.batch_sizes:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    in_len = args.input_len or in_len
    out_len = args.output_len or out_len
    budget = args.max_num_batched_tokens or (8192 if gpu else 512)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    parsed = {s: parse_system(s) for s in systems}  # (ValueError on a bad name or format)
    if not gpu and any(_split_apc(parsed[s][0])[0].endswith(_GRAPH_SUFFIXES) for s in systems):
        raise ValueError("the +graphs / +piecewise systems need a CUDA device")
    for name, v in (("input-len", in_len), ("output-len", out_len), ("block-size", args.block_size)):
        if v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    shared = getattr(args, "shared_prefix", 0) or 0
    if not 0 <= shared <= in_len:
        raise ValueError(f"--shared-prefix must be in [0, input-len={in_len}], got {shared}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    _log(f"loading model on {device} ...")
    model, tok, model_name = _load(args.model, device, args.quick)
    qmodels = {}  # weight format (W4AxConfig kwargs, as a sorted tuple) -> quantized copy
    formats = list(dict.fromkeys(tuple(sorted(parsed[s][1].items())) for s in systems
                                 if s.startswith("cometq-w4ax-kv4")))
    for fmt in formats:
        from .. import W4AxConfig, quantize_
        from ..nn import set_fast_path

        _log(f"quantizing (W4Ax, FMPQ{', ' + str(dict(fmt)) if fmt else ''}) ...")
        t = time.time()
        # the last format may take the model itself when no system needs it unquantized
        only_w4ax = all(s.startswith("cometq-w4ax-kv4") for s in systems)
        qmodel = model if (only_w4ax and fmt == formats[-1]) else copy.deepcopy(model)
        calib = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(1))
        quantize_(qmodel, W4AxConfig(**dict(fmt)), calib_data=calib.to(device))
        if not gpu:
            set_fast_path(qmodel, True)
        qmodels[fmt] = qmodel
        _log(f"quantized in {time.time() - t:.1f} s")
    rows = []
    for b in batches:  # systems interleaved per batch size: slow drift of a shared machine hits all alike
        for system in systems:
            _log(f"{system}: batch {b}, {in_len} in / {out_len} out ...")
            try:
                if system == "hf-generate":
                    r = run_hf_generate(model, batch=b, in_len=in_len, out_len=out_len, device=device, seed=args.seed)
                else:
                    base, fmt = parsed[system]
                    base, apc = _split_apc(base)
                    kv4 = base.startswith("cometq-w4ax-kv4")
                    r = run_engine(qmodels[tuple(sorted(fmt.items()))] if kv4 else model, kv4=kv4, batch=b,
                                   in_len=in_len, out_len=out_len,
                                   block_size=args.block_size, budget=budget, device=device, seed=args.seed,
                                   cuda_graphs="piecewise" if base.endswith("+piecewise")
                                   else base.endswith(("+graphs", "+graphs-sync")),
                                   async_scheduling=not base.endswith("-sync"),
                                   prefix_caching=apc, shared_prefix=shared,
                                   # the graph systems only: the eager ones are host-bound by design
                                   step_profile=base.endswith(_GRAPH_SUFFIXES) and not getattr(args, "no_step_profile",
                                                                                        False))
            except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
                _log(f"  out of memory: {e}")
                torch.cuda.empty_cache()
                r = {"batch": b, "input_len": in_len, "output_len": out_len, "error": "out of memory"}
            except Exception as e:  # noqa: BLE001 - one failing system (e.g. a graph capture) must not cost the others
                import traceback

                traceback.print_exc()
                r = {"batch": b, "input_len": in_len, "output_len": out_len,
                     "error": f"{type(e).__name__}: {str(e)[:300]}"}
            r["system"] = system
            rows.append(r)
            if progress is not None:
                progress(_result(model_name, device, gpu, model, args, budget, rows))
            if "error" not in r:
                _log(f"  {r['output_tokens_per_s']:.1f} out tok/s, TTFT {r['ttft_mean_s'] * 1e3:.1f} ms, "
                     f"TPOT {r['tpot_mean_s'] * 1e3:.1f} ms")
    return _result(model_name, device, gpu, model, args, budget, rows)


def _result(model_name, device, gpu, model, args, budget, rows) -> Dict:
    import torch

    dev_name = torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine()
    return {"model": model_name, "device": device, "device_name": dev_name, "dtype": str(model.dtype),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": bool(args.quick),
            "block_size": args.block_size, "max_num_batched_tokens": budget, "results": list(rows)}


def markdown(res: Dict) -> str:
    lines = [f"model {res['model']} ({res['dtype']}), {res['device']} {res['device_name']}",
             "", "| system | batch | in/out | out tok/s | total tok/s | TTFT mean (ms) | TTFT p90 (ms) | TPOT (ms) "
             "| decode step wall / GPU busy (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['batch']} | {r['input_len']}/{r['output_len']} | {r['error']} "
                         "| | | | | |")
            continue
        prof = (f"{r['decode_step_wall_ms']:.2f} / {r['decode_step_gpu_busy_ms']:.2f}"
                if "decode_step_wall_ms" in r else "–")
        dg = r.get("decode_graphs")
        label = r["system"] + (f" ({dg})" if dg not in (None, "none") else
                               " (eager decode)" if dg == "none" and "+graphs" in r["system"] else "")
        if r.get("decode_graphs_failed"):
            label += f" [eager buckets {', '.join(r['decode_graphs_failed'])}]"
        if r.get("async_steps"):  # decode steps queued ahead of the host (async scheduling)
            label += f" [async {r['async_steps']} steps]"
        if r.get("shared_prefix"):  # a common prompt head; +apc rows: the tokens taken from the prefix cache
            label += f" [shared prefix {r['shared_prefix']}, {r.get('prefix_hit_tokens', 0)} cached tokens used]"
        lines.append(f"| {label} | {r['batch']} | {r['input_len']}/{r['output_len']} | "
                     f"{r['output_tokens_per_s']:.1f} | {r['total_tokens_per_s']:.1f} | {r['ttft_mean_s'] * 1e3:.1f} | "
                     f"{r['ttft_p90_s'] * 1e3:.1f} | {r['tpot_mean_s'] * 1e3:.2f} | {prof} |")
    lines.append("")
    lines.append("Decode step wall / GPU busy: a fresh batch after the timed run, a few decode steps under "
                 "torch.profiler; GPU busy = summed kernel time per step (full-step graphs: per replay in the window). "
                 "Busy far below wall: the step is host-bound.")
    split = [r for r in res["results"] if "prefill_steps" in r]
    if split:
        lines += ["", "Where the timed run's wall time goes (steps with prefill tokens vs decode-only steps; "
                      "slowest steps as ms (decode seqs + prefill chunks / prefill tokens)):", "",
                  "| system | batch | prefill steps: n / s | decode-only steps: n / s | decode-only step ms "
                  "p50 / p90 / max | slowest steps | tuned inside the timed run |", "|---|---|---|---|---|---|---|"]
        for r in split:
            slow = ", ".join(f"{x['ms']:.0f} ({x['decode']}+{x['prefill']}/{x['tokens']})"
                             for x in r.get("slowest_steps", [])[:4])
            tuned = ", ".join(f"{k} +{v}" for k, v in r.get("tuned_in_timed_run", {}).items()) or "nothing"
            dq = r.get("decode_only_ms_quantiles")
            dqs = f"{dq['p50']:.2f} / {dq['p90']:.2f} / {dq['max']:.2f}" if dq else "–"
            lines.append(f"| {r['system']} | {r['batch']} | {r['prefill_steps']} / {r['prefill_steps_ms'] / 1e3:.2f} | "
                         f"{r['decode_only_steps']} / {r['decode_only_steps_ms'] / 1e3:.2f} | {dqs} | {slow} | {tuned} |")
    for r in res["results"]:
        pre = r.get("prefill_steps_profiled")
        if pre:
            lines += ["", f"The fresh batch's first steps, each profiled: {r['system']}, batch {r['batch']} (shape: "
                          "decode rows + prefill chunks / prefill tokens)", "",
                      "| step | shape | wall (ms) | GPU busy (ms) | top kernel |", "|---|---|---|---|---|"]
            for i, st in enumerate(pre):
                d, c, t = st["shape"]
                top = st["top_kernels"][0] if st["top_kernels"] else None
                lines.append(f"| {i} | {d}+{c}/{t} | {st['wall_ms']:.1f} | {st['gpu_busy_ms']:.1f} | "
                             + (f"`{top['name'][:60]}` {top['ms_per_step']:.1f} ms |" if top else "– |"))
            slow = max(pre, key=lambda st: st["wall_ms"])
            d, c, t = slow["shape"]
            lines += ["", f"Where the slowest of them goes ({d}+{c}/{t}: {slow['wall_ms']:.1f} ms wall, "
                          f"{slow['gpu_busy_ms']:.1f} ms GPU busy)", "",
                      "| kernel | ms | launches | share of busy |", "|---|---|---|---|"]
            lines += [f"| `{k['name'][:90]}` | {k['ms_per_step']:.3f} | {k['launches_per_step']:.0f} | "
                      f"{k['share'] * 100:.1f}% |" for k in slow["top_kernels"]]
        if r.get("decode_step_top_kernels"):
            lines += ["", f"Where a decode step's GPU time goes: {r['system']}, batch {r['batch']}", "",
                      "| kernel | ms / step | launches / step | share of busy |", "|---|---|---|---|"]
            lines += [f"| `{k['name'][:90]}` | {k['ms_per_step']:.3f} | {k['launches_per_step']:.1f} | "
                      f"{k['share'] * 100:.1f}% |" for k in r["decode_step_top_kernels"]]
        if r.get("decode_step_top_python"):
            lines += ["", f"Python functions of a decode step (own time under cProfile): {r['system']}, "
                          f"batch {r['batch']}", "", "| function | ms / step | calls / step | share |", "|---|---|---|---|"]
            lines += [f"| `{k['name'][:90]}` | {k['ms_per_step']:.3f} | {k['launches_per_step']:.1f} | "
                      f"{k['share'] * 100:.1f}% |" for k in r["decode_step_top_python"]]
        if r.get("decode_step_top_cpu_ops"):
            lines += ["", f"Host side of a decode step (CPU self time under the profiler): {r['system']}, "
                          f"batch {r['batch']}", "", "| CPU op | ms / step | calls / step | share |", "|---|---|---|---|"]
            lines += [f"| `{k['name'][:90]}` | {k['ms_per_step']:.3f} | {k['launches_per_step']:.1f} | "
                      f"{k['share'] * 100:.1f}% |" for k in r["decode_step_top_cpu_ops"]]
    return "\n".join(lines) + "\n"


def plot(res: Dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib not installed: no plot")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for system in dict.fromkeys(r["system"] for r in res["results"]):
        rs = [r for r in res["results"] if r["system"] == system and "error" not in r]
        axes[0].plot([r["batch"] for r in rs], [r["output_tokens_per_s"] for r in rs], marker="o", label=system)
        axes[1].plot([r["batch"] for r in rs], [r["tpot_mean_s"] * 1e3 for r in rs], marker="o", label=system)
    for ax, yl in zip(axes, ("output tokens/s", "TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (concurrent requests)")
        ax.set_ylabel(yl)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{res['model']} on {res['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    return run_and_write(build_parser().parse_args(argv))


def run_and_write(args) -> int:
    """Run the benchmark and write JSON, markdown and (if matplotlib) a PNG plot.  JSON and
    markdown are rewritten after every row, so a run stopped by a time limit keeps its rows."""
    os.makedirs(args.out, exist_ok=True)

    def write(res, final=False):
        tag = args.tag or (res["device"] + ("-quick" if args.quick else ""))
        base = os.path.join(args.out, f"serving_{tag}")
        res = dict(res, results=sorted(res["results"], key=lambda r: (ALL_SYSTEMS.index(parse_system(r["system"])[0]),
                                                                     r["system"], r["batch"])),
                   complete=final)
        with open(base + ".json", "w") as f:
            json.dump(res, f, indent=2)
        md = markdown(res)
        with open(base + ".md", "w") as f:
            f.write(md)
        if final:
            plot(res, base + ".png")
            print(md)
            _log(f"wrote {base}.json / .md")

    write(run_bench(args, progress=write), final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
