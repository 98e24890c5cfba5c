"""Pure rewrites of MAIL and RCPT arguments before aiosmtpd parses them.

* `split_auth_parameter`: the `AUTH=` parameter of MAIL FROM (RFC 4954 section 5), an
  xtext (RFC 3461 section 4) holding `<>` or the submitter's address. aiosmtpd answers
  555 to any parameter it does not know, so Exim's `MAIL FROM:<a@b> AUTH=<>` failed.
  The relay trusts no client's claim (which RFC 4954 allows): it checks the syntax and
  takes the parameter out, returning its decoded value for the log.
* `postmaster_rewrite`: `RCPT TO:<Postmaster>`, without a domain and in any case, which
  every SMTP server must accept (RFC 5321 section 4.5.1), becomes the relay's
  postmaster address, so routing and delivery see an ordinary recipient.
"""

from __future__ import annotations

import re

__all__ = ["decode_xtext", "postmaster_rewrite", "split_auth_parameter"]

# xchar is any of "!" to "~" except "+" and "="; hexchar is "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_POSTMASTER = re.compile(r"(TO:\s*)<postmaster>(\s.*)?", re.I | re.S)


def decode_xtext(value: str) -> str | None:
    """The text an xtext encodes, or None if `value` is not an xtext."""
    if not _XTEXT.fullmatch(value):
        return None
    return _HEXCHAR.sub(lambda m: chr(int(m[1], 16)), value)


def _path_end(arg: str) -> int:
    """Where the reverse-path of a MAIL argument (after `FROM:`) ends."""
    i = 0
    while i < len(arg) and arg[i] in " \t":
        i += 1
    if i == len(arg) or arg[i] != "<":
        match = re.compile(r"\S*").match(arg, i)
        return match.end() if match else i
    quoted = False
    while i < len(arg):
        char = arg[i]
        if char == "\\":
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i + 1
        i += 1
    return len(arg)


def split_auth_parameter(arg: str) -> tuple[str, str | None] | None:
    """`(arg without AUTH=, decoded AUTH value or None)` for a MAIL argument, or None when
    an AUTH parameter is malformed (not one xtext of `<>` or an address) or repeated."""
    keyword = arg[:5]
    if keyword.upper() != "FROM:":
        return arg, None
    rest = arg[5:]
    end = _path_end(rest)
    params = rest[end:].split()
    auth = [p for p in params if p[:5].upper() == "AUTH="]
    if not auth:
        return arg, None
    if len(auth) > 1:
        return None
    value = decode_xtext(auth[0][5:])
    if value is None or not (value == "<>" or ("@" in value and value.isprintable())):
        return None
    kept = [p for p in params if p is not auth[0]]
    return keyword + rest[:end] + "".join(" " + p for p in kept), value


def postmaster_rewrite(arg: str, postmaster: str) -> str:
    """A RCPT argument with `<Postmaster>` (no domain, any case) replaced by `postmaster`."""
    match = _POSTMASTER.fullmatch(arg.strip())
    if match is None:
        return arg
    return f"{match[1]}<{postmaster}>{match[2] or ''}"
