"""The names of the systems a run measures: a base system, a git revision, a configuration.

    haproxy, tlsbridge, tlsbridge@42b2a93                 the reference configuration
    haproxy-alone, tlsbridge-alone, tlsbridge@42b2a93-alone  bridge alone

A system's ratios are always against the baseline (HAProxy + Kamailio) of its own
configuration, measured in the same repeat. A revision (`@REV`, a short commit id) runs that
commit's tlsbridge instead of this tree's.
"""

from __future__ import annotations

BASELINE = "haproxy"
CONFIGS = ("reference", "alone")
_SUFFIX = {"reference": "", "alone": "-alone"}

# In the order of the tables and of a repeat (before its rotation).
BASES = ("haproxy", "tlsbridge", "tlsbridge-1w", "kamailio", "tlsbridge-pyopenssl",
         "tlsbridge-gnutls")
_LABELS = {
    "haproxy": "HAProxy + Kamailio",
    "tlsbridge": "tlsbridge + Kamailio",
    "tlsbridge-1w": "tlsbridge, 1 worker + Kamailio",
    "kamailio": "Kamailio tls.so",
    "tlsbridge-pyopenssl": "tlsbridge (pyopenssl engine) + Kamailio",
    "tlsbridge-gnutls": "tlsbridge (gnutls engine) + Kamailio",
}
CONFIG_TITLES = {
    "reference": "Reference route",
    "alone": "Bridge alone",
}
CONFIG_TEXTS = {
    "reference": "Kamailio runs `kamailio-cfg/routing.py`: OPTIONS is answered 200, through "
                 "tlsbridge with the connection's TLS facts (`X-TLS:`) read from the daemon.",
    "alone": "Kamailio runs `bench/kamailio/routing_nofacts.py`: OPTIONS is answered 200 "
             "without reading the facts, by every system alike, so the systems differ only in "
             "what sits in front of Kamailio.",
}


def system_key(base: str, config: str = "reference", rev: str = "") -> str:
    return base + (f"@{rev}" if rev else "") + _SUFFIX[config]


def parse_key(key: str) -> tuple[str, str, str]:
    """(base, rev, config) of a system key; rev is "" for this tree."""
    config = "alone" if key.endswith(_SUFFIX["alone"]) else "reference"
    name = key.removesuffix(_SUFFIX[config]) if _SUFFIX[config] else key
    base, _, rev = name.partition("@")
    return base, rev, config


def config_of(key: str) -> str:
    return parse_key(key)[2]


def baseline_of(key: str) -> str:
    return system_key(BASELINE, config_of(key))


def label(key: str) -> str:
    base, rev, _ = parse_key(key)
    text = _LABELS.get(base, base)
    return text.replace("tlsbridge", f"tlsbridge@{rev}", 1) if rev else text


def order(keys: list[str]) -> list[str]:
    """Configuration first, then the base systems' order (the baseline first), a base's
    revisions after it."""
    def rank(key: str) -> tuple[int, int, str]:
        base, rev, config = parse_key(key)
        where = BASES.index(base) if base in BASES else len(BASES)
        return CONFIGS.index(config), where, rev

    return sorted(dict.fromkeys(keys), key=rank)
