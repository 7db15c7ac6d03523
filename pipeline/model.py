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
from .names import group_of

IGNORE_INDEX = -100


class AnchorGrad(torch.autograd.Function):
    """Identity on h whose backward adds the gradient of `scale * mean((h - h_base)^2)`.

    Representation anchoring keeps the hidden state that enters the format group close to the base
    model's, so A-Chat's format group still fits it after the transplant. The pipeline engine only
    backpropagates the loss computed on the last stage, so instead of adding the term to that loss
    its gradient is injected where h leaves the raw group. The result is the same gradient as
    training on CE + weight * MSE; the cost is that the term is not part of the logged loss.
    """

    @staticmethod
    def forward(ctx, h, h_base, scale):
        ctx.save_for_backward(h, h_base)
        ctx.scale = scale
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        h, h_base = ctx.saved_tensors
        extra = (h.float() - h_base.float()) * (2.0 * ctx.scale / h.numel())
        return grad + extra.to(grad.dtype), None, None


class DecoderLayerPipe(nn.Module):
    """HF decoder layer i, plus the embeddings on layer 0 and the norm and head on layer L-1.

    With anchoring, layers of the raw group also carry a frozen copy of the base layer (`base`,
    kept out of the state dict) and process the batch twice, stacked along the batch dimension:
    the trained path and the base path. The last raw layer un-stacks and anchors.
    """

    def __init__(self, index, decoder, rotary, config, embed_tokens=None, norm=None, lm_head=None, anchor=False,
                 base=None, anchor_first=False, anchor_scale=None):
        super().__init__()
        self.index = index
        # Not registered as submodules: never trained, saved, exported or cast by the engine.
        self.base = [base] if base is not None else None
        self.anchor_first = anchor_first  # stack [h; h] here (first raw layer)
        self.anchor_scale = anchor_scale  # not None: last raw layer, un-stack and inject the gradient
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
        if self.base is None:
            h = self._layer(self.decoder, h, mask, pos, cos_sin)
        else:
            h = self._anchored(h, mask, pos, cos_sin)
        if self.anchor is not None:
            h = h + 0.0 * self.anchor
        if self.lm_head is not None:
            h = self.lm_head(self.norm(h))
        return h


    @staticmethod
    def _layer(layer, h, mask, pos, cos_sin):
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        return h[0] if isinstance(h, tuple) else h  # older transformers return (hidden,)

    def _anchored(self, h, mask, pos, cos_sin):
        base = self.base[0]
        if next(base.parameters()).dtype != h.dtype or next(base.parameters()).device != h.device:
            base.to(device=h.device, dtype=h.dtype)
        if self.anchor_first:
            h = torch.cat([h, h.detach()])
        h, h_base = h.chunk(2)
        if mask is not None:
            mask = mask[: h.shape[0]]
        cos_sin = tuple(t[: h.shape[0]] if t.shape[0] > 1 else t for t in cos_sin)
        h = self._layer(self.decoder, h, mask, pos, cos_sin)
        with torch.no_grad():
            h_base = self._layer(base, h_base, mask, pos, cos_sin)
        if self.anchor_scale is not None:
            return AnchorGrad.apply(h, h_base, self.anchor_scale)
        return torch.cat([h, h_base])


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


def layer_specs(hf_model, groups: Groups, bounds: list[int], anchor_weight: float = 0.0,
                grad_accum: int = 1) -> list[LayerSpec]:
    inner = hf_model.model
    L = groups.num_layers
    frozen_stages = fully_frozen_stages(groups, bounds)
    # A fully frozen stage gets its anchor on its last layer. That includes a frozen last stage
    # (the format group during `raw`): it cannot skip backward, since the raw group's gradients
    # flow through it, and DeepSpeed still wants a parameter to build its optimizer from.
    anchored = {bounds[s + 1] - 1 for s in frozen_stages}
    import copy

    anchoring = anchor_weight > 0 and groups.phase == "raw"
    specs = []
    for i in range(L):
        raw = groups.raw_start <= i < groups.format_start
        extra = {}
        if anchoring and raw:
            # The engine scales the loss by 1/accumulation before backward; the injected gradient
            # must be scaled the same way.
            extra = dict(base=copy.deepcopy(inner.layers[i]).requires_grad_(False),
                         anchor_first=i == groups.raw_start,
                         anchor_scale=anchor_weight / grad_accum if i == groups.format_start - 1 else None)
        specs.append(LayerSpec(
            DecoderLayerPipe, i, inner.layers[i], inner.rotary_emb, hf_model.config,
            embed_tokens=inner.embed_tokens if i == 0 else None,
            norm=inner.norm if i == L - 1 else None,
            lm_head=hf_model.lm_head if i == L - 1 else None,
            anchor=i in anchored, **extra,
        ))
    return specs


def trainable_by_name(model, groups: Groups, tied: bool) -> list[nn.Parameter]:
    """Set requires_grad on an HF model by parameter name: the name decides the group, the phase
    decides whether the group trains. Returns the trained parameters.

    The one place this is decided: the pipeline's LayerSpecs reuse these very modules, and the
    reference loop trains the same model object, so both train exactly the same parameters.
    """
    params = []
    for name, p in model.named_parameters():
        group = group_of(name, groups.raw_start, groups.format_start)
        if tied and name == "lm_head.weight":
            group = "frozen"  # the head *is* the embedding matrix, which belongs to the frozen prefix
        p.requires_grad_(group in groups.trained_groups)
        if p.requires_grad:
            params.append(p)
    return params


def build_pipeline(hf_model, groups: Groups, bounds: list[int], topology_kw: dict, tied: bool,
                   activation_checkpoint_interval: int = 0, anchor_weight: float = 0.0,
                   grad_accum: int = 1, compile_layers: bool = False) -> GroupAlignedPipe:
    # Freeze by name first: LayerSpec builds reuse these very modules. With tied embeddings the
    # shared matrix is one Parameter, so freezing the head freezes the embedding too.
    trainable_by_name(hf_model, groups, tied)
    if compile_layers:
        # Module.compile() works in place, so parameter names (and so checkpoint keys and the
        # transplant's name mapping) stay exactly the HF ones. Identical layers share one graph.
        for layer in hf_model.model.layers:
            layer.compile()
    pipe = GroupAlignedPipe(
        layers=layer_specs(hf_model, groups, bounds, anchor_weight, grad_accum), stage_bounds=bounds, loss_fn=causal_lm_loss,
        activation_checkpoint_interval=activation_checkpoint_interval,
        # Non-reentrant checkpointing: the reentrant mode breaks when a frozen prefix shares a stage.
        checkpointable_layers=["DecoderLayerPipe"], **topology_kw)
    return pipe
