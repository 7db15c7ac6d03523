"""Test-wide environment: CPU DeepSpeed, a cached JIT op, quiet tokenizers, no hub."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Set before anything imports deepspeed or transformers (pytest imports conftest first).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed JIT-builds its CPU comm op on first start; one cache for every test and subprocess.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# The venv's bin first: torch's JIT build then always uses the venv's ninja. Two ninja versions
# (system and venv) discard each other's build logs and rebuild DeepSpeed's op every time.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
