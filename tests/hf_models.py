"""Tiny random Hugging Face models of each supported family, saved with save_pretrained.

    from tests.hf_models import make_hf_model, FAMILIES
    path = make_hf_model("qwen3", tmp_path / "qwen3", tie_word_embeddings=True)

Shared by the model, runtime and benchmark tests: the directory holds config.json,
generation_config.json, model.safetensors (or shards) and a byte-level tokenizer (259 tokens:
<pad>=0, <s>=1, </s>=2, then the 256 bytes), so LLM(path) works end to end offline.

The weights are deliberately not HF's defaults: matrices have std 0.2 (HF's 0.02 makes every
attention row nearly uniform, which would hide RoPE, mask and cache bugs), and norm weights and
biases are random (HF starts them at 1 and 0, which would hide a missing or swapped norm).
"""
from __future__ import annotations

import os

import torch

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")
VOCAB_SIZE = 259          # the byte-level tokenizer below: 3 specials + 256 bytes
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

_BASE = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False,
             pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)

# family -> (transformers config class, model class, family-specific config overrides)
_FAMILY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    # Llama 3 RoPE scaling with a small original context so all three frequency bands
    # (kept, smoothed, divided by factor) occur at head_dim 16.
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=10000.0, rope_scaling=dict(rope_type="llama3", factor=8.0,
                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=64))),
    # A window smaller than the test sequences, so it actually masks.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8, head_dim=16)),
    # Qwen2 configs ship use_sliding_window=False next to a (then unused) sliding_window.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False,
                                                      sliding_window=16)),
    # Qwen3: head_dim 24 != hidden / heads (16), q/k norm.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
}


def hf_config(family: str, **overrides):
    """The transformers config object of a tiny model of ``family``."""
    import transformers
    if family not in _FAMILY:
        raise ValueError(f"family: {family!r} is not one of {FAMILIES}")
    cfg_cls, _, extra = _FAMILY[family]
    kw = {**_BASE, **extra, **overrides}
    return getattr(transformers, cfg_cls)(**kw)


@torch.no_grad()
def build_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model (float32, eager attention, eval mode) of ``family``."""
    import transformers
    cfg = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, _FAMILY[family][1])._from_config(
        cfg, attn_implementation="eager", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)        # norm weights in [0.5, 1.5)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def make_tokenizer():
    """A byte-level BPE tokenizer without merges: every byte is one token (ids 3..258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def make_hf_model(family: str, path, *, seed: int = 0, tokenizer: bool = True,
                  max_shard_size: str | None = None, **overrides) -> str:
    """Build a tiny random ``family`` model ("llama", "llama3", "mistral", "qwen2", "qwen3"),
    save_pretrained it (and a tokenizer) to ``path``; returns the path as a str.

    overrides go to the transformers config (e.g. tie_word_embeddings=True,
    num_hidden_layers=3); max_shard_size (e.g. "20KB") writes a sharded checkpoint.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model = build_hf_model(family, seed=seed, **overrides)
    kw = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(path, **kw)
    if tokenizer:
        make_tokenizer().save_pretrained(path)
    return path
