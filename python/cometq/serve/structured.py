"""Structured output: OpenAI's JSON mode (``response_format: {"type": "json_object"}``), a JSON
Schema subset (``json_schema``, tool calls), vLLM's guided choice (regexes: :mod:`.regex`).

In JSON mode generation is constrained token by token so the output is always a prefix of one JSON object
(RFC 8259 syntax, strict: no NaN / Infinity, no control characters in strings, well-formed UTF-8
-- no overlong forms, no UTF-16 surrogates as raw bytes), and the request finishes ("stop") the
moment the object closes.  Before each sampling step every token that cannot continue the
output is masked to -inf, so greedy decoding is the argmax of the allowed tokens and sampling
(temperature, top-k, top-p) draws from the model's distribution restricted to them, as vLLM's
guided decoding does.

The pieces:

* :func:`json_step` -- the byte-level recognizer: a pure function ``(state, byte) -> state``
  (``None``: the byte cannot follow).  States are small tuples, so a search can branch on them
  without copying anything.
* grammars -- ``start``, ``step(state, byte)``, ``done(state)`` (and optionally ``can_end``:
  EOS may end the output here), ``in_plain_string(state)``: :class:`JsonObjectGrammar`,
  :class:`JsonSchemaGrammar`, :class:`ChoiceGrammar`, :class:`.regex.RegexGrammar`.
* :class:`JsonMasker` -- the allowed-token mask for a grammar state over a whole vocabulary: token
  byte strings in a trie walked depth-first from the state (a branch stops at its first rejected
  byte), with a precomputed fast path inside strings, where almost every token is allowed.
* :class:`JsonLogitsProcessor` -- the same masks for transformers ``generate``.

Two limits keep degenerate outputs finite: at most ``MAX_WS`` whitespace bytes in a row between
tokens (1 by default: see its comment) and ``MAX_DEPTH`` nested containers.
"""
from __future__ import annotations

import collections
import functools
import json
import threading
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .sampling import _BYTE_PIECE, bytes_to_unicode

__all__ = ["JSON_START", "JSON_OBJECT", "json_step", "json_feed", "json_done", "JsonMasker", "JsonObjectGrammar",
           "JsonSchemaGrammar", "schema_grammar", "ChoiceGrammar", "choice_grammar", "grammar_feed",
           "JsonLogitsProcessor", "masker_for", "token_bytes_table", "MAX_WS", "MAX_DEPTH"]

# whitespace bytes in a row between JSON tokens (the default; grammars take ``max_ws``).  One, as
# outlines' ``[ ]?`` but a newline or tab may be that byte: measured on SmolLM2-135M (2026-11-28,
# CPU, 4 prompts, greedy, a 3-property schema), W4Ax-KV4 closed 4/4 schema objects within 60
# tokens with 1 against 1/4 with 48 (it spent them on "\n\n" between every token); fp32 closed
# 4/4 either way, single-line-ish instead of indented.
MAX_WS = 1
MAX_DEPTH = 32  # nested objects / arrays

# modes
_START, _VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _AFTER, _STRING, _ESC, _UHEX, _NUM, _LIT, _DONE = \
    range(13)
# number sub-states: after '-', after a leading '0', integer digits, after '.', fraction digits,
# after 'e', after the exponent's sign, exponent digits
_N_MINUS, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_E, _N_ESIGN, _N_EXP = range(8)
_N_END_OK = (False, True, True, False, True, False, False, True)  # may a number end here?

# A state is (mode, stack, a, b, ws):
#   stack: str of '{' / '[' (innermost last); ws: whitespace bytes in a row
#   _STRING: a = 1 for an object key; b = (continuation bytes left, lowest, highest next byte)
#   _UHEX:   a = key flag; b = hex digits left
#   _NUM:    a = number sub-state;   _LIT: a = the literal's bytes still to come
JSON_START = (_START, "", 0, None, 0)

_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
_NO_UTF8 = (0, 0x80, 0xBF)
_MISSING = object()
_LEAVES_STRING = frozenset(b'"\\')  # (the bytes that end a string or start an escape)


