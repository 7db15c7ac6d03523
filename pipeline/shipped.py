"""The files that travel with the package: run configs and DeepSpeed JSONs.

The run configs live in `pipeline/configs/` (`chat.yaml`, `raw.yaml`, `demo/*.yaml`) and the
DeepSpeed JSONs in the top-level `ds_configs/` package. Both are package data, found through
`importlib.resources`, so a wheel installed into a cluster's environment finds them exactly as a
checkout does, from any working directory.

The rule every command follows (training, the launch scripts through `python -m pipeline.shipped`,
the Makefile): a relative path that names a file from the working directory is that file;
otherwise, a name of a shipped file (`chat.yaml`, `demo/raw.yaml`, `cpu_fp32_zero1.json`) is the
shipped file. A user's own file always wins over a shipped one of the same name.

The cost of `Path(str(files(...)))`: it needs the package unpacked on disk (a zipped install
would have no path). pip always installs wheels unpacked.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path


def config_dir() -> Path:
    """pipeline/configs: the run configs shipped with the package."""
    return Path(str(files("pipeline"))) / "configs"


def ds_config_dir() -> Path:
    """ds_configs: the DeepSpeed JSONs shipped with the package."""
    return Path(str(files("ds_configs")))


def shipped_configs() -> list[str]:
    """Every shipped run-config or recipe YAML, by the name the commands accept (`demo/raw.yaml`)."""
    root = config_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))


def find(path: str | Path, shipped: Path | None = None) -> Path:
    """`path` as the user gave it when it exists (or is absolute); else the shipped file of that
    name under `shipped` (default: the run configs) when there is one; else `path` unchanged, so
    the caller's "does not exist" error names what the user typed."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    candidate = (shipped or config_dir()) / path
    return candidate if candidate.is_file() else path


def main(argv: list[str]) -> int:
    """`python -m pipeline.shipped NAME`: print where NAME resolves (for the launch scripts, so the
    shell and Python follow one rule); exit 2 with the shipped names when it resolves nowhere."""
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m pipeline.shipped CONFIG   (prints the path training would read)", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    found = find(argv[0])
    if not found.exists():
        names = ", ".join(shipped_configs())
        print(
            f"error: config {argv[0]} not found (looked in {Path.cwd()} and among the shipped configs in "
            f"{config_dir()}: {names})",
            file=sys.stderr,
        )
        return 2
    print(found.absolute())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
