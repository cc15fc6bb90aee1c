"""SpeculativeConfig: what to propose, how many tokens, and when not to bother.

Units: tokens. ``EngineConfig(speculative=SpeculativeConfig(...))`` or
``LLM(..., speculative=SpeculativeConfig(...) | dict)`` turns speculation on.
"""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("ngram", "draft")

# Large-batch rule (max_verify_tokens): a step's decodes cost as much as their weight reads
# until their token count reaches the GPU's ridge point. Predicted for bf16 on an H100/H200:
# ~989 TFLOP/s / 3.35-4.8 TB/s ~ 200-300 FLOP/byte, i.e. ~200-300 tokens per weight byte pair
# (2 FLOP and 2 bytes per parameter per token). Past that, every rejected draft token costs
# real compute, so the default caps decodes x (1 + k) at 256 tokens: k=4 up to 51 decodes,
# 3 up to 64, 2 up to 85, 1 up to 128, and no speculation above 128 decodes.
DEFAULT_MAX_VERIFY_TOKENS = 256


def _int(name, v, lo, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"speculative.{name}: must be an int >= {lo}"
                         f"{' or None' if allow_none else ''}, got {v!r}")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (validated on construction).

    method                  "ngram" (prompt lookup: the tokens that followed the latest earlier
                            occurrence of the sequence's last n tokens; no model) or "draft"
                            (a smaller model of the same vocabulary, on its own paged cache)
    num_speculative_tokens  k: tokens proposed per decode; a verification is a 1 + k query
    ngram_min, ngram_max    n tried from ngram_max down to ngram_min (longest match first)
    draft_model             "draft": a preset name, a HF directory, or a loaded model
    max_verify_tokens       large-batch rule: when running decodes x (1 + k) exceeds it, k is
                            shortened to max_verify_tokens // decodes - 1 (0 = no speculation
                            that step); None disables the rule
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 4
    draft_model: object = None
    max_verify_tokens: int | None = DEFAULT_MAX_VERIFY_TOKENS

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative.method: {self.method!r} is not one of {METHODS}")
        _int("num_speculative_tokens", self.num_speculative_tokens, 1)
        _int("ngram_min", self.ngram_min, 1)
        _int("ngram_max", self.ngram_max, 1)
        if self.ngram_max < self.ngram_min:
            raise ValueError(f"speculative.ngram_max: {self.ngram_max} is below ngram_min "
                             f"({self.ngram_min})")
        if self.method == "draft" and self.draft_model is None:
            raise ValueError("speculative.draft_model: method 'draft' needs a draft model "
                             "(preset name, HF directory or loaded model)")
        if self.method == "ngram" and self.draft_model is not None:
            raise ValueError("speculative.draft_model: only used by method 'draft'")
        _int("max_verify_tokens", self.max_verify_tokens, 2, allow_none=True)

    @classmethod
    def coerce(cls, value) -> "SpeculativeConfig | None":
        """None, a SpeculativeConfig, or a dict of its fields."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise ValueError(f"speculative: expected a SpeculativeConfig, a dict or None, got {value!r}")

    def num_tokens_for(self, num_decodes: int) -> int:
        """k for a step with this many running decodes (the large-batch rule)."""
        k = self.num_speculative_tokens
        if self.max_verify_tokens is None or num_decodes * (1 + k) <= self.max_verify_tokens:
            return k
        return max(0, min(k, self.max_verify_tokens // max(num_decodes, 1) - 1))
