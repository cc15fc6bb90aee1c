"""model/: logits over ragged, paged batches match Hugging Face transformers run per sequence.

Ground truth is the HF model in float64, run on each whole sequence; PyTorch's own error is the
same HF model in the tested dtype. The project rule (tests/tolerance.py) then bounds ours:
err(ours vs HF fp64) <= 2 * err(HF lowp vs HF fp64) + 4 ulps of the logits' scale.
Every step is ragged on purpose: continued prefill chunks over cached context, decodes,
fresh prompts (one of a single token), a few new tokens over a cache, in shuffled block tables.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import kernels
from model import ModelConfig, PRESETS, load_model, resolve_dtype
from model.llama import LlamaForCausalLM
from tests.hf_models import build_hf_model, make_hf_model
from tests.tolerance import EPS, assert_close

BLOCK = 16
# (context already cached, total length) per sequence, in batch order: prefill chunk over a
# cached context, decode, fresh prompt, decode, 1-token prompt, 3 new tokens over a cache.
SEQS = [(21, 37), (29, 30), (0, 13), (8, 9), (0, 1), (17, 20)]


# ----------------------------------------------------------------------- ragged-batch builder
def block_tables(lens, gen, extra=3):
    """Non-contiguous physical blocks per sequence (a shuffled pool) and the pool size."""
    need = [-(-n // BLOCK) for n in lens]
    pool = torch.randperm(sum(need) + extra, generator=gen).tolist()
    tables, i = [], 0
    for n in need:
        tables.append(pool[i:i + n])
        i += n
    return tables, len(pool)


def make_step(tokens, chunks, tables, num_blocks, gen, device="cpu"):
    """input_ids, positions and AttentionMetadata for new tokens tokens[b][start:end]."""
    ids, pos, slots, cu, seq_lens = [], [], [], [0], []
    for toks, (s, e), tbl in zip(tokens, chunks, tables):
        ids += toks[s:e]
        pos += range(s, e)
        slots += [tbl[p // BLOCK] * BLOCK + p % BLOCK for p in range(s, e)]
        cu.append(cu[-1] + e - s)
        seq_lens.append(e)
    width = max(len(t) for t in tables) + 1                 # unused entries: random valid ids
    table = torch.randint(0, num_blocks, (len(chunks), width), generator=gen, dtype=torch.int32)
    for b, tbl in enumerate(tables):
        table[b, :len(tbl)] = torch.tensor(tbl, dtype=torch.int32)
    i64 = dict(dtype=torch.int64, device=device)
    attn = kernels.AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=table.to(device), slot_mapping=torch.tensor(slots, **i64),
        max_seqlen_q=max(e - s for s, e in chunks), max_seqlen_k=max(e for _, e in chunks))
    return torch.tensor(ids, **i64), torch.tensor(pos, **i64), attn


def run_two_steps(m, tokens, seqs, device="cpu", seed=0):
    """Step 1 prefills the cached contexts (logits at their last token); step 2 runs every
    sequence's new tokens (logits at all rows). Returns {(b, position): logits row}."""
    gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = block_tables([n for _, n in seqs], gen)
    kv = m.allocate_kv_cache(num_blocks, BLOCK)
    out = {}
    with torch.no_grad():
        first = [b for b, (ctx, _) in enumerate(seqs) if ctx > 0]
        ids, pos, attn = make_step([tokens[b] for b in first], [(0, seqs[b][0]) for b in first],
                                   [tables[b] for b in first], num_blocks, gen, device)
        last = (attn.cu_seqlens_q[1:] - 1).long()
        logits = m(ids, pos, attn, kv, last)
        assert logits.shape == (len(first), m.config.vocab_size) and logits.dtype == torch.float32
        for row, b in enumerate(first):
            out[(b, seqs[b][0] - 1)] = logits[row]
        ids, pos, attn = make_step(tokens, seqs, tables, num_blocks, gen, device)
        logits = m(ids, pos, attn, kv, torch.arange(ids.shape[0], device=device))
        row = 0
        for b, (ctx, n) in enumerate(seqs):
            for p in range(ctx, n):
                out[(b, p)] = logits[row]
                row += 1
    return out


def hf_logits(hf, tokens, keys, device="cpu"):
    """HF logits per sequence over the full sequence, rows picked by (b, position)."""
    with torch.no_grad():
        full = [hf(torch.tensor(t, device=device)[None]).logits[0] for t in tokens]
    return torch.stack([full[b][p] for b, p in keys])


