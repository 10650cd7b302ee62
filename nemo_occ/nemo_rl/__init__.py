"""Thin NeMo-RL glue: recipe checks, the loss function, the Megatron worker extension, the entry point.

Driver side (NeMo-RL's driver venv has no megatron, Megatron-Bridge or Transformer Engine): ``recipes``,
``loss_config``, ``loss``, ``mtp_batch``, ``worker``, ``megatron_policy_worker_patches`` (until one of its
patches is entered), ``cli`` and ``run_grpo`` import none of them, nor NeMo-RL's worker modules
(``tests/nemo_rl/test_nemo_rl_driver.py`` refuses those imports and runs the registration path). Only
``megatron_worker``, imported by the Ray worker from ``worker.WORKER_FQN``, imports NeMo-RL's Megatron worker.
"""
