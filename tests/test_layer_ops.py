"""Fused Llama-layer ops (cometq.layers references vs the Triton kernels; the runner with them on)."""
import pytest
import torch

from cometq import ops
from cometq.layers import (LAYER_OPS_ATOL, LAYER_OPS_RTOL, add_rms_norm_reference, rms_norm_reference,
                           rope_qkv_reference, silu_mul_reference)

# the Triton cases run on the GPU when there is one (the interpreter on CPU otherwise)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _close(got, want, dtype=None):
    """Within the named tolerance of ``dtype`` (default: the reference's; the precision the
    roundings happen in)."""
    dtype = dtype or want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=LAYER_OPS_RTOL[dtype], atol=LAYER_OPS_ATOL[dtype])


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,c", [(1, 576), (3, 200), (17, 64)])
def test_rms_norm_and_add(dtype, t, c):
    g = _g(t * c)
    x = (torch.randn(t, c, generator=g) * 3 + 1).to(DEV, dtype)
    r = torch.randn(t, c, generator=g).to(DEV, dtype)
    w = (1 + 0.2 * torch.randn(c, generator=g)).to(DEV, dtype)
    _close(ops.rms_norm(x, w, 1e-5, "triton"), rms_norm_reference(x, w, 1e-5))
    y, h = ops.add_rms_norm(x, r, w, 1e-6, "triton")
    y_ref, h_ref = add_rms_norm_reference(x, r, w, 1e-6)
    if dtype == torch.bfloat16 and DEV == "cpu":
        _close(h, h_ref)  # the interpreter's fp32 -> bf16 cast truncates (numpy has no bf16); the GPU rounds
    else:
        assert torch.equal(h, h_ref)  # the stored residual sum is one rounding of an exact sum
    _close(y, y_ref)
    # fp32 weights on fp16 activations promote the output (as HF's weight * x does)
    if dtype != torch.float32:
        y32 = ops.rms_norm(x, w.float(), 1e-5, "triton")
        assert y32.dtype == torch.float32
        _close(y32, rms_norm_reference(x, w.float(), 1e-5), dtype)  # (rounded to dtype before the weight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,nq,nkv,d", [(1, 4, 1, 64), (5, 8, 2, 32), (3, 3, 3, 16)])
def test_rope_qkv(dtype, t, nq, nkv, d):
    g = _g(t + nq + d)
    qkv = torch.randn(t, (nq + 2 * nkv) * d, generator=g).to(DEV, dtype)
    ang = torch.rand(t, d // 2, generator=g) * 6.3
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(DEV, dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(DEV, dtype)
    got = ops.rope_qkv(qkv, cos, sin, nq, nkv, "triton")
    want = rope_qkv_reference(qkv, cos, sin, nq, nkv)
    for a, b, shape in zip(got, want, [(t, nq, d), (t, nkv, d), (t, nkv, d)]):
        assert a.shape == shape and a.is_contiguous()
        _close(a, b)
    assert torch.equal(got[2], want[2])  # v is a copy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,i", [(1, 1536), (4, 100), (9, 4096)])
def test_silu_mul(dtype, t, i):
    x = (torch.randn(t, 2 * i, generator=_g(i)) * 4).to(DEV, dtype)
    _close(ops.silu_mul(x, "triton"), silu_mul_reference(x))


def test_reference_backend_is_the_reference():
    x = torch.randn(3, 64, generator=_g(1))
    w = torch.randn(64, generator=_g(2))
    assert torch.equal(ops.rms_norm(x, w, 1e-5, "reference"), rms_norm_reference(x, w, 1e-5))
    assert torch.equal(ops.silu_mul(x, "reference"), silu_mul_reference(x))


def test_layer_op_errors():
    x = torch.randn(3, 64)
    w = torch.randn(64)
    with pytest.raises(ValueError, match=r"weight must be float \[64\], got torch.float32 \(32,\)"):
        ops.rms_norm(x, torch.randn(32), 1e-5)
    with pytest.raises(ValueError, match="x must be a float \\[T, C\\] tensor, got torch.float32 \\(3, 4, 16\\)"):
        ops.rms_norm(x.view(3, 4, 16), w, 1e-5)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        ops.rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match=r"residual torch.float16 \(3, 64\) on cpu must match x torch.float32"):
        ops.add_rms_norm(x, x.half(), w, 1e-5)
    with pytest.raises(ValueError, match="qkv width 64 is not \\(n_q \\+ 2 n_kv\\) = 6 heads"):
        ops.rope_qkv(x, x[:, :8], x[:, :8], 4, 1)
    with pytest.raises(ValueError, match="n_q a multiple of n_kv"):
        ops.rope_qkv(x, x[:, :8], x[:, :8], 3, 2)
    with pytest.raises(ValueError, match=r"cos must be torch.float32 \[3, 8\] on cpu, got torch.float16"):
        ops.rope_qkv(x, x[:, :8].half(), x[:, :8], 6, 1)
    with pytest.raises(ValueError, match=r"x must be \[T, 2I\] \(gate \| up\), got \(3, 63\)"):
        ops.silu_mul(torch.randn(3, 63))
    with pytest.raises(TypeError):
        ops.silu_mul(torch.ones(3, 4, dtype=torch.int32))


def test_layer_ops_opcheck():
    x = torch.randn(3, 32)
    w = torch.randn(32)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.cometq.rms_norm, (x, w, 1e-5, "reference"), test_utils=utils)
    torch.library.opcheck(torch.ops.cometq.add_rms_norm, (x, torch.randn(3, 32), w, 1e-5, "reference"),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.cometq.rope_qkv, (torch.randn(2, 48), torch.randn(2, 8), torch.randn(2, 8), 4, 1,
                                                      "reference"), test_utils=utils)
    torch.library.opcheck(torch.ops.cometq.silu_mul, (x, "reference"), test_utils=utils)


