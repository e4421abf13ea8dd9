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
    from .curves import eval_curves

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


def plan_report(plan: dict, path: str, before: dict | None = None) -> None:
    """Rank loads per layer (one bar per rank): `before` (default: SGLang's contiguous order of the
    same budgets) on top, the plan below, each layer's lower bound, and the step-time budget line:
    uniform's per-layer max load (a plan at ratio 1.0 spends exactly that on average)."""
    plt = _figure()
    layers, tp = plan["layers"], plan["tp_size"]
    width = 0.8 / tp
    fig, axes = plt.subplots(2, 1, figsize=(min(24, max(8, len(layers) * 0.15 * tp)), 7), sharex=True, sharey=True)
    s = plan["summary"]
    if before is None:
        top = (layers, "contiguous_rank_load", "contiguous_imbalance", "contiguous (SGLang default)", None)
    else:
        top = (before["layers"], "rank_load", "imbalance", f"before: {before['budget_method']} budgets + "
               f"{before['placement']} placement", before["summary"].get("step_time_ratio"))
    panels = ((axes[0], *top),
              (axes[1], layers, "rank_load", "imbalance",
               f"{plan['placement']}{' + fill-bubbles (bars after filling)' if plan['fill_bubbles'] else ''}",
               s.get("step_time_ratio")))
    uniform_line = s.get("uniform_step_time", 0) / len(layers)
    for ax, rows, key, imb_key, title, ratio in panels:
        for r in range(tp):
            ax.bar([x["layer"] + (r - (tp - 1) / 2) * width for x in rows], [x[key][r] for x in rows],
                   width, label=f"rank {r}")
        ax.plot([x["layer"] for x in rows], [x["lower_bound"] for x in rows], "k_", markersize=10,
                label="lower bound")
        if uniform_line:
            ax.axhline(uniform_line, color="r", ls="--", lw=1,
                       label=f"uniform {plan['mean_budget']} per-layer max load")
        imb = [x[imb_key] for x in rows]            # of the placement, before any filling
        step = "" if ratio is None else f"; step time {ratio:.3f}x uniform"
        ax.set(title=f"{title}: max/mean imbalance worst {max(imb):.3f}, mean {sum(imb) / len(imb):.3f}{step}",
               ylabel=f"{plan['objective']} load")
    axes[1].set_xlabel("layer")
    axes[0].legend(fontsize=7, ncol=min(tp + 2, 8))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
