"""The user-facing error and what an entry point does with it: one line, a known exit code.

Shared by every package (data_prep, pipeline, bench); imports nothing of the project.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A mistake in the user's input: printed as one clear line, never as a traceback.

    The message must name what is at fault: the file (and line), the config key or the flag.
    """


EXIT_USER, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 4, 130


def fail_cleanly(main):
    """Decorator for entry points: a UserError becomes one `error: ...` line on stderr and exit 2;
    Ctrl-C becomes one line and exit 130 (128 + SIGINT), not a traceback. Outputs are written
    atomically (data_prep.files), so an interrupted command leaves nothing half-written, and training
    resumes from its last complete checkpoint."""

    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(getattr(e, "exit_code", EXIT_USER))
        except KeyboardInterrupt:
            print(
                "interrupted (Ctrl-C): nothing half-written is left; rerun the same command to continue",
                file=sys.stderr,
            )
            sys.exit(EXIT_INTERRUPTED)

    wrapper.__doc__ = main.__doc__
    wrapper.__name__ = main.__name__
    return wrapper
