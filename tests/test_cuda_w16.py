"""The CUDA w16 GEMM (csrc/w16_gemm.cu, ``cometq_C::w16_gemm``) against its op's reference, on a GPU.

``ops._ref_w16_gemm`` is the spec: the same W' values (the nibble times the scale, plus the
offset, both rounded to the operand dtype, one rounding), summed in float64; the kernel sums in
fp32, so outputs agree within :data:`RTOL` of max |y|.  Odd shapes (M = 1 ... 256 across the
16 / 32 / 64-token tiles, N past a tile edge, K = 576 -> 640), every group-size family, both
weight formats and storage orders, both operand dtypes, every output dtype, bias, split-K
(including a split with no K blocks), both tile variants, error paths and opcheck.  The CPU
emulation of the same kernel is tests/test_cuda_w16_emulation.py.

Run by bench/gpu_check.sh (``pytest -m gpu``).
"""
from __future__ import annotations

import os

import pytest
import torch

from cometq import ops
from cometq import reference as R
from cometq.layout import weights_block_major
from cometq.testing import check_inkernel_reduction

pytestmark = pytest.mark.gpu

DEV = "cuda"
#: kernel (fp32 sums) vs the float64 reference on identical operands, relative to max |y|
#: (16-bit outputs add their own final rounding)
RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def C():
    if os.environ.get("COMETQ_SKIP_CUDA", "0") == "1":
        pytest.skip("COMETQ_SKIP_CUDA=1")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import cometq._cuda_register as CR

    if not CR.HAS_W16:
        pytest.skip("the built extension predates cometq_C::w16_gemm")
    return CR


