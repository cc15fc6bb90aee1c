"""LLM: the offline API users know from vLLM.

    llm = LLM("path/to/hf_dir" | "tiny", max_num_batched_tokens=512)
    outs = llm.generate([[1, 5, 9], "some text"], SamplingParams(max_tokens=32))
"""
from __future__ import annotations

import numbers
import os

import torch

from .config import EngineConfig
from .engine import Engine
from .sampling import SamplingParams
from .sequence import RequestOutput

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class _LazyTokenizer:
    """transformers' AutoTokenizer, loaded on first use (importing transformers and reading
    the tokenizer costs seconds; token-id workloads never pay it)."""

    def __init__(self, path: str):
        self.path, self._tok = path, None

    def _get(self):
        if self._tok is None:
            from transformers import AutoTokenizer
            self._tok = AutoTokenizer.from_pretrained(self.path)
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._get().encode(text)

    def decode(self, ids, **kw) -> str:
        return self._get().decode(ids, **kw)


def _tokenizer_for(model) -> _LazyTokenizer | None:
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(model):
        if any(os.path.exists(os.path.join(model, f)) for f in _TOKENIZER_FILES):
            return _LazyTokenizer(os.fspath(model))
    return None


class LLM:
    def __init__(self, model, *, dtype=None, device=None, block_size: int = 16,
                 num_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_batched_tokens: int | None = None, max_num_seqs: int = 256,
                 max_model_len: int | None = None, policy: str = "continuous",
                 enable_prefix_caching: bool = True, backend=None, seed: int = 0,
                 queue_order: str = "fcfs", cuda_graphs: bool | None = None,
                 async_scheduling: bool | None = None, kv_cache_dtype: str = "auto",
                 kv_scales=None):
        """model: a HF directory, a preset name, a ModelConfig, or an already loaded model.
        dtype: torch dtype or name; None = the checkpoint's dtype (float32 for presets without
        one). device: None = "cuda" when available, else "cpu". kv_cache_dtype: "auto" or
        "fp8_e4m3" (kv_scales: None for per-slot scales, or per-tensor (k_scale, v_scale))."""
        config = EngineConfig(block_size=block_size, num_blocks=num_blocks,
                              gpu_memory_utilization=gpu_memory_utilization,
                              max_num_batched_tokens=max_num_batched_tokens,
                              max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                              policy=policy, queue_order=queue_order,
                              enable_prefix_caching=enable_prefix_caching, seed=seed,
                              cuda_graphs=cuda_graphs, async_scheduling=async_scheduling,
                              kv_cache_dtype=kv_cache_dtype, kv_scales=kv_scales)
        if isinstance(model, torch.nn.Module) or hasattr(model, "allocate_kv_cache"):
            loaded = model
        else:
            from model import load_model   # the runtime depends on model/, never the reverse
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            loaded = load_model(model, dtype=dtype, device=device, backend=backend, seed=seed)
        self.engine = Engine(loaded, config, tokenizer=_tokenizer_for(model))
        self._counter = 0

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: one prompt (str or list of token ids) or a list of them. sampling_params:
        None (defaults), one SamplingParams for all, or a list (one per prompt). Returns the
        finished RequestOutputs in input order."""
        prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
        if prompts and isinstance(prompts[0], numbers.Integral):    # one prompt of token ids
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params: {len(sampling_params)} given for {len(prompts)} prompts")
        engine, ids = self.engine, []
        try:
            for prompt, params in zip(prompts, sampling_params):
                rid = f"llm-{self._counter}"
                engine.add_request(rid, prompt, params)
                self._counter += 1
                ids.append(rid)
        except ValueError:
            for rid in ids:                      # all or nothing: leave the engine clean
                engine.abort(rid)
            raise
        pbar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            pbar = tqdm(total=len(ids), desc="generate", unit="req")
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
                    if pbar is not None:
                        pbar.update(1)
        if pbar is not None:
            pbar.close()
        return [done[rid] for rid in ids]
