"""Measured backend choice under ``auto`` (cometq.autotune, issue #4).

CPU tests drive the real ops (``ops.w4ax_gemm_q``, ``ops.quantize_activation``)
with fake "cuda"/"triton" implementations registered in a copy of the registry,
a fake timer that reports chosen durations, and the device check patched so a
CPU tensor counts as measurable.  Each fake returns the reference result plus a
backend-specific offset, so a test can tell which backend produced an output.
"""
import json
import os
import warnings

import pytest
import torch

from cometq import autotune
from cometq import layout as L
from cometq import ops
from cometq import reference as R
from cometq.testing import rand_activation, rand_weight

OFFSET = {"cuda": 1000.0, "triton": 2000.0, "reference": 0.0}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layout(k, n8, seed, clip=1.0):
    perm = torch.randperm(k, generator=_gen(seed))
    bits = [8 if i < n8 else 4 for i in range(L.num_blocks(k))]
    return L.ActivationLayout(perm, torch.tensor(bits, dtype=torch.int32), clip)


class Fakes:
    """Fake backends + a fake timer sharing one call log."""

    def __init__(self, ms):
        self.ms = dict(ms)  # backend -> reported milliseconds
        self.calls = []  # every fake impl call, in order
        self.timed = []  # backends the timer measured
        self.unsupported = {}  # backend -> predicate(args) -> raise BackendUnsupported
        self.broken = set()  # backends raising a plain error

    def impl(self, op, name):
        ref = ops._IMPLS[op]["reference"]

        def fn(*args):
            self.calls.append((op, name))
            if name in self.broken:
                raise RuntimeError(f"{name} kernel exploded")
            pred = self.unsupported.get(name)
            if pred is not None and pred(op, args):
                raise ops.BackendUnsupported(f"{name} cannot do this case")
            out = ref(*args)
            if op == "w4ax_gemm":
                return out + OFFSET[name]
            q4, q8, sc = out
            return q4, q8, sc + OFFSET[name]

        return fn

    def timer(self, fn, device):
        n = len(self.calls)
        fn()
        assert len(self.calls) == n + 1, "the timer must call exactly one backend"
        name = self.calls[-1][1]
        self.timed.append(name)
        return self.ms[name]


@pytest.fixture
def fakes(monkeypatch):
    for b in ("triton", "cuda"):
        ops._load_backend(b)  # a later lazy import must not overwrite the fakes
    impls = {op: dict(v) for op, v in ops._IMPLS.items()}
    monkeypatch.setattr(ops, "_IMPLS", impls)
    f = Fakes({"cuda": 2.0, "triton": 1.0})
    for op in ("w4ax_gemm", "quantize_act"):
        for b in ("cuda", "triton"):
            ops.register_impl(op, b, f.impl(op, b))

    def candidates(op, dev, req=None):
        r = req or os.environ.get("COMETQ_BACKEND", "auto")
        if r != "auto":
            return (r,)
        return tuple(b for b in ("cuda", "triton") if b in ops._IMPLS[op]) + ("reference",)

    monkeypatch.setattr(ops, "candidate_backends", candidates)
    monkeypatch.setattr(autotune, "_measurable", lambda d: True)
    prev = autotune.set_timer(f.timer)
    for v in ("COMETQ_BACKEND", autotune.ENV_ENABLE, autotune.ENV_CACHE):
        monkeypatch.delenv(v, raising=False)
    autotune.clear()
    yield f
    autotune.clear()
    autotune.set_timer(prev)


def _gemm_operands(m, n=20, k=200, n8=1, group=64, sym=True, seed=0):
    lay = _layout(k, n8, seed)
    qa = R.quantize_activation(rand_activation(m, k, outliers=2, generator=_gen(seed + 1)), lay)
    qw = R.quantize_weight_rtn(lay.permute_columns(rand_weight(n, k, generator=_gen(seed + 2))), group, sym=sym)
    return qa, qw


def _only(rows, op):
    out = [r for r in rows if r["op"] == op]
    assert len(out) == 1, out
    return out[0]


