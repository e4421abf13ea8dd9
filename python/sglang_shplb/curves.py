"""Recovery curves as functions of the budget: a profile measures recovery at a grid of budgets per head
[..., G]; budgets, plans, the profile's summaries and reports read them interpolated and inverted here."""
from __future__ import annotations

import torch


def _with_origin(curves: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend (0, 0) and make curves monotone (cummax), so interpolation and inversion agree."""
    g = torch.cat([grid.new_zeros(1), grid.double()])
    c = torch.cat([curves.new_zeros(*curves.shape[:-1], 1), curves], -1).double().cummax(-1).values
    return c, g


def eval_curves(curves: torch.Tensor, grid: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Predicted recovery at `budgets` [...] by linear interpolation of curves [..., G]."""
    c, g = _with_origin(curves, grid)
    b = budgets.double().clamp(0, float(g[-1]))
    i = (torch.searchsorted(g, b.contiguous(), right=True) - 1).clamp(0, len(g) - 2)
    t = (b - g[i]) / (g[i + 1] - g[i])
    lo, hi = c.gather(-1, i.unsqueeze(-1)).squeeze(-1), c.gather(-1, (i + 1).unsqueeze(-1)).squeeze(-1)
    return lo + t * (hi - lo)


def invert_curves(curves: torch.Tensor, grid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smallest budget whose interpolated recovery reaches `target` [...] (1.0 if never)."""
    c, g = _with_origin(curves, grid)
    tau = target.double().unsqueeze(-1).expand(*c.shape[:-1], 1).contiguous()
    j = torch.searchsorted(c.contiguous(), tau).squeeze(-1).clamp(1, len(g) - 1)
    c0, c1 = c.gather(-1, (j - 1).unsqueeze(-1)).squeeze(-1), c.gather(-1, j.unsqueeze(-1)).squeeze(-1)
    t = ((target.double() - c0) / (c1 - c0).clamp(min=1e-12)).clamp(0, 1)
    out = g[j - 1] + t * (g[j] - g[j - 1])
    return torch.where(c[..., -1] < target.double(), torch.ones_like(out), out)
