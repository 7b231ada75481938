"""cometq.serve: runner (vs the HF forward), paged pools, scheduler, sampling, detokenization (CPU)."""
import torch
import pytest

from cometq.testing import (RUNNER_FP32_ATOL, RUNNER_KV4_MIN_COSINE, RUNNER_KV4_VS_KV4CACHE_ATOL,
                            RUNNER_LOGPROB_ATOL, penalized_greedy_reference, prompt_logprob_reference,
                            tiny_causal_lm)
from cometq.nn import set_fast_path
from cometq.serve.engine import Engine, EngineConfig, RequestRejected
from cometq.serve.kv import PagedFPPool, PoolExhausted
from cometq.serve.runner import Chunk, ModelRunner
from cometq.serve.sampling import (IncrementalDetokenizer, SamplingParams, process_logits, make_generator,
                                   sample_token, token_logprobs)
from cometq.serve.tiny import byte_tokenizer, tiny_model


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # tiny models: OpenMP threads only spin against the engine / HTTP / client threads on a 2-core runner
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def llama():
    return tiny_causal_lm("llama")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def byte_model():
    return tiny_model()


def _rand_ids(n, seed, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _greedy_nocache(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


# ---------------------------------------------------------------- runner
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_runner_fp_matches_hf_forward(arch):
    m = tiny_causal_lm(arch)
    r = ModelRunner.with_fp_pool(m, num_blocks=24, block_size=4)  # block 4: chunks straddle blocks
    a, b = _rand_ids(17, 1), _rand_ids(7, 2)
    with torch.no_grad():
        ref_a, ref_b = m(torch.tensor([a])).logits[0], m(torch.tensor([b])).logits[0]
    r.pool.reserve(0, 17)
    r.pool.reserve(1, 7)
    # ragged batch: chunked prefill of a (5 + 6 + 1 + 5 tokens) next to b's prefill and decode
    l1 = r.forward([Chunk(0, a[:5], 0), Chunk(1, b[:6], 0)], all_logits=True)
    l2 = r.forward([Chunk(0, a[5:11], 5), Chunk(1, b[6:7], 6)])
    l3 = r.forward([Chunk(0, a[11:12], 11)])
    l4 = r.forward([Chunk(0, a[12:17], 12)])
    torch.testing.assert_close(l1[:5], ref_a[:5], rtol=0, atol=RUNNER_FP32_ATOL)
    torch.testing.assert_close(l1[5:], ref_b[:6], rtol=0, atol=RUNNER_FP32_ATOL)
    torch.testing.assert_close(l2, torch.stack([ref_a[10], ref_b[6]]), rtol=0, atol=RUNNER_FP32_ATOL)
    torch.testing.assert_close(l3[0], ref_a[11], rtol=0, atol=RUNNER_FP32_ATOL)
    torch.testing.assert_close(l4[0], ref_a[16], rtol=0, atol=RUNNER_FP32_ATOL)


@pytest.mark.parametrize("order", ["back-to-back", "interleaved", "whole"])
@pytest.mark.parametrize("kv4", [False, True])
def test_runner_batched_equal_length_prefill(llama, kv4, order):
    """Fresh prompts of one length share one batched SDPA call per layer; mixed with a prompt of
    another length and a continued chunk in the same step, every row equals the solo runs.
    ``order``: the equal prompts back to back in the step (their rows a slice: views), split by
    the other prompt (a row gather), or the whole step (the batched result is the output)."""
    prompts = [_rand_ids(9, 10 + i) for i in range(3)] + [_rand_ids(5, 20)]
    if order == "interleaved":
        prompts = [prompts[0], prompts[3], prompts[1], prompts[2]]
    elif order == "whole":
        prompts = prompts[:3]

    def runner():
        return (ModelRunner.with_kv4_pool(llama, num_blocks=32, block_size=8, group_size=4) if kv4
                else ModelRunner.with_fp_pool(llama, num_blocks=32, block_size=4))

    r = runner()
    for sid in list(range(len(prompts))) + [4]:
        r.pool.reserve(sid, 12)
    with torch.no_grad():
        cont = [] if order == "whole" else [Chunk(4, prompts[0][6:], 6)]
        if cont:
            r.forward([Chunk(4, prompts[0][:6], 0)])  # sequence 4: a prefix, continued in the batched step
        got = r.forward([Chunk(i, p, 0) for i, p in enumerate(prompts)] + cont, all_logits=True)
        want = []
        for i, p in enumerate(prompts):
            solo = runner()
            solo.pool.reserve(0, 12)
            want.append(solo.forward([Chunk(0, p, 0)], all_logits=True))
        if cont:
            solo = runner()
            solo.pool.reserve(0, 12)
            solo.forward([Chunk(0, prompts[0][:6], 0)])
            want.append(solo.forward([Chunk(0, prompts[0][6:], 6)], all_logits=True))
    torch.testing.assert_close(got, torch.cat(want), rtol=0, atol=RUNNER_FP32_ATOL)


@pytest.mark.parametrize("kv4", [False, True])
def test_decode_rows_of_a_prefill_step_never_tune(llama, kv4, monkeypatch):
    """The decode rows of a step that also prefills run under ``autotune.frozen()`` (a tuning
    sweep there stalled GPU run 5's prefill steps for seconds); a decode-only step does not."""
    from cometq import autotune

    r = (ModelRunner.with_kv4_pool(llama, num_blocks=32, block_size=8, group_size=4) if kv4
         else ModelRunner.with_fp_pool(llama, num_blocks=32, block_size=4))
    seen = []
    real = r.pool.decode_attention

    def spy(*a, **kw):
        seen.append(autotune.frozen_now())
        return real(*a, **kw)

    monkeypatch.setattr(r.pool, "decode_attention", spy)
    for sid in (0, 1):
        r.pool.reserve(sid, 12)
    p0, p1 = _rand_ids(6, 1), _rand_ids(5, 2)
    with torch.no_grad():
        r.forward([Chunk(0, p0, 0)])
        r.forward([Chunk(0, [7], 6), Chunk(1, p1, 0)])  # decode row + prefill chunk
        n_layers = len(seen)
        r.forward([Chunk(0, [8], 7), Chunk(1, [9], 5)])  # decode only
    assert n_layers == llama.config.num_hidden_layers and all(seen[:n_layers])
    assert len(seen) == 2 * n_layers and not any(seen[n_layers:])
    assert not autotune.frozen_now()


@pytest.mark.parametrize("kv4", [False, True])
def test_engine_warmup_leaves_a_clean_engine(llama, kv4):
    """``Engine.warmup`` runs throw-away rounds (1 and max_num_seqs sequences without graphs),
    then the pool is empty, the statistics are zero, and generation matches a cold engine's."""
    def engine():
        r = (ModelRunner.with_kv4_pool(llama, num_blocks=40, block_size=8, group_size=4) if kv4
             else ModelRunner.with_fp_pool(llama, num_blocks=40, block_size=4))
        return Engine(r, None, EngineConfig(max_num_seqs=3, max_num_batched_tokens=64))

    prompts = [_rand_ids(7 + i, 300 + i) for i in range(3)]
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    warm = engine()
    free = warm.pool.num_free_blocks
    assert warm.warmup(prompt_len=6, max_tokens=2) == [1, 3]
    assert warm.pool.num_free_blocks == free and not warm.has_work() and not warm.requests
    assert warm.stats["steps"] == 0 and warm.stats["generation_tokens"] == 0
    assert warm.generate(prompts, sp) == engine().generate(prompts, sp)
    assert warm.warmup(batch_sizes=[2], prefill_len=0) == [2]
    assert warm.warmup(batch_sizes=[1], prefill_len=40) == [1] and warm.pool.num_free_blocks == free
    with pytest.raises(ValueError, match="prefill_len"):
        warm.warmup(prefill_len=-1)
    with pytest.raises(ValueError, match=r"batch sizes must lie in \[1, 3\]"):
        warm.warmup(batch_sizes=[4])
    with pytest.raises(ValueError, match="must be >= 1"):
        warm.warmup(prompt_len=0)
    warm.add_request(prompts[0], sp)
    with pytest.raises(RuntimeError, match="before any request"):
        warm.warmup()


def test_runner_kv4_close_to_hf(llama):
    from cometq.kvcache import KV4Cache

    r = ModelRunner.with_kv4_pool(llama, num_blocks=8, block_size=16, group_size=16)
    a = _rand_ids(40, 3)
    r.pool.reserve(0, 40)
    cache = KV4Cache(llama.config, key_axis="channel", value_axis="token", group_size=16, residual_length=0)
    with torch.no_grad():
        full = llama(torch.tensor([a])).logits[0]
        cuts = [0, 20, 30] + list(range(31, 41))
        for s, e in zip(cuts[:-1], cuts[1:]):
            ours = r.forward([Chunk(0, a[s:e], s)])[0]
            ref4 = llama(torch.tensor([a[s:e]]), past_key_values=cache, use_cache=True).logits[0, -1]
            if s == 0:  # prefill from scratch attends to fresh full-precision K/V only: exact
                torch.testing.assert_close(ours, full[e - 1], rtol=0, atol=RUNNER_FP32_ATOL)
            cos = torch.nn.functional.cosine_similarity(ours, full[e - 1], dim=0)
            assert cos >= RUNNER_KV4_MIN_COSINE, (s, e, float(cos))
            torch.testing.assert_close(ours, ref4, rtol=0, atol=RUNNER_KV4_VS_KV4CACHE_ATOL)
    # 40 tokens with per-channel keys, G=16: 32 are 4-bit (2 blocks of 16), the last 8 wait in the fp
    # tail, which needs no block (the pool's exact accounting is the engine's)
    assert r.pool.num_used_blocks == 2
    r.pool.free(0)
    assert r.pool.num_used_blocks == 0 and all(p.num_free_blocks == 8 for p in r.pool.layers)


@pytest.fixture(scope="module")
def w4ax_model(byte_model):
    import copy

    from cometq import W4AxConfig, quantize_

    m = copy.deepcopy(byte_model)
    quantize_(m, W4AxConfig(), calib_data=torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)))
    set_fast_path(m, True)
    return m


