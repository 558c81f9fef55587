"""The captioned coloured-digits dataset: determinism, splits, held-out combinations, captions, rendering."""

from __future__ import annotations

import random

import numpy as np
import pytest

from quantdiff.demo.digits import data as D
from quantdiff.demo.digits.data import (
    CAPTION_TEMPLATES,
    COLOUR_PAIRS,
    COLOURS,
    DIGIT_WORDS,
    PALETTE,
    DigitSpec,
    all_combinations,
    caption,
    combinations,
    evaluation_prompts,
    format_caption,
    heldout_combinations,
    make_dataset,
    parse_caption,
    render,
    source_digits,
    source_split,
)


def test_palette_and_pairs():
    assert len(PALETTE) == 8 and COLOURS == tuple(PALETTE)
    assert all(len(rgb) == 3 and all(0 <= c <= 255 for c in rgb) for rgb in PALETTE.values())
    assert DIGIT_WORDS[0] == "zero" and DIGIT_WORDS[7] == "seven" and len(DIGIT_WORDS) == 10
    assert len(set(COLOUR_PAIRS)) == len(COLOUR_PAIRS) == 54
    assert all(fg != bg for fg, bg in COLOUR_PAIRS)
    # The one low-contrast pair of this palette is excluded both ways, and every colour stays usable.
    assert ("yellow", "white") not in COLOUR_PAIRS and ("white", "yellow") not in COLOUR_PAIRS
    assert {fg for fg, _ in COLOUR_PAIRS} == set(COLOURS) == {bg for _, bg in COLOUR_PAIRS}
    for fg, bg in COLOUR_PAIRS:
        ratio, delta_e = D.contrast(fg, bg)
        assert ratio >= D.MIN_CONTRAST_RATIO and delta_e >= D.MIN_DELTA_E
    assert len(all_combinations()) == 540


def test_digit_spec_validates():
    assert DigitSpec(7, "red", "white").digit == 7
    assert DigitSpec(np.int64(3), "red", "white") == DigitSpec(3, "red", "white")
    for bad in [(7, "red", "red"), (10, "red", "white"), (-1, "red", "white"), (1, "pink", "white")]:
        with pytest.raises(ValueError):
            DigitSpec(*bad)
    with pytest.raises(AttributeError):
        DigitSpec(1, "red", "white").digit = 2


def test_make_dataset_is_deterministic_with_right_shapes():
    a = make_dataset(64, seed=3)
    b = make_dataset(64, seed=3)
    assert a.images.shape == (64, 32, 32, 3) and a.images.dtype == np.uint8
    assert len(a) == len(a.specs) == len(a.captions) == len(a.sources) == 64
    assert np.array_equal(a.images, b.images)
    assert a.specs == b.specs and a.captions == b.captions and np.array_equal(a.sources, b.sources)
    c = make_dataset(64, seed=4)
    assert not np.array_equal(a.images, c.images)
    assert all(s.foreground != s.background for s in a.specs + c.specs)
    # The same seed on the other split is a different stream, not the same layout with other digits.
    assert make_dataset(64, split="eval", seed=3).specs != a.specs


def test_labels_follow_colour_order():
    data = make_dataset(20, seed=0, combos="all")
    digits, fgs, bgs = data.labels()
    assert digits.dtype == np.int64 and digits.shape == (20,)
    assert [COLOURS[i] for i in fgs] == [s.foreground for s in data.specs]
    assert [COLOURS[i] for i in bgs] == [s.background for s in data.specs]
    assert list(digits) == [s.digit for s in data.specs]


def test_source_split_is_disjoint_stratified_and_fixed():
    images, targets = source_digits()
    assert images.shape == (1797, 8, 8) and not images.flags.writeable
    train, evaluation = source_split("train"), source_split("eval")
    assert len(np.intersect1d(train, evaluation)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, evaluation])), np.arange(1797))
    assert abs(len(evaluation) / 1797 - 0.2) < 0.01
    for digit in range(10):
        share = np.mean(targets[evaluation] == digit) / np.mean(targets == digit)
        assert 0.9 < share < 1.1
    assert np.array_equal(source_split("eval"), evaluation)
    assert not np.array_equal(source_split("eval", split_seed=1), evaluation)
    # Datasets draw their source digits from their split only, with the right class.
    for split, allowed in [("train", train), ("eval", evaluation)]:
        data = make_dataset(500, split=split, seed=5, combos="all")
        assert np.isin(data.sources, allowed).all()
        assert np.array_equal(targets[data.sources], data.labels()[0])


def test_heldout_combinations_never_in_train_data():
    held = heldout_combinations()
    assert len(held) == 50 and held == heldout_combinations(0)
    assert heldout_combinations(1) != held
    assert held <= set(all_combinations())
    # Each digit loses 5 pairs, no pair is held out for two digits.
    assert all(sum(s.digit == d for s in held) == 5 for d in range(10))
    assert len({(s.foreground, s.background) for s in held}) == 50

    train = make_dataset(3000, seed=0, combos="train")
    assert not set(train.specs) & held
    only_held = make_dataset(500, seed=0, combos="heldout", split="eval")
    assert set(only_held.specs) <= held and len(set(only_held.specs)) > 40
    mixed = make_dataset(3000, seed=0, combos="all")
    assert set(mixed.specs) & held and set(mixed.specs) - held
    assert set(combinations("train")) | set(combinations("heldout")) == set(all_combinations())
    with pytest.raises(ValueError):
        make_dataset(1, combos="nope")
    with pytest.raises(ValueError):
        make_dataset(1, split="test")


