#!/usr/bin/env python
"""Decode attention benchmark: cometq KV4 paged kernel vs torch SDPA over fp16 K/V.

Shapes (Llama-3-8B-like attention): 32 query heads, 8 KV heads, head_dim 128,
one query token per sequence; batch {1, 16, 64} x context {1k, 4k, 16k} by
default.  The KV4 pool is filled with random packed data and scales (block
tables shuffled so sequences are scattered over the pool, as in serving); the
SDPA baseline gets contiguous fp16 K/V ``[B, 8, T, 128]`` with ``enable_gqa``.

Reported per shape: time (ms, triton.testing.do_bench median) of the Triton
launcher and of the same call through ``torch.ops.cometq`` (adds Python-side
argument checks), achieved GB/s (from the launcher time)
of the K/V bytes each method must read (KV4: packed nibbles + fp16 scale/zero;
SDPA: fp16 K and V), and the speedup.  Before timing, the kernel is checked
against SDPA over the dequantized K/V on the smallest shape.
Target: >= 3x over SDPA at batch 16, context 4096 (H100).

Also timed when the CUDA extension is built and handles the pool format: the CUDA kernel
(csrc/kv4_attention.cu, column ``cuda``: the best of 1x / 2x / 4x the split count and the one-wave
count x its four launch
variants, each recorded in ``cuda_sweep`` as "splits/v<variant>"), after the same correctness check (a CUDA kernel that fails it is reported
in the JSON and not timed; the Triton columns still are).

    python bench/bench_attention.py --out bench/results/attention   # writes .json, .md, .png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def _parse_list(s):
    return [int(x) for x in s.split(",") if x]


def build_pool(b, t, kv_heads, d, block_size, group, key_axis, value_axis, device, seed=0):
    import torch

    from cometq.paged import pool_scale_shape

    g = torch.Generator(device=device).manual_seed(seed)
    per_seq = -(-t // block_size)
    nb = b * per_seq
    kp = torch.randint(0, 256, (nb, kv_heads, block_size, d // 2), dtype=torch.uint8, device=device, generator=g)
    vp = torch.randint(0, 256, (nb, kv_heads, block_size, d // 2), dtype=torch.uint8, device=device, generator=g)

    def sz(axis):  # scale ~ range/15 of unit-variance data, zero ~ -range/2
        shape = pool_scale_shape(axis, nb, kv_heads, block_size, d, group)
        sc = (torch.rand(shape, device=device, generator=g) * 0.1 + 0.3).half()
        return sc, (-7.5 * sc.float() + 0.1 * torch.randn(shape, device=device, generator=g)).half()

    ks, kz = sz(key_axis)
    vs, vz = sz(value_axis)
    perm = torch.randperm(nb, device=device, generator=g).to(torch.int32)
    tables = perm.view(b, per_seq).contiguous()
    qlens = torch.full((b,), t, dtype=torch.int32, device=device)
    tail_g = group if "channel" in (key_axis, value_axis) else 0
    tk = torch.zeros(b, kv_heads, tail_g, d, dtype=torch.float16, device=device)
    tv = torch.zeros_like(tk)
    tlens = torch.zeros(b, dtype=torch.int32, device=device)
    sids = torch.arange(b, dtype=torch.int32, device=device)
    return dict(k_packed=kp, k_scale=ks, k_zero=kz, v_packed=vp, v_scale=vs, v_zero=vz, tail_k=tk, tail_v=tv,
                block_tables=tables, quant_lens=qlens, tail_lens=tlens, seq_ids=sids)


def kv4_bytes(pool, b, t):
    per_tok = 0
    for name in ("k_packed", "v_packed", "k_scale", "k_zero", "v_scale", "v_zero"):
        x = pool[name]
        per_tok += x.numel() * x.element_size() / (x.shape[0] * pool["k_packed"].shape[2])
    return per_tok * math.ceil(t / pool["k_packed"].shape[2]) * pool["k_packed"].shape[2] * b


def dequant_pool(pool, b, t, group, key_axis, value_axis):
    """fp16 [B, H, T, D] K and V of a benchmark pool (for the correctness check)."""
    import torch

    from cometq.paged import _gather_kv4

    ks, vs = [], []
    for i in range(b):
        blocks = pool["block_tables"][i].tolist()
        ks.append(_gather_kv4(pool["k_packed"], pool["k_scale"], pool["k_zero"], blocks, t, group, key_axis))
        vs.append(_gather_kv4(pool["v_packed"], pool["v_scale"], pool["v_zero"], blocks, t, group, value_axis))
    return torch.stack(ks).half(), torch.stack(vs).half()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=_parse_list, default=[1, 16, 64])
    ap.add_argument("--context", type=_parse_list, default=[1024, 4096, 16384])
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--key-axis", default="channel")
    ap.add_argument("--value-axis", default="token")
    ap.add_argument("--splits", type=int, default=0, help="split-K partitions (0 = cometq.paged.default_num_splits)")
    ap.add_argument("--out", default="bench/results/attention", help="output prefix (.json, .md, .png)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="also time every launch config the tuner considers (warps x tile) at 0.5x..8x the default "
                         "split count, per shape (JSON 'sweep', a markdown table)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU smoke run under the Triton interpreter (tiny shapes, one call per timing): checks the "
                         "script, not the speed")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        args.batch, args.context = [2], [80]
        args.q_heads, args.kv_heads, args.head_dim, args.block_size, args.group_size = 8, 2, 32, 16, 16

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.",
              file=sys.stderr)
        return 2
    import triton.testing

    from cometq import ops
    from cometq.kernels.kv4_attention import (attention_configs, fold_k_eligible, kv4_decode_attention_triton,
                                              last_config)
    from cometq.paged import default_num_splits

    dev = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        class props:  # noqa: N801 - stands in for the CUDA device properties
            name, multi_processor_count = "cpu (dry run: Triton interpreter, times are meaningless)", 132
    else:
        props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count

    def bench(fn):
        if args.dry_run:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    act_dtype = torch.float32 if args.dry_run else torch.float16
    hq, h, d = args.q_heads, args.kv_heads, args.head_dim
    sm_scale = d ** -0.5
    rows = []

    def raw_args(pool, q, splits):
        return (q, pool["k_packed"], pool["k_scale"], pool["k_zero"], pool["v_packed"], pool["v_scale"],
                pool["v_zero"], pool["tail_k"], pool["tail_v"], pool["block_tables"], pool["quant_lens"],
                pool["tail_lens"], pool["seq_ids"], args.group_size, args.key_axis, args.value_axis, sm_scale, splits)

    def kv4_call(pool, q, splits):
        return ops.kv4_decode_attention(
            q, pool["k_packed"], pool["k_scale"], pool["k_zero"], pool["v_packed"], pool["v_scale"], pool["v_zero"],
            pool["tail_k"], pool["tail_v"], pool["block_tables"], pool["quant_lens"], pool["tail_lens"],
            pool["seq_ids"], args.group_size, args.key_axis, args.value_axis, sm_scale, splits, backend="triton")

    fold_ok = fold_k_eligible(args.key_axis, args.group_size)
    cuda_attn, cuda_note = None, "not tried (dry run)"
    if not args.dry_run:
        try:
            import cometq._cuda_register as CR

            cuda_attn, cuda_note = CR.cuda_kv4_decode_attention, None
        except ImportError as e:
            cuda_note = f"CUDA extension not available: {str(e)[:200]}"
    if not args.no_check:
        b, t = 2, 1000
        pool = build_pool(b, t, h, d, args.block_size, args.group_size, args.key_axis, args.value_axis, dev)
        q = torch.randn(b, hq, d, device=dev, dtype=act_dtype)
        k, v = dequant_pool(pool, b, t, args.group_size, args.key_axis, args.value_axis)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float(),
                                                               enable_gqa=True)[:, :, 0]
        for splits in (1, 4):
            out = kv4_call(pool, q, splits).float()
            err = float((out - ref).abs().max())
            print(f"check B={b} T={t} splits={splits}: max |kv4 - sdpa(dequant)| = {err:.2e}")
            if fold_ok:  # the folded-key variant is checked too before it is timed
                raw = (q, pool["k_packed"], pool["k_scale"], pool["k_zero"], pool["v_packed"], pool["v_scale"],
                       pool["v_zero"], pool["tail_k"], pool["tail_v"], pool["block_tables"], pool["quant_lens"],
                       pool["tail_lens"], pool["seq_ids"], args.group_size, args.key_axis, args.value_axis,
                       sm_scale, splits)
                err = max(err, float((kv4_decode_attention_triton(*raw, fold_k=True).float() - ref).abs().max()))
                print(f"check B={b} T={t} splits={splits} fold_k: max |kv4 - sdpa(dequant)| = {err:.2e}")
            if not err < 2e-2:
                print("correctness check FAILED; not benchmarking", file=sys.stderr)
                return 1
            if cuda_attn is not None:
                try:
                    e_cuda = float((cuda_attn(*raw_args(pool, q, splits)).float() - ref).abs().max())
                except ValueError as e:  # a pool format the CUDA kernel does not handle
                    cuda_attn, cuda_note = None, f"not run: {e}"
                    continue
                print(f"check B={b} T={t} splits={splits} cuda: max |kv4 - sdpa(dequant)| = {e_cuda:.2e}")
                if not e_cuda < 2e-2:
                    cuda_attn, cuda_note = None, f"correctness check FAILED (max error {e_cuda:.2e}): not timed"
                    print(f"CUDA kernel: {cuda_note}", file=sys.stderr)

    for b in args.batch:
        for t in args.context:
            torch.cuda.empty_cache()
            pool = build_pool(b, t, h, d, args.block_size, args.group_size, args.key_axis, args.value_axis, dev)
            q = torch.randn(b, hq, d, device=dev, dtype=act_dtype)
            splits = args.splits or default_num_splits(b, h, -(-t // args.block_size), sms)
            args_raw = (q, pool["k_packed"], pool["k_scale"], pool["k_zero"], pool["v_packed"], pool["v_scale"],
                        pool["v_zero"], pool["tail_k"], pool["tail_v"], pool["block_tables"], pool["quant_lens"],
                        pool["tail_lens"], pool["seq_ids"], args.group_size, args.key_axis, args.value_axis,
                        sm_scale, splits)
            ms_kv4 = bench(lambda: kv4_decode_attention_triton(*args_raw, fold_k=False))
            cfg_used = last_config()  # tuned on the first call (or the untuned default)
            sweep = []
            if args.sweep:
                nblk = -(-t // args.block_size)
                for cfg in attention_configs(args.block_size, args.group_size, False, args.key_axis, args.value_axis):
                    for ns in sorted({max(1, splits // 2), splits, min(nblk, 64, splits * 2), min(nblk, 64, splits * 4),
                                      min(nblk, 64, splits * 8)}):
                        raw = args_raw[:-1] + (ns,)
                        try:
                            ms = bench(lambda: kv4_decode_attention_triton(*raw, config=cfg, fold_k=False))
                        except Exception as e:  # noqa: BLE001 - e.g. out of resources: reported, not fatal
                            sweep.append(dict(num_warps=cfg.num_warps, tile=cfg.tile, lazy=cfg.lazy, splits=ns,
                                              error=f"{type(e).__name__}: {str(e)[:200]}"))
                            continue
                        sweep.append(dict(num_warps=cfg.num_warps, tile=cfg.tile, lazy=cfg.lazy, splits=ns, ms=ms))
            ms_fold = bench(lambda: kv4_decode_attention_triton(*args_raw, fold_k=True)) if fold_ok else None
            cuda_sweep = {}
            if cuda_attn is not None:
                nblk = -(-t // args.block_size)
                # launch variants: 4 CTAs / SM; 3 CTAs / SM + next tile in registers; either + the next
                # key group prefetched into L2; 4 CTAs / SM streaming tiles through a shared-memory ring
                for var in CR.kv4_attention_variants():
                    # 1x / 2x / 4x the split count, and the count whose grid is one full wave of the
                    # variant's resident CTAs (what COMETQ_KV4_ATTN_CUDA=auto times too)
                    wave = CR.kv4_attention_wave_splits(b, args.kv_heads, var, props.multi_processor_count)
                    for ns in sorted({splits, min(4 * nblk, 1024, 2 * splits), min(4 * nblk, 1024, 4 * splits),
                                      wave}):
                        raw = args_raw[:-1] + (ns,)
                        cuda_sweep[f"{ns}/v{var}"] = bench(lambda: cuda_attn(*raw, variant=var))
            ms_cuda = min(cuda_sweep.values()) if cuda_sweep else None
            ms_kv4_op = bench(lambda: kv4_call(pool, q, splits))
            kb4 = kv4_bytes(pool, b, t)
            del pool
            k = torch.randn(b, h, t, d, device=dev, dtype=act_dtype)
            v = torch.randn_like(k)
            q4 = q[:, :, None]
            gqa = True
            try:
                torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
                sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True)  # noqa: E731
            except Exception:  # noqa: BLE001 - older torch: expand heads outside the timed region
                gqa = False
                ke, ve = k.repeat_interleave(hq // h, 1), v.repeat_interleave(hq // h, 1)
                sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q4, ke, ve)  # noqa: E731
            ms_sdpa = bench(sdpa)
            kb16 = 2 * b * h * t * d * 2
            # the FP16 serving baseline's kernel (cometq::paged_decode_attention, Triton) on the
            # same K/V in a paged fp16 cache [slots, Hkv, D] (blocks of one sequence contiguous)
            from cometq.kernels.paged_attention import paged_decode_attention_triton

            nblk16 = -(-t // args.block_size)
            kc = torch.zeros(b * nblk16 * args.block_size, h, d, device=dev, dtype=act_dtype)
            vc = torch.zeros_like(kc)
            kc.view(b, nblk16 * args.block_size, h, d)[:, :t] = k.transpose(1, 2)
            vc.view(b, nblk16 * args.block_size, h, d)[:, :t] = v.transpose(1, 2)
            bt16 = torch.arange(b * nblk16, device=dev, dtype=torch.int32).view(b, nblk16)
            lens16 = torch.full((b,), t, device=dev, dtype=torch.int32)
            ms_fp16_paged = bench(lambda: paged_decode_attention_triton(q, kc, vc, bt16, lens16, args.block_size,
                                                                        1.0 / math.sqrt(d), 0))
            del k, v, kc, vc
            row = dict(batch=b, context=t, splits=splits, ms_kv4=ms_kv4, ms_kv4_op=ms_kv4_op, ms_sdpa=ms_sdpa, speedup=ms_sdpa / ms_kv4,
                       ms_kv4_fold=ms_fold, speedup_fold=(ms_sdpa / ms_fold) if ms_fold else None,
                       gbs_kv4=kb4 / ms_kv4 / 1e6, gbs_sdpa=kb16 / ms_sdpa / 1e6, kv_bytes_kv4=kb4, kv_bytes_fp16=kb16,
                       sdpa_enable_gqa=gqa, ms_cuda=ms_cuda, speedup_cuda=(ms_sdpa / ms_cuda) if ms_cuda else None,
                       gbs_cuda=(kb4 / ms_cuda / 1e6) if ms_cuda else None,
                       ms_fp16_paged=ms_fp16_paged, gbs_fp16_paged=kb16 / ms_fp16_paged / 1e6,
                       cuda_splits=min(cuda_sweep, key=cuda_sweep.get) if cuda_sweep else None,
                       cuda_sweep=cuda_sweep,
                       config=None if cfg_used is None else dict(num_warps=cfg_used.num_warps, tile=cfg_used.tile,
                                                                 lazy=cfg_used.lazy))
            if sweep:
                for x in sweep:
                    if "ms" in x:
                        x["speedup"] = ms_sdpa / x["ms"]
                row["sweep"] = sweep
            rows.append(row)
            print(json.dumps(row), flush=True)

    meta = dict(device=props.name, sms=sms, torch=torch.__version__, triton=triton.__version__, q_heads=hq, kv_heads=h,
                head_dim=d, block_size=args.block_size, group_size=args.group_size, key_axis=args.key_axis,
                value_axis=args.value_axis, time=time.strftime("%Y-%m-%d %H:%M:%S"), cuda_kernel=cuda_note or "timed")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    from cometq.kernels.kv4_attention import tuned_configs

    meta["launch_configs_chosen"] = tuned_configs()  # per shape class: what the tuner (or the default) picked
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    md = [f"Decode attention on {props.name}: {hq} q heads / {h} kv heads, head_dim {d}, KV4 K {args.key_axis} / "
          f"V {args.value_axis}, G={args.group_size}, block {args.block_size} (torch {torch.__version__}, "
          f"triton {triton.__version__})", "",
          "| batch | context | splits | config (warps/tile/lazy) | KV4 kernel ms | KV4 via torch op ms | SDPA fp16 ms "
          "| speedup | KV4 GB/s | SDPA GB/s | KV4 fold_k ms | fold_k speedup | CUDA kernel ms (splits) | CUDA speedup "
          "| FP16 paged (baseline kernel) ms | its GB/s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fold = (f"{r['ms_kv4_fold']:.4f} | {r['speedup_fold']:.2f}x" if r.get("ms_kv4_fold") else "– | –")
        c = r.get("config")
        cs = f"{c['num_warps']}/{c['tile']}/{'lazy' if c['lazy'] else 'eager'}" if c else "–"
        cu = (f"{r['ms_cuda']:.4f} ({r['cuda_splits']}) | {r['speedup_cuda']:.2f}x" if r.get("ms_cuda")
              else "– | –")
        md.append(f"| {r['batch']} | {r['context']} | {r['splits']} | {cs} | {r['ms_kv4']:.4f} | {r['ms_kv4_op']:.4f} | "
                  f"{r['ms_sdpa']:.4f} | {r['speedup']:.2f}x | {r['gbs_kv4']:.0f} | {r['gbs_sdpa']:.0f} | {fold} | {cu} | "
                  f"{r['ms_fp16_paged']:.4f} | {r['gbs_fp16_paged']:.0f} |")
    if cuda_note:
        md += ["", f"CUDA kernel (csrc/kv4_attention.cu): {cuda_note}"]
    if any(r.get("sweep") for r in rows):
        md += ["", "Launch-config sweep (KV4 kernel ms; warps / tokens per tile / lazy rescale x splits; "
               "the config the tuner picked for the main row is marked *):", "",
               "| batch | context | warps | tile | lazy | splits | ms | speedup vs SDPA |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            for x in r.get("sweep", []):
                pick = r.get("config") == dict(num_warps=x["num_warps"], tile=x["tile"], lazy=x["lazy"]) \
                    and x["splits"] == r["splits"]
                ms = f"{x['ms']:.4f}{' *' if pick else ''} | {x['speedup']:.2f}x" if "ms" in x else f"{x['error']} | –"
                md.append(f"| {r['batch']} | {r['context']} | {x['num_warps']} | {x['tile']} | {x['lazy']} | "
                          f"{x['splits']} | {ms} |")
    text = "\n".join(md)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        print("matplotlib not installed: skipping the plot")
        return 0
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"B{r['batch']}\n{r['context'] // 1024}k" for r in rows]
    xs = list(range(len(rows)))
    if any(r.get("speedup_cuda") for r in rows):
        ax.bar([x - 0.2 for x in xs], [r["speedup"] for r in rows], width=0.4, label="Triton")
        ax.bar([x + 0.2 for x in xs], [r.get("speedup_cuda") or 0 for r in rows], width=0.4, label="CUDA")
    else:
        ax.bar(xs, [r["speedup"] for r in rows])
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(3.0, color="red", lw=0.8, ls="--", label="target 3x")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("speedup vs SDPA fp16")
    ax.set_title(f"KV4 decode attention, {props.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"wrote {args.out}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
