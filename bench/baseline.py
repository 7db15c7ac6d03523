"""The plain PyTorch training loop the benchmarks time the pipeline against.

What one writes without the pipeline: the HF model loaded by transformers, the phase's parameters
trainable, torch's AdamW with the run's betas, eps and weight decay, the run's learning-rate
schedule, gradient accumulation over the micro-batches and clipping. A micro-batch's loss is its
summed next-token cross-entropy over the step's number of targets, as in the pipeline. The
batches are the run's own samples (global samples [k*G, (k+1)*G) for step k, from the plan's
data), cut into the same micro-batches, so both sides train on the same tokens.

A speed baseline, not an oracle: it takes which parameters train (LayerGroups.trains) and the
schedule (lr_factor) from the product, which costs nothing measurable; the parity tests hold the
pipeline's numbers to a loop of their own.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

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


def step_batches(plan, start_step: int = 0):
    """Per step: ([(inputs, labels)] in chunks of micro_batch_size, number of targets of the step)."""
    G, m = plan.batch.global_batch, plan.cfg.data.micro_batch_size
    step = start_step
    while True:
        got = [plan.data.sample(g) for g in range(step * G, (step + 1) * G)]
        tokens = torch.stack([torch.as_tensor(t, dtype=torch.int64) for t, _ in got])
        mask = None if got[0][1] is None else torch.stack([torch.as_tensor(m) for _, m in got])
        inputs, labels = shift(tokens, mask)
        yield [(inputs[i : i + m], labels[i : i + m]) for i in range(0, G, m)], int((labels != IGNORE).sum())
        step += 1


def trainable(model, groups) -> list:
    """Set requires_grad from the run's layer groups; the parameters that train."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(groups.trains(name))
        if p.requires_grad:
            params.append(p)
    return params


class PlainLoop:
    """The loop for one run plan (pipeline.training.plan.build_plan), on `device`.

    bf16: fp32 weights under torch.autocast(bf16), how plain PyTorch does mixed precision (the
    counterpart of DeepSpeed's bf16 weights + fp32 master copy). compile_layers: torch.compile on
    each decoder layer, as the pipeline's `compile_layers` does."""

    def __init__(self, plan, device: str = "cpu", bf16: bool = False, compile_layers: bool = False):
        from pipeline.hf import load_causal_lm
        from pipeline.training.schedule import lr_factor

        cfg = self.cfg = plan.cfg
        self.device = device
        torch.manual_seed(cfg.schedule.seed)
        self.model = load_causal_lm(cfg.model.model).to(device)
        self.model.train()
        if compile_layers:
            for layer in self.model.model.layers:
                layer.compile()
        self.params = trainable(self.model, plan.groups)
        adam = plan.ds_config["optimizer"]["params"]
        self.opt = torch.optim.AdamW(
            self.params,
            lr=cfg.optim.lr,
            betas=tuple(adam["betas"]),
            eps=adam["eps"],
            weight_decay=cfg.optim.weight_decay,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        self.autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
        self.batches = step_batches(plan)

    def step(self) -> None:
        """One optimizer step: make the step's batches, forward and backward each micro-batch, clip,
        Adam, schedule, zero the gradients."""
        micro, targets = next(self.batches)
        for inputs, labels in micro:
            inputs = inputs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with self.autocast:
                logits = self.model(input_ids=inputs).logits
            (summed_ce(logits, labels) / max(targets, 1)).backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def step_times(self, steps: int, on_step=None) -> list[float]:
        """Seconds of each of `steps` steps (batch making included, as in the pipeline's step, whose
        train_batch pulls its micro-batches itself); on a GPU, synchronised before and after.
        `on_step(k, seconds)` is called after each."""
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        times = []
        for k in range(steps):
            sync()
            t = time.perf_counter()
            self.step()
            sync()
            times.append(time.perf_counter() - t)
            if on_step is not None:
                on_step(k, times[-1])
        return times
