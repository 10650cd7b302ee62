"""Test-only: build MTP models on megatron-core 0.20 without Transformer Engine.

Megatron-LM 14346b65 (core 0.20) checks ``isinstance(eh_proj, (InferenceColumnParallelLinear, ...))`` in
``MultiTokenPredictionLayer.__init__`` (``tensor_parallel/inference_layers.py``,
``is_inference_column_parallel_linear``); without TE those names are MagicMocks and ``isinstance`` raises.
No TE means no inference-optimised linear exists, so the answer is False. Applied only when the real check
fails; a no-op on 0.16.x and wherever ``cpu_compat`` already handles it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def mtp_buildable_without_te() -> Iterator[None]:
    from megatron.core.transformer import multi_token_prediction as mtp

    check = getattr(mtp, "is_inference_column_parallel_linear", None)
    try:
        if check is None or check(None) is False:
            yield
            return
    except TypeError:  # isinstance() on a MagicMock: TE is absent
        pass
    mtp.is_inference_column_parallel_linear = lambda module: False
    try:
        yield
    finally:
        mtp.is_inference_column_parallel_linear = check
