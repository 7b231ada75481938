"""Triton fused activation quantization vs cometq.reference.quantize_activation: bit-identical.

Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py) and natively on a GPU.
"""
import pytest
import torch

pytest.importorskip("triton")

from cometq import ops  # noqa: E402
from cometq import reference as R  # noqa: E402
from cometq.layout import ActivationLayout, num_blocks  # noqa: E402
from cometq.testing import rand_activation  # noqa: E402

from cometq.kernels.act_quant import quantize_act_triton, quantize_activation_triton  # noqa: E402


def _bits(pattern: str, nb: int):
    if pattern == "all4":
        return [4] * nb
    if pattern == "all8":
        return [8] * nb
    if pattern == "mixed":  # calibration style: INT8 blocks first
        return [8] * max(1, nb // 4) + [4] * (nb - max(1, nb // 4))
    if pattern == "alternating":
        return [8 if i % 2 == 0 else 4 for i in range(nb)]
    if pattern == "int8_last":
        return [4] * (nb - 1) + [8]
    raise ValueError(pattern)


def _assert_same(got, ref):
    assert got.q4.dtype == torch.uint8 and got.q8.dtype == torch.int8 and got.scales.dtype == torch.float32
    assert torch.equal(got.q4, ref.q4), "packed INT4 blocks differ"
    assert torch.equal(got.q8, ref.q8), "INT8 blocks differ"
    assert torch.equal(got.scales, ref.scales), "scales differ"


CASES = [
    # (M, K, pattern, dtype, permuted)
    (1, 576, "mixed", torch.float16, True),
    (3, 576, "alternating", torch.float32, True),
    (17, 576, "all4", torch.bfloat16, True),
    (17, 576, "all8", torch.float16, False),
    (3, 128, "all4", torch.float32, False),
    (1, 128, "all8", torch.bfloat16, True),
    (5, 300, "int8_last", torch.float16, True),
    (3, 640, "mixed", torch.float32, False),
]


@pytest.mark.parametrize("scale_mode", ["block", "class"])
@pytest.mark.parametrize("m,k,pattern,dtype,permuted", CASES)
def test_matches_reference(m, k, pattern, dtype, permuted, scale_mode, device):
    g = torch.Generator(device="cpu").manual_seed(1000 * m + k)
    perm = torch.randperm(k, generator=g) if permuted else None
    lay = ActivationLayout.from_block_bits(k, _bits(pattern, num_blocks(k)), perm=perm).to(device)
    x = rand_activation(m, k, outliers=3, dtype=dtype, generator=g).to(device)
    got = quantize_activation_triton(x, lay, scale_mode)
    _assert_same(got, R.quantize_activation(x, lay, scale_mode))


@pytest.mark.parametrize("scale_mode", ["block", "class"])
def test_gather_path_with_identity_perm(scale_mode, device):
    # the tensor-level entry never assumes identity: same result with and without the shortcut
    g = torch.Generator().manual_seed(7)
    lay = ActivationLayout.from_block_bits(576, [8, 4, 4, 8, 4]).to(device)
    x = rand_activation(4, 576, outliers=2, generator=g).to(device)
    a = quantize_act_triton(x, lay.perm, lay.block_bits, lay.n_int8, scale_mode, identity_perm=False)
    b = quantize_act_triton(x, lay.perm, lay.block_bits, lay.n_int8, scale_mode, identity_perm=True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_round_half_to_even_and_zero_blocks(device):
    # block 0: absmax 7 -> scale 1 (INT4) so x/s hits exact .5 ties; block 1 of row 1 is all
    # zeros (scale 0 -> q 0); block 2 INT8 with ties at scale 1 (absmax 127)
    k = 384
    lay = ActivationLayout.from_block_bits(k, [4, 4, 8]).to(device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, k, generator=g)
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 6.5, -6.5])
    x[:, : ties.numel()] = ties
    x[:, 10] = 7.0
    x[:, 11:128] = torch.rand(2, 117, generator=g) * 6.0
    x[1, 128:256] = 0.0
    x[:, 256:266] = ties * 20 + 0.5 * torch.sign(ties)  # ..., 10.5, 30.5, 50.5: ties at scale 1
    x[:, 266] = 127.0
    x = x.to(device)
    got = quantize_activation_triton(x, lay, "block")
    ref = R.quantize_activation(x, lay, "block")
    _assert_same(got, ref)
    assert float(ref.scales[0, 0]) == 1.0 and float(ref.scales[1, 1]) == 0.0
    # and the ties really were rounded to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    assert ref.int_blocks()[0, :3].tolist() == [0, 2, 2]