def _utf8_lead(c: int) -> Optional[tuple]:
    """(continuation bytes, lowest, highest allowed next byte) after a lead byte (RFC 3629's table)."""
    if 0xC2 <= c <= 0xDF:
        return (1, 0x80, 0xBF)
    if c == 0xE0:
        return (2, 0xA0, 0xBF)  # (no overlong 3-byte forms)
    if c == 0xED:
        return (2, 0x80, 0x9F)  # (no UTF-16 surrogates)
    if 0xE1 <= c <= 0xEF:
        return (2, 0x80, 0xBF)
    if c == 0xF0:
        return (3, 0x90, 0xBF)  # (no overlong 4-byte forms)
    if 0xF1 <= c <= 0xF3:
        return (3, 0x80, 0xBF)
    if c == 0xF4:
        return (3, 0x80, 0x8F)  # (nothing above U+10FFFF)
    return None


def _close(stack: str):
    stack = stack[:-1]
    return (_AFTER, stack, 0, None, 0) if stack else (_DONE, "", 0, None, 0)


def _value(stack: str, c: int, ws: int, allow_close: bool, max_ws: int):
    """A value starts with byte ``c`` (state _VALUE / _VALUE_OR_CLOSE)."""
    if c in _WS:
        return None if ws >= max_ws else (_VALUE_OR_CLOSE if allow_close else _VALUE, stack, 0, None, ws + 1)
    if c == 0x22:  # "
        return (_STRING, stack, 0, _NO_UTF8, 0)
    if c == 0x7B or c == 0x5B:  # { [
        if len(stack) >= MAX_DEPTH:
            return None
        return ((_KEY_OR_CLOSE if c == 0x7B else _VALUE_OR_CLOSE), stack + chr(c), 0, None, 0)
    if c == 0x5D and allow_close:  # ] of an empty array
        return _close(stack)
    if c == 0x2D:  # -
        return (_NUM, stack, _N_MINUS, None, 0)
    if c == 0x30:
        return (_NUM, stack, _N_ZERO, None, 0)
    if 0x31 <= c <= 0x39:
        return (_NUM, stack, _N_INT, None, 0)
    lit = _LITERALS.get(c)
    if lit is not None:
        return (_LIT, stack, lit, None, 0)
    return None


def _after(stack: str, c: int, ws: int, max_ws: int):
    """After a value inside a container: ',' or the container's close (state _AFTER)."""
    if c in _WS:
        return None if ws >= max_ws else (_AFTER, stack, 0, None, ws + 1)
    top = stack[-1]
    if c == 0x2C:  # ,
        return (_KEY, stack, 0, None, 0) if top == "{" else (_VALUE, stack, 0, None, 0)
    if (c == 0x7D and top == "{") or (c == 0x5D and top == "["):
        return _close(stack)
    return None