def test_runner_with_w4ax_linears(w4ax_model):
    from cometq.nn import W4AxLinear

    m = w4ax_model
    assert isinstance(m.model.layers[0].self_attn.q_proj, W4AxLinear)
    r = ModelRunner.with_fp_pool(m, num_blocks=4, block_size=8)
    a = _rand_ids(12, 4)
    r.pool.reserve(0, 12)
    with torch.no_grad():
        ref = m(torch.tensor([a])).logits[0]
    got = torch.cat([r.forward([Chunk(0, a[:11], 0)], all_logits=True), r.forward([Chunk(0, a[11:], 11)])])
    torch.testing.assert_close(got, ref, rtol=0, atol=RUNNER_FP32_ATOL)


def test_engine_w4ax_kv4_batched_equals_solo(w4ax_model):
    # the full cometq path: W4Ax linears (per-token activation scales) + paged KV4 + continuous batching;
    # a budget that never splits a prompt, so each request sees the same chunks as when it runs alone.
    # The W4Ax layers run their reference path here (exact integer dots, float64 epilogue: a row's
    # result does not depend on the other rows), not the CPU fast path: its one fp32 matmul over
    # all the step's rows sums in an order that depends on the row count on some BLAS builds (AMD
    # EPYC, 2026-11-27), and the next layer's activation quantization turns a last-bit difference
    # into a different integer, so batched and solo drift apart after a few tokens.
    def engine():
        r = ModelRunner.with_kv4_pool(w4ax_model, num_blocks=16, block_size=16, max_seqs=4)
        return Engine(r, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256))

    prompts = [_rand_ids(5 + 9 * i, 70 + i) for i in range(4)]
    sp = SamplingParams(max_tokens=20, temperature=0)
    set_fast_path(w4ax_model, False)
    try:
        e = engine()
        batched = e.generate(prompts, sp)
        solo = [engine().generate([p], sp)[0] for p in prompts]
    finally:
        set_fast_path(w4ax_model, True)
    assert batched == solo and [len(o) for o in batched] == [20] * 4
    assert e.pool.num_used_blocks == 0


def test_runner_rejects_bad_input(llama):
    r = ModelRunner.with_fp_pool(llama, num_blocks=4, block_size=4)
    r.pool.reserve(0, 4)
    with pytest.raises(ValueError, match="out of range"):
        r.forward([Chunk(0, [1, 999], 0)])
    with pytest.raises(ValueError, match="no tokens"):
        r.forward([Chunk(0, [], 0)])
    with pytest.raises(ValueError, match="exceed its reservation"):
        r.forward([Chunk(0, [1] * 5, 0)])
    with pytest.raises(TypeError, match="Llama-family"):
        ModelRunner(torch.nn.Linear(2, 2), r.pool)
    bad_pool = PagedFPPool(num_layers=1, num_blocks=2, block_size=4, n_kv_heads=1, head_dim=64)
    with pytest.raises(ValueError, match="geometry"):
        ModelRunner(llama, bad_pool)


