"""cometq.serve HTTP server: the official openai client against a live loopback server (CPU)."""
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from cometq.serve.launch import build_engine, start_stack  # noqa: E402
from cometq.serve.server import ServerConfig  # noqa: E402
from cometq.serve.tiny import byte_tokenizer, tiny_model  # noqa: E402
from cometq.testing import RUNNER_LOGPROB_ATOL, penalized_greedy_reference, prompt_logprob_reference  # noqa: E402

MODEL = "tiny"
TIMEOUT = 60


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # tiny models: OpenMP threads only spin against the engine / HTTP / client threads on a 2-core runner
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _stack(model, tok, **kw):
    scfg = kw.pop("server_config", ServerConfig(model_name=MODEL, max_prompt_tokens=200))
    eng = build_engine(model, tok, **kw)
    return start_stack(eng, tok, server_config=scfg)


@pytest.fixture(scope="module")
def stack(model, tok):
    s = _stack(model, tok, kv4=False, num_blocks=128, block_size=16, max_num_seqs=32, max_num_batched_tokens=256,
               max_model_len=256)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def _wait_idle(engine, timeout=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if engine.pool.num_used_blocks == 0 and not engine.running and not engine.waiting:
            return True
        time.sleep(0.02)
    return False


def _stream_text(stream, chat=False):
    parts, reasons = [], []
    for ch in stream:
        if not ch.choices:
            continue
        c = ch.choices[0]
        parts.append((c.delta.content or "") if chat else c.text)
        if c.finish_reason:
            reasons.append(c.finish_reason)
    return "".join(parts), reasons


def test_server_binds_loopback(stack):
    assert stack.server.host == "127.0.0.1"
    assert stack.server.server.servers[0].sockets[0].getsockname()[0] == "127.0.0.1"


def test_models_health_metrics(stack, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL  # (GET /v1/models/{id})
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other/model")
    r = httpx.get(stack.base_url + "/health", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(stack.base_url + "/metrics", timeout=TIMEOUT).text
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    for name in ("cometq_queue_depth", "cometq_kv_blocks_used", "cometq_kv_usage_ratio", "cometq_tokens_per_second",
                 "cometq_time_to_first_token_seconds_count", "cometq_generation_tokens_total",
                 "cometq_e2e_request_latency_seconds_sum"):
        assert name in vals, name
    assert vals["cometq_generation_tokens_total"] >= 3 and vals["cometq_time_to_first_token_seconds_count"] >= 1
    assert vals["cometq_kv_blocks_total"] == 128


def test_completion_stream_matches_non_stream(client):
    kw = dict(model=MODEL, prompt="Hello wörld, 日本", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 20 and full.usage.prompt_tokens == len("Hello wörld, 日本".encode())
    text, reasons = _stream_text(client.completions.create(stream=True, **kw))
    assert text == full.choices[0].text and reasons == ["length"]


def test_chat_stream_matches_non_stream(client, tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=16, temperature=0.8, seed=7, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert full.object == "chat.completion" and msg.role == "assistant"
    want_prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert full.usage.prompt_tokens == len(want_prompt)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    text, reasons = _stream_text(chunks, chat=True)
    assert text == msg.content and reasons == ["length"]


def test_continuous_usage_stats(stack):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far, ending
    at the totals of the non-streamed request."""
    body = {"model": MODEL, "prompt": "count", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", stack.base_url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        objs = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    used = [o["usage"]["completion_tokens"] for o in objs]
    assert all(o["usage"]["prompt_tokens"] == 5 for o in objs) and used == sorted(used) and used[-1] == 6
    assert [o["usage"]["total_tokens"] for o in objs] == [5 + u for u in used] and objs[-1]["choices"] == []
    r = httpx.post(stack.base_url + "/v1/completions", timeout=TIMEOUT,
                   json={**body, "stream_options": {"continuous_usage_stats": "yes"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_seed_determinism(client):
    kw = dict(model=MODEL, prompt="seeded", max_tokens=16, temperature=1.0, top_p=0.9, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=42, **kw).choices[0].text
    b = client.completions.create(seed=42, **kw).choices[0].text
    c = client.completions.create(seed=43, **kw).choices[0].text
    assert a == b and a != c


def _lp_concat(chunks):
    """The completions logprobs objects of a stream's chunks, joined (chunks without any skipped)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ch in chunks:
        lp = ch.choices[0].logprobs if ch.choices else None
        if lp is not None:
            for k in out:
                out[k] += getattr(lp, k)
    return out


def test_completion_logprobs_and_echo(client, model):
    prompt = "Hello there"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3, echo=True,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    c, n_p = full.choices[0], full.usage.prompt_tokens
    assert c.text.startswith(prompt) and full.usage.completion_tokens == 6
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_p + 6
    assert "".join(lp.tokens[:n_p]) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for tok_s, v, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert v <= 0 and top[tok_s] == v and len(top) <= 4  # 3 alternatives + the chosen token
    # the prompt's and the greedy tokens' log-probabilities are the model's own
    ids = list(prompt.encode())
    out_ids, out_lps, _ = penalized_greedy_reference(model, ids, 6)
    assert lp.token_logprobs[1:n_p] == pytest.approx(prompt_logprob_reference(model, ids), abs=RUNNER_LOGPROB_ATOL)
    assert lp.token_logprobs[n_p:] == pytest.approx(out_lps, abs=RUNNER_LOGPROB_ATOL)
    # streamed: the prompt first, then the same text and rows
    chunks = list(client.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].text == prompt
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    got = _lp_concat(chunks)
    assert got["tokens"] == lp.tokens and got["text_offset"] == lp.text_offset
    assert got["token_logprobs"][0] is None
    assert got["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:], abs=RUNNER_LOGPROB_ATOL)
    # echo alone: the prompt's text, no log-probabilities
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, echo=True)
    assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None


def test_vllm_prompt_logprobs(client, model):
    """vLLM's prompt_logprobs extension: per completions choice (per chat response), None for the
    first token, then token id -> {logprob, rank, decoded_token} with the prompt token and the top k."""
    ids = [ord(ch) for ch in "prompt scoring!"]
    logits = model(torch.tensor([ids])).logits[0].double().detach()
    lp_ref = torch.log_softmax(logits, -1)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, logprobs=1, echo=True,
                                  extra_body={"prompt_logprobs": 3})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for pos, d in enumerate(plp[1:]):
        row, tid = lp_ref[pos], ids[pos + 1]
        top = torch.topk(row, 3).indices.tolist()
        assert set(d) == {str(t) for t in top} | {str(tid)}
        assert d[str(tid)]["logprob"] == pytest.approx(float(row[tid]), abs=RUNNER_LOGPROB_ATOL)
        assert d[str(tid)]["rank"] == int((row > row[tid]).sum()) + 1 and d[str(tid)]["decoded_token"] == chr(tid)
        assert [d[str(t)]["rank"] for t in top if t != tid] == [j + 1 for j, t in enumerate(top) if t != tid]
    # echo's rows still carry `logprobs` = 1 alternative (+ the prompt token), from the same computation
    lp = r.choices[0].logprobs
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:len(ids)])
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(prompt_logprob_reference(model, ids), abs=RUNNER_LOGPROB_ATOL)
    # without echo / logprobs: only prompt_logprobs (k = 0: the prompt tokens alone); nothing else changes
    r0 = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 0})
    assert r0.choices[0].logprobs is None and r0.choices[0].text == r.choices[0].text[len(ids):]
    assert [list(d) for d in r0.choices[0].model_extra["prompt_logprobs"][1:]] == [[str(t)] for t in ids[1:]]
    assert "prompt_logprobs" not in client.completions.create(model=MODEL, prompt=ids, max_tokens=1).choices[0].model_extra
    # chat: once per response
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=2,
                                       extra_body={"prompt_logprobs": 1})
    cp = c.model_extra["prompt_logprobs"]
    assert cp[0] is None and len(cp) == c.usage.prompt_tokens and all(1 <= len(d) <= 2 for d in cp[1:])
    # errors: streaming, out of range, wrong type
    for extra in ({"prompt_logprobs": 2, "stream": True}, {"prompt_logprobs": -1}, {"prompt_logprobs": 99},
                  {"prompt_logprobs": "3"}):
        resp = httpx.post(str(client.base_url).rstrip("/") + "/completions", timeout=TIMEOUT,
                          json={"model": MODEL, "prompt": "x", "max_tokens": 1, **extra})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt_logprobs", (extra, resp.text)


