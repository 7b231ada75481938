"""Loopback load test of the OpenAI server: many concurrent requests, malformed ones, disconnects.

    python -m cometq.serve.loadtest --requests 1000 --concurrency 32

Starts its own server on 127.0.0.1 (a tiny random model over a small pool, so
preemption happens) unless ``--url`` points at a running one.  The mix:

* ``--malformed`` (default 10%) malformed requests (broken JSON, bad or
  out-of-range parameters, over-long prompts, unknown fields types): each must
  get a 4xx with an OpenAI error body;
* ``--disconnect`` (default 10%) streams abandoned after a few chunks;
* the rest: greedy completions / chat / Responses API requests (``/v1/responses``),
  streaming or not, a fifth of the completions and chats with ``n = 2`` choices and
  about a tenth in JSON mode (``response_format`` ``json_object``: the constraint's
  state must survive batching and preemption),
  over a fixed set of prompts whose expected text (and finish reason) is computed
  first, one request at a time: every answer (every choice) must equal its
  prompt's expected text exactly (nothing lost, nothing mixed up between
  concurrent requests or choices).

At the end the server must answer /health, and (own server) the KV pool must
be empty.  Exit status 0 only when every request checked out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from typing import Dict, List, Optional

__all__ = ["run_load_test", "main"]


def _malformed(rng: random.Random, max_prompt: int) -> tuple:
    """(path, raw body bytes) of one malformed request."""
    kind = rng.randrange(14)
    path = "/v1/completions"
    if kind == 12:
        return "/v1/responses", json.dumps({"input": rng.choice([None, [], 5, [{"type": "input_image"}]])}).encode()
    if kind == 13:
        return "/v1/responses", json.dumps({"input": "x", "background": True}).encode()
    if kind == 10:
        return path, json.dumps({"prompt": "x", "response_format": rng.choice([{"type": "json_schema"}, "json"])}).encode()
    if kind == 11:
        return path, json.dumps({"prompt": "x", "prompt_logprobs": 1, "stream": True}).encode()
    if kind == 0:
        return path, b'{"prompt": "x", "max_tokens": '
    if kind == 1:
        return path, json.dumps({"prompt": "x", "max_tokens": -rng.randrange(1, 100)}).encode()
    if kind == 2:
        return path, json.dumps({"prompt": "x", "temperature": rng.choice(["hot", 5, -1])}).encode()
    if kind == 3:
        return path, json.dumps({"prompt": "z" * (max_prompt + 1 + rng.randrange(50))}).encode()
    if kind == 4:
        return path, json.dumps({"prompt": [1, 2, 10 ** 9]}).encode()
    if kind == 5:
        return path, json.dumps({"prompt": "x", "top_p": 0}).encode()
    if kind == 6:
        return path, json.dumps({"prompt": "x", "n": rng.choice([0, 99, "3"])}).encode()
    if kind == 7:
        return "/v1/chat/completions", json.dumps({"messages": "hello"}).encode()
    if kind == 8:
        return "/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode()
    return path, b"\xff\xfe not utf8"


async def _sse_text(resp, chat: bool, n: int = 1) -> tuple:
    """([text of choice i], [finish reason of choice i]) of an SSE stream."""
    parts, reasons, done = [[] for _ in range(n)], [None] * n, False
    async for line in resp.aiter_lines():
        if not line:
            continue
        if not line.startswith("data: "):
            raise ValueError(f"bad SSE line {line[:80]!r}")
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        obj = json.loads(data)
        if "error" in obj:
            raise ValueError(f"error event {obj['error']}")
        for c in obj["choices"]:
            i = c["index"]
            parts[i].append((c["delta"].get("content") or "") if chat else c["text"])
            reasons[i] = c["finish_reason"] or reasons[i]
    if not done:
        raise ValueError("stream ended without [DONE]")
    return ["".join(p) for p in parts], reasons


async def _sse_response(resp) -> tuple:
    """(output text, final status) of a Responses event stream (``event:`` / ``data:`` pairs,
    sequence numbers in order, ending with response.completed / .incomplete)."""
    parts, final, seq = [], None, 0
    async for line in resp.aiter_lines():
        if not line or line.startswith("event: "):
            continue
        if not line.startswith("data: "):
            raise ValueError(f"bad SSE line {line[:80]!r}")
        obj = json.loads(line[6:])
        if obj.get("type") == "error":
            raise ValueError(f"error event {obj}")
        if obj.get("sequence_number") != seq:
            raise ValueError(f"sequence_number {obj.get('sequence_number')} where {seq} was due")
        seq += 1
        if obj["type"] == "response.output_text.delta":
            parts.append(obj["delta"])
        elif obj["type"] in ("response.completed", "response.incomplete"):
            final = obj["response"]
    if final is None:
        raise ValueError("stream ended without response.completed / response.incomplete")
    if final["output"][0]["content"][0]["text"] != "".join(parts):
        raise ValueError("the deltas do not add up to the final response's text")
    return "".join(parts), final["status"]


async def _run(url: str, n: int, concurrency: int, p_bad: float, p_disc: float, max_tokens: int,
               max_prompt: int, seed: int, timeout: float) -> Dict:
    import httpx

    rng = random.Random(seed)
    prompts = [f"load test prompt {i}: " + "abcdefgh"[: i % 8 + 1] for i in range(24)]
    chats = [[{"role": "user", "content": p}] for p in prompts[:8]]
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        base = {"model": None, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        models = (await client.get("/v1/models")).json()
        base["model"] = models["data"][0]["id"]
        expected_c, expected_chat = {}, {}
        for i, p in enumerate(prompts):  # reference answers, one request at a time
            r = await client.post("/v1/completions", json={**base, "prompt": p})
            r.raise_for_status()
            expected_c[i] = r.json()["choices"][0]["text"]
        for i, m in enumerate(chats):
            r = await client.post("/v1/chat/completions", json={**base, "messages": m})
            r.raise_for_status()
            expected_chat[i] = r.json()["choices"][0]["message"]["content"]
        json_mode = {"response_format": {"type": "json_object"}}
        expected_json = {}  # prompt -> (text, finish reason): JSON mode may close the object early
        for i, p in enumerate(prompts[:8]):
            r = await client.post("/v1/completions", json={**base, **json_mode, "prompt": p})
            r.raise_for_status()
            c = r.json()["choices"][0]
            expected_json[i] = (c["text"], c["finish_reason"])

        sem = asyncio.Semaphore(concurrency)
        stats = {"ok": 0, "rejected_ok": 0, "disconnected": 0, "failures": [], "latencies": []}

        async def one(k: int):
            roll = rng.random()
            async with sem:
                t0 = time.monotonic()
                try:
                    if roll < p_bad:
                        path, body = _malformed(rng, max_prompt)
                        r = await client.post(path, content=body, headers={"content-type": "application/json"})
                        err = r.json().get("error") if r.headers.get("content-type", "").startswith(
                            "application/json") else None
                        if 400 <= r.status_code < 500 and isinstance(err, dict) and err.get("message") and \
                                set(err) >= {"message", "type", "param", "code"}:
                            stats["rejected_ok"] += 1
                        else:
                            stats["failures"].append(f"#{k} malformed {body[:40]!r}: {r.status_code} {r.text[:120]}")
                        return
                    if rng.random() < 0.15:  # the Responses API: a chat prompt as input, the chat's answer
                        i = rng.randrange(len(chats))
                        body = {"model": base["model"], "input": chats[i][0]["content"], "temperature": 0,
                                "max_output_tokens": max_tokens, "ignore_eos": True}
                        if roll < p_bad + p_disc:
                            async with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
                                async for _ in r.aiter_lines():
                                    break
                            stats["disconnected"] += 1
                            return
                        if rng.random() < 0.5:
                            async with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
                                if r.status_code != 200:
                                    await r.aread()
                                    raise ValueError(f"status {r.status_code}: {r.text[:200]}")
                                text, status = await _sse_response(r)
                        else:
                            r = await client.post("/v1/responses", json=body)
                            if r.status_code != 200:
                                raise ValueError(f"status {r.status_code}: {r.text[:200]}")
                            text, status = r.json()["output"][0]["content"][0]["text"], r.json()["status"]
                        if (text, status) != (expected_chat[i], "incomplete"):
                            raise ValueError(f"wrong Responses answer for chat prompt {i}: {text!r} != "
                                             f"{expected_chat[i]!r} (status {status})")
                        stats["ok"] += 1
                        stats["latencies"].append(time.monotonic() - t0)
                        return
                    chat = rng.random() < 0.3
                    as_json = not chat and rng.random() < 0.15
                    i = rng.randrange(len(chats) if chat else len(expected_json) if as_json else len(prompts))
                    body = {**base, **({"messages": chats[i]} if chat else {"prompt": prompts[i]})}
                    n_choices = 2 if rng.random() < 0.2 else 1  # (greedy: every choice is the reference)
                    if n_choices > 1:
                        body["n"] = n_choices
                    path = "/v1/chat/completions" if chat else "/v1/completions"
                    want, want_reason = (expected_chat if chat else expected_c)[i], "length"
                    if as_json:
                        body.update(json_mode)
                        want, want_reason = expected_json[i]
                    if roll < p_bad + p_disc:  # open a stream, read a little, hang up
                        async with client.stream("POST", path, json={**body, "stream": True}) as r:
                            got = 0
                            async for line in r.aiter_lines():
                                got += bool(line)
                                if got >= rng.randrange(1, 4):
                                    break
                        stats["disconnected"] += 1
                        return
                    if rng.random() < 0.5:
                        async with client.stream("POST", path, json={**body, "stream": True}) as r:
                            if r.status_code != 200:
                                await r.aread()
                                raise ValueError(f"status {r.status_code}: {r.text[:200]}")
                            texts, reasons = await _sse_text(r, chat, n_choices)
                    else:
                        r = await client.post(path, json=body)
                        if r.status_code != 200:
                            raise ValueError(f"status {r.status_code}: {r.text[:200]}")
                        cs = r.json()["choices"]
                        if [c["index"] for c in cs] != list(range(n_choices)):
                            raise ValueError(f"choices {[c['index'] for c in cs]} for n={n_choices}")
                        texts = [c["message"]["content"] if chat else c["text"] for c in cs]
                        reasons = [c["finish_reason"] for c in cs]
                    if texts != [want] * n_choices or reasons != [want_reason] * n_choices:
                        raise ValueError(f"wrong answer for prompt {i} (chat={chat}, json={as_json}, n={n_choices}): "
                                         f"{texts!r} != "
                                         f"{want!r} (finish {reasons})")
                    stats["ok"] += 1
                    stats["latencies"].append(time.monotonic() - t0)
                except Exception as e:  # noqa: BLE001 - every failure is recorded, none stops the run
                    stats["failures"].append(f"#{k}: {type(e).__name__}: {e}")

        t0 = time.monotonic()
        await asyncio.gather(*(one(k) for k in range(n)))
        wall = time.monotonic() - t0
        health = (await client.get("/health")).status_code
        in_flight = None
        for _ in range(100):  # abandoned requests leave the in-flight count once the engine drops them
            text = (await client.get("/metrics")).text
            vals = [ln.split()[1] for ln in text.splitlines() if ln.startswith("cometq_http_requests_in_flight ")]
            in_flight = int(float(vals[0])) if vals else None
            if not in_flight:
                break
            await asyncio.sleep(0.1)
        if in_flight:
            stats["failures"].append(f"{in_flight} HTTP requests still in flight after the run")
    lat = sorted(stats["latencies"])
    return {
        "requests": n, "ok": stats["ok"], "rejected_with_error": stats["rejected_ok"],
        "disconnected": stats["disconnected"], "failures": stats["failures"], "wall_s": wall,
        "requests_per_s": n / wall, "health_status": health, "http_in_flight_after": in_flight,
        "latency_p50_s": lat[len(lat) // 2] if lat else None,
        "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "latency_mean_s": statistics.fmean(lat) if lat else None,
    }


def run_load_test(*, url: Optional[str] = None, requests: int = 1000, concurrency: int = 32, malformed: float = 0.1,
                  disconnect: float = 0.1, max_tokens: int = 8, seed: int = 0, timeout: float = 120.0,
                  num_blocks: Optional[int] = None, kv4: bool = False, torch_threads: Optional[int] = 1,
                  full_step: bool = False) -> Dict:
    """Run the load test (own tiny-model server unless ``url``); returns a report dict.

    Own server: a full-precision pool of 24 blocks (preemption under load: recomputed
    sequences continue exactly), or with ``kv4`` a 4-bit pool big enough that nothing
    is preempted and a token budget that never splits a prompt -- with 4-bit K/V the
    numerics depend on chunk boundaries (a chunk attends to its own fresh K/V but to
    earlier chunks through the 4-bit cache), so a recomputed or re-chunked request may
    legitimately continue differently from its solo run.
    ``torch_threads``: intra-op threads for the run (1 avoids OpenMP spin-waiting
    against the HTTP and client threads on small machines; None leaves it).
    ``full_step`` (with ``kv4``): decode steps take the full-step CUDA-graph path, run
    eagerly (``enable_cuda_graphs(graphs=False)``), so the engine's async scheduling -- a
    step queued before the previous one's tokens are read -- serves the load as on a GPU."""
    if full_step and not kv4:
        raise ValueError("full_step needs kv4=True (the full-step decode path is the KV4 pool's)")
    import torch

    old_threads = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    stack = None
    max_prompt = 200
    if url is None:
        from .launch import build_engine, start_stack
        from .server import ServerConfig
        from .tiny import byte_tokenizer, tiny_model

        tok = byte_tokenizer()
        if num_blocks is None:
            num_blocks = 64 if kv4 else 24
        eng = build_engine(tiny_model(), tok, kv4=kv4, num_blocks=num_blocks, block_size=16, max_num_seqs=16,
                           max_num_batched_tokens=2048 if kv4 else 128, max_model_len=256,
                           **({"group_size": 16} if kv4 else {}))
        if full_step:
            eng.runner.enable_cuda_graphs(max_batch=eng.max_num_seqs, graphs=False, full=True)
        stack = start_stack(eng, tok, server_config=ServerConfig(model_name="tiny", max_prompt_tokens=max_prompt,
                                                                 max_concurrent_requests=concurrency + 8))
        url = stack.base_url
    try:
        rep = asyncio.run(_run(url, requests, concurrency, malformed, disconnect, max_tokens, max_prompt, seed,
                               timeout))
        if stack is not None:
            eng = stack.engine
            t0 = time.monotonic()
            while (eng.pool.num_used_blocks or eng.running or eng.waiting) and time.monotonic() - t0 < 10:
                time.sleep(0.05)
            rep["kv_blocks_used_after"] = eng.pool.num_used_blocks
            rep["preemptions"] = eng.stats["preemptions"]
            rep["aborted"] = eng.stats["aborted"]
            rep["engine_alive"] = stack.loop.alive
            rep["async_steps"] = eng.async_steps
            if rep["kv_blocks_used_after"]:
                rep["failures"].append(f"{rep['kv_blocks_used_after']} KV blocks still in use after the run")
        if rep["health_status"] != 200:
            rep["failures"].append(f"/health answered {rep['health_status']}")
        rep["passed"] = not rep["failures"] and rep["ok"] + rep["rejected_with_error"] + rep["disconnected"] == requests
        return rep
    finally:
        if stack is not None:
            stack.stop()
        torch.set_num_threads(old_threads)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cometq.serve.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one on 127.0.0.1)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--malformed", type=float, default=0.1)
    p.add_argument("--disconnect", type=float, default=0.1)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--kv4", action="store_true", help="own server: 4-bit KV pool")
    p.add_argument("--full-step", action="store_true",
                   help="own --kv4 server: decode through the full-step graph path run eagerly (async scheduling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    a = p.parse_args(argv)
    rep = run_load_test(url=a.url, requests=a.requests, concurrency=a.concurrency, malformed=a.malformed,
                        disconnect=a.disconnect, max_tokens=a.max_tokens, seed=a.seed, kv4=a.kv4,
                        full_step=a.full_step)
    short = {k: v for k, v in rep.items() if k != "failures"}
    short["n_failures"] = len(rep["failures"])
    print(json.dumps(short, indent=2))
    for f in rep["failures"][:20]:
        print("FAIL", f, file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=2)
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
