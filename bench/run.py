#!/usr/bin/env python3
"""tlsbridge benchmark: tlsbridge + Kamailio vs HAProxy + Kamailio (vs Kamailio's own TLS).

    .venv/bin/python bench/run.py            full run: both configurations, 3 repeats,
                                             ~18 minutes, bench/results/
    .venv/bin/python bench/run.py --rev 42b2a93   the same with tlsbridge as of 42b2a93 (A/B)
    .venv/bin/python bench/run.py --quick    smoke run (1 repeat, 3 s, W3 with 500)
    make bench BENCH_ARGS='--repeats 5'

See bench/README.md for what each workload measures and how to read the table.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from tlsbench import names, report, revs, setup  # noqa: E402
from tlsbench.procs import Proc, raise_nofile, stop_all, wait_until  # noqa: E402
from tlsbench.systems import Settings, System, Tree, make_system, running  # noqa: E402
from tlsbench.workloads import run_idle, run_rate, wait_time_wait  # noqa: E402

log = setup.log
DEFAULT_SYSTEMS = "haproxy,tlsbridge"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 repeat, 3 s windows, W3 with 500 connections")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="W1/W2 measured seconds (10; quick 3)")
    p.add_argument("--warmup", type=float, help="W1/W2 warm-up seconds (2; quick 1)")
    p.add_argument("--conns", type=int, default=50, help="W1 persistent connections")
    p.add_argument("--concurrency", type=int, default=16,
                   help="W2 connections being set up at once")
    p.add_argument("--idle", help="W3 idle connection counts (2000,9000; quick 500)")
    p.add_argument("--children", type=int, default=4,
                   help="Kamailio children and tcp_children, the same for every system")
    p.add_argument("--workers", type=int, default=1,
                   help="N > 1: unpinned run with `[daemon] workers = N` and HAProxy "
                        "nbthread N (multi-worker scaling)")
    p.add_argument("--systems", default=DEFAULT_SYSTEMS,
                   help=f"comma-separated, from {', '.join(names.BASES)}, and tlsbridge@REV "
                        f"(tlsbridge as of git commit REV) (default {DEFAULT_SYSTEMS}; haproxy "
                        "is the baseline of every ratio); each runs in every --config")
    p.add_argument("--config", choices=(*names.CONFIGS, "both"), default="both",
                   help="reference: Kamailio runs kamailio-cfg/routing.py (reads the TLS "
                        "facts); alone: bench/kamailio/routing_nofacts.py (bridge alone, no "
                        "facts); both (default)")
    p.add_argument("--rev", action="append", default=[], metavar="REV",
                   help="also run tlsbridge@REV: daemon, KEMI module, kamailio.cfg and scripts "
                        "as of git commit REV, built once into bench/build/rev-<sha>/ "
                        "(repeatable)")
    p.add_argument("--workloads", default="w1,w2,w3", help="comma-separated subset of w1,w2,w3")
    p.add_argument("--daemon-log-level", default="warning",
                   choices=("debug", "info", "warning", "error"),
                   help="the daemon's log level (default warning: no line per connection, "
                        "like the other systems)")
    p.add_argument("--verify", action="store_true",
                   help="the generator verifies the server certificate (client CPU only)")
    p.add_argument("--profile", nargs="?", const="w1", choices=("w1", "w2"),
                   help="instead of the comparison: py-spy on the daemon under W1 (or W2)")
    p.add_argument("--max-minutes", type=float, default=45.0,
                   help="stop starting new runs after this long (results so far are kept)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default bench/results; --quick: bench/build/quick)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get/pip install")
    p.add_argument("--report", type=Path, metavar="RESULTS.json",
                   help="only write the Markdown and PNG again from a results-*.json")
    args = p.parse_args(argv)
    defaults = (1, 3.0, 1.0, "500") if args.quick else (3, 10.0, 2.0, "2000,9000")
    for name, value in zip(("repeats", "duration", "warmup", "idle"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.idle_sizes = [int(x) for x in args.idle.split(",") if x.strip()]
    configs = names.CONFIGS if args.config == "both" else (args.config,)
    args.system_keys = names.order([names.system_key(base, config, rev)
                                    for base, rev in _bases(p, args) for config in configs])
    args.workload_keys = [w for w in ("w1", "w2", "w3") if w in args.workloads.split(",")]
    if args.out is None:
        args.out = BENCH / "build" / "quick" if args.quick else BENCH / "results"
    return args


def _bases(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, str]]:
    """--systems and --rev as (base system, short commit id or "" for this tree)."""
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    out = []
    for name in wanted + [f"tlsbridge@{rev}" for rev in args.rev]:
        base, at, rev = name.partition("@")
        if base not in names.BASES:
            p.error(f"unknown system {base!r} (known: {', '.join(names.BASES)}, "
                    "tlsbridge@REV; the configuration is --config)")
        if at and not base.startswith("tlsbridge"):
            p.error(f"{name}: only tlsbridge systems run an older commit")
        if at:
            try:
                rev = revs.resolve(rev)[0]
            except ValueError as exc:
                p.error(f"{name}: {exc}")
        out.append((base, rev))
    return out


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import ssl

    return {
        "kamailio": first_line(["kamailio", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "python": platform.python_version() + ", " + ssl.OPENSSL_VERSION,
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "kernel": platform.release(),
    }


class Bench:
    def __init__(self, args: argparse.Namespace, settings: Settings, gen: Path, runs: Path,
                 trees: dict[str, Tree]):
        self.args, self.settings, self.gen, self.runs = args, settings, gen, runs
        self.trees = trees
        self.records: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.deadline = time.monotonic() + args.max_minutes * 60
        self.gen_cpus = {1} if settings.pin else None

    def _session(self, rep: int, key: str, phase: str, body: Any) -> None:
        """Start `key`, run `body`, stop it; a failed session (a crash) is tried once more."""
        for attempt in (1, 2):
            if time.monotonic() > self.deadline:
                self.notes.append(f"repeat {rep + 1}: {key} {phase} skipped (--max-minutes)")
                return
            workdir = self.runs / (f"r{rep + 1}-{phase}-{key}" + ("" if attempt == 1 else "-retry"))
            mark = len(self.records)
            t = time.monotonic()
            try:
                with running(make_system(key, self.settings, workdir,
                                         self.trees)) as system:
                    body(system, workdir)
                    crash = system.crash_report()
                    if crash:
                        raise RuntimeError(f"the system crashed during the run: {crash}")
                log(f"  {key} {phase}: {time.monotonic() - t:.0f} s")
                return
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                del self.records[mark:]
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                msg = f"repeat {rep + 1}: {key} {phase} failed (attempt {attempt}): {first}"
                log(msg)
                traceback.print_exc()
                self.notes.append(f"{msg} (logs in {workdir.relative_to(BENCH)})")
                if attempt == 2:
                    self.records.append({"repeat": rep, "system": key, "workload": phase,
                                         "error": first})

    def _add(self, rep: int, key: str, workload: str, data: dict[str, Any]) -> None:
        self.records.append({"repeat": rep, "system": key, "workload": workload, **data})
        if data.get("errors"):
            self.notes.append(f"repeat {rep + 1}: {key} {workload}: {data['errors']} errors, "
                              f"last: {data.get('last_error', '')}")
        elif data.get("opened", 0) < data.get("requested", 0) or (
                "alive_at_release" in data and data["alive_at_release"] < data["opened"]):
            self.notes.append(f"repeat {rep + 1}: {key} {workload}: {data['opened']} of "
                              f"{data['requested']} opened, {data['alive_at_release']} alive "
                              f"at release; last: {data.get('last_error', '')}")
        if (self.settings.pin and data.get("gen_cpu_util", 0) > 0.85
                and data.get("sut_cpu_util", 1) < 0.9):
            self.notes.append(
                f"repeat {rep + 1}: {key} {workload}: the generator's core was busier "
                f"({data['gen_cpu_util']:.2f}) than the system's ({data['sut_cpu_util']:.2f}): "
                "its rate may be the generator's limit; the CPU-normalized rows are not")
        brief = {k: round(v, 2) if isinstance(v, float) else v for k, v in data.items()
                 if k in ("rate", "p50_ms", "p99_ms", "cpu_us", "kib_per_conn",
                          "shm_kib_per_conn", "errors", "opened", "sut_processes")}
        log(f"    {key} {workload}: {brief}")

    def rates(self, rep: int, key: str) -> None:
        a = self.args

        def body(system: System, workdir: Path) -> None:
            if "w1" in a.workload_keys:
                data = run_rate(self.gen, system, "w1", conns=a.conns, concurrency=1,
                                duration=a.duration, warmup=a.warmup,
                                log=workdir / "gen-w1.log", gen_cpus=self.gen_cpus)
                self._add(rep, key, "w1", data)
            if "w2" in a.workload_keys:
                tw = wait_time_wait()
                data = run_rate(self.gen, system, "w2", conns=1, concurrency=a.concurrency,
                                duration=a.duration, warmup=a.warmup,
                                log=workdir / "gen-w2.log", gen_cpus=self.gen_cpus)
                data["time_wait_before"] = tw
                self._add(rep, key, "w2", data)
            daemon = system.component_pids().get("daemon")
            workers = system.s.workers  # tlsbridge-1w runs one whatever --workers says
            if daemon is not None and workers > 1 and len(daemon) < workers:
                self.notes.append(f"the daemon ran {len(daemon)} process(es) with workers = "
                                  f"{workers}: the key is not supported yet")

        self._session(rep, key, "rates", body)

    def idle(self, rep: int, key: str, n: int) -> None:
        def body(system: System, workdir: Path) -> None:
            # The daemon binds each hairpin's source port before connecting, so TIME_WAIT
            # sockets left by W2 take ports from the range it needs (README, W3).
            wait_time_wait(limit=max(3000, 24000 - 2 * n))
            data = run_idle(self.gen, system, n, log=workdir / f"gen-w3-{n}.log",
                            gen_cpus=self.gen_cpus)
            self._add(rep, key, f"w3-{n}", data)

        self._session(rep, key, f"w3-{n}", body)

    def run(self) -> None:
        keys = self.args.system_keys
        for rep in range(self.args.repeats):
            # Interleaved, and rotated each repeat so that no system always goes first.
            order = keys[rep % len(keys):] + keys[:rep % len(keys)]
            log(f"repeat {rep + 1}/{self.args.repeats}: {', '.join(order)}")
            if {"w1", "w2"} & set(self.args.workload_keys):
                for key in order:
                    self.rates(rep, key)
            if "w3" in self.args.workload_keys:
                for n in self.args.idle_sizes:
                    for key in order:
                        self.idle(rep, key, n)


def profile(args: argparse.Namespace, settings: Settings, gen: Path, runs: Path, out: Path,
            stamp: str) -> None:
    """py-spy on the daemon under W1 or W2 (sampling from the generator's core)."""
    pyspy = Path(sys.executable).parent / "py-spy"
    if not pyspy.exists() and not args.no_install:
        setup.ensure_pip_binary(pyspy, "py-spy")
    workdir = runs / "profile"
    collapsed = workdir / "collapsed.txt"
    cpus = {1} if settings.pin else None
    with running(make_system("tlsbridge", settings, workdir, {})) as system:
        daemon = system.procs["daemon"].pid
        seconds = int(args.warmup + args.duration + 1)
        spy = Proc("py-spy", [str(pyspy), "record", "-p", str(daemon), "-r", "250",
                              "-d", str(seconds), "-f", "raw", "-o", str(collapsed),
                              "--nonblocking"], workdir / "py-spy.log", cpus=cpus)
        mode = args.profile
        data = run_rate(gen, system, mode, conns=args.conns if mode == "w1" else 1,
                        concurrency=1 if mode == "w1" else args.concurrency,
                        duration=args.duration, warmup=args.warmup,
                        log=workdir / f"gen-{mode}.log", gen_cpus=cpus)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not spy.alive(), 30, "py-spy")
        spy.stop()
    text = summarize_collapsed(collapsed)
    path = out / f"profile-{args.profile}-{stamp}.txt"
    brief = {k: data[k] for k in ("rate", "cpu_us", "cpu_us_by", "sys_share_by") if k in data}
    path.write_text(f"{args.profile.upper()} with py-spy sampling the daemon at 250 Hz: "
                    f"{json.dumps(brief)}\n\n{text}\n")
    log(f"profile: {path}")
    print(text)


