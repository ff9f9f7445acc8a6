"""How many Python function calls the daemon makes per TLS connection, and where they go.

    .venv/bin/python bench/callcount.py [--engine openssl|pyopenssl|gnutls] [--workers N]
                                        [--rev REV] [--n 20,120] [--top 25] [--json]

Starts the real daemon (`python -m tlsbridge.daemon.cli run -c CONFIG`, a listener on a free
loopback port, its hairpin to a small Kamailio stand-in in this process that reads the PROXY
header and an OPTIONS, answers 200 and holds the connection until the daemon closes it). Then,
for each profiler and each of two connection counts N1 < N2, it opens a measurement window in
the daemon, makes N sequential connections (full TLS handshake, one OPTIONS, the 200,
close_notify both ways, close), waits until the daemon is idle again and closes the window.
Calls per connection = (calls(N2) - calls(N1)) / (N2 - N1): start-up, warm-up and the cost of
opening and closing a window cancel.

The profilers run inside the daemon's processes (the supervisor's and every worker's with
`--workers N`), and only in the windows: the daemon gets this directory's generated
`sitecustomize.py` first on PYTHONPATH, which loads this file and installs SIGUSR1 (start) and
SIGUSR2 (stop and dump) handlers; its command line stays the real one. Two profilers, one window
each:

- `hook`: sys.setprofile with a counting function. A `call` event is a Python frame entered:
  a function call, or a coroutine/generator started or resumed (counted apart). Frames the event
  loop enters from C (uvloop's callbacks, protocol methods, task steps: their caller is the frame
  that runs the loop) are counted apart as "loop dispatches". `c_call` events are C functions
  and methods called from Python code (not operators, slots or type calls, and not C called
  from C).
- `cprofile`: cProfile, the standard's view of the same (its Python rows count resumptions as
  calls too; its builtins rows are the same C calls): a cross-check of the hook.

Only each process's main thread is profiled (the daemon has no other Python thread).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from types import CodeType, FrameType, ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENV_DIR = "TLSBRIDGE_CALLCOUNT_DIR"
GEN_FLAGS = 0x20 | 0x80 | 0x200  # CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR
PROFILERS = ("hook", "cprofile")


# ---- inside the daemon: the shim the generated sitecustomize.py installs ----------------------


LOOP = "(event loop)"  # the caller of what the loop runs from C: callbacks, protocol methods


class _Hook:
    """The sys.setprofile counter of one window: calls by (callee, caller)."""

    def __init__(self, base: FrameType | None) -> None:
        self.base = base  # the frame that runs the event loop: callbacks' f_back
        self.calls: dict[tuple[CodeType, Any], int] = {}
        self.resumed: dict[CodeType, int] = {}
        self.ccalls: dict[tuple[Any, str, CodeType], int] = {}
        self._first: dict[CodeType, int] = {}

    def _first_resume(self, code: CodeType) -> int:
        import dis

        for ins in dis.get_instructions(code):
            if ins.opname == "RESUME":
                return ins.offset
        return 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            code, back = frame.f_code, frame.f_back
            key = (code, LOOP if back is self.base or back is None else back.f_code)
            self.calls[key] = self.calls.get(key, 0) + 1
            if code.co_flags & GEN_FLAGS:
                first = self._first.get(code)
                if first is None:
                    first = self._first[code] = self._first_resume(code)
                if frame.f_lasti > first:  # past its first RESUME: a resumption
                    self.resumed[code] = self.resumed.get(code, 0) + 1
        elif event == "c_call":
            owner = getattr(arg, "__self__", None)
            if not isinstance(owner, ModuleType | type) and owner is not None:
                owner = type(owner)
            ckey = (owner, getattr(arg, "__name__", "?"), frame.f_code)
            self.ccalls[ckey] = self.ccalls.get(ckey, 0) + 1

    def dump(self) -> dict[str, Any]:
        codes = {c for c, _ in self.calls} | {c for _, c in self.calls if c is not LOOP}
        labels = _labels(codes | {c for _, _, c in self.ccalls})
        py: dict[str, list[int]] = {}
        callers: dict[str, dict[str, int]] = {}
        for (code, caller), n in self.calls.items():
            row = py.setdefault(labels[code], [0, self.resumed.get(code, 0), 0])
            row[0] += n
            if caller is LOOP:
                row[2] += n
            by = callers.setdefault(labels[code], {})
            name = LOOP if caller is LOOP else labels[caller]
            by[name] = by.get(name, 0) + n
        c: dict[str, int] = {}
        for (owner, name, caller), n in self.ccalls.items():
            if owner is None:
                label = name
            elif isinstance(owner, ModuleType):
                label = f"{owner.__name__}.{name}"
            else:
                mod = getattr(owner, "__module__", "") or ""
                label = ("" if mod == "builtins" else mod + ".") + f"{owner.__qualname__}.{name}"
            c[label] = c.get(label, 0) + n
            by = callers.setdefault(label, {})
            by[labels[caller]] = by.get(labels[caller], 0) + n
        return {"py": py, "c": c, "callers": callers}


def _cprofile_dump(profiler: Any) -> dict[str, Any]:
    """The same from cProfile's raw entries. Not create_stats(): it keys by label, and distinct
    code objects with one label (exec'd code, "<string>:1") would overwrite each other. What no
    profiled function called (the profiler's stack was empty) is what the loop ran."""
    entries = profiler.getstats()
    labels = _labels({e.code for e in entries if not isinstance(e.code, str)})

    def label(code: Any) -> str:
        return code if isinstance(code, str) else labels[code]

    py: dict[str, list[int]] = {}
    c: dict[str, int] = {}
    callers: dict[str, dict[str, int]] = {}
    for e in entries:
        if isinstance(e.code, str):
            c[e.code] = c.get(e.code, 0) + e.callcount
        else:
            row = py.setdefault(label(e.code), [0, 0, 0])
            row[0] += e.callcount
        for sub in e.calls or ():
            by = callers.setdefault(label(sub.code), {})
            by[label(e.code)] = by.get(label(e.code), 0) + sub.callcount
    for name, row in py.items():
        row[2] = row[0] - sum(callers.get(name, {}).values())
        if row[2] > 0:
            callers.setdefault(name, {})[LOOP] = row[2]
    return {"py": py, "c": c, "callers": callers}


def _short(filename: str) -> str:
    pkg = filename.rfind(os.sep + "tlsbridge" + os.sep)  # a --rev tree, an installed copy
    if pkg >= 0:
        return filename[pkg + len("tlsbridge") + 2:]
    paths = sysconfig.get_paths()
    prefixes = [paths[key].rstrip(os.sep) + os.sep
                for key in ("purelib", "platlib", "stdlib", "platstdlib") if paths.get(key)]
    prefixes.append(str(ROOT) + os.sep)  # after site-packages, which may be in it (.venv)
    for p in prefixes:
        if filename.startswith(p):
            return filename[len(p):]
    return filename


def _labels(codes: Any) -> dict[CodeType, str]:
    """"file:first line(qualified name)" of each code object. Code made by exec ("<string>":
    namedtuple's __new__, a dataclass's __init__) is named after the function that runs it,
    found once among all live functions, so that distinct ones do not share a label."""
    names = {code: getattr(code, "co_qualname", code.co_name) for code in codes}
    made = {code for code in names if code.co_filename.startswith("<")}
    if made:
        import gc

        for obj in gc.get_objects():
            code = getattr(obj, "__code__", None) if callable(obj) else None
            if code in made:
                names[code] = f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
                made.discard(code)
    return {code: f"{_short(code.co_filename)}:{code.co_firstlineno}({name})"
            for code, name in names.items()}


class _Shim:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.window: dict[str, Any] | None = None
        self.profiler: Any = None

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, self.start)
        signal.signal(signal.SIGUSR2, self.stop)
        import tlsbridge.daemon  # only its one-line __init__: where the daemon's code is

        self._write(f"ready-{os.getpid()}", {"pid": os.getpid(),
                                              "daemon": tlsbridge.daemon.__file__})

    def _write(self, name: str, data: Any) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.rename(self.dir / name)

    def start(self, signum: int, frame: FrameType | None) -> None:
        if self.window is not None:
            return
        window = json.loads((self.dir / "window.json").read_text())
        base, f = frame, frame
        while f is not None:  # the innermost frame of asyncio's runner (uvloop.run's loop)
            if f.f_code.co_filename.endswith(os.path.join("asyncio", "runners.py")):
                base = f
                break
            f = f.f_back
        self.window = window
        if window["profiler"] == "cprofile":
            import cProfile

            self.profiler = cProfile.Profile()
            self.profiler.enable()
        else:
            self.profiler = _Hook(base)
            sys.setprofile(self.profiler)
        self._write(f"{window['name']}-{os.getpid()}.started", {"t": time.monotonic()})

    def stop(self, signum: int, frame: FrameType | None) -> None:
        window, profiler = self.window, self.profiler
        if window is None:
            return
        if isinstance(profiler, _Hook):
            sys.setprofile(None)
            data = profiler.dump()
        else:
            profiler.disable()
            data = _cprofile_dump(profiler)
        self.window = self.profiler = None
        self._write(f"{window['name']}-{os.getpid()}.json",
                    {"pid": os.getpid(), "profiler": window["profiler"],
                     "threads": threading.active_count(), **data})


def install_shim() -> None:
    """Called by the generated sitecustomize.py in each of the daemon's processes."""
    _Shim(Path(os.environ[ENV_DIR])).install()


SITECUSTOMIZE = """\
# Generated by bench/callcount.py: installs its profiling shim in the daemon's processes.
import os
if os.environ.get({env!r}):
    import importlib.util
    _spec = importlib.util.spec_from_file_location("tlsbridge_callcount_shim", {path!r})
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    _mod.install_shim()
    del _spec, _mod
"""


# ---- the tool: Kamailio stand-in, clients, daemon ---------------------------------------------


class ToolError(Exception):
    pass


def free_port() -> int:
    """A free loopback TCP port below the ephemeral range (no outgoing connection takes it)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(10000, max(10001, low - 1))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ToolError("no free loopback port")


class FakeKamailio:
    """The hairpin's peer: one thread per connection, PROXY v1 header, each SIP request gets a
    200 OK, the connection is held until the daemon closes it (then closed, as Kamailio does)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted ones inherit
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(512)
        self.sock.settimeout(0.2)
        self.stopping = False
        self.lock = threading.Lock()
        self.accepted = self.answered = self.open = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._accept, name="fake-kamailio", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.open += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30.0)
        buf, proxied = b"", False
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                buf += data
                if not proxied:
                    if b"\r\n" not in buf:
                        continue
                    line, buf = buf.split(b"\r\n", 1)
                    if not line.startswith(b"PROXY "):
                        raise ValueError(f"no PROXY header: {line[:60]!r}")
                    proxied = True
                while b"\r\n\r\n" in buf:
                    head, rest = buf.split(b"\r\n\r\n", 1)
                    length = 0
                    for h in head.split(b"\r\n")[1:]:
                        name, _, value = h.partition(b":")
                        if name.strip().lower() in (b"content-length", b"l"):
                            length = int(value.strip() or 0)
                    if len(rest) < length:
                        break
                    buf = rest[length:]
                    conn.sendall(_reply(head))
                    with self.lock:
                        self.answered += 1
        except (OSError, ValueError) as exc:
            with self.lock:
                self.errors.append(repr(exc))
        finally:
            conn.close()
            with self.lock:
                self.open -= 1

    def close(self) -> None:
        self.stopping = True
        self.sock.close()
        self.thread.join(2.0)


