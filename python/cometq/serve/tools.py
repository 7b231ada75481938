"""Tool-call parsers for ``tool_choice: "auto"`` (vLLM's ``--enable-auto-tool-choice
--tool-call-parser NAME``): the model writes calls in its own format, unconstrained, and the
server turns them into OpenAI ``tool_calls``.

Formats (what each family's chat template teaches its models):

* ``hermes`` (Hermes, Qwen 2.5 / 3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  any number, after optional text (the content); the last one may lack its closing tag.
* ``llama3_json`` (Llama 3.1 / 3.2): the whole reply is ``{"name": ..., "parameters": {...}}``
  (``arguments`` taken too), several joined by ``;``, optionally after ``<|python_tag|>``.
* ``mistral``: ``[TOOL_CALLS]`` and a JSON array of ``{"name", "arguments"}`` (the marker is a
  special token that detokenized text may drop: a reply that is such an array counts too).
* ``pythonic`` (Llama 3.2 / 4 "pythonic", ToolACE): the whole reply is a Python list of calls with
  keyword arguments of literal values, ``[get_weather(city="Paris"), add(a=1, b=2)]``.

A reply is tool calls only if every call parses, names one of the request's tools and has an
object of arguments; otherwise it is plain content, as written.  :class:`StreamingToolParser`
passes text through as content while no call can have begun, holds it from the first byte that
may start one, and at the end gives what :func:`parse_tool_calls` gives for the whole text.
"""
from __future__ import annotations

import ast
import json
import re
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["TOOL_PARSERS", "parse_tool_calls", "StreamingToolParser"]

Call = Tuple[str, Dict]  # (name, arguments)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # (NaN / Infinity: arguments must be strict JSON)


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _call(obj, arg_keys: Sequence[str], names) -> Optional[Call]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    for k in arg_keys:
        if k in obj:
            args = obj[k]
            if isinstance(args, str):  # (some models write the arguments as JSON text)
                try:
                    args = _DECODER.decode(args)
                except ValueError:
                    return None
            return (obj["name"], args) if isinstance(args, dict) else None
    return obj["name"], {}


def _json_objects(text: str, sep: str = "") -> Optional[list]:
    """JSON values one after another (whitespace and ``sep`` between them), or None."""
    dec, out, i = _DECODER, [], 0
    while True:
        while i < len(text) and (text[i].isspace() or (sep and text[i] == sep and out)):
            i += 1
        if i == len(text):
            return out or None
        try:
            v, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(v)


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)


def _hermes(text: str, names) -> Optional[Tuple[str, List[Call]]]:
    i = text.find("<tool_call>")
    if i < 0:
        return None
    calls = []
    for body in _HERMES.findall(text[i:]):
        objs = _json_objects(body) if body.strip() else None
        c = _call(objs[0], ("arguments", "parameters"), names) if objs and len(objs) == 1 else None
        if c is None:
            return None
        calls.append(c)
    if _HERMES.sub("", text[i:]).strip():  # (text between or after the calls)
        return None
    return text[:i], calls


def _llama3_json(text: str, names) -> Optional[Tuple[str, List[Call]]]:
    s = text.strip()
    if s.startswith("<|python_tag|>"):
        s = s[len("<|python_tag|>"):]
    objs = _json_objects(s, sep=";") if s.startswith("{") else None
    if not objs:
        return None
    calls = [_call(o, ("parameters", "arguments"), names) for o in objs]
    return ("", calls) if all(calls) else None


def _mistral(text: str, names) -> Optional[Tuple[str, List[Call]]]:
    i = text.find("[TOOL_CALLS]")
    head, body = (text[:i], text[i + len("[TOOL_CALLS]"):]) if i >= 0 else ("", text)
    if i < 0 and not text.lstrip().startswith("[{"):
        return None
    objs = _json_objects(body.strip())
    if not objs or len(objs) != 1 or not isinstance(objs[0], list) or not objs[0]:
        return None
    calls = [_call(o, ("arguments", "parameters"), names) for o in objs[0]]
    return (head, calls) if all(calls) else None


