"""What the installed megatron-core can do for MTP, detected by looking at its code (never its version).

=========================  =========================================  ==========================
capability                 how it is detected                         present in
=========================  =========================================  ==========================
``process_mtp_loss``       ``gpt_model.process_mtp_loss`` exists       newer cores (NeMo-RL pins)
``labels_from_input_ids``  ``process_mtp_loss`` takes ``input_ids``    newer cores
``mtp_detach_heads``       ``TransformerConfig`` field                 >= 0.19
``mtp_use_repeated_layer`` ``TransformerConfig`` field                 >= 0.17
=========================  =========================================  ==========================

On 0.16.x the MTP loss is inline in ``GPTModel._postprocess`` and needs ``labels``; ``model(...)``
with ``labels=None`` crashes there when ``mtp_num_layers`` is set.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect


@dataclasses.dataclass(frozen=True)
class MegatronCapabilities:
    """MTP-related features of the installed megatron-core (see the module table)."""

    version: str
    process_mtp_loss: bool
    labels_from_input_ids: bool
    mtp_detach_heads: bool
    mtp_use_repeated_layer: bool

    @property
    def forward_without_labels(self) -> bool:
        """True when ``model(...)`` with MTP on and ``labels=None`` runs megatron's own code path."""
        return self.labels_from_input_ids


@functools.lru_cache(maxsize=1)
def detect_capabilities() -> MegatronCapabilities:
    """Inspect the importable megatron-core once (the result is cached)."""
    from megatron.core.models.gpt import gpt_model
    from megatron.core.transformer.transformer_config import TransformerConfig

    try:
        from megatron.core import package_info

        version = str(package_info.__version__)
    except ImportError:  # pragma: no cover - every released core has it
        version = "unknown"
    process = getattr(gpt_model, "process_mtp_loss", None)
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    return MegatronCapabilities(
        version=version,
        process_mtp_loss=process is not None,
        labels_from_input_ids=process is not None and "input_ids" in inspect.signature(process).parameters,
        mtp_detach_heads="mtp_detach_heads" in fields,
        mtp_use_repeated_layer="mtp_use_repeated_layer" in fields,
    )
