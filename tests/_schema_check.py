"""A plain JSON Schema validator of the subset cometq's grammar supports, written from the spec
(and Python's own parsers for ``format``), independent of :mod:`cometq.serve.schema`: what the
grammar's documents must satisfy.  Also random instances of constrained strings and numbers."""
import datetime
import ipaddress
import json
import math
import random
import re
import uuid
from fractions import Fraction


def canon(v) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def _type_ok(v, t: str) -> bool:
    return {"string": lambda: isinstance(v, str), "boolean": lambda: isinstance(v, bool), "null": lambda: v is None,
            "integer": lambda: ((isinstance(v, int) and not isinstance(v, bool))
                                or (isinstance(v, float) and v.is_integer())),
            "number": lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
            "object": lambda: isinstance(v, dict), "array": lambda: isinstance(v, list)}[t]()


def _time_ok(v: str) -> bool:
    if not re.fullmatch(r"\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", v):
        return False
    try:
        datetime.time.fromisoformat(v.replace("Z", "+00:00"))
        return True
    except ValueError:
        return False


def _date_ok(v: str) -> bool:
    try:
        return bool(re.fullmatch(r"\d{4}-\d\d-\d\d", v)) and datetime.date.fromisoformat(v).year >= 1
    except ValueError:
        return False


def _ipv4_ok(v: str) -> bool:
    try:
        ipaddress.IPv4Address(v)
        return True
    except ValueError:
        return False