@pytest.mark.parametrize("kv4", [False, True])
def test_runner_with_fused_ops_matches_hf_modules(kv4):
    """The runner with the fused layer ops (Triton: the interpreter on CPU) gives the logits of the
    runner on the HF modules, for prefill and decode steps (a tiny fp32 Llama: GQA 2, head_dim 32)."""
    from cometq.serve.runner import Chunk, ModelRunner
    from cometq.serve.tiny import tiny_model
    from cometq.testing import RUNNER_FP32_ATOL

    model = tiny_model().to(DEV)
    prompts = [torch.randint(0, 256, (5 + 4 * i,), generator=_g(i)).tolist() for i in range(3)]
    outs = {}
    for fused in (False, True):
        r = ModelRunner.build(model, kv4=kv4, num_blocks=16, block_size=16, max_seqs=4, fused_ops=fused)
        if fused:
            r._fops_backend = "triton"
        assert r.fused_ops is fused
        for s, p in enumerate(prompts):
            r.pool.reserve(s, len(p) + 3)
        lg = [r.forward([Chunk(s, p, 0) for s, p in enumerate(prompts)])]
        for step in range(3):
            lg.append(r.forward([Chunk(s, [7 + s], len(p) + step) for s, p in enumerate(prompts)]))
        outs[fused] = torch.cat(lg)
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=RUNNER_FP32_ATOL)


def test_runner_fused_ops_validation():
    from cometq.serve.runner import ModelRunner
    from cometq.serve.tiny import tiny_model

    model = tiny_model().to(DEV)
    with pytest.raises(TypeError, match="fused_ops must be a bool or None"):
        ModelRunner.build(model, kv4=False, num_blocks=4, block_size=16, fused_ops=1)
    r = ModelRunner.build(model, kv4=False, num_blocks=4, block_size=16)
    assert r.fused_ops is (DEV == "cuda")  # auto: on where the Triton kernels run
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="fused_ops=True needs RMSNorm layers"):
        ModelRunner.build(model, kv4=False, num_blocks=4, block_size=16, fused_ops=True)
    assert not ModelRunner.build(model, kv4=False, num_blocks=4, block_size=16).fused_ops


def test_layer_op_impl():
    """The unchecked backend function the runner caches equals the checked op."""
    x = torch.randn(3, 64, generator=_g(9))
    w = torch.randn(64, generator=_g(10))
    fn = ops.layer_op_impl("rms_norm", "cpu", "reference")
    assert torch.equal(fn(x, w, 1e-5), ops.rms_norm(x, w, 1e-5, "reference"))
    with pytest.raises(ValueError, match="not a layer op: 'w4ax_gemm'"):
        ops.layer_op_impl("w4ax_gemm", "cpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for op 'rms_norm'"):
        ops.layer_op_impl("rms_norm", "cpu", "cuda")  # (no CUDA implementation of the layer ops)


def test_full_step_with_fused_ops_defers_the_residual():
    """The full-step decode path with the fused ops adds each layer's MLP output inside the next
    layer's norm (add_rms_norm; the last one inside the final norm): same logits as the plain
    forward with the same fused ops (KV4 pool, Triton kernels under the interpreter on CPU)."""
    from cometq.serve.runner import Chunk, ModelRunner
    from cometq.serve.tiny import tiny_model
    from cometq.testing import RUNNER_FP32_ATOL

    model = tiny_model().to(DEV)
    prompts = [torch.randint(0, 256, (6 + 3 * i,), generator=_g(20 + i)).tolist() for i in range(3)]
    outs, calls = {}, {}
    for full in (False, True):
        r = ModelRunner.build(model, kv4=True, num_blocks=16, block_size=16, max_seqs=4, fused_ops=True)
        r._fops_backend = "triton"
        if full:
            r.enable_cuda_graphs(max_batch=4, graphs=False)
            assert r._graphs.full
        n = {"add_rms_norm": 0}
        real = r._fop

        def counting(op, real=real, n=n):
            if op in n:
                n[op] += 1
            return real(op)

        r._fop = counting
        for s, p in enumerate(prompts):
            r.pool.reserve(s, len(p) + 3)
        lg = [r.forward([Chunk(s, p, 0) for s, p in enumerate(prompts)])]
        n["add_rms_norm"] = 0
        for step in range(3):
            lg.append(r.forward([Chunk(s, [5 + s], len(p) + step) for s, p in enumerate(prompts)]))
        outs[full], calls[full] = torch.cat(lg), n["add_rms_norm"]
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=RUNNER_FP32_ATOL)
    layers = model.config.num_hidden_layers
    assert calls[False] == 3 * layers  # one add + norm per layer (post-attention)
    assert calls[True] == 3 * 2 * layers  # plus one per layer boundary and the final norm, in place of the adds