def _reply(head: bytes) -> bytes:
    lines = head.split(b"\r\n")
    keep = [h for h in lines[1:]
            if h.split(b":", 1)[0].strip().lower() in (b"via", b"from", b"to", b"call-id",
                                                       b"cseq", b"v", b"f", b"t", b"i")]
    return b"\r\n".join([b"SIP/2.0 200 OK", *keep, b"Server: callcount", b"Content-Length: 0",
                         b"", b""])


def _options(port: int, local: tuple[str, int], i: int) -> bytes:
    return (f"OPTIONS sip:127.0.0.1:{port};transport=tls SIP/2.0\r\n"
            f"Via: SIP/2.0/TLS {local[0]}:{local[1]};branch=z9hG4bK-cc{i};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:callcount@localhost>;tag=cc{i}\r\n"
            "To: <sip:127.0.0.1>\r\n"
            f"Call-ID: callcount-{i}-{os.getpid()}@localhost\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def one_connection(ctx: ssl.SSLContext, port: int, sni: str | None, i: int,
                   timeout: float) -> str:
    """Handshake, OPTIONS, 200, close_notify both ways, close. How the daemon closed:
    "clean", "no close_notify", or "bytes after close_notify"."""
    sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        # As the bench's generator and real UAs: without it, the OPTIONS waits for the ACK of
        # our Finished (Nagle), delayed 40 ms when the server sends no session ticket.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = sock = ctx.wrap_socket(sock, server_hostname=sni)
        tls.sendall(_options(port, tls.getsockname(), i))
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = tls.recv(65536)
            if not data:
                raise ToolError(f"connection {i}: closed before the 200")
            buf += data
        if not buf.startswith(b"SIP/2.0 200"):
            raise ToolError(f"connection {i}: unexpected reply {buf[:80]!r}")
        try:
            # Our close_notify, then the daemon's (after Kamailio's FIN on the hairpin).
            sock = tls.unwrap()
        except (ssl.SSLError, OSError):
            how = "no close_notify"
        else:
            how = "clean"
        with contextlib.suppress(OSError):
            while sock.recv(65536):  # until the daemon closes its socket
                how = "bytes after close_notify"
        return how
    finally:
        sock.close()


