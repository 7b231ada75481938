"""The GPU benchmark scripts still run end to end (CPU smoke mode: tiny shapes, Triton interpreter),
so a GPU session never discovers a broken script at the cost of device time."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gemm_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_gemm.py"), "--dry-run", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    files = os.listdir(tmp_path)
    js = [f for f in files if f.endswith(".json")]
    assert js, files
    data = json.load(open(tmp_path / js[0]))
    assert data  # rows were written
    ours = [r for r in data["rows"] if r.get("kind") == "ours"]
    # the TMA kernel column: every row with groups >= 128 or per-channel weights, symmetric or
    # asymmetric (the ASYM offset term); smaller groups have no TMA kernel
    tma_ok = [r for r in ours if r.get("group", 128) in (-1, None) or r.get("group", 128) >= 128]
    assert tma_ok and all("triton-tma_us" in r for r in tma_ok), ours
    assert any(r["asym"] for r in tma_ok), ours
    assert not any("triton-tma_us" in r for r in ours if r not in tma_ok)
    # the w16 route's columns at small M (GEMM alone and the whole linear), every weight format
    small = [r for r in ours if r["M"] <= 256]
    assert small and all("triton-w16_us" in r and "triton-w16+aq_us" in r for r in small), small


def test_gpu_check_script_parses():
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_bench_gemm_graph_table():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import bench_gemm as B
    finally:
        sys.path.pop(0)
    rows = [dict(kind="peers", shape="8B.o", M=1, **{"fp16_us": 23.0, "fp16-graph_us": 10.0, "fp8-graph_us": 12.0}),
            dict(kind="ours", shape="8B.o", M=1, share=0.125, weights="sym", bytes=9e6,
                 **{"triton_us": 40.0, "triton-graph_us": 16.0, "triton+aq-graph_us": 30.0, "cuda-w16-graph_us": 5.0})]
    md = B.markdown(rows, ["triton"])
    assert "CUDA-graph replay" in md
    # FP16 | triton | triton+aq | cuda-w16 | triton vs FP16 | FP8 | best (cuda-w16, not a +aq) vs FP16 / FP8
    assert "| 8B.o | 1 | 12.5% | sym | 10.0 | 16.0 | 30.0 | 5.0 | 0.62x | 12.0 | 2.00x | 2.40x |" in md, md
    assert "CUDA-graph replay" not in B.markdown(rows[:1] + [dict(rows[1], **{"triton-graph_us": None})][:0], ["triton"])


def test_diag_decode_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "diag_decode.py"), "--dry-run", "--ms", "1",
                        "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(tmp_path / "diag_decode.json"))
    whats = {row["what"] for row in data["rows"]}
    assert {"act_quant", "w4ax", "w4ax_unordered", "w4ax_det+aq", "attention"} <= whats
    assert not [row for row in data["rows"] if any(k.endswith("_err") for k in row)]


def test_tune_decode_dry_run(tmp_path):
    """bench/tune_decode.py (fills the GEMM config cache for serving's decode buckets): every
    case calls the triton backend the way a quantized linear does and names its config; bad
    arguments are refused with a message."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = os.path.join(ROOT, "bench", "tune_decode.py")
    r = subprocess.run([sys.executable, script, "--dry-run", "--out", str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(tmp_path / "tune_decode.json"))
    assert {(row["weights"], row["m"]) for row in data["rows"]} == {(w, m) for w in ("asym-g128", "sym-g128")
                                                                     for m in (64, 16)}
    assert all(row["config"] and row["config"].startswith("GemmConfig(") and row["out_shape"] == [row["m"], 200]
               for row in data["rows"])
    for bad, msg in ((["--weights", "int3-g128"], "is not sym-gG"), (["--ms", "0"], "must be >= 1"),
                     (["--shapes", "8B.lm_head"], "unknown shape")):
        r = subprocess.run([sys.executable, script, *bad], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr, r.stderr[-2000:]


def test_bench_attention_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = tmp_path / "attn"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_attention.py"), "--dry-run", "--sweep",
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.load(open(str(out) + ".json"))
    row = data["rows"][0]
    assert row["ms_kv4"] > 0 and row["ms_kv4_fold"] > 0  # both variants ran (G=16 channel keys: fold eligible)
    assert row["config"] == {"num_warps": 4, "tile": 16, "lazy": False}  # untuned on CPU: the first candidate
    # the sweep timed every candidate (16-token blocks: tile 16 at 4 / 2 / 1 warps) without errors
    assert {(x["num_warps"], x["tile"]) for x in row["sweep"]} == {(4, 16), (2, 16), (1, 16)}
    assert all(x.get("ms", 0) > 0 for x in row["sweep"])
    md = open(str(out) + ".md").read()
    assert "fold_k" in md and "Launch-config sweep" in md


def test_microbench_smoke_and_table(tmp_path):
    """The pytest-benchmark microbenchmarks run (CPU: tiny shapes, reference ops) and their JSON
    turns into the ratio table."""
    out = tmp_path / "micro.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                        os.path.join(ROOT, "bench", "test_microbench.py"), f"--benchmark-json={out}"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.load(open(out))
    groups = {b["group"] for b in data["benchmarks"]}
    assert {"linear tiny M=3", "decode attention b=2 ctx=80", "decode append b=2", "layer elementwise b=2"} <= groups, \
        groups
    t = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "microbench_table.py"), str(out), "--out",
                        str(tmp_path / "micro.md")], capture_output=True, text=True, timeout=60)
    assert t.returncode == 0, t.stderr
    md = (tmp_path / "micro.md").read_text()
    assert "| linear tiny M=3 | cometq-reference |" in md and "x vs fp16 |" in md
    assert "x vs sdpa-fp16 |" in md


