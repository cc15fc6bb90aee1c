"""Accuracy of the fp8 (e4m3) KV cache against the model-dtype cache, end to end.

    python -m bench.fp8_accuracy [--device cpu] [--dtype float32,bfloat16] [--new-tokens 32]

For each model (the `tiny` preset, and a random Hugging Face checkpoint of every family saved
with save_pretrained as tests/hf_models.py builds them), each model dtype and each scale mode
(per slot, and per tensor with scales calibrated as amax / 448 over a float-cache forward):
- reference: greedy continuation of every prompt with the model-dtype cache ("auto");
- teacher forced: prompt + that continuation in one forward with each cache (attention reads
  every key and value back from the cache, so all positions see the fp8 K/V): logits error
  (max |d|, RMS |d| / RMS logits, mean KL(auto || fp8)) and top-1 agreement at the
  continuation positions;
- free running: greedy generation with the fp8 cache through the engine: the fraction of
  prompts whose tokens equal the reference's, and the mean number of tokens before the first
  difference.
A yardstick row ("bf16_kv", float32 models only) runs the same metrics with the K/V merely
rounded to bf16 before the (float32) cache write: the error a bf16 cache itself costs.
Writes bench/results/<device>/fp8_accuracy.json. Random models have no trained structure: the
tests' std-0.2 checkpoints have peaked attention that amplifies any K/V error, the `tiny`
preset (std 0.02) nearly uniform attention that hides it; trained checkpoints (owed on GPU)
sit between.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import kernels
from bench.common import RESULTS, run_info
from kernels import reference as ref
from model import load_model
from ragged import LLM, SamplingParams

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")


def _prompts(n, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def _forward_all(m, ids, kv_fmt, device):
    """Logits float32 [T, vocab] of one prefill of ``ids`` over a fresh cache of format
    kv_fmt (dict of allocate_kv_cache arguments)."""
    T = len(ids)
    nblk = -(-T // 16)
    kv = m.allocate_kv_cache(nblk, 16, **kv_fmt)
    i32 = dict(dtype=torch.int32, device=device)
    attn = kernels.AttentionMetadata(torch.tensor([0, T], **i32), torch.tensor([T], **i32),
                                     torch.arange(nblk, **i32)[None],
                                     torch.arange(T, device=device), T, T)
    with torch.inference_mode():
        return m.forward(torch.tensor(ids, device=device), torch.arange(T, device=device),
                         attn, kv, torch.arange(T, device=device)).float()


def calibrate(m, seqs, device):
    """Per-tensor (k_scale, v_scale): amax / 448 of every layer's rotated K and V over the
    float-cache forwards of ``seqs`` (a checkpoint's calibration, on the evaluation data)."""
    amax = [0.0, 0.0]
    orig = kernels.rotary_write_kv

    def record(positions, q, k, v, cs, *a, **kw):
        _, k_rot = ref.rotary_embedding(positions, q, k, cs, True)
        amax[0] = max(amax[0], k_rot.abs().max().item())
        amax[1] = max(amax[1], v.abs().max().item())
        return orig(positions, q, k, v, cs, *a, **kw)
    kernels.rotary_write_kv = record
    try:
        for s in seqs:
            _forward_all(m, s, {}, device)
    finally:
        kernels.rotary_write_kv = orig
    return amax[0] / 448.0, amax[1] / 448.0


class _Bf16KV:
    """Context: rotary_write_kv writes K/V rounded to bf16 (into the float cache)."""

    def __enter__(self):
        self.orig = kernels.rotary_write_kv

        def write(positions, q, k, v, cs, k_cache, v_cache, slots, is_neox=True, **kw):
            q_rot, k_rot = ref.rotary_embedding(positions, q, k, cs, is_neox)
            ref.write_kv(k_rot.bfloat16().to(k.dtype), v.bfloat16().to(v.dtype), k_cache,
                         v_cache, slots)
            return q_rot
        kernels.rotary_write_kv = write

    def __exit__(self, *exc):
        kernels.rotary_write_kv = self.orig


def evaluate(source, name, dtype, args) -> list[dict]:
    dev = args.device
    m = load_model(source, dtype=dtype, device=dev, backend=args.backend)
    vocab = m.config.vocab_size
    ps = _prompts(args.prompts, args.prompt_len, vocab)
    sp = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    common = dict(max_num_batched_tokens=128, max_num_seqs=min(128, len(ps)),
                  enable_prefix_caching=False)
    auto = LLM(m, **common)
    ref_out = [o.token_ids for o in auto.generate(ps, sp, use_tqdm=False)]
    seqs = [p + o for p, o in zip(ps, ref_out)]
    want = [_forward_all(m, s, {}, dev) for s in seqs]
    rows = []
    modes = ("per_slot", "per_tensor") + (("bf16_kv",) if dtype == torch.float32 else ())
    for mode in modes:
        scales = calibrate(m, seqs, dev) if mode == "per_tensor" else None
        fmt = dict(kv_cache_dtype="fp8_e4m3", kv_scales=scales) if mode != "bf16_kv" else {}
        if mode == "bf16_kv":
            with _Bf16KV():
                got = [_forward_all(m, s, fmt, dev) for s in seqs]
        else:
            got = [_forward_all(m, s, fmt, dev) for s in seqs]
        cut = slice(args.prompt_len - 1, None)         # logits that predict the continuation
        d = torch.cat([(g - w)[cut] for g, w in zip(got, want)])
        w = torch.cat([x[cut] for x in want])
        g = torch.cat([x[cut] for x in got])
        kl = torch.nn.functional.kl_div(g.double().log_softmax(-1), w.double().log_softmax(-1),
                                        log_target=True, reduction="none").sum(-1)
        if mode == "bf16_kv":
            with _Bf16KV():
                fp8_out = [o.token_ids for o in LLM(m, **common).generate(ps, sp, use_tqdm=False)]
        else:
            llm = LLM(m, kv_cache_dtype="fp8_e4m3", kv_scales=scales, **common)
            fp8_out = [o.token_ids for o in llm.generate(ps, sp, use_tqdm=False)]
        first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                      for x, y in zip(ref_out, fp8_out)]
        row = dict(model=name, dtype=str(dtype).replace("torch.", ""), mode=mode,
                   kv_scales=scales, prompts=len(ps), prompt_len=args.prompt_len,
                   new_tokens=args.new_tokens,
                   logits_max_abs_err=d.abs().max().item(),
                   logits_rel_rms_err=(d.pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item(),
                   logits_std=w.std().item(),
                   kl_mean=kl.mean().item(), kl_max=kl.max().item(),
                   top1_agreement_teacher_forced=(g.argmax(-1) == w.argmax(-1)).float().mean().item(),
                   greedy_identical_fraction=sum(f == args.new_tokens for f in first_diff) / len(ps),
                   greedy_tokens_before_first_diff=sum(first_diff) / len(ps))
        rows.append(row)
        print(f"{name:<8} {row['dtype']:<9} {mode:<10} max|d| {row['logits_max_abs_err']:.3e} "
              f"rel rms {row['logits_rel_rms_err']:.3e} KL {row['kl_mean']:.2e} "
              f"top1 {row['top1_agreement_teacher_forced']:.3f} greedy identical "
              f"{row['greedy_identical_fraction']:.2f} first diff "
              f"{row['greedy_tokens_before_first_diff']:.1f}/{args.new_tokens}", flush=True)
    return rows


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch", help="kernels backend (torch = reference)")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from tests.hf_models import make_hf_model        # the tests' random checkpoints
        sources = [("tiny", "tiny")] + [
            (make_hf_model(f, Path(tmp) / f, seed=3), f) for f in a.families.split(",") if f]
        for dt in a.dtype.split(","):
            for src, name in sources:
                rows += evaluate(src, name, getattr(torch, dt), a)
    out = Path(a.out) if a.out else RESULTS / torch.device(a.device).type
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fp8_accuracy.json"
    path.write_text(json.dumps(dict(info=run_info(a.device), params=vars(a), results=rows),
                               indent=1))
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
