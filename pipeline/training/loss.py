"""The training objective: next-token cross-entropy, one weight per target token of the global batch.

A step's loss is the sum of the token losses over every micro-batch and every data-parallel rank
of the global batch, divided by the number of target tokens in that global batch (labels that
are not IGNORE_INDEX). So every target token weighs the same whatever micro-batch it lands in,
and `micro_batch_size`, the data-parallel size and the pipeline depth change nothing but speed.
A window with no target token (a chat window holding no assistant token) adds nothing to either
sum, so it changes nothing either. This is Megatron-LM's `calculate_per_token_loss` and what
transformers does with `num_items_in_batch` since its 2024 gradient-accumulation fix.

The pipeline engine averages what `causal_lm_loss` returns over the accumulated micro-batches and
then over data-parallel ranks (gradients and logged loss alike), i.e. divides by the number of
micro-batches in the global batch, G / m. So each micro-batch's loss is its summed token loss
divided by `norm = N / (G / m)`: the per-micro-batch share of the global target count N. The data
side (`data.step_micro_batches`) computes N from the global batch before the step and sends `norm`
along with the labels, so no rank waits for a count from another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def to_inputs_labels(tokens: torch.Tensor, mask: torch.Tensor | None):
    """[m, S+1] windows -> inputs [m, S] and next-token labels [m, S] (IGNORE_INDEX where unmasked)."""
    inputs = tokens[:, :-1].contiguous()
    labels = tokens[:, 1:].clone()
    if mask is not None:
        labels[mask[:, 1:] == 0] = IGNORE_INDEX
    return inputs, labels


def target_count(mask, seq_len: int) -> int:
    """How many labels of one [S+1] window are targets: the masked-in positions after the first
    (the label shift drops position 0), or all S without a mask."""
    return seq_len if mask is None else int((mask[1:] != 0).sum())


def micro_batch_norm(global_targets: int, micro_batches_per_step: int) -> torch.Tensor:
    """The divisor of each micro-batch's summed loss (see the module docstring)."""
    return torch.tensor(global_targets / micro_batches_per_step, dtype=torch.float32)


def causal_lm_loss(logits: torch.Tensor, target) -> torch.Tensor:
    """Summed cross-entropy of one micro-batch over its targets, divided by `norm`.

    `target` is (labels [m, S] already shifted, norm as a 0-d tensor). A global batch without any
    target gives 0 (not NaN) and so no gradient."""
    labels, norm = target
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / norm.to(total.device).clamp(min=1e-6)
