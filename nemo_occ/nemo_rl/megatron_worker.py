"""The Ray actor NeMo-RL instantiates for nemo-occ: its Megatron policy worker plus our extension.

NeMo-RL's ``Policy(..., worker_extension_cls_fqn=FQN)`` accepts a subclass of the default worker; the
``@ray.remote`` class cannot be subclassed, so (as NeMo-RL's ``research/template_project`` does) we
subclass the plain ``MegatronPolicyWorkerImpl`` and decorate our own class. This module imports NeMo-RL's
Megatron worker (and so megatron-core, Megatron-Bridge and Transformer Engine) at import time: only the Ray
worker imports it, from its FQN (``nemo_occ.nemo_rl.worker.WORKER_FQN``); the driver never does.
"""

from __future__ import annotations

import ray
from nemo_rl.models.policy.utils import get_runtime_env_for_policy_worker
from nemo_rl.models.policy.workers.megatron_policy_worker import MegatronPolicyWorkerImpl

from nemo_occ.nemo_rl.worker import WORKER_FQN, OCCWorkerExtension

__all__ = ["WORKER_FQN", "OCCMegatronPolicyWorkerImpl", "OCCMegatronPolicyWorker"]


class OCCMegatronPolicyWorkerImpl(OCCWorkerExtension, MegatronPolicyWorkerImpl):
    """NeMo-RL's Megatron policy worker with nemo-occ's MTP capture, calibrator and checkpoint state."""


@ray.remote(runtime_env=get_runtime_env_for_policy_worker("megatron_policy_worker"))  # pragma: no cover
class OCCMegatronPolicyWorker(OCCMegatronPolicyWorkerImpl):
    pass
