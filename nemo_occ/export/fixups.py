"""Fix-ups applied to Megatron-Bridge's ``(hf_name, tensor)`` export stream before it is written.

1. GLM MTP aliases: ``model.layers.{L+i}.embed_tokens.weight := model.embed_tokens.weight`` and
   ``model.layers.{L+i}.shared_head.head.weight := lm_head.weight`` (GLM45Bridge has no mapping for
   them; a newer GLM bridge yields them itself, then nothing is added).
2. GLM dense-MTP MLP names. GLM45Bridge maps a dense MTP layer's ``linear_fc1`` to
   ``model.layers.{L+i}.mlp.linear_fc1.gate.weight`` / ``.up.weight``; the checkpoint names them
   ``mlp.gate_proj.weight`` / ``mlp.up_proj.weight`` (as every dense decoder layer). Yielded under the
   wrong names, they are renamed (when the reference has the right name and not the Bridge's; values
   untouched). Not yielded at all (Bridge exports only names the checkpoint has, so it drops them), they
   are rebuilt from the Megatron ``linear_fc1`` weight, which stacks ``[gate; up]`` along its output
   dim at tensor-parallel size 1 (``split_gated_fc1``).
3. MiMo ``input_proj`` orientation. Megatron's ``eh_proj`` weight ``W`` ``[H, 2H]`` multiplies
   ``[enorm(emb), hnorm(h)]``; HF MiMo's ``input_proj`` multiplies ``[hidden, emb]``. The same linear
   map therefore needs the two column halves swapped: ``W_hf = [W[:, H:], W[:, :H]]``. Whether the
   Bridge in use already swaps is *detected* by comparing the exported tensor with the Megatron
   ``eh_proj`` weight, never assumed from a version number.

Everything here is a pure function over name/tensor streams; nothing imports Megatron-Bridge.
Letters: H hidden size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from nemo_occ.export.models import MTPLayout


@dataclass
class FixupLog:
    """What the fix-ups did, for ``nemo_occ_export.json``."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, kind: str, name: str, **details: Any) -> None:
        """Record one fix-up: its ``kind``, the tensor ``name`` it touched and what it did."""
        self.entries.append({"kind": kind, "name": name, **details})


def swap_input_halves(weight: torch.Tensor) -> torch.Tensor:
    """``[A | B] -> [B | A]`` along the input dim (dim 1) of a ``[H, 2H]`` projection; its own inverse."""
    if weight.ndim != 2 or weight.shape[1] % 2:
        raise ValueError(
            f"An MTP input projection must be a 2-D [H, 2H] weight with an even input dim, got {tuple(weight.shape)}."
        )
    first, second = weight.chunk(2, dim=1)  # [H, H] each
    return torch.cat((second, first), dim=1)


