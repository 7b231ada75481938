"""A tiny offline byte-level tokenizer + random Llama model for tests, load tests and demos.

The tokenizer maps every byte to one token (ids 0..255, GPT-2 byte-to-unicode
alphabet, no merges) plus ChatML specials, so multi-byte UTF-8 characters span
several tokens: exactly the case incremental detokenization must get right.
"""
from __future__ import annotations

from .sampling import bytes_to_unicode

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` with 260 tokens: 256 bytes, then SPECIALS (eos = <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|pad|>",
                                  bos_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML
    return tok


def tiny_model(vocab: int = 260, seed: int = 0, layers: int = 2, max_positions: int = 512):
    """A tiny random LlamaForCausalLM (hidden 192, 3 heads / 1 KV head, head_dim 64)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=192, intermediate_size=320, num_hidden_layers=layers,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=64,
                         max_position_embeddings=max_positions, bos_token_id=256, eos_token_id=257,
                         pad_token_id=258)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()
