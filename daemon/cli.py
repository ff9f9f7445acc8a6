"""`tlsbridge`: one command for the daemon and for talking to it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tlsbridge.daemon.config import DEFAULT_CONFIG, Config, ConfigError, load_config

EXAMPLES = """\
examples:
  tlsbridge run -c /etc/tlsbridge/tlsbridge.toml    run the daemon in the foreground
  tlsbridge check -c tlsbridge.toml                  check configuration and certificates
  tlsbridge status                                   table of live connections
  tlsbridge lookup --hairpin 127.0.0.1:40312         TLS facts of one connection
  tlsbridge events --json                            follow connection events
  tlsbridge dev-certs run/certs                      a development CA and server certificate
  tlsbridge import-tls-cfg /etc/kamailio/tls.cfg > /etc/tlsbridge/tlsbridge.toml
  tlsbridge migrate-cfg --in-place /etc/kamailio/kamailio.cfg   TLS out of kamailio.cfg

The configuration file is -c FILE, else $TLSBRIDGE_CONFIG, else /etc/tlsbridge/tlsbridge.toml.
"""


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config or os.environ.get("TLSBRIDGE_CONFIG") or DEFAULT_CONFIG)


def cmd_run(args: argparse.Namespace) -> int:
    config = _config(args)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from tlsbridge.daemon import kamcheck, keylog

    keylog.configure(config.keylog_file)
    kamcheck.warn_at_start(config)
    if config.workers > 1:
        from tlsbridge.daemon.supervisors.multiprocess import run_supervised

        run_supervised(config, config.workers)
    else:
        from tlsbridge.daemon.server import run

        run(config)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    config = _config(args)
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[w{args.index}]: %(message)s",
        stream=sys.stderr,
    )
    from tlsbridge.daemon import keylog
    from tlsbridge.daemon.server import run

    keylog.configure(config.keylog_file)
    run(config, (args.index, args.count), generation=args.generation)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from tlsbridge.daemon.engines.registry import server_engine_factory
    from tlsbridge.daemon.outbound import Connector
    from tlsbridge.daemon.server import build_factories

    config = _config(args)
    for name, profile in config.profiles.items():
        server_engine_factory(profile.engine, profile)
        print(f"profile {name}: certificate {profile.certificate} ok (engine {profile.engine})")
    build_factories(config)  # what start-up builds: SNI profiles must suit their listener
    for lst in config.listeners:
        sni = f" (SNI: {', '.join(lst.sni_profiles)})" if lst.sni_profiles else ""
        wss = "" if lst.transport == "tls" else " (WSS, origins: " + \
            (", ".join(lst.origins) if lst.origins is not None else "any") + ")"
        print(f"listener {lst.address} -> profile {lst.profile}{sni}{wss}")
    Connector.check(config)
    for name, client in config.clients.items():
        print(f"client profile {name}: ok (engine {client.engine})")
    print(f"hairpin -> {config.hairpin.host}:{config.hairpin.port} "
          f"(PROXY v{config.hairpin.proxy_protocol})")
    print(f"events  {config.events_endpoint}\ncontrol {config.control_endpoint}")
    from tlsbridge.daemon import kamcheck
    from tlsbridge.daemon.reload import expiring

    findings = [("warning", f"certificate {e.path} ({e.owner}) expires {e.not_after}: "
                 f"{e.days_left:.0f} days left")
                for e in expiring(config, config.cert_expiry_days)]
    findings.append(kamcheck.check_run_dir(config))
    if args.kamailio_cfg:
        findings += kamcheck.check_cfg_file(Path(args.kamailio_cfg), config, args.define)
    if not args.offline:
        findings.append(kamcheck.probe_hairpin(config))
    for level, message in findings:
        print(f"{level}: {message}")
    return 1 if any(level == "error" for level, _ in findings) else 0


def _request(args: argparse.Namespace, op: str, **kw: Any) -> dict[str, Any]:
    from tlsbridge.shared.client import ControlClient

    endpoint = args.control or _config(args).control_endpoint
    client = ControlClient(endpoint, timeout_ms=int(args.timeout * 1000))
    try:
        return client.request(op, **kw)
    finally:
        client.close()


def cmd_ping(args: argparse.Namespace) -> int:
    reply = _request(args, "ping")
    print(f"pong from pid {reply['pid']}, up {reply['uptime']:.0f} s")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    reply = _request(args, "stats")
    for key in ("v", "rid", "ok"):
        reply.pop(key, None)
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0


def cmd_lookup(args: argparse.Namespace) -> int:
    key = {"hairpin": args.hairpin, "peer": args.peer, "id": args.id}
    reply = _request(args, "lookup", **{k: v for k, v in key.items() if v is not None})
    print(json.dumps({"conn": reply["conn"], "tls": reply["tls"]}, indent=2))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    reply = _request(args, "reload")
    print(f"reloaded; changed: {', '.join(reply['changed']) or 'nothing'}")
    if reply["restart_needed"]:
        print(f"needs a restart to take effect: {', '.join(reply['restart_needed'])}")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    _request(args, "kill", id=args.conn_id)
    print(f"connection {args.conn_id} closed")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    conns = _request(args, "list")["conns"]
    if args.json:
        print(json.dumps(conns, indent=2))
        return 0
    row = "{:>6} {:3} {:24} {:20} {:8} {:24} {:>8} {:>10} {:>10}"
    print(row.format("ID", "DIR", "PEER", "SNI", "VERSION", "CIPHER", "AGE", "IN", "OUT"))
    for c in conns:
        tls = c["tls"] or {}
        print(row.format(c["conn"]["id"], c["conn"]["direction"], c["conn"]["peer"],
                         tls.get("sni") or "-", tls.get("version", "-"), tls.get("cipher", "-"),
                         f"{c['age']:.0f}s", c["bytes_in"], c["bytes_out"]))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    import zmq

    from tlsbridge.shared.events import EventError, SeqTracker, decode_event

    endpoint = args.events or _config(args).events_endpoint
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, args.filter.encode())
    sock.connect(endpoint)
    end = time.monotonic() + args.duration if args.duration else None
    tracker = SeqTracker()  # seq counts per topic: a filter leaves no gaps of its own
    try:
        while end is None or time.monotonic() < end:
            if not sock.poll(200):
                continue
            try:
                event = decode_event(sock.recv_multipart())
            except EventError as exc:
                print(f"# a bad event: {exc}", file=sys.stderr, flush=True)
                continue
            lost = tracker.lost
            tracker.observe(event)
            if tracker.lost > lost:
                print(f"# {tracker.lost - lost} events lost (this subscriber fell behind)",
                      file=sys.stderr, flush=True)
            if args.json:
                print(json.dumps(event.to_dict(), default=str), flush=True)
            else:
                conn = event.conn
                who = f" id={conn.id} {conn.direction} peer={conn.peer}" if conn else ""
                extra = " ".join(f"{k}={v}" for k, v in event.fields.items() if k != "tls")
                print(f"{time.strftime('%H:%M:%S', time.localtime(event.ts))} "
                      f"{event.type}{who} {extra}".rstrip(), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(linger=0)
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from tlsbridge.daemon.reload import expiring

    config = _config(args)
    row = "{:24} {:>9}  {:20}  {}"
    print(row.format("OWNER", "DAYS LEFT", "NOT AFTER", "FILE"))
    for e in sorted(expiring(config, float("inf")), key=lambda e: e.days_left):
        print(row.format(e.owner, f"{e.days_left:.0f}", e.not_after, e.path))
    return 0


def cmd_import_tls_cfg(args: argparse.Namespace) -> int:
    from tlsbridge.daemon.tlscfg import Site, main_import

    site = Site(tls_port=args.tls_port, hairpin=args.hairpin, listen_ip=args.listen_ip,
                run_dir=args.run_dir, sip_address=args.sip_address)
    return main_import(args.path, sys.stdout, sys.stderr, site)


def cmd_migrate_cfg(args: argparse.Namespace) -> int:
    from tlsbridge.daemon.migrate_cfg import Options, main_migrate

    opts = Options(hairpin=args.hairpin, tls_address=args.tls_address,
                   sip_address=args.sip_address, script=args.script,
                   bridge_config=args.bridge_config)
    return main_migrate(args.path, opts, args.define, args.in_place, args.out_dir)


def cmd_engines(args: argparse.Namespace) -> int:
    from tlsbridge.daemon.engines.registry import available

    for name, reason in available().items():
        print(f"{name:10} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def cmd_dev_certs(args: argparse.Namespace) -> int:
    from tlsbridge.daemon.devcerts import ensure_dev_certs

    created = ensure_dev_certs(Path(args.directory), args.name or ["localhost"],
                               args.ip or ["127.0.0.1", "::1"])
    print(f"{'created' if created else 'kept existing'} certificates in {args.directory}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsbridge",
        description="TLS offload for Kamailio: the daemon, and commands to talk to it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="configuration file (TOML)")
    client = argparse.ArgumentParser(add_help=False, parents=[common])
    client.add_argument("--control", help="control endpoint (default: from the configuration)")
    client.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for a reply")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", parents=[common], help="run the daemon (foreground)").set_defaults(
        func=cmd_run)
    p = sub.add_parser("worker", parents=[common])  # started by the supervisor
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--generation", type=int, default=0)
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("check", parents=[common],
                       help="check configuration, certificates, Kamailio and its cfg")
    p.add_argument("--kamailio-cfg", help="also check this kamailio.cfg for what the bridge "
                   "needs, as Kamailio evaluates it (kamailio --cfg-print)")
    p.add_argument("-A", "--define", action="append", default=[], metavar="NAME[=VALUE]",
                   help="a #!define for --kamailio-cfg, as kamailio's -A (repeatable)")
    p.add_argument("--offline", action="store_true", help="do not probe Kamailio's hairpin")
    p.set_defaults(func=cmd_check)
    sub.add_parser("ping", parents=[client], help="is the daemon answering?").set_defaults(
        func=cmd_ping)
    sub.add_parser("stats", parents=[client], help="counters").set_defaults(func=cmd_stats)
    p = sub.add_parser("status", parents=[client], help="table of live connections")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("lookup", parents=[client], help="TLS facts of one connection")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--hairpin", help="the hairpin's daemon-side address ip:port")
    g.add_argument("--peer", help="the TLS peer's address ip:port")
    g.add_argument("--id", type=int, help="the connection id")
    p.set_defaults(func=cmd_lookup)
    sub.add_parser("reload", parents=[client],
                   help="reload configuration and certificates (live connections stay)"
                   ).set_defaults(func=cmd_reload)
    p = sub.add_parser("kill", parents=[client], help="close a connection")
    p.add_argument("conn_id", type=int, metavar="ID")
    p.set_defaults(func=cmd_kill)
    p = sub.add_parser("events", parents=[common], help="follow connection events")
    p.add_argument("--events", help="events endpoint (default: from the configuration)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--filter", default="", help="event type prefix, e.g. 'conn.' or 'tls.'")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(func=cmd_events)
    sub.add_parser("engines", help="TLS engines on this machine").set_defaults(func=cmd_engines)
    p = sub.add_parser("import-tls-cfg",
                       help="print the tlsbridge TOML for a Kamailio tls.cfg (warnings on stderr)")
    p.add_argument("path", help="tls.cfg (or a directory of them)")
    p.add_argument("--tls-port", type=int, default=5061, help="port of [server:default]")
    p.add_argument("--hairpin", default="127.0.0.1:5062", help="Kamailio's hairpin listener")
    p.add_argument("--listen-ip", help="the address the daemon listens on for [server:default] "
                   "(else a placeholder check refuses)")
    p.add_argument("--run-dir", help="[daemon] run_dir (else a placeholder)")
    p.add_argument("--sip-address", help="[kamailio] sip_address: where UDP peers reach "
                   "Kamailio (else a placeholder)")
    p.set_defaults(func=cmd_import_tls_cfg)
    p = sub.add_parser("migrate-cfg", help="take TLS out of a kamailio.cfg: the hairpin, the "
                       "bridge's modules, python_exec calls in native routes (notes on stderr)")
    p.add_argument("path", help="kamailio.cfg (files it includes are migrated too)")
    p.add_argument("--hairpin", default="127.0.0.1:5062", help="the hairpin listener to add")
    p.add_argument("--tls-address", default="127.0.0.1:5061",
                   help="the daemon's public TLS address (alias=tls:...)")
    p.add_argument("--sip-address", help="listen=udp: to add when the cfg has no UDP listener")
    p.add_argument("--script", help="app_python3 script for native routing (default: "
                   "tlsbridge_native.py beside the cfg, written when missing)")
    p.add_argument("--bridge-config", default="/etc/tlsbridge/tlsbridge.toml",
                   help="the daemon's TOML, which that script reads")
    p.add_argument("-A", "--define", action="append", default=[], metavar="NAME[=VALUE]",
                   help="a #!define, as kamailio's -A (repeatable)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--in-place", action="store_true",
                   help="rewrite the files (keeping FILE.pre-tlsbridge)")
    g.add_argument("--out-dir", help="write the migrated files into this directory")
    p.set_defaults(func=cmd_migrate_cfg)
    sub.add_parser("certs", parents=[common], help="configured certificates and their expiry"
                   ).set_defaults(func=cmd_certs)
    p = sub.add_parser("dev-certs", help="create a development CA and server certificate")
    p.add_argument("directory")
    p.add_argument("--name", action="append", help="DNS name (repeatable; default localhost)")
    p.add_argument("--ip", action="append", help="IP address (repeatable; default loopback)")
    p.set_defaults(func=cmd_dev_certs)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tlsbridge.shared.control import ControlError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"tlsbridge: configuration error: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"tlsbridge: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
