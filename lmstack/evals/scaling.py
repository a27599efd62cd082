"""Scaling laws: predict a larger model's loss from small runs (Kaplan et al. 2020; Hoffmann et al. 2022).

    lmstack scaling sweep --out runs/scaling          # the runs: lmstack.stages.scaling
    lmstack scaling fit runs/scaling --predict-params 2e6 --predict-tokens 3e6 --flops 1e15
    lmstack scaling fit runs/scaling --holdout L4-C128-D1500000  # also predict a grid run the fit leaves out

The sweep (``lmstack.stages.scaling.sweep``, orchestration above this package) trains a small grid of
model sizes x token budgets plus one *held-out* larger run and writes RUN/points.jsonl (one line per run:
non-embedding parameters N, tokens D, FLOPs, final validation loss). This module fits and reports.

``fit`` fits the Chinchilla form  L(N, D) = E + A / N^alpha + B / D^beta  to the grid points, the way
Hoffmann et al. did: in log space, ``log L = LSE(a - alpha log N, b - beta log D, e)`` with ``A = e^a``,
``B = e^b``, ``E = e^e``, minimising the Huber loss (delta 1e-3) of the log residuals. The start grid is
the paper's (alpha, beta in 0..2, e in -1..1, a, b in 0..25): every start is optimised at once as one
batched Adam problem in float64, and the best few are polished with L-BFGS. It then reports the predicted
loss of the held-out run (and its relative error), the compute-optimal split of a FLOP budget C under
C = 6 N D:

    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = (C/6)^(alpha/(alpha+beta)) / G,  G = (alpha A / (beta B))^(1/(alpha+beta))

and draws RUN/scaling.png (loss vs tokens per size with the fitted curves, and the held-out point).

Honest caveats: N counts non-embedding parameters (embeddings dominate tiny models and bend the law, as
Kaplan et al. observed); a CPU-sized grid spans one decade or less in N and D, so the exponents are rough
and extrapolation beyond a few times the largest run is not to be trusted.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lmstack.atomic import write_atomic, write_json_atomic
from lmstack.errors import DataError, UserError


@dataclass
class ScalingPoint:
    name: str
    params: int          # non-embedding parameters N
    tokens: int          # training tokens D
    loss: float          # final validation loss (nats / token)
    flops: float = 0.0   # training FLOPs from the model's own count (6N + attention) x D
    heldout: bool = False


@dataclass
class ScalingLaw:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    huber_loss: float = 0.0

    def predict(self, params: float, tokens: float) -> float:
        return self.E + self.A / params ** self.alpha + self.B / tokens ** self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising the predicted loss under 6 N D = flops."""
        if self.alpha <= 0 or self.beta <= 0:
            raise DataError(f"the fitted exponents (alpha={self.alpha:.3g}, beta={self.beta:.3g}) are not both "
                             "positive, so there is no compute-optimal split; sweep a wider grid")
        s = self.alpha + self.beta
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        return G * (flops / 6) ** (self.beta / s), (flops / 6) ** (self.alpha / s) / G

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# ----------------------------------------------------------------------------- fitting

def _huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    ax = x.abs()
    return torch.where(ax <= delta, 0.5 * x * x, delta * (ax - 0.5 * delta))


def _objective(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor,
               delta: float) -> torch.Tensor:
    """Sum of Huber(log residuals) per start: theta (K, 5) = [a, b, e, alpha, beta] -> (K,)."""
    a, b, e, alpha, beta = theta.unbind(-1)  # each (K,)
    terms = torch.stack([a[:, None] - alpha[:, None] * log_n[None], b[:, None] - beta[:, None] * log_d[None],
                         e[:, None].expand(-1, log_n.numel())], dim=0)  # (3, K, P)
    pred = torch.logsumexp(terms, dim=0)  # (K, P)
    return _huber(pred - log_l[None], delta).sum(-1)


