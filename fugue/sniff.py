"""Name the app a new connection is for, from the first bytes the client sent.

Who calls it: the router. It peeks at a new connection with MSG_PEEK (it never
consumes a byte; the chosen worker reads the stream from its start), calls
`sniff(prefix)` on each longer prefix until the answer is not NEED_MORE, then
asks a `HostTable`, built once from the configuration, which app serves that
name.

What it promises: pure functions of their arguments, stdlib only. `sniff`
returns ("http", host), ("tls", server_name) or NEED_MORE, or raises
SniffError with a one-line message; any other exception from hostile input is
a bug. Names come back in one canonical form (ASCII, lowercase, no trailing
dot, IPv6 literals without brackets in compressed form), the same form
`HostTable` keys on, so a lookup never depends on how a client spelled a name.

Why answer early: an HTTP client may send its headers slowly and a TLS client
sends nothing more until the server answers, so `sniff` returns as soon as the
Host line or the server_name extension is complete, not at the end of the
headers or of the ClientHello. The bytes after that point are the backend's to
judge (a second Host header, a folded Host line, a truncated ClientHello are
all rejected by the worker that reads them).
"""

import ipaddress
import re

__all__ = ["NEED_MORE", "SniffError", "sniff", "HostTable", "parse_host_header_value"]


class _NeedMore:
    __slots__ = ()

    def __repr__(self):
        return "NEED_MORE"


NEED_MORE = _NeedMore()  # peek again once more bytes have arrived


class SniffError(ValueError):
    """The prefix can never yield a name; the router closes the connection.

    The message is one short line, safe to log: client bytes in it are repr()'d
    and cut short.
    """


class _Incomplete(Exception):
    """Internal: the bytes that settle it have not been peeked yet."""


def sniff(prefix, max_header_bytes=8192):
    """("http", host), ("tls", server_name) or NEED_MORE for a peeked prefix.

    Called by the router with everything peeked so far (bytes-like). The first
    byte decides: 0x16 starts a TLS handshake record, anything else is read as
    HTTP/1.x. Only the first `max_header_bytes` bytes are looked at; a prefix
    that long with no answer yet raises SniffError, so the router never peeks
    without bound.
    """
    data = bytes(prefix[:max_header_bytes])
    if not data:
        return NEED_MORE
    if data[0] == _TLS_HANDSHAKE:
        result, wanted = _sniff_tls(data), "TLS server name"
    else:
        result, wanted = _sniff_http(data), "Host header"
    if result is NEED_MORE and len(prefix) >= max_header_bytes:
        raise SniffError(f"no {wanted} in the first {max_header_bytes} bytes")
    return result


# --- names ---------------------------------------------------------------

# Letters, digits, hyphen, and underscore (seen in internal names); labels of
# at most 63 octets. Percent-encoded and non-ASCII reg-names are refused: an IDN
# travels as xn-- punycode in both Host and SNI.
_LABEL = re.compile(r"[a-z0-9_-]{1,63}", re.ASCII)


def _normalise_name(name):
    # isascii() first: str.lower() maps some non-ASCII letters onto ASCII ones
    # (KELVIN SIGN -> "k"), which would let a name masquerade as another.
    if not name.isascii():
        raise SniffError(f"host name is not ASCII: {name[:64]!r}")
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise SniffError(f"invalid host name {name[:64]!r}")
    return name


def _normalise_ipv6(text):
    # Zone ids ("%25eth0") name an interface of the client, not a host: refused.
    if not text.isascii() or "%" in text:
        raise SniffError(f"invalid IPv6 literal {text[:64]!r}")
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        raise SniffError(f"invalid IPv6 literal {text[:64]!r}") from None


def parse_host_header_value(value):
    """The canonical host name of a Host header value (or URI authority).

    Called by `sniff` and by anyone who must match names the way the router
    does. Strips the port and surrounding whitespace, lowercases, drops one
    trailing dot; "[::1]:8080" gives "::1". Raises SniffError (a ValueError)
    for anything that is not a host name, IPv4 or bracketed IPv6 literal with
    an optional port.
    """
    value = value.strip(" \t")
    if value.startswith("["):
        literal, bracket, rest = value[1:].partition("]")
        if not bracket:
            raise SniffError(f"unclosed IPv6 literal in host {value[:64]!r}")
        host = _normalise_ipv6(literal)
    else:
        name, colon, port = value.partition(":")
        host, rest = _normalise_name(name), colon + port
    # port = *DIGIT (RFC 3986): "example.com:" is a valid, if odd, authority.
    if rest and not re.fullmatch(r":[0-9]{0,5}", rest, re.ASCII):
        raise SniffError(f"invalid port in host {value[:64]!r}")
    return host


