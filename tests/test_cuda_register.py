"""The "cuda" backend without the compiled extension: a clear ImportError, a clear RuntimeError."""
from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

from cometq import ops

_BUILT = importlib.util.find_spec("cometq._C") is not None


@pytest.mark.skipif(_BUILT, reason="cometq._C is built here")
def test_import_without_extension_raises_clear_import_error():
    sys.modules.pop("cometq._cuda_register", None)
    with pytest.raises(ImportError, match=r"cometq\._C \(the CUDA extension\) is not built.*pip install"):
        importlib.import_module("cometq._cuda_register")
    assert "cometq._cuda_register" not in sys.modules


@pytest.mark.skipif(_BUILT, reason="cometq._C is built here")
def test_cuda_backend_request_names_the_missing_extension():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available for op 'w4ax_gemm'.*not built"):
        ops.resolve_backend("w4ax_gemm", torch.device("cuda"), "cuda")
    # auto never picks an unavailable backend
    assert ops.resolve_backend("w4ax_gemm", torch.device("cpu"), "auto") == "reference"


# Child-process prologue of the stand-in tests below: define the raw ops' schemas exactly as
# csrc/torch_bindings.cpp does (parsed from its m.def calls; argv[1]), no kernels.
_SCHEMAS = r'''
import re, sys, types, torch
src = open(sys.argv[1]).read()
lib = torch.library.Library("cometq_C", "DEF")
for d in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', src):
    lib.define("".join(re.findall(r'"([^"]*)"', d)))
'''

