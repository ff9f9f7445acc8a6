"""Medians across repeats, ratios against HAProxy + Kamailio of the same run, Markdown and PNG."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = "haproxy"
X = "\u00d7"  # the multiplication sign of "0.85x"


@dataclass(frozen=True)
class Metric:
    id: str
    workload: str
    field: str
    label: str
    unit: str
    better: str  # "higher" | "lower"
    chart: bool = True


def metrics_for(idle_sizes: list[int]) -> list[Metric]:
    out = [
        Metric("w1_rate", "w1", "rate", "W1 transactions/s", "tx/s", "higher"),
        Metric("w1_p50", "w1", "p50_ms", "W1 latency p50", "ms", "lower", False),
        Metric("w1_p99", "w1", "p99_ms", "W1 latency p99", "ms", "lower", False),
        Metric("w1_cap", "w1", "capacity", "W1 transactions per CPU-second of the system",
               "tx/s", "higher"),
        Metric("w1_cpu", "w1", "cpu_us", "W1 CPU per transaction", "µs", "lower", False),
        Metric("w1_cs", "w1", "cs_per_tx", "W1 context switches per transaction", "", "lower",
               False),
        Metric("w2_rate", "w2", "rate", "W2 new TLS connections/s", "conn/s", "higher"),
        Metric("w2_cap", "w2", "capacity", "W2 new connections per CPU-second of the system",
               "conn/s", "higher"),
        Metric("w2_p50", "w2", "p50_ms", "W2 connect-to-200 p50", "ms", "lower", False),
        Metric("w2_p99", "w2", "p99_ms", "W2 connect-to-200 p99", "ms", "lower", False),
        Metric("w2_cpu", "w2", "cpu_us", "W2 CPU per connection", "µs", "lower", False),
    ]
    for n in idle_sizes:
        out.append(Metric(f"w3_{n}_pss", f"w3-{n}", "kib_per_conn",
                          f"W3 memory per idle connection, N={n:,}", "KiB", "lower"))
        out.append(Metric(f"w3_{n}_shm", f"w3-{n}", "shm_kib_per_conn",
                          f"W3 Kamailio shm per idle connection, N={n:,}", "KiB", "lower", False))
    return out


def _value(records: list[dict[str, Any]], repeat: int, system: str, m: Metric) -> float | None:
    for r in records:
        if r["repeat"] == repeat and r["system"] == system and r["workload"] == m.workload:
            v = r.get(m.field)
            return float(v) if isinstance(v, int | float) else None
    return None


def summarize(records: list[dict[str, Any]], systems: list[str], metrics: list[Metric],
              repeats: int) -> dict[str, dict[str, dict[str, Any]]]:
    """{metric id: {system: {"median", "ratio", "values", "ratios"}}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in metrics:
        row: dict[str, dict[str, Any]] = {}
        for s in systems:
            values, ratios = [], []
            for rep in range(repeats):
                v = _value(records, rep, s, m)
                if v is None:
                    continue
                values.append(v)
                base = _value(records, rep, BASELINE, m)
                if base:
                    ratios.append(v / base)
            row[s] = {
                "values": values,
                "ratios": ratios,
                "median": statistics.median(values) if values else None,
                # paired: each repeat's ratio against the baseline of the same repeat
                "ratio": statistics.median(ratios) if ratios else None,
            }
        out[m.id] = row
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _medians(records: list[dict[str, Any]], system: str, workload: str,
             key: str) -> dict[str, float]:
    parts: dict[str, list[float]] = {}
    for r in records:
        if r["system"] == system and r["workload"] == workload and key in r:
            for k, v in r[key].items():
                parts.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in sorted(parts.items())}


def _split(records: list[dict[str, Any]], system: str, workload: str, key: str) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in _medians(records, system, workload,
                                                           key).items())


def _cpu_split(records: list[dict[str, Any]], system: str, workload: str) -> str:
    cpu = _medians(records, system, workload, "cpu_us_by")
    kernel = _medians(records, system, workload, "sys_share_by")
    return ", ".join(f"{k} {v:.0f}" + (f" ({kernel[k]:.0%} kernel)" if k in kernel else "")
                     for k, v in cpu.items())


def _median_of(records: list[dict[str, Any]], system: str, workload: str, key: str) -> str:
    vals = [r[key] for r in records
            if r["system"] == system and r["workload"] == workload and key in r]
    return f"{statistics.median(vals):.2f}" if vals else "-"