def test_strided_input(device):
    g = torch.Generator().manual_seed(11)
    lay = ActivationLayout.from_block_bits(576, [8, 4, 8, 4, 4], perm=torch.randperm(576, generator=g)).to(device)
    big = rand_activation(3, 1152, outliers=4, generator=g, dtype=torch.float16).to(device)
    x = big[:, ::2]  # non-contiguous along K
    for mode in ("block", "class"):
        _assert_same(quantize_activation_triton(x, lay, mode), R.quantize_activation(x.contiguous(), lay, mode))


@pytest.mark.parametrize("scale_mode", ["block", "class"])
def test_via_op(scale_mode, device):
    g = torch.Generator().manual_seed(5)
    lay = ActivationLayout.from_block_bits(576, [8, 4, 8, 4, 4], perm=torch.randperm(576, generator=g)).to(device)
    x = rand_activation(3, 576, outliers=3, generator=g, dtype=torch.bfloat16).to(device)
    got = ops.quantize_activation(x, lay, scale_mode, backend="triton")
    _assert_same(got, R.quantize_activation(x, lay, scale_mode))
    q4, q8, sc = ops.quantize_act(x, lay.perm, lay.block_bits, lay.n_int8, scale_mode, backend="triton")
    assert torch.equal(q4, got.q4) and torch.equal(q8, got.q8) and torch.equal(sc, got.scales)


def test_empty_batch(device):
    lay = ActivationLayout.from_block_bits(256, [8, 4]).to(device)
    q4, q8, sc = quantize_act_triton(torch.randn(0, 256, device=device), lay.perm, lay.block_bits, 1, "block")
    assert q4.shape == (0, 64) and q8.shape == (0, 128) and sc.shape == (0, 2)


def test_errors(device, monkeypatch):
    monkeypatch.setenv("COMETQ_SYNC_CHECKS", "1")  # content checks that sync are opt-in on CUDA
    lay = ActivationLayout.from_block_bits(256, [8, 4]).to(device)
    x = torch.randn(2, 256, device=device)
    with pytest.raises(TypeError, match="x must have dtype"):
        quantize_act_triton(x.to(torch.int32), lay.perm, lay.block_bits, 1)
    with pytest.raises(ValueError, match="x must be 2-D"):
        quantize_act_triton(x[0], lay.perm, lay.block_bits, 1)
    with pytest.raises(ValueError, match=r"perm shape \(255,\)"):
        quantize_act_triton(x, lay.perm[:255], lay.block_bits, 1)
    with pytest.raises(ValueError, match=r"block_bits shape \(3,\)"):
        quantize_act_triton(x, lay.perm, torch.tensor([8, 4, 4], device=device), 1)
    with pytest.raises(ValueError, match="n_int8=2 but block_bits holds 1"):
        quantize_act_triton(x, lay.perm, lay.block_bits, 2)
    with pytest.raises(ValueError, match="n_int8 must be an int"):
        quantize_act_triton(x, lay.perm, lay.block_bits, 5)
    with pytest.raises(ValueError, match="scale_mode"):
        quantize_act_triton(x, lay.perm, lay.block_bits, 1, "token")
    with pytest.raises(TypeError, match="layout must be an ActivationLayout"):
        quantize_activation_triton(x, "not a layout")