def summarize_collapsed(path: Path, top: int = 25) -> str:
    """Top functions by self and inclusive samples from py-spy's collapsed stacks."""
    selfc: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        return f"no profile: {exc}"
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        selfc[frames[-1]] = selfc.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        return "no samples"
    out = [f"{total} samples (the daemon's Python thread while not idle)", "", "self:"]
    for f, n in sorted(selfc.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * n / total:5.1f}%  {f}")
    out += ["", "inclusive:"]
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * n / total:5.1f}%  {f}")
    return "\n".join(out)


def _revs_of(keys: list[str]) -> list[str]:
    return list(dict.fromkeys(rev for key in keys if (rev := names.parse_key(key)[1])))


def rerender(path: Path) -> int:
    """--report: the Markdown and PNG of an earlier run, from its JSON."""
    data = json.loads(path.read_text())
    records, meta = data["records"], data["meta"]
    args = argparse.Namespace(
        workers=data.get("workers", 1),
        idle_sizes=sorted({int(r["workload"][3:]) for r in records
                           if r["workload"].startswith("w3-")}),
        system_keys=names.order([r["system"] for r in records]),
        repeats=1 + max(r["repeat"] for r in records),
    )
    bench = argparse.Namespace(records=records, notes=data.get("notes", []))
    stamp = path.stem.removeprefix("results-").removesuffix(f"-workers{args.workers}")
    write_report(args, bench, meta, path.parent, stamp, latest=False)
    return 0


