"""Charts (matplotlib, Agg backend: no display needed) for eval, merge and pretraining, written atomically.

Imports nothing from the rest of the package but :mod:`ellama_recipes.io`, so the engine's training callbacks may import it (the forgetting
curve written at the end of pretraining) without an import cycle.

- :func:`forgetting_curve`: ``val_loss_domain`` and ``val_loss_general`` against step from ``RUN/metrics.jsonl``
  (``ellama eval --run RUN --out DIR``; pretraining writes ``RUN/forgetting.png`` when it ends)
- :func:`eval_bars`: domain gain % and general regression % per model (``OUT/eval.png``)
- :func:`tradeoff`: domain gain against general regression, one point per merge alpha (``OUT/tradeoff.png``)
- :func:`sweep_front`: general loss increase against domain loss decrease per sweep run, Pareto front
  (``OUT/sweep.png``)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ellama_recipes.io.atomic import atomic_path
from ellama_recipes.io.metrics import read_metrics

FORGETTING_PNG = "forgetting.png"


class ChartError(ValueError):
    """Input a chart cannot be drawn from (the CLI turns it into a user error)."""


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_atomic(fig, path: Path) -> Path:
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        _plt().close(fig)
    return Path(path)


def forgetting_curve(run: Path, out_png: Path | None = None) -> Path:
    """Plot validation loss per side against step for a run folder (or its ``metrics.jsonl``); returns the PNG.

    The domain curve falling while the general curve stays flat is continued pretraining working; the general
    curve rising is forgetting. Default output: ``RUN/forgetting.png``.
    """
    run = Path(run)
    metrics = run if run.is_file() else run / "metrics.jsonl"
    if not metrics.is_file():
        raise ChartError(f"{metrics} does not exist: pass a pretraining run folder (it has metrics.jsonl).")
    recs = read_metrics(metrics)
    series = {k: [(r["step"], r[k]) for r in recs if isinstance(r.get(k), (int, float))]
              for k in ("val_loss_domain", "val_loss_general", "train_loss")}
    if not series["val_loss_domain"] and not series["val_loss_general"]:
        raise ChartError(f"{metrics} has no val_loss_domain / val_loss_general values yet: validation has not run "
                         "(schedule.val_check_interval) or the run was not built from a blend manifest.")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, color, label in (("val_loss_domain", "tab:blue", "validation loss, domain"),
                              ("val_loss_general", "tab:orange", "validation loss, general")):
        pts = series[key]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=label)
    if series["train_loss"]:
        pts = series["train_loss"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="grey", alpha=0.35, label="train loss (blend)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"Forgetting curve: {run.name if run.is_dir() else run.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_atomic(fig, Path(out_png) if out_png else metrics.parent / FORGETTING_PNG)


def eval_bars(rows: Iterable[tuple[str, float | None, float | None]], out_png: Path, *, baseline: str = "") -> Path:
    """Grouped bars: (label, domain_gain_pct, general_regression_pct) per model compared with the baseline."""
    rows = list(rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(rows) + 2), 4))
    xs = range(len(rows))
    gain = [r[1] if r[1] is not None else 0.0 for r in rows]
    reg = [r[2] if r[2] is not None else 0.0 for r in rows]
    b1 = ax.bar([x - 0.2 for x in xs], gain, width=0.4, color="tab:green", label="domain gain %")
    b2 = ax.bar([x + 0.2 for x in xs], reg, width=0.4, color="tab:red", label="general regression %")
    for bars, vals in ((b1, [r[1] for r in rows]), (b2, [r[2] for r in rows])):
        for bar, v in zip(bars, vals):
            ax.annotate("n/a" if v is None else f"{v:+.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom" if bar.get_height() >= 0 else "top", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), [r[0] for r in rows])
    ax.set_ylabel("% vs baseline")
    ax.set_title(f"Domain gain and general regression vs {baseline}" if baseline else "Domain gain and general regression")
    ax.legend()
    if not rows:
        ax.text(0.5, 0.5, "only the baseline was evaluated", ha="center", va="center", transform=ax.transAxes)
    return _save_atomic(fig, out_png)


def tradeoff(points: Iterable[dict], out_png: Path) -> Path:
    """Domain gain % (y) against general regression % (x), each point labelled with its merge alpha."""
    points = [p for p in points if p.get("domain_gain_pct") is not None and p.get("general_regression_pct") is not None]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    pts = sorted(points, key=lambda p: p["alpha"])
    ax.plot([p["general_regression_pct"] for p in pts], [p["domain_gain_pct"] for p in pts], "o-", color="tab:purple")
    for p in pts:
        ax.annotate(f"alpha={p['alpha']:g}", (p["general_regression_pct"], p["domain_gain_pct"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.axvline(0, color="grey", linewidth=0.6)
    ax.set_xlabel("general regression % (lower is better)")
    ax.set_ylabel("domain gain % (higher is better)")
    ax.set_title("Merge trade-off: (1 - alpha) * base + alpha * adapted")
    ax.grid(alpha=0.3)
    return _save_atomic(fig, out_png)


# ------------------------------------------------------------------------------------------------ ellama sweep
POINT_COLOR = "#1f5fbf"
FRONT_COLOR = "#d9822b"
RECOMMENDED_COLOR = "#2ca02c"


def sweep_front(result: dict, path: Path) -> int:
    """``sweep.png``: general loss increase (x, %) vs domain loss decrease (y, %), one labelled marker per
    finished run, the Pareto front as a line, the ``--max-regression`` budget as a dashed vertical line and the
    recommended point ringed. Returns the number of markers drawn. Written atomically."""
    plt = _plt()
    pts = [e for e in result["points"] if e["status"] == "finished"
           and e.get("general_regression_pct") is not None and e.get("domain_gain_pct") is not None]
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=110)
    try:
        budget = result["max_regression_pct"]
        ax.axvline(budget, color="#888888", linestyle="--", linewidth=1, zorder=1,
                   label=f"--max-regression {budget:g}%")
        ax.axvline(0, color="#cccccc", linewidth=0.8, zorder=0)
        ax.axhline(0, color="#cccccc", linewidth=0.8, zorder=0)
        by_name = {e["name"]: e for e in pts}
        front = [by_name[n] for n in result["pareto_front"] if n in by_name]
        if front:
            ax.plot([e["general_regression_pct"] for e in front], [e["domain_gain_pct"] for e in front],
                    color=FRONT_COLOR, linewidth=1.5, zorder=2, label="Pareto front")
        rec = by_name.get(result.get("recommended") or "")
        if rec is not None:
            ax.scatter([rec["general_regression_pct"]], [rec["domain_gain_pct"]], s=420, facecolors="none",
                       edgecolors=RECOMMENDED_COLOR, linewidths=2.5, zorder=3, label=f"recommended: {rec['name']}")
        xs = [e["general_regression_pct"] for e in pts]
        ys = [e["domain_gain_pct"] for e in pts]
        ax.scatter(xs, ys, s=60, color=POINT_COLOR, zorder=4, label="runs")
        for e in pts:
            k = e["knobs"]
            ax.annotate(f"lr {k['lr_fraction']:g}, {k['ratio']}", (e["general_regression_pct"], e["domain_gain_pct"]),
                        textcoords="offset points", xytext=(8, 6), fontsize=8, zorder=5)
        if pts:  # room for the labels
            xmin, xmax = min(xs + [0, budget]), max(xs + [0, budget])
            ymin, ymax = min(ys + [0]), max(ys + [0])
            dx, dy = (xmax - xmin) or 1.0, (ymax - ymin) or 1.0
            ax.set_xlim(xmin - 0.12 * dx, xmax + 0.3 * dx)
            ax.set_ylim(ymin - 0.12 * dy, ymax + 0.18 * dy)
        ax.set_xlabel("general validation loss increase vs base (%)   [less forgetting <-]")
        ax.set_ylabel("domain validation loss decrease vs base (%)   [more gain ->]")
        ax.set_title(f"ellama sweep ({result['size']}): LR fraction x general:domain ratio, {len(pts)} runs")
        ax.grid(True, alpha=0.25)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", metadata={"Title": "ellama sweep", "Description": f"{len(pts)} runs"})
    finally:
        plt.close(fig)
    return len(pts)
