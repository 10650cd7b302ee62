"""Hugging Face export with the MTP weights, and its verification.

- ``models``: where GLM-4.5 and MiMo keep their MTP tensors in a HF checkpoint.
- ``fixups``: GLM MTP aliases and the MiMo ``input_proj`` half swap, over name/tensor streams.
- ``hf_checkpoint``: describe a HF safetensors checkpoint (index, shard headers) without loading it.
- ``writer``: shard writer following a reference index, into the all-or-nothing output folder of
  ``nemo_occ.atomic_io`` (cleaned up on SIGTERM and Ctrl-C; leftovers of killed runs found by the next one).
- ``target``: ``--out`` checked before the model is loaded (never an input folder, replaceable only
  if an earlier export, writable, room for the reference's size).
- ``values``: every tensor read once: SHA-256, finiteness, relative change against the reference.
- ``manifest``: ``nemo_occ_export.json``, the record of an export and its per-tensor checksums.
- ``verify``: names, shapes, dtypes, shards, config and tokenizer files, and values against the reference.
- ``hf_export``: the Bridge-free pipeline; ``bridge_export``: the Megatron-Bridge front end.
- ``synthetic``: tiny GLM/MiMo-shaped checkpoints for tests and for trying the commands offline.

Importing this package imports neither Megatron-Bridge nor Megatron-core.
"""
