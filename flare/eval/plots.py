"""PNG plots of an evaluation: throughput against concurrency, accuracy against tokens per forward."""

from __future__ import annotations

from pathlib import Path

from flare.eval.harness import EvalReport
from flare.eval.throughput import WaveRun


def pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ModuleNotFoundError("plots need matplotlib: pip install 'flare-lm[eval]'") from e

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def throughput_plot(runs: list[WaveRun], path: str | Path) -> Path:
    """Aggregate tokens/s against concurrency, one line per mode."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for mode in dict.fromkeys(r.mode for r in runs):
        pts = sorted((r.concurrency, r.tokens_per_s) for r in runs if r.mode == mode)
        ax.plot([c for c, _ in pts], [t for _, t in pts], marker="o", label=mode)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("tokens / s (all requests)")
    ax.set_title(f"Fixed-output throughput ({runs[0].max_tokens} tokens per request)" if runs else "Throughput")
    ax.set_xticks(sorted({r.concurrency for r in runs}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def accuracy_plot(report: EvalReport, path: str | Path) -> Path:
    """Accuracy against tokens per forward, one point per mode: the trade-off at a glance."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in report.results:
        ax.scatter([r.tokens_per_forward], [100 * r.accuracy], s=60)
        ax.annotate(r.mode, (r.tokens_per_forward, 100 * r.accuracy), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.set_title(f"{report.task}: {report.questions} questions")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def histogram_plot(values: list[float], path: str | Path, xlabel: str, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.hist(values, bins=min(50, max(5, len(values) // 5)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