_FAKE_CHECK = _SCHEMAS + r'''
sys.modules["cometq._C"] = types.ModuleType("cometq._C")  # stand-in: the schemas above, no kernels
import cometq._cuda_register  # registers the fakes against those schemas
from cometq import reference as R
from cometq.layout import ActivationLayout
K = 576
lay = ActivationLayout(torch.randperm(K), torch.tensor([8, 4, 4, 8, 4], dtype=torch.int32))
qa = R.quantize_activation(torch.randn(64, K), lay, "block")
qw = R.quantize_weight_rtn(torch.randn(40, K), 128, sym=False)
meta = lambda t: None if t is None else t.to("meta")
g = torch.ops.cometq_C.w4ax_gemm
args = [meta(qa.q4), meta(qa.q8), meta(qa.scales), meta(lay.block_bits), meta(qw.qweight), meta(qw.scales),
        meta(qw.offsets), 128, None, torch.float16, 0, 0, 0]
assert g(*args).shape == (64, 40) and g(*args, 1).shape == (64, 40)  # tile: default 0, or 1 at M <= 64
counters = torch.zeros(1 << 16, dtype=torch.int32, device="meta")  # the in-kernel split-K reduction's
assert g(*args, 0, counters).shape == (64, 40) and g(*args, 1, tile_counters=counters).shape == (64, 40)
try:
    g(*args, 0, counters.float())
    raise SystemExit("float tile_counters were not rejected")
except RuntimeError as e:
    assert "tile_counters must be 1-D int32" in str(e), e
a65 = list(args)
a65[2] = torch.empty(65, 5, device="meta")
try:
    g(*a65, 1)
    raise SystemExit("tile=1 at M=65 was not rejected")
except RuntimeError as e:
    assert "needs M <= 64, got M=65" in str(e), e
q4, q8, sc = torch.ops.cometq_C.quantize_act(torch.empty(3, K, device="meta"), meta(lay.perm), meta(lay.block_bits),
                                             lay.n_int8, 0, 1.0)
assert q4.shape == (3, 192) and q8.shape == (3, 256) and sc.shape == (3, 5)
import cometq._cuda_register as CR
assert CR.HAS_FAKE_QUANT
for dt in (torch.float16, torch.bfloat16, torch.float32):
    a = torch.ops.cometq_C.fake_quant_act(torch.empty(3, K, device="meta"), meta(lay.perm), meta(lay.block_bits),
                                          lay.n_int8, 0, 0.9, dt)
    assert a.shape == (3, 640) and a.dtype == dt
try:
    torch.ops.cometq_C.fake_quant_act(torch.empty(3, K, device="meta"), meta(lay.perm), meta(lay.block_bits),
                                      lay.n_int8, 0, 1.0, torch.int8)
    raise SystemExit("an int8 out_dtype was not rejected")
except RuntimeError as err:
    assert "out_dtype must be float16, bfloat16 or float32" in str(err), err
assert CR.HAS_W16
for dt in (torch.float16, torch.bfloat16):
    for wo in (None, meta(qw.offsets)):
        y = torch.ops.cometq_C.w16_gemm(torch.empty(3, 640, dtype=dt, device="meta"), meta(qw.qweight),
                                        meta(qw.scales), wo, 128, None, torch.float32, 0)
        assert y.shape == (3, 40) and y.dtype == torch.float32
assert torch.ops.cometq_C.w16_gemm(torch.empty(3, 640, dtype=torch.float16, device="meta"), meta(qw.qweight),
                                   meta(qw.scales), None, 128, None, torch.float16, 2, 1).shape == (3, 40)
assert torch.ops.cometq_C.w16_gemm(torch.empty(3, 640, dtype=torch.float16, device="meta"), meta(qw.qweight),
                                   meta(qw.scales), None, 128, None, torch.float16, 2, 0, counters).shape == (3, 40)
try:
    torch.ops.cometq_C.w16_gemm(torch.empty(3, 640, dtype=torch.float16, device="meta"), meta(qw.qweight),
                                meta(qw.scales), None, 128, None, torch.float16, 2, 0, counters.float())
    raise SystemExit("float tile_counters were not rejected (w16)")
except RuntimeError as err:
    assert "tile_counters must be 1-D int32" in str(err), err
for bad, msg in (((torch.float32, 0, 0), "a must be float16 or bfloat16"), ((torch.float16, 0, 9), "tile must be"),
                 ((torch.float16, -1, 0), "split_k must be >= 0")):
    try:
        torch.ops.cometq_C.w16_gemm(torch.empty(3, 640, dtype=bad[0], device="meta"), meta(qw.qweight),
                                    meta(qw.scales), None, 128, None, torch.float16, bad[1], bad[2])
        raise SystemExit(f"{bad} was not rejected")
    except RuntimeError as err:
        assert msg in str(err), err
# the wgmma tiles 4-8, and a programmatic dependent launch (pdl) on them only
for tile in CR.W16_WGMMA_TILES:
    assert torch.ops.cometq_C.w16_gemm(torch.empty(3, 640, dtype=torch.float16, device="meta"), meta(qw.qweight),
                                       meta(qw.scales), None, 128, None, torch.float16, 0, tile, None, True).shape == (3, 40)
try:
    torch.ops.cometq_C.w16_gemm(torch.empty(3, 640, dtype=torch.float16, device="meta"), meta(qw.qweight),
                                meta(qw.scales), None, 128, None, torch.float16, 0, 0, None, True)
    raise SystemExit("pdl on an mma.sync tile was not rejected")
except RuntimeError as err:
    assert "applies to the wgmma tiles 4-8 only, got tile=0" in str(err), err
e = lambda *s, dt=torch.float16: torch.empty(*s, dtype=dt, device="meta")
i32 = torch.int32
pool = [e(10, 2, 64, 64, dt=torch.uint8), e(10, 2, 2, 128), e(10, 2, 2, 128), e(10, 2, 64, 64, dt=torch.uint8),
        e(10, 2, 64, 4), e(10, 2, 64, 4), e(4, 2, 32, 128), e(4, 2, 32, 128), e(4, 5, dt=i32), e(4, dt=i32),
        e(4, dt=i32), e(3, dt=i32)]
o = torch.ops.cometq_C.kv4_decode_attention(e(3, 8, 128), *pool, 32, 0.088, 4)
assert o.shape == (3, 8, 128) and o.dtype == torch.float16
assert torch.ops.cometq_C.kv4_decode_attention(e(3, 8, 128), *pool, 32, 0.088, 4, 1).shape == (3, 8, 128)
try:
    torch.ops.cometq_C.kv4_decode_attention(e(3, 8, 128), *pool, 32, 0.088, 0)
    raise SystemExit("num_splits=0 was not rejected")
except RuntimeError as err:
    assert "num_splits must be in [1, 1024], got 0" in str(err), err
print("FAKES OK")
'''


