"""The lowest-version rule, once for every JSON document quantdiff writes (recipes, quantized folders).

A writer omits every optional key whose value is its default; each key that a later format version added
is listed as a :class:`Feature` with the version that introduced it. A document is then written with the
*lowest* version that can express it: the largest version among the features it contains, 1 if none. So a
recipe or folder that uses nothing new stays readable by every quantdiff that knows version 1, and one that
does use something new is refused by an older reader with "upgrade quantdiff" instead of a confusing
unknown-key error. Adding a feature is one row in a table, not a branch in a writer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Feature:
    """An optional key that format version ``since`` introduced.

    Attributes:
        path: dotted key path into the document; ``*`` matches every key of a mapping or item of a list,
            e.g. ``plan.*.extras`` (any layer's extras) or ``overrides.*.weights.pair_safe``.
        since: the first format version that may contain it.
        what: what it is, for messages.
    """

    path: str
    since: int
    what: str


def features_used(document: Any, features: Sequence[Feature]) -> list[Feature]:
    """The features whose path is present in ``document`` with a value other than null."""
    return [feature for feature in features if _present(document, feature.path.split("."))]


def lowest_version(document: Any, features: Sequence[Feature]) -> int:
    """The lowest format version that can express ``document``: 1, or the newest feature it uses."""
    return max([1] + [feature.since for feature in features_used(document, features)])


def check_version(
    document: Any, declared: Any, newest: int, features: Sequence[Feature], what: str, writer: str = ""
) -> int:
    """Validate a document's declared format version against this reader; returns it.

    Raises ``ValueError`` with a message for the user: a version that is not a positive integer, a version
    newer than ``newest`` ("upgrade quantdiff"), or a document that uses a feature its declared version
    does not have (written by hand or damaged).
    """
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
        raise ValueError(f"{what} has an invalid format version {declared!r}")
    if declared > newest:
        by = f" by {writer}" if writer else ""
        raise ValueError(
            f"{what} was written in format version {declared}{by}, newer than this quantdiff understands "
            f"(up to version {newest}): upgrade quantdiff"
        )
    too_new = [feature for feature in features_used(document, features) if feature.since > declared]
    if too_new:
        feature = too_new[0]
        raise ValueError(
            f"{what} declares format version {declared} but uses {feature.what} ({feature.path}), which needs "
            f"version {feature.since}: the file was edited or damaged"
        )
    return declared


def _present(node: Any, parts: list[str]) -> bool:
    if not parts:
        return True
    head, rest = parts[0], parts[1:]
    if head == "*":
        if isinstance(node, Mapping):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            return False
        return any(_present(child, rest) for child in children)
    # A key holding null is absent: writers before version 4 wrote an unused ``group_size`` as null.
    return isinstance(node, Mapping) and node.get(head) is not None and _present(node[head], rest)
