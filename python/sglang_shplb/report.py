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
    curves = profile.curves(budgets["selector"], budgets["granularity"], budgets.get("metric", "total"))
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
            title=f"{budgets['selector']} {budgets.get('metric', 'total')} recovery: sparsest and densest units")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plan_report(plan: dict, path: str) -> None:
    """Rank loads per layer (one bar per rank): SGLang's contiguous order on top, the plan below,
    with each layer's lower bound. The layer time is the tallest bar."""
    plt = _figure()
    layers, tp = plan["layers"], plan["tp_size"]
    width = 0.8 / tp
    fig, axes = plt.subplots(2, 1, figsize=(min(24, max(8, len(layers) * 0.15 * tp)), 7), sharex=True, sharey=True)
    panels = ((axes[0], "contiguous_rank_load", "contiguous_imbalance", "contiguous (SGLang default)"),
              (axes[1], "rank_load", "imbalance",
               f"{plan['placement']}{' + fill-bubbles (bars after filling)' if plan['fill_bubbles'] else ''}"))
    for ax, key, imb_key, title in panels:
        for r in range(tp):
            ax.bar([x["layer"] + (r - (tp - 1) / 2) * width for x in layers], [x[key][r] for x in layers],
                   width, label=f"rank {r}")
        ax.plot([x["layer"] for x in layers], [x["lower_bound"] for x in layers], "k_", markersize=10,
                label="lower bound")
        imb = [x[imb_key] for x in layers]            # of the placement, before any filling
        ax.set(title=f"{title}: max/mean imbalance worst {max(imb):.3f}, mean {sum(imb) / len(imb):.3f}",
               ylabel=f"{plan['objective']} load")
    axes[1].set_xlabel("layer")
    axes[0].legend(fontsize=7, ncol=min(tp + 1, 8))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
