"""The worker extension's checkpointing (item 3 of ``nemo_occ.nemo_rl.worker``): the objective's state, the probe
history and the RL step count are saved next to NeMo-RL's checkpoint and restored on resume.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nemo_occ.atomic_io import atomic_write
from nemo_occ.core.fidelity import ProbeHistory
from nemo_occ.safe_load import load_state

__all__ = ["STATE_FILE", "CheckpointMixin"]

STATE_FILE = "nemo_occ_state.pt"  # in <checkpoint>/policy/, next to NeMo-RL's weights/ and optimizer/


class CheckpointMixin:
    """Saves and restores the calibrator state with NeMo-RL's checkpoints."""

    def is_state_writer(self) -> bool:
        """One rank writes the calibrator state (identical on all ranks after ``close_update``)."""
        from megatron.core import parallel_state

        return (
            parallel_state.get_data_parallel_rank() == 0
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0
            and parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        )

    def save_checkpoint(self, weights_path: str, *args: Any, **kwargs: Any):
        """NeMo-RL's ``save_checkpoint``, then the OCC state next to it (one rank writes it)."""
        result = super().save_checkpoint(weights_path, *args, **kwargs)
        if self.is_state_writer():
            self.save_occ_state(Path(weights_path).parent / STATE_FILE)
        return result

    def save_occ_state(self, path: Path) -> None:
        """Write the objective's state atomically (``nemo_occ.atomic_io.atomic_write``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "nemo_occ": self.nemo_occ_cfg.model_dump(),
            "objective": self.occ_objective.state_dict(),
            "probes": self.occ_probes.state_dict(),
            "rl_steps": self.occ_rl_steps,
        }
        atomic_write(path, lambda f: torch.save(state, f))

    def load_occ_state(self, path: Path) -> bool:
        """Restore the objective saved by :meth:`save_occ_state`; warn when resuming without one.

        A different regime or number of depths is refused (the objective's ``load_state_dict``). Other
        ``nemo_occ`` settings that changed since the checkpoint are named in a warning: the restored λ and
        probe history were made under the saved ones, λ is used until the resumed run first refreshes it
        (its first applied update after the step's first), and moving the state file away restarts the
        calibrator at ``initial_lambda`` instead.
        """
        if not path.is_file():
            if self.occ_objective.calibrator is not None:
                warnings.warn(
                    f"resuming from {path.parent} without {STATE_FILE}: the OCC calibrator restarts at "
                    f"λ = {self.nemo_occ_cfg.occ.initial_lambda}",
                    stacklevel=2,
                )
            return False
        # numbers, lists, dicts and tensors only: a checkpoint from elsewhere must not run code on load
        state = load_state(
            path,
            what_to_do=f"move it away to restart the calibrator at λ = {self.nemo_occ_cfg.occ.initial_lambda}",
        )
        probes = ProbeHistory.from_config(self.nemo_occ_cfg.num_depths, self.nemo_occ_cfg.fidelity)
        probes.load_state_dict(state["probes"])
        self.occ_objective.load_state_dict(state["objective"])
        self.occ_probes, self.occ_rl_steps = probes, int(state["rl_steps"])
        changed = _config_changes(state["nemo_occ"], self.nemo_occ_cfg.model_dump())
        if changed and self.is_state_writer():  # one rank says it, not every rank of the job
            warnings.warn(
                f"resuming the OCC state of {path} under changed nemo_occ settings ({'; '.join(changed)}): "
                "the restored λ and probe history were made under the saved ones, and λ is used until the "
                f"run first refreshes it; to restart the calibrator at λ = {self.nemo_occ_cfg.occ.initial_lambda} "
                f"instead, move {path} away before resuming",
                stacklevel=2,
            )
        return True


def _config_changes(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``"occ.lambda_plus: 1.0 -> 0.5"`` for every (nested) field whose value differs."""
    out = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key, "(not saved)"), current.get(key, "(unset)")
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            out += _config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old} -> {new}")
    return out
