"""Validation during training: each set's mean loss through the pipeline engine's eval path.

`eval_batch` runs the same stages, loss and masks as `train_batch`, forward only and without
gradients, so validating changes nothing in training: no optimizer step, no RNG draw (the model
is in eval mode, so dropout draws nothing), and the training data iterator is put back. A test
holds the curve and the final weights to bit equality with validation on and off.

A set's loss follows the training loss's rule (`loss.py`) over the whole set: the summed token
loss of every batch divided by the set's target tokens. The engine returns each batch's
per-token loss; weighting it by that batch's target count gives the set's, so a batch with few
targets weighs little. Each validation reads the same sequences (samples [0, batches x G) of the
set, split over data-parallel ranks like training's), so the curve compares like with like.
"""

from __future__ import annotations

import time

from . import monitor
from .data import global_targets, step_micro_batches
from .engine import Engine


def due(step: int, every: int, last: int) -> bool:
    """Validate at step 0 (the model as loaded), every `every` steps, and after the last."""
    return bool(every) and (step % every == 0 or step == last)


def validate(eng: Engine) -> dict[str, float]:
    """{key: mean loss} of every set of the plan, plus `eval_time_s`; a collective, every rank calls it."""
    plan, engine = eng.plan, eng.engine
    t0 = time.perf_counter()
    G, S, out = plan.batch.global_batch, plan.cfg.data.seq_len, {}
    with monitor.muted(engine):
        for s in plan.evals:
            batches = step_micro_batches(s.data, G, plan.batch.micro_batch, eng.dp_rank, plan.batch.dp_size, S, 0)
            total, targets = 0.0, 0
            for b in range(s.batches):
                n = global_targets(s.data, b * G, G, S)
                total += float(engine.eval_batch(data_iter=batches, bcast_loss=True)) * n
                targets += n
            out[s.key] = total / max(targets, 1)
    monitor.write(engine, out)
    out["eval_time_s"] = time.perf_counter() - t0
    return out
