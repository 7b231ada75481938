"""JSON Schema grammar, the constrained keywords (string pattern / format / lengths, number bounds,
tuples, oneOf): exhaustive checks against Python's own number parsing, random walks that must
never reach a dead end and must end in valid documents, and pydantic models' schemas checked by
pydantic itself."""
import datetime
import enum
import ipaddress
import json
import random
import uuid
from fractions import Fraction
from typing import Dict, List, Literal, Optional, Tuple, Union

import pytest
import torch
from _schema_check import FORMAT_CHECKS, FORMAT_SAMPLES, PATTERNS, per_token_mask, validates

from cometq.serve.schema import FORMATS, JsonSchemaGrammar
from cometq.serve.structured import TokenMasker, grammar_feed


def _done(g, data: bytes) -> bool:
    return g.done(grammar_feed(g, g.start, data))


def _walk(g, rng: random.Random, max_bytes: int = 400, close_bias: float = 0.3) -> Optional[bytes]:
    """A random document of ``g``, byte by byte among the bytes it allows (leaning toward
    closing ones); asserts the grammar never leaves a state with nothing allowed."""
    st, out = g.start, bytearray()
    while not g.done(st):
        allowed = [c for c in range(256) if g.step(st, c) is not None]
        assert allowed, f"dead end after {bytes(out)!r}"
        if len(out) >= max_bytes:
            return None
        closing = [c for c in allowed if c in b'"}],']
        c = rng.choice(closing) if closing and rng.random() < close_bias else rng.choice(allowed)
        st = g.step(st, c)
        out.append(c)
    return bytes(out)


def _in_bounds(v: Fraction, s: dict) -> bool:
    return ((("minimum" not in s) or v >= Fraction(repr(s["minimum"])))
            and (("maximum" not in s) or v <= Fraction(repr(s["maximum"])))
            and (("exclusiveMinimum" not in s) or v > Fraction(repr(s["exclusiveMinimum"])))
            and (("exclusiveMaximum" not in s) or v < Fraction(repr(s["exclusiveMaximum"]))))


def _number_cases():
    cases = [{"type": "integer", "minimum": 30, "maximum": 105},  # ("2" opens [20, 29] and [200, 299]: neither fits)
             {"type": "number", "exclusiveMinimum": 9.75, "maximum": 10},
             {"type": "integer", "exclusiveMinimum": -12, "maximum": -1},
             {"type": "number", "minimum": -2.5, "exclusiveMaximum": -0.25},
             {"type": "number", "minimum": 30, "maximum": 105},
             {"type": "integer", "minimum": 7}, {"type": "number", "maximum": 0.5}]
    rng = random.Random(0)
    while len(cases) < 14:
        integer = rng.random() < 0.5
        vals = sorted(rng.sample([-12, -2.5, -1, -0.25, 0, 0.5, 1, 7, 9.75, 10, 30, 105], 2))
        if integer and not any(vals[0] < i < vals[1] for i in range(-13, 106)):
            continue
        c = {"type": "integer" if integer else "number"}
        c["exclusiveMinimum" if rng.random() < 0.4 else "minimum"] = vals[0]
        c["exclusiveMaximum" if rng.random() < 0.4 else "maximum"] = vals[1]
        cases.append(c)
    return cases


@pytest.mark.parametrize("s", _number_cases(), ids=str)
def test_bounded_numbers_exhaustively(s):
    """Every string of up to 4 bytes over ``-.0-9``: complete exactly when it is a JSON number
    (no exponent; no point for integers) within the bounds; every accepted prefix of up to 3
    bytes completes (within 5 more bytes: the bounds have few digits)."""
    import itertools
    import re
    integer = s["type"] == "integer"
    g = JsonSchemaGrammar({"type": "object", "properties": {"a": s}, "required": ["a"]})
    alphabet = "-.0123456789"
    accepted, complete = [], []
    for n in range(1, 5):
        for t in itertools.product(alphabet, repeat=n):
            t = "".join(t)
            st = grammar_feed(g, g.start, b'{"a":' + t.encode())
            syntax = re.fullmatch(r"-?(0|[1-9]\d*)" + ("" if integer else r"(\.\d+)?"), t)
            want = bool(syntax) and _in_bounds(Fraction(t), s)
            assert g.done(grammar_feed(g, st, b"}")) == want, (s, t)
            if st is not None:
                accepted.append(t)
            if want:
                complete.append(t)
    assert complete
    for t in accepted:
        if len(t) > 3 or any(c.startswith(t) for c in complete):
            continue
        frontier, found = [grammar_feed(g, g.start, b'{"a":' + t.encode())], False
        for _ in range(5):
            frontier = [y for x in frontier for c in alphabet.encode() for y in [g.step(x, c)] if y is not None][:5000]
            if any(g.done(g.step(x, ord("}"))) for x in frontier if g.step(x, ord("}")) is not None):
                found = True
                break
        assert found, (s, t)


