"""Fused q/k/v and gate/up projections (cometq.nn.fuse_linears) and the serving runner that uses them."""
import copy

import pytest
import torch
from torch import nn

from cometq import W4AxConfig, quantize_
from cometq.nn import W4AxLinear, fuse_linears
from cometq.serve.runner import Chunk, ModelRunner
from cometq.testing import RUNNER_FP32_ATOL, tiny_causal_lm


@pytest.fixture(scope="module")
def quantized():
    m = tiny_causal_lm("llama")
    calib = torch.randint(0, m.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    q = copy.deepcopy(m)
    quantize_(q, W4AxConfig(backend="reference"), calib_data=calib)
    return q


def _linears(n_out, k, bias, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for n in n_out:
        lin = nn.Linear(k, n, bias=bias, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g))
            if bias:
                lin.bias.copy_(torch.randn(n, generator=g))
        mods.append(lin)
    return mods


@pytest.mark.parametrize("bias", [False, True])
def test_fuse_plain_linears_outputs_and_views(bias):
    mods = _linears([48, 16, 16], 40, bias, seed=1)
    x = torch.randn(7, 40, generator=torch.Generator().manual_seed(2))
    want = [m(x) for m in mods]
    fused = fuse_linears(mods)
    assert isinstance(fused, nn.Linear) and fused.out_features == 80
    got = fused(x).split([48, 16, 16], dim=-1)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-6, atol=1e-5)
    # no copy kept: the originals view the fused weight and still compute the same
    for m, w in zip(mods, want):
        assert m.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
        torch.testing.assert_close(m(x), w)
    with torch.no_grad():
        mods[1].weight.mul_(2.0)  # an in-place update of an original is seen by the fused module
    torch.testing.assert_close(fused(x)[:, 48:64], mods[1](x))


def test_fuse_w4ax_equals_separate_exactly(quantized):
    att = quantized.model.layers[0].self_attn
    mods = [att.q_proj, att.k_proj, att.v_proj]
    assert all(isinstance(m, W4AxLinear) for m in mods)
    x = torch.randn(5, mods[0].in_features, generator=torch.Generator().manual_seed(3))
    want = [m(x) for m in mods]
    fused = fuse_linears(mods)
    assert isinstance(fused, W4AxLinear) and fused.out_features == sum(m.out_features for m in mods)
    # reference backend: each output column is its own exact integer dot + fp64 epilogue, so one
    # wide GEMM gives the same bits as three narrow ones (and one activation quantization)
    for g_, w in zip(fused(x).split([m.out_features for m in mods], dim=-1), want):
        assert torch.equal(g_, w)
    for m, w in zip(mods, want):
        assert torch.equal(m(x), w)
        assert m.qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr()


def test_fuse_refuses_different_layouts_and_mixed_types(quantized):
    layer = quantized.model.layers[0]
    att, mlp = layer.self_attn, layer.mlp
    # q (input: attention norm) and gate (input: MLP norm) have different FMPQ layouts
    assert fuse_linears([copy.deepcopy(att.q_proj), copy.deepcopy(mlp.gate_proj)]) is None
    assert fuse_linears([copy.deepcopy(att.q_proj)]) is None
    plain = _linears([8], att.q_proj.in_features, False, seed=4)[0]
    assert fuse_linears([copy.deepcopy(att.q_proj), plain]) is None
    q2 = copy.deepcopy(att.q_proj)
    q2.scale_mode = "class"
    assert fuse_linears([copy.deepcopy(att.k_proj), q2]) is None
    a, b = _linears([8, 8], 16, False, seed=5)
    assert fuse_linears([a, b.to(torch.float64)]) is None  # dtype mismatch


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_runner_fused_equals_unfused(arch, quantized):
    m = quantized if arch == "llama" else tiny_causal_lm("qwen2")
    ids = torch.randint(0, m.config.vocab_size, (13,), generator=torch.Generator().manual_seed(6)).tolist()
    outs = []
    for fuse in (False, True):
        r = ModelRunner.with_fp_pool(m, num_blocks=8, block_size=4, fuse=fuse)
        assert r.fuse_projections() == 2 * r.num_layers if fuse else r._qkv_fused == [None] * r.num_layers
        r.pool.reserve(0, 13)
        a = r.forward([Chunk(0, ids[:9], 0)], all_logits=True)
        b = r.forward([Chunk(0, ids[9:10], 9)])
        outs.append((a, b))
    for x, y in zip(outs[0], outs[1]):
        torch.testing.assert_close(x, y, rtol=0, atol=RUNNER_FP32_ATOL)
    with torch.no_grad():  # and the HF model itself still runs on the (now viewed) weights
        ref = m(torch.tensor([ids[:9]])).logits[0]
    torch.testing.assert_close(outs[1][0], ref, rtol=0, atol=RUNNER_FP32_ATOL)


