"""JSON mode: the byte-level recognizer against Python's strict json parser, and the token masker
against a token-by-token check of the whole vocabulary."""
import json
import random

import pytest
import torch

from cometq.serve.structured import (JSON_OBJECT, JSON_START, MAX_DEPTH, MAX_WS, JsonObjectGrammar, TokenMasker,
                                     json_done, json_feed, json_step, token_bytes_table)

WIDE = 64  # (a whitespace allowance that takes json.dumps(indent=...) documents)
from cometq.serve.tiny import byte_tokenizer


def _reject_constant(name):
    raise ValueError(f"not JSON: {name}")


def _strict_object(data: bytes, max_ws: int = MAX_WS) -> bool:
    """RFC 8259 strict: UTF-8, no NaN / Infinity, an object, no whitespace after it; our limits."""
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    if not isinstance(obj, dict) or data[-1:] in (b" ", b"\t", b"\n", b"\r"):
        return False
    depth = run = deepest = longest = 0
    in_str = esc = False
    for c in data:  # (our two limits: nesting depth and whitespace runs between tokens)
        if in_str:
            esc, in_str = (False, True) if esc else (c == 0x5C, c != 0x22)
            continue
        run = run + 1 if c in b" \t\n\r" else 0
        longest = max(longest, run)
        if c in b"{[":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"}]":
            depth -= 1
        elif c == 0x22:
            in_str = True
    return deepest <= MAX_DEPTH and longest <= max_ws


def _rand_value(rng: random.Random, depth: int):
    k = rng.randrange(9 if depth < 5 else 6)
    if k == 0:
        return rng.choice([True, False, None])
    if k == 1:
        return rng.randint(-10**12, 10**12)
    if k == 2:
        return rng.choice([0.0, -0.5, 1e-7, 3.25e21, -123.456, rng.uniform(-1e6, 1e6)])
    if k in (3, 4, 5):
        alphabet = "ab \"\\/\n\t\x01\x7f\u00e9\u4e2d\U0001f600\ud7ff\ue000"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
    if k in (6, 7):
        return {str(rng.randrange(100)) + rng.choice(["", "\u00e9", "\""]): _rand_value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [_rand_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _rand_doc(rng: random.Random) -> bytes:
    obj = {str(i): _rand_value(rng, 1) for i in range(rng.randrange(1, 5))} if rng.random() < 0.9 else {}
    kw = rng.choice([{}, {"indent": 2}, {"separators": (",", ":")}, {"indent": "\t"}])
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5, **kw).encode("utf-8")


def test_recognizer_accepts_every_prefix_of_valid_objects():
    rng = random.Random(0)
    for _ in range(300):
        doc = (b" " * rng.randrange(3)) + _rand_doc(rng)
        st = JSON_START
        for i, c in enumerate(doc):
            st = json_step(st, c, WIDE)
            assert st is not None, (doc, i)
            assert json_done(st) == (i == len(doc) - 1), (doc, i)
        for c in b" ,}x0":  # nothing follows the object
            assert json_step(st, c, WIDE) is None
        # the default allowance: one whitespace byte between tokens
        assert json_done(json_feed(JSON_START, doc)) == _strict_object(doc)


@pytest.mark.parametrize("doc", [
    b"[1]", b"1", b'"a"', b"{,}", b'{"a"}', b'{"a":}', b'{"a":1,}', b'{"a":01}', b'{"a":-}', b'{"a":1.}',
    b'{"a":1e}', b'{"a":.5}', b'{"a":+1}', b'{"a":tru}', b'{"a":NaN}', b'{"a":Infinity}', b"{'a':1}",
    b'{"a":"\x01"}', b'{"a":"\\x"}', b'{"a":"\\u12G4"}', b'{"a":"\xc0\x80"}', b'{"a":"\xe0\x80\x80"}',
    b'{"a":"\xed\xa0\x80"}', b'{"a":"\xf4\x90\x80\x80"}', b'{"a":"\xff"}', b'{"a":[1,]}', b'{"a":[1 2]}',
    b'{"a":1}}', b'{"a":1} ', b"{" + b" " * (MAX_WS + 1) + b"}", b'{"a":' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}",
])
def test_recognizer_rejects(doc):
    st = json_feed(JSON_START, doc)
    assert not json_done(st)
    assert not _strict_object(doc) or doc.endswith(b"}") and doc.count(b"[") >= MAX_DEPTH  # (our depth limit)


