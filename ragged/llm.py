"""LLM: the offline API users know from vLLM.

    llm = LLM("path/to/hf_dir" | "tiny", max_num_batched_tokens=512)
    llm = LLM("tiny", speculative=dict(method="ngram"))  # speculative decoding: docs/speculative.md
    outs = llm.generate([[1, 5, 9], "some text"], SamplingParams(max_tokens=32))

    with LLM("path/to/hf_dir", tensor_parallel_size=2) as llm:   # sharded over 2 processes
        ...                                                    # close() ends the workers
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


def _tokenizer_for(model):
    """The HF directory's tokenizer, or for a preset name the preset tokenizer (model/tokenizer.py)."""
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(model):
        if any(os.path.exists(os.path.join(model, f)) for f in _TOKENIZER_FILES):
            return _LazyTokenizer(os.fspath(model))
    elif isinstance(model, str):
        from model import PRESETS
        if model in PRESETS:
            from model.tokenizer import preset_tokenizer
            return preset_tokenizer(PRESETS[model].vocab_size)
    return None


class LLM:
    def __init__(self, model, *, dtype=None, device=None, block_size: int = 16,
                 num_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_batched_tokens: int | None = None, max_num_seqs: int = 256,
                 max_model_len: int | None = None, policy: str = "continuous",
                 enable_prefix_caching: bool = True, backend=None, seed: int = 0, speculative=None,
                 queue_order: str = "fcfs", cuda_graphs: bool | None = None,
                 async_scheduling: bool | None = None, tensor_parallel_size: int = 1,
                 kv_cache_dtype: str = "auto", kv_scales=None):
        """model: a HF directory, a preset name, a ModelConfig, or an already loaded model.
        dtype: torch dtype or name; None = the checkpoint's dtype (float32 for presets without
        one). device: None = "cuda" when available, else "cpu". tensor_parallel_size N > 1:
        the model is sharded over N processes (ragged/distributed.py; docs/tensor_parallel.md).
        kv_cache_dtype: "auto" or "fp8_e4m3" (kv_scales: None for per-slot scales, or
        per-tensor (k_scale, v_scale))."""
        config = EngineConfig(block_size=block_size, num_blocks=num_blocks,
                              gpu_memory_utilization=gpu_memory_utilization,
                              max_num_batched_tokens=max_num_batched_tokens,
                              max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                              policy=policy, queue_order=queue_order, speculative=speculative,
                              enable_prefix_caching=enable_prefix_caching, seed=seed,
                              cuda_graphs=cuda_graphs, async_scheduling=async_scheduling,
                              tensor_parallel_size=tensor_parallel_size,
                              kv_cache_dtype=kv_cache_dtype, kv_scales=kv_scales)
        if tensor_parallel_size > 1:
            from .distributed import launch
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            loaded = launch(model, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                            device=device, backend=backend, seed=seed)
        elif isinstance(model, torch.nn.Module) or hasattr(model, "allocate_kv_cache"):
            loaded = model
        else:
            from model import load_model   # the runtime depends on model/, never the reverse
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            loaded = load_model(model, dtype=dtype, device=device, backend=backend, seed=seed)
        try:
            self.engine = Engine(loaded, config, tokenizer=_tokenizer_for(model))
        except BaseException:
            self._close_model(loaded)
            raise
        self._counter = 0

    @staticmethod
    def _close_model(m) -> None:
        close = getattr(m, "close", None)          # ragged.distributed.TPModel
        if close is not None:
            close()

    def close(self) -> None:
        """End the tensor-parallel workers (no-op at one rank). Idempotent."""
        self._close_model(self.engine.model)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            rid = f"llm-{self._counter}"
            try:
                engine.add_request(rid, prompt, params)
            except ValueError as e:
                for r in ids:                    # all or nothing: leave the engine clean
                    engine.abort(r)
                raise ValueError(f"prompts[{i}]: {e}") from e
            self._counter += 1
            ids.append(rid)
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