def json_step(st: tuple, c: int, max_ws: int = MAX_WS) -> Optional[tuple]:
    """The state after byte ``c`` (0..255), or None when no JSON object continues that way
    (``max_ws``: whitespace bytes allowed in a row between tokens)."""
    mode, stack, a, b, ws = st
    if mode == _STRING:
        left, lo, hi = b
        if left:
            if not lo <= c <= hi:
                return None
            return (_STRING, stack, a, (left - 1, 0x80, 0xBF) if left > 1 else _NO_UTF8, 0)
        if c == 0x22:  # the closing quote
            return (_COLON, stack, 0, None, 0) if a else (_AFTER, stack, 0, None, 0)
        if c == 0x5C:  # backslash
            return (_ESC, stack, a, None, 0)
        if c < 0x20:
            return None
        if c < 0x80:
            return st
        lead = _utf8_lead(c)
        return None if lead is None else (_STRING, stack, a, lead, 0)
    if mode == _NUM:
        if c in _DIGITS:
            if a == _N_ZERO:
                return None  # (no leading zeros)
            nxt = {_N_MINUS: _N_INT if c != 0x30 else _N_ZERO, _N_INT: _N_INT, _N_DOT: _N_FRAC, _N_FRAC: _N_FRAC,
                   _N_E: _N_EXP, _N_ESIGN: _N_EXP, _N_EXP: _N_EXP}[a]
            return (_NUM, stack, nxt, None, 0)
        if c == 0x2E and a in (_N_ZERO, _N_INT):
            return (_NUM, stack, _N_DOT, None, 0)
        if c in (0x65, 0x45) and a in (_N_ZERO, _N_INT, _N_FRAC):
            return (_NUM, stack, _N_E, None, 0)
        if c in (0x2B, 0x2D) and a == _N_E:
            return (_NUM, stack, _N_ESIGN, None, 0)
        return _after(stack, c, 0, max_ws) if _N_END_OK[a] else None  # the number ended: this byte follows it
    if mode == _ESC:
        if c in _ESCAPES:
            return (_STRING, stack, a, _NO_UTF8, 0)
        return (_UHEX, stack, a, 4, 0) if c == 0x75 else None
    if mode == _UHEX:
        if c not in _HEX:
            return None
        return (_UHEX, stack, a, b - 1, 0) if b > 1 else (_STRING, stack, a, _NO_UTF8, 0)
    if mode == _LIT:
        if c != a[0]:
            return None
        return (_LIT, stack, a[1:], None, 0) if len(a) > 1 else (_AFTER, stack, 0, None, 0)
    if mode == _AFTER:
        return _after(stack, c, ws, max_ws)
    if mode == _VALUE or mode == _VALUE_OR_CLOSE:
        return _value(stack, c, ws, mode == _VALUE_OR_CLOSE, max_ws)
    if mode == _KEY or mode == _KEY_OR_CLOSE:
        if c in _WS:
            return None if ws >= max_ws else (mode, stack, 0, None, ws + 1)
        if c == 0x22:
            return (_STRING, stack, 1, _NO_UTF8, 0)
        return _close(stack) if c == 0x7D and mode == _KEY_OR_CLOSE else None
    if mode == _COLON:
        if c in _WS:
            return None if ws >= max_ws else (_COLON, stack, 0, None, ws + 1)
        return (_VALUE, stack, 0, None, 0) if c == 0x3A else None
    if mode == _START:
        if c in _WS:
            return None if ws >= max_ws else (_START, "", 0, None, ws + 1)
        return (_KEY_OR_CLOSE, "{", 0, None, 0) if c == 0x7B else None
    return None  # _DONE: nothing follows the object


def json_feed(st: Optional[tuple], data: bytes, max_ws: int = MAX_WS) -> Optional[tuple]:
    """:func:`json_step` over ``data`` (None once a byte is rejected)."""
    for c in data:
        if st is None:
            return None
        st = json_step(st, c, max_ws)
    return st


def json_done(st: Optional[tuple]) -> bool:
    """The top-level object is complete."""
    return st is not None and st[0] == _DONE


def token_bytes_table(tokenizer, vocab_size: int) -> List[Optional[bytes]]:
    """The bytes each token adds to the decoded text (None: a special token -- EOS included: the
    request ends when the object closes -- or an unknown one; never allowed by a constraint).  Byte-level BPE pieces map back through GPT-2's byte alphabet,
    SentencePiece pieces turn '▁' into a space and ``<0xNN>`` into that byte (decoding a token
    alone would drop SentencePiece's leading space, and two digits then read as one number)."""
    inv = {ch: b for b, ch in bytes_to_unicode().items()}
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    special |= {t for t, a in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                if getattr(a, "special", True)}  # (the detokenizer skips special tokens' text)
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    out: List[Optional[bytes]] = [None] * vocab_size
    for t, piece in enumerate(pieces):
        if t in special or not isinstance(piece, str) or not piece:
            continue
        m = _BYTE_PIECE.match(piece)
        if m:
            out[t] = bytes([int(m.group(1), 16)])
        elif "\u2581" in piece:
            out[t] = piece.replace("\u2581", " ").encode("utf-8")
        elif all(ch in inv for ch in piece):
            out[t] = bytes(inv[ch] for ch in piece)
        else:
            out[t] = tokenizer.decode([t]).encode("utf-8") or None
    return out


class JsonObjectGrammar:
    """JSON mode as a grammar for :class:`JsonMasker`: states of :func:`json_step` (``max_ws``
    whitespace bytes in a row between tokens).  ``JSON_OBJECT`` is the default one."""

    start = JSON_START

    def __init__(self, max_ws: int = MAX_WS):
        if not isinstance(max_ws, int) or max_ws < 0:
            raise ValueError(f"max_ws must be an int >= 0, got {max_ws!r}")
        self.max_ws = max_ws

    def step(self, st, c: int):
        return json_step(st, c, self.max_ws)

    @staticmethod
    def done(st) -> bool:
        return json_done(st)

    @staticmethod
    def in_plain_string(st) -> bool:
        """Inside a string with no escape or UTF-8 character open: bytes other than a quote, a
        backslash or a control byte keep it there, whatever else the state holds."""
        return st[0] == _STRING and st[3] == _NO_UTF8


