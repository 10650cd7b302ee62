"""nemo-occ: train Multi-Token-Prediction layers jointly with RL, calibrated by OCC.

Layers (each imports only from the ones above it):

- ``nemo_occ.core``: torch-only math (regimes, clipped policy losses, the OCC calibrator,
  MTP/main alignment, exact-gradient diagnostics).
- ``nemo_occ.megatron``: megatron-core model layer (MTP hidden-state capture, chunked
  vocab-parallel log-probs, detach).
- ``nemo_occ.nemo_rl``: thin NeMo-RL glue (worker extension, loss function, entry point).
- ``nemo_occ.export``: Hugging Face export with the MTP weights, and its verification.
- ``nemo_occ.lab`` (the ``[lab]`` extra, beside the library): the CPU demo, the study, their figures and
  the small megatron-core GPT they run on; nothing in the library imports it.
"""

__version__ = "0.1.0"
