"""Find the megatron ``GPTModel`` inside its wrappers and switch parts of its forward off for a while.

Every switch is an instance-attribute swap that is undone on exit (also on error); nothing in
megatron's modules or the shared ``TransformerConfig`` object is modified.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch


def unwrap_gpt_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module / any ``.module`` chain (or a 1-element list)."""
    from megatron.core.models.gpt import GPTModel

    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(
                f"got {len(model)} model chunks (virtual pipeline); pass the chunk that holds the MTP block"
            )
        model = model[0]
    seen = 0
    while not isinstance(model, GPTModel):
        inner = getattr(model, "module", None)
        if inner is None or seen > 8:
            raise TypeError(
                f"expected a megatron-core GPTModel (optionally wrapped), got {type(model).__name__}"
            )
        model, seen = inner, seen + 1
    return model


@contextlib.contextmanager
def swapped_config(gpt: torch.nn.Module, **fields) -> Iterator[None]:
    """Give ``gpt`` (only the GPTModel object, not its submodules) a config copy with ``fields`` changed.

    GPTModel._postprocess reads ``self.config.mtp_num_layers`` to decide whether to run megatron's
    own MTP loss; the submodules keep the original config object.
    """
    original = gpt.config
    patched = copy.copy(original)
    for name, value in fields.items():
        setattr(patched, name, value)
    gpt.config = patched
    try:
        yield
    finally:
        gpt.config = original


@contextlib.contextmanager
def swapped_attributes(obj: object, **fields) -> Iterator[None]:
    """Set instance attributes of ``obj`` for the duration of the block, then restore them."""
    missing = object()
    saved = {name: obj.__dict__.get(name, missing) for name in fields}
    for name, value in fields.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


@contextlib.contextmanager
def mtp_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model`` as if it had no MTP block: no MTP layers, no MTP loss, labels optional.

    Yields the unwrapped GPTModel. Megatron-core 0.16.1 crashes on ``labels=None`` when
    ``mtp_num_layers`` is set (it clones the labels for the MTP loss); turning ``mtp_process`` off
    skips the MTP block and a config copy with ``mtp_num_layers=None`` skips the MTP loss.
    """
    gpt = unwrap_gpt_model(model)
    with swapped_attributes(gpt, mtp_process=False), swapped_config(gpt, mtp_num_layers=None):
        yield gpt
