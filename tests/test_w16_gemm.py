"""The ``w16`` route (small M): activations quantized and dequantized once, INT4 weights
dequantized in registers, 16-bit MMA -- vs the integer-exact reference (within the dequant
path's tolerance) and vs the dequant path itself (same operands, cuBLAS).

Triton kernels run under TRITON_INTERPRET=1 on CPU (tests/conftest.py) and natively on a GPU."""
import pytest
import torch

from cometq import reference as R
from cometq.kernels.dequant_gemm import DEQUANT_GEMM_RTOL, w4ax_linear_dequant
from cometq.kernels.w16_gemm import W16Config, w16_config, w4ax_linear_w16
from cometq.layout import ActivationLayout, weights_block_major

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(m, k, n, pattern, group, sym, seed, scale_mode="block", bias=True):
    g = torch.Generator().manual_seed(seed)
    # fp16-representable input and bias: the fp16 runs quantize exactly what the reference does
    x = (torch.randn(m, k, generator=g) * (1 + 6 * (torch.rand(k, generator=g) > 0.9))).half().float()
    nb = -(-k // 128)
    bits = {"mixed": [8 if i % 3 == 1 else 4 for i in range(nb)], "int4": [4] * nb, "int8": [8] * nb}[pattern]
    lay = ActivationLayout(torch.randperm(k, generator=g), torch.tensor(bits, dtype=torch.int32), 0.93)
    qw = R.quantize_weight_rtn(torch.randn(n, k, generator=g) * 0.05, group, sym=sym)
    b = torch.randn(n, generator=g).half().float() if bias else None
    ref = R.w4ax_gemm(R.quantize_activation(x, lay, scale_mode), qw, b).double()
    return x, lay, qw, b, ref


def _close(y, ref, dt):
    err = float((y.double().cpu() - ref).abs().max())
    assert err <= DEQUANT_GEMM_RTOL[dt] * float(ref.abs().max()), (dt, err, float(ref.abs().max()))


def _call(x, lay, qw, b, dt, scale_mode="block", config=None, block_major=False):
    d = DEV
    group = lay.block_bits.numel() * 128 if qw.group_size in (None, -1) else qw.group_size
    qweight = weights_block_major(qw.qweight) if block_major else qw.qweight
    sw = qweight.stride(1) if qweight.dim() == 3 else None
    return w4ax_linear_w16(x.to(d).to(dt if dt != torch.float32 else torch.float32), lay.perm.to(d),
                           lay.block_bits.to(d), lay.n_int8, scale_mode, lay.int4_clip, qweight.to(d), qw.scales.to(d),
                           None if qw.offsets is None else qw.offsets.to(d), group,
                           None if b is None else b.to(d).to(dt), dt, stride_wb=sw, config=config)


@pytest.mark.parametrize("m,k,n,pattern", [(1, 576, 72, "mixed"), (17, 384, 96, "int8"), (33, 256, 130, "int4"),
                                           (64, 512, 64, "mixed")])
@pytest.mark.parametrize("dt", [torch.float16, torch.float32])
def test_w16_matches_reference(m, k, n, pattern, dt):
    x, lay, qw, b, ref = _case(m, k, n, pattern, 128, False, m + k + n)
    y = _call(x, lay, qw, b, dt)
    assert y.dtype == dt and y.shape == (m, n)
    _close(y, ref, dt)


@pytest.mark.parametrize("group,sym", [(32, False), (64, True), (-1, True), (128, True), (256, False)])
def test_w16_weight_formats_and_split(group, sym):
    x, lay, qw, b, ref = _case(9, 512, 72, "mixed", group, sym, 11)
    for cfg in (None, W16Config(16, 16, 4, 2, 1), W16Config(16, 32, 4, 1, 3), W16Config(32, 64, 4, 3, 4)):
        _close(_call(x, lay, qw, b, torch.float16, config=cfg), ref, torch.float16)


def test_w16_block_major_weights_and_class_scales():
    x, lay, qw, b, ref = _case(5, 384, 48, "mixed", 128, False, 3, scale_mode="class")
    for bm in (False, True):
        _close(_call(x, lay, qw, b, torch.float16, scale_mode="class", block_major=bm), ref, torch.float16)


def test_w16_equals_dequant_route_operands():
    """Same A' (the fake-quant pass), same W' values: the w16 result is the dequant path's
    cuBLAS product up to summation order and fp16 weight rounding."""
    x, lay, qw, b, ref = _case(7, 256, 40, "mixed", 64, False, 5, bias=False)
    d = DEV
    y = _call(x, lay, qw, None, torch.float32)
    two = w4ax_linear_dequant(x.to(d), lay.perm.to(d), lay.block_bits.to(d), lay.n_int8, "block", lay.int4_clip,
                              qw.qweight.to(d), qw.scales.to(d), qw.offsets.to(d), 64, None, torch.float32)
    torch.testing.assert_close(y, two, rtol=1e-5, atol=1e-5 * float(two.abs().max()))
    _close(y, ref, torch.float32)


def test_w16_config_rules():
    assert w16_config(64, 28672, 32).split == 1  # 448 tiles already fill the SMs
    c = w16_config(1, 4096, 112)  # 64 tiles: split K
    assert c.block_m == 16 and c.split == 4 and 64 * c.split <= 2 * 132
    assert w16_config(3, 64, 2).split == 1
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, got 48"):
        W16Config(16, 48)
    with pytest.raises(ValueError, match="split must be an int >= 1, got 0"):
        W16Config(16, 16, split=0)


def test_w16_empty():
    x, lay, qw, b, _ = _case(2, 256, 16, "mixed", 128, True, 1)
    y = _call(x[:0], lay, qw, b, torch.float16)
    assert y.shape == (0, 16) and y.dtype == torch.float16


def test_w16_route_choice(monkeypatch):
    """``ops.w4ax_linear_eager`` at 1 <= M <= W16_MAX_M: the w16 route is a candidate beside
    quantize + GEMM ("split"), split first untuned, the measured-faster one kept per case;
    never above W16_MAX_M, never with COMETQ_LINEAR_W16=0 (a fake device check and timer
    drive it here)."""
    import os

    from cometq import autotune, ops
    from cometq.testing import fake_route_timer, record_linear_routes

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("drives the route choice with a fake device check on CPU tensors: needs the interpreter")
    x0, lay, qw, _, _ = _case(1, 256, 48, "mixed", 128, False, 9, bias=False)
    ran = record_linear_routes(monkeypatch, ops, ("split", "w16"))
    g = torch.Generator().manual_seed(2)

    def call(m):
        x = torch.randn(m, 256, generator=g)
        return x, ops.w4ax_linear_eager(x, lay.perm, lay.block_bits, lay.n_int8, "block", lay.int4_clip, qw.qweight,
                                        qw.scales, qw.offsets, 128, None, torch.float32)

    call(4)
    assert ran == ["split"]  # on the CPU: never w16
    monkeypatch.setattr(ops, "_fused_dequant_applies", lambda *a: True)
    ran.clear()
    call(4)
    assert ran == ["split"]  # unmeasured device: split first
    autotune.clear()
    monkeypatch.setattr(autotune, "_measurable", lambda d: True)
    times = {"split": 2.0, "w16": 1.0}
    prev = autotune.set_timer(fake_route_timer(ran, times), "graph")  # (the route is timed as graph replays)
    monkeypatch.setattr(ops, "_ROUTE_AGREES", {})
    try:
        ran.clear()
        x, y = call(3)
        # checked against split once, each timed once, then the w16 one runs
        assert ran == ["split", "w16", "split", "w16", "w16"]
        ran.clear()
        call(4)  # same case: no second check, no timing
        assert ran == ["w16"]
        # one decision per case, timed as graph replays whatever the caller's mode (eager steps and
        # their CUDA-graph replays must round alike)
        (d,) = [d for d in autotune.report() if d["op"] == "w4ax_linear_route"]
        assert d["choice"] == "w16" and d["key"]["timing"] == "graph" and d["key"]["M"] == 4
        ref = R.w4ax_gemm(R.quantize_activation(x, lay, "block"), qw).double()
        _close(y, ref, torch.float32)
        ran.clear()
        call(ops.W16_MAX_M + 1)
        assert ran == ["split"]  # above the threshold: not a candidate
        monkeypatch.setenv("COMETQ_LINEAR_W16", "0")
        ran.clear()
        call(3)
        assert ran == ["split"]
    finally:
        autotune.set_timer(prev, "graph")
        autotune.clear()


def test_w16_max_m_matches_ops():
    from cometq import ops
    from cometq.kernels.w16_gemm import W16_MAX_M

    assert ops.W16_MAX_M == W16_MAX_M


def test_f16_nibble_asm_is_exact():
    """The inline-PTX fp16 unpack (GPU only: the interpreter runs the integer form) on the PTX
    model, every byte value in every lane: element i of a word's 4 bytes -> the fp16 number
    1032 + v of its low / high nibble v, elements 0, 1 in the low / high half of the first output
    register, 2, 3 in the second (the order of Triton's pack=4 operands)."""
    import numpy as np

    from cometq.kernels import w16_gemm as W
    from cometq.testing import run_ptx

    b = np.arange(256, dtype=np.uint64)
    w = b | (((b * 7 + 3) % 256) << 8) | (((b + 101) % 256) << 16) | ((255 - b) << 24)
    byte = np.stack([(w >> np.uint64(8 * i)) & np.uint64(255) for i in range(4)], -1).astype(np.int64)
    for asm, hi in ((W._ASM_F16_LO.value, False), (W._ASM_F16_HI.value, True)):
        r = run_ptx(asm, {"$2": w})
        halves = np.stack([r["$0"] & 0xFFFF, r["$0"] >> 16, r["$1"] & 0xFFFF, r["$1"] >> 16], -1).astype(np.uint16)
        nib = (byte >> 4) & 15 if hi else byte & 15
        assert (halves.view(np.float16).astype(np.float64) == 1032 + ((nib ^ 8) - 8)).all(), hi


def test_w16_route_never_kept_when_it_disagrees(monkeypatch):
    """The tuner times speed only: a w16 result that disagrees with quantize + GEMM beyond the
    dequant path's tolerance takes the route out of that case's choice (with a warning), even
    when it would be timed faster; other cases are checked on their own."""
    import os

    from cometq import autotune, ops
    from cometq.testing import fake_route_timer, record_linear_routes

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("drives the route choice with a fake device check on CPU tensors: needs the interpreter")
    x0, lay, qw, _, _ = _case(1, 256, 48, "mixed", 128, False, 9, bias=False)
    real = ops._LINEAR_ROUTES["w16"]
    monkeypatch.setitem(ops._LINEAR_ROUTES, "w16", lambda *a: real(*a) * 1.01)  # 1 % off: a broken kernel
    ran = record_linear_routes(monkeypatch, ops, ("split", "w16"))
    monkeypatch.setattr(ops, "_fused_dequant_applies", lambda *a: True)
    monkeypatch.setattr(ops, "_ROUTE_AGREES", {})
    autotune.clear()
    monkeypatch.setattr(autotune, "_measurable", lambda d: True)
    prev = autotune.set_timer(fake_route_timer(ran, {"split": 2.0, "w16": 1.0}), "graph")
    g = torch.Generator().manual_seed(4)
    try:
        x = torch.randn(3, 256, generator=g)
        with pytest.warns(RuntimeWarning, match=r"the w16 route disagrees with quantize \+ GEMM .*M=3, N=48, K=256"):
            y = ops.w4ax_linear_eager(x, lay.perm, lay.block_bits, lay.n_int8, "block", lay.int4_clip, qw.qweight,
                                      qw.scales, qw.offsets, 128, None, torch.float32)
        assert ran == ["split", "w16", "split"]  # checked once, then split (never timed)
        ref = R.w4ax_gemm(R.quantize_activation(x, lay, "block"), qw)
        assert torch.equal(y, ref.to(y.dtype)) or torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
        assert list(ops._ROUTE_AGREES.values()) == [False]
    finally:
        autotune.set_timer(prev, "graph")
        autotune.clear()


@pytest.mark.parametrize("bias", [False, True])
def test_w16_split_reduction_in_kernel_same_bits(bias, monkeypatch):
    """Split-K partials of the w16 GEMM are combined as ``cast(((P_0 + P_1) + ...) + bias)``: by the
    reduce kernel, or with ``COMETQ_SPLITK_FIXUP=1`` by each tile's last split program (no
    reduce launch) -- the same adds in the same order, so the same bits; the tile counters are
    back at 0 afterwards (on a GPU, repeated: the counters' memory ordering)."""
    import cometq._counters as CNT
    from cometq.kernels import w16_gemm as W
    from cometq.kernels.dequant_gemm import _operand_dtype
    from cometq.kernels.act_quant import fake_quant_act_triton

    x, lay, qw, b, ref = _case(20, 640, 136, "mixed", 128, False, 21, bias=bias)
    d = DEV
    a = fake_quant_act_triton(x.to(d).half(), lay.perm.to(d), lay.block_bits.to(d), lay.n_int8, "block",
                              out_dtype=_operand_dtype(torch.float16), int4_clip=lay.int4_clip)
    cfg = W16Config(16, 64, 4, 1, 3)  # 2 x 3 tiles, 3 splits
    args = (a, qw.qweight.to(d), qw.scales.to(d), qw.offsets.to(d), 128, None if b is None else b.to(d).half(),
            torch.float16)
    monkeypatch.setenv("COMETQ_SPLITK_FIXUP", "0")
    want = W.w16_gemm(*args, config=cfg)
    # the reduce kernel's order, spelled out in torch: the kernel's partials re-derived per split
    parts = [W.w16_gemm(a[:, s0 * 128:s1 * 128], qw.qweight.to(d)[:, s0 * 64:s1 * 64], qw.scales.to(d)[:, s0:s1],
                        qw.offsets.to(d)[:, s0:s1], 128, None, torch.float32, config=W16Config(16, 64, 4, 1, 1))
             for s0, s1 in ((0, 2), (2, 4), (4, 5))]  # (per = cdiv(5 blocks, 3) = 2)
    acc = (parts[0] + parts[1]) + parts[2]
    if b is not None:
        acc = acc + b.to(d).half().float()
    assert torch.equal(want, acc.half())
    monkeypatch.setenv("COMETQ_SPLITK_FIXUP", "1")
    for _ in range(1 if d == "cpu" else 20):
        assert torch.equal(W.w16_gemm(*args, config=cfg), want)
    assert CNT._COUNTERS and all(int(c.abs().sum()) == 0 for c in CNT._COUNTERS.values())
    _close(want, ref, torch.float16)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group,sym,block_major", [(128, False, False), (32, True, True), (-1, False, True)])
def test_w16_reference_op_matches_integer_reference(dt, group, sym, block_major):
    """ops._ref_w16_gemm (the "reference" backend of the w16 GEMM, the spec of the Triton and CUDA
    kernels) on the FAKE activation operand is the W4Ax product within the dequant tolerance."""
    from cometq import ops

    x, lay, qw, b, ref = _case(5, 576, 40, "mixed", group, sym, 3)
    a = ops._ref_fake_quant_act(x, lay.perm, lay.block_bits, lay.n_int8, "block", lay.int4_clip, dt)
    g = lay.block_bits.numel() * 128 if qw.group_size in (None, -1) else qw.group_size
    qweight = weights_block_major(qw.qweight) if block_major else qw.qweight
    y = ops._ref_w16_gemm(a, qweight, qw.scales, qw.offsets, g, None if b is None else b.to(dt), dt)
    assert y.dtype == dt and y.shape == (5, 40)
    _close(y, ref, dt)


@pytest.mark.parametrize("dt", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEV == "cpu", reason="the Triton interpreter's bf16 dot is not the GPU's (checked on the GPU)"))])
def test_w16_triton_kernel_is_the_reference_op(dt):
    """The Triton kernel against its op's reference on the same A': W' within one rounding of the
    reference's (the interpreter rounds v * s and + o separately, the GPU fuses them; bf16 goes
    through fp32), summed in fp32 vs float64."""
    from cometq import ops
    from cometq.kernels.w16_gemm import w16_gemm

    x, lay, qw, b, ref = _case(7, 384, 72, "mixed", 64, False, 5)
    a = ops._ref_fake_quant_act(x, lay.perm, lay.block_bits, lay.n_int8, "block", lay.int4_clip, dt)
    want = ops._ref_w16_gemm(a, qw.qweight, qw.scales, qw.offsets, 64, None, torch.float32).double()
    got = w16_gemm(a.to(DEV), qw.qweight.to(DEV), qw.scales.to(DEV), qw.offsets.to(DEV), 64, None,
                   torch.float32).double().cpu()
    tol = DEQUANT_GEMM_RTOL[dt] / 4 * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol


