"""``quantdiff eval``: the floating-point model and quantized folders on the same prompts and seeds, scored."""

from __future__ import annotations

from pathlib import Path

from quantdiff.cli.options import add_execution_options
from quantdiff.errors import QuantDiffError


def add_parser(verbs) -> None:
    parser = verbs.add_parser(
        "eval", help="generate with the FP model and quantized folders on the same seeds; score and compare"
    )
    parser.add_argument("model", metavar="MODEL", help="floating-point pipeline folder, or a bundled name (digits-sd)")
    parser.add_argument("quantized", metavar="QUANTIZED_DIR", nargs="*", help="quantized folders of MODEL")
    parser.add_argument(
        "--recipes",
        help="comma-separated presets or recipe files: quantize MODEL with each (into OUT/quantized/NAME) and "
        "evaluate them all with the folders given, in one report",
    )
    parser.add_argument(
        "--calib",
        help="with --recipes: calibration folder of MODEL (default: record one into OUT/calib with the model's "
        "own calibration prompts at the evaluation's step count, 8 timesteps each)",
    )
    parser.add_argument("--out", required=True, help="folder for report.json, report.md and grid.png")
    parser.add_argument("--num-images", type=int, default=100, help="images per model (default 100)")
    parser.add_argument("--prompts", help="prompt file, one per line (default: the model's own evaluation set)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the evaluation set's, or pipeline's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the evaluation set's, or pipeline's)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per pipeline call (default 50)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    real = parser.add_argument_group("real-model metrics (local weights only)")
    real.add_argument("--inception-weights", metavar="FILE", help="FID Inception weights (.safetensors): FID vs FP")
    real.add_argument("--clip-model", metavar="DIR", help="local CLIP folder (transformers): CLIPScore")
    real.add_argument("--image-reward", metavar="FILE", help="ImageReward checkpoint (needs the image-reward package)")
    real.add_argument("--image-reward-config", metavar="FILE", help="ImageReward med_config.json")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_execution_options(parser, "reference")
    parser.set_defaults(run=run)


def run(args) -> int:
    from quantdiff.calibration.prompts import read_prompts
    from quantdiff.evaluate import EvalSettings, RealMetricWeights, evaluate, format_table, write_report

    if (Path(args.out) / "report.json").exists() and not args.overwrite:
        raise QuantDiffError(f"'{args.out}' already holds a report: choose another --out or pass --overwrite")
    settings = EvalSettings(
        num_images=args.num_images, steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size
    )
    weights = RealMetricWeights(args.inception_weights, args.clip_model, args.image_reward, args.image_reward_config)
    prompts = read_prompts(args.prompts) if args.prompts else None
    quantized = list(args.quantized) + _quantize_recipes(args) if args.recipes else list(args.quantized)
    report, images = evaluate(
        args.model,
        quantized,
        settings=settings,
        prompts=prompts,
        real_weights=weights,
        device=args.device,
        progress=not args.quiet,
        execution=args.execution,
        attention=args.attention,
    )
    folder = write_report(report, images, args.out)
    print(format_table(report))
    floor = report.reference.get("fid_digits_floor")
    if floor is not None:
        print(f"FID-digits floor (second real set): {floor:.2f}")
    print(f"report.json, report.md, grid.png -> {folder}")
    return 0


def _quantize_recipes(args) -> list[str]:
    """Quantize the model with each of ``--recipes`` (reusing folders already in OUT/quantized)."""
    from quantdiff.calibration import CalibrationSet, capture_calibration, read_prompts
    from quantdiff.evaluation.prompt_sets import read_calibration_prompts, read_evaluation_set
    from quantdiff.pipelines.loading import denoiser_of, load_pipeline
    from quantdiff.quantize import quantize_denoiser
    from quantdiff.recipe import load_recipe
    from quantdiff.serialization import is_quantized_folder, read_quantized_folder, save_quantized

    recipes = [load_recipe(name.strip()) for name in args.recipes.split(",") if name.strip()]
    if not recipes:
        raise QuantDiffError("--recipes lists no recipe: give presets or recipe files, comma-separated")
    names = [recipe.name for recipe in recipes]
    if len(set(names)) != len(names):
        raise QuantDiffError(f"--recipes names a recipe twice ({names}): each needs its own name")
    root = Path(args.out)
    calibration = None
    if any(recipe.needs_calibration for recipe in recipes):
        if args.calib:
            calibration = CalibrationSet.load(args.calib)
        elif (root / "calib").is_dir():
            calibration = CalibrationSet.load(root / "calib")
        else:
            evaluation = read_evaluation_set(args.model)
            prompts = read_calibration_prompts(args.model) or read_prompts(None)
            steps = args.steps or (evaluation.steps if evaluation is not None and evaluation.steps else None) or 25
            calibration = capture_calibration(
                load_pipeline(args.model, device=args.device),
                prompts,
                num_inference_steps=steps,
                num_timesteps=8,
                guidance_scale=None if evaluation is None else evaluation.guidance,
                model_path=args.model,
                progress=not args.quiet,
            )
            calibration.save(root / "calib")
            print(f"calibrated on {len(prompts)} prompts x {steps} steps -> {root / 'calib'}")
    folders = []
    for recipe in recipes:
        folder = root / "quantized" / recipe.name
        stale = False
        if is_quantized_folder(folder):
            stale = read_quantized_folder(folder).info.recipe.to_dict() != recipe.to_dict()
            if not stale:
                print(f"{recipe.name}: reusing {folder}")
                folders.append(str(folder))
                continue
            print(f"{recipe.name}: {folder} was made with another recipe of that name; quantizing again")
        pipe = load_pipeline(args.model, device=args.device)
        quantize_denoiser(denoiser_of(pipe)[1], recipe, calibration, progress=not args.quiet)
        save_quantized(pipe, folder, base_path=args.model, overwrite=stale)
        print(f"{recipe.name} ({recipe.label}) -> {folder}")
        folders.append(str(folder))
    return folders
