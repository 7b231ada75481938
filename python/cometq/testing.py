"""Shared test helpers: named tolerances and random inputs (never zeros).

Kernels are held to the reference ops: integer parts exactly (``torch.equal``),
float outputs within the tolerances below.  Each constant says why it is what it is.
"""
from __future__ import annotations

import torch

#: fp32 epilogue vs the reference's float64 epilogue: only summation order and
#: one rounding differ, so a few fp32 ulps relative to the output's scale.
GEMM_FP32_RTOL = 1e-5
GEMM_FP32_ATOL = 1e-4
#: fp16/bf16 outputs: one final rounding to the output dtype (2**-11 / 2**-8
#: relative) on top of the fp32 epilogue.
GEMM_FP16_RTOL = 2e-3
GEMM_BF16_RTOL = 1.6e-2
#: KV4 decode attention: softmax and the weighted sum in fp32 over dequantized
#: values that are bit-identical to the reference's, so only summation order.
ATTN_RTOL = 1e-3
ATTN_ATOL = 1e-3


def rand_activation(m: int, k: int, *, outliers: int = 0, dtype=torch.float32, device="cpu", generator=None):
    """Normal activations; ``outliers`` channels scaled by ~50x like real LLM inputs."""
    x = torch.randn(m, k, generator=generator, device=device)
    if outliers:
        idx = torch.randperm(k, generator=generator, device=device)[:outliers]
        x[:, idx] *= 50.0
    return x.to(dtype)


def rand_weight(n: int, k: int, *, dtype=torch.float32, device="cpu", generator=None):
    return (torch.randn(n, k, generator=generator, device=device) * k**-0.5).to(dtype)


# --------------------------------------------------------------------------
# Hugging Face drop-in (cometq.nn / quantize / checkpoint / eval)
# --------------------------------------------------------------------------
#: W4AxLinear CPU fast path (one fp32 matmul of dequantized operands) vs the
#: reference op (exact integer segment dots, float64 epilogue) on the same
#: input: identical quantized integers and scales, so only fp32 summation over
#: K_pad <= 1536 products of unit-scale values differs (~sqrt(K) * 2**-24 relative);
#: 1e-4 of the output's magnitude leaves a wide margin.
FAST_PATH_RTOL = 1e-4
FAST_PATH_ATOL = 1e-4
#: Folding a permutation offline (MLP rows, weight columns) only reorders the
#: float32 sums of the consumer: a few ulps of the logits' scale.
FOLD_FP32_ATOL = 1e-5


def tiny_causal_lm(arch: str = "llama", *, hidden: int = 192, intermediate: int = 320, layers: int = 2,
                   vocab: int = 256, seed: int = 0):
    """A tiny random transformers causal LM (hidden 192 and intermediate 320 are not
    multiples of 128, so every K is padded).  ``arch``: llama | mistral | qwen2."""
    import transformers as tf

    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=3, num_key_value_heads=1, head_dim=hidden // 3, max_position_embeddings=256)
    cfgs = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}
    if arch not in cfgs:
        raise ValueError(f"arch must be one of {tuple(cfgs)}, got {arch!r}")
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfgs[arch](**kw))
    # give a few input channels LLM-like outliers so FMPQ has something to sort
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                idx = torch.randperm(p.numel())[:6]
                p[idx] *= 20.0
    return model.eval()


# --------------------------------------------------------------------------
# KV4 cache / paged pool / decode attention (issue 6)
# --------------------------------------------------------------------------
#: KV4 round-trip: an element is off by at most half a quantization step plus
#: the float16 rounding of zero (and of 15 * scale at the top of the range):
#: |x - x_hat| <= scale / 2 + KV4_FP16_SLACK * max(|min|, |max|) of its group.
KV4_FP16_SLACK = 2.0 ** -10
#: Triton decode attention with float16 queries: K/V are dequantized in fp32,
#: then rounded to fp16 for the tensor-core dots (2**-11 relative per operand,
#: and P in fp16), accumulations in fp32; output rounded to fp16.
ATTN_FP16_RTOL = 1e-2
ATTN_FP16_ATOL = 1e-2
#: KV4Cache vs the full-precision cache on a tiny random Llama: next-token
#: logits after prefill + decode steps that read 4-bit K/V.  Measured max
#: |diff| / std(logits): 0.09-0.12 on the tests' random models (unstructured
#: keys, near-uniform attention); a cache that loses the stored tokens (zeros
#: instead of the dequantized K/V) gives ~4.  0.25 sits between the two.
KVCACHE_LOGIT_REL_TOL = 0.25


