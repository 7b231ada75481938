"""OpenAI request parsing and validation (no pydantic: every error names its field).

Errors raise :class:`APIError`, which the server turns into
``{"error": {"message", "type", "param", "code"}}`` with the given HTTP status.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .sampling import MAX_LOGPROBS, SamplingParams
from .regex import regex_grammar
from .schema import schema_grammar

__all__ = ["APIError", "ParsedRequest", "parse_completion", "parse_chat", "MAX_N", "MAX_CHOICES"]

MAX_N = 16  # choices per prompt (each is a sequence of its own in the engine)
MAX_CHOICES = 64  # sequences per request: prompts x n


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(msg: str, param: Optional[str] = None, code: Optional[str] = "invalid_value") -> APIError:
    return APIError(400, msg, "invalid_request_error", param, code)


@dataclass
class ParsedRequest:
    """One API request: ``n`` choices for each of ``prompts`` (completions take a batch of prompts;
    choice ``p * n + i`` is choice ``i`` of prompt ``p``, as OpenAI numbers them)."""

    prompts: List[List[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    model: str
    max_tokens_given: bool = True  # False: the default may be shortened to fit the context
    echo: bool = False  # completions: the prompt's text (and log-probabilities) lead the output
    prompt_texts: Optional[List[str]] = None  # what echo returns, per prompt
    n: int = 1
    # vLLM's ``prompt_logprobs`` extension: the prompt tokens' log-probabilities with this many
    # alternatives, returned as ``prompt_logprobs`` (completions: per choice; chat: per response)
    prompt_logprobs: Optional[int] = None
    # chat tool calls: "named" (tool_choice names a function: its arguments are generated to its
    # parameters schema) or "required" (a JSON array of {"name", "parameters"} calls)
    # or "auto" (the model's own format, parsed afterwards by ``tool_parser``; ``tool_names``: the
    # request's tools)
    tool_mode: Optional[str] = None
    tool_name: Optional[str] = None
    tool_parser: Optional[str] = None
    tool_names: Tuple[str, ...] = ()
    parallel_tool_calls: bool = True  # (False: at most one call)
    # vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far
    continuous_usage: bool = False

    @property
    def prompt_ids(self) -> List[int]:  # (the first prompt: the only one of a chat request)
        return self.prompts[0]

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


def _num(body, name, default, lo, hi, *, integer=False, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        kind = "an integer" if integer else "a number"
        raise _bad(f"'{name}' must be {kind}, got {v!r}", name, "invalid_type")
    if isinstance(v, float) and not math.isfinite(v):
        raise _bad(f"'{name}' must be finite, got {v!r}", name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        lb = "(" if lo_open else "["
        raise _bad(f"'{name}' must be in {lb}{lo}, {hi}], got {v!r}", name)
    return v


def _flag(body, name) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(f"'{name}' must be a boolean, got {v!r}", name, "invalid_type")
    return v


def _logprob_fields(body: Dict[str, Any], chat: bool) -> Tuple[Optional[int], bool]:
    """(``SamplingParams.logprobs``, echo).  Completions: ``logprobs`` = how many alternatives per
    token (0..MAX_LOGPROBS; the chosen token's log-probability always comes back) and ``echo``; chat:
    ``logprobs`` (bool) with ``top_logprobs`` (0..MAX_LOGPROBS, only with ``logprobs``)."""
    if chat:
        if body.get("echo") not in (None, False):
            raise _bad("'echo' is not supported for chat completions", "echo", "unsupported_parameter")
        want = _flag(body, "logprobs")
        top = _num(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if top is not None and not want:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (top or 0) if want else None, False
    if body.get("top_logprobs") is not None:
        raise _bad("'top_logprobs' belongs to chat completions; completions take 'logprobs': <int>", "top_logprobs",
                   "unsupported_parameter")
    return _num(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True), _flag(body, "echo")


def _logit_bias(body: Dict[str, Any]) -> Tuple[Tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: an object of token id (a string of digits) -> bias in [-100, 100]."""
    lb = body.get("logit_bias")
    if lb is None:
        return ()
    if not isinstance(lb, dict):
        raise _bad(f"'logit_bias' must be an object of token id -> bias, got {type(lb).__name__}", "logit_bias",
                   "invalid_type")
    if len(lb) > 1024:
        raise _bad(f"'logit_bias' takes at most 1024 tokens, got {len(lb)}", "logit_bias")
    out = []
    for k, v in lb.items():
        if not (isinstance(k, str) and k.isdigit()):
            raise _bad(f"'logit_bias' keys must be token ids, got {k!r}", "logit_bias", "invalid_type")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not -100 <= v <= 100:
            raise _bad(f"'logit_bias' values must be numbers in [-100, 100], got {v!r} for token {k}", "logit_bias")
        out.append((int(k), float(v)))
    return tuple(sorted(out))


def _schema_text(schema: Any, param: str) -> str:
    """A JSON Schema as the JSON text SamplingParams takes, compiled once here (unsupported keywords
    are named in the 400)."""
    text = json.dumps(schema)
    try:
        schema_grammar(text)
    except RecursionError:
        raise _bad("json_schema: nested too deeply", param, "unsupported_value") from None
    except ValueError as e:
        raise _bad(str(e), param, "unsupported_value") from None
    return text


def _choices(v: Any, param: str) -> Tuple[str, ...]:
    if (not isinstance(v, list) or not v or len(v) > 256 or not all(isinstance(c, str) and c for c in v)
            or len(set(v)) != len(v)):
        raise _bad(f"'{param}' must be a list of 1-256 distinct non-empty strings, got {v!r}", param, "invalid_type")
    return tuple(v)


def _response_format(body: Dict[str, Any]) -> Dict[str, Any]:
    """The constraint on the output, as SamplingParams fields: OpenAI's ``response_format``
    (``{"type": "text"}``, the default; ``{"type": "json_object"}``, JSON mode; ``{"type":
    "json_schema", "json_schema": {"name", "schema", "strict"}}``) or vLLM's extensions
    ``guided_json`` (a schema), ``guided_choice`` (a list of strings: the output is one of them),
    ``guided_regex`` (a pattern the whole output matches) and ``structured_outputs`` (``{"json":
    schema}``, ``{"choice": [...]}`` or ``{"regex": pattern}``).  One of them at most."""
    given = [k for k in ("response_format", "guided_json", "guided_choice", "guided_regex", "structured_outputs")
             if body.get(k) is not None and not (k == "response_format" and isinstance(body[k], dict)
                                                 and body[k].get("type") == "text")]
    if len(given) > 1:
        raise _bad(f"give at most one of {given}", given[1], "invalid_value")
    if not given:
        rf = body.get("response_format")
        if rf is not None and not isinstance(rf, dict):
            raise _bad(f"'response_format' must be an object with a 'type', got {rf!r}", "response_format",
                       "invalid_type")
        return {}
    k = given[0]
    v = body[k]
    if k != "response_format":  # vLLM's: guided_json / guided_choice, or structured_outputs' json / choice
        kind, name = k[len("guided_"):], k
        if k == "structured_outputs":
            if not isinstance(v, dict) or len([x for x in v if v[x] is not None]) != 1:
                raise _bad("'structured_outputs' must be an object with one of 'json', 'choice', 'regex'", k,
                           "invalid_type")
            (kind, v), = [(x, v[x]) for x in v if v[x] is not None]
            name = f"structured_outputs.{kind}"
            if kind not in ("json", "choice", "regex"):
                raise _bad(f"'{name}' is not supported (json, choice and regex are)", k, "unsupported_value")
        if kind == "choice":
            return {"response_format": "choice", "choices": _choices(v, k)}
        if kind == "regex":
            if not isinstance(v, str):
                raise _bad(f"'{name}' must be a pattern string", k, "invalid_type")
            try:
                regex_grammar(v)
            except ValueError as e:
                raise _bad(str(e), k, "unsupported_value") from None
            return {"response_format": "regex", "regex": v}
        if not isinstance(v, dict):
            raise _bad(f"'{name}' must be a JSON Schema object", k, "invalid_type")
        return {"response_format": "json_schema", "json_schema": _schema_text(v, k)}
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise _bad(f"'response_format' must be an object with a 'type', got {v!r}", "response_format", "invalid_type")
    t = v["type"]
    if t == "json_object":
        return {"response_format": "json_object"}
    if t == "json_schema":
        js = v.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise _bad("'response_format.json_schema' must be an object holding the 'schema' (and a 'name')",
                       "response_format", "invalid_type")
        return {"response_format": "json_schema", "json_schema": _schema_text(js["schema"], "response_format")}
    raise _bad(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {t!r}", "response_format")


def _common(body: Dict[str, Any], *, max_tokens_default: int, max_tokens_names: Sequence[str],
            chat: bool) -> Tuple[SamplingParams, bool, bool, bool, int, Optional[int]]:
    n = _num(body, "n", 1, 1, MAX_N, integer=True)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise _bad(f"'best_of' is not supported (leave it unset or equal to n={n}), got {best_of!r}", "best_of",
                   "unsupported_value")
    presence = _num(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _num(body, "frequency_penalty", 0.0, -2.0, 2.0)
    repetition = _num(body, "repetition_penalty", 1.0, 0.0, 2.0, lo_open=True)  # (vLLM's extension)
    logprobs, echo = _logprob_fields(body, chat)
    prompt_lp = _num(body, "prompt_logprobs", None, 0, MAX_LOGPROBS, integer=True)  # (vLLM's extension)
    logit_bias = _logit_bias(body)
    constraint = _response_format(body)
    min_tokens = _num(body, "min_tokens", 0, 0, 1 << 20, integer=True)  # (vLLM's extension)
    for name in (("functions", "suffix") if chat else ("tools", "tool_choice", "functions", "suffix")):
        v = body.get(name)
        if v not in (None, False, 0, {}, []):
            raise _bad(f"'{name}' is not supported" + ("" if chat or name not in ("tools", "tool_choice")
                                                        else " for completions (chat completions take tools)"),
                       name, "unsupported_parameter")
    max_tokens = None
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens = _num(body, name, None, 1, 1 << 20, integer=True)
            break
    if max_tokens is None:
        max_tokens = max_tokens_default
    if min_tokens > max_tokens:
        raise _bad(f"'min_tokens' ({min_tokens}) exceeds the maximum number of tokens ({max_tokens})", "min_tokens")
    temperature = _num(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _num(body, "top_k", 0, -1, 1 << 20, integer=True)
    top_k = 0 if top_k == -1 else top_k
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise _bad(f"'seed' must be a 64-bit integer, got {seed!r}", "seed", "invalid_type")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise _bad(f"'stop' must be a string or a list of strings, got {stop!r}", "stop", "invalid_type")
    if len(stop) > 16 or any(not s or len(s) > 256 for s in stop):
        raise _bad("'stop' takes at most 16 non-empty strings of at most 256 characters", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in stop_ids):
        raise _bad(f"'stop_token_ids' must be a list of non-negative integers, got {stop_ids!r}", "stop_token_ids",
                   "invalid_type")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad(f"'ignore_eos' must be a boolean, got {ignore_eos!r}", "ignore_eos", "invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be a boolean, got {stream!r}", "stream", "invalid_type")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        include_usage = bool(so.get("include_usage", False))
        if not isinstance(so.get("continuous_usage_stats", False), bool):
            raise _bad("'stream_options.continuous_usage_stats' must be a boolean", "stream_options", "invalid_type")
    if prompt_lp is not None and stream:  # (as vLLM: they would all precede the first token anyway)
        raise _bad("'prompt_logprobs' is not available with 'stream': true", "prompt_logprobs", "unsupported_value")
    # one computation of the prompt's rows serves echo's (``logprobs`` alternatives) and prompt_logprobs'
    wanted = [k for k in (logprobs if echo else None, prompt_lp) if k is not None]
    params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_k=int(top_k),
                            top_p=float(top_p), seed=seed, stop=stop, stop_token_ids=tuple(stop_ids),
                            ignore_eos=ignore_eos, presence_penalty=float(presence),
                            frequency_penalty=float(frequency), repetition_penalty=float(repetition),
                            logprobs=logprobs, prompt_logprobs=max(wanted) if wanted else None,
                            logit_bias=logit_bias, min_tokens=min_tokens, **constraint)
    return params, stream, include_usage, echo, n, prompt_lp


def _continuous_usage(body) -> bool:
    """vLLM's ``stream_options.continuous_usage_stats`` (checked in :func:`_common`)."""
    so = body.get("stream_options")
    return isinstance(so, dict) and so.get("continuous_usage_stats") is True


def _model(body) -> str:
    m = body.get("model")
    if m is not None and not isinstance(m, str):
        raise _bad(f"'model' must be a string, got {m!r}", "model", "invalid_type")
    return m or ""


def _token_list(v, vocab: int, param: str) -> List[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise _bad(f"'{param}' token lists must hold integers", param, "invalid_type")
    bad = [t for t in v if not 0 <= t < vocab]
    if bad:
        raise _bad(f"'{param}' holds token ids outside [0, {vocab}): {bad[:5]}", param, "invalid_token")
    return list(v)


def parse_completion(body: Any, tokenizer, vocab: int, max_tokens_default: int = 16) -> ParsedRequest:
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object", None, "invalid_json")
    if "prompt" not in body:
        raise _bad("'prompt' is required", "prompt", "missing_required_parameter")
    p = body["prompt"]
    # one prompt (a string or a token id list) or a batch of them (a list of strings / id lists)
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in p)):
        batch = [p]
    elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        batch = p
    else:
        raise _bad(f"'prompt' must be a string, a list of token ids or a list of those, got {type(p).__name__}",
                   "prompt", "invalid_type")
    prompts = []
    for j, x in enumerate(batch):
        if isinstance(x, str):
            ids = tokenizer(x, add_special_tokens=False)["input_ids"] if x else []
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            ids = _token_list(x, vocab, "prompt")
        else:
            raise _bad(f"prompt {j} of the batch must be a string or a list of token ids", "prompt", "invalid_type")
        if not ids:
            raise _bad("'prompt' must not be empty" + (f" (prompt {j} of the batch is)" if len(batch) > 1 else ""),
                       "prompt")
        prompts.append(ids)
    params, stream, usage, echo, n, prompt_lp = _common(body, max_tokens_default=max_tokens_default,
                                                        max_tokens_names=("max_tokens",), chat=False)
    if len(prompts) * n > MAX_CHOICES:
        raise _bad(f"{len(prompts)} prompts x n={n} = {len(prompts) * n} choices exceeds {MAX_CHOICES} per request",
                   "prompt" if len(prompts) > 1 else "n")
    texts = [x if isinstance(x, str) else tokenizer.decode(ids) for x, ids in zip(batch, prompts)] if echo else None
    return ParsedRequest(prompts, params, stream, usage, _model(body), body.get("max_tokens") is not None, echo,
                         texts, n, prompt_lp, continuous_usage=_continuous_usage(body))


_ROLES = ("system", "user", "assistant", "developer", "tool")


def _content_text(c, i: int) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}",
                           f"messages[{i}].content", "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
               "invalid_type")