def write_report(args: argparse.Namespace, bench: Any, meta: dict[str, str], out: Path,
                 stamp: str, latest: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-workers{args.workers}" if args.workers > 1 else ""
    base = out / f"results-{stamp}{suffix}"
    metrics = report.metrics_for(args.idle_sizes)
    systems = args.system_keys
    summary = report.summarize(bench.records, systems, metrics, args.repeats)
    title = f"tlsbridge benchmark {stamp}{suffix}"
    png = base.with_suffix(".png")
    has_chart = report.chart(png, title=title, systems=systems, metrics=metrics,
                             summary=summary)
    md = report.markdown(title=title, meta=meta, records=bench.records, systems=systems,
                         metrics=metrics, summary=summary,
                         chart=png.name if has_chart else None, notes=bench.notes,
                         repeats=args.repeats)
    base.with_suffix(".md").write_text(md)
    base.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "workers": args.workers, "records": bench.records, "summary": summary,
         "notes": bench.notes}, indent=1, default=str))
    if latest:
        (out / f"latest{suffix}.md").write_text(md)
    print(md)
    log(f"results: {base.with_suffix('.md')}")
    return base.with_suffix(".md")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return rerender(args.report)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        # SIGINT too: a shell's background job starts with it ignored
        signal.signal(sig, _on_signal)
    atexit.register(stop_all)
    if (os.cpu_count() or 1) < 2 and args.workers <= 1:
        log("fewer than 2 CPUs: running unpinned")
    build = BENCH / "build"
    if not args.no_install:
        setup.ensure_apt()
        setup.ensure_pip("matplotlib", "matplotlib")
    gen = setup.build_generator(build)
    certs = setup.make_certs(build)
    nofile = raise_nofile()
    pin = args.workers <= 1 and (os.cpu_count() or 1) >= 2
    settings = Settings(build=build, certs=certs, children=args.children, workers=args.workers,
                        pin=pin, daemon_log_level=args.daemon_log_level,
                        verify=args.verify)
    if pin:
        os.sched_setaffinity(0, {1})  # this supervisor stays off the system's core
    runs = build / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if max(args.idle_sizes, default=0) * 2 + 200 > nofile:
        log(f"open files limit {nofile}: W3 sizes above {(nofile - 200) // 2} may fail")
    t0 = time.monotonic()
    try:
        if args.profile:
            args.out.mkdir(parents=True, exist_ok=True)
            profile(args, settings, gen, runs, args.out, stamp)
            return 0
        trees = {rev: revs.build(rev, build, install=not args.no_install)
                 for rev in _revs_of(args.system_keys)}
        bench = Bench(args, settings, gen, runs, trees)
        code, this_tree = revs.fingerprint(), revs.working_tree()  # as the run starts
        try:
            bench.run()
        except KeyboardInterrupt:
            log("interrupted: stopping everything; writing what was measured")
            bench.notes.append("run interrupted")
        if revs.fingerprint() != code:
            bench.notes.append("this tree's code changed during the run (a commit or an edit in "
                               f"{', '.join(revs.PRODUCT)}): its systems did not all run the "
                               "same code")
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "repeats": str(args.repeats),
            "configurations": ", ".join(names.CONFIG_TITLES[c] for c in
                                        report.by_config(args.system_keys)),
            "this tree": this_tree,
            **{f"tlsbridge@{rev}": f"{revs.describe(rev)} (bench/build/{tree.root.parent.name})"
               for rev, tree in trees.items()},
            "W1": f"{args.conns} persistent connections, closed-loop OPTIONS, "
                  f"{args.duration:g} s after {args.warmup:g} s warm-up",
            "W2": f"new TLS connection (full handshake) + OPTIONS per transaction, "
                  f"{args.concurrency} at once, {args.duration:g} s after {args.warmup:g} s",
            "W3": f"{', '.join(map(str, args.idle_sizes))} idle connections (PSS of all the "
                  "system's processes, minus its PSS with 0, divided by N)",
            "placement": ("system under test pinned to CPU 0, generator to CPU 1" if pin else
                          f"unpinned, daemon workers = {args.workers}, HAProxy nbthread "
                          f"{args.workers}"),
            "Kamailio settings": f"children = tcp_children = {args.children}, "
                                 f"shm {settings.shm_mb} MB",
            "generator": "siptls_gen (C, epoll, OpenSSL), certificate verification "
                         + ("on" if args.verify else "off"),
            "daemon log level": args.daemon_log_level,
            **_versions(),
            "wall time": f"{(time.monotonic() - t0) / 60:.1f} min",
        }
        write_report(args, bench, meta, args.out, stamp)
        return 0 if bench.records else 1
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
