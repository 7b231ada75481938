"""The large-M FP8 route (kernels/fp8_gemm.py): the FP8 block form of the W4Ax operands.

CPU: the reference form against the W4Ax reference GEMM (exact arithmetic), the Triton operand
kernels under TRITON_INTERPRET=1 against the reference bytes (bit for bit), the refusals.  GPU
(``-m gpu``): cuBLAS's block-scaled FP8 GEMM on those operands, and the route through cometq.ops.
"""
import pytest
import torch
import triton
import triton.language as tl

from cometq import reference as R
from cometq.layout import FP8_INT_MAX, FP8_INT_MIN, ActivationLayout, fp8_block_sources, fp8_e4m3_int_codes, \
    padded_k, weights_block_major

import cometq.kernels.fp8_gemm as F8  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
#: the FP8 route vs the integer-exact reference, relative to max |y|, per output dtype: the block
#: sums are exact, the scaled sum runs in fp32, then one rounding to the output dtype
FP8_GEMM_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}
PATTERNS = {"mixed": lambda nb: [8 if i % 3 == 0 else 4 for i in range(nb)], "int4": lambda nb: [4] * nb,
            "int8": lambda nb: [8] * nb, "alternating": lambda nb: [8 if i % 2 else 4 for i in range(nb)]}


