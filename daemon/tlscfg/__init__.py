"""`tlsbridge import-tls-cfg`: read Kamailio's tls.cfg, write the equivalent tlsbridge TOML.

An offline migration tool, in layers that each take the one before's output:

- `lexer`: Kamailio's tokenizer (core/cfg_parser.c);
- `parser`: the sections and keys of modules/tls/tls_config.c, read into the frozen `model`;
- `converter`: the model to a frozen `document` of tlsbridge tables, following how Kamailio
  chooses a profile (tls_domain.c). `profiles` maps one section to its table, `listeners`
  groups server tables into listeners and chooses the engine each needs, `findings` collects
  the warnings about what tlsbridge cannot do the same way;
- `renderer`: the document as TOML text, with its comments and `# warning:` lines.

`errors` holds the error all of them raise, `site` what the command line adds to a tls.cfg.
This module joins the layers and is the API `daemon/cli.py` and the tests use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TextIO

from tlsbridge.daemon.tlscfg.converter import convert_model
from tlsbridge.daemon.tlscfg.errors import TlsCfgError
from tlsbridge.daemon.tlscfg.model import Section, Setting, TlsCfg
from tlsbridge.daemon.tlscfg.parser import parse_tls_cfg, read_tls_cfg
from tlsbridge.daemon.tlscfg.renderer import render
from tlsbridge.daemon.tlscfg.site import Site, placeholder

__all__ = [
    "ConversionResult",
    "Section",
    "Setting",
    "Site",
    "TlsCfg",
    "TlsCfgError",
    "convert",
    "convert_tls_cfg",
    "main_import",
    "parse_tls_cfg",
    "placeholder",
    "read_tls_cfg",
]


# Everything a tls.cfg does not say left to placeholders (Site is frozen: one is enough).
_NO_SITE = Site()


@dataclass(frozen=True, slots=True)
class ConversionResult:
    """What `convert` returns."""

    toml: str  # a complete tlsbridge configuration, with comments
    warnings: list[str]  # what could not be carried over; also written as comments in `toml`


def convert_tls_cfg(cfg: TlsCfg, site: Site = _NO_SITE) -> ConversionResult:
    """Convert parsed profiles (see `convert`)."""
    doc = convert_model(cfg, site)
    return ConversionResult(render(doc), list(doc.warnings))


def convert(text: str, *, source: str = "tls.cfg", **site: Any) -> ConversionResult:
    """Convert the text of a tls.cfg to a tlsbridge TOML configuration.

    `source` names the file in messages and comments; `site` (Site's fields) says what a
    tls.cfg does not:
    the port of the listener for [server:default] (and of profiles for port 0), its address,
    Kamailio's hairpin listener, run_dir and sip_address (placeholders `check` refuses when
    not given). Raises TlsCfgError (with line numbers) for a tls.cfg Kamailio would refuse, or
    one no engine can serve.
    """
    return convert_tls_cfg(parse_tls_cfg(text, source=source), Site(**site))


def main_import(path: str, out: TextIO, err: TextIO, site: Site = _NO_SITE) -> int:
    """`tlsbridge import-tls-cfg PATH`: the TOML to `out`, warnings to `err`; 0, or 2 on error."""
    try:
        result = convert_tls_cfg(read_tls_cfg(path), site)
    except OSError as exc:
        err.write(f"error: cannot read {path}: {exc.strerror or exc}\n")
        return 2
    except ValueError as exc:  # TlsCfgError included
        err.write(f"error: {exc}\n")
        return 2
    out.write(result.toml)
    for warning in result.warnings:
        err.write(f"warning: {warning}\n")
    return 0
