"""Regular-expression constraint (vLLM's ``guided_regex``): a byte-level NFA the masker walks.

The output must match the whole pattern (``re.fullmatch``).  Supported: literals (any Unicode,
matched as UTF-8), ``.`` (any character but a newline), classes ``[...]`` / ``[^...]`` with
ranges and ``\\d \\w \\s \\D \\W \\S`` (ASCII meanings; a negated class may only list ASCII),
``\\xhh`` / ``\\uhhhh`` characters,
groups ``(...)`` / ``(?:...)`` / ``(?P<name>...)``, ``|``, quantifiers ``* + ? {n} {n,} {n,m}``
(lazy forms accepted: the language is the same), escapes of metacharacters and ``\\n \\t \\r``,
``^`` at the start and ``$`` at the end (no-ops for a whole-output match).  Anything else
(backreferences, lookarounds, flags, possessive quantifiers, ``\\b``) is a ``ValueError`` naming
it.  Thompson construction: a state is the frozenset of NFA states reachable (epsilon-closed).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple

__all__ = ["RegexGrammar", "regex_grammar", "MAX_NFA_STATES", "CharClass", "class_repeat"]

MAX_NFA_STATES = 20000  # (bounded {n,m} expansion)
_MEMO_SIZE = 1 << 18  # memoized transitions kept per pattern
_MISSING = object()

_DIGIT = frozenset(range(0x30, 0x3A))
_WORD = frozenset(list(range(0x30, 0x3A)) + list(range(0x41, 0x5B)) + list(range(0x61, 0x7B)) + [0x5F])
_SPACE = frozenset(b" \t\n\r\f\v")
_ASCII = frozenset(range(0x80))
_CLASS_ESC = {"d": (_DIGIT, False), "w": (_WORD, False), "s": (_SPACE, False),
              "D": (_DIGIT, True), "W": (_WORD, True), "S": (_SPACE, True)}
_CHAR_ESC = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}
_META = set(".^$*+?{}[]()|\\/-")


class _Parser:
    """Recursive descent over the pattern -> AST: ("chars", frozenset of ASCII bytes, negated,
    tuple of non-ASCII characters) | ("str", bytes) | ("cat", [..]) | ("alt", [..]) |
    ("rep", node, lo, hi or None)."""

    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0

    def error(self, msg: str):
        raise ValueError(f"guided_regex: {msg} at position {self.i} of {self.p!r}")

    def peek(self) -> Optional[str]:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        ch = self.p[self.i]
        self.i += 1
        return ch

    def parse(self):
        if self.p.startswith("^"):
            self.i = 1
        node = self.alt()
        if self.i != len(self.p):
            self.error("unbalanced ')'" if self.p[self.i] == ")" else f"unexpected {self.p[self.i]!r}")
        return node

    def alt(self):
        branches = [self.cat()]
        while self.peek() == "|":
            self.take()
            branches.append(self.cat())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def cat(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            if self.peek() == "$" and self.i == len(self.p) - 1:
                self.take()  # (end anchor: a whole-output match ends there anyway)
                continue
            items.append(self.repeat())
        return items[0] if len(items) == 1 else ("cat", items)

    def repeat(self):
        node = self.atom()
        while self.peek() in ("*", "+", "?", "{"):
            ch = self.peek()
            if ch == "{":
                q = self.braces()
                if q is None:  # (a literal '{', as Python's re reads it)
                    break
                lo, hi = q
            else:
                self.take()
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
            if self.peek() == "?":
                self.take()  # lazy: the same language
            elif self.peek() == "+":
                self.error("possessive quantifiers are not supported")
            node = ("rep", node, lo, hi)
        return node

    def braces(self) -> Optional[Tuple[int, Optional[int]]]:
        j = self.p.find("}", self.i)
        body = self.p[self.i + 1:j] if j > 0 else ""
        lo_s, comma, hi_s = body.partition(",")
        if j < 0 or (lo_s and not lo_s.isdigit()) or (hi_s and not hi_s.isdigit()) or not (lo_s or comma):
            return None
        self.i = j + 1
        lo = int(lo_s) if lo_s else 0  # ({,n}: Python's re reads a missing minimum as 0)
        hi = lo if not comma else (int(hi_s) if hi_s else None)
        if hi is not None and hi < lo:
            self.error(f"{{{body}}}: the maximum is below the minimum")
        if lo > 1000 or (hi or 0) > 1000:
            self.error(f"{{{body}}}: counts above 1000 are not supported")
        return lo, hi

    def atom(self):
        ch = self.peek()
        if ch in ("*", "+", "?"):
            self.error(f"nothing to repeat before {ch!r}")
        if ch == "(":
            self.take()
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i):
                j = self.p.find(">", self.i)
                if j < 0:
                    self.error("unterminated group name")
                self.i = j + 1
            elif self.peek() == "?":
                self.error(f"'(?{self.p[self.i + 1:self.i + 2]}' (lookaround, flags, backreference) is not supported")
            node = self.alt()
            if self.peek() != ")":
                self.error("missing ')'")
            self.take()
            return node
        if ch == "[":
            return self.char_class()
        if ch == ".":
            self.take()
            return ("chars", frozenset(b"\n"), True, ())
        if ch == "\\":
            return self.escape(in_class=False)
        if ch in ("^", "$"):
            self.error(f"{ch!r} is only supported at the {'start' if ch == '^' else 'end'}")
        if ch == ")":
            self.error("unbalanced ')'")
        self.take()
        return ("str", ch.encode("utf-8"))

    def escape(self, in_class: bool):
        self.take()
        ch = self.peek()
        if ch is None:
            self.error("a trailing backslash")
        self.take()
        if ch in _CLASS_ESC:
            s, neg = _CLASS_ESC[ch]
            return ("chars", s, neg, ())
        if ch in _CHAR_ESC:
            return ("str", _CHAR_ESC[ch].encode())
        if ch in "xu":
            return ("str", self.hex_char(ch).encode("utf-8"))
        if ch in _META or not ch.isalnum():
            return ("str", ch.encode("utf-8"))
        self.error(f"'\\{ch}' is not supported")

    def hex_char(self, kind: str) -> str:
        """The character of ``\\xhh`` / ``\\uhhhh`` (the escape letter already taken)."""
        n = 2 if kind == "x" else 4
        digits = self.p[self.i:self.i + n]
        if len(digits) != n or any(c not in "0123456789abcdefABCDEF" for c in digits):
            self.error(f"'\\{kind}' needs {n} hex digits")
        self.i += n
        cp = int(digits, 16)
        if 0xD800 <= cp <= 0xDFFF:
            self.error(f"'\\u{digits}' is a UTF-16 surrogate (not a character)")
        return chr(cp)

    def char_class(self):
        self.take()
        neg = self.peek() == "^"
        if neg:
            self.take()
        ascii_set, other = set(), []
        first = True
        while True:
            ch = self.peek()
            if ch is None:
                self.error("missing ']'")
            if ch == "]" and not first:
                self.take()
                break
            first = False
            lo = self.class_char()
            if isinstance(lo, tuple):  # \d \w \s inside a class
                s, n = lo
                if n:
                    self.error("a negated escape (\\D, \\W, \\S) inside a class is not supported")
                ascii_set |= s
                continue
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.take()
                hi = self.class_char()
                if isinstance(hi, tuple) or ord(hi) < ord(lo):
                    self.error(f"bad range {lo!r}-{hi!r}")
                if ord(hi) - max(ord(lo), 0x80) + 1 + len(other) > 4096:  # (checked before expanding it)
                    self.error("a class with more than 4096 non-ASCII characters is not supported")
                chars = [chr(c) for c in range(ord(lo), ord(hi) + 1)]
            else:
                chars = [lo]
            for c in chars:
                if ord(c) < 0x80:
                    ascii_set.add(ord(c))
                else:
                    other.append(c)
            if len(other) > 4096:
                self.error("a class with more than 4096 non-ASCII characters is not supported")
        if neg and other:
            self.error("a negated class may only list ASCII characters")
        return ("chars", frozenset(ascii_set), neg, tuple(other))

    def class_char(self):
        ch = self.peek()
        if ch == "\\":
            self.take()
            e = self.peek()
            if e is None:
                self.error("a trailing backslash")
            self.take()
            if e in _CLASS_ESC:
                return _CLASS_ESC[e]
            if e in _CHAR_ESC:
                return _CHAR_ESC[e]
            if e in "xu":
                return self.hex_char(e)
            if e.isalnum():
                self.error(f"'\\{e}' is not supported")
            return e
        self.take()
        return ch


# UTF-8 sequences of one non-ASCII character (RFC 3629), as byte-range steps
_UTF8_MULTI = [
    [(0xC2, 0xDF), (0x80, 0xBF)],
    [(0xE0, 0xE0), (0xA0, 0xBF), (0x80, 0xBF)],
    [(0xE1, 0xEC), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xED, 0xED), (0x80, 0x9F), (0x80, 0xBF)],
    [(0xEE, 0xEF), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xF0, 0xF0), (0x90, 0xBF), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xF1, 0xF3), (0x80, 0xBF), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xF4, 0xF4), (0x80, 0x8F), (0x80, 0xBF), (0x80, 0xBF)],
]


class RegexGrammar:
    """A pattern compiled to a byte-level NFA (Thompson): ``edges[s]`` = [(lo, hi, target)],
    ``eps[s]`` = epsilon targets; a grammar state is the epsilon-closed frozenset of NFA states.
    :meth:`done` when the match is complete and nothing can follow; :meth:`can_end` when it is
    complete (the engine then also allows EOS)."""

    def __init__(self, pattern: str):
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"guided_regex: the pattern must be a non-empty string, got {pattern!r}")
        self.pattern = pattern
        self.edges: List[list] = []
        self.eps: List[list] = []
        start, end = self._build(_Parser(pattern).parse())
        self.accept = end
        self.start = self._closure({start})
        self._fanout = [bool(e) for e in self.edges]
        self._memo: dict = {}

    def _new(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise ValueError(f"guided_regex: the pattern needs more than {MAX_NFA_STATES} NFA states")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def _seq(self, steps, start: int, end: int) -> None:
        """Byte-range steps from start to end."""
        cur = start
        for k, (lo, hi) in enumerate(steps):
            nxt = end if k == len(steps) - 1 else self._new()
            self.edges[cur].append((lo, hi, nxt))
            cur = nxt

    def _build(self, node) -> Tuple[int, int]:
        kind = node[0]
        s, e = self._new(), self._new()
        if kind == "str":
            if not node[1]:
                self.eps[s].append(e)
            else:
                self._seq([(b, b) for b in node[1]], s, e)
        elif kind == "chars":
            _, ascii_set, neg, other = node
            members = sorted((set(range(0x80)) - ascii_set) if neg else ascii_set)
            for lo, hi in _ranges(members):
                self.edges[s].append((lo, hi, e))
            if neg:  # every non-ASCII character too
                for steps in _UTF8_MULTI:
                    self._seq(steps, s, e)
            for ch in other:
                self._seq([(b, b) for b in ch.encode("utf-8")], s, e)
        elif kind == "cat":
            cur = s
            for item in node[1]:
                a, b = self._build(item)
                self.eps[cur].append(a)
                cur = b
            self.eps[cur].append(e)
        elif kind == "alt":
            for item in node[1]:
                a, b = self._build(item)
                self.eps[s].append(a)
                self.eps[b].append(e)
        else:  # rep
            _, sub, lo, hi = node
            cur = s
            for _ in range(lo):
                a, b = self._build(sub)
                self.eps[cur].append(a)
                cur = b
            if hi is None:
                a, b = self._build(sub)
                self.eps[cur].append(a)
                self.eps[b].append(a)
                self.eps[b].append(e)
            else:
                for _ in range(hi - lo):
                    a, b = self._build(sub)
                    self.eps[cur].append(a)
                    self.eps[cur].append(e)
                    cur = b
            self.eps[cur].append(e)
        return s, e

    def _closure(self, states) -> frozenset:
        out, todo = set(states), list(states)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in out:
                    out.add(t)
                    todo.append(t)
        return frozenset(out)

    def step(self, st, c: int):
        # memoized (state, byte) -> state: the DFA built lazily; a masker's trie walk meets the same
        # pair at many nodes (on SmolLM2's vocabulary a permissive state's mask: ~0.4 s -> ~0.1 s)
        key = (st, c)
        hit = self._memo.get(key, _MISSING)
        if hit is not _MISSING:
            return hit
        nxt = {t for s in st for lo, hi, t in self.edges[s] if lo <= c <= hi}
        out = self._closure(nxt) if nxt else None
        if len(self._memo) >= _MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = out
        return out

    def can_end(self, st) -> bool:
        return st is not None and self.accept in st

    def done(self, st) -> bool:
        return self.can_end(st) and not any(self._fanout[s] for s in st)

    @staticmethod
    def in_plain_string(st) -> bool:
        return False


@dataclass(frozen=True)
class CharClass:
    """One character class of a pattern (``[...]``, ``.``, ``\\w``, ...): ASCII members (all the
    ASCII ones but these when ``neg``), and non-ASCII characters (every one when ``neg``)."""

    ascii: FrozenSet[int]
    neg: bool
    other: FrozenSet[str]

    def contains(self, ch: str) -> bool:
        if ord(ch) < 0x80:
            return (ord(ch) in self.ascii) != self.neg
        return self.neg or ch in self.other


def class_repeat(pattern: str) -> Optional[Tuple[CharClass, int, Optional[int]]]:
    """(class, min, max) when the whole pattern is one character class repeated (``\\w+``,
    ``.{0,60}``, ``[^\\n]*``, ``\\d``): any string of ``min`` to ``max`` characters of the class
    matches it, so a masker can allow tokens by their characters alone.  None otherwise."""
    node = _Parser(pattern).parse()
    lo, hi = 1, 1
    if node[0] == "rep":
        node, lo, hi = node[1], node[2], node[3]
    if node[0] == "str":
        ch = node[1].decode("utf-8")
        if len(ch) != 1:
            return None
        node = ("chars", frozenset({ord(ch)}) if ord(ch) < 0x80 else frozenset(), False,
                (ch,) if ord(ch) >= 0x80 else ())
    if node[0] != "chars":
        return None
    _, ascii_set, neg, other = node
    return CharClass(frozenset(ascii_set), neg, frozenset(other)), lo, hi


def _ranges(members: List[int]) -> List[Tuple[int, int]]:
    out: List[Tuple[int, int]] = []
    for b in members:
        if out and out[-1][1] == b - 1:
            out[-1] = (out[-1][0], b)
        else:
            out.append((b, b))
    return out


@functools.lru_cache(maxsize=64)
def regex_grammar(pattern: str) -> RegexGrammar:
    return RegexGrammar(pattern)