def _canonical_host(host):
    # A name as written in a HostTable pattern or handed to lookup(): a plain
    # name, or an IPv6 literal with or without brackets; no port.
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        return _normalise_ipv6(host)
    return _normalise_name(host)


# --- HTTP/1.x ------------------------------------------------------------

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TARGET_CHAR = rb"[\x21-\x7e\x80-\xff]"
_FIELD_CHAR = rb"[\t\x20-\x7e\x80-\xff]"
_MAX_METHOD = 20  # longest registered method is 17 ("UPDATEREDIRECTREF")

_REQUEST_LINE = re.compile(
    rb"%s{1,%d} (%s+) HTTP/1\.[0-9]" % (_TCHAR, _MAX_METHOD, _TARGET_CHAR))
# Every prefix of a plausible request line, so garbage is refused at once
# instead of after max_header_bytes.
_PARTIAL_REQUEST_LINE = re.compile(
    rb"\r|%s{0,%d}|%s{1,%d} %s*|%s{1,%d} %s+ (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?"
    % ((_TCHAR, _MAX_METHOD) * 2 + (_TARGET_CHAR,) + (_TCHAR, _MAX_METHOD, _TARGET_CHAR)))
_HEADER_LINE = re.compile(rb"(%s+):[ \t]*(%s*?)[ \t]*" % (_TCHAR, _FIELD_CHAR))
_FOLDED_LINE = re.compile(rb"[ \t]%s*" % _FIELD_CHAR)
_PARTIAL_HEADER_LINE = re.compile(
    rb"\r|%s*|%s+:%s*\r?|[ \t]%s*\r?" % (_TCHAR, _TCHAR, _FIELD_CHAR, _FIELD_CHAR))
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)")


def _sniff_http(data):
    *lines, tail = data.split(b"\n")  # tail: the line still arriving
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    # A server SHOULD ignore empty lines before the request line (RFC 9112 2.2).
    start = 0
    while start < len(lines) and not lines[start]:
        start += 1
    if start == len(lines):
        if not _PARTIAL_REQUEST_LINE.fullmatch(tail):
            raise SniffError(f"not an HTTP/1.x request: {tail[:40]!r}")
        return NEED_MORE
    request_line = _REQUEST_LINE.fullmatch(lines[start])
    if not request_line:
        raise SniffError(f"not an HTTP/1.x request line: {lines[start][:40]!r}")
    # An absolute-form target overrides Host (RFC 9112 3.2.2); authority-form
    # (CONNECT) and origin-form leave it to the Host header.
    absolute = _ABSOLUTE_FORM.match(request_line.group(1))
    if absolute:
        authority = absolute.group(1).rpartition(b"@")[2]  # drop userinfo
        return "http", parse_host_header_value(authority.decode("latin-1"))
    for line in lines[start + 1:]:
        if not line:
            raise SniffError("no Host header")
        if _FOLDED_LINE.fullmatch(line):
            continue  # obs-fold continuation of a header that is not Host
        header = _HEADER_LINE.fullmatch(line)
        if not header:
            raise SniffError(f"malformed header line: {line[:40]!r}")
        if header.group(1).lower() == b"host":
            return "http", parse_host_header_value(header.group(2).decode("latin-1"))
    if not _PARTIAL_HEADER_LINE.fullmatch(tail):
        raise SniffError(f"malformed header line: {tail[:40]!r}")
    return NEED_MORE


# --- TLS -----------------------------------------------------------------

_TLS_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0
_MAX_RECORD = 1 << 14  # plaintext fragment limit, RFC 8446 5.1
_NO_SNI = "TLS ClientHello without SNI"


def _sniff_tls(data):
    stream, cut_short = _handshake_bytes(data)
    try:
        return "tls", _client_hello_sni(stream)
    except _Incomplete:
        if cut_short:
            raise SniffError("TLS ClientHello interrupted by a non-handshake record") from None
        return NEED_MORE


def _handshake_bytes(data):
    # The handshake layer may split a ClientHello over several records; join the
    # fragments of the leading run of handshake records. A record of another
    # type (ChangeCipherSpec, 0-RTT data) ends the run: nothing more of the
    # ClientHello can follow it.
    fragments, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 5]
        if header[0] != _TLS_HANDSHAKE:
            return b"".join(fragments), True
        if len(header) >= 2 and header[1] != 3:
            raise SniffError(f"not a TLS record: version {header[1:3].hex()}")
        if len(header) < 5:
            break
        length = int.from_bytes(header[3:5], "big")
        if not 0 < length <= _MAX_RECORD:
            raise SniffError(f"TLS record length {length} out of range")
        fragments.append(data[pos + 5:pos + 5 + length])
        pos += 5 + length
    return b"".join(fragments), False


# Each length is checked first against the structure that declares it (a lie
# is a SniffError) and only then against the bytes peeked so far (a shortfall
# is _Incomplete), so a truncated prefix and a malformed one never look alike.

