"""The presets' tokenizer (model/tokenizer.py): text prompts work offline for LLM("tiny")."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from model import PRESETS
from model.tokenizer import MIN_VOCAB, PresetTokenizer, preset_tokenizer
from ragged import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello, ragged! Paged attention over the KV cache, blocks of 16. Grüße, 世界"


def _digest(tok):
    return hashlib.sha256(tok._tok.to_str().encode()).hexdigest()


def test_tiny_text_path_end_to_end():
    llm = LLM("tiny", device="cpu")
    tok = llm.engine.tokenizer
    assert tok is not None and tok.vocab_size == PRESETS["tiny"].vocab_size == MIN_VOCAB
    o = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                     use_tqdm=False)[0]
    assert o.prompt_token_ids == tok.encode("Hello") and len(o.prompt_token_ids) == 5   # bytes
    assert len(o.token_ids) == 8 and o.finish_reason == "length"
    assert o.text == tok.decode(o.token_ids) and o.text
    print("tiny:", o.token_ids, repr(o.text))


def test_roundtrip_merges_and_specials():
    tiny = preset_tokenizer(PRESETS["tiny"].vocab_size)
    big = preset_tokenizer(PRESETS["qwen3-0.6b"].vocab_size)
    for tok in (tiny, big):
        assert tok.decode(tok.encode(TEXT)) == TEXT
        ids = tok.encode(TEXT)
        assert max(ids) < tok.vocab_size and min(ids) >= 3          # no specials from text
        assert tok.decode([1] + ids + [2]) == TEXT                  # <s>, </s> skipped
    assert len(tiny.encode(TEXT)) == len(TEXT.encode("utf-8"))     # 259 ids: one per byte
    print("vocab", big.vocab_size, "tokens", len(big.encode(TEXT)), "bytes", len(TEXT.encode()))
    assert 259 < big.vocab_size <= 4096 and len(big.encode(TEXT)) < 0.8 * len(TEXT.encode())
    assert big.decode([big.vocab_size + 5, *big.encode("ok")]) == "ok"   # unknown ids: dropped
    with pytest.raises(ValueError, match="vocab_size"):
        PresetTokenizer(200)


def test_training_is_deterministic_across_processes():
    here = _digest(PresetTokenizer(4096))
    # the module alone (model/__init__ would import torch: seconds for nothing)
    code = ("import hashlib, importlib.util as u; "
            "s = u.spec_from_file_location('t', 'model/tokenizer.py'); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); "
            "print(hashlib.sha256(m.PresetTokenizer(4096)._tok.to_str().encode()).hexdigest())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == here


def test_model_without_tokenizer_still_refuses_text():
    from model import load_model
    llm = LLM(load_model("tiny", device="cpu"))          # a loaded module: no name, no tokenizer
    with pytest.raises(ValueError, match=r"prompts\[0\]: prompt: text needs a tokenizer"):
        llm.generate(["Hello"], use_tqdm=False)
