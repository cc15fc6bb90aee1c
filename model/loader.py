"""load_model: a Llama-family model from a HF directory (safetensors) or at random from a config.

HF checkpoints keep q/k/v and gate/up as separate tensors; the model holds them fused. The
loader reads one tensor at a time with safetensors' safe_open (memory-mapped) and copies it
straight into its row slice of the preallocated fused parameter on the target device, casting
on the way: peak extra host memory is one tensor, never a second copy of the model.
Random init fills the parameters in place on the target device, in the target dtype, so an
8B model needs its bytes once, on the GPU.
Tensor parallelism (tp, model/parallel.py): each rank reads only its rows / columns of each
tensor (safe_open + get_slice), so no rank materialises the full weights; random init draws
every full tensor from the same seeded generator on every rank (one tensor at a time) and keeps
the rank's shard, so tensor_parallel_size N is the same model as 1.
"""
from __future__ import annotations

import json
import os

import torch

from .config import ModelConfig
from .llama import LlamaForCausalLM
from .parallel import SINGLE, TPGroup, take_shard

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype, config: ModelConfig | None = None) -> torch.dtype:
    """A torch dtype or its name; None / "auto" = the checkpoint's dtype, else float32."""
    if dtype is None or dtype == "auto":
        return _DTYPES[config.dtype] if config is not None and config.dtype else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype: {dtype!r} is not supported (float32, float16, bfloat16 or their names)")


def resolve_config(model) -> tuple[ModelConfig, str | None]:
    """(config, HF directory or None) of a HF directory, preset name or ModelConfig."""
    if isinstance(model, ModelConfig):
        cfg, path = model, None
    elif isinstance(model, (str, os.PathLike)) and os.path.isdir(model):
        cfg, path = ModelConfig.from_hf_config(model), os.fspath(model)
    elif isinstance(model, str) and os.path.sep not in model:
        from .presets import PRESETS
        if model not in PRESETS:
            raise ValueError(f"model: {model!r} is neither a directory nor a preset "
                             f"({', '.join(PRESETS)})")
        cfg, path = ModelConfig.preset(model), None
    else:
        raise ValueError(f"model: expected a HF directory, preset name or ModelConfig, got {model!r}")
    return cfg, path


def load_model(model, *, dtype=torch.float32, device="cpu", backend=None, seed=0,
               tp: TPGroup = SINGLE) -> LlamaForCausalLM:
    """model: a HF directory (config.json + safetensors), a preset name, or a ModelConfig.

    HF directories load their weights; presets and configs get random weights from ``seed``.
    tp: this rank's tensor-parallel group; the model is then this rank's shard.
    """
    cfg, path = resolve_config(model)
    m = LlamaForCausalLM(cfg, dtype=resolve_dtype(dtype, cfg), device=device, backend=backend,
                         tp=tp)
    if path is None:
        init_random(m, seed)
    else:
        load_safetensors(m, path)
    return m.eval()


# ------------------------------------------------------------------ random init
@torch.no_grad()
def init_random(m: LlamaForCausalLM, seed: int = 0, std: float = 0.02):
    """HF's initializer_range (std 0.02) for matrices, ones for norms, zeros for biases.

    With unit-RMS normed inputs the q/k entries have std 0.02 * sqrt(hidden) (1.3 at 4096)
    and the logits about the same: finite and softmax-friendly in bf16.
    """
    g = torch.Generator(device=m.device).manual_seed(seed)
    for name, p in m.named_parameters():
        if p.dim() == 2 and m.tp.size > 1:       # the same full draw on every rank, then its shard
            full = torch.empty(p.tp_full_shape, dtype=p.dtype, device=p.device)
            p.copy_(take_shard(p, full.normal_(0.0, std, generator=g)))
        elif p.dim() == 2:
            p.normal_(0.0, std, generator=g)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


