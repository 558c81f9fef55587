"""Captioned coloured digits: the dataset the benchmark text-to-image models are trained and judged on.

Each sample is one of scikit-learn's 1797 handwritten 8x8 digits (``load_digits``, values 0..16), scaled
up to 32x32 RGB with a random size and position, painted in a foreground colour over a background colour
(the 8x8 intensity is the alpha, so strokes are anti-aliased), and captioned by a small grammar of
paraphrases ("a red seven on a white background", "the digit 7 in red on white", ...).

Two splits keep evaluation honest:

- Source digits: a seeded, per-digit stratified 80/20 split of the 1797 images into ``"train"`` and
  ``"eval"``. The evaluator CNN trains on train sources only, so its accuracy on ``"eval"`` renders is
  a real held-out number.
- Combinations: a seeded ~9% of all (digit, foreground, background) triples are held out
  (``heldout_combinations``); ``combos="train"`` never yields them, so a generator trained on it can be
  tested on prompts it has never seen ("compositional generalisation").

Everything is a pure function of its seed: the same arguments give the same bytes.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

IMAGE_SIZE = 32
SOURCE_SIZE = 8
# load_digits stores intensities as 0..16.
SOURCE_MAX = 16.0
# Upsampled intensity mapped linearly onto alpha 0..1 between these bounds (see render_batch).
ALPHA_LOW = 0.1
ALPHA_HIGH = 0.8
# The source split and the held-out combinations every consumer (evaluator, generators, tests) agrees on.
SPLIT_SEED = 0
TRAIN_SOURCE_FRACTION = 0.8
# 5 of the 54 colour pairs per digit: 50 of 540 combinations (9.3%), each colour pair held out for at
# most one digit, so every pair and every (digit, colour) still appears in training.
HELDOUT_PAIRS_PER_DIGIT = 5

# Saturated, well separated colours. Tuned so that every pair differs by at least 46 in CIELAB
# Delta E*ab (red vs orange and yellow vs orange: 46.5; blue vs a darker purple: 49) and by at least 80
# in RGB distance, so a small CNN separates them even under the colour drift of a quantized generator.
PALETTE: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (225, 25, 25),
        "green": (20, 165, 45),
        "blue": (30, 75, 235),
        "yellow": (250, 220, 20),
        "purple": (125, 25, 130),
        "orange": (250, 140, 0),
        "white": (245, 245, 245),
        "black": (15, 15, 15),
    }
)
COLOURS: tuple[str, ...] = tuple(PALETTE)
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Pairs below either bound are unreadable to a person even if a CNN could separate them: yellow on
# white has a WCAG luminance contrast ratio of 1.26 (the only pair excluded by this palette).
MIN_CONTRAST_RATIO = 1.3
MIN_DELTA_E = 40.0

# Placeholders: {fg} {bg} colour names, {word} digit word, {num} numeral. Each names every field once,
# so parse_caption can invert it exactly.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {fg} {word} on a {bg} background",
    "a {fg} {num} on a {bg} background",
    "the digit {num} in {fg} on {bg}",
    "the number {word} in {fg} on {bg}",
    "{fg} number {word}, {bg} background",
    "a handwritten {fg} {word} on {bg}",
    "digit {num}, {fg} on {bg}",
    "a {bg} background with a {fg} {num}",
    "a {fg} digit {word} on a plain {bg} background",
    "{word} written in {fg} on a {bg} background",
)

_SPLITS = ("train", "eval")
_COMBO_SETS = ("train", "heldout", "all")


@dataclass(frozen=True, order=True)
class DigitSpec:
    """What an image shows: a digit 0..9 in a foreground colour on a different background colour."""

    digit: int
    foreground: str
    background: str

    def __post_init__(self) -> None:
        if not isinstance(self.digit, (int, np.integer)) or not 0 <= int(self.digit) <= 9:
            raise ValueError(f"digit must be an integer 0..9, got {self.digit!r}")
        for role, name in (("foreground", self.foreground), ("background", self.background)):
            if name not in PALETTE:
                raise ValueError(f"{role} colour '{name}' is not one of {', '.join(COLOURS)}")
        if self.foreground == self.background:
            raise ValueError(f"foreground and background must differ, both are '{self.foreground}'")
        # np.int64 from label arrays would otherwise make equal specs hash and print differently.
        object.__setattr__(self, "digit", int(self.digit))


@dataclass(frozen=True)
class DigitsDataset:
    """Rendered images with what they show and how they are captioned.

    Attributes:
        images: (N, 32, 32, 3) uint8 RGB.
        specs: N specs, one per image.
        captions: N captions, each parsing back to its spec.
        sources: (N,) int64 index of each image's source digit in ``load_digits``.
    """

    images: np.ndarray
    specs: list[DigitSpec]
    captions: list[str]
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.specs)

    def labels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(digit, foreground index, background index), each (N,) int64; colour indices follow ``COLOURS``."""
        return spec_labels(self.specs)