def test_fakes_accept_the_bindings_schemas():
    """The fake (meta) implementations in cometq._cuda_register against the schemas csrc/torch_bindings.cpp
    defines (parsed from its m.def calls), without the compiled extension: a child process defines those
    schemas, stands in a module for cometq._C, and runs every raw op on meta tensors -- so an argument
    added to a schema but not to its fake (or the reverse) fails on the CPU, not first on a GPU."""
    import os
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(root, "python"), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", _FAKE_CHECK, os.path.join(root, "csrc", "torch_bindings.cpp")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and "FAKES OK" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


_ATTN_ROUTING = _SCHEMAS + r"""
from cometq.paged import kv4_decode_attention_reference as ref
cuda_calls = []
def cpu_kernel(q, kp, ks, kz, vp, vs, vz, tk, tv, bt, ql, tl, sids, g, sm, ns, variant=0):
    cuda_calls.append((ns, variant))  # a CPU stand-in of the CUDA kernel: the reference
    return ref(q, kp, ks, kz, vp, vs, vz, tk, tv, bt, ql, tl, sids, g, "channel", "token", sm)
lib.impl("kv4_decode_attention", cpu_kernel, "CPU")
sys.modules["cometq._C"] = types.ModuleType("cometq._C")
import cometq._cuda_checks as CC
CC.DEVICE_TYPE = "cpu"
from cometq import autotune, ops
ops._LAZY_ERRORS["triton"] = "stubbed by the test"  # keep the stub below (no kernels import)
tri_calls = []
def triton_stub(*a):
    tri_calls.append(a[-1])
    return ops._IMPLS["kv4_decode_attention"]["reference"](*a)
ops._IMPLS["kv4_decode_attention"]["triton"] = triton_stub
import cometq._cuda_register as CR
# timings: Triton 1.0 ms; the CUDA kernel 0.5 ms at 2x the splits in variant 1, 0.9 ms otherwise
def fake_timer(fn, device, warmup=0, reps=0):
    n0, t0 = len(cuda_calls), len(tri_calls)
    fn()
    if len(tri_calls) > t0:
        return 1.0
    ns, var = cuda_calls[-1]
    return 0.5 if (ns, var) == (2 * 3, 1) else 0.9
autotune.cuda_event_timer = fake_timer
h, d, g, S = 2, 128, 32, 3
e = lambda *s, dt=torch.float16: torch.zeros(*s, dtype=dt)
pool = [e(4, h, 64, d // 2, dt=torch.uint8), e(4, h, 2, d), e(4, h, 2, d), e(4, h, 64, d // 2, dt=torch.uint8),
        e(4, h, 64, d // g), e(4, h, 64, d // g), torch.randn(S, h, g, d).half(), torch.randn(S, h, g, d).half(),
        torch.full((S, 2), -1, dtype=torch.int32), e(S, dt=torch.int32), torch.ones(S, dtype=torch.int32),
        torch.arange(2, dtype=torch.int32)]
q = torch.randn(2, 8, d).half()
args = (q, *pool, g, "channel", "token", 0.088, 3)
want = ref(*args[:-1])
import os
def run(mode, a=args):
    if mode is None:
        os.environ.pop(CR.KV4_ATTN_ENV, None)
    else:
        os.environ[CR.KV4_ATTN_ENV] = mode
    return CR._kv4_attn_impl(*a)
assert CR.kv4_attention_mode() == "auto"                                     # unset: timed against Triton
assert torch.equal(run("0"), want) and cuda_calls == [] and tri_calls == [3]
assert torch.equal(run("1"), want) and cuda_calls == [(3, 0)]                  # always, as called
tok = args[:14] + ("token", "token") + args[16:]
run("1", tok); assert cuda_calls == [(3, 0)] and tri_calls[-1] == 3          # a format it does not handle
cuda_calls.clear(); tri_calls.clear()
with autotune.frozen():                                                      # no timing, nothing kept
    run("auto"); assert cuda_calls == [] and tri_calls == [3] and CR._ATTN_CHOICE == {}
out = run("auto")
assert torch.equal(out, want)
(key, choice), = CR._ATTN_CHOICE.items()
assert choice == ("cuda", 2, 1), choice
assert {v for _, v in cuda_calls} == set(CR.KV4_ATTN_VARIANTS) == {0, 1, 2, 3, 4}  # every launch variant timed
assert key[1:] == (128, 32, 4, 16, "eager"), key                            # 2 rows x 2 kv heads x 3 splits -> 16
n = len(cuda_calls)
run("auto"); assert cuda_calls[n:] == [(6, 1)]                              # the kept choice, no new timing
run(None); assert cuda_calls[n + 1:] == [(6, 1)]                             # unset = auto
assert "head_dim=128 group=32 qpk=4" in next(iter(CR.kv4_attention_choices()))
# the wave-filling split count is a candidate too: 2 rows x 2 kv heads, 132 SMs x 3 CTAs (variant 1)
# -> 99 splits; kept when it times fastest, recomputed from the call's batch
assert CR.kv4_attention_wave_splits(2, 2, 1, 132) == 99 and CR.kv4_attention_wave_splits(16, 8, 0, 132) == 4
assert CR.kv4_attention_wave_splits(64, 8, 1, 132) == 1
CR._ATTN_CHOICE.clear(); cuda_calls.clear()
def wave_timer(fn, device, warmup=0, reps=0):
    t0 = len(tri_calls)
    fn()
    return 1.0 if len(tri_calls) > t0 else (0.3 if cuda_calls[-1] == (99, 1) else 0.9)
autotune.cuda_event_timer = wave_timer
out = run("auto")
assert torch.equal(out, want)
assert (99, 1) in cuda_calls and (132, 0) in cuda_calls and (3, 0) in cuda_calls
(key, choice), = CR._ATTN_CHOICE.items()
assert choice == ("cuda", "wave", 1) and cuda_calls[-1] == (99, 1), (choice, cuda_calls[-1])
# COMETQ_KV4_ATTN_RING=0 (gpu_check, when the ring variant's smoke fails): the ring is not timed
os.environ[CR.KV4_ATTN_RING_ENV] = "0"
assert CR.kv4_attention_variants() == (0, 1, 2, 3)
CR._ATTN_CHOICE.clear(); cuda_calls.clear()
run("auto")
assert cuda_calls and CR.KV4_ATTN_RING_VARIANT not in {v for _, v in cuda_calls}, cuda_calls
os.environ[CR.KV4_ATTN_RING_ENV] = "2"
try:
    CR.kv4_attention_variants(); raise SystemExit("bad ring setting accepted")
except ValueError as err:
    assert "COMETQ_KV4_ATTN_RING must be '0' or '1', got '2'" in str(err), err
del os.environ[CR.KV4_ATTN_RING_ENV]
os.environ[CR.KV4_ATTN_ENV] = "yes"
try:
    CR._kv4_attn_impl(*args); raise SystemExit("bad mode accepted")
except ValueError as err:
    assert "must be one of ('0', '1', 'auto')" in str(err), err
print("ROUTING OK")
"""