# ---------------------------------------------------------------- buckets and keys
def test_buckets():
    assert [autotune.bucket_m(m) for m in (0, 1, 2, 3, 4, 5, 17, 4096, 5000, 100000)] == \
        [1, 1, 2, 4, 4, 8, 32, 4096, 4096, 4096]
    assert [autotune.bucket_count(n) for n in (0, 1, 2, 3, 5)] == [0, 1, 2, 4, 8]


def test_gemm_key_separates_cases():
    qa, qw = _gemm_operands(3)
    args = (qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, None, 64, None, torch.float16,
            "block")
    k = dict(autotune.case_key("w4ax_gemm", *args))
    assert k == {"M": 4, "N": 20, "K": 256, "dtype": "float16", "n_int8": 1, "scale_mode": "block", "group": 64,
                 "offsets": False, "bias": False}
    k2 = dict(autotune.case_key("w4ax_gemm", *args[:6], qw.scales, *args[7:]))
    assert k2["offsets"] is True and k2 != k


# ---------------------------------------------------------------- choice and cache
def test_faster_backend_is_picked_and_output_is_its_real_call(fakes):
    qa, qw = _gemm_operands(3)
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    ref = R.w4ax_gemm(qa, qw)
    assert torch.allclose(y, ref + OFFSET["triton"], rtol=1e-6, atol=1e-3)
    assert sorted(fakes.timed) == ["cuda", "triton"]  # each candidate timed once, reference never
    assert fakes.calls[-1] == ("w4ax_gemm", "triton")  # the real call, after the timing calls
    d = _only(autotune.report(), "w4ax_gemm")
    assert d["choice"] == "triton" and d["times_ms"] == {"cuda": 2.0, "triton": 1.0} and d["source"] == "measured"
    assert d["device"] == "cpu" and d["key"]["M"] == 4

    # the other way round: cuda faster -> cuda (new process state)
    autotune.clear()
    fakes.ms = {"cuda": 0.5, "triton": 1.0}
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert torch.allclose(y, ref + OFFSET["cuda"], rtol=1e-6, atol=1e-3)
    assert _only(autotune.report(), "w4ax_gemm")["choice"] == "cuda"


def test_choice_is_cached_per_bucket(fakes):
    qa3, qw = _gemm_operands(3)
    ops.w4ax_gemm_q(qa3, qw, out_dtype=torch.float32)
    assert len(fakes.timed) == 2
    ops.w4ax_gemm_q(qa3, qw, out_dtype=torch.float32)
    qa4, _ = _gemm_operands(4)  # M=4: same bucket as M=3
    ops.w4ax_gemm_q(qa4, qw, out_dtype=torch.float32)
    assert len(fakes.timed) == 2
    assert fakes.calls[-3:] == [("w4ax_gemm", "triton")] * 3  # no timing, chosen backend only
    qa1, _ = _gemm_operands(1)  # decode bucket: tuned once more
    ops.w4ax_gemm_q(qa1, qw, out_dtype=torch.float32)
    assert len(fakes.timed) == 4
    ops.w4ax_gemm_q(qa4, qw, out_dtype=torch.bfloat16)  # another dtype: another case
    assert len(fakes.timed) == 6
    assert sorted(r["key"]["M"] for r in autotune.report()) == [1, 4, 4]


def test_graph_timing_mode_keeps_its_own_decisions(fakes):
    """Inside ``timing("graph")`` the graph timer decides, the case key carries the mode, and the
    eager decision for the same shape is untouched (decode graphs vs eager steps)."""
    graph_ms = {"cuda": 3.0, "triton": 0.5}
    timed_graph = []

    def graph_timer(fn, device):
        n = len(fakes.calls)
        fn()
        name = fakes.calls[n][1]
        timed_graph.append(name)
        return graph_ms[name]

    prev = autotune.set_timer(graph_timer, mode="graph")
    try:
        fakes.ms.update({"cuda": 1.0, "triton": 4.0})  # eager: launch-bound Triton loses
        qa, qw = _gemm_operands(3)
        ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
        assert autotune.timing_mode() == "eager" and fakes.calls[-1] == ("w4ax_gemm", "cuda")
        with autotune.timing("graph"):
            assert autotune.timing_mode() == "graph"
            ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
            assert fakes.calls[-1] == ("w4ax_gemm", "triton")
            ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)  # cached: no more timing
        assert autotune.timing_mode() == "eager"
        assert sorted(timed_graph) == ["cuda", "triton"] and sorted(fakes.timed) == ["cuda", "triton"]
        ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)  # eager again: the eager decision
        assert fakes.calls[-1] == ("w4ax_gemm", "cuda")
        rows = [r for r in autotune.report() if r["op"] == "w4ax_gemm"]
        by_mode = {r["key"].get("timing", "eager"): r["choice"] for r in rows}
        assert by_mode == {"eager": "cuda", "graph": "triton"}
        # the eager key is exactly the case key (cache files from before the modes keep working)
        eager_key = [r["key"] for r in rows if "timing" not in r["key"]][0]
        args = (qa.q4, qa.q8, qa.scales, qa.layout.block_bits, qw.qweight, qw.scales, qw.offsets, 64, None,
                torch.float32, "block")
        assert eager_key == dict(autotune.case_key("w4ax_gemm", *args))
    finally:
        autotune.set_timer(prev, mode="graph")