def spec_labels(specs: Sequence[DigitSpec]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class indices of specs for the evaluator's three heads; colour indices follow ``COLOURS``."""
    index = {name: i for i, name in enumerate(COLOURS)}
    digits = np.array([s.digit for s in specs], dtype=np.int64)
    fgs = np.array([index[s.foreground] for s in specs], dtype=np.int64)
    bgs = np.array([index[s.background] for s in specs], dtype=np.int64)
    return digits, fgs, bgs


# --- colour pairs -------------------------------------------------------------------------------------


def _relative_luminance(rgb: tuple[int, int, int]) -> float:
    """WCAG 2 relative luminance of an sRGB colour."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(linear @ np.array([0.2126, 0.7152, 0.0722]))


def _lab(rgb: tuple[int, int, int]) -> np.ndarray:
    """CIELAB (D65) of an sRGB colour."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = to_xyz @ linear / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def contrast(foreground: str, background: str) -> tuple[float, float]:
    """(WCAG contrast ratio, CIELAB Delta E*ab) between two palette colours."""
    la, lb = _relative_luminance(PALETTE[foreground]), _relative_luminance(PALETTE[background])
    ratio = (max(la, lb) + 0.05) / (min(la, lb) + 0.05)
    return ratio, float(np.linalg.norm(_lab(PALETTE[foreground]) - _lab(PALETTE[background])))


def _readable(foreground: str, background: str) -> bool:
    ratio, delta_e = contrast(foreground, background)
    return foreground != background and ratio >= MIN_CONTRAST_RATIO and delta_e >= MIN_DELTA_E


# Ordered (foreground, background) pairs that may appear: 54 with this palette.
COLOUR_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (fg, bg) for fg, bg in itertools.permutations(COLOURS, 2) if _readable(fg, bg)
)


def all_combinations() -> tuple[DigitSpec, ...]:
    """Every (digit, foreground, background) the dataset can show: 10 digits x ``COLOUR_PAIRS``."""
    return tuple(DigitSpec(d, fg, bg) for d in range(10) for fg, bg in COLOUR_PAIRS)


def heldout_combinations(seed: int = SPLIT_SEED) -> frozenset[DigitSpec]:
    """Combinations never shown in ``combos="train"`` data (50 of 540 with the default settings).

    Each digit gets ``HELDOUT_PAIRS_PER_DIGIT`` colour pairs taken from one shuffled list of pairs without
    repetition, so no colour pair is held out for two digits and every colour still meets every digit
    in training: held-out prompts are new combinations of seen parts.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(COLOUR_PAIRS))
    held = []
    for digit in range(10):
        for k in order[digit * HELDOUT_PAIRS_PER_DIGIT : (digit + 1) * HELDOUT_PAIRS_PER_DIGIT]:
            fg, bg = COLOUR_PAIRS[k]
            held.append(DigitSpec(digit, fg, bg))
    return frozenset(held)


def combinations(combos: str = "train", *, split_seed: int = SPLIT_SEED) -> tuple[DigitSpec, ...]:
    """The combinations of a combo set (``"train"``, ``"heldout"`` or ``"all"``), in a fixed order."""
    if combos not in _COMBO_SETS:
        raise ValueError(f"combos must be one of {', '.join(_COMBO_SETS)}, got '{combos}'")
    every = all_combinations()
    if combos == "all":
        return every
    held = heldout_combinations(split_seed)
    return tuple(s for s in every if (s in held) == (combos == "heldout"))


# --- source digits ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _load_sources() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float32 in 0..16, targets (1797,) int64), read-only; shipped inside scikit-learn."""
    from sklearn.datasets import load_digits  # local: only the dataset needs scikit-learn

    data = load_digits()
    images = np.ascontiguousarray(data.images, dtype=np.float32)
    targets = np.asarray(data.target, dtype=np.int64)
    # The cache hands out the same arrays to every caller: make them immutable.
    images.flags.writeable = False
    targets.flags.writeable = False
    return images, targets