def fit_scaling_law(points: Sequence[ScalingPoint], delta: float = 1e-3, steps: int = 400) -> ScalingLaw:
    """Fit E + A/N^alpha + B/D^beta to the points (Huber in log space, the Chinchilla grid of starts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: threading only adds overhead (and stalls on a busy CPU)
    try:
        return _fit(points, delta, steps)
    finally:
        torch.set_num_threads(threads)


def _fit(points: Sequence[ScalingPoint], delta: float, steps: int) -> ScalingLaw:
    pts = [p for p in points if not p.heldout]
    if len(pts) < 5:
        raise DataError(f"a 5-parameter law needs at least 5 runs to fit, got {len(pts)}; sweep more sizes/budgets")
    if len({p.params for p in pts}) < 2 or len({p.tokens for p in pts}) < 2:
        raise DataError("the runs must vary both model size and token budget to separate the two terms")
    dt = torch.float64
    log_n = torch.tensor([math.log(p.params) for p in pts], dtype=dt)
    log_d = torch.tensor([math.log(p.tokens) for p in pts], dtype=dt)
    log_l = torch.tensor([math.log(p.loss) for p in pts], dtype=dt)
    grid = torch.cartesian_prod(torch.arange(0, 26, 5, dtype=dt), torch.arange(0, 26, 5, dtype=dt),
                                torch.arange(-1, 1.01, 0.5, dtype=dt), torch.arange(0, 2.01, 0.5, dtype=dt),
                                torch.arange(0, 2.01, 0.5, dtype=dt))  # (K, 5): a, b, e, alpha, beta
    theta = grid.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for i in range(steps):
        opt.zero_grad()
        loss = _objective(theta, log_n, log_d, log_l, delta)
        loss.sum().backward()
        opt.step()
        if i == steps // 2:
            for g in opt.param_groups:
                g["lr"] = 0.01
    with torch.no_grad():
        final = _objective(theta, log_n, log_d, log_l, delta)
        final = torch.where(torch.isfinite(final), final, torch.full_like(final, float("inf")))
    best_theta, best_value = None, float("inf")
    for idx in torch.argsort(final)[:3].tolist():  # polish the best starts with L-BFGS
        t = theta[idx].detach().clone()[None].requires_grad_(True)
        lbfgs = torch.optim.LBFGS([t], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

        def closure():
            lbfgs.zero_grad()
            value = _objective(t, log_n, log_d, log_l, delta).sum()
            value.backward()
            return value

        try:
            lbfgs.step(closure)
        except RuntimeError:
            continue
        value = float(_objective(t.detach(), log_n, log_d, log_l, delta))
        if math.isfinite(value) and value < best_value:
            best_value, best_theta = value, t.detach()[0]
    if best_theta is None:
        raise DataError("the scaling-law fit did not converge from any start; check points.jsonl for broken runs")
    a, b, e, alpha, beta = best_theta.tolist()
    return ScalingLaw(E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta, huber_loss=best_value)


# ----------------------------------------------------------------------------- points

def load_points(run_dir: str | Path) -> list[ScalingPoint]:
    path = Path(run_dir)
    path = path / "points.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path} does not exist; run `lmstack scaling sweep --out DIR` first")
    return [ScalingPoint(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- fit + report

def plot_fit(points: Sequence[ScalingPoint], law: ScalingLaw, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({p.params for p in points})
    colors = plt.cm.viridis([i / max(len(sizes) - 1, 1) for i in range(len(sizes))])
    d_all = [p.tokens for p in points]
    d_grid = torch.logspace(math.log10(min(d_all) / 1.5), math.log10(max(d_all) * 3), 100).tolist()
    for n, color in zip(sizes, colors):
        pts = [p for p in points if p.params == n]
        held = any(p.heldout for p in pts)
        ax.plot(d_grid, [law.predict(n, d) for d in d_grid], "--" if held else "-", color=color, lw=1,
                label=f"N={n / 1e6:.2f}M{' (held out)' if held else ''}")
        ax.scatter([p.tokens for p in pts], [p.loss for p in pts], color=color, marker="*" if held else "o",
                   s=120 if held else 30, zorder=3)
    for p in points:
        if p.heldout:
            predicted = law.predict(p.params, p.tokens)
            ax.annotate(f"predicted {predicted:.3f}\nactual {p.loss:.3f} ({100 * (predicted - p.loss) / p.loss:+.1f}%)",
                        (p.tokens, p.loss), textcoords="offset points", xytext=(-10, -30), ha="right", fontsize=8)
    lowest = min(p.loss for p in points)
    if law.E > 0.5 * lowest:  # a far-away floor would squash the curves; then it is only named in the title
        ax.axhline(law.E, color="gray", lw=0.8, ls=":", label=f"E = {law.E:.3f}")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels (2e5, 3e5, ...) overlap on a short axis
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.2f} + {law.B:.3g}/D^{law.beta:.2f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(out_png, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    plt.close(fig)


def mark_heldout(points: Sequence[ScalingPoint], names: Sequence[str]) -> list[ScalingPoint]:
    """Copies of ``points`` with the runs called ``names`` also held out of the fit (to be predicted instead)."""
    known = {p.name for p in points}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--holdout names no run called {', '.join(unknown)}; the runs are: "
                         f"{', '.join(p.name for p in points)}")
    wanted = set(names)
    return [ScalingPoint(**{**asdict(p), "heldout": p.heldout or p.name in wanted}) for p in points]


def extrapolation_caveats(grid: Sequence[ScalingPoint], law: ScalingLaw, params: float, tokens: float,
                          factor: float = 10.0) -> list[str]:
    """Plain warnings when an answer rests on the law far outside the runs it was fitted to."""
    caveats = []
    n_lo, n_hi = min(p.params for p in grid), max(p.params for p in grid)
    d_lo, d_hi = min(p.tokens for p in grid), max(p.tokens for p in grid)
    if not n_lo / factor <= params <= n_hi * factor:
        caveats.append(f"N={params:.3g} is more than {factor:g}x outside the fitted sizes ({n_lo:,}..{n_hi:,})")
    if not d_lo / factor <= tokens <= d_hi * factor:
        caveats.append(f"D={tokens:.3g} is more than {factor:g}x outside the fitted budgets ({d_lo:,}..{d_hi:,})")
    if law.E < 0.1 * min(p.loss for p in grid):
        caveats.append(f"the fitted floor E={law.E:.3g} is far below every run's loss: the grid does not pin the "
                       "irreducible loss down, so the split follows the power-law tails")
    return caveats


def fit_report(run_dir: str | Path, predict_params: float | None = None, predict_tokens: float | None = None,
               flops: float | None = None, holdout: Sequence[str] = ()) -> dict[str, Any]:
    """Fit the law to RUN/points.jsonl, predict the held-out run (+ an optional N, D), write fit.json + scaling.png.

    ``holdout`` names grid runs to leave out of the fit as well (e.g. the largest token budget, to test
    extrapolation in D); they are reported next to the sweep's own held-out run.
    """
    if (predict_params is None) != (predict_tokens is None):
        raise UserError("--predict-params and --predict-tokens go together: give both N and D")
    run = Path(run_dir)
    points = mark_heldout(load_points(run), holdout)
    law = fit_scaling_law(points)
    grid = [p for p in points if not p.heldout]
    result: dict[str, Any] = {"law": law.to_dict(), "points": [asdict(p) for p in points],
                              "fit_rmse_log": math.sqrt(sum((math.log(law.predict(p.params, p.tokens)) -
                                                             math.log(p.loss)) ** 2 for p in grid) / len(grid))}
    held = [p for p in points if p.heldout]
    if held:
        result["heldout"] = [{"name": p.name, "params": p.params, "tokens": p.tokens, "actual_loss": p.loss,
                              "predicted_loss": law.predict(p.params, p.tokens),
                              "relative_error": (law.predict(p.params, p.tokens) - p.loss) / p.loss} for p in held]
    if predict_params and predict_tokens:
        result["prediction"] = {"params": predict_params, "tokens": predict_tokens,
                                "loss": law.predict(predict_params, predict_tokens)}
    budget = flops or 6 * max(p.params for p in points) * max(p.tokens for p in points) * 10
    try:
        n_opt, d_opt = law.compute_optimal(budget)
        result["compute_optimal"] = {"flops": budget, "params": n_opt, "tokens": d_opt,
                                     "tokens_per_param": d_opt / n_opt, "loss": law.predict(n_opt, d_opt)}
        caveats = extrapolation_caveats(grid, law, n_opt, d_opt)
        if caveats:
            result["compute_optimal"]["caveats"] = caveats
    except DataError as e:
        result["compute_optimal"] = {"flops": budget, "error": str(e)}
    if run.is_dir():
        plot_fit(points, law, run / "scaling.png")
        write_json_atomic(run / "fit.json", result, indent=1)
    return result


def format_fit(result: dict[str, Any]) -> str:
    law = result["law"]
    lines = [f"L(N, D) = {law['E']:.4f} + {law['A']:.4g} / N^{law['alpha']:.3f} + {law['B']:.4g} / D^{law['beta']:.3f}"
             f"   (rmse of log loss on the grid: {result['fit_rmse_log']:.4f})"]
    for h in result.get("heldout", []):
        lines.append(f"held-out {h['name']}: N={h['params']:,} D={h['tokens']:,}  actual {h['actual_loss']:.4f}  "
                     f"predicted {h['predicted_loss']:.4f}  error {100 * h['relative_error']:+.2f}%")
    if "prediction" in result:
        p = result["prediction"]
        lines.append(f"prediction: N={p['params']:.3g} D={p['tokens']:.3g} -> loss {p['loss']:.4f}")
    c = result.get("compute_optimal", {})
    if "params" in c:
        lines.append(f"compute-optimal for C={c['flops']:.3g} FLOPs (C = 6ND): N={c['params']:.3g}, "
                     f"D={c['tokens']:.3g} ({c['tokens_per_param']:.1f} tokens/param), loss {c['loss']:.4f}")
        lines += [f"  caveat: {text}; treat this split as rough" for text in c.get("caveats", [])]
    elif c:
        lines.append(f"compute-optimal: {c.get('error')}")
    return "\n".join(lines)
