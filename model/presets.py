"""Named model shapes for random-weight runs: `tiny` for tests, full sizes for GPU benchmarks.

The full-size presets copy the published config.json numbers (no download needed): they
exist so benchmarks can measure the real weight and KV-cache traffic of those models.
"""
from __future__ import annotations

from .config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # Small enough for the Triton interpreter, awkward enough to catch layout bugs:
    # GQA group 2, vocab not a power of two, qkv bias and q/k norm both on.
    "tiny": ModelConfig(
        architecture="Qwen3ForCausalLM", vocab_size=259, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
        tie_word_embeddings=True, qk_norm=True, bos_token_id=1, eos_token_id=[2],
        dtype="float32"),
    # The CPU main job's model (python -m bench.e2e on CPU): 3.4M parameters, large enough that
    # a decode step's matmuls, not the Python around them, set its time on 2 cores, small
    # enough that 128 requests through 5 systems x 3 repeats stay near two minutes.
    "small": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=4096, hidden_size=256,
        intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=[2], dtype="float32"),
    # meta-llama/Meta-Llama-3-8B: 8,030,261,248 parameters.
    "llama3-8b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=[128001], dtype="bfloat16"),
    # Qwen/Qwen3-0.6B: 596,049,920 parameters (tied embeddings), head_dim 128 != 1024 / 16.
    "qwen3-0.6b": ModelConfig(
        architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True,
        bos_token_id=151643, eos_token_id=[151645], dtype="bfloat16"),
}