def _case(m, k, n, pattern, scale_mode, group, seed, sym=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (1 + 30 * (torch.rand(k, generator=g) > 0.95))  # outlier channels
    w = torch.randn(n, k, generator=g) * 0.05
    nb = -(-k // 128)
    lay = ActivationLayout(torch.randperm(k, generator=g), torch.tensor(PATTERNS[pattern](nb), dtype=torch.int32))
    return R.quantize_activation(x, lay, scale_mode), R.quantize_weight_rtn(w, group, sym=sym), lay


@triton.jit
def _codes_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    v = tl.load(v_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + i, F8.e4m3_int_code(v), mask=i < n)


def test_e4m3_codes():
    codes = fp8_e4m3_int_codes()
    ints = torch.arange(FP8_INT_MIN, FP8_INT_MAX + 1)
    assert codes.dtype == torch.uint8 and codes.numel() == ints.numel()
    assert torch.equal(codes.view(torch.float8_e4m3fn).float(), ints.float())  # every integer exact
    # the kernels' arithmetic encoder agrees with torch's conversion on every integer it is given
    v = ints.to(torch.int32).to(DEV)
    got = torch.empty(v.numel(), dtype=torch.uint8, device=DEV)
    _codes_kernel[(1,)](v, got, v.numel(), BLOCK=32)
    assert torch.equal(got.cpu(), codes)


def test_block_sources():
    bits = torch.tensor([8, 4, 4, 8, 4], dtype=torch.int32)
    assert fp8_block_sources(bits).tolist() == [0, 1, 2, 3, 4, 0, 3]
    assert fp8_block_sources(torch.tensor([4, 4], dtype=torch.int32)).tolist() == [0, 1]


@pytest.mark.parametrize("m,k,n", [(1, 576, 40), (17, 512, 96), (6, 1000, 130)])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("scale_mode", ["block", "class"])
@pytest.mark.parametrize("group,sym", [(128, True), (256, True), (-1, True), (128, False), (-1, False)])
def test_reference_form_is_the_w4ax_gemm(m, k, n, pattern, scale_mode, group, sym):
    if group == 256 and padded_k(k) % 256:
        group = 384 if padded_k(k) % 384 == 0 else 128  # a multiple of 128 dividing K_pad (576 -> 640: 128)
    qa, qw, _ = _case(m, k, n, pattern, scale_mode, group, m + k + n + group, sym=sym)
    a8, sa, w8, sb = R.fp8_block_operands(qa, qw)
    n8 = int((qa.layout.block_bits == 8).sum())
    nbp = qa.layout.n_blocks + n8
    assert a8.shape == (m, nbp * 128) and w8.shape == (n, nbp * 128) and sa.shape == (nbp, m) and sb.shape == (nbp, n)
    # every byte is an integer of the form: INT4 / hi digits in [-8, 7], lo digits in [0, 15]
    a = a8.view(torch.float8_e4m3fn).float().view(m, nbp, 128)
    assert a.min() >= -8 and a.max() <= 15 and torch.equal(a, a.round())
    assert (a[:, qa.layout.n_blocks:] >= 0).all()
    want = R.w4ax_gemm(qa, qw, out_dtype=torch.float64)
    got = R.fp8_block_mm(a8, sa, w8, sb, *(() if sym else R.fp8_offset_operands(qa, qw)))
    # exact arithmetic on exact operands; the offset term's xs is rounded to fp32 once (2^-24 each)
    assert float((got - want).abs().max()) <= (1e-12 if sym else 1e-6) * float(want.abs().max())
    if not sym:  # the offset term is not optional: without it the result is wrong
        assert float((R.fp8_block_mm(a8, sa, w8, sb) - want).abs().max()) > 1e-3 * float(want.abs().max())


def test_reference_form_refusals():
    qa, qw, _ = _case(3, 256, 16, "mixed", "block", 128, 0)
    assert R.fp8_block_applies(qw) is None
    with pytest.raises(ValueError, match="symmetric weights have no offset term"):
        R.fp8_offset_operands(qa, qw)
    qa, qw, _ = _case(3, 256, 16, "mixed", "block", 64, 0)
    with pytest.raises(ValueError, match=r"weight group 64 \(not a multiple of 128\)"):
        R.fp8_block_operands(qa, qw)
    with pytest.raises(ValueError, match="group=64"):
        F8.fp8_weight_operand(qw.qweight, qw.scales, qa.layout.block_bits, 64)
    a8, sa, w8, sb = R.fp8_block_operands(*_case(3, 256, 16, "mixed", "block", 128, 0)[:2])
    with pytest.raises(ValueError, match=r"are not \[M, 128 nb'\]"):
        R.fp8_block_mm(a8, sa, w8[:, :128], sb)


@pytest.mark.parametrize("m,k,n", [(1, 576, 40), (37, 512, 70)])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("scale_mode", ["block", "class"])
def test_operand_kernels_match_the_reference_bytes(m, k, n, pattern, scale_mode):
    group = 256 if padded_k(k) % 256 == 0 else 128
    qa, qw, lay = _case(m, k, n, pattern, scale_mode, group, 3 * m + n, sym=False)
    want = R.fp8_block_operands(qa, qw)
    d = DEV
    args = (qa.q4.to(d), qa.q8.to(d), qa.scales.to(d), lay.block_bits.to(d), scale_mode)
    a8, sa, xs = F8.fp8_act_operand(*args)
    assert torch.equal(a8.cpu(), want[0]) and torch.equal(sa.cpu(), want[1]) and xs is None
    a8, sa, xs = F8.fp8_act_operand(*args, offset_term=True)  # + the offset term's activation side
    assert torch.equal(a8.cpu(), want[0]) and torch.equal(sa.cpu(), want[1])
    assert torch.equal(xs.cpu(), R.fp8_offset_operands(qa, qw)[0])
    a8, sa, _ = F8.fp8_act_operand(*args, pad_rows_to=4)  # rows up to a multiple of 4: zeros
    mp = -(-m // 4) * 4
    assert a8.shape[0] == mp and sa.shape[1] == mp and sa.is_contiguous()
    assert torch.equal(a8[:m].cpu(), want[0]) and torch.equal(sa[:, :m].cpu(), want[1])
    assert not a8[m:].any() and not sa[:, m:].any()
    for qweight in (qw.qweight, weights_block_major(qw.qweight)):  # row-major and block-major storage
        w8, sb = F8.fp8_weight_operand(qweight.to(d), qw.scales.to(d), lay.block_bits.to(d), group)
        assert torch.equal(w8.cpu(), want[2]) and torch.equal(sb.cpu(), want[3])


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_offset_term_epilogue(dt, bias):
    """``fp8_epilogue`` with the offset term: ``y += xs @ ob^T (+ bias)`` in place, in fp32, one rounding."""
    qa, qw, _ = _case(70, 384, 72, "mixed", "block", 128, 11, sym=False)
    xs, ob = R.fp8_offset_operands(qa, qw)
    g = torch.Generator().manual_seed(5)
    y0 = (torch.randn(70, 72, generator=g) * 4).to(dt)
    b = torch.randn(72, generator=g) if bias else None
    want = y0.double() + xs.double() @ ob.double().t() + (b.double() if bias else 0)
    y = y0.to(DEV)
    out = F8.fp8_epilogue(y, dt, xs.to(DEV), qw.offsets.to(DEV), 128, None if b is None else b.to(DEV))
    assert out.data_ptr() == y.data_ptr() and out.dtype == dt  # in place
    err = float((out.double().cpu() - want).abs().max())
    assert err <= FP8_GEMM_RTOL[dt] * float(want.abs().max()), err


@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_epilogue_converts_a_bf16_gemm_output_to_fp16(offsets, bias):
    """Where cuBLAS has no fp16 output for the block-scaled GEMM, fp16 outputs come from a bf16 one:
    the epilogue reads it and writes a new fp16 tensor (+ offset term, + bias) with one rounding; the
    bf16 input is left as it was.  A conversion alone (no offsets, no bias) is the same pass."""
    qa, qw, _ = _case(33, 384, 48, "mixed", "block", 128, 17, sym=False)
    xs, ob = R.fp8_offset_operands(qa, qw)
    g = torch.Generator().manual_seed(6)
    y0 = (torch.randn(33, 48, generator=g) * 4).to(torch.bfloat16)
    b = torch.randn(48, generator=g) if bias else None
    want = y0.double() + (xs.double() @ ob.double().t() if offsets else 0) + (b.double() if bias else 0)
    y = y0.to(DEV)
    out = F8.fp8_epilogue(y, torch.float16, xs.to(DEV) if offsets else None, qw.offsets.to(DEV) if offsets else None,
                          128, None if b is None else b.to(DEV))
    assert out.dtype == torch.float16 and out.data_ptr() != y.data_ptr() and torch.equal(y.cpu(), y0)
    err = float((out.double().cpu() - want).abs().max())
    assert err <= FP8_GEMM_RTOL[torch.float16] * float(want.abs().max()), err
    with pytest.raises(ValueError, match="xs and w_offsets come together"):
        F8.fp8_epilogue(y, torch.float16, xs.to(DEV), None)


@pytest.mark.parametrize("m", [1, 37])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("via_bf16", [False, True])
def test_gemm_glue_with_the_gemm_emulated(m, sym, via_bf16, monkeypatch):
    """``w4ax_gemm_fp8`` around the cuBLAS call (stood in for by its float64 emulation): rows padded
    to a multiple of 4 and sliced off, the offset term and the bias on the sliced view; where the
    device's GEMM cannot write fp16 (``via_bf16``), it is asked for bf16 and the epilogue converts."""
    seen = []

    def emulated(a8, sa, w8, sb, dt):
        seen.append((a8.shape[0], sa.shape[1], dt))
        return R.fp8_block_mm(a8, sa, w8, sb).to(dt)

    monkeypatch.setattr(F8, "scaled_mm_block", emulated)
    monkeypatch.setattr(F8, "fp8_gemm_out_dtype", lambda dev, dt: torch.bfloat16 if via_bf16 else dt)
    qa, qw, lay = _case(m, 384, 48, "mixed", "block", 128, m, sym=sym)
    b = torch.randn(48)
    want = R.w4ax_gemm(qa, qw, b, out_dtype=torch.float64)
    d = DEV
    y = F8.w4ax_gemm_fp8(qa.q4.to(d), qa.q8.to(d), qa.scales.to(d), lay.block_bits.to(d), qw.qweight.to(d),
                         qw.scales.to(d), 128, b.to(d), torch.float16, "block",
                         w_offsets=None if sym else qw.offsets.to(d))
    mp = -(-m // 4) * 4
    gemm_dt = torch.bfloat16 if via_bf16 else torch.float16
    assert seen == [(mp, mp, gemm_dt)] and y.shape == (m, 48) and y.dtype == torch.float16
    err = float((y.double().cpu() - want).abs().max())
    assert err <= FP8_GEMM_RTOL[gemm_dt] * float(want.abs().max()), err


def test_probe_keeps_the_call_convention_that_computes_the_right_thing(monkeypatch):
    """The probe tries each way torch spells the 1x128 x 1x128 call and keeps the first whose
    result matches the float64 emulation (stand-ins here: one raises, one swaps the roles of the
    two scales' rows -- what a mis-read stride does -- one is right)."""
    def right(a, b, sa, sb, dt):
        return R.fp8_block_mm(a.view(torch.uint8), sa, b.t().view(torch.uint8), sb).to(dt)

    def wrong(a, b, sa, sb, dt):  # every block's scales reversed: close in size, wrong in place
        return R.fp8_block_mm(a.view(torch.uint8), sa.flip(0).contiguous(), b.t().view(torch.uint8),
                              sb.flip(0).contiguous()).to(dt)

    def raises(*a):
        raise RuntimeError("Invalid scaling configuration")

    monkeypatch.setattr(F8, "_CALLS", {"v2": raises, "v1-kn": wrong, "v1-nk": right})
    monkeypatch.setattr(F8, "_CALL_OF", {})
    monkeypatch.setattr(F8, "_FP16_VIA_BF16", {})
    assert F8._probe("cpu") is None and F8._CALL_OF == {torch.device("cpu"): "v1-nk"}
    assert F8._FP16_VIA_BF16 == {0: None}  # the kept spelling writes fp16 too
    assert F8.fp8_gemm_out_dtype(torch.device("cuda", 0), torch.float16) == torch.float16

    def right_but_no_fp16(a, b, sa, sb, dt):
        if dt == torch.float16:
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
        return right(a, b, sa, sb, dt)

    monkeypatch.setattr(F8, "_CALLS", {"v2": right_but_no_fp16})
    monkeypatch.setattr(F8, "_CALL_OF", {})
    assert F8._probe("cpu") is None and "CUBLAS_STATUS_NOT_SUPPORTED" in F8._FP16_VIA_BF16[0]
    assert F8.fp8_gemm_out_dtype(torch.device("cuda", 0), torch.float16) == torch.bfloat16  # fp16 via bf16
    assert F8.fp8_gemm_out_dtype(torch.device("cuda", 0), torch.bfloat16) == torch.bfloat16
    assert F8.fp8_gemm_out_dtype("cpu", torch.float16) == torch.float16
    monkeypatch.setattr(F8, "_CALLS", {"v2": raises, "v1-kn": wrong})
    monkeypatch.setattr(F8, "_CALL_OF", {})
    why = F8._probe("cpu")
    assert why.startswith("block-scaled FP8 GEMM unusable: v2: RuntimeError: Invalid scaling configuration; "
                          "v1-kn: disagrees with the emulation") and F8._CALL_OF == {}, why


def test_recipe_1x128_under_either_enum_spelling(monkeypatch):
    """The v2 call names the 1x128 recipe by torch's enum, whose member names changed between
    versions (``Blockwise_1x128`` in the earlier Python enum, ``BlockWise1x128`` in the C enum of
    torch 2.11 / 2.13); both resolve, to the value torch's ``_scaled_mm_v2`` takes for it (4)."""
    import enum

    import torch.nn.functional as F

    got = F8._recipe_1x128()
    assert got.value == 4 and "1x128" in got.name, got
    old = enum.Enum("ScalingType", {"Tensorwise": 0, "Rowwise": 1, "Blockwise_1x16": 2, "Blockwise_1x32": 3,
                                    "Blockwise_1x128": 4, "Blockwise_128x128": 5})
    monkeypatch.setattr(F, "ScalingType", old)
    assert F8._recipe_1x128() is old.Blockwise_1x128
    monkeypatch.setattr(F, "ScalingType", enum.Enum("ScalingType", {"Tensorwise": 0, "Rowwise": 1}))
    with pytest.raises(AttributeError, match="no 1x128 block recipe"):
        F8._recipe_1x128()


@pytest.mark.parametrize("name", ["v2", "v1-kn"])
def test_call_spellings_pass_torchs_own_shape_checks(name, monkeypatch):
    """The v2 and v1-kn spellings hand torch the scale views its 1x128 x 1x128 recipe asks for
    (``[rows, K'/128]``, strides ``(1, rows)``): run on meta tensors, torch's meta registrations
    (the same shape / stride rules as its CUDA kernels) accept them and give ``[M, N]``."""
    import torch.nn.functional as F

    if name == "v2" and not hasattr(F, "scaled_mm"):
        pytest.skip("this torch has no torch.nn.functional.scaled_mm")
    m, n, nbp = 68, 48, 3
    a8 = torch.empty(m, nbp * 128, dtype=torch.uint8, device="meta")
    w8 = torch.empty(n, nbp * 128, dtype=torch.uint8, device="meta")
    sa, sb = torch.empty(nbp, m, device="meta"), torch.empty(nbp, n, device="meta")
    monkeypatch.setattr(F8, "_CALL_OF", {a8.device: name})
    y = F8.scaled_mm_block(a8, sa, w8, sb, torch.float16)
    assert y.shape == (m, n) and y.dtype == torch.float16
    with pytest.raises(RuntimeError):  # and reject a transposed scale: the check is real
        F8.scaled_mm_block(a8, torch.empty(m, nbp, device="meta"), w8, sb, torch.float16)


def test_route_availability_on_this_machine(monkeypatch):
    monkeypatch.setenv(F8.FP8_ROUTE_ENV, "0")
    assert F8.fp8_route_unavailable("cpu") == "COMETQ_FP8_ROUTE=0"
    monkeypatch.delenv(F8.FP8_ROUTE_ENV)
    assert "not a CUDA GPU" in F8.fp8_route_unavailable("cpu")


def test_fp8_route_choice(monkeypatch):
    """``ops.w4ax_linear_eager`` at M >= 1024: the fp8 route joins split / fused only where it
    applies (symmetric weights, groups of whole blocks, N % 16 == 0, a GPU whose block-scaled
    GEMM passed its probe) and after its output agreed with split's; the tuner keeps it where it
    times fastest, and a disagreeing one is never used.  CPU stand-ins: the device checks, the
    timer and cuBLAS's GEMM (its float64 emulation, :func:`cometq.reference.fp8_block_mm`); the
    operand kernels are the real ones (interpreter)."""
    import os

    from cometq import autotune, ops
    from cometq.testing import fake_route_timer, record_linear_routes

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("drives the route choice with fake device checks on CPU tensors: needs the interpreter")
    monkeypatch.setattr(F8, "scaled_mm_block", lambda a8, sa, w8, sb, dt: R.fp8_block_mm(a8, sa, w8, sb).to(dt))
    monkeypatch.setattr(F8, "fp8_route_unavailable", lambda d: None)
    monkeypatch.setattr(ops, "_fused_dequant_applies", lambda *a: True)
    monkeypatch.setattr(autotune, "_measurable", lambda d: True)
    monkeypatch.setattr(ops, "_ROUTE_AGREES", {})
    ran = record_linear_routes(monkeypatch, ops, ("split", "fused", "fp8"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 256, generator=g)

    def call(qw, group=128):
        lay = _case(1, 256, 16, "mixed", "block", 128, 4)[2]
        return ops.w4ax_linear_eager(x, lay.perm, lay.block_bits, lay.n_int8, "block", 1.0, qw.qweight, qw.scales,
                                     qw.offsets, group, None, out_dtype), lay

    w = torch.randn(48, 256, generator=g) * 0.05
    out_dtype = torch.float16
    autotune.clear()
    prev = autotune.set_timer(fake_route_timer(ran, {"split": 2.0, "fused": 3.0, "fp8": 1.0}), "eager")
    try:
        qw = R.quantize_weight_rtn(w, 128)
        y, lay = call(qw)
        # checked against split once, the three timed, then fp8 runs
        assert ran == ["split", "fp8", "split", "fused", "fp8", "fp8"], ran
        want = R.w4ax_gemm(R.quantize_activation(x, lay, "block"), qw, out_dtype=torch.float64)
        assert y.dtype == out_dtype
        assert float((y.double() - want).abs().max()) <= FP8_GEMM_RTOL[out_dtype] * float(want.abs().max())
        out_dtype = torch.float32  # an fp32 output: not a candidate (torch's FP8 GEMMs: fp16 / bf16 out)
        ran.clear()
        autotune.clear()
        call(qw)
        assert "fp8" not in ran, ran
        out_dtype = torch.float16
        for bad in (R.quantize_weight_rtn(w, 64), R.quantize_weight_rtn(w[:40], 128)):  # group 64, N = 40
            ran.clear()
            autotune.clear()
            call(bad, 64 if bad.group_size == 64 else 128)
            assert "fp8" not in ran, (bad.group_size, ran)
        # asymmetric weights: a candidate too (the offset term after the GEMM)
        ran.clear()
        autotune.clear()
        qa_w = R.quantize_weight_rtn(w, 128, sym=False)
        y, lay = call(qa_w)
        assert ran == ["split", "fp8", "split", "fused", "fp8", "fp8"], ran
        want = R.w4ax_gemm(R.quantize_activation(x, lay, "block"), qa_w, out_dtype=torch.float64)
        assert float((y.double() - want).abs().max()) <= FP8_GEMM_RTOL[out_dtype] * float(want.abs().max())
        # between the w16 route's rows and the large-M ones: split and fp8 only
        ran.clear()
        autotune.clear()
        x_mid = x[:300]
        ops.w4ax_linear_eager(x_mid, lay.perm, lay.block_bits, lay.n_int8, "block", 1.0, qw.qweight, qw.scales, None,
                              128, None, out_dtype)
        assert ran == ["split", "fp8", "split", "fp8", "fp8"], ran
        # a route that disagrees (1 % off) is checked once, warned about and never timed
        real = ops._LINEAR_ROUTES["fp8"]
        monkeypatch.setitem(ops._LINEAR_ROUTES, "fp8", lambda *a: real(*a) * 1.01)
        monkeypatch.setattr(ops, "_ROUTE_AGREES", {})
        autotune.clear()
        ran.clear()
        with pytest.warns(RuntimeWarning, match=r"the fp8 route disagrees with quantize \+ GEMM .*M=1024, N=48"):
            call(qw)
        assert ran == ["split", "fp8", "split", "fused", "split"], ran  # the check ran it; never timed
    finally:
        autotune.set_timer(prev, "eager")
        autotune.clear()


# ---------------------------------------------------------------------------------------------
# GPU: cuBLAS's block-scaled FP8 GEMM
# ---------------------------------------------------------------------------------------------
def _need_route():  # (GPU tests: the probe's reason when the route cannot run here)
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    why = F8.fp8_route_unavailable("cuda")
    if why is not None:
        pytest.skip(f"fp8 route unavailable: {why}")


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(1025, 576, 256), (1100, 1024, 2048)])  # (the float64 reference runs on the CPU)
@pytest.mark.parametrize("pattern", ["mixed", "int4", "int8"])
@pytest.mark.parametrize("sym", [True, False])
def test_fp8_gemm_matches_reference(m, k, n, pattern, sym):
    _need_route()
    qa, qw, lay = _case(m, k, n, pattern, "block", 128, m + k, sym=sym)
    b = torch.randn(n)
    want = R.w4ax_gemm(qa, qw, b, out_dtype=torch.float64)
    for dt in (torch.float16, torch.bfloat16):  # (the route's outputs; fp32: not a candidate)
        y = F8.w4ax_gemm_fp8(qa.q4.cuda(), qa.q8.cuda(), qa.scales.cuda(), lay.block_bits.cuda(), qw.qweight.cuda(),
                             qw.scales.cuda(), 128, b.cuda(), dt, "block",
                             w_offsets=None if sym else qw.offsets.cuda())
        assert y.dtype == dt and y.shape == (m, n)
        err = float((y.double().cpu() - want).abs().max())
        tol_dt = F8.fp8_gemm_out_dtype(y.device, dt)  # (bf16 where the GEMM cannot write fp16)
        assert err <= FP8_GEMM_RTOL[tol_dt] * float(want.abs().max()), (dt, err)


@pytest.mark.gpu
def test_fp8_route_through_ops():
    """The route as the large-M tuner runs it (quantize_act + FP8 block form + cuBLAS), on a
    calibrated-looking layer; it must agree with the integer route within its tolerance."""
    _need_route()
    from cometq import ops

    qa, qw, lay = _case(1024, 1024, 512, "mixed", "block", 128, 5)
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1)).half().cuda()
    args = (x, lay.perm.cuda(), lay.block_bits.cuda(), lay.n_int8, "block", 1.0, qw.qweight.cuda(),
            qw.scales.cuda(), None, 128, None, torch.float16, None)
    ref = ops._LINEAR_ROUTES["split"](*args).float()
    got = ops._LINEAR_ROUTES["fp8"](*args).float()
    rtol = 2e-3 if F8.fp8_gemm_out_dtype(x.device, torch.float16) == torch.float16 else 8e-3  # (fp16 via bf16)
    assert float((got - ref).abs().max()) <= rtol * float(ref.abs().max())

