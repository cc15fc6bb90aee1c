"""Speculative decoding verified inside the fused ragged step (docs/speculative.md).

config.py: SpeculativeConfig; ngram.py / draft.py: the proposers (each has propose(...));
rejection.py: the one rejection sampler; decoder.py: SpecDecoder, the engine's handle.
"""
from .config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
