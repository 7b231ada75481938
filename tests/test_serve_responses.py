"""OpenAI's Responses API (/v1/responses) with the official client: the same generation as the
equivalent chat request, the event stream, text formats, function calls, stored responses and
previous_response_id, errors."""
import json

import pytest
import torch

torch.set_num_threads(1)
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from cometq.serve.launch import build_engine, start_stack  # noqa: E402
from cometq.serve.server import ServerConfig  # noqa: E402
from cometq.serve.tiny import byte_tokenizer, tiny_model  # noqa: E402

MODEL = "tiny"
TIMEOUT = 60
_FN = [{"type": "function", "name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
    "additionalProperties": False}},
    {"type": "function", "name": "echo", "parameters": {"type": "object", "properties": {"s": {"type": "string"}},
                                                       "required": ["s"]}}]


@pytest.fixture(scope="module")
def stack():
    tok = byte_tokenizer()
    eng = build_engine(tiny_model(), tok, kv4=False, num_blocks=128, block_size=16, max_num_seqs=16,
                       max_num_batched_tokens=256, max_model_len=512)
    s = start_stack(eng, tok, server_config=ServerConfig(model_name=MODEL, max_prompt_tokens=400,
                                                         tool_call_parser="hermes"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def _events(stream):
    evs = list(stream)
    assert [e.sequence_number for e in evs] == list(range(len(evs)))
    return evs


def test_response_equals_chat_and_stream(client):
    """input + instructions = the chat request with a system message: the same text and usage;
    the event stream's deltas add up to the output and end with response.completed."""
    kw = dict(model=MODEL, max_output_tokens=12, temperature=0.8, extra_body={"seed": 5, "ignore_eos": True})
    r = client.responses.create(input="hello there", instructions="be brief", **kw)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "be brief"},
                                                                 {"role": "user", "content": "hello there"}],
                                          max_tokens=12, temperature=0.8, seed=5, extra_body={"ignore_eos": True})
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == chat.choices[0].message.content
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # (12 tokens, no EOS)
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, 12)
    assert r.usage.total_tokens == r.usage.input_tokens + 12 and r.instructions == "be brief"
    assert len(r.output) == 1 and r.output[0].type == "message" and r.output[0].role == "assistant"
    evs = _events(client.responses.create(input="hello there", instructions="be brief", stream=True, **kw))
    types = [e.type for e in evs]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert "".join(e.delta for e in evs if e.type == "response.output_text.delta") == r.output_text
    final = evs[-1].response
    assert final.output_text == r.output_text and final.usage.output_tokens == 12
    # a list of messages as input, content parts included
    r2 = client.responses.create(input=[{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": [{"type": "input_text", "text": "hello "},
                                                                     {"type": "input_text", "text": "there"}]}], **kw)
    assert r2.output_text == r.output_text


def test_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tag": {"type": "string", "pattern": "^[a-c]{1,3}$"}},
              "required": ["n", "tag"], "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="data", max_output_tokens=60, temperature=0.7,
                                text={"format": {"type": "json_schema", "name": "d", "schema": schema, "strict": True}},
                                extra_body={"seed": 3, "logit_bias": {str(ord("}")): 4, str(ord('"')): 3}})
    assert r.status == "completed", r.output_text
    v = json.loads(r.output_text)
    assert list(v) == ["n", "tag"] and 0 <= v["n"] <= 99 and set(v["tag"]) <= set("abc")
    assert r.text.format.type == "json_schema"