def test_timing_mode_errors():
    with pytest.raises(ValueError, match="timing mode must be one of"):
        with autotune.timing("lazy"):
            pass
    with pytest.raises(ValueError, match="timing mode must be one of"):
        autotune.set_timer(None, mode="sometimes")
    assert autotune.timing_mode() == "eager"
    prev = autotune.set_timer(lambda fn, d: 1.0, mode="graph")
    assert autotune.set_timer(None, mode="graph") is not prev  # (the fake)
    assert autotune.set_timer(prev, mode="graph") is autotune.cuda_graph_timer  # default restored by None


def test_quantize_activation_tunes_per_case_flags(fakes):
    k = 300
    x = rand_activation(5, k, outliers=2, generator=_gen(7))
    lay = _layout(k, 1, seed=7)
    fakes.ms = {"cuda": 0.3, "triton": 0.6}
    qa = ops.quantize_activation(x, lay, "block")
    want = R.quantize_activation(x, lay, "block")
    assert torch.equal(qa.q4, want.q4) and torch.equal(qa.q8, want.q8)
    assert torch.allclose(qa.scales, want.scales + OFFSET["cuda"])
    ops.quantize_activation(x, lay, "block")
    assert len(fakes.timed) == 2
    ops.quantize_activation(x, lay, "class")  # scale_mode is a case flag
    assert len(fakes.timed) == 4
    ops.quantize_activation(x, _layout(k, 1, seed=7, clip=0.9), "block")  # clip on/off is a case flag
    assert len(fakes.timed) == 6
    ops.quantize_activation(x, _layout(k, 0, seed=7), "block")  # n_int8 bucket 0 vs 1
    assert len(fakes.timed) == 8
    keys = [r["key"] for r in autotune.report() if r["op"] == "quantize_act"]
    assert len(keys) == 4 and {kk["dtype"] for kk in keys} == {"float32"}


def test_unsupported_candidate_is_skipped(fakes):
    fakes.ms = {"cuda": 0.1, "triton": 1.0}  # cuda would win, but cannot run offsets
    fakes.unsupported["cuda"] = lambda op, args: op == "w4ax_gemm" and args[6] is not None
    qa, qw = _gemm_operands(3, sym=False)
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert torch.allclose(y, R.w4ax_gemm(qa, qw) + OFFSET["triton"], rtol=1e-6, atol=1e-3)
    d = _only(autotune.report(), "w4ax_gemm")
    assert d["choice"] == "triton" and d["times_ms"] == {"triton": 1.0}
    assert d["key"]["offsets"] is True and d["skipped"]["cuda"].startswith("unsupported")
    # symmetric weights: another case, cuda runs and wins
    qa, qws = _gemm_operands(3, sym=True)
    y = ops.w4ax_gemm_q(qa, qws, out_dtype=torch.float32)
    assert torch.allclose(y, R.w4ax_gemm(qa, qws) + OFFSET["cuda"], rtol=1e-6, atol=1e-3)

    # every non-reference candidate unsupported: reference runs, nothing timed
    autotune.clear()
    fakes.unsupported["triton"] = fakes.unsupported["cuda"]
    qa, qw = _gemm_operands(3, sym=False)
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert torch.allclose(y, R.w4ax_gemm(qa, qw), rtol=1e-6, atol=1e-6)
    d = _only(autotune.report(), "w4ax_gemm")
    assert d["choice"] == "reference" and d["times_ms"] == {} and set(d["skipped"]) == {"cuda", "triton"}


