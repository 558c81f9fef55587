"""quantdiff drops exactly the library log messages it understands (quantdiff.library_messages), no others."""

from __future__ import annotations

import logging

import pytest
import torch

import quantdiff  # noqa: F401 - importing quantdiff installs the filters
from quantdiff.library_messages import KNOWN_MESSAGES, _DropKnown, drop_known_messages


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def collect():
    handlers = {}
    for name in {message.logger for message in KNOWN_MESSAGES}:
        handlers[name] = _Collect()
        logging.getLogger(name).addHandler(handlers[name])
    yield handlers
    for name, handler in handlers.items():
        logging.getLogger(name).removeHandler(handler)


def test_known_messages_are_dropped_and_others_kept(collect):
    drop_known_messages()  # idempotent: a second call adds no second filter
    torchao = logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer")
    assert sum(isinstance(f, _DropKnown) for f in torchao.filters) == 1
    torchao.warning(
        "Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized with `torchao`"
    )
    torchao.warning("torchao quantization config is invalid")
    pytree = logging.getLogger("torch.utils._pytree")
    pytree.warning(
        "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. Calling "
        "register_constant() on Enum subclasses is deprecated and will be an error in a future release.",
        "<enum 'KernelPreference'>",
    )
    pytree.warning("something else about pytrees")
    logging.getLogger("torchao").warning(
        "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_cutlass_90a.abi3.so: Could not load this library"
    )
    logging.getLogger("torchao").warning("Skipping import of cpp extensions due to incompatible torch version.")
    assert collect["diffusers.quantizers.torchao.torchao_quantizer"].messages == [
        "torchao quantization config is invalid"
    ]
    assert collect["torch.utils._pytree"].messages == ["something else about pytrees"]
    kept = ["Skipping import of cpp extensions due to incompatible torch version."]
    if torch.version.cuda is not None or torch.version.hip is not None:  # a CUDA torch should load them: kept
        kept.insert(
            0,
            "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_cutlass_90a.abi3.so: Could not load this library",
        )
    assert collect["torchao"].messages == kept
