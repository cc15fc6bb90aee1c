"""CUDA graphs for decode-only steps: one graph per batch-size bucket, replayed on padded batches.

A decode step of a small model, or of any model at small batch, is launch bound: an 8B Llama
issues ~12 kernels per layer x 32 layers, ~400 launches at ~4-5 us of host time each, about
as long as the step's device time. A CUDA graph replays the whole forward with one launch.

How (vLLM's and SGLang's scheme, written for this runtime):
* Buckets 1, 2, 4, 8, then every multiple of 8 up to max_num_seqs: a step of B decodes runs
  the graph of the smallest bucket P >= B on a batch padded with P - B dummy sequences (see
  BatchBuilder.build(pad_to=...)). Padded rows cost nothing measurable: a decode step is bound
  by reading the weights, not by its handful of rows.
* All graphs read ONE static device buffer through views fixed at capture (batch_layout(P,
  P, P, width), width = the block manager's table width, so a row never overflows). The
  step's batch is written into it by the builder's usual single pinned host-to-device copy,
  on the same stream, before the replay: no extra device copies.
* Attention is captured with max_seqlen_q = 1, max_seqlen_k = max_model_len (host bounds: only
  the grid and the split count depend on them, results never) and a split count fixed per
  bucket; each program sizes its share of the KV range from the sequence's device length.
* Graphs share one memory pool and are captured from the largest bucket down, so the
  smaller ones reuse its blocks; logits come back in a static [P, vocab] tensor.

On CPU there is nothing to capture: with ``capture=False`` run() executes the same forward on
the same padded static views eagerly, which is how CPU tests check the padding and the layout.
"""
from __future__ import annotations

import bisect

import torch

from kernels import AttentionMetadata

from .batch import batch_layout


def graph_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to and including max_num_seqs."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8)) + [max_num_seqs]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model, kv_caches, *, max_num_seqs: int, width: int, max_model_len: int,
                 capture: bool, buckets: list[int] | None = None):
        self.model, self.kv_caches = model, kv_caches
        self.device = torch.device(model.device)
        self.width, self.max_model_len = width, max_model_len
        self.buckets = sorted(buckets or graph_buckets(max_num_seqs))
        self.capture_enabled = capture
        nbytes = max(batch_layout(p, p, p, width)[0] for p in self.buckets)
        # Zeros: every block-table entry is a valid block id before the first copy.
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.num_replays = 0

    def bucket_for(self, num_seqs: int) -> int | None:
        i = bisect.bisect_left(self.buckets, num_seqs)
        return self.buckets[i] if i < len(self.buckets) else None

    def views(self, P: int) -> tuple:
        """Bucket P's views of the static buffer: input_ids, positions, slot_mapping,
        logits_indices, cu_seqlens_q, seq_lens, block_table (the builder's layout)."""
        return batch_layout(P, P, P, self.width)[1](self.buffer, torch)

    def _forward(self, P: int) -> torch.Tensor:
        ids, pos, slots, logits_idx, cu, lens, table = self.views(P)
        # num_kv_splits None: the backend's own choice for P decodes of max_model_len keys,
        # baked into the graph (shorter sequences leave the surplus splits empty).
        attn = AttentionMetadata(cu, lens, table, slots, 1, self.max_model_len)
        return self.model.forward(ids, pos, attn, self.kv_caches, logits_idx)

    def _fill_dummy(self, P: int) -> None:
        """A valid all-padding batch (what build(pad_to=P) writes for its dummy rows), so the
        warm-up and capture runs write no KV (slot -1) and read only block 0."""
        ids, pos, slots, logits_idx, cu, lens, table = self.views(P)
        ids.zero_(), pos.zero_(), slots.fill_(-1), lens.fill_(1), table.zero_()
        logits_idx.copy_(torch.arange(P, device=self.device))
        cu.copy_(torch.arange(P + 1, device=self.device, dtype=torch.int32))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (smaller graphs then fit in its pool blocks)."""
        if not self.capture_enabled:
            return
        torch.cuda.synchronize(self.device)
        pool = None
        stream = torch.cuda.Stream(self.device)
        for P in reversed(self.buckets):
            self._fill_dummy(P)
            # Warm-up outside the graph on a side stream (Triton compiles, cuBLAS picks its
            # kernels and workspaces), as torch.cuda.graphs requires.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(P)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=stream):
                self.logits[P] = self._forward(P)
            pool = g.pool()
            self.graphs[P] = g
        torch.cuda.synchronize(self.device)

    def run(self, P: int) -> torch.Tensor:
        """Logits [P, vocab] of the padded decode batch the builder just copied into
        self.buffer (layout batch_layout(P, P, P, width))."""
        self.num_replays += 1
        if not self.capture_enabled:
            return self._forward(P)
        self.graphs[P].replay()
        return self.logits[P]