class Daemon:
    def __init__(self, workdir: Path, config: Path, shimdir: Path, windows: Path,
                 code: Path | None = None) -> None:
        self.log = workdir / "daemon.log"
        self.windows = windows
        env = dict(os.environ)
        env[ENV_DIR] = str(windows)
        # The shim first; then (--rev) a tree whose tlsbridge/ the path finder takes before
        # the editable install's finder, which comes last in sys.meta_path.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(shimdir), *([str(code)] if code else []),
             *filter(None, [env.get("PYTHONPATH")])])
        argv = [sys.executable, "-m", "tlsbridge.daemon.cli", "run", "-c", str(config)]
        with open(self.log, "wb") as logf:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                          stderr=logf, env=env, cwd=workdir,
                                          start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """The daemon and its children (a supervisor's workers)."""
        pids = [self.pid]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.pid:
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)
        # Its own session (start_new_session): nothing of it may outlive the tool.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)


def wait_until(check: Any, deadline: float, what: str, daemon: Daemon | None = None) -> None:
    while not check():
        if daemon is not None and not daemon.alive():
            raise ToolError(f"the daemon exited while waiting for {what}; its log:\n"
                            f"{daemon.tail()}")
        if time.monotonic() > deadline:
            log = daemon.tail() if daemon is not None else ""
            raise ToolError(f"timed out waiting for {what}" +
                            (f"; the daemon's log:\n{log}" if log else ""))
        time.sleep(0.02)


