"""The plain PyTorch loop the pipeline is checked against (parity tests).

It shares no training code with the product: the label shift, the loss mask, the token-weighted
loss, the parameter groups, the learning-rate schedule and the validation steps are written here
from their definitions, a few lines each, so a mistake in the product's version shows up as a
parity failure instead of being repeated on both sides. What it takes from the product is only
what is not under test here: the run's settings (the plan's config and resolved layer indices),
sample g of the data (`data_prep`'s reader fixes the order: a pure function of the seed and g)
and the optimizer's betas/eps from the run's DeepSpeed JSON. The model is the HF model, loaded
by `transformers` itself, trained by torch's AdamW and clip_grad_norm_.

The loss of a step (the definition the product must meet): the summed cross-entropy of every
next-token target in the global batch of G samples [k*G, (k+1)*G), divided by the number of
those targets. A target is position t+1 of a window whose loss mask is set there (every
position without a mask).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

IGNORE = -100


def shift(tokens: torch.Tensor, mask: torch.Tensor | None):
    """Windows [n, S+1] -> inputs [n, S] and labels [n, S]: label t is token t+1, IGNORE where the
    mask of token t+1 is 0."""
    labels = tokens[:, 1:].clone()
    if mask is not None:
        labels = torch.where(mask[:, 1:].bool(), labels, torch.full_like(labels, IGNORE))
    return tokens[:, :-1], labels


def summed_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    keep = labels != IGNORE
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")


def windows(data, first: int, n: int):
    """Global samples [first, first + n) as tensors (tokens, mask or None)."""
    got = [data.sample(g) for g in range(first, first + n)]
    tokens = torch.stack([torch.as_tensor(t, dtype=torch.int64) for t, _ in got])
    mask = None if got[0][1] is None else torch.stack([torch.as_tensor(m) for _, m in got])
    return tokens, mask


def step_batches(plan, start_step: int = 0):
    """Per step: ([(inputs, labels)] in chunks of micro_batch_size, number of targets of the step)."""
    G, m = plan.batch.global_batch, plan.cfg.data.micro_batch_size
    step = start_step
    while True:
        inputs, labels = shift(*windows(plan.data, step * G, G))
        yield [(inputs[i : i + m], labels[i : i + m]) for i in range(0, G, m)], int((labels != IGNORE).sum())
        step += 1


def lr_at(step: int, cfg) -> float:
    """Linear warmup over `warmup_steps` (whole steps, or that fraction of `steps` rounded up; step 0
    gets lr/warmup), then cosine from lr to min_lr reached at the last step."""
    o, total = cfg.optim, cfg.schedule.steps
    warm = o.warmup_steps if isinstance(o.warmup_steps, int) else -int(-round(o.warmup_steps * total, 9) // 1)
    if step < warm:
        return o.lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


def trains(name: str, plan) -> bool:
    """Which HF parameters a phase trains, from the method's definition: layers [0, raw_start) and
    the embeddings are frozen (and a tied head with them), [raw_start, format_start) is the raw
    group, [format_start, L) with the final norm and an untied head the format group."""
    g, cfg = plan.groups, plan.cfg.groups
    if name.startswith("model.layers."):
        i = int(name.split(".")[2])
        group = "frozen" if i < g.raw_start else "raw" if i < g.format_start else "format"
    elif name.startswith("model.embed_tokens."):
        group = "frozen"
    elif name.startswith("lm_head."):
        group = "frozen" if g.tied else "format"
    else:
        group = "format"  # model.norm
    trained = {
        "chat": {"format"},
        "raw": {"raw", "format"} if cfg.raw_trains_format else {"raw"},
        "full": {"frozen", "raw", "format"},
    }[cfg.phase]
    return group in trained


def trainable(model, plan) -> list:
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name, plan))
        if p.requires_grad:
            params.append(p)
    return params


def load_model(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)


def validates_at(step: int, cfg) -> bool:
    every = cfg.eval.eval_every
    return bool(every) and (step % every == 0 or step == cfg.schedule.steps)


@torch.no_grad()
def validate_reference(model, plan) -> dict[str, float]:
    """Each validation set: samples [0, batches x G), summed token loss over all of them divided
    by their targets."""
    was = model.training
    model.eval()
    out = {}
    for s in plan.evals:
        inputs, labels = shift(*windows(s.data, 0, s.batches * plan.batch.global_batch))
        out[s.key] = (summed_ce(model(input_ids=inputs).logits, labels) / (labels != IGNORE).sum()).item()
    model.train(was)
    return out


def _anchor_mse(model, base_layers, plan, inputs, h):
    """MSE between h (entering the format group) and the base raw group's output on the same input."""
    g = plan.groups
    with torch.no_grad():
        out = model.model(input_ids=inputs, output_hidden_states=True)
        hb = out.hidden_states[g.raw_start]  # input of the first raw layer (frozen prefix output)
        pos = torch.arange(inputs.shape[1]).unsqueeze(0)
        cos_sin = model.model.rotary_emb(hb, position_ids=pos)
        for layer in base_layers:
            hb = layer(hb, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
            hb = hb[0] if isinstance(hb, tuple) else hb
    return torch.mean((h - hb) ** 2)


def train_reference(plan, steps: int | None = None, validations: dict | None = None):
    """Returns (per-step losses, model). With `validations` (a dict), fills it with
    {step: validate_reference(...)} at the steps where the run validates."""
    cfg, g = plan.cfg, plan.groups
    torch.manual_seed(cfg.schedule.seed)
    model = load_model(cfg.model.model)
    model.train()
    params = trainable(model, plan)
    adam = plan.ds_config["optimizer"]["params"]
    opt = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=tuple(adam["betas"]), eps=adam["eps"], weight_decay=cfg.optim.weight_decay
    )
    anchor = cfg.groups.anchor_weight if cfg.groups.phase == "raw" else 0.0
    if anchor:
        base_layers = copy.deepcopy(model.model.layers[g.raw_start : g.format_start]).requires_grad_(False)
        captured = {}
        # The hidden state entering the format group: the input of layer format_start.
        model.model.layers[g.format_start].register_forward_pre_hook(
            lambda mod, args, kwargs: captured.update(h=args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
    losses = []
    it = step_batches(plan)
    total_steps = cfg.schedule.steps if steps is None else steps
    has_evals = validations is not None and bool(plan.evals)
    if has_evals and validates_at(0, cfg):
        validations[0] = validate_reference(model, plan)
    for step in range(1, total_steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, cfg)
        micro, targets = next(it)
        total = 0.0
        for inputs, labels in micro:
            loss = summed_ce(model(input_ids=inputs).logits, labels) / max(targets, 1)
            total += loss.item()  # the logged loss is the token loss only, as in the pipeline
            if anchor:  # the anchor term: weight x its mean over the global batch's micro-batches
                loss = loss + anchor * _anchor_mse(model, base_layers, plan, inputs, captured["h"]) / len(micro)
            loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        if has_evals and validates_at(step, cfg):
            validations[step] = validate_reference(model, plan)
    return losses, model