def test_gpu_check_plumbing_on_cpu(tmp_path):
    """bench/gpu_check.sh end to end on CPU with every GPU stage skipped but the microbenchmarks:
    stage bookkeeping, the summary JSON and the tarball work (a broken script would otherwise
    cost a lease's device time)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_WORK=str(work), PYTHON=sys.executable, GPU_CHECK_BUDGET_S="200",
               GPU_CHECK_SKIP="build,splitk_fixup_smoke,triton_tests,cuda_tests,toolchain,diag,gemm,gemm_large,gemm_shares,gemm_class,attention,prefill,serving,autotune,tune_decode,ncu_w16")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # non-zero: the build was skipped (by design)
    summary = json.load(open(out / "gpu_check_summary.json"))
    assert summary["stages"]["microbench"]["status"] == "ok", summary
    assert summary["stages"]["serving"]["status"] == "skipped"
    import tarfile

    with tarfile.open(out / "gpu_check.tgz") as t:
        names = {os.path.basename(n) for n in t.getnames()}
    assert {"microbench.json", "microbench.md", "steps.log", "gpu_check_summary.json"} <= names, names


def test_diag_ncu_w16_driver_runs_without_a_gpu():
    """bench/diag_ncu_w16.py (gpu_check's ncu_w16 stage driver) imports and exits cleanly here."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "diag_ncu_w16.py"), "--reps", "1"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    if not __import__("torch").cuda.is_available():
        assert "no CUDA device" in r.stdout


def _load_bench_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_diag_wgmma_probe_names_a_wrong_layout(tmp_path):
    """bench/diag_wgmma.py (gpu_check's wgmma_probe stage): exits cleanly without a GPU, and its
    analysis finds a K-position mix-up and a token-row mix-up when the kernel has them -- here a
    stand-in kernel (the op's reference on permuted operands) -- and nothing on a correct one."""
    import torch

    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "diag_wgmma.py"), "--out",
                        str(tmp_path / "p.json")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    if not torch.cuda.is_available():
        assert "skipped" in json.load(open(tmp_path / "p.json"))
    from cometq import ops

    mod = _load_bench_module("diag_wgmma")

    def fake(perm_k=None, perm_m=None):
        class CR:
            W16_WGMMA_TILES = (4,)

            @staticmethod
            def cuda_w16_gemm(a, qweight, scales, offsets, group, bias, out_dtype, split_k=0, tile=0):
                a = a[:, perm_k] if perm_k is not None else a
                y = ops._ref_w16_gemm(a, qweight, scales, offsets, group, bias, out_dtype)
                return y[perm_m] if perm_m is not None else y
        return CR

    ok = mod.probe_positions(fake(), torch.device("cpu"))["4"]
    assert ok["positions_wrong"] == 0 and not ok["rows_not_scaling (p, rows)"] and ok["nan"] == 0
    pk = torch.arange(128)
    pk[[3, 70]] = pk[[70, 3]]  # positions 3 and 70 swapped (a low / high nibble mix-up)
    bad = mod.probe_positions(fake(perm_k=pk), torch.device("cpu"))["4"]
    assert bad["positions_wrong"] == 2 and bad["first_wrong (p, q)"] == [(3, 70), (70, 3)]
    pm = torch.arange(64)
    pm[[0, 9]] = pm[[9, 0]]  # output rows of tokens 0 and 9 swapped
    rows = mod.probe_positions(fake(perm_m=pm), torch.device("cpu"))["4"]["rows_not_scaling (p, rows)"]
    assert rows and rows[0] == (0, [0, 9])


def test_diag_pdl_runs_without_a_gpu(tmp_path):
    """bench/diag_pdl.py (gpu_check's pdl stage) imports and exits cleanly here, saying why it skipped."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "diag_pdl.py"), "--out", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    if not __import__("torch").cuda.is_available():
        assert json.load(open(tmp_path / "p.json"))["skipped"] == "needs an sm_90 device"


def test_diag_prefill_dry_run(tmp_path):
    """bench/diag_prefill.py (gpu_check's prefill stage) on the tiny model: both systems, each
    shape timed and profiled, JSON written; a bad --shapes value is refused."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "diag_prefill.py"), "--quick", "--shapes", "2x16",
                        "--reps", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(tmp_path / "prefill.json"))
    assert [(row["system"], row["tokens"]) for row in data["rows"]] == [("w4ax", 32), ("fp", 32)]
    assert all(row["ms"] > 0 and row["top_cpu_ops"] for row in data["rows"])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "diag_prefill.py"), "--quick", "--shapes", "2x",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "--shapes wants SEQSxLEN" in r.stderr


def test_bench_act_quant_dry_run(tmp_path):
    """``--what act_quant``: every column (both block-mode grids, the FAKE pass, the copy), a row
    on each side of the by-rows threshold, and the markdown table with them."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_gemm.py"), "--dry-run", "--what", "act_quant",
                        "--ms", "3,300", "--shares", "0.25", "--no-plot", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(tmp_path / "gemm.json"))
    aq = [x for x in data["rows"] if x.get("kind") == "act_quant"]
    assert {x["M"] for x in aq} == {3, 300}, aq
    for x in aq:
        for c in ("copy", "aq_block", "aq_class", "aq_block_rows", "aq_block_blocks", "aq_fake"):
            assert x.get(c + "_us", 0) > 0, (c, x)
    md = open(tmp_path / "gemm.md").read()
    assert "block, by rows GB/s" in md and "FAKE (x -> 16-bit A') GB/s" in md
