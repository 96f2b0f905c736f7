"""Quality against compression, several methods on one chart (``compile-sparse eval --plot``)."""

from __future__ import annotations

from pathlib import Path


def quality_plot(points: list[dict], path: str | Path, *, title: str, x_label: str, y_label: str,
                 higher_is_better: bool = False) -> None:
    """Write a PNG: one line per ``series`` of ``points`` (dicts with series, x, y), sorted by x,
    with dense as the point (0, 1) every line starts from. matplotlib is needed (scripts/setup.sh
    installs it)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name in dict.fromkeys(p["series"] for p in points):
        chosen = sorted((p["x"], p["y"]) for p in points if p["series"] == name)
        xs, ys = [0.0] + [x for x, _ in chosen], [1.0] + [y for _, y in chosen]
        dashed = name == "truncate"
        ax.plot(xs, ys, "--" if dashed else "-", marker="o", color="black" if dashed else None, label=name)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label + (" (higher is better)" if higher_is_better else " (lower is better)"))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
