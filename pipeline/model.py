"""An HF causal LM as a DeepSpeed PipelineModule whose entry i is decoder layer i.

The weights are the HF modules themselves (no copies, no re-implementation), so the loss is
the HF model's own loss. Between stages only the hidden state travels; rotary embeddings and
the causal mask are recomputed inside each layer (cheap, and it keeps every stage's input a
single tensor of fixed shape, which the pipeline engine requires).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn
from transformers.masking_utils import create_causal_mask

from .groups import Groups
from .names import ANCHOR, to_hf_name

IGNORE_INDEX = -100


class DecoderLayerPipe(nn.Module):
    """HF decoder layer i, plus the embeddings on layer 0 and the norm and head on layer L-1."""

    def __init__(self, index, decoder, rotary, config, embed_tokens=None, norm=None, lm_head=None, anchor=False):
        super().__init__()
        self.index = index
        self.config = config
        self.decoder = decoder
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head
        # Shared, buffer-only (inv_freq is non-persistent): absent from every state_dict.
        self.rotary = [rotary]
        if anchor:
            # A stage with nothing to train still has to take part in backward: DeepSpeed needs a
            # parameter for its optimizer and a grad_fn on what the stage sends. One scalar times
            # zero gives both and changes nothing; its optimizer state is 2 floats.
            self.anchor = nn.Parameter(torch.zeros(1))
        else:
            self.anchor = None

    def forward(self, x):
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=None,
                                  position_ids=pos)
        cos_sin = self.rotary[0](h, position_ids=pos)
        h = self.decoder(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        if isinstance(h, tuple):  # older transformers return (hidden,)
            h = h[0]
        if self.anchor is not None:
            h = h + 0.0 * self.anchor
        if self.lm_head is not None:
            h = self.lm_head(self.norm(h))
        return h


def causal_lm_loss(logits, labels):
    """Mean cross-entropy over labels that are not IGNORE_INDEX (labels are already shifted).

    Same value as the HF model's own loss, except that a micro-batch with no target at all (a chat
    window holding no assistant token) gives 0 instead of NaN, so it contributes nothing.
    """
    flat = labels.reshape(-1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (flat != IGNORE_INDEX).sum().clamp(min=1)


class GroupAlignedPipe(PipelineModule):
    """PipelineModule with explicit stage boundaries (DeepSpeed only offers uniform/parameters/regex)."""

    def __init__(self, layers, stage_bounds, **kw):
        self._stage_bounds = stage_bounds
        super().__init__(layers=layers, **kw)

    def _partition_layers(self, method="uniform"):
        self.parts = list(self._stage_bounds)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])


def fully_frozen_stages(groups: Groups, bounds: list[int]) -> set[int]:
    """Stages whose layers have nothing to train in this phase."""
    return {s for s in range(len(bounds) - 1)
            if not any(groups.layer_trained(i) for i in range(bounds[s], bounds[s + 1]))}


def layer_specs(hf_model, groups: Groups, bounds: list[int]) -> list[LayerSpec]:
    inner = hf_model.model
    L = groups.num_layers
    frozen_stages = fully_frozen_stages(groups, bounds)
    # A fully frozen stage gets its anchor on its last layer. That includes a frozen last stage
    # (the format group during `raw`): it cannot skip backward, since the raw group's gradients
    # flow through it, and DeepSpeed still wants a parameter to build its optimizer from.
    anchored = {bounds[s + 1] - 1 for s in frozen_stages}
    specs = []
    for i in range(L):
        specs.append(LayerSpec(
            DecoderLayerPipe, i, inner.layers[i], inner.rotary_emb, hf_model.config,
            embed_tokens=inner.embed_tokens if i == 0 else None,
            norm=inner.norm if i == L - 1 else None,
            lm_head=hf_model.lm_head if i == L - 1 else None,
            anchor=i in anchored,
        ))
    return specs


def set_trainable(module: nn.Module, layer_index: int, groups: Groups, tied: bool) -> None:
    """requires_grad by name: each parameter's HF name decides its group, its group decides."""
    from .names import group_of

    for key, p in module.named_parameters():
        if key == ANCHOR:
            p.requires_grad_(True)
            continue
        hf = to_hf_name(layer_index, key)
        group = group_of(hf, groups.raw_start, groups.format_start)
        if tied and hf == "lm_head.weight":
            group = "frozen"  # the head *is* the embedding matrix, which belongs to the frozen prefix
        p.requires_grad_(group in groups.trained_groups)


def build_pipeline(hf_model, groups: Groups, bounds: list[int], topology_kw: dict, tied: bool,
                   activation_checkpoint_interval: int = 0) -> GroupAlignedPipe:
    # Freeze by name first: LayerSpec builds reuse these very modules.
    for i in range(groups.num_layers):
        tmp = nn.Module()
        tmp.decoder = hf_model.model.layers[i]
        if i == 0:
            tmp.embed_tokens = hf_model.model.embed_tokens
        if i == groups.num_layers - 1:
            tmp.norm = hf_model.model.norm
            tmp.lm_head = hf_model.lm_head
        set_trainable(tmp, i, groups, tied)
    if tied and groups.phase != "full":
        hf_model.model.embed_tokens.weight.requires_grad_(False)
    pipe = GroupAlignedPipe(
        layers=layer_specs(hf_model, groups, bounds), stage_bounds=bounds, loss_fn=causal_lm_loss,
        activation_checkpoint_interval=activation_checkpoint_interval,
        # Non-reentrant checkpointing: the reentrant mode breaks when a frozen prefix shares a stage.
        checkpointable_layers=["DecoderLayerPipe"], **topology_kw)
    return pipe
