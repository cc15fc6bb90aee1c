"""Build the step's RaggedBatch from the scheduler's decision (docs/DESIGN.md, "The ragged batch").

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

    def build(self, scheduled: list[tuple[Sequence, int]], tables: np.ndarray, *,
              pad_to: int | None = None, out: torch.Tensor | None = None) -> RaggedBatch:
        """scheduled: (sequence, new tokens) in batch order; tables: BlockManager.table (each
        sequence's blocks in its row seq.table_row).

        pad_to (CUDA-graph decode steps): append pad_to - B dummy sequences (one token each:
        token 0 at position 0, seq_len 1 over block 0, slot -1 so nothing is written, and
        sampled, so logits_indices has pad_to rows) and give the block table the full width
        of ``tables``; the layout then depends only on pad_to and that width (batch_layout),
        so a graph captured on views of ``out`` (a uint8 device buffer of at least that many
        bytes) reads this step's batch when it is copied there. sampled_rows stays [B]."""
        B = len(scheduled)
        assert B > 0, "an empty step is never built"
        P = B if pad_to is None else pad_to
        assert P >= B, (P, B)
        bs = self.block_size
        seqs = [s for s, _ in scheduled]
        q_lens = np.fromiter((n for _, n in scheduled), dtype=np.int64, count=B)
        ctx = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=B)
        num_tok = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=B)
        # Speculation: a verifying sequence's query is its last token + its proposed tokens
        # (spec_tokens, not in token_ids), and all 1 + k of those rows are sampled.
        nspec = np.fromiter((len(s.spec_tokens) for s in seqs), dtype=np.int64, count=B)
        spec = bool(nspec.any())
        num_tok += nspec
        rows = np.fromiter((s.table_row for s in seqs), dtype=np.int64, count=B)
        seq_lens = ctx + q_lens
        T = int(q_lens.sum())
        cu = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        sampled = seq_lens == num_tok          # the chunk reaches the end: sample a token
        nrows = np.where(sampled, 1 + nspec, 0) if spec else sampled
        S = int(nrows.sum())
        max_seqlen_k = int(seq_lens.max())
        max_blocks = -(-max_seqlen_k // bs) if pad_to is None else tables.shape[1]
        npad = P - B

        nbytes, fields = batch_layout(T + npad, S + npad, P, max_blocks)
        on_cpu_out = out is not None and self.device.type != "cuda"
        # CPU with `out`: write the batch straight into it (it is host memory already).
        raw = out[:nbytes].numpy() if on_cpu_out else self._buffer(nbytes)
        input_ids, positions, slots, logits_idx, cu32, lens32, table = fields(raw, np)

        news = (s.token_ids[c:c + n] for s, c, n in zip(seqs, ctx.tolist(), q_lens.tolist()))
        if spec:
            news = (t + s.spec_tokens for t, s in zip(news, seqs))
        input_ids[:T] = np.fromiter(chain.from_iterable(news), dtype=np.int64, count=T)
        seq_of_tok = np.repeat(np.arange(B), q_lens)
        pos = positions[:T]
        pos[:] = np.arange(T) - np.repeat(cu[:-1] - ctx, q_lens)
        table[:B] = tables[rows, :max_blocks]          # entries past a sequence's end: stale, valid
        slots[:T] = table[seq_of_tok, pos // bs].astype(np.int64) * bs + pos % bs
        if spec:       # rows end - n .. end - 1 of each sampled sequence, n = 1 + k
            first = np.repeat(cu[1:] - nrows, nrows)
            logits_idx[:S] = first + np.arange(S) - np.repeat(np.cumsum(nrows) - nrows, nrows)
        else:
            logits_idx[:S] = cu[1:][sampled] - 1
        cu32[:B + 1] = cu
        lens32[:B] = seq_lens
        if npad:
            input_ids[T:] = 0
            positions[T:] = 0
            slots[T:] = -1
            logits_idx[S:] = np.arange(T, T + npad)
            cu32[B + 1:] = np.arange(T + 1, T + npad + 1)
            lens32[B:] = 1
            table[B:] = 0

        if self.device.type == "cuda":
            src = self._host[:nbytes]
            if out is None:
                dev = src.to(self.device, non_blocking=True)
            else:
                dev = out[:nbytes]
                dev.copy_(src, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        elif on_cpu_out:
            dev = out[:nbytes]
        else:
            dev = self._host[:nbytes]
        d_ids, d_pos, d_slots, d_logits, d_cu, d_lens, d_table = fields(dev, torch)
        return RaggedBatch(
            input_ids=d_ids, positions=d_pos, slot_mapping=d_slots, logits_indices=d_logits,
            cu_seqlens_q=d_cu, seq_lens=d_lens, block_table=d_table,
            max_seqlen_q=int(q_lens.max()), max_seqlen_k=max_seqlen_k,
            sampled_rows=sampled)


def batch_layout(T: int, S: int, B: int, max_blocks: int):
    """Byte layout of one batch in a flat uint8 buffer: int64 [T] x3 (input_ids, positions,
    slot_mapping) and [S] (logits_indices), then int32 [B+1] (cu_seqlens_q), [B] (seq_lens),
    [B, max_blocks] (block_table); int64 first so every view stays aligned. Returns (nbytes,
    fields) where fields(buf, np or torch) slices a host or device buffer into those 7 views."""
    n64 = 3 * T + S
    n32 = (B + 1) + B + B * max_blocks
    nbytes = 8 * n64 + 4 * n32

    def fields(buf, lib):
        i64 = buf[:8 * n64].view(lib.int64)
        i32 = buf[8 * n64:nbytes].view(lib.int32)
        return (i64[:T], i64[T:2 * T], i64[2 * T:3 * T], i64[3 * T:],
                i32[:B + 1], i32[B + 1:2 * B + 1], i32[2 * B + 1:].reshape(B, max_blocks))
    return nbytes, fields
