"""Stand-ins shared by the worker-extension tests: the worker's MTP capture and input recorder switched
off, because the stand-in workers put the MTP log-probs into the data themselves."""

from __future__ import annotations

import contextlib


class NoCapture(contextlib.AbstractContextManager):
    """The worker's capture around NeMo-RL's forward: the stand-in's forward captures for itself."""

    def __init__(self, model, *, detach_trunk):
        self.active, self.num_depths = True, 1

    def __exit__(self, *exc):
        return None


def without_capture(monkeypatch) -> None:
    """Swap the worker's ``MTPCapture`` and ``ModelInputRecorder`` for no-ops (undone by monkeypatch)."""
    import nemo_occ.megatron.mtp_capture as capture_mod
    from nemo_occ.nemo_rl import worker, worker_capture

    monkeypatch.setattr(capture_mod, "MTPCapture", NoCapture)
    for module in (worker, worker_capture):  # the training forward (worker) and get_logprobs (worker_capture)
        monkeypatch.setattr(module, "ModelInputRecorder", lambda model: contextlib.nullcontext())
