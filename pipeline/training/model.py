"""An HF causal LM as a DeepSpeed PipelineModule whose entry i is decoder layer i.

The weights are the HF modules themselves (no re-implementation), so the loss is the HF model's
own loss. Between stages only the hidden state travels; rotary embeddings and the causal mask are
recomputed inside each layer (cheap, and it keeps every stage's input a single tensor of fixed
shape, which the pipeline engine requires).

Each rank builds only its own stage. The model is first built on the meta device (shapes, no
memory), and a layer's modules are materialised when DeepSpeed builds that layer's LayerSpec,
which it does only for the layers of the local stage, reading exactly those tensors from the
checkpoint in the training dtype. So host memory per rank follows the stage, not the model: a
bf16 70B checkpoint is never upcast whole on every rank.
"""

from __future__ import annotations

import copy

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .. import hf
from ..groups import RAW, LayerGroups
from ..names import EMBED, EMBED_WEIGHT, HEAD, NORM, layer_prefix
from .loss import causal_lm_loss


def mask_function(config, i: int):
    """The causal mask HF's own model gives layer i: sliding-window where the config says so, per
    layer (`layer_types`, Qwen2) or for every layer (`sliding_window`, Mistral), else full causal."""
    kinds = getattr(config, "layer_types", None)
    sliding = kinds[i] == "sliding_attention" if kinds else getattr(config, "sliding_window", None) is not None
    return create_sliding_window_causal_mask if sliding else create_causal_mask


class StageLoader:
    """Materialises modules of the base model from its checkpoint, on demand, one module at a time."""

    def __init__(self, plan):
        self.model_dir, self.weights, self.dtype = plan.model_dir, plan.weights, plan.dtype
        self.groups: LayerGroups = plan.groups
        self.config = hf.config_object(plan.hf_config)
        self.meta = hf.meta_model(self.config)
        self._rotary = None

    def _load(self, module: nn.Module, prefix: str, source: str | None = None) -> nn.Module:
        """Replace `module`'s meta parameters by the checkpoint's tensors `prefix + key` (or, for the
        tied head, the tensor `source`), in the training dtype, and set which ones train."""
        keys = list(module.state_dict())
        names = {k: source or f"{prefix}{k}" for k in keys}
        tensors = hf.read_tensors(self.model_dir, self.weights, set(names.values()), self.dtype)
        # Each tensor owns its buffer (read, not mapped); a name shared by two keys (the tied head) is copied.
        module.load_state_dict(
            {k: tensors[n] if list(names.values()).count(n) == 1 else tensors[n].clone() for k, n in names.items()},
            strict=True,
            assign=True,
        )
        for k, p in module.named_parameters():
            p.requires_grad_(self.groups.trains(f"{prefix}{k}"))
        return module

    def decoder_layer(self, i: int) -> nn.Module:
        return self._load(self.meta.model.layers[i], layer_prefix(i))

    def embed_tokens(self) -> nn.Module:
        return self._load(self.meta.model.embed_tokens, EMBED)

    def norm(self) -> nn.Module:
        return self._load(self.meta.model.norm, NORM)

    def lm_head(self, embed_tokens: nn.Module | None) -> nn.Module:
        head = self.meta.lm_head
        if self.groups.tied:
            if embed_tokens is not None:  # one stage holds both: one shared Parameter, as in HF
                head.weight = embed_tokens.weight
                return head
            return self._load(head, HEAD, source=EMBED_WEIGHT)
        return self._load(head, HEAD)

    def rotary(self) -> nn.Module:
        if self._rotary is None:  # buffer-only (inv_freq is computed, never stored): built on CPU
            self._rotary = type(self.meta.model.rotary_emb)(config=self.config)
        return self._rotary


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

    def __init__(
        self,
        index: int,
        loader: StageLoader,
        anchor: bool = False,
        anchor_base: bool = False,
        anchor_first: bool = False,
        anchor_scale: float | None = None,
        compile_layer: bool = False,
    ):
        super().__init__()
        L = loader.groups.num_layers
        self.index = index
        self.config = loader.config
        self.make_mask = mask_function(loader.config, index)
        self.decoder = loader.decoder_layer(index)
        self.embed_tokens = loader.embed_tokens() if index == 0 else None
        self.norm = loader.norm() if index == L - 1 else None
        self.lm_head = loader.lm_head(self.embed_tokens) if index == L - 1 else None
        # Not registered as submodules: never trained, saved, exported or cast by the engine.
        self.base = [copy.deepcopy(self.decoder).requires_grad_(False)] if anchor_base else None
        self.anchor_first = anchor_first  # stack [h; h] here (first raw layer)
        self.anchor_scale = anchor_scale  # not None: last raw layer, un-stack and inject the gradient
        self.rotary = [loader.rotary()]  # shared by every layer of the stage
        if compile_layer:
            # Module.compile() works in place, so parameter names (and so checkpoint keys and the
            # transplant's name mapping) stay exactly the HF ones. Identical layers share one graph.
            self.decoder.compile()
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
        mask = self.make_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=pos)
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


