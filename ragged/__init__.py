"""The continuous-batching runtime: paged KV blocks, a scheduler that fuses prefill chunks
with decodes every step, batched sampling, an Engine and the LLM API.

    from ragged import LLM, SamplingParams
    outs = LLM("tiny").generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8))
"""
from .config import EngineConfig
from .engine import Engine, EngineStats, StepStats
from .llm import LLM
from .sampling import SamplingParams
from .sequence import RequestMetrics, RequestOutput
from .spec_decode import SpeculativeConfig

__all__ = ["LLM", "Engine", "EngineConfig", "EngineStats", "StepStats", "SamplingParams",
           "RequestOutput", "RequestMetrics", "SpeculativeConfig"]