def _pythonic(text: str, names) -> Optional[Tuple[str, List[Call]]]:
    s = text.strip()
    if not s.startswith("["):
        return None
    try:
        tree = ast.parse(s, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for e in tree.elts:
        if not (isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and not e.args
                and e.func.id in names and all(k.arg is not None for k in e.keywords)):
            return None
        try:
            args = {k.arg: ast.literal_eval(k.value) for k in e.keywords}
            json.dumps(args, allow_nan=False)  # (JSON-able, strictly)
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return None
        calls.append((e.func.id, args))
    return "", calls


# name -> (parser, markers that may start calls anywhere, markers that start calls only as the reply's
# first non-space characters)
TOOL_PARSERS = {
    "hermes": (_hermes, ("<tool_call>",), ()),
    "llama3_json": (_llama3_json, (), ("<|python_tag|>", "{")),
    "mistral": (_mistral, ("[TOOL_CALLS]",), ("[{",)),
    "pythonic": (_pythonic, (), ("[",)),
}


def parse_tool_calls(parser: str, text: str, names) -> Optional[Tuple[Optional[str], List[Call]]]:
    """(content before the calls or None, [(name, arguments)]) when ``text`` is tool calls in the
    ``parser`` format naming tools in ``names``; None when it is plain content."""
    if parser not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {parser!r}; known: {sorted(TOOL_PARSERS)}")
    r = TOOL_PARSERS[parser][0](text, frozenset(names))
    if r is None:
        return None
    content, calls = r
    return (content if content.strip() else None), calls


class StreamingToolParser:
    """Streamed text in, content out: :meth:`feed` returns the text that is surely content (none
    of it can begin a call); :meth:`finish` returns (the rest of the content, the calls or None)
    -- together exactly what :func:`parse_tool_calls` makes of the whole text."""

    def __init__(self, parser: str, names):
        if parser not in TOOL_PARSERS:
            raise ValueError(f"unknown tool-call parser {parser!r}; known: {sorted(TOOL_PARSERS)}")
        self.parser, self.names = parser, frozenset(names)
        _, self._anywhere, self._leading = TOOL_PARSERS[parser]
        self._lead_open = bool(self._leading)  # (the reply's first characters may still start a call)
        self._text = ""  # everything so far
        self._sent = 0  # characters of it already returned as content
        self._held = False  # a call may have begun: hold the rest until the end

    def feed(self, delta: str) -> str:
        self._text += delta
        if self._held:
            return ""
        t = self._text
        if self._lead_open:
            s = t.lstrip()
            if not s:
                return ""
            if any(s.startswith(m) for m in self._leading):
                self._held = True
                return ""
            if any(m.startswith(s) for m in self._leading):
                return ""  # (undecided)
            self._lead_open = False
        safe = len(t)
        for m in self._anywhere:
            i = t.find(m, self._sent)
            if i >= 0:
                safe = min(safe, i)
                self._held = True
            else:  # a tail that may be the start of a marker waits
                for k in range(min(len(m) - 1, len(t) - self._sent), 0, -1):
                    if t.endswith(m[:k]):
                        safe = min(safe, len(t) - k)
                        break
        out = t[self._sent:safe]
        if self._sent == 0 and not out.strip():
            return ""  # (leading whitespace waits: before calls it is no content at all)
        self._sent = safe
        return out

    def finish(self) -> Tuple[str, Optional[List[Call]]]:
        r = parse_tool_calls(self.parser, self._text, self.names)
        if r is None:
            rest, self._sent = self._text[self._sent:], len(self._text)
            return rest, None
        content, calls = r
        head = content or ""
        rest = head[self._sent:] if len(head) >= self._sent else ""
        self._sent = len(self._text)
        return rest, calls