def test_fp_pool_decode_attention_matches_per_sequence_attention():
    """The FP pool's batched decode attention (``cometq::paged_decode_attention`` over the step's
    block tables, built once for the whole batch) equals attention over each sequence's own
    slots (``read``) row by row; a length past a sequence's reservation is refused."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(4)
    p = PagedFPPool(num_layers=2, num_blocks=40, block_size=4, n_kv_heads=1, head_dim=8)
    p.k.copy_(torch.randn(p.k.shape, generator=g))
    p.v.copy_(torch.randn(p.v.shape, generator=g))
    lens = [5, 1, 12, 9]
    seqs = [3, 0, 7, 2]
    for s, n in zip(seqs, lens):
        p.reserve(s, n + 2)
    q = torch.randn(4, 2, 8, generator=g)
    out = p.decode_attention(1, seqs, lens, q, 0.3)
    assert p._dec_tables.dtype == torch.int32 and p._dec_tables.shape == (4, 4)
    for i, (s, n) in enumerate(zip(seqs, lens)):
        assert p._dec_tables[i, :len(p.block_table(s))].tolist() == p.block_table(s)
        k, v = p.read(1, s, n, torch.float32)  # [n, 1, 8]
        want = F.scaled_dot_product_attention(q[i][:, None], k.transpose(0, 1).expand(2, n, 8),
                                              v.transpose(0, 1).expand(2, n, 8), scale=0.3)[:, 0]
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"tokens \[0, 13\) of sequence 2 exceed its reservation"):
        p.decode_attention(0, seqs, [5, 1, 12, 13], q, 0.3)


def test_fp_pool_write_prefill_equals_per_sequence_writes():
    """The FP pool's batched prefill write (one index write per layer, slots built once per step)
    stores exactly what per-sequence writes store; the cached slots follow a changed table."""
    g = torch.Generator().manual_seed(3)

    def pool():
        p = PagedFPPool(num_layers=2, num_blocks=16, block_size=4, n_kv_heads=2, head_dim=8)
        for sid, n in ((0, 9), (1, 6), (2, 5)):
            p.reserve(sid, n)
        return p

    a, b = pool(), pool()
    chunks = [(0, 0, 9), (1, 2, 4), (2, 0, 5)]
    kv = {c: (torch.randn(c[2], 2, 8, generator=g), torch.randn(c[2], 2, 8, generator=g)) for c in chunks}
    for layer in (0, 1):
        a.write_prefill(layer, [c[0] for c in chunks], [c[1] for c in chunks], [kv[c][0] for c in chunks],
                        [kv[c][1] for c in chunks])
        for c in chunks:
            b.write(layer, c[0], c[1], *kv[c])
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    a.free(1)  # a table changes: the per-step slot cache must not be reused
    a.reserve(3, 6)
    x = (torch.randn(6, 2, 8, generator=g), torch.randn(6, 2, 8, generator=g))
    a.write_prefill(0, [3], [0], [x[0]], [x[1]])
    k3, _ = a.read(0, 3, 6, torch.float32)
    assert torch.equal(k3, x[0])
    with pytest.raises(ValueError, match="one start, k and v per sequence"):
        a.write_prefill(0, [0, 2], [0], [x[0]], [x[1]])


def test_pool_bookkeeping():
    p = PagedFPPool(num_layers=1, num_blocks=5, block_size=4, n_kv_heads=1, head_dim=2)
    p.reserve(7, 9)  # 3 blocks
    assert p.num_free_blocks == 2 and p.blocks_needed(7, 12) == 0 and p.blocks_needed(7, 13) == 1
    with pytest.raises(PoolExhausted):
        p.reserve(8, 9)
    assert not p.has_seq(8) and p.num_free_blocks == 2  # a failed reservation changes nothing
    k = torch.randn(9, 1, 2)
    p.write(0, 7, 0, k, -k)
    kk, vv = p.read(0, 7, 9, torch.float32)
    assert torch.equal(kk, k) and torch.equal(vv, -k)
    p.free(7)
    assert p.num_free_blocks == 5
    with pytest.raises(ValueError, match="num_blocks"):
        PagedFPPool(num_layers=1, num_blocks=0, block_size=4, n_kv_heads=1, head_dim=2)


# ---------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def greedy_cases(llama):
    prompts = [_rand_ids(int(n), 10 + i) for i, n in enumerate(torch.randint(1, 26, (10,),
               generator=torch.Generator().manual_seed(5)))]
    return prompts, [_greedy_nocache(llama, p, 8) for p in prompts]


@pytest.mark.parametrize("num_blocks", [64, 12])  # 12 blocks of 4 tokens: forces preemption
def test_engine_greedy_continuous_batching(llama, greedy_cases, num_blocks):
    prompts, refs = greedy_cases
    r = ModelRunner.with_fp_pool(llama, num_blocks=num_blocks, block_size=4)
    e = Engine(r, None, EngineConfig(max_num_seqs=6, max_num_batched_tokens=16))
    params = SamplingParams(max_tokens=8, temperature=0)
    reqs = [e.add_request(p, params) for p in prompts[:5]]
    for _ in range(3):  # later arrivals join a running batch
        e.step()
    reqs += [e.add_request(p, params) for p in prompts[5:]]
    for _ in range(2000):
        if not e.has_work():
            break
        e.step()
    assert not e.has_work()
    assert [q.output_ids for q in reqs] == refs
    assert all(q.finish_reason == "length" for q in reqs)
    assert e.pool.num_used_blocks == 0
    if num_blocks == 12:
        assert e.stats["preemptions"] > 0
    else:
        assert e.stats["preemptions"] == 0


def test_engine_kv4_pool_exhaustion_no_loss(llama):
    r = ModelRunner.with_kv4_pool(llama, num_blocks=6, block_size=16, group_size=16, max_seqs=4)
    e = Engine(r, None, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64))
    prompts = [_rand_ids(20 + i, 40 + i) for i in range(6)]
    outs = e.generate(prompts, SamplingParams(max_tokens=12, temperature=0), max_steps=500)
    assert [len(o) for o in outs] == [12] * 6
    assert e.stats["preemptions"] > 0 and e.stats["finished"] == 6
    assert e.pool.num_used_blocks == 0 and all(p.num_free_blocks == 6 for p in r.pool.layers)
    # the first sequence was never preempted (oldest first): its tokens match a solo run
    solo = Engine(ModelRunner.with_kv4_pool(llama, num_blocks=6, block_size=16, group_size=16), None)
    assert solo.generate(prompts[:1], SamplingParams(max_tokens=12, temperature=0))[0] == outs[0]


def _counting_forward(runner):
    """Wrap runner.forward to count the tokens each step feeds the model."""
    fed = []
    orig = runner.forward

    def forward(chunks, **kw):
        fed.append(sum(len(c.tokens) for c in chunks))
        return orig(chunks, **kw)

    runner.forward = forward
    return fed


def _run_all(e, reqs_args):
    reqs = [e.add_request(*a) for a in reqs_args]
    for _ in range(3000):
        if not e.has_work():
            break
        e.step()
    assert not e.has_work()
    return reqs


@pytest.mark.parametrize("kv4", [False, True])
def test_prefix_caching_same_outputs_fewer_tokens(llama, kv4):
    system = _rand_ids(37, 123)  # a shared "system prompt": 2 full blocks of 16 (+5)
    prompts = [system + _rand_ids(4 + 3 * i, 200 + i) for i in range(4)] + [system[:20] + _rand_ids(9, 300)]
    params = SamplingParams(max_tokens=6, temperature=0)

    def engine(cache):
        r = (ModelRunner.with_kv4_pool(llama, num_blocks=40, block_size=16, group_size=16, max_seqs=8) if kv4
             else ModelRunner.with_fp_pool(llama, num_blocks=40, block_size=16))
        return Engine(r, None, EngineConfig(max_num_seqs=8, max_num_batched_tokens=128,
                                            enable_prefix_caching=cache)), r

    outs = {}
    for cache in (False, True):
        e, r = engine(cache)
        fed = _counting_forward(r)
        # the first request alone (it computes and names the shared blocks), then the rest together
        first = _run_all(e, [(prompts[0], params)])
        rest = _run_all(e, [(p, params) for p in prompts[1:]])
        outs[cache] = [q.output_ids for q in first + rest], sum(fed), dict(e.stats)
        assert e.pool.num_used_blocks == 0  # (parked cached blocks count as free)
    (want, fed_off, _), (got, fed_on, st) = outs[False], outs[True]
    if kv4:
        # 4-bit K/V: a prefix computed inside another request's prefill step (other GEMM row counts)
        # may round differently, so only the request that computed it is compared; the adopted blocks
        # themselves are checked bit for bit in tests/test_paged.py
        assert got[0] == want[0] and [len(o) for o in got] == [6] * len(prompts)
    else:
        assert got == want == [_greedy_nocache(llama, p, 6) for p in prompts]
    # prompts 1-3 take the 2 shared blocks (32 tokens) from the cache, prompt 4 shares only 16 of its
    # 20 system tokens -- one block; the first request finds nothing
    assert st["prefix_hit_tokens"] == 3 * 32 + 16 and fed_off - fed_on == 3 * 32 + 16
    assert st["prefix_query_tokens"] == sum((len(p) - 1) // 16 * 16 for p in prompts)


@pytest.mark.parametrize("kv4", [False, True])
def test_prefix_caching_shares_blocks_being_computed(llama, kv4):
    """Requests admitted together with a common head (the n choices of one prompt): the first
    computes the head, the others wait for its blocks instead of computing them again, while an
    unrelated request behind them starts at once; outputs stay the model's."""
    p = _rand_ids(53, 400)  # 3 full blocks of 16 (+5)
    other = _rand_ids(21, 401)
    params = SamplingParams(max_tokens=5, temperature=0)
    r = (ModelRunner.with_kv4_pool(llama, num_blocks=48, block_size=16, group_size=16, max_seqs=8) if kv4
         else ModelRunner.with_fp_pool(llama, num_blocks=48, block_size=16))
    e = Engine(r, None, EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, enable_prefix_caching=True))
    fed = _counting_forward(r)
    reqs = [e.add_request(p, params) for _ in range(3)] + [e.add_request(other, params)]
    e.step()
    # step 1: the first copy of p and the unrelated prompt; copies 2 and 3 wait (skipped, not blocking)
    assert [q.status for q in reqs] == ["running", "waiting", "waiting", "running"]
    assert fed == [53 + 21] and e.stats["prefix_deferrals"] == 2
    for _ in range(100):
        if not e.has_work():
            break
        e.step()
    assert not e.has_work() and e.pool.num_used_blocks == 0
    # copies 2 and 3 adopted the 3 blocks in step 2 and fed 5 tokens each
    assert fed[1] == 2 * 5 + 2 and e.stats["prefix_hit_tokens"] == 2 * 48
    outs = [q.output_ids for q in reqs]
    want = _greedy_nocache(llama, p, 5)
    if kv4:  # the first copy = a KV4 engine without prefix caching (the others read its 4-bit blocks)
        solo = Engine(ModelRunner.with_kv4_pool(llama, num_blocks=48, block_size=16, group_size=16), None)
        assert outs[0] == solo.generate([p], params)[0] and [len(o) for o in outs] == [5] * 4
    else:
        assert outs == [want] * 3 + [_greedy_nocache(llama, other, 5)]