@pytest.mark.parametrize("idx", range(len(PATTERNS)))
def test_pattern_strings_with_lengths(idx):
    """A pattern with length limits: its full matches are accepted exactly when their length
    fits; random walks never dead-end and end in strings that fit both."""
    rng = random.Random(idx)
    pattern, sample = PATTERNS[idx]
    for mn, mx in ((0, None), (2, None), (0, 3), (1, 4), (3, 3), (4, 9)):
        s = {"type": "string", "pattern": pattern, "minLength": mn}
        if mx is not None:
            s["maxLength"] = mx
        root = {"type": "object", "properties": {"s": s}, "required": ["s"], "additionalProperties": False}
        try:
            g = JsonSchemaGrammar(root)
        except ValueError as e:
            assert "no string satisfies" in str(e)
            assert not any(mn <= len(sample(rng)) <= (mx if mx is not None else 99) for _ in range(300)), (s,)
            continue
        for _ in range(30):
            v = sample(rng)
            doc = json.dumps({"s": v}, ensure_ascii=False).encode()
            assert _done(g, doc) == (mn <= len(v) <= (mx if mx is not None else 1 << 30)), (s, v)
        for _ in range(12):
            doc = _walk(g, rng)
            if doc is not None:
                assert validates(json.loads(doc), root, {}), (root, doc)
        # never a \u escape (a surrogate pair would be counted differently by validators)
        assert grammar_feed(g, g.start, b'{"s":"\\u') is None


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_formats(fmt):
    rng = random.Random(len(fmt))
    root = {"type": "object", "properties": {"v": {"type": "string", "format": fmt}}, "required": ["v"]}
    g = JsonSchemaGrammar(root)
    for _ in range(40):
        v = FORMAT_SAMPLES[fmt](rng)
        assert FORMAT_CHECKS[fmt](v), v
        assert _done(g, json.dumps({"v": v}).encode()), v
    walked = 0
    for _ in range(25):
        doc = _walk(g, rng, close_bias=0.1)
        if doc is not None:
            walked += 1
            v = json.loads(doc)["v"]
            assert FORMAT_CHECKS[fmt](v), (fmt, v)
    assert walked >= 20
    bad = {"date": ["2023-02-29", "2023-13-01", "2023-1-01", "0000-01-01", "2023-04-31"],
           "time": ["24:00:00Z", "12:00:00", "12:60:00Z", "12:00:00.Z"],
           "date-time": ["2023-01-01 12:00:00Z", "2023-01-01T12:00:00"],
           "uuid": ["1234", "123e4567-e89b-12d3-a456-42661417400g"],
           "ipv4": ["1.2.3.256", "01.2.3.4", "1.2.3"], "hostname": ["-a.com", "a..b", ".".join(["a" * 60] * 5)],
           "email": ["a@b", "@b.co", "a b@c.d", "a" * 250 + "@b.co"],
           "uri": ["example.com", "http://a b", "http://h/%zz"]}[fmt]
    for v in bad:
        assert not _done(g, json.dumps({"v": v}).encode()), v


