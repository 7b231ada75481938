"""The CUDA extension (cometq._C, csrc/) against the reference ops, on a GPU.

Integer outputs (q4, q8, activation scales) must be bit-identical to
``reference.quantize_activation`` computed on the CPU (IEEE division,
round-half-even); GEMM outputs must match ``reference.w4ax_gemm`` within the
``cometq.testing`` tolerances, and EXACTLY where the integer part is exposed
(unit scales: the fp32 output is then the exact sum of the int32 segment
accumulators).  Odd shapes (M = 1, 3, 17, 70, 130, 300; K = 576 = 4.5 blocks;
N = 200, 333) and every block-map pattern, both scale modes, every group size
family, both mma paths (the s4 path runs, emulated and slowly, on sm_90 too),
split-K, bias and output dtypes, TORCH_CHECK error paths, and opcheck.
The two optional format features are covered the same way: the INT4 activation
clip (``int4_clip`` < 1, bit-identical) and asymmetric weights (``w_offsets``:
within tolerance, and exact where the activation row sums are exposed).

Run by bench/gpu_check.sh (``pytest -m gpu``).  If CUDA is available but the
extension is not built, these tests ERROR (ImportError) instead of skipping;
set COMETQ_SKIP_CUDA=1 to skip them deliberately.
"""
from __future__ import annotations

import os
import re
import zlib

import pytest
import torch

from cometq import ops
from cometq import reference as R
from cometq.layout import BLOCK_K, ActivationLayout
from cometq.testing import (
    GEMM_BF16_RTOL,
    GEMM_FP16_RTOL,
    GEMM_FP32_ATOL,
    GEMM_FP32_RTOL,
    check_inkernel_reduction,
    rand_activation,
    rand_weight,
)

pytestmark = pytest.mark.gpu

#: Overridable only to dry-run this file's logic against a CPU stand-in of cometq_C.
DEVICE = os.environ.get("COMETQ_CUDA_TEST_DEVICE", "cuda")

K = 576  # SmolLM2 hidden size: 4.5 blocks -> K_pad 640, 5 blocks
PATTERNS = {
    "all4": (4, 4, 4, 4, 4),
    "all8": (8, 8, 8, 8, 8),
    "int8_first": (8, 8, 4, 4, 4),
    "int8_last": (4, 4, 4, 8, 8),
    "alt48": (4, 8, 4, 8, 4),
    "alt84": (8, 4, 8, 4, 8),
    "one8_mid": (4, 4, 8, 4, 4),
}
RTOL = {torch.float32: GEMM_FP32_RTOL, torch.float16: GEMM_FP16_RTOL, torch.bfloat16: GEMM_BF16_RTOL}


@pytest.fixture(scope="module")
def C():
    if os.environ.get("COMETQ_SKIP_CUDA", "0") == "1":
        pytest.skip("COMETQ_SKIP_CUDA=1")
    import cometq._cuda_register as CR  # ImportError (with instructions) when the extension is not built

    return CR


def _gen(*key):
    # crc32 of the repr, not hash(): str hashes change between runs (PYTHONHASHSEED)
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _layout(k, bits, gen, int4_clip=1.0):
    return ActivationLayout(torch.randperm(k, generator=gen), torch.tensor(bits, dtype=torch.int32), int4_clip)


def _operands(m, n, k, bits, group, scale_mode, seed_key, *, sym=True, int4_clip=1.0):
    gen = _gen(*seed_key)
    lay = _layout(k, list(bits), gen, int4_clip)
    x = rand_activation(m, k, outliers=5, generator=gen)
    qa = R.quantize_activation(x, lay, scale_mode)
    w = rand_weight(n, k, generator=gen)
    if not sym:
        w = w + 0.5 * torch.randn(n, 1, generator=gen)  # offsets far from zero
    qw = R.quantize_weight_rtn(w[:, lay.perm], group, sym=sym)
    return qa, qw


def _gs(qw):
    return -1 if qw.group_size in (None, -1) else qw.group_size


def _run_gemm(C, qa, qw, bias=None, out_dtype=torch.float32, **kw):
    d = DEVICE
    return C.cuda_w4ax_gemm(
        qa.q4.to(d), qa.q8.to(d), qa.scales.to(d), qa.layout.block_bits.to(d), qw.qweight.to(d), qw.scales.to(d),
        _gs(qw), None if bias is None else bias.to(d), out_dtype, qa.scale_mode,
        w_offsets=None if qw.offsets is None else qw.offsets.to(d), **kw,
    )


def _check_close(y, ref64, out_dtype):
    assert y.dtype == out_dtype
    torch.testing.assert_close(y.float().cpu(), ref64.float(), rtol=RTOL[out_dtype], atol=GEMM_FP32_ATOL)


