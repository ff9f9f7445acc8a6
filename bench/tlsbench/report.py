"""Medians across repeats, ratios against HAProxy + Kamailio of the same configuration and the
same repeat, Markdown and PNG: one section (table, CPU and memory splits) per configuration."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlsbench.names import (
    CONFIG_TEXTS,
    CONFIG_TITLES,
    CONFIGS,
    baseline_of,
    config_of,
    label,
    parse_key,
    system_key,
)

X = "\u00d7"  # the multiplication sign of "0.85x"
FRONTEND = "frontend_cpu_us"  # a field computed from cpu_us_by, see field_value
FRONT_ENDS = ("daemon", "haproxy")  # the components in front of Kamailio


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
        Metric("w1_front", "w1", FRONTEND, "W1 front-end CPU per transaction", "µs", "lower"),
        Metric("w1_cs", "w1", "cs_per_tx", "W1 context switches per transaction", "", "lower",
               False),
        Metric("w2_rate", "w2", "rate", "W2 new TLS connections/s", "conn/s", "higher"),
        Metric("w2_cap", "w2", "capacity", "W2 new connections per CPU-second of the system",
               "conn/s", "higher"),
        Metric("w2_p50", "w2", "p50_ms", "W2 connect-to-200 p50", "ms", "lower", False),
        Metric("w2_p99", "w2", "p99_ms", "W2 connect-to-200 p99", "ms", "lower", False),
        Metric("w2_cpu", "w2", "cpu_us", "W2 CPU per connection", "µs", "lower", False),
        Metric("w2_front", "w2", FRONTEND, "W2 front-end CPU per connection", "µs", "lower"),
    ]
    for n in idle_sizes:
        out.append(Metric(f"w3_{n}_pss", f"w3-{n}", "kib_per_conn",
                          f"W3 memory per idle connection, N={n:,}", "KiB", "lower"))
        out.append(Metric(f"w3_{n}_shm", f"w3-{n}", "shm_kib_per_conn",
                          f"W3 Kamailio shm per idle connection, N={n:,}", "KiB", "lower", False))
    return out


def field_value(record: dict[str, Any], field: str) -> float | None:
    """A number of a record; FRONTEND is the CPU of what sits in front of Kamailio (the
    daemon's processes, or HAProxy's), None where nothing does (Kamailio tls.so)."""
    if field == FRONTEND:
        parts = [v for k, v in record.get("cpu_us_by", {}).items() if k in FRONT_ENDS]
        return sum(parts) if parts else None
    v = record.get(field)
    return float(v) if isinstance(v, int | float) else None


def _value(records: list[dict[str, Any]], repeat: int, system: str, m: Metric) -> float | None:
    for r in records:
        if r["repeat"] == repeat and r["system"] == system and r["workload"] == m.workload:
            return field_value(r, m.field)
    return None


def paired_ratios(records: list[dict[str, Any]], a: str, b: str, m: Metric,
                  repeats: int) -> list[float]:
    """a / b in each repeat where both were measured (paired: a slow minute moves both)."""
    out = []
    for rep in range(repeats):
        va, vb = _value(records, rep, a, m), _value(records, rep, b, m)
        if va is not None and vb:
            out.append(va / vb)
    return out


def summarize(records: list[dict[str, Any]], systems: list[str], metrics: list[Metric],
              repeats: int) -> dict[str, dict[str, dict[str, Any]]]:
    """{metric id: {system: {"median", "ratio", "values", "ratios"}}}, ratios against the
    baseline of the system's configuration."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in metrics:
        row: dict[str, dict[str, Any]] = {}
        for s in systems:
            values = [v for rep in range(repeats)
                      if (v := _value(records, rep, s, m)) is not None]
            ratios = paired_ratios(records, s, baseline_of(s), m, repeats)
            row[s] = {
                "values": values,
                "ratios": ratios,
                "median": statistics.median(values) if values else None,
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


def _ratios(ratios: list[float]) -> str:
    return ", ".join(f"{r:.2f}{X}" for r in ratios)


def _pair(records: list[dict[str, Any]], a: str, b: str, metrics: list[Metric], repeats: int,
          heading: str) -> list[str]:
    """Lines of a / b per chart metric: the median of the per-repeat ratios, and each."""
    lines = []
    for m in metrics:
        ratios = paired_ratios(records, a, b, m, repeats)
        if m.chart and ratios:
            lines.append(f"- {m.label} ({m.better} is better): "
                         f"{statistics.median(ratios):.2f}{X} (per repeat: {_ratios(ratios)})")
    return ["", heading, "", *lines] if lines else []


def _comparisons(records: list[dict[str, Any]], systems: list[str], metrics: list[Metric],
                 repeats: int) -> list[str]:
    """This tree's tlsbridge against each tlsbridge@REV (A/B), and tlsbridge with N workers
    against tlsbridge-1w (scaling), in the configuration of `systems`."""
    lines: list[str] = []
    for key in systems:
        base, rev, config = parse_key(key)
        current = system_key(base, config)
        if rev and current in systems:
            lines += _pair(records, current, key, metrics, repeats,
                           f"A/B, {label(current)} against {label(key)} (this tree / that "
                           "commit, paired by repeat):")
    many, one = (system_key(b, config_of(systems[0])) for b in ("tlsbridge", "tlsbridge-1w"))
    if {many, one} <= set(systems):
        lines += _pair(records, many, one, metrics, repeats,
                       f"Scaling, {label(many)} against {label(one)} (paired by repeat):")
    return lines


def _table(systems: list[str], metrics: list[Metric],
           summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    lines = ["| metric | better | " + " | ".join(label(s) for s in systems) + " |",
             "|---|---|" + "---|" * len(systems)]
    for m in metrics:
        row = summary[m.id]
        if all(row[s]["median"] is None for s in systems):
            continue
        unit = f" ({m.unit})" if m.unit else ""
        cells = []
        for s in systems:
            med, ratio = row[s]["median"], row[s]["ratio"]
            cells.append(_fmt(med) + (f" ({ratio:.2f}{X})" if ratio is not None else ""))
        lines.append(f"| {m.label}{unit} | {m.better} | " + " | ".join(cells) + " |")
    return lines


def _splits(records: list[dict[str, Any]], systems: list[str]) -> list[str]:
    lines = ["", "CPU per transaction by component (µs, medians; share in the kernel in "
             "brackets), and the CPU use of the system and of the generator in the window:", ""]
    for s in systems:
        for w in ("w1", "w2"):
            split = _cpu_split(records, s, w)
            if split:
                lines.append(f"- {label(s)}, {w.upper()}: {split}; "
                             f"utilization: system {_median_of(records, s, w, 'sut_cpu_util')}, "
                             f"generator {_median_of(records, s, w, 'gen_cpu_util')}")
    idle = sorted({r["workload"] for r in records if r["workload"].startswith("w3-")},
                  key=lambda w: int(w[3:]))
    if idle:
        lines += ["", "Memory per idle connection by component (KiB of PSS, medians):", ""]
        for s in systems:
            for w in idle:
                split = _split(records, s, w, "kib_per_conn_by")
                if split:
                    lines.append(f"- {label(s)}, {w.upper()}: {split}")
    return lines


def by_config(systems: list[str]) -> dict[str, list[str]]:
    """The systems of each configuration that ran, in the order given (the baseline first)."""
    groups = {c: [s for s in systems if config_of(s) == c] for c in CONFIGS}
    return {c: group for c, group in groups.items() if group}


def markdown(*, title: str, meta: dict[str, str], records: list[dict[str, Any]],
             systems: list[str], metrics: list[Metric],
             summary: dict[str, dict[str, dict[str, Any]]], chart: str | None,
             notes: list[str], repeats: int) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Each cell: median across repeats, and in brackets the median of the "
              "per-repeat ratios against HAProxy + Kamailio of the same configuration and the "
              "same repeat (1.00" + X + " = parity; above 1 is better for *higher* rows, worse "
              "for *lower* rows). Front end: the daemon's processes for tlsbridge, HAProxy's "
              "process for HAProxy."]
    for config, group in by_config(systems).items():
        lines += ["", f"## {CONFIG_TITLES[config]}", "", CONFIG_TEXTS[config], ""]
        lines += _table(group, metrics, summary)
        lines += _splits(records, group)
        lines += _comparisons(records, group, metrics, repeats)
    if chart:
        lines += ["", f"![ratios vs HAProxy + Kamailio]({chart})"]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", "Per-repeat values (and ratios against the baseline of the same repeat):", "",
              "| metric | system | values | ratios |", "|---|---|---|---|"]
    for m in metrics:
        for s in systems:
            cell = summary[m.id][s]
            if cell["values"]:
                lines.append(f"| {m.id} | {s} | {', '.join(_fmt(v) for v in cell['values'])} | "
                             f"{_ratios(cell['ratios'])} |")
    return "\n".join(lines) + "\n"


