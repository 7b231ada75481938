"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the cometq engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE
streaming with ``"stream": true``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text format).

Threading: the engine steps in its own thread (:class:`EngineLoop`); handlers
only parse, submit and await an ``asyncio.Queue`` that the engine thread feeds
through ``loop.call_soon_threadsafe``, so model compute never blocks the
event loop.  A client that disconnects (or whose stream is cancelled) aborts its
request, which frees its KV blocks at the engine's next step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineLoop, RequestOutput, RequestRejected
from .protocol import APIError, ParsedRequest, parse_chat, parse_completion
from .responses import ResponseStore, history_after, new_response_id, output_items, parse_responses, response_object
from .tools import TOOL_PARSERS, StreamingToolParser, parse_tool_calls
from .sampling import TokenText

__all__ = ["ServerConfig", "create_app", "ServerThread"]


class ServerConfig:
    """HTTP-level limits: prompt tokens per request, requests in flight, body size; ``api_key``:
    when set, every ``/v1`` route asks for ``Authorization: Bearer <api_key>`` (vLLM's
    ``--api-key``; ``/health``, ``/metrics``, ``/version`` and the tokenizer routes stay open);
    ``tool_call_parser``: a :data:`.tools.TOOL_PARSERS` name, which enables chat ``tool_choice:
    "auto"`` (vLLM's ``--enable-auto-tool-choice --tool-call-parser``)."""

    def __init__(self, *, model_name: str = "cometq", max_prompt_tokens: Optional[int] = None,
                 max_concurrent_requests: int = 256, max_body_bytes: int = 1 << 20,
                 disconnect_poll_s: float = 0.25, api_key: Optional[str] = None,
                 tool_call_parser: Optional[str] = None):
        if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_PARSERS)}, got {tool_call_parser!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()
                                    or api_key != api_key.strip()):
            raise ValueError("api_key must be a non-empty string without surrounding whitespace, "
                             f"got {'a ' + type(api_key).__name__ if not isinstance(api_key, str) else repr(api_key)}")
        if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
            raise ValueError(f"max_prompt_tokens must be an int >= 1 or None, got {max_prompt_tokens!r}")
        if not isinstance(max_concurrent_requests, int) or max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be an int >= 1, got {max_concurrent_requests!r}")
        self.model_name = model_name
        self.max_prompt_tokens = max_prompt_tokens
        self.max_concurrent_requests = max_concurrent_requests
        self.max_body_bytes = max_body_bytes
        self.disconnect_poll_s = disconnect_poll_s
        self.api_key = api_key
        self.tool_call_parser = tool_call_parser

    def __repr__(self) -> str:  # (never prints the key)
        return (f"ServerConfig(model_name={self.model_name!r}, max_prompt_tokens={self.max_prompt_tokens}, "
                f"max_concurrent_requests={self.max_concurrent_requests}, api_key={'set' if self.api_key else None}, "
                f"tool_call_parser={self.tool_call_parser!r})")