def test_function_calls_and_results(client, stack):
    """tool_choice required / named: function_call items (streamed as function_call_arguments
    events); the call and its output go back as input items; auto with the hermes parser."""
    kw = dict(model=MODEL, input="add 2 and 3", tools=_FN, max_output_tokens=120, temperature=0.8,
              extra_body={"seed": 2, "logit_bias": {str(ord("}")): 5, str(ord("]")): 5, str(ord('"')): 3}})
    r = client.responses.create(tool_choice="required", **kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and calls and all(o.status == "completed" for o in calls)
    for c in calls:
        assert c.name in ("add", "echo") and c.call_id.startswith("call_") and c.id.startswith("fc_")
        assert isinstance(json.loads(c.arguments), dict)
    one = client.responses.create(tool_choice="required", parallel_tool_calls=False, **kw)
    assert len([o for o in one.output if o.type == "function_call"]) == 1
    named = client.responses.create(tool_choice={"type": "function", "name": "add"}, **kw)
    (call,) = named.output
    assert call.type == "function_call" and call.name == "add" and set(json.loads(call.arguments)) == {"a", "b"}
    evs = _events(client.responses.create(tool_choice={"type": "function", "name": "add"}, stream=True, **kw))
    types = [e.type for e in evs]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert evs[4].arguments == call.arguments and evs[-1].response.output[0].name == "add"
    # the call and its result as input items: accepted, and the model answers
    follow = client.responses.create(model=MODEL, tools=_FN, tool_choice="none", max_output_tokens=5, input=[
        {"role": "user", "content": "add 2 and 3"},
        {"type": "function_call", "call_id": call.call_id, "name": "add", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "5"}])
    assert follow.output[0].type == "message"
    # auto: the model's own format (hermes here, forced with a guided_regex) becomes a function_call
    forced = 'ok <tool_call>{"name": "echo", "arguments": {"s": "hi"}}</tool_call>'
    import re
    auto = client.responses.create(model=MODEL, input="x", tools=_FN, max_output_tokens=120, temperature=0,
                                   extra_body={"guided_regex": re.escape(forced)})
    assert [o.type for o in auto.output] == ["message", "function_call"]
    assert auto.output[0].content[0].text == "ok " and json.loads(auto.output[1].arguments) == {"s": "hi"}
    for text in (forced, "a <tool"):  # (streamed: the held tail of a marker that never came is content too)
        kw2 = dict(model=MODEL, input="x", tools=_FN, max_output_tokens=120, temperature=0,
                   extra_body={"guided_regex": re.escape(text)})
        full = client.responses.create(**kw2)
        evs = _events(client.responses.create(stream=True, **kw2))
        assert "".join(e.delta for e in evs if e.type == "response.output_text.delta") == full.output[0].content[0].text
        final = evs[-1].response
        assert [(o.type, getattr(o, "arguments", None)) for o in final.output] == \
            [(o.type, getattr(o, "arguments", None)) for o in full.output]
    assert full.output_text == "a <tool" and len(full.output) == 1


def test_input_items_to_messages():
    """Responses input items -> chat messages: calls in a row are one assistant turn (as a model
    that calls two tools at once wrote them), outputs are tool messages."""
    from cometq.serve.responses import _messages

    calls = [{"type": "function_call", "call_id": f"call_{k}", "name": "add", "arguments": '{"a": 1}'} for k in range(2)]
    msgs = _messages([{"role": "user", "content": "q"}, *calls,
                      {"type": "function_call_output", "call_id": "call_0", "output": "3"},
                      {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "done"}]}])
    assert msgs == [{"role": "user", "content": "q"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": f"call_{k}", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
                        for k in range(2)]},
                    {"role": "tool", "tool_call_id": "call_0", "content": "3"},
                    {"role": "assistant", "content": "done"}]
    assert _messages("hi") == [{"role": "user", "content": "hi"}]


def test_store_and_previous_response_id(client, stack):
    kw = dict(model=MODEL, max_output_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    r1 = client.responses.create(input="first", **kw)
    got = client.responses.retrieve(r1.id)
    assert got.id == r1.id and got.output_text == r1.output_text
    r2 = client.responses.create(input="second", previous_response_id=r1.id, **kw)
    # the same as a chat over the whole conversation
    chat = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True},
                                          messages=[{"role": "user", "content": "first"},
                                                    {"role": "assistant", "content": r1.output_text},
                                                    {"role": "user", "content": "second"}])
    assert r2.output_text == chat.choices[0].message.content and r2.previous_response_id == r1.id
    assert r2.usage.input_tokens == chat.usage.prompt_tokens
    r3 = client.responses.create(input="x", store=False, **kw)
    resp = httpx.get(stack.base_url + f"/v1/responses/{r3.id}", timeout=TIMEOUT)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "response_not_found"


@pytest.mark.parametrize("body,status,param", [
    ({}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, 400, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input"),
    ({"input": "x", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0]"),
    ({"input": "x", "background": True}, 400, "background"),
    ({"input": "x", "reasoning": {"effort": "high"}}, 400, "reasoning"),
    ({"input": "x", "top_logprobs": 2}, 400, "top_logprobs"),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, 400, "include"),
    ({"input": "x", "text": {"format": "json"}}, 400, "text"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, 400, "text"),
    ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "x", "store": "yes"}, 400, "store"),
    ({"input": "x", "metadata": {"a": 1}}, 400, "metadata"),
    ({"input": "x", "instructions": 5}, 400, "instructions"),
    ({"input": "x", "model": "other"}, 404, "model"),
    ({"input": "x", "tools": _FN[:1], "parallel_tool_calls": "no"}, 400, "parallel_tool_calls"),
])
def test_errors(stack, body, status, param):
    resp = httpx.post(stack.base_url + "/v1/responses", timeout=TIMEOUT, json=body)
    assert resp.status_code == status and resp.json()["error"]["param"] == param, resp.text