# --------------------------------------------------------------------------
# Serving (cometq.serve): runner vs the HF model's own forward
# --------------------------------------------------------------------------
#: Runner with a full-precision (fp32) paged cache vs the HF forward: the same
#: math, only the attention summation order and the ragged batching differ, so a
#: few fp32 ulps of logits of magnitude <= ~10 (measured <= 4e-6).
RUNNER_FP32_ATOL = 1e-4
#: Serving log-probabilities (log-softmax of those logits) vs the same from the HF forward:
#: a log-softmax moves by at most twice the largest logit difference.
RUNNER_LOGPROB_ATOL = 2 * RUNNER_FP32_ATOL
#: Runner with the paged KV4 pool vs the HF forward with full-precision K/V:
#: 4-bit K/V (16 levels per group) perturbs attention; logits stay aligned
#: (cosine similarity), measured >= 0.97 on the tiny outlier model.
RUNNER_KV4_MIN_COSINE = 0.9
#: Runner KV4 vs HF + ``cometq.kvcache.KV4Cache`` (same groups, same math, but the
#: paged pool stages the tail in fp16 and quantizes a group the step it fills,
#: while KV4Cache keeps it exact for that step): a few quantization steps of
#: the logits (measured <= 0.18 on logits of magnitude ~3).
RUNNER_KV4_VS_KV4CACHE_ATOL = 0.5


# --------------------------------------------------------------------------
# inline PTX of the Triton kernels, executed on the CPU
# --------------------------------------------------------------------------
def byte_perm(p, q, sel: int):
    """CUDA's ``__byte_perm(p, q, sel)`` (``prmt.b32`` default mode) on numpy uint32 arrays:
    result byte i = byte ``(sel >> 4i) & 7`` of the 8-byte pair (p = bytes 0-3, q = bytes 4-7)."""
    import numpy as np

    src = [(p >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)] + [
        (q >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)
    ]
    out = np.zeros_like(p | q)
    for i in range(4):
        out |= src[(sel >> (4 * i)) & 7] << np.uint32(8 * i)
    return out


def run_ptx(asm: str, inputs: dict):
    """Execute the straight-line PTX subset the kernels' inline-asm snippets use, on numpy
    uint64 arrays holding 32-bit words (element-wise over the arrays).

    ``inputs`` maps operand names (``"$1"``) to arrays; returns the register file (a dict:
    read the outputs, e.g. ``regs["$0"]``).  Supported: ``.reg`` declarations, ``mov.b32``,
    ``and.b32``, ``or.b32``, ``shr.u32``, ``mul.lo.u32``, ``prmt.b32`` (default mode,
    including the sign-replicate selector bit) and ``lop3.b32`` (any LUT).  Anything else
    raises, so a kernel snippet using an instruction this model does not know fails its test
    instead of being checked against a guess."""
    import numpy as np

    m32 = np.uint64(0xFFFFFFFF)
    regs = {k: np.asarray(v).astype(np.uint64) & m32 for k, v in inputs.items()}

    def val(t):
        return regs[t] if t in regs else np.uint64(int(t, 0))

    def prmt(a, b, c):
        both = (val(b) << np.uint64(32)) | val(a)  # bytes 0-3 = a, 4-7 = b
        sel = int(c, 0)
        out = np.zeros_like(both)
        for i in range(4):
            s = (sel >> (4 * i)) & 0xF
            byte = (both >> np.uint64(8 * (s & 7))) & np.uint64(0xFF)
            if s & 8:  # replicate the byte's sign bit
                byte = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
            out |= byte << np.uint64(8 * i)
        return out

    def lop3(a, b, c, lut):
        a, b, c, lut = val(a), val(b), val(c), int(lut, 0)
        out = np.zeros_like(a | b | c)
        for i in range(8):
            if lut >> i & 1:
                out |= ((a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)) & m32
        return out

    binary = {"and.b32": lambda a, b: val(a) & val(b), "or.b32": lambda a, b: val(a) | val(b),
              "shr.u32": lambda a, b: val(a) >> val(b), "mul.lo.u32": lambda a, b: (val(a) * val(b)) & m32}
    for stmt in str(asm).replace("{", ";").replace("}", ";").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        args = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            res = val(args[1]) + np.zeros(1, dtype=np.uint64)
        elif op in binary:
            res = binary[op](*args[1:])
        elif op == "prmt.b32":
            res = prmt(*args[1:])
        elif op == "lop3.b32":
            res = lop3(*args[1:])
        else:
            raise AssertionError(f"PTX instruction {op!r} is not modelled (snippet: {asm!r})")
        regs[args[0]] = res & m32
    return regs


