"""The digits demo: small text-to-image models trained on coloured digits, and what judges them.

- ``data``: the captioned coloured-digits data set ("a red seven on a white background"), rendered from
  scikit-learn's bundled ``load_digits``, with its held-out source digits and colour combinations.
- ``evaluator``: the CNN that reads digit and colours off an image (alignment, FID-digits, IS-digits);
  its trained weights ship here as ``evaluator.safetensors``.
- ``prompts``: the calibration and evaluation prompt sets the digits models carry.
- ``training``: the trainers of the two bundled models, whose pipeline folders ship here as
  ``models/digits-sd`` and ``models/digits-sd3`` (``quantdiff.pipelines.bundled`` resolves the names).

Import the modules themselves: this package re-exports nothing, so that reading a model folder's
prompt sets (``quantdiff.evaluation.prompt_sets``, which needs ``data.DigitSpec``) loads neither the
evaluator nor the trainers.
"""
