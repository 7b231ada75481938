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


def test_gpu_check_script_parses():
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
