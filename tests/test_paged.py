"""Paged KV4 pool: allocation invariants (property-based), appends vs the reference, error paths."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cometq.paged import KV4PoolExhausted, MultiLayerKV4Pool, PagedKV4Config, PagedKV4Pool
from cometq.reference import dequantize_kv4, quantize_kv4
from cometq.testing import ATTN_ATOL, ATTN_RTOL

AXES = [("token", "token"), ("channel", "token"), ("channel", "channel")]
# the Triton cases run on the GPU when there is one (the interpreter on CPU otherwise)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _dev(backend):
    return DEV if backend == "triton" else "cpu"


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


def check_invariants(pool):
    """Allocator + table invariants of a PagedKV4Pool view or a MultiLayerKV4Pool (every layer)."""
    m = pool.pool if isinstance(pool, PagedKV4Pool) else pool
    c = m.config
    owned = [b for s in m.sequences for b in m.blocks_of(s)]
    assert len(owned) == len(set(owned)), "a block is shared by two sequences (or listed twice)"
    free = m._free_blocks
    assert len(free) == len(set(free))
    assert set(owned).isdisjoint(free), "a block is both free and owned"
    assert sorted(owned + free) == list(range(c.num_blocks)), "a block leaked"
    assert m.num_free_blocks + m.num_used_blocks == c.num_blocks
    for s in m.sequences:
        blocks = m.blocks_of(s)
        row = m.block_tables[s].tolist()
        assert row[: len(blocks)] == blocks and all(x == -1 for x in row[len(blocks):])
        assert len(blocks) <= c.blocks_per_seq
        for li in range(m.num_layers):
            q, t = m.quant_len(s, li), m.tail_len(s, li)
            assert q + t <= m.capacity(s), "a layer holds more tokens than its sequence's blocks"
            assert -(-q // c.block_size) <= len(blocks)
            assert int(m.quant_lens[li, s]) == q and int(m.tail_lens[li, s]) == t
            if c.staged:
                assert q % c.group_size == 0 and t < c.group_size
            else:
                assert t == 0
    live = set(m.sequences)
    assert sorted(live | set(m._free_slots)) == list(range(c.max_seqs))
    for s in set(range(c.max_seqs)) - live:
        assert (m.quant_lens[:, s] == 0).all() and (m.tail_lens[:, s] == 0).all()
        assert (m.block_tables[s] == -1).all()


def check_exact_blocks(pool: PagedKV4Pool):
    """A one-layer pool that allocates on append owns exactly the blocks its 4-bit tokens fill."""
    for s in pool.sequences:
        assert len(pool.blocks_of(s)) == -(-pool.quant_len(s) // pool.config.block_size)


def _snapshot(pool):
    m = pool.pool if isinstance(pool, PagedKV4Pool) else pool
    return (list(m._free_blocks), {s: list(b) for s, b in m._blocks.items()}, [list(x) for x in m._qlen],
            [list(x) for x in m._tlen], m.block_tables.clone(), m.quant_lens.clone(), m.tail_lens.clone(),
            m.k_packed.clone(), m.k_scale.clone(), m.v_packed.clone(), m.tail_k.clone(), m.tail_v.clone())


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
        check_exact_blocks(pool)
    # data: every live sequence reads back as the reference quantization of what was appended
    c = pool.config
    for s in pool.sequences:
        k, v = pool.gather(s)
        nq = pool.quant_len(s)
        assert torch.equal(k, _expected(contents[s][0], nq, c.group_size, c.key_axis))
        assert torch.equal(v, _expected(contents[s][1], nq, c.group_size, c.value_axis))


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_prefill_then_decode_matches_reference(axes, backend):
    c = _cfg(*axes)
    dev = _dev(backend)
    pool = PagedKV4Pool(c, dev)
    a, b = pool.add_sequence(), pool.add_sequence()
    ka, va = (t.to(dev) for t in _tokens(2, 29, 32, 1))
    kb, vb = (t.to(dev) for t in _tokens(2, 17, 32, 2))
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
        nq = pool.quant_len(s)
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
    # ids that compare equal to a live slot but are not ints, and unknown ids, in batched calls
    for bad in (float(s), True if s == 1 else 1.0 * s, s + 7):
        with pytest.raises(KeyError, match="unknown sequence id"):
            pool.append_decode([bad], torch.randn(1, 2, 32), torch.randn(1, 2, 32))
        with pytest.raises(KeyError, match="unknown sequence id"):
            pool.pool.decode_attention(0, torch.randn(1, 4, 32), [bad])
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

    assert default_num_splits(16, 8, 64) == 6  # 128 programs x 6 splits ~ 6 per SM (H100 best at batch 16)
    assert default_num_splits(1, 8, 64) == 64  # capped by the 64 blocks (99 wanted)
    assert default_num_splits(1, 8, 128) == 64  # and by 64
    assert default_num_splits(2, 8, 128) == 49
    assert default_num_splits(8, 8, 128) == 12
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
    assert layer.quantized_length == pool.quant_len(s) == 40
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


# ---------------------------------------------------------------- multi-layer pool, one shared allocator
def _ml(axes=("channel", "token"), layers=3, device="cpu", **kw):
    base = dict(head_dim=8, group_size=4, block_size=8, num_blocks=10, max_seqs=4)
    base.update(kw)
    return MultiLayerKV4Pool(_cfg(*axes, **base), layers, device)


def _layer_tokens(pool, t, seed):
    c = pool.config
    k, v = _tokens(c.num_kv_heads, t, c.head_dim, seed)
    return k.to(pool.device), v.to(pool.device)


ml_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add")),
        st.tuples(st.just("reserve"), st.integers(0, 3), st.integers(0, 48)),
        st.tuples(st.just("reserve_many"), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40)), min_size=1,
                                                    max_size=4)),
        # append to one layer (layers may lag each other within a forward); T may exceed the reservation
        st.tuples(st.just("append"), st.integers(0, 2), st.integers(0, 3), st.integers(0, 20)),
        st.tuples(st.just("prefill"), st.integers(0, 2), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12)),
                                                                  min_size=1, max_size=4)),
        st.tuples(st.just("decode"), st.integers(0, 2), st.lists(st.integers(0, 3), min_size=1, max_size=4)),
        st.tuples(st.just("free"), st.integers(0, 3)),
    ),
    max_size=30,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n0=st.integers(0, 4), ops=ml_ops, axes=st.sampled_from(AXES), max_bps=st.sampled_from([None, 3]))
def test_shared_allocator_invariants(n0, ops, axes, max_bps):
    """Random reserve/append/free: no block leaked or shared, reserve and appends all-or-nothing,
    free returns everything, and every layer reads back the reference quantization of what it got."""
    pool = _ml(axes, max_blocks_per_seq=max_bps)
    c, nl = pool.config, pool.num_layers
    contents = {}  # (slot, layer) -> (k, v) appended so far
    seed = 0
    ops = [("add",)] * n0 + ops  # start with several live sequences more often

    def pick(i):
        live = pool.sequences
        return live[i % len(live)] if live else None

    for op in ops:
        seed += 1
        before = _snapshot(pool)
        if op[0] == "add":
            if pool.num_free_slots == 0:
                with pytest.raises(KV4PoolExhausted, match="no free sequence slot"):
                    pool.add_sequence()
                assert _same(before, _snapshot(pool))
            else:
                s = pool.add_sequence()
                assert pool.blocks_of(s) == [] and all(pool.seq_len(s, li) == 0 for li in range(nl))
                for li in range(nl):
                    contents[s, li] = (torch.zeros(2, 0, 8), torch.zeros(2, 0, 8))
        elif op[0] in ("reserve", "reserve_many") and pool.sequences:
            plan = {pick(i): n for i, n in ([op[1:]] if op[0] == "reserve" else op[1])}
            have = {s: len(pool.blocks_of(s)) for s in plan}
            want = {s: max(have[s], pool.blocks_for(n)) for s, n in plan.items()}
            free0 = pool.num_free_blocks
            fits = (sum(want[s] - have[s] for s in plan) <= free0
                    and all(pool.blocks_for(n) <= c.blocks_per_seq for n in plan.values()))
            try:
                pool.reserve(*next(iter(plan.items()))) if op[0] == "reserve" else pool.reserve_many(plan)
            except KV4PoolExhausted:
                assert not fits
                assert _same(before, _snapshot(pool)), "a failed reserve changed the pool (partial allocation)"
            else:
                assert fits
                for s, n in plan.items():
                    assert len(pool.blocks_of(s)) == want[s] and pool.capacity(s) >= n
                    assert pool.blocks_of(s)[: have[s]] == before[1][s], "reserve moved blocks already owned"
                assert pool.num_free_blocks == free0 - sum(want[s] - have[s] for s in plan)
        elif op[0] in ("append", "prefill", "decode") and pool.sequences:
            li = op[1]
            if op[0] == "append":
                sids, lens = [pick(op[2])], [op[3]]
            elif op[0] == "prefill":
                sids, lens = [], []
                for i, n in op[2]:
                    if pick(i) not in sids:
                        sids.append(pick(i))
                        lens.append(n)
            else:
                sids = list(dict.fromkeys(pick(i) for i in op[2]))
                lens = [1] * len(sids)
            data = [_layer_tokens(pool, n, seed * 10 + j) for j, n in enumerate(lens)]
            fits = all(pool.seq_len(s, li) + n <= pool.capacity(s) for s, n in zip(sids, lens))
            try:
                if op[0] == "append":
                    pool.append(li, sids[0], *data[0])
                elif op[0] == "prefill":
                    pool.append_prefill(li, sids, [d[0] for d in data], [d[1] for d in data])
                else:
                    k = torch.stack([d[0][:, 0] for d in data])
                    v = torch.stack([d[1][:, 0] for d in data])
                    pool.append_decode(li, sids, k, v)
            except ValueError as e:
                assert not fits and "reserve" in str(e)
                assert _same(before, _snapshot(pool)), "an append past the reservation changed the pool"
            else:
                assert fits
                assert pool.num_free_blocks == before[0].__len__(), "an append allocated blocks"
                for s, (k, v) in zip(sids, data):
                    ck, cv = contents[s, li]
                    contents[s, li] = (torch.cat([ck, k], 1), torch.cat([cv, v], 1))
        elif op[0] == "free" and pool.sequences:
            s = pick(op[1])
            n_owned, free0 = len(pool.blocks_of(s)), pool.num_free_blocks
            pool.free(s)
            assert pool.num_free_blocks == free0 + n_owned and s not in pool.sequences
            for li in range(nl):
                del contents[s, li]
        check_invariants(pool)
    for s in pool.sequences:
        for li in range(nl):
            k, v = pool.gather(s, li)
            nq = pool.quant_len(s, li)
            assert torch.equal(k, _expected(contents[s, li][0], nq, c.group_size, c.key_axis))
            assert torch.equal(v, _expected(contents[s, li][1], nq, c.group_size, c.value_axis))
    for s in pool.sequences:
        pool.free(s)
    check_invariants(pool)
    assert pool.num_free_blocks == c.num_blocks and pool.num_free_slots == c.max_seqs


def _filled_pool(axes, backend="reference", layers=2, lengths=(1, 8, 13, 30), device="cpu"):
    pool = _ml(axes, layers, device, head_dim=32, group_size=8, block_size=16, num_blocks=16, max_seqs=4)
    sids = [pool.add_sequence() for _ in lengths]
    for s, n in zip(sids, lengths):
        pool.reserve(s, n)
    for li in range(layers):
        data = [_layer_tokens(pool, n, 100 * li + s) for s, n in zip(sids, lengths)]
        pool.append_prefill(li, sids, [d[0] for d in data], [d[1] for d in data], backend=backend)
    return pool, sids


@pytest.mark.parametrize("axes", AXES)
def test_gather_prefix_equals_prefix_of_full_gather(axes):
    pool, sids = _filled_pool(axes)
    for li in range(pool.num_layers):
        for s in sids:
            fk, fv = pool.gather(s, li)
            n = pool.seq_len(s, li)
            assert fk.shape[1] == n
            for m in sorted({0, 1, n // 2, n - 1, n, pool.quant_len(s, li), min(n, 17)}):
                if 0 <= m <= n:
                    pk, pv = pool.gather(s, li, m)
                    assert torch.equal(pk, fk[:, :m]) and torch.equal(pv, fv[:, :m]), (li, s, m)
            pk, _ = pool.gather(s, li, n, dtype=torch.float16)
            assert pk.dtype == torch.float16 and torch.equal(pk, fk.half())
    with pytest.raises(ValueError, match=r"n_tokens must be an int in \[0, 30\]"):
        pool.gather(sids[3], 0, 31)
    with pytest.raises(ValueError, match="layer must be an int in"):
        pool.gather(sids[0], 2)


def _state(pool):
    return [pool.k_packed, pool.k_scale, pool.k_zero, pool.v_packed, pool.v_scale, pool.v_zero, pool.tail_k,
            pool.tail_v, pool.block_tables, pool.quant_lens, pool.tail_lens]


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_batched_prefill_equals_sequential_appends(axes, backend):
    """One append_prefill over several sequences == one append per sequence, bit for bit
    (including sequences that already hold a partial tail / partial block, and an empty chunk)."""
    pools = [_ml(axes, 2, _dev(backend), head_dim=32, group_size=8, block_size=16, num_blocks=16, max_seqs=4)
             for _ in range(2)]
    first, second = (5, 0, 16, 11), (19, 7, 0, 25)
    for p in pools:
        sids = [p.add_sequence() for _ in first]
        for s, a, b in zip(sids, first, second):
            p.reserve(s, a + b)
    for step, lens in enumerate((first, second)):
        for li in range(2):
            data = [_layer_tokens(pools[0], n, 1000 * step + 10 * li + j) for j, n in enumerate(lens)]
            pools[0].append_prefill(li, sids, [d[0] for d in data], [d[1] for d in data], backend=backend)
            for s, (k, v) in zip(sids, data):
                pools[1].append(li, s, k, v, backend=backend)
    for a, b in zip(_state(pools[0]), _state(pools[1])):
        assert torch.equal(a, b)
    assert [pools[0].seq_len(s, 1) for s in sids] == [a + b for a, b in zip(first, second)]
    check_invariants(pools[0])


def test_append_prefill_matches_one_layer_view_and_kv4_reference():
    """The one-layer PagedKV4Pool view and the multi-layer pool write the same bytes."""
    axes = ("channel", "token")
    multi, sids = _filled_pool(axes, layers=1)
    single = PagedKV4Pool(_cfg(*axes, head_dim=32, group_size=8, block_size=16, num_blocks=16, max_seqs=4))
    for s, n in zip(sids, (1, 8, 13, 30)):
        assert single.add_sequence() == s
        single.append(s, *_layer_tokens(multi, n, s))
    for a, b in zip(_state(multi), _state(single.pool)):
        assert torch.equal(a, b)


def test_multilayer_views_share_one_allocator():
    pool = _ml(("token", "token"), layers=3, num_blocks=6)
    views = [pool.layer(i) for i in range(3)]
    s = views[1].add_sequence()  # a slot is a slot of every layer
    assert pool.sequences == views[0].sequences == views[2].sequences == [s]
    views[1].append(s, *_layer_tokens(pool, 17, 0))  # the view reserves 3 blocks of 8 for all layers
    assert pool.blocks_of(s) == views[2].blocks_of(s) and len(pool.blocks_of(s)) == 3
    assert all(v.num_free_blocks == 3 for v in views)
    assert views[0].seq_len(s) == 0 and views[1].seq_len(s) == 17  # lengths are per layer
    views[0].append(s, *_layer_tokens(pool, 17, 1))  # already reserved: no new block
    assert pool.num_free_blocks == 3
    assert views[1].k_packed.data_ptr() == pool.k_packed[1].data_ptr()
    views[2].free_sequence(s)
    assert pool.num_free_blocks == 6 and pool.sequences == []


def test_reserve_is_all_or_nothing_and_exact():
    pool = _ml(("channel", "token"), layers=2, num_blocks=5, max_blocks_per_seq=3)
    a, b = pool.add_sequence(), pool.add_sequence()
    pool.reserve(a, 11)  # G=4: 8 tokens 4-bit (1 block of 8) + 3 in the fp tail (no block)
    assert len(pool.blocks_of(a)) == 1 and pool.capacity(a) == 8 + 3
    pool.reserve(a, 5)  # never shrinks
    assert len(pool.blocks_of(a)) == 1
    snap = _snapshot(pool)
    with pytest.raises(KV4PoolExhausted, match=r"max_blocks_per_seq=3 for 28 tokens"):
        pool.reserve(b, 28)
    with pytest.raises(KV4PoolExhausted, match=r"reserve needs 5 blocks, only 4 free of 5 \(sequence 0: \+2, sequence 1: \+3\)"):
        pool.reserve_many({a: 24, b: 24})
    assert _same(snap, _snapshot(pool))
    with pytest.raises(ValueError, match="n_tokens must be an int >= 0"):
        pool.reserve(a, -1)
    with pytest.raises(KeyError, match="unknown sequence id 7"):
        pool.reserve(7, 1)
    # appends never allocate: past the reservation is a caller error, nothing written
    with pytest.raises(ValueError, match=r"layer 1: sequence 0 would reach 12 tokens but its reservation holds 11"):
        pool.append(1, a, *_layer_tokens(pool, 12, 0))
    with pytest.raises(ValueError, match="call reserve"):
        # b owns no block: its fp tail holds G-1 = 3 tokens, not 4 (a's 1 token would fit: still nothing written)
        pool.append_prefill(0, [a, b], [torch.randn(2, 1, 8), torch.randn(2, 4, 8)],
                            [torch.randn(2, 1, 8), torch.randn(2, 4, 8)])
    assert _same(snap, _snapshot(pool))
    pool.reserve_many({a: 24, b: 16})
    assert pool.num_free_blocks == 0 and len(pool.blocks_of(a)) == 3 and len(pool.blocks_of(b)) == 2
    pool.free(a)
    assert pool.num_free_blocks == 3 and pool.blocks_of(b) == [3, 4]
    check_invariants(pool)


def test_multilayer_errors():
    with pytest.raises(ValueError, match="num_layers must be an int >= 1, got 0"):
        MultiLayerKV4Pool(_cfg(), 0)
    with pytest.raises(TypeError, match="PagedKV4Config"):
        MultiLayerKV4Pool("cfg", 2)
    pool = _ml(("token", "token"), layers=2)
    s, t = pool.add_sequence(), pool.add_sequence()
    pool.reserve_many({s: 4, t: 4})
    k = torch.randn(2, 2, 8)
    with pytest.raises(ValueError, match="distinct"):
        pool.append_prefill(0, [s, s], [k, k], [k, k])
    with pytest.raises(ValueError, match="one k and one v per sequence: 2 seq_ids, 1 k, 2 v"):
        pool.append_prefill(0, [s, t], [k], [k, k])
    with pytest.raises(TypeError, match="share a dtype"):
        pool.append_prefill(0, [s, t], [k, k.half()], [k, k.half()])
    with pytest.raises(ValueError, match=r"ks\[1\] shape \(2, 2, 4\) != expected \(2, T, 8\)"):
        pool.append_prefill(0, [s, t], [k, k[..., :4]], [k, k])
    with pytest.raises(ValueError, match=r"vs\[0\] shape \(2, 1, 8\)"):
        pool.append_prefill(0, [s], [k], [k[:, :1]])
    with pytest.raises(ValueError, match="layer must be an int in \\[0, 2\\), got 2"):
        pool.append(2, s, k, k)
    with pytest.raises(ValueError, match="empty in layer 1"):
        pool.decode_attention(1, torch.randn(1, 4, 8), [s])
    assert pool.seq_len(s, 0) == 0 and pool.num_used_blocks == 2


def test_multilayer_decode_attention_per_layer():
    """Decode attention of layer l reads layer l's data through the shared block table."""
    pool, sids = _filled_pool(("channel", "token"), layers=2, device=DEV)
    q = torch.randn(len(sids), 4, 32, generator=torch.Generator().manual_seed(3)).to(DEV)
    for li in range(2):
        out = pool.decode_attention(li, q, sids, backend="reference")
        for i, s in enumerate(sids):
            k, v = pool.gather(s, li)
            k, v = k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)
            p = torch.softmax(torch.einsum("hd,htd->ht", q[i], k) * 32 ** -0.5, -1)
            torch.testing.assert_close(out[i], torch.einsum("ht,htd->hd", p, v), rtol=1e-5, atol=1e-5)
    assert not torch.equal(pool.decode_attention(0, q, sids), pool.decode_attention(1, q, sids))
    # the Triton kernel reads a layer slice (non-zero storage offset) of the stacked storage
    from cometq.testing import ATTN_ATOL, ATTN_RTOL

    torch.testing.assert_close(pool.decode_attention(1, q, sids, num_splits=2, backend="triton"),
                               pool.decode_attention(1, q, sids, backend="reference"), rtol=ATTN_RTOL, atol=ATTN_ATOL)