JSON_OBJECT = JsonObjectGrammar()


def grammar_feed(grammar, st, data: bytes):
    """``grammar.step`` over ``data`` (None once a byte is rejected)."""
    for c in data:
        if st is None:
            return None
        st = grammar.step(st, c)
    return st


class JsonMasker:
    """Which tokens of a vocabulary may come next under a grammar (:class:`JsonObjectGrammar`,
    :class:`JsonSchemaGrammar`).

    ``token_bytes[t]``: the bytes token ``t`` adds (None or empty: never allowed).  Tokens sit in
    a byte trie; :meth:`allowed` walks it from a state, so tokens sharing a rejected prefix are
    dropped together (outside strings only tokens made of whitespace and JSON punctuation get
    past their first bytes).  Inside a string with no escape or UTF-8 character open, a token is
    allowed if it keeps the string open -- precomputed (``_in_string``: complete UTF-8 with no
    quote, backslash or control byte) -- or if a walk over the few tokens that hold one of those
    accepts it."""

    def __init__(self, token_bytes: Sequence[Optional[bytes]]):
        self.vocab_size = len(token_bytes)
        self.token_bytes = list(token_bytes)
        self._trie: Dict = {}
        in_string = torch.zeros(self.vocab_size, dtype=torch.bool)
        self._string_others: List[int] = []  # tokens a string needs a real walk for
        plain = _STRING, "{", 0, _NO_UTF8, 0  # (a string value inside an object)
        for t, bs in enumerate(self.token_bytes):
            if not bs:
                continue
            node = self._trie
            for c in bs:
                node = node.setdefault(c, [{}, []])
                node, ends = node[0], node[1]
            ends.append(t)
            end = json_feed(plain, bs) if not _LEAVES_STRING.intersection(bs) else None
            if end is not None and end[3] == _NO_UTF8:  # (never left the string: no quote / backslash)
                in_string[t] = True
            else:
                self._string_others.append(t)
        self._in_string = in_string
        self._cache: "collections.OrderedDict" = collections.OrderedDict()
        self._lock = threading.Lock()

    CACHE_SIZE = 256  # masks kept (a state recurs: every request inside a string at the same depth, ...)

    def allowed(self, st, grammar=JSON_OBJECT) -> torch.Tensor:
        """Bool ``[vocab_size]`` (read-only: cached per state): the tokens whose bytes all follow
        state ``st`` of ``grammar``."""
        key = (grammar, st)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        mask = self._allowed(st, grammar)
        with self._lock:
            self._cache[key] = mask
            if len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        return mask

    def _allowed(self, st, grammar) -> torch.Tensor:
        if grammar.in_plain_string(st):
            mask = self._in_string.clone()
            for t in self._string_others:
                if grammar_feed(grammar, st, self.token_bytes[t]) is not None:
                    mask[t] = True
            return mask
        ok: List[int] = []
        todo = [(self._trie, st)]
        step = grammar.step
        while todo:  # depth-first over the trie; a rejected byte prunes its whole subtree
            node, s = todo.pop()
            for c, (child, ends) in node.items():
                s2 = step(s, c)
                if s2 is None:
                    continue
                ok.extend(ends)
                if child:
                    todo.append((child, s2))
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        if ok:
            mask[torch.tensor(ok, dtype=torch.long)] = True
        return mask

    def apply(self, logits: torch.Tensor, st, grammar=JSON_OBJECT) -> torch.Tensor:
        """``logits`` ``[V]`` (float, changed in place and returned) with disallowed tokens at -inf;
        columns past the vocabulary table (LM-head padding) are disallowed too."""
        V = logits.numel()
        mask = self.allowed(st, grammar)
        if V > self.vocab_size:
            mask = torch.cat([mask, torch.zeros(V - self.vocab_size, dtype=torch.bool)])
        logits.masked_fill_(~mask[:V], float("-inf"))
        return logits