def random_tokens(seqs, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for _, n in seqs]


def compare(name, path, m, seqs=SEQS, device="cpu"):
    """Our logits (two ragged steps) vs HF fp64 per sequence; HF in m.dtype sets the bound."""
    tokens = random_tokens(seqs, m.config.vocab_size)
    ours = run_two_steps(m, tokens, seqs, device)
    keys = list(ours)
    ref = hf_logits(load_hf(path, torch.float64, device), tokens, keys, device)
    low = hf_logits(load_hf(path, m.dtype, device), tokens, keys, device)
    out = torch.stack([ours[k] for k in keys]).to(m.dtype)
    print(f"{name}: {len(keys)} logit rows, scale {ref.abs().max():.3f}")
    assert_close(out, ref, low.to(m.dtype), name=f"{name} {m.dtype}")


def load_hf(path, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                dtype=dtype).to(device).eval()


# ----------------------------------------------------------------------- end to end vs HF
CASES = [("llama", False), ("llama3", True), ("mistral", False), ("qwen2", True),
         ("qwen3", False), ("qwen3", True)]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {(f, t): make_hf_model(f, root / f"{f}-{'tied' if t else 'untied'}",
                                  tie_word_embeddings=t) for f, t in CASES}


@pytest.mark.parametrize("family,tied", CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES])
def test_ragged_logits_match_hf(hf_dirs, family, tied):
    path = hf_dirs[(family, tied)]
    m = load_model(path)
    assert m.config.tie_word_embeddings == tied and (m.lm_head.weight is m.embed_tokens.weight) == tied
    compare(family, path, m)


def test_sliding_window_masks(hf_dirs):
    """The Mistral window (8) is shorter than the sequences, so it must change the logits."""
    path = hf_dirs[("mistral", False)]
    m = load_model(path)
    assert m.config.sliding_window == 8
    tokens = random_tokens(SEQS, m.config.vocab_size)
    windowed = run_two_steps(m, tokens, SEQS)
    for layer in m.layers:
        layer.attn.sliding_window = None
    full = run_two_steps(m, tokens, SEQS)
    assert not torch.allclose(windowed[(0, 36)], full[(0, 36)], atol=1e-3)
    assert torch.equal(windowed[(4, 0)], full[(4, 0)])       # 1 token: nothing to hide