def test_failing_candidate_warns_and_is_skipped(fakes):
    fakes.ms = {"cuda": 0.1, "triton": 1.0}
    fakes.broken.add("cuda")
    qa, qw = _gemm_operands(3)
    with pytest.warns(UserWarning, match="backend 'cuda' failed on op 'w4ax_gemm'.*exploded"):
        y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert torch.allclose(y, R.w4ax_gemm(qa, qw) + OFFSET["triton"], rtol=1e-6, atol=1e-3)
    assert _only(autotune.report(), "w4ax_gemm")["skipped"]["cuda"].startswith("error: RuntimeError")


def test_single_gpu_backend_is_not_timed(fakes):
    del ops._IMPLS["w4ax_gemm"]["cuda"]  # triton + reference: nothing to choose
    qa, qw = _gemm_operands(3)
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert fakes.timed == [] and autotune.report() == []
    assert torch.allclose(y, R.w4ax_gemm(qa, qw) + OFFSET["triton"], rtol=1e-6, atol=1e-3)


# ---------------------------------------------------------------- when not to tune
def test_forced_backend_never_tunes(fakes, monkeypatch):
    qa, qw = _gemm_operands(3)
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32, backend="cuda")  # cuda is the slower one
    assert torch.allclose(y, R.w4ax_gemm(qa, qw) + OFFSET["cuda"], rtol=1e-6, atol=1e-3)
    monkeypatch.setenv("COMETQ_BACKEND", "cuda")
    ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    ops.quantize_activation(rand_activation(2, 200, generator=_gen(3)), qa.layout)
    assert fakes.timed == [] and autotune.report() == []
    # order() itself: a forced request returns the candidates untouched
    assert autotune.order("w4ax_gemm", "cpu", ("cuda", "triton", "reference"), {}, (), "triton") == \
        ("cuda", "triton", "reference")


def test_env_off_keeps_fixed_order(fakes, monkeypatch):
    monkeypatch.setenv(autotune.ENV_ENABLE, "0")
    qa, qw = _gemm_operands(3)
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert fakes.timed == [] and autotune.report() == []
    assert torch.allclose(y, R.w4ax_gemm(qa, qw) + OFFSET["cuda"], rtol=1e-6, atol=1e-3)  # cuda first
    monkeypatch.setenv(autotune.ENV_ENABLE, "maybe")
    with pytest.raises(ValueError, match="COMETQ_AUTOTUNE='maybe'"):
        ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)


def test_unmeasurable_device_keeps_fixed_order(fakes, monkeypatch):
    monkeypatch.setattr(autotune, "_measurable", lambda d: d.type == "cuda")  # the real rule, on a CPU tensor
    qa, qw = _gemm_operands(3)
    ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert fakes.timed == [] and fakes.calls == [("w4ax_gemm", "cuda")]


def test_no_measurement_while_compiling(fakes, monkeypatch):
    qa, qw = _gemm_operands(3)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert fakes.timed == [] and autotune.report() == []  # nothing measured, nothing cached
    assert torch.allclose(y, R.w4ax_gemm(qa, qw) + OFFSET["cuda"], rtol=1e-6, atol=1e-3)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)  # eager: measures now
    assert sorted(fakes.timed) == ["cuda", "triton"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)  # a cached decision is used while compiling
    assert len(fakes.timed) == 2 and fakes.calls[-1] == ("w4ax_gemm", "triton")


def test_frozen_block_never_measures(fakes):
    """Inside ``autotune.frozen()`` nothing is measured or cached (fixed order); a decision
    made outside it is used inside; outside again, an unseen case tunes as usual."""
    qa, qw = _gemm_operands(3)
    with autotune.frozen():
        assert autotune.frozen_now()
        y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert not autotune.frozen_now()
    assert fakes.timed == [] and autotune.report() == []
    assert torch.allclose(y, R.w4ax_gemm(qa, qw) + OFFSET["cuda"], rtol=1e-6, atol=1e-3)  # fixed order: cuda first
    ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)  # outside: measures (triton is faster)
    assert sorted(fakes.timed) == ["cuda", "triton"]
    with autotune.frozen():
        ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)  # the decision made outside is used
    assert len(fakes.timed) == 2 and fakes.calls[-1] == ("w4ax_gemm", "triton")


