"""Fixtures shared by the megatron-layer tests."""

from __future__ import annotations

import warnings

import pytest


@pytest.fixture(scope="module")
def single_rank():
    """One process of megatron-core on this torch: ``cpu_compat`` entered, a gloo world of one with TP=1.

    The same context manager the CPU demo enters at its entry point; everything is undone after the module.
    """
    pytest.importorskip("megatron.core", reason="needs megatron-core")
    from nemo_occ.lab.cpu_compat import cpu_compat
    from nemo_occ.lab.parallel import model_parallel

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    with cpu_compat(), model_parallel():
        yield
