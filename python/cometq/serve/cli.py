"""``cometq serve`` and ``cometq bench`` (parser entries live in cometq/cli.py, logic here)."""
from __future__ import annotations

import argparse
import os
import sys
import time

from .tools import TOOL_PARSERS

__all__ = ["add_serve_args", "cmd_serve", "add_bench_parser", "cmd_bench"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_serve_args(p: argparse.ArgumentParser, default_model: str) -> None:
    p.add_argument("--model", default=default_model,
                   help="cometq checkpoint, transformers directory, or the embedded SmolLM2-135M (default)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize an unquantized model with W4Ax (FMPQ) before serving (default: on)")
    p.add_argument("--kv4", action=argparse.BooleanOptionalAction, default=True,
                   help="4-bit paged KV cache (default: on); --no-kv4 keeps K/V in the model's dtype")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--served-model-name", default=None, help="model id reported by /v1/models")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="Jinja chat template for /v1/chat/completions: a file, or the template itself (default: "
                        "the tokenizer's; without one, a plain 'role: text' transcript)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer <key>' on the /v1 routes (default: the COMETQ_API_KEY "
                        "environment variable; none: open)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="answer chat requests with tools and tool_choice 'auto' (OpenAI's default): the model "
                        "writes calls in its own format, parsed by --tool-call-parser into tool_calls")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="the model's tool-call format (with --enable-auto-tool-choice): hermes (Hermes, Qwen), "
                        "llama3_json (Llama 3.1 / 3.2), mistral, pythonic")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences batched at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step")
    p.add_argument("--kv-tokens", type=int, default=16384, help="KV pool capacity in tokens")
    p.add_argument("--block-size", type=int, default=32, help="KV pool block size in tokens")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest accepted prompt")
    p.add_argument("--max-concurrent-requests", type=int, default=256, help="HTTP requests in flight (429 beyond)")
    p.add_argument("--serve-calib-samples", type=int, default=8, help="calibration windows for --quantize")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay decode steps from CUDA graphs (default: on for a CUDA device; one graph per step "
                        "with the KV4 pool, piecewise otherwise; captured per batch size on first use)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="never use CUDA graphs (vLLM's name for --no-cuda-graphs)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="queue each decode step before reading the previous step's tokens, so the host's "
                        "bookkeeping overlaps the GPU (with CUDA graphs and the KV4 pool, greedy batches; "
                        "same outputs either way; default: on)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=False,
                   help="share full KV blocks between requests that start with the same tokens (a chat's "
                        "system prompt is computed once; vLLM's automatic prefix caching)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="run throw-away requests at start-up so compiles, tuning and graph captures do not "
                        "stall the first users (default: on for a CUDA device)")


def load_chat_template(arg: str) -> str:
    """``--chat-template``: a file's text, or the argument itself when it is a Jinja template (vLLM's
    rule); checked to compile, so a broken template fails before the model loads."""
    if os.path.isfile(arg):
        with open(arg, encoding="utf-8") as f:
            text = f.read()
    elif any(m in arg for m in ("{{", "{%")):
        text = arg
    else:
        raise ValueError(f"--chat-template: {arg!r} is neither a file nor a Jinja template")
    try:
        import jinja2

        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template: not a valid Jinja template: {e}") from None
    return text


def use_cuda_graphs(args, device: str) -> bool:
    """Decode steps from CUDA graphs.  Default: on for the KV4 pool on a CUDA device (one graph per
    step; H100 run 3, batch 64: 2085 out tok/s with them, 2083 with piecewise graphs),
    off otherwise -- the full-precision pool's piecewise graphs measured SLOWER than its eager
    steps in run 3 (451 vs 1425 tok/s, unexplained), and the CPU has none.  ``--enforce-eager`` /
    ``--no-cuda-graphs`` turn them off, ``--cuda-graphs`` asks for them (a CPU device then fails
    in ``build_engine`` with a clear error)."""
    if args.enforce_eager:
        if args.cuda_graphs:
            raise ValueError("--cuda-graphs and --enforce-eager contradict each other")
        return False
    if args.cuda_graphs is None:
        return device == "cuda" and bool(args.kv4)
    return bool(args.cuda_graphs)


def _is_quantized(model) -> bool:
    from ..nn import W4AxLinear

    return any(isinstance(m, W4AxLinear) for m in model.modules())


def cmd_serve(args) -> int:
    import torch

    from ..cli import _calib, _load_any
    from .launch import build_engine, serve_forever, start_stack
    from .server import ServerConfig

    for name in ("port", "max_num_seqs", "max_num_batched_tokens", "kv_tokens", "block_size",
                 "max_concurrent_requests", "serve_calib_samples"):
        v = getattr(args, name)
        if v < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'port' else 1}, got {v}")
    # (server settings first: a bad one fails before minutes of loading and quantizing)
    name = args.served_model_name or str(args.model)
    api_key = args.api_key if args.api_key is not None else (os.environ.get("COMETQ_API_KEY") or None)
    if args.enable_auto_tool_choice != (args.tool_call_parser is not None):
        raise ValueError("--enable-auto-tool-choice and --tool-call-parser go together (vLLM's pair), got "
                         + ("only --enable-auto-tool-choice" if args.enable_auto_tool_choice
                            else f"only --tool-call-parser {args.tool_call_parser}"))
    scfg = ServerConfig(model_name=name, max_prompt_tokens=args.max_prompt_tokens,
                        max_concurrent_requests=args.max_concurrent_requests, api_key=api_key,
                        tool_call_parser=args.tool_call_parser)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        _log(f"warning: serving on {args.host} without an API key: anyone who reaches the port can use it "
             "(--api-key or COMETQ_API_KEY)")
    template = load_chat_template(args.chat_template) if args.chat_template is not None else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _log(f"loading {args.model} ...")
    model, tok = _load_any(args.model)
    if template is not None:
        tok.chat_template = template
    if device == "cuda":  # W4Ax buffers keep their dtypes: only an unquantized model is cast to fp16
        model = model.to(device) if _is_quantized(model) else model.to(device=device, dtype=torch.float16)
    if args.quantize and not _is_quantized(model):
        from .. import W4AxConfig, quantize_

        _log("quantizing with W4Ax (FMPQ) ...")
        calib = _calib(tok, 512, args.serve_calib_samples)
        quantize_(model, W4AxConfig(), calib_data=calib)
    if device == "cpu" and _is_quantized(model):
        from ..nn import set_fast_path

        set_fast_path(model, True)
    engine = build_engine(model, tok, kv4=args.kv4, block_size=args.block_size, kv_tokens=args.kv_tokens,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len, cuda_graphs=use_cuda_graphs(args, device),
                          async_scheduling=args.async_scheduling,
                          enable_prefix_caching=args.enable_prefix_caching)
    if (device == "cuda") if args.warmup is None else args.warmup:
        t = time.time()
        sizes = engine.warmup()
        _log(f"warmed up (batch sizes {sizes}) in {time.time() - t:.1f} s")
    stack = start_stack(engine, tok, host=args.host, port=args.port, server_config=scfg, log_level="info")
    _log(f"cometq serving {name!r} ({'W4Ax' if _is_quantized(model) else 'unquantized'}, "
         f"{'KV4' if args.kv4 else 'full-precision KV'}, {engine.pool.num_blocks} x {engine.pool.block_size}-token "
         f"blocks) at {stack.base_url}/v1  (Ctrl-C to stop)")
    serve_forever(stack)
    return 0


def add_bench_parser(sub) -> argparse.ArgumentParser:
    from .bench import build_parser

    return sub.add_parser("bench", parents=[build_parser(add_help=False)],
                          help="serving benchmark: throughput, TTFT, TPOT (cometq vs HF generate)",
                          description="End-to-end serving benchmark (see bench/bench_serving.py).")


def cmd_bench(args) -> int:
    from .bench import run_and_write

    return run_and_write(args)
