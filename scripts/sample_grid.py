"""Draw a captioned grid of a model's samples for the README (each image under its prompt).

python scripts/sample_grid.py digits-sd docs/digits-sd.png [--count 20] [--columns 5] [--seed 0]

Prompts are the model's own evaluation prompts (held-out combinations marked with *); every image uses the
evaluation set's steps and guidance, seed ``seed + i``.
"""

from __future__ import annotations

import argparse
import textwrap

from PIL import Image, ImageDraw, ImageFont

from quantdiff.evaluate import generate_set
from quantdiff.evaluation.prompt_sets import read_evaluation_set
from quantdiff.generate import load_any_pipeline
from quantdiff.pipelines.bundled import resolve_model

SCALE = 4
CAPTION_LINES = 3
LINE_HEIGHT = 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--columns", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    folder = resolve_model(args.model)
    evaluation = read_evaluation_set(folder)
    prompts = list(evaluation.prompts[: args.count])
    pipe = load_any_pipeline(folder)
    images = generate_set(
        pipe,
        [p.text for p in prompts],
        [args.seed + i for i in range(len(prompts))],
        steps=evaluation.steps,
        guidance=evaluation.guidance,
        batch_size=len(prompts),
        desc=args.model,
    ).images  # (N, 32, 32, 3) uint8

    font = ImageFont.load_default()
    side = images.shape[1] * SCALE
    cell_w, cell_h = side + 24, side + CAPTION_LINES * LINE_HEIGHT + 10
    rows = -(-len(prompts) // args.columns)
    grid = Image.new("RGB", (args.columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        left, top = (i % args.columns) * cell_w + 12, (i // args.columns) * cell_h + 4
        grid.paste(Image.fromarray(image).resize((side, side), Image.NEAREST), (left, top))
        text = ("* " if prompt.heldout else "") + prompt.text
        for line, words in enumerate(textwrap.wrap(text, width=22)[:CAPTION_LINES]):
            draw.text((left - 8, top + side + 2 + line * LINE_HEIGHT), words, fill="black", font=font)
    grid.save(args.out, optimize=True)
    print(f"{len(prompts)} samples of {args.model} -> {args.out}")


if __name__ == "__main__":
    main()