def _uuid_ok(v: str) -> bool:
    try:
        uuid.UUID(v)
        return bool(re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", v))
    except ValueError:
        return False


_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
FORMAT_CHECKS = {
    "date": _date_ok,
    "time": _time_ok,
    "date-time": lambda v: "T" in v and _date_ok(v.split("T", 1)[0]) and _time_ok(v.split("T", 1)[1]),
    "uuid": _uuid_ok,
    "ipv4": _ipv4_ok,
    "hostname": lambda v: len(v) <= 253 and all(_LABEL.fullmatch(x) for x in v.split(".")),
    "email": lambda v: len(v) <= 254 and v.count("@") == 1 and all(v.split("@")) and "." in v.split("@")[1],
    "uri": lambda v: bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#]+(/[^\s?#]*)?(\?[^\s#]*)?", v))
    and not re.search(r"%(?![0-9A-Fa-f]{2})", v),
}


def validates(v, s, defs) -> bool:
    if s is True or s == {}:
        return True
    if s is False:
        return False
    if "$ref" in s and not validates(v, defs[s["$ref"]], defs):
        return False
    if "anyOf" in s and not any(validates(v, a, defs) for a in s["anyOf"]):
        return False
    if "oneOf" in s and sum(validates(v, a, defs) for a in s["oneOf"]) != 1:
        return False
    if "allOf" in s and not all(validates(v, a, defs) for a in s["allOf"]):
        return False
    if "const" in s and canon(v) != canon(s["const"]):
        return False
    if "enum" in s and not any(canon(v) == canon(e) for e in s["enum"]):
        return False
    t = s.get("type")
    if t is not None and not any(_type_ok(v, x) for x in (t if isinstance(t, list) else [t])):
        return False
    if isinstance(v, dict):
        props = s.get("properties", {})
        if not set(s.get("required", [])) <= set(v):
            return False
        extra = s.get("additionalProperties", True)
        if extra is False and not set(v) <= set(props):
            return False
        return all(validates(x, props[k] if k in props else extra, defs) for k, x in v.items())
    if isinstance(v, list):
        if not s.get("minItems", 0) <= len(v) <= s.get("maxItems", 1 << 30):
            return False
        pre = s.get("prefixItems", [])
        return all(validates(x, pre[i] if i < len(pre) else s.get("items", True), defs) for i, x in enumerate(v))
    if isinstance(v, str):
        if not s.get("minLength", 0) <= len(v) <= s.get("maxLength", 1 << 30):
            return False
        if "pattern" in s and not re.search(s["pattern"], v):
            return False
        return "format" not in s or FORMAT_CHECKS[s["format"]](v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        f = Fraction(v) if isinstance(v, int) else (Fraction(repr(v)) if math.isfinite(v) else v)
        for k, ok in (("minimum", lambda b: f >= b), ("maximum", lambda b: f <= b),
                      ("exclusiveMinimum", lambda b: f > b), ("exclusiveMaximum", lambda b: f < b)):
            b = s.get(k)
            if b is not None and not isinstance(b, bool) and not ok(Fraction(repr(b)) if isinstance(b, float) else b):
                return False
    return True


# -- random instances of constrained strings (patterns each with a sampler of full matches) ------------
def _digits(rng, n):
    return "".join(rng.choice("0123456789") for _ in range(n))


PATTERNS = [
    ("^[a-z]{2,5}$", lambda rng: "".join(rng.choice("abcxyz") for _ in range(rng.randint(2, 5)))),
    (r"^\d{3}-\d{4}$", lambda rng: _digits(rng, 3) + "-" + _digits(rng, 4)),
    ("^(?:yes|no|maybe)!?$", lambda rng: rng.choice(["yes", "no", "maybe"]) + rng.choice(["", "!"])),
    (r"[A-Z]\w*", lambda rng: rng.choice("AQZ") + "".join(rng.choice("a_9Z") for _ in range(rng.randrange(4)))),
    ("^caf\u00e9+\\s?$", lambda rng: "caf" + "\u00e9" * rng.randint(1, 3) + rng.choice(["", " ", "\n"])),
    (r'^say "(hi|yo)"\\$', lambda rng: 'say "' + rng.choice(["hi", "yo"]) + '"\\'),
    ("^[^a-z]{1,3}$", lambda rng: "".join(rng.choice("AB1\u4e2d\t") for _ in range(rng.randint(1, 3)))),
]


def _date(rng):
    m = rng.randint(1, 12)
    return f"{rng.randint(1000, 2999)}-{m:02d}-{rng.randint(1, 30 if m != 2 else 28):02d}"


def _time(rng):
    frac = rng.choice(["", "." + _digits(rng, rng.randint(1, 6))])
    tz = rng.choice(["Z", f"+{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}", "-05:30"])
    return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}{frac}{tz}"


FORMAT_SAMPLES = {
    "date": _date,
    "time": _time,
    "date-time": lambda rng: _date(rng) + "T" + _time(rng),
    "uuid": lambda rng: str(uuid.UUID(int=rng.getrandbits(128))),
    "ipv4": lambda rng: ".".join(str(rng.randint(0, 255)) for _ in range(4)),
    "hostname": lambda rng: rng.choice(["localhost", "a-b.example.com", "x1.y2"]),
    "email": lambda rng: rng.choice(["a@b.co", "first.last+tag@mail.example.org"]),
    "uri": lambda rng: rng.choice(["https://example.com", "http://a.b:8080/p/q?x=1&y=%2F", "ftp://h/a/b/"]),
}


def rand_string_schema(rng: random.Random):
    """(a string schema with pattern / format / lengths, a sampler of its instances)."""
    k = rng.randrange(3)
    if k == 0:
        p, sample = rng.choice(PATTERNS)
        return {"type": "string", "pattern": p}, sample
    if k == 1:
        f = rng.choice(sorted(FORMAT_SAMPLES))
        return {"type": "string", "format": f}, FORMAT_SAMPLES[f]
    mn = rng.randrange(3)
    mx = mn + rng.randrange(4)
    s = {"type": "string", "minLength": mn}
    if rng.random() < 0.7:
        s["maxLength"] = mx
    alphabet = "ab \"\\/\n\t\u00e9\u4e2d\U0001f600"
    return s, lambda rng: "".join(rng.choice(alphabet) for _ in range(rng.randint(mn, mx)))


_BOUNDS = [-7, -2.5, -1, 0, 0.25, 1, 3, 10, 99.5, 1000]


def rand_number_schema(rng: random.Random):
    """(an integer / number schema with bounds, a sampler of its instances: no exponents)."""
    integer = rng.random() < 0.5
    lo, hi = sorted(rng.sample(_BOUNDS, 2))
    while integer and not any(lo < i < hi for i in range(int(lo) - 1, int(hi) + 2)):
        lo, hi = sorted(rng.sample(_BOUNDS, 2))  # (an integer strictly inside, whatever the ends' exclusivity)
    s = {"type": "integer" if integer else "number"}
    lo_ex, hi_ex = rng.random() < 0.3, rng.random() < 0.3
    if rng.random() < 0.8:
        s["exclusiveMinimum" if lo_ex else "minimum"] = lo
    else:
        lo, lo_ex = -10**4, False
    if rng.random() < 0.8:
        s["exclusiveMaximum" if hi_ex else "maximum"] = hi
    else:
        hi, hi_ex = 10**4, False

    def sample(rng):
        for _ in range(200):
            v = rng.randint(int(lo) - 1, int(hi) + 1) if integer else round(rng.uniform(lo, hi), rng.randrange(4))
            if (v > lo or (v == lo and not lo_ex)) and (v < hi or (v == hi and not hi_ex)) and "e" not in repr(v):
                return v
        return None
    return s, sample


def per_token_mask(g, st, vocab):
    """The allowed-token mask checked token by token (what a masker must equal)."""
    import torch

    from cometq.serve.structured import grammar_feed

    return torch.tensor([bool(b) and grammar_feed(g, st, b) is not None for b in vocab])