def test_sharded_checkpoint_loads_identically(tmp_path):
    single = make_hf_model("qwen2", tmp_path / "single", tokenizer=False)
    sharded = make_hf_model("qwen2", tmp_path / "sharded", tokenizer=False, max_shard_size="20KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    a, b = load_model(single), load_model(sharded)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


TRITON_CASES = [("qwen3", torch.float32), ("qwen3", torch.float16), ("mistral", torch.float32)]


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("family,dtype", TRITON_CASES, ids=[f"{f}-{str(d)[6:]}" for f, d in TRITON_CASES])
def test_triton_backend_matches_hf(tmp_path, family, dtype):
    """The same ragged two-step batch through the Triton kernels (interpreter on CPU): q/k
    norm on strided views and head_dim 24 (qwen3), sliding window (mistral)."""
    # conftest sets TRITON_INTERPRET=1 on CPU machines (and runs this test in a child pytest
    # with it on GPU machines): Triton missing here is a failure, not a skip.
    assert "triton" in kernels.available_backends("cpu"), "Triton backend unavailable on CPU"
    path = make_hf_model(family, tmp_path / family, tokenizer=False)
    seqs = [(17, 21), (0, 5), (9, 10), (0, 1)]
    m = load_model(path, dtype=dtype, backend="triton")
    compare(f"{family} triton", path, m, seqs)


# ----------------------------------------------------------------------- chunking invariance
def test_chunked_prefill_equals_whole_prompt():
    """The tiny preset (random init): a prompt prefilled in one step or in three chunks
    (16, 17, 7 tokens, each over the cache the previous ones wrote) gives the same last-token
    logits up to fp32 rounding, and random init keeps the logits finite and O(1)."""
    m = load_model("tiny", seed=3)
    toks = random_tokens([(0, 40)], m.config.vocab_size)[0]
    gen = torch.Generator().manual_seed(1)
    tables, nb = block_tables([40], gen)
    whole = m(*make_step([toks], [(0, 40)], tables, nb, gen), m.allocate_kv_cache(nb, BLOCK),
              torch.tensor([39]))
    kv = m.allocate_kv_cache(nb, BLOCK)
    for s, e in ((0, 16), (16, 33), (33, 40)):
        chunk = m(*make_step([toks], [(s, e)], tables, nb, gen), kv, torch.tensor([e - s - 1]))
    assert torch.isfinite(whole).all() and 0.05 < whole.std() < 20
    err = (chunk - whole).abs().max().item()
    print(f"chunked vs whole: max err {err:.3e}, scale {whole.abs().max():.3f}")
    # same fp32 math, other summation order across chunks: a few-ulp floor (tests/tolerance.py)
    assert err <= 16 * EPS[torch.float32] * whole.abs().max().item()


# ----------------------------------------------------------------------- config + presets
def test_presets_match_published_shapes():
    l8, q06 = ModelConfig.preset("llama3-8b"), ModelConfig.preset("qwen3-0.6b")
    assert (l8.hidden_size, l8.intermediate_size, l8.num_hidden_layers, l8.num_attention_heads,
            l8.num_key_value_heads, l8.head_dim, l8.vocab_size) == (4096, 14336, 32, 32, 8, 128, 128256)
    assert (q06.hidden_size, q06.intermediate_size, q06.num_hidden_layers, q06.num_attention_heads,
            q06.num_key_value_heads, q06.head_dim, q06.vocab_size) == (1024, 3072, 28, 16, 8, 128, 151936)
    assert q06.qk_norm and q06.tie_word_embeddings and not l8.tie_word_embeddings
    assert l8.num_parameters() == 8_030_261_248        # Meta-Llama-3-8B, as published
    assert q06.num_parameters() == 596_049_920         # Qwen3-0.6B (0.44B non-embedding)
    assert set(PRESETS) >= {"tiny", "llama3-8b", "qwen3-0.6b"}


@pytest.mark.parametrize("name", ["llama3-8b", "qwen3-0.6b", "tiny"])
def test_preset_parameter_count_on_meta_device(name):
    """Build the module on the meta device (no memory): its parameters match the formula."""
    m = LlamaForCausalLM(ModelConfig.preset(name), dtype=torch.bfloat16, device="meta")
    assert sum(p.numel() for p in m.parameters()) == m.config.num_parameters()
    assert m.kv_cache_bytes_per_block(16) == (2 * m.config.num_hidden_layers * 16
                                              * m.config.num_key_value_heads * m.config.head_dim * 2)


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2", "qwen3"])
def test_parameter_count_formula_matches_hf(family):
    hf = build_hf_model(family)
    cfg = ModelConfig.from_hf_config(hf.config.to_dict() | {"architectures": [type(hf).__name__]})
    assert cfg.num_parameters() == hf.num_parameters()


def test_tiny_preset_kv_cache_and_dtypes():
    m = load_model("tiny", dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and m.device == torch.device("cpu")
    kv = m.allocate_kv_cache(5, 32)
    assert len(kv) == m.config.num_hidden_layers
    for k, v in kv:
        assert k.shape == v.shape == (5, 32, m.config.num_key_value_heads, m.config.head_dim)
        assert k.dtype == torch.bfloat16
    total = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
    assert m.kv_cache_bytes_per_block(32) * 5 == total
    assert resolve_dtype("fp16") == torch.float16 and resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="num_blocks"):
        m.allocate_kv_cache(0, 16)
    with pytest.raises(ValueError, match="model"):
        load_model("no-such-preset")


def test_rope_settings_read_from_both_config_styles():
    """transformers 5.x writes rope_parameters; 4.x checkpoints carry rope_theta/rope_scaling."""
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64,
                intermediate_size=96, num_hidden_layers=1, num_attention_heads=4)
    v4 = ModelConfig.from_hf_config(base | dict(rope_theta=5e5, rope_scaling=scaling))
    v5 = ModelConfig.from_hf_config(base | dict(rope_parameters=scaling | dict(rope_theta=5e5)))
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling["rope_type"] == "llama3"
    assert v4.num_key_value_heads == 4 and v4.head_dim == 16


