"""Measured backend choice for ``backend="auto"`` (issue #4).

Without measurement, ``auto`` takes the first available backend in the fixed
order cuda > triton > reference.  The two GPU backends win in different places
(decode vs prefill, INT8-heavy vs INT4-only layers, asymmetric weights...), so
on a CUDA device, when **two or more non-reference backends** can run an op,
:func:`order` times each of them once per *case* and puts the fastest first:

* a case is ``(op, device name, shape key)``; the shape key holds the sizes that
  change the kernel (M bucketed to the next power of two, capped at
  :data:`M_BUCKET_CAP`, so decode and prefill each tune once; N and K exact: a
  model has few layer shapes) and the op's case flags (dtype, scale_mode,
  group size, whether ``w_offsets`` / bias are given, INT4 clip on/off, the
  number of INT8 blocks bucketed to a power of two).  See :func:`case_key`;
* the timer (:func:`cuda_event_timer`: :data:`WARMUP` warm-up calls, then
  :data:`REPS` calls timed one by one with CUDA events, median, milliseconds)
  is a module-level hook (:func:`set_timer`) or the ``timer=`` argument of
  :func:`order`, so CPU tests drive the logic with fake timings;
* a candidate that raises :class:`cometq.ops.BackendUnsupported` is skipped; one
  that raises anything else is skipped **with a warning** (the fixed order may
  never have called it; a tuning run must not turn a working program into a
  crash);
* the reference backend is never timed: it is the fallback of last resort and
  stays last in the order;
* the timing calls' outputs are thrown away; the real call runs afterwards on
  the chosen backend (the ops are pure, so timing cannot change a result);
* no measurement while ``torch.compile`` traces (``torch.compiler.is_compiling()``)
  or while a CUDA graph is being captured: a decision already cached is used,
  otherwise the fixed order (nothing is cached, the next eager call measures).

**Two timing modes.**  ``eager`` (the default): each call bracketed by events as it is
launched, so a small-M call whose GPU time is shorter than its Python launch measures the
launch (what an eager decode step pays).  ``graph``: the calls are captured into a CUDA graph
and replayed (:func:`cuda_graph_timer`), so only GPU time counts -- what a step replayed from
a CUDA graph pays.  The two disagree exactly where it matters: run 3 on an H100 measured the
8B.o GEMM at M = 1 at 154 us eager / 9.6 us replayed for Triton and 19.7 / 13.6 us for the
CUDA kernel: eager timing cannot see which is faster inside a graph (run 4's batch-64 decode
step, replayed from a graph, spent 71 % of its GPU time in the CUDA GEMM eager timing chose).
:func:`timing` selects the mode for a block of calls (``ModelRunner`` warms its decode graphs
up under ``timing("graph")``); the mode is part of the case, so each mode keeps its own
decisions.  A capture that fails falls back to the eager timer for that candidate.

Decisions live in memory for the life of the process.  Environment:

``COMETQ_AUTOTUNE=0``  (or false/off/no) turns measurement off: fixed order.
``COMETQ_AUTOTUNE_CACHE=path``  also keeps decisions in a JSON file: read at the
  first tuned call, rewritten (atomically, merged with what is on disk) after
  each new measurement.  A file that cannot be read or does not have the
  expected structure gives a :class:`UserWarning` and is ignored, and is then
  **not overwritten** (it may not be ours); delete it to let cometq rewrite
  it.  A file written by other torch/triton/cometq versions is ignored (and
  replaced) with a warning: kernel speed changes with them.

A forced backend (``backend=`` argument, the config's ``backend`` field,
``COMETQ_BACKEND``) never tunes.  :func:`report` returns every cached decision
with its timings (``format_report()`` as text; ``python -m cometq.autotune
[path]`` prints a cache file).  Prose: docs/DISPATCH.md.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import statistics
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

__all__ = [
    "M_BUCKET_CAP",
    "WARMUP",
    "REPS",
    "Decision",
    "bucket_m",
    "bucket_count",
    "frozen",
    "frozen_now",
    "case_key",
    "register_key_fn",
    "cuda_event_timer",
    "cuda_graph_timer",
    "set_timer",
    "timing",
    "timing_mode",
    "order",
    "report",
    "format_report",
    "clear",
    "enabled",
]

ENV_ENABLE = "COMETQ_AUTOTUNE"
ENV_CACHE = "COMETQ_AUTOTUNE_CACHE"
CACHE_FORMAT = 1

M_BUCKET_CAP = 4096  # every M >= 4096 is one prefill case
WARMUP = 3  # the first call of a Triton kernel compiles it: never timed
REPS = 10
GRAPH_CALLS = 10  # calls captured into one graph by cuda_graph_timer

_TRUE = ("", "1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")

Key = Tuple[Tuple[str, Any], ...]


@dataclass
class Decision:
    """One tuned case: the chosen backend and what each candidate measured."""

    op: str
    device: str
    key: Key
    choice: str
    times_ms: Dict[str, float] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)  # backend -> why it was not timed
    source: str = "measured"  # or "file"

    def as_dict(self) -> Dict[str, Any]:
        return {"op": self.op, "device": self.device, "key": dict(self.key), "choice": self.choice,
                "times_ms": dict(self.times_ms), "skipped": dict(self.skipped), "source": self.source}


# --------------------------------------------------------------------------
# case keys
# --------------------------------------------------------------------------
def bucket_m(m: int, cap: int = M_BUCKET_CAP) -> int:
    """Next power of two >= ``m`` (1 for m <= 1), capped at ``cap``."""
    m = int(m)
    if m <= 1:
        return 1
    return min(1 << (m - 1).bit_length(), cap)


def bucket_count(n: int) -> int:
    """0 stays 0 (a kernel path of its own: no INT8 blocks), else next power of two."""
    return 0 if int(n) <= 0 else bucket_m(n, cap=1 << 30)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _key_quantize_act(x, perm, block_bits, n_int8, scale_mode, int4_clip=1.0) -> Key:
    return (("M", bucket_m(x.shape[0])), ("K", int(x.shape[1])), ("dtype", _dtype_name(x.dtype)),
            ("n_int8", bucket_count(n_int8)), ("scale_mode", str(scale_mode)), ("clip", float(int4_clip) != 1.0))


def _key_w4ax_gemm(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, group_size, bias, out_dtype,
                   scale_mode) -> Key:
    return (("M", bucket_m(a_scales.shape[0])), ("N", int(qweight.shape[0])), ("K", int(qweight.shape[1]) * 2),
            ("dtype", _dtype_name(out_dtype)), ("n_int8", bucket_count(q8.shape[1] // 128)),
            ("scale_mode", str(scale_mode)), ("group", int(group_size)), ("offsets", w_offsets is not None),
            ("bias", bias is not None))


def _key_generic(*args) -> Key:
    """Fallback for ops without a key function: every tensor's dtype and shape
    (first dim bucketed), every scalar's value."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            shape = list(a.shape)
            if shape:
                shape[0] = bucket_m(shape[0])
            out.append((f"a{i}", f"{_dtype_name(a.dtype)}{shape}"))
        elif a is None or isinstance(a, (bool, int, float, str)):
            out.append((f"a{i}", a))
        else:
            out.append((f"a{i}", type(a).__name__))
    return tuple(out)


