"""save_quantized -> from_pretrained / load_quantized round trips and integrity errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import cometq
from cometq.config import FORMAT_VERSION
from cometq.checkpoint import COMETQ_CONFIG_NAME, load_quantized, read_cometq_config, save_quantized
from cometq.config import W4AxConfig
from cometq.hf import CheckpointError
from cometq.nn import W4AxLinear
from cometq.testing import tiny_causal_lm


def _ids(t=11):
    return torch.randint(0, 256, (1, t), generator=torch.Generator().manual_seed(9))


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (1, 40), generator=g) for _ in range(2)]


class _Tok:
    def save_pretrained(self, d):
        with open(os.path.join(d, "tokenizer_marker.json"), "w") as f:
            f.write("{}")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A quantized tiny Qwen2 (biases on q/k/v) saved once; its logits on _ids()."""
    model = tiny_causal_lm("qwen2")
    cometq.quantize_(model, W4AxConfig(int8_blocks=1, group_size=64), calib_data=_calib(), progress=False)
    with torch.no_grad():
        logits = model(_ids()).logits
    d = str(tmp_path_factory.mktemp("ckpt") / "q")
    assert save_quantized(model, _Tok(), d) == d
    return d, model, logits


def _copy(saved_dir, tmp_path):
    d = str(tmp_path / "copy")
    shutil.copytree(saved_dir, d)
    return d


