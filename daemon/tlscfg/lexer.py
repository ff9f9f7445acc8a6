"""Kamailio's tokenizer for tls.cfg (core/cfg_parser.c): text in, tokens with line and column
out. It knows no keys and no sections; the parser does."""

from __future__ import annotations

import string
from typing import NamedTuple

from tlsbridge.daemon.tlscfg.errors import TlsCfgError

__all__ = ["Lexer", "Token"]

_ALPHA = frozenset(string.ascii_letters + string.digits + "_")
_DELIM = frozenset("=:;.,?[]/@!$%&*()-+|'")
_SPACE = frozenset(" \t\r")
_MAX_TOKEN = 512  # Kamailio's MAX_TOKEN_LEN: a longer word or string is an error there


class Token(NamedTuple):
    kind: str  # "word", "string", "eol", or the delimiter character itself
    text: str
    line: int
    column: int


class Lexer:
    """Kamailio's tokenizer. Keys and section headers are read as plain words (letters, digits,
    `_`) with every delimiter its own token; values in "extended" mode, where delimiters are part
    of the word, so that paths and cipher lists need no quotes. `#` starts a comment anywhere a
    token can start or end, a backslash escapes, a quoted string may hold anything."""

    def __init__(self, text: str, source: str) -> None:
        self.text, self.source = text, source
        self.pos, self.line, self.column = 0, 1, 1

    def error(self, message: str, at: Token | None = None) -> TlsCfgError:
        line, column = (at.line, at.column) if at else (self.line, self.column)
        return TlsCfgError(self.source, line, column, message)

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _take(self) -> str:
        c = self.text[self.pos]
        self.pos += 1
        if c == "\n":
            self.line, self.column = self.line + 1, 1
        else:
            self.column += 1
        return c

    def _invalid(self, c: str) -> TlsCfgError:
        return self.error(f"invalid character {c!r}")

    def _escaped(self, *, quoted: bool = False) -> str | None:
        """Read the character after a backslash: what it stands for, None for an end of line
        (a line continuation). Inside quotes `#` and space need no escape and take none."""
        where = Token("escape", "", self.line, self.column)
        c = self._take()
        if c in '"\\' or (c in "# " and not quoted):
            return c
        if c in "rnt":
            return {"r": "\r", "n": "\n", "t": "\t"}[c]
        if c == "\n":
            return None
        raise self.error(f"unsupported escape character {c!r}", where)

    def token(self, *, extended: bool = False) -> Token | None:
        """The next token, None at the end of the text."""
        buf: list[str] = []
        state, line, column = "start", self.line, self.column

        def push(c: str) -> None:
            if len(buf) >= _MAX_TOKEN:
                raise self.error(f"token longer than {_MAX_TOKEN} characters (Kamailio's limit)",
                                 Token("word", "", line, column))
            buf.append(c)

        while (c := self._peek()) != "":
            if state == "start":
                line, column = self.line, self.column
                if c in _SPACE:
                    self._take()
                elif c == "#":
                    self._take()
                    state = "comment"
                elif c == '"':
                    self._take()
                    state = "quoted"
                elif c == "\n":
                    self._take()
                    return Token("eol", c, line, column)
                elif c in _ALPHA or (extended and (c in _DELIM or c == "\\")):
                    # Kamailio keeps a backslash that starts a value as it is.
                    push(self._take())
                    state = "word"
                elif c in _DELIM:
                    self._take()
                    return Token(c, c, line, column)
                elif c == "\\":
                    self._take()
                    state = "escape"
                else:
                    raise self._invalid(c)
            elif state == "word":
                if c in _ALPHA or (extended and (c in _DELIM or c == '"')):
                    push(self._take())
                elif c == "\\":
                    self._take()
                    state = "word_escape"
                elif c in _SPACE or c in "#\n" or c in _DELIM or c == '"':
                    break  # the character starts the next token
                else:
                    raise self._invalid(c)
            elif state == "word_escape":
                if (e := self._escaped()) is not None:
                    push(e)
                state = "word"
            elif state == "quoted":
                c = self._take()
                if c == '"':
                    return Token("string", "".join(buf), line, column)
                if c == "\\":
                    state = "quoted_escape"
                else:
                    push(c)
            elif state == "quoted_escape":
                if (e := self._escaped(quoted=True)) is not None:
                    push(e)
                state = "quoted"
            elif state == "comment":
                if c == "\n":
                    state = "start"  # the end of line is still a token
                else:
                    self._take()
                    if c == "\\":
                        state = "comment_escape"
            elif state == "comment_escape":
                self._take()  # an escaped end of line continues the comment
                state = "comment"
            else:  # "escape", outside a word: only useful as a line continuation
                e = self._escaped()
                if e is not None:
                    # Kamailio returns it as a lone token of that character: an escaped "n"
                    # is an end of line, anything else a syntax error.
                    return Token("eol" if e == "\n" else e, e, line, column)
                state = "start"
        if state == "word":
            return Token("word", "".join(buf), line, column)
        if state in ("quoted", "quoted_escape"):
            raise self.error("end of file inside a quoted string (missing closing quote)")
        if state in ("escape", "word_escape"):
            raise self.error("end of file after a backslash")
        return None

