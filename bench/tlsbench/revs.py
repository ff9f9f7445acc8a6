"""tlsbridge as of an older commit, for the A/B systems `tlsbridge@REV`.

A revision is built once into bench/build/rev-<full sha>/: `tree/`, the commit's files (`git
archive`), and `venv/`, made with the Python Kamailio embeds and that tree installed into it
(`pip install tree/`, dependencies pinned to this venv's versions), so that the daemon
(venv/bin/python) and Kamailio's Python (TLSBRIDGE_VENV=venv) both run that commit's code, with
its kamailio.cfg and routing scripts.
A `ready` file marks a finished build; later runs reuse it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from tlsbench.setup import log
from tlsbench.systems import ROOT, SCRIPTS, Tree

SYSTEM_PYTHON = Path("/usr/bin/python3")  # the Python Kamailio's app_python3 embeds
PRODUCT = ("daemon", "kemi", "shared", "kamailio-cfg", "bench/kamailio")  # what systems run


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0:
        raise ValueError(out.stderr.strip() or f"git {' '.join(args)} failed")
    return out.stdout.strip()


def resolve(rev: str) -> tuple[str, str]:
    """(short id, full sha) of a commit-ish; ValueError if git does not know it."""
    try:
        full = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except ValueError:
        raise ValueError(f"git knows no commit {rev!r} in {ROOT}") from None
    return _git("rev-parse", "--short", full), full


def describe(rev: str) -> str:
    """The commit's id and subject, for the report."""
    return _git("log", "-1", "--format=%h %s", rev)


def working_tree() -> str:
    """HEAD, and the product's files changed but not committed (what this tree's systems run)."""
    changed = _git("status", "--porcelain", "--", *PRODUCT)
    files = sorted({line.split(maxsplit=1)[1].split("/")[0] for line in changed.splitlines()})
    return describe("HEAD") + (f" (uncommitted changes in {', '.join(files)})" if files else "")


def fingerprint() -> str:
    """Changes whenever the code this tree's systems run does: HEAD, the product's uncommitted
    changes and its untracked files (someone may commit or edit during a run)."""
    h = hashlib.sha1(_git("rev-parse", "HEAD").encode())
    h.update(_git("diff", "HEAD", "--", *PRODUCT).encode())
    for name in _git("ls-files", "--others", "--exclude-standard", "--", *PRODUCT).split():
        h.update(name.encode() + (ROOT / name).read_bytes())
    return h.hexdigest()


def _export(full: str, tree: Path) -> None:
    tree.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", "--format=tar", full],
                               stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True,
                   timeout=300)
    if archive.wait(60) != 0:
        raise RuntimeError(f"git archive {full} failed")


def _add_missing_scripts(tree: Path) -> None:
    """A commit older than the bridge-alone script gets this tree's, which loads the commit's
    routing.py beside it by its own path; a commit without the reference files cannot run."""
    for needed in (SCRIPTS["reference"], "kamailio-cfg/kamailio.cfg"):
        if not (tree / needed).exists():
            raise SystemExit(f"bench: {tree.parent.name} has no {needed}: it cannot run as a "
                             "tlsbridge system")
    alone = SCRIPTS["alone"]
    if not (tree / alone).exists():
        (tree / alone).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / alone, tree / alone)
        log(f"{tree.parent.name}: no {alone} at that commit: using this tree's")


def _install(tree: Path, venv: Path) -> None:
    """A venv with the commit's tlsbridge, its dependencies pinned to this venv's versions (so
    that an A/B differs in tlsbridge's code only)."""
    log(f"building {venv}: venv and pip install of {tree}")
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], check=True, timeout=300)
    pins = venv / "constraints.txt"
    pins.write_text(subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
        capture_output=True, text=True, timeout=120).stdout)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(pins),
                    str(tree)], check=True, timeout=1200)


def _check_imports(tree: Tree) -> None:
    """Kamailio's Python must find tlsbridge only where routing.py puts it (the venv's
    site-packages), and the daemon's Python only in the venv."""
    v = sys.version_info
    site_dir = tree.venv / "lib" / f"python{v.major}.{v.minor}" / "site-packages"
    where = ("import tlsbridge.kemi, tlsbridge.daemon.cli\n"
             "print(tlsbridge.kemi.__file__, tlsbridge.daemon.cli.__file__)\n")
    like_routing_py = (
        "import importlib.util, site\n"
        "assert importlib.util.find_spec('tlsbridge') is None, 'tlsbridge is importable "
        "without TLSBRIDGE_VENV: a rev could not be told from this tree'\n"
        f"site.addsitedir({str(site_dir)!r})\n" + where)
    for python, code in ((SYSTEM_PYTHON, like_routing_py), (tree.python, where)):
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                             cwd=tree.root, timeout=60)
        paths = out.stdout.split()
        if out.returncode != 0 or not all(p.startswith(str(tree.venv)) for p in paths):
            raise RuntimeError(f"{python} does not import {tree.rev}'s tlsbridge from "
                               f"{tree.venv}: {out.stdout}{out.stderr}")


def build(rev: str, build_dir: Path, install: bool = True) -> Tree:
    """The Tree of a commit, built into build_dir/rev-<full sha>/ unless it is there already."""
    short, full = resolve(rev)
    home = build_dir / f"rev-{full}"
    tree = Tree(root=home / "tree", venv=home / "venv", python=home / "venv" / "bin" / "python",
                rev=short)
    if (home / "ready").exists():
        return tree
    if not install:
        raise SystemExit(f"bench: tlsbridge@{short} is not built yet and --no-install forbids "
                         "pip install")
    shutil.rmtree(home, ignore_errors=True)
    _export(full, tree.root)
    _add_missing_scripts(tree.root)
    _install(tree.root, tree.venv)
    _check_imports(tree)
    (home / "ready").write_text(f"{describe(full)}\n")
    return tree