def clone_views_only(item):
    """What DeepSpeed's save does to each layer's state dict, but only where it is needed: a tensor
    that is a view into a larger buffer (ZeRO's flat copy of the trained weights) is cloned, or
    torch.save would write the whole buffer; a tensor that owns its storage (every frozen weight) is
    saved as it is, instead of costing a second copy of the layer (the head: vocab x hidden) at every
    checkpoint."""
    if torch.is_tensor(item):
        t = item.detach()
        owns = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        return t if owns and t.is_contiguous() else t.clone()
    if isinstance(item, dict):
        return type(item)({k: clone_views_only(v) for k, v in item.items()})
    if isinstance(item, (list, tuple)):
        return type(item)(clone_views_only(v) for v in item)
    return item


class GroupAlignedPipe(PipelineModule):
    """PipelineModule with explicit stage boundaries (DeepSpeed only offers uniform/parameters/regex)
    and a save that clones only the tensors that need it."""

    def __init__(self, layers, stage_bounds, **kw):
        self._stage_bounds = stage_bounds
        super().__init__(layers=layers, **kw)

    def save_state_dict(self, save_dir, checkpoint_engine, exclude_frozen_params=False):
        import deepspeed.runtime.pipe.module as ds_pipe

        clone = ds_pipe.clone_tensors_for_torch_save
        ds_pipe.clone_tensors_for_torch_save = clone_views_only  # DeepSpeed's loop, our copy rule
        try:
            super().save_state_dict(save_dir, checkpoint_engine, exclude_frozen_params)
        finally:
            ds_pipe.clone_tensors_for_torch_save = clone

    def _partition_layers(self, method="uniform"):
        self.parts = list(self._stage_bounds)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])


def layer_specs(plan, loader: StageLoader) -> list[LayerSpec]:
    g, bounds = plan.groups, plan.stages
    # A fully frozen stage gets its anchor on its last layer. That includes a frozen last stage
    # (the format group during `raw`): it cannot skip backward, since the raw group's gradients
    # flow through it, and DeepSpeed still wants a parameter to build its optimizer from.
    anchored = {
        bounds[s + 1] - 1
        for s in range(plan.num_stages)
        if not any(g.layer_trained(i) for i in range(bounds[s], bounds[s + 1]))
    }
    weight = plan.cfg.groups.anchor_weight
    anchoring = weight > 0 and plan.cfg.groups.phase == "raw"
    specs = []
    for i in range(g.num_layers):
        raw = g.group_of_layer(i) == RAW
        extra = {}
        if anchoring and raw:
            # The engine scales the loss by 1/accumulation before backward; the injected gradient
            # must be scaled the same way.
            extra = dict(
                anchor_base=True,
                anchor_first=i == g.raw_start,
                anchor_scale=weight / plan.batch.grad_accum if i == g.format_start - 1 else None,
            )
        specs.append(
            LayerSpec(
                DecoderLayerPipe,
                i,
                loader,
                anchor=i in anchored,
                compile_layer=plan.cfg.parallel.compile_layers,
                **extra,
            )
        )
    return specs


def build_pipeline(plan, topology) -> GroupAlignedPipe:
    return GroupAlignedPipe(
        layers=layer_specs(plan, StageLoader(plan)),
        stage_bounds=plan.stages,
        loss_fn=causal_lm_loss,
        topology=topology,
        activation_checkpoint_interval=plan.cfg.parallel.activation_checkpoint_interval,
        # Non-reentrant checkpointing: the reentrant mode breaks when a frozen prefix shares a stage.
        checkpointable_layers=["DecoderLayerPipe"],
    )
