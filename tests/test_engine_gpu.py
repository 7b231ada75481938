"""cometq.serve on a CUDA GPU: fp16 runner vs the HF forward, KV4 decode through the Triton op vs the reference."""
import pytest
import torch

from cometq.serve.engine import Engine, EngineConfig
from cometq.serve.runner import Chunk, ModelRunner
from cometq.serve.sampling import SamplingParams
from cometq.serve.tiny import tiny_model

pytestmark = pytest.mark.gpu

#: fp16 end to end (weights, activations, K/V): each of ~10 roundings per layer is
#: 2**-11 relative; logits of this tiny model are O(1).
FP16_LOGIT_ATOL = 3e-2
#: Triton KV4 decode attention vs the reference op on identical 4-bit pools:
#: only fp16 dot-product rounding differs (ATTN_FP16_*), the logits stay aligned.
KV4_BACKEND_MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def model16():
    return tiny_model().to("cuda", torch.float16)


@pytest.fixture(scope="module")
def model16_long():
    """model16's geometry with room for 1024 positions (prompts longer than model16's 512)."""
    return tiny_model(max_positions=1024).to("cuda", torch.float16)


def _ids(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_runner_fp16_cuda_matches_hf(model16):
    r = ModelRunner.with_fp_pool(model16, num_blocks=8, block_size=16)
    a = _ids(40, 0)
    r.pool.reserve(0, 40)
    with torch.no_grad():
        ref = model16(torch.tensor([a], device="cuda")).logits[0].float()
    got = torch.cat([r.forward([Chunk(0, a[:30], 0)], all_logits=True)]
                    + [r.forward([Chunk(0, a[i:i + 1], i)]) for i in range(30, 40)])
    torch.testing.assert_close(got, ref, rtol=0, atol=FP16_LOGIT_ATOL)


def test_kv4_triton_decode_matches_reference(model16):
    outs = {}
    for backend in ("reference", None):  # None: auto -> triton/cuda on a GPU
        r = ModelRunner.with_kv4_pool(model16, num_blocks=8, block_size=32, group_size=32, backend=backend)
        a = _ids(70, 1)
        r.pool.reserve(0, 70)
        rows = [r.forward([Chunk(0, a[:40], 0)])]
        rows += [r.forward([Chunk(0, a[i:i + 1], i)]) for i in range(40, 70)]
        outs[backend] = torch.cat(rows)
    cos = torch.nn.functional.cosine_similarity(outs[None], outs["reference"], dim=-1)
    assert bool((cos >= KV4_BACKEND_MIN_COSINE).all()), cos.min()


def test_engine_cuda_batch_matches_solo(model16):
    r = ModelRunner.with_kv4_pool(model16, num_blocks=32, block_size=32, max_seqs=8)
    e = Engine(r, None, EngineConfig(max_num_seqs=8, max_num_batched_tokens=4096))
    prompts = [_ids(10 + 7 * i, 10 + i) for i in range(8)]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    batched = e.generate(prompts, sp)
    assert [len(o) for o in batched] == [12] * 8 and r.pool.num_used_blocks == 0
    solo = [e.generate([p], sp)[0] for p in prompts[:3]]
    # fp16 batched vs single-row GEMMs may round differently: allow a late divergence, not an early one
    for s, b in zip(solo, batched):
        assert s[:4] == b[:4]


@pytest.mark.parametrize("what", ["fp", "kv4", "kv4-piecewise", "w4ax-kv4"])
def test_decode_cuda_graphs_match_eager(model16, what):
    """CUDA graphs of decode steps (ModelRunner.enable_cuda_graphs) give the eager engine's
    greedy tokens (batch 5 padded to the 8-graph, then fewer sequences): full-step graphs for
    the KV4 pool (appends + attention captured; 16 tokens cross the 32-token group of the
    longest prompts), piecewise for the full-precision pool (and kv4-piecewise); w4ax-kv4
    captures the Triton/CUDA W4Ax linears too."""
    model = model16
    if what == "w4ax-kv4":
        import copy

        from cometq import W4AxConfig, quantize_

        model = copy.deepcopy(model16)
        quantize_(model, W4AxConfig(), calib_data=torch.randint(0, 256, (2, 64), device="cuda"))
    kv4 = what != "fp"
    prompts = [_ids(9 + 4 * i, 40 + i) for i in range(5)]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = {}
    for graphs in (False, True):
        r = ModelRunner.build(model, kv4=kv4, num_blocks=32, block_size=32, max_seqs=8)
        if graphs:
            r.enable_cuda_graphs(max_batch=8, full=False if what == "kv4-piecewise" else None)
            assert r._graphs.full == (what in ("kv4", "w4ax-kv4"))
        e = Engine(r, None, EngineConfig(max_num_seqs=8, max_num_batched_tokens=4096))
        outs[graphs] = e.generate(prompts, sp)
        if graphs:
            assert r._graphs._by_size and all(st.graphs for st in r._graphs._by_size.values())
            if r._graphs.full:
                assert all(len(st.graphs) == 1 for st in r._graphs._by_size.values())
                kv = r.pool.kv  # every sequence finished and was freed: device lengths back to zero
                assert int(kv._lens.abs().sum()) == 0 and kv.num_used_blocks == 0
    same = sum(a == b for a, b in zip(outs[False], outs[True]))
    assert same >= 4, (outs[False], outs[True])  # fp16 padding may flip a near-tie, rarely


def test_async_scheduling_cuda_graphs_same_tokens(model16):
    """Async scheduling on real CUDA graphs: each decode step replayed before the previous
    step's tokens are read, fed by the graph's own argmax -- the same greedy tokens as the
    synchronous engine on the same graphs (identical kernels: exact), a stop token mid-batch
    (its queued-ahead row dropped), every block freed and the device lengths back to zero."""
    prompts = [_ids(9 + 4 * i, 60 + i) for i in range(5)]
    sp = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (24, 17, 30, 9, 24)]
    outs, engines = {}, {}
    for async_scheduling in (False, True):
        r = ModelRunner.build(model16, kv4=True, num_blocks=32, block_size=32, max_seqs=8)
        r.enable_cuda_graphs(max_batch=8)
        e = Engine(r, None, EngineConfig(max_num_seqs=8, max_num_batched_tokens=4096,
                                         async_scheduling=async_scheduling))
        reqs = [e.add_request(p, s) for p, s in zip(prompts, sp)]
        while e.has_work():
            e.step()
        outs[async_scheduling] = [q.output_ids for q in reqs]
        engines[async_scheduling] = e
    assert outs[True] == outs[False]
    assert engines[True].async_steps > 10 and engines[True].async_dropped == 0
    # a stop token halfway through request 0's output (first occurrence), beside a longer request:
    # the same outputs again, and the stopping request's row queued ahead is dropped
    out0 = outs[False][0]
    k = next(i for i in range(6, len(out0)) if out0[i] not in out0[:i])
    second = {}
    for async_scheduling, e in engines.items():
        reqs = [e.add_request(prompts[0], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(out0[k],))),
                e.add_request(prompts[2], sp[2])]
        while e.has_work():
            e.step()
        second[async_scheduling] = [(q.output_ids, q.finish_reason) for q in reqs]
        kv = e.pool.kv
        torch.cuda.synchronize()
        assert int(kv._lens.abs().sum()) == 0 and kv.num_used_blocks == 0
    assert second[True] == second[False]
    if second[True][0][1] == "stop":  # (fp16: batch 2 may round differently from batch 5)
        assert engines[True].async_dropped == 1