def test_json_mode(client):
    """response_format json_object: a complete JSON object (the request stops at its closing brace),
    streamed = non-streamed; json_schema and unknown types are 400s naming the field."""
    bias = {str(ord('"')): 6, str(ord("}")): 6}
    kw = dict(model=MODEL, max_tokens=120, temperature=0.8, seed=5, logit_bias=bias,
              response_format={"type": "json_object"})
    r = client.chat.completions.create(messages=[{"role": "user", "content": "a JSON object please"}], **kw)
    c = r.choices[0]
    assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict), c.message.content
    chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "a JSON object please"}],
                                                 stream=True, **kw))
    assert _stream_text(chunks, chat=True) == (c.message.content, ["stop"])
    # completions (vLLM takes response_format there too; the openai client passes it as an extra field)
    ckw = {k: v for k, v in kw.items() if k != "response_format"}
    comp = client.completions.create(prompt="data:", extra_body={"response_format": {"type": "json_object"}}, **ckw)
    assert comp.choices[0].finish_reason == "stop" and isinstance(json.loads(comp.choices[0].text), dict)
    # text: the default, unconstrained
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          response_format={"type": "text"}).choices[0].message.content is not None
    for rf in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}},
               {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}},
               {"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "xml"}, "json", {}):
        resp = httpx.post(str(client.base_url).rstrip("/") + "/chat/completions", timeout=TIMEOUT,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": rf})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "response_format", (rf, resp.text)


def test_json_schema_response_format(client):
    """response_format json_schema: the output is a document of the schema (properties in order,
    required ones present), parsed and checked; streamed = non-streamed."""
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                             "tags": {"type": "array", "items": {"enum": ["x", "y", 7]}, "maxItems": 3},
                             "ok": {"type": ["boolean", "null"]}}}
    kw = dict(model=MODEL, max_tokens=150, temperature=0.7, seed=11, logit_bias={str(ord('"')): 5},
              response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                      "strict": True}})
    msgs = [{"role": "user", "content": "a person"}]
    r = client.chat.completions.create(messages=msgs, **kw)
    c = r.choices[0]
    assert c.finish_reason == "stop", c.message.content
    v = json.loads(c.message.content)
    assert list(v)[:3] == ["name", "age", "tags"] and set(v) <= {"name", "age", "tags", "ok"}
    assert isinstance(v["name"], str) and isinstance(v["age"], int) and not isinstance(v["age"], bool)
    assert len(v["tags"]) <= 3 and all(t in ("x", "y", 7) for t in v["tags"]) and v.get("ok", None) in (True, False, None)
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert _stream_text(chunks, chat=True) == (c.message.content, ["stop"])


