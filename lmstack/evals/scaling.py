"""Scaling laws: predict a larger model's loss from small runs (Kaplan et al. 2020; Hoffmann et al. 2022).

    lmstack scaling sweep --out runs/scaling          # 3 sizes x 3 budgets + 1 held-out run (~30 min, busy 2-core VM)
    lmstack scaling fit runs/scaling --predict-params 2e6 --predict-tokens 3e6 --flops 1e15
    lmstack scaling fit runs/scaling --holdout L4-C128-D1500000  # also predict a grid run the fit leaves out

``sweep`` trains every (model size, token budget) pair of a small grid with ``lmstack.stages.pretrain`` on the
default corpus (or ``--data DIR`` shards), plus one *held-out* larger run that the fit never sees, and writes
RUN/points.jsonl (one line per run: non-embedding parameters N, tokens D, FLOPs, final validation loss).

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
and extrapolation beyond a few times the largest run is not to be trusted. Each run uses a cosine schedule
sized to its own token budget (Chinchilla's correction of Kaplan's fixed-schedule runs).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

# default grid: (n_layer, n_embd, n_head) per size, and token budgets; held-out = one size up (1.9x N), largest budget
DEFAULT_SIZES: list[tuple[int, int, int]] = [(2, 64, 2), (3, 96, 3), (4, 128, 4)]
DEFAULT_TOKENS: list[int] = [250_000, 600_000, 1_500_000]
DEFAULT_HELDOUT: tuple[tuple[int, int, int], int] = ((5, 160, 5), 1_500_000)


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
            raise ValueError(f"the fitted exponents (alpha={self.alpha:.3g}, beta={self.beta:.3g}) are not both "
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
        raise ValueError(f"a 5-parameter law needs at least 5 runs to fit, got {len(pts)}; sweep more sizes/budgets")
    if len({p.params for p in pts}) < 2 or len({p.tokens for p in pts}) < 2:
        raise ValueError("the runs must vary both model size and token budget to separate the two terms")
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
        raise RuntimeError("the scaling-law fit did not converge from any start")
    a, b, e, alpha, beta = best_theta.tolist()
    return ScalingLaw(E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta, huber_loss=best_value)


# ----------------------------------------------------------------------------- sweep

def _default_data(out_dir: Path, vocab_size: int, max_mb: float) -> Path:
    """Shards of the default corpus (classics), with a small BPE tokenizer trained on it; cached in OUT."""
    data_dir = out_dir / "data"
    if (data_dir / "meta.json").is_file():
        return data_dir
    from lmstack.data.shards import tokenize_to_shards
    from lmstack.data.corpora import download_corpus
    from lmstack.data.readers import iter_documents
    from lmstack.tokenizer import Tokenizer

    corpus = download_corpus("classics")
    budget = int(max_mb * 1024 * 1024)
    # a fixed-size slice keeps tokenizing within the CPU budget; JSONL keeps the documents apart (a .txt file
    # would be one document, and the train/val split needs several)
    subset = out_dir / "corpus.jsonl"
    if not subset.is_file():
        written = 0
        tmp = subset.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in iter_documents([corpus]):
                text = doc.text.strip()
                if not text:
                    continue
                f.write(json.dumps({"text": text}) + "\n")
                written += len(text.encode("utf-8"))
                if written >= budget:
                    break
        tmp.replace(subset)
    texts = [doc.text for doc in iter_documents([subset])]
    if len(texts) < 2:
        raise ValueError(f"{subset} holds {len(texts)} document(s); the train/val split needs at least two")
    print(f"training a {vocab_size}-token BPE tokenizer on {subset} ({len(texts)} documents)", file=sys.stderr)
    tokenizer = Tokenizer.train(texts, vocab_size=vocab_size)
    tokenize_to_shards([subset], tokenizer, data_dir, workers=0, val_fraction=0.02, progress=True)
    return data_dir


def _non_embedding_params(summary: dict) -> int:
    from lmstack.config import model_config_from_dict
    from lmstack.models import build_model

    model = build_model(model_config_from_dict(summary["config"]["model"]))
    return int(model.num_params(non_embedding=True))


def sweep(out_dir: str | Path, data_dir: str | Path | None = None,
          sizes: Sequence[tuple[int, int, int]] = DEFAULT_SIZES, token_budgets: Sequence[int] = DEFAULT_TOKENS,
          heldout: tuple[tuple[int, int, int], int] | None = DEFAULT_HELDOUT, seq_len: int = 128,
          batch_size: int = 16, lr: float = 2e-3, vocab_size: int = 2048, corpus_mb: float = 8.0,
          eval_batches: int = 40, extra_overrides: Sequence[str] = ()) -> list[ScalingPoint]:
    """Train the grid (and the held-out run); returns the points, also appended to OUT/points.jsonl.

    Finished runs (OUT/runs/NAME/summary.json) are reused, so an interrupted sweep resumes where it stopped.
    """
    from lmstack.stages.pretrain import pretrain

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir else _default_data(out, vocab_size, corpus_mb)
    plan = [((L, C, H), D, False) for (L, C, H) in sizes for D in token_budgets]
    if heldout is not None:
        plan.append((heldout[0], heldout[1], True))
    points: list[ScalingPoint] = []
    for i, ((n_layer, n_embd, n_head), tokens, is_heldout) in enumerate(plan):
        name = f"L{n_layer}-C{n_embd}-D{tokens}"
        run_dir = out / "runs" / name
        steps = max(10, tokens // (batch_size * seq_len))
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
        else:
            print(f"[{i + 1}/{len(plan)}] {name}{' (held out)' if is_heldout else ''}: {steps} steps", file=sys.stderr)
            overrides = [f"model.n_layer={n_layer}", f"model.n_embd={n_embd}", f"model.n_head={n_head}",
                         f"model.n_kv_head={n_head}", f"model.block_size={seq_len}", f"train.seq_len={seq_len}",
                         f"train.batch_size={batch_size}", f"train.max_steps={steps}", "train.max_minutes=0",
                         "train.eval_every=0", f"train.eval_batches={eval_batches}", "train.ckpt_every=0",
                         "train.tensorboard=false", f"train.log_every={max(1, steps // 20)}", f"optim.lr={lr}",
                         f"optim.warmup_steps={max(5, steps // 20)}", "optim.schedule=cosine",
                         *extra_overrides]
            summary = pretrain(data, run_dir, preset="tiny", overrides=overrides, progress=True)
        loss = summary.get("final_val_loss")
        if loss is None or not math.isfinite(loss):
            raise RuntimeError(f"run {name} produced no finite validation loss; see {run_dir}/metrics.jsonl")
        n = _non_embedding_params(summary)
        points.append(ScalingPoint(name=name, params=n, tokens=int(summary["tokens"]), loss=float(loss),
                                   flops=float(summary.get("flops_per_token", 6 * n)) * summary["tokens"],
                                   heldout=is_heldout))
    with open(out / "points.jsonl.tmp", "w") as f:
        for p in points:
            f.write(json.dumps(asdict(p)) + "\n")
    (out / "points.jsonl.tmp").replace(out / "points.jsonl")
    return points


def load_points(run_dir: str | Path) -> list[ScalingPoint]:
    path = Path(run_dir)
    path = path / "points.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `lmstack scaling sweep --out DIR` first")
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
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def mark_heldout(points: Sequence[ScalingPoint], names: Sequence[str]) -> list[ScalingPoint]:
    """Copies of ``points`` with the runs called ``names`` also held out of the fit (to be predicted instead)."""
    known = {p.name for p in points}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--holdout names no run called {', '.join(unknown)}; the runs are: "
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
        raise ValueError("--predict-params and --predict-tokens go together: give both N and D")
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
    except ValueError as e:
        result["compute_optimal"] = {"flops": budget, "error": str(e)}
    plot_fit(points, law, run / "scaling.png") if run.is_dir() else None
    if run.is_dir():
        (run / "fit.json").write_text(json.dumps(result, indent=1))
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
