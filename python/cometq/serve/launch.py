"""Wiring: model + tokenizer -> runner -> engine -> engine thread -> HTTP server."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import List, Optional

from .engine import Engine, EngineConfig, EngineLoop
from .runner import ModelRunner
from .server import ServerConfig, ServerThread, create_app

__all__ = ["eos_ids", "build_engine", "Stack", "start_stack"]


def eos_ids(model, tokenizer) -> List[int]:
    """EOS ids from the tokenizer and the model's generation config (either may list several)."""
    out = []
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(model.config, "eos_token_id", None)):
        if src is None:
            continue
        for t in (src if isinstance(src, (list, tuple)) else [src]):
            if isinstance(t, int) and t not in out:
                out.append(t)
    return out


def build_engine(model, tokenizer, *, kv4: bool = True, num_blocks: Optional[int] = None, block_size: int = 32,
                 kv_tokens: int = 8192, max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                 max_model_len: Optional[int] = None, max_queue: int = 1024, cuda_graphs: bool = False,
                 async_scheduling: bool = True, enable_prefix_caching: bool = False, **pool_kw) -> Engine:
    """An engine over a KV4 (``kv4=True``) or full-precision paged pool.

    The pool holds ``num_blocks`` blocks of ``block_size`` tokens (default:
    enough blocks for ``kv_tokens`` tokens).  ``max_model_len`` defaults to the
    model's context capped by the pool.  ``cuda_graphs``: replay decode steps from
    CUDA graphs (:meth:`ModelRunner.enable_cuda_graphs`: one graph per step with the KV4 pool,
    piecewise otherwise; CUDA models only).  ``async_scheduling``: queue a decode step before
    reading the previous one's tokens where that applies (:class:`EngineConfig`).
    ``enable_prefix_caching``: share full KV blocks between requests by content (:class:`EngineConfig`).
    """
    if num_blocks is None:
        num_blocks = max(1, -(-kv_tokens // block_size))
    runner = ModelRunner.build(model, kv4=kv4, num_blocks=num_blocks, block_size=block_size,
                               max_seqs=max_num_seqs, **pool_kw)
    if cuda_graphs:
        runner.enable_cuda_graphs(max_batch=max_num_seqs)
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       max_model_len=max_model_len, max_queue=max_queue, async_scheduling=async_scheduling,
                       enable_prefix_caching=enable_prefix_caching)
    return Engine(runner, tokenizer, cfg, eos_token_ids=eos_ids(model, tokenizer))


@dataclass
class Stack:
    engine: Engine
    loop: EngineLoop
    server: ServerThread

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def stop(self) -> None:
        self.server.stop()
        self.loop.stop()


def start_stack(engine: Engine, tokenizer, *, host: str = "127.0.0.1", port: int = 0,
                server_config: Optional[ServerConfig] = None, log_level: str = "warning") -> Stack:
    """Start the engine thread and uvicorn in background threads (``port=0``: a free port)."""
    loop = EngineLoop(engine).start()
    try:
        srv = ServerThread(create_app(loop, tokenizer, server_config), host=host, port=port,
                           log_level=log_level).start()
    except BaseException:
        loop.stop()
        raise
    return Stack(engine, loop, srv)


def serve_forever(stack: Stack) -> None:
    """Block until Ctrl-C (or the server exits), then stop everything."""
    try:
        while stack.server._thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
    finally:
        stack.stop()
