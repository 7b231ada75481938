"""The op namespace: schemas, fake implementations, backend dispatch."""
import pytest
import torch

from cometq import layout as L
from cometq import ops
from cometq import reference as R
from cometq.testing import rand_activation, rand_weight


def _operands(mode="block", group=64, m=3, n=50, k=576, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = rand_activation(m, k, outliers=3, generator=g)
    lay = R.fmpq_calibrate(x.abs().amax(0), int8_blocks=2)
    qw = R.quantize_weight_rtn(lay.permute_columns(rand_weight(n, k, generator=g)), group)
    return x, lay, qw


@pytest.mark.parametrize("mode", L.SCALE_MODES)
def test_ops_match_reference(mode):
    x, lay, qw = _operands(mode)
    qa = ops.quantize_activation(x, lay, mode, backend="reference")
    ref = R.quantize_activation(x, lay, mode)
    assert torch.equal(qa.q4, ref.q4) and torch.equal(qa.q8, ref.q8) and torch.equal(qa.scales, ref.scales)
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32, backend="reference")
    assert torch.equal(y, R.w4ax_gemm(ref, qw))


@pytest.mark.parametrize("mode", L.SCALE_MODES)
def test_opcheck(mode):
    x, lay, qw = _operands(mode, group=-1)
    torch.library.opcheck(torch.ops.cometq.quantize_act.default, (x, lay.perm, lay.block_bits, lay.n_int8, mode, 1.0, "reference"))
    qa = ops.quantize_activation(x, lay, mode)
    bias = torch.randn(qw.out_features)
    for b in (None, bias):
        torch.library.opcheck(
            torch.ops.cometq.w4ax_gemm.default,
            (qa.q4, qa.q8, qa.scales, lay.block_bits, qw.qweight, qw.scales, None, -1, b, 0, mode, "reference"),
        )


def test_torch_compile_fullgraph():
    x, lay, qw = _operands()

    def f(x):
        return ops.w4ax_gemm_q(ops.quantize_activation(x, lay), qw, out_dtype=torch.float32)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, lay, qw = _operands()
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        q4, q8, sc = ops.quantize_act(fx, mode.from_tensor(lay.perm), mode.from_tensor(lay.block_bits), lay.n_int8, "block")
        assert q4.shape == (3, 3 * 64) and q8.shape == (3, 2 * 128) and sc.shape == (3, 5)
        y = ops.w4ax_gemm(q4, q8, sc, mode.from_tensor(lay.block_bits), mode.from_tensor(qw.qweight),
                          mode.from_tensor(qw.scales), 64, None, torch.bfloat16)
        assert y.shape == (3, 50) and y.dtype == torch.bfloat16


def test_op_shape_errors():
    x, lay, qw = _operands()
    with pytest.raises(Exception, match=r"perm shape \(575,\) must be \(576,\)"):
        ops.quantize_act(x, lay.perm[:-1], lay.block_bits, lay.n_int8)
    qa = ops.quantize_activation(x, lay)
    with pytest.raises(Exception, match=r"w_scales shape \(50, 9\) != \(50, 10\)"):
        ops.w4ax_gemm(qa.q4, qa.q8, qa.scales, lay.block_bits, qw.qweight, qw.scales[:, :9], 64)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.w4ax_gemm(qa.q4, qa.q8, qa.scales, lay.block_bits, qw.qweight, qw.scales, 64, out_dtype=torch.int8)


def test_backend_resolution(monkeypatch):
    assert ops.resolve_backend("w4ax_gemm", torch.device("cpu"), "auto") == "reference"
    monkeypatch.setenv("COMETQ_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense' \\(from COMETQ_BACKEND\\)"):
        ops.resolve_backend("w4ax_gemm", torch.device("cpu"))
    monkeypatch.delenv("COMETQ_BACKEND")
    # without the extension: not available; with it (GPU machines): CPU tensors are refused
    with pytest.raises(RuntimeError, match="backend 'cuda' (is not available for op 'w4ax_gemm'|needs a CUDA tensor "
                                           "for op 'w4ax_gemm', got device cpu$)"):
        ops.resolve_backend("w4ax_gemm", torch.device("cpu"), "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.register_impl("w4ax_gemm", "auto", lambda *a: None)
