"""layer-aware: teach a chat model new knowledge from raw text, on DeepSpeed pipelines.

Entry points (each a thin command line over one subpackage):
    python -m pipeline.train       one phase of the method          -> pipeline.training
    python -m pipeline.export      a run's checkpoint -> HF model   -> pipeline.convert
    python -m pipeline.transplant  A-Raw + A-Chat (or an instruct donor) -> HF chat model  -> pipeline.convert
    python -m pipeline.chat_vector A-Raw + (chat - base) -> HF chat model                  -> pipeline.convert
    python -m pipeline.evaluate    format and knowledge of a model  -> pipeline.evaluation
    python -m pipeline.probe       where chat tuning changed a model; a suggested boundary -> pipeline.evaluation
    python -m pipeline.demo        the whole method on a built-in world

The shared vocabulary, one owner per concept; every subpackage asks these, none re-derives them:
    config.py   the run config tree (typed, one docstring per key, validated on load)
    groups.py   the layer groups: which parameter is frozen, raw or format, what a phase trains
    names.py    stable names: pipeline layer i is `model.layers.i`
    rundir.py   the run directory: layout, complete checkpoints, the latest step, the lock
    hf.py       Hugging Face model directories: config, weights tensor by tensor, the model factory
    plots.py    how a PNG is made (no display, figures closed)

Import rule: subpackages import the shared modules and `data_prep`; they do not import each
other, except the demo, which drives them all, and the layer probe, which reads weights
through pipeline.convert.sources.
"""
