#!/usr/bin/env python
"""Accuracy of the 4-bit KV cache (cometq.kvcache.KV4Cache) on SmolLM2-135M.

Two ways to make perplexity read the quantized cache (a single forward pass
over a window never reads back what the cache stored):

* ``decode`` (faithful, the numbers we pick defaults by): prefill the first
  ``--prefix`` tokens of each window into the cache, then feed the rest
  ``--chunk`` tokens at a time, scoring each token's prediction.  Every token
  attends to older tokens through the cache exactly as in generation (4-bit
  beyond the full-precision residual window; ``--chunk 1`` is token-by-token
  decode).  The full-precision reference is the same loop with DynamicCache.
* ``fakequant`` (stress test, no residual window): one forward per window in
  which every K/V (after RoPE) is quantized-dequantized before attention, the
  tokens' own included; per-channel groups then use statistics of G tokens
  that include later tokens of the group.  This is the setting of the
  "naive per-token group-64 = 1.17x" baseline.

Greedy agreement: ``--greedy-prompts`` prompts of ``--greedy-prompt-len``
tokens, ``--greedy-new`` greedy tokens with the fp cache and with KV4Cache;
reports the fraction of positions where the tokens agree and the mean length
of the common prefix.

    python bench/eval_kv4.py --windows 8 --seq-len 512 --out-md docs/KV4.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SWEEP = [
    # (key_axis, value_axis, group_size, residual_length)
    ("token", "token", 64, 0),
    ("token", "token", 32, 0),
    ("channel", "token", 64, 0),
    ("channel", "token", 32, 0),
    ("channel", "channel", 64, 0),
    ("channel", "channel", 32, 0),
    ("channel", "token", 32, 32),
]


def _parse_cfg(s: str):
    k, v, g, r = s.split(":")
    return (k, v, int(g), int(r))


# the decode-protocol scorer lives in the library (also used by `cometq demo --kv4`)
from cometq.eval import nll_decode  # noqa: E402


class FakeQuantCache:
    """Builds a DynamicCache whose update returns quantize->dequantize of all K/V (after RoPE)."""

    def __init__(self, key_axis, value_axis, group_size):
        from transformers import DynamicCache

        from cometq.reference import dequantize_kv4, quantize_kv4

        class _C(DynamicCache):
            def update(self_, k, v, layer_idx, *a, **kw):
                def fq(x, axis):
                    t = x.shape[-2]
                    pad = (-t) % group_size if axis == "channel" else 0
                    xp = torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], pad, x.shape[-1])], -2) if pad else x
                    return dequantize_kv4(quantize_kv4(xp.contiguous(), group_size, axis), x.dtype)[..., :t, :]

                return fq(k, key_axis), fq(v, value_axis)

        self.cls = _C

    def __call__(self):
        return self.cls()


def nll_fakequant(model, windows, cache_fn):
    tot, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            out = model(w, past_key_values=cache_fn(), use_cache=True)
            lp = torch.log_softmax(out.logits[:, :-1].float(), -1)
            tot -= float(lp.gather(-1, w[:, 1:, None]).sum())
            n += w.shape[1] - 1
    return tot, n


def greedy_agreement(model, prompts, cache_fn, ref_tokens, new: int):
    agree, prefix, total = 0, 0, 0
    with torch.no_grad():
        for p, ref in zip(prompts, ref_tokens):
            out = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, past_key_values=cache_fn(), pad_token_id=0)[0, p.shape[1]:]
            m = (out == ref)
            agree += int(m.sum())
            total += m.numel()
            prefix += int(m.long().cumprod(0).sum())
    return agree / total, prefix / len(prompts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--prefix", type=int, default=64, help="tokens prefilled before scoring (decode mode)")
    ap.add_argument("--chunk", type=int, default=8, help="tokens fed per step in decode mode (1 = pure decode)")
    ap.add_argument("--configs", nargs="*", type=_parse_cfg, default=None,
                    help="key_axis:value_axis:group:residual, e.g. channel:token:32:0 (default: built-in sweep)")
    ap.add_argument("--no-fakequant", action="store_true")
    ap.add_argument("--confirm", type=_parse_cfg, default=("channel", "token", 32, 0),
                    help="config re-measured with --chunk 1 (pure decode)")
    ap.add_argument("--confirm-windows", type=int, default=2, help="windows used by the pure-decode confirmation")
    ap.add_argument("--greedy-prompts", type=int, default=8)
    ap.add_argument("--greedy-prompt-len", type=int, default=128)
    ap.add_argument("--greedy-new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out-json", default="bench/results/eval_kv4.json")
    ap.add_argument("--out-md", default=None, help="write the markdown table here too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import DynamicCache

    from cometq.data import corpus_tokens, evaluation_windows
    from cometq.kvcache import KV4Cache, KV4Config
    from cometq.models import load_model

    t0 = time.time()
    model, tok = load_model()
    toks = corpus_tokens(tok)
    wins = evaluation_windows(toks, args.seq_len, args.windows)
    configs = args.configs or SWEEP
    rows = []

    def kv4(cfg):
        k, v, g, r = cfg
        c = KV4Config(k, v, g, r)
        return lambda: KV4Cache(model.config, kv4=c)

    base_tot, base_n = nll_decode(model, wins, DynamicCache, args.prefix, args.chunk)
    base = math.exp(base_tot / base_n)
    print(f"fp cache (decode, chunk {args.chunk}): ppl {base:.4f} over {base_n} tokens", flush=True)
    fq_base = None
    if not args.no_fakequant:
        t, n = nll_fakequant(model, wins, DynamicCache)
        fq_base = math.exp(t / n)
        print(f"fp single pass: ppl {fq_base:.4f}", flush=True)

    # greedy references
    gprompts = [w[:, : args.greedy_prompt_len] for w in evaluation_windows(toks, args.greedy_prompt_len + args.greedy_new,
                                                                            args.greedy_prompts, start=0.75)]
    with torch.no_grad():
        gref = [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=args.greedy_new,
                               min_new_tokens=args.greedy_new, do_sample=False, pad_token_id=0)[0, p.shape[1]:]
                for p in gprompts]

    for cfg in configs:
        t, n = nll_decode(model, wins, kv4(cfg), args.prefix, args.chunk)
        ppl = math.exp(t / n)
        row = {"key_axis": cfg[0], "value_axis": cfg[1], "group_size": cfg[2], "residual": cfg[3],
               "ppl_decode": ppl, "ratio_decode": ppl / base}
        if fq_base is not None and cfg[3] == 0:
            tf, nf = nll_fakequant(model, wins, FakeQuantCache(cfg[0], cfg[1], cfg[2]))
            row["ppl_fakequant"] = math.exp(tf / nf)
            row["ratio_fakequant"] = row["ppl_fakequant"] / fq_base
        if args.greedy_prompts:
            row["greedy_agree"], row["greedy_prefix"] = greedy_agreement(model, gprompts, kv4(cfg), gref, args.greedy_new)
        rows.append(row)
        print(json.dumps(row), flush=True)

    confirm = None
    if args.confirm and args.chunk != 1:
        cw = wins[: args.confirm_windows]
        bt, bn = nll_decode(model, cw, DynamicCache, args.prefix, 1)
        t, n = nll_decode(model, cw, kv4(args.confirm), args.prefix, 1)
        t8, n8 = nll_decode(model, cw, kv4(args.confirm), args.prefix, args.chunk)
        confirm = {"config": list(args.confirm), "windows": len(cw), "ppl_fp": math.exp(bt / bn),
                   "ppl_kv4": math.exp(t / n), "ppl_kv4_chunked": math.exp(t8 / n8)}
        confirm["ratio"] = confirm["ppl_kv4"] / confirm["ppl_fp"]
        print("pure decode confirm:", json.dumps(confirm), flush=True)

    res = {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "configs"},
           "ppl_fp_decode": base, "ppl_fp_single_pass": fq_base, "rows": rows, "confirm": confirm,
           "seconds": time.time() - t0, "torch": torch.__version__}
    os.makedirs(os.path.dirname(args.out_json) or ".", exist_ok=True)
    with open(args.out_json, "w") as f:
        json.dump(res, f, indent=2)
    md = [
        f"fp cache ppl (decode, prefix {args.prefix}, chunk {args.chunk}): **{base:.3f}**"
        + (f"; fp single pass: {fq_base:.3f}" if fq_base else ""),
        "",
        "| K axis | V axis | G | residual | ppl (decode) | x fp | ppl (fake-quant all K/V) | x fp | greedy agree | common prefix |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def f(r, k, fmt):
        return format(r[k], fmt) if k in r else "n/a"

    for r in rows:
        md.append(
            f"| {r['key_axis']} | {r['value_axis']} | {r['group_size']} | {r['residual']} | {r['ppl_decode']:.3f} | "
            f"{r['ratio_decode']:.4f} | {f(r, 'ppl_fakequant', '.3f')} | {f(r, 'ratio_fakequant', '.4f')} | "
            f"{f(r, 'greedy_agree', '.3f')} | {f(r, 'greedy_prefix', '.1f')} / {args.greedy_new} |"
        )
    if confirm:
        md += ["", f"Pure decode (chunk 1, first {confirm['windows']} windows) for {confirm['config']}: fp "
               f"{confirm['ppl_fp']:.3f}, KV4 {confirm['ppl_kv4']:.3f}, ratio **{confirm['ratio']:.4f}** "
               f"(same windows with chunk {args.chunk}: KV4 {confirm['ppl_kv4_chunked']:.3f})"]
    text = "\n".join(md)
    print(text)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
