"""cometq serving: continuous batching over a paged (4-bit) KV cache and an OpenAI-compatible server.

* :mod:`.runner` -- :class:`ModelRunner`, a gpt-fast style forward of Llama-family HF models over a KV pool;
* :mod:`.kv`, :mod:`.kv4` -- the full-precision paged pool and the adapter over :mod:`cometq.paged`;
* :mod:`.engine` -- :class:`Engine` (scheduler, sampling, streaming outputs) and :class:`EngineLoop`;
* :mod:`.server` -- the FastAPI app (needs ``fastapi`` and ``uvicorn``); :mod:`.launch` wires it all;
* :mod:`.structured`, :mod:`.schema`, :mod:`.regex` -- constrained decoding; :mod:`.tools` -- tool-call parsers;
* :mod:`.bench`, :mod:`.loadtest` -- the serving benchmark and the loopback load test.

See docs/SERVING.md.  Importing this package does not import fastapi.
"""
_LAZY = {
    "ModelRunner": "runner", "Chunk": "runner", "Engine": "engine", "EngineConfig": "engine",
    "EngineLoop": "engine", "SamplingParams": "sampling", "PagedFPPool": "kv", "KV4PagedPool": "kv4",
    "build_engine": "launch", "start_stack": "launch", "create_app": "server", "ServerConfig": "server",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