_KEY_FNS: Dict[str, Callable[..., Key]] = {"quantize_act": _key_quantize_act, "w4ax_gemm": _key_w4ax_gemm}


def register_key_fn(op: str, fn: Callable[..., Key]) -> None:
    """Set the case-key function of ``op`` (called with the op's implementation arguments)."""
    _KEY_FNS[op] = fn


def case_key(op: str, *args) -> Key:
    """The shape/flags part of the tuning key for a call of ``op`` with implementation ``args``."""
    return tuple(sorted(_KEY_FNS.get(op, _key_generic)(*args)))  # canonical: JSON round-trips it


# --------------------------------------------------------------------------
# hooks: device check, device name, timer (tests replace them)
# --------------------------------------------------------------------------
def _measurable(device: torch.device) -> bool:
    """Whether calls on ``device`` are timed at all (CUDA events need a CUDA device)."""
    return device.type == "cuda"


_NAMES: Dict[Any, str] = {}


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    idx = device.index if device.index is not None else torch.cuda.current_device()
    name = _NAMES.get(idx)
    if name is None:
        name = _NAMES[idx] = torch.cuda.get_device_name(idx)
    return name


def cuda_event_timer(fn: Callable[[], Any], device: torch.device, warmup: int = WARMUP, reps: int = REPS) -> float:
    """Median milliseconds of ``fn()`` on ``device``'s current stream.

    Each rep is bracketed by its own pair of events (one sync at the end), so a
    single slow rep (clock ramp, another process) does not move the median.
    """
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        evs = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            evs.append((s, e))
        torch.cuda.synchronize(device)
        return float(statistics.median(s.elapsed_time(e) for s, e in evs))


