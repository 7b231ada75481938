"""GPTQ (Frantar et al., 2022) for INT4 weights, per channel or per group, symmetric or asymmetric.

Produces a :class:`cometq.reference.QuantizedWeight` in the same format as
:func:`cometq.reference.quantize_weight_rtn`: ``qweight`` uint8 ``[N, K_pad/2]``,
``scales`` float32 ``[N, K_pad/G]``; symmetric: values in [-7, 7], scale = absmax * clip / 7;
asymmetric (``sym=False``): values in [-8, 7] plus ``offsets`` (the grid of
:func:`cometq.reference.asym_group_params`).

Algorithm: columns are quantized left to right; the rounding error of column i
is spread over the not-yet-quantized columns with the inverse Hessian's
Cholesky factor (``H = 2/n X^T X`` of the layer input, damped by
``damp * mean(diag H)``), in lazy-update blocks of 128 columns.

Group scales are taken when the quantizer enters a group, from the columns as
updated so far (as in the GPTQ reference code).  ``act_order`` (off by default:
the FMPQ sort already orders the columns by magnitude) processes columns by
decreasing Hessian diagonal with *static* groups: every scale is fixed up front
from the original weight in stored column order, so the stored format keeps
group g = columns [g*G, (g+1)*G).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as R
from .layout import INT4_QMAX, check_tensor, pack_int4, pad_last_dim, padded_k

__all__ = ["gptq_quantize", "MSE_RATIOS"]

_BLOCK = 128


def _params(w: torch.Tensor, clip_ratio: float, sym: bool, real: torch.Tensor):
    """Per-row (scale, offset or None) of a column slice ``w [N, g]``; ``real [g]`` marks non-padding columns."""
    if sym:
        return w.abs().amax(dim=1) * clip_ratio / INT4_QMAX, None
    return R.asym_group_params(w, real, clip_ratio)


#: Range shrink factors tried per (row, group) by ``gptq_quantize(mse=True)``.
MSE_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(9))  # 1.0 .. 0.8


def _params_mse(w: torch.Tensor, clip_ratio: float, sym: bool, real: torch.Tensor, col_w: torch.Tensor):
    """Like :func:`_params` but, per row, the range shrink of :data:`MSE_RATIOS` (times
    ``clip_ratio``) with the least ``sum_j col_w[j] * (deq(q(w_j)) - w_j)^2`` over real columns."""
    best_s = best_o = best_e = None
    wt = col_w * real.to(w.dtype)
    for r in MSE_RATIOS:
        s, o = _params(w, clip_ratio * r, sym, real)
        q = _q(w, s[:, None], None if o is None else o[:, None])
        d = q * s[:, None] if o is None else q * s[:, None] + o[:, None]
        e = ((d - w) ** 2 * wt).sum(dim=1)
        if best_e is None:
            best_s, best_o, best_e = s, o, e
            continue
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, s, best_s)
        if o is not None:
            best_o = torch.where(better, o, best_o)
    return best_s, best_o


def _q(w: torch.Tensor, s: torch.Tensor, o: Optional[torch.Tensor]) -> torch.Tensor:
    if o is not None:
        return R.asym_round(w, s, o)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return torch.round(w / safe).clamp_(-INT4_QMAX, INT4_QMAX)


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    group_size: Optional[int] = 128,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    clip_ratio: float = 1.0,
    sym: bool = True,
    mse: bool = False,
) -> R.QuantizedWeight:
    """GPTQ-quantize ``w [N, K]`` (stored column order) given ``hessian [K, K]`` (same order).

    ``mse``: each group's range (symmetric absmax, or asymmetric min/max around
    their midpoint) is shrunk by the factor of :data:`MSE_RATIOS` with the least
    rounding error of the group, each column weighted by GPTQ's own cost of an
    error there (``1 / [H^-1]_jj`` from the Cholesky factor of the inverse).  Not
    with ``act_order``: its static ranges are fixed before GPTQ updates the
    columns, and shrinking them then clips the updated weights (measured worse)."""
    check_tensor("weight", w, dtypes=R.FLOAT_DTYPES, ndim=2)
    check_tensor("hessian", hessian, dtypes=R.FLOAT_DTYPES + (torch.float64,), ndim=2)
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(w.shape)}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} must be ({k}, {k}) for weight shape {tuple(w.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian has non-finite entries")
    if not (0.0 < float(damp) < 1.0):
        raise ValueError(f"damp must be in (0, 1), got {damp}")
    if not (0.0 < float(clip_ratio) <= 1.0):
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    if mse and act_order:
        raise ValueError("mse=True picks each group's range when GPTQ reaches it; act_order=True fixes the ranges up "
                         "front (shrinking those clips the updated weights): use one of them")
    k_pad = padded_k(k)
    g = R.check_group_size(group_size, k_pad)
    dev = w.device

    W = pad_last_dim(w.float(), k_pad).clone()
    H = torch.zeros(k_pad, k_pad, dtype=torch.float64, device=dev)
    H[:k, :k] = hessian.double()
    dead = torch.diagonal(H) == 0  # padding columns and channels never active
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += float(damp) * torch.mean(torch.diagonal(H)) * torch.eye(k_pad, dtype=torch.float64, device=dev)

    n_groups = k_pad // g
    real = R.real_columns_mask(k, k_pad, g, dev)  # [n_groups, g]
    scales = torch.zeros(n, n_groups, dtype=torch.float32, device=dev)
    offsets = None if sym else torch.zeros(n, n_groups, dtype=torch.float32, device=dev)
    order = None
    if act_order:
        # static groups: scales (and offsets) from the original weight, stored order
        if sym:
            scales = _params(W.view(n, n_groups, g).reshape(n * n_groups, g), clip_ratio, True, None)[0].view(n, n_groups)
        else:
            scales, offsets = R.asym_group_params(W.view(n, n_groups, g), real, clip_ratio)
        order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, order]
        H = H[order][:, order]

    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True).float()

    Q = torch.zeros_like(W)
    for i1 in range(0, k_pad, _BLOCK):
        i2 = min(i1 + _BLOCK, k_pad)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if order is None:
                gi = col // g
                if col % g == 0:
                    # entering a group: its columns as updated so far. A group of
                    # <=128 lies in this block (W1); a larger one starts at the block
                    # start where W[:, i1:] is fully updated.
                    grp = W1[:, i : i + g] if g <= _BLOCK else W[:, col : col + g]
                    if mse:
                        dg = torch.diagonal(Hinv)[col : col + g]
                        sc, of = _params_mse(grp, clip_ratio, sym, real[gi], 1.0 / (dg * dg))
                    else:
                        sc, of = _params(grp, clip_ratio, sym, real[gi])
                    scales[:, gi] = sc
                    if of is not None:
                        offsets[:, gi] = of
            else:
                gi = int(order[col]) // g
            s = scales[:, gi]
            o = None if offsets is None else offsets[:, gi]
            wc = W1[:, i]
            q = _q(wc, s, o)
            Q1[:, i] = q
            d = Hinv1[i, i]
            err = (wc - (q * s if o is None else q * s + o)) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]

    if order is not None:
        inv = torch.empty_like(order)
        inv[order] = torch.arange(k_pad, device=dev)
        Q = Q[:, inv]
    Q[:, k:] = 0
    qweight = pack_int4(Q.to(torch.int8))
    return R.QuantizedWeight(qweight, scales.contiguous(), k, -1 if group_size in (None, -1) else group_size,
                             None if offsets is None else offsets.contiguous())