def test_recognizer_agrees_with_json_on_mutations():
    """Random byte edits of valid objects: complete and accepted exactly when strict json (with our
    limits) takes them -- and a prefix the recognizer rejects is never the start of a valid one."""
    rng = random.Random(1)
    pool = b'{}[]",:\\ \n0123456789.-+eEtrufalsn\x00\x1f\x7f\xc3\xa9\xe4\xb8\xad\xed\xa0\xf0\x9f'
    agree = 0
    for _ in range(3000):
        doc = bytearray(_rand_doc(rng))
        for _ in range(rng.randrange(1, 3)):
            i = rng.randrange(1, len(doc) + 1)
            op = rng.randrange(3)
            if op == 0 and i < len(doc):
                del doc[i]
            elif op == 1:
                doc[i:i] = bytes([rng.choice(pool)])
            elif i < len(doc):
                doc[i] = rng.choice(pool)
        doc = bytes(doc)
        st = json_feed(JSON_START, doc, WIDE)
        assert json_done(st) == _strict_object(doc, WIDE), doc
        agree += json_done(st)
        assert json_done(json_feed(JSON_START, doc)) == _strict_object(doc)  # (the default allowance)
        if st is None:  # the first rejected byte: no valid object starts with the bytes up to it
            j = next(k for k in range(len(doc) + 1) if json_feed(JSON_START, doc[:k], WIDE) is None)
            for tail in (b"", b"}", b'"}', b"]}", b'"]}', b"0}", b"e1}"):
                assert not _strict_object(doc[:j] + tail, WIDE)
    assert agree > 50  # (some edits keep the object valid: both sides were exercised)


def _vocab(rng: random.Random):
    """All single bytes plus multi-byte pieces cut from JSON text (what a BPE vocabulary holds)."""
    toks = {bytes([b]) for b in range(256)}
    while len(toks) < 1500:
        doc = _rand_doc(rng)
        i = rng.randrange(len(doc))
        toks.add(doc[i:i + rng.randrange(2, 7)])
    toks |= {b" " * 4, b"\n" + b" " * 8, b'": "', b'"}', b"}}", b"]]}", b"\xc3", b"\xa9\"", b"\xe4\xb8", b"true,"}
    return [None, b""] + sorted(toks)  # (a special token and an empty one: never allowed)


@pytest.mark.parametrize("wide,cols", [(0, 64), (0, 3), (1 << 30, 64)],
                         ids=["column-walk", "column-walk-3", "trie-walk"])
def test_masker_equals_per_token_check(wide, cols):
    rng = random.Random(2)
    vocab = _vocab(rng)
    m = TokenMasker(vocab)
    m.WIDE_STATE, m.MAX_COLUMNS = wide, cols
    states = [(JSON_START, JSON_OBJECT)]
    for k in range(40):
        g = JSON_OBJECT if k % 2 else JsonObjectGrammar(WIDE)  # (both allowances: indented documents too)
        doc = _rand_doc(rng) if k % 2 == 0 else json.dumps(json.loads(_rand_doc(rng)), ensure_ascii=False).encode()
        st = JSON_START
        for c in doc:
            st = g.step(st, c)
            if rng.random() < 0.15:
                states.append((st, g))
    assert any(s[0] == 7 for s, _ in states) and any(s[0] != 7 for s, _ in states)  # (string and structural)
    for st, g in states:
        want = torch.tensor([bool(b) and json_feed(st, b, g.max_ws) is not None for b in vocab])
        assert torch.equal(m.allowed(st, g), want), st
    # apply(): disallowed (and LM-head padding columns) at -inf, the rest untouched
    x = torch.randn(len(vocab) + 3)
    y = m.apply(x.clone(), *states[1])
    ok = torch.cat([m.allowed(*states[1]), torch.zeros(3, dtype=torch.bool)])
    assert torch.equal(y[ok], x[ok]) and bool(torch.isinf(y[~ok]).all())


def test_masker_old_name():
    from cometq.serve.structured import JsonMasker

    assert JsonMasker is TokenMasker


def test_token_bytes_table():
    tok = byte_tokenizer()
    tb = token_bytes_table(tok, 264)
    assert tb[:256] == [bytes([b]) for b in range(256)]
    assert tb[256:] == [None] * 8  # specials and LM-head padding


# -- the engine in JSON mode (tiny random model, byte tokenizer) ---------------------------------
from cometq.serve.engine import Engine, EngineConfig, RequestRejected  # noqa: E402
from cometq.serve.runner import ModelRunner  # noqa: E402
from cometq.serve.sampling import SamplingParams  # noqa: E402
from cometq.serve.tiny import tiny_model  # noqa: E402
from cometq.testing import constrained_greedy_reference  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), byte_tokenizer()


def _engine(model, tok, **kw):
    return Engine(ModelRunner.with_fp_pool(model, num_blocks=64, block_size=16), tok, EngineConfig(**kw))


