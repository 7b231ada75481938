"""The W4Ax GEMM's dequant path (large M: dequantize both operands, cuBLAS) vs the reference.

Runs the Triton kernels under TRITON_INTERPRET=1 on CPU (tests/conftest.py) and natively on a GPU.
"""
import os

import pytest
import torch

from cometq import reference as R
from cometq.layout import ActivationLayout, weights_block_major

import cometq.kernels.w4ax_gemm as G  # noqa: E402
from cometq.kernels.dequant_gemm import DEQUANT_GEMM_RTOL  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(m, k, n, pattern, scale_mode, group, sym, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (1 + 4 * (torch.rand(k, generator=g) > 0.95))  # a few outlier channels
    w = torch.randn(n, k, generator=g) * 0.05
    nb = -(-k // 128)
    bits = {"mixed": [8 if i % 3 == 0 else 4 for i in range(nb)], "int4": [4] * nb, "int8": [8] * nb}[pattern]
    lay = ActivationLayout(torch.randperm(k, generator=g), torch.tensor(bits, dtype=torch.int32))
    qw = R.quantize_weight_rtn(w, group, sym=sym)
    qa = R.quantize_activation(x, lay, scale_mode)
    b = torch.randn(n, generator=g) if bias else None
    ref = R.w4ax_gemm(qa, qw, b).double()
    return qa, qw, lay, b, ref


def _run(qa, qw, lay, b, out_dtype, **kw):
    d = DEV
    qweight = kw.pop("qweight", qw.qweight)
    return G.w4ax_gemm_triton(qa.q4.to(d), qa.q8.to(d), qa.scales.to(d), lay.block_bits.to(d), qweight.to(d),
                              qw.scales.to(d), qw.group_size if qw.group_size is not None else -1,
                              None if b is None else b.to(d), out_dtype, qa.scale_mode, path="dequant",
                              w_offsets=None if qw.offsets is None else qw.offsets.to(d), **kw)


def _close(y, ref):
    err = float((y.double().cpu() - ref).abs().max())
    assert err <= DEQUANT_GEMM_RTOL[y.dtype] * float(ref.abs().max()), (y.dtype, err, float(ref.abs().max()))


@pytest.mark.parametrize("m,k,n", [(1, 576, 200), (17, 384, 96), (33, 256, 130)])
@pytest.mark.parametrize("pattern", ["mixed", "int4", "int8"])
@pytest.mark.parametrize("scale_mode", ["block", "class"])
def test_dequant_path_matches_reference(m, k, n, pattern, scale_mode):
    qa, qw, lay, b, ref = _case(m, k, n, pattern, scale_mode, 128, True, m + k + n, bias=True)
    for dt in (torch.float16, torch.float32):
        y = _run(qa, qw, lay, b, dt)
        assert y.dtype == dt and y.shape == (m, n)
        _close(y, ref)


@pytest.mark.parametrize("group,sym", [(32, False), (64, True), (-1, True), (128, False)])
def test_dequant_path_weight_formats(group, sym):
    qa, qw, lay, b, ref = _case(9, 512, 72, "mixed", "block", group, sym, 7)
    _close(_run(qa, qw, lay, b, torch.float16), ref)
    if DEV == "cuda":  # (the interpreter has no bf16 arithmetic)
        _close(_run(qa, qw, lay, b, torch.bfloat16), ref)


def test_dequant_path_block_major_weights():
    qa, qw, lay, b, ref = _case(5, 384, 64, "mixed", "block", 128, True, 3)
    y = _run(qa, qw, lay, b, torch.float16, qweight=weights_block_major(qw.qweight))
    _close(y, ref)
    assert torch.equal(y, _run(qa, qw, lay, b, torch.float16))


def test_dequant_is_the_untuned_large_m_choice():
    for mb in (16, 64, 256):
        assert not any(c.dequant for c in G.gen_configs(mb, 4096, 4096, 4, interpret=False))
    for mb in (1024, 4096):
        for tma in ("none", "also"):
            cands = G.gen_configs(mb, 4096, 4096, 4, interpret=False, tma=tma)
            # first (untuned), the integer and TMA kernels after it (autotuning times them all);
            # in the 1024 bucket a TMA config comes before it where TMA applies (measured faster)
            lead = 1 if (mb == 1024 and tma == "also") else 0
            assert all(c.tma for c in cands[:lead]) and cands[lead].dequant
            assert not any(c.dequant for c in cands[lead + 1:]) and any(c.tma for c in cands) == (tma == "also")
    assert not any(c.dequant for c in G.gen_configs(4096, 4096, 4096, 4, interpret=True))


def test_auto_with_int_accumulators_avoids_the_dequant_path(monkeypatch):
    """A chosen dequant config cannot give integer accumulators: the call takes the bucket's
    first integer config instead (same result within the GEMM tolerance, exact int32 sums)."""
    qa, qw, lay, b, ref = _case(3, 256, 32, "mixed", "block", 128, True, 2)
    monkeypatch.setattr(G, "select_config", lambda *a, **k: G.GemmConfig(128, 128, 1, 1, 4, 1, dequant=True))
    d = DEV
    y, acc = G.w4ax_gemm_triton(qa.q4.to(d), qa.q8.to(d), qa.scales.to(d), lay.block_bits.to(d), qw.qweight.to(d),
                                qw.scales.to(d), 128, None, torch.float32, "block", return_int_acc=True)
    assert torch.equal(acc.cpu(), R.w4ax_int_accumulators(qa, qw))
    _close(y, ref)


def test_dequant_path_errors():
    qa, qw, lay, b, _ = _case(3, 256, 32, "mixed", "block", 128, True, 1)
    with pytest.raises(ValueError, match="return_int_acc needs an integer-accumulating path"):
        _run(qa, qw, lay, b, torch.float16, return_int_acc=True)
    with pytest.raises(TypeError, match="dequant must be a bool"):
        G.GemmConfig(128, 128, dequant=1)


# --------------------------------------------------------------------------
# the fused route: quantize + dequantize the activations in one pass (w4ax_linear_dequant)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("m,k,n,pattern,scale_mode,identity", [
    (1, 576, 72, "mixed", "block", False),   # K = 4.5 x 128: a padded last block
    (19, 384, 96, "int8", "block", False),
    (33, 256, 130, "int4", "class", False),
    (8, 512, 64, "mixed", "class", True),    # identity permutation: the contiguous load
])
def test_fused_dequant_linear_is_bit_identical(m, k, n, pattern, scale_mode, identity):
    """``A'`` from ``x`` in one pass (the act-quant kernel's FAKE mode) equals what the dequant
    path makes of the packed activations, bit for bit; so does the whole linear (fp16 and fp32
    out, bias, asymmetric g64 weights), and it stays within the dequant path's tolerance of the
    integer reference."""
    from cometq.kernels.act_quant import fake_quant_act_triton, quantize_act_triton
    from cometq.kernels.act_quant import block_tables
    from cometq.kernels.dequant_gemm import dequant_act_kernel, w4ax_linear_dequant

    g = torch.Generator().manual_seed(m * 7 + k)
    x = (torch.randn(m, k, generator=g) * (1 + 6 * (torch.rand(k, generator=g) > 0.9))).half()
    nb = -(-k // 128)
    bits = {"mixed": [8 if i % 3 == 1 else 4 for i in range(nb)], "int4": [4] * nb, "int8": [8] * nb}[pattern]
    perm = torch.arange(k) if identity else torch.randperm(k, generator=g)
    lay = ActivationLayout(perm, torch.tensor(bits, dtype=torch.int32), 0.93)
    qw = R.quantize_weight_rtn(torch.randn(n, k, generator=g) * 0.05, 64, sym=False)
    bias = torch.randn(n, generator=g).half()
    d = DEV
    xd, pd, bd = x.to(d), lay.perm.to(d), lay.block_bits.to(d)
    q4, q8, sc = quantize_act_triton(xd, pd, bd, lay.n_int8, scale_mode, identity_perm=identity,
                                     int4_clip=lay.int4_clip)
    for dt in (torch.float16, torch.float32):
        want = torch.empty(m, nb * 128, dtype=dt, device=d)
        dequant_act_kernel[(-(-m // 32), nb)](G.nonempty(q4), G.nonempty(q8), sc, *block_tables(bd), want, m,
                                              q4.stride(0) if q4.numel() else 0, q8.stride(0) if q8.numel() else 0,
                                              sc.stride(0), want.stride(0), BLOCK_M=32,
                                              CLASS_MODE=scale_mode == "class", num_warps=4)
        got = fake_quant_act_triton(xd, pd, bd, lay.n_int8, scale_mode, out_dtype=dt, identity_perm=identity,
                                    int4_clip=lay.int4_clip)
        assert got.dtype == dt and torch.equal(got, want), dt
        wargs = (qw.qweight.to(d), qw.scales.to(d), 64, bias.to(d), dt, scale_mode)
        y = w4ax_linear_dequant(xd, pd, bd, lay.n_int8, scale_mode, lay.int4_clip, qw.qweight.to(d), qw.scales.to(d),
                                qw.offsets.to(d), 64, bias.to(d), dt, identity_perm=identity)
        two = G.w4ax_gemm_triton(q4, q8, sc, bd, *wargs, path="dequant", w_offsets=qw.offsets.to(d))
        assert torch.equal(y, two), dt
    qa = R.quantize_activation(x.float(), lay, scale_mode)
    _close(y, R.w4ax_gemm(qa, qw, bias.float()).double())


def test_fused_dequant_errors(monkeypatch):
    from cometq.kernels.act_quant import fake_quant_act_triton

    monkeypatch.setenv("COMETQ_SYNC_CHECKS", "1")  # content checks that sync are opt-in on CUDA

    x = torch.randn(4, 256).to(DEV)
    perm, bits = torch.arange(256).to(DEV), torch.tensor([8, 4], dtype=torch.int32).to(DEV)
    with pytest.raises(TypeError, match="out_dtype must be float16, bfloat16 or float32, got torch.int8"):
        fake_quant_act_triton(x, perm, bits, 1, out_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"n_int8=2 but block_bits holds 1 INT8 blocks"):
        fake_quant_act_triton(x, perm, bits, 2)
    with pytest.raises(ValueError, match=r"perm shape \(255,\) must be \(256,\)"):
        fake_quant_act_triton(x, perm[:255], bits, 1)
    assert fake_quant_act_triton(x[:0], perm, bits, 1).shape == (0, 256)


def test_linear_route_choice(monkeypatch):
    """``ops.w4ax_linear_eager`` at M >= FUSED_DEQUANT_MIN_M: the fused dequant route is a
    candidate beside quantize + GEMM ("split"), first untuned from the 4096 bucket on, and timed
    per case like a backend (a fake device check and timer drive it here); below the threshold,
    or off CUDA, only the split route runs."""
    from cometq import autotune, ops
    from cometq.testing import fake_route_timer, record_linear_routes

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("drives the route choice with a fake device check on CPU tensors: needs the interpreter")
    g = torch.Generator().manual_seed(5)
    k, n = 256, 48
    lay = ActivationLayout(torch.randperm(k, generator=g), torch.tensor([8, 4], dtype=torch.int32))
    qw = R.quantize_weight_rtn(torch.randn(n, k, generator=g) * 0.05, 128, sym=False)
    ran = record_linear_routes(monkeypatch, ops, ("split", "fused"))

    def call(m):
        x = torch.randn(m, k, generator=g)
        return x, ops.w4ax_linear_eager(x, lay.perm, lay.block_bits, lay.n_int8, "block", 1.0, qw.qweight, qw.scales,
                                        qw.offsets, 128, None, torch.float32)

    call(1024)
    assert ran == ["split"]  # on the CPU: never fused
    # the weight-side shapes the fused route indexes unchecked (else the split route runs and names the problem)
    ok = lambda **kw: ops._fused_shapes_ok(**{**dict(block_bits=lay.block_bits, qweight=qw.qweight,  # noqa: E731
                                                     w_scales=qw.scales, w_offsets=qw.offsets, group_size=128), **kw})
    assert ok() and ok(qweight=weights_block_major(qw.qweight))
    assert not ok(group_size=64) and not ok(w_scales=qw.scales[:, :1]) and not ok(w_offsets=qw.offsets[:-1])
    assert not ok(qweight=qw.qweight[:, :64]) and not ok(group_size=96)
    assert ok(group_size=-1, w_scales=qw.scales[:, :1], w_offsets=qw.offsets[:, :1])
    monkeypatch.setattr(ops, "_fused_dequant_applies", lambda *a: True)
    ran.clear()
    call(1023)
    call(2048)  # unmeasured device: the fixed order, split first below the 4096 bucket
    x, y = call(4100)  # ... fused first from it on
    assert ran == ["split", "split", "fused"]
    ref = R.w4ax_gemm(R.quantize_activation(x, lay, "block"), qw).double()
    _close(y, ref)
    # measured: the faster route is kept per case (M bucket, N, K, flags)
    autotune.clear()
    monkeypatch.setattr(autotune, "_measurable", lambda d: True)
    times = {"split": 2.0, "fused": 1.0}
    prev = autotune.set_timer(fake_route_timer(ran, times))
    try:
        ran.clear()
        call(1500)
        assert ran == ["split", "fused", "fused"]  # each timed once, then the fused one runs
        ran.clear()
        call(2000)  # same bucket: the kept choice, no timing
        assert ran == ["fused"]
        (d,) = [d for d in autotune.report() if d["op"] == "w4ax_linear_route"]
        assert d["choice"] == "fused" and d["times_ms"] == times and d["key"]["M"] == 2048
    finally:
        autotune.set_timer(prev)
        autotune.clear()


def test_half_split_blocks_is_the_even_odd_order():
    from cometq.layout import half_split_blocks

    v = torch.arange(3 * 256).reshape(3, 256)
    out = half_split_blocks(v)
    for b in range(2):
        assert torch.equal(out[:, b * 128: b * 128 + 64], v[:, b * 128: b * 128 + 128: 2])
        assert torch.equal(out[:, b * 128 + 64: b * 128 + 128], v[:, b * 128 + 1: b * 128 + 128: 2])
    assert half_split_blocks(v[0]).shape == (256,) and out.is_contiguous()
    assert half_split_blocks(v[:0]).shape == (0, 256)
    with pytest.raises(ValueError, match=r"multiple of 128, got shape \(3, 200\)"):
        half_split_blocks(torch.zeros(3, 200))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        half_split_blocks([1, 2])


@pytest.mark.parametrize("m,k,pattern,scale_mode,clip", [
    (1, 576, "mixed", "block", 1.0),    # K = 4.5 x 128: the padded last block
    (17, 384, "int8", "class", 0.9),
    (5, 256, "int4", "block", 0.8),
])
def test_fake_quant_act_op_backends_bit_identical(m, k, pattern, scale_mode, clip):
    """``ops.fake_quant_act`` (the 16-bit routes' activation operand): the reference is the
    packed reference quantizer's blocks dequantized into the half-split order (fp32 product,
    rounded once), and the Triton backend's FAKE kernel gives the same bits; opcheck on the op."""
    from cometq import ops
    from cometq.layout import half_split_blocks

    g = torch.Generator().manual_seed(m * 31 + k)
    x = (torch.randn(m, k, generator=g) * (1 + 6 * (torch.rand(k, generator=g) > 0.9))).half()
    x[0, :7] = 0.0
    nb = -(-k // 128)
    bits = {"mixed": [8 if i % 3 == 1 else 4 for i in range(nb)], "int4": [4] * nb, "int8": [8] * nb}[pattern]
    lay = ActivationLayout(torch.randperm(k, generator=g), torch.tensor(bits, dtype=torch.int32), clip)
    qa = R.quantize_activation(x, lay, scale_mode)
    want32 = half_split_blocks(qa.int_blocks().float() * qa.block_scales().repeat_interleave(128, dim=1))
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        ref = ops.fake_quant_act(x, lay.perm, lay.block_bits, lay.n_int8, scale_mode, dt, backend="reference",
                                 int4_clip=clip)
        assert ref.dtype == dt and ref.shape == (m, nb * 128) and torch.equal(ref, want32.to(dt)), dt
        if dt == torch.bfloat16 and DEV == "cpu":
            continue  # (the Triton interpreter rounds fp32 -> bf16 toward zero; the GPU rounds to nearest)
        d = DEV
        got = ops.fake_quant_act(x.to(d), lay.perm.to(d), lay.block_bits.to(d), lay.n_int8, scale_mode, dt,
                                 backend="triton", int4_clip=clip)
        assert torch.equal(got.cpu(), ref), dt
    torch.library.opcheck(torch.ops.cometq.fake_quant_act.default,
                          (x, lay.perm, lay.block_bits, lay.n_int8, scale_mode, clip, 0, "reference"))
    for be in ("reference", "triton"):  # no rows: an empty [0, K_pad] operand
        d = DEV if be == "triton" else "cpu"
        empty = ops.fake_quant_act(x[:0].to(d), lay.perm.to(d), lay.block_bits.to(d), lay.n_int8, scale_mode,
                                   backend=be, int4_clip=clip)
        assert empty.shape == (0, nb * 128) and empty.dtype == torch.float16
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        ops.fake_quant_act(x, lay.perm, lay.block_bits, lay.n_int8, scale_mode, torch.int8)
    with pytest.raises(RuntimeError, match=r"perm shape \(3,\) must be"):
        ops.fake_quant_act(x, lay.perm[:3], lay.block_bits, lay.n_int8, scale_mode, backend="reference")


def test_16bit_routes_take_the_activation_operand_from_the_op(monkeypatch):
    """The fused and w16 routes of ``ops.w4ax_linear_eager`` get ``A'`` through the
    ``fake_quant_act`` dispatch (so the CUDA kernel can serve it where it measures faster), with
    the caller's backend request, then run their GEMM on it: same result as the Triton-only
    ``w4ax_linear_dequant``."""
    from cometq import ops
    from cometq.kernels.dequant_gemm import w4ax_linear_dequant

    if os.environ.get("TRITON_INTERPRET") != "1" and DEV == "cpu":
        pytest.skip("the Triton GEMM runs on CPU only under the interpreter")
    g = torch.Generator().manual_seed(11)
    m, k, n = 6, 384, 40
    lay = ActivationLayout(torch.randperm(k, generator=g), torch.tensor([4, 8, 4], dtype=torch.int32))
    qw = R.quantize_weight_rtn(torch.randn(n, k, generator=g) * 0.05, 128, sym=False)
    x = torch.randn(m, k, generator=g).to(DEV)
    seen = []
    real = ops._IMPLS["fake_quant_act"]["triton"]
    monkeypatch.setitem(ops._IMPLS["fake_quant_act"], "triton", lambda *a: (seen.append(a[-1]), real(*a))[1])
    args = (x, lay.perm.to(DEV), lay.block_bits.to(DEV), lay.n_int8, "block", 1.0, qw.qweight.to(DEV),
            qw.scales.to(DEV), qw.offsets.to(DEV), 128, None, torch.float32, "triton")
    y = ops._LINEAR_ROUTES["fused"](*args)
    assert seen == [torch.float32]
    want = w4ax_linear_dequant(*args[:9], 128, None, torch.float32)
    assert torch.equal(y, want)