def test_one_of_tuples_and_enum_filters():
    s = {"type": "object", "properties": {
        "pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}], "discriminator": {"propertyName": "kind"}},
        "either": {"oneOf": [{"type": "string", "maxLength": 2}, {"type": "integer", "minimum": 0}, {"type": "null"}]},
        "pt": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": {"type": "boolean"}},
        "small": {"type": "integer", "enum": [1, 2.5, "3", 40], "maximum": 10}},
        "$defs": {"Cat": {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                          "required": ["kind"]},
                  "Dog": {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
                          "required": ["kind"]}},
        "additionalProperties": False}
    g = JsonSchemaGrammar(s)
    for d in (b'{"pet":{"kind":"cat","lives":9}}', b'{"pet":{"kind":"dog"}}', b'{"either":"ab"}', b'{"either":7}',
              b'{"either":null}', b'{"pt":[]}', b'{"pt":[1]}', b'{"pt":[1,"a",true,false]}', b'{"small":1}'):
        assert _done(g, d), d
        assert validates(json.loads(d), s, {f"#/$defs/{k}": v for k, v in s["$defs"].items()}), d
    for d in (b'{"pet":{"kind":"cat","good":true}}', b'{"pet":{"lives":1}}', b'{"either":"abc"}', b'{"either":-1}',
              b'{"pt":["a"]}', b'{"pt":[1,"a",1]}', b'{"small":2.5}', b'{"small":"3"}', b'{"small":40}'):
        assert not _done(g, d), d
    # objects told apart by a property one of them requires and the other does not have
    JsonSchemaGrammar({"type": "object", "properties": {"u": {"oneOf": [
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
        {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]}}})
    # bounded numbers that cannot meet; enum values vs a type
    JsonSchemaGrammar({"type": "object", "properties": {"u": {"oneOf": [
        {"type": "number", "maximum": 0}, {"type": "integer", "exclusiveMinimum": 0}, {"enum": ["x", True]}]}}})


def test_additional_properties_schema():
    """additionalProperties as a schema: other keys after the declared ones, their values of it;
    never a declared name, however it is escaped."""
    s = {"type": "object", "properties": {"a": {"type": "integer"}, "b/c": {"type": "boolean"}}, "required": ["a"],
         "additionalProperties": {"type": "string", "maxLength": 2}}
    g = JsonSchemaGrammar(s)
    for d in (b'{"a":1}', b'{"a":1,"x":"s"}', b'{"a":1,"b/c":true,"x":"","y\\n":"zz"}', b'{"a":1,"ab":"q","ab":"r"}',
              b'{"a":1,"b":"q"}', '{"a":1,"\u00e9t\u00e9":"ok"}'.encode()):
        assert _done(g, d), d
        assert validates(json.loads(d), s, {}), d
    for d in (b'{"x":"s","a":1}', b'{"a":1,"x":2}', b'{"a":1,"x":"abc"}', b'{"a":1,"a":"s"}', b'{"a":1,"b\/c":"s"}',
              b'{"a":1,"\u0061":"s"}', b'{"a":1,"b/c":true,"b/c":"s"}', b'{"a":1,"x":"s","b/c":true}'):
        assert not _done(g, d), d
    # the declared key and an additional one that starts like it run side by side
    assert grammar_feed(g, g.start, b'{"a":1,"b/c') is not None and _done(g, b'{"a":1,"b/cd":"s"}')
    # enum values are kept only where the other keywords (additionalProperties too) take them
    g = JsonSchemaGrammar({"type": "object", "properties": {"o": {
        "type": "object", "enum": [{"x": 1}, {"x": "s"}], "additionalProperties": {"type": "string"}}}})
    assert _done(g, b'{"o":{"x":"s"}}') and not _done(g, b'{"o":{"x":1}}')


@pytest.mark.parametrize("wide,cols", [(0, 64), (0, 3), (1 << 30, 64)],
                         ids=["column-walk", "column-walk-3", "trie-walk"])
def test_masker_length_budget_equals_per_token_check(wide, cols):
    """The in-string fast paths (a length limit: quote-free tokens of at most the characters
    left; a repeated class: those of the class), the rest by a walk of the trie or of the byte
    columns -- the same as checking every token."""
    rng = random.Random(1)
    pieces = ["a", "ab", "abc", "abcd", "\u00e9\u00e9", "\u4e2d", "x\u4e2dy", "\U0001f600", '"', '",', '"}', "\\",
              "\\n", "\\u00", " ", "  ", "1", "12", "123", "-", ".", "}", ",", ":", '{"', 'a"', '"s":"', "\xe9", "x1", "b_c",
              "a\tb", "cab", "\u00e9\u00e9\u00e9\u00e9"]
    vocab = [p.encode() for p in pieces] + [b"\xc3", b"\xa9", b"\xe4\xb8"] + [bytes([b]) for b in range(256)]
    m = TokenMasker(vocab)
    m.WIDE_STATE, m.MAX_COLUMNS = wide, cols
    schemas = [{"type": "string", "minLength": 1, "maxLength": 3}, {"type": "string", "maxLength": 0},
               {"type": "string", "minLength": 2}, {"type": "string", "pattern": "^[a-c]{1,4}$", "maxLength": 3},
               {"type": "string", "format": "date"}, {"type": "integer", "minimum": 5, "maximum": 120},
               {"type": "number", "exclusiveMinimum": -1, "maximum": 1},
               # one class repeated (the class fast path), alone and beside other string configurations
               {"type": "string", "pattern": "^.{0,5}$", "maxLength": 3}, {"type": "string", "pattern": "\\w+"},
               {"type": "string", "pattern": "[^a\\n]*", "minLength": 1}, {"type": "string", "pattern": "\u00e9?"},
               {"anyOf": [{"type": "string", "maxLength": 1}, {"type": "string", "pattern": "^[a-c]*$"}]},
               {"anyOf": [{"type": "string", "pattern": "[0-9]{2}"}, {"type": "string", "pattern": "x[0-9]"}]},
               {"anyOf": [{"type": "string", "maxLength": 1}, {"type": "string"}, {"type": "integer"}]}]
    checked = 0
    for sub in schemas:
        g = JsonSchemaGrammar({"type": "object", "properties": {"s": sub}, "required": ["s"]})
        states = [grammar_feed(g, g.start, b'{"s":')]
        for _ in range(6):
            st = states[0]
            for _ in range(12):
                allowed = [c for c in range(256) if g.step(st, c) is not None]
                st = g.step(st, rng.choice(allowed))
                if g.done(st):
                    break
                states.append(st)
        for st in states:
            assert torch.equal(m.allowed(st, g), per_token_mask(g, st, vocab)), (sub, st)
            checked += 1
    assert checked > 100


# -- pydantic models: their schemas compile, and generated documents pass pydantic's validation --------
pydantic = pytest.importorskip("pydantic")


class Color(str, enum.Enum):
    red = "red"
    green = "green"


class Cat(pydantic.BaseModel):
    kind: Literal["cat"]
    lives: int = pydantic.Field(ge=0, le=9)


class Dog(pydantic.BaseModel):
    kind: Literal["dog"]
    name: str = pydantic.Field(min_length=1, max_length=8)


class Line(pydantic.BaseModel):
    sku: str = pydantic.Field(pattern=r"^[A-Z]{3}-\d{2}$")
    qty: int = pydantic.Field(gt=0, lt=100)
    price: float = pydantic.Field(ge=0, le=1000)


class Order(pydantic.BaseModel):
    id: uuid.UUID
    when: datetime.datetime
    day: datetime.date
    host: ipaddress.IPv4Address
    color: Color
    note: Optional[str] = None
    lines: List[Line] = pydantic.Field(min_length=1, max_length=2)
    pet: Union[Cat, Dog] = pydantic.Field(discriminator="kind")
    point: Tuple[int, int]
    counts: Dict[str, int] = {}


def test_pydantic_schema_documents_validate():
    schema = Order.model_json_schema()
    g = JsonSchemaGrammar(schema)
    rng = random.Random(0)
    ok = 0
    for _ in range(30):
        doc = _walk(g, rng, max_bytes=1200, close_bias=0.35)
        if doc is not None:
            Order.model_validate_json(doc)  # (raises on an invalid document)
            ok += 1
    assert ok >= 20
    sample = Order(id=uuid.uuid4(), when=datetime.datetime(2024, 5, 6, 7, 8, 9, 120000, tzinfo=datetime.timezone.utc),
                   day=datetime.date(2024, 2, 28), host="10.0.0.255", color=Color.green, note=None,
                   lines=[Line(sku="ABC-12", qty=3, price=9.5)], pet=Dog(kind="dog", name="rex"), point=(1, -2),
                   counts={"apples": 3, "pears": -1})
    # pydantic writes properties in schema order, compact: the grammar accepts its own dump
    # (datetime 'Z', as pydantic writes UTC)
    assert _done(g, sample.model_dump_json().encode()), sample.model_dump_json()