# ---- JSON Schema (OpenAI's response_format json_schema) --------------------------------------
# Frames of a configuration (a tuple of frames, innermost last):
#   ("V", node, ws)                  a value of ``node`` starts (after ``ws`` whitespace bytes)
#   ("G", json_step state, integer)  a string / number / any-value, lexed by json_step inside a
#                                    fake one-element array: the value is complete when that state
#                                    is back after its first element
#   ("L", literals, pos)             enum / const / boolean / null: literal byte strings matched so far
#   ("O", node, idx, phase, key, ws) an object; idx: the next property that may come
#   ("A", node, count, phase, ws)    an array of ``count`` items so far
# A state is a frozenset of configurations (anyOf / enum alternatives run side by side); the
# empty configuration is the finished document.
_O_FIRST, _O_KEY, _O_COLON, _O_VAL, _O_AFTER, _O_NEXT = range(6)
_A_FIRST, _A_VAL, _A_AFTER, _A_NEXT = range(4)
_G_VALUE = (_VALUE, "[", 0, None, 0)  # (json_step: a value as the first element of a fake array)
_SCHEMA_KEYS = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
                "const", "anyOf", "$ref", "$defs", "definitions", "description", "title", "default", "examples",
                "$schema", "$id", "$comment"}
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_FRAMES = 64


@functools.lru_cache(maxsize=64)
def schema_grammar(schema_json: str) -> "JsonSchemaGrammar":
    """The grammar of a schema given as JSON text (compiled once per distinct text)."""
    try:
        schema = json.loads(schema_json)
    except ValueError as e:
        raise ValueError(f"json_schema: not JSON ({e})") from None
    return JsonSchemaGrammar(schema)


