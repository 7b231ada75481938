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
  EOS may end the output here), ``in_plain_string(state)`` or ``plain_string_spec(state)``:
  :class:`JsonObjectGrammar`, :class:`.schema.JsonSchemaGrammar`, :class:`ChoiceGrammar`,
  :class:`.regex.RegexGrammar`.
* :class:`TokenMasker` -- the allowed-token mask for a grammar state over a whole vocabulary: token
  byte strings in a trie walked depth-first from the state (a branch stops at its first rejected
  byte), or, where the state lets most tokens start, byte column by byte column over all tokens
  at once; precomputed fast paths inside strings, where almost every token is allowed.
* :class:`GrammarLogitsProcessor` / :class:`JsonLogitsProcessor` -- the same masks for transformers
  ``generate``.

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

import numpy as np
import torch

from .sampling import _BYTE_PIECE, bytes_to_unicode

__all__ = ["JSON_START", "JSON_OBJECT", "json_step", "json_feed", "json_done", "TokenMasker", "JsonMasker",
           "JsonObjectGrammar", "JsonSchemaGrammar", "schema_grammar", "ChoiceGrammar", "choice_grammar",
           "grammar_feed", "GrammarLogitsProcessor", "JsonLogitsProcessor", "masker_for", "token_bytes_table",
           "MAX_WS", "MAX_DEPTH"]

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
    request ends when the object closes -- or an unknown one; never allowed by a constraint).
    Byte-level BPE pieces map back through GPT-2's byte alphabet,
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
    """JSON mode as a grammar for :class:`TokenMasker`: states of :func:`json_step` (``max_ws``
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


class TokenMasker:
    """Which tokens of a vocabulary may come next under a grammar (:class:`JsonObjectGrammar`,
    :class:`.schema.JsonSchemaGrammar`, :class:`ChoiceGrammar`, :class:`.regex.RegexGrammar`).

    ``token_bytes[t]``: the bytes token ``t`` adds (None or empty: never allowed).  Tokens sit in
    a byte trie; :meth:`allowed` walks it from a state, so tokens sharing a rejected prefix are
    dropped together (outside strings only tokens made of whitespace and JSON punctuation get
    past their first bytes).  A state whose allowed first bytes start more than ``WIDE_STATE``
    tokens (a permissive regex) is walked by byte columns instead (:meth:`_walk_columns`).  Inside
    a string with no escape or UTF-8 character open, a token is allowed if it keeps the string
    open -- precomputed (``_in_string``: complete UTF-8 with no quote, backslash or control byte)
    -- or if a walk over the few tokens that hold one of those accepts it.  A grammar with
    ``plain_string_spec(state)`` (:class:`.schema.JsonSchemaGrammar`: strings with a length limit
    or a repeated character class) narrows the quote-free tokens to a class and a most number of
    characters (``_chars``: characters per token)."""

    def __init__(self, token_bytes: Sequence[Optional[bytes]]):
        self.vocab_size = len(token_bytes)
        self.token_bytes = list(token_bytes)
        self._trie: Dict = {}
        in_string = torch.zeros(self.vocab_size, dtype=torch.bool)
        chars = torch.zeros(self.vocab_size, dtype=torch.int32)
        self._string_others: List[int] = []  # tokens a string needs a real walk for
        first_count: Dict[int, int] = {}  # first byte -> tokens starting with it
        plain = _STRING, "{", 0, _NO_UTF8, 0  # (a string value inside an object)
        for t, bs in enumerate(self.token_bytes):
            if not bs:
                continue
            node = self._trie
            for c in bs:
                node = node.setdefault(c, [{}, []])
                node, ends = node[0], node[1]
            ends.append(t)
            first_count[bs[0]] = first_count.get(bs[0], 0) + 1
            end = json_feed(plain, bs) if not _LEAVES_STRING.intersection(bs) else None
            if end is not None and end[3] == _NO_UTF8:  # (never left the string: no quote / backslash)
                in_string[t] = True
                chars[t] = sum(1 for c in bs if not 0x80 <= c <= 0xBF)
            else:
                self._string_others.append(t)
        self._in_string = in_string
        self._chars = chars
        self._class_masks: Dict = {}
        self._first_count = first_count
        self._bytes: Optional[np.ndarray] = None  # (the token matrix of the column walk)
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
        spec_of = getattr(grammar, "plain_string_spec", None)
        spec = spec_of(st) if spec_of is not None else ([(None, None)] if grammar.in_plain_string(st) else None)
        if spec is not None:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            for klass, budget in spec:
                base = self._in_string if klass is None else self._class_mask(klass)
                mask |= base if budget is None else base & (self._chars <= budget)
            for t in self._string_others:
                if grammar_feed(grammar, st, self.token_bytes[t]) is not None:
                    mask[t] = True
            return mask
        step = grammar.step
        if sum(n for c, n in self._first_count.items() if step(st, c) is not None) > self.WIDE_STATE:
            return self._walk_columns(st, grammar)
        ok: List[int] = []
        todo = [(self._trie, st)]
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

    # a state whose allowed first bytes start more tokens than this (a permissive regex, a string
    # with a pattern) is walked column by column over all tokens at once: measured on SmolLM2's
    # 49k tokens (CPU, 2026-11-29), ~15 ms against the trie's ~100-140 ms there, while the trie
    # takes ~1 ms in structural states, where the column walk takes ~2.
    WIDE_STATE = 4096

    MAX_COLUMNS = 64  # token bytes the matrix holds (a vocabulary's few longer tokens are finished one by one)

    def _token_matrix(self) -> np.ndarray:
        """The tokens' first bytes as rows ``[V, W + 1]`` (W = the longest token, at most
        ``MAX_COLUMNS``), padded with 256; column W is 257 for a token with more bytes than W
        (built once, on first use; ~6.4 MB for SmolLM2's 49k tokens)."""
        with self._lock:
            if self._bytes is None:
                w = min(max(len(b) if b else 0 for b in self.token_bytes), self.MAX_COLUMNS)
                mat = np.full((self.vocab_size, w + 1), 256, dtype=np.int16)
                for t, b in enumerate(self.token_bytes):
                    if b:
                        mat[t, :min(len(b), w)] = np.frombuffer(b[:w], dtype=np.uint8)
                        if len(b) > w:
                            mat[t, w] = 257
                self._bytes = mat
            return self._bytes

    def _walk_columns(self, st, grammar) -> torch.Tensor:
        """The tokens ``st`` allows, byte column by byte column: each column steps only the
        distinct (state, byte) pairs among the tokens still alive (a lazily built DFA), then
        gathers.  Same result as the trie walk."""
        mat = self._token_matrix()
        idx = np.nonzero(mat[:, 0] != 256)[0]
        cur = np.zeros(len(idx), dtype=np.int64)
        states, ids = [st], {st: 0}
        ok = []
        step = grammar.step
        j = 0
        while len(idx):
            b = mat[idx, j].astype(np.int64)
            ended = b == 256
            if ended.any():  # (every byte of these tokens was taken)
                ok.append(idx[ended])
                live = ~ended
                idx, cur, b = idx[live], cur[live], b[live]
                if not len(idx):
                    break
            if j == mat.shape[1] - 1:  # (tokens longer than the matrix: their other bytes one by one)
                rest = [t for t, k in zip(idx.tolist(), cur.tolist())
                        if grammar_feed(grammar, states[k], self.token_bytes[t][j:]) is not None]
                ok.append(np.array(rest, dtype=np.int64))
                break
            codes = cur * 256 + b
            table = np.full(len(states) * 256, -1, dtype=np.int64)
            seen = np.zeros(len(table), dtype=bool)
            seen[codes] = True
            for code in np.nonzero(seen)[0].tolist():
                s2 = step(states[code >> 8], code & 255)
                if s2 is not None:
                    k = ids.get(s2)
                    if k is None:
                        k = ids[s2] = len(states)
                        states.append(s2)
                    table[code] = k
            cur = table[codes]
            keep = cur >= 0
            idx, cur = idx[keep], cur[keep]
            j += 1
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        if ok:
            mask[torch.from_numpy(np.concatenate(ok))] = True
        return mask

    def _class_mask(self, klass) -> torch.Tensor:
        """The quote-free tokens whose characters all belong to ``klass`` (a :class:`.regex.CharClass`):
        a byte table over the token matrix (every non-ASCII character is in a negated class, none
        in a plain one unless listed: those tokens are checked character by character)."""
        with self._lock:
            hit = self._class_masks.get(klass)
        if hit is None:
            mat = self._token_matrix()
            tab = np.zeros(258, dtype=bool)  # (257, a longer token's mark, is checked below)
            tab[256] = tab[257] = True
            for b in range(0x80):
                tab[b] = (b in klass.ascii) != klass.neg
            tab[0x80:0x100] = klass.neg
            plain = self._in_string.numpy()
            ok = tab[mat].all(axis=1) & plain
            check = plain & (mat[:, -1] == 257)  # (longer than the matrix: checked whole)
            if klass.other and not klass.neg:
                check |= plain & ((mat >= 0x80) & (mat < 0x100)).any(axis=1)  # (plain tokens with non-ASCII)
            if check.any():
                for t in np.nonzero(check)[0].tolist():
                    ok[t] = all(klass.contains(ch) for ch in self.token_bytes[t].decode("utf-8"))
            hit = torch.from_numpy(ok)
            with self._lock:
                if len(self._class_masks) >= 64:
                    self._class_masks.clear()
                self._class_masks[klass] = hit
        return hit

    def apply(self, logits: torch.Tensor, st, grammar=JSON_OBJECT) -> torch.Tensor:
        """``logits`` ``[V]`` (float, changed in place and returned) with disallowed tokens at -inf;
        columns past the vocabulary table (LM-head padding) are disallowed too."""
        V = logits.numel()
        mask = self.allowed(st, grammar)
        if V > self.vocab_size:
            mask = torch.cat([mask, torch.zeros(V - self.vocab_size, dtype=torch.bool)])
        logits.masked_fill_(~mask[:V], float("-inf"))
        return logits


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


def masker_for(tokenizer, vocab_size: int) -> TokenMasker:
    """One :class:`TokenMasker` per (tokenizer, vocabulary size), kept while the tokenizer lives."""
    key = (len(tokenizer), vocab_size)
    try:
        per = _MASKERS.setdefault(tokenizer, {})
    except TypeError:  # (a tokenizer that takes no weak references: no caching)
        per = {}
    m = per.get(key)
    if m is None:
        m = per[key] = TokenMasker(token_bytes_table(tokenizer, vocab_size))
    return m


class GrammarLogitsProcessor:
    """A transformers ``LogitsProcessor`` that constrains ``model.generate`` to a grammar's outputs,
    the same masking as the server: ``model.generate(..., logits_processor=[GrammarLogitsProcessor.
    for_regex(tok, r"\\d{3}-\\d{4}")])`` (also :meth:`for_choice`, and :class:`JsonLogitsProcessor`
    for JSON mode / a JSON Schema).  EOS is allowed where the grammar ``can_end`` (a complete
    regex match or choice) and is the only token once it is ``done``, so ``generate`` stops there.
    Works with batches (each row has its own state; left padding, as ``generate`` wants for
    decoder-only models) and with sampling: transformers applies it before temperature / top-k /
    top-p, as the server does.  One processor per ``generate`` call (it tells a new call by the
    input length)."""

    def __init__(self, tokenizer, grammar, eos_token_id: Optional[int] = None):
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(f"{type(self).__name__} needs an EOS token id to end the output (eos_token_id=...)")
        for attr in ("start", "step", "done"):
            if not hasattr(grammar, attr):
                raise TypeError(f"{type(self).__name__}: grammar must have start / step / done, "
                                f"got {type(grammar).__name__}")
        self.tokenizer = tokenizer
        self.eos = int(eos)
        self.grammar = grammar
        self._seen: Optional[int] = None  # input length at the previous call
        self._states: List = []
        self._masker: Optional[TokenMasker] = None

    @classmethod
    def for_regex(cls, tokenizer, pattern: str, eos_token_id: Optional[int] = None) -> "GrammarLogitsProcessor":
        """The output matches ``pattern`` in whole (vLLM's ``guided_regex`` subset: :mod:`.regex`)."""
        from .regex import regex_grammar

        return cls(tokenizer, regex_grammar(pattern), eos_token_id)

    @classmethod
    def for_choice(cls, tokenizer, choices: Sequence[str],
                   eos_token_id: Optional[int] = None) -> "GrammarLogitsProcessor":
        """The output is exactly one of ``choices`` (vLLM's ``guided_choice``)."""
        if (isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices)
                or len(set(choices)) != len(choices)):
            raise ValueError(f"choices must be distinct non-empty strings, got {choices!r}")
        return cls(tokenizer, choice_grammar(tuple(choices)), eos_token_id)

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
        can_end = getattr(self.grammar, "can_end", None)
        for i, st in enumerate(self._states):
            if st is None or self.grammar.done(st):  # complete (or broken): end the row
                out[i] = float("-inf")
                out[i, self.eos] = 0.0
            else:
                eos_score = out[i, self.eos].clone()
                row = self._masker.apply(out[i].float().cpu(), st, self.grammar)
                out[i] = row.to(out.dtype).to(out.device)
                if can_end is not None and can_end(st):  # (a complete match may end here, or go on)
                    out[i, self.eos] = eos_score
        return out


class JsonLogitsProcessor(GrammarLogitsProcessor):
    """``model.generate(..., logits_processor=[JsonLogitsProcessor(tok)])`` generates one JSON object
    (``schema``: a document of that JSON Schema, a dict or its JSON text), the same masking as the
    server's JSON mode (see :class:`GrammarLogitsProcessor`)."""

    def __init__(self, tokenizer, schema=None, eos_token_id: Optional[int] = None):
        if schema is None:
            grammar = JSON_OBJECT
        elif not isinstance(schema, (str, dict)):
            raise TypeError(f"JsonLogitsProcessor: schema must be a dict or JSON text, got {type(schema).__name__}")
        else:
            from .schema import schema_grammar
            grammar = schema_grammar(schema if isinstance(schema, str) else json.dumps(schema))
        super().__init__(tokenizer, grammar, eos_token_id)


JsonMasker = TokenMasker  # (its first name: it began with JSON mode)


def __getattr__(name):  # (the JSON Schema grammar lives in .schema, which imports this module)
    if name in ("JsonSchemaGrammar", "schema_grammar"):
        from . import schema
        return getattr(schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