_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NO_PARAMS = {"type": "object", "properties": {}}


def _tools(body: Dict[str, Any], tool_parser: Optional[str] = None):
    """(tools for the chat template, tool mode, tool name, schema JSON text of the output, tool
    names) of a chat request's ``tools`` / ``tool_choice``.  ``tool_choice``: ``"none"``,
    ``"required"`` (one or more calls: a JSON array of ``{"name", "parameters"}`` objects) or
    ``{"type": "function", "function": {"name": ...}}`` (that function: its arguments).
    ``"auto"`` (OpenAI's default with tools): the model writes calls in its own format, parsed by
    the server's ``tool_parser`` (:mod:`.tools`); a server without one answers 400 saying what to
    ask for instead (as vLLM without ``--enable-auto-tool-choice``)."""
    tools, tc = body.get("tools"), body.get("tool_choice")
    if tools in (None, []):
        if tc not in (None, "none"):
            raise _bad("'tool_choice' needs 'tools'", "tool_choice")
        return None, None, None, None, ()
    if not isinstance(tools, list) or len(tools) > 128:
        raise _bad("'tools' must be a list of at most 128 function tools", "tools", "invalid_type")
    params: Dict[str, Any] = {}
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
            raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                       f"tools[{i}]", "invalid_type")
        name = f.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise _bad(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                       f"tools[{i}].function.name")
        if name in params:
            raise _bad(f"tools name {name!r} twice", f"tools[{i}].function.name")
        p = f.get("parameters", _NO_PARAMS)
        if not isinstance(p, dict):
            raise _bad(f"tools[{i}].function.parameters must be a JSON Schema object", f"tools[{i}].function.parameters",
                       "invalid_type")
        params[name] = p
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise _bad(f"'parallel_tool_calls' must be a boolean, got {parallel!r}", "parallel_tool_calls", "invalid_type")
    if tc is None or tc == "auto":
        if tool_parser is not None:
            return tools, "auto", None, None, tuple(params)
        raise _bad("tool_choice 'auto' (the default with tools) needs a parser for the model's own tool-call format, "
                   "which this server was started without (cometq serve --enable-auto-tool-choice --tool-call-parser "
                   "NAME); ask for 'required' or {'type': 'function', 'function': {'name': ...}} -- the calls are "
                   "then generated to the tools' JSON Schemas", "tool_choice", "unsupported_value")
    if tc == "none":
        return None, None, None, None, ()
    if tc == "required":
        mode, name = "required", None
        schema = {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}), "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"const": n}, "parameters": p}, "required": ["name", "parameters"],
             "additionalProperties": False} for n, p in params.items()]}}
    elif (isinstance(tc, dict) and tc.get("type") == "function" and isinstance(tc.get("function"), dict)
          and tc["function"].get("name") in params):
        mode, name = "named", tc["function"]["name"]
        schema = params[name]
    else:
        raise _bad(f"'tool_choice' must be 'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': "
                   f"one of {list(params)}}}}}, got {tc!r}", "tool_choice")
    try:
        text = _schema_text(schema, "tools")
    except APIError as e:
        raise _bad(f"tool parameters: {e.message}", "tools", "unsupported_value") from None
    return tools, mode, name, text, tuple(params)


