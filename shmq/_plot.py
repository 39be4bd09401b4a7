"""The ``shmq bench --plot`` picture: the latency percentile spectrum and throughput over time.

The spectrum is HdrHistogram's plot: latency against percentile on a log-scaled axis of
1 / (1 - p), so 50 %, 90 %, 99 %, 99.9 %, 99.99 % are evenly spaced and the tail, where stalls
show, gets as much room as the median. One curve per implementation (and size). matplotlib is an
optional extra (``pip install 'shmq[plot]'``), imported only here, with the Agg backend (no
display needed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shmq.bench import BenchReport

_TICKS = [(2, "50%"), (10, "90%"), (100, "99%"), (1_000, "99.9%"), (10_000, "99.99%"), (100_000, "99.999%")]


def require() -> Any:
    """matplotlib.pyplot with the Agg backend; ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'shmq[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write(report: BenchReport, path: str) -> None:
    """Write the report's plot as a PNG to `path`."""
    plt = require()
    config = report.config
    curves = [r for r in report.results if r.ok and r.latency is not None and r.latency.count]
    timelines = [r for r in report.results if r.ok and r.timeline]
    multi_size = len(config.sizes) > 1

    def label(r: Any) -> str:
        return f"{r.impl} {r.size} B" if multi_size else r.impl

    if curves:
        fig, (spectrum, rate) = plt.subplots(
            2, 1, figsize=(9, 8.5), gridspec_kw={"height_ratios": [2, 1]}, constrained_layout=True
        )
    else:
        fig, rate = plt.subplots(1, 1, figsize=(9, 5), constrained_layout=True)
        spectrum = None
    fig.suptitle(f"shmq bench {config.scenario}", fontsize=12)
    if spectrum is not None:
        top = 10.0
        for r in curves:
            assert r.latency is not None
            points = [(p, ns) for p, ns in r.latency.spectrum if p < 100.0]
            xs = [1.0 / (1.0 - p / 100.0) for p, _ in points]
            ys = [max(ns, 1) / 1000.0 for _, ns in points]
            top = max(top, xs[-1] if xs else top)
            spectrum.plot(xs, ys, label=f"{label(r)} (max {r.latency.max / 1000:,.1f} µs)", linewidth=1.6)
        spectrum.set_xscale("log")
        spectrum.set_yscale("log")
        ticks = [(x, t) for x, t in _TICKS if x <= top * 1.01] or _TICKS[:2]
        spectrum.set_xticks([x for x, _ in ticks], [t for _, t in ticks])
        spectrum.set_xticks([], minor=True)
        spectrum.set_xlim(1, max(top, ticks[-1][0]))
        spectrum.set_xlabel("percentile")
        spectrum.set_ylabel("latency (µs)")
        spectrum.set_title(_wrap(config.describe()), fontsize=9)
        spectrum.grid(True, which="both", alpha=0.3)
        spectrum.legend(fontsize=8)
    for r in timelines:
        rate.plot([t for t, _ in r.timeline], [v for _, v in r.timeline], label=label(r), linewidth=1.2)
    rate.set_xlabel("seconds since the first measured send")
    rate.set_ylabel("messages received / s" + (" (all subscribers)" if config.scenario == "fanout" else ""))
    if not curves:
        rate.set_title(_wrap(config.describe()), fontsize=9)
    rate.set_ylim(bottom=0)
    rate.grid(True, alpha=0.3)
    if timelines:
        rate.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _wrap(text: str, width: int = 110) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