def test_serving_adapter_uses_the_pool_allocator():
    from cometq.serve.kv import PoolExhausted
    from cometq.serve.kv4 import KV4PagedPool

    p = KV4PagedPool(num_layers=2, num_blocks=4, n_kv_heads=2, head_dim=8, block_size=8, group_size=4, max_seqs=2,
                     tail_dtype=torch.float32)
    p.reserve(100, 19)  # 16 tokens 4-bit (2 blocks), 3 in the tail
    assert p.num_used_blocks == 2 == p.kv.num_used_blocks and p.layers[1].num_free_blocks == 2
    with pytest.raises(PoolExhausted, match="sequence 101: reserve needs 3 blocks, only 2 free"):
        p.reserve(101, 24)
    assert not p.has_seq(101) and p.kv.num_free_slots == 1  # the failed reservation released its slot
    p.reserve(101, 4)
    with pytest.raises(PoolExhausted, match="no free sequence slot"):
        p.reserve(102, 1)
    g = torch.Generator().manual_seed(0)
    ka, va, kb, vb = (torch.randn(n, 2, 8, generator=g) for n in (19, 19, 4, 4))
    for li in range(2):  # the batched prefill write == the per-sequence write of another pool
        p.write_prefill(li, [100, 101], [0, 0], [ka[:11], kb[:3]], [va[:11], vb[:3]])
        p.write_prefill(li, [100, 101], [11, 3], [ka[11:], kb[3:]], [va[11:], vb[3:]])
    q = KV4PagedPool(num_layers=2, num_blocks=4, n_kv_heads=2, head_dim=8, block_size=8, group_size=4, max_seqs=2,
                     tail_dtype=torch.float32)
    q.reserve(100, 19)
    q.reserve(101, 4)
    for li in range(2):
        q.write(li, 100, 0, ka, va)
        q.write(li, 101, 0, kb, vb)
    # same bytes (the tails compared up to their lengths: stale tail rows beyond are never read)
    for a, b in zip(_state(p.kv)[:6] + _state(p.kv)[8:], _state(q.kv)[:6] + _state(q.kv)[8:]):
        assert torch.equal(a, b)
    for li in range(2):
        for s in (0, 1):
            t = int(p.kv.tail_lens[li, s])
            assert torch.equal(p.kv.tail_k[li, s, :, :t], q.kv.tail_k[li, s, :, :t])
            assert torch.equal(p.kv.tail_v[li, s, :, :t], q.kv.tail_v[li, s, :, :t])
    k7, v7 = p.read(1, 100, 7, torch.float32)
    kf, vf = p.read(1, 100, 19, torch.float32)
    assert k7.shape == (7, 2, 8) and torch.equal(k7, kf[:7]) and torch.equal(v7, vf[:7])
    with pytest.raises(ValueError, match="appends at the end: sequence 100 holds 19 tokens in layer 0, write starts at 3"):
        p.write(0, 100, 3, ka[:1], va[:1])
    with pytest.raises(ValueError, match="holds 19 tokens, 20 requested"):
        p.read(0, 100, 20, torch.float32)
    p.free(100)
    p.free(100)  # unknown id: no-op
    assert p.num_used_blocks == 1 and p.seq_ids() == [101]
    p.free(101)
    assert p.num_used_blocks == 0 and p.kv.num_free_slots == 2