def test_torch_compile_through_the_op(fakes):
    """A compiled caller goes through the fake impl at trace time and the tuned dispatch at run time."""
    qa, qw = _gemm_operands(3)

    def f(q4, q8, sc):
        return ops.w4ax_gemm(q4, q8, sc, qa.layout.block_bits, qw.qweight, qw.scales, 64, out_dtype=torch.float32)

    y = torch.compile(f, backend="eager", fullgraph=True)(qa.q4, qa.q8, qa.scales)
    assert torch.allclose(y, R.w4ax_gemm(qa, qw) + OFFSET["triton"], rtol=1e-6, atol=1e-3)
    assert sorted(fakes.timed) == ["cuda", "triton"]


# ---------------------------------------------------------------- persistence
def test_cache_file_round_trip(fakes, monkeypatch, tmp_path):
    path = tmp_path / "sub" / "tune.json"
    monkeypatch.setenv(autotune.ENV_CACHE, str(path))
    qa, qw = _gemm_operands(3)
    ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    data = json.loads(path.read_text())
    assert data["format"] == autotune.CACHE_FORMAT and len(data["entries"]) == 1
    e = data["entries"][0]
    assert e["choice"] == "triton" and e["op"] == "w4ax_gemm" and e["key"]["M"] == 4
    assert [p.name for p in path.parent.iterdir()] == ["tune.json"]  # no temp file left behind

    autotune.clear()  # a new process: decisions come from the file, nothing is timed
    fakes.timed.clear()
    fakes.ms = {"cuda": 0.1, "triton": 1.0}
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert fakes.timed == [] and torch.allclose(y, R.w4ax_gemm(qa, qw) + OFFSET["triton"], rtol=1e-6, atol=1e-3)
    d = _only(autotune.report(), "w4ax_gemm")
    assert d["source"] == "file" and d["times_ms"] == {"cuda": 2.0, "triton": 1.0}

    qa1, _ = _gemm_operands(1)  # a new case is measured and merged into the file
    ops.w4ax_gemm_q(qa1, qw, out_dtype=torch.float32)
    data = json.loads(path.read_text())
    assert sorted(e["key"]["M"] for e in data["entries"]) == [1, 4]
    assert autotune._main([str(path)]) == 0


def test_cached_choice_of_a_missing_backend_is_remeasured(fakes, monkeypatch, tmp_path):
    path = tmp_path / "tune.json"
    monkeypatch.setenv(autotune.ENV_CACHE, str(path))
    qa, qw = _gemm_operands(3)
    ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)  # triton chosen
    autotune.clear()
    del ops._IMPLS["w4ax_gemm"]["triton"]  # this process lacks triton, has another slower backend
    monkeypatch.setitem(OFFSET, "fake2", 3000.0)
    ops._IMPLS["w4ax_gemm"]["fake2"] = fakes.impl("w4ax_gemm", "fake2")
    fakes.ms["fake2"] = 5.0

    def candidates(op, dev, req=None):
        return ("cuda", "fake2", "reference")

    monkeypatch.setattr(ops, "candidate_backends", candidates)
    fakes.timed.clear()
    ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert fakes.timed == ["cuda", "fake2"]  # re-timed: the cached choice cannot run here
    assert _only(autotune.report(), "w4ax_gemm")["choice"] == "cuda"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 1, "fingerprint": {}, "entries": 3}',
                                     "corrupt-entry"])
def test_corrupt_cache_file_warns_and_is_ignored(fakes, monkeypatch, tmp_path, content):
    path = tmp_path / "tune.json"
    if content == "corrupt-entry":  # right header, broken entry
        content = json.dumps({"format": autotune.CACHE_FORMAT, "fingerprint": autotune._fingerprint(),
                              "entries": [{"op": "w4ax_gemm", "device": "cpu", "key": {"M": 4}, "choice": "cuda",
                                           "times_ms": {"cuda": "fast"}}]})
    path.write_text(content)
    monkeypatch.setenv(autotune.ENV_CACHE, str(path))
    qa, qw = _gemm_operands(3)
    with pytest.warns(UserWarning, match="autotune cache .* ignored .*corrupt.*not be overwritten"):
        y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert torch.allclose(y, R.w4ax_gemm(qa, qw) + OFFSET["triton"], rtol=1e-6, atol=1e-3)  # measured anyway
    assert sorted(fakes.timed) == ["cuda", "triton"]
    assert path.read_text() == content  # not overwritten
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every call
        ops.w4ax_gemm_q(_gemm_operands(1)[0], qw, out_dtype=torch.float32)
    assert autotune._main([str(path)]) == 1


