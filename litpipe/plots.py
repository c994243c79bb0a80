"""matplotlib for writing PNGs from any process: no display, no GUI backend."""

from __future__ import annotations


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (headless servers, Ray workers, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
