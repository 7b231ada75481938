"""The CUDA paged KV4 decode attention kernel (csrc/kv4_attention.cu) on a GPU, against the reference.

Pools are built through the real append path (prefill + decode appends, so quantized groups,
partial blocks and fp16 tails all occur), plus raw random pools for what appends never produce
(quant_lens not a multiple of the group).  Run by bench/gpu_check.sh (``pytest -m gpu``); the
kernel's index math is also checked on the CPU by emulation (tests/test_cuda_kv4_emulation.py).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from cometq import ops
from cometq.paged import PagedKV4Config, PagedKV4Pool, kv4_decode_attention_reference
from cometq.testing import ATTN_FP16_ATOL, ATTN_FP16_RTOL

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def C():
    if os.environ.get("COMETQ_SKIP_CUDA", "0") == "1":
        pytest.skip("COMETQ_SKIP_CUDA=1")
    import cometq._cuda_register as CR  # ImportError (with instructions) when the extension is not built

    return CR


def _pool(lengths, kv_heads, head_dim, group, block=64, seed=0, dtype=torch.float16):
    nblocks = max(96, sum(-(-n // block) + 1 for n in lengths) + 8)
    c = PagedKV4Config(num_blocks=nblocks, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block, group_size=group,
                       key_axis="channel", value_axis="token", max_seqs=8, tail_dtype=dtype)
    pool = PagedKV4Pool(c, "cuda")
    g = torch.Generator().manual_seed(seed)
    sids = [pool.add_sequence() for _ in lengths]
    data = {s: ((torch.randn(kv_heads, n, head_dim, generator=g) + torch.randn(head_dim, generator=g) * 3).cuda(),
                torch.randn(kv_heads, n, head_dim, generator=g).cuda()) for s, n in zip(sids, lengths)}
    for s, n in zip(sids, lengths):
        pool.append(s, data[s][0][:, : n // 2].to(dtype), data[s][1][:, : n // 2].to(dtype))
    for t in range(max(lengths)):
        step = [s for s, n in zip(sids, lengths) if n // 2 <= t < n]
        if step:
            pool.append_decode(step, torch.stack([data[s][0][:, t] for s in step]).to(dtype),
                               torch.stack([data[s][1][:, t] for s in step]).to(dtype))
    return pool, sids


def _args(pool, q, sids):
    c = pool.config
    return (q, pool.k_packed, pool.k_scale, pool.k_zero, pool.v_packed, pool.v_scale, pool.v_zero, pool.tail_k,
            pool.tail_v, pool.block_tables, pool.quant_lens, pool.tail_lens,
            torch.tensor(sids, dtype=torch.int32, device="cuda"), c.group_size, c.key_axis, c.value_axis)


@pytest.mark.parametrize("head_dim,group,kv_heads,qpk", [(128, 32, 2, 4), (128, 32, 1, 8), (64, 16, 3, 3),
                                                         (64, 32, 2, 1), (128, 64, 2, 2), (128, 16, 1, 5)])
@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("variant", [0, 1])
def test_cuda_matches_reference(C, head_dim, group, kv_heads, qpk, splits, variant):
    lengths = [1, 17, group, 2 * group + 5, 300, 64 * 3 + group - 1]
    pool, sids = _pool(lengths, kv_heads, head_dim, group, seed=head_dim + group + qpk)
    order = sids[::-1] + [sids[2]]
    q = torch.randn(len(order), kv_heads * qpk, head_dim, generator=torch.Generator().manual_seed(qpk)).cuda().half()
    a = _args(pool, q, order)
    sm = 1 / math.sqrt(head_dim)
    ref = kv4_decode_attention_reference(*[t.cpu() if isinstance(t, torch.Tensor) else t for t in a], sm)
    out = C.cuda_kv4_decode_attention(*a, sm, splits, variant=variant)
    assert out.dtype == torch.float16 and out.shape == q.shape
    # the launch variants load in a different order (and 2, 3 prefetch into L2), the math is the
    # same: same bits (the ring variant 4: test_cuda_ring_variant_same_bits, its own smoke stage)
    for other in C.kv4_attention_variants():
        if other != variant:
            assert torch.equal(out, C.cuda_kv4_decode_attention(*a, sm, splits, variant=other)), other
    torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=ATTN_FP16_RTOL, atol=ATTN_FP16_ATOL)
    # the Triton kernel on the same pool agrees too (the two are alternatives under one op)
    tri = ops.kv4_decode_attention(*a, sm, num_splits=splits, backend="triton")
    torch.testing.assert_close(out.float(), tri.float(), rtol=2 * ATTN_FP16_RTOL, atol=2 * ATTN_FP16_ATOL)


@pytest.mark.parametrize("head_dim,group,kv_heads,qpk,block", [(128, 32, 2, 4, 64), (128, 32, 1, 8, 64),
                                                               (64, 16, 3, 3, 64), (64, 32, 2, 1, 32),
                                                               (128, 64, 2, 2, 64), (128, 16, 1, 5, 16),
                                                               (128, 128, 2, 4, 128)])
@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_ring_variant_same_bits(C, head_dim, group, kv_heads, qpk, block, splits, dtype):
    """Launch variant 4 (each warp's tiles through a shared-memory ring, csrc/kv4_attention.cu) computes
    variant 0's operands in variant 0's order: the same bits, over partial groups, fp16 tails, every
    group size, and a 2200-token sequence (G = 16, one split: > 32 key groups per warp, so the
    ring's block-table registers refill)."""
    lengths = [1, 17, group, 2 * group + 5, 300, 64 * 3 + group - 1] + ([2200] if group == 16 else [])
    pool, sids = _pool(lengths, kv_heads, head_dim, group, block=block, seed=head_dim + group, dtype=dtype)
    order = sids[::-1] + [sids[1]]
    q = torch.randn(len(order), kv_heads * qpk, head_dim, generator=torch.Generator().manual_seed(qpk)).cuda().to(dtype)
    a = _args(pool, q, order)
    sm = 1 / math.sqrt(head_dim)
    out = C.cuda_kv4_decode_attention(*a, sm, splits, variant=C.KV4_ATTN_RING_VARIANT)
    assert torch.equal(out, C.cuda_kv4_decode_attention(*a, sm, splits, variant=0))
    ref = kv4_decode_attention_reference(*[t.cpu() if isinstance(t, torch.Tensor) else t for t in a], sm)
    torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=ATTN_FP16_RTOL, atol=ATTN_FP16_ATOL)


@pytest.mark.parametrize("head_dim,group,kv_heads,qpk", [(128, 32, 2, 4), (64, 16, 3, 3)])
def test_cuda_bf16(C, head_dim, group, kv_heads, qpk):
    """bf16 query, tail and output (fp16 inside the kernel)."""
    pool, sids = _pool([9, 70, 200], kv_heads, head_dim, group, seed=5, dtype=torch.bfloat16)
    q = torch.randn(len(sids), kv_heads * qpk, head_dim, generator=torch.Generator().manual_seed(2)).cuda().bfloat16()
    a = _args(pool, q, sids)
    sm = 1 / math.sqrt(head_dim)
    ref = kv4_decode_attention_reference(*[t.cpu() if isinstance(t, torch.Tensor) else t for t in a], sm)
    for splits in (1, 4):
        out = C.cuda_kv4_decode_attention(*a, sm, splits)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=ATTN_FP16_RTOL, atol=ATTN_FP16_ATOL)


