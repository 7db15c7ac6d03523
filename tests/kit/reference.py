"""The plain PyTorch loop the pipeline is checked against (parity tests) and timed against (bench).

Same HF model, same trained parameters (the plan's layer groups decide, by name), the same batches
(the plan's data through data_prep's one batcher), torch's AdamW with the betas and eps of the same
DeepSpeed JSON, the same LR schedule and clipping; no DeepSpeed. A dozen lines anyone can audit.
"""
from __future__ import annotations

import copy

import torch

from data_prep.reader import micro_batches
from pipeline.hf import load_causal_lm
from pipeline.training.data import to_inputs_labels
from pipeline.training.model import causal_lm_loss
from pipeline.training.schedule import lr_factor
from pipeline.training.validation import due


def trainable(model, groups) -> list:
    """requires_grad by HF name, as the pipeline's stage loader sets it; returns the trained ones."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(groups.trains(name))
        if p.requires_grad:
            params.append(p)
    return params


def step_batches(plan, start_step: int = 0):
    """Per step, the list of (inputs, labels) micro-batches in global sample order."""
    G, m = plan.batch.global_batch, plan.cfg.data.micro_batch_size
    it = micro_batches(plan.data, m, 0, 1, start_sample=start_step * G)
    while True:
        yield [to_inputs_labels(*next(it)) for _ in range(G // m)]


@torch.no_grad()
def validate_reference(model, plan) -> dict[str, float]:
    """Each of the plan's validation sets: samples [0, batches x G) in micro-batches of the run's
    size, the mean of their losses (every batch holds the same number of micro-batches)."""
    was = model.training
    model.eval()
    m, out = plan.cfg.data.micro_batch_size, {}
    for s in plan.evals:
        it = micro_batches(s.data, m, 0, 1, start_sample=0)
        n = s.batches * plan.batch.global_batch // m
        out[s.key] = sum(causal_lm_loss(model(input_ids=x).logits, y).item()
                         for x, y in (to_inputs_labels(*next(it)) for _ in range(n))) / n
    model.train(was)
    return out


def _anchor_mse(model, base_layers, groups, inputs, h):
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


def train_reference(plan, steps: int | None = None, validations: dict | None = None):
    """Returns (per-step losses, model). With `validations` (a dict), fills it with
    {step: validate_reference(...)} at the steps where the run validates."""
    cfg, groups = plan.cfg, plan.groups
    torch.manual_seed(cfg.schedule.seed)
    model = load_causal_lm(cfg.model.model)
    model.train()
    params = trainable(model, groups)
    adam = plan.ds_config["optimizer"]["params"]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(adam["betas"]), eps=adam["eps"],
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    anchor = cfg.groups.anchor_weight if cfg.groups.phase == "raw" else 0.0
    if anchor:
        base_layers = copy.deepcopy(model.model.layers[groups.raw_start:groups.format_start]).requires_grad_(False)
        captured = {}
        # The hidden state entering the format group: the input of layer format_start.
        model.model.layers[groups.format_start].register_forward_pre_hook(
            lambda mod, args, kwargs: captured.update(h=args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)
    losses = []
    it = step_batches(plan)
    total_steps = cfg.schedule.steps if steps is None else steps
    every = cfg.eval.eval_every if plan.evals else 0
    if validations is not None and due(0, every, cfg.schedule.steps):
        validations[0] = validate_reference(model, plan)
    for step in range(1, total_steps + 1):
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
        if validations is not None and due(step, every, cfg.schedule.steps):
            validations[step] = validate_reference(model, plan)
    return losses, model
