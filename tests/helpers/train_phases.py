"""Run `pipeline.train` on several configs in one set of ranks (one launch instead of several).

Each config goes through the real entry point; only process start-up (importing torch, DeepSpeed
and transformers, ~10 s per rank on 2 cores) is shared. Used by the parity tests.
"""

import gc
import sys

from pipeline.train import main

if __name__ == "__main__":
    for cfg in [a for a in sys.argv[1:] if not a.startswith("--local")]:
        main([cfg])
        gc.collect()
