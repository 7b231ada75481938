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


_FAKE_CHECK = r'''
import re, sys, types, torch
src = open(sys.argv[1]).read()
lib = torch.library.Library("cometq_C", "DEF")
for d in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', src):
    lib.define("".join(re.findall(r'"([^"]*)"', d)))
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
