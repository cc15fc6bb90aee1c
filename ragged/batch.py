"""Build the step's RaggedBatch from the scheduler's decision (DESIGN.md, "The ragged batch").

Host work is vectorised numpy over the step's sequences: the only Python loops run once per
sequence (gathering its new tokens and its block table), never once per token. Every field is
written into ONE host buffer (pinned when the device is CUDA), int64 fields first then int32
ones so each view stays aligned, and reaches the device in one non-blocking copy; the fields
are views of that single device tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from kernels import AttentionMetadata

from .sequence import Sequence


@dataclass
class RaggedBatch:
    input_ids: torch.Tensor      # int64 [T]
    positions: torch.Tensor      # int64 [T]
    slot_mapping: torch.Tensor   # int64 [T]
    logits_indices: torch.Tensor  # int64 [S]
    cu_seqlens_q: torch.Tensor   # int32 [B+1]
    seq_lens: torch.Tensor       # int32 [B]
    block_table: torch.Tensor    # int32 [B, max_blocks]
    max_seqlen_q: int
    max_seqlen_k: int
    sampled_rows: np.ndarray     # host: which of the B sequences get a token (bool [B])

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def attn(self) -> AttentionMetadata:
        return AttentionMetadata(self.cu_seqlens_q, self.seq_lens, self.block_table,
                                 self.slot_mapping, self.max_seqlen_q, self.max_seqlen_k)


class BatchBuilder:
    def __init__(self, block_size: int, device):
        self.block_size = block_size
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"     # reuse one pinned buffer on CUDA
        self._host = torch.empty(0, dtype=torch.uint8)
        self._copied = None   # CUDA event: the last copy out of _host has finished

    def _buffer(self, nbytes: int) -> np.ndarray:
        if not self._pin:
            # CPU: the host buffer IS the batch, so each step gets a fresh one (no copy; the
            # previous batch stays valid).
            raw = np.empty(nbytes, dtype=np.uint8)
            self._host = torch.from_numpy(raw)
            return raw
        if self._copied is not None:
            # Never overwrite the pinned buffer while a previous copy may still read it.
            self._copied.synchronize()
        if self._host.numel() < nbytes:
            size = max(nbytes, 2 * self._host.numel(), 1 << 16)
            self._host = torch.empty(size, dtype=torch.uint8, pin_memory=self._pin)
        return self._host.numpy()

    def build(self, scheduled: list[tuple[Sequence, int]], tables: np.ndarray) -> RaggedBatch:
        """scheduled: (sequence, new tokens) in batch order; tables: BlockManager.table (each
        sequence's blocks in its row seq.table_row)."""
        B = len(scheduled)
        assert B > 0, "an empty step is never built"
        bs = self.block_size
        seqs = [s for s, _ in scheduled]
        q_lens = np.fromiter((n for _, n in scheduled), dtype=np.int64, count=B)
        ctx = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=B)
        num_tok = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=B)
        rows = np.fromiter((s.table_row for s in seqs), dtype=np.int64, count=B)
        seq_lens = ctx + q_lens
        T = int(q_lens.sum())
        cu = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        sampled = seq_lens == num_tok          # the chunk reaches the end: sample a token
        S = int(sampled.sum())
        max_seqlen_k = int(seq_lens.max())
        max_blocks = -(-max_seqlen_k // bs)

        # Layout of the single buffer: int64 [T] x3, [S]; then int32 [B+1], [B], [B, max_blocks].
        n64 = 3 * T + S
        n32 = (B + 1) + B + B * max_blocks
        nbytes = 8 * n64 + 4 * n32
        raw = self._buffer(nbytes)
        i64 = raw[:8 * n64].view(np.int64)
        i32 = raw[8 * n64:nbytes].view(np.int32)
        input_ids, positions, slots, logits_idx = (i64[:T], i64[T:2 * T], i64[2 * T:3 * T],
                                                   i64[3 * T:])
        cu32, lens32 = i32[:B + 1], i32[B + 1:2 * B + 1]
        table = i32[2 * B + 1:].reshape(B, max_blocks)

        input_ids[:] = np.fromiter(
            chain.from_iterable(s.token_ids[c:c + n] for s, c, n in
                                zip(seqs, ctx.tolist(), q_lens.tolist())), dtype=np.int64, count=T)
        seq_of_tok = np.repeat(np.arange(B), q_lens)
        positions[:] = np.arange(T) - np.repeat(cu[:-1] - ctx, q_lens)
        table[:] = tables[rows, :max_blocks]           # entries past a sequence's end: stale, valid
        slots[:] = table[seq_of_tok, positions // bs].astype(np.int64) * bs + positions % bs
        logits_idx[:] = cu[1:][sampled] - 1
        cu32[:] = cu
        lens32[:] = seq_lens

        dev = self._host[:nbytes]
        if self.device.type == "cuda":
            dev = dev.to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        d64 = dev[:8 * n64].view(torch.int64)
        d32 = dev[8 * n64:].view(torch.int32)
        return RaggedBatch(
            input_ids=d64[:T], positions=d64[T:2 * T], slot_mapping=d64[2 * T:3 * T],
            logits_indices=d64[3 * T:], cu_seqlens_q=d32[:B + 1], seq_lens=d32[B + 1:2 * B + 1],
            block_table=d32[2 * B + 1:].view(B, max_blocks),
            max_seqlen_q=int(q_lens.max()), max_seqlen_k=max_seqlen_k,
            sampled_rows=sampled)
