"""Perplexity harness and the scheme comparison (tiny models; the real table is docs/ACCURACY.md)."""
import math

import pytest
import torch
from torch import nn

from cometq import reference as R
from cometq.config import W4AxConfig
from cometq.eval import FakeQuantLinear, compare_schemes, format_table, perplexity, scheme_name
from cometq.layout import ActivationLayout
from cometq.testing import rand_activation, tiny_causal_lm


def _wins(n, t, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, t), generator=g) for _ in range(n)]


def test_perplexity_matches_hf_loss():
    model = tiny_causal_lm("llama")
    wins = _wins(3, 24, 0)
    with torch.no_grad():
        losses = [float(model(w, labels=w).loss) for w in wins]
    # equal-length windows: mean of per-window means == mean over all tokens
    assert perplexity(model, wins) == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    # a 2-D tensor is one window; a 1-D window is accepted
    assert perplexity(model, wins[0]) == pytest.approx(math.exp(losses[0]), rel=1e-5)
    assert perplexity(model, [wins[0][0]]) == pytest.approx(math.exp(losses[0]), rel=1e-5)


def test_perplexity_errors():
    model = tiny_causal_lm("llama", layers=1)
    with pytest.raises(ValueError, match="at least one window"):
        perplexity(model, [])
    with pytest.raises(TypeError, match=r"windows\[0\]"):
        perplexity(model, [torch.randn(1, 8)])
    with pytest.raises(ValueError, match="T >= 2"):
        perplexity(model, [torch.zeros(1, 1, dtype=torch.long)])


def test_fake_quant_linear_w8a8_close_to_fp():
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(300, 50)
    x = rand_activation(7, 300, generator=gen)
    fq = FakeQuantLinear(lin, ActivationLayout.identity(300, 8), scale_mode="class", weight_bits=8)
    with torch.no_grad():
        y, want = fq(x), lin(x)
    assert not torch.equal(y, want)
    assert float((y - want).norm() / want.norm()) < 0.02  # INT8 both sides: ~1% error
    with pytest.raises(ValueError, match="weight_bits"):
        FakeQuantLinear(lin, ActivationLayout.identity(300, 8), weight_bits=4)


def test_compare_schemes_rows_and_model_untouched():
    model = tiny_causal_lm("qwen2")
    calib, wins = _wins(2, 32, 1), _wins(2, 32, 2)
    with torch.no_grad():
        before = model(wins[0]).logits
    schemes = ["fp", "w8a8", ("act_fmpq", 0.25), W4AxConfig(act_bits=16), W4AxConfig(int8_fraction=0.5)]
    lines = []
    rows = compare_schemes(model, calib, wins, schemes, progress=False, log=lines.append)
    assert [r["scheme"] for r in rows] == [scheme_name(s) for s in schemes]
    assert rows[0]["ratio"] == 1.0 and rows[0]["ppl"] == pytest.approx(perplexity(model, wins))
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows)
    assert rows[1]["ratio"] == pytest.approx(1.0, abs=0.05)  # W8A8 is nearly lossless
    with torch.no_grad():
        assert torch.equal(model(wins[0]).logits, before)  # each scheme ran on a copy
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "W4 asym RTN g128 A16 (weight-only)" in table
    assert len(lines) == len(rows) + 1  # calibration line + one per scheme


def test_study_scheme_lists_have_distinct_names():
    from cometq.eval import crux_study_schemes, default_schemes, gptq_study_schemes, mse_study_schemes, v2_study_schemes

    for schemes in (default_schemes(), gptq_study_schemes(), v2_study_schemes(), mse_study_schemes(),
                    crux_study_schemes()):
        names = [scheme_name(s) for s in schemes]
        assert len(set(names)) == len(names), names
    names = [scheme_name(s) for s in mse_study_schemes()]
    # the default recipe is named with its MSE ranges; the pinned older recipes are not
    assert "W4 asym GPTQ seq true-seq mse g32 A-clip-search FMPQ 25.0% INT8 blocks" in names
    assert "W4 asym GPTQ seq true-seq g32 A-clip-search FMPQ 25.0% INT8 blocks" in names
    assert not any(" mse" in scheme_name(s) for s in v2_study_schemes() + gptq_study_schemes() + default_schemes())
