"""Triton W4Ax GEMM vs cometq.reference: int32 segment accumulators exactly, outputs within
the named tolerances of cometq.testing.  Tiled, split-K (decode) and persistent stream-K paths.

Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py) and natively on a GPU.
"""
import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from cometq import ops  # noqa: E402
from cometq import reference as R  # noqa: E402
from cometq.layout import ActivationLayout, num_blocks, padded_k  # noqa: E402
from cometq.testing import (  # noqa: E402
    GEMM_BF16_RTOL,
    GEMM_FP16_RTOL,
    GEMM_FP32_ATOL,
    GEMM_FP32_RTOL,
    rand_activation,
    rand_weight,
)

import cometq.kernels.w4ax_gemm as G  # noqa: E402
from cometq.kernels.w4ax_gemm import (  # noqa: E402
    GemmConfig,
    gen_configs,
    m_bucket,
    resolve_deterministic,
    select_config,
    stream_k_schedule,
    stream_k_slots,
    w4ax_gemm_triton,
)

RTOL = {torch.float32: GEMM_FP32_RTOL, torch.float16: GEMM_FP16_RTOL, torch.bfloat16: GEMM_BF16_RTOL}


def _bits(pattern: str, nb: int):
    return {
        "all4": [4] * nb,
        "all8": [8] * nb,
        "mixed": [8] * max(1, nb // 4) + [4] * (nb - max(1, nb // 4)),
        "alternating": [8 if i % 2 == 0 else 4 for i in range(nb)],
    }[pattern]


def _random_operands(m, k, n, pattern, scale_mode, group, device, seed, bias=True):
    """Random packed operands over the full integer ranges (INT4 -8..7 incl. -8, INT8 -128..127)."""
    g = torch.Generator().manual_seed(seed)
    lay = ActivationLayout.from_block_bits(k, _bits(pattern, num_blocks(k)))
    k_pad = padded_k(k)
    q4 = torch.randint(0, 256, (m, lay.n_int4 * 64), generator=g, dtype=torch.uint8)
    q8 = torch.randint(-128, 128, (m, lay.n_int8 * 128), generator=g, dtype=torch.int8)
    ns = lay.n_blocks if scale_mode == "block" else 2
    a_sc = torch.rand(m, ns, generator=g) * 0.1 + 0.01
    qa = R.QuantizedActivation(q4, q8, a_sc, lay, scale_mode)
    gw = R.check_group_size(group, k_pad)
    qweight = torch.randint(0, 256, (n, k_pad // 2), generator=g, dtype=torch.uint8)
    w_sc = torch.rand(n, k_pad // gw, generator=g) * 0.05 + 0.005
    qw = R.QuantizedWeight(qweight, w_sc, k, group)
    b = torch.randn(n, generator=g) if bias else None
    return _qa_to(qa, device), qw.to(device), (b.to(device) if bias else None)


def _qa_to(qa, device):
    return R.QuantizedActivation(qa.q4.to(device), qa.q8.to(device), qa.scales.to(device), qa.layout.to(device),
                                 qa.scale_mode)


def _run(qa, qw, bias, out_dtype, **kw):
    return w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, qw.group_size,
                            bias, out_dtype, qa.scale_mode, return_int_acc=True, **kw)


def _check(qa, qw, bias, out_dtype, y, acc):
    assert y.dtype == out_dtype and y.shape == (qa.m, qw.out_features)
    assert torch.equal(acc, R.w4ax_int_accumulators(qa, qw)), "int32 segment accumulators differ"
    ref = R.w4ax_gemm(qa, qw, bias, torch.float64)
    torch.testing.assert_close(y.double(), ref.to(out_dtype).double(), rtol=RTOL[out_dtype], atol=GEMM_FP32_ATOL)


# pattern x scale mode x group, with M, path, bias, out dtype rotated so every value of
# each is covered several times without the full cross product (interpreter time)
_PATHS = ("tiled", "splitk", "persistent")
_MS = (1, 3, 17)
_OUT = (torch.float32, torch.float16, torch.bfloat16)
CASES = []
for i, (pattern, mode, group) in enumerate(itertools.product(
        ("all4", "all8", "mixed", "alternating"), ("block", "class"), (-1, 128, 64))):
    CASES.append((i, pattern, mode, group, _MS[i % 3], _PATHS[(i // 3) % 3], i % 2 == 0, _OUT[(i // 2) % 3]))


@pytest.mark.parametrize("case,pattern,mode,group,m,path,bias,out_dtype", CASES)
def test_matches_reference(case, pattern, mode, group, m, path, bias, out_dtype, device):
    qa, qw, b = _random_operands(m, 576, 200, pattern, mode, group, device, seed=100 + case)
    y, acc = _run(qa, qw, b, out_dtype, path=path)
    _check(qa, qw, b, out_dtype, y, acc)


@pytest.mark.parametrize("path", _PATHS)
@pytest.mark.parametrize("bits", [4, 8])
def test_single_block_k128(path, bits, device):
    pattern = "all4" if bits == 4 else "all8"
    qa, qw, b = _random_operands(3, 128, 40, pattern, "block", -1, device, seed=bits)
    y, acc = _run(qa, qw, b, torch.float32, path=path)
    _check(qa, qw, b, torch.float32, y, acc)


@pytest.mark.parametrize("group,mode", [(32, "block"), (16, "class")])
def test_small_groups_masked_segments(group, mode, device):
    # G < 64: a segment is cut out of a 32-byte chunk by masking (int8 tl.dot needs K >= 32)
    qa, qw, b = _random_operands(3, 256, 40, "alternating", mode, group, device, seed=group)
    y, acc = _run(qa, qw, b, torch.float32, path="tiled")
    _check(qa, qw, b, torch.float32, y, acc)


def test_group_spanning_blocks(device):
    # G = 256 > 128: one weight scale over two activation blocks
    qa, qw, b = _random_operands(3, 512, 40, "mixed", "class", 256, device, seed=256)
    y, acc = _run(qa, qw, b, torch.float32, path="tiled")
    _check(qa, qw, b, torch.float32, y, acc)


@pytest.mark.parametrize("mode", ["block", "class"])
def test_real_quantized_data_end_to_end(mode, device):
    """Quantize real-looking data (outliers, FMPQ-calibrated layout), Triton all the way."""
    from cometq.kernels.act_quant import quantize_activation_triton

    g = torch.Generator().manual_seed(42)
    k, n = 576, 200
    x = rand_activation(17, k, outliers=6, generator=g)
    lay = R.fmpq_calibrate(x.abs().amax(0), int8_blocks=1).to(device)
    w = lay.permute_columns(rand_weight(n, k, generator=g)).to(device)
    qw = R.quantize_weight_rtn(w, 128)
    x = x.to(device)
    qa = quantize_activation_triton(x, lay, mode)
    b = torch.randn(n, generator=g).to(device)
    y, acc = _run(qa, qw, b, torch.float32)
    _check(qa, qw, b, torch.float32, y, acc)
    # and the whole linear stays close to the float layer (quantization error, not kernel error)
    y_lin = R.w4ax_linear(x, qw, lay, b, mode)
    torch.testing.assert_close(y, y_lin, rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)


@pytest.mark.parametrize("split", [2, 3, 5])
def test_decode_splitk_configs(split, device):
    # uneven splits of 5 blocks (2+2+1, ...), M = 1 decode; fp32 atomics -> order may vary,
    # integer accumulators never do
    qa, qw, b = _random_operands(1, 576, 200, "mixed", "block", 128, device, seed=split)
    cfg = GemmConfig(block_m=16, block_n=64, group_m=1, split=split, num_warps=4, num_stages=1)
    y, acc = _run(qa, qw, b, torch.float16, path="splitk", config=cfg)
    _check(qa, qw, b, torch.float16, y, acc)


@pytest.mark.parametrize("path,mode,group,m", [("tiled", "block", 64, 17), ("tiled", "class", -1, 3),
                                               ("splitk", "block", 128, 1), ("persistent", "class", 128, 17),
                                               ("persistent", "block", -1, 3)])
def test_swap_ab(path, mode, group, m, device):
    # acc^T = W x^T (weights as the MMA A operand): same integers, transposed tile
    qa, qw, b = _random_operands(m, 576, 200, "alternating", mode, group, device, seed=77 + m)
    cfg = GemmConfig(block_m=16, block_n=64, group_m=2, split=3 if path == "splitk" else 1, num_warps=4,
                     num_stages=1, swap_ab=True)
    y, acc = _run(qa, qw, b, torch.float16, path=path, config=cfg, programs=4)
    _check(qa, qw, b, torch.float16, y, acc)


@pytest.mark.parametrize("path,mode,group,swap", [("tiled", "block", 128, False), ("tiled", "class", -1, True),
                                                   ("splitk", "block", 64, True), ("persistent", "class", 128, False),
                                                   ("tiled", "block", 32, False)])
def test_interleave8(path, mode, group, swap, device):
    # INT8 blocks loaded contiguously, weight nibbles interleaved in registers (G >= 64;
    # G = 32 falls back to the even/odd path): same integers
    qa, qw, b = _random_operands(17, 576, 200, "alternating", mode, group, device, seed=55 + group)
    cfg = GemmConfig(block_m=32, block_n=64, group_m=2, split=2 if path == "splitk" else 1, num_warps=4,
                     num_stages=1, swap_ab=swap, interleave8=True)
    y, acc = _run(qa, qw, b, torch.bfloat16, path=path, config=cfg, programs=3)
    _check(qa, qw, b, torch.bfloat16, y, acc)


@pytest.mark.parametrize("swap,path", [(False, "tiled"), (True, "persistent"), (False, "splitk")])
def test_class_mode_chained_int32_without_debug(swap, path, device):
    # with DEBUG off, class mode + per-channel weights chains one int32 accumulator through
    # every dot of a run (a different code path from the debug one): check its output
    qa, qw, b = _random_operands(17, 576, 200, "mixed", "class", -1, device, seed=31)
    cfg = GemmConfig(block_m=32, block_n=64, group_m=2, split=2 if path == "splitk" else 1, num_warps=4,
                     num_stages=1, swap_ab=swap, interleave8=path == "persistent")
    y = w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, -1, b,
                         torch.float32, "class", path=path, config=cfg, programs=3)
    ref = R.w4ax_gemm(qa, qw, b, torch.float64)
    torch.testing.assert_close(y.double(), ref, rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)


@pytest.mark.parametrize("programs,cost8", [(1, 2.0), (2, 2.0), (5, 1.0), (64, 2.0)])
def test_persistent_programs(programs, cost8, device):
    qa, qw, b = _random_operands(17, 576, 200, "alternating", "class", -1, device, seed=programs)
    cfg = GemmConfig(block_m=16, block_n=64, group_m=2, split=1, num_warps=4, num_stages=1)
    y, acc = _run(qa, qw, b, torch.float32, path="persistent", config=cfg, programs=programs, cost8=cost8)
    _check(qa, qw, b, torch.float32, y, acc)


@pytest.mark.parametrize("n_tiles,n8,n4,p,c8", [(1, 1, 4, 3, 2.0), (7, 2, 5, 4, 2.0), (12, 0, 5, 5, 1.0),
                                                 (5, 3, 0, 8, 2.0), (33, 4, 28, 132, 2.0), (3, 1, 1, 100, 1.5)])
def test_stream_k_schedule_covers_once_and_balances(n_tiles, n8, n4, p, c8):
    items, starts, split = stream_k_schedule(n_tiles, n8, n4, p, cost8=c8)
    nb = n8 + n4
    assert starts[0] == 0 and starts[-1] == len(items) and np.all(np.diff(starts) >= 0)
    cover = np.zeros((n_tiles, nb), dtype=np.int64)
    for t, lo, hi in items:
        assert 0 <= lo < hi <= nb
        cover[t, lo:hi] += 1
    assert np.all(cover == 1), "every (tile, block) must be computed exactly once"
    cost = np.array([c8] * n8 + [1.0] * n4)
    per_prog = [sum(cost[lo:hi].sum() for _, lo, hi in items[starts[q]:starts[q + 1]]) for q in range(len(starts) - 1)]
    assert max(per_prog) - min(per_prog) <= 2 * max(cost) + 1e-9, per_prog
    assert split == bool(np.any((items[:, 1] != 0) | (items[:, 2] != nb)))


def test_via_op_and_dataclass_entry(device):
    qa, qw, b = _random_operands(3, 576, 200, "mixed", "block", 128, device, seed=9)
    ref = R.w4ax_gemm(qa, qw, b, torch.float64)
    y = ops.w4ax_gemm(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, qw.group_size, b,
                      torch.float32, "block", backend="triton")
    torch.testing.assert_close(y.double(), ref, rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)
    y16 = ops.w4ax_gemm_q(qa, qw, b, torch.float16, backend="triton")
    torch.testing.assert_close(y16.double(), ref.half().double(), rtol=GEMM_FP16_RTOL, atol=GEMM_FP32_ATOL)
    assert "triton" in ops.registered_backends("w4ax_gemm")
    assert "triton" in ops.registered_backends("quantize_act")
    # the op call above tuned (here: took the only candidate) and cached a config for this shape
    n8 = qa.layout.n_int8
    assert G.chosen_config(3, 200, 640, n8, group_size=128) == gen_configs(16, 200, 640, n8)[0]
    assert G.chosen_config(3, 12345, 640, n8, group_size=128) is None  # never called


def test_configs_and_cache(monkeypatch):
    for mb in (16, 64, 256, 1024, 4096):
        cfgs = gen_configs(mb, 4096, 4096, 4, interpret=False)
        assert cfgs and len(set(cfgs)) == len(cfgs)
        assert all(c.block_m <= max(16, mb) for c in cfgs)
        if mb == 16:
            assert all(c.block_m == 16 for c in cfgs) and any(c.split > 1 for c in cfgs)
    assert len(gen_configs(16, 4096, 4096, 4, interpret=True)) == 1
    assert m_bucket(1) == 16 and m_bucket(17) == 64 and m_bucket(5000) == 4096

    import cometq.kernels.w4ax_gemm as G

    cands = [GemmConfig(16, 64), GemmConfig(16, 128), GemmConfig(32, 128), GemmConfig(64, 256)]
    monkeypatch.setattr(G, "gen_configs", lambda *a, **k: list(cands))
    # in-memory only: a config file cache (gpu_check sets one for all stages) would keep this
    # fake tuning across processes (GPU run 5: a second process found the key and timed nothing)
    monkeypatch.delenv(G.ENV_CONFIG_CACHE, raising=False)
    calls = []

    def fake_bench(c):
        calls.append(c)
        if c.block_n == 256:
            raise RuntimeError("out of shared memory")  # a rejected config is skipped
        return {64: 3.0, 128: 1.0}[c.block_n] + c.block_m / 1000

    n = 12345  # a key no other test uses
    a = select_config(3, n, 640, 1, fake_bench)
    assert a == GemmConfig(16, 128) and len(calls) == 4
    b = select_config(16, n, 640, 1, fake_bench)  # same M bucket: cached, nothing timed
    assert b == a and len(calls) == 4
    select_config(17, n, 640, 1, fake_bench)  # next bucket: timed again
    assert len(calls) == 8


def test_select_config_file_cache(monkeypatch, tmp_path):
    """COMETQ_GEMM_CONFIG_CACHE keeps tuned choices across processes (here: a cleared in-memory
    cache); a stored config that is no longer a candidate, or another device's entry, is retuned."""
    import json

    from cometq.kernels import w4ax_gemm as G

    cands = [GemmConfig(16, 64), GemmConfig(16, 128), GemmConfig(32, 128)]
    monkeypatch.setattr(G, "gen_configs", lambda *a, **k: list(cands))
    path = tmp_path / "sub" / "gemm_configs.json"
    monkeypatch.setenv(G.ENV_CONFIG_CACHE, str(path))
    monkeypatch.setattr(G, "_FILE_CONFIGS", {})
    calls = []

    def fake_bench(c):
        calls.append(c)
        return {64: 3.0, 128: 1.0}[c.block_n] + c.block_m / 1000

    n = 23456  # a key no other test uses
    assert select_config(3, n, 640, 1, fake_bench, device_name="cardA") == GemmConfig(16, 128)
    assert len(calls) == 3 and path.exists()
    stored = json.loads(path.read_text())["configs"]
    assert len(stored) == 1 and list(stored.values())[0]["block_n"] == 128
    # "a new process": empty in-memory caches, same file -> no timing at all
    monkeypatch.setattr(G, "_CONFIG_CACHE", {})
    monkeypatch.setattr(G, "_FILE_CONFIGS", {})
    assert select_config(5, n, 640, 1, fake_bench, device_name="cardA") == GemmConfig(16, 128)
    assert len(calls) == 3
    # untuned callers (no bench_fn, e.g. COMETQ_GEMM_TUNE=0) also take the stored choice
    monkeypatch.setattr(G, "_CONFIG_CACHE", {})
    assert select_config(5, n, 640, 1, None, device_name="cardA") == GemmConfig(16, 128)
    # another card: tuned again (and added to the file)
    monkeypatch.setattr(G, "_CONFIG_CACHE", {})
    select_config(5, n, 640, 1, fake_bench, device_name="cardB")
    assert len(calls) == 6 and len(json.loads(path.read_text())["configs"]) == 2
    # the stored choice stopped being a candidate (configs changed): retuned, not reused
    monkeypatch.setattr(G, "_CONFIG_CACHE", {})
    monkeypatch.setattr(G, "_FILE_CONFIGS", {})
    cands[:] = [GemmConfig(16, 64), GemmConfig(32, 128)]
    assert select_config(5, n, 640, 1, fake_bench, device_name="cardA") == GemmConfig(32, 128)
    assert len(calls) == 8
    # a corrupt file is ignored (and replaced on the next write), never fatal
    path.write_text("{not json")
    monkeypatch.setattr(G, "_CONFIG_CACHE", {})
    monkeypatch.setattr(G, "_FILE_CONFIGS", {})
    assert select_config(5, n, 640, 1, fake_bench, device_name="cardA") == GemmConfig(32, 128)
    assert json.loads(path.read_text())["format"] == 1


def test_int_accumulators_do_not_overflow_long_k(device):
    # worst case |sum| = K * 128 * 8: K = 2048 of extremes stays far below 2**31; exact
    k, n, m = 2048, 16, 2
    lay = ActivationLayout.from_block_bits(k, [8] * 8 + [4] * 8)
    q8 = torch.full((m, 8 * 128), -128, dtype=torch.int8)
    q4 = torch.full((m, 8 * 64), 0x88, dtype=torch.uint8)  # two -8 nibbles
    qa = R.QuantizedActivation(q4, q8, torch.rand(m, 2) + 0.1, lay, "class")
    qw = R.QuantizedWeight(torch.full((n, k // 2), 0x88, dtype=torch.uint8), torch.rand(n, 1) + 0.1, k, -1)
    qa, qw = _qa_to(qa, device), qw.to(device)
    y, acc = _run(qa, qw, None, torch.float32)
    _check(qa, qw, None, torch.float32, y, acc)


def test_errors(device, monkeypatch):
    monkeypatch.setenv("COMETQ_SYNC_CHECKS", "1")  # content checks that sync are opt-in on CUDA
    qa, qw, b = _random_operands(3, 256, 40, "mixed", "block", 128, device, seed=1)
    args = [qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, b, torch.float32, "block"]

    def call(**over):
        a = list(args)
        names = ["q4", "q8", "a_scales", "block_bits", "qweight", "w_scales", "group_size", "bias", "out_dtype",
                 "scale_mode"]
        for k, v in over.items():
            a[names.index(k)] = v
        return w4ax_gemm_triton(*a)

    with pytest.raises(TypeError, match="q4 must have dtype"):
        call(q4=qa.q4.to(torch.int8))
    with pytest.raises(TypeError, match="qweight must have dtype"):
        call(qweight=qw.qweight.to(torch.int8))
    with pytest.raises(ValueError, match="holds K_pad=256 but block_bits has 3"):
        call(block_bits=torch.tensor([8, 4, 4], device=device))
    with pytest.raises(ValueError, match="do not cover K_pad"):
        call(q4=qa.q4[:, :32])
    with pytest.raises(ValueError, match="must have M=3 rows"):
        call(q8=qa.q8[:2])
    with pytest.raises(ValueError, match="needs 2 columns in 'block' mode"):
        call(a_scales=qa.scales[:, :1])
    with pytest.raises(ValueError, match="group_size=48"):
        call(group_size=48)
    with pytest.raises(ValueError, match=r"w_scales shape \(40, 2\) != \(40, 4\)"):
        call(group_size=64)
    with pytest.raises(ValueError, match=r"bias shape \(39,\)"):
        call(bias=b[:39])
    with pytest.raises(TypeError, match="out_dtype"):
        call(out_dtype=torch.int32)
    with pytest.raises(ValueError, match="scale_mode"):
        call(scale_mode="tensor")
    with pytest.raises(ValueError, match="block_bits holds 2 INT8 blocks but q8"):
        call(block_bits=torch.tensor([8, 8], device=device))
    with pytest.raises(ValueError, match="block_bits must hold only 4 or 8"):
        call(block_bits=torch.tensor([8, 5], device=device))
    with pytest.raises(ValueError, match="path must be one of"):
        w4ax_gemm_triton(*args, path="fast")
    with pytest.raises(TypeError, match="config must be a GemmConfig"):
        w4ax_gemm_triton(*args, config=(64, 64))
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        GemmConfig(block_m=8, block_n=64)
    with pytest.raises(ValueError, match="num_warps"):
        GemmConfig(block_m=16, block_n=64, num_warps=3)
    with pytest.raises(TypeError, match="swap_ab must be a bool"):
        GemmConfig(block_m=16, block_n=64, swap_ab=1)
    with pytest.raises(TypeError, match="interleave8 must be a bool"):
        GemmConfig(block_m=16, block_n=64, interleave8="yes")
    with pytest.raises(ValueError, match="programs must be an int >= 1"):
        stream_k_schedule(4, 1, 1, 0)
    with pytest.raises(ValueError, match="block list is empty"):
        stream_k_schedule(4, 0, 0, 2)


def test_register_fails_cleanly_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "try:\n"
        "    import cometq.kernels._register\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
        "import cometq.ops as o\n"
        "try:\n"
        "    o.resolve_backend('w4ax_gemm', 'cuda', 'triton')\n"
        "except RuntimeError as e:\n"
        "    print('RUNTIMEERROR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "IMPORTERROR" in r.stdout and "needs triton" in r.stdout, r.stdout + r.stderr
    assert "RUNTIMEERROR" in r.stdout and "not available" in r.stdout, r.stdout + r.stderr


def test_block_order_cache_follows_in_place_updates():
    from cometq.kernels.w4ax_gemm import _block_order

    bb = torch.tensor([4, 8, 4, 8], dtype=torch.int32)
    assert _block_order(bb).tolist() == [1, 3, 0, 2]
    assert _block_order(bb) is _block_order(bb)  # cached while alive and unmodified
    bb[0] = 8  # in-place update bumps the version: recomputed
    assert _block_order(bb).tolist() == [0, 1, 3, 2]


# ==========================================================================
# deterministic split-K / stream-K reduction
# ==========================================================================
def _with_offsets(qw, seed):
    """The same weights made asymmetric: random signed fp32 offsets (ASYM kernels)."""
    g = torch.Generator().manual_seed(seed)
    off = ((torch.rand(qw.scales.shape, generator=g) - 0.5) * 0.1).to(qw.scales.device)
    return R.QuantizedWeight(qw.qweight, qw.scales, qw.in_features, qw.group_size, off)


def _tile_coords(tile, m, n, bm, bn, group_m):
    """Python copy of the kernels' grouped tile order (``_tile_coords``)."""
    num_m, num_n = -(-m // bm), -(-n // bn)
    width = group_m * num_n
    first_m = (tile // width) * group_m
    gsize = min(num_m - first_m, group_m)
    return first_m + (tile % width) % gsize, (tile % width) // gsize


def _fp32_partial(qa, qw, lo, hi):
    """The kernel's fp32 operation sequence over block-list positions ``[lo, hi)`` (``_accumulate``),
    in torch fp32 (each op rounded on its own, as in the interpreter: no FMA contraction)."""
    acc = R.w4ax_int_accumulators(qa, qw)  # [M, N, S] int32, exact
    asum = R.w4ax_act_sums(qa, qw) if qw.offsets is not None else None
    bits = qa.layout.block_bits.cpu()
    order = torch.cat([torch.nonzero(bits == 8).flatten(), torch.nonzero(bits != 8).flatten()]).tolist()
    n8 = int((bits == 8).sum())
    k_pad = qa.layout.k_pad
    g = R.check_group_size(qw.group_size, k_pad)
    seg = min(128, g)
    segs = 128 // seg
    a_sc, w_sc = qa.scales.cpu(), qw.scales.cpu()
    w_off = qw.offsets.cpu() if qw.offsets is not None else None
    acc, asum = acc.cpu(), (asum.cpu() if asum is not None else None)
    p = torch.zeros(qa.m, qw.out_features, dtype=torch.float32)
    if qa.scale_mode == "class" and g == k_pad:  # chained int32 runs, one rescale per class run
        for run, col in ((range(lo, min(hi, n8)), 1), (range(max(lo, n8), hi), 0)):
            acc_i = torch.zeros(qa.m, qw.out_features, dtype=torch.int32)
            asum_i = torch.zeros(qa.m, dtype=torch.int32)
            for i in run:
                acc_i += acc[:, :, order[i]]
                if asum is not None:
                    asum_i += asum[:, order[i]]
            sa = a_sc[:, col]
            p = p + acc_i.float() * (sa[:, None] * w_sc[None, :, 0])
            if w_off is not None:
                p = p + (sa * asum_i.float())[:, None] * w_off[None, :, 0]
        return p
    for i in range(lo, hi):
        b = order[i]
        if qa.scale_mode == "block":
            sa = a_sc[:, b]
        else:
            sa = a_sc[:, 1 if i < n8 else 0]
        for s_ in range(segs):
            col = (b * 128 + s_ * seg) // g
            p = p + acc[:, :, b * segs + s_].float() * (sa[:, None] * w_sc[None, :, col])
            if w_off is not None:
                p = p + (sa * asum[:, b * segs + s_].float())[:, None] * w_off[None, :, col]
    return p


def _emulate_deterministic(qa, qw, bias, cfg, pieces):
    """The documented deterministic result: per tile ``((P_0 + P_1) + ...) + bias`` over its pieces
    ``pieces(tile) -> [(i_lo, i_hi), ...]`` (block order), fp32, before the output cast."""
    m, n = qa.m, qw.out_features
    y = torch.empty(m, n, dtype=torch.float32)
    parts = {}
    for t in range(-(-m // cfg.block_m) * -(-n // cfg.block_n)):
        pm, pn = _tile_coords(t, m, n, cfg.block_m, cfg.block_n, cfg.group_m)
        rows = slice(pm * cfg.block_m, min(m, (pm + 1) * cfg.block_m))
        cols = slice(pn * cfg.block_n, min(n, (pn + 1) * cfg.block_n))
        tot = None
        for lo_hi in pieces(t):
            if lo_hi not in parts:
                parts[lo_hi] = _fp32_partial(qa, qw, *lo_hi)
            tot = parts[lo_hi][rows, cols] if tot is None else tot + parts[lo_hi][rows, cols]
        if bias is not None:
            tot = tot + bias.cpu().float()[cols]
        y[rows, cols] = tot
    return y


def _splitk_pieces(nb, split):
    chunk = -(-nb // split)
    return lambda t: [(lo, min(lo + chunk, nb)) for lo in range(0, nb, chunk)]


def _schedule_pieces(m, n, cfg, lay, programs, cost8=2.0):
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    items, _, _ = stream_k_schedule(tiles, lay.n_int8, lay.n_int4, programs, cost8=cost8)
    by_tile = {}
    for t, lo, hi in items.tolist():
        by_tile.setdefault(t, []).append((lo, hi))
    return lambda t: by_tile[t]


def _bits_equal(a, b):
    """Bitwise equality (also tells -0.0 from +0.0)."""
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(view), b.contiguous().view(view))


_DET_CFG = {
    "plain": GemmConfig(block_m=16, block_n=64, group_m=2, num_warps=4, num_stages=1),
    "swap": GemmConfig(block_m=16, block_n=128, group_m=2, num_warps=4, num_stages=1, swap_ab=True),
    "il8": GemmConfig(block_m=32, block_n=64, group_m=2, num_warps=4, num_stages=1, interleave8=True),
}
DET_CASES = [  # path, pattern, mode, group, m, flavour, split|programs, out dtype, asym
    ("splitk", "mixed", "block", 128, 1, "plain", 2, torch.float32, False),
    ("splitk", "alternating", "class", -1, 3, "swap", 3, torch.float16, False),
    ("splitk", "all8", "block", 64, 17, "il8", 5, torch.float32, True),
    ("splitk", "mixed", "class", 128, 1, "swap", 4, torch.float32, True),
    ("persistent", "alternating", "block", -1, 17, "plain", 3, torch.float32, False),
    ("persistent", "mixed", "class", -1, 17, "il8", 5, torch.float16, True),
    ("persistent", "all4", "block", 32, 3, "swap", 4, torch.float32, True),
]


@pytest.mark.parametrize("path,pattern,mode,group,m,flavour,par,out_dtype,asym", DET_CASES)
def test_deterministic_follows_documented_order(path, pattern, mode, group, m, flavour, par, out_dtype, asym, device):
    """deterministic=True equals, bit for bit, the documented fp32 order: per tile the pieces'
    partials summed in block order, then the bias, then the cast; and stays within tolerance."""
    qa, qw, b = _random_operands(m, 576, 200, pattern, mode, group, device, seed=900 + m + par)
    if asym:
        qw = _with_offsets(qw, seed=par)
    base = _DET_CFG[flavour]
    cfg = GemmConfig(base.block_m, base.block_n, base.group_m, par if path == "splitk" else 1, base.num_warps,
                     base.num_stages, base.swap_ab, base.interleave8)
    kw = dict(path=path, config=cfg, programs=par, deterministic=True)
    out = w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, qw.group_size, b,
                           out_dtype, mode, w_offsets=qw.offsets, return_int_acc=True, **kw)
    y = out[0]
    assert torch.equal(out[1], R.w4ax_int_accumulators(qa, qw))
    ref = R.w4ax_gemm(qa, qw, b, torch.float64)
    torch.testing.assert_close(y.double(), ref.to(out_dtype).double(), rtol=RTOL[out_dtype], atol=GEMM_FP32_ATOL)
    # repeated call (without the debug outputs: the production code path) -> the same bits
    y2 = w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, qw.group_size, b,
                          out_dtype, mode, w_offsets=qw.offsets, **kw)
    assert _bits_equal(y, y2)
    if device == "cuda":
        return  # the GPU compiler may contract mul+add into FMA: the fp32 emulation is exact only interpreted
    nb = qa.layout.n_blocks
    pieces = (_splitk_pieces(nb, par) if path == "splitk"
              else _schedule_pieces(m, qw.out_features, cfg, qa.layout, par))
    want = _emulate_deterministic(qa, qw, b, cfg, pieces).to(out_dtype)
    assert _bits_equal(y, want), (y - want).abs().max()


def test_deterministic_same_cuts_same_bits(device):
    """Where the summation order is defined to be the same, the bits are the same."""
    qa, qw, b = _random_operands(3, 512, 40, "all4", "block", 128, device, seed=61)  # NB = 4, one 16x64 tile
    qw = _with_offsets(qw, seed=61)
    args = (qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, b, torch.float32, "block")

    def run(path, split=1, programs=None, deterministic=True):
        cfg = GemmConfig(16, 64, 2, split, 4, 1)
        return w4ax_gemm_triton(*args, path=path, config=cfg, programs=programs, deterministic=deterministic,
                                w_offsets=qw.offsets)

    # split-K with 2 chunks and a stream-K schedule cutting the one tile at the same position
    items, _, split = stream_k_schedule(1, 0, 4, 2, cost8=1.0)
    assert split and items.tolist() == [[0, 0, 2], [0, 2, 4]]
    y_split2 = run("splitk", split=2)
    assert _bits_equal(y_split2, run("persistent", programs=2))
    # SPLIT = 3 cuts 4 blocks into chunks of 2 as well (a trailing empty chunk is not launched)
    assert _bits_equal(y_split2, run("splitk", split=3))
    # one piece per tile: split-K "1 chunk", an unsplit stream-K schedule and the tiled path agree
    y_tiled = run("tiled", deterministic=False)
    assert _bits_equal(y_tiled, run("persistent", programs=1))
    assert _bits_equal(y_tiled, run("tiled"))  # the tiled path never splits: deterministic either way
    # different cuts: a different (documented) order, still within tolerance of the reference
    ref = R.w4ax_gemm(qa, qw, b, torch.float64)
    for y in (run("splitk", split=4), y_split2, y_tiled):
        torch.testing.assert_close(y.double(), ref, rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)


def test_deterministic_switch_env_and_argument(device, monkeypatch):
    """COMETQ_DETERMINISTIC is read at call time; the argument wins; bad values are named."""
    qa, qw, b = _random_operands(1, 576, 72, "mixed", "block", 128, device, seed=3)
    args = (qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, b, torch.float16, "block")
    cfg = GemmConfig(16, 64, 2, 3, 4, 1)
    calls = []
    real = G._reduce_partials
    monkeypatch.setattr(G, "_reduce_partials", lambda *a, **k: (calls.append(a[1:3]), real(*a, **k))[1])
    monkeypatch.setenv("COMETQ_SPLITK_FIXUP", "0")  # the reduce launch counted here (run 6 ran the suite with 1)
    monkeypatch.setenv("COMETQ_DETERMINISTIC", "0")
    y_atomic = w4ax_gemm_triton(*args, path="splitk", config=cfg)
    assert calls == []  # COMETQ_DETERMINISTIC=0: the atomic path
    y_arg = w4ax_gemm_triton(*args, path="splitk", config=cfg, deterministic=True)
    assert calls == [(2, 3)]  # 2 tiles (N = 72, BLOCK_N = 64), 3 chunks of the 5 blocks
    monkeypatch.delenv("COMETQ_DETERMINISTIC", raising=False)
    y_env = w4ax_gemm_triton(*args, path="splitk", config=cfg)  # default (measured): deterministic
    assert len(calls) == 2 and _bits_equal(y_env, y_arg)
    w4ax_gemm_triton(*args, path="splitk", config=cfg, deterministic=False)  # the argument wins
    assert len(calls) == 2
    # through the op (registered Triton impl, no keyword): the environment decides
    y_op = ops.w4ax_gemm(*args, backend="triton")
    assert len(calls) == 3 and y_op.shape == (1, 72)
    ref = R.w4ax_gemm(qa, qw, b, torch.float64).half().double()
    for y in (y_atomic, y_arg, y_op):
        torch.testing.assert_close(y.double(), ref, rtol=GEMM_FP16_RTOL, atol=GEMM_FP32_ATOL)
    for v in ("0", "false", "off", "No"):
        monkeypatch.setenv("COMETQ_DETERMINISTIC", v)
        assert resolve_deterministic() is False
    for v in ("", "1", "true", "YES", "on"):
        monkeypatch.setenv("COMETQ_DETERMINISTIC", v)
        assert resolve_deterministic() is True
    monkeypatch.setenv("COMETQ_DETERMINISTIC", "sometimes")
    with pytest.raises(ValueError, match="COMETQ_DETERMINISTIC must be 0/1.*'sometimes'"):
        w4ax_gemm_triton(*args, path="splitk", config=cfg)
    with pytest.raises(TypeError, match="deterministic must be a bool or None, got 1"):
        w4ax_gemm_triton(*args, deterministic=1)


@pytest.mark.parametrize("n_tiles,n8,n4,p", [(1, 1, 4, 3), (7, 2, 5, 4), (12, 0, 5, 5), (5, 3, 0, 8), (4, 1, 3, 2),
                                               (33, 4, 28, 132)])
def test_stream_k_slots(n_tiles, n8, n4, p):
    items, _, split = stream_k_schedule(n_tiles, n8, n4, p)
    slots, red = stream_k_slots(items, n_tiles)
    pieces = np.bincount(items[:, 0], minlength=n_tiles)
    assert slots.dtype == np.int32 and red.dtype == np.int32 and red.shape[1] == 3
    assert np.array_equal(slots < 0, pieces[items[:, 0]] == 1)  # whole-tile items: stored directly
    used = slots[slots >= 0]
    assert np.array_equal(used, np.arange(len(used)))  # consecutive, schedule order
    assert split == (len(red) > 0)
    assert np.array_equal(red[:, 0], np.nonzero(pieces > 1)[0])
    for tile, first, count in red:
        mine = np.nonzero(items[:, 0] == tile)[0]
        assert count == len(mine) and np.array_equal(slots[mine], first + np.arange(count))
        assert np.all(np.diff(items[mine, 1]) > 0)  # slots follow block order
    with pytest.raises(ValueError, match=r"items must be an int \[n_items, 3\] array"):
        stream_k_slots(items[:, :2], n_tiles)
    if len(items) > 1 and items[0, 0] != items[-1, 0]:
        with pytest.raises(ValueError, match="sorted by tile"):
            stream_k_slots(items[::-1], n_tiles)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["tma", "splitk"])
def test_gpu_splitk_fixup_llama_shape_and_cuda_graph(path, monkeypatch):
    """The in-kernel split-K reduction on a decode shape (8B.o, M = 16, asymmetric g128: the serving
    format) on the GPU -- 448 CTAs racing on 32 tile counters per call -- eagerly and replayed from
    a CUDA graph (the counters' address captured): the same bits as the reduce kernel every time,
    and every counter back at 0."""
    if path == "tma" and G.tma_available(torch.device("cuda"), asym=True, group=128) is not None:
        pytest.skip("no TMA on this GPU")
    n, k, m = 4096, 4096, 16
    g = torch.Generator().manual_seed(11)
    lay = ActivationLayout.from_block_bits(k, [8] * 8 + [4] * 24)
    qa = _qa_to(R.quantize_activation(rand_activation(m, k, outliers=8, generator=g), lay, "block"), "cuda")
    qw = R.quantize_weight_rtn((rand_weight(n, k, generator=g) + 0.01).cuda(), 128, sym=False)
    cfg = GemmConfig(block_m=16, block_n=128, group_m=1, split=8, num_warps=4, num_stages=4, tma=path == "tma")
    args = (qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, None, torch.float16, "block")
    kw = dict(path=path, config=cfg, w_offsets=qw.offsets, deterministic=True)
    monkeypatch.setenv(G.ENV_SPLITK_FIXUP, "0")
    want = w4ax_gemm_triton(*args, **kw)
    monkeypatch.setenv(G.ENV_SPLITK_FIXUP, "1")
    for _ in range(10):
        assert _bits_equal(want, w4ax_gemm_triton(*args, **kw))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        w4ax_gemm_triton(*args, **kw)  # warm-up outside the capture (compile, counters allocated)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = w4ax_gemm_triton(*args, **kw)
    for _ in range(10):
        graph.replay()
        torch.cuda.synchronize()
        assert _bits_equal(want, got)
    assert all(int(c.abs().sum()) == 0 for c in G._COUNTERS.values())


@pytest.mark.gpu
@pytest.mark.parametrize("m,path", [(1, "splitk"), (16, "splitk"), (64, "persistent"), (1024, "persistent")])
@pytest.mark.parametrize("asym", [False, True])
def test_gpu_deterministic_repeatable(m, path, asym):
    """Compiled deterministic kernels: bit-identical across repeated calls, within tolerance.
    (One generated config per case, not autotuned: compile time.)"""
    n, k = 4096, 4096
    cands = gen_configs(m_bucket(m), n, k, 4, interpret=False)
    cfg = next((c for c in cands if c.split > 1), cands[0]) if path == "splitk" else cands[0]
    g = torch.Generator().manual_seed(m)
    lay = ActivationLayout.from_block_bits(k, [8] * 4 + [4] * 28)
    x = rand_activation(m, k, outliers=8, generator=g)
    qa = _qa_to(R.quantize_activation(x, lay, "block"), "cuda")
    qw = R.quantize_weight_rtn((rand_weight(n, k, generator=g) + 0.01).cuda(), 32 if asym else 128, sym=not asym)
    args = (qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, qw.group_size, None,
            torch.float16, "block")
    ys = [w4ax_gemm_triton(*args, path=path, config=cfg, w_offsets=qw.offsets, deterministic=True)
          for _ in range(4)]
    for y in ys[1:]:
        assert _bits_equal(ys[0], y)
    ref = R.w4ax_gemm(qa, qw, None, torch.float64)
    torch.testing.assert_close(ys[0].double(), ref.half().double(), rtol=GEMM_FP16_RTOL, atol=GEMM_FP32_ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 1024])
@pytest.mark.parametrize("share", [0.0, 0.125])
@pytest.mark.parametrize("path", ["auto", "persistent"])
def test_gpu_llama_shape(m, share, path):
    """Compiled kernels (autotuned configs) on a Llama-3-8B o_proj shape; integers exact for M <= 64."""
    n, k = 4096, 4096
    nb = k // 128
    n8 = int(round(share * nb))
    g = torch.Generator().manual_seed(m)
    lay = ActivationLayout.from_block_bits(k, [8] * n8 + [4] * (nb - n8))
    x = rand_activation(m, k, outliers=8, generator=g)
    qa = _qa_to(R.quantize_activation(x, lay, "block"), "cuda")
    qw = R.quantize_weight_rtn(rand_weight(n, k, generator=g), 128).to("cuda")
    want_acc = m <= 64
    out = w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, None,
                           torch.float16, "block", path=path, return_int_acc=want_acc)
    y = out[0] if want_acc else out
    if want_acc:
        assert torch.equal(out[1], R.w4ax_int_accumulators(qa, qw))
    ref = R.w4ax_gemm(qa, qw, None, torch.float64)
    cfg = G.chosen_config(m, n, k, n8, path=path, scale_mode="block", group_size=128)
    if path == "auto" and cfg is not None and cfg.dequant:
        # M >= 1024 runs the dequant path untuned: fp16 operands, within DEQUANT_GEMM_RTOL of max |y|
        from cometq.kernels.dequant_gemm import DEQUANT_GEMM_RTOL

        assert float((y.double() - ref).abs().max()) <= DEQUANT_GEMM_RTOL[torch.float16] * float(ref.abs().max())
        return
    torch.testing.assert_close(y.double(), ref.half().double(), rtol=GEMM_FP16_RTOL, atol=GEMM_FP32_ATOL)


# ---------------------------------------------------------------------------------------------
# Hopper TMA kernel (path="tma"): the interpreter emulates the tensor descriptors on CPU
# ---------------------------------------------------------------------------------------------
TMA_CASES = []
for i, (pattern, (mode, group)) in enumerate(itertools.product(
        ("all4", "all8", "mixed", "alternating"), (("block", 128), ("class", -1), ("class", 128), ("block", -1)))):
    TMA_CASES.append((pattern, mode, group, (1, 17, 70)[i % 3], _OUT[i % 3], i % 2 == 1))


@pytest.mark.parametrize("pattern,mode,group,m,out_dtype,bias", TMA_CASES)
def test_tma_matches_reference(pattern, mode, group, m, out_dtype, bias, device):
    """Integers exact (each block's int32 result, DEBUG), outputs within tolerance; M not a multiple of the
    tile and N=200 not a multiple of 64 (the copy engine zero-fills rows past the end)."""
    qa, qw, b = _random_operands(m, 576, 200, pattern, mode, group, device, seed=300 + m, bias=bias)
    y, acc = _run(qa, qw, b, out_dtype, path="tma")
    _check(qa, qw, b, out_dtype, y, acc)


@pytest.mark.parametrize("mode,group,pattern", [("class", -1, "mixed"), ("class", -1, "alternating"),
                                                ("block", 256, "mixed"), ("class", 256, "all8")])
def test_tma_without_debug(mode, group, pattern, device):
    # DEBUG off: class mode + per-channel weights chains one int32 accumulator per run
    # (acc = dot(a, b, acc)); weight groups spanning two blocks (G = 256) rescale per block
    qa, qw, b = _random_operands(37, 512, 200, pattern, mode, group, device, seed=41)
    y = w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, group, b,
                         torch.float32, mode, path="tma")
    ref = R.w4ax_gemm(qa, qw, b, torch.float64)
    torch.testing.assert_close(y.double(), ref, rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)
    y_tiled = w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, group, b,
                               torch.float32, mode, path="tiled")
    torch.testing.assert_close(y, y_tiled, rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)


@pytest.mark.parametrize("split,pattern,mode,group", [(2, "mixed", "block", 128), (3, "alternating", "class", -1),
                                                      (5, "all4", "class", 128), (4, "all8", "block", -1)])
def test_tma_splitk_decode(split, pattern, mode, group, device):
    """Decode split-K on the TMA kernel: chunks of cdiv(NB, SPLIT) blocks (uneven: 5 blocks in
    2+2+1, ...), each piece into its workspace slot, summed by the reduce kernel in chunk order --
    under the interpreter the same bits as the pointer kernel's deterministic split-K on the same
    cuts in block mode (same per-block float ops in the same order)."""
    qa, qw, b = _random_operands(1, 576, 200, pattern, mode, group, device, seed=50 + split)
    cfg = GemmConfig(block_m=16, block_n=64, group_m=1, split=split, num_warps=4, num_stages=1, tma=True)
    y, acc = _run(qa, qw, b, torch.float16, path="tma", config=cfg)
    _check(qa, qw, b, torch.float16, y, acc)
    y2 = w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, group, b,
                          torch.float32, mode, path="tma", config=cfg)
    ref = R.w4ax_gemm(qa, qw, b, torch.float64)
    torch.testing.assert_close(y2.double(), ref, rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)
    assert _bits_equal(y2, w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales,
                                            group, b, torch.float32, mode, path="tma", config=cfg))
    if mode == "block" and device == "cpu":  # interpreter: same float ops in the same order
        ptr_cfg = GemmConfig(block_m=16, block_n=64, group_m=1, split=split, num_warps=4, num_stages=1, swap_ab=True)
        assert _bits_equal(y2, w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight,
                                                qw.scales, group, b, torch.float32, mode, path="splitk",
                                                config=ptr_cfg, deterministic=True))


@pytest.mark.parametrize("path,split,pattern,mode,group,bias", [("tma", 2, "mixed", "block", 128, True),
                                                                ("tma", 3, "alternating", "class", -1, False),
                                                                ("tma", 5, "all8", "block", -1, True),
                                                                ("splitk", 3, "mixed", "block", 128, True),
                                                                ("splitk", 4, "alternating", "class", -1, False)])
def test_splitk_fixup_same_bits(path, split, pattern, mode, group, bias, device, monkeypatch):
    """COMETQ_SPLITK_FIXUP=1: the tile's last split piece adds the workspace slots in-kernel
    (no reduce launch), on the TMA kernel and the pointer kernel's deterministic split-K -- the
    reduce kernel's loads and adds in its order, so the same bits; every tile counter is back at 0
    afterwards (the next GEMM of the stream reuses them).  On a GPU this also exercises the
    counters' memory ordering (M = 3, several tiles per GEMM, repeated)."""
    if path == "tma" and group not in (-1, 128):
        pytest.skip("the TMA kernel takes groups >= 128")
    qa, qw, b = _random_operands(3, 576, 200, pattern, mode, group, device, seed=60 + split, bias=bias)
    cfg = GemmConfig(block_m=16, block_n=64, group_m=1, split=split, num_warps=4, num_stages=1, tma=path == "tma")
    args = (qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, group, b, torch.float32, mode)
    kw = dict(path=path, config=cfg) if path == "tma" else dict(path=path, config=cfg, deterministic=True)
    monkeypatch.setenv(G.ENV_SPLITK_FIXUP, "0")
    want = w4ax_gemm_triton(*args, **kw)
    monkeypatch.setenv(G.ENV_SPLITK_FIXUP, "1")
    for _ in range(1 if device == "cpu" else 20):
        assert _bits_equal(want, w4ax_gemm_triton(*args, **kw))
    assert G._COUNTERS and all(int(c.abs().sum()) == 0 for c in G._COUNTERS.values())
    monkeypatch.setenv(G.ENV_SPLITK_FIXUP, "yes")
    with pytest.raises(ValueError, match="COMETQ_SPLITK_FIXUP must be 0 or 1"):
        w4ax_gemm_triton(*args, **kw)


def test_tma_explicit_config_and_auto(device):
    qa, qw, b = _random_operands(20, 384, 96, "mixed", "block", 128, device, seed=7)
    cfg = GemmConfig(block_m=32, block_n=64, group_m=2, num_warps=4, num_stages=1, tma=True)
    for path in ("tma", "auto"):  # a TMA config runs the TMA kernel on either path
        y, acc = _run(qa, qw, b, torch.float16, path=path, config=cfg)
        _check(qa, qw, b, torch.float16, y, acc)


@pytest.mark.parametrize("mode,group,pattern", [("block", 128, "mixed"), ("class", -1, "alternating"),
                                                ("block", -1, "all4"), ("class", 128, "all8")])
def test_tma_split_rows(mode, group, pattern, device):
    """Split activation rows (A_SPLIT: the launcher repacks q4 / q8 once, the kernel reads both
    halves by TMA): a 128x64 tile runs it in both scale modes, a 64x128 tile only in class mode
    (tma_split_rows); every block's int32 result exact, the outputs within tolerance."""
    from cometq.kernels.w4ax_gemm import tma_split_rows

    qa, qw, b = _random_operands(70, 576, 200, pattern, mode, group, device, seed=77)
    for bm, bn in ((128, 64), (64, 128)):
        cfg = GemmConfig(block_m=bm, block_n=bn, group_m=2, num_warps=4, num_stages=1, tma=True)
        assert tma_split_rows(cfg, mode == "class") == (mode == "class" or bm > bn)
        y, acc = _run(qa, qw, b, torch.float16, path="tma", config=cfg)
        _check(qa, qw, b, torch.float16, y, acc)


@pytest.mark.parametrize("asym", [False, True])
def test_block_major_weights_same_bits(asym, device):
    """Weights stored block-major (layout.weights_block_major, a [N, NB, 64] view): every path
    gives the same bits as the row-major tensor (only the addresses differ); the TMA kernel
    reads one contiguous box per block (groups >= 128)."""
    from cometq.layout import weights_block_major

    for m, mode, group in ((1, "block", 128), (17, "class", -1), (40, "block", 64 if asym else 128)):
        qa, qw, b = _random_operands(m, 576, 200, "mixed", mode, group, device, seed=90 + m)
        offsets = (torch.randn(qw.scales.shape, generator=torch.Generator().manual_seed(m)) * 0.01).to(device) \
            if asym else None
        bm = weights_block_major(qw.qweight)
        paths = ("tiled", "splitk", "persistent") + (() if group < 128 else ("tma",))
        for path in paths:
            args = (qa.q4, qa.q8, qa.scales, qa.layout.block_bits)
            rest = (qw.scales, group, b, torch.float32, mode)
            kw = dict(path=path, w_offsets=offsets)
            assert _bits_equal(w4ax_gemm_triton(*args, qw.qweight, *rest, **kw),
                               w4ax_gemm_triton(*args, bm, *rest, **kw)), (m, mode, path)
    with pytest.raises(ValueError, match="block-major view"):
        w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight.reshape(200, -1, 64), qw.scales,
                         group, b, torch.float32, mode)


def test_tma_errors(device):
    qa, qw, b = _random_operands(5, 256, 64, "mixed", "block", 128, device, seed=9)
    args = (qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, b, torch.float16, "block")
    qa64, qw64, _ = _random_operands(5, 256, 64, "mixed", "block", 64, device, seed=9)
    with pytest.raises(ValueError, match="group_size=64"):
        w4ax_gemm_triton(qa64.q4, qa64.q8, qa64.scales, qa64.layout.block_bits, qw64.qweight, qw64.scales, 64,
                         None, torch.float16, "block", path="tma")
    # a q8 view whose rows are not 16-byte aligned cannot be a TMA descriptor
    wide = torch.zeros(qa.m, qa.q8.shape[1] + 1, dtype=torch.int8, device=qa.q8.device)
    q8_view = wide[:, 1:]
    q8_view.copy_(qa.q8)
    with pytest.raises(ValueError, match="16-byte aligned"):
        w4ax_gemm_triton(qa.q4, q8_view, *args[2:], path="tma")
    tma_cfg = GemmConfig(block_m=32, block_n=64, num_warps=4, num_stages=1, tma=True)
    with pytest.raises(ValueError, match="TMA config"):
        w4ax_gemm_triton(*args, path="tiled", config=tma_cfg)
    with pytest.raises(ValueError, match="needs a TMA config"):
        w4ax_gemm_triton(*args, path="tma", config=GemmConfig(block_m=32, block_n=64))
    with pytest.raises(TypeError, match="tma must be a bool"):
        GemmConfig(block_m=32, block_n=64, tma=1)
    with pytest.raises(ValueError, match="tma must be"):
        gen_configs(64, 4096, 4096, 4, tma="yes")
    # the fallback path is untouched: the same q8 view runs on the pointer kernel
    y = w4ax_gemm_triton(qa.q4, q8_view, *args[2:], path="tiled")
    torch.testing.assert_close(y, w4ax_gemm_triton(*args, path="tiled"))


def test_tma_candidates():
    from cometq.kernels.w4ax_gemm import tma_available

    for mb in (64, 256, 1024, 4096):
        # (the large-M dequant candidate, last in both lists, is not a kernel config: left out here)
        plain = [c for c in gen_configs(mb, 4096, 4096, 4, interpret=False) if not c.dequant]
        also = [c for c in gen_configs(mb, 4096, 4096, 4, interpret=False, tma="also") if not c.dequant]
        only = gen_configs(mb, 4096, 4096, 4, interpret=False, tma="only")
        assert not any(c.tma for c in plain)
        assert [c for c in also if not c.tma] == plain and {c for c in also if c.tma} == set(only)
        assert all(c.tma for c in only)
        # TMA configs after the pointer ones, except the 64 and 1024 buckets' first (measured
        # faster: runs 5 and 3)
        lead = 1 if mb in (64, 1024) else 0
        assert all(c in only for c in also[:lead]) and also[lead:lead + len(plain)] == plain
        # every TMA tile: the weight-row side is a whole wgmma M (64), <= 64 fp32 accumulators/thread
        assert all(c.block_n % 64 == 0 and c.block_m * c.block_n <= 2048 * c.num_warps for c in only)
    dec = gen_configs(16, 4096, 4096, 4, interpret=False, tma="only")
    assert dec and all(c.tma and c.block_m == 16 and c.split > 1 for c in dec)
    assert gen_configs(64, 4096, 4096, 4, interpret=True, tma="only")[0].tma
    cpu = torch.device("cpu")
    # asymmetric weights no longer rule TMA out (the ASYM offset term); groups < 128 still do
    assert tma_available(cpu, asym=True) == tma_available(cpu) and tma_available(cpu, group=32) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 1024])