@pytest.mark.parametrize("variant", [0, pytest.param(4, id="ring")])
def test_cuda_quant_lens_not_a_multiple_of_the_group(C, variant):
    """Raw pool tensors with a sequence ending inside a key group (appends never leave one, the kernel
    masks it anyway) and garbage past the end: the masked tokens contribute exactly nothing (the ring
    variant zero-fills those rows and the partial scale chunk instead of reading them)."""
    g = torch.Generator().manual_seed(3)
    nb, h, bs, d, gs = 6, 2, 64, 128, 32
    kp = torch.randint(0, 256, (nb, h, bs, d // 2), dtype=torch.uint8, generator=g)
    vp = torch.randint(0, 256, (nb, h, bs, d // 2), dtype=torch.uint8, generator=g)
    ks = (torch.rand(nb, h, bs // gs, d, generator=g) * 0.1 + 0.01).half()
    kz = (-7.5 * ks.float()).half()
    vs = (torch.rand(nb, h, bs, d // gs, generator=g) * 0.2 + 0.01).half()
    vz = (-7.5 * vs.float()).half()
    vs[3, :, 40:] = float("inf")  # past quant_lens of the sequence using block 3: must never be read into O
    tk = torch.randn(2, h, gs, d, generator=g).half()
    tv = torch.randn(2, h, gs, d, generator=g).half()
    bt = torch.tensor([[3, -1], [1, 4]], dtype=torch.int32)
    ql = torch.tensor([40, 100], dtype=torch.int32)
    tl = torch.tensor([3, 0], dtype=torch.int32)
    q = torch.randn(2, 8, d, generator=g).half()
    sids = torch.tensor([0, 1], dtype=torch.int32)
    args = (q, kp, ks, kz, vp, vs, vz, tk, tv, bt, ql, tl, sids, gs, "channel", "token")
    ref = kv4_decode_attention_reference(*args, 0.1)
    for splits in (1, 2):
        out = C.cuda_kv4_decode_attention(*[t.cuda() if isinstance(t, torch.Tensor) else t for t in args], 0.1,
                                          splits, variant=variant)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=ATTN_FP16_RTOL, atol=ATTN_FP16_ATOL)


def test_cuda_backend_routing(C, monkeypatch):
    """Under the cuda backend the kernel runs with COMETQ_KV4_ATTN_CUDA=1 (always) or auto (if timed
    faster), and only for the pools it handles; everything else runs the Triton kernel."""
    pool, sids = _pool([50, 130], 2, 128, 32)
    q = torch.randn(2, 8, 128).cuda().half()
    a = _args(pool, q, sids)
    ref = ops.kv4_decode_attention(*a, 0.09, num_splits=2, backend="triton")
    for env in ("0", "1", "auto"):
        monkeypatch.setenv(C.KV4_ATTN_ENV, env)
        out = ops.kv4_decode_attention(*a, 0.09, num_splits=2, backend="cuda")
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 * ATTN_FP16_RTOL, atol=2 * ATTN_FP16_ATOL)
    choices = C.kv4_attention_choices()
    assert any("head_dim=128 group=32 qpk=4" in k for k in choices), choices
    assert all(v[0] in ("cuda", "triton") for v in choices.values())
    monkeypatch.setenv(C.KV4_ATTN_ENV, "1")
    q32 = q.float()  # fp32 queries: not the CUDA kernel's case -> Triton
    out = ops.kv4_decode_attention(q32, *a[1:], 0.09, num_splits=2, backend="cuda")
    assert out.dtype == torch.float32
    monkeypatch.setenv(C.KV4_ATTN_ENV, "yes")
    with pytest.raises(ValueError, match=r"COMETQ_KV4_ATTN_CUDA must be one of \('0', '1', 'auto'\)"):
        ops.kv4_decode_attention(*a, 0.09, num_splits=2, backend="cuda")


def test_cuda_errors(C):
    pool, sids = _pool([40], 2, 128, 32)
    q = torch.randn(1, 8, 128).cuda().half()
    a = list(_args(pool, q, sids))
    with pytest.raises(ValueError, match=r"does not handle axes key='token'"):
        C.cuda_kv4_decode_attention(*a[:14], "token", "token", 0.1, 1)
    with pytest.raises(ValueError, match=r"num_splits must be in \[1, 1024\], got 0"):
        C.cuda_kv4_decode_attention(*a, 0.1, 0)
    with pytest.raises(ValueError, match=r"variant must be one of \(0, 1, 2, 3\), got 4"):
        C.cuda_kv4_decode_attention(*a, 0.1, 1, variant=4)
    bad = list(a)
    bad[12] = torch.tensor([0, 0], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"seq_ids shape \(2,\) must be \[1\]"):
        C.cuda_kv4_decode_attention(*bad, 0.1, 1)
    bad = list(a)
    bad[0] = torch.randn(1, 8, 96).cuda().half()
    with pytest.raises(ValueError, match=r"head_dim=96"):
        C.cuda_kv4_decode_attention(*bad, 0.1, 1)


def test_cuda_offset_views(C, monkeypatch):
    """seq_ids as an offset view of a bigger slot buffer (what the runner passes for a batch of 1:
    gpu_check run 6's batch-1 graph capture failed on a 16-byte check there) gives the same bits;
    a misaligned query is routed to the Triton kernel instead of raising."""
    pool, sids = _pool([70, 33], 2, 128, 32)
    q = torch.randn(1, 8, 128).cuda().half()
    a = list(_args(pool, q, sids[1:]))
    want = C.cuda_kv4_decode_attention(*a, 0.09, 2)
    buf = torch.tensor([7] + sids[1:], dtype=torch.int32, device="cuda")
    a[12] = buf[1:]
    assert a[12].data_ptr() % 16
    assert torch.equal(C.cuda_kv4_decode_attention(*a, 0.09, 2), want)
    qbuf = torch.empty(8 * 128 + 4, dtype=torch.float16, device="cuda")
    qm = qbuf[4:].view(1, 8, 128)
    qm.copy_(q)
    a[0] = qm
    with pytest.raises(ValueError, match=r"q not contiguous and 16-byte aligned"):
        C.cuda_kv4_decode_attention(*a, 0.09, 2)
    monkeypatch.setenv("COMETQ_KV4_ATTN_CUDA", "1")
    got = ops.kv4_decode_attention(*a, 0.09, num_splits=2, backend="cuda")  # falls back to Triton
    torch.testing.assert_close(got.float(), want.float(), atol=ATTN_FP16_ATOL, rtol=ATTN_FP16_RTOL)


def test_cuda_graph_capture(C):
    """The kernel (and its split reduce) replays inside a CUDA graph: nothing read back to the host."""
    pool, sids = _pool([70, 200], 2, 128, 32)
    q = torch.randn(2, 8, 128).cuda().half()
    a = _args(pool, q, sids)
    want = C.cuda_kv4_decode_attention(*a, 0.09, 4)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        C.cuda_kv4_decode_attention(*a, 0.09, 4)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = C.cuda_kv4_decode_attention(*a, 0.09, 4)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)
