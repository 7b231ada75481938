"""Asymmetric INT4 weights (offsets) and the INT4 activation clip: reference, GPTQ,
calibration search, quantize_, save/load, op dispatch."""
import pytest
import torch

from cometq import layout as L
from cometq import ops
from cometq import reference as R
from cometq.calibrate import ACT_CLIP_RATIOS, collect_stats, search_act_clip
from cometq.config import W4AxConfig
from cometq.gptq import gptq_quantize
from cometq.testing import rand_activation, rand_weight


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layout(k, n8, seed, clip=1.0):
    perm = torch.randperm(k, generator=_gen(seed))
    nb = L.num_blocks(k)
    bits = [8 if i < n8 else 4 for i in range(nb)]
    return L.ActivationLayout(perm, torch.tensor(bits, dtype=torch.int32), clip)


# ---------------------------------------------------------------- asymmetric weights
@pytest.mark.parametrize("group", [-1, 128, 64, 32])
@pytest.mark.parametrize("n, k", [(7, 576), (33, 300)])
def test_asym_rtn_error_within_half_step_and_format(n, k, group):
    w = rand_weight(n, k, generator=_gen(n + k)) + 0.05  # off-centre: asymmetric grids pay off
    qw = R.quantize_weight_rtn(w, group, sym=False)
    assert qw.asymmetric and qw.offsets.shape == qw.scales.shape and qw.offsets.dtype == torch.float32
    q = L.unpack_int4(qw.qweight)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.equal(q[:, k:], torch.zeros_like(q[:, k:]))  # padding columns hold 0
    err = (R.dequantize_weight(qw) - w).abs()
    half = R.weight_scales_per_column(qw)[:, :k] / 2
    assert bool((err <= half * (1 + 1e-5) + 1e-7).all())
    # all 16 levels are used somewhere and asymmetric beats symmetric on shifted weights
    assert int(q[:, :k].min()) == -8 and int(q[:, :k].max()) == 7
    sym_err = (R.dequantize_weight(R.quantize_weight_rtn(w, group)) - w).pow(2).sum()
    assert float(err.pow(2).sum()) < float(sym_err)


