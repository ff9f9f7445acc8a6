"""What the bench needs before it runs: Debian packages, matplotlib, the generator, certificates.

Everything is installed only when missing, so a second run starts at once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

APT_PACKAGES = ("haproxy", "kamailio", "kamailio-python3-modules", "kamailio-tls-modules",
                "build-essential", "libssl-dev")
BENCH = Path(__file__).resolve().parents[1]
GEN_SRC = BENCH / "gen" / "siptls_gen.c"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _installed(pkg: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True,
                         text=True)
    return out.returncode == 0 and "install ok installed" in out.stdout


def ensure_apt() -> None:
    missing = [p for p in APT_PACKAGES if not _installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"bench: missing Debian packages {' '.join(missing)} (needs root to "
                         "install: apt-get install ...)")
    log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Debian starts a packaged service on install where it can; ours are separate processes.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       check=True, env=env, timeout=1200)
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


def ensure_pip(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is not None:
        return
    log(f"pip install {package}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True,
                   timeout=900)
    importlib.invalidate_caches()


def ensure_pip_binary(path: Path, package: str) -> None:
    if path.exists():
        return
    log(f"pip install {package}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True,
                   timeout=900)


def build_generator(build: Path) -> Path:
    """Compile bench/gen/siptls_gen.c into build/ when the source is newer than the binary."""
    out = build / "siptls_gen"
    if out.exists() and out.stat().st_mtime >= GEN_SRC.stat().st_mtime:
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("bench: no C compiler (apt-get install build-essential)")
    build.mkdir(parents=True, exist_ok=True)
    log(f"compiling {GEN_SRC.name}")
    subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", str(out), str(GEN_SRC),
                    "-lssl", "-lcrypto"], check=True, timeout=300)
    return out


def make_certs(build: Path) -> dict[str, Path]:
    """One ECDSA P-256 server certificate (CN localhost, IP 127.0.0.1) for every system."""
    import trustme

    d = build / "certs"
    paths = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key",
             "combined": d / "server-combined.pem"}
    if all(p.exists() for p in paths.values()):
        return paths
    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    cert = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.ECDSA)
    ca.cert_pem.write_to_path(str(paths["ca"]))
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    paths["cert"].write_bytes(chain)
    cert.private_key_pem.write_to_path(str(paths["key"]))
    paths["key"].chmod(0o600)
    # HAProxy's `crt` takes certificate and key in one file.
    paths["combined"].write_bytes(chain + cert.private_key_pem.bytes())
    paths["combined"].chmod(0o600)
    return paths