_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]


def _tool_stream(chunks):
    """(content, {index: [id, name, arguments]}, finish reasons) of a streamed chat with tool calls."""
    content, calls, reasons = "", {}, []
    for ch in chunks:
        for c in ch.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or ():
                e = calls.setdefault(tc.index, [None, None, ""])
                e[0] = tc.id or e[0]
                e[1] = (tc.function.name if tc.function else None) or e[1]
                e[2] += (tc.function.arguments or "") if tc.function else ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    return content, calls, reasons


def test_tool_calls(client):
    """tools + tool_choice: a named function's arguments follow its parameters schema; 'required'
    returns one or more calls (finish_reason tool_calls); streamed = non-streamed."""
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    bias = {str(ord('"')): 4, str(ord("}")): 5, str(ord("]")): 5}
    kw = dict(model=MODEL, messages=msgs, tools=_TOOLS, max_tokens=200, temperature=0.8, seed=2, logit_bias=bias)
    named = dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}, **kw)
    r = client.chat.completions.create(**named)
    m, c = r.choices[0].message, r.choices[0]
    assert c.finish_reason == "stop" and m.content is None and len(m.tool_calls) == 1
    call = m.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert list(args) == ["city", "unit"] and isinstance(args["city"], str) and args["unit"] in ("C", "F")
    content, calls, reasons = _tool_stream(client.chat.completions.create(stream=True, **named))
    assert content == "" and reasons == ["stop"] and list(calls) == [0]
    assert calls[0][1] == "get_weather" and calls[0][2] == call.function.arguments and calls[0][0].startswith("call_")
    req = dict(tool_choice="required", **kw)
    r = client.chat.completions.create(**req)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        args = json.loads(call.function.arguments)
        assert (call.function.name, list(args)) in (("get_weather", ["city", "unit"]), ("add", ["a", "b"]))
    content, calls, reasons = _tool_stream(client.chat.completions.create(stream=True, **req))
    assert reasons == ["tool_calls"] and [(calls[j][1], calls[j][2]) for j in sorted(calls)] == \
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
    # a stop string cutting the array short: the raw text comes back as content, no tool_calls
    cut = client.chat.completions.create(stop=["}"], **req)
    assert cut.choices[0].message.tool_calls is None and cut.choices[0].message.content.lstrip().startswith("[")
    # a conversation holding the call and its result is accepted; tool_choice none: plain text
    hist = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\":1,\"b\":2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    r = client.chat.completions.create(model=MODEL, messages=hist, tools=_TOOLS, tool_choice="none", max_tokens=3)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content is not None


@pytest.mark.parametrize("body,param", [
    ({"tools": _TOOLS}, "tool_choice"),  # auto (the default with tools): this server has no tool-call parser
    ({"tools": _TOOLS, "tool_choice": "auto"}, "tool_choice"),
    ({"tools": _TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"},
     "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools[0]"),
    ({"tools": _TOOLS[:1] * 2, "tool_choice": "required"}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "d": {"type": "string", "format": "ipv6"}}}}}], "tool_choice": "required"}, "tools"),
    ({"tools": _TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_tool_call_errors(stack, body, param):
    resp = httpx.post(stack.base_url + "/v1/chat/completions", timeout=TIMEOUT,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **body})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    if param == "tool_choice" and "tool_choice" not in body:
        msg = resp.json()["error"]["message"]
        assert "'required'" in msg and "--enable-auto-tool-choice" in msg


def test_auto_tool_choice_with_a_parser(model, tok):
    """A server with a tool-call parser (hermes) answers tool_choice auto: the model's text (here
    forced by a guided_regex, as the tiny model would not write it) becomes tool_calls with the
    content before them, finish_reason tool_calls; streamed = non-streamed; plain text stays
    content; a call to a tool the request lacks stays content too."""
    s = _stack(model, tok, kv4=False, num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=256,
               max_model_len=256, server_config=ServerConfig(model_name=MODEL, max_prompt_tokens=200,
                                                             tool_call_parser="hermes"))
    try:
        client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        msgs = [{"role": "user", "content": "add 1 and 2"}]
        call = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        kw = dict(model=MODEL, messages=msgs, tools=_TOOLS, max_tokens=120, temperature=0)
        for tc in ({}, {"tool_choice": "auto"}):
            r = client.chat.completions.create(extra_body={"guided_regex": "Sure\\. " + re.escape(call)}, **kw, **tc)
            c = r.choices[0]
            assert c.finish_reason == "tool_calls" and c.message.content == "Sure. " and len(c.message.tool_calls) == 1
            t = c.message.tool_calls[0]
            assert t.function.name == "add" and json.loads(t.function.arguments) == {"a": 1, "b": 2}
            assert t.id.startswith("call_") and t.type == "function"
        content, calls, reasons = _tool_stream(client.chat.completions.create(
            stream=True, extra_body={"guided_regex": "Sure\\. " + re.escape(call)}, **kw))
        assert content == "Sure. " and reasons == ["tool_calls"] and list(calls) == [0]
        assert calls[0][1] == "add" and json.loads(calls[0][2]) == {"a": 1, "b": 2}
        for forced in ("just text", '<tool_call>{"name": "sub", "arguments": {}}</tool_call>'):
            r = client.chat.completions.create(extra_body={"guided_regex": re.escape(forced)}, **kw)
            assert r.choices[0].message.content == forced and r.choices[0].message.tool_calls is None
            assert r.choices[0].finish_reason == "stop"
            content, calls, reasons = _tool_stream(client.chat.completions.create(
                stream=True, extra_body={"guided_regex": re.escape(forced)}, **kw))
            assert content == forced and not calls and reasons == ["stop"]
        # parallel_tool_calls false: the first of the calls the model wrote
        two = call + '<tool_call>{"name": "get_weather", "arguments": {"city": "X", "unit": "C"}}</tool_call>'
        kw2 = {**kw, "max_tokens": 200, "extra_body": {"guided_regex": re.escape(two)}}
        for par, want in ((True, ["add", "get_weather"]), (False, ["add"])):
            r = client.chat.completions.create(parallel_tool_calls=par, **kw2)
            assert [t.function.name for t in r.choices[0].message.tool_calls] == want
            content, calls, reasons = _tool_stream(client.chat.completions.create(stream=True, parallel_tool_calls=par,
                                                                                   **kw2))
            assert [calls[j][1] for j in sorted(calls)] == want and reasons == ["tool_calls"]
        # the other modes still work beside it
        r = client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "add"}},
                                           **{**kw, "max_tokens": 60, "temperature": 0.8, "seed": 1,
                                              "logit_bias": {str(ord("}")): 6}})
        assert r.choices[0].message.tool_calls[0].function.name == "add"
    finally:
        s.stop()


