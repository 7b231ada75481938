"""Paged KV4 pool: allocation invariants (property-based), appends vs the reference, error paths."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cometq.paged import KV4PoolExhausted, PagedKV4Config, PagedKV4Pool
from cometq.reference import dequantize_kv4, quantize_kv4

AXES = [("token", "token"), ("channel", "token"), ("channel", "channel")]


def _cfg(ka="channel", va="token", **kw):
    base = dict(num_blocks=12, num_kv_heads=2, head_dim=32, block_size=16, group_size=8, key_axis=ka, value_axis=va,
                max_seqs=4, tail_dtype=torch.float32)
    base.update(kw)
    return PagedKV4Config(**base)


def _tokens(h, t, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, t, d, generator=g) + 2 * torch.randn(d, generator=g), torch.randn(h, t, d, generator=g)


def _expected(x, n_q, g, axis):
    """Reference view of a sequence: 4-bit groups of the first n_q tokens, exact tail."""
    if n_q == 0:
        return x.float()
    deq = dequantize_kv4(quantize_kv4(x[:, :n_q], g, axis))
    return torch.cat([deq, x[:, n_q:].float()], 1)


def check_invariants(pool: PagedKV4Pool):
    c = pool.config
    owned = [b for s in pool.sequences for b in pool.blocks_of(s)]
    assert len(owned) == len(set(owned)), "a block is shared by two sequences (or listed twice)"
    free = pool._free_blocks
    assert len(free) == len(set(free))
    assert set(owned).isdisjoint(free), "a block is both free and owned"
    assert sorted(owned + free) == list(range(c.num_blocks)), "a block leaked"
    for s in pool.sequences:
        q, t = pool._qlen[s], pool._tlen[s]
        assert len(pool.blocks_of(s)) == -(-q // c.block_size)
        assert int(pool.quant_lens[s]) == q and int(pool.tail_lens[s]) == t
        row = pool.block_tables[s].tolist()
        nb = len(pool.blocks_of(s))
        assert row[:nb] == pool.blocks_of(s) and all(x == -1 for x in row[nb:])
        if c.staged:
            assert q % c.group_size == 0 and t < c.group_size
        else:
            assert t == 0
    live = set(pool.sequences)
    assert sorted(live | set(pool._free_slots)) == list(range(c.max_seqs))
    for s in set(range(c.max_seqs)) - live:
        assert int(pool.quant_lens[s]) == 0 and int(pool.tail_lens[s]) == 0
        assert (pool.block_tables[s] == -1).all()


def _snapshot(pool):
    return (list(pool._free_blocks), {s: list(b) for s, b in pool._blocks.items()}, dict(pool._qlen),
            dict(pool._tlen), pool.block_tables.clone(), pool.k_packed.clone(), pool.tail_k.clone())


def _same(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("add")),
        st.tuples(st.just("append"), st.integers(0, 3), st.integers(1, 40)),
        st.tuples(st.just("decode"), st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True)),
        st.tuples(st.just("free"), st.integers(0, 3)),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, axes=st.sampled_from(AXES), max_bps=st.sampled_from([None, 3]))
def test_allocation_invariants(ops, axes, max_bps):
    pool = PagedKV4Pool(_cfg(*axes, head_dim=8, group_size=4, block_size=8, num_blocks=10, max_blocks_per_seq=max_bps))
    contents = {}  # seq -> (k, v) appended so far
    seed = 0
    for op in ops:
        live = pool.sequences
        seed += 1
        if op[0] == "add":
            if len(live) == pool.config.max_seqs:
                with pytest.raises(KV4PoolExhausted):
                    pool.add_sequence()
            else:
                s = pool.add_sequence()
                contents[s] = (torch.zeros(2, 0, 8), torch.zeros(2, 0, 8))
        elif op[0] == "free" and live:
            s = live[op[1] % len(live)]
            pool.free_sequence(s)
            del contents[s]
        elif op[0] in ("append", "decode") and live:
            if op[0] == "append":
                sids = [live[op[1] % len(live)]]
                k, v = _tokens(2, op[2], 8, seed)
            else:
                sids = sorted({live[i % len(live)] for i in op[1]})
                k, v = _tokens(2, len(sids), 8, seed)
            before = _snapshot(pool)
            try:
                if op[0] == "append":
                    pool.append(sids[0], k, v)
                else:
                    pool.append_decode(sids, k.transpose(0, 1), v.transpose(0, 1))
            except KV4PoolExhausted:
                assert _same(before, _snapshot(pool)), "a failed append changed the pool"
            else:
                for i, s in enumerate(sids):
                    ks = k if op[0] == "append" else k[:, i : i + 1]
                    vs = v if op[0] == "append" else v[:, i : i + 1]
                    contents[s] = (torch.cat([contents[s][0], ks], 1), torch.cat([contents[s][1], vs], 1))
        check_invariants(pool)
    # data: every live sequence reads back as the reference quantization of what was appended
    c = pool.config
    for s in pool.sequences:
        k, v = pool.gather(s)
        nq = pool._qlen[s]
        assert torch.equal(k, _expected(contents[s][0], nq, c.group_size, c.key_axis))
        assert torch.equal(v, _expected(contents[s][1], nq, c.group_size, c.value_axis))


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_prefill_then_decode_matches_reference(axes, backend):
    c = _cfg(*axes)
    pool = PagedKV4Pool(c)
    a, b = pool.add_sequence(), pool.add_sequence()
    ka, va = _tokens(2, 29, 32, 1)
    kb, vb = _tokens(2, 17, 32, 2)
    pool.append(a, ka[:, :13], va[:, :13], backend=backend)
    pool.append(b, kb[:, :3], vb[:, :3], backend=backend)
    for t in range(13, 29):  # batched decode; b stops after its 17 tokens
        sids = [a, b] if t - 10 < 17 else [a]
        tb = t - 10
        k = torch.stack([ka[:, t]] + ([kb[:, tb]] if len(sids) == 2 else []))
        v = torch.stack([va[:, t]] + ([vb[:, tb]] if len(sids) == 2 else []))
        pool.append_decode(sids, k, v, backend=backend)
    check_invariants(pool)
    for s, (k, v) in ((a, (ka, va)), (b, (kb, vb))):
        assert pool.seq_len(s) == k.shape[1]
        gk, gv = pool.gather(s)
        nq = pool._qlen[s]
        assert nq == (k.shape[1] // 8 * 8 if c.staged else k.shape[1])
        assert torch.equal(gk, _expected(k, nq, c.group_size, c.key_axis))
        assert torch.equal(gv, _expected(v, nq, c.group_size, c.value_axis))


def test_exhaustion_and_limits():
    pool = PagedKV4Pool(_cfg("token", "token", num_blocks=3, max_seqs=2, max_blocks_per_seq=2))
    a = pool.add_sequence()
    b = pool.add_sequence()
    with pytest.raises(KV4PoolExhausted, match="no free sequence slot"):
        pool.add_sequence()
    k, v = _tokens(2, 32, 32, 0)
    pool.append(a, k, v)  # 2 blocks
    with pytest.raises(KV4PoolExhausted, match="max_blocks_per_seq"):
        pool.append(a, k[:, :1], v[:, :1])
    snap = _snapshot(pool)
    with pytest.raises(KV4PoolExhausted, match="needs 2 blocks, only 1 free"):
        pool.append(b, k[:, :17], v[:, :17])
    assert _same(snap, _snapshot(pool))
    with pytest.raises(KV4PoolExhausted):  # all-or-nothing across a decode batch too
        pool.append_decode([a, b], k[:, :2].transpose(0, 1), v[:, :2].transpose(0, 1))
    assert _same(snap, _snapshot(pool))
    pool.free_sequence(a)
    assert pool.num_free_blocks == 3
    pool.append(b, k[:, :17], v[:, :17])
    check_invariants(pool)


def test_errors():
    with pytest.raises(ValueError, match="block_size=24 must be a multiple of group_size=16"):
        PagedKV4Config(num_blocks=4, num_kv_heads=1, head_dim=64, block_size=24, group_size=16)
    with pytest.raises(ValueError, match="head_dim % group_size"):
        PagedKV4Config(num_blocks=4, num_kv_heads=1, head_dim=48, block_size=64, group_size=32)
    with pytest.raises(ValueError, match="key_axis"):
        PagedKV4Config(num_blocks=4, num_kv_heads=1, head_dim=64, key_axis="head")
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKV4Config(num_blocks=0, num_kv_heads=1, head_dim=64)
    with pytest.raises(TypeError, match="tail_dtype"):
        PagedKV4Config(num_blocks=4, num_kv_heads=1, head_dim=64, tail_dtype=torch.int8)
    with pytest.raises(TypeError, match="PagedKV4Config"):
        PagedKV4Pool({"num_blocks": 4})
    pool = PagedKV4Pool(_cfg())
    with pytest.raises(KeyError, match="unknown sequence id 0"):
        pool.append(0, *_tokens(2, 1, 32, 0))
    s = pool.add_sequence()
    with pytest.raises(ValueError, match=r"k shape \(3, 1, 32\)"):
        pool.append(s, *_tokens(3, 1, 32, 0))
    with pytest.raises(ValueError, match="distinct"):
        pool.append_decode([s, s], torch.randn(2, 2, 32), torch.randn(2, 2, 32))
    with pytest.raises(ValueError, match=r"expected \(1, 2, 32\)"):
        pool.append_decode([s], torch.randn(1, 2, 16), torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="empty"):
        pool.decode_attention(torch.randn(1, 4, 32), [s])
    pool.free_sequence(s)
    with pytest.raises(KeyError):
        pool.free_sequence(s)


def test_bytes_per_block():
    c = PagedKV4Config(num_blocks=1, num_kv_heads=8, head_dim=128, block_size=64, group_size=64)
    # K, V: 8 heads x 64 tokens x 64 bytes; K scales+zeros per channel: 8 x 1 x 128 x 2 x 2B; V per token: 8 x 64 x 2 x 2 x 2B
    assert c.bytes_per_block() == 2 * 8 * 64 * 64 + 8 * 128 * 4 + 8 * 64 * 2 * 4
    pool = PagedKV4Pool(c)
    got = sum(t.numel() * t.element_size() for t in (pool.k_packed, pool.v_packed, pool.k_scale, pool.k_zero,
                                                       pool.v_scale, pool.v_zero))
    assert got == c.bytes_per_block()


def test_default_num_splits():
    from cometq.paged import default_num_splits

    assert default_num_splits(16, 8, 64) == 3  # 128 programs -> 3 splits fill 2 waves of 132 SMs
    assert default_num_splits(1, 8, 64) == 33
    assert default_num_splits(1, 8, 4) == 4  # never more splits than blocks
    assert default_num_splits(64, 8, 256) == 1
    pool = PagedKV4Pool(_cfg("token", "token"))
    s = pool.add_sequence()
    pool.append(s, *_tokens(2, 40, 32, 0))
    assert pool.default_num_splits([s]) == 3  # 40 tokens = 3 blocks of 16


@pytest.mark.parametrize("axes", AXES[1:])
def test_pool_holds_what_kv4cache_holds(axes):
    """Same tokens, same config: the serving pool and the transformers cache store identical 4-bit data."""
    from cometq.kvcache import KV4Config, KV4Layer

    layer = KV4Layer(KV4Config(axes[0], axes[1], 8, 0))
    pool = PagedKV4Pool(_cfg(*axes))
    s = pool.add_sequence()
    k, v = _tokens(2, 45, 32, 3)
    for a, b in ((0, 20), (20, 21), (21, 45)):
        layer.update(k[None, :, a:b], v[None, :, a:b])
        pool.append(s, k[:, a:b], v[:, a:b])
    gk, gv = pool.gather(s)
    lk = torch.cat([dequantize_kv4(layer.qkeys)[0], layer.keys[0]], 1)
    lv = torch.cat([dequantize_kv4(layer.qvalues)[0], layer.values[0]], 1)
    assert layer.quantized_length == pool._qlen[s] == 40
    assert torch.equal(gk, lk) and torch.equal(gv, lv)


def test_opcheck_quantize_append():
    from cometq.paged import pool_scale_shape

    x = torch.randn(2, 2, 1, 32)
    packed = torch.zeros(3, 2, 16, 16, dtype=torch.uint8)
    scale = torch.zeros(pool_scale_shape("token", 3, 2, 16, 32, 8), dtype=torch.float16)
    args = (x, packed, scale, scale.clone(), torch.tensor([2, 0], dtype=torch.int32),
            torch.tensor([5, 15], dtype=torch.int32), 8, "token", "reference")
    torch.library.opcheck(torch.ops.cometq.kv4_quantize_append, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