# ------------------------------------------------------------------ HF safetensors
def hf_weight_map(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF tensor name -> (our parameter name, first row, last row) inside the full fused layout
    (before any tensor-parallel split)."""
    Hq, Hkv, D, I = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                     cfg.intermediate_size)
    q, kv = Hq * D, Hkv * D
    out = {"model.embed_tokens.weight": ("embed_tokens.weight", 0, cfg.vocab_size),
           "model.norm.weight": ("norm", 0, cfg.hidden_size)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", 0, cfg.vocab_size)
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        parts = [("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)]
        for proj, a, b in parts:
            out[f"{hf}self_attn.{proj}.weight"] = (f"{ours}attn.qkv.weight", a, b)
            if cfg.attention_bias:
                out[f"{hf}self_attn.{proj}.bias"] = (f"{ours}attn.qkv.bias", a, b)
        out[f"{hf}self_attn.o_proj.weight"] = (f"{ours}attn.o_proj.weight", 0, cfg.hidden_size)
        if cfg.qk_norm:
            out[f"{hf}self_attn.q_norm.weight"] = (f"{ours}attn.q_norm", 0, D)
            out[f"{hf}self_attn.k_norm.weight"] = (f"{ours}attn.k_norm", 0, D)
        out[f"{hf}mlp.gate_proj.weight"] = (f"{ours}mlp.gate_up.weight", 0, I)
        out[f"{hf}mlp.up_proj.weight"] = (f"{ours}mlp.gate_up.weight", I, 2 * I)
        out[f"{hf}mlp.down_proj.weight"] = (f"{ours}mlp.down.weight", 0, cfg.hidden_size)
        out[f"{hf}input_layernorm.weight"] = (f"{ours}input_norm", 0, cfg.hidden_size)
        out[f"{hf}post_attention_layernorm.weight"] = (f"{ours}post_attn_norm", 0, cfg.hidden_size)
    return out


def _shard_files(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file holding it (single file or sharded index)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise ValueError(f"model: no model.safetensors or model.safetensors.index.json in {path}")
    from safetensors import safe_open
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def shard_reads(p, a: int, b: int):
    """What this rank reads of a HF tensor that fills full rows [a, b) of parameter p: a list
    of (dst view of p, index into the HF tensor) (model/parallel.py's tp_dim / tp_parts)."""
    if p.tp_dim is None:                               # replicated: the whole tensor
        return [(p[a:b], slice(None))]
    out = []
    for f0, l0, n in p.tp_parts:
        if p.tp_dim == 1:                              # row-parallel: this rank's columns
            out.append((p[a:b, l0:l0 + n], (slice(None), slice(f0, f0 + n))))
            continue
        lo, hi = max(a, f0), min(b, f0 + n)            # column/vocab-parallel: rows in [a, b)
        if lo < hi:
            out.append((p[l0 + lo - f0:l0 + hi - f0], slice(lo - a, hi - a)))
    return out


@torch.no_grad()
def load_safetensors(m: LlamaForCausalLM, path: str) -> list[tuple[str, tuple]]:
    """Fill every parameter of ``m`` (this rank's shard) from the HF checkpoint in ``path``;
    extra tensors (e.g. a tied lm_head.weight, rotary inv_freq buffers) are ignored, missing
    ones are an error. Returns (HF name, shape read) for every slice read."""
    from safetensors import safe_open

    params = dict(m.named_parameters(remove_duplicate=False))
    wanted = hf_weight_map(m.config)
    files = _shard_files(path)
    missing = [n for n in wanted if n not in files]
    if missing:
        raise ValueError(f"checkpoint: tensor {missing[0]!r} is missing from {path}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    reads = []
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                pname, a, b = wanted[name]
                p = params[pname]
                want = (b - a, *p.tp_full_shape[1:])
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                if shape != want:
                    raise ValueError(f"checkpoint: tensor {name!r} has shape {shape}, expected "
                                     f"{want} from config.json")
                for dst, idx in shard_reads(p, a, b):
                    src = sl[idx]                 # only these rows / columns leave the file
                    reads.append((name, tuple(src.shape)))
                    dst.copy_(src)                # casts and moves one slice at a time
    return reads