def test_engine_computes_masks_while_the_step_runs(tiny):
    """The masks a step's constrained samplers need are computed after its forward is queued and
    before its logits are read (on a GPU: overlapped with the step), then served from the cache."""
    model, tok = tiny
    e = _engine(model, tok)
    events = []
    forward = e.runner.forward

    class Logits:  # (records when the step's logits are first read)
        def __init__(self, t):
            self.t = t

        def argmax(self, dim):
            events.append("read")
            return self.t.argmax(dim=dim)

        def cpu(self):
            return self.t.cpu()

    def fwd(chunks, **kw):
        events.append("forward")
        return Logits(forward(chunks, **kw))

    e.runner.forward = fwd
    r = e.add_request(list(b"json: "), SamplingParams(max_tokens=6, temperature=0.5, seed=1,
                                                       response_format="json_object"))
    masker = e.json_masker()
    allowed = masker.allowed
    computed = []

    def spy(st, grammar=JSON_OBJECT):
        hit = (grammar, st) in masker._cache
        events.append("mask-hit" if hit else "mask")
        if not hit:
            computed.append(st)
        return allowed(st, grammar)

    masker.allowed = spy
    while e.has_work():
        e.step()
    assert len(r.output_ids) == 6
    steps = " ".join(events).split("forward")[1:]
    assert len(steps) == 6 and all(s.split()[0] in ("mask", "mask-hit") and s.split()[1] == "read" for s in steps)
    assert all(s.split()[2:] in (["mask-hit"],) for s in steps)  # (_process applies the cached mask)


def test_engine_json_mode_greedy_matches_reference(tiny):
    model, tok = tiny
    tb = token_bytes_table(tok, 260)
    prompts = [list(b"give me json: "), list(b"{")]
    e = _engine(model, tok)
    reqs = [e.add_request(p, SamplingParams(max_tokens=24, temperature=0, response_format="json_object"))
            for p in prompts]
    plain = e.add_request(prompts[0], SamplingParams(max_tokens=24, temperature=0))
    while e.has_work():
        e.step()
    for p, r in zip(prompts, reqs):
        assert r.output_ids == constrained_greedy_reference(model, p, 24, JSON_OBJECT, tb)
        assert json_feed(JSON_START, b"".join(tb[t] for t in r.output_ids)) is not None
    assert plain.output_ids != reqs[0].output_ids  # (the constraint changed this continuation)


def test_engine_json_mode_sampled_objects_close(tiny):
    """Sampled (temperature, top-p, top-k) with a bias toward closing: every output is a complete
    object, parsed by json; the request stops at its closing brace."""
    model, tok = tiny
    e = _engine(model, tok, max_num_seqs=16)
    bias = ((ord('"'), 6.0), (ord("}"), 6.0), (ord("]"), 3.0))
    reqs = [e.add_request(list(b"json: "), SamplingParams(max_tokens=200, temperature=1.0, top_p=0.95, top_k=50 * (i % 2),
                                                          seed=i, logit_bias=bias, response_format="json_object"))
            for i in range(8)]
    while e.has_work():
        e.step()
    texts = set()
    for r in reqs:
        text = bytes(r.output_ids)  # (byte tokenizer: token id = byte)
        assert r.finish_reason == "stop" and isinstance(json.loads(text.decode("utf-8")), dict), text
        texts.add(text)
    assert len(texts) > 2  # (different seeds, different objects)


def test_engine_json_mode_needs_tokenizer(tiny):
    model, _ = tiny
    e = Engine(ModelRunner.with_fp_pool(model, num_blocks=8, block_size=16), None)
    with pytest.raises(RequestRejected, match="response_format"):
        e.add_request([1, 2], SamplingParams(response_format="json_object"))
    with pytest.raises(ValueError, match="response_format"):
        SamplingParams(response_format="json_schema")


# -- JSON Schema ----------------------------------------------------------------------------------
from cometq.serve.schema import JsonSchemaGrammar  # noqa: E402
from cometq.serve.structured import grammar_feed  # noqa: E402


from _schema_check import canon as _canon  # noqa: E402
from _schema_check import per_token_mask, rand_number_schema, rand_string_schema  # noqa: E402
from _schema_check import validates as _validates  # noqa: E402

_SAMPLERS = {}  # canon(schema) -> a sampler of its instances (constrained strings and numbers)


_SCALARS = [0, 1, 10, -2, 1.5, "a", "ab", "\u00e9", True, False, None]