def write_config(path: Path, *, tls_port: int, hairpin_port: int, certs: Path, run_dir: Path,
                 engine: str, workers: int, log_level: str) -> None:
    path.write_text(f"""# bench/callcount.py: the daemon under count
[daemon]
workers = {workers}
run_dir = "{run_dir}"
log_level = "{log_level}"
handshake_timeout = 10.0

[kamailio]
hairpin = "127.0.0.1:{hairpin_port}"
proxy_protocol = 1
source_ip = "127.0.0.1"
connect_timeout = 5.0

[[listener]]
address = "127.0.0.1:{tls_port}"
profile = "default"

[profile.default]
certificate = "{certs / 'server.pem'}"
private_key = "{certs / 'server.key'}"
verify_client = "off"
min_version = "TLSv1.2"
max_version = "TLSv1.3"
engine = "{engine}"
""")


# ---- measuring --------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.deadline = time.monotonic() + args.timeout
        self.daemon: Daemon | None = None
        self.kam: FakeKamailio | None = None
        self.sub: Any = None
        self.seq = self.count = 0
        self.closes: dict[str, int] = {}
        self.code: set[str] = set()

    def setup(self) -> None:
        from tlsbridge.daemon.devcerts import ensure_dev_certs

        args, wd = self.args, self.workdir
        certs = wd / "certs"
        ensure_dev_certs(certs, ["localhost"], ["127.0.0.1"])
        shimdir, windows = wd / "shim", wd / "windows"
        shimdir.mkdir()
        windows.mkdir()
        (shimdir / "sitecustomize.py").write_text(
            SITECUSTOMIZE.format(env=ENV_DIR, path=str(Path(__file__).resolve())))
        hairpin_port, self.tls_port = free_port(), free_port()
        self.kam = FakeKamailio(hairpin_port)
        config = wd / "tlsbridge.toml"
        write_config(config, tls_port=self.tls_port, hairpin_port=hairpin_port, certs=certs,
                     run_dir=wd / "run", engine=args.engine, workers=args.workers,
                     log_level=args.log_level)
        self.ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        if args.tls == "1.2":
            self.ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if not args.sni:
            self.ctx.check_hostname = False
        code = checkout(args.rev, wd / "rev") if args.rev else None
        self.daemon = Daemon(wd, config, shimdir, windows, code)
        self.windows = windows
        # Up: every process of it has its handlers (a signal before would kill it), then the
        # first connections get through (they also warm up imports and caches).
        expect = 1 + (args.workers if args.workers > 1 else 0)
        wait_until(lambda: len(list(windows.glob("ready-*"))) >= expect
                   and len(self.daemon.pids()) >= expect,  # type: ignore[union-attr]
                   min(self.deadline, time.monotonic() + 30), "the daemon to start",
                   self.daemon)
        self.code = {json.loads(f.read_text())["daemon"] for f in windows.glob("ready-*")}
        if code is not None and not all(c.startswith(str(code) + os.sep) for c in self.code):
            raise ToolError(f"the daemon runs {', '.join(sorted(self.code))}, not --rev's tree")
        wait_until(self._answers, min(self.deadline, time.monotonic() + 30),
                   "the daemon's TLS listener", self.daemon)
        if args.subscribe is not None:
            self._subscribe(config, args.subscribe)
        for _ in range(args.warmup):
            self.connect()

    def _answers(self) -> bool:
        try:
            self.connect()
        except (OSError, ToolError):
            return False
        return True

    def _subscribe(self, config: Path, topics: list[str]) -> None:
        """Like Kamailio's rtimer (which by default wants no per-connection event)."""
        import zmq

        from tlsbridge.shared.client import ControlClient
        from tlsbridge.shared.settings import load_settings

        settings = load_settings(config)
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 1_000_000)
        for topic in topics:
            self.sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.sub.connect(settings.events_endpoint)
        client = ControlClient(settings.control_endpoint, timeout_ms=1000)
        try:
            wait_until(lambda: all(t in client.request("stats").get("subscriptions", [])
                                   for t in topics),
                       min(self.deadline, time.monotonic() + 10), "the event subscription",
                       self.daemon)
        finally:
            client.close()

    def connect(self) -> None:
        self.seq += 1
        how = one_connection(self.ctx, self.tls_port, self.args.sni or None, self.seq,
                             timeout=10.0)
        self.closes[how] = self.closes.get(how, 0) + 1

    def idle(self) -> None:
        """Until the daemon has no connection left (Kamailio sees every hairpin closed)."""
        assert self.kam is not None
        wait_until(lambda: self.kam.open == 0,  # type: ignore[union-attr]
                   min(self.deadline, time.monotonic() + 10), "the hairpins to close",
                   self.daemon)
        time.sleep(self.args.settle)

    def _signal(self, pids: list[int], sig: int) -> None:
        for pid in pids:
            os.kill(pid, sig)

    def window(self, profiler: str, n: int, seconds: float = 0.0) -> dict[str, Any]:
        """One measured window of n connections (or of `seconds` idle when n is 0)."""
        assert self.daemon is not None and self.kam is not None
        if time.monotonic() > self.deadline:
            raise ToolError(f"out of time (--timeout {self.args.timeout:g} s)")
        self.count += 1
        name = f"w{self.count}-{profiler}-{n}"
        (self.windows / "window.json").write_text(json.dumps({"name": name,
                                                              "profiler": profiler}))
        pids = self.daemon.pids()
        self.idle()
        answered = self.kam.answered
        self._signal(pids, signal.SIGUSR1)
        wait_until(lambda: all((self.windows / f"{name}-{p}.started").exists() for p in pids),
                   min(self.deadline, time.monotonic() + 10), f"window {name} to open",
                   self.daemon)
        t0 = time.monotonic()
        for _ in range(n):
            if time.monotonic() > self.deadline:
                break  # the window's close fails with the reason
            self.connect()
        if n == 0:
            time.sleep(seconds)
        else:
            self.idle()
        elapsed = time.monotonic() - t0
        self._signal(pids, signal.SIGUSR2)
        wait_until(lambda: all((self.windows / f"{name}-{p}.json").exists() for p in pids),
                   min(self.deadline, time.monotonic() + 30), f"window {name} to close",
                   self.daemon)
        if self.kam.answered - answered != n:
            raise ToolError(f"window {name}: {self.kam.answered - answered} of {n} OPTIONS "
                            "answered")
        dumps = [json.loads((self.windows / f"{name}-{p}.json").read_text()) for p in pids]
        for d in dumps:
            d["role"] = ("supervisor" if d["pid"] == self.daemon.pid and self.args.workers > 1
                         else "worker")
        return {"name": name, "profiler": profiler, "n": n, "seconds": elapsed,
                "processes": dumps}

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.kam is not None:
            self.kam.close()
        if self.sub is not None:
            self.sub.close(0)


