"""Paged full-precision decode attention (the FP16 serving baseline's kernel): Triton
(interpreter on CPU, natively on a GPU) vs the torch reference, the op's checks, opcheck."""
import math

import pytest
import torch
import torch.nn.functional as F

from cometq import ops
from cometq.paged import paged_decode_attention_reference
from cometq.testing import ATTN_ATOL, ATTN_FP16_ATOL, ATTN_FP16_RTOL, ATTN_RTOL

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(lengths, hkv=2, qpk=4, d=32, block_size=16, dtype=torch.float32, seed=0, extra_blocks=3):
    """Random pool with blocks handed out shuffled (tables are not contiguous) and fresh data
    in every slot (unused slots too: a kernel reading past a length would show)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lengths]
    nb_total = sum(need) + extra_blocks
    order = torch.randperm(nb_total, generator=g).tolist()
    width = max(1, max(need))
    tables = torch.full((len(lengths), width), 0, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(order[i:i + n], dtype=torch.int32)
        i += n
    k = torch.randn(nb_total * block_size, hkv, d, generator=g) + torch.randn(d, generator=g)
    v = torch.randn(nb_total * block_size, hkv, d, generator=g)
    q = torch.randn(len(lengths), hkv * qpk, d, generator=g)
    lens = torch.tensor(lengths, dtype=torch.int32)
    return [t.to(DEV) for t in (q.to(dtype), k.to(dtype), v.to(dtype), tables, lens)]


def test_reference_is_attention_over_gathered_kv():
    q, k, v, bt, lens = [t.cpu() for t in _case([5, 33, 16], block_size=8)]
    scale = 1 / math.sqrt(q.shape[-1])
    out = paged_decode_attention_reference(q, k, v, bt, lens, 8, scale)
    for b, n in enumerate(lens.tolist()):
        slots = torch.cat([torch.arange(8) + 8 * int(bt[b, i]) for i in range(-(-n // 8))])[:n]
        kb = k[slots].transpose(0, 1).repeat_interleave(4, dim=0)  # [Hq, n, D]
        vb = v[slots].transpose(0, 1).repeat_interleave(4, dim=0)
        want = F.scaled_dot_product_attention(q[b][:, None], kb, vb, scale=scale)[:, 0]
        torch.testing.assert_close(out[b], want, rtol=ATTN_RTOL, atol=ATTN_ATOL)


@pytest.mark.parametrize("qpk,block_size,d", [(1, 16, 32), (4, 16, 32), (8, 32, 64), (4, 5, 32), (2, 64, 16)])
@pytest.mark.parametrize("splits", [0, 1, 3])
def test_triton_matches_reference(qpk, block_size, d, splits):
    # lengths: one token, exactly one block, a partial block, several blocks (block 5: tiles straddle blocks)
    lengths = [1, block_size, 37, 2 * block_size + 3]
    q, k, v, bt, lens = _case(lengths, qpk=qpk, d=d, block_size=block_size, seed=qpk + block_size)
    scale = 1 / math.sqrt(d)
    ref = paged_decode_attention_reference(q, k, v, bt, lens, block_size, scale)
    out = ops.paged_decode_attention(q, k, v, bt, lens, block_size, scale, num_splits=splits, backend="triton")
    torch.testing.assert_close(out, ref, rtol=ATTN_RTOL, atol=ATTN_ATOL)


def test_triton_long_context_many_splits_and_int64_tables():
    q, k, v, bt, lens = _case([300, 7, 129], qpk=4, block_size=16, seed=3)
    ref = paged_decode_attention_reference(q, k, v, bt, lens, 16, 0.2)
    for ns in (2, 5, 64):  # 64 > the tiles of the longest row: clamped
        out = ops.paged_decode_attention(q, k, v, bt.long(), lens.long(), 16, 0.2, num_splits=ns, backend="triton")
        torch.testing.assert_close(out, ref, rtol=ATTN_RTOL, atol=ATTN_ATOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_dtypes(dtype):
    q, k, v, bt, lens = _case([20, 45], qpk=4, block_size=16, dtype=dtype, seed=7)
    ref = paged_decode_attention_reference(q, k, v, bt, lens, 16, 0.17)
    out = ops.paged_decode_attention(q, k, v, bt, lens, 16, 0.17, backend="triton")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=ATTN_FP16_RTOL, atol=ATTN_FP16_ATOL)


def test_empty_rows_and_batch():
    q, k, v, bt, lens = _case([0, 9], qpk=2, block_size=8, seed=1)
    ref = paged_decode_attention_reference(q, k, v, bt, lens, 8, 0.3)
    assert torch.equal(ref[0], torch.zeros_like(ref[0])) and ref[1].abs().sum() > 0
    for ns in (1, 2):
        out = ops.paged_decode_attention(q, k, v, bt, lens, 8, 0.3, num_splits=ns, backend="triton")
        torch.testing.assert_close(out, ref, rtol=ATTN_RTOL, atol=ATTN_ATOL)
    assert ops.paged_decode_attention(q[:0], k, v, bt[:0], lens[:0], 8, 0.3, backend="triton").shape == (0, 4, 32)


def test_errors():
    q, k, v, bt, lens = _case([5, 9], qpk=2, block_size=8)
    with pytest.raises(ValueError, match=r"q heads 6 must be a multiple of kv heads 4"):
        ops.paged_decode_attention(torch.cat([q, q[:, :2]], 1), k.repeat(1, 2, 1), v.repeat(1, 2, 1), bt, lens, 8, 1.0)
    with pytest.raises(ValueError, match=r"k_cache head_dim 16 != q head_dim 32"):
        ops.paged_decode_attention(q, k[..., :16], v[..., :16], bt, lens, 8, 1.0)
    with pytest.raises(ValueError, match=r"lengths must be int32/int64 \[2\], got torch.float32"):
        ops.paged_decode_attention(q, k, v, bt, lens.float(), 8, 1.0)
    with pytest.raises(ValueError, match=r"block_tables must be int32/int64 \[2, max_blocks\]"):
        ops.paged_decode_attention(q, k, v, bt[:1], lens, 8, 1.0)
    with pytest.raises(ValueError, match=r"not a whole number of blocks of 7"):
        ops.paged_decode_attention(q, k, v, bt, lens, 7, 1.0)
    with pytest.raises(ValueError, match=r"v_cache .* must match k_cache"):
        ops.paged_decode_attention(q, k, v[:8], bt, lens, 8, 1.0)
    if DEV == "cpu":  # content checks (a device sync on CUDA: opt-in there)
        with pytest.raises(ValueError, match=r"length 17 exceeds the block table's 2 blocks of 8 tokens"):
            ops.paged_decode_attention(q, k, v, bt, torch.tensor([17, 3], dtype=torch.int32), 8, 1.0)
        for backend in ("reference", "triton"):
            with pytest.raises(ValueError, match=r"block ids must be in \[0, 6\) for the cache of 48 slots, got \[9\]"):
                ops.paged_decode_attention(q, k, v, torch.full_like(bt, 9), lens, 8, 1.0, backend=backend)


def test_opcheck():
    q, k, v, bt, lens = _case([5, 9], qpk=2, block_size=8)
    torch.library.opcheck(torch.ops.cometq.paged_decode_attention.default,
                          (q, k, v, bt, lens, 8, 0.25, 0, "reference"))