def test_prefix_caching_waits_only_for_a_large_share(llama):
    """A short common head (one block of a long prompt) is not worth a step's wait: both compute it."""
    head = _rand_ids(16, 410)
    prompts = [head + _rand_ids(40, 411), head + _rand_ids(40, 412)]
    r = ModelRunner.with_fp_pool(llama, num_blocks=48, block_size=16)
    e = Engine(r, None, EngineConfig(max_num_batched_tokens=256, enable_prefix_caching=True))
    reqs = [e.add_request(q, SamplingParams(max_tokens=2, temperature=0)) for q in prompts]
    e.step()
    assert [q.status for q in reqs] == ["running", "running"] and e.stats["prefix_deferrals"] == 0
    # the same head as most of a prompt: the second waits
    e2 = Engine(ModelRunner.with_fp_pool(llama, num_blocks=48, block_size=16), None,
                EngineConfig(max_num_batched_tokens=256, enable_prefix_caching=True))
    reqs = [e2.add_request(head + head + q[16:20], SamplingParams(max_tokens=2, temperature=0)) for q in prompts]
    e2.step()
    assert [q.status for q in reqs] == ["running", "waiting"] and e2.stats["prefix_deferrals"] == 1


def test_prefix_caching_under_preemption_and_eviction(llama, greedy_cases):
    prompts, refs = greedy_cases
    shared = _rand_ids(8, 77)
    prompts = [shared + p for p in prompts]
    refs = [_greedy_nocache(llama, p, 8) for p in prompts]
    r = ModelRunner.with_fp_pool(llama, num_blocks=14, block_size=4)  # small: preempts and evicts
    e = Engine(r, None, EngineConfig(max_num_seqs=6, max_num_batched_tokens=16, enable_prefix_caching=True))
    reqs = _run_all(e, [(p, SamplingParams(max_tokens=8, temperature=0)) for p in prompts])
    assert [q.output_ids for q in reqs] == refs
    assert e.stats["preemptions"] > 0 and e.stats["prefix_hit_tokens"] > 0
    alloc = e.pool._alloc
    assert e.pool.num_used_blocks == 0 and all(x == 0 for x in alloc.ref)
    assert sorted(alloc.free + list(alloc.cache._parked)) == list(range(14))


def test_prefix_caching_skips_prompt_logprob_requests(llama):
    r = ModelRunner.with_fp_pool(llama, num_blocks=32, block_size=4)
    e = Engine(r, None, EngineConfig(enable_prefix_caching=True))
    p = _rand_ids(13, 5)
    a, = _run_all(e, [(p, SamplingParams(max_tokens=2, temperature=0))])
    b, = _run_all(e, [(p, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))])
    c, = _run_all(e, [(p, SamplingParams(max_tokens=2, temperature=0))])
    assert a.output_ids == b.output_ids == c.output_ids
    assert len(b.prompt_logprobs) == 13 and e.stats["prefix_hit_tokens"] == 12  # only c took the 3 blocks
    with pytest.raises(TypeError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching=1)


def test_engine_rejects_and_aborts(llama):
    r = ModelRunner.with_fp_pool(llama, num_blocks=8, block_size=4)
    e = Engine(r, None, EngineConfig(max_queue=2))
    assert e.max_model_len == 32
    with pytest.raises(RequestRejected, match="exceeds the maximum context length 32"):
        e.add_request(_rand_ids(30, 0), SamplingParams(max_tokens=3))
    with pytest.raises(RequestRejected, match="empty"):
        e.add_request([], SamplingParams())
    with pytest.raises(RequestRejected, match="out of range"):
        e.add_request([1, 256], SamplingParams())
    a = e.add_request(_rand_ids(5, 1), SamplingParams(max_tokens=20, temperature=0))
    e.add_request(_rand_ids(5, 2), SamplingParams(max_tokens=2, temperature=0))
    with pytest.raises(RequestRejected, match="queue full"):
        e.add_request(_rand_ids(5, 3), SamplingParams())
    for _ in range(3):
        e.step()
    assert e.pool.num_used_blocks > 0
    e.abort(a.request_id)
    for _ in range(50):
        if not e.has_work():
            break
        e.step()
    assert a.finish_reason == "abort" and len(a.output_ids) < 20
    assert e.pool.num_used_blocks == 0 and e.stats["aborted"] == 1
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)


def test_engine_stops(byte_model, tok):
    r = ModelRunner.with_fp_pool(byte_model, num_blocks=16, block_size=16)
    e = Engine(r, tok, eos_token_ids=[tok.eos_token_id])
    prompt = tok("Hello", add_special_tokens=False)["input_ids"]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = e.generate([prompt], greedy)[0]
    # stop token id: generation ends before it, the token is not part of the output
    stop_at = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])
    got = e.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                              stop_token_ids=(ref[stop_at],)))[0]
    assert got == ref[:stop_at]
    # stop string: a piece of the greedy text; the text ends right before its first occurrence
    outs = []
    req = e.add_request(prompt, greedy, callback=outs.append)
    while e.has_work():
        e.step()
    full = "".join(o.text for o in outs)
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    cands = [full[i:i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2]]
    assert cands, full
    stop = cands[0]
    outs2 = []
    req2 = e.add_request(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,)),
                         callback=outs2.append)
    while e.has_work():
        e.step()
    text2 = "".join(o.text for o in outs2)
    assert req2.finish_reason == "stop" and text2 == full[:full.index(stop)]
    assert stop not in text2 and e.pool.num_used_blocks == 0
    del req


def test_engine_seeded_sampling_deterministic(byte_model):
    r = ModelRunner.with_fp_pool(byte_model, num_blocks=32, block_size=16)
    e = Engine(r, None)
    p = _rand_ids(6, 9)
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    a, b = e.generate([p, p], sp)  # same seed, batched together
    c = e.generate([p], sp)[0]
    d = e.generate([p], SamplingParams(max_tokens=16, temperature=1.0, seed=99))[0]
    assert a == b == c
    assert d != a


# ---------------------------------------------------------------- sampling / detok
def test_sample_token_filters():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8, 1.0])
    g = make_generator(0)
    assert sample_token(logits, SamplingParams(temperature=0), g) == 1
    assert sample_token(logits, SamplingParams(top_k=1), g) == 1
    draws = {sample_token(logits, SamplingParams(temperature=2.0, top_k=3), g) for _ in range(200)}
    assert draws == {1, 2, 4}
    # p(1), p(2) ~ 0.35, 0.32: top_p 0.5 keeps exactly the two largest
    draws = {sample_token(logits, SamplingParams(top_p=0.5), g) for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample_token(logits, SamplingParams(temperature=1.0), g) for _ in range(2000)}
    assert draws == set(range(6))


@pytest.mark.parametrize("num_blocks", [64, 12])  # 12 blocks of 4 tokens: forces preemption
def test_engine_penalties_and_logprobs_match_reference(llama, num_blocks):
    # each prompt ends in the model's own greedy continuation of its start: tokens it favours, so the
    # repetition penalty's prompt part changes the choices
    prompts = [q + _greedy_nocache(llama, q, 4) for q in (_rand_ids(n, 70 + n) for n in (1, 7, 15, 22))]
    rep, freq, pres, k = 1.5, 0.7, 0.4, 3
    params = SamplingParams(max_tokens=8, temperature=0, repetition_penalty=rep, frequency_penalty=freq,
                            presence_penalty=pres, logprobs=k, prompt_logprobs=2)
    r = ModelRunner.with_fp_pool(llama, num_blocks=num_blocks, block_size=4)
    e = Engine(r, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=8))  # prompts in several chunks
    outs = {}
    reqs = [e.add_request(p, params, callback=lambda o: outs.setdefault(o.request_id, []).append(o))
            for p in prompts]
    for _ in range(2000):
        if not e.has_work():
            break
        e.step()
    assert not e.has_work() and e.pool.num_used_blocks == 0
    if num_blocks == 12:
        assert e.stats["preemptions"] > 0
    for req, p in zip(reqs, prompts):
        ids, lps, rows = penalized_greedy_reference(llama, p, 8, rep, freq, pres)
        assert req.output_ids == ids
        assert [x.token_id for x in req.output_logprobs] == ids
        assert [x.logprob for x in req.output_logprobs] == pytest.approx(lps, abs=RUNNER_LOGPROB_ATOL)
        for x, row in zip(req.output_logprobs, rows):
            tv, ti = torch.topk(row, k)
            assert [i for i, _ in x.top] == ti.tolist()
            assert [v for _, v in x.top] == pytest.approx(tv.tolist(), abs=RUNNER_LOGPROB_ATOL)
        # prompt log-probabilities: every prompt token once (a recomputed prompt is not scored again)
        plp = prompt_logprob_reference(llama, p)
        assert len(req.prompt_logprobs) == len(p) and req.prompt_logprobs[0] is None
        assert [x.token_id for x in req.prompt_logprobs[1:]] == p[1:]
        assert [x.logprob for x in req.prompt_logprobs[1:]] == pytest.approx(plp, abs=RUNNER_LOGPROB_ATOL)
        assert all(len(x.top) == 2 for x in req.prompt_logprobs[1:])
        # streamed: one log-probability per token id, the prompt's once, in the first output
        got = outs[req.request_id]
        assert sum((o.logprobs for o in got), []) == req.output_logprobs
        assert all(len(o.logprobs) == len(o.token_ids) for o in got)
        assert [o.prompt_logprobs is not None for o in got] == [True] + [False] * (len(got) - 1)