def _rand_schema(rng: random.Random, depth: int, refs: list):
    k = rng.randrange(16 if depth < 3 else 9)
    if k == 0:
        return {"type": rng.choice(["string", "number", "integer", "boolean", "null"])}
    if k == 1:
        return {"enum": rng.sample(_SCALARS, rng.randrange(1, 5))}
    if k == 2:
        return {"const": rng.choice(_SCALARS + [[1, "a"], {"x": None}])}
    if k == 3:
        return {"type": rng.sample(["string", "integer", "null", "boolean"], 2)}
    if k == 4:
        return {"type": "string", "description": "ignored"}
    if k == 5 and refs:
        return {"$ref": rng.choice(refs)}
    if k in (7, 8):  # a string with a pattern / format / lengths, a number with bounds
        s, sample = rand_string_schema(rng) if k == 7 else rand_number_schema(rng)
        _SAMPLERS[_canon(s)] = sample
        return s
    if k in (9, 10, 11):
        props = {f"k{i}" + rng.choice(["", "\u00e9", " x"]): _rand_schema(rng, depth + 1, refs)
                 for i in range(rng.randrange(4))}
        out = {"type": "object", "properties": props, "required": [p for p in props if rng.random() < 0.5]}
        r = rng.random()
        if r < 0.4:
            out["additionalProperties"] = False
        elif r < 0.6:  # (other keys, of a schema)
            out["additionalProperties"] = _rand_schema(rng, depth + 1, refs)
        return out
    if k == 12:
        mn = rng.randrange(2)
        return {"type": "array", "items": _rand_schema(rng, depth + 1, refs), "minItems": mn,
                **({"maxItems": mn + rng.randrange(3)} if rng.random() < 0.5 else {})}
    if k == 13:  # a tuple
        pre = [_rand_schema(rng, depth + 1, refs) for _ in range(rng.randrange(1, 3))]
        return {"type": "array", "prefixItems": pre, "minItems": rng.randrange(len(pre) + 1),
                "items": False if rng.random() < 0.5 else _rand_schema(rng, depth + 1, refs)}
    if k == 14:  # objects told apart by a discriminator
        return {"oneOf": [{"type": "object", "properties": {"kind": {"const": tag}, "v": _rand_schema(rng, depth + 1, refs)},
                           "required": ["kind"] + (["v"] if rng.random() < 0.5 else [])} for tag in ("a", "b")],
                "discriminator": {"propertyName": "kind"}}
    if k == 6:
        return {}
    return {"anyOf": [_rand_schema(rng, depth + 1, refs) for _ in range(rng.randrange(2, 4))]}


def _rand_root(rng: random.Random):
    defs = {"Node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                      "next": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/Node"}]}},
                     "required": ["v"]}}
    refs = ["#/$defs/Node"] if rng.random() < 0.3 else []
    props = {f"p{i}": _rand_schema(rng, 1, refs) for i in range(rng.randrange(1, 5))}
    root = {"type": "object", "properties": props, "required": [p for p in props if rng.random() < 0.6],
            "additionalProperties": False}
    if refs:
        root["$defs"] = defs
    return root


def _instance(rng: random.Random, s, defs, depth=0):
    """A random value of schema ``s`` (None when a branch has none within the depth budget)."""
    if s is True or s == {}:
        return rng.choice(_SCALARS + [[1, {"q": "r"}], {"z": [None]}])
    if "$ref" in s:
        return _instance(rng, defs[s["$ref"]], defs, depth + 1) if depth < 6 else None
    if _canon(s) in _SAMPLERS:
        return _SAMPLERS[_canon(s)](rng)
    if "anyOf" in s or "oneOf" in s:
        alts = (s.get("anyOf") or s["oneOf"])[:]
        rng.shuffle(alts)
        for a in alts:
            v = _instance(rng, a, defs, depth + 1)
            if v is not None or _validates(None, a, defs):
                return v
        return None
    if "const" in s:
        return s["const"]
    if "enum" in s:
        return rng.choice(s["enum"])
    t = s.get("type")
    if t is None:
        return rng.choice(_SCALARS)
    if isinstance(t, list):
        t = rng.choice(t)
    if t == "object":
        out = {}
        extra = s.get("additionalProperties")
        for k, sub in s.get("properties", {}).items():
            if k in s.get("required", []) or rng.random() < 0.5:
                v = _instance(rng, sub, defs, depth + 1)
                if v is None and not _validates(None, sub, defs):
                    if k in s.get("required", []):
                        return None
                    continue
                out[k] = v
        if isinstance(extra, dict):  # (other keys: after the declared ones, as the grammar writes them)
            for k in rng.sample(["zz", "k0x", "\u00e9 \"q\"", "k1/"], rng.randrange(3)):
                if k not in s.get("properties", {}):
                    v = _instance(rng, extra, defs, depth + 1)
                    if v is None and not _validates(None, extra, defs):
                        continue
                    out[k] = v
        return out
    if t == "array":
        pre = s.get("prefixItems", [])
        hi = len(pre) if s.get("items", True) is False else s.get("maxItems", max(s.get("minItems", 0), len(pre)) + 2)
        n = rng.randint(s.get("minItems", 0), hi)
        subs = [pre[i] if i < len(pre) else s.get("items", True) for i in range(n)]
        items = [_instance(rng, sub, defs, depth + 1) for sub in subs]
        return items if all(x is not None or _validates(None, sub, defs) for x, sub in zip(items, subs)) else None
    return {"string": lambda: rng.choice(["", "a b", "q\"\\\n\u4e2d"]), "boolean": lambda: rng.random() < 0.5,
            "null": lambda: None, "integer": lambda: rng.randint(-10**6, 10**6),
            "number": lambda: rng.choice([rng.randint(-99, 99), rng.uniform(-1e3, 1e3), 2.5e-8])}[t]()