def test_hf_dir_extras_eos_and_tokenizer(tmp_path):
    """generation_config.json's eos ids join config.json's; the helper's tokenizer round-trips."""
    from transformers import AutoTokenizer
    path = make_hf_model("llama", tmp_path / "llama")
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [7, 2]}, f)
    cfg = ModelConfig.from_hf_config(path)
    assert cfg.eos_token_id == [2, 7] and cfg.bos_token_id == 1 and cfg.name_or_path == path
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("héllo, world")["input_ids"]
    assert tok.decode(ids) == "héllo, world" and max(ids) < cfg.vocab_size
    assert tok.eos_token_id == 2 and len(tok) == cfg.vocab_size


# ----------------------------------------------------------------------- errors
def test_config_errors_name_the_problem():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64,
                intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf_config(base | dict(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig(rope_scaling=dict(rope_type="yarn", factor=4.0))
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf_config(base | dict(hidden_act="gelu"))
    qwen = base | dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                       sliding_window=32, max_window_layers=1)
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_hf_config(qwen)
    assert ModelConfig.from_hf_config(qwen | dict(max_window_layers=0)).sliding_window == 32
    assert ModelConfig.from_hf_config(qwen | dict(use_sliding_window=False)).sliding_window is None


def _rewrite_checkpoint(path, edit):
    from safetensors.torch import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_loader_errors(tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    path = make_hf_model("llama", tmp_path / "missing", tokenizer=False)
    _rewrite_checkpoint(path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_model(path)

    path = make_hf_model("llama", tmp_path / "shape", tokenizer=False)
    _rewrite_checkpoint(path, lambda t: t.update({name: torch.zeros(16, 64)}))
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(16, 64\).*\(32, 64\)"):
        load_model(path)

    path = make_hf_model("llama", tmp_path / "arch", tokenizer=False)
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    with open(cfg_file, "w") as f:
        json.dump(cfg | {"architectures": ["FalconForCausalLM"]}, f)
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        load_model(path)


def test_forward_argument_errors():
    m = load_model("tiny")
    gen = torch.Generator().manual_seed(0)
    tables, nb = block_tables([4], gen)
    ids, pos, attn = make_step([[1, 2, 3, 4]], [(0, 4)], tables, nb, gen)
    kv = m.allocate_kv_cache(nb, BLOCK)
    with pytest.raises(ValueError, match="positions"):
        m(ids, pos[:3], attn, kv, torch.tensor([3]))
    with pytest.raises(ValueError, match="kv_caches"):
        m(ids, pos, attn, kv[:1], torch.tensor([3]))
    # A step of mid-prompt chunks samples nothing: [0, vocab] logits, but the KV is written.
    empty = m(ids, pos, attn, kv, torch.zeros(0, dtype=torch.int64))
    assert empty.shape == (0, m.config.vocab_size) and empty.dtype == torch.float32
    assert kv[0][0].view(-1, *kv[0][0].shape[2:])[attn.slot_mapping].abs().sum() > 0


# ----------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3"])
def test_bf16_gpu_matches_hf(tmp_path, family):
    """bf16 on CUDA (default backend) vs HF fp64; PyTorch's own error = HF bf16 eager."""
    path = make_hf_model(family, tmp_path / family, tokenizer=False,
                         tie_word_embeddings=family == "qwen2")
    m = load_model(path, dtype=torch.bfloat16, device="cuda")
    compare(f"{family} cuda", path, m, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3-0.6b", "llama3-8b"])
def test_preset_decode_step_gpu_no_host_sync(name):
    """Full-size random preset, 64 decodes over 100-token contexts + one 37-token prompt:
    finite logits, and the forward never synchronises with the host."""
    m = load_model(name, dtype="bfloat16", device="cuda")
    seqs = [(100, 101)] * 64 + [(0, 37)]
    tokens = random_tokens(seqs, m.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    tables, nb = block_tables([n for _, n in seqs], gen)
    kv = m.allocate_kv_cache(nb, BLOCK)
    step = make_step(tokens, [(0, n) for _, n in seqs], tables, nb, gen, "cuda")
    idx = (step[2].cu_seqlens_q[1:] - 1).long()
    with torch.no_grad():
        m(*step, kv, idx)                                       # fills the contexts
        step = make_step(tokens, seqs, tables, nb, gen, "cuda")
        idx = (step[2].cu_seqlens_q[1:] - 1).long()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = m(*step, kv, idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (len(seqs), m.config.vocab_size)
    assert torch.isfinite(logits).all() and 0.05 < logits.float().std().item() < 50
