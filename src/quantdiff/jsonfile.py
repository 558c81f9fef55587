"""Reading the JSON files quantdiff and diffusers write, with errors a user can act on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error_type: type[Exception], hint: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; anything unreadable raises ``error_type`` naming the file (plus ``hint``)."""
    suffix = f": {hint}" if hint else ""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise error_type(f"{path} is not readable JSON ({error}){suffix}") from None
    if not isinstance(data, dict):
        raise error_type(f"{path} must hold a JSON object{suffix}")
    return data