def test_w16_gemm_dispatch_on_cpu_is_the_reference():
    from cometq import ops

    x, lay, qw, b, ref = _case(3, 256, 24, "int4", 128, True, 8)
    a = ops._ref_fake_quant_act(x.half(), lay.perm, lay.block_bits, lay.n_int8, "block", lay.int4_clip,
                                torch.float16)
    y = ops._dispatch("w16_gemm", torch.device("cpu"), None, a, qw.qweight, qw.scales, None, 128, b.half(),
                      torch.float16)
    assert torch.equal(y, ops._ref_w16_gemm(a, qw.qweight, qw.scales, None, 128, b.half(), torch.float16))


def test_w16_tuning_candidates_and_choice(tmp_path, monkeypatch):
    """kernels/w16_gemm.py's config tuning: the default first among distinct valid candidates;
    the fastest kept per (token tile, M bucket, shape, format, dtype, SMs, timing mode) and in the
    config-cache file (read back by a fresh process state); no timing function: the exact-M
    default, nothing remembered, so a later tuning call still tunes."""
    from cometq.kernels import w16_gemm as W

    for m, n, nb in ((1, 4096, 32), (64, 28672, 32), (17, 576, 5), (200, 6144, 112)):
        cands = W.w16_configs(m, n, nb, 132)
        assert cands[0] == w16_config(m, n, nb, 132) and len(set(cands)) == len(cands) >= 4
        bm = cands[0].block_m
        assert all(1 <= c.split <= max(1, nb // 4) for c in cands)
        assert {c.block_n for c in cands} == {32, 64, 128}
        # from a 32-token tile on, one more: the default tile with half the tokens
        narrow = [(c.block_m, c.block_n, c.num_warps, c.num_stages) for c in cands if c.block_m != bm]
        assert narrow == ([(bm // 2, 64, 4, 3)] if bm >= 32 else []), (m, cands)
    monkeypatch.setenv("COMETQ_GEMM_CONFIG_CACHE", str(tmp_path / "cfg.json"))
    monkeypatch.setattr(W, "_W16_CHOICE", {})
    monkeypatch.setattr(W, "_W16_FILE_READ", set())
    args = (64, 4096, 32, True, torch.float16, 132)
    assert W.select_w16_config(*args) == w16_config(64, 4096, 32, 132)  # untuned
    times = {c: 10.0 - i for i, c in enumerate(W.w16_configs(64, 4096, 32, 132))}  # the last is fastest
    calls = []

    def bench(c):
        calls.append(c)
        if c.block_n == 32:
            raise RuntimeError("out of resources")  # a rejected config is skipped
        return times[c]

    best = W.select_w16_config(*args, bench, device_name="GPU-X")
    assert best == max((c for c in times if c.block_n != 32), key=lambda c: -times[c]) and len(calls) == len(times)
    assert W.select_w16_config(*args, bench, device_name="GPU-X") == best and len(calls) == len(times)  # cached
    assert W.select_w16_config(33, 4096, 32, True, torch.float16, 132, device_name="GPU-X") == best  # same bucket
    # graph timing is its own case; another bucket (M = 16) too
    assert W.select_w16_config(*args, graph=True) == w16_config(64, 4096, 32, 132)
    assert W.select_w16_config(16, 4096, 32, True, torch.float16, 132) == w16_config(16, 4096, 32, 132)
    # a fresh process state reads the file
    monkeypatch.setattr(W, "_W16_CHOICE", {})
    monkeypatch.setattr(W, "_W16_FILE_READ", set())
    assert W.select_w16_config(*args, device_name="GPU-X") == best
    monkeypatch.setattr(W, "_W16_CHOICE", {})
    monkeypatch.setattr(W, "_W16_FILE_READ", set())
    assert W.select_w16_config(*args, device_name="GPU-Y") == w16_config(64, 4096, 32, 132)  # other card
