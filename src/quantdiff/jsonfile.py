"""Reading the JSON files quantdiff and diffusers write, with errors a user can act on.

Files come from other people (a quantized folder, a calibration set, a pipeline), so the reader is bounded:
a file over :data:`MAX_JSON_BYTES`, nesting deeper than Python's recursion limit, or an integer with more
digits than Python converts (4300) is refused with the same one-line error as a syntax error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 256 * 2**20
"""The largest JSON file quantdiff reads (a real SDXL quantdiff.json is a few MB)."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """``error``'s message on one line, at most ``limit`` characters: for messages that quote a file's content."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` whose every failure on hostile text is a ``ValueError`` with a readable message."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except ValueError as error:
        if "integer string conversion" in str(error):  # Python's advice (set_int_max_str_digits) is not for users
            raise ValueError(f"it holds an integer of more than {sys.get_int_max_str_digits()} digits") from None
        raise


def read_json_object(path: Path, error_type: type[Exception], hint: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; anything unreadable raises ``error_type`` naming the file (plus ``hint``)."""
    suffix = f": {hint}" if hint else ""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error_type(f"{path} is {size / 2**20:.0f} MiB, larger than any JSON quantdiff reads{suffix}")
        data = parse_json(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as error:  # JSONDecodeError and huge integers are ValueErrors
        raise error_type(f"{path} is not readable JSON ({error}){suffix}") from None
    if not isinstance(data, dict):
        raise error_type(f"{path} must hold a JSON object{suffix}")
    return data


def check_inside(folder: Path, path: Path, error_type: type[Exception]) -> None:
    """Refuse ``path`` when it resolves outside ``folder`` (a symlink leaving it, or a ``..`` name)."""
    root = folder.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise error_type(
            f"'{path}' resolves to '{resolved}', outside the folder '{folder}' (a symlink or '..' leaving it): "
            "quantdiff only reads files inside the folder; copy the file in (cp -L) if you trust it"
        )
