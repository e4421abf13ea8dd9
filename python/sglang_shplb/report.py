"""PNG reports for the pipeline artifacts (matplotlib, headless)."""
from __future__ import annotations

import io

import torch

from .artifacts import atomic_write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def budget_report(profile, budgets: dict, path: str) -> None:
    """Left: budget heatmap (layers x units). Right: recovery curves of the least and most elastic
    units, with the budget each was given."""
    from .budget import eval_curves

    plt = _figure()
    b = torch.tensor(budgets["budgets"])
    curves = profile.curves(budgets["selector"], budgets["granularity"])
    grid = profile.grid
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    im = ax1.imshow(b.numpy(), aspect="auto", cmap="viridis")
    ax1.set(title=f"{budgets['method']} budgets (mean {budgets['mean_budget']})",
            xlabel=f"{'KV group' if budgets['granularity'] == 'kv' else 'query head'}", ylabel="layer")
    fig.colorbar(im, ax=ax1, label="fraction of context")
    flat, fb = curves.flatten(0, 1), b.flatten()
    b90 = torch.tensor([float((c >= 0.9).float().argmax()) for c in flat])
    picks = torch.cat([b90.argsort()[:3], b90.argsort()[-3:]])
    U = curves.shape[1]
    for i in picks.tolist():
        line, = ax2.plot(grid, flat[i], marker=".", label=f"L{i // U} u{i % U}")
        ax2.plot([fb[i]], [float(eval_curves(flat[i:i + 1], grid, fb[i:i + 1]))], "o", color=line.get_color())
    ax2.set(xscale="log", xlabel="budget (fraction of context)", ylabel="recovery",
            title=f"{budgets['selector']} recovery: sparsest and densest units")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
