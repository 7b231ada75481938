"""The `cometq` command line on a tiny random Llama saved to disk (the real model runs in the demo)."""
import json
import math
import re

import pytest
import torch

from cometq import cli


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from cometq.serve.tiny import byte_tokenizer, tiny_model

    d = tmp_path_factory.mktemp("tiny")
    tiny_model(layers=2).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return str(d)


SMALL = ["--windows", "2", "--seq-len", "64", "--calib-samples", "2", "--calib-seq-len", "64"]


def test_demo_quantizes_and_reports(tiny_dir, tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = cli.main(["demo", "--model", tiny_dir, "--max-new-tokens", "4", "--json", str(out), *SMALL])
    assert rc == 0
    res = json.loads(out.read_text())
    assert math.isfinite(res["ppl_unquantized"]) and math.isfinite(res["ppl_quantized"])
    assert res["ppl_ratio"] == pytest.approx(res["ppl_quantized"] / res["ppl_unquantized"])
    assert res["eval_windows"] == 2 and res["cpu_fast_path_layers"] == 14  # 7 Linears x 2 layers
    assert res["config"]["weight_method"] == "gptq"
    printed = capsys.readouterr().out
    assert "| unquantized (fp32) |" in printed and "W4 asym GPTQ g32" in printed
    assert res["config"]["kv4"] and math.isfinite(res["ppl_decode_w4ax_kv4"])  # the default pipeline is W4Ax-KV4


def test_demo_asym_clip_search_kv4(tiny_dir, tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = cli.main(["demo", "--model", tiny_dir, "--max-new-tokens", "4", "--json", str(out), "--weight-method", "rtn",
                   "--weight-format", "asym", "--group-size", "32", "--act-clip", "search", "--kv4", *SMALL])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["config"]["weight_sym"] is False and res["config"]["act_clip"] == "search" and res["config"]["kv4"]
    assert math.isfinite(res["ppl_decode_w4ax_kv4"]) and math.isfinite(res["ppl_decode_fp_cache"])
    assert res["ppl_decode_ratio"] == pytest.approx(res["ppl_decode_w4ax_kv4"] / res["ppl_decode_fp_cache"])
    printed = capsys.readouterr().out
    assert "W4 asym RTN g32" in printed and "KV4 cache (decode protocol)" in printed
    assert cli.main(["demo", "--model", tiny_dir, "--act-clip", "1.5", *SMALL]) == 2
    assert "act_clip must be in (0, 1]" in capsys.readouterr().err


def test_quantize_then_eval_and_generate_from_checkpoint(tiny_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert cli.main(["quantize", "--model", tiny_dir, "-o", str(ck), "--weight-method", "rtn",
                     "--calib-samples", "2", "--calib-seq-len", "64"]) == 0
    capsys.readouterr()
    assert cli.main(["eval-ppl", "--model", str(ck), "--windows", "2", "--seq-len", "64"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["windows"] == 2 and math.isfinite(res["perplexity"])
    assert cli.main(["generate", "hello", "--model", str(ck), "--max-new-tokens", "3"]) == 0
    assert cli.main(["generate", "hello", "--model", str(ck), "--max-new-tokens", "3", "--kv4"]) == 0
    assert cli.main(["eval-ppl", "--model", str(ck), "--windows", "2", "--seq-len", "64", "--kv4"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["protocol"] == "decode (KV4 cache)" and math.isfinite(res["perplexity"])


def test_generate_sampling_options(tiny_dir, capsys):
    def run(*extra):
        assert cli.main(["generate", "hello", "--model", tiny_dir, "--max-new-tokens", "12", *extra]) == 0
        return capsys.readouterr().out

    greedy = run()
    assert run() == greedy
    a = run("--temperature", "1.5", "--seed", "3")
    assert run("--temperature", "1.5", "--seed", "3") == a  # same seed, same text
    assert {run("--temperature", "1.5", "--seed", str(s)) for s in range(4, 8)} | {a} != {greedy}
    assert run("--repetition-penalty", "1.8") != greedy
    assert cli._sampling_kwargs(temperature=0.7, top_p=0.9, top_k=5) == dict(do_sample=True, temperature=0.7,
                                                                                top_p=0.9, top_k=5)
    for bad, msg in ((["--top-p", "0"], "top_p"), (["--temperature", "-1"], "temperature"),
                     (["--repetition-penalty", "3"], "repetition_penalty")):
        assert cli.main(["generate", "hello", "--model", tiny_dir, *bad]) == 2
        assert msg in capsys.readouterr().err


def test_generate_json_and_json_schema(tiny_dir, tmp_path, capsys):
    """--json / --json-schema: the output is (a prefix of: random weights need not close it within
    the token budget) a JSON object / a document of the schema."""
    from cometq.serve.schema import JsonSchemaGrammar
    from cometq.serve.structured import JSON_START, grammar_feed, json_feed

    assert cli.main(["generate", "hello", "--model", tiny_dir, "--max-new-tokens", "24", "--json"]) == 0
    out = capsys.readouterr().out.strip().encode()
    assert out.startswith(b"{") and json_feed(JSON_START, out) is not None
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(schema))
    assert cli.main(["generate", "hello", "--model", tiny_dir, "--max-new-tokens", "24", "--json-schema", str(f)]) == 0
    out = capsys.readouterr().out.strip().encode()
    g = JsonSchemaGrammar(schema)
    assert out.startswith(b"{") and grammar_feed(g, g.start, out) is not None
    for flags, ok in ((["--regex", "[a-c]{2}\\d{1,3}"], lambda t: re.fullmatch(r"[a-c]{2}\d{1,3}", t)),
                      (["--choice", "red", "green"], lambda t: t in ("red", "green"))):
        assert cli.main(["generate", "hello", "--model", tiny_dir, "--max-new-tokens", "8", *flags]) == 0
        out = capsys.readouterr().out.strip()
        assert ok(out), (flags, out)  # (at most 5 characters: complete within 8 tokens)
    assert cli.main(["generate", "hello", "--model", tiny_dir, "--regex", "(?<=x)"]) == 2
    assert "lookaround" in capsys.readouterr().err
    f.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}))
    assert cli.main(["generate", "hello", "--model", tiny_dir, "--json-schema", str(f)]) == 2
    assert "unsupported keyword(s) ['uniqueItems']" in capsys.readouterr().err
    assert cli.main(["generate", "hello", "--model", tiny_dir, "--json-schema", str(tmp_path / "none.json")]) == 2


def test_eval_ppl_on_a_text_file(tiny_dir, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert cli.main(["eval-ppl", "--model", tiny_dir, "--text-file", str(f), "--windows", "3", "--seq-len", "32"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["windows"] == 3 and res["perplexity"] > 1.0


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--windows", "0"])
    assert e.value.code == 2 and "--windows must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["eval-ppl", "--model", str(tmp_path / "nope")]) == 2
    assert "is not a local directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--int8-fraction", "x"])
