"""The README's Python example runs as written, and its tables match the code."""

from __future__ import annotations

import re
from pathlib import Path

from quantdiff.pipelines.architectures import ARCHITECTURES
from quantdiff.recipe import PRESETS

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README has no Python example"
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "W8A8 177 layers quantized" in out
    assert "denoiser size: fp32" in out


def test_every_preset_and_default_ignore_rule_is_documented():
    for name in PRESETS:
        assert f"`{name}`" in README, name
    for architecture in ARCHITECTURES.values():
        for rule in architecture.default_ignore:
            assert f"`{rule.pattern}`" in README, rule.pattern
