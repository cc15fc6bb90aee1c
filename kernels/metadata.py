"""AttentionMetadata: the per-iteration bundle of device tensors every attention call takes.

Built once per step by ``ragged.batch`` (one pinned, non-blocking host-to-device copy) and
shared by every layer. Field names are the contract between runtime, model and kernels
(see docs/DESIGN.md, "The ragged batch").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Ragged-batch attention metadata.

    cu_seqlens_q  int32 [B+1]  prefix sums of new-token counts; cu_seqlens_q[0] = 0
    seq_lens      int32 [B]    KV length of each sequence *including* this step's tokens
    block_table   int32 [B, max_blocks]  physical block ids (unused entries: any valid id)
    slot_mapping  int64 [T]    flat cache slot of each new token; < 0 means "do not write"
    max_seqlen_q  int          host-side upper bound of q_len (no device sync needed)
    max_seqlen_k  int          host-side upper bound of seq_lens
    num_kv_splits int | None   optional split-KV override (None: kernel heuristic)
    """

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    num_kv_splits: int | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    def to(self, device, non_blocking: bool = False) -> "AttentionMetadata":
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return AttentionMetadata(mv(self.cu_seqlens_q), mv(self.seq_lens), mv(self.block_table),
                                 mv(self.slot_mapping), self.max_seqlen_q, self.max_seqlen_k,
                                 self.num_kv_splits)
