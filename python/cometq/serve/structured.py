"""Structured output: OpenAI's JSON mode (``response_format: {"type": "json_object"}``).

Generation is constrained token by token so the output is always a prefix of one JSON object
(RFC 8259 syntax, strict: no NaN / Infinity, no control characters in strings, well-formed UTF-8
-- no overlong forms, no UTF-16 surrogates as raw bytes), and the request finishes ("stop") the
moment the object closes.  Before each sampling step every token that cannot continue the
output is masked to -inf, so greedy decoding is the argmax of the allowed tokens and sampling
(temperature, top-k, top-p) draws from the model's distribution restricted to them, as vLLM's
guided decoding does.

Two pieces:

* :func:`json_step` -- the byte-level recognizer: a pure function ``(state, byte) -> state``
  (``None``: the byte cannot follow).  States are small tuples, so a search can branch on them
  without copying anything.
* :class:`JsonMasker` -- the allowed-token mask for a state over a whole vocabulary: token byte
  strings in a trie walked depth-first from the state (a branch stops at its first rejected
  byte), with a precomputed fast path inside strings, where almost every token is allowed.

Two limits keep degenerate outputs finite: at most ``MAX_WS`` whitespace bytes in a row between
tokens and ``MAX_DEPTH`` nested containers.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .sampling import bytes_to_unicode

__all__ = ["JSON_START", "json_step", "json_feed", "json_done", "JsonMasker", "token_bytes_table",
           "MAX_WS", "MAX_DEPTH"]

MAX_WS = 48  # whitespace bytes in a row between tokens (a pretty-printed line break + indent fits)
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


def _value(stack: str, c: int, ws: int, allow_close: bool):
    """A value starts with byte ``c`` (state _VALUE / _VALUE_OR_CLOSE)."""
    if c in _WS:
        return None if ws >= MAX_WS else (_VALUE_OR_CLOSE if allow_close else _VALUE, stack, 0, None, ws + 1)
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


def _after(stack: str, c: int, ws: int):
    """After a value inside a container: ',' or the container's close (state _AFTER)."""
    if c in _WS:
        return None if ws >= MAX_WS else (_AFTER, stack, 0, None, ws + 1)
    top = stack[-1]
    if c == 0x2C:  # ,
        return (_KEY, stack, 0, None, 0) if top == "{" else (_VALUE, stack, 0, None, 0)
    if (c == 0x7D and top == "{") or (c == 0x5D and top == "["):
        return _close(stack)
    return None


def json_step(st: tuple, c: int) -> Optional[tuple]:
    """The state after byte ``c`` (0..255), or None when no JSON object continues that way."""
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
        return _after(stack, c, 0) if _N_END_OK[a] else None  # the number ended: this byte follows it
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
        return _after(stack, c, ws)
    if mode == _VALUE or mode == _VALUE_OR_CLOSE:
        return _value(stack, c, ws, mode == _VALUE_OR_CLOSE)
    if mode == _KEY or mode == _KEY_OR_CLOSE:
        if c in _WS:
            return None if ws >= MAX_WS else (mode, stack, 0, None, ws + 1)
        if c == 0x22:
            return (_STRING, stack, 1, _NO_UTF8, 0)
        return _close(stack) if c == 0x7D and mode == _KEY_OR_CLOSE else None
    if mode == _COLON:
        if c in _WS:
            return None if ws >= MAX_WS else (_COLON, stack, 0, None, ws + 1)
        return (_VALUE, stack, 0, None, 0) if c == 0x3A else None
    if mode == _START:
        if c in _WS:
            return None if ws >= MAX_WS else (_START, "", 0, None, ws + 1)
        return (_KEY_OR_CLOSE, "{", 0, None, 0) if c == 0x7B else None
    return None  # _DONE: nothing follows the object


def json_feed(st: Optional[tuple], data: bytes) -> Optional[tuple]:
    """:func:`json_step` over ``data`` (None once a byte is rejected)."""
    for c in data:
        if st is None:
            return None
        st = json_step(st, c)
    return st


def json_done(st: Optional[tuple]) -> bool:
    """The top-level object is complete."""
    return st is not None and st[0] == _DONE


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


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


class JsonMasker:
    """Which tokens of a vocabulary may come next in a JSON-mode output.

    ``token_bytes[t]``: the bytes token ``t`` adds (None or empty: never allowed).  Tokens sit in
    a byte trie; :meth:`allowed` walks it from a state, so tokens sharing a rejected prefix are
    dropped together (outside strings only tokens made of whitespace and JSON punctuation get
    past their first bytes).  Inside a string with no UTF-8 character open, a token is allowed
    iff it keeps the string open: precomputed (``_in_string``: complete UTF-8 with no quote,
    backslash or control byte) plus a walk over the few tokens that do hold one of those."""

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

    def allowed(self, st: tuple) -> torch.Tensor:
        """Bool ``[vocab_size]``: the tokens whose bytes all follow state ``st``."""
        if st[0] == _STRING and st[3] == _NO_UTF8:
            mask = self._in_string.clone()
            for t in self._string_others:
                if json_feed(st, self.token_bytes[t]) is not None:
                    mask[t] = True
            return mask
        ok: List[int] = []
        todo = [(self._trie, st)]
        while todo:  # depth-first over the trie; a rejected byte prunes its whole subtree
            node, s = todo.pop()
            for c, (child, ends) in node.items():
                s2 = json_step(s, c)
                if s2 is None:
                    continue
                ok.extend(ends)
                if child:
                    todo.append((child, s2))
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        if ok:
            mask[torch.tensor(ok, dtype=torch.long)] = True
        return mask

    def apply(self, logits: torch.Tensor, st: tuple) -> torch.Tensor:
        """``logits`` ``[V]`` (float, changed in place and returned) with disallowed tokens at -inf;
        columns past the vocabulary table (LM-head padding) are disallowed too."""
        V = logits.numel()
        mask = self.allowed(st)
        if V > self.vocab_size:
            mask = torch.cat([mask, torch.zeros(V - self.vocab_size, dtype=torch.bool)])
        logits[~mask[:V]] = float("-inf")
        return logits