def _skip(pos, n, end):
    if pos + n > end:
        raise SniffError("TLS length field overruns its enclosing structure")
    return pos + n


def _take(buf, pos, n, end):
    new_pos = _skip(pos, n, end)
    if new_pos > len(buf):
        raise _Incomplete
    return buf[pos:new_pos], new_pos


def _uint(buf, pos, width, end):
    raw, pos = _take(buf, pos, width, end)
    return int.from_bytes(raw, "big"), pos


def _client_hello_sni(buf):
    kind, pos = _uint(buf, 0, 1, 4)
    if kind != _CLIENT_HELLO:
        raise SniffError(f"TLS handshake message {kind} is not a ClientHello")
    length, pos = _uint(buf, pos, 3, 4)
    end = pos + length
    version, pos = _uint(buf, pos, 2, end)  # legacy_version, 0x0301..0x0303
    if version >> 8 != 3:
        raise SniffError(f"TLS ClientHello version {version:04x}")
    pos = _skip(pos, 32, end)  # random
    n, pos = _uint(buf, pos, 1, end)
    if n > 32:
        raise SniffError(f"TLS session id of {n} bytes")
    pos = _skip(pos, n, end)
    n, pos = _uint(buf, pos, 2, end)
    if n < 2 or n % 2:
        raise SniffError(f"TLS cipher suites length {n}")
    pos = _skip(pos, n, end)
    n, pos = _uint(buf, pos, 1, end)
    if n < 1:
        raise SniffError("TLS ClientHello without compression methods")
    pos = _skip(pos, n, end)
    if pos == end:
        raise SniffError(_NO_SNI)  # no extensions at all
    n, pos = _uint(buf, pos, 2, end)
    if pos + n != end:
        raise SniffError("TLS extensions length disagrees with the ClientHello length")
    while pos < end:
        kind, pos = _uint(buf, pos, 2, end)
        n, pos = _uint(buf, pos, 2, end)
        body_end = _skip(pos, n, end)
        if kind == _SERVER_NAME:
            return _server_name(buf, pos, body_end)
        pos = body_end
    raise SniffError(_NO_SNI)


def _server_name(buf, pos, end):
    n, pos = _uint(buf, pos, 2, end)
    if pos + n != end:
        raise SniffError("TLS server_name list length disagrees with its extension")
    while pos < end:
        kind, pos = _uint(buf, pos, 1, end)
        n, pos = _uint(buf, pos, 2, end)
        name, pos = _take(buf, pos, n, end)
        if kind == _HOST_NAME:
            return _normalise_name(name.decode("latin-1"))
    raise SniffError(_NO_SNI)


# --- host table ----------------------------------------------------------

class HostTable:
    """Which app serves a host name: built once from the configuration.

    `HostTable({"api": ["api.example.com"], "www": ["example.com", "*.example.com"]})`.
    A pattern is an exact name (or IP literal) or `*.suffix`, which like
    nginx's matches one or more leading labels ("a.example.com",
    "a.b.example.com") but not "example.com" itself. Matching is
    case-insensitive and ignores a trailing dot. Raises ValueError (one line)
    for an invalid pattern or a pattern claimed by two apps.
    """

    def __init__(self, mapping):
        self._exact = {}
        self._wildcard = {}  # "example.com" for "*.example.com"
        for app, patterns in mapping.items():
            if isinstance(patterns, (str, bytes)):
                raise ValueError(f"app {app!r}: patterns must be a list of host names, not a string")
            for pattern in patterns:
                table, key = self._parse(app, pattern)
                owner = table.setdefault(key, app)
                if owner != app:
                    raise ValueError(f"host pattern {pattern!r} is claimed by both {owner!r} and {app!r}")

    def _parse(self, app, pattern):
        if not isinstance(pattern, str):
            raise ValueError(f"app {app!r}: host pattern {pattern!r} is not a string")
        table, name = self._exact, pattern
        if pattern.startswith("*."):
            table, name = self._wildcard, pattern[2:]
        try:
            key = _canonical_host(name)
        except SniffError as e:
            raise ValueError(f"app {app!r}: invalid host pattern {pattern!r} ({e})") from None
        if table is self._wildcard and ":" in key:
            raise ValueError(f"app {app!r}: invalid host pattern {pattern!r} (wildcard IP literal)")
        return table, key

    def lookup(self, host):
        """The app for a name `sniff` returned, or None: exact match first, then
        the longest wildcard suffix. Called by the router once per connection."""
        try:
            host = _canonical_host(host)
        except SniffError:
            return None
        app = self._exact.get(host)
        if app is not None or ":" in host:
            return app
        labels = host.split(".")
        for i in range(1, len(labels)):
            app = self._wildcard.get(".".join(labels[i:]))
            if app is not None:
                return app
        return None