def test_tools_on_completions_rejected(stack):
    resp = httpx.post(stack.base_url + "/v1/completions", timeout=TIMEOUT,
                      json={"model": MODEL, "prompt": "x", "tools": _TOOLS, "tool_choice": "required"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported_parameter"


def test_guided_choice_and_vllm_structured_outputs(client, stack):
    """vLLM's guided_choice / guided_json / structured_outputs extensions."""
    kw = dict(model=MODEL, max_tokens=20, temperature=0.9, seed=4)
    for extra in ({"guided_choice": ["red", "green", "blue"]}, {"structured_outputs": {"choice": ["red", "green"]}}):
        r = client.chat.completions.create(messages=[{"role": "user", "content": "a colour"}], extra_body=extra, **kw)
        assert r.choices[0].message.content in ("red", "green", "blue") and r.choices[0].finish_reason == "stop"
        c = client.completions.create(prompt="colour:", extra_body=extra, **kw)
        assert c.choices[0].text in ("red", "green", "blue")
    for extra in ({"guided_regex": r"\d{3}-[a-c]+"}, {"structured_outputs": {"regex": r"(ab|c)\d?"}}):
        pat = extra.get("guided_regex") or extra["structured_outputs"]["regex"]
        c = client.completions.create(prompt="code:", extra_body={**extra, "ignore_eos": False}, **kw)
        assert re.fullmatch(pat, c.choices[0].text, re.ASCII) and c.choices[0].finish_reason == "stop", c.choices[0].text
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for extra in ({"guided_json": schema}, {"structured_outputs": {"json": schema}}):
        r = client.completions.create(prompt="j:", extra_body={**extra, "logit_bias": {str(ord("}")): 5}},
                                      **{**kw, "max_tokens": 60})
        assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text)["ok"], bool)
    for body, param in (({"guided_choice": ["a"], "guided_json": schema}, "guided_choice"),
                        ({"guided_choice": ["a", "a"]}, "guided_choice"), ({"guided_choice": "a"}, "guided_choice"),
                        ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs"),
                        ({"guided_regex": "(?=a)"}, "guided_regex"), ({"guided_regex": 5}, "guided_regex"),
                        ({"structured_outputs": {"json": schema, "choice": ["a"]}}, "structured_outputs"),
                        ({"guided_json": {"type": "object", "properties": {"a": {"pattern": "x"}}}}, "guided_json")):
        resp = httpx.post(stack.base_url + "/v1/completions", timeout=TIMEOUT,
                          json={"model": MODEL, "prompt": "x", "max_tokens": 2, **body})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (body, resp.text)


def test_chat_logprobs(client):
    msgs = [{"role": "user", "content": "hi"}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens == 5
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy: the chosen is the most likely
        b = bytes(e.bytes)  # the byte tokenizer: one byte per token; text, or OpenAI's bytes: form
        try:
            want = b.decode()
        except UnicodeDecodeError:
            want = "bytes:" + "".join(f"\\x{x:02x}" for x in b)
        assert len(b) == 1 and e.token == want
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=RUNNER_LOGPROB_ATOL)
    assert client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2).choices[0].logprobs is None


def test_penalties_over_http_match_reference(client, model, tok):
    ids = [ord(ch) for ch in "abcabcabc"]
    pen = dict(repetition_penalty=1.6, frequency_penalty=0.8, presence_penalty=0.5)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, logprobs=0,
                                  frequency_penalty=pen["frequency_penalty"], presence_penalty=pen["presence_penalty"],
                                  extra_body={"ignore_eos": True, "repetition_penalty": pen["repetition_penalty"]})
    want, want_lps, _ = penalized_greedy_reference(model, ids, 10, pen["repetition_penalty"],
                                                   pen["frequency_penalty"], pen["presence_penalty"])
    plain, _, _ = penalized_greedy_reference(model, ids, 10)
    assert want != plain  # (the penalties change this continuation)
    assert r.choices[0].text == tok.decode(want)
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(want_lps, abs=RUNNER_LOGPROB_ATOL)


