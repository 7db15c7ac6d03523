"""Run `pipeline.train` on several configs in one set of ranks: one launch instead of several.

    deepspeed --num_gpus N --module bench.train_phases CONFIG...

Each config goes through the real entry point; only process start-up (importing torch, DeepSpeed
and transformers, ~10 s per rank on 2 cores) is shared. bench.train_speed's optimizer-state
figures train the raw and the chat phase this way.
"""

import gc
import sys

from pipeline.train import main

if __name__ == "__main__":
    for cfg in [a for a in sys.argv[1:] if not a.startswith("--local")]:  # the launcher adds --local_rank
        main([cfg])
        gc.collect()