def _scaling(records: list[dict[str, Any]], systems: list[str],
             labels: dict[str, str]) -> list[str]:
    """tlsbridge with N workers against tlsbridge-1w, paired by repeat."""
    if not {"tlsbridge", "tlsbridge-1w"} <= set(systems):
        return []
    lines = []
    for workload, what in (("w1", "W1 transactions/s"), ("w2", "W2 new TLS connections/s")):
        rate = Metric(f"{workload}_rate", workload, "rate", what, "", "higher")
        ratios = []
        for rep in sorted({r["repeat"] for r in records}):
            many = _value(records, rep, "tlsbridge", rate)
            one = _value(records, rep, "tlsbridge-1w", rate)
            if many and one:
                ratios.append(many / one)
        if ratios:
            lines.append(f"- {what}: {statistics.median(ratios):.2f}{X}")
    if not lines:
        return []
    return ["", f"Scaling, {labels['tlsbridge']} against {labels['tlsbridge-1w']} (median of "
            "the per-repeat ratios):", "", *lines]


def markdown(*, title: str, meta: dict[str, str], records: list[dict[str, Any]],
             systems: list[str], labels: dict[str, str], metrics: list[Metric],
             summary: dict[str, dict[str, dict[str, Any]]], chart: str | None,
             notes: list[str]) -> str:
    cols = sorted(systems, key=lambda s: s != BASELINE)  # the baseline first, if it ran
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Each cell: median across repeats, and in brackets the median of the "
              "per-repeat ratios against HAProxy + Kamailio of the same repeat (1.00" + X + " = "
              "parity; above 1 is better for *higher* rows, worse for *lower* rows).", ""]
    lines.append("| metric | better | " + " | ".join(labels[s] for s in cols) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for m in metrics:
        row = summary[m.id]
        if all(row[s]["median"] is None for s in cols):
            continue
        unit = f" ({m.unit})" if m.unit else ""
        cells = []
        for s in cols:
            med, ratio = row[s]["median"], row[s]["ratio"]
            cells.append(_fmt(med) + (f" ({ratio:.2f}{X})" if ratio is not None else ""))
        lines.append(f"| {m.label}{unit} | {m.better} | " + " | ".join(cells) + " |")
    lines += ["", "CPU per transaction by component (µs, medians; share in the kernel in "
              "brackets), and the CPU use of the system and of the generator in the window:", ""]
    for s in cols:
        for w in ("w1", "w2"):
            split = _cpu_split(records, s, w)
            if split:
                lines.append(f"- {labels[s]}, {w.upper()}: {split}; "
                             f"utilization: system {_median_of(records, s, w, 'sut_cpu_util')}, "
                             f"generator {_median_of(records, s, w, 'gen_cpu_util')}")
    idle = sorted({r["workload"] for r in records if r["workload"].startswith("w3-")},
                  key=lambda w: int(w[3:]))
    if idle:
        lines += ["", "Memory per idle connection by component (KiB of PSS, medians):", ""]
        for s in cols:
            for w in idle:
                split = _split(records, s, w, "kib_per_conn_by")
                if split:
                    lines.append(f"- {labels[s]}, {w.upper()}: {split}")
    lines += _scaling(records, systems, labels)
    if chart:
        lines += ["", f"![ratios vs HAProxy + Kamailio]({chart})"]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", "Per-repeat values:", ""]
    lines.append("| metric | system | values |")
    lines.append("|---|---|---|")
    for m in metrics:
        for s in cols:
            vals = summary[m.id][s]["values"]
            if vals:
                lines.append(f"| {m.id} | {s} | {', '.join(_fmt(v) for v in vals)} |")
    return "\n".join(lines) + "\n"


def chart(path: Path, *, title: str, systems: list[str], labels: dict[str, str],
          metrics: list[Metric], summary: dict[str, dict[str, dict[str, Any]]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [m for m in metrics if m.chart and any(
        summary[m.id][s]["ratio"] is not None for s in systems if s != BASELINE)]
    others = [s for s in systems if s != BASELINE]
    if not shown or not others:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(shown) * len(others) + 1.8))
    height = 0.8 / len(others)
    colors = ["#d62728", "#1f77b4", "#ff9896", "#9467bd"]
    for i, s in enumerate(others):
        ys = [k + i * height for k in range(len(shown))]
        vals = [summary[m.id][s]["ratio"] or 0.0 for m in shown]
        bars = ax.barh(ys, vals, height=height, label=labels[s], color=colors[i % len(colors)])
        for bar, v in zip(bars, vals, strict=True):
            ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{v:.2f}{X}",
                    va="center", fontsize=8)
    ax.set_yticks([k + height * (len(others) - 1) / 2 for k in range(len(shown))])
    ax.set_yticklabels([f"{m.label} ({m.better} is better)" for m in shown], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("ratio vs HAProxy + Kamailio (same run, median of repeats)")
    ax.set_title(title, fontsize=10)
    top = max((v for m in shown for s in others if (v := summary[m.id][s]["ratio"])),
              default=1.0)
    ax.set_xlim(0, max(top, 1.0) * 1.15)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=len(others), fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