# ---- results ----------------------------------------------------------------------------------


Tally = dict[str, dict[str, Any]]


def tally(window: dict[str, Any], role: str | None = None) -> Tally:
    """"py": function -> [calls, resumed, dispatched]; "c": function -> [calls, 0, 0];
    "callers": function -> {caller: calls}; summed over the window's processes (of that role:
    "supervisor", "worker")."""
    out: Tally = {"py": {}, "c": {}, "callers": {}}
    for proc in window["processes"]:
        if role is not None and proc["role"] != role:
            continue
        for key, (calls, resumed, dispatched) in proc["py"].items():
            row = out["py"].setdefault(key, [0, 0, 0])
            row[0] += calls
            row[1] += resumed
            row[2] += dispatched
        for key, calls in proc["c"].items():
            out["c"].setdefault(key, [0, 0, 0])[0] += calls
        for key, by in proc["callers"].items():
            mine = out["callers"].setdefault(key, {})
            for caller, n in by.items():
                mine[caller] = mine.get(caller, 0) + n
    return out


def totals(t: Tally) -> dict[str, float]:
    py = [sum(r[i] for r in t["py"].values()) for i in range(3)]
    c = sum(r[0] for r in t["c"].values())
    return {"python_calls": py[0], "resumptions": py[1], "loop_dispatches": py[2],
            "fresh_calls": py[0] - py[1], "c_calls": c, "total": py[0] + c}