def _schema_cases(seed: int, n: int):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        root = _rand_root(rng)
        defs = {f"#/$defs/{k}": v for k, v in root.get("$defs", {}).items()}
        docs = []
        for _ in range(6):
            v = _instance(rng, root, defs)
            if v is not None:
                assert _validates(v, root, defs)
                # (keys and enum values have one spelling: compact, UTF-8 as is -- not \u escapes)
                docs.append(json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        if docs:
            out.append((root, defs, docs))
    return out


def test_schema_grammar_accepts_its_instances_and_only_valid_documents():
    """Random schemas: every prefix of random valid instances (properties in schema order, enum
    values compact) is accepted and the whole is complete; random byte edits that the grammar
    still completes validate against the schema (a plain validator of the subset)."""
    rng = random.Random(7)
    accepted_edits = 0
    for root, defs, docs in _schema_cases(3, 60):
        g = JsonSchemaGrammar(root)
        for doc in docs:
            st = g.start
            for i, c in enumerate(doc):
                st = g.step(st, c)
                assert st is not None, (root, doc, i)
            assert g.done(st), (root, doc)
            for _ in range(20):
                d = bytearray(doc)
                i = rng.randrange(1, len(d))
                op = rng.randrange(3)
                if op == 0:
                    del d[i]
                elif op == 1:
                    d[i:i] = bytes([rng.choice(b'{}[]",:0123456789-.etrufalsn ak')])
                else:
                    d[i] = rng.choice(b'{}[]",:0123456789-.etrufalsn ak')
                st = grammar_feed(g, g.start, bytes(d))
                if g.done(st):
                    accepted_edits += 1
                    assert _validates(json.loads(bytes(d)), root, defs), (root, bytes(d))
    assert accepted_edits > 20


def test_schema_grammar_order_and_limits():
    s = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"},
                                          "c": {"type": "array", "items": {"type": "boolean"}, "minItems": 1,
                                                "maxItems": 2}},
         "required": ["b"], "additionalProperties": False}
    g = JsonSchemaGrammar(s)
    ok = [b'{"b":""}', b'{"a":1,"b":"x"}', b'{ "a" : -0 , "b" : "x" , "c" : [ true ] }', b'{"b":"","c":[true,false]}']
    bad = [b'{}', b'{"a":1}', b'{"b":"x","a":1}', b'{"a":1.5,"b":""}', b'{"a":1e3,"b":""}', b'{"b":1}',
           b'{"b":"","c":[]}', b'{"b":"","c":[true,true,true]}', b'{"b":"","d":1}', b'{"b":""} ', b'[]',
           b'{"c":[true]}', b'{"a":1,"c":[true]}']
    for d in ok:
        assert g.done(grammar_feed(g, g.start, d)), d
    for d in bad:
        assert not g.done(grammar_feed(g, g.start, d)), d
    # enum values that prefix each other (1 / 10), anyOf of objects told apart only by their keys
    g = JsonSchemaGrammar({"type": "object", "properties": {"e": {"enum": [1, 10, "1"]}, "u": {"anyOf": [
        {"type": "object", "properties": {"x": {"type": "null"}}, "required": ["x"]},
        {"type": "object", "properties": {"y": {"type": "number"}}, "required": ["y"]}]}}, "required": ["e", "u"]})
    for d in (b'{"e":1,"u":{"x":null}}', b'{"e":10,"u":{"y":2}}', b'{"e":"1","u":{"y":-1.5}}'):
        assert g.done(grammar_feed(g, g.start, d)), d
    for d in (b'{"e":100,"u":{"x":null}}', b'{"e":1,"u":{"x":2}}', b'{"e":1,"u":{"y":null}}', b'{"e":2,"u":{"x":null}}'):
        assert not g.done(grammar_feed(g, g.start, d)), d