def test_logit_bias_and_min_tokens_over_http(client):
    r = client.completions.create(model=MODEL, prompt="bias", max_tokens=5, temperature=0,
                                  logit_bias={str(ord("Q")): 100})
    assert r.choices[0].text == "QQQQQ"
    # the EOS bias makes it the greedy choice; min_tokens keeps it out of the first 3 tokens
    eos = "<|im_end|>"
    r = client.completions.create(model=MODEL, prompt="stop", max_tokens=8, temperature=0, logit_bias={"257": 100})
    assert r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="stop", max_tokens=8, temperature=0, logit_bias={"257": 100},
                                  extra_body={"min_tokens": 3})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "stop" and eos not in r.choices[0].text


def _metric(stack, name):
    t0 = time.monotonic()
    while True:  # (the in-flight gauge drops when the engine's last output reaches the event loop)
        text = httpx.get(stack.base_url + "/metrics", timeout=TIMEOUT).text
        v = float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith(name + " ")))
        if v == 0 or time.monotonic() - t0 > 5:
            return v
        time.sleep(0.02)


def _choice_texts(chunks, n, chat=False):
    texts, reasons = [[] for _ in range(n)], [[] for _ in range(n)]
    for ch in chunks:
        for c in ch.choices:
            texts[c.index].append((c.delta.content or "") if chat else c.text)
            if c.finish_reason:
                reasons[c.index].append(c.finish_reason)
    return ["".join(t) for t in texts], reasons


def test_n_choices(stack, client):
    kw = dict(model=MODEL, prompt="choices", max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    full = client.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in full.choices] == [0, 1, 2] and full.usage.completion_tokens == 24
    assert full.usage.prompt_tokens == len(b"choices")
    # choice i samples with seed + i: each equals the single-choice request with that seed
    solo = [client.completions.create(seed=11 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in full.choices] == solo and len(set(solo)) > 1
    chunks = list(client.completions.create(n=3, seed=11, stream=True, stream_options={"include_usage": True}, **kw))
    texts, reasons = _choice_texts(chunks, 3)
    assert texts == solo and reasons == [["length"]] * 3
    assert chunks[-1].usage.completion_tokens == 24
    # chat, with log-probabilities per choice
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, n=2, max_tokens=4, temperature=0.7, seed=3,
                                          logprobs=True, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(len(c.logprobs.content) == 4 for c in chat.choices)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, n=2, max_tokens=4, temperature=0.7,
                                                 seed=3, stream=True, extra_body={"ignore_eos": True}))
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.role == "assistant") == 2
    texts, reasons = _choice_texts(chunks, 2, chat=True)
    assert texts == [c.message.content for c in chat.choices] and reasons == [["length"]] * 2
    assert _wait_idle(stack.engine) and _metric(stack, "cometq_http_requests_in_flight") == 0


def test_batched_prompts(stack, client):
    prompts = ["first prompt", "the second", [104, 105]]
    kw = dict(model=MODEL, max_tokens=5, temperature=0.9, seed=21, extra_body={"ignore_eos": True})
    full = client.completions.create(prompt=prompts, n=2, echo=True, logprobs=1, **kw)
    assert [c.index for c in full.choices] == list(range(6))
    assert full.usage.prompt_tokens == len(b"first prompt") + len(b"the second") + 2
    assert full.usage.completion_tokens == 30
    # choice p * n + i = choice i of prompt p alone
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(prompt=prompt, n=2, echo=True, logprobs=1, **kw)
        for i in range(2):
            got, want = full.choices[2 * p + i], alone.choices[i]
            assert got.text == want.text and got.text.startswith("hi" if p == 2 else prompt)
            assert got.logprobs.tokens == want.logprobs.tokens
    chunks = list(client.completions.create(prompt=prompts, n=2, stream=True, **kw))
    texts, reasons = _choice_texts(chunks, 6)
    plain = client.completions.create(prompt=prompts, n=2, **kw)
    assert texts == [c.text for c in plain.choices] and reasons == [["length"]] * 6
    bad = httpx.post(stack.base_url + "/v1/completions", json={"model": MODEL, "prompt": ["a"] * 33, "n": 2},
                     timeout=TIMEOUT)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    bad = httpx.post(stack.base_url + "/v1/completions", json={"model": MODEL, "prompt": ["a", ""]}, timeout=TIMEOUT)
    assert bad.status_code == 400 and "prompt 1" in bad.json()["error"]["message"]
    bad = httpx.post(stack.base_url + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b" * 201]},
                     timeout=TIMEOUT)
    assert bad.status_code == 400 and "prompt 1" in bad.json()["error"]["message"]
    assert _wait_idle(stack.engine) and _metric(stack, "cometq_http_requests_in_flight") == 0