def test_asym_rtn_reproduces_a_q4_1_grid_exactly():
    """Weights already on a "scale * u + min" grid (GGUF Q4_1, u in 0..15) come back unchanged."""
    n, k, g = 5, 256, 32
    gen = _gen(3)
    u = torch.randint(0, 16, (n, k // g, g), generator=gen).float()
    u[..., 0], u[..., 1] = 0, 15  # every group spans the full range, as the Q4_1 quantizer makes it
    d = torch.rand(n, k // g, 1, generator=gen) * 0.01 + 1e-3
    m = torch.randn(n, k // g, 1, generator=gen) * 0.02
    w = (u * d + m).view(n, k)
    qw = R.quantize_weight_rtn(w, g, sym=False)
    assert torch.equal(L.unpack_int4(qw.qweight).view(n, k // g, g).float(), u - 8)
    assert torch.allclose(R.dequantize_weight(qw), w, rtol=0, atol=1e-6)


def test_asym_clip_and_constant_groups():
    w = rand_weight(4, 128, generator=_gen(5))
    w[0] = 0.25  # constant row: scale 0, offset = the value, exact
    qw = R.quantize_weight_rtn(w, 32, sym=False, clip_ratio=0.8)
    assert torch.equal(R.dequantize_weight(qw)[0], w[0])
    full = R.quantize_weight_rtn(w, 32, sym=False)
    assert bool((qw.scales[1:] < full.scales[1:]).all())  # clip shrinks the range


def test_asym_weight_validation():
    qw = R.quantize_weight_rtn(rand_weight(8, 128, generator=_gen(1)), 32, sym=False)
    with pytest.raises(ValueError, match="offsets shape"):
        R.QuantizedWeight(qw.qweight, qw.scales, 128, 32, qw.offsets[:, :2])
    with pytest.raises(TypeError, match="offsets"):
        R.QuantizedWeight(qw.qweight, qw.scales, 128, 32, qw.offsets.double())


@pytest.mark.parametrize("mode", L.SCALE_MODES)
@pytest.mark.parametrize("group", [-1, 128, 64, 32])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_asym_gemm_equals_dequantized_matmul(m, group, mode):
    n, k = 45, 576
    x = rand_activation(m, k, outliers=3, generator=_gen(m + group))
    lay = _layout(k, 2, seed=m)
    qa = R.quantize_activation(x, lay, mode)
    qw = R.quantize_weight_rtn(lay.permute_columns(rand_weight(n, k, generator=_gen(9)) + 0.03), group, sym=False)
    bias = torch.randn(n, generator=_gen(2))
    y = R.w4ax_gemm(qa, qw, bias, out_dtype=torch.float64)
    deq = R.dequantize_activation(qa).double() @ R.dequantize_weight(qw, trim=False).double().T + bias.double()
    # padding columns dequantize to the offset but meet zero activations
    assert torch.allclose(y, deq, rtol=1e-6, atol=1e-6)
    # the offset term is exactly sum_s a_scale * offset * asum over integer activation sums
    sums = R.w4ax_act_sums(qa, qw)
    seg = min(128, qw.group_width)
    expect = qa.int_blocks().long().view(m, -1, seg).sum(-1)
    assert sums.dtype == torch.int32 and torch.equal(sums.long(), expect)
    sym = R.QuantizedWeight(qw.qweight, qw.scales, qw.in_features, qw.group_size)
    a_sc, _ = R.w4ax_segment_scales(qa, qw)
    off = qw.offsets.repeat_interleave(qw.group_width // seg, dim=1).double()
    extra = (expect.double() * a_sc.double()) @ off.T
    assert torch.allclose(y - R.w4ax_gemm(qa, sym, bias, out_dtype=torch.float64), extra, rtol=1e-9, atol=1e-9)


def test_asym_gemm_through_the_op_and_opcheck():
    m, n, k = 3, 20, 200
    lay = _layout(k, 1, seed=4, clip=0.85)
    x = rand_activation(m, k, outliers=2, generator=_gen(4))
    qa = ops.quantize_activation(x, lay, "block", backend="reference")
    qw = R.quantize_weight_rtn(lay.permute_columns(rand_weight(n, k, generator=_gen(5))), 64, sym=False)
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32, backend="reference")
    assert torch.allclose(y, R.w4ax_gemm(qa, qw), rtol=1e-6, atol=1e-6)
    torch.library.opcheck(
        torch.ops.cometq.w4ax_gemm.default,
        (qa.q4, qa.q8, qa.scales, lay.block_bits, qw.qweight, qw.scales, qw.offsets, 64, None, 2, "block", "reference"),
    )
    torch.library.opcheck(torch.ops.cometq.quantize_act.default,
                          (x, lay.perm, lay.block_bits, lay.n_int8, "class", 0.85, "reference"))
    with pytest.raises(RuntimeError, match="w_offsets shape"):
        ops.w4ax_gemm(qa.q4, qa.q8, qa.scales, lay.block_bits, qw.qweight, qw.scales, 64,
                      w_offsets=qw.offsets[:, :1], backend="reference")
    with pytest.raises(RuntimeError, match="int4_clip"):
        ops.quantize_act(x, lay.perm, lay.block_bits, lay.n_int8, "block", backend="reference", int4_clip=1.5)


def test_backend_unsupported_falls_back_under_auto(monkeypatch):
    """A backend raising BackendUnsupported for a case: auto tries the next one, forced reports it."""
    calls = []

    def nope(*args):
        calls.append(1)
        raise ops.BackendUnsupported("no offsets here")

    monkeypatch.setitem(ops._IMPLS["w4ax_gemm"], "cuda", nope)
    monkeypatch.setattr(ops, "candidate_backends", lambda op, dev, req=None: ("cuda", "reference") if not req else ("cuda",))
    m, n, k = 2, 8, 128
    lay = _layout(k, 0, seed=1)
    qa = R.quantize_activation(rand_activation(m, k, generator=_gen(1)), lay)
    qw = R.quantize_weight_rtn(rand_weight(n, k, generator=_gen(2)), 32, sym=False)
    y = ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32)
    assert calls and torch.allclose(y, R.w4ax_gemm(qa, qw), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="cannot run op 'w4ax_gemm'.*no offsets here"):
        ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float32, backend="cuda")


def test_cpu_candidates_are_reference_only():
    assert ops.candidate_backends("w4ax_gemm", torch.device("cpu")) == ("reference",)


# ---------------------------------------------------------------- GPTQ asymmetric
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [128, 32])
def test_gptq_asym_beats_rtn_asym_on_output_error(group, act_order):
    n, k, t = 24, 200, 512
    gen = _gen(group)
    x = torch.randn(t, k, generator=gen) * (torch.rand(k, generator=gen) * 3 + 0.1)
    w = rand_weight(n, k, generator=gen) + 0.02
    h = 2.0 / t * (x.T @ x)
    qg = gptq_quantize(w, h, group, act_order=act_order, sym=False)
    qr = R.quantize_weight_rtn(w, group, sym=False)
    assert qg.asymmetric and qg.offsets.shape == qg.scales.shape
    q = L.unpack_int4(qg.qweight)
    assert int(q.min()) >= -8 and int(q.max()) <= 7 and torch.equal(q[:, k:], torch.zeros_like(q[:, k:]))
    err = lambda qw: float((x @ (R.dequantize_weight(qw) - w).T).pow(2).sum())  # noqa: E731
    assert err(qg) < err(qr)


# ---------------------------------------------------------------- activation clip
def test_clip_one_is_bit_identical_and_clip_scales_int4_blocks_only():
    k = 576
    x = rand_activation(9, k, outliers=3, generator=_gen(7))
    lay = _layout(k, 1, seed=2)
    for mode in L.SCALE_MODES:
        a = R.quantize_activation(x, lay, mode)
        b = R.quantize_activation(x, lay.with_clip(1.0), mode)
        assert torch.equal(a.q4, b.q4) and torch.equal(a.q8, b.q8) and torch.equal(a.scales, b.scales)
    c = 0.8
    a = R.quantize_activation(x, lay, "block")
    b = R.quantize_activation(x, lay.with_clip(c), "block")
    is8 = lay.block_bits == 8
    assert torch.equal(b.scales[:, is8], a.scales[:, is8]) and torch.equal(b.q8, a.q8)
    absmax = R.pad_last_dim(x[:, lay.perm], lay.k_pad).view(9, -1, 128).abs().amax(-1)
    want = (absmax[:, ~is8] * c) / torch.full_like(absmax[:, ~is8], 7.0)
    assert torch.equal(b.scales[:, ~is8], want)
    q4 = L.unpack_int4(b.q4)
    assert int(q4.abs().max()) == 7 and bool((q4.abs() == 7).sum() > (L.unpack_int4(a.q4).abs() == 7).sum())
    # class mode: the shared INT4 scale is clipped, the INT8 one is not
    ac, bc = R.quantize_activation(x, lay, "class"), R.quantize_activation(x, lay.with_clip(c), "class")
    assert torch.equal(bc.scales[:, 1], ac.scales[:, 1])
    assert torch.equal(bc.scales[:, 0], (absmax[:, ~is8].amax(1) * c) / torch.full((9,), 7.0))


@pytest.mark.parametrize("bad, exc", [(0.0, ValueError), (1.5, ValueError), (True, TypeError), ("0.9", TypeError)])
def test_layout_rejects_bad_clip(bad, exc):
    with pytest.raises(exc, match="int4_clip"):
        L.ActivationLayout(torch.arange(128), torch.tensor([4], dtype=torch.int32), bad)


def test_search_act_clip_prefers_clipping_heavy_tails_and_errors():
    k, n = 256, 32
    gen = _gen(8)
    x = torch.randn(512, k, generator=gen) ** 3  # heavy tails: clipping helps
    w = rand_weight(n, k, generator=gen)
    lay = L.ActivationLayout.identity(k, 4)
    c = search_act_clip(x, lay, [w])
    assert c in ACT_CLIP_RATIOS and c < 1.0  # search_act_clip returns the candidate as given
    # the chosen ratio really has the least output error of the candidates
    def err(r):
        xq = R.quantize_activation(x, lay.with_clip(r))
        return float(((R.dequantize_activation(xq) - R.pad_last_dim(x, lay.k_pad)) @ R.pad_last_dim(w, lay.k_pad).T).pow(2).sum())
    assert err(c) <= min(err(r) for r in ACT_CLIP_RATIOS) * (1 + 1e-6)
    assert search_act_clip(x, L.ActivationLayout.identity(k, 8), [w]) == 1.0  # no INT4 blocks
    with pytest.raises(ValueError, match="samples shape"):
        search_act_clip(x[:, :100], lay, [w])
    with pytest.raises(ValueError, match="needs the weights"):
        search_act_clip(x, lay, [])
    with pytest.raises(ValueError, match="clip ratios"):
        search_act_clip(x, lay, [w], ratios=(1.0, 0.0))


# ---------------------------------------------------------------- config, quantize_, save/load
@pytest.mark.parametrize("kw, exc, match", [
    (dict(act_clip=0.0), ValueError, "act_clip"),
    (dict(act_clip="best"), ValueError, "act_clip"),
    (dict(act_clip=[0.9]), TypeError, "act_clip"),
    (dict(weight_sym=1), TypeError, "weight_sym"),
    (dict(weight_sym=False, clip_search=True), ValueError, "weight_sym"),
])
def test_config_validation(kw, exc, match):
    with pytest.raises(exc, match=match):
        W4AxConfig(**kw)


@pytest.fixture(scope="module")
def tiny():
    from cometq.testing import tiny_causal_lm

    torch.manual_seed(0)
    model = tiny_causal_lm("llama")
    calib = [torch.randint(0, model.config.vocab_size, (1, 48), generator=_gen(i)) for i in range(3)]
    return model, calib


def test_collect_stats_samples(tiny):
    model, calib = tiny
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and "lm_head" not in n]
    st = collect_stats(model, calib, names, samples=64, progress=False)
    for n in names:
        lin = model.get_submodule(n)
        assert st.samples[n].shape == (64, lin.in_features) and bool(torch.isfinite(st.samples[n]).all())
    q = [n for n in names if n.endswith("q_proj")][0]
    assert st.samples[q] is st.samples[q.replace("q_proj", "k_proj")]  # shared input, shared samples
    with pytest.raises(ValueError, match="samples"):
        collect_stats(model, calib, names, samples=-1, progress=False)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_asym_with_clip_search_save_load(tiny, tmp_path, method):
    import copy

    from cometq import load_quantized, quantize_, save_quantized
    from cometq.nn import W4AxLinear

    model, calib = tiny
    m = copy.deepcopy(model)
    cfg = W4AxConfig(weight_method=method, group_size=32, weight_sym=False, act_clip="search", int8_fraction=0.25)
    quantize_(m, cfg, calib_data=calib, progress=False)
    mods = [x for x in m.modules() if isinstance(x, W4AxLinear)]
    assert mods and all(x.w_offsets is not None for x in mods)
    clips = {float(x.act_clip) for x in mods}
    assert clips <= {L.ActivationLayout(torch.arange(4), torch.tensor([4]), r).int4_clip for r in ACT_CLIP_RATIOS}
    assert all(x.layout().int4_clip == float(x.act_clip) for x in mods)
    ids = calib[0][:, :20]
    with torch.no_grad():
        y = m(ids).logits
    d = save_quantized(m, str(tmp_path / "ck"))
    m2 = load_quantized(d)
    with torch.no_grad():
        y2 = m2(ids).logits
    assert torch.equal(y, y2)
    assert all(x.w_offsets is not None for x in m2.modules() if isinstance(x, W4AxLinear))


def test_fixed_act_clip_lands_in_every_layout(tiny):
    import copy

    from cometq import quantize_
    from cometq.nn import W4AxLinear

    model, calib = tiny
    m = copy.deepcopy(model)
    quantize_(m, W4AxConfig(act_clip=0.9, int8_fraction=0.25), calib_data=calib, progress=False)
    lays = [x.layout() for x in m.modules() if isinstance(x, W4AxLinear)]
    assert lays and all(lay.int4_clip == float(torch.tensor(0.9)) for lay in lays)


# ---------------------------------------------------------------- group-granular FMPQ permutation
@pytest.mark.parametrize("k, gran", [(576, 32), (300, 16), (256, 128), (200, 8)])
def test_fmpq_granularity_moves_whole_runs(k, gran):
    stats = torch.rand(k, generator=_gen(k)) + 0.1
    stats[torch.randperm(k, generator=_gen(1))[:5]] = 50.0  # a few outlier channels
    lay = R.fmpq_calibrate(stats, int8_fraction=0.25, granularity=gran)
    full = k // gran
    runs = lay.perm[: full * gran].view(full, gran)
    # every run is an original aligned run, in order
    assert torch.equal(runs - runs[:, :1], torch.arange(gran).expand(full, gran))
    assert bool((runs[:, 0] % gran == 0).all())
    assert torch.equal(lay.perm[full * gran:], torch.arange(full * gran, k))  # partial run stays last
    # runs sorted by their largest channel
    mx = stats[: full * gran].view(full, gran).amax(1)[runs[:, 0] // gran]
    assert bool((mx[:-1] >= mx[1:]).all())
    # threshold mode covers whole runs holding outliers
    lo = R.fmpq_calibrate(stats, outlier_ratio=10.0, granularity=gran)
    n_runs = int((stats[: full * gran].view(full, gran).amax(1) > 10.0 * float(stats.median())).sum())
    assert lo.n_int8 == -(-n_runs * gran // 128)
    with pytest.raises(ValueError, match="granularity"):
        R.fmpq_calibrate(stats, int8_fraction=0.25, granularity=3)


def _on_q4_1_grid(model, g=32):
    """Put every Linear weight of ``model`` on an asymmetric group-g grid (like GGUF Q4_1)."""
    with torch.no_grad():
        for mod in model.modules():
            if type(mod) is torch.nn.Linear:
                w = mod.weight
                n, k = w.shape
                qw = R.quantize_weight_rtn(w.float(), g, sym=False)
                w.copy_(R.dequantize_weight(qw).to(w.dtype))


def test_asym_fmpq_keeps_a_group_grid_through_the_permutation(tiny):
    """quantize_ with asymmetric g32 weights and FMPQ moving runs of 32 channels reproduces
    weights that already sit on a g32 grid exactly, permutation folds included."""
    import copy

    from cometq import quantize_
    from cometq.nn import W4AxLinear

    model, calib = tiny
    m = copy.deepcopy(model)
    _on_q4_1_grid(m)
    orig = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if type(mod) is torch.nn.Linear}
    quantize_(m, W4AxConfig(weight_method="rtn", group_size=32, weight_sym=False, int8_fraction=0.25,
                            perm_granularity=32), calib_data=calib, progress=False)
    checked = 0
    for n, mod in m.named_modules():
        if not isinstance(mod, W4AxLinear):
            continue
        deq = R.dequantize_weight(mod.quantized_weight())
        lay = mod.layout()
        want = orig[n][:, lay.perm] if not n.endswith("down_proj") else None
        if n.endswith(("gate_proj", "up_proj")):
            # rows reordered by the folded down_proj permutation: match rows by a fingerprint
            r = torch.randn(deq.shape[1], dtype=torch.float64, generator=_gen(0))
            fa, fb = torch.sort(deq.double() @ r).values, torch.sort(want.double() @ r).values
            assert torch.allclose(fa, fb, rtol=0, atol=1e-5), n
        elif want is not None:
            assert torch.allclose(deq, want, rtol=0, atol=2e-6), n
        else:  # down_proj: columns permuted offline, run layout is the identity
            assert lay.is_identity_perm
            r = torch.randn(deq.shape[0], dtype=torch.float64, generator=_gen(1))
            fa = torch.sort(r @ deq.double()).values
            fb = torch.sort(r @ orig[n].double()).values
            assert torch.allclose(fa, fb, rtol=0, atol=1e-5), n
        checked += 1
    assert checked > 0
    # and with single-channel FMPQ (the default) the grid is lost (the case this guards)
    m2 = copy.deepcopy(model)
    _on_q4_1_grid(m2)
    quantize_(m2, W4AxConfig(weight_method="rtn", group_size=32, weight_sym=False, int8_fraction=0.25),
              calib_data=calib, progress=False)
    q = m2.get_submodule([n for n in orig if n.endswith("q_proj")][0])
    n0 = [n for n in orig if n.endswith("q_proj")][0]
    assert not torch.allclose(R.dequantize_weight(q.quantized_weight()), orig[n0][:, q.layout().perm], atol=2e-6)


def test_act_clip_auto_resolves_by_act_bits():
    assert W4AxConfig().clip == "search"  # FMPQ calibrates anyway
    assert W4AxConfig(act_bits=4).clip == 1.0 and W4AxConfig(act_bits=16).clip == 1.0
    assert W4AxConfig(act_bits=4, act_clip="search").clip == "search"
    assert W4AxConfig(act_clip=0.85).clip == 0.85


def test_true_sequential_stages_and_effect(tiny):
    """gptq_true_sequential: q/k/v, then o_proj, then the MLP (gate/up/down together); o_proj's
    and the MLP's Hessians then come from the partly quantized layer, so the weights differ."""
    import copy

    from cometq import quantize_
    from cometq.calibrate import collect_stats_with
    from cometq.nn import W4AxLinear
    from cometq.quantize import _true_sequential_stages

    model, calib = tiny
    layer = model.model.layers[0]
    names = [f"model.layers.0.{n}" for n, m in layer.named_modules() if type(m) is torch.nn.Linear]
    mods = {n: model.get_submodule(n) for n in names}
    ids = calib[0]

    def run(i):
        return model(ids)

    st = collect_stats_with(mods, 1, run)
    stages = _true_sequential_stages(model, names, st, run)
    short = [sorted(x.rsplit(".", 1)[1] for x in s) for s in stages]
    assert short == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["down_proj", "gate_proj", "up_proj"]]
    outs = []
    for ts in (False, True):
        m = copy.deepcopy(model)
        quantize_(m, W4AxConfig(weight_method="gptq", gptq_true_sequential=ts, group_size=32), calib_data=calib,
                  progress=False)
        outs.append(m)
        assert all(not x.fast_path for x in m.modules() if isinstance(x, W4AxLinear))  # default restored
    a, b = (o.model.layers[0] for o in outs)
    assert torch.equal(a.self_attn.q_proj.qweight, b.self_attn.q_proj.qweight)  # first stage: same Hessian
    assert not torch.equal(a.self_attn.o_proj.qweight, b.self_attn.o_proj.qweight)
    assert not torch.equal(a.mlp.down_proj.qweight, b.mlp.down_proj.qweight)