def cuda_graph_timer(fn: Callable[[], Any], device: torch.device, warmup: int = WARMUP, reps: int = REPS,
                     calls: int = GRAPH_CALLS) -> float:
    """Median milliseconds of one ``fn()`` replayed from a CUDA graph: GPU time only.

    ``calls`` calls are captured into one graph (after ``warmup`` eager calls: compilation
    and per-shape caches happen outside the capture), the graph is replayed ``reps`` times,
    each bracketed by events.  A capture that fails (an op that syncs or allocates host
    state) falls back to :func:`cuda_event_timer`."""
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fn()  # one more eager call on the capture stream (lazy per-stream state)
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            # thread_local: another thread's CUDA calls do not invalidate this capture
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                for _ in range(calls):
                    fn()
        except Exception:  # noqa: BLE001 - not capturable: time it eagerly instead
            del g
            torch.cuda.synchronize(device)
            return cuda_event_timer(fn, device, 0, reps)
        g.replay()
        evs = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.replay()
            e.record()
            evs.append((s, e))
        torch.cuda.synchronize(device)
        ms = float(statistics.median(s.elapsed_time(e) for s, e in evs)) / calls
        del g
        return ms


Timer = Callable[[Callable[[], Any], torch.device], float]
TIMING_MODES = ("eager", "graph")
_timers: Dict[str, Timer] = {"eager": cuda_event_timer, "graph": cuda_graph_timer}
_DEFAULT_TIMERS = dict(_timers)
_mode: contextvars.ContextVar = contextvars.ContextVar("cometq_autotune_timing", default="eager")


def _check_mode(mode: str) -> str:
    if mode not in TIMING_MODES:
        raise ValueError(f"timing mode must be one of {TIMING_MODES}, got {mode!r}")
    return mode


def set_timer(fn: Optional[Timer], mode: str = "eager") -> Timer:
    """Replace the timer of a timing mode (``None`` restores the default: :func:`cuda_event_timer`
    for ``"eager"``, :func:`cuda_graph_timer` for ``"graph"``); returns the previous one."""
    _check_mode(mode)
    prev = _timers[mode]
    _timers[mode] = _DEFAULT_TIMERS[mode] if fn is None else fn
    return prev


def timing_mode() -> str:
    """The timing mode of the calling context (``"eager"`` unless inside :func:`timing`)."""
    return _mode.get()


@contextlib.contextmanager
def timing(mode: str):
    """Measure the decisions made inside this block with ``mode``'s timer (``"graph"``: GPU
    time of CUDA-graph replays, for calls that will be replayed from a graph)."""
    token = _mode.set(_check_mode(mode))
    try:
        yield
    finally:
        _mode.reset(token)


_frozen: contextvars.ContextVar = contextvars.ContextVar("cometq_autotune_frozen", default=False)


def frozen_now() -> bool:
    """Whether the calling context is inside :func:`frozen` (no new measurements)."""
    return _frozen.get()


@contextlib.contextmanager
def frozen():
    """No new measurements inside this block: a decision already made is used, otherwise the
    untuned default (fixed order, first launch config) -- and nothing is cached, so a later call
    outside the block still tunes the case.  For calls whose speed does not matter but whose
    first-time tuning would stall (the decode rows of a prefill step: a few microseconds of
    attention beside a step of ~100 ms, where a tuning sweep compiles and times every candidate
    config -- seconds)."""
    token = _frozen.set(True)
    try:
        yield
    finally:
        _frozen.reset(token)


# --------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------
_LOCK = threading.RLock()
_CACHE: Dict[Tuple[str, str, Key], Decision] = {}
_loaded_path: Optional[str] = None  # cache file whose entries are in _CACHE
_no_write: Dict[str, str] = {}  # path -> why it must not be written


def clear() -> None:
    """Forget every decision (memory only; the cache file is left alone)."""
    global _loaded_path
    with _LOCK:
        _CACHE.clear()
        _loaded_path = None
        _no_write.clear()


def enabled() -> bool:
    """``COMETQ_AUTOTUNE`` allows measuring (default yes)."""
    v = os.environ.get(ENV_ENABLE, "1").strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{ENV_ENABLE}={os.environ.get(ENV_ENABLE)!r}: use 1 (measure, the default) or 0 (fixed order)")


