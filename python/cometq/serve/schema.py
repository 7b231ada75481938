"""JSON Schema as a byte-level grammar for :class:`.structured.TokenMasker` (OpenAI's
``response_format: json_schema``, vLLM's ``guided_json``, tool-call arguments).

A schema compiles to nodes; a grammar state is a frozenset of configurations (``anyOf`` / ``enum``
alternatives run side by side), each a tuple of frames, innermost last:

  ("V", node, ws)                  a value of ``node`` starts (after ``ws`` whitespace bytes)
  ("G", json_step state, integer)  a plain string / number / any value, lexed by ``json_step``
                                   inside a fake one-element array: the value is complete when that
                                   state is back after its first element
  ("T", json_step state, n, rule)  a string with only a length range: ``n`` characters so far
  ("S", rule, regex state, n, esc, mid)  a string with a ``pattern`` / ``format``: the decoded
                                   characters run through the rule's regex NFA; ``esc``: after a
                                   backslash; ``mid``: continuation bytes still due in a character
  ("N", node, text)                a number with bounds: its bytes so far (no exponent)
  ("L", literals, pos)             enum / const / boolean / null: literal byte strings matched so far
  ("O", node, idx, phase, key, ws) an object; idx: the next property that may come; an additional
                                   property's key (``additionalProperties`` a schema) is lexed by
                                   ``json_step`` in phase _O_XKEY, key = (state, its bytes)
  ("A", node, count, phase, ws)    an array of ``count`` items so far

The empty configuration is the finished document.  Every state the grammar reaches can still be
completed (strings and numbers check that a constraint can still be met before taking a byte),
so a masked decode never runs into a dead end.
"""
from __future__ import annotations

import functools
import json
import math
from fractions import Fraction
from typing import Dict, List, Optional

from .regex import RegexGrammar, class_repeat, regex_grammar
from .structured import (_AFTER, _DIGITS, _ESC, _MISSING, _N_END_OK, _NO_UTF8, _NUM, _STRING, _VALUE, _WS, MAX_WS,
                         json_step)

__all__ = ["JsonSchemaGrammar", "schema_grammar", "FORMATS", "MAX_FRAMES"]

_O_FIRST, _O_KEY, _O_COLON, _O_VAL, _O_AFTER, _O_NEXT, _O_XKEY = range(7)
_EXTRA = -1  # (the key index of an additional property: its value follows additionalProperties)
_A_FIRST, _A_VAL, _A_AFTER, _A_NEXT = range(4)
_G_VALUE = (_VALUE, "[", 0, None, 0)  # (json_step: a value as the first element of a fake array)
_G_STRING = (_STRING, "[", 0, _NO_UTF8, 0)  # (the same, just after a string's opening quote)

# keywords that only annotate (never change which documents validate)
_ANNOTATIONS = {"description", "title", "default", "examples", "$schema", "$id", "$comment", "readOnly", "writeOnly",
                "deprecated", "discriminator", "$defs", "definitions"}
_KEYWORDS = {  # keyword -> the type it constrains (None: any)
    "type": None, "enum": None, "const": None, "anyOf": None, "oneOf": None, "allOf": None, "$ref": None,
    "properties": "object", "required": "object", "additionalProperties": "object",
    "items": "array", "prefixItems": "array", "minItems": "array", "maxItems": "array",
    "pattern": "string", "format": "string", "minLength": "string", "maxLength": "string",
    "minimum": "number", "maximum": "number", "exclusiveMinimum": "number", "exclusiveMaximum": "number",
}
_SCHEMA_KEYS = set(_KEYWORDS) | _ANNOTATIONS
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_FRAMES = 64

# ``format`` values as regexes the generated string matches in whole.  Each accepts only strings
# the usual validators take (Python's datetime / uuid / ipaddress parsers, RFC 3986 for uri): days
# past 28 only in months that have them (February stops at 28), no leap seconds, no leading zeros
# in IPv4 octets, lower- or upper-case hex in UUIDs.
_DATE = (r"(?:[1-9]\d{3})-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
         r"|02-(?:0[1-9]|1\d|2[0-8]))")
_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PCHAR = r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
    "hostname": rf"{_LABEL}(?:\.{_LABEL})*",
    "email": rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]+)*@{_LABEL}(?:\.{_LABEL})+",
    "uri": rf"[A-Za-z][A-Za-z0-9+.-]*://{_LABEL}(?:\.{_LABEL})*(?::\d{{1,5}})?(?:/{_PCHAR}*)*"
           rf"(?:\?(?:{_PCHAR}|[/?])*)?",
}

# formats with a length limit of their own: RFC 1035's 253 characters for a host name, RFC 5321's
# 254 for an address (what validators check; the masks also keep a small model from rambling)
_FORMAT_MAX = {"hostname": 253, "email": 254}