def test_runner_fuse_flag_validation():
    m = tiny_causal_lm("llama")
    with pytest.raises(TypeError, match="fuse must be a bool"):
        ModelRunner(m, ModelRunner.with_fp_pool(m, num_blocks=4, block_size=4).pool, fuse=1)


def test_runner_refuses_after_the_model_changes():
    """The model's modules view the fused weights; replacing them (e.g. ``model.to``, a reload)
    makes the runner fuse again instead of running stale weights."""
    m = tiny_causal_lm("llama")
    r = ModelRunner.with_fp_pool(m, num_blocks=8, block_size=4)
    ids = torch.randint(0, m.config.vocab_size, (6,), generator=torch.Generator().manual_seed(8)).tolist()
    old = r._qkv_fused[0]
    with torch.no_grad():  # new tensors for v_proj (what .to() / load_state_dict(assign=True) do)
        v = m.model.layers[0].self_attn.v_proj
        v.weight = nn.Parameter(v.weight.detach().clone() * 1.5, requires_grad=False)
        ref = m(torch.tensor([ids])).logits[0, -1]
    r.pool.reserve(0, 6)
    got = r.forward([Chunk(0, ids, 0)])[0]
    assert r._qkv_fused[0] is not old
    torch.testing.assert_close(got, ref, rtol=0, atol=RUNNER_FP32_ATOL)


def test_two_runners_on_one_w4ax_model(quantized):
    """A second runner re-fuses the model's projections (the first one's fusions go stale);
    the first re-fuses inside its forward, which runs under ``torch.inference_mode``: the new
    fused modules must stay usable (an inference-tensor fusion crashed the W4Ax layout cache
    with 'Inference tensors do not track version counter')."""
    m = copy.deepcopy(quantized)
    ids = torch.randint(0, m.config.vocab_size, (7,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0, -1]
    a = ModelRunner.with_fp_pool(m, num_blocks=8, block_size=4)
    b = ModelRunner.with_fp_pool(m, num_blocks=8, block_size=4)
    for r in (a, b, a):
        r.pool.free(0)
        r.pool.reserve(0, 7)
        torch.testing.assert_close(r.forward([Chunk(0, ids, 0)])[0], ref, rtol=0, atol=RUNNER_FP32_ATOL)
    with torch.no_grad():  # and the HF forward still runs on the (re-)fused storage
        torch.testing.assert_close(m(torch.tensor([ids])).logits[0, -1], ref, rtol=0, atol=RUNNER_FP32_ATOL)


def test_w4ax_linear_made_under_inference_mode(quantized):
    """Buffers that are inference tensors (a model quantized under ``torch.inference_mode``) keep
    no version counter: the layer still runs, outside inference mode too."""
    lin = quantized.model.layers[0].mlp.down_proj
    with torch.inference_mode():
        inf = copy.deepcopy(lin)
        for name, buf in list(inf.named_buffers()):
            setattr(inf, name, buf.clone())
        assert inf.perm.is_inference()
    x = torch.randn(3, lin.in_features)
    with torch.inference_mode():
        want = lin(x)
        torch.testing.assert_close(inf(x), want, rtol=0, atol=0)
    torch.testing.assert_close(inf(x), want, rtol=0, atol=0)
