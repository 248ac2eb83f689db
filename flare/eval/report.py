"""Markdown and terminal tables of an evaluation and of throughput runs."""

from __future__ import annotations

from flare.eval.harness import EvalReport
from flare.eval.throughput import WaveRun


def _fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def accuracy_table(report: EvalReport) -> str:
    causal = report.result("causal")
    rows = ["| mode | accuracy | tokens/forward | tokens/s | speed-up vs causal | ms/token after the first (TPOT) | "
            "same tokens as causal | accepted/drafted |", "|---|---|---|---|---|---|---|---|"]
    for r in report.results:
        speedup = r.tokens_per_s / causal.tokens_per_s if causal and causal.tokens_per_s else None
        rows.append(f"| {r.label} | {100 * r.accuracy:.1f}% | {r.tokens_per_forward:.2f} | {r.tokens_per_s:.1f} | "
                    f"{_fmt(speedup, '.2f')}{'x' if speedup is not None else ''} | "
                    f"{_fmt(None if r.tpot is None else 1e3 * r.tpot, '.1f')} | "
                    f"{_fmt(None if r.same_as_causal is None else 100 * r.same_as_causal, '.0f')}"
                    f"{'%' if r.same_as_causal is not None else ''} | {_fmt(r.acceptance)} |")
    for mode, why in report.not_run.items():
        rows.append(f"| {mode} | not run: {why} | | | | | | |")
    return "\n".join(rows)


def throughput_table(runs: list[WaveRun]) -> str:
    rows = ["| mode | concurrency | tokens/s | vs causal | vs low_confidence | tokens/forward | valid |",
            "|---|---|---|---|---|---|---|"]
    base = {(r.mode, r.concurrency): r.tokens_per_s for r in runs}
    peer = {}  # the low-confidence peer at each concurrency, whatever its options
    for r in runs:
        if r.mode.split(":")[0] == "low_confidence":
            peer.setdefault(r.concurrency, r.tokens_per_s)
    for r in runs:
        c, lc = base.get(("causal", r.concurrency)), peer.get(r.concurrency)
        rows.append(f"| {r.mode} | {r.concurrency} | {r.tokens_per_s:.1f} | "
                    f"{_fmt(r.tokens_per_s / c if c else None)}{'x' if c else ''} | "
                    f"{_fmt(r.tokens_per_s / lc if lc else None)}{'x' if lc else ''} | "
                    f"{_fmt(r.tokens_per_forward)} | {_validity(r)} |")
    sampled = sorted({(r.temperature, r.top_p) for r in runs if r.temperature > 0})
    return "\n".join(rows) + "".join(f"\n\nsampled requests (unseeded): temperature {t:g}, top-p {p:g}"
                                    for t, p in sampled)


def _validity(r: WaveRun) -> str:
    if r.until_eos:
        return f"yes (until EOS: {r.tokens} tokens)"
    return "yes" if r.valid else "NO: " + (r.problem or "")


def scaling_lines(runs: list[WaveRun]) -> list[str]:
    """Per mode: aggregate tokens/s at the highest concurrency over the lowest."""
    out = []
    for mode in dict.fromkeys(r.mode for r in runs):
        mine = sorted((r for r in runs if r.mode == mode), key=lambda r: r.concurrency)
        if len(mine) > 1 and mine[0].tokens_per_s:
            out.append(f"{mode}: C={mine[-1].concurrency} / C={mine[0].concurrency} = "
                       f"{mine[-1].tokens_per_s / mine[0].tokens_per_s:.2f}x")
    return out