@pytest.mark.parametrize("mode,group", [("block", 128), ("class", -1)])
def test_gpu_tma_llama_shape(m, mode, group):
    """Every TMA candidate config, compiled for the GPU, on a Llama-3-8B o_proj shape (the decode
    bucket's at M = 1; M = 1024's include every M = 64 tile)."""
    from cometq.kernels.w4ax_gemm import tma_available

    if tma_available(torch.device("cuda")) is not None:
        pytest.skip(tma_available(torch.device("cuda")))
    n, k = 4096, 4096
    nb = k // 128
    g = torch.Generator().manual_seed(m)
    lay = ActivationLayout.from_block_bits(k, [8] * 4 + [4] * (nb - 4))
    x = rand_activation(m, k, outliers=8, generator=g)
    qa = _qa_to(R.quantize_activation(x, lay, mode), "cuda")
    qw = R.quantize_weight_rtn(rand_weight(n, k, generator=g), group).to("cuda")
    ref = R.w4ax_gemm(qa, qw, None, torch.float64)
    for cfg in gen_configs(m_bucket(m), n, k, 4, interpret=False, tma="only"):
        y = w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, group, None,
                             torch.float16, mode, path="tma", config=cfg)
        torch.testing.assert_close(y.double(), ref.half().double(), rtol=GEMM_FP16_RTOL, atol=GEMM_FP32_ATOL,
                                   msg=lambda s: f"{cfg}: {s}")


def test_graph_timing_mode_keeps_its_own_config_key(device):
    """Under ``cometq.autotune.timing("graph")`` (the serving runner's decode-graph warm-up and
    capture) the config choice is cached under its own key -- timed as CUDA-graph replays on a
    GPU -- and the eager key is untouched (eager timing of the TMA kernel measures its host work)."""
    from cometq import autotune

    qa, qw, b = _random_operands(3, 384, 4099, "mixed", "block", 128, device, seed=11)  # a unique N
    args = (qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, b, torch.float32, "block")
    k_pad, n8 = qw.qweight.shape[1] * 2, qa.layout.n_int8
    with autotune.timing("graph"):
        y = w4ax_gemm_triton(*args)
    assert G.chosen_config(3, 4099, k_pad, n8, graph=True) is not None
    assert G.chosen_config(3, 4099, k_pad, n8) is None
    assert torch.equal(y, w4ax_gemm_triton(*args))  # same config (one candidate under the interpreter)
    assert G.chosen_config(3, 4099, k_pad, n8) is not None
