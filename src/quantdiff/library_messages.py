"""Library log messages that quantdiff understands and drops, each for a stated reason.

Only exact messages are dropped (a filter on the one logger that emits each), never a library's whole
logger, so any other warning still reaches the user. Installed when ``quantdiff`` is imported, before
diffusers is, because some of these are logged at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownMessage:
    """A message dropped from one logger: it ``contains`` this text (and ``applies()``, where given)."""

    logger: str
    contains: str
    why: str
    applies: Callable[[], bool] | None = None


def _cpu_only_torch() -> bool:
    import torch

    return torch.version.cuda is None and torch.version.hip is None


# All three are logged when diffusers imports torchao, which the bench extra installs: on every start.
KNOWN_MESSAGES = (
    KnownMessage(
        logger="diffusers.quantizers.torchao.torchao_quantizer",
        contains="Unable to import `torchao` Tensor objects",
        why="diffusers 0.42 registers torchao classes for unpickling torchao checkpoints and the installed torchao "
        "(0.18) no longer has them; quantdiff loads safetensors only, never a torchao-pickled checkpoint, and the "
        "bench builds its torchao models in memory",
    ),
    KnownMessage(
        logger="torch.utils._pytree",
        contains="is an Enum subclass and is now natively supported by torch.compile",
        why="a deprecation notice to torchao's authors: torchao registers its Enums with register_constant, which "
        "torch 2.13 no longer needs; nothing for a quantdiff user to do",
    ),
    KnownMessage(
        logger="torchao",
        contains="/torchao/_C_",
        why="torchao tries to load its CUDA kernel libraries (CUTLASS sm90a, MX-FP8) on import; a CPU-only torch "
        "cannot load them and quantdiff never calls them (dropped only when torch is a CPU-only build)",
        applies=_cpu_only_torch,
    ),
)


class _DropKnown(logging.Filter):
    def __init__(self, messages: list[KnownMessage]):
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        for message in self.messages:
            if message.contains in text and (message.applies is None or message.applies()):
                return False
        return True


def drop_known_messages() -> None:
    """Install the filters (idempotent)."""
    by_logger: dict[str, list[KnownMessage]] = {}
    for message in KNOWN_MESSAGES:
        by_logger.setdefault(message.logger, []).append(message)
    for name, messages in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropKnown) for existing in logger.filters):
            logger.addFilter(_DropKnown(messages))
