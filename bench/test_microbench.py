"""Kernel microbenchmarks with pytest-benchmark: cometq ops beside their peers, one case each.

    pytest bench/test_microbench.py --benchmark-json=micro.json     # GPU: times, no assertions
    python bench/microbench_table.py micro.json                     # markdown table with ratios
    pytest bench/test_microbench.py --benchmark-disable             # smoke (CPU: tiny shapes)

Each case is ``group`` (what is compared: one shape of one op) x ``system`` (cometq backend
or peer).  On a GPU every call replays a CUDA graph holding ``REPS`` back-to-back launches
of the op, then synchronizes: the timed unit is GPU time plus one sync, free of Python
launch cost (at decode sizes the eager launch costs 2-10x the kernel, bench/RESULTS.md);
``extra_info`` carries ``reps``, the bytes / FLOPs one op must move / do, so the table
reports us per op, GB/s and TFLOP/s.  On CPU the shapes shrink and the reference backend
runs: a check that every case still builds and runs (no speed meaning).

Shapes (GPU): Llama-3-8B ``gate_up`` (N 28672, K 4096) at M 1 and 16 (weight-bandwidth
bound), ``o`` (4096 x 4096) at M 1024 (compute bound), 12.5 % INT8 blocks; KV4 decode
attention at batch 16 / context 4096 (Llama-3-8B heads 32 / 8, head_dim 128); the device-side
KV4 decode append at batch 64.  Peers in the same session: cuBLAS FP16 (``x @ w.T``),
FP8 (``torch._scaled_mm``, row-wise scales), torch SDPA over fp16 K/V.
"""
from __future__ import annotations

import pytest
import torch

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
#: launches per CUDA-graph replay (one timed call)
REPS = 20 if GPU else 1

pytest.importorskip("pytest_benchmark")


def _cometq_backends():
    if not GPU:
        return ["reference"]
    out = ["triton"]
    try:
        import cometq._C  # noqa: F401

        out.append("cuda")
    except ImportError:
        pass
    return out


def _run(benchmark, fn, *, group: str, system: str, nbytes: int = 0, flops: float = 0.0):
    """Time ``fn`` (one op) as a pytest-benchmark case (see the module doc)."""
    benchmark.group = group
    benchmark.extra_info.update(system=system, reps=REPS, bytes=int(nbytes), flops=float(flops),
                                device=torch.cuda.get_device_name() if GPU else "cpu")
    fn()  # compile / autotune outside the timing (and outside the capture)
    if not GPU:  # a smoke run: a few calls (the decode-append case has room for a bounded number)
        benchmark.pedantic(fn, rounds=3, iterations=1)
        return
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()

    def replay():
        g.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=30, iterations=1, warmup_rounds=3)


# ---------------------------------------------------------------- W4Ax GEMM (+ activation quantization)
GEMM_CASES = [("8B.gate_up", 28672, 4096, 1), ("8B.gate_up", 28672, 4096, 16), ("8B.o", 4096, 4096, 1024)] if GPU \
    else [("tiny", 200, 576, 3)]
SHARE = 0.125