def test_stale_cache_file_is_replaced(fakes, monkeypatch, tmp_path):
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"format": autotune.CACHE_FORMAT, "fingerprint": {"torch": "0.0"}, "entries": []}))
    monkeypatch.setenv(autotune.ENV_CACHE, str(path))
    qa, qw = _gemm_operands(3)
    with pytest.warns(UserWarning, match="ignored and will be replaced .*stale"):
        ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    data = json.loads(path.read_text())
    assert data["fingerprint"] == autotune._fingerprint() and len(data["entries"]) == 1


def test_unwritable_cache_warns_once(fakes, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv(autotune.ENV_CACHE, str(blocker / "tune.json"))  # parent is a file
    qa, qw = _gemm_operands(3)
    with pytest.warns(UserWarning, match="cannot write cache"):
        y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert torch.allclose(y, R.w4ax_gemm(qa, qw) + OFFSET["triton"], rtol=1e-6, atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.w4ax_gemm_q(_gemm_operands(1)[0], qw, out_dtype=torch.float32)
    assert len(autotune.report()) == 2


def test_format_report(fakes):
    assert "no decisions" in autotune.format_report()
    qa, qw = _gemm_operands(3)
    ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    text = autotune.format_report()
    assert "w4ax_gemm" in text and "-> triton" in text and "triton=1.0000ms cuda=2.0000ms" in text


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_real_backends_on_gpu():
    """Real timer, real backends: the auto result is bit-identical to the chosen backend's forced result."""
    autotune.clear()
    try:
        qa, qw = _gemm_operands(17, n=300, k=576, n8=1)
        dev = "cuda"
        qa = R.QuantizedActivation(qa.q4.to(dev), qa.q8.to(dev), qa.scales.to(dev), qa.layout.to(dev), "block")
        qw = qw.to(dev)
        y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float16, backend="auto")
        cands = ops.candidate_backends("w4ax_gemm", torch.device(dev), "auto")
        rows = [r for r in autotune.report() if r["op"] == "w4ax_gemm"]
        if len([c for c in cands if c != "reference"]) < 2:
            assert rows == []
            return
        assert len(rows) == 1 and all(t > 0 for t in rows[0]["times_ms"].values())
        y2 = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float16, backend=rows[0]["choice"])
        assert torch.equal(y, y2)
        # graph timing: CUDA-graph replays of each candidate (a capture failure falls back to
        # the eager timer); its own decision, and the same bits again
        with autotune.timing("graph"):
            y3 = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float16, backend="auto")
        rows = [r for r in autotune.report() if r["op"] == "w4ax_gemm"]
        g = [r for r in rows if r["key"].get("timing") == "graph"]
        assert len(rows) == 2 and len(g) == 1 and all(t > 0 for t in g[0]["times_ms"].values())
        assert torch.equal(y3, ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float16, backend=g[0]["choice"]))
    finally:
        autotune.clear()


