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


# --------------------------------------------------------------------------
# KV4 decode attention (csrc/kv4_attention.cu)
# --------------------------------------------------------------------------
def _attn_args(d=128, g=32, h=2, hq=8, bs=64, nb=5, s=3, b=2):
    e = lambda *shape, dt=torch.float16: torch.zeros(*shape, dtype=dt)  # noqa: E731
    return dict(q=torch.randn(b, hq, d).half(), k_packed=e(nb, h, bs, d // 2, dt=torch.uint8),
                k_scale=e(nb, h, bs // g, d), k_zero=e(nb, h, bs // g, d), v_packed=e(nb, h, bs, d // 2, dt=torch.uint8),
                v_scale=e(nb, h, bs, d // g), v_zero=e(nb, h, bs, d // g), tail_k=e(s, h, g, d), tail_v=e(s, h, g, d),
                block_tables=e(s, 4, dt=torch.int32), quant_lens=e(s, dt=torch.int32), tail_lens=e(s, dt=torch.int32),
                seq_ids=e(b, dt=torch.int32), group_size=g, num_splits=4)


def test_kv4_attention_support_rule_and_reasons():
    assert CC.kv4_attention_supported(128, 32, 4) and CC.kv4_attention_supported(64, 16, 3)
    assert not CC.kv4_attention_supported(128, 8, 4)    # key group shorter than a 16-token tile
    assert not CC.kv4_attention_supported(128, 48, 4)   # does not divide head_dim
    assert not CC.kv4_attention_supported(128, 32, 9)   # more than 8 query heads per kv head
    assert not CC.kv4_attention_supported(80, 16, 4)
    a = _attn_args()
    why = lambda **kw: CC.kv4_attention_unsupported(**{**dict(q=a["q"], k_packed=a["k_packed"],  # noqa: E731
                                                                 tail_k=a["tail_k"], group_size=32, key_axis="channel",
                                                                 value_axis="token"), **kw})
    assert why() is None
    assert "axes key='token'" in why(key_axis="token")
    assert "tail dtype torch.float32" in why(tail_k=a["tail_k"].float())
    assert "q dtype torch.bfloat16" in why(q=a["q"].bfloat16())  # bf16 query with an fp16 tail
    assert why(q=a["q"].bfloat16(), tail_k=a["tail_k"].bfloat16()) is None
    assert "q dtype torch.float32" in why(q=a["q"].float(), tail_k=a["tail_k"].float())
    assert "group_size=8" in why(group_size=8)
    # a query the kernel cannot vector-load is routed elsewhere, not rejected mid-capture
    assert "q not contiguous and 16-byte aligned" in why(q=torch.randn(1, 8 * 128 + 4).half()[:, 4:].view(1, 8, 128))
    assert "q not contiguous" in why(q=torch.randn(2, 128, 8).half().transpose(1, 2))


def test_kv4_attention_inputs():
    CC.check_kv4_attention_inputs(**_attn_args())
    CC.check_kv4_attention_inputs(**_attn_args(d=64, g=16, h=3, hq=9))
    b16 = _attn_args()
    CC.check_kv4_attention_inputs(**dict(b16, q=b16["q"].bfloat16(), tail_k=b16["tail_k"].bfloat16(),
                                         tail_v=b16["tail_v"].bfloat16()))
    a = _attn_args()
    bad = [
        (dict(q=a["q"].float()), TypeError, r"q must have dtype torch.float16 or torch.bfloat16"),
        (dict(q=a["q"].bfloat16()), TypeError, r"tail_k must have dtype torch.bfloat16"),
        (dict(k_scale=a["k_scale"].float()), TypeError, r"k_scale must have dtype torch.float16"),
        (dict(seq_ids=a["seq_ids"].long()), TypeError, r"seq_ids must have dtype torch.int32"),
        (dict(k_scale=torch.zeros(5, 2, 64, 4).half()), ValueError, r"k_scale \(5, 2, 64, 4\) .* must be \(5, 2, 2, 128\)"),
        (dict(v_scale=torch.zeros(5, 2, 2, 128).half()), ValueError, r"v_scale .* must be \(5, 2, 64, 4\)"),
        (dict(tail_v=torch.zeros(3, 2, 32, 64).half()), ValueError, r"tail_v shape .* != tail_k shape"),
        (dict(seq_ids=torch.zeros(3, dtype=torch.int32)), ValueError, r"seq_ids shape \(3,\) must be \[2\]"),
        (dict(num_splits=0), ValueError, r"num_splits must be in \[1, 1024\], got 0"),
        (dict(q=torch.randn(2, 7, 128).half()), ValueError, r"q heads 7 .* not a multiple of kv heads 2"),
        (dict(group_size=48), ValueError, r"block_size 64 .* multiple of group_size=48"),
        (dict(k_packed=torch.zeros(5, 2, 64, 128, dtype=torch.uint8)[..., ::2]), ValueError,
         r"k_packed must be contiguous"),
        (dict(quant_lens=torch.zeros(4, dtype=torch.int32)), ValueError, r"quant_lens \(4,\) and tail_lens \(3,\)"),
    ]
    for change, exc, match in bad:
        with pytest.raises(exc, match=match):
            CC.check_kv4_attention_inputs(**dict(a, **change))
    # the int32 index tensors are read one element at a time: an offset view is fine (a decode
    # batch's seq_ids is a slice of the runner's slot buffer); a vector-loaded tensor must be aligned
    CC.check_kv4_attention_inputs(**dict(a, seq_ids=torch.zeros(3, dtype=torch.int32)[1:]))
    with pytest.raises(ValueError, match=r"q data must be 16-byte aligned, got an offset view \(shape \(2, 8, 128\)\)"):
        CC.check_kv4_attention_inputs(**dict(a, q=torch.randn(2 * 8 * 128 + 2).half()[2:].view(2, 8, 128)))


def test_gemm_operands_beyond_32_bit_row_offsets_are_refused():
    """The CUDA GEMM forms row offsets in 32 bits (csrc/w4ax_gemm.cu load_stage): operands spanning
    2^31 bytes or more over their rows are refused by name (expanded views: no memory), and the
    ops-level CUDA backend reports them as unsupported so ``auto`` runs the Triton GEMM."""
    a = _gemm_args()
    assert CC.gemm_extent_problem(a["q4"], a["q8"], a["a_scales"], a["qweight"], a["w_scales"]) is None
    m = 1 << 23  # 8M tokens x 384 INT8 bytes (3 blocks) = 3 GiB
    big = dict(a, q4=a["q4"][:1].expand(m, -1), q8=a["q8"][:1].expand(m, -1), a_scales=a["a_scales"][:1].expand(m, -1))
    why = CC.gemm_extent_problem(big["q4"], big["q8"], big["a_scales"], big["qweight"], big["w_scales"])
    assert why is not None and "'q8': 3221225472" in why and "32-bit row offsets" in why
    with pytest.raises(ValueError, match=r"too large for the CUDA GEMM's 32-bit row offsets: \{'q8'"):
        CC.check_w4ax_gemm_inputs(**big)


def _w16_args(sym=True, group=128):
    g = torch.Generator().manual_seed(9)
    qw = R.quantize_weight_rtn(rand_weight(24, K, generator=g), group, sym=sym)
    return dict(a=torch.randn(3, 640, generator=g).half(), qweight=qw.qweight, w_scales=qw.scales,
                w_offsets=qw.offsets, group_size=group, bias=None, out_dtype=torch.float16, split_k=0, tile=0)


@pytest.mark.parametrize("sym", [True, False])
def test_good_w16_inputs_pass(sym):
    a = _w16_args(sym)
    CC.check_w16_gemm_inputs(**a)
    CC.check_w16_gemm_inputs(**dict(a, a=a["a"].bfloat16(), qweight=weights_block_major(a["qweight"]),
                                    bias=torch.randn(24), split_k=3, tile=1, out_dtype=torch.float32))


@pytest.mark.parametrize("change,exc,match", [
    (dict(a=torch.randn(3, 640)), TypeError, r"a must have dtype torch.float16 or torch.bfloat16"),
    (dict(a=torch.randn(3, 576).half()), ValueError, r"K_pad a positive multiple of 128, got|multiple of 128"),
    (dict(a=torch.randn(3, 768).half()), ValueError, r"holds K_pad=640 but a shape \(3, 768\)"),
    (dict(group_size=48), ValueError, r"group_size"),
    (dict(w_scales=torch.rand(24, 4)), ValueError, r"w_scales shape \(24, 4\) != \(24, 5\)"),
    (dict(bias=torch.randn(7)), ValueError, r"bias shape \(7,\) != \(24,\)"),
    (dict(split_k=-1), ValueError, r"split_k must be >= 0"),
    (dict(tile=9), ValueError, r"tile must be 0 \(by M\), 1 \(64 x 256, 8 warps\), 2 \(32 x 128\), 3 \(16 x 128\) "
                               r"or a wgmma tile 4 \(64 x 128\), 5 \(64 x 64\), 6 \(32 x 128\), 7 \(64 x 256\), "
                               r"8 \(16 x 128\), got 9"),
    (dict(tile=5), ValueError, r"tile=5 is a wgmma tile, which needs an sm_90 \(Hopper\) GPU; this device is cpu"),
    (dict(out_dtype=torch.int8), TypeError, r"out_dtype must be"),
])
def test_bad_w16_inputs_raise(change, exc, match):
    with pytest.raises(exc, match=match):
        CC.check_w16_gemm_inputs(**dict(_w16_args(), **change))


def test_w16_wgmma_tiles_need_whole_block_groups():
    a = _w16_args(group=64)
    CC.check_w16_gemm_inputs(**a)  # (the mma.sync tiles take G = 64)
    for tile in (4, 5, 6, 7, 8):
        with pytest.raises(ValueError, match=f"tile={tile} \\(a wgmma tile\\) needs a weight group of at least 128 "
                                             r"channels \(one group per row and K block\), got group_size=64"):
            CC.check_w16_gemm_inputs(**dict(a, tile=tile))


def test_w16_operands_beyond_32_bit_row_offsets_are_refused():
    a = torch.empty(1 << 20, 1 << 11, dtype=torch.float16, device="meta")  # 2^32 bytes of A'
    why = CC.w16_extent_problem(a, torch.empty(24, 1024, dtype=torch.uint8), torch.empty(24, 16))
    assert why is not None and "32-bit row offsets" in why and "'a': 4294967296" in why
    assert CC.w16_extent_problem(a[:8], torch.empty(24, 1024, dtype=torch.uint8), torch.empty(24, 16)) is None