@pytest.mark.parametrize("schema,match", [
    ({"type": "string"}, "root must be an object or array"),
    ({"anyOf": [{"type": "object"}, {"type": "array"}]}, "root must be an object or array"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}},
     r"\.a: unsupported keyword\(s\) \['uniqueItems'\]"),
    ({"oneOf": []}, "oneOf must be a non-empty list"),
    ({"type": "object", "oneOf": [{"type": "object"}]}, r"\['type'\] beside 'oneOf' is not supported"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}, {"type": "number", "maximum": 3}]}}},
     r"a.oneOf\[0\] and \[1\] may both match"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "object", "properties": {"k": {"const": 1}}},
                                                       {"type": "object", "properties": {"k": {"const": 2}}}]}}},
     "may both match"),  # (k is not required: {} matches both)
    ({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}, {"maxLength": 2}]}}}, "only one schema"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A", "type": "string"}}, "$defs": {"A": {}}},
     r"\['type'\] beside '\$ref'"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "a{3}", "maxLength": 2}}},
     r"\.a: no string satisfies its pattern"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)y"}}},
     r"\.a\.pattern: guided_regex: .*lookaround"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "a\\x01"}}}, "no string satisfies"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "\\x0"}}}, "needs 2 hex digits"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "[\\x00-\\x07]"}}}, "no string satisfies"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "ipv6"}}}, r"format 'ipv6' is not supported"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "hostname", "minLength": 300}}},
     "a hostname has at most 253 characters"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "date", "pattern": "x"}}}, "together"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": 3, "maxLength": 2}}}, "minLength"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0.5, "exclusiveMaximum": 1}}},
     "no integer is within its bounds"),
    ({"type": "object", "properties": {"a": {"type": "number", "minimum": 2, "maximum": 1}}}, "no number"),
    ({"type": "object", "properties": {"a": {"type": "number", "minimum": "1"}}}, r"a.minimum must be a finite number"),
    ({"type": "object", "properties": {"a": {"type": "number", "exclusiveMinimum": True}}}, "needs 'minimum'"),
    ({"type": "object", "properties": {"a": {"minimum": 3}}}, r"'minimum' needs \"type\": \"number\""),
    ({"type": "object", "properties": {"a": {"type": "string", "items": {}}}}, r"'items' needs \"type\": \"array\""),
    ({"type": "object", "properties": {"a": {"required": ["b"]}}}, r"'required' needs \"type\": \"object\""),
    ({"type": "object", "properties": {"a": {"type": "string", "enum": [1, 2]}}}, "no enum / const value satisfies"),
    ({"type": "object", "properties": {"a": {"enum": ["a"], "format": "date", "type": "string"}}}, "'format' beside enum"),
    ({"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}, "at most 1 items"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "not under"),
    ({"type": "object", "properties": {}, "required": ["a"]}, r"required \['a'\] not in properties"),
    ({"type": "object", "properties": {"a": {"type": "text"}}}, "must be one of"),
    ({"type": "object", "additionalProperties": 5}, "additionalProperties must be true, false or a schema"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 3, "maxItems": 1}}}, "minItems"),
    ("not a schema", "must be an object"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"$ref": "#/$defs/A"}}},
     "refers to itself"),
])
def test_schema_grammar_errors(schema, match):
    with pytest.raises(ValueError, match=match):
        JsonSchemaGrammar(schema)


@pytest.mark.parametrize("wide,cols", [(0, 64), (0, 3), (1 << 30, 64)],
                         ids=["column-walk", "column-walk-3", "trie-walk"])
def test_masker_with_schema_grammar_equals_per_token_check(wide, cols):
    rng = random.Random(4)
    vocab = _vocab(rng)
    m = TokenMasker(vocab)
    m.WIDE_STATE, m.MAX_COLUMNS = wide, cols
    checked = 0
    for root, defs, docs in _schema_cases(5, 8):
        g = JsonSchemaGrammar(root)
        states = [g.start]
        for doc in docs[:2]:
            st = g.start
            for c in doc:
                st = g.step(st, c)
                if rng.random() < 0.2:
                    states.append(st)
        for st in states:
            assert torch.equal(m.allowed(st, g), per_token_mask(g, st, vocab)), (root, st)
            checked += 1
    assert checked > 30