@pytest.mark.parametrize("fresh", [24, 520])
@pytest.mark.parametrize("what", ["fp", "kv4", "w4ax-kv4"])
def test_mixed_prefill_step_never_syncs(model16, model16_long, what, fresh):
    """A warmed-up step that mixes a decode row, a continued prefill chunk (its cached prefix
    read back from the pool) and two fresh prompts queues all its kernels without waiting for
    the GPU (``torch.cuda.set_sync_debug_mode("error")``).  H100 run 7: the KV4 prefix read
    copied its block list with ``torch.as_tensor(list, device=cuda)`` -- a sync per layer --
    and every serving step with a continued chunk took ~90 ms more than the others.  ``fresh``:
    the two fresh prompts' length (step of 1 + 34 + 2 * fresh rows: the W4Ax linears' small-M
    routes, and from 1024 rows the large-M ones; run 10 (H200): 520-token prompts need more than
    model16's 512 positions -- the runner refused them before the sync check ran)."""
    base_model = model16 if fresh <= model16.config.max_position_embeddings else model16_long
    model = base_model
    if what == "w4ax-kv4":
        import copy

        from cometq import W4AxConfig, quantize_

        model = copy.deepcopy(base_model)
        quantize_(model, W4AxConfig(), calib_data=torch.randint(0, 256, (2, 64), device="cuda"))
    r = ModelRunner.build(model, kv4=what != "fp", num_blocks=96, block_size=32, max_seqs=16)
    a, b, c, d = _ids(40, 70), _ids(70, 71), _ids(fresh, 72), _ids(fresh, 73)

    def mixed(base: int, check: bool):
        for i, n in enumerate((41, 70, fresh, fresh)):
            r.pool.reserve(base + i, n)
        r.forward([Chunk(base, a, 0)])  # a decoding sequence (40 tokens cached)
        r.forward([Chunk(base + 1, b[:36], 0)])  # a prompt whose first 36 tokens were prefilled
        torch.cuda.synchronize()
        chunks = [Chunk(base, a[-1:], 40), Chunk(base + 1, b[36:], 36), Chunk(base + 2, c, 0), Chunk(base + 3, d, 0)]
        if check:
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = r.forward(chunks)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert out.shape == (4, model.config.vocab_size) and bool(torch.isfinite(out).all())
        for i in range(4):
            r.pool.free(base + i)

    mixed(0, check=False)  # compiles and tunes what this step needs
    mixed(8, check=True)
