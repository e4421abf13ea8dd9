"""One kind of plot the benchmarks share: a metric against mean budget, one line per method."""
from pathlib import Path


def line_plot(path: Path, series: dict, xlabel: str, ylabel: str, title: str, hline: float | None = 0.0) -> None:
    """`series`: {method: [(x, y), ...]}; written as PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers/CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
