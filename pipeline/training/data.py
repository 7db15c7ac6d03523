"""From the plan's data to the (input_ids, (labels, norm)) micro-batches the pipeline engine eats.

Sample g of the job is fixed by the seed alone (data_prep.reader), so step k always sees global
samples [k*G, (k+1)*G) whatever the data-parallel size, and resuming at step k is starting there.
"""

from __future__ import annotations

from data_prep.reader import micro_batches

from .loss import micro_batch_norm, target_count, to_inputs_labels


def global_targets(data, first: int, global_batch: int, seq_len: int) -> int:
    """Target tokens in global samples [first, first + G). Unmasked data needs no reading; masked
    data reads each sample's mask (a rank reads the whole global batch's windows, which costs
    memory-mapped reads of G x (S+1) tokens per step, against waiting for every other rank)."""
    if not data.has_mask:
        return global_batch * seq_len
    return sum(target_count(data.sample(g)[1], seq_len) for g in range(first, first + global_batch))


def step_micro_batches(
    data, global_batch: int, micro: int, dp_rank: int, dp_size: int, seq_len: int, start_sample: int
):
    """Endless micro-batches of one data-parallel rank from global sample `start_sample` (a step
    boundary) on: (inputs, (labels, norm)), where norm carries the step's global target count to
    the loss (`loss.causal_lm_loss`)."""
    per_rank = global_batch // (micro * dp_size)
    local = micro_batches(data, micro, dp_rank, dp_size, start_sample)
    first = start_sample
    while True:
        norm = micro_batch_norm(global_targets(data, first, global_batch, seq_len), global_batch // micro)
        for _ in range(per_rank):
            inputs, labels = to_inputs_labels(*next(local))
            yield inputs, (labels, norm)
        first += global_batch