def test_engine_logit_bias_and_min_tokens(llama):
    r = ModelRunner.with_fp_pool(llama, num_blocks=32, block_size=4)
    e = Engine(r, None, eos_token_ids=[5])
    p = _rand_ids(6, 4)
    # a +100 bias makes a token the greedy choice every time
    assert e.generate([p], SamplingParams(max_tokens=5, temperature=0, logit_bias=((17, 100.0),)))[0] == [17] * 5
    # min_tokens: the first greedy token, made a stop id, cannot end the output before 3 tokens
    first = _greedy_nocache(llama, p, 1)[0]
    got = e.generate([p], SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(first,)))[0]
    assert got == []
    got = e.generate([p], SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(first,), min_tokens=3))[0]
    with torch.no_grad():
        row = llama(torch.tensor([p])).logits[0, -1].double()
    row[first] = float("-inf")
    assert len(got) >= 3 and first not in got[:3] and got[0] == int(row.argmax())
    with pytest.raises(RequestRejected, match="logit_bias"):
        e.add_request(p, SamplingParams(logit_bias=((r.vocab_size, 1.0),)))


def test_engine_plain_requests_carry_no_logprobs(llama):
    r = ModelRunner.with_fp_pool(llama, num_blocks=32, block_size=4)
    e = Engine(r, None)
    outs = []
    req = e.add_request(_rand_ids(5, 3), SamplingParams(max_tokens=4, temperature=0), callback=outs.append)
    while e.has_work():
        e.step()
    assert req.output_logprobs == [] and req.prompt_logprobs is None
    assert all(o.logprobs is None and o.prompt_logprobs is None for o in outs)


def test_process_logits_and_token_logprobs():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # prompt [0, 1], output [3, 3, 2]: repetition on {0, 1, 2, 3}; frequency / presence on {3: 2, 2: 1}
    got = process_logits(logits, p, [0, 1], [3, 3, 2])
    want = torch.tensor([2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.5 - 0.25, 3.0 / 2 - 1.0 - 0.25, -2.0])
    assert torch.allclose(got, want) and torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0]))
    assert torch.equal(process_logits(logits, SamplingParams(), [0], [3]), logits)
    assert torch.equal(process_logits(logits, SamplingParams(frequency_penalty=1.0), [0, 1], []), logits)
    rows = torch.randn(3, 7)
    lp = torch.log_softmax(rows, -1)
    got = token_logprobs(rows, [6, 0, 2], 2)
    assert [x.token_id for x in got] == [6, 0, 2]
    assert [x.logprob for x in got] == pytest.approx([lp[0, 6].item(), lp[1, 0].item(), lp[2, 2].item()])
    assert [[i for i, _ in x.top] for x in got] == torch.topk(lp, 2).indices.tolist()
    assert all(x.top == () for x in token_logprobs(rows, [1, 1, 1], 0))
    # min_tokens holds back the stop ids and EOS (unless ignore_eos); logit_bias adds
    mt = SamplingParams(max_tokens=8, min_tokens=2, stop_token_ids=(4,), logit_bias=((1, 5.0), (9, -1.0)))
    got = process_logits(logits, mt, [0], [3], eos_ids=(0,))
    assert torch.equal(got, torch.tensor([float("-inf"), 4.0, 0.5, 3.0, float("-inf")]))
    got = process_logits(logits, mt, [0], [3, 3], eos_ids=(0,))  # 2 output tokens: nothing held back
    assert torch.equal(got, torch.tensor([2.0, 4.0, 0.5, 3.0, -2.0]))
    got = process_logits(logits, SamplingParams(max_tokens=8, min_tokens=2, ignore_eos=True), [0], [], eos_ids=(0,))
    assert torch.equal(got, logits)
    assert SamplingParams(temperature=0).device_greedy
    assert not SamplingParams(temperature=0, min_tokens=1).device_greedy
    assert not SamplingParams(temperature=0, logit_bias=((3, 1.0),)).device_greedy
    assert not SamplingParams(temperature=0, logprobs=0).device_greedy
    assert not SamplingParams(temperature=0, repetition_penalty=1.1).device_greedy
    assert not SamplingParams(temperature=0.5).device_greedy


@pytest.mark.parametrize("kw,match", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(repetition_penalty=2.5), "repetition_penalty"),
    (dict(logprobs=21), "logprobs"), (dict(logit_bias=((1, 200.0),)), "logit_bias"),
    (dict(logit_bias=((1, 1.0), (1, 2.0))), "logit_bias"), (dict(logit_bias={1: 1.0}), "logit_bias"),
    (dict(max_tokens=2, min_tokens=3), "min_tokens"), (dict(logprobs=True), "logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(seed="x"), "seed"), (dict(stop=("",)), "stop"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"), (dict(max_tokens=True), "max_tokens"),
])
def test_sampling_params_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_token_text_names_every_token_apart(tok):
    from cometq.serve.sampling import TokenText

    tt = TokenText(tok)
    names = [tt(t)[0] for t in range(len(tok))]
    assert len(set(names)) == len(names)
    assert all(tt(t)[1] == bytes([t]) for t in range(256))  # byte-level pieces -> their byte
    assert tt(ord("a")) == ("a", b"a") and tt(0xE6) == ("bytes:\\xe6", b"\xe6")
    assert tt(tok.eos_token_id)[0] == tok.eos_token


def test_incremental_detok_multibyte(tok):
    text = "héllo wörld 日本語 🎉!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # byte-level: multi-byte characters span several tokens
    d = IncrementalDetokenizer(tok, tok("ctx", add_special_tokens=False)["input_ids"])
    deltas = []
    for t in ids:
        assert d.add(t) is None
        deltas.append(d.take(False))
    d.flush()
    deltas.append(d.take(True))
    assert "".join(deltas) == text
    assert not any("\ufffd" in x for x in deltas)
    # an incomplete character at the end is released (as U+FFFD) by flush, never dropped
    d2 = IncrementalDetokenizer(tok, [])
    for t in ids[:2]:  # 'h' + first byte of 'é'
        d2.add(t)
    assert d2.take(False) == "h"
    d2.flush()
    assert d2.take(True) == "\ufffd"


def test_incremental_detok_holds_back_stop_prefix(tok):
    d = IncrementalDetokenizer(tok, [], stop=("STOP",))
    out = []
    for ch in "abcSTO":
        d.add(tok(ch, add_special_tokens=False)["input_ids"][0])
        out.append(d.take(False))
    assert "".join(out) == "abc"  # "STO" might become "STOP": held back
    assert d.add(tok("P", add_special_tokens=False)["input_ids"][0]) == "STOP"
    assert d.take(True) == "" and d.text == "abc"


@pytest.mark.parametrize("kv4", [False, True])
def test_piecewise_decode_matches_plain_forward(w4ax_model, kv4):
    """The decode-graph pieces (run eagerly here: graphs=False) with batch padding give the plain
    forward's logits: same modules, same pool calls, padded rows dropped.  On a GPU the same
    pieces are captured as CUDA graphs (tests/test_engine_gpu.py)."""
    outs = {}
    for piecewise in (False, True):
        r = ModelRunner.build(w4ax_model, kv4=kv4, num_blocks=24, block_size=16, max_seqs=5)
        if piecewise:
            r.enable_cuda_graphs(max_batch=8, graphs=False)
        prompts = [_rand_ids(6 + 5 * i, 90 + i) for i in range(5)]
        for s, p in enumerate(prompts):
            r.pool.reserve(s, len(p) + 6)
        logits = [r.forward([Chunk(s, p, 0) for s, p in enumerate(prompts)])]
        toks = [p[-1] for p in prompts]
        pos = [len(p) for p in prompts]
        for step in range(5):  # batch 5 -> padded to the 8 bucket; then 3 sequences -> the 4 bucket
            live = range(5) if step < 3 else range(3)
            lg = r.forward([Chunk(s, [toks[s]], pos[s]) for s in live])
            logits.append(lg)
            for j, s in enumerate(live):
                toks[s] = int(lg[j].argmax())
                pos[s] += 1
        outs[piecewise] = logits
        if piecewise:
            assert sorted(r._graphs._by_size) == [4, 8]
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(b, a, rtol=0, atol=RUNNER_FP32_ATOL)