def test_canonical_device_cpu():
    from cometq.layout import canonical_device

    assert canonical_device("cpu") == torch.device("cpu")
    assert canonical_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.gpu
def test_pool_built_on_plain_cuda_accepts_cuda0_tensors():
    """``device="cuda"`` (no index) must compare equal to the ``cuda:0`` of the data
    (the first H100 run refused every append with 'k is on cuda:0, pool is on cuda')."""
    pool = PagedKV4Pool(_cfg("channel", "token"), "cuda")
    assert pool.device.index is not None
    s = pool.add_sequence()
    k, v = _tokens(2, 21, 32, 0)
    pool.append(s, k.cuda(), v.cuda())
    assert pool.seq_len(s) == 21


_POOL_TENSORS = ("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero", "tail_k", "tail_v", "quant_lens",
                 "tail_lens", "block_tables")


@pytest.mark.parametrize("axes,tail_dtype,x_dtype", [(("channel", "token"), torch.float16, torch.float32),
                                                     (("channel", "channel"), torch.float32, torch.float32),
                                                     (("token", "channel"), torch.float16, torch.float32),
                                                     (("token", "token"), torch.float16, torch.float32),
                                                     (("channel", "token"), torch.float16, torch.bfloat16)])
def test_device_append_same_state_as_torch_path(axes, tail_dtype, x_dtype):
    """Decode appends through the one-launch device append (``cometq::kv4_decode_append`` on
    Triton: tail or block write, the group a token completes, both length rows) leave every
    pool tensor bit-identical to the torch path (backend "reference": index writes + group
    quantization), across group and block completions and a batch that shrinks."""
    from cometq.paged import MultiLayerKV4Pool

    c = _cfg(*axes, tail_dtype=tail_dtype)
    dev = _dev("triton")
    pools = {be: MultiLayerKV4Pool(c, 2, dev) for be in ("reference", "triton")}
    ka, va = (t.to(dev, x_dtype) for t in _tokens(2, 29, 32, 7))  # (bf16: the tail cast rounds bf16 -> fp16)
    kb, vb = (t.to(dev, x_dtype) for t in _tokens(2, 21, 32, 8))
    for be, pool in pools.items():
        a, b = pool.add_sequence(), pool.add_sequence()
        pool.reserve(a, 29)
        pool.reserve(b, 21)
        for L in range(2):
            pool.append_prefill(L, [a, b], [ka[:, :5], kb[:, :3]], [va[:, :5], vb[:, :3]], backend=be)
        for t in range(5, 29):
            sids = [a, b] if t - 2 < 21 else [a]
            k = torch.stack([ka[:, t]] + ([kb[:, t - 2]] if len(sids) == 2 else []))
            v = torch.stack([va[:, t]] + ([vb[:, t - 2]] if len(sids) == 2 else []))
            for L in range(2):
                assert pool._device_append(be) == (be == "triton")
                pool.append_decode(L, sids, k, v, backend=be)
    ref, tri = pools["reference"], pools["triton"]
    for name in _POOL_TENSORS:
        assert torch.equal(getattr(ref, name), getattr(tri, name)), name
    assert ref._qlen == tri._qlen and ref._tlen == tri._tlen


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("axes", [("channel", "token"), ("token", "token")])
def test_device_decode_step_matches_append_decode(backend, axes):
    """The graph-capturable decode step -- ``check/advance_decode_step`` on the host once, then per
    layer ``decode_append_device`` with padding rows (slot -1) and ``decode_attention_device``
    with padding rows repeating a slot -- leaves the pool exactly as ``append_decode`` does and
    attends exactly like ``decode_attention`` (real rows)."""
    from cometq.paged import MultiLayerKV4Pool

    c = _cfg(*axes, tail_dtype=torch.float16, group_size=8, block_size=16, num_blocks=16)
    dev = _dev(backend)
    pools = [MultiLayerKV4Pool(c, 2, dev) for _ in range(2)]
    g = torch.Generator().manual_seed(3)
    lens0 = [3, 7, 6]
    for pool in pools:
        for n in lens0:
            s = pool.add_sequence()
            pool.reserve(s, n + 19)
    for L in range(2):
        ks = [torch.randn(2, n, 32, generator=g).to(dev) for n in lens0]
        vs = [torch.randn(2, n, 32, generator=g).to(dev) for n in lens0]
        for pool in pools:
            pool.append_prefill(L, [0, 1, 2], ks, vs, backend="reference")
    eager, dev_pool = pools
    seqs = [2, 0, 1]
    for step in range(19):  # crosses group (8) and block (16) boundaries
        lens = [lens0[s] + step for s in seqs]
        k = torch.randn(3, 2, 32, generator=g).to(dev)
        v = torch.randn(3, 2, 32, generator=g).to(dev)
        q = torch.randn(3, 4, 32, generator=g).to(dev)
        dev_pool.check_decode_step(seqs, lens)
        dev_pool.advance_decode_step(seqs)
        pad_slots = torch.tensor(seqs + [-1, -1], dtype=torch.int32, device=dev)
        attn_slots = torch.tensor(seqs + [seqs[0]] * 2, dtype=torch.int32, device=dev)
        kp = torch.cat([k, torch.randn(2, 2, 32, generator=g).to(dev)])  # padding rows hold garbage
        vp = torch.cat([v, torch.randn(2, 2, 32, generator=g).to(dev)])
        qp = torch.cat([q, torch.randn(2, 4, 32, generator=g).to(dev)])
        for L in range(2):
            eager.append_decode(L, seqs, k, v, backend=backend)
            dev_pool.decode_append_device(L, kp, vp, pad_slots, backend)
            if step in (0, 1, 9, 18) and L == step % 2:  # (the interpreter is slow per attention call)
                want = eager.decode_attention(L, q, seqs, sm_scale=0.3, num_splits=2, backend=backend)
                got = dev_pool.decode_attention_device(L, qp, attn_slots, 0.3, 2, backend)
                # equal up to rounding: on the GPU the launch config is tuned per batch shape
                # (3 rows vs 5 padded rows), and a different tile sums in a different order
                torch.testing.assert_close(got[:3], want, rtol=ATTN_RTOL, atol=ATTN_ATOL)
    for name in _POOL_TENSORS:
        assert torch.equal(getattr(eager, name), getattr(dev_pool, name)), name
    assert eager._qlen == dev_pool._qlen and eager._tlen == dev_pool._tlen


