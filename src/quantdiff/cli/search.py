"""``quantdiff search``: MixDQ's mixed-precision search; writes a recipe with exact per-layer bits for
``quantdiff quantize --recipe``, and its report and plots beside it."""

from __future__ import annotations

from quantdiff.cli.options import DTYPES, add_model_argument, add_runtime_options
from quantdiff.errors import QuantDiffError


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise QuantDiffError(f"bit widths must be comma-separated integers, got {text!r}") from None
    if not values:
        raise QuantDiffError("give at least one bit width")
    return values


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise QuantDiffError(f"--shard must be i/n (e.g. 0/4), got {text!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise QuantDiffError(f"--shard {text}: use i/n with 0 <= i < n")
    return index, count


def add_parser(verbs) -> None:
    parser = verbs.add_parser(
        "search",
        help="mixed precision (MixDQ): per-layer sensitivity, an integer program under a bit budget -> a recipe",
    )
    add_model_argument(parser)
    parser.add_argument("--calib", required=True, help="calibration folder of MODEL (from `quantdiff calibrate`)")
    parser.add_argument("--out", required=True, help="the recipe to write (.yaml or .json); the report goes beside it")
    parser.add_argument(
        "--weight-bits", type=float, required=True, help="average weight bits, weighted by parameters (e.g. 4)"
    )
    parser.add_argument(
        "--act-bits", type=float, default=8.0, help="average input bits, weighted by input size (default 8)"
    )
    options = parser.add_argument_group("candidates")
    options.add_argument(
        "--weight-candidates", default="2,4,8", help="weight widths measured for every layer (default 2,4,8)"
    )
    options.add_argument(
        "--content-weight-bits", default="2,4,8", help="weight options of content layers (default 2,4,8, MixDQ)"
    )
    options.add_argument(
        "--quality-weight-bits", default="4,8", help="weight options of quality layers (default 4,8, MixDQ)"
    )
    options.add_argument(
        "--act-candidates",
        default="4,8",
        help="input options (default 4,8); 16 keeps a layer's input in float (weight-only), never measured",
    )
    options.add_argument(
        "--act-observer", default="minmax", help="observer of the input ranges (default minmax, MixDQ)"
    )
    measure = parser.add_argument_group("sensitivity measurement")
    measure.add_argument("--records", type=int, default=64, help="calibration records per SQNR entry (default 64)")
    measure.add_argument("--images", type=int, default=32, help="images per SSIM entry (default 32)")
    measure.add_argument("--seed", type=int, default=10_000, help="seed of the first image (default 10000)")
    measure.add_argument("--steps", type=int, help="steps of those images (default: the evaluation set's)")
    measure.add_argument("--guidance", type=float, help="guidance of those images (default: the evaluation set's)")
    measure.add_argument("--batch-size", type=int, default=32, help="images per pipeline call (default 32)")
    measure.add_argument(
        "--layers",
        help="comma-separated globs of the layers to search (default: all the base recipe quantizes); the others "
        "stay at 8 bits",
    )
    measure.add_argument(
        "--cache", help="folder of the sensitivity cache (default: <out without suffix>.sensitivity/); resumable"
    )
    measure.add_argument(
        "--shard",
        help="i/n: measure only every n-th layer from the i-th into the cache, then stop; run the n shards (any "
        "order, in parallel), then once without --shard to merge and allocate",
    )
    method = parser.add_argument_group("method")
    method.add_argument(
        "--bos-aware",
        choices=("auto", "on", "off"),
        default="auto",
        help="BOS-aware text keys / values: auto = where the calibration data shows a constant first text token",
    )
    method.add_argument(
        "--no-decouple", action="store_true", help="score every layer by SQNR in one group (MixDQ's ablation)"
    )
    method.add_argument(
        "--cost",
        choices=("nominal", "stored"),
        default="nominal",
        help="weight budget in nominal bits (MixDQ) or in the bits stored (2-4 bit weights take a 4-bit nibble)",
    )
    method.add_argument(
        "--objective",
        choices=("noise", "mixdq"),
        default="noise",
        help="sum noise ratios 10^(-SQNR/10) and 1-SSIM (default) or MixDQ's raw SQNR dB / SSIM",
    )
    parser.add_argument("--name", help="the recipe's name (default: the --out file name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_runtime_options(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    import dataclasses
    from pathlib import Path

    from quantdiff.calibration import CalibrationSet
    from quantdiff.pipelines.loading import denoiser_of, load_pipeline, read_pipeline_folder
    from quantdiff.recipe import TensorSpec
    from quantdiff.search import SearchSettings, SensitivitySettings, resolve_bos, run_search
    from quantdiff.search.sensitivity import MIXDQ_ACTIVATIONS, MIXDQ_WEIGHTS

    read_pipeline_folder(args.model)
    out = Path(args.out)
    shard = _shard(args.shard) if args.shard else None
    if out.exists() and not args.overwrite and shard is None:
        raise QuantDiffError(f"'{out}' already exists: choose another --out or pass --overwrite")
    calibration = CalibrationSet.load(args.calib)
    pipe = load_pipeline(args.model, device=args.device, torch_dtype=DTYPES[args.dtype])
    _, denoiser = denoiser_of(pipe)
    calibration.check_matches(denoiser)
    bos, reason = resolve_bos(args.bos_aware, denoiser, calibration)
    activations = (
        MIXDQ_ACTIVATIONS
        if args.act_observer == "minmax"
        else dataclasses.replace(MIXDQ_ACTIVATIONS, observer=args.act_observer)
    )
    TensorSpec.from_dict(activations.to_dict())  # the observer name is checked here, before any work
    sensitivity = SensitivitySettings(
        weights=MIXDQ_WEIGHTS,
        activations=activations,
        weight_bits=_bits_list(args.weight_candidates),
        input_bits=_bits_list(args.act_candidates),
        records=args.records,
        images=args.images,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        batch_size=args.batch_size,
        bos_aware=bos,
        decoupled=not args.no_decouple,
        layers=tuple(part.strip() for part in (args.layers or "").split(",") if part.strip()),
    )
    settings = SearchSettings(
        weight_bits=args.weight_bits,
        input_bits=args.act_bits,
        content_weight_bits=_bits_list(args.content_weight_bits),
        quality_weight_bits=_bits_list(args.quality_weight_bits),
        input_candidates=_bits_list(args.act_candidates),
        cost=args.cost,
        objective=args.objective,
        decoupled=not args.no_decouple,
        bos_aware=bos,
        name=args.name or out.stem,
    )
    for bits in (*settings.content_weight_bits, *settings.quality_weight_bits):
        if bits not in sensitivity.weight_bits:
            raise QuantDiffError(
                f"weight option {bits} is not among --weight-candidates {list(sensitivity.weight_bits)}"
            )
    cache = Path(args.cache) if args.cache else out.with_name(out.stem + ".sensitivity")
    print(f"BOS-aware: {reason}")
    outcome = run_search(
        pipe,
        calibration,
        sensitivity,
        settings,
        out,
        cache=cache,
        model=args.model,
        shard=shard,
        bos_reason=reason,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    if outcome.result is None:
        left = len(outcome.missing)
        what = f"shard {shard[0]}/{shard[1]} measured" if shard else "measured"
        print(
            f"{what} in {outcome.seconds['sensitivity']:.0f} s -> {cache}; {left} entries of other shards still missing"
            + ("" if left else "; run again without --shard to allocate and write the recipe")
        )
        return 0
    averages = outcome.result.averages
    print(
        f"weights {averages['weight_bits']:.3f} bits on average ({averages['weight_bits_stored']:.3f} stored), "
        f"inputs {averages['input_bits']:.3f} bits; search {outcome.seconds['total']:.0f} s"
    )
    print(f"recipe -> {outcome.recipe_path}; report -> {outcome.report_paths['markdown']}")
    return 0
