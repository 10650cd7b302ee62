"""Thin NeMo-RL glue: recipe checks, the loss function, the Megatron worker extension, the entry point.

Importing this package (and ``recipes``, ``loss_config``, ``loss``, ``worker``, ``cli``) needs no NeMo-RL;
``megatron_worker`` and the training path of ``run_grpo`` import it (they run in the NeMo-RL container).
"""
