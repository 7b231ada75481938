"""`cometq serve` / `cometq bench` end to end (CPU): a real subprocess on loopback, the quick benchmark."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from cometq.cli import build_parser, main  # noqa: E402
from cometq.serve.bench import random_llama  # noqa: E402
from cometq.serve.runner import Chunk, ModelRunner  # noqa: E402
from cometq.serve.tiny import byte_tokenizer, tiny_model  # noqa: E402
from cometq.testing import RUNNER_FP32_ATOL  # noqa: E402


def test_cli_parsers():
    a = build_parser().parse_args(["serve", "--no-quantize", "--no-kv4", "--port", "0"])
    assert (a.quantize, a.kv4, a.port, a.host) == (False, False, 0, "127.0.0.1")
    assert a.cuda_graphs is None and a.enforce_eager is False and a.warmup is None
    assert build_parser().parse_args(["serve", "--cuda-graphs"]).cuda_graphs is True
    assert a.async_scheduling is True
    assert build_parser().parse_args(["serve", "--no-async-scheduling"]).async_scheduling is False
    assert a.api_key is None and build_parser().parse_args(["serve", "--api-key", "k"]).api_key == "k"
    from cometq.serve.cli import load_chat_template

    assert load_chat_template("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"
    for bad, msg in (("chatml", "neither a file nor"), ("{% for m in %}", "not a valid Jinja")):
        with pytest.raises(ValueError, match=msg):
            load_chat_template(bad)
    # a bad key (or tool-call flag) fails at once, before the model loads
    with pytest.raises(ValueError, match="api_key must be a non-empty string"):
        from cometq.serve.cli import cmd_serve

        cmd_serve(build_parser().parse_args(["serve", "--api-key", " k ", "--model", "/nonexistent"]))
    for flags, msg in ((["--enable-auto-tool-choice"], "only --enable-auto-tool-choice"),
                       (["--tool-call-parser", "hermes"], "only --tool-call-parser hermes")):
        with pytest.raises(ValueError, match=msg):
            cmd_serve(build_parser().parse_args(["serve", *flags, "--model", "/nonexistent"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tool-call-parser", "nope"])
    from cometq.serve.bench import parse_system
    from cometq.serve.launch import build_engine

    assert parse_system("cometq-w4ax-kv4+graphs-sync@sym-g128") == ("cometq-w4ax-kv4+graphs-sync",
                                                                    {"weight_sym": True, "group_size": 128})
    assert build_engine(tiny_model(), None, kv4=True, num_blocks=4, block_size=16,
                        async_scheduling=False).config.async_scheduling is False
    with pytest.raises(TypeError, match="async_scheduling must be a bool"):
        from cometq.serve.engine import EngineConfig

        EngineConfig(async_scheduling=1)
    from cometq.serve.cli import use_cuda_graphs

    def graphs(*argv, device="cuda"):
        return use_cuda_graphs(build_parser().parse_args(["serve", *argv]), device)

    # default: on for the KV4 pool on CUDA; off for the full-precision pool and on the CPU
    assert graphs() is True and graphs("--no-kv4") is False and graphs(device="cpu") is False
    assert graphs("--enforce-eager") is False and graphs("--no-cuda-graphs") is False
    assert graphs("--cuda-graphs", "--no-kv4") is True and graphs("--cuda-graphs", device="cpu") is True
    with pytest.raises(ValueError, match="contradict"):
        graphs("--cuda-graphs", "--enforce-eager")
    a = build_parser().parse_args(["bench", "--quick", "--batch-sizes", "1,2"])
    assert a.quick and a.batch_sizes == "1,2"
    with pytest.raises(SystemExit) as ei:
        main(["bench", "--help"])
    assert ei.value.code == 0


def test_cli_serve_subprocess(tmp_path):
    d = tmp_path / "tiny"
    tiny_model().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    env = dict(os.environ, HF_HUB_OFFLINE="1", COMETQ_BACKEND="reference", COMETQ_API_KEY="k-123")
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text("{% for m in messages %}<<{{ m['role'] }}|{{ m['content'] }}>>\n{% endfor %}"
                    "{% if add_generation_prompt %}A:{% endif %}")
    proc = subprocess.Popen([sys.executable, "-m", "cometq", "serve", "--model", str(d), "--port", "0",
                             "--no-quantize", "--kv4", "--block-size", "16", "--kv-tokens", "1024",
                             "--served-model-name", "tiny", "--chat-template", str(tmpl)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        url, lines, t0 = None, [], time.monotonic()
        while url is None and time.monotonic() - t0 < 120:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            url = m.group(1) if m else None
        assert url, "".join(lines[-20:])
        assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok"}
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                "temperature": 0, "ignore_eos": True}
        # COMETQ_API_KEY: the /v1 routes want it
        assert httpx.post(url + "/v1/chat/completions", timeout=60, json=body).status_code == 401
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json=body, headers={"Authorization": "Bearer k-123"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        # --chat-template: the served template (a transcript with a marker the prompt length shows)
        tok_r = httpx.post(url + "/tokenize", timeout=30, json={"messages": body["messages"]})
        assert tok_r.json()["tokens"] == list(b"<<user|hi>>\nA:")
        assert "cometq_kv_blocks_total 64" in httpx.get(url + "/metrics", timeout=30).text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def test_bench_quick(tmp_path):
    rc = main(["bench", "--quick", "--batch-sizes", "2", "--input-len", "8", "--output-len", "4",
               "--block-size", "16", "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    res = json.loads((tmp_path / "serving_t.json").read_text())
    rows = res["results"]
    assert res["complete"] is True  # (rewritten after every row with complete=False while running)
    assert {r["system"] for r in rows} == {"cometq-w4ax-kv4", "cometq-fp", "hf-generate"}
    for r in rows:
        assert r["batch"] == 2 and r["output_tokens_per_s"] > 0 and r["ttft_mean_s"] > 0
    md = (tmp_path / "serving_t.md").read_text()
    assert "| cometq-w4ax-kv4 | 2 |" in md
    for r in rows:
        if r["system"] == "hf-generate":
            continue
        # 2 prompts of 8 tokens fit one step: one prefill step, then 3 decode-only steps of 2 sequences
        assert (r["prefill_steps"], r["decode_only_steps"]) == (1, 3), r
        assert r["slowest_steps"] and {s["decode"] for s in r["slowest_steps"]} <= {0, 2}
        assert isinstance(r["tuned_in_timed_run"], dict)
    assert "prefill steps: n / s" in md


def test_step_breakdown():
    from cometq.serve.bench import step_breakdown

    b = step_breakdown([0.5, 0.01, 2.0, 0.02], [(0, 8, 8192), (8, 0, 0), (8, 8, 8184), (16, 0, 0)], k=2)
    assert (b["prefill_steps"], b["decode_only_steps"]) == (2, 2)
    assert b["prefill_steps_ms"] == pytest.approx(2500.0) and b["decode_only_steps_ms"] == pytest.approx(30.0)
    assert b["slowest_steps"] == [{"index": 2, "ms": 2000.0, "decode": 8, "prefill": 8, "tokens": 8184},
                                  {"index": 0, "ms": 500.0, "decode": 0, "prefill": 8, "tokens": 8192}]
    # the decode-only steps' spread: quantiles, the mean per tenth of the run, the slowest of them
    assert b["decode_only_ms_quantiles"] == {"p10": 10.0, "p50": 20.0, "p90": 20.0, "p99": 20.0, "max": 20.0}
    assert b["decode_only_ms_by_tenth"] == [10.0, 20.0]
    assert b["slowest_decode_only_steps"] == [{"index": 3, "ms": 20.0, "decode": 16}, {"index": 1, "ms": 10.0, "decode": 8}]
    d = step_breakdown([0.009] * 18 + [0.012] * 2, [(64, 0, 0)] * 20, k=1)  # a tail in the last tenth
    assert d["decode_only_ms_by_tenth"] == [9.0] * 9 + [12.0] and d["decode_only_ms_quantiles"]["p90"] == 12.0
    assert d["prefill_steps"] == 0 and d["slowest_decode_only_steps"][0]["ms"] == 12.0


def test_random_llama_builder_matches_hf():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)
    m = random_llama(cfg, "cpu", torch.float32)
    assert torch.equal(m.model.rotary_emb.inv_freq, tf.AutoModelForCausalLM.from_config(cfg).model.rotary_emb.inv_freq)
    r = ModelRunner.with_fp_pool(m, num_blocks=4, block_size=8)
    r.pool.reserve(0, 10)
    ids = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        torch.testing.assert_close(r.forward([Chunk(0, ids, 0)], all_logits=True), m(torch.tensor([ids])).logits[0],
                                   rtol=0, atol=RUNNER_FP32_ATOL)


def test_build_engine_cuda_graphs_needs_cuda():
    from cometq.serve.launch import build_engine
    from cometq.serve.tiny import byte_tokenizer, tiny_model

    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        build_engine(tiny_model(), byte_tokenizer(), kv4=False, kv_tokens=256, max_num_seqs=4, cuda_graphs=True)


def test_decode_step_profile_runs_and_drains():
    """The serving bench's host-bound diagnostic: a fresh batch, a few profiled decode steps
    (on CPU only wall time is meaningful: no GPU kernels), and the engine left empty."""
    from cometq.serve.bench import _decode_step_profile, markdown
    from cometq.serve.engine import Engine, EngineConfig
    from cometq.serve.runner import ModelRunner
    from cometq.serve.tiny import tiny_model

    model = tiny_model()
    runner = ModelRunner.with_fp_pool(model, num_blocks=64, block_size=8)
    # a token budget of 20 splits the 4 x 12 prompts: step 0 prefill only (12 + 8), step 1 a decode
    # row + a continued chunk + a fresh prompt + the start of the last, step 2 three decode rows + a continued chunk
    eng = Engine(runner, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=20, max_model_len=64))
    r = _decode_step_profile(eng, runner, batch=4, in_len=12, seed=0, steps=3, device="cpu")
    assert r["decode_step_profiled"] == 3 and r["decode_step_wall_ms"] > 0 and r["decode_step_gpu_busy_ms"] == 0
    assert r["decode_step_top_kernels"] == []  # no GPU kernels on CPU
    cpu = r["decode_step_top_cpu_ops"]  # the host side is profiled everywhere
    assert 0 < len(cpu) <= 10 and all(c["ms_per_step"] > 0 for c in cpu)
    assert cpu == sorted(cpu, key=lambda c: -c["ms_per_step"]) and abs(sum(c["share"] for c in cpu)) <= 1.0 + 1e-9
    py = r["decode_step_top_python"]  # and the Python functions (cProfile)
    assert 0 < len(py) <= 12 and any("engine.py" in f["name"] or "runner.py" in f["name"] for f in py)
    # the first three (prefill) steps profiled one by one: wall time; no GPU kernels on CPU
    pre = r["prefill_steps_profiled"]
    assert [st["shape"] for st in pre] == [[0, 2, 20], [1, 3, 19], [3, 1, 9]]
    assert all(st["wall_ms"] > 0 and st["gpu_busy_ms"] == 0 and st["top_kernels"] == [] for st in pre)
    md = markdown({"model": "tiny", "dtype": "fp32", "device": "cpu", "device_name": "cpu",
                   "results": [dict(r, system="cometq-fp", batch=4, input_len=12, output_len=3, output_tokens_per_s=1.0,
                                    total_tokens_per_s=1.0, ttft_mean_s=0.1, ttft_p90_s=0.1, tpot_mean_s=0.1)]})
    assert "| 1 | 1+3/19 |" in md and "Where the slowest of them goes" in md
    assert not eng.has_work()


def test_bench_writes_rows_as_they_finish(tmp_path, monkeypatch):
    """A time-capped run keeps what finished: the JSON / markdown are rewritten after every row."""
    from cometq.serve import bench as B

    seen = []
    real = B.run_engine

    def run_engine(*a, **kw):
        if seen:  # the second engine run "times out": the first one's row must be on disk already
            on_disk = json.loads((tmp_path / "serving_t.json").read_text())
            assert on_disk["complete"] is False and len(on_disk["results"]) == 1
            raise KeyboardInterrupt
        seen.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(B, "run_engine", run_engine)
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--quick", "--batch-sizes", "2", "--input-len", "8", "--output-len", "4", "--block-size", "16",
              "--systems", "cometq-fp,cometq-w4ax-kv4", "--out", str(tmp_path), "--tag", "t"])
    assert "| cometq-fp | 2 |" in (tmp_path / "serving_t.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("system", ["cometq-w4ax-kv4+graphs", "cometq-w4ax-kv4+piecewise"])
def test_bench_graph_systems_need_cuda(tmp_path, system, capsys):
    """The CLI reports the bad --systems value (exit 2, message on stderr), never a traceback."""
    assert main(["bench", "--quick", "--systems", system, "--out", str(tmp_path)]) == 2
    assert "the +graphs / +piecewise systems need a CUDA device" in capsys.readouterr().err
    assert main(["bench", "--quick", "--systems", system + "x", "--out", str(tmp_path)]) == 2
    assert f"unknown system '{system}x'" in capsys.readouterr().err


def test_bench_system_weight_formats(tmp_path, capsys):
    """A W4Ax system may name its weight format (``@sym-g128``): each format is quantized once and
    labelled in the rows; bad names and formats are refused by the CLI with exit 2."""
    from cometq.serve.bench import parse_system

    assert parse_system("cometq-w4ax-kv4+graphs@sym-g128") == ("cometq-w4ax-kv4+graphs",
                                                               {"weight_sym": True, "group_size": 128})
    assert parse_system("cometq-w4ax-kv4@asym-g-1") == ("cometq-w4ax-kv4", {"weight_sym": False, "group_size": -1})
    assert parse_system("hf-generate") == ("hf-generate", {})
    for bad, msg in (("cometq-fp@sym-g128", "only the cometq-w4ax-kv4 systems take a weight format"),
                     ("cometq-w4ax-kv4@sym", "is not sym-gG / asym-gG"),
                     ("cometq-w4ax-kv4@int3-g128", "is not sym-gG / asym-gG")):
        with pytest.raises(ValueError, match=msg):
            parse_system(bad)
        assert main(["bench", "--quick", "--systems", bad, "--out", str(tmp_path)]) == 2
        assert msg in capsys.readouterr().err
    assert main(["bench", "--quick", "--batch-sizes", "2", "--input-len", "8", "--output-len", "3", "--block-size", "16",
                 "--systems", "cometq-w4ax-kv4@sym-g128,cometq-w4ax-kv4", "--out", str(tmp_path), "--tag", "w"]) == 0
    res = json.loads((tmp_path / "serving_w.json").read_text())
    assert [r["system"] for r in res["results"]] == ["cometq-w4ax-kv4", "cometq-w4ax-kv4@sym-g128"]
    assert all(r["output_tokens_per_s"] > 0 for r in res["results"])
    assert "| cometq-w4ax-kv4@sym-g128 | 2 |" in (tmp_path / "serving_w.md").read_text()


def test_bench_shared_prefix_and_apc_systems(tmp_path):
    """--shared-prefix gives every prompt the same head; a +apc system runs the engine with prefix
    caching, and with a step budget that admits the prompts over several steps the later ones take
    the head from the cache (the count is in the row); the plain twin takes nothing."""
    from cometq.serve.bench import _prompts, _split_apc, parse_system

    ps = _prompts(100, 3, 10, 0, shared=6)
    assert ps[0][:6] == ps[1][:6] == ps[2][:6] and len({tuple(p[6:]) for p in ps}) == 3
    assert all(len(p) == 10 for p in ps) and _prompts(100, 2, 5, 0, shared=0) != _prompts(100, 2, 5, 0, shared=5)
    assert parse_system("cometq-fp+graphs+apc") == ("cometq-fp+graphs+apc", {})
    assert _split_apc("cometq-fp+graphs+apc") == ("cometq-fp+graphs", True)
    assert main(["bench", "--quick", "--systems", "cometq-fp+graphs+apc", "--device", "cpu",
                 "--out", str(tmp_path)]) == 2  # (the graph systems need a CUDA device)
    assert main(["bench", "--quick", "--batch-sizes", "4", "--input-len", "40", "--output-len", "3",
                 "--block-size", "8", "--shared-prefix", "32", "--max-num-batched-tokens", "40",
                 "--systems", "cometq-fp,cometq-fp+apc,cometq-w4ax-kv4+apc", "--out", str(tmp_path),
                 "--tag", "apc"]) == 0
    rows = {r["system"]: r for r in json.loads((tmp_path / "serving_apc.json").read_text())["results"]}
    assert rows["cometq-fp"]["prefix_hit_tokens"] == 0
    assert rows["cometq-fp+apc"]["prefix_hit_tokens"] == rows["cometq-w4ax-kv4+apc"]["prefix_hit_tokens"] == 3 * 32
    assert "[shared prefix 32, 96 cached tokens used]" in (tmp_path / "serving_apc.md").read_text()
    assert main(["bench", "--quick", "--input-len", "8", "--shared-prefix", "9", "--out", str(tmp_path)]) == 2
