"""The plain PyTorch loop the pipeline is checked against (parity tests) and timed against (bench).

Same HF model, same trained parameters (chosen by name), same batches, torch's AdamW, the same
LR schedule and clipping; no DeepSpeed. A dozen lines of training anyone can audit.
"""
from __future__ import annotations

import torch

from .config import RunConfig, data_sources, load_ds_config
from .data import open_data, to_inputs_labels
from .groups import Groups
from .hf import load_causal_lm
from .model import causal_lm_loss, trainable_by_name
from .parallel import lr_factor


def batches(cfg: RunConfig, start_step: int = 0):
    """Yield, per step, the list of (inputs, labels) micro-batches in global sample order."""
    data = open_data(data_sources(cfg.data.data), cfg.data.seq_len, cfg.schedule.seed)
    G, m = cfg.data.global_batch_size, cfg.data.micro_batch_size
    step = start_step
    while True:
        micro = []
        for first in range(step * G, (step + 1) * G, m):
            pairs = [data.sample(g) for g in range(first, first + m)]
            tokens = torch.stack([torch.from_numpy(p[0].astype("int64")) for p in pairs])
            mask = torch.stack([torch.from_numpy(p[1]) for p in pairs]) if data.has_mask else None
            micro.append(to_inputs_labels(tokens, mask))
        yield micro
        step += 1


def _anchor_mse(model, base_layers, groups: Groups, inputs, h):
    """MSE between h (entering the format group) and the base raw group's output on the same input."""
    with torch.no_grad():
        out = model.model(input_ids=inputs, output_hidden_states=True)
        hb = out.hidden_states[groups.raw_start]  # input of the first raw layer (frozen prefix output)
        pos = torch.arange(inputs.shape[1]).unsqueeze(0)
        cos_sin = model.model.rotary_emb(hb, position_ids=pos)
        for layer in base_layers:
            hb = layer(hb, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
            hb = hb[0] if isinstance(hb, tuple) else hb
    return torch.mean((h - hb) ** 2)


def train_reference(cfg: RunConfig, groups: Groups, tied: bool, steps: int | None = None):
    """Returns (per-step losses, model)."""
    torch.manual_seed(cfg.schedule.seed)
    model = load_causal_lm(cfg.model.model)
    model.train()
    params = trainable_by_name(model, groups, tied)
    # betas and eps come from the same ds_configs/ JSON the pipeline merges, so the two cannot drift.
    ds_params = load_ds_config(cfg, use_gpu=False)[0]["optimizer"]["params"]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(ds_params["betas"]), eps=ds_params["eps"],
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    anchor = cfg.groups.anchor_weight if groups.phase == "raw" else 0.0
    if anchor:
        import copy
        base_layers = copy.deepcopy(model.model.layers[groups.raw_start:groups.format_start]).requires_grad_(False)
        captured = {}
        # The hidden state entering the format group: the input of layer format_start.
        model.model.layers[groups.format_start].register_forward_pre_hook(
            lambda mod, args, kwargs: captured.update(h=args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)
    losses = []
    it = batches(cfg)
    for _ in range(cfg.schedule.steps if steps is None else steps):
        micro = next(it)
        total = 0.0
        for inputs, labels in micro:
            loss = causal_lm_loss(model(input_ids=inputs).logits, labels)
            total += loss.item() / len(micro)  # the logged loss is CE only, as in the pipeline
            if anchor:
                loss = loss + anchor * _anchor_mse(model, base_layers, groups, inputs, captured["h"])
            (loss / len(micro)).backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, model
