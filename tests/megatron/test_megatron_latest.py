"""Options of newer megatron-cores that change MTP: MuP logit scaling and hidden-state mixing (``mtp_hsm``).

Run with a megatron-core that has them (``mcore_latest``; MuP is in 0.20, ``mtp_hsm`` only in Megatron-LM
main after the 0.20 commit NeMo-RL pins); each test skips naming what the installed core lacks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from nemo_occ.lab.tiny_gpt import build_tiny_gpt  # noqa: E402
from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs  # noqa: E402
from tests._megatron_reference import reference_logprobs  # noqa: E402

pytestmark = pytest.mark.mcore_latest
V = 48


def _needs_config_field(name: str, where: str) -> None:
    from megatron.core import package_info
    from megatron.core.transformer.transformer_config import TransformerConfig

    if name not in {f.name for f in dataclasses.fields(TransformerConfig)}:
        pytest.skip(f"megatron-core {package_info.__version__} has no TransformerConfig.{name} ({where})")


def _batch(b=2, s=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, s), generator=g), torch.arange(s).expand(b, s).contiguous()


def test_mup_scales_main_and_mtp_logits_like_megatron(single_rank):
    """Megatron multiplies main and MTP logits by ``_scale_logits`` under MuP; so must our log-probs."""
    _needs_config_field("use_mup", "megatron-core >= 0.20")
    torch.manual_seed(0)
    model = build_tiny_gpt(
        vocab_size=V,
        hidden_size=32,
        num_attention_heads=4,
        mtp_num_layers=2,
        transformer_fields={"use_mup": True, "mup_base_hidden_size": 8},
    )
    assert model.config.mup_output_mult != 1.0  # width multiplier 4: a real scaling
    ids, pos = _batch()
    out = forward_with_mtp_logprobs(model, ids, pos, detach_trunk=False)
    main, mtp, valid = reference_logprobs(model, ids, pos, num_depths=2)  # megatron's _scale_logits
    torch.testing.assert_close(out.main_logprobs, main)
    for d in range(2):
        assert torch.equal(out.mtp_masks[d], valid[d])
        torch.testing.assert_close(out.mtp_logprobs[d], torch.where(valid[d], mtp[d], 0.0))


def test_detach_with_megatron_hsm_gives_the_trunk_no_mtp_gradient(single_rank):
    """``mtp_hsm=True`` in training mixes the MTP block's input into depth 2: detach must still cut it."""
    _needs_config_field("mtp_hsm", "Megatron-LM main after the 0.20 commit NeMo-RL pins")
    torch.manual_seed(0)
    model = build_tiny_gpt(
        vocab_size=V,
        hidden_size=32,
        num_attention_heads=4,
        mtp_num_layers=2,
        transformer_fields={"mtp_hsm": True},
    )
    model.train()
    ids, pos = _batch(seed=2)
    out = forward_with_mtp_logprobs(model, ids, pos, detach_trunk=True)
    sum((lp * m).sum() for lp, m in zip(out.mtp_logprobs, out.mtp_masks, strict=True)).backward()
    trunk = {n: p.grad for n, p in model.named_parameters() if not n.startswith("mtp.")}
    leaked = [n for n, g in trunk.items() if g is not None and g.abs().sum() > 0]
    assert leaked == [], f"MTP gradient reached the trunk: {leaked}"
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "mtp." in n
    )