def slope(a: dict[str, float], b: dict[str, float], dn: int) -> dict[str, float]:
    return {k: (b[k] - a[k]) / dn for k in a}


def analyse(windows: list[dict[str, Any]], n1: int, n2: int, top: int) -> dict[str, Any]:
    dn = n2 - n1
    result: dict[str, Any] = {"per_connection": {}, "windows": []}
    for w in windows:
        result["windows"].append({"name": w["name"], "profiler": w["profiler"], "n": w["n"],
                                  "seconds": round(w["seconds"], 3),
                                  "pids": [p["pid"] for p in w["processes"]],
                                  "threads": [p["threads"] for p in w["processes"]],
                                  **totals(tally(w))})
    for profiler in PROFILERS:
        ws = {w["n"]: tally(w) for w in windows if w["profiler"] == profiler and w["n"]}
        if n1 not in ws or n2 not in ws:
            continue
        a, b = ws[n1], ws[n2]
        result["per_connection"][profiler] = {k: round(v, 2) for k, v in
                                              slope(totals(a), totals(b), dn).items()}
        wa, wb = (next(w for w in windows if w["profiler"] == profiler and w["n"] == n)
                  for n in (n1, n2))
        roles = sorted({p["role"] for p in wa["processes"]})
        if len(roles) > 1:
            result.setdefault("per_connection_by_role", {})[profiler] = {
                role: {k: round(v, 2) for k, v in slope(totals(tally(wa, role)),
                                                        totals(tally(wb, role)), dn).items()}
                for role in roles}
        for kind, label in (("py", "top_python"), ("c", "top_c")):
            rows = []
            for key in set(a[kind]) | set(b[kind]):
                ra, rb = a[kind].get(key, [0, 0, 0]), b[kind].get(key, [0, 0, 0])
                per = [(rb[i] - ra[i]) / dn for i in range(3)]
                if abs(per[0]) >= 0.005:
                    ca, cb = a["callers"].get(key, {}), b["callers"].get(key, {})
                    callers = {c: round((cb.get(c, 0) - ca.get(c, 0)) / dn, 2)
                               for c in set(ca) | set(cb)}
                    rows.append({"function": key, "calls": round(per[0], 2),
                                 "resumed": round(per[1], 2), "dispatched": round(per[2], 2),
                                 "callers": dict(sorted(((c, v) for c, v in callers.items()
                                                         if abs(v) >= 0.005),
                                                        key=lambda cv: -cv[1]))})
            rows.sort(key=lambda r: (-r["calls"], r["function"]))
            result.setdefault(label, {})[profiler] = rows[:top] if top else rows
    idle = sorted((w for w in windows if w["n"] == 0), key=lambda w: w["seconds"])
    if len(idle) == 2:  # the window's own cost, and what the daemon does per idle second
        a, b = totals(tally(idle[0])), totals(tally(idle[1]))
        dt = idle[1]["seconds"] - idle[0]["seconds"]
        rate = {k: (b[k] - a[k]) / dt for k in a}
        busy = [w["seconds"] for w in windows if w["profiler"] == "hook" and w["n"] in (n1, n2)]
        result["idle"] = {
            "window_cost": {k: round(v, 1) for k, v in a.items()},
            "per_second": {k: round(v, 2) for k, v in rate.items()},
            # what idle time adds to the per-connection figures (the N2 window lasts longer)
            "per_connection_bias": {k: round(v * (busy[1] - busy[0]) / dn, 2)
                                    for k, v in rate.items()} if len(busy) == 2 else None,
        }
    return result