class JsonSchemaGrammar:
    """A JSON Schema subset compiled to a byte-level recognizer (a grammar for :class:`JsonMasker`).

    Keywords: ``type`` (one or a list), ``properties`` / ``required`` / ``additionalProperties``
    (objects), ``items`` / ``minItems`` / ``maxItems`` (arrays), ``enum``, ``const``, ``anyOf``,
    ``$ref`` into ``#/$defs`` / ``#/definitions`` (recursion allowed); ``description``, ``title``,
    ``default``, ``examples`` are ignored.  Any other keyword is a ``ValueError`` naming it and
    where it is.  Generated documents always validate: an object's properties come in the
    schema's order, each required one present, optional ones possibly skipped, no others (as
    OpenAI's strict mode and xgrammar generate them); enum / const values in compact JSON; a
    schema without a type allows any JSON value.  The root must be an object or an array schema
    (OpenAI's rule is an object; an array is how several tool calls come back): either tells where
    the document ends."""

    def __init__(self, schema, max_ws: int = MAX_WS):
        if not isinstance(schema, dict):
            raise ValueError(f"json_schema: the schema must be an object, got {type(schema).__name__}")
        self.schema = schema
        self.max_ws = max_ws
        self._defs = {}
        for k in ("$defs", "definitions"):
            d = schema.get(k, {})
            if not isinstance(d, dict):
                raise ValueError(f"json_schema: '{k}' must be an object")
            for name, sub in d.items():
                self._defs[f"#/{k}/{name}"] = sub
        self.nodes: List = []
        self._refs: Dict[str, int] = {}
        self.root = self._compile(schema, "#")
        if self.nodes[self.root][0] not in ("object", "array"):
            raise ValueError("json_schema: the root must be an object or array schema ({'type': 'object', ...})")
        self.start = frozenset({(("V", self.root, 0),)})
        self._memo: dict = {}

    # -- compilation ------------------------------------------------------------------------------
    def _new(self, node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _compile(self, s, path: str) -> int:
        if s is True or s == {}:
            return self._new(("any",))
        if not isinstance(s, dict):
            raise ValueError(f"json_schema: {path} must be a schema object, got {s!r}")
        extra = sorted(set(s) - _SCHEMA_KEYS)
        if extra:
            raise ValueError(f"json_schema: {path}: unsupported keyword(s) {extra}")
        if "$ref" in s:
            ref = s["$ref"]
            if ref not in self._defs:
                raise ValueError(f"json_schema: {path}: $ref {ref!r} is not under #/$defs or #/definitions")
            if ref not in self._refs:
                self._refs[ref] = i = self._new(None)  # (placeholder first: recursive references)
                self.nodes[i] = self.nodes[self._compile(self._defs[ref], ref)]
                if self.nodes[i] is None:
                    raise ValueError(f"json_schema: {ref} refers to itself without describing a value")
            return self._refs[ref]
        if "anyOf" in s:
            alts = s["anyOf"]
            if not isinstance(alts, list) or not alts:
                raise ValueError(f"json_schema: {path}.anyOf must be a non-empty list")
            return self._new(("union", tuple(self._compile(a, f"{path}.anyOf[{i}]") for i, a in enumerate(alts))))
        if "const" in s or "enum" in s:
            vals = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"json_schema: {path}.enum must be a non-empty list")
            try:
                lits = tuple(dict.fromkeys(json.dumps(v, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
                                           .encode("utf-8") for v in vals))
            except (TypeError, ValueError) as e:
                raise ValueError(f"json_schema: {path}: enum / const values must be JSON ({e})") from None
            return self._new(("literal", lits))
        t = s.get("type")
        if t is None:
            return self._new(("any",))
        types = t if isinstance(t, list) else [t]
        bad = [x for x in types if x not in _TYPES]
        if bad or not types:
            raise ValueError(f"json_schema: {path}.type must be one of {list(_TYPES)} (or a list of them), got {t!r}")
        if len(types) > 1:
            return self._new(("union", tuple(self._compile({**s, "type": x}, path) for x in dict.fromkeys(types))))
        t = types[0]
        if t == "object":
            props = s.get("properties", {})
            req = s.get("required", [])
            ap = s.get("additionalProperties", True)
            if not isinstance(props, dict) or not isinstance(req, list):
                raise ValueError(f"json_schema: {path}: 'properties' must be an object, 'required' a list")
            missing = [r for r in req if r not in props]
            if missing:
                raise ValueError(f"json_schema: {path}: required {missing} not in properties")
            if not isinstance(ap, bool):
                raise ValueError(f"json_schema: {path}: additionalProperties must be true or false (a schema "
                                 "for extra properties is not supported)")
            plist = tuple((json.dumps(k, ensure_ascii=False).encode("utf-8"),
                           self._compile(v, f"{path}.properties.{k}"), k in req) for k, v in props.items())
            return self._new(("object", plist))
        if t == "array":
            mn, mx = s.get("minItems", 0), s.get("maxItems")
            if not isinstance(mn, int) or mn < 0 or (mx is not None and (not isinstance(mx, int) or mx < mn)):
                raise ValueError(f"json_schema: {path}: minItems / maxItems must be ints with 0 <= min <= max")
            return self._new(("array", self._compile(s.get("items", True), f"{path}.items"), mn, mx))
        if t == "boolean":
            return self._new(("literal", (b"true", b"false")))
        if t == "null":
            return self._new(("literal", (b"null",)))
        return self._new((t,))  # string, number, integer

    # -- recognition --------------------------------------------------------------------------
    @staticmethod
    def done(st) -> bool:
        return st is not None and () in st

    @staticmethod
    def in_plain_string(st) -> bool:
        return any(cfg and cfg[-1][0] == "G" and cfg[-1][1][0] == _STRING and cfg[-1][1][3] == _NO_UTF8
                   for cfg in st)

    def step(self, st, c: int):
        key = (st, c)  # (memoized: a masker's trie walk meets the same pair at many nodes)
        hit = self._memo.get(key, _MISSING)
        if hit is not _MISSING:
            return hit
        out = set()
        for cfg in st:
            if cfg:
                out.update(self._step(cfg, c))
        res = frozenset(out) if out else None
        if len(self._memo) >= 1 << 18:
            self._memo.clear()
        self._memo[key] = res
        return res

    def _complete(self, below: tuple) -> tuple:
        """The configuration after the value on top of ``below`` ended."""
        if not below:
            return ()
        p = below[-1]
        if p[0] == "O":
            return below[:-1] + (("O", p[1], p[2], _O_AFTER, None, 0),)
        return below[:-1] + (("A", p[1], p[2] + 1, _A_AFTER, 0),)

    def _start(self, nid: int, c: int, below: tuple, depth: int = 0) -> list:
        """Configurations after byte ``c`` opens a value of node ``nid`` on top of ``below``."""
        node = self.nodes[nid]
        kind = node[0]
        if kind == "union":
            if depth > 16:  # (an anyOf that refers to itself first)
                return []
            return [x for alt in node[1] for x in self._start(alt, c, below, depth + 1)]
        if len(below) >= MAX_FRAMES:
            return []
        if kind == "object":
            return [below + (("O", nid, 0, _O_FIRST, None, 0),)] if c == 0x7B else []
        if kind == "array":
            return [below + (("A", nid, 0, _A_FIRST, 0),)] if c == 0x5B else []
        if kind == "literal":
            return self._literal(tuple(l for l in node[1]), 0, c, below)
        if kind == "string" and c != 0x22:
            return []
        if kind in ("number", "integer") and c != 0x2D and c not in _DIGITS:
            return []
        g = json_step(_G_VALUE, c, self.max_ws)
        return [] if g is None else [below + (("G", g, kind == "integer"),)]

    def _literal(self, lits: tuple, pos: int, c: int, below: tuple) -> list:
        m = [l for l in lits if l[pos] == c]
        out = [self._complete(below)] if any(len(l) == pos + 1 for l in m) else []
        rest = tuple(l for l in m if len(l) > pos + 1)
        if rest:
            out.append(below + (("L", rest, pos + 1),))
        return out

    def _key_candidates(self, props: tuple, idx: int) -> tuple:
        """Properties that may come next: from ``idx`` up to and including the first required one."""
        out = []
        for j in range(idx, len(props)):
            out.append(j)
            if props[j][2]:
                break
        return tuple(out)

    @staticmethod
    def _may_close(props: tuple, idx: int) -> bool:
        return not any(p[2] for p in props[idx:])

    def _step(self, cfg: tuple, c: int) -> list:
        top, below = cfg[-1], cfg[:-1]
        kind = top[0]
        if kind == "V":
            if c in _WS:
                return [] if top[2] >= self.max_ws else [below + (("V", top[1], top[2] + 1),)]
            return self._start(top[1], c, below)
        if kind == "G":
            g, integer = top[1], top[2]
            if g[0] == _NUM and g[1] == "[":  # a number at the value's own level: it ends at a non-number byte
                g2 = None if integer and c in b".eE" else json_step(g, c, self.max_ws)
                if g2 is not None and g2[0] == _NUM:
                    return [below + (("G", g2, integer),)]
                return self._step(self._complete(below), c) if _N_END_OK[g[2]] and below else []
            g2 = json_step(g, c, self.max_ws)
            if g2 is None:
                return []
            if g2[0] == _AFTER and g2[1] == "[":
                return [self._complete(below)]
            return [below + (("G", g2, integer),)]
        if kind == "L":
            return self._literal(top[1], top[2], c, below)
        if kind == "O":
            _, nid, idx, phase, key, ws = top
            props = self.nodes[nid][1]
            if phase == _O_KEY:  # key: (candidate property indices, bytes matched)
                cands, pos = key
                m = [j for j in cands if props[j][0][pos] == c]
                out = [below + (("O", nid, j + 1, _O_COLON, j, 0),) for j in m if len(props[j][0]) == pos + 1]
                rest = tuple(j for j in m if len(props[j][0]) > pos + 1)
                if rest:
                    out.append(below + (("O", nid, idx, _O_KEY, (rest, pos + 1), 0),))
                return out
            if c in _WS:
                return [] if ws >= self.max_ws else [below + (("O", nid, idx, phase, key, ws + 1),)]
            if phase in (_O_FIRST, _O_NEXT):
                if c == 0x22:
                    cands = self._key_candidates(props, idx)
                    return [below + (("O", nid, idx, _O_KEY, (cands, 1), 0),)] if cands else []
                if c == 0x7D and phase == _O_FIRST and self._may_close(props, idx):
                    return [self._complete(below)]
                return []
            if phase == _O_COLON:
                if c != 0x3A:
                    return []
                return [below + (("O", nid, idx, _O_VAL, key, 0), ("V", props[key][1], 0))]
            if phase == _O_AFTER:
                if c == 0x2C and self._key_candidates(props, idx):
                    return [below + (("O", nid, idx, _O_NEXT, None, 0),)]
                if c == 0x7D and self._may_close(props, idx):
                    return [self._complete(below)]
            return []
        # "A"
        _, nid, count, phase, ws = top
        _, item, mn, mx = self.nodes[nid]
        if c in _WS and phase != _A_VAL:
            return [] if ws >= self.max_ws else [below + (("A", nid, count, phase, ws + 1),)]
        if phase == _A_AFTER:
            if c == 0x2C and (mx is None or count < mx):
                return [below + (("A", nid, count, _A_NEXT, 0),)]
            return [self._complete(below)] if c == 0x5D and count >= mn else []
        if c == 0x5D and phase == _A_FIRST:
            return [self._complete(below)] if mn == 0 else []
        if phase == _A_FIRST and mx == 0:
            return []
        return self._start(item, c, below + (("A", nid, count, _A_VAL, 0),))


class ChoiceGrammar:
    """The output is exactly one of ``choices`` (vLLM's ``guided_choice``).  A state is (bytes
    matched, indices of the choices still possible).  It is :meth:`done` when every remaining
    choice is complete; where a complete choice is also the start of a longer one ("yes" /
    "yes!"), :meth:`can_end` lets the engine allow EOS, so either may be the answer."""

    def __init__(self, choices: Sequence[str]):
        self.choices = tuple(c.encode("utf-8") for c in choices)
        self.start = (0, tuple(range(len(self.choices))))

    def step(self, st, c: int):
        pos, cands = st
        m = tuple(j for j in cands if len(self.choices[j]) > pos and self.choices[j][pos] == c)
        return (pos + 1, m) if m else None

    def done(self, st) -> bool:
        return st is not None and all(len(self.choices[j]) == st[0] for j in st[1])

    def can_end(self, st) -> bool:
        return st is not None and any(len(self.choices[j]) == st[0] for j in st[1])

    @staticmethod
    def in_plain_string(st) -> bool:
        return False


@functools.lru_cache(maxsize=64)
def choice_grammar(choices: Tuple[str, ...]) -> ChoiceGrammar:
    return ChoiceGrammar(choices)


# ---- transformers generate ----------------------------------------------------------------------
_MASKERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {(len, vocab): masker}


def masker_for(tokenizer, vocab_size: int) -> JsonMasker:
    """One :class:`JsonMasker` per (tokenizer, vocabulary size), kept while the tokenizer lives."""
    key = (len(tokenizer), vocab_size)
    try:
        per = _MASKERS.setdefault(tokenizer, {})
    except TypeError:  # (a tokenizer that takes no weak references: no caching)
        per = {}
    m = per.get(key)
    if m is None:
        m = per[key] = JsonMasker(token_bytes_table(tokenizer, vocab_size))
    return m


class JsonLogitsProcessor:
    """A transformers ``LogitsProcessor``: ``model.generate(..., logits_processor=[JsonLogitsProcessor(
    tok)])`` generates one JSON object (``schema``: a document of that JSON Schema, a dict or its
    JSON text), the same masking as the server's JSON mode.  Once a row's document is complete
    only EOS is allowed, so ``generate`` stops there.  Works with batches (each row has its own
    state; left padding, as ``generate`` wants for decoder-only models) and with sampling:
    transformers applies it before temperature / top-k / top-p, as the server does.  One
    processor per ``generate`` call (it tells a new call by the input length)."""

    def __init__(self, tokenizer, schema=None, eos_token_id: Optional[int] = None):
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("JsonLogitsProcessor needs an EOS token id to end the output (eos_token_id=...)")
        self.tokenizer = tokenizer
        self.eos = int(eos)
        if schema is None:
            self.grammar = JSON_OBJECT
        else:
            self.grammar = schema_grammar(schema if isinstance(schema, str) else json.dumps(schema))
        self._seen: Optional[int] = None  # input length at the previous call
        self._states: List = []
        self._masker: Optional[JsonMasker] = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, V = scores.shape
        if self._masker is None:
            self._masker = masker_for(self.tokenizer, V)
        T = input_ids.shape[1]
        if self._seen is None or T != self._seen + 1 or len(self._states) != B:
            self._states = [self.grammar.start] * B  # (a new generate call: fresh states)
        else:
            new = input_ids[:, -1].tolist()  # (called once per step: the token chosen last step)
            for i, t in enumerate(new):
                st = self._states[i]
                if st is not None and not self.grammar.done(st):
                    self._states[i] = grammar_feed(self.grammar, st, self._masker.token_bytes[t] or b"\x00")
        self._seen = T
        out = scores.clone()
        for i, st in enumerate(self._states):
            if st is None or self.grammar.done(st):  # complete (or broken): end the row
                out[i] = float("-inf")
                out[i, self.eos] = 0.0
            else:
                row = self._masker.apply(out[i].float().cpu(), st, self.grammar)
                out[i] = row.to(out.dtype).to(out.device)
        return out
