"""ModelConfig: the one description of a Llama-family decoder, read from a HF config.json or a preset.

Every family this package runs (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) is the same decoder with
three switches: a bias on the fused QKV projection (Qwen2), an RMSNorm over head_dim on q and k
before RoPE (Qwen3), and a sliding attention window (Mistral). Anything else a config asks for
(another activation, an o_proj bias, a RoPE type we cannot bake into the cos/sin table, mixed
full/sliding layers) is refused with a ValueError rather than silently run wrong.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace

# HF architecture name -> family switches (qkv bias, q/k norm) that are fixed by the family.
ARCHITECTURES = {
    "LlamaForCausalLM": dict(attention_bias=False, qk_norm=False),
    "MistralForCausalLM": dict(attention_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": dict(attention_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": dict(attention_bias=False, qk_norm=True),
}
# RoPE variants that are fully described by the cos/sin table (kernels.reference.rope_cos_sin_cache).
ROPE_TYPES = ("default", "linear", "llama3")
DTYPE_NAMES = ("float32", "float16", "bfloat16")


@dataclass
class ModelConfig:
    """Shapes and hyper-parameters of a Llama-family decoder (units in the comments)."""

    architecture: str = "LlamaForCausalLM"   # HF class name, one of ARCHITECTURES
    vocab_size: int = 256                     # tokens
    hidden_size: int = 64                     # features of the residual stream
    intermediate_size: int = 128              # features of the MLP's hidden layer
    num_hidden_layers: int = 2                # decoder layers
    num_attention_heads: int = 4              # query heads
    num_key_value_heads: int = 2              # KV heads (GQA); divides num_attention_heads
    head_dim: int = 16                        # features per head (even: RoPE rotates pairs)
    rms_norm_eps: float = 1e-6                # added to the mean square before rsqrt
    rope_theta: float = 10000.0               # RoPE base (wavelength scale, in positions)
    rope_scaling: dict | None = None          # None or {"rope_type": "linear" | "llama3", ...}
    max_position_embeddings: int = 2048       # positions (size of the cos/sin table)
    tie_word_embeddings: bool = False         # lm_head shares the embedding matrix
    attention_bias: bool = False              # bias on the fused q/k/v projection (Qwen2)
    qk_norm: bool = False                     # RMSNorm of q and k over head_dim (Qwen3)
    sliding_window: int | None = None         # tokens a query sees (itself included); None = all
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    dtype: str | None = None                  # checkpoint dtype name ("bfloat16", ...), if known
    name_or_path: str = ""                    # HF directory or preset name it came from

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture: {self.architecture!r} is not supported "
                             f"(supported: {', '.join(ARCHITECTURES)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: must be a positive int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim: must be even (RoPE rotates pairs), got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps: must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta: must be > 0, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported "
                                 f"(supported: {', '.join(ROPE_TYPES)})")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window <= 0):
            raise ValueError(f"sliding_window: must be None or a positive int (tokens), "
                             f"got {self.sliding_window!r}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {DTYPE_NAMES}")
        self.eos_token_id = list(self.eos_token_id)

    # ------------------------------------------------------------------ derived sizes
    @property
    def qkv_size(self) -> int:
        """Output features of the fused QKV projection: (Hq + 2 Hkv) * head_dim."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count (elements); a tied lm_head is counted once, as HF does."""
        H, I, D = self.hidden_size, self.intermediate_size, self.head_dim
        per_layer = (H * self.qkv_size + (self.qkv_size if self.attention_bias else 0)
                     + self.num_attention_heads * D * H          # o_proj
                     + 3 * H * I                                  # gate, up, down
                     + 2 * H + (2 * D if self.qk_norm else 0))    # norms
        embed = self.vocab_size * H * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_hidden_layers * per_layer + H

    def to_dict(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        from .presets import PRESETS
        if name not in PRESETS:
            raise ValueError(f"preset: {name!r} is not one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], name_or_path=name)

    @classmethod
    def from_hf_config(cls, config: dict | str | os.PathLike) -> "ModelConfig":
        """From a HF config.json: a dict, the file, or its directory (whose
        generation_config.json, if present, adds its eos ids)."""
        name, extra_eos = "", []
        if not isinstance(config, dict):
            path = os.fspath(config)
            name = path
            if os.path.isdir(path):
                gen = os.path.join(path, "generation_config.json")
                if os.path.exists(gen):
                    with open(gen) as f:
                        extra_eos = _id_list(json.load(f).get("eos_token_id"))
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise ValueError(f"config: no config.json at {path}")
            with open(path) as f:
                config = json.load(f)
        return cls(**_parse_hf(config, name, extra_eos))


def _id_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _parse_hf(c: dict, name: str, extra_eos: list[int]) -> dict:
    archs = c.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(f"architecture: {archs!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    arch = archs[0]
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act: {act!r} is not supported (only 'silu')")
    if c.get("mlp_bias"):
        raise ValueError("mlp_bias: MLP biases are not supported")
    if arch != "Qwen2ForCausalLM" and c.get("attention_bias"):
        # Llama/Qwen3 attention_bias also puts a bias on o_proj, which this model lacks.
        raise ValueError(f"attention_bias: not supported for {arch}")
    heads = c["num_attention_heads"]
    # transformers 5.x keeps RoPE settings in rope_parameters; 4.x in rope_theta/rope_scaling.
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", c.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_parameters: partial_rotary_factor != 1 is not supported")
    scaling = None if kind in (None, "default") else {**rope, "rope_type": kind}
    eos = _id_list(c.get("eos_token_id"))
    eos += [e for e in extra_eos if e not in eos]
    dtype = c.get("dtype", c.get("torch_dtype"))
    return dict(
        architecture=arch, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        sliding_window=_sliding_window(arch, c), bos_token_id=c.get("bos_token_id"),
        eos_token_id=eos, dtype=dtype if dtype in DTYPE_NAMES else None, name_or_path=name,
        **ARCHITECTURES[arch])


def _sliding_window(arch: str, c: dict) -> int | None:
    """One window for all layers, or None; mixed full/sliding layers are refused."""
    window = c.get("sliding_window")
    if arch in ("LlamaForCausalLM", "MistralForCausalLM"):
        return window or None
    # Qwen2/3: the window applies only when use_sliding_window, to layers >= max_window_layers
    # (layer_types spells that out in transformers 5.x).
    n = c["num_hidden_layers"]
    types = c.get("layer_types")
    if types is None:
        first = c.get("max_window_layers", n) if c.get("use_sliding_window") else n
        types = ["full_attention" if i < first else "sliding_attention" for i in range(n)]
    if all(t == "full_attention" for t in types):
        return None
    if all(t == "sliding_attention" for t in types) and window:
        return window
    raise ValueError(f"layer_types: mixed full/sliding attention layers are not supported "
                     f"({types})")
