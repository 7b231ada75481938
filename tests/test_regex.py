"""guided_regex: the byte-level NFA against Python's re.fullmatch (ASCII classes) on random patterns."""
import random
import re

import pytest

from cometq.serve.regex import RegexGrammar
from cometq.serve.structured import grammar_feed


def _rand_pattern(rng: random.Random, depth: int = 0) -> str:
    k = rng.randrange(10 if depth < 3 else 5)
    if k == 0:
        return rng.choice(["a", "b", "\u00e9", "\\.", "1", " ", "\\n", "\u4e2d"])
    if k == 1:
        return rng.choice([".", "\\d", "\\w", "\\s", "\\D", "[ab]", "[^a]", "[a-c1]", "[\u00e9a]", "[\\d.]",
                           "\\x41", "\\u00e9", "[\\x30-\\x39_]", "[\\u4e00-\\u4e2f]"])
    if k == 2:
        return rng.choice(["ab", "a\u00e9", "{", "x{,}"])
    if k in (3, 4):
        return _rand_pattern(rng, depth + 1) + _rand_pattern(rng, depth + 1)
    if k in (5, 6):
        q = rng.choice(["*", "+", "?", "{2}", "{0,2}", "{1,}", "*?", "{1,3}?"])
        return "(" + _rand_pattern(rng, depth + 1) + ")" + q
    if k == 7:
        return "(?:" + _rand_pattern(rng, depth + 1) + "|" + _rand_pattern(rng, depth + 1) + ")"
    if k == 8:
        return _rand_pattern(rng, depth + 1) + "|" + _rand_pattern(rng, depth + 1)
    return "(?P<g" + str(rng.randrange(10**9)) + ">" + _rand_pattern(rng, depth + 1) + ")"


def _complete(g, s: str) -> bool:
    st = grammar_feed(g, g.start, s.encode("utf-8"))
    return g.can_end(st)


def test_regex_agrees_with_re_fullmatch():
    rng = random.Random(0)
    alphabet = "ab1 .\n\u00e9\u4e2dc{}A5_\u4e00"
    agree_true = 0
    for _ in range(400):
        pat = _rand_pattern(rng)
        g = RegexGrammar(pat)
        rx = re.compile(pat, re.ASCII)
        for _ in range(40):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(7)))
            want = rx.fullmatch(s) is not None
            assert _complete(g, s) == want, (pat, s)
            agree_true += want
            if want:  # every byte prefix of a match is alive
                b = s.encode("utf-8")
                for i in range(len(b) + 1):
                    assert grammar_feed(g, g.start, b[:i]) is not None, (pat, s, i)
    assert agree_true > 200


def test_regex_done_and_can_end():
    g = RegexGrammar(r"(yes|no)!?")
    st = grammar_feed(g, g.start, b"yes")
    assert g.can_end(st) and not g.done(st) and g.done(grammar_feed(g, st, b"!"))
    g = RegexGrammar(r"^\d{3}-\d{4}$")
    assert g.done(grammar_feed(g, g.start, b"555-1234")) and grammar_feed(g, g.start, b"55a") is None
    g = RegexGrammar(r"[^a]")  # a negated class: any character but those listed, UTF-8 included
    assert g.done(grammar_feed(g, g.start, "\u4e2d".encode())) and grammar_feed(g, g.start, b"\xc0") is None


@pytest.mark.parametrize("pat,match", [
    ("(a", "missing '\\)'"), ("a)", "unbalanced"), ("*a", "nothing to repeat"), ("(?=a)", "lookaround"),
    ("(?i)a", "lookaround, flags"), (r"\1", r"'\\1' is not supported"), (r"\b", r"'\\b' is not supported"),
    ("a++", "possessive"), ("a{3,2}", "maximum is below"), ("a{2000}", "above 1000"), ("[a", "missing '\\]'"),
    ("[^\u00e9]", "negated class may only list ASCII"), ("a^", "only supported at the start"), ("", "non-empty"),
    ("(a{1000}){1000}", "NFA states"), ("[\x00-\U0010ffff]", "more than 4096"),
    (r"\x4", "needs 2 hex digits"), (r"[\u12]", "needs 4 hex digits"), (r"\ud800", "surrogate"),
])
def test_regex_errors(pat, match):
    with pytest.raises(ValueError, match=match):
        RegexGrammar(pat)


def test_engine_regex_greedy_matches_reference_and_samples_match():
    from cometq.serve.engine import Engine
    from cometq.serve.runner import ModelRunner
    from cometq.serve.sampling import SamplingParams
    from cometq.serve.structured import token_bytes_table
    from cometq.serve.tiny import byte_tokenizer, tiny_model
    from cometq.testing import constrained_greedy_reference

    model, tok = tiny_model(), byte_tokenizer()
    eos = tok.eos_token_id
    e = Engine(ModelRunner.with_fp_pool(model, num_blocks=64, block_size=16), tok, eos_token_ids=[eos])
    pat = r"[a-c]{2,4}(-\d+)?"
    prompt = list(b"id: ")
    greedy = e.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, response_format="regex", regex=pat))
    sampled = [e.add_request(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=i, response_format="regex",
                                                    regex=pat, logit_bias=((eos, 3.0),))) for i in range(6)]
    while e.has_work():
        e.step()
    # greedy = argmax over the allowed tokens (EOS too once the match is complete), token by token
    g, tb = RegexGrammar(pat), token_bytes_table(tok, 260)
    want = constrained_greedy_reference(model, prompt, 12, g, tb, eos=eos)
    assert greedy.output_ids == want
    for r in sampled + [greedy]:
        text = bytes(r.output_ids).decode()
        if r.finish_reason == "stop":
            assert re.fullmatch(pat, text, re.ASCII), text
        else:
            assert grammar_feed(g, g.start, text.encode()) is not None
    assert sum(r.finish_reason == "stop" for r in sampled) >= 3
    with pytest.raises(ValueError, match="regex goes with"):
        SamplingParams(regex="a")


@pytest.mark.parametrize("wide,cols", [(0, 64), (0, 3), (1 << 30, 64)],
                         ids=["column-walk", "column-walk-3", "trie-walk"])
def test_masker_with_regex_equals_per_token_check(wide, cols):
    import torch

    from _schema_check import per_token_mask

    from cometq.serve.structured import TokenMasker

    rng = random.Random(3)
    alphabet = "ab1 .\n\u00e9\u4e2dc{}A5_"
    pieces = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))).encode() for _ in range(600)}
    vocab = [None, b""] + sorted(pieces | {bytes([b]) for b in range(256)} | {b"\xc3", b"\xa9", b"\xe4\xb8"})
    m = TokenMasker(vocab)
    m.WIDE_STATE, m.MAX_COLUMNS = wide, cols
    checked = 0
    for _ in range(30):
        g = RegexGrammar(_rand_pattern(rng))
        st = g.start
        for _ in range(6):
            assert torch.equal(m.allowed(st, g), per_token_mask(g, st, vocab)), (g.pattern, st)
            checked += 1
            nxt = [b for b in range(256) if g.step(st, b) is not None]
            if not nxt:
                break
            st = g.step(st, rng.choice(nxt))
    assert checked > 60