def render(res: dict[str, Any], args: argparse.Namespace) -> str:
    per = res["per_connection"]
    profs = [p for p in PROFILERS if p in per]
    n1, n2 = args.n
    out = [f"tlsbridge daemon, engine {args.engine}, {args.workers} worker(s), "
           f"TLS {'1.2' if args.tls == '1.2' else '1.3'}, SNI {args.sni or '-'}, "
           f"log_level {args.log_level}"
           + (f", events subscribed: {args.subscribe}" if args.subscribe is not None else ""),
           f"tree {res['settings']['tree']}, Python {res['settings']['python']}",
           f"per connection = (calls with {n2} connections - calls with {n1}) / {n2 - n1}", ""]
    labels = [("python_calls", "Python function calls (frames entered)"),
              ("fresh_calls", "  of which calls (not resumptions)"),
              ("resumptions", "  of which coroutine/generator resumptions"),
              ("loop_dispatches", "  of which entered from the event loop (C)"),
              ("c_calls", "C functions called from Python (builtins)"),
              ("total", "total function calls")]
    out.append(f"{'':46}" + "".join(f"{p:>12}" for p in profs))
    for key, label in labels:
        if key in ("fresh_calls", "resumptions") and "hook" not in per:
            continue
        cells = "".join(f"{per[p][key]:>12.1f}" if (p == "hook" or key not in
                        ("fresh_calls", "resumptions")) else f"{'':>12}" for p in profs)
        out.append(f"{label:46}{cells}")
    for role, t in res.get("per_connection_by_role", {}).get("hook", {}).items():
        out.append(f"  {role + 's' if role == 'worker' else role}: {t['python_calls']:.1f} "
                   f"Python calls, {t['total']:.1f} in all")
    if "idle" in res:
        i = res["idle"]
        out.append(f"\nan empty window costs {i['window_cost']['python_calls']:.0f} Python calls "
                   f"({i['window_cost']['total']:.0f} in all; it cancels); the idle daemon makes "
                   f"{i['per_second']['python_calls']:.1f} Python calls/s "
                   f"({i['per_second']['total']:.1f} in all)"
                   + (f", which adds {i['per_connection_bias']['python_calls']:.2f} to the "
                      "Python calls per connection above" if i["per_connection_bias"] else ""))
    main = "hook" if "hook" in profs else profs[0]
    rows = res["top_python"][main]
    out.append(f"\ntop {len(rows)} Python functions by calls per connection ({main}; "
               "resumed = coroutine/generator resumptions, loop = entered from the event loop):")
    out.append(f"{'calls':>8} {'resumed':>8} {'loop':>6}  function"
               + ("  (<- its callers, calls per connection)" if args.callers else ""))

    def callers(r: dict[str, Any], indent: int) -> None:
        by = list(r["callers"].items())
        if args.callers and by:
            more = f", +{len(by) - args.callers} more" if len(by) > args.callers else ""
            out.append(" " * indent + "<- " + ", ".join(
                f"{c} {n:.2f}" for c, n in by[:args.callers]) + more)

    for r in rows:
        out.append(f"{r['calls']:>8.2f} {r['resumed']:>8.2f} {r['dispatched']:>6.2f}  "
                   f"{r['function']}")
        callers(r, 28)
    crow = res["top_c"][main][:args.top_c]
    if crow:
        out.append(f"\ntop {len(crow)} C functions called from Python, per connection ({main}):")
        for r in crow:
            out.append(f"{r['calls']:>8.2f}  {r['function']}")
            callers(r, 12)
    out.append("\nwindows: " + ", ".join(
        f"{w['name']} {w['python_calls']:.0f} py / {w['total']:.0f} all in {w['seconds']:.2f} s"
        for w in res["windows"]))
    threads = max((t for w in res["windows"] for t in w["threads"]), default=1)
    if threads > 1:
        out.append(f"note: a daemon process ran {threads} Python threads; only the main "
                   "thread is profiled")
    if res.get("hairpin_errors"):
        out.append("the Kamailio stand-in saw: " + "; ".join(res["hairpin_errors"]))
    if set(res["closes"]) - {"clean"}:
        out.append("how the daemon closed the client's connections: " + ", ".join(
            f"{how} {n}" for how, n in sorted(res["closes"].items())))
    return "\n".join(out)