# ---------------------------------------------------------------- CUDA GEMM split-K tuning
def test_cuda_split_candidates_and_choice():
    """The CUDA GEMM's (split count, tile variant) at small M (cometq._cuda_split): split 0 (the
    kernel's own rule) first, counts leaving >= 2 K blocks per split, on the tile by M and -- for
    17 <= M <= 64 -- again on the 3-stage 64 x 64 tile; nothing to tune above M = 64; the fastest
    timed choice is kept per key (timing mode included), a failing one is skipped, ties keep the
    earlier, and without a timer (frozen, capturing, CPU) the default decides, uncached."""
    from cometq import _cuda_split as S

    S.clear()
    splits = [0, 1, 2, 3, 4, 6, 8]
    assert S.split_candidates(64, 32) == [(s, 0) for s in splits] + [(s, 1) for s in splits]
    assert S.split_candidates(17, 32)[-1] == (8, 1)
    assert S.split_candidates(16, 5) == [(0, 0), (1, 0), (2, 0)]  # K = 576: 5 blocks; M <= 16: no tile 1
    assert S.split_candidates(65, 32) == [S.DEFAULT_CHOICE] and S.split_candidates(1024, 112) == [(0, 0)]
    cost = {0: 5.0, 1: 9.0, 2: 4.0, 3: 2.5, 4: 3.0, 6: 7.0, 8: 1.0}
    timed = []

    def bench(c):
        timed.append(c)
        split, tile = c
        if split == 8:
            raise RuntimeError("workspace too large")
        return cost[split] + (0.5 if tile else 0.0)

    k_eager = S.split_key(64, 4096, 32, 8, 128, True, False, "eager")
    k_graph = S.split_key(64, 4096, 32, 8, 128, True, False, "graph")
    assert k_eager != k_graph
    cands = S.split_candidates(64, 32)
    assert S.choose_split(k_graph, cands, None) == (0, 0) and k_graph not in S._CACHE  # untunable: not cached
    assert S.choose_split(k_eager, cands, bench) == (3, 0) and timed == cands  # split 8 failed: skipped
    timed.clear()
    assert S.choose_split(k_eager, cands, bench) == (3, 0) and timed == []  # cached
    cost[3] = 9.9
    assert S.choose_split(k_graph, cands, bench) == (4, 0)  # its own measurement
    assert S.choose_split(k_eager, cands, None) == (3, 0)  # a cached choice is used even when frozen
    S.clear()
    assert S.choose_split(k_eager, cands, lambda c: 1.0 + (c == (2, 1)) * -0.5) == (2, 1)  # the 3-stage tile won
    S.clear()
    assert S.choose_split(k_eager, cands, lambda c: 1.0) == (0, 0)  # a tie keeps the first
    S.clear()
    assert S.choose_split(k_eager, cands, lambda c: 1 / 0) == (0, 0)  # every choice failed: the default


def test_cuda_split_tuning_switch(monkeypatch):
    from cometq import _cuda_split as S

    monkeypatch.delenv(S.ENV_TUNE, raising=False)
    assert S.tuning_enabled()
    monkeypatch.setenv(S.ENV_TUNE, "0")
    assert not S.tuning_enabled()


def test_cuda_split_tuned_split_uses_the_timing_modes_timer(monkeypatch):
    """tuned_split (what the CUDA backend's GEMM wrapper calls): the current timing mode's timer
    times launch(split) for every candidate; frozen / non-CUDA / switched off: no timing."""
    from cometq import _cuda_split as S

    S.clear()
    calls = {"eager": [], "graph": []}
    launched = []

    def timer(name):
        def t(fn, dev):
            fn()
            calls[name].append(launched[-1])
            return {(0, 0): 3.0, (1, 0): 4.0, (2, 0): 1.0}.get(launched[-1], 2.0)
        return t

    monkeypatch.setattr(autotune, "cuda_event_timer", timer("eager"))
    monkeypatch.setattr(autotune, "cuda_graph_timer", timer("graph"))
    monkeypatch.setattr(autotune, "_tracing_or_capturing", lambda dev: False)
    cuda = torch.device("cuda")
    args = (16, 4096, 5, 1, 128, True, False)
    three = [(0, 0), (1, 0), (2, 0)]  # M = 16: the 16-row tile only
    assert S.tuned_split(*args, cuda, launched.append) == (2, 0) and calls["eager"] == three
    with autotune.timing("graph"):
        assert S.tuned_split(*args, cuda, launched.append) == (2, 0) and calls["graph"] == three
    assert S.tuned_split(*args, cuda, launched.append) == (2, 0) and len(calls["eager"]) == 3  # cached
    S.clear()
    with autotune.frozen():
        assert S.tuned_split(*args, cuda, launched.append) == (0, 0)
    assert S.tuned_split(*args, torch.device("cpu"), launched.append) == (0, 0)
    monkeypatch.setenv(S.ENV_TUNE, "0")
    assert S.tuned_split(*args, cuda, launched.append) == (0, 0)
    assert not S._CACHE and len(calls["eager"]) == 3
    assert S.tuned_split(65, 4096, 5, 1, 128, True, False, cuda, launched.append) == (0, 0)  # M > 64: not tuned
    monkeypatch.delenv(S.ENV_TUNE)
    assert S.tuned_split(64, 4096, 5, 1, 128, True, False, cuda, launched.append) == (2, 0)
    assert calls["eager"][3:] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]  # M = 64: both tiles timed