def source_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 source digits: (images (1797, 8, 8) float32 in 0..16, targets (1797,) int64), read-only."""
    return _load_sources()


def source_split(split: str = "train", *, split_seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices into ``load_digits`` of a source split: 80% ``"train"`` / 20% ``"eval"`` per digit."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got '{split}'")
    _, targets = _load_sources()
    rng = np.random.default_rng(split_seed)
    chosen = []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(targets == digit))
        n_train = int(round(TRAIN_SOURCE_FRACTION * len(members)))
        chosen.append(members[:n_train] if split == "train" else members[n_train:])
    return np.sort(np.concatenate(chosen))


# --- captions -----------------------------------------------------------------------------------------

_A_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou]|8\b)")
_AN = re.compile(r"\ban\b")


def _pick(rng: random.Random | np.random.Generator, n: int) -> int:
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(n))
    if isinstance(rng, random.Random):
        return rng.randrange(n)
    raise TypeError(f"rng must be random.Random or numpy.random.Generator, got {type(rng).__name__}")


def format_caption(spec: DigitSpec, template: int) -> str:
    """The caption of ``spec`` in template number ``template`` of ``CAPTION_TEMPLATES``."""
    text = CAPTION_TEMPLATES[template].format(
        fg=spec.foreground, bg=spec.background, word=DIGIT_WORDS[spec.digit], num=str(spec.digit)
    )
    # "an orange", "an eight", "an 8".
    return _A_BEFORE_VOWEL.sub("an ", text)


def caption(spec: DigitSpec, rng: random.Random | np.random.Generator) -> str:
    """A caption for ``spec`` in a template drawn from ``rng`` (one draw per call)."""
    return format_caption(spec, _pick(rng, len(CAPTION_TEMPLATES)))


def _template_pattern(template: str) -> re.Pattern[str]:
    colour = "|".join(COLOURS)
    groups = {
        "fg": f"(?P<fg>{colour})",
        "bg": f"(?P<bg>{colour})",
        "word": f"(?P<word>{'|'.join(DIGIT_WORDS)})",
        "num": "(?P<num>[0-9])",
    }
    # Split on placeholders, escape the literal text between them.
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(groups[p] if i % 2 else re.escape(p) for i, p in enumerate(parts))
    return re.compile(regex)


_PATTERNS: tuple[re.Pattern[str], ...] = tuple(_template_pattern(t) for t in CAPTION_TEMPLATES)


def parse_caption(text: str) -> DigitSpec:
    """The spec a caption describes; the inverse of ``caption`` for every template.

    Case, surrounding whitespace, repeated spaces, a final full stop and "a" versus "an" are ignored.

    Raises:
        ValueError: the text matches no template, or names the same colour twice.
    """
    normal = _AN.sub("a", " ".join(text.lower().split()).rstrip("."))
    for pattern in _PATTERNS:
        match = pattern.fullmatch(normal)
        if match is None:
            continue
        fields = match.groupdict()
        digit = int(fields["num"]) if fields.get("num") is not None else DIGIT_WORDS.index(fields["word"])
        return DigitSpec(digit, fields["fg"], fields["bg"])
    raise ValueError(f"caption matches none of the {len(CAPTION_TEMPLATES)} digit templates: {text!r}")


# --- rendering ----------------------------------------------------------------------------------------


def _as_generator(rng: random.Random | np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, random.Random):
        return np.random.default_rng(rng.getrandbits(64))
    return np.random.default_rng(rng)


def _interpolation_matrices(top: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """(N, 32, 10) bilinear weights from a zero-padded 10-pixel source axis to 32 output pixels.

    Output pixel ``y`` samples the source at ``u = (y + 0.5 - top) * 8 / extent - 0.5`` (pixel centres,
    like ``align_corners=False``); the padding makes the digit fade to zero at its box edge.
    """
    pixel = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5  # (32,)
    u = (pixel[None, :] - top[:, None]) * (SOURCE_SIZE / extent[:, None]) - 0.5  # (N, 32)
    # +1 for the padding column; clipping lands outside samples on padding zeros.
    u = np.clip(u + 1.0, 0.0, SOURCE_SIZE + 1.0)
    low = np.minimum(np.floor(u).astype(np.int64), SOURCE_SIZE)  # (N, 32)
    frac = u - low
    taps = np.arange(SOURCE_SIZE + 2)
    return (taps == low[..., None]) * (1.0 - frac[..., None]) + (taps == low[..., None] + 1) * frac[..., None]


def render_batch(
    sources: np.ndarray,
    foregrounds: np.ndarray,
    backgrounds: np.ndarray,
    rng: random.Random | np.random.Generator | int | None,
) -> np.ndarray:
    """Renders many digits at once (the vectorised core of ``render`` and ``make_dataset``).

    Each digit is scaled to a random height of 18..26 px with an aspect ratio jitter of +-10%, centred
    within +-3 px of the image centre, and alpha-blended: ``pixel = bg + alpha * (fg - bg)`` with
    ``alpha`` the bilinearly upsampled 8x8 intensity / 16, stretched linearly from
    ``[ALPHA_LOW, ALPHA_HIGH]`` to ``[0, 1]``.

    Args:
        sources: (N, 8, 8) intensities in 0..16.
        foregrounds: (N, 3) RGB in 0..255.
        backgrounds: (N, 3) RGB in 0..255.
        rng: generator for the random placement (or a seed).

    Returns:
        (N, 32, 32, 3) uint8.
    """
    sources = np.asarray(sources, dtype=np.float64)
    if sources.ndim != 3 or sources.shape[1:] != (SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(f"sources must be (N, 8, 8), got {sources.shape}")
    n = len(sources)
    gen = _as_generator(rng)
    height = gen.uniform(18.0, 26.0, n)
    width = np.minimum(height * gen.uniform(0.9, 1.1, n), 28.0)
    centre_y = IMAGE_SIZE / 2 + gen.uniform(-3.0, 3.0, n)
    centre_x = IMAGE_SIZE / 2 + gen.uniform(-3.0, 3.0, n)
    rows = _interpolation_matrices(centre_y - height / 2, height)  # (N, 32, 10)
    cols = _interpolation_matrices(centre_x - width / 2, width)  # (N, 32, 10)
    padded = np.pad(np.clip(sources / SOURCE_MAX, 0.0, 1.0), ((0, 0), (1, 1), (1, 1)))  # (N, 10, 10)
    # Separable bilinear resampling: rows @ source @ cols^T. float32 and a contiguous transpose keep
    # numpy on its fast batched-matmul path (10x faster than float64 on a strided view).
    cols_t = np.ascontiguousarray(cols.transpose(0, 2, 1), dtype=np.float32)  # (N, 10, 32)
    alpha = rows.astype(np.float32) @ padded.astype(np.float32) @ cols_t  # (N, 32, 32)
    # Stretch the blurry upsampled intensity so stroke cores reach the pure foreground colour; the
    # ramp keeps a 1-2 px anti-aliased edge.
    alpha = np.clip((alpha - ALPHA_LOW) / (ALPHA_HIGH - ALPHA_LOW), 0.0, 1.0)[..., None]  # (N, 32, 32, 1)
    fg = np.asarray(foregrounds, dtype=np.float32)[:, None, None, :]  # (N, 1, 1, 3)
    bg = np.asarray(backgrounds, dtype=np.float32)[:, None, None, :]
    out = bg + alpha * (fg - bg)  # (N, 32, 32, 3)
    return np.rint(out, out=out).astype(np.uint8)


def render(spec: DigitSpec, source: np.ndarray, rng: random.Random | np.random.Generator | int | None) -> np.ndarray:
    """One 32x32 RGB image of ``source`` (an 8x8 digit, 0..16) in the colours of ``spec``: (32, 32, 3) uint8."""
    source = np.asarray(source)
    if source.shape != (SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(f"source must be 8x8, got {source.shape}")
    fg = np.array([PALETTE[spec.foreground]])
    bg = np.array([PALETTE[spec.background]])
    return render_batch(source[None], fg, bg, rng)[0]


def make_dataset(n: int, *, split: str = "train", seed: int = 0, combos: str = "train") -> DigitsDataset:
    """``n`` rendered, captioned samples.

    Combinations are drawn uniformly from the combo set, then a source digit of that class uniformly from
    the source split, then the placement and the caption template.

    Args:
        n: number of samples.
        split: source digits, ``"train"`` or ``"eval"`` (disjoint, see ``source_split``).
        seed: sampling seed; the splits themselves are fixed (``SPLIT_SEED``).
        combos: ``"train"`` (no held-out combination), ``"heldout"`` (only those) or ``"all"``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = combinations(combos)
    indices = source_split(split)
    images, targets = _load_sources()
    by_digit = [indices[targets[indices] == d] for d in range(10)]
    # Distinct streams per (split, combos): the same seed must not give correlated train and eval sets.
    rng = np.random.default_rng([seed, _SPLITS.index(split), _COMBO_SETS.index(combos)])
    specs = [pool[i] for i in rng.integers(len(pool), size=n)]
    sources = np.array([by_digit[s.digit][rng.integers(len(by_digit[s.digit]))] for s in specs], dtype=np.int64)
    templates = rng.integers(len(CAPTION_TEMPLATES), size=n)
    fg = np.array([PALETTE[s.foreground] for s in specs], dtype=np.float64).reshape(n, 3)
    bg = np.array([PALETTE[s.background] for s in specs], dtype=np.float64).reshape(n, 3)
    rendered = render_batch(images[sources].reshape(n, SOURCE_SIZE, SOURCE_SIZE), fg, bg, rng)
    captions = [format_caption(s, int(t)) for s, t in zip(specs, templates, strict=True)]
    return DigitsDataset(images=rendered, specs=specs, captions=captions, sources=sources)