def orient_input_proj(exported: torch.Tensor, megatron_eh_proj: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Return the HF ``input_proj`` (``[hidden, emb]`` halves) and which side performed the swap.

    ``exported`` is what the Bridge yielded; ``megatron_eh_proj`` is the Megatron weight
    (``[emb, hidden]`` halves). If the Bridge already swapped, ``exported == swap(megatron)`` and it is
    kept; if it passed the weight through unchanged, ``exported == megatron`` and nemo-occ swaps it.
    Anything else means the two tensors are not the same weight, which is an error, not a guess.
    """
    if tuple(exported.shape) != tuple(megatron_eh_proj.shape):
        raise ValueError(
            f"Cannot orient the MiMo input_proj: the exported tensor has shape {tuple(exported.shape)} but the "
            f"Megatron eh_proj weight has shape {tuple(megatron_eh_proj.shape)}. Export from a checkpoint loaded "
            "with tensor parallel size 1 (Megatron-Bridge's load_megatron_model does this)."
        )
    exported32, megatron32 = exported.float(), megatron_eh_proj.float()
    if torch.equal(exported32, swap_input_halves(megatron32)):
        return exported, "already swapped by Megatron-Bridge"
    if torch.equal(exported32, megatron32):
        return swap_input_halves(exported), "swapped by nemo-occ"
    raise ValueError(
        "Cannot orient the MiMo input_proj: the exported tensor equals neither the Megatron eh_proj weight nor "
        "its half-swapped version, so the Bridge changed it in an unknown way. Refusing to guess."
    )


def split_gated_fc1(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[gate; up]`` (``[2F, H]``, Megatron's unsharded gated ``linear_fc1``) -> ``gate``, ``up`` (``[F, H]`` each)."""
    if weight.ndim != 2 or weight.shape[0] % 2:
        raise ValueError(
            f"A gated linear_fc1 weight must be 2-D [2F, H] with an even output dim, got {tuple(weight.shape)}."
        )
    gate, up = weight.chunk(2, dim=0)
    return gate, up


def apply_fixups(
    stream: Iterable[tuple[str, torch.Tensor]],
    layout: MTPLayout,
    *,
    reference_names: Iterable[str],
    megatron_eh_proj: Mapping[int, torch.Tensor] | None = None,
    megatron_fc1: Mapping[int, torch.Tensor] | None = None,
    log: FixupLog | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the Bridge stream with wrong GLM MTP names corrected, MiMo ``input_proj`` oriented and
    missing GLM aliases appended.

    Aliases are appended after the stream ends, and only those that the reference checkpoint lists
    (GLM-4.5 ships them; a checkpoint without them would otherwise get unexpected tensors) and that
    the Bridge did not yield. An alias whose source tensor never came is left out, and verification
    reports it missing. The same holds for a dense MTP layer's gate/up halves, rebuilt from
    ``megatron_fc1`` (``{mtp_layer: linear_fc1 weight}`` of a model at tensor-parallel size 1).
    """
    log = log if log is not None else FixupLog()
    reference = set(reference_names)
    wanted_aliases = {alias: source for alias, source in layout.aliases if alias in reference}
    for alias, source in layout.aliases:
        if alias not in reference:
            log.add("alias", alias, action="skipped: not in the reference checkpoint", source=source)
    alias_sources = set(wanted_aliases.values())
    renames = {
        wrong: right for wrong, right in layout.bridge_renames if right in reference and wrong not in reference
    }
    input_proj = dict(layout.input_proj)

    seen: set[str] = set()
    sources: dict[str, torch.Tensor] = {}
    for name, tensor in stream:
        if name in renames:
            log.add("bridge_name", renames[name], action="renamed by nemo-occ", bridge_name=name)
            name = renames[name]
        seen.add(name)
        if name in alias_sources:
            sources[name] = tensor  # kept until the end: the alias may still come from the Bridge
        if name in input_proj:
            mtp_layer = input_proj[name]
            if megatron_eh_proj is None or mtp_layer not in megatron_eh_proj:
                raise ValueError(
                    f"Cannot orient {name}: the Megatron eh_proj weight of MTP layer {mtp_layer} was not provided, "
                    "so it is unknown whether Megatron-Bridge already swapped its input halves."
                )
            tensor, action = orient_input_proj(tensor, megatron_eh_proj[mtp_layer])
            log.add(
                "input_proj_halves",
                name,
                action=action,
                convention="megatron [emb, hidden] -> hf [hidden, emb]",
            )
        yield name, tensor

    for mtp_layer, gate_name, up_name in layout.gated_fc1:
        if gate_name not in reference or up_name not in reference or {gate_name, up_name} <= seen:
            continue
        if megatron_fc1 is None or mtp_layer not in megatron_fc1 or {gate_name, up_name} & seen:
            continue  # nothing to rebuild them from, or only one came: verification names what is missing
        gate, up = split_gated_fc1(megatron_fc1[mtp_layer])
        for name, half in ((gate_name, gate), (up_name, up)):
            log.add("dense_mtp_fc1", name, action="added by nemo-occ from the Megatron linear_fc1 weight")
            yield name, half

    for alias, source in wanted_aliases.items():
        if alias in seen:
            log.add("alias", alias, action="yielded by Megatron-Bridge", source=source)
        elif source in sources:
            log.add("alias", alias, action="added by nemo-occ", source=source)
            yield alias, sources[source]  # the writer copies it if it lands in the same file as its source
        # else: the source is missing too; verification names both.