def test_kv4_attention_routing_of_the_cuda_backend():
    """COMETQ_KV4_ATTN_CUDA 0 / 1 / auto under the "cuda" backend, without the extension: a child
    process defines the bindings' schemas with the reference as a CPU stand-in kernel, stubs the
    Triton kernel and the timer, and checks which kernel each mode runs, that "auto" keeps the
    timed-fastest (split factor, launch variant) and times nothing when frozen or on a format the
    CUDA kernel does not handle."""
    import os
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(root, "python"), os.environ.get("PYTHONPATH", "")]))
    env.pop("COMETQ_KV4_ATTN_CUDA", None)
    p = subprocess.run([sys.executable, "-c", _ATTN_ROUTING, os.path.join(root, "csrc", "torch_bindings.cpp")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and "ROUTING OK" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


_W16_ROUTING = _SCHEMAS + r"""
from cometq import ops, reference as R
calls = []
BAD_TILE = 4  # a stand-in wgmma launch variant that computes the wrong thing (and is the fastest)
def cpu_kernel(a, qweight, w_scales, w_offsets, group, bias, out_dtype, split_k, tile=0, tile_counters=None, pdl=False):
    calls.append((split_k, tile, pdl))
    y = ops._ref_w16_gemm(a, qweight, w_scales, w_offsets, group, bias, out_dtype)
    return y * 1.5 if tile == BAD_TILE else y
lib.impl("w16_gemm", cpu_kernel, "CPU")
sys.modules["cometq._C"] = types.ModuleType("cometq._C")
import cometq._cuda_checks as CC
CC.DEVICE_TYPE = "cpu"
CC.capability_of = lambda dev: (9, 0)   # an sm_90 stand-in: the wgmma tiles are offered
import cometq._cuda_register as CR
from cometq import _cuda_split, autotune
seen = {}
def fake_tuned_choice(key, cands, device, launch, check=None):
    # what tuned_choice does on a CUDA device, timed by a stand-in: bad tile fastest, tile 7 next
    seen["cands"] = list(cands)
    ref = launch(cands[0])
    best = None
    for c in cands:
        if c != cands[0] and check is not None and not check(ref, launch(c)):
            continue
        t = 0.1 if c[1] == BAD_TILE else (0.5 if c == (0, 7) else 1.0)
        if best is None or t < best[0]:
            best = (t, c)
    return best[1]
CR._cuda_split.tuned_choice = fake_tuned_choice
g = torch.Generator().manual_seed(0)
qw = R.quantize_weight_rtn(torch.randn(24, 256, generator=g), 128, sym=False)
def run(m, group=128, pdl="0"):
    import os
    os.environ[CR.W16_PDL_ENV] = pdl
    a = torch.randn(m, 256, generator=g).half()
    sc = qw.scales if group == 128 else torch.rand(24, 256 // group, generator=g)
    off = qw.offsets if group == 128 else None
    calls.clear()
    y = CR._w16_impl(a, qw.qweight, sc, off, group, None, torch.float16)
    want = ops._ref_w16_gemm(a, qw.qweight, sc, off, group, None, torch.float16)
    assert torch.equal(y, want), (y - want).abs().max()
    return seen["cands"], calls[-1]
# M = 64: the mma.sync tiles 0-1, the 32-token tile 2 and 3, the wgmma tiles 4-7 (not 8: M > 16)
cands, last = run(64)
tiles = {t for _, t in cands}
assert tiles == {0, 1, 2, 3, 4, 5, 6, 7}, tiles
assert last == (0, 7, False), last   # the fastest candidate whose output agrees (the bad tile 4 was dropped)
# M = 9: the 16-token wgmma tile 8 joins (tiles by M: 0, wide 1; no 2 / 3 / 4-7)
cands, _ = run(9)
assert {t for _, t in cands} == {0, 1, 8}, cands
# G = 64: no wgmma tile at all
cands, _ = run(64, group=64)
assert not {t for _, t in cands} & {4, 5, 6, 7, 8}, cands
# COMETQ_W16_PDL=1: the kept wgmma launch is a programmatic dependent one; an mma.sync one never is
_, last = run(64, pdl="1")
assert last == (0, 7, True), last
assert all(p is False for s, t, p in calls if t not in CR.W16_WGMMA_TILES)
import os
os.environ[CR.W16_WGMMA_ENV] = "0"
cands, _ = run(64)
assert not {t for _, t in cands} & set(CR.W16_WGMMA_TILES), cands
print("W16 ROUTING OK")
"""


def test_w16_tile_candidates_of_the_cuda_backend():
    """The CUDA w16 GEMM's launch candidates and their plumbing, without the extension: a child process
    defines the bindings' schemas with the reference as a CPU stand-in kernel (one wgmma tile made
    wrong and fastest), claims an sm_90 device and stands in for the tuner's timer: which tiles are
    offered at M = 64 / 9 and G = 64, that the check drops the wrong one, that COMETQ_W16_PDL reaches
    the wgmma launches only, and that COMETQ_W16_WGMMA=0 removes them."""
    import os
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(root, "python"), os.environ.get("PYTHONPATH", "")]))
    for k in ("COMETQ_W16_WGMMA", "COMETQ_W16_PDL", "COMETQ_CUDA_SPLITK_FIXUP"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-c", _W16_ROUTING, os.path.join(root, "csrc", "torch_bindings.cpp")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and "W16 ROUTING OK" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
