"""W4AxConfig validation, serialization, and the config -> handler registry."""
import dataclasses
import json

import pytest
import torch
from torch import nn

import cometq
from cometq.config import FORMAT_VERSION, W4AxConfig, get_quantize_handler, register_quantize_handler


def test_defaults_fill_fmpq_budget():
    c = W4AxConfig()
    assert c.act_bits == "fmpq" and c.int8_fraction == 0.25 and c.weight_bits == 4
    assert c.fmpq_kwargs() == {"int8_fraction": 0.25, "granularity": 1}
    assert c.skip_modules == ("lm_head",) and c.format_version == FORMAT_VERSION
    assert W4AxConfig(int8_blocks=2).fmpq_kwargs() == {"int8_blocks": 2, "granularity": 1}
    assert W4AxConfig(outlier_ratio=8.0, max_int8_blocks=1).fmpq_kwargs() == {
        "outlier_ratio": 8.0, "max_int8_blocks": 1, "granularity": 1}
    assert W4AxConfig(weight_sym=False, group_size=32).granularity == 1
    assert W4AxConfig(perm_granularity=32, group_size=32, weight_sym=False).fmpq_kwargs()["granularity"] == 32
    assert W4AxConfig(act_bits=16).weight_only and not c.weight_only


@pytest.mark.parametrize("cfg", [
    W4AxConfig(),
    W4AxConfig(group_size=-1, weight_method="gptq", gptq_damp=0.05, act_bits=4),
    W4AxConfig(group_size=32, weight_method="gptq", gptq_sequential=True, gptq_act_order=True),
    W4AxConfig(group_size=256, int8_blocks=1, scale_mode="class", kv4=True, kv_key_axis="token", kv_value_axis="channel", kv_group_size=64, kv_residual_length=16),
    W4AxConfig(outlier_ratio=6.5, max_int8_blocks=2, skip_modules=("lm_head", "mlp.down_proj"), clip_search=True,
               weight_sym=True),
    W4AxConfig(act_bits=16, clip_ratio=0.9, backend="reference", calib_n_samples=3, calib_seq_len=64),
    W4AxConfig(weight_method="gptq", gptq_mse=False),
    W4AxConfig(weight_method="gptq", gptq_mse=True),
])
def test_dict_round_trip_through_json(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["quant_method"] == "cometq"
    back = W4AxConfig.from_dict(d)
    assert back == cfg
    assert isinstance(back.skip_modules, tuple)


def test_frozen():
    c = W4AxConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.group_size = 64


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(weight_bits=8), ValueError, "weight_bits"),
    (dict(group_size=48), ValueError, "group_size=48"),
    (dict(group_size=8), ValueError, "group_size=8"),
    (dict(group_size=0), ValueError, "group_size=0"),
    (dict(group_size=200), ValueError, "group_size=200"),
    (dict(group_size="128"), TypeError, "group_size"),
    (dict(group_size=True), TypeError, "group_size"),
    (dict(weight_method="awq"), ValueError, "'awq'"),
    (dict(clip_ratio=0.0), ValueError, "clip_ratio"),
    (dict(clip_ratio=1.5), ValueError, "1.5"),
    (dict(clip_ratio="0.9"), TypeError, "clip_ratio"),
    (dict(clip_search=True, clip_ratio=0.9), ValueError, "clip_search"),
    (dict(clip_search=1), TypeError, "clip_search"),
    (dict(gptq_damp=0), ValueError, "gptq_damp"),
    (dict(gptq_sequential=1), TypeError, "gptq_sequential"),
    (dict(gptq_sequential="yes"), TypeError, "gptq_sequential"),
    (dict(gptq_mse="on"), TypeError, "gptq_mse"),
    (dict(gptq_mse=1), TypeError, "gptq_mse"),
    (dict(gptq_mse=True, gptq_act_order=True), ValueError, "gptq_act_order"),
    (dict(act_bits=2), ValueError, "act_bits"),
    (dict(act_bits=True), ValueError, "act_bits"),
    (dict(act_bits="int4"), ValueError, "'int4'"),
    (dict(int8_fraction=0.25, int8_blocks=1), ValueError, "exactly one"),
    (dict(int8_fraction=1.5), ValueError, "int8_fraction"),
    (dict(int8_blocks=-1), ValueError, "int8_blocks"),
    (dict(outlier_ratio=0.0), ValueError, "outlier_ratio"),
    (dict(max_int8_blocks=2), ValueError, "max_int8_blocks"),
    (dict(act_bits=4, int8_blocks=1), ValueError, "int8_blocks"),
    (dict(act_bits=16, int8_fraction=0.1), ValueError, "int8_fraction"),
    (dict(scale_mode="tensor"), ValueError, "'tensor'"),
    (dict(kv_key_axis="head"), ValueError, "'head'"),
    (dict(kv_value_axis="row"), ValueError, "kv_value_axis"),
    (dict(kv_residual_length=-1), ValueError, "kv_residual_length"),
    (dict(perm_granularity=3), ValueError, "perm_granularity"),
    (dict(perm_granularity="auto"), ValueError, "perm_granularity"),
    (dict(kv_group_size=3), ValueError, "kv_group_size"),
    (dict(skip_modules="lm_head"), TypeError, "skip_modules"),
    (dict(skip_modules=("",)), TypeError, "skip_modules"),
    (dict(backend="tpu"), ValueError, "'tpu'"),
    (dict(calib_n_samples=0), ValueError, "calib_n_samples"),
    (dict(format_version=FORMAT_VERSION + 1), ValueError, "format_version"),
])
def test_bad_values_raise_naming_them(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        W4AxConfig(**kwargs)


def test_from_dict_errors():
    d = W4AxConfig().to_dict()
    with pytest.raises(ValueError, match="format_version 7"):
        W4AxConfig.from_dict({**d, "format_version": 7})
    with pytest.raises(ValueError, match="no format_version"):
        W4AxConfig.from_dict({k: v for k, v in d.items() if k != "format_version"})
    with pytest.raises(ValueError, match="unknown W4AxConfig keys"):
        W4AxConfig.from_dict({**d, "bits": 3})
    with pytest.raises(ValueError, match="quant_method"):
        W4AxConfig.from_dict({**d, "quant_method": "gptq"})
    with pytest.raises(TypeError, match="dict"):
        W4AxConfig.from_dict("{}")


def test_top_level_exports():
    assert cometq.W4AxConfig is W4AxConfig
    from cometq.quantize import quantize_

    assert cometq.quantize_ is quantize_


def test_handler_registry_dispatches_on_config_type():
    @dataclasses.dataclass(frozen=True)
    class ScaleConfig:
        factor: float

    @register_quantize_handler(ScaleConfig)
    def _scale(model, config, calib_data=None):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(config.factor)
        return model

    lin = nn.Linear(4, 3)
    w0 = lin.weight.detach().clone()
    out = cometq.quantize_(lin, ScaleConfig(2.0))
    assert out is lin and torch.equal(lin.weight, w0 * 2)
    assert get_quantize_handler(ScaleConfig(1.0)) is _scale

    class Unknown:
        pass

    with pytest.raises(TypeError, match="Unknown"):
        cometq.quantize_(lin, Unknown())
    with pytest.raises(TypeError, match="nn.Module"):
        cometq.quantize_("not a model", W4AxConfig())
    with pytest.raises(TypeError, match="config class"):
        register_quantize_handler("ScaleConfig")


def test_config_without_gptq_sequential_loads_with_default():
    """A checkpoint config written before the field existed still loads (field default)."""
    d = W4AxConfig(weight_method="gptq").to_dict()
    del d["gptq_sequential"]
    assert W4AxConfig.from_dict(d).gptq_sequential == W4AxConfig().gptq_sequential


def test_gptq_mse_auto_resolves_and_old_configs_load_without_it():
    assert W4AxConfig().gptq_mse == "auto" and W4AxConfig().mse is True
    assert W4AxConfig(gptq_act_order=True).mse is False  # auto: off under act-order
    assert W4AxConfig(gptq_mse=False).mse is False
    # a checkpoint config from before the field: its weights were quantized without it
    d = W4AxConfig(weight_method="gptq").to_dict()
    del d["gptq_mse"]
    assert W4AxConfig.from_dict(d).gptq_mse is False