# a JSON escape -> the character it stands for (\u escapes are never generated inside a constrained
# string: a surrogate pair would count as one character or two depending on the validator)
_ESC_CHAR = {0x22: 0x22, 0x5C: 0x5C, 0x2F: 0x2F, 0x62: 0x08, 0x66: 0x0C, 0x6E: 0x0A, 0x72: 0x0D, 0x74: 0x09}
_ESCAPABLE_CTRL = frozenset(v for v in _ESC_CHAR.values() if v < 0x20)
_NUM_BYTES = frozenset(b"-.0123456789")


def _applies(keyword: str, t: str) -> bool:
    """Does ``keyword`` constrain values of type ``t``?"""
    need = _KEYWORDS.get(keyword)
    return need is None or need == t or (need == "number" and t == "integer")


def _is_cont(c: int) -> bool:
    return 0x80 <= c <= 0xBF


# ---- strings with a pattern / format / length range ----------------------------------------------
class _StringRule:
    """What a constrained string's content must be: a full match of ``regex`` (None: anything) with
    ``mn`` to ``mx`` characters (code points; ``mx`` None: no upper limit).

    Liveness: for every NFA state, the set of character counts with which the accepting state
    can still be reached (bit ``k``; the top bit stands for "more than ``cap``"), computed once by
    a fixpoint over the reversed NFA on characters a JSON string can hold (a control character
    needs one of JSON's short escapes: any other is unreachable).  A byte is taken only if some
    completion then still fits the length range."""

    MAX_WORK = 4_000_000  # NFA edges x counted lengths the fixpoint may cost

    def __init__(self, regex: Optional[RegexGrammar], mn: int, mx: Optional[int], where: str,
                 fmt: Optional[str] = None):
        self.regex, self.mn, self.mx, self.fmt = regex, mn, mx, fmt
        self.cap = mx if mx is not None else mn
        # a pattern that is one character class repeated: a masker can allow the quote-free tokens
        # of that class by their character count (``klass``; ``fast_max``: the most characters)
        rep = class_repeat(regex.pattern) if regex is not None and fmt is None else None
        self.klass = rep[0] if rep else None
        caps = [x for x in (rep[2], mx) if x is not None] if rep else []
        self.fast_max = min(caps) if caps else None
        # without an upper limit, counts past this are all the same (states stay few)
        self._ncap = max(mn, self.fast_max or 0)
        self._bits: dict = {}
        self._esc: dict = {}
        if regex is not None:
            self._reach = self._lengths(regex, where)
            if not self.live(regex.start, 0):
                raise ValueError(f"json_schema: {where}: no string satisfies its pattern / format "
                                 f"with {mn} to {mx if mx is not None else 'any number of'} characters")

    def _lengths(self, rg: RegexGrammar, where: str) -> List[int]:
        top = self.cap + 1
        n = len(rg.edges)
        n_edges = sum(len(e) + len(x) for e, x in zip(rg.edges, rg.eps))
        if n_edges * (top + 1) > self.MAX_WORK:
            raise ValueError(f"json_schema: {where}: the pattern with a length limit of {self.cap} is too large "
                             f"to compile ({n_edges} NFA edges)")
        rev: List[list] = [[] for _ in range(n)]
        for s in range(n):
            for lo, hi, t in rg.edges[s]:
                if hi >= 0x20 or any(lo <= c <= hi for c in _ESCAPABLE_CTRL):
                    rev[t].append((s, 0 if (lo >= 0x80 and hi <= 0xBF) else 1))
            for t in rg.eps[s]:
                rev[t].append((s, 0))
        full = (1 << (top + 1)) - 1
        reach = [0] * n
        reach[rg.accept] = 1
        work = [rg.accept]
        while work:
            t = work.pop()
            rt = reach[t]
            sh = rt << 1
            if sh >> (top + 1):
                sh = (sh & full) | (1 << top)
            for s, w in rev[t]:
                nv = reach[s] | (sh if w else rt)
                if nv != reach[s]:
                    reach[s] = nv
                    work.append(s)
        return reach

    def live(self, rs, n: int) -> bool:
        if self.regex is None:
            return self.mx is None or n <= self.mx
        bits = self._bits.get(rs)
        if bits is None:
            bits = 0
            for s in rs:
                bits |= self._reach[s]
            self._bits[rs] = bits
        lo = max(0, self.mn - n)
        hi = (self.mx - n) if self.mx is not None else self.cap + 1
        if hi < lo:
            return False
        return bool(bits & (((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)))

    def count(self, n: int, c: int) -> int:
        """Characters after byte ``c`` of the content (a lead or ASCII byte starts one); without an
        upper limit, counts past the minimum (and the class fast path's limit) are all the same."""
        if _is_cont(c):
            return n
        n += 1
        return n if self.mx is not None else min(n, self._ncap)

    def feed(self, rs, n: int, c: int):
        """(regex state, count) after content character byte ``c``, or None (rejected or dead end)."""
        rs2 = self.regex.step(rs, c)
        if rs2 is None:
            return None
        n2 = self.count(n, c)
        return (rs2, n2) if self.live(rs2, n2) else None

    def can_escape(self, rs, n: int) -> bool:
        key = (rs, n)
        hit = self._esc.get(key)
        if hit is None:
            hit = self._esc[key] = any(self.feed(rs, n, d) is not None for d in _ESC_CHAR.values())
        return hit

    def can_end(self, rs, n: int) -> bool:
        return n >= self.mn and (self.regex is None or self.regex.can_end(rs))

    def search(self, v: str) -> bool:
        """Does the pattern match somewhere in ``v`` (JSON Schema's unanchored match; ``^`` / ``$``
        at the pattern's ends anchor it)?"""
        p = self.regex.pattern
        a_start = p.startswith("^")
        bs = len(p[:-1]) - len(p[:-1].rstrip("\\"))  # (backslashes before a final '$': odd = escaped)
        a_end = p.endswith("$") and bs % 2 == 0
        data = v.encode("utf-8")
        rg = self.regex
        for i in range(len(data) + 1):
            if (a_start and i > 0) or (i < len(data) and _is_cont(data[i])):
                continue
            st = rg.start
            for j in range(i, len(data) + 1):
                if j > i:
                    st = rg.step(st, data[j - 1])
                    if st is None:
                        break
                if rg.can_end(st) and (j == len(data) or (not a_end and not _is_cont(data[j]))):
                    return True
        return False


# ---- numbers with bounds -------------------------------------------------------------------------
def _meets(a, a_in: bool, b, b_in: bool, lo, lo_ex: bool, hi, hi_ex: bool) -> bool:
    """Does the interval from ``a`` to ``b`` (``*_in``: the end belongs to it; None: no end on that
    side) meet the bounds (``lo`` / ``hi`` None: unbounded; ``*_ex``: exclusive)?"""
    L, L_in = a, a_in
    if lo is not None:
        if L is None or lo > L:
            L, L_in = lo, not lo_ex
        elif lo == L:
            L_in = L_in and not lo_ex
    U, U_in = b, b_in
    if hi is not None:
        if U is None or hi < U:
            U, U_in = hi, not hi_ex
        elif hi == U:
            U_in = U_in and not hi_ex
    return U is None or L is None or L < U or (L == U and L_in and U_in)


class _NumberRule:
    """A number in ``[lo, hi]`` (either end open with ``*_ex``, or missing), written without an
    exponent (``-?(0|[1-9][0-9]*)(\\.[0-9]+)?``; no fraction when ``integer``).  A byte is taken
    only if some number starting with the bytes so far is in range: the numbers that start with
    digits ``I`` are ``I`` itself, ``[I, I+1)`` with a fraction, and ``[I*10^k, (I+1)*10^k)`` with
    ``k`` more digits; after a point with ``d`` fraction digits, ``[p, p + 10^-d)``."""

    def __init__(self, integer: bool, lo, lo_ex: bool, hi, hi_ex: bool):
        if integer:  # (integer bounds, inclusive: the real-interval test is then exact on integers)
            if lo is not None:
                lo, lo_ex = (math.floor(lo) + 1 if lo_ex else math.ceil(lo)), False
            if hi is not None:
                hi, hi_ex = (math.ceil(hi) - 1 if hi_ex else math.floor(hi)), False
        self.integer, self.bounds = integer, (lo, lo_ex, hi, hi_ex)
        self._memo: dict = {}

    def empty(self) -> bool:
        lo, lo_ex, hi, hi_ex = self.bounds
        return lo is not None and hi is not None and not _meets(lo, not lo_ex, hi, not hi_ex, None, False, None, False)

    def _parse(self, t: bytes):
        s = t.decode("ascii")
        neg = s.startswith("-")
        ip, dot, fp = (s[1:] if neg else s).partition(".")
        if ("-" in ip or "-" in fp or (ip and not ip.isdigit()) or (len(ip) > 1 and ip[0] == "0")
                or (dot and (self.integer or not ip)) or (fp and not fp.isdigit())):
            return None
        return neg, ip, bool(dot), fp

    def _mag(self, neg: bool):
        lo, lo_ex, hi, hi_ex = self.bounds
        if not neg:
            return self.bounds
        return (-hi if hi is not None else None, hi_ex, -lo if lo is not None else None, lo_ex)

    def feasible(self, t: bytes) -> bool:
        hit = self._memo.get(t)
        if hit is None:
            hit = self._memo[t] = self._feasible(t)
            if len(self._memo) > 1 << 16:
                self._memo.clear()
        return hit

    def _feasible(self, t: bytes) -> bool:
        p = self._parse(t)
        if p is None:
            return False
        neg, ip, dot, fp = p
        b = self._mag(neg)  # (a negative number's magnitude against the mirrored bounds)
        if not ip:
            return _meets(0, True, None, False, *b)
        if dot:
            d = len(fp)
            base = Fraction(int(ip + fp), 10 ** d)
            return _meets(base, True, base + Fraction(1, 10 ** d), False, *b)
        i = int(ip)
        if self.integer:
            if _meets(i, True, i, True, *b):
                return True
        elif _meets(i, True, i + 1, False, *b):
            return True
        if i == 0:
            return False
        hi = b[2]
        scale = 10
        while hi is None or i * scale <= hi:  # (more digits: ends when past the upper bound, or meets the lower)
            if (_meets(i * scale, True, (i + 1) * scale - 1, True, *b) if self.integer
                    else _meets(i * scale, True, (i + 1) * scale, False, *b)):
                return True
            scale *= 10
        return False

    def complete(self, t: bytes) -> bool:
        p = self._parse(t)
        if p is None or not p[1] or (p[2] and not p[3]):
            return False
        v = Fraction(t.decode("ascii"))
        return _meets(v, True, v, True, *self.bounds)


def _fraction(v, where: str):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise ValueError(f"json_schema: {where} must be a finite number, got {v!r}")
    return Fraction(v) if isinstance(v, int) else Fraction(repr(v))


# ---- JSON values: equality and a validator (enum filtering, oneOf checks) ---------------------
def _jtype(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(v)]


def _jeq(x, y) -> bool:
    """JSON Schema equality: 1 == 1.0, true != 1, containers element-wise."""
    tx, ty = _jtype(x), _jtype(y)
    if tx != ty:
        return False
    if tx == "array":
        return len(x) == len(y) and all(_jeq(a, b) for a, b in zip(x, y))
    if tx == "object":
        return x.keys() == y.keys() and all(_jeq(x[k], y[k]) for k in x)
    return x == y


@functools.lru_cache(maxsize=256)
def schema_grammar(schema_json: str) -> "JsonSchemaGrammar":
    """The grammar of a schema given as JSON text (compiled once per distinct text)."""
    try:
        schema = json.loads(schema_json)
    except ValueError as e:
        raise ValueError(f"json_schema: not JSON ({e})") from None
    return JsonSchemaGrammar(schema)


class JsonSchemaGrammar:
    """A JSON Schema subset compiled to a byte-level recognizer (a grammar for
    :class:`.structured.TokenMasker`).

    Keywords: ``type`` (one or a list); objects: ``properties`` / ``required`` /
    ``additionalProperties`` (true, false, or a schema: other keys may follow the declared ones,
    their values of that schema); arrays: ``items`` (a schema or false) /
    ``prefixItems`` / ``minItems`` / ``maxItems``; strings: ``pattern`` (the regex subset of
    :mod:`.regex`), ``format`` (the keys of :data:`FORMATS`), ``minLength`` / ``maxLength``;
    numbers: ``minimum`` / ``maximum`` / ``exclusiveMinimum`` / ``exclusiveMaximum`` (numbers, or
    draft-4 booleans); ``enum``, ``const``, ``anyOf``, ``oneOf`` (alternatives that cannot both
    match: different types, or objects told apart by a required property -- a discriminator --
    or one requiring a property the other lacks), ``allOf`` of one schema, ``$ref`` into
    ``#/$defs`` / ``#/definitions`` (recursion allowed).  Annotations (``description``,
    ``title``, ``default``, ``examples``, ``discriminator``, ...) are ignored.  Any other keyword,
    or one that constrains a type the schema does not name (``minimum`` without ``"type":
    "number"``), is a ``ValueError`` naming it and where it is.

    Generated documents always validate: an object's properties come in the schema's order, each
    required one present, optional ones possibly skipped, no others (as OpenAI's strict mode and
    xgrammar generate them) unless ``additionalProperties`` is a schema (then after them: any
    other key, possibly repeated, as JSON allows -- parsers keep the last); enum / const values in
    compact JSON; a string with a ``pattern`` / ``format`` matches it in whole (so it also has the
    unanchored match JSON Schema asks for) and is written with raw UTF-8 and JSON's short escapes
    (never ``\\uXXXX``); a number with bounds has no exponent; a schema without a type allows any
    JSON value.  The root must be an object or an array schema (OpenAI's rule is an object; an
    array is how several tool calls come back): either tells where the document ends."""

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
        self.rules: List[_StringRule] = []
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
        for comb in ("$ref", "anyOf", "oneOf", "allOf"):
            if comb in s:
                other = sorted(k for k in s if k not in _ANNOTATIONS and k != comb)
                if other:
                    raise ValueError(f"json_schema: {path}: {other} beside '{comb}' is not supported (move them into "
                                     f"the referenced / listed schemas)")
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
        for comb in ("anyOf", "oneOf", "allOf"):
            if comb in s:
                alts = s[comb]
                if not isinstance(alts, list) or not alts:
                    raise ValueError(f"json_schema: {path}.{comb} must be a non-empty list")
                if comb == "allOf":
                    if len(alts) != 1:
                        raise ValueError(f"json_schema: {path}.allOf: only one schema is supported, got {len(alts)}")
                    return self._compile(alts[0], f"{path}.allOf[0]")
                ids = tuple(self._compile(a, f"{path}.{comb}[{i}]") for i, a in enumerate(alts))
                if comb == "oneOf":
                    for i in range(len(ids)):
                        for j in range(len(ids)):
                            if i != j and not self._excludes(ids[i], ids[j]):
                                raise ValueError(
                                    f"json_schema: {path}.oneOf[{i}] and [{j}] may both match one value (oneOf "
                                    "needs alternatives of different types, or objects told apart by a required "
                                    "property); use anyOf if either may match")
                return self._new(("union", ids))
        t = s.get("type")
        types = [] if t is None else (t if isinstance(t, list) else [t])
        bad = [x for x in types if x not in _TYPES]
        if bad or (t is not None and not types):
            raise ValueError(f"json_schema: {path}.type must be one of {list(_TYPES)} (or a list of them), got {t!r}")
        named = set(types)
        for k in s:
            need = _KEYWORDS.get(k)
            if need is not None and not any(_applies(k, x) for x in named):
                raise ValueError(f"json_schema: {path}: '{k}' needs \"type\": \"{need}\""
                                 + (f" (the type is {t!r})" if t is not None else ""))
        if "const" in s or "enum" in s:
            vals = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"json_schema: {path}.enum must be a non-empty list")
            rest = {k: v for k, v in s.items() if k not in ("const", "enum") and k not in _ANNOTATIONS}
            if rest:  # (the other keywords hold too: keep the values they take)
                if "format" in rest:
                    raise ValueError(f"json_schema: {path}: 'format' beside enum / const is not supported")
                rid = self._compile(rest, path)
                vals = [v for v in vals if self._accepts_value(rid, v)]
                if not vals:
                    raise ValueError(f"json_schema: {path}: no enum / const value satisfies the other keywords")
            try:
                lits = tuple(dict.fromkeys(json.dumps(v, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
                                           .encode("utf-8") for v in vals))
            except (TypeError, ValueError) as e:
                raise ValueError(f"json_schema: {path}: enum / const values must be JSON ({e})") from None
            return self._new(("literal", lits))
        if t is None:
            return self._new(("any",))
        if len(types) > 1:
            return self._new(("union", tuple(self._compile({k: v for k, v in s.items() if _applies(k, x)} | {"type": x},
                                                           path) for x in dict.fromkeys(types))))
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
            plist = tuple((json.dumps(k, ensure_ascii=False).encode("utf-8"),
                           self._compile(v, f"{path}.properties.{k}"), k in req) for k, v in props.items())
            extra = None
            if isinstance(ap, dict):  # (additional properties of that schema, after the declared ones)
                extra = self._compile(ap, f"{path}.additionalProperties")
            elif not isinstance(ap, bool):
                raise ValueError(f"json_schema: {path}: additionalProperties must be true, false or a schema, "
                                 f"got {ap!r}")
            return self._new(("object", plist, ap is not False, extra))
        if t == "array":
            return self._array(s, path)
        if t == "boolean":
            return self._new(("literal", (b"true", b"false")))
        if t == "null":
            return self._new(("literal", (b"null",)))
        if t == "string":
            return self._string(s, path)
        bounds = [k for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in s]
        if bounds:
            return self._number(s, path, t == "integer")
        return self._new((t,))  # number, integer

    def _array(self, s, path: str) -> int:
        mn, mx = s.get("minItems", 0), s.get("maxItems")
        if (not isinstance(mn, int) or isinstance(mn, bool) or mn < 0
                or (mx is not None and (not isinstance(mx, int) or isinstance(mx, bool) or mx < mn))):
            raise ValueError(f"json_schema: {path}: minItems / maxItems must be ints with 0 <= min <= max")
        pre = s.get("prefixItems", [])
        if not isinstance(pre, list):
            raise ValueError(f"json_schema: {path}.prefixItems must be a list of schemas")
        prefix = tuple(self._compile(p, f"{path}.prefixItems[{i}]") for i, p in enumerate(pre))
        items = s.get("items", True)
        if items is False:
            item = None
            mx = len(prefix) if mx is None else min(mx, len(prefix))
            if mn > mx:
                raise ValueError(f"json_schema: {path}: minItems {mn} but at most {mx} items (items: false)")
        else:
            item = self._compile(items, f"{path}.items")
        return self._new(("array", item, mn, mx, prefix))

    def _string(self, s, path: str) -> int:
        mn, mx = s.get("minLength", 0), s.get("maxLength")
        if (not isinstance(mn, int) or isinstance(mn, bool) or mn < 0
                or (mx is not None and (not isinstance(mx, int) or isinstance(mx, bool) or mx < mn))):
            raise ValueError(f"json_schema: {path}: minLength / maxLength must be ints with 0 <= min <= max")
        if mx is not None and mx > 100_000:
            raise ValueError(f"json_schema: {path}: maxLength above 100000 is not supported, got {mx}")
        pattern, fmt = s.get("pattern"), s.get("format")
        if pattern is not None and fmt is not None:
            raise ValueError(f"json_schema: {path}: 'pattern' and 'format' together are not supported")
        regex = None
        if fmt is not None:
            if fmt not in FORMATS:
                raise ValueError(f"json_schema: {path}: format {fmt!r} is not supported (supported: {sorted(FORMATS)})")
            regex = regex_grammar(FORMATS[fmt])
            if fmt in _FORMAT_MAX:
                mx = _FORMAT_MAX[fmt] if mx is None else min(mx, _FORMAT_MAX[fmt])
                if mx < mn:
                    raise ValueError(f"json_schema: {path}: a {fmt} has at most {mx} characters, minLength is {mn}")
        elif pattern is not None:
            if not isinstance(pattern, str):
                raise ValueError(f"json_schema: {path}.pattern must be a string, got {pattern!r}")
            try:
                regex = regex_grammar(pattern)
            except ValueError as e:
                raise ValueError(f"json_schema: {path}.pattern: {e}") from None
        if regex is None and mn == 0 and mx is None:
            return self._new(("string",))
        self.rules.append(_StringRule(regex, mn, mx, path, fmt))
        return self._new(("cstring", len(self.rules) - 1))

    def _number(self, s, path: str, integer: bool) -> int:
        lo = hi = None
        lo_ex = hi_ex = False
        for key, strict, lower in (("minimum", False, True), ("maximum", False, False),
                                   ("exclusiveMinimum", True, True), ("exclusiveMaximum", True, False)):
            v = s.get(key)
            if v is None or isinstance(v, bool):
                continue
            v = _fraction(v, f"{path}.{key}")
            if lower:
                if lo is None or v > lo or (v == lo and strict):
                    lo, lo_ex = v, strict
            elif hi is None or v < hi or (v == hi and strict):
                hi, hi_ex = v, strict
        for key, base in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(s.get(key), bool):  # (draft 4: a flag on minimum / maximum)
                if base not in s:
                    raise ValueError(f"json_schema: {path}: {key} true / false needs '{base}'")
                if s[key] and _fraction(s[base], f"{path}.{base}") == (lo if base == "minimum" else hi):
                    if base == "minimum":
                        lo_ex = True
                    else:
                        hi_ex = True
        rule = _NumberRule(integer, lo, lo_ex, hi, hi_ex)
        if rule.empty():
            raise ValueError(f"json_schema: {path}: no {'integer' if integer else 'number'} is within its bounds")
        return self._new(("bnum", rule))

    # -- what a node's values can be (oneOf, enum filtering) ----------------------------------------
    def _gen_types(self, nid: int, depth: int = 0) -> frozenset:
        """The JSON types of the values generated for node ``nid``."""
        node = self.nodes[nid]
        if node is None or (node[0] == "union" and depth > 16):
            return frozenset(_TYPES)
        k = node[0]
        if k == "union":
            return frozenset().union(*(self._gen_types(a, depth + 1) for a in node[1]))
        if k == "literal":
            return frozenset(_jtype(json.loads(v)) for v in node[1])
        if k == "any":
            return frozenset(_TYPES)
        return frozenset({{"cstring": "string", "integer": "number", "bnum": "number"}.get(k, k)})

    def _excludes(self, a: int, b: int, depth: int = 0) -> bool:
        """No value generated for node ``a`` validates under node ``b`` (False when unsure)."""
        A, B = self.nodes[a], self.nodes[b]
        if depth > 8 or A is None or B is None:
            return False
        if A[0] == "union":
            return all(self._excludes(x, b, depth + 1) for x in A[1])
        if B[0] == "union":
            return all(self._excludes(a, y, depth + 1) for y in B[1])
        if not self._gen_types(a) & self._gen_types(b):
            return True
        if A[0] == "literal":  # (no value of a validates under b)
            return not any(self._accepts_value(b, json.loads(v)) for v in A[1])
        if B[0] == "literal":  # (a generates only values it accepts: none of b's)
            return not any(self._accepts_value(a, json.loads(v)) for v in B[1])
        if A[0] == "object" and B[0] == "object":
            pa = {k: (n, r) for k, n, r in A[1]}
            pb = {k: (n, r) for k, n, r in B[1]}
            if A[3] is None and any(r and k not in pa for k, (_, r) in pb.items()):
                return True  # (b requires a property a never writes)
            for k, (na, ra) in pa.items():  # (a property both require, with values that cannot agree)
                if ra and k in pb and pb[k][1] and self._excludes(na, pb[k][0], depth + 1):
                    return True
            return False
        if A[0] == "bnum" and B[0] == "bnum":
            lo, lo_ex, hi, hi_ex = A[1].bounds
            return not _meets(lo, not lo_ex, hi, not hi_ex, *B[1].bounds)
        return False

    def _accepts_value(self, nid: int, v, depth: int = 0) -> bool:
        """Does the value ``v`` validate under node ``nid``?  Exact but for ``format`` (True: not
        checked) and schemas nested past 32 levels (False)."""
        node = self.nodes[nid]
        if depth > 32 or node is None:
            return False
        k = node[0]
        jt = _jtype(v)
        if k == "any":
            return True
        if k == "union":
            return any(self._accepts_value(a, v, depth + 1) for a in node[1])
        if k == "literal":
            return any(_jeq(v, json.loads(x)) for x in node[1])
        if k == "string":
            return jt == "string"
        if k == "cstring":
            if jt != "string":
                return False
            rule = self.rules[node[1]]
            if len(v) < rule.mn or (rule.mx is not None and len(v) > rule.mx):
                return False
            return rule.fmt is not None or rule.regex is None or rule.search(v)
        if k in ("number", "integer", "bnum"):
            if jt != "number":
                return False
            if (k == "integer" or (k == "bnum" and node[1].integer)) and not (
                    isinstance(v, int) or v.is_integer()):
                return False
            if k == "bnum":
                f = Fraction(v) if isinstance(v, int) else Fraction(repr(v))
                return _meets(f, True, f, True, *node[1].bounds)
            return True
        if k == "object":
            if jt != "object":
                return False
            props = {json.loads(key): (n, r) for key, n, r in node[1]}
            if not node[2] and not set(v) <= set(props):
                return False
            if node[3] is not None and not all(self._accepts_value(node[3], x, depth + 1)
                                               for key, x in v.items() if key not in props):
                return False
            return (all(key in v for key, (_, r) in props.items() if r)
                    and all(self._accepts_value(props[key][0], x, depth + 1) for key, x in v.items() if key in props))
        if k == "array":
            _, item, mn, mx, prefix = node
            if jt != "array" or len(v) < mn or (mx is not None and len(v) > mx):
                return False
            return all(self._accepts_value(prefix[i] if i < len(prefix) else item, x, depth + 1)
                       for i, x in enumerate(v))
        return False

    # -- recognition --------------------------------------------------------------------------
    @staticmethod
    def done(st) -> bool:
        return st is not None and () in st

    @staticmethod
    def in_plain_string(st) -> bool:
        """Inside a free string value (no constraint) with no escape or UTF-8 character open."""
        return any(cfg and cfg[-1][0] == "G" and cfg[-1][1][0] == _STRING and cfg[-1][1][3] == _NO_UTF8 for cfg in st)

    def plain_string_spec(self, st):
        """Which quote-free tokens (complete UTF-8, no quote, backslash or control byte) may come
        next, for :class:`.structured.TokenMasker`'s fast path: a list of (character class or None
        for any, most characters or None) whose unions they are -- or None when some configuration
        is not between the characters of a string the masker can judge that way (then every token
        is walked).  A free string allows them all, whatever the other configurations allow."""
        out = []
        for cfg in st:
            if not cfg:
                return None
            top = cfg[-1]
            k = top[0]
            if k in ("G", "T") and top[1][0] == _STRING and top[1][3] == _NO_UTF8:
                mx = self.rules[top[3]].mx if k == "T" else None
                if mx is None:
                    return [(None, None)]
                out.append((None, mx - top[2]))
            elif k == "S" and not top[4] and not top[5] and self.rules[top[1]].klass is not None:
                rule = self.rules[top[1]]
                out.append((rule.klass, None if rule.fast_max is None else rule.fast_max - top[3]))
            else:
                return None
        return out

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
        if kind == "cstring":
            if c != 0x22:
                return []
            rule = self.rules[node[1]]
            if rule.regex is None:
                return [below + (("T", _G_STRING, 0, node[1]),)]
            return [below + (("S", node[1], rule.regex.start, 0, False, 0),)]
        if kind == "bnum":
            t = bytes((c,))
            return [below + (("N", nid, t),)] if c in _NUM_BYTES and node[1].feasible(t) else []
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
        if kind == "T":  # a string with a length range: json_step lexes, characters are counted
            _, g, n, rid = top
            rule = self.rules[rid]
            if g[0] == _STRING and g[3] == _NO_UTF8:  # (between characters)
                if c == 0x22:
                    return [self._complete(below)] if n >= rule.mn else []
                if c == 0x5C or (c >= 0x20 and not _is_cont(c)):  # a character (or an escape) starts
                    if rule.mx is not None and n >= rule.mx:
                        return []
                    n = rule.count(n, c)
            elif g[0] == _ESC and c == 0x75:
                return []  # (no \u escapes: see the class doc)
            g2 = json_step(g, c, self.max_ws)
            return [] if g2 is None else [below + (("T", g2, n, rid),)]
        if kind == "S":  # a string with a pattern / format: the decoded characters run through its regex
            _, rid, rs, n, esc, mid = top
            rule = self.rules[rid]
            if esc:
                d = _ESC_CHAR.get(c)
                r = None if d is None else rule.feed(rs, n, d)
            elif mid:
                r = rule.feed(rs, n, c)  # (the regex NFA takes only well-formed UTF-8)
            elif c == 0x22:
                return [self._complete(below)] if rule.can_end(rs, n) else []
            elif c == 0x5C:
                return [below + (("S", rid, rs, n, True, 0),)] if rule.can_escape(rs, n) else []
            else:
                r = None if c < 0x20 else rule.feed(rs, n, c)
            if r is None:
                return []
            mid = mid - 1 if mid else (1 if 0xC0 <= c <= 0xDF else 2 if 0xE0 <= c <= 0xEF else 3 if c >= 0xF0 else 0)
            return [below + (("S", rid, r[0], r[1], False, 0 if esc else mid),)]
        if kind == "N":  # a number with bounds: a byte is taken while some number in range starts so
            _, nid, t = top
            rule = self.nodes[nid][1]
            if c in _NUM_BYTES:
                t2 = t + bytes((c,))
                return [below + (("N", nid, t2),)] if rule.feasible(t2) else []
            return self._step(self._complete(below), c) if below and rule.complete(t) else []
        if kind == "L":
            return self._literal(top[1], top[2], c, below)
        if kind == "O":
            _, nid, idx, phase, key, ws = top
            props, extra = self.nodes[nid][1], self.nodes[nid][3]
            if phase == _O_XKEY:  # an additional property's key: any string but a declared one
                g, raw = key
                if g[0] == _STRING and g[3] == _NO_UTF8 and c == 0x22:
                    name = json.loads(b'"' + raw + b'"')  # (decoded: "\u0061" is "a")
                    if any(json.loads(p[0]) == name for p in props):
                        return []
                    return [below + (("O", nid, len(props), _O_COLON, _EXTRA, 0),)]
                g2 = json_step(g, c, self.max_ws)
                return [] if g2 is None else [below + (("O", nid, idx, _O_XKEY, (g2, raw + bytes((c,))), 0),)]
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
                    out = [below + (("O", nid, idx, _O_KEY, (cands, 1), 0),)] if cands else []
                    if extra is not None and self._may_close(props, idx):
                        out.append(below + (("O", nid, len(props), _O_XKEY, (_G_STRING, b""), 0),))
                    return out
                if c == 0x7D and phase == _O_FIRST and self._may_close(props, idx):
                    return [self._complete(below)]
                return []
            if phase == _O_COLON:
                if c != 0x3A:
                    return []
                return [below + (("O", nid, idx, _O_VAL, key, 0), ("V", extra if key == _EXTRA else props[key][1], 0))]
            if phase == _O_AFTER:
                more = self._key_candidates(props, idx) or (extra is not None and self._may_close(props, idx))
                if c == 0x2C and more:
                    return [below + (("O", nid, idx, _O_NEXT, None, 0),)]
                if c == 0x7D and self._may_close(props, idx):
                    return [self._complete(below)]
            return []
        # "A"
        _, nid, count, phase, ws = top
        _, item, mn, mx, prefix = self.nodes[nid]
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
        sub = prefix[count] if count < len(prefix) else item
        return self._start(sub, c, below + (("A", nid, count, _A_VAL, 0),))
