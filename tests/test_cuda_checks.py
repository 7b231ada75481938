"""The Python-side argument checks of the CUDA extension's raw ops (``cometq._cuda_checks``).

They run before every ``torch.ops.cometq_C`` call (the C++ TORCH_CHECKs crashed the process on
the lent H100's image instead of raising).  Here they run on CPU tensors: the module's
DEVICE_TYPE is patched to "cpu", everything else is what the GPU sees.
"""
import pytest
import torch

from cometq import _cuda_checks as CC
from cometq import reference as R
from cometq.layout import ActivationLayout, weights_block_major
from cometq.testing import rand_activation, rand_weight

K = 576  # 4.5 blocks -> 5
BITS = (8, 4, 8, 4, 8)


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setattr(CC, "DEVICE_TYPE", "cpu")


def _gemm_args(sym=True, group=128, scale_mode="block"):
    g = torch.Generator().manual_seed(5)
    lay = ActivationLayout(torch.randperm(K, generator=g), torch.tensor(BITS, dtype=torch.int32), 1.0)
    qa = R.quantize_activation(rand_activation(3, K, generator=g), lay, scale_mode)
    qw = R.quantize_weight_rtn(rand_weight(24, K, generator=g)[:, lay.perm], group, sym=sym)
    return dict(q4=qa.q4, q8=qa.q8, a_scales=qa.scales, block_bits=lay.block_bits, qweight=qw.qweight,
                w_scales=qw.scales, w_offsets=qw.offsets, group_size=group, bias=None, out_dtype=torch.float16,
                scale_mode=scale_mode, split_k=0)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("scale_mode", ["block", "class"])
def test_good_gemm_inputs_pass(sym, scale_mode):
    a = _gemm_args(sym=sym, scale_mode=scale_mode)
    CC.check_w4ax_gemm_inputs(**a)
    CC.check_w4ax_gemm_inputs(**dict(a, qweight=weights_block_major(a["qweight"]), bias=torch.randn(24)))
    CC.check_w4ax_gemm_inputs(**dict(a, group_size=-1, w_scales=torch.rand(24, 1),
                                     w_offsets=None if sym else torch.rand(24, 1)))


def _bad(**change):
    a = _gemm_args(sym=False)
    a.update(change)
    return a


GEMM_CASES = [
    (dict(q4=torch.zeros(3, 128, dtype=torch.int8)), TypeError, "q4 must have dtype torch.uint8"),
    (dict(q8=torch.zeros(3, 384, dtype=torch.int8, device="meta")), ValueError, "q8 must be a CUDA tensor"),
    (dict(a_scales=torch.rand(3, 2)), ValueError, r"a_scales shape \(3, 2\) needs 5 columns"),
    (dict(qweight=torch.zeros(24, 256, dtype=torch.uint8)), ValueError, "holds K_pad=512"),
    (dict(qweight=torch.zeros(24, 5, 64, dtype=torch.uint8)), ValueError, "block-major view"),
    (dict(qweight=torch.zeros(24, 320, dtype=torch.uint8)[None]), ValueError, "block-major view"),
    (dict(w_scales=torch.rand(24, 3)), ValueError, r"w_scales shape \(24, 3\) != \(24, 5\)"),
    (dict(group_size=48), ValueError, "group_size=48 is not supported"),
    (dict(bias=torch.zeros(23)), ValueError, r"bias shape \(23,\) != \(24,\)"),
    (dict(bias=torch.zeros(24, dtype=torch.int32)), TypeError, "bias must have dtype"),
    (dict(out_dtype=torch.int32), TypeError, "out_dtype must be float16, bfloat16 or float32"),
    (dict(scale_mode="tensor"), ValueError, "scale_mode must be one of"),
    (dict(split_k=-1), ValueError, "split_k must be >= 0"),
    (dict(w_offsets=torch.rand(24, 5).half()), TypeError, "w_offsets must have dtype torch.float32"),
    (dict(w_offsets=torch.rand(24, 3)), ValueError, r"w_offsets shape \[24, 3\] != w_scales shape \(24, 5\)"),
    (dict(block_bits=torch.zeros(0, dtype=torch.int32)), ValueError, "non-empty"),
    (dict(q4=torch.zeros(4, 128, dtype=torch.uint8)), ValueError, "same number of rows M"),
    (dict(q4=torch.zeros(3, 100, dtype=torch.uint8)), ValueError, "not whole 64-byte INT4"),
    (dict(q4=torch.zeros(3, 192, dtype=torch.uint8)), ValueError, "do not cover the 5 blocks"),
    (dict(qweight=[1, 2]), TypeError, "qweight must be a torch.Tensor"),
]


@pytest.mark.parametrize("change,exc,match", GEMM_CASES, ids=[c[2][:30] for c in GEMM_CASES])
def test_bad_gemm_inputs_raise(change, exc, match):
    with pytest.raises(exc, match=match):
        CC.check_w4ax_gemm_inputs(**_bad(**change))


def test_other_device_is_named():
    # a tensor that is not on the raw ops' device type: the message names its device
    a = _bad()
    CC.DEVICE_TYPE = "meta"
    a = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    a["q4"] = torch.zeros(3, 128, dtype=torch.uint8)  # cpu
    with pytest.raises(ValueError, match="q4 must be a CUDA tensor, got device cpu"):
        CC.check_w4ax_gemm_inputs(**a)


def test_quantize_act_checks():
    x = torch.randn(3, K)
    lay = ActivationLayout.from_block_bits(K, BITS)
    perm, bits = lay.perm, lay.block_bits
    CC.check_quantize_act_inputs(x, perm, bits, lay.n_int8, "block", 1.0)
    cases = [
        ((x[0], perm, bits, lay.n_int8, "block", 1.0), ValueError, "x must be 2-D"),
        ((x.double(), perm, bits, lay.n_int8, "block", 1.0), TypeError, "x must have dtype"),
        ((x, perm[:-1], bits, lay.n_int8, "block", 1.0), ValueError, r"perm shape \(575,\)"),
        ((x, perm, bits[:-1], lay.n_int8, "block", 1.0), ValueError, "block_bits shape"),
        ((x, perm, bits, 9, "block", 1.0), ValueError, "n_int8=9 out of range"),
        ((x, perm, bits, lay.n_int8, "tensor", 1.0), ValueError, "scale_mode"),
        ((x[:, :0], perm[:0], bits[:0], 0, "block", 1.0), ValueError, "at least one channel"),
        (("x", perm, bits, 0, "block", 1.0), TypeError, "x must be a torch.Tensor"),
    ]
    for bad in (0.0, 1.5, -0.5, float("nan")):
        cases.append(((x, perm, bits, lay.n_int8, "block", bad), ValueError,
                      rf"int4_clip must be in \(0, 1\], got int4_clip={bad:g}"))
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            CC.check_quantize_act_inputs(*args)