_ENGINE_SCHEMAS = [
    {"type": "object", "properties": {"id": {"type": "integer"}, "tag": {"enum": ["a", "bc", None]},
                                      "xs": {"type": "array", "items": {"type": "number"}, "maxItems": 2}},
     "required": ["id", "tag"], "additionalProperties": False},
    # pattern, format, lengths, bounds, a tuple (the byte tokenizer: the length fast path meets 1-char tokens)
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{1,3}$"},
                                      "day": {"type": "string", "format": "date"},
                                      "n": {"type": "integer", "minimum": -3, "exclusiveMaximum": 250},
                                      "x": {"type": "number", "minimum": 0.5, "maximum": 2},
                                      "name": {"type": "string", "minLength": 1, "maxLength": 4},
                                      "pair": {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "null"}],
                                               "items": False, "minItems": 2}},
     "required": ["code", "day", "n", "x", "name", "pair"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", _ENGINE_SCHEMAS, ids=["plain", "constrained"])
def test_engine_json_schema_greedy_matches_reference_and_samples_validate(tiny, schema):
    model, tok = tiny
    text = json.dumps(schema)
    g = JsonSchemaGrammar(schema)
    tb = token_bytes_table(tok, 260)
    e = _engine(model, tok, max_num_seqs=16)
    greedy = e.add_request(list(b"record: "), SamplingParams(max_tokens=40, temperature=0, response_format="json_schema",
                                                             json_schema=text))
    sampled = [e.add_request(list(b"record: "), SamplingParams(max_tokens=160, temperature=1.0, top_p=0.9, seed=i,
                                                               logit_bias=((ord("]"), 4.0), (ord('"'), 2.0)),
                                                               response_format="json_schema",
                                                               json_schema=text)) for i in range(6)]
    while e.has_work():
        e.step()
    # greedy = the argmax over the schema-allowed tokens, token by token through the HF model
    want = constrained_greedy_reference(model, list(b"record: "), 40, g, tb)
    assert greedy.output_ids == want
    done = 0
    for r in sampled + [greedy]:
        if r.finish_reason == "stop":
            done += 1
            assert _validates(json.loads(bytes(r.output_ids)), schema, {}), bytes(r.output_ids)
        else:
            assert grammar_feed(g, g.start, bytes(r.output_ids)) is not None
    assert done >= 3
    with pytest.raises(ValueError, match="unsupported keyword"):
        SamplingParams(response_format="json_schema", json_schema='{"type": "object", "uniqueItems": true}')
    with pytest.raises(ValueError, match="goes with response_format"):
        SamplingParams(json_schema='{"type": "object"}')


def test_hf_generate_logits_processor(tiny):
    """JsonLogitsProcessor in transformers generate: greedy = the engine's JSON-mode greedy; a
    left-padded sampled batch ends each row with EOS right after a complete object."""
    from transformers import LogitsProcessorList

    from cometq.serve.structured import JsonLogitsProcessor

    model, tok = tiny
    prompt = list(b"give me json: ")
    e = _engine(model, tok)
    r = e.add_request(prompt, SamplingParams(max_tokens=30, temperature=0, response_format="json_object"))
    while e.has_work():
        e.step()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                             logits_processor=LogitsProcessorList([JsonLogitsProcessor(tok)]),
                             pad_token_id=tok.pad_token_id)
    got = out[0, len(prompt):].tolist()
    assert got[:len(r.output_ids)] == r.output_ids
    if r.finish_reason == "stop":  # (the object closed: generate's next token is EOS)
        assert got[len(r.output_ids)] == tok.eos_token_id

    class Bias:  # (toward closing, so random weights finish objects)
        def __call__(self, ids, scores):
            scores[:, [ord('"'), ord("}")]] += 6.0
            return scores

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    for proc in (JsonLogitsProcessor(tok), JsonLogitsProcessor(tok, schema=schema)):
        enc = {"input_ids": torch.tensor([[tok.pad_token_id] * 3 + prompt, list(b"abc") + prompt]),
               "attention_mask": torch.tensor([[0] * 3 + [1] * len(prompt), [1] * (3 + len(prompt))])}
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=80, do_sample=True, temperature=1.0, top_p=0.95,
                                 logits_processor=LogitsProcessorList([Bias(), proc]), pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            assert tok.eos_token_id in row, row
            v = json.loads(bytes(row[:row.index(tok.eos_token_id)]))
            assert isinstance(v, dict) and (proc.grammar is not JSON_OBJECT) <= (isinstance(v.get("n"), int))
    with pytest.raises(ValueError, match="EOS"):
        JsonLogitsProcessor(type("T", (), {"eos_token_id": None})())