def record_linear_routes(monkeypatch, ops_module, names=("split", "fused", "w16")) -> list:
    """Tests of ``ops.w4ax_linear_eager``'s route choice: wrap the named routes so each run
    appends its name to the returned list (``monkeypatch`` undoes it)."""
    ran = []
    for name in names:
        real = ops_module._LINEAR_ROUTES[name]
        monkeypatch.setitem(ops_module._LINEAR_ROUTES, name,
                            lambda *a, _r=real, _n=name: (ran.append(_n), _r(*a))[1])
    return ran


def fake_route_timer(ran: list, times: dict):
    """An autotune timer for those tests: runs the candidate once and reports ``times[route]``
    for the route it ran (read from the list :func:`record_linear_routes` fills)."""
    def timer(fn, device, **kw):
        n0 = len(ran)
        fn()
        return times[ran[n0]]

    return timer


def check_inkernel_reduction(launch, want, counters) -> None:
    """GPU tests of an in-kernel split-K reduction: ``launch(counters)`` (a GEMM with tile counters)
    must give ``want`` (the finalize kernel's result) bit for bit twice in a row and replayed three
    times from a CUDA graph, leaving every counter zero each time."""
    for _ in range(2):
        assert torch.equal(launch(counters), want)
    torch.cuda.synchronize()
    assert int(counters.abs().sum()) == 0
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        launch(counters)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = launch(counters)
    for _ in range(3):
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want) and int(counters.abs().sum()) == 0


def penalized_greedy_reference(model, prompt, n: int, rep: float = 1.0, freq: float = 0.0, pres: float = 0.0):
    """Greedy decoding of an HF causal LM with serving's penalties, written out token by token
    from the model's own forward (no cache, float64 logits): the repetition penalty over prompt +
    output (a positive logit divided by ``rep``, a negative one multiplied), frequency / presence
    over the output (``logit -= freq * count + pres``).  Returns (output ids, the chosen tokens'
    raw log-probabilities, each step's raw log-softmax row)."""
    seq, out, lps, rows = list(prompt), [], [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].double()
            x = logits.clone()
            for t in set(seq):
                x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
            for t in set(out):
                x[t] -= freq * out.count(t) + pres
            tok = int(x.argmax())
            lp = torch.log_softmax(logits, -1)
            rows.append(lp)
            lps.append(float(lp[tok]))
            out.append(tok)
            seq.append(tok)
    return out, lps, rows


def prompt_logprob_reference(model, prompt):
    """Raw log-probabilities of ``prompt[1:]`` under the HF forward (float64)."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), -1)
    return [float(lp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]


def constrained_greedy_reference(model, prompt, n: int, grammar, token_bytes, eos=None):
    """Greedy decoding under a grammar (:mod:`cometq.serve.structured` / :mod:`cometq.serve.regex`),
    token by token through the HF forward: the argmax over the tokens whose bytes the grammar
    accepts (and ``eos`` where ``grammar.can_end``), until EOS, a complete document or ``n`` tokens.
    Checked token by token, not through the masker's trie."""
    from .serve.structured import grammar_feed

    seq, st, out = list(prompt), grammar.start, []
    can_end = getattr(grammar, "can_end", None)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            ok = torch.tensor([bool(b) and grammar_feed(grammar, st, b) is not None for b in token_bytes[:logits.numel()]])
            if eos is not None and can_end is not None:
                ok[eos] = bool(can_end(st))
            t = int(logits.masked_fill(~ok, float("-inf")).argmax())
            if t == eos:
                break
            out.append(t)
            seq.append(t)
            st = grammar_feed(grammar, st, token_bytes[t])
            if grammar.done(st):
                break
    return out