def chat_prompt_ids(tokenizer, messages: List[Dict[str, Any]], add_generation_prompt: bool = True,
                    tools: Optional[List[Dict[str, Any]]] = None, continue_final_message: bool = False,
                    template_kwargs: Optional[Dict[str, Any]] = None) -> List[int]:
    """Token ids of the conversation (with the generation prompt unless told otherwise), via the
    tokenizer's chat template (a plain ``role: text`` transcript when the tokenizer has none);
    ``tools`` go to the template (templates that know tools describe them to the model);
    ``continue_final_message``: the last message is left open, so the reply continues it (a
    prefilled answer); ``template_kwargs``: more variables for the template (vLLM's
    ``chat_template_kwargs``, e.g. ``enable_thinking``)."""
    if getattr(tokenizer, "chat_template", None):
        kw = dict(template_kwargs or {})
        if tools:
            kw["tools"] = tools
        if continue_final_message:
            kw["continue_final_message"] = True
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kw)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant:" if add_generation_prompt else "")
    if continue_final_message:
        text = text[:-1]  # (the last line stays open)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_TEMPLATE_RESERVED = {"messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message",
                      "tokenize", "return_dict", "return_tensors", "chat_template", "tokenizer_kwargs"}


def _template_options(body: Dict[str, Any], messages: List[Dict[str, Any]], add_default: bool):
    """vLLM's chat template options: ``add_generation_prompt`` (default true),
    ``continue_final_message`` (the last message, an assistant's, stays open: the reply continues
    it; excludes a generation prompt) and ``chat_template_kwargs`` (more template variables)."""
    add = body.get("add_generation_prompt", add_default)
    cont = body.get("continue_final_message", False)
    for name, v in (("add_generation_prompt", add), ("continue_final_message", cont)):
        if not isinstance(v, bool):
            raise _bad(f"'{name}' must be a boolean, got {v!r}", name, "invalid_type")
    if cont:
        if "add_generation_prompt" in body and add:
            raise _bad("'continue_final_message' and 'add_generation_prompt' exclude each other (the reply either "
                       "continues the last message or starts a new one)", "continue_final_message")
        add = False
        if messages[-1]["role"] != "assistant":
            raise _bad(f"'continue_final_message' needs the last message to be an assistant's, got "
                       f"{messages[-1]['role']!r}", "continue_final_message")
    tkw = body.get("chat_template_kwargs")
    if tkw is not None:
        if not isinstance(tkw, dict) or not all(isinstance(k, str) for k in tkw):
            raise _bad("'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
        clash = sorted(set(tkw) & _TEMPLATE_RESERVED)
        if clash:
            raise _bad(f"'chat_template_kwargs' may not set {clash} (the request's own fields)",
                       "chat_template_kwargs")
    return add, cont, tkw


def parse_chat(body: Any, tokenizer, vocab: int, max_tokens_default: int = 256,
               add_generation_prompt: bool = True, tool_parser: Optional[str] = None) -> ParsedRequest:
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object", None, "invalid_json")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", "messages",
                   "missing_required_parameter" if msgs is None else "invalid_type")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"messages[{i}].role must be one of {list(_ROLES)}, got {role!r}", f"messages[{i}].role")
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise _bad(f"messages[{i}].tool_calls must be a list of tool call objects", f"messages[{i}].tool_calls",
                       "invalid_type")
        content = m.get("content", "")
        msg = {"role": "system" if role == "developer" else role,
               "content": "" if content is None and (calls or role == "tool") else _content_text(content, i)}
        if calls:
            msg["tool_calls"] = calls
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        clean.append(msg)
    tools, tool_mode, tool_name, tool_schema, tool_names = _tools(body, tool_parser)
    add_generation_prompt, cont, tkw = _template_options(body, clean, add_generation_prompt)
    try:
        ids = chat_prompt_ids(tokenizer, clean, add_generation_prompt, tools=tools, continue_final_message=cont,
                              template_kwargs=tkw)
    except Exception as e:  # (a template that cannot render these messages: the request's fault)
        raise _bad(f"the chat template could not render the messages: {type(e).__name__}: {e}", "messages") from None
    params, stream, usage, _, n, prompt_lp = _common(body, max_tokens_default=max_tokens_default,
                                                     max_tokens_names=("max_completion_tokens", "max_tokens"),
                                                     chat=True)
    if tool_mode in ("named", "required"):
        if params.response_format is not None:
            raise _bad("'response_format' (or a guided_* constraint) and tool calls exclude each other",
                       "response_format")
        params = dataclasses.replace(params, response_format="json_schema", json_schema=tool_schema)
    given = body.get("max_completion_tokens") is not None or body.get("max_tokens") is not None
    return ParsedRequest([ids], params, stream, usage, _model(body), given, n=n, prompt_logprobs=prompt_lp,
                         tool_mode=tool_mode, tool_name=tool_name,
                         tool_parser=tool_parser if tool_mode == "auto" else None, tool_names=tool_names,
                         parallel_tool_calls=body.get("parallel_tool_calls", True) is not False,
                         continuous_usage=_continuous_usage(body))