def test_hf_generate_regex_and_choice_processors(tiny):
    """GrammarLogitsProcessor.for_regex / for_choice in transformers generate: greedy = the
    token-by-token constrained reference (EOS allowed where the match is complete); sampled rows
    match the pattern / are one of the choices."""
    import re

    from transformers import LogitsProcessorList

    from cometq.serve.regex import regex_grammar
    from cometq.serve.structured import GrammarLogitsProcessor, choice_grammar

    model, tok = tiny
    eos = tok.eos_token_id
    prompt = list(b"id: ")
    tb = token_bytes_table(tok, 260)
    for make, grammar, ok in (
            (lambda: GrammarLogitsProcessor.for_regex(tok, r"[a-c]{2}\d{1,3}"), regex_grammar(r"[a-c]{2}\d{1,3}"),
             lambda t: re.fullmatch(r"[a-c]{2}\d{1,3}", t)),
            (lambda: GrammarLogitsProcessor.for_choice(tok, ["yes", "no", "yes!"]), choice_grammar(("yes", "no", "yes!")),
             lambda t: t in ("yes", "no", "yes!"))):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                 logits_processor=LogitsProcessorList([make()]), pad_token_id=tok.pad_token_id)
        got = out[0, len(prompt):].tolist()
        want = constrained_greedy_reference(model, prompt, 8, grammar, tb, eos=eos)
        assert got[:len(want)] == want
        torch.manual_seed(1)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt] * 4), max_new_tokens=8, do_sample=True, temperature=1.0,
                                 logits_processor=LogitsProcessorList([make()]), pad_token_id=tok.pad_token_id)
        for row in out[:, len(prompt):].tolist():
            text = bytes(row[:row.index(eos)] if eos in row else row).decode()
            assert ok(text) or (eos not in row and grammar_feed(grammar, grammar.start, text.encode()) is not None), text
    # EOS: masked until the match is complete, then allowed at its own score; the only token once done
    proc = GrammarLogitsProcessor.for_regex(tok, r"[a-c]{2}\d{1,3}")
    ids = torch.tensor([prompt])
    for k, (nxt, eos_state) in enumerate(((b"a", "masked"), (b"b", "masked"), (b"1", "masked"), (b"2", "own"),
                                          (b"3", "own"), (None, "only"))):
        scores = torch.randn(1, 260)
        out = proc(ids, scores)
        if eos_state == "masked":
            assert out[0, eos] == float("-inf")
        elif eos_state == "own":
            assert out[0, eos] == scores[0, eos] and torch.isfinite(out[0, ord("4")])
        else:
            assert out[0, eos] == 0 and bool(torch.isinf(out[0, :eos]).all())
        if nxt is not None:
            ids = torch.cat([ids, torch.tensor([[nxt[0]]])], dim=1)
    with pytest.raises(ValueError, match="distinct non-empty"):
        GrammarLogitsProcessor.for_choice(tok, ["a", "a"])
    with pytest.raises(ValueError, match="guided_regex"):
        GrammarLogitsProcessor.for_regex(tok, "(?=x)")
    with pytest.raises(TypeError, match="start / step / done"):
        GrammarLogitsProcessor(tok, object())


def test_choice_grammar_and_engine(tiny):
    from cometq.serve.structured import ChoiceGrammar

    g = ChoiceGrammar(["yes", "no", "yes!", "\u00e9t\u00e9"])
    st = grammar_feed(g, g.start, b"yes")
    assert g.can_end(st) and not g.done(st) and g.done(grammar_feed(g, st, b"!"))
    assert grammar_feed(g, g.start, b"ye?") is None and g.done(grammar_feed(g, g.start, "\u00e9t\u00e9".encode()))
    model, tok = tiny
    eos = tok.eos_token_id
    e = Engine(ModelRunner.with_fp_pool(model, num_blocks=64, block_size=16), tok, eos_token_ids=[eos])
    outs = {}
    for name, bias, choices in (("eos", ((eos, 100.0),), ("yes", "yes!")), ("bang", ((ord("!"), 100.0),), ("yes", "yes!")),
                                ("plain", (), ("yes", "no", "yes!"))):
        r = e.add_request(list(b"answer: "), SamplingParams(max_tokens=10, temperature=0, logit_bias=bias,
                                                            response_format="choice", choices=choices))
        while e.has_work():
            e.step()
        outs[name] = (bytes(r.output_ids).decode(), r.finish_reason)
    # EOS pushed up: it cannot come before a choice is complete, then it ends the shorter one
    assert outs["eos"] == ("yes", "stop") and outs["bang"] == ("yes!", "stop")
    assert outs["plain"][0] in ("yes", "no", "yes!") and outs["plain"][1] == "stop"
    with pytest.raises(ValueError, match="choices"):
        SamplingParams(response_format="choice", choices=("a", "a"))
    with pytest.raises(ValueError, match="choices go with"):
        SamplingParams(choices=("a",))
