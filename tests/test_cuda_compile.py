"""Compile-only checks of csrc/ (CPU CI: needs nvcc, no GPU).

* Every kernel instantiation compiles with nvcc for sm_80 and sm_90a (the
  Ampere INT4 tensor-core path and the Hopper INT8 path are both template
  instantiations, so both archs compile both; ptxas must list every entry).
* The PTX really uses the instructions the design relies on (s4 and s8
  mma.sync, cp.async) and nothing spills to local memory is REPORTED (not
  asserted: performance is never asserted in tests).
* csrc/*.cu / *.cuh / *.h include no torch header (the kernel library builds
  without torch, see CMakeLists.txt); torch_bindings.cpp passes a host-compiler
  syntax check against the installed torch headers when they are available.

All compilations run concurrently in one module fixture (~3-4 min on 2 cores; one nvcc run per
file and arch, whose PTX the PTX checks read).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import _background
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
ARCHS = ("sm_80", "sm_90a")
KERNEL_FILES = ("w4ax_gemm.cu", "act_quant.cu", "kv4_attention.cu", "w16_gemm.cu")
# ptxas entry counts per file: GEMM = 3 tile configs x 2 mma paths x {symmetric, asymmetric weights}
# + split-K finalize; act_quant = 3 kernels x 3 input dtypes x 2 outputs (packed, FAKE)
EXPECTED_ENTRIES = {"w4ax_gemm.cu": 29, "act_quant.cu": 18,  # gemm: 4 tiles x s4/s8 x sym/asym + the 3 M <= 64 tiles
                    # again with the in-kernel split-K reduction (FIXUP) + the finalize kernel;
                    # act_quant: class-row, block and rows kernels x 3 dtypes x packed / FAKE output
                    "kv4_attention.cu": 22,  # head_dim 64/128 x fp16/bf16 IO x (4 launch variants + the ring) + 2 reduces
                    # 4 mma.sync tiles + 5 wgmma tiles, each x fp16/bf16 operands x sym/asym weights x in-kernel
                    # split-K or not
                    "w16_gemm.cu": 72}
# torch's extension build adds these defines to every nvcc call (no implicit half/bfloat16
# conversions or operators): compile with them too, or code that only builds outside torch passes
# here (run 9 on the H200: `T(0.f)` for T = __half broke the extension build)
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", *TORCH_NVCC_DEFINES, "-Xptxas", "-v", "-I", CSRC]


def _find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _torch_include():
    try:
        import torch.utils.cpp_extension as ce

        inc = ce.include_paths()
    except Exception:  # pragma: no cover
        return None
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "CUDAGuard.h")) for p in inc):
        return None
    return inc


def _arch_flags(arch):
    """nvcc flags building SASS for ``arch`` and nothing else: nvcc 13's ``-arch=sm_90a`` also
    compiles compute_90 PTX for embedding (a second cicc + ptxas pass over every file: half the
    sm_90a compile time); one -gencode pair does not."""
    virt = "compute_" + arch[len("sm_"):]
    return [f"-gencode=arch={virt},code={arch}"]


def _jobs(tmp):
    """{key: command} of every compilation, outputs under ``tmp``."""
    jobs = {}
    for f in KERNEL_FILES:
        for arch in ARCHS:
            out = os.path.join(tmp, f"{f}.{arch}.o")
            # -keep: the PTX the object was built from stays in its own directory for the PTX checks
            # below (one cicc run per file and arch; separate `nvcc -ptx` runs cost ~110 s of CPU)
            keep = os.path.join(tmp, f"keep-{f}-{arch}")
            os.makedirs(keep)
            jobs[("obj", f, arch)] = [NVCC, "-c", *_arch_flags(arch), *NVCC_FLAGS, "-keep", "-keep-dir", keep,
                                      os.path.join(CSRC, f), "-o", out]
    inc = _torch_include()
    cxx = shutil.which("g++") or shutil.which("c++")
    if inc and cxx:
        # CPU wheels of torch ship the c10/cuda headers but not the generated cmake macro header
        stub = os.path.join(tmp, "stub", "c10", "cuda", "impl")
        os.makedirs(stub)
        with open(os.path.join(stub, "cuda_cmake_macros.h"), "w") as fh:
            fh.write("#pragma once\n")
        cuda_inc = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "include")
        if not os.path.exists(os.path.join(cuda_inc, "cuda_runtime.h")):
            cuda_inc = "/usr/local/cuda/include"
        args = [cxx, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
                "-I", os.path.join(tmp, "stub")]
        for p in inc:
            args += ["-I", p]
        args += ["-I", sysconfig.get_paths()["include"], "-I", cuda_inc, "-I", CSRC,
                 os.path.join(CSRC, "torch_bindings.cpp")]
        # torch's extension build passes -std=c++17 on the GPU image (torch 2.11) and may pass
        # C++20 elsewhere: the bindings compile under both
        for std in ("c++17", "c++20"):
            jobs[("bindings", std)] = [a if a != "-std=c++17" else f"-std={std}" for a in args]
    return jobs


_LAUNCH: dict = {}


def _launch(nice=0):
    """Submit every compilation (once): {"tmp": dir, "t0": time, "jobs": {key: _background.Job}}."""
    if not _LAUNCH:
        tmp = tempfile.mkdtemp(prefix="cometq_nvcc_")
        _LAUNCH.update(tmp=tmp, t0=time.time(),
                       jobs={k: _background.submit(("nvcc", k), cmd, nice=nice) for k, cmd in _jobs(tmp).items()})
    return _LAUNCH


def background_start(names):
    """(tests/conftest.py, after collection) every compilation starts now, below the test process's
    CPU priority: they run on the core the test run leaves idle (tests/_background.py)."""
    if NVCC is not None:
        _launch(nice=10)


@pytest.fixture(scope="module")
def builds():
    """Every compilation (started after collection, or now); {key: (returncode, output, seconds)}."""
    launch = _launch()
    results = {key: job.wait(timeout=900) for key, job in launch["jobs"].items()}
    results["_wall"] = time.time() - launch["t0"]
    sys.stderr.write(f"\n[nvcc] all compilations: {results['_wall']:.1f}s since they started\n")
    results["_tmp"] = tmp = launch["tmp"]
    yield results
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fname", KERNEL_FILES)
def test_kernels_compile(builds, fname, arch):
    rc, out, secs = builds[("obj", fname, arch)]
    assert rc == 0, f"nvcc -arch={arch} {fname} failed:\n{out}"
    ours = [ln for ln in out.splitlines() if "csrc" in ln and re.search(r"\bwarning\b", ln)]
    assert not ours, "warnings in csrc:\n" + "\n".join(ours)
    entries = re.findall(r"Compiling entry function '([^']+)'", out)
    assert len(set(entries)) == EXPECTED_ENTRIES[fname], f"{fname} {arch}: entries {entries}"
    # report (never assert) register use and spills
    usage = re.findall(r"Used (\d+) registers", out)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", out)]
    sys.stderr.write(f"\n[{fname} {arch}] {secs:.1f}s, registers {usage}, spill stores {spills}\n")


def _ptx(builds, fname, arch):
    """The PTX of csrc/<fname>.cu for ``arch``, as nvcc built the object from it (-keep)."""
    rc, out, _ = builds[("obj", f"{fname}.cu", arch)]
    assert rc == 0, out
    with open(os.path.join(builds["_tmp"], f"keep-{fname}.cu-{arch}", f"{fname}.ptx")) as fh:
        return fh.read()


@pytest.mark.parametrize("arch", ARCHS)
def test_ptx_uses_the_intended_instructions(builds, arch):
    ptx = _ptx(builds, "w4ax_gemm", arch)
    assert "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32" in ptx
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in ptx
    assert "cp.async.cg.shared.global" in ptx
    assert "cp.async.ca.shared.global" in ptx  # the 4-byte scale copies into each stage's scale area
    # the GEMM entries read no scale with __ldg any more (the flush reads the stage's scale area;
    # the first version had 10-36 `ld.global.nc.f32` per entry); the finalize kernel keeps its own
    gemm = re.split(r"\.visible \.entry ", ptx)
    gemm = [e for e in gemm if e.startswith("_ZN6cometq16w4ax_gemm_kernel")]
    assert len(gemm) == 28 and all("ld.global.nc.f32" not in e for e in gemm)  # 4 tiles x s4/s8 x sym/asym + 12
    # the in-kernel split-K reduction (template flag FIXUP, the 3 tiles of M <= 64): a counter
    # atomic and L2 reads of the other splits' slabs there, nothing of it in the 16 others
    fixup = [e for e in gemm if re.match(r"\S*ELb[01]ELb[01]ELb1EE", e)]
    assert len(fixup) == 12 and all("atom.global.add" in e and "ld.global.cg" in e for e in fixup)
    assert not any("atom." in e for e in gemm if e not in fixup)
    assert "cp.async.wait_group" in ptx
    assert "prmt.b32" in ptx  # the INT8 activation byte de-interleave
    # asymmetric weights: activation row sums as an MMA against ones, not dp4a + quad shuffles
    # (the shuffles left are the block table's and split range's warp reductions)
    assert "dp4a" not in ptx
    # sm_90's weight conversion with the sub-segment mask folded into a 3-input lop3 (and3_f0)
    assert "0xF0F0F0F0, 0x80;" in ptx


@pytest.mark.parametrize("arch", ARCHS)
def test_kv4_attention_ptx_uses_the_intended_instructions(builds, arch):
    ptx = _ptx(builds, "kv4_attention", arch)
    # fp16 tensor cores with fp32 accumulation for QK^T (keys on the rows) and PV (channels on the rows)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx
    # P goes from the S^T accumulator layout to the PV B operand by an 8x8 transpose, not shared memory
    assert "movmatrix.sync.aligned.m8n8.trans.b16" in ptx
    # nibbles -> fp16 {1024 + lo, 64 + hi} with one lop3 (a & b) | c after a byte permute
    assert "15728655" in ptx or "0x00F0000F" in ptx  # the key pair's mask (0x00F0000F)
    assert "prmt.b32" in ptx and "lop3.b32" in ptx
    # the loop holds no shared-memory traffic of K/V: only the query (once per key group) and the
    # final merge of the warps use it
    entries = [e for e in re.split(r"\.entry ", ptx)[1:] if "kv4_attn_kernel" in e.split("(")[0]]
    assert len(entries) == 16  # head_dim 64 / 128 x fp16 / bf16 query x 4 launch variants
    assert all(e.count("bar.sync") <= 2 for e in entries)  # after the query, before the merge
    # launch variants 2 / 3 (template flag L2PF, the last bool of the mangled name): each warp's next
    # key group prefetched into L2 -- by the TMA unit on sm_90, per 128-byte line before; 0 / 1 never
    l2pf = [e for e in entries if re.match(r"\S*Lb[01]ELb1EEEv", e)]
    assert len(l2pf) == 8
    want = "cp.async.bulk.prefetch.L2.global" if arch == "sm_90a" else "prefetch.global.L2"
    assert all(e.count(want) >= 6 for e in l2pf)  # K, V, key scales / zeros, value scales / zeros
    assert not any("prefetch" in e for e in entries if e not in l2pf)
    # launch variant 4: each warp streams its tiles through a shared-memory ring -- cp.async copies
    # (past the sequence's end zero-filled: src-size operand), waited on with 3 tiles still in flight,
    # only warp barriers inside the loop
    ring = [e for e in re.split(r"\.entry ", ptx)[1:] if "kv4_attn_ring_kernel" in e.split("(")[0]]
    assert len(ring) == 4  # head_dim 64 / 128 x fp16 / bf16 query
    for e in ring:
        assert e.count("cp.async.cg.shared.global") >= 3 and "cp.async.commit_group" in e
        assert re.search(r"cp\.async\.wait_group 3;", e) and re.search(r"cp\.async\.wait_group 0;", e)
        assert "bar.warp.sync" in e and e.count("bar.sync") <= 2  # CTA barriers: after the query, before the merge


@pytest.mark.parametrize("arch", ARCHS)
def test_w16_ptx_uses_the_intended_instructions(builds, arch):
    ptx = _ptx(builds, "w16_gemm", arch)
    # 16-bit tensor cores, fp32 accumulation, both operand dtypes
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
    # nibbles -> 16-bit values by one (a & b) ^ c lop3 with the magic exponents (no int -> float cvt)
    assert "0x6A;" in ptx
    entries = [e for e in re.split(r"\.entry ", ptx)[1:] if "w16_gemm_kernel" in e.split("(")[0]]
    assert len(entries) == 32
    for e in entries:
        assert "cp.async.cg.shared.global" in e and "cp.async.wait_group" in e
        # no per-block float epilogue: the K loop converts no integer to float
        assert "cvt.rn.f32.s32" not in e
    # the in-kernel split-K reduction (template flag FIXUP): a counter atomic and L2 reads of the
    # other splits' slabs, in exactly half of the entries
    fixup = [e for e in entries if re.match(r"\S*Lb[01]ELb1EEEv", e)]
    assert len(fixup) == 16 and all("atom.global.add" in e and "ld.global.cg" in e for e in fixup)
    assert not any("atom." in e for e in entries if e not in fixup)


@pytest.mark.parametrize("arch", ARCHS)
def test_w16_wgmma_kernel_ptx(builds, arch):
    """The wgmma kernel: on sm_90a, per K block 8 k-steps x (1 or 2 m64 tiles) of register-A wgmma
    (f16 and bf16), a ring of A registers (wait_group 3, not 0: the tensor cores overlap the next
    dequantization), the proxy fence between the cp.async copies and wgmma's reads -- and ptxas did
    not serialize the wgmmas (C7513: any non-wgmma write to their input registers between issue and
    retirement, e.g. a branch between them, makes ptxas wait for each one).  On sm_80 the entries
    exist and trap (the launcher never starts them there)."""
    ptx = _ptx(builds, "w16_gemm", arch)
    entries = [e for e in re.split(r"\.entry ", ptx)[1:] if "w16_wgmma_kernel" in e.split("(")[0]]
    assert len(entries) == 40
    if arch == "sm_80":
        assert all("trap;" in e and "wgmma.mma_async" not in e and "griddepcontrol" not in e for e in entries)
        return
    for e in entries:
        n = e.count("wgmma.mma_async.sync.aligned.m64n")
        assert n in (8, 16), n
        assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n(16|32|64)k16\.f32\.(bf16\.bf16|f16\.f16) \{[^}]*\}, "
                         r"\{%r\d+, %r\d+, %r\d+, %r\d+\}, %rd\d+", e), "A must come from registers"
        assert "wgmma.wait_group.sync.aligned 3;" in e and "wgmma.fence.sync.aligned;" in e
        assert "fence.proxy.async.shared::cta;" in e
        assert "cp.async.cg.shared.global" in e
        # programmatic dependent launch: the weight prefetch, then the wait for A's producer, then A'
        assert e.count("griddepcontrol.wait;") == 1
    assert any(".f32.bf16.bf16" in e for e in entries) and any(".f32.f16.f16" in e for e in entries)
    rc, out, _ = builds[("obj", "w16_gemm.cu", arch)]
    assert rc == 0
    assert "C7513" not in out and "serialized" not in out, [ln for ln in out.splitlines() if "serialized" in ln][:3]


@pytest.mark.parametrize("arch", ARCHS)
def test_act_quant_lets_its_dependent_launch_early(builds, arch):
    """The CUDA act-quant kernels (the w16 GEMM's producers) signal griddepcontrol.launch_dependents on
    sm_90a, first thing (the wgmma GEMM launched after them as a programmatic dependent starts its
    weight prefetch meanwhile); sm_80 code has no griddepcontrol at all."""
    entries = re.split(r"\.entry ", _ptx(builds, "act_quant", arch))[1:]
    assert len(entries) == EXPECTED_ENTRIES["act_quant.cu"]
    if arch == "sm_80":
        assert not any("griddepcontrol" in e for e in entries)
    else:
        assert all(e.count("griddepcontrol.launch_dependents;") == 1 for e in entries)


@pytest.mark.parametrize("std", ["c++17", "c++20"])
def test_bindings_syntax(builds, std):
    if ("bindings", std) not in builds:
        pytest.skip("torch headers with c10/cuda or a host C++ compiler not available")
    rc, out, _ = builds[("bindings", std)]
    errors = [ln for ln in out.splitlines() if " error" in ln or "error:" in ln]
    assert rc == 0 and not errors, out[-4000:]


HOST_CHECK = r"""
// Host-side logic of the C interface, run WITHOUT a GPU: every call below must
// return before touching the CUDA runtime (argument validation) or is pure host code.
#include <cmath>
#include <cstdio>
#include "cometq_kernels.h"
int main() {
  int fails = 0;
#define CHECK(c) do { if (!(c)) { std::printf("FAIL line %d: %s\n", __LINE__, #c); ++fails; } } while (0)
  CHECK(cometq_resolve_mma_path(COMETQ_MMA_AUTO, 8) == COMETQ_MMA_S4);   // A100 / RTX 30xx / 40xx
  CHECK(cometq_resolve_mma_path(COMETQ_MMA_AUTO, 9) == COMETQ_MMA_S8);   // H100: s4 mma is emulated
  CHECK(cometq_resolve_mma_path(COMETQ_MMA_AUTO, 12) == COMETQ_MMA_S8);
  CHECK(cometq_resolve_mma_path(COMETQ_MMA_S4, 9) == COMETQ_MMA_S4);     // explicit request wins
  // decode (M <= 16): 64 tiles of 64 columns on 132 SMs -> ceil(264 / 64) = 5 splits
  CHECK(cometq_gemm_choose_split(1, 4096, 32, 132, 0) == 5);
  CHECK(cometq_gemm_choose_split(1, 4096, 5, 132, 0) == 2);     // at least 2 blocks per split
  CHECK(cometq_gemm_choose_split(1, 4096, 1, 132, 0) == 1);
  CHECK(cometq_gemm_choose_split(3, 200, 5, 132, 7) == 5);      // requested, clamped to the block count
  CHECK(cometq_gemm_choose_split(3, 200, 5, 132, 2) == 2);
  CHECK(cometq_gemm_choose_split(4096, 4096, 32, 132, 0) == 1); // enough tiles
  CHECK(cometq_gemm_choose_split(64, 1024, 32, 132, 0) == 8);   // 16 tiles: ceil(132/16)=9, capped at 32/4
  // the in-kernel split-K reduction's counter count: the launch's output tiles
  CHECK(cometq_gemm_num_tiles(1, 4096, COMETQ_TILE_AUTO) == 64);       // 16 x 64 tiles
  CHECK(cometq_gemm_num_tiles(17, 200, COMETQ_TILE_AUTO) == 4);        // 64 x 64: 1 x 4
  CHECK(cometq_gemm_num_tiles(64, 14336, COMETQ_TILE_MID3) == 224);
  CHECK(cometq_gemm_num_tiles(65, 200, COMETQ_TILE_AUTO) == 4);        // 128 x 64: 1 x 4
  CHECK(cometq_gemm_num_tiles(4096, 4096, COMETQ_TILE_AUTO) == 2048);
  CHECK(cometq_w4ax_gemm(nullptr, 0) == cudaErrorInvalidValue);
  static uint8_t buf[64];
  CometqGemmArgs a = {};
  a.M = 4; a.N = 8; a.n_blocks = 2; a.n4 = 1; a.n8 = 0;       // n4 + n8 != n_blocks
  CHECK(cometq_w4ax_gemm(&a, 0) == cudaErrorInvalidValue);
  a.n8 = 1; a.group = 48; a.split_k = 1;                       // bad group
  CHECK(cometq_w4ax_gemm(&a, 0) == cudaErrorInvalidValue);
  a.group = 128; a.split_k = 2;                                // split without workspace
  CHECK(cometq_w4ax_gemm(&a, 0) == cudaErrorInvalidValue);
  a.split_k = 1;                                               // null operands
  CHECK(cometq_w4ax_gemm(&a, 0) == cudaErrorInvalidValue);
  a.q4 = buf; a.q8 = (const int8_t*)buf; a.a_scales = (const float*)buf; a.block_bits = (const int32_t*)buf;
  a.qweight = buf; a.w_scales = (const float*)buf; a.out = buf; a.mma_path = 7;   // bad path
  CHECK(cometq_w4ax_gemm(&a, 0) == cudaErrorInvalidValue);
  a.M = 0; a.mma_path = COMETQ_MMA_S8;                          // empty problem: no launch
  CHECK(cometq_w4ax_gemm(&a, 0) == cudaSuccess);
  a.w_offsets = (const float*)buf; a.ld_wo = 1;                // asymmetric: same validation, no launch
  CHECK(cometq_w4ax_gemm(&a, 0) == cudaSuccess);
  a.M = 4; a.mma_path = 7;
  CHECK(cometq_w4ax_gemm(&a, 0) == cudaErrorInvalidValue);
  CHECK(cometq_quantize_act(nullptr, 0) == cudaErrorInvalidValue);
  CometqActQuantArgs q = {};
  q.M = 2; q.K = 576; q.n_blocks = 4; q.n4 = 4;                // 576 channels need 5 blocks
  CHECK(cometq_quantize_act(&q, 0) == cudaErrorInvalidValue);
  q.n_blocks = 5; q.n4 = 3; q.n8 = 2; q.x = buf; q.perm = (const int64_t*)buf; q.block_bits = (const int32_t*)buf;
  q.scales = (float*)buf; q.q4 = buf; q.q8 = (int8_t*)buf; q.x_dtype = 9;   // bad dtype
  CHECK(cometq_quantize_act(&q, 0) == cudaErrorInvalidValue);
  q.x_dtype = COMETQ_DTYPE_F16; q.int4_clip = 0.f;            // clip must be in (0, 1]
  CHECK(cometq_quantize_act(&q, 0) == cudaErrorInvalidValue);
  q.int4_clip = 1.5f;
  CHECK(cometq_quantize_act(&q, 0) == cudaErrorInvalidValue);
  q.int4_clip = std::nanf("");                                 // NaN
  CHECK(cometq_quantize_act(&q, 0) == cudaErrorInvalidValue);
  q.M = 0; q.int4_clip = 0.9f;
  CHECK(cometq_quantize_act(&q, 0) == cudaSuccess);
  // KV4 decode attention: supported cases, argument validation before any launch
  CHECK(cometq_kv4_attention_supported(128, 32, 4) == 1);
  CHECK(cometq_kv4_attention_supported(64, 16, 3) == 1);   // SmolLM2: 9 q heads / 3 kv heads
  CHECK(cometq_kv4_attention_supported(128, 128, 8) == 1);
  CHECK(cometq_kv4_attention_supported(96, 32, 4) == 0);   // head_dim
  CHECK(cometq_kv4_attention_supported(128, 8, 4) == 0);   // key group shorter than a 16-token tile
  CHECK(cometq_kv4_attention_supported(128, 48, 4) == 0);  // does not divide head_dim
  CHECK(cometq_kv4_attention_supported(64, 128, 4) == 0);
  CHECK(cometq_kv4_attention_supported(128, 32, 9) == 0);  // > 8 query heads per kv head
  CHECK(cometq_kv4_attention_supported(128, 32, 0) == 0);
  CHECK(cometq_kv4_decode_attention(nullptr, 0) == cudaErrorInvalidValue);
  CometqKv4AttnArgs k = {};
  k.B = 0;                                                     // empty batch: no launch
  CHECK(cometq_kv4_decode_attention(&k, 0) == cudaSuccess);
  k.B = 2; k.Hq = 8; k.H = 2; k.D = 128; k.BS = 64; k.G = 32; k.splits = 1;   // null operands
  CHECK(cometq_kv4_decode_attention(&k, 0) == cudaErrorInvalidValue);
  k.q = buf; k.k_packed = buf; k.v_packed = buf; k.k_scale = buf; k.k_zero = buf; k.v_scale = buf; k.v_zero = buf;
  k.tail_k = buf; k.tail_v = buf; k.block_tables = (const int32_t*)buf; k.quant_lens = (const int32_t*)buf;
  k.tail_lens = (const int32_t*)buf; k.seq_ids = (const int32_t*)buf; k.out = buf;
  k.Hq = 7;                                                    // not a multiple of the kv heads
  CHECK(cometq_kv4_decode_attention(&k, 0) == cudaErrorInvalidValue);
  k.Hq = 8; k.BS = 48;                                         // block not whole groups
  CHECK(cometq_kv4_decode_attention(&k, 0) == cudaErrorInvalidValue);
  k.BS = 64; k.splits = 2;                                     // split without partial buffers
  CHECK(cometq_kv4_decode_attention(&k, 0) == cudaErrorInvalidValue);
  k.splits = 0;
  CHECK(cometq_kv4_decode_attention(&k, 0) == cudaErrorInvalidValue);
  k.splits = 1; k.io_dtype = COMETQ_DTYPE_F32;                 // fp32 queries: not this kernel's
  CHECK(cometq_kv4_decode_attention(&k, 0) == cudaErrorInvalidValue);
  k.io_dtype = COMETQ_DTYPE_F16; k.variant = 5;                // no such launch variant
  CHECK(cometq_kv4_decode_attention(&k, 0) == cudaErrorInvalidValue);
  k.variant = -1;
  CHECK(cometq_kv4_decode_attention(&k, 0) == cudaErrorInvalidValue);
  // w16 GEMM: tiles, split rule, argument validation before any launch
  CHECK(cometq_w16_num_tiles(1, 4096, COMETQ_W16_TILE_AUTO) == 32);     // 16 x 128 tiles
  CHECK(cometq_w16_num_tiles(33, 4096, COMETQ_W16_TILE_AUTO) == 32);    // 64 x 128
  CHECK(cometq_w16_num_tiles(100, 200, COMETQ_W16_TILE_AUTO) == 4);     // 2 x 2
  CHECK(cometq_w16_num_tiles(64, 28672, COMETQ_W16_TILE_WIDE) == 112);  // 64 x 256
  CHECK(cometq_w16_num_tiles(64, 28672, COMETQ_W16_TILE_N32) == 448);   // 32 x 128 whatever M
  CHECK(cometq_w16_num_tiles(64, 28672, COMETQ_W16_TILE_N16) == 896);   // 16 x 128
  CHECK(cometq_w16_num_tiles(8, 4096, COMETQ_W16_TILE_N32) == 32);      // (M <= 16: the 16-token tile)
  CHECK(cometq_w16_num_tiles(64, 28672, COMETQ_W16_TILE_WG64) == 224);  // wgmma 64 x 128
  CHECK(cometq_w16_num_tiles(64, 28672, COMETQ_W16_TILE_WG64_R64) == 448);  // wgmma 64 x 64
  CHECK(cometq_w16_num_tiles(64, 28672, COMETQ_W16_TILE_WG32) == 448);  // wgmma 32 x 128 whatever M
  CHECK(cometq_w16_num_tiles(8, 4096, COMETQ_W16_TILE_WG32) == 32);
  CHECK(cometq_w16_num_tiles(64, 28672, COMETQ_W16_TILE_WG64_W) == 112);  // wgmma 64 x 256, 2 warpgroups
  CHECK(cometq_w16_num_tiles(16, 28672, COMETQ_W16_TILE_WG16) == 224);  // wgmma 16 x 128
  CHECK(cometq_w16_num_tiles(40, 4096, COMETQ_W16_TILE_WG16) == 96);    // 3 token tiles whatever M
  CHECK(cometq_w16_choose_split(1, 4096, 32, 132, 0, 0) == 8);          // ceil(264 / 32) = 9, capped at 32 / 4
  CHECK(cometq_w16_choose_split(1, 28672, 32, 132, 0, 0) == 2);         // 224 tiles: ceil(264 / 224)
  CHECK(cometq_w16_choose_split(64, 28672, 32, 132, 0, 0) == 1);        // 224 tiles cover the SMs: no slabs
  CHECK(cometq_w16_choose_split(64, 28672, 32, 132, 1, 0) == 2);        // wide: 112 tiles < 132 SMs
  CHECK(cometq_w16_choose_split(64, 4096, 32, 132, 0, 0) == 5);         // 32 tiles: ceil(132 / 32)
  CHECK(cometq_w16_choose_split(64, 4096, 32, 132, 1, 0) == 8);         // wide: 16 tiles -> 9, capped at 8
  CHECK(cometq_w16_choose_split(64, 4096, 3, 132, 0, 0) == 1);          // < 8 blocks: never split
  CHECK(cometq_w16_choose_split(64, 4096, 32, 132, 0, 5) == 5);         // requested
  CHECK(cometq_w16_gemm(nullptr, 0) == cudaErrorInvalidValue);
  CometqW16Args w = {};
  w.M = 0; w.N = 8; w.n_blocks = 1;                            // empty problem: no launch
  CHECK(cometq_w16_gemm(&w, 0) == cudaSuccess);
  w.M = 4; w.group = 48;                                       // bad group
  CHECK(cometq_w16_gemm(&w, 0) == cudaErrorInvalidValue);
  w.group = 128; w.a_dtype = COMETQ_DTYPE_F32;                 // fp32 operands: the Triton kernel's
  CHECK(cometq_w16_gemm(&w, 0) == cudaErrorInvalidValue);
  w.a_dtype = COMETQ_DTYPE_F16;                                // null operands
  CHECK(cometq_w16_gemm(&w, 0) == cudaErrorInvalidValue);
  w.a = buf; w.qweight = buf; w.w_scales = (const float*)buf; w.out = buf;
  w.ld_w = 64; w.ld_wb = 64; w.lda = 132; w.split_k = 1;       // A' rows not 16-byte multiples
  CHECK(cometq_w16_gemm(&w, 0) == cudaErrorInvalidValue);
  w.lda = 128; w.split_k = 2;                                  // split without workspace
  CHECK(cometq_w16_gemm(&w, 0) == cudaErrorInvalidValue);
  w.split_k = 1; w.tile = 9;                                   // no such tile
  CHECK(cometq_w16_gemm(&w, 0) == cudaErrorInvalidValue);
  w.tile = 0; w.pdl = 1;                                       // PDL: the wgmma tiles only
  CHECK(cometq_w16_gemm(&w, 0) == cudaErrorInvalidValue);
  w.pdl = 0;
  w.tile = 0; w.M = 1 << 20; w.lda = 1 << 12;                  // A' spans 2^33 bytes: 32-bit offsets refused
  CHECK(cometq_w16_offsets_fit(&w) == 0);
  CHECK(cometq_w16_gemm(&w, 0) == cudaErrorInvalidValue);
  std::printf("%d failures\n", fails);
  return fails != 0;
}
"""


def test_host_interface_without_gpu(builds):
    """Link the sm_80 objects into a host program and run the C interface's host logic."""
    objs = [os.path.join(builds["_tmp"], f"{f}.sm_80.o") for f in KERNEL_FILES]
    for f in KERNEL_FILES:
        assert builds[("obj", f, "sm_80")][0] == 0
    src = os.path.join(builds["_tmp"], "host_check.cpp")
    exe = os.path.join(builds["_tmp"], "host_check")
    with open(src, "w") as fh:
        fh.write(HOST_CHECK)
    r = subprocess.run([NVCC, "-std=c++17", "-I", CSRC, src, *objs, "-o", exe], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "0 failures" in r.stdout, r.stdout + r.stderr


def test_kernel_sources_include_no_torch():
    bad = []
    for f in sorted(os.listdir(CSRC)):
        if f.endswith((".cu", ".cuh", ".h")):
            src = open(os.path.join(CSRC, f)).read()
            for m in re.finditer(r'#\s*include\s*[<"]((?:torch|ATen|c10|pybind11)/[^>"]*|Python\.h)[>"]', src):
                bad.append(f"{f}: {m.group(1)}")
    assert not bad, f"kernel sources must not include torch headers: {bad}"



def test_compile_flags_carry_torchs_nvcc_defines():
    """The compile test builds with every define torch's extension build adds (a define torch adds
    later and this list lacks would let code that breaks the real build pass here)."""
    ce = pytest.importorskip("torch.utils.cpp_extension")
    torch_defines = {f for f in getattr(ce, "COMMON_NVCC_FLAGS", []) if f.startswith("-D")}
    missing = torch_defines - set(TORCH_NVCC_DEFINES)
    assert not missing, f"torch's nvcc defines missing from TORCH_NVCC_DEFINES: {sorted(missing)}"
    assert set(TORCH_NVCC_DEFINES) <= set(NVCC_FLAGS)