def test_check_decode_step_errors():
    pool = _ml(layers=2)
    a, b = pool.add_sequence(), pool.add_sequence()
    pool.reserve(a, 4)
    pool.reserve(b, 12)
    x = torch.randn(2, 3, 8)
    for L in range(2):
        pool.append(L, a, x, x)
        pool.append(L, b, x, x)
    before = (repr(pool._qlen), repr(pool._tlen))
    with pytest.raises(ValueError, match="sequence 1 holds 3 tokens, the decode step expects 4"):
        pool.check_decode_step([a, b], [3, 4])
    with pytest.raises(ValueError, match="distinct"):
        pool.check_decode_step([a, a], [3, 3])
    with pytest.raises(ValueError, match="one length per sequence"):
        pool.check_decode_step([a, b], [3])
    pool.append(1, a, x[:, :1], x[:, :1])  # layer 1 ahead of layer 0
    with pytest.raises(ValueError, match="layer 0: sequence 0 holds 3 tokens, the decode step expects 4"):
        pool.check_decode_step([a], [4])
    assert (repr(pool._qlen), repr(pool._tlen)) != before  # (the append above moved layer 1 only)
    pool2 = _ml(("token", "token"), layers=1, block_size=8)
    s = pool2.add_sequence()
    pool2.reserve(s, 8)
    pool2.append(0, s, torch.randn(2, 8, 8), torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="reserve"):
        pool2.check_decode_step([s], [8])  # the 9th token needs a second block
    assert pool2._qlen[0][s] == 8


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decode_append_op_padding_and_missing_block(backend):
    """The op itself: padding rows (-1) change nothing; a row whose token would land in an
    unreserved block is an error in the reference and skipped whole by the kernel."""
    from cometq import ops

    c = _cfg("token", "token", tail_dtype=torch.float16, group_size=8, block_size=16, num_blocks=4)
    dev = _dev(backend)
    pool = MultiLayerKV4Pool(c, 1, dev)
    s = pool.add_sequence()
    pool.reserve(s, 16)
    pool.append(0, s, torch.randn(2, 16, 32).to(dev), torch.randn(2, 16, 32).to(dev))  # block full, no 2nd block
    snap = {n: getattr(pool, n).clone() for n in _POOL_TENSORS}
    x = torch.randn(1, 2, 32, device=dev)
    args = (x, x, pool.k_packed[0], pool.k_scale[0], pool.k_zero[0], pool.v_packed[0], pool.v_scale[0],
            pool.v_zero[0], pool.tail_k[0], pool.tail_v[0], pool.block_tables, pool._lens[:, 0])
    ops.kv4_decode_append(*args, torch.tensor([-1], dtype=torch.int32, device=dev), 8, "token", "token", backend)
    for n in _POOL_TENSORS:
        assert torch.equal(getattr(pool, n), snap[n]), n
    one = torch.tensor([s], dtype=torch.int32, device=dev)
    if backend == "reference":
        with pytest.raises(ValueError, match="no block 1 reserved"):
            ops.kv4_decode_append(*args, one, 8, "token", "token", backend)
    else:
        ops.kv4_decode_append(*args, one, 8, "token", "token", backend)
        for n in _POOL_TENSORS:
            assert torch.equal(getattr(pool, n), snap[n]), n


