"""OpenAI's Responses API (``POST /v1/responses``, ``GET /v1/responses/{id}``) over the chat path.

A request is translated into a chat completion request (``input`` items -> messages,
``instructions`` -> a leading system message, flat function tools -> chat tools, ``text.format``
-> ``response_format``, ``max_output_tokens`` -> ``max_tokens``), parsed and run as one, and the
result is written back as Responses output items: an assistant ``message`` with ``output_text``,
and / or ``function_call`` items.  ``store`` (default true) keeps the response and its
conversation in memory (an LRU of :data:`STORE_SIZE`) for ``GET`` and ``previous_response_id``,
as vLLM does; nothing is written to disk.  Streams send the Responses event sequence
(``response.created`` ... ``response.completed``), each event with its ``sequence_number``.
"""
from __future__ import annotations

import collections
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from .protocol import APIError, ParsedRequest, _bad, parse_chat

__all__ = ["ResponseStore", "parse_responses", "response_object", "output_items", "STORE_SIZE"]

STORE_SIZE = 1024  # responses kept for GET / previous_response_id

# Responses fields passed on to the chat request as they are (the sampling extensions a vLLM user
# may send through ``extra_body``)
_PASS = ("model", "temperature", "top_p", "stream", "seed", "stop", "top_k", "min_tokens", "repetition_penalty",
         "presence_penalty", "frequency_penalty", "logit_bias", "ignore_eos", "guided_json", "guided_choice",
         "guided_regex", "structured_outputs", "parallel_tool_calls")
_UNSUPPORTED = {"background": (False, None), "conversation": (None,), "prompt": (None,), "reasoning": (None, {}),
                "max_tool_calls": (None,), "top_logprobs": (None, 0), "include": (None, []),
                "truncation": (None, "disabled", "auto")}
# (field -> the values that ask for nothing unsupported; truncation "auto" only differs past the
# context, where the request is a 400 naming the prompt's length instead)


class ResponseStore:
    """Stored responses: id -> (response object, the conversation's chat messages after it)."""

    def __init__(self, size: int = STORE_SIZE):
        self.size = size
        self._items: "collections.OrderedDict[str, Tuple[dict, list]]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, resp: dict, messages: list) -> None:
        with self._lock:
            self._items[resp["id"]] = (resp, messages)
            self._items.move_to_end(resp["id"])
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, rid: str) -> Optional[Tuple[dict, list]]:
        with self._lock:
            return self._items.get(rid)


