"""Do the CUDA extension's TORCH_CHECKs raise, or crash the process?

Calls the raw ops ``torch.ops.cometq_C.*`` with bad inputs; each must raise RuntimeError
with the expected phrase.  On the lent H100's image (2026-11-27) every such call killed the
process with SIGSEGV, so run this in a child process (tests/test_cuda_ops.py does, and
bench/gpu_check.sh's ``toolchain`` stage runs it against the built library and against one
whose bindings were compiled by another C++ compiler).

    python bench/diag_raw_errors.py                  # the installed cometq._C
    python bench/diag_raw_errors.py --library X.so   # a library built elsewhere (loaded alone)

Prints ``CALL <case>`` before each call (the last one printed names a crash) and
``ALL RAISED`` at the end; exit status 0 iff every case raised as expected.
"""
import argparse
import sys

import torch


def cases():
    f = torch.ops.cometq_C.quantize_act
    g = torch.ops.cometq_C.w4ax_gemm
    d = "cuda"
    x = torch.randn(3, 576, device=d)
    perm = torch.randperm(576, device=d)
    bits = torch.tensor([8, 4, 8, 4, 8], dtype=torch.int32, device=d)
    q4 = torch.zeros(3, 128, dtype=torch.uint8, device=d)  # 2 INT4 blocks
    q8 = torch.zeros(3, 384, dtype=torch.int8, device=d)  # 3 INT8 blocks
    a_s = torch.ones(3, 5, device=d)
    qw = torch.zeros(24, 320, dtype=torch.uint8, device=d)
    ws = torch.ones(24, 5, device=d)
    return [
        ("x must be 2-D", lambda: f(x[0], perm, bits, 3, 0, 1.0)),
        ("perm must have dtype", lambda: f(x, perm.int(), bits, 3, 0, 1.0)),
        ("block_bits shape", lambda: f(x, perm, bits[:-1], 3, 0, 1.0)),
        ("n_int8=9", lambda: f(x, perm, bits, 9, 0, 1.0)),
        ("x must be float16, bfloat16 or float32", lambda: f(x.double(), perm, bits, 3, 0, 1.0)),
        ("int4_clip must be in (0, 1], got int4_clip=nan", lambda: f(x, perm, bits, 3, 0, float("nan"))),
        ("q4 must have dtype", lambda: g(q4.view(torch.int8), q8, a_s, bits, qw, ws, None, 128, None,
                                         torch.float16, 0, 0, 0)),
        ("block-major view", lambda: g(q4, q8, a_s, bits, qw.view(24, 5, 64), ws, None, 128, None,
                                       torch.float16, 0, 0, 0)),
        ("group_size=48", lambda: g(q4, q8, a_s, bits, qw, ws, None, 48, None, torch.float16, 0, 0, 0)),
        ("tile must be 0 (by M) or 1", lambda: g(q4, q8, a_s, bits, qw, ws, None, 128, None, torch.float16, 0, 0, 0,
                                                  2)),
        ("cometq_C::fake_quant_act: out_dtype must be float16", lambda: torch.ops.cometq_C.fake_quant_act(
            x, perm, bits, 3, 0, 1.0, torch.int8)),
        ("cometq_C::fake_quant_act: n_int8=9", lambda: torch.ops.cometq_C.fake_quant_act(
            x, perm, bits, 9, 0, 1.0, torch.float16)),
        ("needs M <= 64, got M=65", lambda: g(q4.new_zeros(65, 128), q8.new_zeros(65, 384), a_s.new_ones(65, 5), bits,
                                              qw, ws, None, 128, None, torch.float16, 0, 0, 0, 1)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--library", help="load this shared library instead of importing cometq._C")
    args = ap.parse_args(argv)
    if args.library:
        torch.ops.load_library(args.library)
    else:
        import cometq._cuda_register  # noqa: F401  (loads cometq._C)
    bad = 0
    for want, fn in cases():
        print("CALL", want, flush=True)
        try:
            fn()
        except RuntimeError as e:
            if want not in str(e):
                print(f"  wrong message: {str(e)[:300]}", flush=True)
                bad += 1
            continue
        print("  no error raised", flush=True)
        bad += 1
    if bad:
        print(f"{bad} case(s) did not raise as expected")
        return 1
    print("ALL RAISED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