def test_decode_append_op_checks_and_opcheck():
    from cometq import ops

    pool = _ml(layers=1)
    s = pool.add_sequence()
    pool.reserve(s, 8)
    c = pool.config
    x = torch.randn(1, 2, 8)
    pargs = (pool.k_packed[0], pool.k_scale[0], pool.k_zero[0], pool.v_packed[0], pool.v_scale[0], pool.v_zero[0],
             pool.tail_k[0], pool.tail_v[0], pool.block_tables)
    slots = torch.tensor([s], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"k must be float \[B, 2, 8\], got torch.float32 \(1, 3, 8\)"):
        ops.kv4_decode_append(torch.randn(1, 3, 8), torch.randn(1, 3, 8), *pargs, pool._lens[:, 0], slots, 4,
                              "channel", "token")
    with pytest.raises(ValueError, match=r"slots must be int32 \[1\], got torch.int64"):
        ops.kv4_decode_append(x, x, *pargs, pool._lens[:, 0], slots.long(), 4, "channel", "token")
    with pytest.raises(ValueError, match="lens is on meta, the pool on cpu"):
        ops.kv4_decode_append(x, x, *pargs, pool._lens[:, 0].to("meta"), slots, 4, "channel", "token")
    with pytest.raises(ValueError, match="slots are on meta, the pool on cpu"):
        ops.kv4_decode_append(x, x, *pargs, pool._lens[:, 0], slots.to("meta"), 4, "channel", "token")
    with pytest.raises(ValueError, match=r"lens must be int32 \[2, 4\]"):
        ops.kv4_decode_append(x, x, *pargs, pool.quant_lens[0], slots, 4, "channel", "token")
    with pytest.raises(ValueError, match="tail_k must be float"):
        ops.kv4_decode_append(x, x, *pargs[:6], pool.tail_k[0, :, :, :2], *pargs[7:], pool._lens[:, 0], slots, 4,
                              "channel", "token")
    args = (x, x.clone(), *[t.clone() for t in pargs[:8]], pool.block_tables.clone(), pool._lens[:, 0].clone(), slots,
            c.group_size, c.key_axis, c.value_axis, "reference")
    torch.library.opcheck(torch.ops.cometq.kv4_decode_append, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_default_split_count_uses_the_pools_gpu():
    """Split counts are sized for the pool's GPU (its SM count; 132 = an H100 off the GPU)."""
    from cometq.paged import default_num_splits

    pool = _ml(layers=1)
    s = pool.add_sequence()
    pool.reserve(s, 40)
    pool.append(0, s, torch.randn(2, 40, 8), torch.randn(2, 40, 8))
    assert pool.num_sms == (torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" and
                            pool.device.type == "cuda" else 132)
    assert pool.default_num_splits([s]) == default_num_splits(1, 2, 5, pool.num_sms)
    assert pool.default_num_splits([s], num_sms=2) == 5  # 6 * 2 // 2 = 6 wanted, capped at the 5 blocks
    assert pool.default_num_splits([s], num_sms=1) == 3  # 6 * 1 // 2 programs per SM


def test_cat_rows_is_a_view_for_adjacent_parts():
    """paged._cat_rows: the rows of back-to-back prompts (views of one step's K) concatenate as a
    strided view of that tensor -- no copy; anything else (a gap, another tensor, other strides)
    is torch.cat, and every result equals torch.cat."""
    from cometq.paged import _cat_rows

    g, h, d = 4, 2, 8
    k = torch.randn(40, h, d)  # a step's K: 40 tokens [T, H, D]
    views = [k[a:b].transpose(0, 1).reshape(h, (b - a) // g, g, d).transpose(0, 1) for a, b in ((0, 8), (8, 20), (20, 40))]
    got = _cat_rows(views)
    assert torch.equal(got, torch.cat(views)) and got.data_ptr() == k.data_ptr()  # a view of k
    gap = [views[0], k[12:20].transpose(0, 1).reshape(h, 2, g, d).transpose(0, 1)]
    assert torch.equal(_cat_rows(gap), torch.cat(gap)) and _cat_rows(gap).data_ptr() != k.data_ptr()
    other = [views[0], views[1].clone()]
    assert torch.equal(_cat_rows(other), torch.cat(other))
    assert _cat_rows(views[:1]) is views[0]


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_prefill_of_back_to_back_prompts_equals_sequential_appends(axes, backend):
    """Fresh prompts whose K / V sit back to back in one tensor (a prefill step's layout): the
    batched append (its rows one strided view, no copy) == one append per sequence, bit for bit."""
    pools = [_ml(axes, 1, _dev(backend), head_dim=32, group_size=8, block_size=16, num_blocks=16, max_seqs=4)
             for _ in range(2)]
    lens = (16, 24, 8)
    k_all, v_all = _layer_tokens(pools[0], sum(lens), 77)  # [H, T, D]
    k_all = k_all.transpose(0, 1).contiguous().transpose(0, 1)  # the runner's storage: [T, H, D]
    v_all = v_all.transpose(0, 1).contiguous().transpose(0, 1)
    cuts = [0, 16, 40, 48]
    ks = [k_all[:, a:b] for a, b in zip(cuts, cuts[1:])]
    vs = [v_all[:, a:b] for a, b in zip(cuts, cuts[1:])]
    for p in pools:
        sids = [p.add_sequence() for _ in lens]
        for s, n in zip(sids, lens):
            p.reserve(s, n)
    pools[0].append_prefill(0, sids, ks, vs, backend=backend)
    for s, k, v in zip(sids, ks, vs):
        pools[1].append(0, s, k, v, backend=backend)
    for a, b in zip(_state(pools[0]), _state(pools[1])):
        assert torch.equal(a, b)
    check_invariants(pools[0])


@pytest.mark.parametrize("axes,heads", [(("channel", "token"), 3), (("token", "token"), 3), (("channel", "token"), 9)])
def test_decode_append_per_head_and_row_loop_same_state(monkeypatch, axes, heads):
    """The Triton decode append runs one program per (row, group of heads) -- the row's last
    program, counted on the shared zeroed counters, advances its lengths; 9 heads: 2 per program,
    the last program of a row with one -- or, with no counters (a capture that found none
    allocated), one program per row looping over the heads: the same pool state either way,
    across group flushes, and the counters are left zero."""
    import cometq.kernels.kv4_append as KA
    from cometq import _counters

    c = _cfg(*axes, tail_dtype=torch.float16, group_size=8, block_size=16, num_blocks=8, num_kv_heads=heads)
    import cometq.kernels.kv4_append as KA0

    assert KA0.decode_append_heads_per_program(heads) == (2 if heads == 9 else 1)
    dev = _dev("triton")
    g = torch.Generator().manual_seed(11)
    steps = [(torch.randn(2, heads, 32, generator=g), torch.randn(2, heads, 32, generator=g)) for _ in range(17)]
    states = {}
    for mode in ("per-head", "row-loop"):
        if mode == "row-loop":
            monkeypatch.setattr(KA, "tile_counters", lambda *a, **k: None)
        pool = MultiLayerKV4Pool(c, 1, dev)
        a, b = pool.add_sequence(), pool.add_sequence()
        pool.reserve(a, 20)
        pool.reserve(b, 20)
        slots = torch.tensor([b, -1, a], dtype=torch.int32, device=dev)
        for k, v in steps:
            k, v = torch.cat([k[:1], torch.randn(1, heads, 32, generator=g), k[1:]]), torch.cat(
                [v[:1], torch.randn(1, heads, 32, generator=g), v[1:]])  # a padding row in the middle
            pool.decode_append_device(0, k.to(dev), v.to(dev), slots, "triton")
        states[mode] = {n: getattr(pool, n).clone() for n in _POOL_TENSORS}
        if mode == "per-head":
            assert int(_counters.tile_counters(dev).abs().sum()) == 0
    # 17 tokens each: two group flushes (G = 8) and one token in the tail, or all 17 quantized
    assert states["per-head"]["quant_lens"][0].tolist()[:2] == ([16, 16] if c.staged else [17, 17])
    assert states["per-head"]["tail_lens"][0].tolist()[:2] == ([1, 1] if c.staged else [0, 0])
    for n in _POOL_TENSORS:
        assert torch.equal(states["per-head"][n], states["row-loop"][n]), n


# ---------------------------------------------------------------- prefix caching (shared full blocks)
def test_prefix_cache_and_allocator_units():
    from cometq.paged import BlockAllocator, PrefixCache

    c = PrefixCache()
    a = c.insert(PrefixCache.ROOT, (1, 2), block=5)
    b = c.insert(a, (3, 4), block=7)
    assert c.insert(a, (3, 4), block=9) == b and not c.holds(9)  # the same content: the node that exists
    assert c.match([(1, 2), (3, 4), (5, 6)]) == [(a, 5), (b, 7)]
    assert c.match([(1, 2), (3, 5)]) == [(a, 5)] and c.match([(3, 4)]) == []
    with pytest.raises(ValueError, match="already holds"):
        c.insert(b, (9, 9), block=5)
    al = BlockAllocator(4, prefix_caching=True)
    x, y = al.take(), al.take()
    assert (x, y) == (0, 1) and al.num_free == 2
    n0 = al.cache.insert(PrefixCache.ROOT, (1,), x)
    al.release([x, y])  # x is cached: parked, y back on the free list
    assert al.free == [3, 2, 1] and al.cache.num_parked == 1 and al.num_free == 4
    al.share(x)
    assert al.ref[x] == 1 and al.cache.num_parked == 0
    al.share(x)
    al.release([x])
    assert al.ref[x] == 1 and al.cache.num_parked == 0
    al.release([x])
    with pytest.raises(ValueError, match="not a cached block"):
        al.share(y)
    assert [al.take() for _ in range(4)] == [1, 2, 3, x]  # free blocks first, then the parked one (evicted)
    assert al.cache.match([(1,)]) == [] and not al.cache.holds(x) and al.num_free == 0
    del n0


def _prefix_kv(tokens, h, d):
    """K/V of the last token of ``tokens``: a function of the whole prefix (as a causal model's)."""
    g = torch.Generator().manual_seed(hash(tuple(tokens)) % (2 ** 31))
    return torch.randn(h, d, generator=g) + 1.5 * torch.randn(d, generator=torch.Generator().manual_seed(7)), \
        torch.randn(h, d, generator=g)


_SHARED = list(range(1000, 1012))
prefix_ops = st.lists(
    st.one_of(st.tuples(st.just("run"), st.integers(0, 2), st.integers(1, 30), st.booleans()),
              st.tuples(st.just("free"), st.integers(0, 3))),
    max_size=14,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=prefix_ops, axes=st.sampled_from(AXES))
def test_prefix_caching_pool_invariants_and_contents(ops, axes):
    """Sequences on 3 token streams sharing 12 leading tokens run through a small 2-layer pool with
    prefix caching (match, adopt, reserve, append what is left, name the full blocks): blocks are
    never lost or doubly owned, owners = reference counts, and every live sequence -- adopted
    blocks included -- reads back exactly the reference quantization of its own tokens."""
    h, d, bs = 2, 8, 8
    cfg = _cfg(*axes, head_dim=d, group_size=4, block_size=bs, num_blocks=6, max_seqs=3)
    m = MultiLayerKV4Pool(cfg, num_layers=2)
    m.enable_prefix_caching()
    streams = [_SHARED + [j * 100 + i for i in range(40)] for j in range(3)]
    live = {}  # slot -> (tokens, cache nodes)
    for op in ops:
        if op[0] == "free":
            if live:
                s = sorted(live)[op[1] % len(live)]
                m.free(s)
                del live[s]
        else:
            _, j, n, keep = op
            toks = streams[j][:n]
            if not m.num_free_slots:
                continue
            s = m.add_sequence()
            n_full = (n - 1) // bs
            hit = m.match_prefix([tuple(toks[i * bs:(i + 1) * bs]) for i in range(n_full)])
            m.adopt(s, [b for _, b in hit])
            start = len(hit) * bs
            owned_before = {b for t in live for b in m.blocks_of(t)}
            try:
                m.reserve(s, n)
            except KV4PoolExhausted:
                m.free(s)
                continue
            assert not owned_before & set(m.blocks_of(s)[len(hit):]), "a new block was someone else's"
            kv = [_prefix_kv(toks[:t + 1], h, d) for t in range(start, n)]
            for li in range(2):
                if kv:
                    m.append(li, s, torch.stack([x[0] for x in kv], 1), torch.stack([x[1] for x in kv], 1))
            nodes = [nd for nd, _ in hit]
            for i in range(len(hit), min(n, m.quant_len(s)) // bs):
                nodes.append(m.register_block(s, i, nodes[-1] if nodes else 0, tuple(toks[i * bs:(i + 1) * bs])))
            live[s] = (toks, nodes)
            if not keep:
                m.free(s)
                del live[s]
        # allocator invariants: owners = reference counts; free / parked / owned partition the blocks
        al = m._alloc
        owners = {}
        for s in live:
            for b in m.blocks_of(s):
                owners[b] = owners.get(b, 0) + 1
        assert all(al.ref[b] == owners.get(b, 0) for b in range(cfg.num_blocks))
        parked = list(al.cache._parked)
        assert sorted(al.free + parked + list(owners)) == list(range(cfg.num_blocks))
        assert all(al.cache.holds(b) for b in parked)
        assert m.num_free_blocks == len(al.free) + len(parked)
        for s, (toks, _) in live.items():
            want_k = torch.stack([_prefix_kv(toks[:t + 1], h, d)[0] for t in range(len(toks))], 1)
            want_v = torch.stack([_prefix_kv(toks[:t + 1], h, d)[1] for t in range(len(toks))], 1)
            for li in range(2):
                k, v = m.gather(s, li)
                nq = m.quant_len(s, li)
                assert torch.equal(k, _expected(want_k, nq, cfg.group_size, cfg.key_axis))
                assert torch.equal(v, _expected(want_v, nq, cfg.group_size, cfg.value_axis))


def test_prefix_caching_eviction_forgets_blocks():
    h, d, bs = 2, 8, 8
    m = MultiLayerKV4Pool(_cfg("channel", "token", head_dim=d, group_size=4, block_size=bs, num_blocks=6,
                               max_seqs=3), num_layers=1)
    m.enable_prefix_caching()

    def run(toks, keep):
        s = m.add_sequence()
        hit = m.match_prefix([tuple(toks[i * bs:(i + 1) * bs]) for i in range((len(toks) - 1) // bs)])
        m.adopt(s, [b for _, b in hit])
        m.reserve(s, len(toks))
        kv = [_prefix_kv(toks[:t + 1], h, d) for t in range(len(hit) * bs, len(toks))]
        m.append(0, s, torch.stack([x[0] for x in kv], 1), torch.stack([x[1] for x in kv], 1))
        nodes = [nd for nd, _ in hit]
        for i in range(len(hit), len(toks) // bs):
            nodes.append(m.register_block(s, i, nodes[-1] if nodes else 0, tuple(toks[i * bs:(i + 1) * bs])))
        if not keep:
            m.free(s)
        return s, len(hit)

    a = [1] * 24
    _, hit = run(a, keep=False)  # 3 blocks parked (released last block first)
    assert hit == 0 and m.prefix_cache.num_parked == 3 and m.num_free_blocks == 6
    c, _ = run([3] * 24, keep=True)  # takes the 3 free blocks
    assert m.prefix_cache.num_parked == 3 and m.num_free_blocks == 3
    e, _ = run([5] * 16, keep=True)  # evicts the 2 least recently parked: a's third and second blocks
    assert m.prefix_cache.num_parked == 1 and m.num_free_blocks == 1
    m.free(c)
    m.free(e)
    s, hit = run(a + [4], keep=True)  # only a's first block is still cached
    assert hit == 1
    k, _ = m.gather(s, 0)
    want = torch.stack([_prefix_kv((a + [4])[:t + 1], h, d)[0] for t in range(25)], 1)
    assert torch.equal(k, _expected(want, m.quant_len(s), 4, "channel"))