def _decode_run(r, prompts, steps=8):
    """Prefill ``prompts`` as one batch, then greedy decode steps (batch 5 -> later 3): logits per step."""
    for s, p in enumerate(prompts):
        r.pool.reserve(s, len(p) + steps + 1)
    logits = [r.forward([Chunk(s, p, 0) for s, p in enumerate(prompts)])]
    toks = [p[-1] for p in prompts]
    pos = [len(p) for p in prompts]
    for step in range(steps):
        live = range(5) if step < steps // 2 else range(3)
        lg = r.forward([Chunk(s, [toks[s]], pos[s]) for s in live])
        logits.append(lg)
        for j, s in enumerate(live):
            toks[s] = int(lg[j].argmax())
            pos[s] += 1
    return logits


@pytest.mark.parametrize("axes", [("channel", "token"), ("token", "token")])
def test_full_step_decode_matches_plain_forward(w4ax_model, axes):
    """The full-step decode path (the whole step in one graph on a GPU; run eagerly here): KV4
    appends and attention through the pool's device-side ops, padding rows appending nothing
    -- same logits as the plain forward, and the device lengths and host ledger agree after
    crossing group boundaries (group 4: several flushes in 8 steps)."""
    outs, pools = {}, {}
    prompts = [_rand_ids(6 + 5 * i, 90 + i) for i in range(5)]
    for full in (False, True):
        r = ModelRunner.build(w4ax_model, kv4=True, num_blocks=24, block_size=16, max_seqs=5, group_size=4,
                              key_axis=axes[0], value_axis=axes[1])
        if full:
            r.enable_cuda_graphs(max_batch=8, graphs=False)
            assert r._graphs.full  # the default where the pool supports it
        outs[full] = _decode_run(r, prompts)
        pools[full] = r.pool.kv
        if full:
            assert sorted(r._graphs._by_size) == [4, 8]
            assert r._graphs._by_size[8].num_splits == r.pool.decode_num_splits(8)
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(b, a, rtol=0, atol=RUNNER_FP32_ATOL)
    assert torch.equal(pools[False]._lens, pools[True]._lens)
    assert pools[False]._qlen == pools[True]._qlen and pools[False]._tlen == pools[True]._tlen
    # the device lengths are what the host ledger says
    assert pools[True]._lens[0].tolist() == pools[True]._qlen and pools[True]._lens[1].tolist() == pools[True]._tlen


def test_full_step_decode_errors(w4ax_model):
    r = ModelRunner.build(w4ax_model, kv4=True, num_blocks=8, block_size=16, max_seqs=2)
    with pytest.raises(TypeError, match="full must be a bool"):
        r.enable_cuda_graphs(max_batch=4, graphs=False, full="yes")
    fp = ModelRunner.build(w4ax_model, kv4=False, num_blocks=8, block_size=16)
    with pytest.raises(ValueError, match="full-step decode graphs need a pool with device-side decode ops"):
        fp.enable_cuda_graphs(max_batch=4, graphs=False, full=True)
    fp.enable_cuda_graphs(max_batch=4, graphs=False)
    assert not fp._graphs.full  # the full-precision pool stays piecewise
    r.enable_cuda_graphs(max_batch=4, graphs=False, full=True)
    p = _rand_ids(15, 5)
    r.pool.reserve(0, 16)  # one block of 16 (group 16): the 16th token fills it
    r.forward([Chunk(0, p, 0)])
    before = (repr(r.pool.kv._qlen), repr(r.pool.kv._tlen), r.pool.kv._lens.clone())
    with pytest.raises(ValueError, match=r"holds 15 tokens, the decode step expects 14 \(engine sequences \[0\]"):
        r.forward([Chunk(0, [3], 14)])
    with pytest.raises(KeyError, match="unknown sequence 1"):
        r.forward([Chunk(1, [3], 14)])
    assert (repr(r.pool.kv._qlen), repr(r.pool.kv._tlen)) == before[:2] and torch.equal(r.pool.kv._lens, before[2])
    r.forward([Chunk(0, [3], 15)])  # completes the group: quantized into the reserved block
    assert r.pool.kv._qlen[0][0] == 16 and r.pool.kv._lens[0, :, 0].tolist() == [16] * r.num_layers
    r.forward([Chunk(0, [3], 16)])  # tail again: no block needed
    r.pool.kv._blocks[0].pop()  # (a ledger the reservation no longer covers)
    lens = r.pool.kv._lens.clone()
    with pytest.raises(ValueError, match="would reach 18 tokens but its reservation holds 15"):
        r.forward([Chunk(0, [3], 17)])
    assert r.pool.kv._qlen[0][0] + r.pool.kv._tlen[0][0] == 17 and torch.equal(r.pool.kv._lens, lens)


@pytest.mark.parametrize("kv4", [False, True])
def test_failed_graph_capture_falls_back_to_eager(w4ax_model, monkeypatch, kv4):
    """A capture that fails (warm-up or capture raising) costs nothing but that bucket's graphs:
    the step runs eagerly with a warning, the pool stays consistent, later steps of that bucket
    stay eager (here both buckets the run meets, 8 and 4, fail)."""
    from cometq.serve import runner as runner_mod

    def boom(self, *a):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner_mod._DecodeGraphs, "_capture_full", boom)
    monkeypatch.setattr(runner_mod._DecodeGraphs, "_capture_pieces", boom)
    prompts = [_rand_ids(6 + 5 * i, 90 + i) for i in range(5)]
    outs = {}
    for graphs in (False, True):
        r = ModelRunner.build(w4ax_model, kv4=kv4, num_blocks=24, block_size=16, max_seqs=5)
        if graphs:
            r.enable_cuda_graphs(max_batch=8, graphs=False)
            r._graphs.use_graphs = True  # (as on a GPU: capture on first use)
            with pytest.warns(RuntimeWarning, match="CUDA graph capture of the (full|piecewise) decode step at "
                                                     "batch 8 failed: RuntimeError: operation not permitted"):
                outs[graphs] = _decode_run(r, prompts, steps=4)
            assert r._graphs is not None and sorted(r._graphs.failed) == [4, 8] and not r._graphs._by_size
        else:
            outs[graphs] = _decode_run(r, prompts, steps=4)
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(b, a, rtol=0, atol=RUNNER_FP32_ATOL)


def test_refusion_drops_the_decode_graphs(w4ax_model):
    """GPU run 6 (test_async_scheduling_cuda_graphs_same_tokens): two runners built on one model
    take its fused q/k/v and gate/up weights from each other (the model's modules become views
    of the newest fusion); a runner that sees this re-fuses and frees its old fused weights -- which
    its captured decode graphs still replayed (NaN logits -> token 0 on the GPU).  Re-fusing now
    drops the captures (captured again on next use, on the new weights)."""
    import gc
    import weakref

    prompts = [_rand_ids(6 + 5 * i, 90 + i) for i in range(5)]
    r1 = ModelRunner.build(w4ax_model, kv4=True, num_blocks=24, block_size=16, max_seqs=5)
    r1.enable_cuda_graphs(max_batch=8, graphs=False)
    ref = _decode_run(r1, prompts, steps=4)
    assert sorted(r1._graphs._by_size) == [4, 8] and r1.graph_resets == 0
    old = weakref.ref(r1._qkv_fused[0].qweight)
    ModelRunner.build(w4ax_model, kv4=True, num_blocks=24, block_size=16, max_seqs=5)  # takes the weights over
    for s in range(5):
        r1.pool.free(s)
    got = _decode_run(r1, prompts, steps=4)  # its prefill re-fuses: the captures go
    gc.collect()
    assert r1.graph_resets == 1 and old() is None
    assert sorted(r1._graphs._by_size) == [4, 8]  # captured again, on the new fusion
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=0, atol=RUNNER_FP32_ATOL)
    # fusing more groups later replaces weights too: the captures go as well
    r3 = ModelRunner.build(w4ax_model, kv4=True, num_blocks=24, block_size=16, max_seqs=5, fuse=False)
    r3.enable_cuda_graphs(max_batch=8, graphs=False)
    _decode_run(r3, prompts, steps=2)
    assert r3._graphs._by_size and r3.fuse_projections() > 0 and not r3._graphs._by_size and r3.graph_resets == 1


