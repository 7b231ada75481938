"""Ahead-of-time compile the Triton kernels for sm_80 and sm_90 (no GPU needed).

The interpreter accepts programs the GPU compiler rejects, so every generated
autotune config of the GEMM (all distinct configs for the Llama-3 8B/70B shapes
and every M bucket) is compiled for sm_90, plus the activation quantizer's
modes, the GEMM feature variants (class/int32 runs, groups 64/32, debug,
atomics, asymmetric weights) on the decode tile, and the persistent kernel;
sm_80 compiles one of each family and one asymmetric kernel per path.  The deterministic
reduction (workspace-store split-K / persistent kernels, PTX checked free of atomics, and the
reduce kernel) is compiled on both archs; the Hopper TMA kernel (every offered config, both
scale modes, and its feature variants) on sm_90.  The rest (feature variants on 128x128 tiles, group 16, sm_80 for
every config) is the ``slow`` test: ``COMETQ_AOT_FULL=1 pytest tests/test_triton_aot.py``
or ``python -m cometq.kernels.aot --level full``.  Compilation runs in a
subprocess without TRITON_INTERPRET (the interpreter replaces jit functions).
"""
import json
import os
import subprocess
import sys

import _background
import pytest

pytest.importorskip("triton")


#: processes the AOT set is split over (``--shard i/N``): compilation is single-threaded, CI has 2 cores
AOT_SHARDS = 2


