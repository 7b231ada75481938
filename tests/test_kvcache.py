"""KV4Cache: the transformers drop-in 4-bit KV cache."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from cometq.kvcache import KV4Cache, KV4Config, KV4Layer  # noqa: E402
from cometq.reference import dequantize_kv4, quantize_kv4  # noqa: E402
from cometq.testing import KVCACHE_LOGIT_REL_TOL  # noqa: E402


def tiny_llama(heads=4, kv_heads=2, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64 * heads, intermediate_size=192, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _kv(b, h, t, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g) + torch.randn(d, generator=g), torch.randn(b, h, t, d, generator=g)


@pytest.mark.parametrize("cfg", [KV4Config("channel", "token", 32, 0), KV4Config("token", "token", 64, 0),
                                 KV4Config("channel", "channel", 16, 24)])
def test_layer_update_is_reference_quantization(cfg):
    """What a layer returns is exactly dequantize(quantize_kv4(old whole groups)) + exact recent tokens."""
    layer = KV4Layer(cfg)
    k, v = _kv(2, 3, 150)
    steps = [70, 1, 1, 33, 1, 44]
    pos = 0
    for n in steps:
        ko, vo = layer.update(k[..., pos : pos + n, :], v[..., pos : pos + n, :])
        # before this update `pos` tokens were stored; the quantized ones are the
        # first multiple of G that leaves >= residual tokens in full precision
        nq = max(0, (pos - cfg.residual_length) // cfg.group_size * cfg.group_size)
        want_k = torch.cat([dequantize_kv4(quantize_kv4(k[..., :nq, :], cfg.group_size, cfg.key_axis)), k[..., nq : pos + n, :]], -2) if nq else k[..., : pos + n, :]
        want_v = torch.cat([dequantize_kv4(quantize_kv4(v[..., :nq, :], cfg.group_size, cfg.value_axis)), v[..., nq : pos + n, :]], -2) if nq else v[..., : pos + n, :]
        assert torch.equal(ko, want_k) and torch.equal(vo, want_v)
        pos += n
        assert layer.get_seq_length() == pos
        assert layer.quantized_length + layer.keys.shape[-2] == pos
        assert cfg.residual_length <= layer.keys.shape[-2] < cfg.residual_length + cfg.group_size
    assert layer.nbytes() < k.numel() * 4 * 2  # smaller than the fp32 K+V it holds


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (8, 2)])
def test_generate_close_to_full_precision(heads, kv_heads):
    model = tiny_llama(heads, kv_heads)
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    cache = KV4Cache(model.config)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, past_key_values=cache,
                         pad_token_id=0)
    assert out.shape == (2, 57)
    assert cache.get_seq_length() == 56
    assert cache.layers[0].quantized_length == 56 // 32 * 32
    # logits of every position of a continuation, scored through each cache
    cont = out[:, 45:]
    logits = {}
    for name, c in (("fp", DynamicCache()), ("kv4", KV4Cache(model.config))):
        with torch.no_grad():
            model(ids, past_key_values=c)
            steps = [model(cont[:, i : i + 1], past_key_values=c).logits for i in range(cont.shape[1])]
        logits[name] = torch.cat(steps, 1)
    rel = (logits["kv4"] - logits["fp"]).abs().max() / logits["fp"].std()
    assert float(rel) < KVCACHE_LOGIT_REL_TOL
    assert float(rel) > 0  # the cache really quantized something


def test_long_residual_is_exact():
    """residual_length beyond the sequence: nothing is quantized and generate equals DynamicCache."""
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    a = model.generate(ids, **kw)
    c = KV4Cache(model.config, residual_length=64)
    b = model.generate(ids, past_key_values=c, **kw)
    assert torch.equal(a, b)
    assert c.layers[0].quantized_length == 0


def test_beam_search_and_batch_ops():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    c = KV4Cache(model.config, group_size=16)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, num_beams=2, do_sample=False,
                         past_key_values=c, pad_token_id=0)
    assert out.shape[0] == 2
    layer = c.layers[0]
    n = layer.qkeys.packed.shape[0]
    layer.batch_select_indices(torch.tensor([0]))
    assert layer.qkeys.packed.shape[0] == 1 and layer.keys.shape[0] == 1 and n == 4
    layer.batch_repeat_interleave(3)
    assert layer.qvalues.scale.shape[0] == 3
    c.reset()
    assert c.get_seq_length() == 0 and layer.qkeys is None


def test_lazy_layers_without_config():
    model = tiny_llama()
    c = KV4Cache()
    ids = torch.randint(0, 256, (1, 33))
    with torch.no_grad():
        model(ids, past_key_values=c)
    assert len(c.layers) == 2 and c.layers[1].quantized_length == 32


def test_config_and_errors():
    with pytest.raises(ValueError, match="key_axis"):
        KV4Config(key_axis="head")
    with pytest.raises(ValueError, match="group_size"):
        KV4Config(group_size=3)
    with pytest.raises(ValueError, match="residual_length"):
        KV4Config(residual_length=-1)
    with pytest.raises(ValueError, match="either kv4"):
        KV4Cache(None, kv4=KV4Config(), group_size=32)
    with pytest.raises(TypeError, match="KV4Config"):
        KV4Layer("channel")
    layer = KV4Layer(KV4Config("channel", "token", 48, 0))
    k, v = _kv(1, 1, 4)
    with pytest.raises(ValueError, match="head_dim % group_size"):
        layer.update(k, v)
    layer = KV4Layer()
    with pytest.raises(NotImplementedError):
        layer.crop(-1)
    cfg = tiny_llama().config
    cfg.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="sliding_attention"):
        KV4Cache(cfg)
    with pytest.raises(ValueError, match="differ"):
        KV4Layer().update(torch.randn(1, 1, 2, 64), torch.randn(1, 1, 3, 64))


@pytest.mark.slow
def test_smollm2_generate_with_kv4cache():
    from cometq.models import load_model

    model, tok = load_model()
    ids = tok("The Python language reference says that a class definition", return_tensors="pt").input_ids
    prompt = torch.cat([ids] * 4, 1)  # > 32 tokens so the prompt itself is stored in 4 bits
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
              pad_token_id=tok.eos_token_id or 0)
    ref = model.generate(prompt, **kw)[0, prompt.shape[1]:]
    c = KV4Cache(model.config)
    out = model.generate(prompt, past_key_values=c, **kw)[0, prompt.shape[1]:]
    assert c.layers[0].quantized_length >= 32
    text = tok.decode(out)
    assert isinstance(text, str) and len(text.strip()) > 0
    # the continuation scored through the KV4 cache stays close to full precision:
    # mean NLL of the fp-greedy tokens within 0.5 nats of the fp cache's
    nll = {}
    for name, cache in (("fp", DynamicCache()), ("kv4", KV4Cache(model.config))):
        with torch.no_grad():
            last = model(prompt, past_key_values=cache).logits[:, -1:]
            tot = 0.0
            for t in ref.tolist():
                tot -= float(torch.log_softmax(last[0, -1].float(), -1)[t])
                last = model(torch.tensor([[t]]), past_key_values=cache).logits
        nll[name] = tot / len(ref)
    assert nll["kv4"] - nll["fp"] < 0.5, nll