def _operands(m, n, k, group, sym, dt, seed, bias_dtype=None):
    g = torch.Generator().manual_seed(seed)
    k_pad = -(-k // 128) * 128
    w = torch.randn(n, k, generator=g) * 0.05
    qw = R.quantize_weight_rtn(w, group, sym=sym)
    a = (torch.randn(m, k_pad, generator=g) * (1 + 4 * (torch.rand(k_pad, generator=g) > 0.9))).to(dt)
    gs = k_pad if group in (None, -1) else group
    bias = torch.randn(n, generator=g).to(bias_dtype) if bias_dtype is not None else None
    return a, qw, gs, bias


def _to(t):
    return None if t is None else t.to(DEV)


def _check(y, ref, out_dtype):
    assert y.dtype == out_dtype and y.shape == ref.shape
    err = float((y.double().cpu() - ref.double()).abs().max())
    scale = float(ref.double().abs().max())
    assert err <= RTOL[out_dtype] * scale, (out_dtype, err, scale)


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("m", [1, 3, 16, 17, 33, 64, 100, 256])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_w16_matches_reference_across_tiles(C, m, dt):
    a, qw, gs, _ = _operands(m, 136, 576, 128, False, dt, m)
    ref = ops._ref_w16_gemm(a, qw.qweight, qw.scales, qw.offsets, gs, None, torch.float32)
    for tile in C.w16_tiles(DEV, gs):  # (the wgmma tiles on an sm_90 device)
        y = C.cuda_w16_gemm(_to(a), _to(qw.qweight), _to(qw.scales), _to(qw.offsets), gs, None, torch.float32,
                            tile=tile)
        _check(y, ref, torch.float32)


@pytest.mark.parametrize("group", [16, 32, 64, 128, 256, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("block_major", [False, True])
def test_w16_weight_formats(C, group, sym, block_major):
    dt = torch.float16
    a, qw, gs, _ = _operands(9, 200, 1024, group, sym, dt, abs(group) + sym)
    ref = ops._ref_w16_gemm(a, qw.qweight, qw.scales, qw.offsets, gs, None, torch.float32)
    qweight = weights_block_major(_to(qw.qweight)) if block_major else _to(qw.qweight)
    y = C.cuda_w16_gemm(_to(a), qweight, _to(qw.scales), _to(qw.offsets), gs, None, torch.float32)
    _check(y, ref, torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.float32])
@pytest.mark.parametrize("split_k", [0, 1, 2, 3, 5])
def test_w16_out_dtype_bias_split(C, out_dtype, bias_dtype, split_k):
    dt = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float16
    a, qw, gs, bias = _operands(17, 72, 512, 64, False, dt, split_k, bias_dtype)  # 4 blocks: split 5 has empty ones
    ref = ops._ref_w16_gemm(a, qw.qweight, qw.scales, qw.offsets, gs, bias, out_dtype)
    for tile in C.w16_tiles(DEV, gs):
        y = C.cuda_w16_gemm(_to(a), _to(qw.qweight), _to(qw.scales), _to(qw.offsets), gs, _to(bias), out_dtype,
                            split_k=split_k, tile=tile)
        _check(y, ref, out_dtype)


def test_w16_llama_shapes(C):
    """Decode-size M on Llama-3-8B layer shapes (K = 4096 / 14336), the kernel's split rule."""
    for m, n, k in ((1, 6144, 4096), (64, 4096, 14336), (16, 28672, 4096)):
        a, qw, gs, _ = _operands(m, n, k, 128, False, torch.float16, m + n)
        ref = ops._ref_w16_gemm(a, qw.qweight, qw.scales, qw.offsets, gs, None, torch.float32)
        y = C.cuda_w16_gemm(_to(a), _to(qw.qweight), _to(qw.scales), _to(qw.offsets), gs, None, torch.float32)
        _check(y, ref, torch.float32)


def test_w16_dispatch_and_route(C):
    """The "cuda" backend of the w16 GEMM op (its (split, tile) tuned per case) and the auto choice."""
    a, qw, gs, bias = _operands(33, 264, 640, 128, False, torch.float16, 3, torch.float16)
    ref = ops._ref_w16_gemm(a, qw.qweight, qw.scales, qw.offsets, gs, bias, torch.float16)
    for be in ("cuda", None):
        y = ops._dispatch("w16_gemm", torch.device(DEV), be, _to(a), _to(qw.qweight), _to(qw.scales),
                          _to(qw.offsets), gs, _to(bias), torch.float16)
        _check(y, ref, torch.float16)
    with pytest.raises(RuntimeError, match="cannot run op 'w16_gemm'"):  # fp32 operands: not this kernel's
        ops._dispatch("w16_gemm", torch.device(DEV), "cuda", _to(a).float(), _to(qw.qweight), _to(qw.scales),
                      None, gs, None, torch.float32)


@pytest.mark.parametrize("m,n,k,split_k,tile", [(1, 4096, 4096, 8, 0), (17, 264, 1280, 3, 0), (64, 520, 2048, 4, 1),
                                                (100, 136, 640, 5, 0), (40, 260, 2048, 3, 3), (64, 130, 1280, 2, 2),
                                                pytest.param(64, 520, 2048, 4, 4, id="wgmma-64x128"),
                                                pytest.param(40, 200, 1280, 3, 5, id="wgmma-64x64"),
                                                pytest.param(64, 600, 2048, 3, 7, id="wgmma-64x256"),
                                                pytest.param(9, 4096, 4096, 4, 8, id="wgmma-16x128")])
def test_w16_splitk_fixup_bit_identical(C, m, n, k, split_k, tile):
    """The in-kernel split-K reduction (tile counters: each tile's last split sums the slabs) gives
    the finalize kernel's bits -- twice in a row and replayed from a CUDA graph -- and leaves every
    counter zero."""
    if tile in C.W16_WGMMA_TILES and not _sm90():
        pytest.skip("the wgmma tiles need an sm_90 device")
    a, qw, gs, bias = _operands(m, n, k, 128, False, torch.float16, m * 7 + split_k, torch.float16)
    args = (_to(a), _to(qw.qweight), _to(qw.scales), _to(qw.offsets), gs, _to(bias), torch.float16)
    kw = dict(split_k=split_k, tile=tile)
    want = C.cuda_w16_gemm(*args, **kw)
    _check(want, ops._ref_w16_gemm(a, qw.qweight, qw.scales, qw.offsets, gs, bias, torch.float16), torch.float16)
    check_inkernel_reduction(lambda c: C.cuda_w16_gemm(*args, **kw, tile_counters=c), want,
                             torch.zeros(1 << 16, dtype=torch.int32, device=DEV))


def test_w16_rejects_bad_inputs(C):
    a, qw, gs, _ = _operands(4, 64, 256, 128, True, torch.float16, 1)
    a, qweight, sc = _to(a), _to(qw.qweight), _to(qw.scales)
    with pytest.raises(TypeError, match="a must have dtype"):
        C.cuda_w16_gemm(a.float(), qweight, sc, None, gs, None, torch.float16)
    with pytest.raises(ValueError, match="holds K_pad=256 but a shape"):
        C.cuda_w16_gemm(torch.zeros(4, 384, dtype=torch.float16, device=DEV), qweight, sc, None, gs, None,
                        torch.float16)
    with pytest.raises(ValueError, match="tile must be"):
        C.cuda_w16_gemm(a, qweight, sc, None, gs, None, torch.float16, tile=9)
    with pytest.raises(ValueError, match="w_scales shape"):
        C.cuda_w16_gemm(a, qweight, sc[:, :0], None, gs, None, torch.float16)
    with pytest.raises(ValueError, match="tile_counters must be 1-D int32"):
        C.cuda_w16_gemm(a, qweight, sc, None, gs, None, torch.float16, tile_counters=torch.zeros(8, device=DEV))
    # an offset view of A' is copied to an aligned buffer (cp.async needs 16-byte rows), same result
    big = torch.zeros(4 * 256 + 8, dtype=torch.float16, device=DEV)
    view = big[8:].view(4, 256)
    view.copy_(a)
    assert torch.equal(C.cuda_w16_gemm(view, qweight, sc, None, gs, None, torch.float32),
                       C.cuda_w16_gemm(a, qweight, sc, None, gs, None, torch.float32))
    # M = 0: an empty output, no launch
    assert C.cuda_w16_gemm(a[:0], qweight, sc, None, gs, None, torch.float16).shape == (0, 64)


@pytest.mark.parametrize("tile", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("m,n,k,group,sym,block_major,dt", [
    (64, 200, 1024, 128, False, False, torch.float16),   # the decode batch, N past a 128-row tile
    (17, 136, 576, -1, True, True, torch.bfloat16),     # per-channel, K = 576 -> 640, block-major
    (100, 384, 2048, 256, False, False, torch.bfloat16),  # two token tiles, G = 256
    (33, 4096, 4096, 128, True, True, torch.float16),   # 8B.o, block-major (the serving format)
])
def test_w16_wgmma_tiles(C, tile, m, n, k, group, sym, block_major, dt):
    """The wgmma kernel (sm_90 only) against the reference: both operand dtypes, both weight
    formats and storage orders, a bias and every output dtype, with and without split-K."""
    if not _sm90():
        pytest.skip("the wgmma tiles need an sm_90 device")
    a, qw, gs, bias = _operands(m, n, k, group, sym, dt, m + n + tile, torch.float16)
    qweight = weights_block_major(_to(qw.qweight)) if block_major else _to(qw.qweight)
    for out_dtype in (torch.float32, dt):
        ref = ops._ref_w16_gemm(a, qw.qweight, qw.scales, qw.offsets, gs, bias, out_dtype)
        for split_k in (1, 3, 0):
            y = C.cuda_w16_gemm(_to(a), qweight, _to(qw.scales), _to(qw.offsets), gs, _to(bias), out_dtype,
                                split_k=split_k, tile=tile)
            _check(y, ref, out_dtype)


@pytest.mark.parametrize("tile", [4, 7])
def test_w16_wgmma_pdl_same_bits_after_the_act_quant_kernel(C, tile):
    """A programmatic dependent launch of the wgmma GEMM right after the CUDA act-quant kernel that
    produces its A' (which lets it start early): the same bits as a plain launch, eagerly and
    replayed from a CUDA graph (three rounds, the activations changed between replays)."""
    if not _sm90():
        pytest.skip("the wgmma tiles need an sm_90 device")
    if not C.HAS_FAKE_QUANT:
        pytest.skip("the built extension predates the FAKE act-quant op")
    m, n, k = 64, 520, 2048
    g = torch.Generator().manual_seed(tile)
    qw = R.quantize_weight_rtn(torch.randn(n, k, generator=g) * 0.05, 128, sym=False)
    qweight, sc, off = _to(qw.qweight), _to(qw.scales), _to(qw.offsets)
    perm = torch.randperm(k, generator=g).to(DEV)
    bits = (torch.arange(k // 128) % 4 == 0).to(torch.int32).to(DEV) * 4 + 4  # every 4th block INT8
    x = torch.randn(m, k, generator=g).half().to(DEV)

    def step(pdl):
        a = C.cuda_fake_quant_act(x, perm, bits, int((bits == 8).sum()), "block", 1.0, torch.float16)
        return C.cuda_w16_gemm(a, qweight, sc, off, 128, None, torch.float16, split_k=2, tile=tile, pdl=pdl)

    want = step(False)
    assert torch.equal(step(True), want)
    graph = torch.cuda.CUDAGraph()
    step(True)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        y = step(True)
    for _ in range(3):
        x.copy_(torch.randn(m, k, generator=g).half().to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, step(False))
    with pytest.raises(ValueError, match="pdl=True .* applies to the wgmma tiles"):
        C.cuda_w16_gemm(x[:, :128].contiguous(), qweight[:, :64].contiguous(), sc[:, :1].contiguous(), None, 128,
                        None, torch.float16, tile=0, pdl=True)


def test_w16_wgmma_tiles_reject_what_they_cannot_run(C):
    a, qw, gs, _ = _operands(32, 64, 256, 64, True, torch.float16, 5)
    a, qweight, sc = _to(a), _to(qw.qweight), _to(qw.scales)
    if _sm90():
        with pytest.raises(ValueError, match="needs a weight group of at least 128"):
            C.cuda_w16_gemm(a, qweight, sc, None, gs, None, torch.float16, tile=4)
        with pytest.raises(RuntimeError, match="needs a weight group of at least 128"):  # the op's own check
            torch.ops.cometq_C.w16_gemm(a, qweight, sc, None, gs, None, torch.float16, 1, 5, None)
        assert set(C.w16_tiles(DEV, 128)) == set(C.W16_TILES) and not set(C.w16_tiles(DEV, 64)) & {4, 5, 6, 7, 8}
    else:
        a2, qw2, gs2, _ = _operands(32, 64, 256, 128, True, torch.float16, 6)
        with pytest.raises(ValueError, match="needs an sm_90"):
            C.cuda_w16_gemm(_to(a2), _to(qw2.qweight), _to(qw2.scales), None, gs2, None, torch.float16, tile=6)
        assert not set(C.w16_tiles(DEV, 128)) & set(C.W16_WGMMA_TILES)


def test_w16_opcheck(C):
    a, qw, gs, bias = _operands(5, 64, 256, 64, False, torch.float16, 2, torch.float16)
    args = (_to(a), _to(qw.qweight), _to(qw.scales), _to(qw.offsets), gs, _to(bias), torch.float16, 2, 1)
    torch.library.opcheck(torch.ops.cometq_C.w16_gemm.default, args)
