"""Llama-family decoders over ragged batches, with config and Hugging Face weight loading.

    from model import ModelConfig, load_model, PRESETS
    m = load_model("path/to/hf_dir" | "tiny" | ModelConfig(...), dtype="bfloat16", device="cuda")
    kv = m.allocate_kv_cache(num_blocks, block_size)
    logits = m(input_ids, positions, attn_metadata, kv, logits_indices)   # [S, vocab] float32
"""
from .config import ARCHITECTURES, ModelConfig
from .llama import LlamaForCausalLM
from .loader import load_model, resolve_dtype
from .presets import PRESETS

__all__ = ["ARCHITECTURES", "ModelConfig", "LlamaForCausalLM", "load_model", "resolve_dtype",
           "PRESETS"]
