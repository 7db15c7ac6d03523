"""Training one phase of the method on a DeepSpeed pipeline (`python -m pipeline.train`).

Owns: the plan of a run (plan.py: groups resolved, stage bounds, batch plan, the DeepSpeed JSON,
the data, all checked once before DeepSpeed starts), the pipeline model (model.py: each rank
builds only its stage), the engine (engine.py), the loop (loop.py), saving and resuming through
the engine (checkpoint.py), the LR schedule (schedule.py), metrics.jsonl and loss.png
(metrics_log.py), validation through the engine's eval path (validation.py), DeepSpeed's
TensorBoard/W&B/CSV monitors (monitor.py), rank discovery for every launcher (dist.py) and the
dead-rank watchdog (watchdog.py).

May import: the shared modules of `pipeline` (config, groups, names, rundir, hf) and `data_prep`.
Never imports `pipeline.convert`, `pipeline.evaluation` or `pipeline.demo`.
"""