# --------------------------------------------------------------------------
# INT4 clip (ActivationLayout.int4_clip): INT4 scales (absmax * clip) / 7, INT8 untouched
# --------------------------------------------------------------------------
CLIPS = (1.0, 0.9, 0.8375, 0.5)
CLIP_CASES = [
    # (M, K, pattern, dtype, permuted)
    (1, 576, "mixed", torch.float16, True),
    (3, 300, "alternating", torch.float32, True),
    (17, 576, "all4", torch.bfloat16, False),
    (3, 576, "all8", torch.float32, True),
]


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("scale_mode", ["block", "class"])
@pytest.mark.parametrize("m,k,pattern,dtype,permuted", CLIP_CASES)
def test_int4_clip_matches_reference(m, k, pattern, dtype, permuted, scale_mode, clip, device):
    g = torch.Generator(device="cpu").manual_seed(77 * m + k)
    perm = torch.randperm(k, generator=g) if permuted else None
    lay = ActivationLayout.from_block_bits(k, _bits(pattern, num_blocks(k)), perm=perm).with_clip(clip).to(device)
    x = rand_activation(m, k, outliers=3, dtype=dtype, generator=g).to(device)
    got = quantize_activation_triton(x, lay, scale_mode)
    ref = R.quantize_activation(x, lay, scale_mode)
    _assert_same(got, ref)
    # the clip really acted: INT4 scales shrink, INT8 scales do not (so the test can fail)
    base = R.quantize_activation(x, lay.with_clip(1.0), scale_mode)
    # columns of `scales` that are INT4 scales (class mode: column 0, when there is an INT4 block)
    is4 = (lay.block_bits == 4) if scale_mode == "block" else torch.tensor([lay.n_int4 > 0, False], device=device)
    if clip < 1.0 and bool(is4.any()):
        assert bool((got.scales[:, is4] < base.scales[:, is4]).all())
    assert torch.equal(got.scales[:, ~is4], base.scales[:, ~is4])


@pytest.mark.parametrize("scale_mode", ["block", "class"])
def test_int4_clip_op_order_multiply_then_divide(scale_mode, device):
    # (absmax * clip) / 7 and absmax * (clip / 7) round differently for some absmax: pick rows
    # whose absmax tells the two apart and check the kernel follows the spec's order
    clip = 0.8375
    cand = torch.linspace(0.5, 40.0, 4001)
    c32 = torch.tensor(clip, dtype=torch.float32)
    spec = (cand * c32) / torch.tensor(7.0)
    other = cand * (c32 / torch.tensor(7.0))
    diff = cand[spec != other][:24]
    assert diff.numel() >= 8, "no distinguishing absmax values found"
    m, k = diff.numel(), 256
    g = torch.Generator().manual_seed(13)
    x = (torch.rand(m, k, generator=g) * 2 - 1) * diff[:, None] * 0.99
    x[:, 3] = diff  # the absmax of the INT4 block 0 (and of the row's INT4 class)
    x[:, 200] = -3.0 * diff  # INT8 block 1: never clipped
    lay = ActivationLayout.from_block_bits(k, [4, 8]).with_clip(clip).to(device)
    got = quantize_activation_triton(x.to(device), lay, scale_mode)
    ref = R.quantize_activation(x.to(device), lay, scale_mode)
    _assert_same(got, ref)
    assert torch.equal(got.scales[:, 0].cpu(), spec[spec != other][:24])
    assert not torch.equal(got.scales[:, 0].cpu(), other[spec != other][:24])


@pytest.mark.parametrize("scale_mode", ["block", "class"])
def test_int4_clip_via_op(scale_mode, device):
    g = torch.Generator().manual_seed(21)
    lay = ActivationLayout.from_block_bits(576, [8, 4, 8, 4, 4], perm=torch.randperm(576, generator=g))
    lay = lay.with_clip(0.9).to(device)
    x = rand_activation(3, 576, outliers=3, generator=g, dtype=torch.float16).to(device)
    got = ops.quantize_activation(x, lay, scale_mode, backend="triton")  # no BackendUnsupported any more
    _assert_same(got, R.quantize_activation(x, lay, scale_mode))
    q4, q8, sc = ops.quantize_act(x, lay.perm, lay.block_bits, lay.n_int8, scale_mode, backend="triton",
                                  int4_clip=0.9)
    assert torch.equal(q4, got.q4) and torch.equal(q8, got.q8) and torch.equal(sc, got.scales)


