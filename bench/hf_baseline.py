"""The Hugging Face transformers baselines, on the same weights as our engine.

- `build_hf_model`: a HF model from a preset (random weights, seeded) or a HF directory; a
  preset's weights are saved to a directory that our loader then reads, so both systems run
  identical weights.
- `run_static`: the naive server the continuous-batching papers compare against: fixed-size
  batches in arrival order, left padding, `generate()` until the batch's longest member is
  done (max_new_tokens = min_new_tokens = that length, so EOS never ends it early), greedy.
- `run_continuous`: transformers' own continuous batching (`ContinuousBatchingManager`),
  requests added at their arrival times; it raises if this transformers lacks or fails it.
Both return one metrics.RequestTrace per request.
"""
from __future__ import annotations

import os
import time

import torch

from .metrics import RequestTrace
from .workloads import Request

# Our ModelConfig.architecture -> transformers model_type.
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
PAD_ID = 0


def hf_config(cfg, dtype: torch.dtype):
    """A transformers config with the shapes of our ModelConfig `cfg`."""
    from transformers import AutoConfig
    if cfg.architecture not in MODEL_TYPES:
        raise ValueError(f"architecture: {cfg.architecture!r} has no HF baseline")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
              num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
              rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
              tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
              eos_token_id=cfg.eos_token_id[0] if cfg.eos_token_id else None,
              pad_token_id=PAD_ID, rope_parameters=rope, rope_theta=cfg.rope_theta,
              rope_scaling=rope if cfg.rope_scaling else None, hidden_act="silu",
              architectures=[cfg.architecture], dtype=str(dtype).removeprefix("torch."))
    if cfg.sliding_window:
        kw.update(sliding_window=cfg.sliding_window, use_sliding_window=True)
    return AutoConfig.for_model(MODEL_TYPES[cfg.architecture], **kw)


def build_hf_model(model: str, *, dtype: torch.dtype, device, seed: int = 0,
                   save_dir: str | None = None, own_weights: bool = False):
    """Returns (hf_model in eval mode on device, directory our loader reads).

    `model` is a HF directory (loaded as is) or a preset name (random weights from `seed`,
    saved to save_dir as safetensors: 16 GB for llama3-8b in bf16). own_weights=True with a
    preset: nothing is saved and the directory returned is None (our engine then draws its
    own random weights: HF is a throughput baseline only, its tokens are not comparable)."""
    from transformers import AutoModelForCausalLM
    if os.path.isdir(model):
        # .to() rather than device_map=: device_map needs `accelerate`, which may be missing
        m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        return m.to(device).eval(), model
    from model import ModelConfig
    cfg = ModelConfig.preset(model)  # ValueError naming an unknown preset
    if save_dir is None and not own_weights:
        raise ValueError("save_dir: needed to share a preset's random weights with our engine")
    torch.manual_seed(seed)
    try:  # initialise on the device: an 8B model's random init on the host takes minutes
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(hf_config(cfg, dtype), dtype=dtype)
    except ValueError:  # a transformers that wants `accelerate` for a device context
        torch.manual_seed(seed)
        m = AutoModelForCausalLM.from_config(hf_config(cfg, dtype), dtype=dtype).to(device)
    m = m.eval()
    if own_weights:
        return m, None
    m.save_pretrained(save_dir)
    return m, save_dir