def test_failed_capture_of_one_bucket_keeps_the_others(w4ax_model, monkeypatch):
    """GPU run 6: the batch-1 full-step capture failed (an input check of one kernel) and every
    decode step of the run went eager.  Now only the failing bucket runs eagerly: here bucket 4
    (batch 3) fails while bucket 8 (batch 5) is 'captured' (a CPU stand-in graph whose replay
    runs the step) and replayed -- same logits as without graphs; and after
    MAX_CAPTURE_FAILURES failed buckets every step runs eagerly."""
    from cometq.serve import runner as runner_mod

    replays = []

    class _Graph:
        def __init__(self, fn):
            self.fn = fn

        def replay(self):
            replays.append(1)
            self.fn()

    def capture(self, st, host_meta):
        if st.bp == 4:
            raise ValueError("seq_ids data must be 16-byte aligned, got an offset view (shape (3,))")
        st.graphs = [_Graph(lambda: self._step(st))]

    monkeypatch.setattr(runner_mod._DecodeGraphs, "_capture_full", capture)
    prompts = [_rand_ids(6 + 5 * i, 90 + i) for i in range(5)]
    ref = _decode_run(ModelRunner.build(w4ax_model, kv4=True, num_blocks=24, block_size=16, max_seqs=5),
                      prompts, steps=6)
    r = ModelRunner.build(w4ax_model, kv4=True, num_blocks=24, block_size=16, max_seqs=5)
    r.enable_cuda_graphs(max_batch=8, graphs=False)
    r._graphs.use_graphs = True
    with pytest.warns(RuntimeWarning, match=r"at batch 4 failed: ValueError: seq_ids data .* decode steps of batch "
                                            r"bucket 4 run eagerly from now on \(the other buckets keep their graphs\)"):
        got = _decode_run(r, prompts, steps=6)
    assert r._graphs is not None and list(r._graphs.failed) == [4] and list(r._graphs._by_size) == [8]
    assert len(replays) == 3  # the 3 batch-5 steps; the 3 batch-3 steps ran eagerly
    assert r._graphs.fits(5) and not r._graphs.fits(3) and not r.supports_async_decode(3)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=0, atol=RUNNER_FP32_ATOL)
    # two failed buckets with MAX_CAPTURE_FAILURES = 2: systematic, every decode step eager
    monkeypatch.setattr(runner_mod, "MAX_CAPTURE_FAILURES", 2)
    monkeypatch.setattr(runner_mod._DecodeGraphs, "_capture_full",
                        lambda self, st, hm: (_ for _ in ()).throw(RuntimeError("not capturable")))
    r = ModelRunner.build(w4ax_model, kv4=True, num_blocks=24, block_size=16, max_seqs=5)
    r.enable_cuda_graphs(max_batch=8, graphs=False)
    r._graphs.use_graphs = True
    with pytest.warns(RuntimeWarning, match=r"2 decode graph buckets failed \(\[4, 8\]\): decode steps run eagerly"):
        got = _decode_run(r, prompts, steps=6)
    assert r._graphs is None
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=0, atol=RUNNER_FP32_ATOL)


@pytest.mark.parametrize("full", [False, True])
def test_decode_graphs_capture_in_graph_timing_mode(w4ax_model, monkeypatch, full):
    """Warm-up AND capture of a decode graph run under ``autotune.timing("graph")``: choices are
    kept per timing mode, so a capture under the eager key found none and recorded the fixed
    order (GPU run 5: every projection ran the CUDA GEMM inside the graphs, though graph timing
    had measured Triton faster on some).  CUDA's stream / graph calls are faked on the CPU."""
    import contextlib

    from cometq import autotune
    from cometq.serve import runner as runner_mod

    class _Fake:
        def __init__(self, *a, **kw):
            pass

        def wait_stream(self, *a):
            pass

    captures = []

    @contextlib.contextmanager
    def graph(g, **kw):
        captures.append(autotune.timing_mode())
        yield

    for name, val in (("Stream", _Fake), ("CUDAGraph", _Fake), ("current_stream", lambda: _Fake()),
                      ("stream", lambda s: contextlib.nullcontext()), ("synchronize", lambda: None),
                      ("graph_pool_handle", lambda: None), ("graph", graph)):
        monkeypatch.setattr(runner_mod.torch.cuda, name, val)
    modes = []
    r = ModelRunner.build(w4ax_model, kv4=True, num_blocks=24, block_size=16, max_seqs=4)
    r.enable_cuda_graphs(max_batch=4, graphs=False, full=full)
    g = r._graphs
    if full:
        real = runner_mod._DecodeGraphs._step
        monkeypatch.setattr(runner_mod._DecodeGraphs, "_step",
                            lambda self, st: (modes.append(autotune.timing_mode()), real(self, st))[1])
        for sid in range(2):
            r.pool.reserve(sid, 8)
        with torch.no_grad():
            r.forward([Chunk(sid, _rand_ids(5, sid), 0) for sid in range(2)])
            slots = r.pool.check_decode_step([0, 1], [5, 5])
            host_meta = torch.tensor([[1, 2], [5, 5], slots, slots], dtype=torch.int32)  # (as run_full builds it)
            st = runner_mod._DecodeBucket(r, 2)
            st.num_splits = r.pool.decode_num_splits(2)
            g._capture_full(st, host_meta)
    else:
        real = runner_mod._DecodeGraphs._piece
        monkeypatch.setattr(runner_mod._DecodeGraphs, "_piece",
                            lambda self, st, i: (modes.append(autotune.timing_mode()), real(self, st, i))[1])
        st = runner_mod._DecodeBucket(r, 2)
        with torch.no_grad():
            g._capture_pieces(st, r.num_layers + 1)
    assert captures and set(captures) == {"graph"}
    assert modes and set(modes) == {"graph"}
    assert autotune.timing_mode() == "eager"


def test_enable_cuda_graphs_validation(w4ax_model):
    r = ModelRunner.build(w4ax_model, kv4=True, num_blocks=8, block_size=16, max_seqs=2)
    with pytest.raises(ValueError, match="max_batch"):
        r.enable_cuda_graphs(max_batch=0)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        r.enable_cuda_graphs(max_batch=4)


def test_request_token_slice_equals_all_ids_slice():
    """The scheduler's list-free views of prompt + output (``num_tokens``, ``token_slice``)."""
    from cometq.serve.engine import Request

    g = torch.Generator().manual_seed(0)
    for n_p, n_o in [(0, 0), (1, 0), (0, 3), (5, 4), (7, 1)]:
        req = Request(request_id="r", prompt_ids=torch.randint(0, 99, (n_p,), generator=g).tolist(),
                      params=SamplingParams(max_tokens=8))
        req.output_ids = torch.randint(0, 99, (n_o,), generator=g).tolist()
        assert req.num_tokens == len(req.all_ids)
        for a in range(n_p + n_o + 1):
            for b in range(a, n_p + n_o + 1):
                assert req.token_slice(a, b) == req.all_ids[a:b], (n_p, n_o, a, b)


# ---------------------------------------------------------------- async scheduling
def _async_engine(model, *, async_scheduling, graphs=True, num_blocks=40, max_seqs=6, budget=64, group=4):
    r = ModelRunner.build(model, kv4=True, num_blocks=num_blocks, block_size=8, max_seqs=max_seqs, group_size=group)
    if graphs:
        r.enable_cuda_graphs(max_batch=8, graphs=False)  # the full-step path, run eagerly on the CPU
    return Engine(r, None, EngineConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                        async_scheduling=async_scheduling))


def _drive(e, prompts, params, late=(), abort_at=None, max_steps=3000):
    """Run ``prompts`` (``late``: (step, prompt, params) submitted after that many steps;
    ``abort_at``: (step, index) aborts a request then); returns the requests."""
    reqs = [e.add_request(p, sp) for p, sp in zip(prompts, params)]
    for n in range(max_steps):
        for at, p, sp in late:
            if at == n:
                reqs.append(e.add_request(p, sp))
        if abort_at is not None and abort_at[0] == n:
            e.abort(reqs[abort_at[1]].request_id)
        if not e.has_work() and n > max((at for at, _, _ in late), default=0):
            break
        e.step()
    assert not e.has_work()
    return reqs