def test_int4_clip_errors(device):
    lay = ActivationLayout.from_block_bits(256, [8, 4]).to(device)
    x = torch.randn(2, 256, device=device)
    for bad in (0.0, 1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match="int4_clip must be in"):
            quantize_act_triton(x, lay.perm, lay.block_bits, 1, int4_clip=bad)
    with pytest.raises(TypeError, match="int4_clip must be a float"):
        quantize_act_triton(x, lay.perm, lay.block_bits, 1, int4_clip=True)
    with pytest.raises(TypeError, match="int4_clip must be a float"):
        quantize_act_triton(x, lay.perm, lay.block_bits, 1, int4_clip="0.9")


def test_block_map_tables_follow_in_place_updates(device):
    """The per-map slot / int32 tables are cached per tensor; an in-place edit of the map
    (same object, new ``_version``) must not reuse the stale tables."""
    g = torch.Generator().manual_seed(7)
    k = 384
    x = rand_activation(5, k, generator=g).to(device)
    bits = torch.tensor([8, 4, 4], dtype=torch.int32, device=device)
    perm = torch.randperm(k, generator=g).to(device)
    for pattern in ([8, 4, 4], [4, 4, 8], [4, 8, 4]):
        bits.copy_(torch.tensor(pattern, dtype=torch.int32))
        lay = ActivationLayout(perm, bits)
        got = quantize_activation_triton(x, lay)
        _assert_same(got, R.quantize_activation(x, lay))


@pytest.mark.parametrize("m,n8,n4", [(1, 2, 3), (17, 0, 4), (70, 3, 0), (5, 1, 1)])
def test_split_rows_matches_layout_spec(m, n8, n4, device):
    """The TMA GEMM's activation repack: bit-identical to cometq.layout.split_activation_rows."""
    from cometq.kernels.act_quant import split_rows_triton
    from cometq.layout import pack_int4, split_activation_rows

    g = torch.Generator().manual_seed(m * 31 + n8)
    q8 = torch.randint(-127, 128, (m, n8 * 128), generator=g).to(torch.int8)
    q4 = pack_int4(torch.randint(-8, 8, (m, n4 * 128), generator=g))
    want = split_activation_rows(q4, q8)
    got = split_rows_triton(q4.to(device), q8.to(device))
    assert torch.equal(got.cpu(), want)
    with pytest.raises(ValueError, match="are not"):
        split_rows_triton(torch.zeros(m, 3, dtype=torch.uint8, device=device), q8.to(device))


@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("m,k,pattern,dtype,permuted", [
    (1, 576, "mixed", torch.float16, True), (9, 300, "int8_last", torch.float32, True),
    (17, 640, "alternating", torch.bfloat16, True), (5, 256, "all8", torch.float16, False),
    (3, 384, "all4", torch.float32, True)])
