"""The command-line error contract, checked through an entry point's own `main(argv)`.

`call(capsys, "pipeline.train", [cfg, "--steps=0"])` runs the entry point in this process (no
subprocess: seconds, not minutes) and asserts what a user sees on a refused input: exit status 2,
exactly one line starting with `error: `, no traceback. It returns that line for the caller to
check what it names (the file and line, the config key, the flag).

A `main` that returns its exit status instead of raising SystemExit (its `__main__` block does
`sys.exit(main(...))`, as pipeline.shipped's does) is held to the same contract.
"""

from __future__ import annotations

import importlib

import pytest


def call(capsys, entry: str, argv: list) -> str:
    """Run `entry`'s main(argv) in-process; return its one `error: ` line, asserting exit 2 and no traceback."""
    main = importlib.import_module(entry).main
    with pytest.raises(SystemExit) as e:
        rc = main([str(a) for a in argv])
        raise SystemExit(rc if isinstance(rc, int) else 0)  # what `python -m entry` would exit with
    err = capsys.readouterr().err
    assert e.value.code == 2, f"{entry}: exit {e.value.code}\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, f"expected one `error: ` line:\n{err}"
    return lines[0]