class _StepClock:
    """A stopping criterion that never stops: it stamps the time each generated token (one
    per generate() step, for the whole batch) becomes available, as a streamer would."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        if self.cuda:  # the token exists once the step's kernels are done
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate_batch(model, batch: list[Request], device):
    from transformers import StoppingCriteriaList
    n, width = len(batch), max(r.prompt_len for r in batch)
    ids = torch.full((n, width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(batch):  # left padding: every prompt ends at the same column
        ids[i, width - r.prompt_len:] = torch.tensor(r.prompt_token_ids)
        mask[i, width - r.prompt_len:] = 1
    new = max(r.max_tokens for r in batch)
    clock = _StepClock(device)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=PAD_ID, stopping_criteria=StoppingCriteriaList([clock]))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    if out.shape[1] != width + new or len(clock.times) != new:
        raise RuntimeError(f"HF generate made {out.shape[1] - width} tokens in "
                           f"{len(clock.times)} steps, expected {new}")
    return clock.times, end, out[:, width:].tolist()


def run_static(model, requests: list[Request], *, batch_size: int, device, t0: float | None = None,
               progress=None, timeout_s: float | None = None) -> list[RequestTrace]:
    """Static batching. A batch starts when its last member has arrived and the previous
    batch is done. Token times come from the per-step clock (what streaming would show);
    a request finishes when generate() returns its batch (a non-streaming server answers
    the whole batch at once, which is the point of the baseline)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(requests, key=lambda r: r.arrival_time)
    t0 = time.perf_counter() if t0 is None else t0
    traces = []
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"HF static: {b}/{len(order)} requests done after {timeout_s} s")
        wait = t0 + batch[-1].arrival_time - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        times, end, tokens = _generate_batch(model, batch, device)
        for r, toks in zip(batch, tokens):
            tt = times[:r.max_tokens]
            traces.append(RequestTrace(r.id, r.prompt_len, t0 + r.arrival_time, tt[0], end, tt,
                                       toks[:r.max_tokens]))
        if progress is not None:
            progress.update(len(batch))
    return traces


def run_continuous(model, requests: list[Request], *, device, t0: float | None = None,
                   progress=None, timeout_s: float = 600.0, options: dict | None = None
                   ) -> list[RequestTrace]:
    """transformers' continuous batching, fed in real time. Raises on any failure.
    options: ContinuousBatchingConfig fields (e.g. auto_switch_to_flash=False)."""
    from transformers import GenerationConfig
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_tokens for r in requests),
                           eos_token_id=-1, pad_token_id=PAD_ID)
    options = dict(options or {})
    if torch.device(device).type != "cuda":
        # Off CUDA it sizes its cache from host memory through psutil, which may be missing.
        longest = max(r.prompt_len + r.max_tokens for r in requests)
        options = dict(page_size=16, num_blocks=-(-longest // 16) * len(requests) + 8,
                       max_batch_tokens=512) | options
    kwargs = {}
    if options:
        from transformers import ContinuousBatchingConfig
        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(**options)
    manager = model.init_continuous_batching(generation_config=gen, **kwargs)
    if hasattr(manager, "warmup") and torch.device(device).type == "cuda":
        manager.warmup()  # CUDA graphs are captured here, outside the timed run
    manager.start()
    pending = sorted(requests, key=lambda r: r.arrival_time)
    by_id = {r.id: r for r in requests}
    results = {}
    t0 = time.perf_counter() if t0 is None else t0
    try:
        while len(results) < len(requests):
            now = time.perf_counter()
            while pending and t0 + pending[0].arrival_time <= now:
                r = pending.pop(0)
                manager.add_request(input_ids=list(r.prompt_token_ids), request_id=r.id,
                                    max_new_tokens=r.max_tokens, record_timestamps=True)
            if now - t0 > timeout_s:
                raise RuntimeError(f"HF continuous batching: {len(results)}/{len(requests)} "
                                   f"requests done after {timeout_s} s")
            wait = 0.01 if not pending else min(0.01, max(1e-4, t0 + pending[0].arrival_time - now))
            out = manager.get_result(timeout=wait)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("HF continuous batching: generation thread stopped")
                continue
            if getattr(out, "error", None):
                raise RuntimeError(f"HF continuous batching: request {out.request_id}: {out.error}")
            if out.is_finished():
                results[out.request_id] = out
                if progress is not None:
                    progress.update(1)
    finally:
        manager.stop(block=True, timeout=10)
        if hasattr(manager, "destroy"):
            manager.destroy()
    traces = []
    for rid, out in results.items():
        r = by_id[rid]
        tt = list(out.timestamps or [])
        if len(out.generated_tokens) != r.max_tokens or len(tt) != r.max_tokens:
            raise RuntimeError(f"HF continuous batching: request {rid} made "
                               f"{len(out.generated_tokens)} tokens ({len(tt)} stamps), "
                               f"expected {r.max_tokens}")
        finish = max(tt[-1], out.lifespan[1]) if out.lifespan[1] > 0 else tt[-1]
        traces.append(RequestTrace(rid, r.prompt_len, t0 + r.arrival_time, tt[0], finish, tt,
                                   list(out.generated_tokens)))
    return traces
