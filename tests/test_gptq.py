"""GPTQ: format, equivalence to RTN when the Hessian is diagonal, lower output error on correlated inputs."""
import pytest
import torch

from cometq import reference as R
from cometq.gptq import gptq_quantize
from cometq.layout import unpack_int4


def _correlated_inputs(m, k, gen):
    # x = z @ A with a random mixing matrix: strongly correlated channels, a few large ones
    z = torch.randn(m, k // 4, generator=gen)
    a = torch.randn(k // 4, k, generator=gen)
    x = z @ a + 0.1 * torch.randn(m, k, generator=gen)
    x[:, :5] *= 8.0
    return x


def _out_err(x, w, qw):
    wd = R.dequantize_weight(qw)
    return float(((x @ w.T - x @ wd.T) ** 2).mean())


@pytest.mark.parametrize("group", [-1, 32, 128, 256])
def test_gptq_beats_rtn_on_correlated_inputs(group):
    gen = torch.Generator().manual_seed(1)
    k, n = 576 if group != 256 else 512, 40
    x = _correlated_inputs(1024, k, gen)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    h = 2 * x.T @ x / x.shape[0]
    qg = gptq_quantize(w, h, group)
    qr = R.quantize_weight_rtn(w, group)
    e_g, e_r = _out_err(x, w, qg), _out_err(x, w, qr)
    assert e_g <= e_r, (e_g, e_r)
    assert e_g < 0.8 * e_r  # GPTQ's whole point: clearly better, not a tie
    # format: same as RTN's
    assert qg.qweight.shape == qr.qweight.shape and qg.scales.shape == qr.scales.shape
    assert qg.qweight.dtype == torch.uint8 and qg.scales.dtype == torch.float32
    q = unpack_int4(qg.qweight)
    assert int(q.min()) >= -7 and int(q.max()) <= 7
    assert not bool(q[:, k:].any())  # padding columns stay zero


def test_diagonal_hessian_reduces_to_rtn_exactly():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(17, 200, generator=gen)
    h = torch.diag(torch.rand(200, generator=gen) + 0.5)
    for g in (-1, 64, 128):
        qg = gptq_quantize(w, h, g)
        qr = R.quantize_weight_rtn(w, g)
        assert torch.equal(qg.qweight, qr.qweight)
        assert torch.equal(qg.scales, qr.scales)


def test_act_order_keeps_stored_group_order():
    gen = torch.Generator().manual_seed(3)
    k, n = 384, 24
    x = _correlated_inputs(512, k, gen)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    h = 2 * x.T @ x / x.shape[0]
    qa = gptq_quantize(w, h, 128, act_order=True)
    qr = R.quantize_weight_rtn(w, 128)
    # static groups: scales are RTN's (original weight, stored column order)
    assert torch.equal(qa.scales, qr.scales)
    assert _out_err(x, w, qa) <= _out_err(x, w, qr)


def test_dead_channels_and_fp16_input():
    gen = torch.Generator().manual_seed(4)
    x = _correlated_inputs(256, 256, gen)
    x[:, 7] = 0  # a channel never active: zero Hessian row/column
    w = (torch.randn(8, 256, generator=gen) * 0.1).half()
    qw = gptq_quantize(w, 2 * x.T @ x / 256, 64)
    assert bool(torch.isfinite(qw.scales).all())
    assert int(unpack_int4(qw.qweight)[:, 7].abs().max()) == 0  # dead column quantized to 0


def test_errors():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"hessian shape \(32, 32\)"):
        gptq_quantize(w, torch.eye(32))
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, torch.eye(64), damp=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(w, torch.full((64, 64), float("nan")))
    with pytest.raises(ValueError, match="group_size=48"):
        gptq_quantize(w, torch.eye(64), 48)
    with pytest.raises(TypeError, match="weight"):
        gptq_quantize(w.long(), torch.eye(64))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 128])
def test_mse_ranges_lower_the_output_error(sym, group):
    gen = torch.Generator().manual_seed(5)
    k, n = 576, 48
    x = _correlated_inputs(2048, k, gen)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    h = 2 * x.T @ x / x.shape[0]
    plain = gptq_quantize(w, h, group, sym=sym)
    mse = gptq_quantize(w, h, group, sym=sym, mse=True)
    assert mse.scales.shape == plain.scales.shape and (mse.offsets is None) == sym
    q = unpack_int4(mse.qweight)
    lo = -7 if sym else -8
    assert int(q.min()) >= lo and int(q.max()) <= 7 and not bool(q[:, k:].any())
    # the shrink factors include 1.0, and here some groups pick < 1.0
    assert not torch.equal(mse.scales, plain.scales)
    assert _out_err(x, w, mse) < _out_err(x, w, plain)


def test_mse_with_act_order_is_refused():
    with pytest.raises(ValueError, match="act_order"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), 32, act_order=True, mse=True)