def _outcome(reqs):
    return [(q.output_ids, q.finish_reason) for q in reqs]


def test_async_scheduling_same_outputs_as_sync(w4ax_model):
    """Async scheduling (decode step N+1 queued, fed by the device, before step N's tokens are
    read) gives the synchronous engine's outputs exactly: requests finishing at different
    lengths (the step before a length stop is never queued ahead: no row is wasted), one
    stopping on a stop token and one aborted while a step is queued ahead (those rows are
    dropped), late arrivals joining -- and frees every block."""
    prompts = [_rand_ids(5 + 3 * i, 300 + i) for i in range(5)]
    greedy = [SamplingParams(max_tokens=n, temperature=0) for n in (14, 9, 20, 3, 17)]
    ref = _drive(_async_engine(w4ax_model, async_scheduling=False), prompts, greedy)
    # a stop token in the middle of request 2's output: it stops there while the others go on
    out2 = ref[2].output_ids
    k = next(i for i in range(4, len(out2)) if out2[i] not in out2[:i])
    stopping = list(greedy)
    stopping[2] = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(out2[k],))
    late = [(6, _rand_ids(7, 400), SamplingParams(max_tokens=8, temperature=0)),
            (11, _rand_ids(4, 401), SamplingParams(max_tokens=12, temperature=0))]
    for case, kw in (("stop+abort", dict(params=stopping, abort_at=(k + 5, 0))),
                     ("late arrivals", dict(params=greedy, late=late))):
        runs = {}
        for mode in ("sync", "async", "eager"):
            e = _async_engine(w4ax_model, async_scheduling=mode == "async", graphs=mode != "eager")
            runs[mode] = (_outcome(_drive(e, prompts, kw["params"], late=kw.get("late", ()),
                                          abort_at=kw.get("abort_at"))), e)
        assert runs["async"][0] == runs["sync"][0] == runs["eager"][0], case
        ea = runs["async"][1]
        assert ea.async_steps > 5 and runs["sync"][1].async_steps == 0, case
        assert ea.pool.num_used_blocks == 0, case
        # the device lengths agree with the host ledger (every queued-ahead append was accounted or freed)
        kv = ea.pool.kv
        assert kv._lens[0].tolist() == kv._qlen and kv._lens[1].tolist() == kv._tlen, case
        if case == "stop+abort":
            got = runs["async"][0]
            assert got[2] == (out2[:k], "stop") and got[0][1] == "abort" and len(got[0][0]) < 14
            assert ea.async_dropped == 2  # the stopped and the aborted request's queued-ahead rows
        else:
            assert [r[1] for r in runs["async"][0]] == ["length"] * 7
            assert ea.async_dropped == 0


def test_async_scheduling_falls_back_where_it_cannot_apply(w4ax_model):
    """Sampling requests (their logits go to the host), a full pool (no room to queue ahead:
    preemption goes the ordinary way) and a failing continue (disabled with a warning) keep
    the synchronous outputs."""
    prompts = [_rand_ids(6 + i, 500 + i) for i in range(4)]
    mixed = [SamplingParams(max_tokens=10, temperature=0)] * 3 + [SamplingParams(max_tokens=10, temperature=0.8,
                                                                                seed=7)]
    for kw in (dict(), dict(num_blocks=7)):  # 7 blocks of 8: preemption
        sp = mixed if not kw else [SamplingParams(max_tokens=10, temperature=0)] * 4
        outs = []
        for mode in (False, True):
            e = _async_engine(w4ax_model, async_scheduling=mode, **kw)
            outs.append((_outcome(_drive(e, prompts, sp)), e))
        assert outs[0][0] == outs[1][0]
        assert outs[1][1].pool.num_used_blocks == 0
        if kw:
            assert outs[1][1].stats["preemptions"] > 0
        else:
            assert outs[1][1].async_steps == 0  # a sampling request in every step's batch
    e = _async_engine(w4ax_model, async_scheduling=True)

    def broken(prev):
        raise RuntimeError("no feedback")

    e.runner.decode_continue = broken
    greedy = [SamplingParams(max_tokens=6, temperature=0)] * 2
    with pytest.warns(RuntimeWarning, match="async scheduling disabled: RuntimeError: no feedback"):
        got = _outcome(_drive(e, prompts[:2], greedy))
    ref = _outcome(_drive(_async_engine(w4ax_model, async_scheduling=False), prompts[:2], greedy))
    assert got == ref and e.async_steps == 0 and not e._async


def test_decode_continue_checks(w4ax_model):
    """decode_continue refuses a future that is not the last step of its bucket, and a pool
    without room for the next token -- before touching the pool."""
    r = ModelRunner.build(w4ax_model, kv4=True, num_blocks=16, block_size=8, max_seqs=4, group_size=4)
    assert r.decode_async([Chunk(0, [1], 3)]) is None  # no decode graphs: the caller runs forward
    r.enable_cuda_graphs(max_batch=4, graphs=False)
    for s in range(2):
        r.pool.reserve(s, 9)
    with torch.no_grad():
        r.forward([Chunk(s, _rand_ids(7, s), 0) for s in range(2)])
    assert r.decode_async([Chunk(0, _rand_ids(3, 9), 0), Chunk(1, [2], 7)]) is None  # a prefill chunk
    f1 = r.decode_async([Chunk(0, [1], 7), Chunk(1, [2], 7)])
    f2 = r.decode_continue(f1)  # positions 8
    assert f2.starts == [8, 8] and len(f1.tokens()) == 2
    with pytest.raises(RuntimeError, match="another step ran on this batch bucket"):
        r.decode_continue(f1)
    # one block of 8 + a staged tail of group - 1 = 3: room for 11 tokens (positions 0..10)
    f = r.decode_continue(r.decode_continue(f2))
    assert f.starts == [10, 10]
    before = (repr(r.pool.kv._qlen), repr(r.pool.kv._tlen), r.pool.kv._lens.clone())
    with pytest.raises(ValueError, match="would reach 12 tokens but its reservation holds 11"):
        r.decode_continue(f)
    assert (repr(r.pool.kv._qlen), repr(r.pool.kv._tlen)) == before[:2] and torch.equal(r.pool.kv._lens, before[2])
    with pytest.raises(RuntimeError, match="DecodeFuture of this runner"):
        r.decode_continue("f")
    # the fed-back tokens are the greedy tokens: continuing == forwarding the argmax by hand
    r3 = ModelRunner.build(w4ax_model, kv4=True, num_blocks=16, block_size=8, max_seqs=4, group_size=4)
    for s in range(2):
        r3.pool.reserve(s, 9)
    with torch.no_grad():
        r3.forward([Chunk(s, _rand_ids(7, s), 0) for s in range(2)])
        t1 = r3.forward([Chunk(0, [1], 7), Chunk(1, [2], 7)]).argmax(-1).tolist()
        t2 = r3.forward([Chunk(0, [t1[0]], 8), Chunk(1, [t1[1]], 8)]).argmax(-1).tolist()
    assert f1.tokens() == t1 and f2.tokens() == t2


def test_async_decode_needs_a_head_within_the_vocabulary(w4ax_model):
    """A padded LM head (more rows than the vocabulary / embedding) could feed the device an
    argmax id the host never checked: no async decode then (the engine runs synchronously)."""
    import copy

    r = ModelRunner.build(w4ax_model, kv4=True, num_blocks=8, block_size=8, max_seqs=2, group_size=4)
    r.enable_cuda_graphs(max_batch=2, graphs=False)
    assert r.supports_async_decode(2) and not r.supports_async_decode(3)
    padded = copy.deepcopy(w4ax_model)
    old = padded.lm_head
    padded.lm_head = torch.nn.Linear(old.in_features, old.out_features + 4, bias=False)
    r2 = ModelRunner.build(padded, kv4=True, num_blocks=8, block_size=8, max_seqs=2, group_size=4)
    r2.enable_cuda_graphs(max_batch=2, graphs=False)
    assert not r2.supports_async_decode(2)
    assert r2.decode_async([Chunk(0, [1], 3)]) is None
