"""From the plan's data to the (input_ids, labels) micro-batches the pipeline engine eats.

Sample g of the job is fixed by the seed alone (data_prep.reader), so step k always sees global
samples [k*G, (k+1)*G) whatever the data-parallel size, and resuming at step k is starting there.
"""
from __future__ import annotations

import torch

from data_prep.reader import micro_batches

from .model import IGNORE_INDEX


def to_inputs_labels(tokens: torch.Tensor, mask: torch.Tensor | None):
    """[m, S+1] windows -> inputs [m, S] and next-token labels [m, S] (IGNORE_INDEX where unmasked)."""
    inputs = tokens[:, :-1].contiguous()
    labels = tokens[:, 1:].clone()
    if mask is not None:
        labels[mask[:, 1:] == 0] = IGNORE_INDEX
    return inputs, labels


def training_batches(data, micro: int, dp_rank: int, dp_size: int, start_sample: int):
    """Endless (inputs, labels) of one data-parallel rank from global sample `start_sample` on."""
    for tokens, mask in micro_batches(data, micro, dp_rank, dp_size, start_sample):
        yield to_inputs_labels(tokens, mask)