def _aot_jobs(level: str, out_dir, nice=0):
    """The AOT shards of ``level`` (submitted once: tests/_background.py): [(json path, Job)]."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = []
    for i in range(AOT_SHARDS):
        key = ("triton-aot", level, i)
        out = _AOT_OUT.setdefault(key, os.path.join(str(out_dir), f"aot_{level}_{i}.json"))
        jobs.append((out, _background.submit(
            key, [sys.executable, "-m", "cometq.kernels.aot", "--arch", "90", "--arch", "80", "--level", level,
                  "--json", out, "--shard", f"{i}/{AOT_SHARDS}"], env=env, nice=nice)))
    return jobs


_AOT_OUT: dict = {}


def background_start(names):
    """(tests/conftest.py, after collection) the CI set's shards start now, at the lowest CPU
    priority: they run on the core the test run leaves idle."""
    if "test_aot_compile_ci_set" in names:
        _aot_jobs("ci", _background.temp_dir("cometq_aot_"), nice=19)


def _aot(level: str, tmp_path, timeout: int):
    res, logs, rcs = [], [], []
    for out, job in _aot_jobs(level, tmp_path):
        rc, text, _ = job.wait(timeout=timeout)
        logs.append(text[-4000:])
        rcs.append(rc)
        assert os.path.exists(out), f"AOT run produced no results (rc={rc}):\n{text[-6000:]}"
        with open(out) as fh:
            res += json.loads(fh.read())
    bad = [f"sm_{x['arch']} {x['name']}: {x.get('problem') or x.get('error')}" for x in res if not x["ok"]]
    assert not bad, "kernels the GPU compiler rejects or miscompiles:\n" + "\n".join(bad)
    assert rcs == [0] * AOT_SHARDS, "\n".join(logs)
    names = [(x["arch"], x["name"]) for x in res]
    assert len(names) == len(set(names)), "a job compiled by two shards"
    return res


def test_aot_compile_ci_set(tmp_path):
    res = _aot("ci", tmp_path, timeout=900)
    # every distinct generated GEMM config was compiled for sm_90 (splits share a binary)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    n_cfg = subprocess.run(
        [sys.executable, "-c",
         "from cometq.kernels.aot import dedupe, jobs; print(sum(1 for j in dedupe(jobs()) if j[0].startswith('gemm[')))"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    expected = int(n_cfg.stdout.strip().splitlines()[-1])
    got = sum(1 for x in res if x["arch"] == 90 and x["name"].startswith("gemm["))
    assert got == expected >= 10
    # register budget of the generated configs (ptxas -v, sm_90a): the first candidate of every
    # M bucket -- what runs untuned (COMETQ_GEMM_TUNE=0) -- never spills, the others at most a little
    from cometq.kernels.w4ax_gemm import gen_configs

    gemm90 = {x["name"]: x for x in res if x["arch"] == 90 and x["name"].startswith("gemm[")}
    for x in gemm90.values():
        assert x["spill_bytes"] is not None and x["spill_bytes"] <= 256, x
    import re

    def unsplit(text):  # split-K factors share one binary: compare configs without them
        return re.sub(r"split=\d+, ", "", text)

    # the Hopper TMA kernel: every offered config in both scale modes, TMA loads + register-A wgmma
    # checked in the PTX (check_code), spills at most a little (block mode 128x128: 136 B)
    # (configs differing only in a split factor > 1 share one binary: SPLIT is a runtime argument)
    # static occupancy of every generated config (registers + shared memory -> CTAs per SM)
    for x in list(gemm90.values()):
        assert x.get("ctas_per_sm", 0) >= 1, x
    occ = subprocess.run(
        [sys.executable, "-c", "from cometq.kernels.aot import occupancy_sm90 as o; "
         "print(o(255, 40960, 8), o(128, 13316, 4), o(64, 20536, 4), o(255, 200000, 4))"],
        env=env, capture_output=True, text=True, timeout=120)
    assert occ.stdout.split() == ["1", "4", "8", "1"], occ.stdout + occ.stderr
    n_tma = len({(c.block_m, c.block_n, c.group_m, c.num_warps, c.num_stages, c.split > 1)
                 for mb in (16, 64, 256, 1024, 4096) for c in gen_configs(mb, 4096, 4096, 4, interpret=False, tma="only")})
    tma90 = {x["name"]: x for x in res if x["arch"] == 90 and x["name"].startswith("gemm-tma[")}
    # block g128, class per-channel, block g128 asymmetric (W4AxConfig()'s default format)
    n_asym = len({(c.block_m, c.block_n, c.group_m, c.num_warps, c.num_stages, c.split > 1)
                  for mb in (16, 64, 256, 1024, 4096)
                  for c in gen_configs(mb, 4096, 4096, 4, interpret=False, tma="only", asym=True)})
    assert len(tma90) == 2 * n_tma + n_asym >= 12 and n_asym == n_tma - 1  # (no 128x128 / 8 warps)
    assert sum(",asym," in name for name in tma90) == n_asym
    for x in tma90.values():
        assert x["spill_bytes"] is not None and x["spill_bytes"] <= 256, x
    assert any(x["name"].startswith("gemm-tma-variant[") for x in res if x["arch"] == 90)
    assert not any(x["name"].startswith("gemm-tma") for x in res if x["arch"] == 80)
    # instruction budget of one K block of the decode GEMM (SASS of the first decode candidate):
    # with the int8 nibble unpack compiled as byte shifts it was 855 instructions per thread, 352
    # of them PRMT byte shuffles (issue-bound near the ~1 TB/s the H100 measured); the word-wide
    # inline-PTX unpack brings it to ~350
    dec = unsplit(f"gemm[{gen_configs(16, 4096, 4096, 4, interpret=False)[0]}]")
    dec_hits = [x for name, x in gemm90.items() if unsplit(name) == dec]
    assert dec_hits and all(0 < x["loop_instructions"] < 450 and x["loop_prmt"] <= 100 for x in dec_hits), dec_hits
    for mb in (16, 64, 256, 1024, 4096):
        # the first integer-kernel candidate (M >= 1024 starts with the dequant path, whose
        # kernels are the dequant_* jobs checked below)
        first = next(c for c in gen_configs(mb, 4096, 4096, 4, interpret=False) if not c.dequant)
        hits = [x for name, x in gemm90.items() if unsplit(name) == unsplit(f"gemm[{first}]")]
        # M >= 1024 with INT8 blocks: the first is the H100's measured winner (128x128 swap +
        # interleave8), which spills ~130 B; everything else untuned must not spill
        allowed = 256 if mb >= 1024 else 0
        assert hits and all(x["spill_bytes"] <= allowed for x in hits), (mb, first, hits)
    # the dequant path's two kernels compiled for both archs, without spills
    dq = [x for x in res if x["name"].startswith("dequant_")]
    assert {x["arch"] for x in dq} == {80, 90} and all(x["ok"] and not x.get("spill_bytes") for x in dq), dq
    # the w16 route's kernel (wgmma with the dequantized weights in registers on sm_90, the exponent
    # trick for fp16: check_code): every variant on sm_90, two on sm_80
    w16 = [x for x in res if x["name"].startswith("w16[")]
    assert all(x["ok"] for x in w16) and sum(x["arch"] == 90 for x in w16) == 10 and \
        sum(x["arch"] == 80 for x in w16) == 2, w16
    # the act-quant gather kernel (act_gather checks: 16-byte row loads, the permutation through
    # shared memory, the division's fma fast path): both archs, no spills up to a 16384 tile
    gather = [x for x in res if x["name"].startswith("act_quant_gather[")]
    assert {x["arch"] for x in gather} == {80, 90} and all(x["ok"] for x in gather), gather
    assert all(not x.get("spill_bytes") for x in gather if "KP=32768" not in x["name"]), gather
    # the w16 kernel's tuning candidates (kernels/w16_gemm.py w16_configs): all on sm_90, one on sm_80
    cand = [x for x in res if x["name"].startswith("w16-cand[")]
    assert all(x["ok"] for x in cand) and sum(x["arch"] == 90 for x in cand) == 12 and \
        sum(x["arch"] == 80 for x in cand) == 1, cand
    names = {(x["arch"], x["name"].split("[")[0]) for x in res}
    for arch in (80, 90):
        for fam in ("act_quant", "gemm-variant", "persistent"):
            assert (arch, fam) in names, f"sm_{arch} compiled no {fam} kernel"
    # asymmetric-weight (ASYM) kernels: at least one per path on both archs
    for arch in (80, 90):
        asym = [x["name"] for x in res if x["arch"] == arch and "asym" in x["name"]]
        assert any(n.startswith("gemm-variant[asym") and "atomic" not in n for n in asym), f"sm_{arch}: no tiled ASYM"
        assert any(n.startswith("gemm-variant[asym") and "atomic" in n for n in asym), f"sm_{arch}: no split-K ASYM"
        assert any(n.startswith("persistent[asym") for n in asym), f"sm_{arch}: no persistent ASYM"
    asym90 = [x["name"] for x in res if x["arch"] == 90 and "asym" in x["name"]]
    for flavour in ("swap", "interleave8", "class", "block", "g32"):
        assert any(flavour in n for n in asym90), f"sm_90 compiled no ASYM {flavour} variant"
    assert any(n.startswith("gemm-asym[") for n in asym90), "sm_90 compiled no ASYM twin of a generated config"
    # deterministic reduction: workspace-store split-K and persistent kernels (no atomics, checked
    # in the PTX) and the reduce kernel, on both archs; on sm_90 also sym/asym twins of a generated
    # split config and a reduce kernel for every decode split tile shape
    for arch in (80, 90):
        mine = [x["name"] for x in res if x["arch"] == arch]
        assert any(n.startswith("gemm-variant[det") for n in mine), f"sm_{arch}: no deterministic split-K kernel"
        assert any(n.startswith(("persistent[det", "persistent[asym,det")) for n in mine), \
            f"sm_{arch}: no deterministic persistent kernel"
        assert any(n.startswith("reduce[") for n in mine), f"sm_{arch}: no reduce kernel"
    mine90 = [x["name"] for x in res if x["arch"] == 90]
    assert any(n.startswith("gemm-det[") for n in mine90) and any(n.startswith("gemm-det-asym[") for n in mine90)
    for tile in ("16x32", "16x64", "16x128"):
        assert any(n.startswith("reduce[") and tile in n for n in mine90), f"sm_90: no reduce kernel for {tile}"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("COMETQ_AOT_FULL") != "1", reason="~12 min on 2 cores; set COMETQ_AOT_FULL=1")
def test_aot_compile_everything(tmp_path):
    _aot("full", tmp_path, timeout=1800)


def _run_ptx(asm: str, x):
    """The snippet on numpy uint64 words: ``$1`` is the input, ``$0`` the result."""
    from cometq.testing import run_ptx

    return run_ptx(asm, {"$1": x})["$0"]


def test_word_unpack_trick_is_exact():
    """The GPU unpack (kernels/_common.py, inline PTX on 32-bit words of four packed bytes),
    *executed* from its PTX text, against the shift form the interpreter runs: every byte value in
    every lane.  (Triton packs four uint8 elements per register and unpacks four int8 results in
    the same lanes; each lane is independent, so lane order does not matter.)"""
    import numpy as np

    from cometq.kernels import _common as C

    b = np.arange(256, dtype=np.uint64)
    w = b | (((b * 7 + 3) % 256) << 8) | (((b + 101) % 256) << 16) | ((255 - b) << 24)

    def lanes(x):
        return np.stack([(x >> np.uint64(8 * i)) & np.uint64(255) for i in range(4)], -1).astype(np.uint8).view(np.int8)

    byte = lanes(w).view(np.uint8).astype(np.int32)
    lo = _run_ptx(C._ASM_LO.value, w)
    hi = _run_ptx(C._ASM_HI.value, w)
    assert (lanes(lo).astype(np.int32) == ((byte & 15) ^ 8) - 8).all()
    assert (lanes(hi).astype(np.int32) == ((byte >> 4) ^ 8) - 8).all()
