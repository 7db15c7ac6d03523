"""Validation during training: each set's mean loss through the pipeline engine's eval path.

`eval_batch` runs the same stages, loss and masks as `train_batch`, forward only and without
gradients, so validating changes nothing in training: no optimizer step, no RNG draw (the model
is in eval mode, so dropout draws nothing), and the training data iterator is put back. A test
holds the curve and the final weights to bit equality with validation on and off.

A set's loss is the mean over its batches of the engine's batch loss, itself the mean of the
micro-batch losses over accumulation and data-parallel ranks: the quantity the training loss
is, on other data. Each validation reads the same sequences (samples [0, batches x G) of the
set, split over data-parallel ranks like training's), so the curve compares like with like.
"""
from __future__ import annotations

import time

from data_prep.reader import micro_batches

from . import monitor
from .data import to_inputs_labels
from .engine import Engine


def due(step: int, every: int, last: int) -> bool:
    """Validate at step 0 (the model as loaded), every `every` steps, and after the last."""
    return bool(every) and (step % every == 0 or step == last)


def validate(eng: Engine) -> dict[str, float]:
    """{key: mean loss} of every set of the plan, plus `eval_time_s`; a collective, every rank calls it."""
    plan, engine = eng.plan, eng.engine
    t0 = time.perf_counter()
    out = {}
    with monitor.muted(engine):
        for s in plan.evals:
            batches = (to_inputs_labels(t, m) for t, m in
                       micro_batches(s.data, plan.batch.micro_batch, eng.dp_rank, plan.batch.dp_size, 0))
            total = 0.0
            for _ in range(s.batches):
                total += float(engine.eval_batch(data_iter=batches, bcast_loss=True))
            out[s.key] = total / s.batches
    monitor.write(engine, out)
    out["eval_time_s"] = time.perf_counter() - t0
    return out