def test_every_template_round_trips_for_every_combination():
    for spec in all_combinations():
        texts = {format_caption(spec, t) for t in range(len(CAPTION_TEMPLATES))}
        assert len(texts) == len(CAPTION_TEMPLATES)  # paraphrases, not duplicates
        for text in texts:
            assert parse_caption(text) == spec, text


def test_captions_use_words_numerals_and_articles():
    spec = DigitSpec(8, "orange", "black")
    texts = [format_caption(spec, t) for t in range(len(CAPTION_TEMPLATES))]
    assert "an orange eight on a black background" in texts
    assert "the digit 8 in orange on black" in texts
    assert any(" 8" in t for t in texts) and any("eight" in t for t in texts)
    assert not any(" a orange" in t or " a 8" in t or t.startswith("a orange") for t in texts)
    assert format_caption(DigitSpec(7, "red", "white"), 0) == "a red seven on a white background"


def test_caption_is_seeded_and_accepts_both_rng_kinds():
    spec = DigitSpec(2, "blue", "yellow")
    from_random = [caption(spec, random.Random(9)) for _ in range(3)]
    assert len(set(from_random)) == 1  # same seed, same template
    rng = random.Random(0)
    seen = {caption(spec, rng) for _ in range(200)}
    assert len(seen) == len(CAPTION_TEMPLATES)
    first, second = np.random.default_rng(0), np.random.default_rng(0)
    assert [caption(spec, first) for _ in range(20)] == [caption(spec, second) for _ in range(20)]
    assert all(parse_caption(t) == spec for t in seen)
    with pytest.raises(TypeError):
        caption(spec, 3)


def test_parse_caption_normalises_and_rejects():
    spec = DigitSpec(7, "red", "white")
    assert parse_caption("  A Red   SEVEN on a white background. ") == spec
    assert parse_caption("an orange 8 on a black background") == DigitSpec(8, "orange", "black")
    assert parse_caption("a orange 8 on a black background") == DigitSpec(8, "orange", "black")
    for bad in [
        "a cat wearing a hat",
        "a red seven on a red background",  # same colour twice
        "a pink seven on a white background",  # not in the palette
        "a red seventeen on a white background",
        "a red seven on a white background and a blue three",
        "",
    ]:
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_render_is_an_alpha_blend_of_the_two_colours():
    data = make_dataset(300, seed=11, combos="all")
    for image, spec in zip(data.images, data.specs, strict=True):
        fg = np.array(PALETTE[spec.foreground], dtype=np.float64)
        bg = np.array(PALETTE[spec.background], dtype=np.float64)
        pixels = image.reshape(-1, 3).astype(np.float64)
        direction = fg - bg
        alpha = np.clip((pixels - bg) @ direction / (direction @ direction), 0, 1)  # (1024,)
        # Every pixel lies on the bg -> fg segment up to uint8 rounding.
        assert np.abs(bg + alpha[:, None] * direction - pixels).max() <= 1.0
        # Background dominates, the strokes reach the pure foreground, edges are anti-aliased.
        assert (alpha < 0.01).mean() > 0.4
        assert (alpha > 0.99).any()
        assert ((alpha > 0.05) & (alpha < 0.95)).any()


def test_render_single_image():
    spec = DigitSpec(0, "green", "purple")
    images, _ = source_digits()
    one = render(spec, images[0], np.random.default_rng(1))
    assert one.shape == (32, 32, 3) and one.dtype == np.uint8
    assert np.array_equal(one, render(spec, images[0], np.random.default_rng(1)))
    assert np.array_equal(one, render(spec, images[0], 1))
    assert np.array_equal(render(spec, images[0], random.Random(4)), render(spec, images[0], random.Random(4)))
    blank = render(spec, np.zeros((8, 8)), np.random.default_rng(0))
    assert (blank == np.array(PALETTE["purple"], dtype=np.uint8)).all()
    full = render(spec, np.full((8, 8), 16.0), np.random.default_rng(0))
    assert (full[16, 16] == PALETTE["green"]).all() and (full[0, 0] == PALETTE["purple"]).all()
    with pytest.raises(ValueError):
        render(spec, np.zeros((7, 8)), 0)


def test_digit_placement_varies_in_size_and_position():
    data = make_dataset(400, seed=2, combos="all")
    ink = np.abs(data.images.astype(np.int16) - data.images[:, :1, :1].astype(np.int16)).sum(-1) > 30  # (N, 32, 32)
    rows = np.where(ink.any(2), np.arange(32), np.nan)
    heights = np.nanmax(rows, 1) - np.nanmin(rows, 1)
    centres = (np.nanmax(rows, 1) + np.nanmin(rows, 1)) / 2
    assert heights.max() - heights.min() >= 6
    assert centres.max() - centres.min() >= 4
    assert ink[:, 0, :].mean() < 0.02  # the digit stays inside the frame almost always


def test_evaluation_prompts_mix_train_and_heldout():
    prompts = evaluation_prompts(100, seed=0)
    assert prompts == evaluation_prompts(100, seed=0)
    assert prompts != evaluation_prompts(100, seed=1)
    held = heldout_combinations()
    specs = [s for _, s in prompts]
    assert sum(s in held for s in specs) == 30
    assert len(set(specs)) == 100  # dealt without repeats while the decks last
    assert all(parse_caption(text) == spec for text, spec in prompts)
    assert sum(s in held for _, s in evaluation_prompts(40, heldout_fraction=0.0)) == 0
    assert all(s in held for _, s in evaluation_prompts(120, heldout_fraction=1.0))
    assert {s.digit for s in specs} == set(range(10))
    with pytest.raises(ValueError):
        evaluation_prompts(10, heldout_fraction=1.5)