def test_tokenize_detokenize_version(stack, tok):
    post = lambda path, body: httpx.post(stack.base_url + path, json=body, timeout=TIMEOUT)  # noqa: E731
    r = post("/tokenize", {"prompt": "héllo"}).json()
    assert r["tokens"] == tok("héllo", add_special_tokens=False)["input_ids"] and r["count"] == len("héllo".encode())
    assert r["max_model_len"] == stack.engine.max_model_len
    assert post("/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "héllo"}
    msgs = [{"role": "user", "content": "hi"}]
    chat = post("/tokenize", {"messages": msgs}).json()["tokens"]
    assert chat == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
    bare = post("/tokenize", {"messages": msgs, "add_generation_prompt": False}).json()["tokens"]
    assert chat[:len(bare)] == bare and len(bare) < len(chat)
    # the chat endpoint's prompt is that tokenization
    assert client_usage(stack, msgs) == len(chat)
    assert httpx.get(stack.base_url + "/version", timeout=TIMEOUT).json()["version"]
    for path, body, param in (("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "a", "messages": msgs}, "prompt"),
                              ("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {"messages": []}, "messages"),
                              ("/detokenize", {"tokens": [1, 99999]}, "tokens"), ("/detokenize", {}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens")):
        r = post(path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)


def test_chat_template_options(stack, tok):
    """vLLM's continue_final_message (a prefilled answer continues), chat_template_kwargs (more
    template variables), add_generation_prompt: the chat endpoint and /tokenize agree."""
    post = lambda path, body: httpx.post(stack.base_url + path, json=body, timeout=TIMEOUT)  # noqa: E731
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    want = tok.apply_chat_template(msgs, continue_final_message=True, tokenize=True)["input_ids"]
    assert bytes(want[-3:]) == b"Hel"  # (left open: no end-of-message token after it)
    got = post("/tokenize", {"messages": msgs, "continue_final_message": True}).json()["tokens"]
    assert got == want
    r = post("/v1/chat/completions", {"model": MODEL, "messages": msgs, "continue_final_message": True,
                                      "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want)
    for body, param in (({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
                        ({"continue_final_message": "yes"}, "continue_final_message"),
                        ({"add_generation_prompt": 1}, "add_generation_prompt"),
                        ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs"),
                        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs")):
        r = post("/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = post("/v1/chat/completions", {"model": MODEL, "messages": msgs[:1], "continue_final_message": True})
    assert r.status_code == 400 and "assistant" in r.json()["error"]["message"]
    # template variables reach the template
    from cometq.serve.protocol import parse_chat
    from cometq.serve.tiny import CHATML, byte_tokenizer

    t2 = byte_tokenizer()
    t2.chat_template = CHATML + "{% if enable_thinking %}<think>{% endif %}"
    on = parse_chat({"messages": msgs[:1], "chat_template_kwargs": {"enable_thinking": True}}, t2, 260).prompt_ids
    off = parse_chat({"messages": msgs[:1]}, t2, 260).prompt_ids
    assert on[:len(off)] == off and bytes(on[len(off):]) == b"<think>"


def client_usage(stack, msgs):
    r = httpx.post(stack.base_url + "/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 1},
                   timeout=TIMEOUT)
    return r.json()["usage"]["prompt_tokens"]


def test_raw_sse_format(stack):
    body = {"model": MODEL, "prompt": "sse", "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", stack.base_url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    objs = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert objs[-1]["choices"][0]["finish_reason"] == "length"
    assert len({o["id"] for o in objs}) == 1


def test_32_concurrent_streams_get_their_own_tokens(stack, client):
    prompts = [f"request {i}: " + "xyzw"[i % 4] * (i % 7 + 1) for i in range(32)]
    kw = dict(model=MODEL, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    solo = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    assert len(set(solo)) > 8  # prompts differ, so do their continuations
    barrier = threading.Barrier(32, timeout=TIMEOUT)

    def one(p):
        barrier.wait()
        return _stream_text(client.completions.create(prompt=p, stream=True, **kw))

    with ThreadPoolExecutor(32) as ex:
        got = list(ex.map(one, prompts))
    assert [t for t, _ in got] == solo
    assert all(r == ["length"] for _, r in got)
    assert _wait_idle(stack.engine)


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b'{"model": "tiny"}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 3}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    ("/v1/completions", b'{"prompt": "x", "n": 17}', 400, "n"),
    ("/v1/completions", b'{"prompt": ["x", 5]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": [[1, 2], [true]]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "n": 0}', 400, "n"),
    ("/v1/completions", b'{"prompt": "x", "n": 2, "best_of": 3}', 400, "best_of"),
    ("/v1/completions", b'{"prompt": "x", "stop": 5}', 400, "stop"),
    ("/v1/completions", b'{"prompt": "x", "seed": 1.5}', 400, "seed"),
    ("/v1/completions", b'{"prompt": [1, 99999]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": ""}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', 400, "stream"),
    ("/v1/completions", b'{"prompt": "x", "model": "gpt-9"}', 404, "model"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 256}', 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "y" * 201}).encode(), 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 21}', 400, "logprobs"),
    ("/v1/completions", b'{"prompt": "x", "logprobs": true}', 400, "logprobs"),
    ("/v1/completions", b'{"prompt": "x", "top_logprobs": 2}', 400, "top_logprobs"),
    ("/v1/completions", b'{"prompt": "x", "echo": "yes"}', 400, "echo"),
    ("/v1/completions", b'{"prompt": "x", "presence_penalty": 2.5}', 400, "presence_penalty"),
    ("/v1/completions", b'{"prompt": "x", "frequency_penalty": "high"}', 400, "frequency_penalty"),
    ("/v1/completions", b'{"prompt": "x", "repetition_penalty": 0}', 400, "repetition_penalty"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', 400,
     "top_logprobs"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "logprobs": 3}', 400, "logprobs"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "echo": true}', 400, "echo"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"x": 5}}', 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"1": 101}}', 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"99999": 1}}', 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": [1]}', 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "min_tokens": 3}', 400, "min_tokens"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "messages[0].role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content"),
    ("/v1/nope", b"{}", 404, None),
])
def test_bad_requests_get_openai_errors(stack, path, body, status, param):
    r = httpx.post(stack.base_url + path, content=body, headers={"content-type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_openai_client_raises_on_bad_request(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL, prompt="x" * 300, max_tokens=4)
    assert ei.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("stream,n", [(True, 1), (False, 1), (True, 3), (False, 2)])
def test_client_disconnect_frees_sequence(stack, stream, n):
    eng = stack.engine
    assert _wait_idle(eng)
    aborted, finished = eng.stats["aborted"], eng.stats["finished"]
    orig_step = eng.step
    eng.step = lambda: (time.sleep(0.02), orig_step())[1]  # a slow engine: 240 tokens take >= 5 s
    body = {"model": MODEL, "prompt": "long one", "max_tokens": 240, "temperature": 0, "ignore_eos": True,
            "stream": stream, "n": n}
    try:
        with httpx.stream("POST", stack.base_url + "/v1/completions", json=body,
                          timeout=None if stream else 0.5) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 3:
                    break  # leave mid-stream: the connection is closed on exit
        assert stream, "the non-streaming request should have timed out"
    except httpx.ReadTimeout:
        assert not stream
    try:
        assert _wait_idle(eng), (eng.pool.num_used_blocks, len(eng.running))
    finally:
        eng.step = orig_step
    assert eng.stats["aborted"] == aborted + n and eng.stats["finished"] == finished
    assert _metric(stack, "cometq_http_requests_in_flight") == 0


def test_pool_exhaustion_under_load(model, tok):
    # 10 blocks of 16 tokens for up to 16 running sequences: admission waits and preemption recomputes
    s = _stack(model, tok, kv4=False, num_blocks=10, block_size=16, max_num_seqs=16, max_num_batched_tokens=64,
               max_model_len=160)
    try:
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        prompts = [f"load {i} " + "ab" * (i % 5) for i in range(16)]
        kw = dict(model=MODEL, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
        solo = [c.completions.create(prompt=p, **kw).choices[0].text for p in prompts]

        def one(i):
            if i % 2:
                return _stream_text(c.completions.create(prompt=prompts[i], stream=True, **kw))[0]
            return c.completions.create(prompt=prompts[i], **kw).choices[0].text

        with ThreadPoolExecutor(16) as ex:
            got = list(ex.map(one, range(16)))
        assert got == solo
        assert s.engine.stats["preemptions"] > 0
        assert _wait_idle(s.engine)
    finally:
        s.stop()


def test_kv4_server_and_limits(model, tok):
    s = _stack(model, tok, kv4=True, num_blocks=16, block_size=16, group_size=16, max_num_seqs=4,
               server_config=ServerConfig(model_name=MODEL, max_concurrent_requests=2))
    try:
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        kw = dict(model=MODEL, prompt="four bit", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
        full = c.completions.create(**kw).choices[0].text
        text, _ = _stream_text(c.completions.create(stream=True, **kw))
        assert text == full and s.engine.pool.kind == "kv4"
        # concurrency limit: with the engine held busy, two streams are in flight and a third request gets 429
        eng, gate = s.engine, threading.Event()
        orig_step = eng.step
        eng.step = lambda: (gate.wait(TIMEOUT), orig_step())[1]
        in_flight = s.server.config.app.state.server_state
        body = {"model": MODEL, "prompt": "slow", "max_tokens": 50, "temperature": 0, "ignore_eos": True,
                "stream": True}
        try:
            with httpx.stream("POST", s.base_url + "/v1/completions", json=body, timeout=TIMEOUT) as r1, \
                    httpx.stream("POST", s.base_url + "/v1/completions", json=body, timeout=TIMEOUT) as r2:
                assert r1.status_code == r2.status_code == 200
                assert in_flight["in_flight"] == 2
                r3 = httpx.post(s.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x"},
                                timeout=TIMEOUT)
                assert r3.status_code == 429 and r3.json()["error"]["type"] == "rate_limit_error"
                gate.set()
                lines = [ln for ln in r1.iter_lines() if ln]
                assert lines[-1] == "data: [DONE]"
        finally:
            gate.set()
            eng.step = orig_step
        assert _wait_idle(s.engine)
        assert all(p.num_free_blocks == 16 for p in s.engine.pool.layers)
    finally:
        s.stop()


def test_n_choices_all_or_none_on_a_full_queue(model, tok):
    s = _stack(model, tok, kv4=False, num_blocks=32, block_size=16, max_queue=2)
    try:
        eng, gate = s.engine, threading.Event()
        orig_step = eng.step
        eng.step = lambda: (gate.wait(TIMEOUT), orig_step())[1]  # nothing leaves the queue meanwhile
        state = s.server.config.app.state.server_state
        aborted = eng.stats["aborted"]
        try:
            r = httpx.post(s.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 3},
                           timeout=TIMEOUT)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        finally:
            gate.set()
            eng.step = orig_step
        assert _wait_idle(eng) and eng.stats["aborted"] == aborted + 2  # the two queued choices withdrawn
        assert state["in_flight"] == 0
        ok = httpx.post(s.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2,
                                                              "max_tokens": 3}, timeout=TIMEOUT)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    finally:
        s.stop()


def test_prefix_caching_server(model, tok):
    s = _stack(model, tok, kv4=False, num_blocks=64, block_size=16, enable_prefix_caching=True)
    try:
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        system = {"role": "system", "content": "You are a terse assistant. " * 4}
        kw = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        a = c.chat.completions.create(messages=[system, {"role": "user", "content": "one"}], **kw)
        b = c.chat.completions.create(messages=[system, {"role": "user", "content": "two"}], **kw)
        a2 = c.chat.completions.create(messages=[system, {"role": "user", "content": "one"}], **kw)
        assert a2.choices[0].message.content == a.choices[0].message.content
        text = httpx.get(s.base_url + "/metrics", timeout=TIMEOUT).text
        vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
        # b and a2 take the system prompt's full blocks; a2 also its own (all but the last token's block)
        assert vals["cometq_prefix_cache_hits_total"] >= 2 * 16 * ((len(b"You are a terse assistant. ") * 4) // 16)
        assert 0 < vals["cometq_prefix_cache_hits_total"] <= vals["cometq_prefix_cache_queries_total"]
        assert b.usage.prompt_tokens == a.usage.prompt_tokens  # (usage counts the whole prompt either way)
        # n choices of a new prompt: the first computes it, the others take all its full blocks (they
        # wait for them when they arrive while it is computing them)
        n3 = c.chat.completions.create(messages=[system, {"role": "user", "content": "three"}], n=3, seed=3,
                                       **{**kw, "temperature": 0.9})
        text = httpx.get(s.base_url + "/metrics", timeout=TIMEOUT).text
        vals2 = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
        full = (n3.usage.prompt_tokens - 1) // 16 * 16
        sys_full = 16 * ((len(b"You are a terse assistant. ") * 4) // 16)  # (the first choice: cached system part)
        assert vals2["cometq_prefix_cache_hits_total"] - vals["cometq_prefix_cache_hits_total"] >= 2 * full + sys_full
        assert "cometq_prefix_cache_deferrals_total" in vals2 and len(n3.choices) == 3
    finally:
        s.stop()


def test_api_key(model, tok):
    """--api-key: /v1 routes want 'Authorization: Bearer <key>' (the openai client sends its api_key so);
    health, metrics and the tokenizer routes stay open; the key never shows in the config's repr."""
    s = _stack(model, tok, kv4=False, num_blocks=32, block_size=16,
               server_config=ServerConfig(model_name=MODEL, api_key="s3cret-key"))
    try:
        ok = openai.OpenAI(base_url=s.base_url + "/v1", api_key="s3cret-key", max_retries=0, timeout=TIMEOUT)
        r = ok.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
        chunks = list(ok.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                                 stream=True, extra_body={"ignore_eos": True}))
        assert chunks[-1].choices[0].finish_reason == "length"
        assert [m.id for m in ok.models.list().data] == [MODEL]
        for key in ("wrong", "s3cret-ke", "s3cret-key-"):
            bad = openai.OpenAI(base_url=s.base_url + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)
            with pytest.raises(openai.AuthenticationError) as ei:
                bad.completions.create(model=MODEL, prompt="hi", max_tokens=1)
            assert ei.value.status_code == 401 and ei.value.code == "invalid_api_key"
        for headers in ({}, {"Authorization": "s3cret-key"}, {"Authorization": "Basic s3cret-key"}):
            assert httpx.get(s.base_url + "/v1/models", headers=headers, timeout=TIMEOUT).status_code == 401
        assert httpx.get(s.base_url + "/v1/models", headers={"authorization": "bearer s3cret-key"},
                         timeout=TIMEOUT).status_code == 200
        assert httpx.get(s.base_url + "/health", timeout=TIMEOUT).status_code == 200
        assert httpx.get(s.base_url + "/metrics", timeout=TIMEOUT).status_code == 200
        assert httpx.post(s.base_url + "/tokenize", json={"prompt": "ab"}, timeout=TIMEOUT).status_code == 200
    finally:
        s.stop()
    assert "s3cret" not in repr(ServerConfig(api_key="s3cret-key"))
    for bad in ("", " k", 5):
        with pytest.raises(ValueError, match="api_key"):
            ServerConfig(api_key=bad)


def test_chat_default_max_tokens_fits_context(stack, tok):
    # no max_tokens: the chat default (256) is shortened to what the context (256) leaves
    r = httpx.post(stack.base_url + "/v1/chat/completions", timeout=TIMEOUT,
                   json={"messages": [{"role": "user", "content": "q" * 150}], "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    assert u["prompt_tokens"] > 150 and u["prompt_tokens"] + u["completion_tokens"] == 256


def test_engine_error_is_reported_and_server_keeps_serving(stack, client):
    runner = stack.engine.runner
    orig = runner.forward

    def boom(chunks, **kw):
        raise RuntimeError("injected failure")

    runner.forward = boom
    try:
        r = httpx.post(stack.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=TIMEOUT)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert "injected failure" in r.json()["error"]["message"]
        with httpx.stream("POST", stack.base_url + "/v1/completions", timeout=TIMEOUT,
                          json={"prompt": "x", "max_tokens": 3, "stream": True}) as s:
            lines = [ln for ln in s.iter_lines() if ln]
        assert "injected failure" in json.loads(lines[-2][6:])["error"]["message"] and lines[-1] == "data: [DONE]"
    finally:
        runner.forward = orig
    assert _wait_idle(stack.engine)
    again = client.completions.create(model=MODEL, prompt="again", max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.usage.completion_tokens == 3
    assert httpx.get(stack.base_url + "/health", timeout=TIMEOUT).status_code == 200
