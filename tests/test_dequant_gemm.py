"""The W4Ax GEMM's dequant path (large M: dequantize both operands, cuBLAS) vs the reference.

Runs the Triton kernels under TRITON_INTERPRET=1 on CPU (tests/conftest.py) and natively on a GPU.
"""
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