def test_files_and_config(saved):
    d, model, _ = saved
    files = set(os.listdir(d))
    assert {"model.safetensors", "config.json", COMETQ_CONFIG_NAME, "tokenizer_marker.json"} <= files
    qc = json.load(open(os.path.join(d, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "cometq" and qc["format_version"] == FORMAT_VERSION and qc["int8_blocks"] == 1
    assert read_cometq_config(d) == model.cometq_config
    sd = load_file(os.path.join(d, "model.safetensors"))
    k = "model.layers.0.self_attn.q_proj."
    assert sd[k + "qweight"].dtype == torch.uint8 and sd[k + "w_scales"].dtype == torch.float32
    assert sd[k + "perm"].dtype == torch.int64 and sd[k + "block_bits"].dtype == torch.int32
    assert k + "weight" not in sd and k + "bias" in sd


def test_from_pretrained_round_trip_is_identical(saved):
    from transformers import AutoModelForCausalLM

    d, model, logits = saved
    for loaded in (AutoModelForCausalLM.from_pretrained(d), load_quantized(d)):
        assert isinstance(loaded.model.layers[1].mlp.down_proj, W4AxLinear)
        assert loaded.cometq_config == model.cometq_config
        for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), n
        with torch.no_grad():
            assert torch.equal(loaded(_ids()).logits, logits)
    out = loaded.generate(_ids(5), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_half_precision_load_keeps_scales_fp32(saved):
    from transformers import AutoModelForCausalLM

    d, model, _ = saved
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    q = m.model.layers[0].self_attn.q_proj
    assert q.w_scales.dtype == torch.float32 and q.qweight.dtype == torch.uint8 and q.perm.dtype == torch.int64
    assert torch.equal(q.w_scales, model.model.layers[0].self_attn.q_proj.w_scales)
    with torch.no_grad():
        y = m(_ids()).logits
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def _rewrite(d, fn):
    p = os.path.join(d, "model.safetensors")
    sd = load_file(p)
    fn(sd)
    save_file(sd, p, metadata={"format": "pt"})


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.w_scales"), "missing tensors"),
    (lambda sd: sd.__setitem__("model.layers.0.extra", torch.zeros(3)), "unexpected tensors"),
    (lambda sd: sd.__setitem__("model.layers.0.self_attn.o_proj.w_scales", torch.ones(192, 2)), r"shape \(192, 2\)"),
    (lambda sd: sd.__setitem__("model.layers.0.mlp.down_proj.perm", sd["model.layers.0.mlp.down_proj.perm"].int()),
     "dtype I32"),
    (lambda sd: sd["model.layers.0.self_attn.k_proj.perm"].__setitem__(0, 1), "corrupted activation layout"),
    (lambda sd: sd["model.layers.0.self_attn.k_proj.block_bits"].__setitem__(0, 5), "corrupted activation layout"),
])
def test_corrupted_checkpoints_raise(saved, tmp_path, corrupt, match):
    from transformers import AutoModelForCausalLM

    d = _copy(saved[0], tmp_path)
    _rewrite(d, corrupt)
    with pytest.raises(CheckpointError, match=match):
        AutoModelForCausalLM.from_pretrained(d)


def test_truncated_file_and_version_errors(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    d = _copy(saved[0], tmp_path)
    p = os.path.join(d, "model.safetensors")
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(Exception, match="(?i)cannot read|incomplete|invalid|error"):
        AutoModelForCausalLM.from_pretrained(d)

    d2 = str(tmp_path / "v2")
    shutil.copytree(saved[0], d2)
    cfg_path = os.path.join(d2, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"]["format_version"] = 99
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="format_version 99"):
        AutoModelForCausalLM.from_pretrained(d2)
    meta = json.load(open(os.path.join(d2, COMETQ_CONFIG_NAME)))
    meta["format_version"] = 99
    json.dump(meta, open(os.path.join(d2, COMETQ_CONFIG_NAME), "w"))
    with pytest.raises(ValueError, match="format_version 99"):
        load_quantized(d2)
    os.remove(os.path.join(d2, COMETQ_CONFIG_NAME))
    with pytest.raises(FileNotFoundError, match="not a cometq checkpoint"):
        load_quantized(d2)


def test_save_errors(tmp_path):
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="no cometq config"):
        save_quantized(model, str(tmp_path / "x"))
    cometq.quantize_(model, W4AxConfig(act_bits=4))
    with pytest.raises(TypeError, match="save_directory"):
        save_quantized(model, 123)
    with pytest.raises(TypeError, match="save_directory"):
        save_quantized(model, _Tok(), str(tmp_path), "extra")


def test_import_is_light_and_registers_on_transformers_import():
    code = (
        "import sys, cometq\n"
        "assert 'transformers' not in sys.modules, 'import cometq pulled in transformers'\n"
        "import transformers\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "assert 'cometq' in AUTO_QUANTIZER_MAPPING and 'cometq' in AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_tied_embeddings_round_trip(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=192, intermediate_size=320, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    cometq.quantize_(model, W4AxConfig(act_bits=4, group_size=-1))
    with torch.no_grad():
        y = model(_ids()).logits
    d = save_quantized(model, str(tmp_path / "tied"))
    assert "lm_head.weight" not in load_file(os.path.join(d, "model.safetensors"))  # tied: stored once
    loaded = load_quantized(d)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, y)


def test_save_after_projection_fusion(tmp_path):
    """A serving runner fuses q/k/v and gate/up (the model's modules become row views of the
    fused weights); saving afterwards still writes every tensor on its own and loads back equal
    (transformers' writer copies views; the plain-module path clones them, ``_owned``)."""
    from cometq.checkpoint import _owned
    from cometq.serve.runner import ModelRunner

    model = tiny_causal_lm("llama")
    cometq.quantize_(model, W4AxConfig(group_size=64), calib_data=_calib(), progress=False)
    ModelRunner.with_fp_pool(model, num_blocks=4, block_size=4)
    q = model.model.layers[0].self_attn.q_proj.qweight
    assert q.untyped_storage().nbytes() > q.numel()  # a view of the fused storage
    with torch.no_grad():
        ref = model(_ids()).logits
    d = str(tmp_path / "fused")
    save_quantized(model, None, d)
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        assert torch.equal(back(_ids()).logits, ref)
    owned = _owned(q)
    assert owned.untyped_storage().nbytes() == owned.numel() and torch.equal(owned, q.cpu())
