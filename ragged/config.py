"""EngineConfig: every knob of the runtime in one validated dataclass.

Units: tokens for lengths and budgets, sequences for max_num_seqs, KV blocks (of block_size
tokens each) for num_blocks, a fraction of total device memory for gpu_memory_utilization.
``None`` means "pick a default at engine start" (see ``resolve``), because the right value
depends on the device and on the model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .spec_decode.config import SpeculativeConfig

POLICIES = ("continuous", "prefill_first", "static")
QUEUE_ORDERS = ("fcfs", "priority")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")      # model/kv_cache.py (the same list)

# Token budget per step when the user gives none. On a GPU 2048 tokens saturate the matmuls of
# a 1-8B model while keeping a decode step's latency bounded (Sarathi-Serve uses 512-2048);
# on CPU every token costs real time, so a smaller budget keeps steps short.
DEFAULT_BATCHED_TOKENS = {"cuda": 2048, "cpu": 256}
# CPU KV cache when num_blocks is not given: a few blocks per sequence slot, and at least two
# maximum-length sequences' worth.
CPU_BLOCKS_PER_SEQ = 4


def _int(name, v, lo, hi=None, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ValueError(f"{name}: must be an int {bound}{' or None' if allow_none else ''}, "
                         f"got {v!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Runtime configuration (validated on construction).

    block_size              tokens per KV block (the triton/cuda kernels need a multiple of 16)
    num_blocks              KV blocks; None: from free GPU memory after a profiling pass, or
                            CPU_BLOCKS_PER_SEQ * max_num_seqs (and >= 2 max-length sequences) on CPU
    gpu_memory_utilization  fraction of total GPU memory the engine may use (weights + KV + work)
    max_num_batched_tokens  token budget of one step, >= max_num_seqs; None: 2048 on GPU, 256
                            on CPU (or max_num_seqs if larger)
    max_num_seqs            at most this many sequences in one step (and running at once)
    max_model_len           prompt + output tokens; None: the model's max_position_embeddings,
                            capped by the KV cache capacity
    policy                  "continuous" (chunked prefill fused with decodes, stall-free),
                            "prefill_first" (whole prompts first, decodes wait), "static"
    queue_order             "fcfs" (arrival order) or "priority" (lower value = more important,
                            as in vLLM; ties by arrival). Preemption picks the least important,
                            latest-admitted running sequence.
    enable_prefix_caching   reuse KV blocks of identical prompt prefixes (full blocks only)
    speculative             None, or a SpeculativeConfig (or a dict of its fields): speculative
                            decoding verified in the fused step (docs/speculative.md)
    seed                    seed of the sampler's generator for requests without their own seed
    async_scheduling        launch step n before reading step n-1's tokens, so host work overlaps
                            the device (ragged/engine.py); None: on for CUDA devices
    cuda_graphs             replay decode-only steps as CUDA graphs (one per batch-size bucket,
                            ragged/graphs.py); None: on for CUDA devices. True on CPU runs the
                            same padded static-buffer path eagerly (nothing to capture; tests)
    tensor_parallel_size    ranks the model is sharded over (ragged/distributed.py); 1 = this
                            process alone, no torch.distributed
    kv_cache_dtype          "auto" (the model dtype) or "fp8_e4m3" (float8_e4m3fn pages, half
                            of bf16's bytes, plus float32 scales: docs/fp8_kv.md)
    kv_scales               fp8 only: None (a scale per token slot and KV head, from each row's
                            amax at write time) or (k_scale, v_scale) per-tensor floats
    """

    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256
    max_model_len: int | None = None
    policy: str = "continuous"
    queue_order: str = "fcfs"
    enable_prefix_caching: bool = True
    speculative: SpeculativeConfig | None = None
    seed: int = 0
    cuda_graphs: bool | None = None
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1
    kv_cache_dtype: str = "auto"
    kv_scales: tuple[float, float] | None = None

    def __post_init__(self):
        _int("block_size", self.block_size, 1, 256)
        _int("num_blocks", self.num_blocks, 1, allow_none=True)
        g = self.gpu_memory_utilization
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {g!r}")
        _int("max_num_batched_tokens", self.max_num_batched_tokens, 1, allow_none=True)
        _int("max_num_seqs", self.max_num_seqs, 1)
        _int("max_model_len", self.max_model_len, 2, allow_none=True)
        # Every running sequence decodes one token per step: a budget below max_num_seqs
        # would leave the latest-admitted sequences' decodes waiting step after step.
        budget = self.max_num_batched_tokens
        if budget is not None and budget < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens: {self.max_num_batched_tokens} is less than "
                             f"max_num_seqs={self.max_num_seqs} (each running sequence needs one "
                             f"token per step); raise it or lower max_num_seqs")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: {self.policy!r} is not one of {POLICIES}")
        if self.queue_order not in QUEUE_ORDERS:
            raise ValueError(f"queue_order: {self.queue_order!r} is not one of {QUEUE_ORDERS}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching: must be a bool, got {self.enable_prefix_caching!r}")
        object.__setattr__(self, "speculative", SpeculativeConfig.coerce(self.speculative))
        _int("seed", self.seed, 0)
        _int("tensor_parallel_size", self.tensor_parallel_size, 1)
        for name in ("cuda_graphs", "async_scheduling"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{name}: must be a bool or None, got {v!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: {self.kv_cache_dtype!r} is not one of "
                             f"{KV_CACHE_DTYPES}")
        ks = self.kv_scales
        if ks is not None:
            if self.kv_cache_dtype != "fp8_e4m3":
                raise ValueError("kv_scales: per-tensor scales need kv_cache_dtype='fp8_e4m3'")
            if not (isinstance(ks, (tuple, list)) and len(ks) == 2 and all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < float("inf")
                    for s in ks)):
                raise ValueError(f"kv_scales: must be None or (k_scale, v_scale), two positive "
                                 f"finite floats, got {ks!r}")
            object.__setattr__(self, "kv_scales", (float(ks[0]), float(ks[1])))

    def kv_cache_kwargs(self) -> dict:
        """Arguments of model.allocate_kv_cache / kv_cache_bytes_per_block for the format ({}
        for "auto": models that predate fp8 are called exactly as before)."""
        if self.kv_cache_dtype == "auto":
            return {}
        return dict(kv_cache_dtype=self.kv_cache_dtype, kv_scales=self.kv_scales)

    def resolve(self, device_type: str, model_max_len: int, num_blocks: int) -> "EngineConfig":
        """The config with every None filled in, once the device and KV capacity are known."""
        capacity = num_blocks * self.block_size
        if self.max_model_len is not None and self.max_model_len > capacity:
            raise ValueError(f"max_model_len: {self.max_model_len} tokens do not fit in the KV "
                             f"cache ({num_blocks} blocks x {self.block_size} = {capacity} tokens)")
        max_len = self.max_model_len or min(model_max_len, capacity)
        budget = self.max_num_batched_tokens or max(DEFAULT_BATCHED_TOKENS.get(device_type, 256),
                                                    self.max_num_seqs)
        return dataclasses.replace(self, num_blocks=num_blocks, max_model_len=max_len,
                                   max_num_batched_tokens=budget)

    def default_cpu_blocks(self, model_max_len: int) -> int:
        # A model's advertised length (often 128k) would be a huge CPU cache: cap it at 8k
        # unless the user asked for a longer max_model_len.
        per_seq_len = self.max_model_len or min(model_max_len, 8192)
        return max(CPU_BLOCKS_PER_SEQ * self.max_num_seqs, 2 * -(-per_seq_len // self.block_size))