def _tracing_or_capturing(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_current_stream_capturing())
        except Exception:  # noqa: BLE001 - no CUDA runtime: nothing is being captured
            return False
    return False


# --------------------------------------------------------------------------
# persistence
# --------------------------------------------------------------------------
_FP: Dict[str, str] = {}


def _fingerprint() -> Dict[str, str]:
    if _FP:
        return dict(_FP)
    out = {"torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - no triton: the fingerprint just lacks it
        out["triton"] = "none"
    try:
        from importlib.metadata import version

        out["cometq"] = version("cometq")
    except Exception:  # noqa: BLE001
        out["cometq"] = "unknown"
    _FP.update(out)
    return dict(out)


def _key_from_json(obj) -> Key:
    if not isinstance(obj, dict):
        raise ValueError(f"key must be an object, got {type(obj).__name__}")
    for k, v in obj.items():
        if not (v is None or isinstance(v, (bool, int, float, str))):
            raise ValueError(f"key field {k!r} has a non-scalar value {v!r}")
    return tuple(sorted(obj.items()))


def _decision_from_json(e) -> Decision:
    if not isinstance(e, dict):
        raise ValueError(f"entry must be an object, got {type(e).__name__}")
    missing = {"op", "device", "key", "choice", "times_ms"} - set(e)
    if missing:
        raise ValueError(f"entry lacks {sorted(missing)}")
    times = e["times_ms"]
    if not isinstance(times, dict) or not all(isinstance(v, (int, float)) for v in times.values()):
        raise ValueError(f"times_ms must map backend -> number, got {times!r}")
    if not isinstance(e["choice"], str) or not isinstance(e["op"], str) or not isinstance(e["device"], str):
        raise ValueError("op, device and choice must be strings")
    skipped = e.get("skipped", {})
    if not isinstance(skipped, dict):
        raise ValueError(f"skipped must be an object, got {skipped!r}")
    return Decision(e["op"], e["device"], _key_from_json(e["key"]), e["choice"],
                    {k: float(v) for k, v in times.items()}, {k: str(v) for k, v in skipped.items()}, "file")


def _read_file(path: str) -> Tuple[Optional[Dict[Tuple[str, str, Key], Decision]], str]:
    """(entries, "") if ``path`` is a valid cache for these versions, (None, why) if not,
    ({}, "") if it does not exist.  Never raises."""
    if not os.path.exists(path):
        return {}, ""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), list):
            raise ValueError(f"expected an object with format={CACHE_FORMAT} and a list 'entries'")
        if data.get("fingerprint") != _fingerprint():
            return None, f"stale: written by {data.get('fingerprint')}, running {_fingerprint()}"
        out = {}
        for i, e in enumerate(data["entries"]):
            try:
                d = _decision_from_json(e)
            except (ValueError, TypeError) as err:
                raise ValueError(f"entry {i}: {err}") from None
            out[(d.op, d.device, d.key)] = d
        return out, ""
    except Exception as err:  # noqa: BLE001 - a cache must never crash a run
        return None, f"corrupt: {type(err).__name__}: {err}"


def _load(path: Optional[str]) -> None:
    """Make ``_CACHE`` hold the entries of ``path`` (once per path)."""
    global _loaded_path
    if path == _loaded_path:
        return
    _loaded_path = path
    if not path:
        return
    entries, why = _read_file(path)
    if entries is None:
        if why.startswith("corrupt"):
            _no_write[path] = why
            warnings.warn(f"cometq autotune cache {path!r} ignored ({why}); it will not be overwritten: "
                          f"delete it to let cometq rewrite it", UserWarning, stacklevel=4)
        else:
            warnings.warn(f"cometq autotune cache {path!r} ignored and will be replaced ({why})", UserWarning,
                          stacklevel=4)
        return
    for k, d in entries.items():
        _CACHE.setdefault(k, d)


def _save(path: str) -> None:
    if path in _no_write:
        return
    on_disk, _ = _read_file(path)  # merge what other processes wrote meanwhile
    merged = dict(on_disk or {})
    merged.update(_CACHE)
    data = {"format": CACHE_FORMAT, "fingerprint": _fingerprint(),
            "entries": [{k: v for k, v in d.as_dict().items() if k != "source"} for d in merged.values()]}
    try:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cometq-autotune-", suffix=".json", dir=d)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        _no_write[path] = f"write failed: {err}"
        warnings.warn(f"cometq autotune cannot write cache {path!r} ({err}); decisions stay in memory",
                      UserWarning, stacklevel=4)


