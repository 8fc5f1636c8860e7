"""PNG plots of simulation runs. matplotlib is optional (the `sim` extra): imported only here,
and this module only when --plot is given."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scheduler.fleetsim.runner import PolicyRun


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("kvgate sim --plot needs matplotlib: pip install 'kvgate[sim]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_plots(runs: Sequence[PolicyRun], directory: str | Path) -> list[Path]:
    plt = _pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs = sorted(r.data.ttft_s)
        if xs:
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=r.report.policy)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.axvline(runs[0].report.ttft_slo_s if runs else 2.0, color="grey", linestyle=":", label="SLO")
    ax.legend()
    ax.set_title(f"TTFT CDF — {runs[0].report.trace if runs else ''}")
    written.append(_save(fig, out / "ttft_cdf.png", plt))

    for r in runs:
        series = r.data.series
        if not series.worker_t:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for kv in series.worker_kv:
            ax.plot(series.worker_t, kv, linewidth=0.6, alpha=0.5)
        ax.plot(series.t, series.kv_utilisation, color="black", linewidth=1.5, label="fleet")
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel("KV blocks in use / total")
        ax.set_ylim(0, 1.02)
        ax.legend()
        ax.set_title(f"KV utilisation per worker — {r.report.policy}")
        written.append(_save(fig, out / f"kv_per_worker_{r.report.policy}.png", plt))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    horizon = max((r.report.simulated_s + r.data.first_arrival_s for r in runs), default=1.0)
    bins = max(10, min(200, int(horizon / 10)))
    for r in runs:
        ax.hist(
            list(r.data.shed_times), bins=bins, range=(0, horizon), histtype="step", label=r.report.policy
        )
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel(f"requests shed per {horizon / bins:.0f} s")
    ax.legend()
    ax.set_title("shed rate over time")
    written.append(_save(fig, out / "shed_rate.png", plt))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot(r.data.series.t, r.data.series.batch, linewidth=0.8, label=r.report.policy)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("mean running batch per worker")
    ax.legend()
    ax.set_title("batch size over time")
    written.append(_save(fig, out / "batch.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