def _text_parts(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, p in enumerate(content):
            if (not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text")
                    or not isinstance(p.get("text"), str)):
                raise _bad(f"{where}.content[{j}] must be a text part {{'type': 'input_text', 'text': ...}} "
                           "(images and files are not supported)", "input", "invalid_type")
            out.append(p["text"])
        return "".join(out)
    raise _bad(f"{where}.content must be a string or a list of text parts", "input", "invalid_type")


def _messages(inp) -> List[Dict[str, Any]]:
    """Chat messages of a Responses ``input`` (a string, or a list of message / function_call /
    function_call_output items)."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    if not isinstance(inp, list) or not inp:
        raise _bad("'input' must be a string or a non-empty list of input items", "input",
                   "missing_required_parameter" if inp is None else "invalid_type")
    msgs: List[Dict[str, Any]] = []
    for i, it in enumerate(inp):
        where = f"input[{i}]"
        if not isinstance(it, dict):
            raise _bad(f"{where} must be an object", "input", "invalid_type")
        t = it.get("type", "message")
        if t == "message":
            role = it.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"{where}.role must be 'user', 'system', 'developer' or 'assistant', got {role!r}", "input")
            msgs.append({"role": role, "content": _text_parts(it.get("content"), where)})
        elif t == "function_call":
            if not all(isinstance(it.get(k), str) for k in ("call_id", "name", "arguments")):
                raise _bad(f"{where}: a function_call item needs string 'call_id', 'name' and 'arguments'", "input")
            call = {"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it["arguments"]}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls"):
                msgs[-1]["tool_calls"].append(call)  # (calls in a row: one assistant turn)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif t == "function_call_output":
            if not isinstance(it.get("call_id"), str) or not isinstance(it.get("output"), str):
                raise _bad(f"{where}: a function_call_output item needs string 'call_id' and 'output'", "input")
            msgs.append({"role": "tool", "tool_call_id": it["call_id"], "content": it["output"]})
        else:
            raise _bad(f"{where}.type {t!r} is not supported (message, function_call, function_call_output)", "input",
                       "unsupported_value")
    return msgs


def _chat_tools(tools) -> Optional[list]:
    if tools in (None, []):
        return None
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of function tools", "tools", "invalid_type")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise _bad(f"tools[{i}]: only function tools are supported ({{'type': 'function', 'name': ..., "
                       "'parameters': ...}})", f"tools[{i}]", "unsupported_value")
        f = {k: t[k] for k in ("name", "description", "parameters") if k in t}
        out.append({"type": "function", "function": f})
    return out


def _chat_tool_choice(tc):
    if isinstance(tc, dict) and tc.get("type") == "function" and "name" in tc:
        return {"type": "function", "function": {"name": tc["name"]}}
    return tc


def parse_responses(body: Any, tokenizer, vocab: int, store: ResponseStore, tool_parser: Optional[str] = None,
                    max_tokens_default: int = 256) -> Tuple[ParsedRequest, Dict[str, Any], List[Dict[str, Any]]]:
    """(the parsed chat request, the fields the response echoes, the conversation's messages without
    ``instructions``) of a Responses request."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object", None, "invalid_json")
    for k, defaults in _UNSUPPORTED.items():
        if body.get(k) not in defaults:
            raise _bad(f"'{k}' is not supported", k, "unsupported_parameter")
    history: List[Dict[str, Any]] = []
    prev = body.get("previous_response_id")
    if prev is not None:
        got = store.get(prev) if isinstance(prev, str) else None
        if got is None:
            raise APIError(404, f"previous response {prev!r} not found (responses are kept in memory only while "
                           f"the server runs, the last {store.size} with store: true)", "invalid_request_error",
                           "previous_response_id", "response_not_found")
        history = list(got[1])
    msgs = history + _messages(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("'instructions' must be a string", "instructions", "invalid_type")
    chat: Dict[str, Any] = {"messages": ([{"role": "system", "content": instructions}] if instructions else []) + msgs}
    for k in _PASS:
        if k in body:
            chat[k] = body[k]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    tools = _chat_tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    text = body.get("text")
    fmt = None
    if text is not None:
        if not isinstance(text, dict) or not isinstance(text.get("format", {}), dict):
            raise _bad("'text' must be {'format': {'type': 'text' | 'json_object' | 'json_schema', ...}}", "text",
                       "invalid_type")
        fmt = text.get("format")
        if fmt is not None and fmt.get("type") == "json_schema":
            chat["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
        elif fmt is not None:
            chat["response_format"] = {"type": fmt.get("type")}
    for k in ("store", "parallel_tool_calls"):
        if body.get(k) is not None and not isinstance(body[k], bool):
            raise _bad(f"'{k}' must be a boolean, got {body[k]!r}", k, "invalid_type")
    meta = body.get("metadata")
    if meta is not None and not (isinstance(meta, dict) and len(meta) <= 16
                                 and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise _bad("'metadata' must be an object of at most 16 string values", "metadata", "invalid_type")
    try:
        pr = parse_chat(chat, tokenizer, vocab, max_tokens_default=max_tokens_default, tool_parser=tool_parser)
    except APIError as e:  # (name the Responses field, not the chat one it became)
        p = e.param or ""
        e.param = ("input" if p.startswith("messages") else "max_output_tokens" if p in ("max_tokens", "min_tokens")
                   else "text" if p == "response_format" else p or None)
        e.message = e.message.replace("'max_tokens'", "'max_output_tokens'")
        raise
    echo = {"instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice", "auto"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": prev,
            "store": body.get("store", True), "metadata": meta or {}, "text": {"format": fmt or {"type": "text"}},
            "user": body.get("user"), "truncation": body.get("truncation") or "disabled"}
    return pr, echo, msgs


def output_items(rid: str, content: Optional[str], calls: Optional[list], incomplete: bool) -> List[Dict[str, Any]]:
    """Responses output items: the assistant message (when there is content) and the function calls
    (``calls``: chat ``tool_calls`` objects)."""
    status = "incomplete" if incomplete else "completed"
    items: List[Dict[str, Any]] = []
    if content is not None:
        items.append({"type": "message", "id": "msg_" + rid[5:], "status": status, "role": "assistant",
                      "content": [{"type": "output_text", "text": content, "annotations": [], "logprobs": []}]})
    for j, c in enumerate(calls or ()):
        items.append({"type": "function_call", "id": f"fc_{rid[5:]}_{j}", "call_id": c["id"],
                      "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": status})
    return items


def response_object(rid: str, created: float, model: str, echo: Dict[str, Any], items: list, status: str,
                    usage: Optional[Dict[str, int]]) -> Dict[str, Any]:
    resp = {"id": rid, "object": "response", "created_at": created, "status": status, "model": model,
            "output": items, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None, **echo}
    if usage is not None:
        resp["usage"] = {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
                         "output_tokens": usage["completion_tokens"],
                         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": usage["total_tokens"]}
    if status in ("completed", "incomplete"):
        resp["completed_at"] = time.time()
    return resp


def new_response_id() -> str:
    return "resp_" + uuid.uuid4().hex[:24]


def history_after(msgs: List[Dict[str, Any]], content: Optional[str], calls: Optional[list]) -> List[Dict[str, Any]]:
    """The conversation to continue from (``previous_response_id``): its messages and this reply."""
    reply: Dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        reply["tool_calls"] = calls
    return msgs + [reply]