def _gemm_operands(n, k, m):
    from cometq.layout import ActivationLayout, num_blocks, padded_k

    g = torch.Generator(device=DEV).manual_seed(n + k + m)
    dt = torch.float16 if GPU else torch.float32
    x = torch.randn(m, k, device=DEV, generator=g).to(dt)
    nb = num_blocks(k)
    n8 = int(round(SHARE * nb))
    lay = ActivationLayout(torch.arange(k, device=DEV),
                           torch.tensor([8] * n8 + [4] * (nb - n8), dtype=torch.int32, device=DEV))
    k_pad = padded_k(k)
    qweight = torch.randint(0, 256, (n, k_pad // 2), device=DEV, dtype=torch.uint8, generator=g)
    w_scales = torch.rand(n, k_pad // 128, device=DEV, generator=g) * 0.01
    return x, lay, qweight, w_scales, k_pad


@pytest.mark.parametrize("backend", _cometq_backends())
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: f"{c[0]}-M{c[3]}")
def test_w4ax_linear(benchmark, case, backend):
    """Activation quantization + W4Ax GEMM (what a W4AxLinear runs), INT4 weights g128 sym."""
    from cometq import ops

    name, n, k, m = case
    x, lay, qweight, w_scales, k_pad = _gemm_operands(n, k, m)
    out_dt = x.dtype if x.dtype != torch.float32 else torch.float16

    def fn():
        q4, q8, sc = ops.quantize_act(x, lay.perm, lay.block_bits, lay.n_int8, "block", backend)
        return ops.w4ax_gemm(q4, q8, sc, lay.block_bits, qweight, w_scales, 128, None, out_dt, "block", backend)

    nbytes = n * k_pad // 2 + w_scales.numel() * 4 + x.numel() * x.element_size() + 2 * m * n
    _run(benchmark, fn, group=f"linear {name} M={m}", system=f"cometq-{backend}", nbytes=nbytes,
         flops=2.0 * m * n * k)


@pytest.mark.parametrize("peer", ["fp16", "fp8"])
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: f"{c[0]}-M{c[3]}")
def test_linear_peers(benchmark, case, peer):
    name, n, k, m = case
    g = torch.Generator(device=DEV).manual_seed(1)
    dt = torch.float16 if GPU else torch.float32
    x = torch.randn(m, k, device=DEV, generator=g).to(dt)
    w = (torch.randn(n, k, device=DEV, generator=g) * 0.02).to(dt)
    if peer == "fp16":
        fn = (lambda: x @ w.t())
        nbytes = w.numel() * w.element_size() + x.numel() * x.element_size() + 2 * m * n
    else:
        if not GPU:
            pytest.skip("the FP8 peer (torch._scaled_mm) needs a GPU")
        x8 = torch.randn(max(m, 16), k, device=DEV, generator=g).to(torch.float8_e4m3fn)
        w8 = w.to(torch.float8_e4m3fn)
        sa = torch.ones(x8.shape[0], 1, device=DEV)
        sb = torch.ones(1, n, device=DEV)
        fn = (lambda: torch._scaled_mm(x8, w8.t(), sa, sb, out_dtype=torch.bfloat16))
        nbytes = n * k + x8.numel() + 2 * x8.shape[0] * n
    _run(benchmark, fn, group=f"linear {name} M={m}", system=peer, nbytes=nbytes, flops=2.0 * m * n * k)


# ---------------------------------------------------------------- KV4 decode attention / append
ATTN = dict(batch=16, ctx=4096, hq=32, hkv=8, d=128, bs=64, g=32) if GPU else \
    dict(batch=2, ctx=80, hq=4, hkv=2, d=32, bs=16, g=16)


def _kv4_pool(batch, ctx, hkv, d, bs, g, seed=0, room=0):
    """A multi-sequence one-layer KV4 pool (K per channel, V per token) holding ``ctx`` tokens
    each, with blocks reserved for ``room`` more."""
    from cometq.paged import MultiLayerKV4Pool, PagedKV4Config

    cfg = PagedKV4Config(num_blocks=batch * (-(-(ctx + room + g) // bs) + 1), num_kv_heads=hkv, head_dim=d,
                         block_size=bs, group_size=g, max_seqs=batch)
    pool = MultiLayerKV4Pool(cfg, 1, DEV)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    seqs = [pool.add_sequence() for _ in range(batch)]
    for s in seqs:
        pool.reserve(s, ctx + room + g)
    kv = [torch.randn(hkv, ctx, d, device=DEV, generator=gen).half() for _ in range(2 * batch)]
    pool.append_prefill(0, seqs, kv[:batch], kv[batch:], backend="reference" if not GPU else None)
    return pool, seqs


@pytest.mark.parametrize("system", [f"cometq-{b}" for b in _cometq_backends()] + ["sdpa-fp16"])
def test_kv4_decode_attention(benchmark, system):
    from cometq import ops

    a = ATTN
    b, ctx, hq, hkv, d = a["batch"], a["ctx"], a["hq"], a["hkv"], a["d"]
    gen = torch.Generator(device=DEV).manual_seed(2)
    dt = torch.float16 if GPU else torch.float32
    q = torch.randn(b, hq, d, device=DEV, generator=gen).to(dt)
    group = f"decode attention b={b} ctx={ctx}"
    if system == "sdpa-fp16":
        k = torch.randn(b, hkv, ctx, d, device=DEV, generator=gen).to(dt)
        v = torch.randn(b, hkv, ctx, d, device=DEV, generator=gen).to(dt)
        fn = (lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True))
        _run(benchmark, fn, group=group, system=system, nbytes=2 * k.numel() * k.element_size())
        return
    pool, seqs = _kv4_pool(b, ctx, hkv, d, a["bs"], a["g"])
    backend = system.split("-", 1)[1]
    if backend == "cuda":
        pytest.skip("no CUDA decode-attention kernel (Triton only)")
    c = pool.config
    ids = torch.tensor(seqs, dtype=torch.int32, device=DEV)
    ns = pool.default_num_splits(seqs)

    def fn():
        return ops.kv4_decode_attention(q, pool.k_packed[0], pool.k_scale[0], pool.k_zero[0], pool.v_packed[0],
                                        pool.v_scale[0], pool.v_zero[0], pool.tail_k[0], pool.tail_v[0],
                                        pool.block_tables, pool.quant_lens[0], pool.tail_lens[0], ids, c.group_size,
                                        c.key_axis, c.value_axis, d ** -0.5, ns, backend, check_pool=False)

    nbytes = pool.memory_bytes() * b * ctx // max(1, c.num_blocks * c.block_size)  # the blocks read (approx.)
    _run(benchmark, fn, group=group, system=system, nbytes=nbytes)


@pytest.mark.parametrize("backend", _cometq_backends()[:1])
def test_kv4_decode_append(benchmark, backend):
    """The device-side decode append (one token per sequence, the per-layer KV write of a decode
    step): every launch appends a token to every sequence, so the timing averages the tail
    writes and the group quantization every G-th token (blocks reserved for all of them)."""
    from cometq import ops

    a = ATTN
    b = 64 if GPU else 2
    launches = REPS * 40  # GPU: warm-up, capture-side run and 33 timed replays (CPU: 4 calls)
    pool, seqs = _kv4_pool(b, 40 if GPU else 20, a["hkv"], a["d"], a["bs"], a["g"], seed=3, room=launches)
    c = pool.config
    gen = torch.Generator(device=DEV).manual_seed(4)
    k = torch.randn(b, a["hkv"], a["d"], device=DEV, generator=gen).half()
    v = torch.randn(b, a["hkv"], a["d"], device=DEV, generator=gen).half()
    slots = torch.tensor(seqs, dtype=torch.int32, device=DEV)

    def fn():
        ops.kv4_decode_append(k, v, pool.k_packed[0], pool.k_scale[0], pool.k_zero[0], pool.v_packed[0],
                              pool.v_scale[0], pool.v_zero[0], pool.tail_k[0], pool.tail_v[0], pool.block_tables,
                              pool._lens[:, 0], slots, c.group_size, c.key_axis, c.value_axis, backend,
                              check_pool=False)

    _run(benchmark, fn, group=f"decode append b={b}", system=f"cometq-{backend}",
         nbytes=2 * k.numel() * k.element_size() * (1 + 1 / c.group_size))


# ---------------------------------------------------------------- fused layer ops vs the HF modules
@pytest.mark.parametrize("system", ["cometq-fused", "hf-module"])
def test_layer_elementwise(benchmark, system):
    """One decode layer's elementwise pieces at batch 64 (Llama-3-8B widths): RMSNorm, add +
    RMSNorm, RoPE split of the fused q/k/v output, SiLU-and-mul -- the fused ops (4 kernels) vs
    the HF modules / runner code they replace (~25 kernels)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from cometq import ops
    from cometq.layers import rope_qkv_reference

    t, c, inter, hq, hkv, d = (64, 4096, 14336, 32, 8, 128) if GPU else (2, 64, 96, 4, 2, 16)
    dt = torch.float16 if GPU else torch.float32
    gen = torch.Generator(device=DEV).manual_seed(5)
    h = torch.randn(t, c, device=DEV, generator=gen).to(dt)
    o = torch.randn(t, c, device=DEV, generator=gen).to(dt)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEV, generator=gen).to(dt)
    cos = torch.rand(t, d, device=DEV, generator=gen).to(dt)
    sin = torch.rand(t, d, device=DEV, generator=gen).to(dt)
    gu = torch.randn(t, 2 * inter, device=DEV, generator=gen).to(dt)
    norm = LlamaRMSNorm(c, eps=1e-5).to(DEV, dt)
    be = "triton" if GPU else "reference"

    if system == "cometq-fused":
        def fn():
            ops.rms_norm(h, norm.weight, 1e-5, be)
            ops.add_rms_norm(o, h, norm.weight, 1e-5, be)
            ops.rope_qkv(qkv, cos, sin, hq, hkv, be)
            ops.silu_mul(gu, be)
    else:
        act = torch.nn.SiLU()

        def fn():
            norm(h)
            norm(h + o)
            rope_qkv_reference(qkv, cos, sin, hq, hkv)
            g, u = gu.chunk(2, dim=-1)
            act(g) * u

    nbytes = (4 * t * c + 2 * t * c + 2 * qkv.numel() + gu.numel() * 3 // 2) * (2 if GPU else 4)
    _run(benchmark, fn, group=f"layer elementwise b={t}", system=system, nbytes=nbytes)