def checkout(rev: str, into: Path) -> Path:
    """daemon/, shared/ and kemi/ as of commit `rev`, laid out as the tlsbridge package."""
    def git(*argv: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True,
                              timeout=60, **kw)

    listed = git("ls-tree", "--name-only", rev)
    if listed.returncode != 0:
        raise ToolError(f"--rev {rev}: {listed.stderr.decode().strip()}")
    parts = [d for d in ("daemon", "shared", "kemi") if d in listed.stdout.decode().split()]
    if "daemon" not in parts:
        raise ToolError(f"--rev {rev}: no daemon/ there")
    pkg = into / "tlsbridge"
    pkg.mkdir(parents=True)
    tar = git("archive", "--format=tar", rev, *parts)
    if tar.returncode != 0:
        raise ToolError(f"--rev {rev}: git archive: {tar.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=tar.stdout, check=True, timeout=60)
    return into


def tree_state(rev: str | None = None) -> str:
    """The commit measured, and whether the daemon's code differs from it."""
    if rev:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{out or rev} (--rev {rev})"
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "daemon", "shared"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{head or '?'}{' + uncommitted changes in daemon/ or shared/' if dirty else ''}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Count the daemon's Python function calls per TLS connection "
                    "(accept to close), and where they go.")
    p.add_argument("--engine", choices=("openssl", "pyopenssl", "gnutls"), default="openssl",
                   help="the listener's TLS engine (default openssl)")
    p.add_argument("--rev", metavar="REV",
                   help="run the daemon as of git commit REV (its daemon/, shared/, kemi/, "
                        "with this venv's packages) instead of this working tree")
    p.add_argument("--workers", type=int, default=1,
                   help="daemon workers (default 1: one process, no supervisor)")
    p.add_argument("--n", default="20,120",
                   help="the two window sizes N1,N2 in connections (default 20,120)")
    p.add_argument("--profiler", choices=("hook", "cprofile", "both"), default="both",
                   help="hook: sys.setprofile counter (callers, resumptions); cprofile: "
                        "cProfile as a cross-check; both (default): two windows each")
    p.add_argument("--top", type=int, default=25, help="Python functions listed (0: all)")
    p.add_argument("--top-c", type=int, default=15, help="C functions listed")
    p.add_argument("--callers", type=int, default=2,
                   help="callers shown under each function listed (0: none)")
    p.add_argument("--tls", choices=("1.2", "1.3"), default="1.3", help="client's max version")
    p.add_argument("--sni", default="localhost", help="server name the client sends ('': none)")
    p.add_argument("--subscribe", action="append", metavar="TOPIC",
                   help="subscribe to daemon events with this prefix during the run, as a "
                        "Kamailio with facts_in_htable would ('' for all; repeatable)")
    p.add_argument("--log-level", default="warning", help="the daemon's log_level")
    p.add_argument("--warmup", type=int, default=10, help="connections before the windows")
    p.add_argument("--idle", type=float, default=2.0,
                   help="seconds of an idle window, measured against an empty one, for the "
                        "idle daemon's calls per second (hook; 0: none)")
    p.add_argument("--settle", type=float, default=0.3,
                   help="seconds waited after the hairpins have closed, before a window shuts")
    p.add_argument("--timeout", type=float, default=180.0, help="bound on the whole run (s)")
    p.add_argument("--workdir", type=Path, help="keep config, certificates, logs, dumps here")
    p.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")
    args = p.parse_args(argv)
    try:
        n1, n2 = (int(x) for x in args.n.split(","))
    except ValueError:
        p.error("--n wants two integers, N1,N2")
    if not 0 < n1 < n2:
        p.error("--n wants 0 < N1 < N2")
    args.n = (n1, n2)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profilers = list(PROFILERS) if args.profiler == "both" else [args.profiler]

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="callcount-", dir=args.workdir))
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="callcount-")
        workdir = Path(cleanup.name)
    run = Run(args, workdir)
    try:
        run.setup()
        windows = []
        for profiler in profilers:
            for n in args.n:
                windows.append(run.window(profiler, n))
        if args.idle > 0 and "hook" in profilers:
            windows.append(run.window("hook", 0, 0.0))
            windows.append(run.window("hook", 0, args.idle))
        res = analyse(windows, *args.n, args.top)
        res["closes"] = run.closes
        res["settings"] = {"engine": args.engine, "workers": args.workers, "n": list(args.n),
                           "tls": args.tls, "sni": args.sni, "log_level": args.log_level,
                           "subscribe": args.subscribe, "python": sys.version.split()[0],
                           "tree": tree_state(args.rev), "daemon_code": sorted(run.code)}
        if run.kam is not None and run.kam.errors:
            res["hairpin_errors"] = run.kam.errors[:10]
    except ToolError as exc:
        over = time.monotonic() > run.deadline
        print(f"callcount: {exc}" + (f" (out of time: --timeout {args.timeout:g} s)"
                                     if over else ""), file=sys.stderr)
        return 1
    finally:
        run.close()
        if cleanup is not None:
            cleanup.cleanup()
    print(json.dumps(res, indent=2) if args.json else render(res, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
