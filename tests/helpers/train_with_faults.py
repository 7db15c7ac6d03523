"""`python -m pipeline.train` with the faults of tests/kit/faults.py installed from the environment."""

import sys

from tests.kit import faults

if __name__ == "__main__":
    faults.install_from_env()
    from pipeline.train import main

    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