# --------------------------------------------------------------------------
# the dispatch hook
# --------------------------------------------------------------------------
def _measure(op: str, impls: Dict[str, Callable], tuned: Sequence[str], args, device, timer: Timer):
    from .ops import BackendUnsupported  # lazy: ops imports this module

    times, skipped = {}, {}
    for b in tuned:
        fn = impls[b]
        try:
            times[b] = float(timer(lambda: fn(*args), device))
        except BackendUnsupported as e:
            skipped[b] = f"unsupported: {e}"
        except Exception as e:  # noqa: BLE001 - see module doc: skip with a warning
            skipped[b] = f"error: {type(e).__name__}: {e}"
            warnings.warn(f"cometq autotune: backend {b!r} failed on op {op!r} ({type(e).__name__}: {e}); "
                          f"it is skipped for this case", UserWarning, stacklevel=4)
    return times, skipped


def order(op: str, device, candidates: Sequence[str], impls: Dict[str, Callable], args: tuple,
          requested: Optional[str] = None, timer: Optional[Timer] = None) -> Tuple[str, ...]:
    """Reorder ``candidates`` (the fixed-order list of :func:`cometq.ops.candidate_backends`)
    so the measured-fastest backend for this case comes first.

    Returns ``candidates`` unchanged when nothing is to be tuned: a forced
    backend (``requested`` other than auto), fewer than two
    non-reference candidates, a device that is not measured, ``COMETQ_AUTOTUNE=0``.
    """
    cands = tuple(candidates)
    tuned = [b for b in cands if b != "reference"]
    # a forced backend (argument or COMETQ_BACKEND) reaches here only from a direct
    # call: cometq.ops.candidate_backends returns it alone, and one candidate is never tuned
    if len(tuned) < 2 or (requested or "auto") != "auto":
        return cands
    device = torch.device(device)
    if not _measurable(device) or not enabled():
        return cands
    mode = timing_mode()
    key = case_key(op, *args)
    if mode != "eager":  # the eager key stays what it always was (cache files keep working)
        key = tuple(sorted(key + (("timing", mode),)))
    ck = (op, _device_name(device), key)
    with _LOCK:
        _load(os.environ.get(ENV_CACHE) or None)
        d = _CACHE.get(ck)
        if d is None or d.choice not in cands:  # unknown, or chosen a backend this process lacks
            if _tracing_or_capturing(device) or frozen_now():
                return cands
            times, skipped = _measure(op, impls, tuned, args, device, timer or _timers[mode])
            choice = min(times, key=times.get) if times else cands[-1]
            d = _CACHE[ck] = Decision(op, ck[1], ck[2], choice, times, skipped)
            path = os.environ.get(ENV_CACHE)
            if path:
                _save(path)
    return (d.choice,) + tuple(b for b in cands if b != d.choice)


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------
def report() -> list:
    """Every cached decision as a dict (op, device, key, choice, times_ms, skipped, source), sorted."""
    with _LOCK:
        ds = list(_CACHE.values())
    return [d.as_dict() for d in sorted(ds, key=lambda d: (d.op, d.device, repr(d.key)))]


def format_report(rows: Optional[list] = None) -> str:
    """:func:`report` as text, one line per decision."""
    rows = report() if rows is None else rows
    if not rows:
        return "cometq autotune: no decisions"
    lines = []
    for r in rows:
        key = " ".join(f"{k}={v}" for k, v in r["key"].items())
        times = " ".join(f"{b}={t:.4f}ms" for b, t in sorted(r["times_ms"].items(), key=lambda kv: kv[1]))
        skip = "".join(f" [{b}: {why}]" for b, why in r["skipped"].items())
        lines.append(f"{r['op']:<14} {r['device']:<24} {key} -> {r['choice']} ({times}){skip} <{r['source']}>")
    return "\n".join(lines)


def _main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else os.environ.get(ENV_CACHE)
    if not path:
        print(f"usage: python -m cometq.autotune CACHE.json (or set {ENV_CACHE})")
        return 2
    entries, why = _read_file(path)
    if entries is None:
        print(f"{path}: {why}")
        return 1
    print(format_report([d.as_dict() for d in entries.values()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
