"""Tokenizers trained offline from a small corpus: CLIP's byte-level BPE and T5's Unigram.

The tiny pipelines (``quantdiff.testing.tiny``) and the digits demo's models need real tokenizer classes
(``CLIPTokenizer``, ``T5Tokenizer``) with the special tokens and id layout the pipelines expect, but
nothing may be downloaded. So the vocabularies are learned here, deterministically, from a corpus: by
default ``PROMPT_CORPUS``, a few dozen ordinary prompts, so that ordinary prompts in tests tokenize into
whole words or a few sub-words.
"""

from __future__ import annotations

import json
import re
import string
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer, T5Tokenizer

__all__ = ["PROMPT_CORPUS", "build_clip_tokenizer", "build_t5_tokenizer"]

# Sentences both tokenizers of the tiny pipelines learn from: CLIP's BPE merges and T5's Unigram pieces.
PROMPT_CORPUS: tuple[str, ...] = (
    "a photo of a cat sitting on a red sofa",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a mountain lake at sunrise",
    "a bowl of fruit on a wooden table, studio lighting",
    "a city street at night with neon lights and rain",
    "portrait of an old man with a white beard, oil painting",
    "a small boat on a calm blue sea under a cloudy sky",
    "a dog playing in the snow in a park",
    "the quick brown fox jumps over the lazy dog",
    "two birds flying over a green forest, highly detailed",
    "a cup of coffee next to an open book",
    "a castle on a hill at sunset, fantasy art",
    "a robot cooking dinner in a modern kitchen",
    "a field of yellow flowers with mountains in the background",
    "a close up photo of a butterfly on a leaf",
    "a red car parked in front of a house",
    "an oil painting of a ship in a storm",
    "a cute cat wearing a tiny hat",
    "a bear fishing in a river, national geographic photo",
    "a bicycle leaning against a brick wall",
    "a bowl of ramen with an egg, food photography",
    "a lighthouse on a rocky coast at dawn",
    "a black and white photo of a train station",
    "an owl sitting on a branch in the moonlight",
    "a glass of orange juice on a breakfast table",
    "a snowy village with wooden houses and smoke from the chimneys",
    "a tiger walking through tall grass",
    "a pencil sketch of a woman reading a book",
    "a futuristic city with flying cars, digital art",
    "a plate of pasta with tomato sauce and basil",
    "a child flying a kite on the beach",
    "a vase of roses on a window sill, soft light",
    "a horse running across a desert, 4k, high resolution",
    "a pixel art landscape with a river and trees",
    "a teddy bear sitting in a chair",
    "an astronaut floating in space above the earth",
)


# --------------------------------------------------------------------------------------------------
# CLIP: byte-level BPE


def build_clip_tokenizer(corpus: Iterable[str], min_frequency: int = 2, model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer learned from ``corpus``, written as ``vocab.json`` + ``merges.txt``.

    The layout is CLIP's: the 256 byte-level characters, the same with the ``</w>`` end-of-word suffix,
    one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Words seen at least
    ``min_frequency`` times become single tokens; anything else falls back to (byte-level) characters.
    """
    alphabet = list(_bytes_to_unicode().values())
    merges = _learn_bpe_merges(re.findall(r"[a-z0-9]+", " ".join(corpus).lower()), min_frequency)
    tokens = alphabet + [f"{char}</w>" for char in alphabet] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
        merges_lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
        merges_file.write_text("\n".join(merges_lines) + "\n", encoding="utf-8")
        # Without model_max_length the pipelines' padding="max_length" pads to a huge length.
        return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=model_max_length)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table for byte-level BPE.

    Printable Latin-1 bytes map to themselves; the others (controls, space, ...) are shifted past 255.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    shifted = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return dict(sorted(table.items()))


def _learn_bpe_merges(words: Iterable[str], min_frequency: int = 2) -> list[tuple[str, str]]:
    """Classic BPE training: repeatedly merge the most frequent adjacent symbol pair.

    Words end in a ``</w>`` symbol as in CLIP. Stops when no pair occurs ``min_frequency`` times; ties go
    to the alphabetically first pair, so the result depends only on ``words``.
    """
    segmented = Counter(tuple(word[:-1]) + (word[-1] + "</w>",) for word in words)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in segmented.items():
            for pair in zip(symbols, symbols[1:], strict=False):  # adjacent pairs
                pairs[pair] += count
        best = min(pairs, key=lambda pair: (-pairs[pair], pair), default=None)
        if best is None or pairs[best] < min_frequency:
            return merges
        merges.append(best)
        segmented = Counter({_merge_pair(symbols, best): count for symbols, count in segmented.items()})


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


# --------------------------------------------------------------------------------------------------
# T5: SentencePiece-style Unigram


def build_t5_tokenizer(corpus: Iterable[str] = PROMPT_CORPUS) -> T5Tokenizer:
    """A T5 (SentencePiece-style Unigram) tokenizer trained on ``corpus``, without sentencepiece.

    T5 expects ``<pad>``, ``</s>``, ``<unk>`` as ids 0, 1, 2; the trainer assigns special tokens first,
    in order. No ``<extra_id_*>`` sentinels: they only matter for T5's span-corruption pre-training.
    """
    unigram = Tokenizer(models.Unigram())
    # The pre-tokenization T5Tokenizer itself applies: split on whitespace, mark word starts with "▁".
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        ]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=256, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    unigram.train_from_iterator(corpus, trainer)
    trained = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    special, pieces = trained[:3], trained[3:]
    # model_max_length: T5's own, and the most SD3 accepts as max_sequence_length.
    return T5Tokenizer(vocab=special + _canonical_unigram_pieces(pieces), extra_ids=0, model_max_length=512)


def _canonical_unigram_pieces(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Unigram pieces whose ids and scores depend on the training corpus alone.

    The trainer's multi-threaded EM leaves noise in the last bits of the scores, and it appends the
    characters it needs for full coverage in arbitrary order with made-up, slightly decreasing scores.
    So: round the scores; make single characters plain fallbacks, with one score below every longer
    piece (also every printable ASCII character the corpus lacks, so that unseen words split into
    characters instead of becoming <unk>); then sort by score, then piece.
    """
    scores = {piece: round(score, 6) for piece, score in pieces if len(piece) > 1}
    fallback = min(scores.values()) - 1.0
    characters = {piece for piece, _ in pieces if len(piece) == 1}
    characters |= set(string.ascii_letters + string.digits + string.punctuation)
    scores.update(dict.fromkeys(characters, fallback))
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))
