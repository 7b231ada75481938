"""Triton W4Ax GEMM with asymmetric INT4 weights (``w = scale * q + offset``) vs cometq.reference.

The ASYM kernels add ``a_scale[m, s] * w_offset[n, s] * asum[m, s]`` per K segment,
``asum`` the sum of the segment's activation integers.  Checked here: the int32
segment accumulators and the int32 activation sums exactly (the debug outputs),
outputs within the named tolerances of cometq.testing, on every path (tiled,
split-K, persistent), with swap_ab / interleave8, both scale modes, per-channel
weights and groups 16..256, and the block maps all-INT4 / all-INT8 / mixed /
alternating.  Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py).
"""
import itertools

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

from cometq.kernels.act_quant import quantize_activation_triton  # noqa: E402
from cometq.kernels.w4ax_gemm import GemmConfig, w4ax_gemm_triton  # noqa: E402
import cometq.kernels.w4ax_gemm as G  # noqa: E402

RTOL = {torch.float32: GEMM_FP32_RTOL, torch.float16: GEMM_FP16_RTOL, torch.bfloat16: GEMM_BF16_RTOL}


def _bits(pattern: str, nb: int):
    return {
        "all4": [4] * nb,
        "all8": [8] * nb,
        "mixed": [8] * max(1, nb // 4) + [4] * (nb - max(1, nb // 4)),
        "alternating": [8 if i % 2 == 0 else 4 for i in range(nb)],
    }[pattern]


def _operands(m, k, n, pattern, scale_mode, group, device, seed, bias=True):
    """Random packed operands over the full integer ranges (INT4 -8..7, INT8 -128..127) and
    random signed offsets of the size an asymmetric quantizer produces (about the group mean)."""
    g = torch.Generator().manual_seed(seed)
    lay = ActivationLayout.from_block_bits(k, _bits(pattern, num_blocks(k)))
    k_pad = padded_k(k)
    q4 = torch.randint(0, 256, (m, lay.n_int4 * 64), generator=g, dtype=torch.uint8)
    q8 = torch.randint(-128, 128, (m, lay.n_int8 * 128), generator=g, dtype=torch.int8)
    ns = lay.n_blocks if scale_mode == "block" else 2
    a_sc = torch.rand(m, ns, generator=g) * 0.1 + 0.01
    gw = R.check_group_size(group, k_pad)
    qweight = torch.randint(0, 256, (n, k_pad // 2), generator=g, dtype=torch.uint8)
    w_sc = torch.rand(n, k_pad // gw, generator=g) * 0.05 + 0.005
    w_off = (torch.rand(n, k_pad // gw, generator=g) - 0.5) * 0.1
    qa = R.QuantizedActivation(q4.to(device), q8.to(device), a_sc.to(device), lay.to(device), scale_mode)
    qw = R.QuantizedWeight(qweight.to(device), w_sc.to(device), k, group, w_off.to(device))
    b = torch.randn(n, generator=g).to(device) if bias else None
    return qa, qw, b


def _run(qa, qw, bias, out_dtype, **kw):
    return w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, qw.group_size,
                            bias, out_dtype, qa.scale_mode, w_offsets=qw.offsets, **kw)


def _check(qa, qw, bias, out_dtype, out):
    y, acc, asum = out
    assert y.dtype == out_dtype and y.shape == (qa.m, qw.out_features)
    assert torch.equal(acc, R.w4ax_int_accumulators(qa, qw)), "int32 segment accumulators differ"
    assert torch.equal(asum, R.w4ax_act_sums(qa, qw)), "int32 activation segment sums differ"
    ref = R.w4ax_gemm(qa, qw, bias, torch.float64)
    torch.testing.assert_close(y.double(), ref.to(out_dtype).double(), rtol=RTOL[out_dtype], atol=GEMM_FP32_ATOL)


# (block map x scale mode x group) crossed, with M, path, config flavour and out dtype
# rotated so each value appears several times without the full product (interpreter time)
_CFG = {  # interpreter-sized tiles: few programs
    "auto": None,
    "swap": GemmConfig(block_m=16, block_n=128, group_m=2, num_warps=4, num_stages=1, swap_ab=True),
    "il8": GemmConfig(block_m=32, block_n=128, group_m=2, num_warps=4, num_stages=1, interleave8=True),
    "swap+il8": GemmConfig(block_m=32, block_n=128, group_m=2, num_warps=4, num_stages=1, swap_ab=True,
                           interleave8=True),
}
_PATHS = ("tiled", "splitk", "persistent")
_MS = (1, 3, 17)
_OUT = (torch.float32, torch.float16, torch.bfloat16)
CASES = []
for i, (pattern, mode, group) in enumerate(itertools.product(
        ("all4", "all8", "mixed", "alternating"), ("block", "class"), (-1, 128, 64))):
    CASES.append((i, pattern, mode, group, _MS[i % 3], _PATHS[(i // 3) % 3], tuple(_CFG)[i % 4], _OUT[(i // 2) % 3]))


def _with_split(cfg, path):
    if cfg is None or path != "splitk":
        return cfg
    return GemmConfig(cfg.block_m, cfg.block_n, cfg.group_m, 3, cfg.num_warps, cfg.num_stages, cfg.swap_ab,
                      cfg.interleave8)


@pytest.mark.parametrize("case,pattern,mode,group,m,path,flavour,out_dtype", CASES)
def test_asym_matches_reference(case, pattern, mode, group, m, path, flavour, out_dtype, device):
    qa, qw, b = _operands(m, 576, 200, pattern, mode, group, device, seed=300 + case, bias=case % 2 == 0)
    out = _run(qa, qw, b, out_dtype, path=path, config=_with_split(_CFG[flavour], path), programs=4,
               return_int_acc=True)
    _check(qa, qw, b, out_dtype, out)


@pytest.mark.parametrize("group,mode,flavour,path", [(32, "block", "swap", "tiled"), (16, "class", "auto", "splitk"),
                                                     (32, "class", "swap+il8", "persistent")])
def test_asym_small_groups_masked_segments(group, mode, flavour, path, device):
    # G < 64: the segment is cut out of a 32-byte chunk by masking, and its activation sum must
    # be the masked segment's, not the chunk's (interleave8 falls back to even/odd loads here)
    qa, qw, b = _operands(3, 300, 72, "alternating", mode, group, device, seed=group)
    out = _run(qa, qw, b, torch.float32, path=path, config=_with_split(_CFG[flavour], path), programs=3,
               return_int_acc=True)
    _check(qa, qw, b, torch.float32, out)


@pytest.mark.parametrize("mode,path", [("class", "tiled"), ("block", "persistent")])
def test_asym_group_spanning_blocks(mode, path, device):
    # G = 256 > 128: one offset over two activation blocks (two segments with one offset column)
    qa, qw, b = _operands(17, 500, 72, "mixed", mode, 256, device, seed=256)
    out = _run(qa, qw, b, torch.float32, path=path, programs=3, return_int_acc=True)
    _check(qa, qw, b, torch.float32, out)


@pytest.mark.parametrize("flavour,path", [("auto", "tiled"), ("swap", "splitk"), ("swap+il8", "persistent"),
                                          ("il8", "tiled")])
def test_asym_class_chained_int32_without_debug(flavour, path, device):
    # DEBUG off, class mode + per-channel weights: the int32 accumulator and the activation sum
    # of a whole run are chained through the blocks and rescaled once (not the debug code path)
    qa, qw, b = _operands(17, 576, 200, "mixed", "class", -1, device, seed=41)
    y = _run(qa, qw, b, torch.float32, path=path, config=_with_split(_CFG[flavour], path), programs=3)
    ref = R.w4ax_gemm(qa, qw, b, torch.float64)
    torch.testing.assert_close(y.double(), ref, rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)


@pytest.mark.parametrize("mode,group,clip", [("block", 128, 0.8375), ("class", -1, 0.9), ("block", 32, 0.5)])
def test_asym_real_quantized_data_end_to_end(mode, group, clip, device):
    """quantize_weight_rtn(sym=False) weights, clipped FMPQ activations, Triton all the way."""
    g = torch.Generator().manual_seed(7)
    k, n = 576, 200
    x = rand_activation(17, k, outliers=6, generator=g)
    lay = R.fmpq_calibrate(x.abs().amax(0), int8_blocks=1).with_clip(clip).to(device)
    w = lay.permute_columns(rand_weight(n, k, generator=g) + 0.02).to(device)  # off-centre: offsets matter
    qw = R.quantize_weight_rtn(w, group, sym=False)
    assert qw.offsets is not None
    x = x.to(device)
    qa = quantize_activation_triton(x, lay, mode)
    ref_qa = R.quantize_activation(x, lay, mode)
    assert torch.equal(qa.q4, ref_qa.q4) and torch.equal(qa.q8, ref_qa.q8) and torch.equal(qa.scales, ref_qa.scales)
    b = torch.randn(n, generator=g).to(device)
    out = _run(qa, qw, b, torch.float32, return_int_acc=True)
    _check(qa, qw, b, torch.float32, out)
    # the offset term is not negligible here: dropping it moves the result far outside tolerance
    y_sym = w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, group, b,
                             torch.float32, mode)
    assert (y_sym - out[0]).abs().max() > 100 * GEMM_FP32_ATOL
    # and the whole linear matches the reference linear (same quantized operands)
    torch.testing.assert_close(out[0], R.w4ax_linear(x, qw, lay, b, mode), rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)


@pytest.mark.parametrize("group,mode,flavour", [(32, "block", "swap"), (128, "block", "auto"), (-1, "class", "il8")])
def test_asym_deterministic_reduction(group, mode, flavour, device):
    """deterministic=True with offsets (the recommended asym g32 recipe included): integers and
    activation sums exact, within tolerance, bit-identical on a repeat and between split-K and a
    stream-K schedule that cut the tile's block list at the same position."""
    qa, qw, b = _operands(3, 512, 72, "all4", mode, group, device, seed=70 + group)  # NB = 4
    base = _CFG[flavour] or GemmConfig(block_m=16, block_n=128, group_m=2, num_warps=4, num_stages=1)
    cfg2 = GemmConfig(base.block_m, base.block_n, base.group_m, 2, base.num_warps, base.num_stages, base.swap_ab,
                      base.interleave8)
    out = _run(qa, qw, b, torch.float32, path="splitk", config=cfg2, deterministic=True, return_int_acc=True)
    _check(qa, qw, b, torch.float32, out)
    y = out[0]
    again = _run(qa, qw, b, torch.float32, path="splitk", config=cfg2, deterministic=True)
    assert torch.equal(y.view(torch.int32), again.view(torch.int32))
    # one tile, all-INT4 (equal costs): 2 persistent programs cut the 4 blocks at 2, like SPLIT = 2
    y_p = _run(qa, qw, b, torch.float32, path="persistent", config=cfg2, programs=2, deterministic=True)
    assert torch.equal(y.view(torch.int32), y_p.view(torch.int32))


def test_asym_via_ops_triton_backend(device):
    qa, qw, b = _operands(3, 576, 200, "mixed", "block", 64, device, seed=5)
    ref = R.w4ax_gemm(qa, qw, b, torch.float64)
    y = ops.w4ax_gemm_q(qa, qw, b, torch.float16, backend="triton")  # no BackendUnsupported any more
    torch.testing.assert_close(y.double(), ref.half().double(), rtol=GEMM_FP16_RTOL, atol=GEMM_FP32_ATOL)
    y32 = ops.w4ax_gemm(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, qw.group_size, b,
                        torch.float32, "block", backend="triton", w_offsets=qw.offsets)
    torch.testing.assert_close(y32.double(), ref, rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)


def test_symmetric_call_keeps_its_return_shape(device):
    # without offsets the debug return stays (y, acc); with them it is (y, acc, asum)
    qa, qw, b = _operands(3, 256, 40, "mixed", "block", 128, device, seed=2)
    out = w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, b,
                           torch.float32, "block", return_int_acc=True)
    assert len(out) == 2
    assert len(_run(qa, qw, b, torch.float32, return_int_acc=True)) == 3
    empty = _run(R.QuantizedActivation(qa.q4[:0], qa.q8[:0], qa.scales[:0], qa.layout, "block"), qw, b,
                 torch.float32, return_int_acc=True)
    assert empty[0].shape == (0, 40) and empty[2].shape == (0, 2)


def test_asym_errors(device):
    qa, qw, b = _operands(3, 256, 40, "mixed", "block", 128, device, seed=1)
    with pytest.raises(TypeError, match=r"w_offsets must have dtype .* got torch.float16"):
        w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, b,
                         torch.float32, "block", w_offsets=qw.offsets.half())
    with pytest.raises(ValueError, match=r"w_offsets shape \(40, 1\) != w_scales shape \(40, 2\)"):
        w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, b,
                         torch.float32, "block", w_offsets=qw.offsets[:, :1])
    with pytest.raises(ValueError, match="w_offsets must be 2-D"):
        w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, b,
                         torch.float32, "block", w_offsets=qw.offsets[:, 0])
    with pytest.raises(TypeError, match="w_offsets must be a torch.Tensor"):
        w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, 128, b,
                         torch.float32, "block", w_offsets=[0.0] * 80)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 1024])
@pytest.mark.parametrize("mode,group", [("block", 128), ("class", -1), ("block", 32)])
@pytest.mark.parametrize("path", ["auto", "persistent"])
def test_gpu_asym_llama_shape(m, mode, group, path):
    """Compiled ASYM kernels (autotuned configs), Llama-3-8B o_proj shape, clipped activations;
    integers exact for M <= 64."""
    n, k = 4096, 4096
    g = torch.Generator().manual_seed(m)
    lay = ActivationLayout.from_block_bits(k, [8] * 4 + [4] * 28).with_clip(0.9)
    x = rand_activation(m, k, outliers=8, generator=g).cuda()
    lay = lay.to("cuda")
    qa = quantize_activation_triton(x, lay, mode)
    ref_qa = R.quantize_activation(x, lay, mode)
    assert torch.equal(qa.q4, ref_qa.q4) and torch.equal(qa.q8, ref_qa.q8) and torch.equal(qa.scales, ref_qa.scales)
    qw = R.quantize_weight_rtn((rand_weight(n, k, generator=g) + 0.01).cuda(), group, sym=False)
    want_acc = m <= 64
    out = _run(qa, qw, None, torch.float16, path=path, return_int_acc=want_acc)
    if want_acc:
        _check(qa, qw, None, torch.float16, out)
    else:
        ref = R.w4ax_gemm(qa, qw, None, torch.float64)
        cfg = G.chosen_config(m, n, k, 4, path=path, scale_mode=mode, group_size=group, asym=True)
        if path == "auto" and cfg is not None and cfg.dequant:
            # M >= 1024 runs the dequant path untuned: fp16 operands, within DEQUANT_GEMM_RTOL of max |y|
            from cometq.kernels.dequant_gemm import DEQUANT_GEMM_RTOL

            assert float((out.double() - ref).abs().max()) <= DEQUANT_GEMM_RTOL[torch.float16] * float(ref.abs().max())
        else:
            torch.testing.assert_close(out.double(), ref.half().double(), rtol=GEMM_FP16_RTOL, atol=GEMM_FP32_ATOL)


# ---------------------------------------------------------------------------------------------
# the Hopper TMA kernel with offsets (ASYM; groups >= 128): W4AxConfig()'s asym-g128 format
# ---------------------------------------------------------------------------------------------
_TMA_CFGS = {
    "64x64": GemmConfig(block_m=64, block_n=64, group_m=2, num_warps=4, num_stages=1, tma=True),
    "128x64-split-rows": GemmConfig(block_m=128, block_n=64, group_m=2, num_warps=4, num_stages=1, tma=True),
    "decode-split3": GemmConfig(block_m=16, block_n=64, group_m=1, split=3, num_warps=4, num_stages=1, tma=True),
}
TMA_ASYM_CASES = []
for i, (pattern, (mode, group)) in enumerate(itertools.product(
        ("all4", "all8", "mixed", "alternating"), (("block", 128), ("class", -1), ("class", 128), ("block", -1)))):
    TMA_ASYM_CASES.append((i, pattern, mode, group, (1, 17, 70)[i % 3], tuple(_TMA_CFGS)[i % 3], _OUT[i % 3]))


@pytest.mark.parametrize("case,pattern,mode,group,m,flavour,out_dtype", TMA_ASYM_CASES)
def test_tma_asym_matches_reference(case, pattern, mode, group, m, flavour, out_dtype, device):
    """Every block's int32 result and activation sum exact (DEBUG), the output within tolerance:
    both scale modes, per-channel / g128 offsets, split activation rows, decode split-K."""
    qa, qw, b = _operands(m, 576, 200, pattern, mode, group, device, seed=600 + case, bias=case % 2 == 0)
    out = _run(qa, qw, b, out_dtype, path="tma", config=_TMA_CFGS[flavour], return_int_acc=True)
    _check(qa, qw, b, out_dtype, out)


@pytest.mark.parametrize("mode,group,pattern", [("class", -1, "mixed"), ("class", -1, "alternating"),
                                                ("block", 128, "mixed"), ("class", 128, "all8"),
                                                ("block", 256, "alternating")])
def test_tma_asym_without_debug(mode, group, pattern, device):
    """DEBUG off: class mode + per-channel offsets chains the run's activation sum (one rank-1
    update per precision run); block mode one per block (G = 256: one offset column over two
    blocks) -- both equal to the pointer kernel."""
    qa, qw, b = _operands(37, 512, 200, pattern, mode, group, device, seed=43)
    y = _run(qa, qw, b, torch.float32, path="tma")
    ref = R.w4ax_gemm(qa, qw, b, torch.float64)
    torch.testing.assert_close(y.double(), ref, rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)
    torch.testing.assert_close(y, _run(qa, qw, b, torch.float32, path="tiled"), rtol=GEMM_FP32_RTOL,
                               atol=GEMM_FP32_ATOL)
    # the offset term is really applied (dropping it moves the result far outside tolerance)
    y_sym = w4ax_gemm_triton(qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, qw.group_size, b,
                             torch.float32, mode, path="tma")
    assert (y_sym - y).abs().max() > 100 * GEMM_FP32_ATOL


def test_tma_asym_block_major_weights_and_auto(device):
    """Block-major weights give the same bits on the TMA kernel with offsets; ``path="auto"``
    now offers the TMA configs for asymmetric g128 weights (tma_available says yes)."""
    from cometq.layout import weights_block_major

    qa, qw, b = _operands(40, 576, 200, "mixed", "block", 128, device, seed=91)
    cfg = _TMA_CFGS["64x64"]
    args = (qa.q4, qa.q8, qa.scales, qa.layout.block_bits)
    rest = (qw.scales, 128, b, torch.float32, "block")
    y = w4ax_gemm_triton(*args, qw.qweight, *rest, path="tma", config=cfg, w_offsets=qw.offsets)
    y_bm = w4ax_gemm_triton(*args, weights_block_major(qw.qweight), *rest, path="tma", config=cfg,
                            w_offsets=qw.offsets)
    assert torch.equal(y.view(torch.int32), y_bm.view(torch.int32))
    assert G.tma_available(torch.device(device), asym=True, group=128) is None or device == "cuda"
    assert any(c.tma for c in G.gen_configs(64, 200, 576, 1, interpret=False, tma="also"))


@pytest.mark.parametrize("flavour,mode,group,pattern", [("swap+il8", "block", 128, "mixed"),
                                                        ("il8", "class", -1, "alternating"),
                                                        ("swap", "block", 64, "all4")])
def test_asym_64_row_tiles_sum_on_the_tensor_cores(flavour, mode, group, pattern, device):
    """64-row activation tiles take their per-token sums from an int8 MMA against a ones tile
    (``_row_sum``; smaller tiles keep ``tl.sum``): the sums and accumulators stay exact."""
    base = _CFG[flavour]
    cfg = GemmConfig(64, 128, 2, 1, 4, 1, base.swap_ab, base.interleave8)
    qa, qw, b = _operands(70, 576, 200, pattern, mode, group, device, seed=64 + len(flavour))
    out = _run(qa, qw, b, torch.float32, path="tiled", config=cfg, return_int_acc=True)
    _check(qa, qw, b, torch.float32, out)
