"""Driver for an Nsight Compute look at the decode GEMMs (gpu_check stage ``ncu_w16``).

H200 run 10 measured the w16 GEMMs at M = 64 at ~200 TFLOP/s -- a third of the f16 ``mma.sync``
peak, far above the 4-bit weight-byte floor -- with a handful of warps per SM: latency-bound by
the numbers, but which stall (shared-memory loads, the dequant chain, the MMA pipe, the
``__syncthreads`` per K block) is for the profiler to say.  This script launches the CUDA w16
GEMM (each tile variant, no split) and the Triton w16 GEMM (its default config) a few times at
8B.gate_up and 8B.o, M = 64, asymmetric g128 weights, so that

    ncu --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section SpeedOfLight -k regex:w16_gemm python bench/diag_ncu_w16.py

profiles each kernel.  Random operands (the values do not change the instruction stream).
Without ncu it just runs (a smoke test of the launches)."""
from __future__ import annotations

import argparse

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-attention", action="store_true", help="only the w16 GEMMs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to profile")
        return 0
    from cometq.kernels.w16_gemm import w16_config, w16_gemm

    try:
        import cometq._cuda_register as CR

        has_cuda = CR.HAS_W16
    except Exception:  # noqa: BLE001 - the Triton kernel alone then
        CR, has_cuda = None, False
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    for name, n, k in (("8B.gate_up", 28672, 4096), ("8B.o", 4096, 4096)):
        a = torch.randn(args.m, k, device=dev, generator=g).half()
        qw = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8, generator=g)
        sc = torch.rand(n, k // 128, device=dev, generator=g) * 0.01
        off = torch.randn(n, k // 128, device=dev, generator=g) * 0.01
        nb = k // 128
        cfg = w16_config(args.m, n, nb, torch.cuda.get_device_properties(0).multi_processor_count)
        for _ in range(args.reps):
            w16_gemm(a, qw, sc, off, 128, None, torch.float16, config=cfg)
            if has_cuda:
                for tile in CR.w16_tiles(dev, 128):
                    CR.cuda_w16_gemm(a, qw, sc, off, 128, None, torch.float16, split_k=1, tile=tile)
        torch.cuda.synchronize()
        print(f"{name}: M={args.m} N={n} K={k}: triton config {cfg}, cuda tiles "
              f"{list(CR.w16_tiles(dev, 128)) if has_cuda else 'none'}")
    if has_cuda and not args.no_attention:
        kv4_attention(CR, args.reps)
    return 0


def kv4_attention(CR, reps: int) -> None:
    """The CUDA KV4 decode attention kernel at #6's target row (batch 16, context 4096, 32 / 8 heads,
    head_dim 128, key group 32: bench_attention.py's defaults), every launch variant at the default
    split count: H200 run 10 timed it at 0.0572 ms, ~1.2 TB/s of the pool's bytes -- a quarter of
    the HBM rate, with ~500 SASS instructions per 16 tokens and warp: the stall reasons say why."""
    import importlib.util
    import os

    from cometq.paged import default_num_splits

    spec = importlib.util.spec_from_file_location("bench_attention", os.path.join(os.path.dirname(__file__),
                                                                                  "bench_attention.py"))
    BA = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(BA)
    b, t, hq, h, d, bs, grp = 16, 4096, 32, 8, 128, 64, 32
    pool = BA.build_pool(b, t, h, d, bs, grp, "channel", "token", "cuda")
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.float16)
    splits = default_num_splits(b, h, -(-t // bs))
    raw = (q, pool["k_packed"], pool["k_scale"], pool["k_zero"], pool["v_packed"], pool["v_scale"], pool["v_zero"],
           pool["tail_k"], pool["tail_v"], pool["block_tables"], pool["quant_lens"], pool["tail_lens"],
           pool["seq_ids"], grp, "channel", "token", d ** -0.5, splits)
    for _ in range(reps):
        for var in CR.kv4_attention_variants():
            CR.cuda_kv4_decode_attention(*raw, variant=var)
    torch.cuda.synchronize()
    print(f"kv4 attention: batch {b} context {t} splits {splits} variants {list(CR.kv4_attention_variants())}")


if __name__ == "__main__":
    raise SystemExit(main())
