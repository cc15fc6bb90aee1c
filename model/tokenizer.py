"""A tokenizer for the presets (random weights, no checkpoint, so no tokenizer of their own).

A byte-level BPE trained at load time on model/tokenizer_corpus.txt (a frozen copy of the
project's design notes, 8.6 KB): training takes ~10 ms and is deterministic (the same merges
in every process), so nothing binary is committed. Ids 0, 1, 2 are <pad>, <s>, </s> (the
`tiny` preset's pad, BOS and EOS), then the 256 byte symbols, then merges, as many as fit in
min(vocab_size, 4096) and the corpus offers (~940). The `tiny` preset's 259-token vocabulary
leaves room for no merge: there the tokenizer is exactly one token per byte.

Text is encoded without a BOS. Ids the tokenizer does not know (a random-weight full-size
preset samples anywhere in its 128k-152k vocabulary) decode to nothing.
"""
from __future__ import annotations

import functools
import pathlib

CORPUS = pathlib.Path(__file__).with_name("tokenizer_corpus.txt")
SPECIALS = ("<pad>", "<s>", "</s>")
MIN_VOCAB = len(SPECIALS) + 256      # every byte must be a token
MAX_VOCAB = 4096                     # the corpus yields ~940 tokens: a cap, not a target


class PresetTokenizer:
    """encode(text) -> ids; decode(ids, skip_special_tokens=True) -> text."""

    def __init__(self, vocab_size: int):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size: a byte-level tokenizer needs >= {MIN_VOCAB} ids, "
                             f"got {vocab_size!r}")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, MAX_VOCAB),
                                      special_tokens=list(SPECIALS), min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator([CORPUS.read_text(encoding="utf-8")], trainer=trainer)
        assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        known = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(known, skip_special_tokens=skip_special_tokens)


@functools.lru_cache(maxsize=None)
def preset_tokenizer(vocab_size: int) -> PresetTokenizer:
    return PresetTokenizer(vocab_size)