def _bars(ax: Any, config: str, others: list[str], shown: list[Metric],
          summary: dict[str, dict[str, dict[str, Any]]]) -> None:
    height = 0.8 / len(others)
    colors = ["#d62728", "#1f77b4", "#ff9896", "#9467bd", "#2ca02c"]
    for i, s in enumerate(others):
        ys = [k + i * height for k in range(len(shown))]
        vals = [summary[m.id][s]["ratio"] or 0.0 for m in shown]
        bars = ax.barh(ys, vals, height=height, label=label(s), color=colors[i % len(colors)])
        for bar, v in zip(bars, vals, strict=True):
            ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{v:.2f}{X}",
                    va="center", fontsize=8)
    ax.set_yticks([k + height * (len(others) - 1) / 2 for k in range(len(shown))])
    ax.set_yticklabels([f"{m.label} ({m.better} is better)" for m in shown], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_title(f"{CONFIG_TITLES[config]}: ratio vs HAProxy + Kamailio of the same "
                 "configuration (median of the per-repeat ratios)", fontsize=9)
    top = max((v for m in shown for s in others if (v := summary[m.id][s]["ratio"])),
              default=1.0)
    ax.set_xlim(0, max(top, 1.0) * 1.15)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.05), ncol=min(len(others), 3),
              fontsize=8)


def chart(path: Path, *, title: str, systems: list[str], metrics: list[Metric],
          summary: dict[str, dict[str, dict[str, Any]]]) -> bool:
    """One panel of ratio bars per configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = []
    for config, group in by_config(systems).items():
        others = [s for s in group if s != baseline_of(s)]
        shown = [m for m in metrics if m.chart and any(
            summary[m.id][s]["ratio"] is not None for s in others)]
        if shown and others:
            panels.append((config, others, shown))
    if not panels:
        return False
    heights = [0.45 * len(shown) * len(others) + 1.6 for _, others, shown in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (config, others, shown) in zip(axes[:, 0], panels, strict=True):
        _bars(ax, config, others, shown, summary)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