def _err(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class _APIKeyCheck:
    """ASGI middleware: ``/v1`` requests without ``Authorization: Bearer <key>`` get a 401 before
    any route runs (a plain ASGI wrapper, not ``BaseHTTPMiddleware``: streaming responses and
    disconnect detection pass through untouched)."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, key = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.key):
                resp = _err(APIError(401, "incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                     param=None, code="invalid_api_key"))
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


_LP_FLOOR = -9999.0  # -inf log-probabilities (a token the model rules out) as JSON can carry them (vLLM's)


def create_app(loop_: EngineLoop, tokenizer, config: Optional[ServerConfig] = None) -> FastAPI:
    cfg = config or ServerConfig()
    engine = loop_.engine
    vocab = engine.runner.vocab_size
    max_prompt = min(cfg.max_prompt_tokens or engine.max_model_len - 1, engine.max_model_len - 1)
    app = FastAPI(title="cometq", docs_url=None, redoc_url=None, openapi_url=None)
    if cfg.api_key is not None:
        app.add_middleware(_APIKeyCheck, key=cfg.api_key)
    state = {"in_flight": 0, "http_requests": 0, "http_errors": 0, "created": int(time.time())}

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request, exc):  # 404 / 405 in the OpenAI error shape
        typ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": str(exc.detail), "type": typ, "param": None,
                                       "code": str(exc.status_code)}}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _val_exc(request, exc):
        return _err(APIError(400, f"invalid request: {exc}", param=None, code="invalid_request"))

    async def _read_json(request: Request) -> Any:
        body = await request.body()
        if len(body) > cfg.max_body_bytes:
            raise APIError(413, f"request body of {len(body)} bytes exceeds {cfg.max_body_bytes}",
                           code="request_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"could not parse the JSON body: {e}", code="invalid_json")

    def _submit(pr: ParsedRequest, rid: str, aloop: asyncio.AbstractEventLoop):
        longest = max(len(p) for p in pr.prompts)
        if longest > max_prompt:
            which = "" if len(pr.prompts) == 1 else f" (prompt {[len(p) for p in pr.prompts].index(longest)})"
            raise APIError(400, f"the prompt{which} has {longest} tokens, the limit is {max_prompt}",
                           param="prompt", code="context_length_exceeded")
        room = engine.max_model_len - longest
        if not pr.max_tokens_given and pr.params.max_tokens > room >= 1:
            if room < pr.params.min_tokens:
                raise APIError(400, f"'min_tokens' ({pr.params.min_tokens}) does not fit the context: the prompt "
                               f"leaves room for {room} tokens", param="min_tokens", code="context_length_exceeded")
            pr.params = dataclasses.replace(pr.params, max_tokens=room)  # default length: fit the context
        if pr.model and pr.model != cfg.model_name:
            raise APIError(404, f"model {pr.model!r} does not exist (served: {cfg.model_name!r})",
                           type="not_found_error", param="model", code="model_not_found")
        if not loop_.alive:
            raise APIError(503, "the engine is not running", type="server_error", code="engine_down")
        # one engine request per choice (ids rid-0 .. rid-{k-1} when there are k > 1; choice p * n + i
        # is choice i of prompt p, which samples with seed + i when a seed is given), outputs
        # queued as (choice index, RequestOutput)
        q: asyncio.Queue = asyncio.Queue()
        ids = [rid] if pr.num_choices == 1 else [f"{rid}-{c}" for c in range(pr.num_choices)]
        left = [len(ids)]

        def done() -> None:  # the HTTP request is in flight until the engine is done with every choice
            left[0] -= 1
            if left[0] == 0:
                state["in_flight"] -= 1

        def callback(i: int):
            def cb(out: RequestOutput) -> None:  # engine thread
                try:
                    aloop.call_soon_threadsafe(q.put_nowait, (i, out))
                    if out.finished:
                        aloop.call_soon_threadsafe(done)
                except RuntimeError:  # event loop closed during shutdown
                    pass
            return cb

        submitted: List[str] = []
        try:
            for c, eid in enumerate(ids):
                params, i = pr.params, c % pr.n
                if i and params.seed is not None:
                    seed = params.seed + i
                    params = dataclasses.replace(params, seed=seed - 2**64 if seed >= 2**64 else seed)
                loop_.submit(pr.prompts[c // pr.n], params, callback(c), request_id=eid)
                submitted.append(eid)
        except RequestRejected as e:
            _abort(submitted)  # all choices or none (their finishes never reach left == 0)
            status = 429 if e.code == "queue_full" else 400
            raise APIError(status, str(e), type="rate_limit_error" if status == 429 else "invalid_request_error",
                           param=e.param, code=e.code)
        return q, ids

    async def _next(q: asyncio.Queue, request: Request, last_check: list) -> Optional[Tuple[int, RequestOutput]]:
        """Next (choice index, engine output), or None when the client went away (checked every poll
        interval, also while outputs keep arriving)."""
        while True:
            now = time.monotonic()
            if now - last_check[0] >= cfg.disconnect_poll_s:
                last_check[0] = now
                if await request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(q.get(), timeout=cfg.disconnect_poll_s)
            except asyncio.TimeoutError:
                continue

    async def _admitted(request: Request, run):
        """Count the request, answer 429 past the concurrency limit, else ``await run(body,
        submitted)`` with the parsed JSON body; API errors become their responses.  The request is
        in flight until ``submitted()`` hands it to the engine (whose final output then ends it) or
        it fails before that."""
        state["http_requests"] += 1
        if state["in_flight"] >= cfg.max_concurrent_requests:
            state["http_errors"] += 1
            return _err(APIError(429, f"too many concurrent requests (limit {cfg.max_concurrent_requests})",
                                 type="rate_limit_error", code="too_many_requests"))
        state["in_flight"] += 1
        sub = [False]

        def submitted() -> None:
            sub[0] = True

        try:
            return await run(await _read_json(request), submitted)
        except APIError as e:
            state["http_errors"] += 1
            return _err(e)
        finally:
            if not sub[0]:
                state["in_flight"] -= 1

    async def _handle(request: Request, chat: bool):
        async def run(body, submitted):
            try:
                pr = (parse_chat(body, tokenizer, vocab, tool_parser=cfg.tool_call_parser) if chat
                      else parse_completion(body, tokenizer, vocab))
            except ValueError as e:  # SamplingParams validation
                raise APIError(400, str(e), code="invalid_value")
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            q, eids = _submit(pr, rid, asyncio.get_running_loop())
            submitted()
            if pr.stream:
                return StreamingResponse(_stream(request, q, rid, eids, pr, chat), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return await _full(request, q, rid, eids, pr, chat)
        return await _admitted(request, run)

    # ---- log-probabilities in OpenAI's two shapes. A row: (token id, log-probability or None (the
    # prompt's first token), alternatives ((id, log-probability), ...) or None)
    token_text = TokenText(tokenizer)

    def _text(t: int) -> str:
        return token_text(t)[0]

    def _lp(v: float) -> float:
        return max(float(v), _LP_FLOOR)

    def _rows(lps) -> List[tuple]:
        return [(x.token_id, x.logprob, x.top) for x in lps or ()]

    def _prompt_rows(pr: ParsedRequest, c: int, plp) -> List[tuple]:
        """echo's rows: the prompt's first token, then each next one with ``logprobs`` alternatives
        (the engine may have computed more for ``prompt_logprobs``)."""
        k = pr.params.logprobs or 0
        return [(pr.prompts[c // pr.n][0], None, None)] + [(x.token_id, x.logprob, x.top[:k]) for x in plp[1:]]

    def _vllm_prompt_logprobs(pr: ParsedRequest, plp) -> List[Optional[Dict[str, Any]]]:
        """vLLM's ``prompt_logprobs``: None for the first token, then per token an object of token id
        -> ``{logprob, rank, decoded_token}`` holding the prompt token and the top alternatives."""
        k, out = pr.prompt_logprobs, [None]
        for x in plp[1:]:
            d = {str(x.token_id): {"logprob": _lp(x.logprob), "rank": x.rank, "decoded_token": _text(x.token_id)}}
            for r, (i, v) in enumerate(x.top[:k]):
                d.setdefault(str(i), {"logprob": _lp(v), "rank": r + 1, "decoded_token": _text(i)})
            out.append(d)
        return out

    def _echo(pr: ParsedRequest, c: int) -> str:
        return pr.prompt_texts[c // pr.n] if pr.echo else ""

    def _completion_logprobs(rows: Sequence[tuple], offset: int) -> Tuple[Dict[str, Any], int]:
        """The legacy completions object (``tokens``, ``token_logprobs``, ``top_logprobs``: the
        alternatives plus the chosen token, ``text_offset``: from ``offset`` on, the token texts'
        running length, as vLLM counts it) and the offset after it."""
        tokens, lps, tops, offs = [], [], [], []
        for tid, lp, top in rows:
            s = _text(tid)
            tokens.append(s)
            offs.append(offset)
            offset += len(s)
            if lp is None:
                lps.append(None)
                tops.append(None)
            else:
                lps.append(_lp(lp))
                d = {_text(i): _lp(v) for i, v in top}
                d.setdefault(s, _lp(lp))
                tops.append(d)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}, offset

    def _chat_logprobs(rows: Sequence[tuple]) -> Dict[str, Any]:
        def ent(tid, lp):
            s, b = token_text(tid)
            return {"token": s, "logprob": _lp(lp), "bytes": list(b)}

        return {"content": [dict(ent(t, lp), top_logprobs=[ent(i, v) for i, v in top]) for t, lp, top in rows],
                "refusal": None}

    def _usage(pr: ParsedRequest, outs: Sequence[RequestOutput]) -> Dict[str, int]:
        p, c = sum(len(x) for x in pr.prompts), sum(o.completion_tokens for o in outs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _abort(eids: Sequence[str]) -> None:
        for eid in eids:
            loop_.abort(eid)

    def _engine_error(out: RequestOutput) -> APIError:
        return APIError(500, f"generation failed: {out.error}", type="server_error", code="engine_error")

    def _call_id() -> str:
        return "call_" + uuid.uuid4().hex[:24]

    def _allowed_calls(pr: ParsedRequest, calls: list) -> list:
        """``parallel_tool_calls: false``: the first call the model wrote."""
        return calls if pr.parallel_tool_calls else calls[:1]

    def _call_objs(calls) -> List[Dict[str, Any]]:
        return [{"id": _call_id(), "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}} for name, args in calls]

    def _tool_calls(pr: ParsedRequest, text: str, reason: str):
        """(tool_calls, finish_reason) of a tool-call choice's generated text: ``named`` -- the text is
        the arguments; ``required`` -- a JSON array of {"name", "parameters"} (None when it did not
        complete: the raw text is then the content); ``auto``: :meth:`_chat_message` parses it."""
        if pr.tool_mode == "named":
            return [{"id": _call_id(), "type": "function", "function": {"name": pr.tool_name, "arguments": text}}], reason
        try:  # (a stop string or stop token may have cut the array short)
            calls = json.loads(text) if reason == "stop" else None
        except ValueError:
            calls = None
        if not isinstance(calls, list):
            return None, reason
        return _call_objs((c["name"], c["parameters"]) for c in calls), "tool_calls"

    def _chat_message(pr: ParsedRequest, text: str, reason: str):
        if pr.tool_mode is None:
            return {"role": "assistant", "content": text}, reason
        if pr.tool_mode == "auto":  # (the model's own format; plain content unless it is all calls)
            parsed = parse_tool_calls(pr.tool_parser, text, pr.tool_names)
            if parsed is None:
                return {"role": "assistant", "content": text}, reason
            return ({"role": "assistant", "content": parsed[0], "tool_calls": _call_objs(_allowed_calls(pr, parsed[1]))},
                    "tool_calls")
        calls, reason = _tool_calls(pr, text, reason)
        if calls is None:
            return {"role": "assistant", "content": text}, reason
        return {"role": "assistant", "content": None, "tool_calls": calls}, reason

    async def _full(request, q, rid, eids, pr, chat):
        n = pr.num_choices
        texts: List[List[str]] = [[] for _ in range(n)]
        rows: List[List[tuple]] = [[] for _ in range(n)]
        plps: List[Optional[list]] = [None] * n  # each choice's prompt TokenLogprobs
        last: List[Optional[RequestOutput]] = [None] * n
        left, last_check = n, [time.monotonic()]
        try:
            while left:
                item = await _next(q, request, last_check)
                if item is None:
                    _abort(eids)
                    return PlainTextResponse("", status_code=499)
                i, out = item
                if out.finished and out.finish_reason == "error":
                    _abort(eids)
                    raise _engine_error(out)
                texts[i].append(out.text)
                rows[i] += _rows(out.logprobs)
                if out.prompt_logprobs is not None:
                    plps[i] = out.prompt_logprobs
                if out.finished:
                    last[i] = out
                    left -= 1
        except asyncio.CancelledError:
            _abort(eids)
            raise
        want_lp = pr.params.logprobs is not None
        choices = []
        for i in range(n):
            reason = last[i].finish_reason if last[i].finish_reason in ("stop", "length") else "stop"
            if chat:
                msg, reason = _chat_message(pr, "".join(texts[i]), reason)
                choices.append({"index": i, "message": msg, "logprobs": _chat_logprobs(rows[i]) if want_lp else None,
                                "finish_reason": reason})
            else:
                echoed = _prompt_rows(pr, i, plps[i]) if pr.echo and plps[i] is not None else []
                lp = _completion_logprobs(echoed + rows[i], 0)[0] if want_lp else None
                choices.append({"index": i, "text": _echo(pr, i) + "".join(texts[i]), "logprobs": lp,
                                "finish_reason": reason})
                if pr.prompt_logprobs is not None:
                    choices[-1]["prompt_logprobs"] = _vllm_prompt_logprobs(pr, plps[i])
        resp = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": cfg.model_name, "choices": choices, "usage": _usage(pr, last)}
        if chat and pr.prompt_logprobs is not None:  # (one prompt: vLLM returns it once, beside the choices)
            resp["prompt_logprobs"] = _vllm_prompt_logprobs(pr, plps[0])
        return JSONResponse(resp)

    async def _stream(request, q, rid, eids, pr, chat):
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        n = pr.num_choices
        done = False
        last_check = [time.monotonic()]
        want_lp = pr.params.logprobs is not None
        pending: List[List[tuple]] = [[] for _ in range(n)]  # log-probability rows of tokens whose text is not sent
        offset = [0] * n  # completions' text_offset: characters of each choice's stream so far
        echo = [pr.echo] * n  # (completions) the prompt leads each choice's stream
        last: List[Optional[RequestOutput]] = [None] * n

        def lp_obj(i: int, rows: List[tuple]):
            if not want_lp or not rows:
                return None
            if chat:
                return _chat_logprobs(rows)
            obj_, offset[i] = _completion_logprobs(rows, offset[i])
            return obj_

        tool_text = [""] * n  # (tool calls) generated text so far
        ctoks = [0] * n  # tokens generated so far per choice (continuous usage)
        call_ids = [_call_id() for _ in range(n)] if pr.tool_mode == "named" else None
        auto = [StreamingToolParser(pr.tool_parser, pr.tool_names) for _ in range(n)] \
            if chat and pr.tool_mode == "auto" else None

        def chunk(i: int, delta_text: Optional[str], reason: Optional[str], first: bool = False,
                  rows: Optional[List[tuple]] = None, tool_calls: Optional[list] = None) -> str:
            if rows is None:
                rows, pending[i] = pending[i], []
            if chat:
                delta: Dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if tool_calls is not None:
                    delta["tool_calls"] = tool_calls
                elif delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": i, "delta": delta, "logprobs": lp_obj(i, rows), "finish_reason": reason}
            else:
                choice = {"index": i, "text": delta_text or "", "logprobs": lp_obj(i, rows), "finish_reason": reason}
            c = {"id": rid, "object": obj, "created": created, "model": cfg.model_name, "choices": [choice]}
            if pr.continuous_usage:  # (vLLM: the usage so far on every chunk)
                p, done_ = sum(len(x) for x in pr.prompts), sum(ctoks)
                c["usage"] = {"prompt_tokens": p, "completion_tokens": done_, "total_tokens": p + done_}
            elif pr.include_usage:
                c["usage"] = None
            return f"data: {json.dumps(c)}\n\n"

        try:
            if chat:
                for i in range(n):
                    yield chunk(i, "", None, first=True, rows=[])
            left = n
            while left:
                item = await _next(q, request, last_check)
                if item is None:
                    return
                i, out = item
                if out.finished and out.finish_reason == "error":
                    done = True
                    _abort(eids)
                    yield f"data: {json.dumps(_engine_error(out).body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if echo[i]:  # the prompt first, with its log-probabilities when asked
                    prows = _prompt_rows(pr, i, out.prompt_logprobs) if out.prompt_logprobs is not None else []
                    yield chunk(i, _echo(pr, i), None, rows=prows)
                    echo[i] = False
                pending[i].extend(_rows(out.logprobs))
                ctoks[i] = out.completion_tokens
                if out.text and chat and pr.tool_mode == "named":  # the arguments, streamed as they come
                    head = {"id": call_ids[i], "type": "function", "function": {"name": pr.tool_name}} \
                        if not tool_text[i] else {"function": {}}
                    head["function"]["arguments"] = out.text
                    tool_text[i] += out.text
                    yield chunk(i, None, None, tool_calls=[{"index": 0, **head}])
                elif out.text and chat and pr.tool_mode == "required":  # (sent whole once the array closes)
                    tool_text[i] += out.text
                elif out.text and auto is not None:  # content while no call can have begun
                    text = auto[i].feed(out.text)
                    if text:
                        yield chunk(i, text, None)
                elif out.text:
                    yield chunk(i, out.text, None)
                if out.finished:
                    last[i] = out
                    left -= 1
                    reason = out.finish_reason if out.finish_reason in ("stop", "length") else "stop"
                    if chat and pr.tool_mode == "required":
                        calls, reason = _tool_calls(pr, tool_text[i], reason)
                        if calls is None:
                            yield chunk(i, tool_text[i], None)
                        else:
                            yield chunk(i, None, None, tool_calls=[{"index": j, **c} for j, c in enumerate(calls)])
                    elif auto is not None:
                        rest, parsed = auto[i].finish()
                        if rest:
                            yield chunk(i, rest, None)
                        if parsed is not None:
                            reason = "tool_calls"
                            calls = _call_objs(_allowed_calls(pr, parsed))
                            yield chunk(i, None, None, tool_calls=[{"index": j, **c} for j, c in enumerate(calls)])
                    yield chunk(i, None if chat else "", reason)
            done = True
            if pr.include_usage:
                u = {"id": rid, "object": obj, "created": created, "model": cfg.model_name,
                     "choices": [], "usage": _usage(pr, last)}
                yield f"data: {json.dumps(u)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                _abort(eids)  # client went away or the stream was cancelled

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(request, chat=True)

    # ---- OpenAI's Responses API (cometq.serve.responses): a chat request underneath
    store = ResponseStore()

    async def _gather(request, q, eids) -> Optional[Tuple[str, RequestOutput]]:
        """(the whole text, the last output) of a one-choice request; None when the client left."""
        texts, last_check = [], [time.monotonic()]
        try:
            while True:
                item = await _next(q, request, last_check)
                if item is None:
                    _abort(eids)
                    return None
                out = item[1]
                if out.finished and out.finish_reason == "error":
                    _abort(eids)
                    raise _engine_error(out)
                texts.append(out.text)
                if out.finished:
                    return "".join(texts), out
        except asyncio.CancelledError:
            _abort(eids)
            raise

    def _reply(pr: ParsedRequest, text: str, out: RequestOutput):
        """(content or None, chat tool_calls or None, incomplete) of a Responses reply."""
        reason = out.finish_reason if out.finish_reason in ("stop", "length") else "stop"
        msg, _ = _chat_message(pr, text, reason)
        content = msg.get("content")
        if msg.get("tool_calls") and not (content or "").strip():
            content = None
        return content, msg.get("tool_calls"), reason == "length"

    def _finish_response(rid, created, echo, msgs, pr, text, out):
        content, calls, incomplete = _reply(pr, text, out)
        items = output_items(rid, content, calls, incomplete)
        resp = response_object(rid, created, cfg.model_name, echo, items, "incomplete" if incomplete else "completed",
                               _usage(pr, [out]))
        if echo["store"]:
            store.put(resp, history_after(msgs, content, calls))
        return resp

    @app.post("/v1/responses")
    async def responses(request: Request):
        async def run(body, submitted):
            try:
                pr, echo, msgs = parse_responses(body, tokenizer, vocab, store, tool_parser=cfg.tool_call_parser)
            except ValueError as e:  # SamplingParams validation
                raise APIError(400, str(e), code="invalid_value")
            rid, created = new_response_id(), time.time()
            q, eids = _submit(pr, rid, asyncio.get_running_loop())
            submitted()
            if pr.stream:
                return StreamingResponse(_responses_stream(request, q, rid, eids, pr, echo, msgs, created),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            got = await _gather(request, q, eids)
            if got is None:
                return PlainTextResponse("", status_code=499)
            return JSONResponse(_finish_response(rid, created, echo, msgs, pr, *got))
        return await _admitted(request, run)

    async def _responses_stream(request, q, rid, eids, pr, echo, msgs, created):
        seq = [0]

        def ev(obj: Dict[str, Any]) -> str:
            obj["sequence_number"] = seq[0]
            seq[0] += 1
            return f"event: {obj['type']}\ndata: {json.dumps(obj)}\n\n"

        msg_id = "msg_" + rid[5:]
        msg_open = [False]

        def open_message():
            msg_open[0] = True
            item = {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}
            return [ev({"type": "response.output_item.added", "output_index": 0, "item": item}),
                    ev({"type": "response.content_part.added", "item_id": msg_id, "output_index": 0,
                        "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})]

        def delta(text: str):
            out = open_message() if not msg_open[0] else []
            return out + [ev({"type": "response.output_text.delta", "item_id": msg_id, "output_index": 0,
                              "content_index": 0, "delta": text, "logprobs": []})]

        auto = StreamingToolParser(pr.tool_parser, pr.tool_names) if pr.tool_mode == "auto" else None
        done, last_check, texts = False, [time.monotonic()], []
        try:
            skeleton = response_object(rid, created, cfg.model_name, echo, [], "in_progress", None)
            yield ev({"type": "response.created", "response": skeleton})
            yield ev({"type": "response.in_progress", "response": skeleton})
            while True:
                item = await _next(q, request, last_check)
                if item is None:
                    return
                out = item[1]
                if out.finished and out.finish_reason == "error":
                    done = True
                    _abort(eids)
                    err = _engine_error(out)
                    yield ev({"type": "error", "code": err.code, "message": err.message, "param": None})
                    return
                texts.append(out.text)
                if out.text and pr.tool_mode is None:
                    for e in delta(out.text):
                        yield e
                elif out.text and auto is not None:
                    sent = auto.feed(out.text)
                    if sent:
                        for e in delta(sent):
                            yield e
                if out.finished:
                    break
            if auto is not None:  # (the rest of the content: what follows is the final reply)
                rest, _ = auto.finish()
                if rest:
                    for e in delta(rest):
                        yield e
            resp = _finish_response(rid, created, echo, msgs, pr, "".join(texts), out)
            for k, it in enumerate(resp["output"]):
                if it["type"] == "message":
                    if not msg_open[0]:  # (not streamed: a tool-call reply that fell back to text)
                        for e in open_message():
                            yield e
                        if it["content"][0]["text"]:
                            yield ev({"type": "response.output_text.delta", "item_id": msg_id, "output_index": 0,
                                      "content_index": 0, "delta": it["content"][0]["text"], "logprobs": []})
                    part = it["content"][0]
                    yield ev({"type": "response.output_text.done", "item_id": msg_id, "output_index": k,
                              "content_index": 0, "text": part["text"], "logprobs": []})
                    yield ev({"type": "response.content_part.done", "item_id": msg_id, "output_index": k,
                              "content_index": 0, "part": part})
                else:
                    yield ev({"type": "response.output_item.added", "output_index": k,
                              "item": {**it, "arguments": "", "status": "in_progress"}})
                    yield ev({"type": "response.function_call_arguments.delta", "item_id": it["id"], "output_index": k,
                              "delta": it["arguments"]})
                    yield ev({"type": "response.function_call_arguments.done", "item_id": it["id"],
                              "output_index": k, "arguments": it["arguments"]})
                yield ev({"type": "response.output_item.done", "output_index": k, "item": it})
            done = True
            yield ev({"type": "response.completed" if resp["status"] == "completed" else "response.incomplete",
                      "response": resp})
        finally:
            if not done:
                _abort(eids)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        got = store.get(response_id)
        if got is None:
            return _err(APIError(404, f"response {response_id!r} not found (kept in memory while the server runs, "
                                 f"the last {store.size} with store: true)", type="not_found_error",
                                 param="response_id", code="response_not_found"))
        return JSONResponse(got[0])

    # vLLM's token utilities: the served tokenizer (and chat template) without running the model
    @app.post("/tokenize")
    async def tokenize(request: Request):
        try:
            body = await _read_json(request)
            if not isinstance(body, dict):
                raise APIError(400, "request body must be a JSON object", code="invalid_json")
            if ("prompt" in body) == ("messages" in body):
                raise APIError(400, "give exactly one of 'prompt' (text) and 'messages' (a chat)", param="prompt",
                               code="missing_required_parameter")
            if "messages" in body:  # (the ids the chat endpoint would run, template options included)
                keep = ("messages", "add_generation_prompt", "continue_final_message", "chat_template_kwargs")
                ids = parse_chat({k: body[k] for k in keep if k in body}, tokenizer, vocab).prompt_ids
            else:
                text = body["prompt"]
                if not isinstance(text, str):
                    raise APIError(400, f"'prompt' must be a string, got {type(text).__name__}", param="prompt",
                                   code="invalid_type")
                add_special = body.get("add_special_tokens", False)
                if not isinstance(add_special, bool):
                    raise APIError(400, f"'add_special_tokens' must be a boolean, got {add_special!r}",
                                   param="add_special_tokens", code="invalid_type")
                ids = tokenizer(text, add_special_tokens=add_special)["input_ids"] if text else []
        except APIError as e:
            return _err(e)
        return {"tokens": list(ids), "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        try:
            body = await _read_json(request)
            toks = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(toks, list):
                raise APIError(400, "'tokens' must be a list of token ids", param="tokens",
                               code="missing_required_parameter" if toks is None else "invalid_type")
            bad = [t for t in toks if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"'tokens' holds values that are not token ids in [0, {vocab}): {bad[:5]}",
                               param="tokens", code="invalid_token")
        except APIError as e:
            return _err(e)
        return {"prompt": tokenizer.decode(toks)}

    @app.get("/version")
    async def version():
        from .. import __version__

        return {"version": __version__}

    def _model_card() -> Dict[str, Any]:
        return {"id": cfg.model_name, "object": "model", "created": state["created"], "owned_by": "cometq",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):  # (OpenAI's retrieve; ids may hold '/', as paths do)
        if model_id != cfg.model_name:
            return _err(APIError(404, f"model {model_id!r} does not exist (served: {cfg.model_name!r})",
                                 type="not_found_error", param="model", code="model_not_found"))
        return _model_card()

    @app.get("/health")
    async def health():
        if not loop_.alive:
            return JSONResponse({"status": "error", "error": loop_.error or "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        s = engine.snapshot()
        lines = []

        def metric(name, typ, help_, value):
            lines.extend([f"# HELP cometq_{name} {help_}", f"# TYPE cometq_{name} {typ}", f"cometq_{name} {value}"])

        metric("queue_depth", "gauge", "Requests waiting for admission.", s["waiting"])
        metric("running_requests", "gauge", "Sequences in the running batch.", s["running"])
        metric("http_requests_in_flight", "gauge", "HTTP completion requests being served.", state["in_flight"])
        metric("kv_blocks_used", "gauge", "KV pool blocks in use.", s["kv_blocks_used"])
        metric("kv_blocks_total", "gauge", "KV pool blocks.", s["kv_blocks_total"])
        metric("kv_usage_ratio", "gauge", "Fraction of KV pool blocks in use.",
               f"{s['kv_blocks_used'] / max(1, s['kv_blocks_total']):.6f}")
        metric("tokens_per_second", "gauge", "Tokens through the model per second (last 10 s).",
               f"{s['tokens_per_second']:.3f}")
        metric("prompt_tokens_total", "counter", "Prompt tokens of requests that produced a token.",
               s["prompt_tokens"])
        metric("generation_tokens_total", "counter", "Generated tokens.", s["generation_tokens"])
        metric("engine_steps_total", "counter", "Engine steps (model forwards).", s["steps"])
        metric("preemptions_total", "counter", "Sequences preempted (recomputed later) on a full KV pool.",
               s["preemptions"])
        metric("prefix_cache_queries_total", "counter", "Full-block tokens of admitted requests looked up in the "
               "prefix cache.", s["prefix_query_tokens"])
        metric("prefix_cache_hits_total", "counter", "Tokens admitted requests took from the prefix cache.",
               s["prefix_hit_tokens"])
        metric("prefix_cache_deferrals_total", "counter", "Times a waiting request was passed over to wait for "
               "prefix blocks another request was computing.", s["prefix_deferrals"])
        for k in ("finished", "aborted", "rejected", "errors"):
            metric(f"requests_{k}_total", "counter", f"Requests {k}.", s[k])
        metric("http_requests_total", "counter", "Completion HTTP requests received.", state["http_requests"])
        metric("http_errors_total", "counter", "Completion HTTP requests answered with an error.",
               state["http_errors"])
        for name, key, help_ in (("time_to_first_token_seconds", "ttft", "Arrival to first token."),
                                 ("time_per_output_token_seconds", "tpot", "Mean time between output tokens."),
                                 ("e2e_request_latency_seconds", "e2e", "Arrival to finish.")):
            lines += [f"# HELP cometq_{name} {help_}", f"# TYPE cometq_{name} summary",
                      f"cometq_{name}_sum {s[key + '_sum']:.6f}", f"cometq_{name}_count {s[key + '_count']}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    app.state.engine_loop = loop_
    app.state.server_state = state
    return app


class ServerThread:
    """uvicorn in a background thread (tests, benchmarks); ``port=0`` picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                     timeout_graceful_shutdown=2, lifespan="off")
        self.server = uvicorn.Server(self.config)
        self._thread = threading.Thread(target=self.server.run, name="cometq-http", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"uvicorn did not start on {self.host}:{self.port} within {timeout} s")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