def test_block_mode_by_rows_matches_reference(m, k, pattern, dtype, permuted, rows, device):
    """Block mode's two grids -- one program per (row tile, block), or one per row tile walking all
    its blocks (``rows``; the default from ``ROWS_MIN_M`` rows) -- give the reference's bits,
    packed and FAKE (the dequant path's ``q * s``), gather and identity; class mode ignores it."""
    from cometq.kernels.act_quant import fake_quant_act_triton

    g = torch.Generator(device="cpu").manual_seed(77 * m + k)
    perm = torch.randperm(k, generator=g) if permuted else torch.arange(k)
    lay = ActivationLayout(perm, torch.tensor(_bits(pattern, num_blocks(k)), dtype=torch.int32), 0.9).to(device)
    x = rand_activation(m, k, outliers=3, dtype=dtype, generator=g).to(device)
    q4, q8, sc = quantize_act_triton(x, lay.perm, lay.block_bits, lay.n_int8, "block", rows=rows,
                                     int4_clip=lay.int4_clip, identity_perm=not permuted)
    _assert_same(R.QuantizedActivation(q4, q8, sc, lay, "block"), R.quantize_activation(x, lay, "block"))
    if dtype != torch.float32:
        args = (x, lay.perm, lay.block_bits, lay.n_int8, "block")
        kw = dict(out_dtype=dtype, int4_clip=lay.int4_clip, identity_perm=not permuted)
        assert torch.equal(fake_quant_act_triton(*args, rows=rows, **kw),
                           fake_quant_act_triton(*args, rows=not rows, **kw))
    c = quantize_act_triton(x, lay.perm, lay.block_bits, lay.n_int8, "class", rows=rows, int4_clip=lay.int4_clip)
    _assert_same(R.QuantizedActivation(*c, lay, "class"), R.quantize_activation(x, lay, "class"))


def test_block_mode_by_rows_is_the_default_from_rows_min_m(monkeypatch):
    from cometq.kernels import act_quant as A

    assert A._use_rows(A.ROWS_MIN_M, "block", None) and not A._use_rows(A.ROWS_MIN_M - 1, "block", None)
    assert not A._use_rows(10 ** 6, "class", None) and A._use_rows(1, "block", True)
    x, lay = torch.randn(2, 256), ActivationLayout.from_block_bits(256, [8, 4])
    with pytest.raises(TypeError, match="rows must be a bool or None, got 1"):
        quantize_act_triton(x, lay.perm, lay.block_bits, 1, "block", rows=1)


@pytest.mark.parametrize("scale_mode", ["block", "class"])
@pytest.mark.parametrize("m,k,pattern,dtype,permuted", [
    (1, 576, "mixed", torch.float16, True), (9, 300, "int8_last", torch.float32, True),
    (17, 640, "alternating", torch.bfloat16, True), (5, 256, "all8", torch.float16, False),
    (3, 384, "all4", torch.float32, True), (2, 1100, "mixed", torch.bfloat16, True)])
def test_gather_kernel_matches_reference(m, k, pattern, dtype, permuted, scale_mode, device):
    """The one-row-per-program kernel that permutes on chip (``gather=True``; K = 1100 pads to a
    2048-channel tile with 9 real blocks) gives the reference's bits -- packed, and FAKE equal to
    the per-block kernel's -- with and without the permutation, clipped INT4 scales included."""
    from cometq.kernels.act_quant import fake_quant_act_triton

    g = torch.Generator(device="cpu").manual_seed(91 * m + k)
    perm = torch.randperm(k, generator=g) if permuted else torch.arange(k)
    lay = ActivationLayout(perm, torch.tensor(_bits(pattern, num_blocks(k)), dtype=torch.int32), 0.85).to(device)
    x = rand_activation(m, k, outliers=3, dtype=dtype, generator=g).to(device)
    args = (x, lay.perm, lay.block_bits, lay.n_int8, scale_mode)
    for ident in ((False, True) if not permuted else (False,)):
        kw = dict(int4_clip=lay.int4_clip, identity_perm=ident)
        got = quantize_act_triton(*args, gather=True, **kw)
        _assert_same(R.QuantizedActivation(*got, lay, scale_mode), R.quantize_activation(x, lay, scale_mode))
        for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
            want = fake_quant_act_triton(*args, out_dtype=out_dtype, gather=False, rows=False, **kw)
            assert torch.equal(fake_quant_act_triton(*args, out_dtype=out_dtype, gather=True, **kw), want)