def test_cuda_tuned_choice_skips_a_candidate_whose_output_disagrees(monkeypatch):
    """tuned_choice with a check: each candidate's output is compared with the first candidate's
    before it is timed; the fastest candidate that disagrees is skipped (RuntimeWarning), so the
    next fastest that agrees is kept.  Without a check the fastest wins whatever it returns."""
    from cometq import _cuda_split as S

    times = {(0, 0): 3.0, (1, 4): 1.0, (2, 4): 2.0, (1, 0): 4.0}
    outs = {(0, 0): torch.ones(4), (1, 4): torch.full((4,), 9.0), (2, 4): torch.ones(4) + 1e-6, (1, 0): torch.ones(4)}
    current = []

    def launch(c):
        current.append(c)
        return outs[c].clone()

    def timer(fn, dev):
        fn()
        return times[current[-1]]

    monkeypatch.setattr(autotune, "cuda_graph_timer", timer)
    monkeypatch.setattr(autotune, "_tracing_or_capturing", lambda dev: False)
    cuda = torch.device("cuda")
    cands = [(0, 0), (1, 4), (2, 4), (1, 0)]

    def agree(ref, y):
        return bool((y - ref).abs().max() <= 1e-3)
    S.clear()
    with pytest.warns(RuntimeWarning, match=r"launch choice \(1, 4\) disagrees with \(0, 0\)"):
        assert S.tuned_choice(("k1",), cands, cuda, launch, check=agree) == (2, 4)
    assert S.tuned_choice(("k2",), cands, cuda, launch) == (1, 4)  # unchecked: the fastest
    S.clear()


def test_serving_bench_reports_the_linear_routes():
    """bench_serving's rows carry the route each linear case runs (cometq.serve.bench.linear_route_choices)."""
    from cometq import autotune
    from cometq.serve import bench as B

    autotune.clear()
    assert B.linear_route_choices() == {}
    ck = ("w4ax_linear_route", "H200", (("M", 8192), ("N", 28672), ("timing", "eager")))
    autotune._CACHE[ck] = autotune.Decision(ck[0], ck[1], ck[2], "fp8", {"split": 2.5, "fused": 2.0, "fp8": 1.25}, {})
    ck2 = ("quantize_act", "H200", (("M", 64),))
    autotune._CACHE[ck2] = autotune.Decision(ck2[0], ck2[1], ck2[2], "cuda", {"cuda": 0.1, "triton": 0.2}, {})
    assert B.linear_route_choices() == {"M=8192 N=28672 timing=eager": {
        "choice": "fp8", "ms": {"split": 2.5, "fused": 2.0, "fp8": 1.25}}}
    autotune.clear()


def test_serving_bench_reports_the_cuda_gemm_choices():
    """bench_serving's rows carry what the CUDA GEMM tuner kept (cometq.serve.bench.cuda_gemm_choices)."""
    from cometq import _cuda_split as S
    from cometq.serve import bench as B

    S.clear()
    assert B.cuda_gemm_choices() == {}
    S._CACHE[S.split_key(64, 4096, 32, 8, 128, True, False, "graph")] = (3, 1)
    S._CACHE[S.split_key(16, 6144, 32, 8, 128, True, False, "graph")] = (0, 0)
    S._CACHE[("w16",) + S.split_key(64, 28672, 32, 0, 128, True, True, "graph") + ("torch.float16", False)] = (0, 4)
    got = B.cuda_gemm_choices()
    assert got["M=64 N=4096 blocks=32 int8=8 group=128 asym=True block_major=False mode=graph"] == [3, 1]
    assert got["w16 M=64 N=28672 blocks=32 int8=0 group=128 asym=True block_major=True mode=graph dtype=float16 "
               "bias=False"] == [0, 4]  # (tile 4: the wgmma kernel)
    assert len(got) == 3 and [0, 0] in got.values()
    S.clear()
