"""Probe of the CUDA w16 GEMM's wgmma tiles (gpu_check stage ``wgmma_probe``): if their layout is
wrong, say how, so a session without a GPU can fix it.

The wgmma kernel (csrc/w16_gemm.cu, ``w16_wgmma_kernel``) was written and checked on a CPU only: its
index math against a numpy model of the PTX ISA's wgmma fragments and descriptors
(tests/test_cuda_w16_emulation.py).  What that model cannot catch is a misreading of the ISA
itself (which descriptor offset is K and which is N, the A fragment's row / k order, the D
fragment's).  This probe runs one 64-token x 128-row tile over one K block with

* one-hot activations: A'[m, p] = (m + 1) / 64 for a single half-split position p, zero elsewhere,
  and integer weights (scale 1, no offset), so y[m, n] = (m + 1) / 64 * W'[n, p] exactly in fp32.
  For every p it records which weight column q the kernel actually used (the best match of
  y[m, :] / ((m + 1) / 64) over W'[:, q]) and whether each output row m scales like token m:
  a K-side mix-up shows as q != p, a token-side one as rows that do not scale;
* random operands on every wgmma tile, split 1 and 3, against the op's reference (max error /
  max |y|, NaN count, the first wrong (m, n) positions).

Writes ``--out`` (JSON); prints a short summary.  Without an sm_90 device it writes {"skipped": why}.
"""
from __future__ import annotations

import argparse
import json

import torch


def _operands(m, n, k, seed, dt=torch.float16):
    from cometq import reference as R

    g = torch.Generator().manual_seed(seed)
    qw = R.quantize_weight_rtn(torch.randn(n, k, generator=g) * 0.05, 128, sym=False)
    a = torch.randn(m, k, generator=g).to(dt)
    return a, qw


def probe_positions(CR, dev) -> dict:
    """The one-hot probe: position p of A' -> the weight column q the kernel multiplied it with."""
    m, n, k = 64, 128, 128
    g = torch.Generator().manual_seed(0)
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scales = torch.ones(n, 1)
    # W'[n, p] in the half-split order: p < 64 the low nibble of byte p, else the high nibble of byte p - 64
    lo = (qweight & 0xF).to(torch.int32)
    hi = (qweight >> 4).to(torch.int32)
    wv = torch.cat([lo, hi], dim=1)
    wv = torch.where(wv >= 8, wv - 16, wv).float()  # [n, 128]
    tok = (torch.arange(m, dtype=torch.float32) + 1) / 64
    out = {}
    for tile in CR.W16_WGMMA_TILES:
        got_q, bad_rows, nan = [], [], 0
        for p in range(k):
            a = torch.zeros(m, k, dtype=torch.float16)
            a[:, p] = tok.half()
            y = CR.cuda_w16_gemm(a.to(dev), qweight.to(dev), scales.to(dev), None, k, None, torch.float32,
                                 split_k=1, tile=tile).cpu()
            nan += int(torch.isnan(y).sum())
            col = torch.nan_to_num(y / tok[:, None])                      # [m, n]: should be W'[n, p] per row
            dist = (col.median(dim=0).values[:, None] - wv).abs().sum(dim=0)  # vs every column q
            q = int(dist.argmin())
            got_q.append(q if float(dist[q]) == 0.0 else (q, float(dist[q])))
            rows = [int(r) for r in range(m) if not torch.equal(col[r], wv[:, q])]
            if rows:
                bad_rows.append((p, rows[:8]))
        wrong = [(p, q) for p, q in enumerate(got_q) if q != p]
        out[str(tile)] = {"positions_wrong": len(wrong), "first_wrong (p, q)": wrong[:16],
                          "rows_not_scaling (p, rows)": bad_rows[:8], "nan": nan}
    return out


def random_check(CR, dev) -> dict:
    from cometq import ops

    res = {}
    for tile in CR.W16_WGMMA_TILES:
        for (m, n, k) in ((64, 256, 512), (40, 200, 1280)):
            a, qw = _operands(m, n, k, m + n + tile)
            ref = ops._ref_w16_gemm(a, qw.qweight, qw.scales, qw.offsets, 128, None, torch.float32)
            for split in (1, 3):
                y = CR.cuda_w16_gemm(a.to(dev), qw.qweight.to(dev), qw.scales.to(dev), qw.offsets.to(dev), 128, None,
                                     torch.float32, split_k=split, tile=tile).cpu()
                err = (y.double() - ref.double()).abs()
                scale = float(ref.abs().max())
                wrong = (err > 1e-3 * scale).nonzero()[:8].tolist()
                res[f"tile={tile} M={m} N={n} K={k} split={split}"] = {
                    "rel_err": float(torch.nan_to_num(err, nan=float("inf")).max()) / scale,
                    "nan": int(torch.isnan(y).sum()), "first_wrong (m, n)": wrong}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="wgmma_probe.json")
    args = ap.parse_args()
    report: dict = {}
    if not torch.cuda.is_available():
        report["skipped"] = "no CUDA device"
    elif torch.cuda.get_device_capability() != (9, 0):
        report["skipped"] = f"not sm_90: {torch.cuda.get_device_capability()}"
    else:
        try:
            import cometq._cuda_register as CR
        except Exception as e:  # noqa: BLE001 - the extension did not build
            report["skipped"] = f"no extension: {type(e).__name__}: {str(e)[:200]}"
        else:
            dev = torch.device("cuda")
            for name, fn in (("positions", probe_positions), ("random", random_check)):
                try:
                    report[name] = fn(CR, dev)
                except Exception as e:  # noqa: BLE001 - e.g. an illegal instruction: report it, stop
                    report[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                    break
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    for key, val in report.items():
        print(key, json.dumps(val)[:600])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