def test_gather_kernel_policy_and_errors(device):
    from cometq.kernels import act_quant as A

    f16 = torch.float16
    assert A._use_gather(A.GATHER_MIN_M, 4096, f16, "block", None, None)
    assert not A._use_gather(A.GATHER_MIN_M - 1, 4096, f16, "block", None, None)
    assert A._use_gather(1, 4096, f16, "class", None, None)  # class mode: at every M
    assert not A._use_gather(10 ** 4, 4096, f16, "block", True, None)  # an explicit grid keeps its kernel
    assert not A._use_gather(10 ** 4, 40000, f16, "block", None, None)  # over the tile limit: the rows kernel
    assert A._use_gather(10 ** 4, 28672, f16, "block", None, None)  # Llama-70B down_proj fits (32768, 64 KiB)
    assert not A._use_gather(10 ** 4, 28672, torch.float32, "block", None, None)  # 128 KiB of fp32: no
    assert A.gather_kp(576) == 1024 and A.gather_kp(4096) == 4096 and A.gather_kp(14336) == 16384
    x = torch.randn(2, 40000, device=device, dtype=f16)
    lay = ActivationLayout.from_block_bits(40000, [4] * num_blocks(40000)).to(device)
    with pytest.raises(ValueError, match="K=40000 needs a 65536-channel row tile"):
        quantize_act_triton(x, lay.perm, lay.block_bits, 0, "block", gather=True)
    with pytest.raises(TypeError, match="gather must be a bool or None, got 'yes'"):
        quantize_act_triton(x[:, :256], lay.perm[:256], lay.block_bits[:2], 0, "block", gather="yes")


@pytest.mark.parametrize("scale_mode", ["block", "class"])
def test_gather_kernel_quotients_near_ties(scale_mode, device):
    """Quotients within a few ulps of a half-integer, where a last-bit error in x / s changes the
    rounded integer: the gather kernel's division fast path (on the GPU; the interpreter divides
    per value) must give the reference's bits.  Each block keeps its absmax element, so the
    scales are the reference's; the other values are rebuilt as (k + 1/2) * s, nudged by 0-3
    ulps either way, for non-power-of-two scales over a wide exponent range."""
    g = torch.Generator(device="cpu").manual_seed(2026)
    m, k = 24, 1024
    nb = num_blocks(k)
    lay = ActivationLayout(torch.randperm(k, generator=g), torch.tensor(_bits("alternating", nb), dtype=torch.int32))
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-20, 20, (m, 1), generator=g).float())
    ref = R.quantize_activation(x, lay, scale_mode)
    s = ref.scales if scale_mode == "block" else ref.scales[:, [0, 1]]
    xp = x[:, lay.perm]  # permuted order: channel c of block b at xp[:, b*128 + c]
    is8 = lay.block_bits == 8
    for b in range(nb):
        sb = s[:, b] if scale_mode == "block" else s[:, 1 if is8[b] else 0]
        qmax = 127 if is8[b] else 7
        blk = xp[:, b * 128:(b + 1) * 128]
        keep = blk.abs().argmax(dim=1)
        kk = torch.randint(-qmax, qmax, (m, 128), generator=g).float() + 0.5
        v = (kk * sb[:, None]).float()
        nudge = torch.randint(-3, 4, (m, 128), generator=g).to(torch.int32)
        v = (v.view(torch.int32) + nudge).view(torch.float32)
        v = torch.where(v.abs() > blk.abs().amax(dim=1, keepdim=True), kk.sign() * 0.0, v)  # never a new absmax
        v[torch.arange(m), keep] = blk[torch.arange(m), keep]
        xp[:, b * 128:(b + 1) * 128] = v
    x = torch.empty_like(xp)
    x[:, lay.perm] = xp
    want = R.quantize_activation(x, lay, scale_mode)
    assert torch.equal(want.scales, ref.scales)
    lay_d = lay.to(device)
    got = quantize_act_triton(x.to(device), lay_d.perm, lay_d.block_bits, lay.n_int8, scale_mode, gather=True)
    _assert_same(R.QuantizedActivation(*(t.cpu() for t in got), lay, scale_mode), want)
