"""The one way a PNG is made: matplotlib without a display (training nodes have none), the figure
laid out, rendered to bytes and closed, so no caller leaks figures or writes half a file."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported late: most commands never plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    return buf.getvalue()
