#!/usr/bin/env python3
"""Serve the browser phone (scripts/webphone/phone.html, on SIP.js from the npm registry).

    scripts/webphone.py                      # http://127.0.0.1:8080/ against wss://127.0.0.1:8443/
    scripts/webphone.py --port 8081 --server wss://sip.example.com:443/

SIP.js is installed once with npm into .cache/npm of this repository (or --cache DIR). The
page is served over plain HTTP on loopback, which browsers treat as a secure context
(microphone allowed); its Origin (http://127.0.0.1:PORT) must be in the WSS listener's
`origins`, or that listener must have none.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[1]
PAGE = Path(__file__).resolve().with_name("webphone") / "phone.html"
# Pinned: the page uses SIP.js 0.21's API (UserAgent, Registerer, Inviter).
SIPJS = "sip.js@0.21.2"


def ensure_sipjs(cache: Path, timeout: float = 180.0) -> Path:
    """The SIP.js package directory, installed from the npm registry if it is not there."""
    pkg = cache / "node_modules" / "sip.js"
    if (pkg / "lib" / "index.js").is_file():
        return pkg
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (make deps installs it)")
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund",
                    "--no-save", "--loglevel=error", SIPJS], check=True, timeout=timeout)
    if not (pkg / "lib" / "index.js").is_file():
        raise RuntimeError(f"npm installed {SIPJS} but {pkg}/lib/index.js is missing")
    return pkg


class Handler(http.server.SimpleHTTPRequestHandler):
    """`/` is the page; `/sip.js/...` the package's files; nothing else."""

    extensions_map: ClassVar[dict[str, str]] = {
        **http.server.SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript"}

    def __init__(self, *args: object, sipjs: Path, **kw: object) -> None:
        self.sipjs = sipjs
        super().__init__(*args, directory=str(sipjs), **kw)  # type: ignore[arg-type]

    def translate_path(self, path: str) -> str:
        path = path.split("?", 1)[0].split("#", 1)[0]
        if path in ("/", "/index.html", "/phone.html"):
            return str(PAGE)
        if path.startswith("/sip.js/"):
            return super().translate_path(path[len("/sip.js"):])
        return str(self.sipjs / "does-not-exist")

    def log_message(self, format: str, *args: object) -> None:
        if not self.server.quiet:  # type: ignore[attr-defined]
            super().log_message(format, *args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--server", default="wss://127.0.0.1:8443/", help="the WSS URL to suggest")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "npm")
    ap.add_argument("--quiet", action="store_true", help="no request log")
    args = ap.parse_args(argv)
    sipjs = ensure_sipjs(args.cache)
    server = http.server.ThreadingHTTPServer(
        (args.host, args.port), functools.partial(Handler, sipjs=sipjs))
    server.quiet = args.quiet  # type: ignore[attr-defined]
    print(f"webphone: http://{args.host}:{server.server_port}/?server={args.server}"
          f"&user=alice  (Origin http://{args.host}:{server.server_port})", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
