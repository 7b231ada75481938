"""Split-K count (and tile variant) of the CUDA W4Ax GEMM at small M, chosen by timing.

The kernel's built-in rule (``cometq_gemm_choose_split`` in csrc/w4ax_gemm.cu) splits K
only until the output tiles cover one wave of *one* CTA per SM (M > 16), or ~2 waves
(M <= 16).  It cannot know how latency-bound a K block is or how many CTAs an SM holds:
on the H100 the 64 x 64 tile fits 3 CTAs per SM (shared memory), and run 5 (2026-11-27,
M = 64, CUDA-graph replay) had 8B.o as 64 tiles x 3 splits = 192 CTAs for 396 resident
slots, 8B.gate_up as 448 unsplit CTAs = 1.13 waves of them -- and both below cuBLAS FP16.
The best count depends on the GPU and the kernel version, so like the Triton kernel's
configs (``cometq.kernels.w4ax_gemm.select_config``) it is measured: the first call of a
shape (per ``cometq.autotune`` timing mode: eager, or CUDA-graph replays inside the
serving runner's graph warm-ups) times a few counts and keeps the fastest.

The same measurement picks the tile variant for 16 < M <= 64: the 64 x 64 tile with 4 pipeline
stages (3 CTAs per SM: shared memory) or with 3 stages (4 CTAs per SM: 16 warps instead of 12,
one block less prefetched per CTA).  Their K loops are the same code, so which one wins is
latency hiding vs prefetch depth -- a measurement.  A choice is a ``(split, tile)`` pair.

Cheap (no compile: the split count and the tile are launch arguments), so it stays on when
``COMETQ_GEMM_TUNE=0`` skips the Triton configs' tuning; ``COMETQ_CUDA_SPLIT_TUNE=0``
turns it off (the kernel's rule then decides, as before).  Never tunes while frozen
(``autotune.frozen``), tracing or capturing.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["TUNE_MAX_M", "SPLIT_CHOICES", "ENV_TUNE", "DEFAULT_CHOICE", "split_candidates", "split_key",
           "choose_split", "tuning_enabled", "tuned_split", "tuned_choice", "clear"]

#: largest M whose split count is tuned (the decode buckets; larger M fills the GPU with tiles)
TUNE_MAX_M = 64
#: counts tried besides 0 (= the kernel's own rule), kept to those leaving >= 2 K blocks per split
SPLIT_CHOICES = (1, 2, 3, 4, 6, 8)
ENV_TUNE = "COMETQ_CUDA_SPLIT_TUNE"
#: (split, tile): the kernel's split rule on the tile chosen by M -- what runs untuned
DEFAULT_CHOICE = (0, 0)
#: smallest M offered the 3-stage 64 x 64 tile (M <= 16 runs the 16-row tile)
MID3_MIN_M = 17

Choice = Tuple[int, int]
_CACHE: Dict[tuple, Choice] = {}


def tuning_enabled() -> bool:
    return os.environ.get(ENV_TUNE, "1") != "0"


def split_candidates(m: int, n_blocks: int) -> List[Choice]:
    """``(split, tile)`` choices to time for an ``m``-row GEMM over ``n_blocks`` K blocks: split 0
    (the kernel's rule) first, then :data:`SPLIT_CHOICES` with at least two K blocks per split, on
    the tile by M (tile 0); for ``MID3_MIN_M <= m <= TUNE_MAX_M`` the same counts again on the
    3-stage 64 x 64 tile (tile 1).  ``[DEFAULT_CHOICE]`` above :data:`TUNE_MAX_M` (not tuned)."""
    if m > TUNE_MAX_M or m < 1:
        return [DEFAULT_CHOICE]
    splits = [0] + [s for s in SPLIT_CHOICES if s <= n_blocks // 2 or s == 1]
    tiles = (0, 1) if m >= MID3_MIN_M else (0,)
    return [(s, t) for t in tiles for s in splits]


def split_key(m: int, n: int, n_blocks: int, n_int8: int, group: int, asym: bool, block_major: bool,
              mode: str) -> tuple:
    """Cache key: exact M (decode graphs run a handful of padded batch sizes), the weight's shape
    and format, the INT8 block count, and the timing mode."""
    return (int(m), int(n), int(n_blocks), int(n_int8), int(group), bool(asym), bool(block_major), str(mode))


def choose_split(key: tuple, cands: List[Choice], bench_fn: Optional[Callable[[Choice], float]]) -> Choice:
    """The cached choice for ``key``; else, with ``bench_fn(choice) -> seconds``, time every
    candidate, cache and return the fastest (a candidate that raises is skipped; ties keep the
    earlier one); without a ``bench_fn`` (not tunable now) return the first candidate -- the
    kernel's rule on the tile by M -- and cache nothing, so a later tunable call still tunes."""
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    if bench_fn is None or len(cands) < 2:
        return cands[0] if cands else DEFAULT_CHOICE
    times: List[Tuple[float, int, Choice]] = []
    for i, c in enumerate(cands):
        try:
            times.append((float(bench_fn(c)), i, c))
        except Exception:  # noqa: BLE001 - e.g. a workspace that does not fit: skip that choice
            continue
    best = min(times)[2] if times else DEFAULT_CHOICE
    _CACHE[key] = best
    return best


def tuned_split(m: int, n: int, n_blocks: int, n_int8: int, group: int, asym: bool, block_major: bool, device,
                launch: Callable[[Choice], object]) -> Choice:
    """The ``(split, tile)`` choice for one GEMM call (``launch(choice)`` runs it): cached per
    :func:`split_key` (the current ``cometq.autotune`` timing mode included), timed with that
    mode's timer when tuning is allowed here (CUDA device, :func:`tuning_enabled`, not frozen,
    not tracing or capturing), else the cached choice or :data:`DEFAULT_CHOICE`."""
    cands = split_candidates(m, n_blocks)
    if len(cands) < 2:
        return DEFAULT_CHOICE
    from . import autotune

    mode = autotune.timing_mode()
    key = split_key(m, n, n_blocks, n_int8, group, asym, block_major, mode)
    bench_fn = None
    if (tuning_enabled() and getattr(device, "type", None) == "cuda" and not autotune.frozen_now()
            and not autotune._tracing_or_capturing(device)):
        timer = autotune.cuda_graph_timer if mode == "graph" else autotune.cuda_event_timer

        def bench_fn(choice):
            return timer(lambda: launch(choice), device)
    return choose_split(key, cands, bench_fn)


def tuned_choice(key: tuple, cands: List[Choice], device, launch: Callable[[Choice], object],
                 check: Optional[Callable[[object, object], bool]] = None) -> Choice:
    """Like :func:`tuned_split` for another kernel's launch knobs: the cached choice for ``key``
    (the caller's full cache key) among ``cands`` (first = the untuned default), timed as CUDA-graph
    replays when tuning is allowed here.  ``check(ref, out)``: before a candidate is timed, its
    output must agree with the first candidate's (``ref``) -- one that does not is skipped with a
    RuntimeWarning, so a fast but wrong launch variant is never chosen."""
    from . import autotune

    bench_fn = None
    if (tuning_enabled() and getattr(device, "type", None) == "cuda" and not autotune.frozen_now()
            and not autotune._tracing_or_capturing(device)):
        ref: list = []

        def bench_fn(choice):
            if check is not None and choice != cands[0]:
                if not ref:
                    ref.append(launch(cands[0]))
                if not check(ref[0], launch(choice)):
                    warnings.warn(f"cometq: launch choice {choice} disagrees with {cands[0]} on {key}; not used",
                                  RuntimeWarning, stacklevel=2)
                    raise CandidateMismatch(choice)
            return autotune.cuda_graph_timer(lambda: launch(choice), device)
    return choose_split(key, cands, bench_fn)


class CandidateMismatch(RuntimeError):
    """A launch candidate's output disagreed with the default's (:func:`tuned_choice`)."""


def clear() -> None:
    _CACHE.clear()