# ==========================================================================
# quantize_act: bit-identical
# ==========================================================================
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("scale_mode", ["block", "class"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_act_bit_identical(C, m, pattern, scale_mode, dtype):
    gen = _gen("qa", m, pattern, scale_mode, str(dtype))
    lay = _layout(K, list(PATTERNS[pattern]), gen)
    x = rand_activation(m, K, outliers=5, dtype=dtype, generator=gen)
    ref = R.quantize_activation(x, lay, scale_mode)  # on the CPU: IEEE division everywhere
    q4, q8, sc = C.cuda_quantize_act(x.to(DEVICE), lay.perm.to(DEVICE), lay.block_bits.to(DEVICE), lay.n_int8, scale_mode)
    assert torch.equal(q4.cpu(), ref.q4)
    assert torch.equal(q8.cpu(), ref.q8)
    assert torch.equal(sc.cpu(), ref.scales)


@pytest.mark.parametrize("k", [1, 128, 129, 1000, 4096])
@pytest.mark.parametrize("scale_mode", ["block", "class"])
def test_quantize_act_shapes_and_zero_rows(C, k, scale_mode):
    gen = _gen("qa_k", k, scale_mode)
    nb = (k + BLOCK_K - 1) // BLOCK_K
    bits = [8 if torch.rand(1, generator=gen).item() < 0.3 else 4 for _ in range(nb)]
    lay = _layout(k, bits, gen)
    x = rand_activation(5, k, outliers=min(k, 3), generator=gen)
    x[2] = 0.0  # an all-zero token: scale 0, q 0
    ref = R.quantize_activation(x, lay, scale_mode)
    q4, q8, sc = C.cuda_quantize_act(x.to(DEVICE), lay.perm.to(DEVICE), lay.block_bits.to(DEVICE), lay.n_int8, scale_mode)
    assert torch.equal(q4.cpu(), ref.q4) and torch.equal(q8.cpu(), ref.q8) and torch.equal(sc.cpu(), ref.scales)


@pytest.mark.parametrize("k", [129, 576, 4096, 14336])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_act_rows_kernel_bit_identical(C, k, dtype, monkeypatch):
    """The large-M rows kernel (permutation and x row staged in shared memory; "block" mode,
    M >= 256 or COMETQ_ACT_QUANT_ROWS=1) against the reference and the block kernel, bit for bit:
    a random permutation (scattered gathers, like the magnitude-sorted ones calibration makes),
    K = 129 (rows not 16-byte aligned: the scalar copy), an all-zero token, M = 300 (auto) and
    M = 5 (forced), and COMETQ_ACT_QUANT_ROWS=0 (the block kernel)."""
    gen = _gen("qa_rows", k, str(dtype))
    nb = (k + BLOCK_K - 1) // BLOCK_K
    bits = [8 if i % 4 == 0 else 4 for i in range(nb)]
    lay = _layout(k, bits, gen)
    x = rand_activation(300, k, outliers=min(k, 9), dtype=dtype, generator=gen)
    x[7] = 0.0
    args = (lay.perm.to(DEVICE), lay.block_bits.to(DEVICE), lay.n_int8, "block")
    for mode, rows in (("auto", 300), ("1", 5), ("0", 300)):
        if mode == "auto":
            monkeypatch.delenv("COMETQ_ACT_QUANT_ROWS", raising=False)
        else:
            monkeypatch.setenv("COMETQ_ACT_QUANT_ROWS", mode)
        xs = x[1:1 + rows] if k == 129 else x[:rows]  # (K = 129: an offset start too)
        want = R.quantize_activation(xs, lay, "block")
        q4, q8, sc = C.cuda_quantize_act(xs.to(DEVICE), *args)
        assert torch.equal(q4.cpu(), want.q4) and torch.equal(q8.cpu(), want.q8), (mode, k, dtype)
        assert torch.equal(sc.cpu(), want.scales), (mode, k, dtype)


@pytest.mark.parametrize("load", ["sync", "async1", "async2"])
@pytest.mark.parametrize("k,dtype", [(576, torch.float16), (4096, torch.bfloat16), (14336, torch.float32),
                                     (130, torch.float16)])
def test_quantize_act_rows_kernel_load_modes(C, load, k, dtype, monkeypatch):
    """The rows kernel's three row loaders (COMETQ_ACT_QUANT_ROWS_LOAD: register copies, cp.async
    into one buffer, cp.async double-buffered) give the reference's bits: K = 130 fp16 (260-byte
    rows: a partial last 16-byte chunk, zero-filled), K = 14336 fp32 (56 KB rows: two buffers and
    the permutation in 140 KB), M = 300 rows over fewer CTAs than rows (the double buffer wraps)."""
    gen = _gen("qa_rows_load", k, str(dtype))
    nb = (k + BLOCK_K - 1) // BLOCK_K
    lay = _layout(k, [8 if i % 3 == 0 else 4 for i in range(nb)], gen)
    x = rand_activation(300, k, outliers=min(k, 9), dtype=dtype, generator=gen)
    x[5] = 0.0
    monkeypatch.setenv("COMETQ_ACT_QUANT_ROWS_LOAD", load)
    monkeypatch.setenv("COMETQ_ACT_QUANT_ROWS", "1")
    want = R.quantize_activation(x, lay, "block")
    q4, q8, sc = C.cuda_quantize_act(x.to(DEVICE), lay.perm.to(DEVICE), lay.block_bits.to(DEVICE), lay.n_int8, "block")
    assert torch.equal(q4.cpu(), want.q4) and torch.equal(q8.cpu(), want.q8) and torch.equal(sc.cpu(), want.scales)


@pytest.mark.parametrize("rows", ["0", "1", "auto"])
@pytest.mark.parametrize("scale_mode", ["block", "class"])
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fake_quant_act_bit_identical(C, rows, scale_mode, x_dtype, monkeypatch):
    """The FAKE output (the 16-bit routes' activation operand, half-split K order) of all three
    act-quant kernels -- block ("0"), rows ("1", and "auto" at M = 300), class (a row CTA) -- in
    every output dtype equals ``ops.fake_quant_act``'s reference bit for bit, on a K = 576 layer
    (the padded last block) with an all-zero token; and it is the packed kernel's output
    dequantized (the CUDA quantize_act on the same input)."""
    gen = _gen("fq", rows, scale_mode, str(x_dtype))
    lay = _layout(K, list(PATTERNS["alt84"]), gen, 0.85)
    m = 300 if rows == "auto" else 7
    x = rand_activation(m, K, outliers=5, dtype=x_dtype, generator=gen)
    x[2] = 0.0
    if rows == "auto":
        monkeypatch.delenv("COMETQ_ACT_QUANT_ROWS", raising=False)
    else:
        monkeypatch.setenv("COMETQ_ACT_QUANT_ROWS", rows)
    args = (lay.perm.to(DEVICE), lay.block_bits.to(DEVICE), lay.n_int8, scale_mode, 0.85)
    for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
        want = ops.fake_quant_act(x, lay.perm, lay.block_bits, lay.n_int8, scale_mode, out_dtype, backend="reference",
                                  int4_clip=0.85)
        got = C.cuda_fake_quant_act(x.to(DEVICE), *args, out_dtype=out_dtype)
        assert got.dtype == out_dtype and got.shape == (m, 640)
        assert torch.equal(got.cpu(), want), (rows, scale_mode, x_dtype, out_dtype)
    got = ops.fake_quant_act(x.to(DEVICE), *args[:4], torch.float32, backend="cuda", int4_clip=0.85)
    assert torch.equal(got.cpu(), want)
    assert C.cuda_fake_quant_act(x[:0].to(DEVICE), *args).shape == (0, 640)


def test_fake_quant_act_rejects_bad_inputs(C):
    lay = ActivationLayout.from_block_bits(K, PATTERNS["alt84"])
    x = torch.randn(3, K, device=DEVICE)
    perm, bits = lay.perm.to(DEVICE), lay.block_bits.to(DEVICE)
    with pytest.raises(TypeError, match="out_dtype must be float16, bfloat16 or float32, got torch.int8"):
        C.cuda_fake_quant_act(x, perm, bits, lay.n_int8, "block", out_dtype=torch.int8)
    with pytest.raises(ValueError, match="block_bits shape"):
        C.cuda_fake_quant_act(x, perm, bits[:-1], lay.n_int8, "block")
    torch.library.opcheck(torch.ops.cometq_C.fake_quant_act.default,
                          (x, perm, bits, lay.n_int8, 0, 1.0, torch.float16))


def test_quantize_act_through_ops(C):
    gen = _gen("qa_ops")
    lay = _layout(K, [8, 4, 4, 8, 4], gen)
    x = rand_activation(9, K, outliers=5, dtype=torch.float16, generator=gen)
    ref = R.quantize_activation(x, lay, "block")
    got = ops.quantize_activation(x.to(DEVICE), lay.to(DEVICE), "block", backend="cuda")
    assert torch.equal(got.q4.cpu(), ref.q4) and torch.equal(got.q8.cpu(), ref.q8)
    assert torch.equal(got.scales.cpu(), ref.scales)


def test_quantize_act_empty_m(C):
    lay = ActivationLayout.from_block_bits(K, PATTERNS["alt48"])
    x = torch.empty(0, K, device=DEVICE)
    q4, q8, sc = C.cuda_quantize_act(x, lay.perm.to(DEVICE), lay.block_bits.to(DEVICE), lay.n_int8, "class")
    assert q4.shape == (0, 3 * 64) and q8.shape == (0, 2 * 128) and sc.shape == (0, 2)


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("pattern", ["all4", "int8_first", "alt84", "all8"])
@pytest.mark.parametrize("scale_mode", ["block", "class"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip", [0.9, 0.55, 1 / 3])
def test_quantize_act_clip_bit_identical(C, m, pattern, scale_mode, dtype, clip):
    """INT4 scales (absmax * clip) / 7, saturating at +-7; INT8 blocks unclipped."""
    gen = _gen("qclip", m, pattern, scale_mode, str(dtype), clip)
    lay = _layout(K, list(PATTERNS[pattern]), gen, clip)
    x = rand_activation(m, K, outliers=5, dtype=dtype, generator=gen)
    ref = R.quantize_activation(x, lay, scale_mode)  # on the CPU
    q4, q8, sc = C.cuda_quantize_act(x.to(DEVICE), lay.perm.to(DEVICE), lay.block_bits.to(DEVICE), lay.n_int8,
                                     scale_mode, clip)
    assert torch.equal(q4.cpu(), ref.q4)
    assert torch.equal(q8.cpu(), ref.q8)
    assert torch.equal(sc.cpu(), ref.scales)


def test_quantize_act_clip_one_is_unclipped(C):
    gen = _gen("qclip1")
    lay = _layout(K, [8, 4, 4, 8, 4], gen)
    x = rand_activation(5, K, outliers=5, generator=gen).to(DEVICE)
    args = (x, lay.perm.to(DEVICE), lay.block_bits.to(DEVICE), lay.n_int8, "class")
    a = C.cuda_quantize_act(*args)
    b = C.cuda_quantize_act(*args, 1.0)
    c = C.cuda_quantize_act(*args, 0.7)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[2], c[2]) and torch.equal(a[1], c[1])  # INT4 class scale shrinks, INT8 blocks unchanged


def test_quantize_act_clip_through_ops(C):
    """ops with a clipped layout: the cuda backend runs it (no BackendUnsupported fallback)."""
    gen = _gen("qclip_ops")
    lay = _layout(K, [8, 4, 4, 8, 4], gen, 0.8)
    x = rand_activation(9, K, outliers=5, dtype=torch.float16, generator=gen)
    ref = R.quantize_activation(x, lay, "block")
    got = ops.quantize_activation(x.to(DEVICE), lay.to(DEVICE), "block", backend="cuda")
    assert torch.equal(got.q4.cpu(), ref.q4) and torch.equal(got.q8.cpu(), ref.q8)
    assert torch.equal(got.scales.cpu(), ref.scales)


# ==========================================================================
# w4ax_gemm against the reference
# ==========================================================================
@pytest.mark.parametrize("m", [1, 3, 17, 130])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("scale_mode", ["block", "class"])
@pytest.mark.parametrize("mma_path", ["s4", "s8"])
def test_gemm_block_patterns(C, m, pattern, scale_mode, mma_path):
    qa, qw = _operands(m, 200, K, PATTERNS[pattern], 128, scale_mode, ("pat", m, pattern, scale_mode))
    y = _run_gemm(C, qa, qw, mma_path=mma_path)
    _check_close(y, R.w4ax_gemm(qa, qw, out_dtype=torch.float64), torch.float32)


@pytest.mark.parametrize("m", [1, 17, 130])
@pytest.mark.parametrize("sym", [True, False])
def test_gemm_block_major_weights(C, m, sym):
    """Block-major weight storage (layout.weights_block_major, the [N, NB, 64] view): the same
    bits as the row-major format on every tile config (decode, mid, large)."""
    from cometq.layout import weights_block_major

    args, qweight, rest, kw = _wbm_operands(m, sym)
    want = C.cuda_w4ax_gemm(*args, qweight, *rest, **kw)
    torch.cuda.synchronize()
    got = C.cuda_w4ax_gemm(*args, weights_block_major(qweight), *rest, **kw)
    torch.cuda.synchronize()
    assert torch.equal(got, want)


def _wbm_operands(m, sym):
    qa, qw = _operands(m, 200, K, PATTERNS["alt84"], 128, "block", ("wbm", m, sym), sym=sym)
    d = DEVICE
    args = (qa.q4.to(d), qa.q8.to(d), qa.scales.to(d), qa.layout.block_bits.to(d))
    rest = (qw.scales.to(d), _gs(qw), None, torch.float32, "block")
    kw = dict(w_offsets=None if qw.offsets is None else qw.offsets.to(d))
    return args, qw.qweight.to(d), rest, kw


@pytest.mark.parametrize("sym", [True, False])
def test_gemm_block_major_rejects_other_strides(C, sym):
    """A 3-D qweight that is not the block-major view of [NB, N, 64] storage is refused with
    its shape and strides in the message (by the Python check before the raw op)."""
    args, qweight, rest, kw = _wbm_operands(17, sym)
    with pytest.raises(ValueError, match="block-major view"):
        C.cuda_w4ax_gemm(*args, qweight.reshape(200, -1, 64), *rest, **kw)


@pytest.mark.parametrize("group", [-1, 16, 32, 64, 128, 640])
@pytest.mark.parametrize("m", [3, 70])
@pytest.mark.parametrize("mma_path", ["s4", "s8"])
def test_gemm_group_sizes(C, group, m, mma_path):
    qa, qw = _operands(m, 200, K, PATTERNS["alt84"], group, "block", ("grp", group, m))
    y = _run_gemm(C, qa, qw, mma_path=mma_path)
    _check_close(y, R.w4ax_gemm(qa, qw, out_dtype=torch.float64), torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 17])
def test_gemm_out_dtype_and_bias(C, out_dtype, bias_dtype, m):
    qa, qw = _operands(m, 200, K, PATTERNS["int8_first"], 64, "class", ("dt", m))
    bias = None
    if bias_dtype is not None:
        bias = torch.randn(200, generator=_gen("bias", m)).to(bias_dtype)
    y = _run_gemm(C, qa, qw, bias=bias, out_dtype=out_dtype)
    _check_close(y, R.w4ax_gemm(qa, qw, bias, out_dtype=torch.float64), out_dtype)


@pytest.mark.parametrize("split_k", [0, 1, 2, 3, 5, 7])
@pytest.mark.parametrize("m", [1, 17, 100])
@pytest.mark.parametrize("mma_path", ["s4", "s8"])
def test_gemm_split_k(C, split_k, m, mma_path):
    qa, qw = _operands(m, 200, K, PATTERNS["int8_last"], 32, "block", ("split", m))
    bias = torch.randn(200, generator=_gen("sbias", m))
    y = _run_gemm(C, qa, qw, bias=bias, out_dtype=torch.float16, split_k=split_k, mma_path=mma_path)
    _check_close(y, R.w4ax_gemm(qa, qw, bias, out_dtype=torch.float64), torch.float16)


@pytest.mark.parametrize("pattern", ["all4", "all8", "alt48", "one8_mid"])
@pytest.mark.parametrize("group", [16, 128, -1])
@pytest.mark.parametrize("mma_path", ["s4", "s8"])
@pytest.mark.parametrize("split_k", [1, 2])
def test_gemm_integer_part_exact(C, pattern, group, mma_path, split_k):
    """Unit scales: y == sum of the exact int32 segment accumulators, bit for bit."""
    qa, qw = _operands(17, 200, K, PATTERNS[pattern], group, "block", ("int", pattern, group))
    qa1 = R.QuantizedActivation(qa.q4, qa.q8, torch.ones_like(qa.scales), qa.layout, "block")
    qw1 = R.QuantizedWeight(qw.qweight, torch.ones_like(qw.scales), qw.in_features, qw.group_size)
    want = R.w4ax_int_accumulators(qa1, qw1).to(torch.int64).sum(-1)
    assert int(want.abs().max()) < 2**24  # exactly representable in fp32
    y = _run_gemm(C, qa1, qw1, mma_path=mma_path, split_k=split_k)
    assert torch.equal(y.cpu(), want.float())


@pytest.mark.parametrize("mma_path", ["s4", "s8"])
def test_gemm_full_int_range(C, mma_path):
    """Raw random bytes: every nibble value including -8, every int8 value including -128."""
    gen = _gen("raw", mma_path)
    m, n, nbits = 33, 77, (8, 4, 4, 8, 4)
    lay = ActivationLayout(torch.arange(K), torch.tensor(nbits, dtype=torch.int32))
    q4 = torch.randint(0, 256, (m, lay.n_int4 * 64), generator=gen, dtype=torch.int32).to(torch.uint8)
    q8 = torch.randint(-128, 128, (m, lay.n_int8 * 128), generator=gen, dtype=torch.int32).to(torch.int8)
    sc = torch.rand(m, lay.n_blocks, generator=gen) + 0.01
    qa = R.QuantizedActivation(q4, q8, sc, lay, "block")
    qweight = torch.randint(0, 256, (n, lay.k_pad // 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    qw = R.QuantizedWeight(qweight, torch.rand(n, lay.k_pad // 64, generator=gen) + 0.01, K, 64)
    y = _run_gemm(C, qa, qw, mma_path=mma_path)
    _check_close(y, R.w4ax_gemm(qa, qw, out_dtype=torch.float64), torch.float32)


@pytest.mark.parametrize("mma_path", ["s4", "s8"])
def test_gemm_large_odd(C, mma_path):
    gen = _gen("large")
    k = 2048 + 64  # 17 blocks
    nb = (k + BLOCK_K - 1) // BLOCK_K
    bits = [8 if torch.rand(1, generator=gen).item() < 0.25 else 4 for _ in range(nb)]
    qa, qw = _operands(300, 333, k, bits, 128, "class", ("large",))
    y = _run_gemm(C, qa, qw, out_dtype=torch.float16, mma_path=mma_path)
    _check_close(y, R.w4ax_gemm(qa, qw, out_dtype=torch.float64), torch.float16)


def test_gemm_through_ops_and_linear(C):
    gen = _gen("linear")
    lay = _layout(K, [8, 4, 4, 4, 8], gen)
    x = rand_activation(7, K, outliers=5, dtype=torch.float16, generator=gen)
    qw = R.quantize_weight_rtn(rand_weight(200, K, generator=gen)[:, lay.perm], 128)
    bias = torch.randn(200, generator=gen).half()
    ref = R.w4ax_linear(x.float(), qw, lay, bias.float(), "block").double()
    qa = ops.quantize_activation(x.to(DEVICE), lay.to(DEVICE), "block", backend="cuda")
    y = ops.w4ax_gemm_q(qa, qw.to(DEVICE), bias.to(DEVICE), out_dtype=torch.float16, backend="cuda")
    _check_close(y, ref, torch.float16)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_gemm_split_count_is_tuned_at_small_m(C, mode, monkeypatch):
    """Through the ops layer at M <= 64 the CUDA GEMM's split count is timed once per shape and
    timing mode (cometq._cuda_split) and the result stays the reference's; COMETQ_CUDA_SPLIT_TUNE=0
    and M > 64 leave the kernel's own rule (nothing cached)."""
    from cometq import _cuda_split, autotune

    _cuda_split.clear()
    qa, qw = _operands(64, 200, 1280, [4, 8, 4, 4, 4, 4, 8, 4, 4, 4], 128, "block", ("split-tune",), sym=False)
    ref = R.w4ax_gemm(qa, qw, out_dtype=torch.float64)
    qa = R.QuantizedActivation(qa.q4.to(DEVICE), qa.q8.to(DEVICE), qa.scales.to(DEVICE), qa.layout.to(DEVICE), "block")
    with autotune.timing(mode):
        y = ops.w4ax_gemm_q(qa, qw.to(DEVICE), None, out_dtype=torch.float32, backend="cuda")
    _check_close(y, ref, torch.float32)
    assert [k[-1] for k in _cuda_split._CACHE] == [mode]
    assert next(iter(_cuda_split._CACHE.values())) in _cuda_split.split_candidates(64, 10)
    _cuda_split.clear()
    monkeypatch.setenv(_cuda_split.ENV_TUNE, "0")
    y = ops.w4ax_gemm_q(qa, qw.to(DEVICE), None, out_dtype=torch.float32, backend="cuda")
    _check_close(y, ref, torch.float32)
    assert not _cuda_split._CACHE


@pytest.mark.parametrize("m", [1, 17, 64])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("split_k", [0, 3])
def test_gemm_tile_mid3_is_bit_identical(C, m, sym, split_k):
    """tile=1 (the 64 x 64 tile with 3 stages, 4 CTAs per SM) runs the same K loop and flush order
    as the default 64 x 64 tile: bit-identical outputs for M > 16 (at M = 1 the default is the
    16-row tile: only the reference is compared), and the reference's within tolerance."""
    qa, qw = _operands(m, 333, K, PATTERNS["alt84"], 128, "block", ("mid3", m, sym), sym=sym)
    ref = R.w4ax_gemm(qa, qw, out_dtype=torch.float64)
    y3 = _run_gemm(C, qa, qw, split_k=split_k, tile=1)
    _check_close(y3, ref, torch.float32)
    if m > 16:
        assert torch.equal(y3, _run_gemm(C, qa, qw, split_k=split_k, tile=0))


@pytest.mark.parametrize("m,n,k,split_k,sym,tile", [
    (1, 200, K, 3, True, 0), (3, 77, K, 5, False, 0), (16, 4096, 1280, 4, False, 0), (17, 200, K, 2, True, 0),
    (64, 1000, 1280, 5, False, 0), (64, 333, 1280, 7, True, 1), (100, 130, 1280, 3, False, 0)])
def test_gemm_splitk_fixup_bit_identical(C, m, n, k, split_k, sym, tile):
    """The in-kernel split-K reduction (``tile_counters``: each tile's last split sums the slabs)
    gives the finalize kernel's bits -- twice in a row (each tile resets its own counter) and
    replayed from a CUDA graph -- and leaves every counter zero."""
    nb = -(-k // BLOCK_K)
    bits = [8 if i % 3 == 1 else 4 for i in range(nb)]
    qa, qw = _operands(m, n, k, bits, 128 if sym else 32, "block", ("fixup", m, n, k), sym=sym)
    d = DEVICE
    args = (qa.q4.to(d), qa.q8.to(d), qa.scales.to(d), qa.layout.block_bits.to(d), qw.qweight.to(d), qw.scales.to(d),
            _gs(qw), torch.randn(n, generator=_gen("fixup-bias", m)).half().to(d), torch.float16, "block")
    kw = dict(w_offsets=None if qw.offsets is None else qw.offsets.to(d), split_k=split_k, tile=tile)
    want = C.cuda_w4ax_gemm(*args, **kw)
    _check_close(want, R.w4ax_gemm(qa, qw, args[7].float().cpu(), out_dtype=torch.float64), torch.float16)
    check_inkernel_reduction(lambda c: C.cuda_w4ax_gemm(*args, **kw, tile_counters=c), want,
                             torch.zeros(1 << 16, dtype=torch.int32, device=d))


def test_gemm_splitk_fixup_through_the_backend(C, monkeypatch):
    """``COMETQ_CUDA_SPLITK_FIXUP=1``: the cuda backend's GEMM (its tuned split count at M <= 64)
    passes the shared counters and gives the finalize kernel's bits; bad counters are rejected."""
    from cometq import _cuda_split

    qa, qw = _operands(16, 4096, 1280, [4, 8, 4, 4, 4, 4, 8, 4, 4, 4], 128, "block", ("fixup-backend",), sym=False)
    qa = R.QuantizedActivation(qa.q4.to(DEVICE), qa.q8.to(DEVICE), qa.scales.to(DEVICE), qa.layout.to(DEVICE), "block")
    qw = qw.to(DEVICE)
    monkeypatch.setenv(_cuda_split.ENV_TUNE, "0")  # the kernel's own split rule: M = 16 splits K
    monkeypatch.setenv(C.CUDA_FIXUP_ENV, "0")
    want = ops.w4ax_gemm_q(qa, qw, None, out_dtype=torch.float16, backend="cuda")
    monkeypatch.setenv(C.CUDA_FIXUP_ENV, "1")
    got = ops.w4ax_gemm_q(qa, qw, None, out_dtype=torch.float16, backend="cuda")
    assert torch.equal(got, want)
    counters = C.cuda_tile_counters(qw.qweight.device)
    torch.cuda.synchronize()
    assert counters.numel() >= C.CUDA_COUNTERS_MIN and int(counters.abs().sum()) == 0
    monkeypatch.setenv(C.CUDA_FIXUP_ENV, "2")
    with pytest.raises(ValueError, match="COMETQ_CUDA_SPLITK_FIXUP must be 0 or 1, got '2'"):
        ops.w4ax_gemm_q(qa, qw, None, out_dtype=torch.float16, backend="cuda")
    args = (qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, None, torch.float16, "block")
    with pytest.raises(ValueError, match="tile_counters must be 1-D int32"):
        C.cuda_w4ax_gemm(*args, w_offsets=qw.offsets, split_k=4, tile_counters=counters.float())
    with pytest.raises(RuntimeError, match="needs at least 64 counters"):  # 16 x 64 tiles of N = 4096
        C.cuda_w4ax_gemm(*args, w_offsets=qw.offsets, split_k=4, tile_counters=counters[:10])


def test_gemm_tile_errors(C):
    qa, qw = _operands(65, 40, K, PATTERNS["alt84"], 128, "block", ("tile-err",))
    with pytest.raises(ValueError, match="tile must be one of"):
        _run_gemm(C, qa, qw, tile=2)
    with pytest.raises(ValueError, match=r"needs M <= 64, got a_scales of shape \(65, 5\)"):
        _run_gemm(C, qa, qw, tile=1)
    # (the raw op's own TORCH_CHECKs for tile: bench/diag_raw_errors.py, in a child process)


def test_gemm_empty(C):
    qa, qw = _operands(1, 16, K, PATTERNS["alt48"], 128, "block", ("empty",))
    empty = R.QuantizedActivation(qa.q4[:0], qa.q8[:0], qa.scales[:0], qa.layout, "block")
    y = _run_gemm(C, empty, qw, out_dtype=torch.float16)
    assert y.shape == (0, 16) and y.dtype == torch.float16


# ==========================================================================
# asymmetric weights (w_offsets) against the reference
# ==========================================================================
@pytest.mark.parametrize("m", [1, 3, 17, 130])
@pytest.mark.parametrize("pattern", ["all4", "all8", "int8_first", "alt48"])
@pytest.mark.parametrize("scale_mode", ["block", "class"])
@pytest.mark.parametrize("mma_path", ["s4", "s8"])
def test_gemm_asymmetric_block_patterns(C, m, pattern, scale_mode, mma_path):
    qa, qw = _operands(m, 200, K, PATTERNS[pattern], 128, scale_mode, ("asym_pat", m, pattern, scale_mode),
                       sym=False, int4_clip=0.85)
    y = _run_gemm(C, qa, qw, mma_path=mma_path)
    _check_close(y, R.w4ax_gemm(qa, qw, out_dtype=torch.float64), torch.float32)


@pytest.mark.parametrize("group", [-1, 16, 32, 64, 128, 640])
@pytest.mark.parametrize("m", [3, 70])
@pytest.mark.parametrize("mma_path", ["s4", "s8"])
@pytest.mark.parametrize("split_k", [0, 1, 3])
def test_gemm_asymmetric_group_sizes_split_k(C, group, m, mma_path, split_k):
    qa, qw = _operands(m, 333, K, PATTERNS["alt84"], group, "block", ("asym_grp", group, m), sym=False)
    bias = torch.randn(333, generator=_gen("asym_bias", group, m))
    y = _run_gemm(C, qa, qw, bias=bias, mma_path=mma_path, split_k=split_k)
    _check_close(y, R.w4ax_gemm(qa, qw, bias, out_dtype=torch.float64), torch.float32)


@pytest.mark.parametrize("group", [16, 32, 64, 128, 640])
@pytest.mark.parametrize("mma_path", ["s4", "s8"])
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("m", [1, 17, 70])
def test_gemm_asymmetric_activation_sums_exact(C, group, mma_path, split_k, m):
    """w_scales = 0, small integer offsets, unit activation scales, raw random bytes
    (every nibble incl. -8, every int8 incl. -128): y = sum_s off[n, s] * asum[m, s], bit for bit."""
    gen = _gen("asum", group, mma_path, m)
    n, bits = 77, (8, 4, 4, 8, 4)
    lay = ActivationLayout(torch.arange(K), torch.tensor(bits, dtype=torch.int32))
    q4 = torch.randint(0, 256, (m, lay.n_int4 * 64), generator=gen, dtype=torch.int32).to(torch.uint8)
    q8 = torch.randint(-128, 128, (m, lay.n_int8 * 128), generator=gen, dtype=torch.int32).to(torch.int8)
    qa = R.QuantizedActivation(q4, q8, torch.ones(m, lay.n_blocks), lay, "block")
    qweight = torch.randint(0, 256, (n, lay.k_pad // 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    ns = lay.k_pad // group
    offsets = torch.randint(-3, 4, (n, ns), generator=gen).float()
    qw = R.QuantizedWeight(qweight, torch.zeros(n, ns), K, group, offsets)
    want = R.w4ax_gemm(qa, qw, out_dtype=torch.float64)
    assert float(want.abs().max()) < 2**24 and float(want.abs().max()) > 0
    y = _run_gemm(C, qa, qw, mma_path=mma_path, split_k=split_k)
    assert torch.equal(y.cpu().double(), want)


@pytest.mark.parametrize("mma_path", ["s4", "s8"])
def test_gemm_asymmetric_unit_scales_exact(C, mma_path):
    """Unit scales and integer offsets: y = sum_s (acc + off * asum), all exact integers."""
    gen = _gen("asym_unit", mma_path)
    qa, qw = _operands(17, 200, K, PATTERNS["one8_mid"], 32, "block", ("asym_unit",), sym=False)
    qa1 = R.QuantizedActivation(qa.q4, qa.q8, torch.ones_like(qa.scales), qa.layout, "block")
    off = torch.randint(-2, 3, qw.scales.shape, generator=gen).float()
    qw1 = R.QuantizedWeight(qw.qweight, torch.ones_like(qw.scales), qw.in_features, qw.group_size, off)
    want = R.w4ax_gemm(qa1, qw1, out_dtype=torch.float64)
    assert float(want.abs().max()) < 2**24
    y = _run_gemm(C, qa1, qw1, mma_path=mma_path, split_k=2)
    assert torch.equal(y.cpu().double(), want)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_gemm_asymmetric_large_odd(C, out_dtype):
    gen = _gen("asym_large")
    k = 2048 + 64  # 17 blocks
    nb = (k + BLOCK_K - 1) // BLOCK_K
    bits = [8 if torch.rand(1, generator=gen).item() < 0.25 else 4 for _ in range(nb)]
    qa, qw = _operands(300, 333, k, bits, 64, "class", ("asym_large",), sym=False, int4_clip=0.9)
    y = _run_gemm(C, qa, qw, out_dtype=out_dtype)
    _check_close(y, R.w4ax_gemm(qa, qw, out_dtype=torch.float64), out_dtype)


def test_gemm_asymmetric_through_ops_and_linear(C):
    """Clipped layout + asymmetric weight through the public ops with backend="cuda"
    (neither case falls back any more) vs reference.w4ax_linear."""
    gen = _gen("asym_linear")
    lay = _layout(K, [8, 4, 4, 4, 8], gen, 0.8)
    x = rand_activation(7, K, outliers=5, dtype=torch.float16, generator=gen)
    w = rand_weight(200, K, generator=gen) + 0.3
    qw = R.quantize_weight_rtn(w[:, lay.perm], 128, sym=False)
    bias = torch.randn(200, generator=gen).half()
    ref = R.w4ax_linear(x.float(), qw, lay, bias.float(), "block").double()
    qa = ops.quantize_activation(x.to(DEVICE), lay.to(DEVICE), "block", backend="cuda")
    y = ops.w4ax_gemm_q(qa, qw.to(DEVICE), bias.to(DEVICE), out_dtype=torch.float16, backend="cuda")
    _check_close(y, ref, torch.float16)


# ==========================================================================
# error paths (TORCH_CHECK messages name the argument)
# ==========================================================================
def _raw_args(qa, qw, d=DEVICE):
    #       0      1      2         3           4        5         6          7           8     9          10
    return [qa.q4.to(d), qa.q8.to(d), qa.scales.to(d), qa.layout.block_bits.to(d), qw.qweight.to(d),
            qw.scales.to(d), None if qw.offsets is None else qw.offsets.to(d), _gs(qw), None, torch.float32,
            0 if qa.scale_mode == "block" else 1, 0, 0]
    #       11 scale_mode, 12 split_k, 13 mma_path (w_offsets is 6, group_size 7, bias 8, out_dtype 9)


def test_gemm_wrapper_rejects_bad_inputs(C):
    """The wrapper the ``cuda`` backend calls checks its inputs in Python (cometq._cuda_checks)
    before the raw op: ValueError / TypeError naming the argument, never a crash."""
    qa, qw = _operands(3, 24, K, PATTERNS["alt48"], 128, "block", ("err",))
    good = _raw_args(qa, qw)

    def call(i, v, exc, match):
        a = list(good)
        a[i] = v
        q4, q8, a_s, bb, qwt, ws, wo, gs, bias, od, sm, sk, mp = a
        with pytest.raises(exc, match=match):
            C.cuda_w4ax_gemm(q4, q8, a_s, bb, qwt, ws, gs, bias, od, ("block", "class")[sm] if sm in (0, 1) else sm,
                             w_offsets=wo, split_k=sk, mma_path=mp)

    good[12] = "auto"
    call(0, good[0].to(torch.int8), TypeError, "q4 must have dtype")
    call(1, good[1].cpu(), ValueError, "q8 must be a CUDA tensor")
    call(2, good[2][:, :2].contiguous(), ValueError, "a_scales shape")
    call(4, good[4][:, :-64].contiguous(), ValueError, "K_pad")
    call(5, good[5][:, :3].contiguous(), ValueError, "w_scales shape")
    call(7, 48, ValueError, "group_size=48")
    call(8, torch.zeros(23, device=DEVICE), ValueError, "bias shape")
    call(9, torch.int32, TypeError, "out_dtype")
    call(10, 3, ValueError, "scale_mode")
    call(11, -2, ValueError, "split_k")
    call(12, "s2", ValueError, "mma_path")
    off = torch.randn(good[5].shape, device=DEVICE)
    call(6, off.half(), TypeError, "w_offsets must have dtype")
    call(6, off[:, :3].contiguous(), ValueError, r"w_offsets shape \[24, 3\] != w_scales shape \(24, 5\)")
    call(6, off.cpu(), ValueError, "w_offsets must be a CUDA tensor")


def test_quantize_act_wrapper_rejects_bad_inputs(C):
    lay = ActivationLayout.from_block_bits(K, PATTERNS["alt84"])
    x = torch.randn(3, K, device=DEVICE)
    perm, bits = lay.perm.to(DEVICE), lay.block_bits.to(DEVICE)
    f = C.cuda_quantize_act
    with pytest.raises(ValueError, match="x must be 2-D"):
        f(x[0], perm, bits, lay.n_int8, "block")
    with pytest.raises(ValueError, match="block_bits shape"):
        f(x, perm, bits[:-1], lay.n_int8, "block")
    with pytest.raises(ValueError, match="n_int8=9"):
        f(x, perm, bits, 9, "block")
    with pytest.raises(TypeError, match="x must have dtype"):
        f(x.double(), perm, bits, lay.n_int8, "block")
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        f(x.cpu(), perm, bits, lay.n_int8, "block")
    with pytest.raises(ValueError, match=re.escape("int4_clip must be in (0, 1], got int4_clip=nan")):
        f(x, perm, bits, lay.n_int8, "block", float("nan"))
    with pytest.raises(ValueError, match="scale_mode"):
        f(x, perm, bits, lay.n_int8, "tensor")


# The raw ops' own TORCH_CHECKs, called directly (torch.ops.cometq_C.*), in a child process
# (bench/diag_raw_errors.py): on the lent H100's image every C++ exception out of cometq._C
# killed the process with SIGSEGV (GPU runs 3 and 4, 2026-11-27; see bench/RESULTS.md), so a
# crash must fail this test with its signal rather than take the test worker down.
def test_raw_op_torch_checks_raise(C):
    import signal
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "diag_raw_errors.py")
    p = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    if p.returncode < 0:
        last = [ln for ln in p.stdout.splitlines() if ln.startswith("CALL")][-1:]
        pytest.fail(f"a TORCH_CHECK of cometq._C killed the process with {signal.Signals(-p.returncode).name} "
                    f"instead of raising ({last}): C++ exceptions do not propagate out of the extension on "
                    f"this build (compiler / runtime mismatch?)\n{out[-3000:]}")
    assert p.returncode == 0 and "ALL RAISED" in p.stdout, out[-3000:]


# ==========================================================================
# torch.library registration
# ==========================================================================
def test_opcheck_raw_ops(C):
    qa, qw = _operands(5, 40, K, PATTERNS["alt84"], 64, "class", ("opcheck",))
    args = _raw_args(qa, qw)
    args[8] = torch.randn(40, device=DEVICE)
    torch.library.opcheck(torch.ops.cometq_C.w4ax_gemm.default, tuple(args))
    _, qw_asym = _operands(5, 40, K, PATTERNS["alt84"], 64, "class", ("opcheck",), sym=False)
    args = _raw_args(qa, qw_asym)
    assert args[6] is not None
    torch.library.opcheck(torch.ops.cometq_C.w4ax_gemm.default, tuple(args))
    torch.library.opcheck(torch.ops.cometq_C.w4ax_gemm.default, tuple(args) + (1,))  # tile=1 (M = 5 <= 64)
    lay = qa.layout
    x = torch.randn(5, K, device=DEVICE)
    for clip in (1.0, 0.7):
        torch.library.opcheck(
            torch.ops.cometq_C.quantize_act.default,
            (x, lay.perm.to(DEVICE), lay.block_bits.to(DEVICE), lay.n_int8, 1, clip),
        )


def test_cuda_backend_is_registered(C):
    assert "cuda" in ops.registered_backends("w4ax_gemm")
    assert "cuda" in ops.registered_backends("quantize_act")
    if os.environ.get("COMETQ_CUDA_FAKE_QUANT", "1") != "0":  # (the GPU check's escape when its FAKE test failed)
        assert "cuda" in ops.registered_backends("fake_quant_act")
    assert ops.resolve_backend("w4ax_gemm", torch.device(DEVICE), "cuda") == "cuda"
