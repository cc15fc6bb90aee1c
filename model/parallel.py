"""Tensor parallelism inside the layers that need it (Megatron-LM; nano-vllm's layers/linear.py).

    tp = TPGroup(rank, size, group)      # SINGLE (size 1) everywhere by default
    qkv = ColumnParallelLinear(hidden, [(Hq*D, q0*D, hq*D), (Hkv*D, k0*D, hkv*D), ...], tp=tp)
    o = RowParallelLinear(Hq*D, hidden, tp=tp)                  # owns the all-reduce

Column-parallel layers split their output rows (fused QKV, gate/up): rank r keeps its heads /
its slice of the MLP's hidden features, and its output stays sharded (no communication).
Row-parallel layers (o_proj, down_proj) split their input columns and all-reduce their partial
sums: one all-reduce per attention block and one per MLP. The embedding and the LM head split
the vocabulary: an embedding lookup zeroes the ids outside the rank's rows and all-reduces;
the LM head all-gathers the logits, so every rank holds the full [S, vocab] rows and the
sampler (top-k / top-p / seeded, on rank 0) is the single-rank one. A vocab-parallel argmax
would send only ids but serves greedy alone; the logits are S x vocab x 4 bytes per step
(256 decodes x 128k vocab = 128 MiB, ~0.4 ms at NVLink's ~300 GB/s effective: predicted).

At size 1 every layer is exactly today's math (F.linear / F.embedding, no branch that touches
torch.distributed). Each parameter carries where its rows (or columns) sit in the full
Hugging Face-layout tensor (``tp_dim``, ``tp_parts``, ``tp_full_shape``), so the loader reads
only this rank's slices and random init can take the same rank's slice of a full tensor.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn


class TPGroup:
    """This rank's place in its tensor-parallel group, and the collectives the layers call.

    ``group`` is a torch.distributed process group (None: the default group). Counters record
    this rank's collective bytes and (CPU: wall; GPU: host launch) time for the step stats."""

    def __init__(self, rank: int = 0, size: int = 1, group=None):
        if not (isinstance(size, int) and size >= 1 and 0 <= rank < size):
            raise ValueError(f"tensor_parallel_size: rank {rank} of size {size} is invalid")
        self.rank, self.size, self.group = rank, size, group
        self.comm_bytes = 0
        self.comm_time_s = 0.0

    def split(self, n: int, name: str) -> tuple[int, int]:
        """(first, count) of this rank's equal share of n items; ValueError if n % size."""
        if n % self.size:
            raise ValueError(f"{name}: {n} is not divisible by tensor_parallel_size {self.size}")
        k = n // self.size
        return self.rank * k, k

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        import torch.distributed as dist
        t0 = time.perf_counter()
        dist.all_reduce(x, group=self.group)
        self._count(x.numel() * x.element_size(), t0)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dim (rank order)."""
        if self.size == 1:
            return x
        import torch.distributed as dist
        t0 = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        self._count(x.numel() * x.element_size() * (self.size - 1), t0)
        return torch.cat(parts, dim=-1)

    def take_comm(self) -> tuple[int, float]:
        """(bytes, seconds) counted since the last call, and reset."""
        out = (self.comm_bytes, self.comm_time_s)
        self.comm_bytes, self.comm_time_s = 0, 0.0
        return out

    def _count(self, nbytes: int, t0: float) -> None:
        self.comm_bytes += nbytes
        self.comm_time_s += time.perf_counter() - t0


SINGLE = TPGroup()


def kv_head_shard(num_kv_heads: int, tp: TPGroup) -> tuple[int, int]:
    """(first KV head, count) of this rank: split when num_kv_heads >= size, else each head is
    replicated on size / num_kv_heads consecutive ranks (vLLM), one head per rank."""
    if num_kv_heads >= tp.size:
        return tp.split(num_kv_heads, "num_key_value_heads")
    if tp.size % num_kv_heads:
        raise ValueError(f"num_key_value_heads: {num_kv_heads} KV heads cannot be replicated "
                         f"evenly over tensor_parallel_size {tp.size}")
    return tp.rank // (tp.size // num_kv_heads), 1


def check_tensor_parallel(cfg, size: int) -> None:
    """ValueError (naming the field) if a ModelConfig cannot be sharded over ``size`` ranks;
    run before any worker starts."""
    for rank in range(size):
        tp = TPGroup(rank, size)
        tp.split(cfg.num_attention_heads, "num_attention_heads")
        kv_head_shard(cfg.num_key_value_heads, tp)
        tp.split(cfg.intermediate_size, "intermediate_size")
        tp.split(cfg.vocab_size, "vocab_size")


def _param(shape, *, dtype, device, dim=None, parts=None, full_shape=None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
    # Where this shard sits in the full tensor: along tp_dim, local [l0, l0 + n) = full [f0, f0 + n).
    p.tp_dim, p.tp_parts, p.tp_full_shape = dim, parts, tuple(full_shape or shape)
    return p


def replicated(*shape, dtype, device) -> nn.Parameter:
    """A parameter every rank holds whole (norms)."""
    return _param(shape, dtype=dtype, device=device)


@torch.no_grad()
def take_shard(p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's shard of the full tensor ``full`` (shape p.tp_full_shape), p's layout."""
    if p.tp_dim is None:
        return full
    return torch.cat([full.narrow(p.tp_dim, f0, n) for f0, _, n in p.tp_parts], dim=p.tp_dim)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b), W's rows fused from segments and split over ranks; y stays sharded.

    segments: (full rows, first row of this rank, rows of this rank) per fused segment, e.g.
    q, k, v (k and v may be replicated: several ranks take the same rows)."""

    def __init__(self, in_features: int, segments, *, bias=False, tp=SINGLE, dtype, device):
        super().__init__()
        parts, off, local = [], 0, 0
        for full, first, rows in segments:
            parts.append((off + first, local, rows))
            off, local = off + full, local + rows
        kw = dict(dtype=dtype, device=device, dim=0, parts=parts)
        self.weight = _param((local, in_features), full_shape=(off, in_features), **kw)
        self.bias = _param((local,), full_shape=(off,), **kw) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_r^T): W's input columns split over ranks, x already sharded."""

    def __init__(self, in_features: int, out_features: int, *, tp=SINGLE, dtype, device):
        super().__init__()
        self.tp = tp
        first, cols = tp.split(in_features, "in_features")
        self.weight = _param((out_features, cols), dtype=dtype, device=device, dim=1,
                             parts=[(first, 0, cols)], full_shape=(out_features, in_features))

    def forward(self, x):
        return self.tp.all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Rows [first, first + n) of the embedding; other ids look up zeros, then all-reduce."""

    def __init__(self, vocab_size: int, hidden: int, *, tp=SINGLE, dtype, device):
        super().__init__()
        self.tp = tp
        self.first, n = tp.split(vocab_size, "vocab_size")
        self.weight = _param((n, hidden), dtype=dtype, device=device, dim=0,
                             parts=[(self.first, 0, n)], full_shape=(vocab_size, hidden))

    def forward(self, ids):
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.first
        inside = (local >= 0) & (local < self.weight.shape[0])
        h = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return self.tp.all_reduce(h * inside.unsqueeze(-1).to(h.dtype))


class ParallelLMHead(nn.Module):
    """float32 logits [S, vocab] of h [S, hidden]: each rank its vocab rows, all-gathered.
    ``weight``: share the embedding's (tied) or None for its own."""

    def __init__(self, vocab_size: int, hidden: int, *, weight=None, tp=SINGLE, dtype, device):
        super().__init__()
        self.tp = tp
        if weight is None:
            first, n = tp.split(vocab_size, "vocab_size")
            weight = _param((n, hidden), dtype=dtype, device=device, dim=0,
                            parts=[(first, 0, n)], full_shape=(vocab_size, hidden))
        self.weight = weight

    def forward(self, h):
        return self.tp.all_gather(F.linear(h, self.weight).float())
