"""Run an entry point with one of its functions made to wait, so a test can catch it mid-write:

    python tests/helpers/paused_writer.py READY GO MODULE:FUNCTION ENTRY_MODULE [ARGS...]

The first call of MODULE.FUNCTION touches READY, waits until the file GO exists, then goes on
as usual. Everything else is the real entry point (ENTRY_MODULE's `main(ARGS)`), so the process
owns and writes its output exactly as it would unpaused.
"""

import importlib
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    ready, go, target, entry, *args = sys.argv[1:]
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, name)

    def paused(*a, **kw):
        Path(ready).touch()
        while not Path(go).exists():
            time.sleep(0.02)
        return real(*a, **kw)

    setattr(module, name, paused)
    importlib.import_module(entry).main(args)