def render_specs(specs: Sequence[DigitSpec], *, split: str = "eval", seed: int = 0) -> np.ndarray:
    """Real images of exactly ``specs`` (a source digit of the right class from ``split`` for each): the
    reference set a generator's images for the same prompts are compared with. (N, 32, 32, 3) uint8."""
    indices = source_split(split)
    images, targets = _load_sources()
    by_digit = [indices[targets[indices] == d] for d in range(10)]
    rng = np.random.default_rng([seed, _SPLITS.index(split), 99])
    n = len(specs)
    sources = np.array([by_digit[s.digit][rng.integers(len(by_digit[s.digit]))] for s in specs], dtype=np.int64)
    fg = np.array([PALETTE[s.foreground] for s in specs], dtype=np.float64).reshape(n, 3)
    bg = np.array([PALETTE[s.background] for s in specs], dtype=np.float64).reshape(n, 3)
    return render_batch(images[sources].reshape(n, SOURCE_SIZE, SOURCE_SIZE), fg, bg, rng)


def evaluation_prompts(n: int, seed: int = 0, *, heldout_fraction: float = 0.3) -> list[tuple[str, DigitSpec]]:
    """Prompts for judging a generator: (caption, spec), ``round(n * heldout_fraction)`` of held-out combos.

    Combinations are dealt from reshuffled decks (each combination once before any repeats), so small
    prompt sets still cover the digits and colours evenly; the order of the result is shuffled.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    rng = np.random.default_rng([seed, 7])
    n_held = int(round(n * heldout_fraction))

    def deal(pool: tuple[DigitSpec, ...], count: int) -> list[DigitSpec]:
        dealt: list[DigitSpec] = []
        while len(dealt) < count:
            dealt.extend(pool[i] for i in rng.permutation(len(pool)))
        return dealt[:count]

    specs = deal(combinations("heldout"), n_held) + deal(combinations("train"), n - n_held)
    specs = [specs[i] for i in rng.permutation(len(specs))]
    return [(caption(s, rng), s) for s in specs]
