"""Reference ops (cometq.reference): the numerical spec the kernels are held to."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cometq import layout as L
from cometq import reference as R
from cometq.testing import rand_activation, rand_weight

GROUPS = [-1, 128, 64, 32]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n, k", [(1, 576), (200, 128), (37, 300)])
def test_weight_rtn_error_within_half_step(n, k, group):
    w = rand_weight(n, k, generator=_gen(n * k))
    qw = R.quantize_weight_rtn(w, group)
    assert qw.qweight.shape == (n, L.padded_k(k) // 2) and qw.qweight.dtype == torch.uint8
    err = (R.dequantize_weight(qw) - w).abs()
    step = R.weight_scales_per_column(qw)[:, :k]
    assert bool((err <= step / 2 * (1 + 1e-6) + 1e-12).all())
    q = L.unpack_int4(qw.qweight)
    assert int(q.abs().max()) == L.INT4_QMAX  # the absmax element lands on +-7
    assert not q[:, k:].any()  # padding columns are zero


def test_weight_per_channel_scale_shape_and_padding_ignored():
    w = rand_weight(5, 576, generator=_gen(3))
    qw = R.quantize_weight_rtn(w, None)
    assert qw.scales.shape == (5, 1)
    assert torch.allclose(qw.scales[:, 0], w.abs().amax(1) / 7)


def test_weight_clip_ratio_and_zero_rows():
    w = rand_weight(4, 128, generator=_gen(4))
    w[1] = 0
    qw = R.quantize_weight_rtn(w, 128, clip_ratio=0.5)
    assert qw.scales[1, 0] == 0 and not L.unpack_int4(qw.qweight)[1].any()
    assert int(L.unpack_int4(qw.qweight).abs().max()) == 7


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(w=torch.randn(3, 128, dtype=torch.float64)), TypeError, "float64"),
        (dict(w=torch.randn(128)), ValueError, "2-D"),
        (dict(w=torch.randn(3, 576), group_size=256), ValueError, "group_size=256 is not supported for K_pad=640"),
        (dict(w=torch.randn(3, 128), group_size=48), ValueError, "group_size=48"),
        (dict(w=torch.randn(3, 128), clip_ratio=1.5), ValueError, "clip_ratio must be in \\(0, 1\\], got 1.5"),
    ],
)
def test_weight_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        R.quantize_weight_rtn(**kwargs)


def test_quantized_weight_validates_shapes():
    qw = R.quantize_weight_rtn(torch.randn(4, 256), 128)
    with pytest.raises(ValueError, match="scales shape \\(4, 1\\) != expected \\(4, 2\\)"):
        R.QuantizedWeight(qw.qweight, qw.scales[:, :1], 256, 128)
    with pytest.raises(ValueError, match="does not hold K_pad=384"):
        R.QuantizedWeight(qw.qweight, qw.scales, 300, 128)


# ---------------------------------------------------------------- activations
def _layout(k, pattern, seed=0):
    nb = L.num_blocks(k)
    if pattern == "all4":
        bits = [4] * nb
    elif pattern == "all8":
        bits = [8] * nb
    elif pattern == "alternating":
        bits = [8 if i % 2 == 0 else 4 for i in range(nb)]
    else:  # "mixed": first quarter (at least one) INT8, calibration style
        n8 = max(1, nb // 4)
        bits = [8] * n8 + [4] * (nb - n8)
    perm = torch.randperm(k, generator=_gen(seed))
    return L.ActivationLayout(perm, torch.tensor(bits, dtype=torch.int32))


PATTERNS = ["all4", "all8", "mixed", "alternating"]


@pytest.mark.parametrize("mode", L.SCALE_MODES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("m, k", [(1, 576), (3, 128), (17, 300)])
def test_activation_quant_error_within_half_step(m, k, pattern, mode):
    x = rand_activation(m, k, outliers=3, generator=_gen(m + k))
    lay = _layout(k, pattern, seed=k)
    qa = R.quantize_activation(x, lay, mode)
    assert qa.q4.shape == (m, lay.n_int4 * 64) and qa.q8.shape == (m, lay.n_int8 * 128)
    xd = R.dequantize_activation(qa, original_order=True)
    step = qa.block_scales().repeat_interleave(128, 1)[:, :k]  # in permuted order
    err = (xd[:, lay.perm] - x[:, lay.perm]).abs()
    assert bool((err <= step / 2 * (1 + 1e-6) + 1e-12).all())
    # padded channels stay zero and each block's absmax lands on its qmax (block mode)
    xi = qa.int_blocks().view(m, lay.n_blocks, 128)
    assert not xi.view(m, -1)[:, k:].any()
    if mode == "block":
        qmax = torch.where(lay.block_bits == 8, 127, 7)
        assert torch.equal(xi.abs().amax(-1).long(), qmax.expand(m, -1).long())


def test_activation_class_mode_shares_one_scale_per_class():
    x = rand_activation(4, 640, outliers=5, generator=_gen(9))
    lay = _layout(640, "alternating")
    qa = R.quantize_activation(x, lay, "class")
    assert qa.scales.shape == (4, 2)
    xp = x[:, lay.perm].view(4, 5, 128)
    assert torch.allclose(qa.scales[:, 1], xp[:, [0, 2, 4]].abs().amax((1, 2)) / 127)
    assert torch.allclose(qa.scales[:, 0], xp[:, [1, 3]].abs().amax((1, 2)) / 7)


def test_activation_zero_rows_give_zero_scale():
    x = rand_activation(3, 256, generator=_gen(2))
    x[1] = 0
    qa = R.quantize_activation(x, L.ActivationLayout.identity(256), "block")
    assert not qa.scales[1].any() and not qa.int_blocks()[1].any()
    assert torch.isfinite(R.dequantize_activation(qa)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_activation_half_inputs(dtype):
    x = rand_activation(5, 200, dtype=dtype, generator=_gen(5))
    lay = _layout(200, "mixed")
    a = R.quantize_activation(x, lay)
    b = R.quantize_activation(x.float(), lay)
    assert torch.equal(a.q4, b.q4) and torch.equal(a.q8, b.q8) and torch.equal(a.scales, b.scales)


def test_activation_errors():
    lay = L.ActivationLayout.identity(128)
    with pytest.raises(ValueError, match=r"x has K=130 channels \(shape \(2, 130\)\) but the layout has K=128"):
        R.quantize_activation(torch.randn(2, 130), lay)
    with pytest.raises(TypeError, match="int64"):
        R.quantize_activation(torch.ones(2, 128, dtype=torch.int64), lay)
    with pytest.raises(ValueError, match="scale_mode must be one of"):
        R.quantize_activation(torch.randn(2, 128), lay, "tensor")
    with pytest.raises(TypeError, match="layout must be an ActivationLayout"):
        R.quantize_activation(torch.randn(2, 128), "identity")
    with pytest.raises(ValueError, match="2-D"):
        R.quantize_activation(torch.randn(128), lay)


# ---------------------------------------------------------------- GEMM
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("mode", L.SCALE_MODES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gemm_integer_part_equals_int64_matmul(pattern, mode, group):
    m, n, k = 3, 40, 576
    x = rand_activation(m, k, outliers=4, generator=_gen(11))
    lay = _layout(k, pattern, seed=3)
    qa = R.quantize_activation(x, lay, mode)
    qw = R.quantize_weight_rtn(lay.permute_columns(rand_weight(n, k, generator=_gen(12))), group)
    acc = R.w4ax_int_accumulators(qa, qw)
    seg = min(128, qw.group_width)
    xi = qa.int_blocks().long().view(m, -1, seg)
    wi = L.unpack_int4(qw.qweight).long().view(n, -1, seg)
    expect = torch.einsum("msk,nsk->mns", xi, wi)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), expect)
    # and the float output is exactly the scaled sum of those integers
    a_sc, w_sc = R.w4ax_segment_scales(qa, qw)
    y = (expect.double() * a_sc.double()[:, None, :] * w_sc.double()[None, :, :]).sum(-1)
    assert torch.allclose(R.w4ax_gemm(qa, qw), y.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n, k", [(200, 576), (64, 128), (31, 1000)])
def test_gemm_equals_dequantized_matmul(m, n, k):
    x = rand_activation(m, k, outliers=2, generator=_gen(m * n))
    w = rand_weight(n, k, generator=_gen(k))
    lay = _layout(k, "mixed", seed=m)
    qa = R.quantize_activation(x, lay, "block")
    qw = R.quantize_weight_rtn(lay.permute_columns(w), 64)
    bias = torch.randn(n, generator=_gen(1))
    y = R.w4ax_gemm(qa, qw, bias, out_dtype=torch.float64)
    deq = R.dequantize_activation(qa).double() @ R.dequantize_weight(qw, trim=False).double().T + bias.double()
    # dequantize_* round q*scale to float32 once per element: 1e-6 relative
    assert torch.allclose(y, deq, rtol=1e-6, atol=1e-6)
    assert torch.equal(R.w4ax_gemm(qa, qw, bias), y.float())


def test_permuted_layer_computes_the_original_function():
    """A layer with permuted channels (perm folded into weight columns) = the original layer."""
    m, n, k = 5, 96, 576
    x = rand_activation(m, k, outliers=6, generator=_gen(21))
    w = rand_weight(n, k, generator=_gen(22))
    ident = L.ActivationLayout(torch.arange(k), torch.full((5,), 8, dtype=torch.int32))
    perm = L.ActivationLayout(torch.randperm(k, generator=_gen(23)), ident.block_bits)
    # with INT8 everywhere and 128-wide blocks, the permutation changes which channels share a
    # scale, so compare each against the float product rather than against each other...
    ref = x.double() @ w.double().T
    for lay in (ident, perm):
        y = R.w4ax_linear(x, R.quantize_weight_rtn(lay.permute_columns(w), 32), lay)
        assert (y.double() - ref).norm() / ref.norm() < 0.15  # INT4 g32 weights alone: ~9%
    # ...and exactly: dequantized activations put back in the original order times the
    # original-order weights equal the permuted computation.
    qa = R.quantize_activation(x, perm)
    xd = R.dequantize_activation(qa, original_order=True).double()
    wd = R.dequantize_weight(R.quantize_weight_rtn(perm.permute_columns(w), 32)).double()
    w_orig_order = torch.empty_like(wd)
    w_orig_order[:, perm.perm] = wd
    y = R.w4ax_gemm(qa, R.quantize_weight_rtn(perm.permute_columns(w), 32), out_dtype=torch.float64)
    assert torch.allclose(y, xd @ w_orig_order.T, rtol=1e-6, atol=1e-6)


def test_fmpq_beats_plain_a4_on_outliers():
    x = rand_activation(64, 1024, outliers=20, generator=_gen(31))
    err = {}
    for name, lay in {
        "a4": L.ActivationLayout.identity(1024, 4),
        "fmpq": R.fmpq_calibrate(x.abs().amax(0), int8_blocks=1),
    }.items():
        xd = R.dequantize_activation(R.quantize_activation(x, lay), original_order=True)
        err[name] = float((xd - x).norm() / x.norm())
    # 20 outlier channels spread over 8 blocks wreck every INT4 block's scale; gathered into
    # one INT8 block they leave the other 7 blocks with normal scales.
    assert err["fmpq"] < err["a4"] / 3, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gemm_out_dtype_and_linear_shapes(dtype):
    x = rand_activation(6, 128, dtype=dtype, generator=_gen(41)).view(2, 3, 128)
    qw = R.quantize_weight_rtn(rand_weight(10, 128, generator=_gen(42)), 128)
    y = R.w4ax_linear(x, qw, L.ActivationLayout.identity(128))
    assert y.shape == (2, 3, 10) and y.dtype == dtype


def test_gemm_errors():
    lay = L.ActivationLayout.identity(256)
    qa = R.quantize_activation(torch.randn(2, 256), lay)
    qw = R.quantize_weight_rtn(torch.randn(8, 128), 128)
    with pytest.raises(ValueError, match=r"activation has K=256 but weight has K=128 \(qweight shape \(8, 64\)\)"):
        R.w4ax_gemm(qa, qw)
    qw = R.quantize_weight_rtn(torch.randn(8, 256), 128)
    with pytest.raises(ValueError, match=r"bias shape \(7,\) != \(8,\)"):
        R.w4ax_gemm(qa, qw, torch.randn(7))
    with pytest.raises(TypeError, match="out_dtype"):
        R.w4ax_gemm(qa, qw, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="QuantizedActivation"):
        R.w4ax_gemm(torch.randn(2, 256), qw)


# ---------------------------------------------------------------- FMPQ calibration
def test_fmpq_budget_sorts_outliers_into_first_blocks():
    g = _gen(51)
    stats = torch.rand(576, generator=g)
    out = torch.randperm(576, generator=g)[:100]
    stats[out] += 100
    lay = R.fmpq_calibrate(stats, int8_blocks=1)
    assert lay.block_bits.tolist() == [8, 4, 4, 4, 4]
    assert set(lay.perm[:100].tolist()) == set(out.tolist())
    assert bool((stats[lay.perm][:-1] >= stats[lay.perm][1:]).all())


def test_fmpq_threshold_and_fraction():
    g = _gen(52)
    stats = torch.rand(1024, generator=g) + 1
    stats[torch.randperm(1024, generator=g)[:130]] *= 40
    assert R.fmpq_calibrate(stats, outlier_ratio=10.0).n_int8 == 2  # 130 outliers -> 2 blocks
    assert R.fmpq_calibrate(stats, outlier_ratio=10.0, max_int8_blocks=1).n_int8 == 1
    assert R.fmpq_calibrate(stats, int8_fraction=0.25).n_int8 == 2
    assert R.fmpq_calibrate(stats, int8_fraction=0.0).n_int8 == 0
    assert R.fmpq_calibrate(stats, outlier_ratio=1000.0).n_int8 == 0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(), ValueError, "exactly one of"),
        (dict(int8_blocks=1, int8_fraction=0.1), ValueError, "exactly one of"),
        (dict(int8_blocks=6), ValueError, "int8_blocks=6 out of range \\[0, 5\\] for K=576"),
        (dict(int8_fraction=1.5), ValueError, "int8_fraction must be in \\[0, 1\\], got 1.5"),
        (dict(outlier_ratio=-1.0), ValueError, "outlier_ratio must be > 0"),
        (dict(int8_blocks=1.0), TypeError, "int8_blocks must be an int"),
    ],
)
def test_fmpq_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        R.fmpq_calibrate(torch.rand(576), **kwargs)


def test_fmpq_rejects_bad_stats():
    with pytest.raises(ValueError, match="finite and non-negative"):
        R.fmpq_calibrate(torch.tensor([1.0, float("nan")]), int8_blocks=0)
    with pytest.raises(ValueError, match="1-D"):
        R.fmpq_calibrate(torch.rand(2, 3), int8_blocks=0)


# ---------------------------------------------------------------- KV4
@pytest.mark.parametrize("axis, group", [("token", 64), ("token", 32), ("channel", 16), ("channel", 64)])
def test_kv4_error_within_half_step(axis, group):
    x = torch.randn(2, 3, 128, 64, generator=_gen(61)) * 3 + 1
    kv = R.quantize_kv4(x, group, axis)
    assert kv.packed.shape == (2, 3, 128, 32) and kv.shape == (2, 3, 128, 64)
    if axis == "token":
        assert kv.scale.shape == (2, 3, 128, 64 // group)
        step = kv.scale.float().repeat_interleave(group, -1)
    else:
        assert kv.scale.shape == (2, 3, 128 // group, 64)
        step = kv.scale.float().repeat_interleave(group, -2)
    err = (R.dequantize_kv4(kv) - x).abs()
    # half a step, plus the float16 rounding of zero (<= 2**-11 relative to |min|)
    zero_err = R.quantize_kv4(x, group, axis).zero.float().abs() * 2**-11
    zero_err = zero_err.repeat_interleave(group, -1 if axis == "token" else -2)
    assert bool((err <= step / 2 + zero_err + 1e-6).all())


def test_kv4_constant_group_and_dtype():
    x = torch.full((1, 4, 64), 2.5, dtype=torch.float16)
    kv = R.quantize_kv4(x, 64, "token")
    assert not kv.scale.any() and torch.equal(R.dequantize_kv4(kv, torch.float16), x)


def test_kv4_errors():
    with pytest.raises(ValueError, match="head_dim=64 is not a multiple of group_size=48"):
        R.quantize_kv4(torch.randn(4, 64), 48, "token")
    with pytest.raises(ValueError, match="token count=10 is not a multiple of group_size=4"):
        R.quantize_kv4(torch.randn(10, 64), 4, "channel")
    with pytest.raises(ValueError, match="axis must be one of"):
        R.quantize_kv4(torch.randn(4, 64), 32, "head")
    with pytest.raises(ValueError, match="overflow float16"):
        R.quantize_kv4(torch.tensor([[1e6, -1e6]]), 2, "token")
    with pytest.raises(ValueError, match="at least 2-D"):
        R.quantize_kv4(torch.randn(64), 32)
