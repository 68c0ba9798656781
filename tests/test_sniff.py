"""fugue.sniff: naming the app of a connection from a peeked prefix.

Real prefixes are cut at every byte offset, the way the router sees them grow;
TLS ClientHellos come from the stdlib ssl module; hostile input comes from
hypothesis and from hand-built ClientHellos whose lengths lie.
"""

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fugue.sniff import NEED_MORE, HostTable, SniffError, parse_host_header_value, sniff


def assert_shape(result):
    """The only things sniff may return."""
    if result is NEED_MORE:
        return
    assert isinstance(result, tuple) and len(result) == 2, result
    kind, name = result
    assert kind in ("http", "tls") and isinstance(name, str) and name, result


def sniff_or_error(prefix, **kwargs):
    """sniff's answer, or the SniffError it raised; anything else propagates."""
    try:
        result = sniff(prefix, **kwargs)
    except SniffError as e:
        assert "\n" not in str(e) and str(e)
        return e
    assert_shape(result)
    return result


# --- HTTP ----------------------------------------------------------------

# (request, bytes that start the line that decides, expected host)
HTTP_REQUESTS = [
    (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", b"Host", "example.com"),
    (b"GET /a?b=c HTTP/1.1\r\nUser-Agent: t/1\r\nAccept: */*\r\nHost: Example.COM:8080\r\n\r\n",
     b"Host", "example.com"),
    (b"POST /x HTTP/1.1\r\nhOsT:\t www.example.com. \t\r\nContent-Length: 0\r\n\r\n",
     b"hOsT", "www.example.com"),
    (b"GET / HTTP/1.1\nHost: bare-lf.example\n\n", b"Host", "bare-lf.example"),
    (b"GET / HTTP/1.0\r\nHost: old.example\r\n\r\n", b"Host", "old.example"),
    (b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", b"Host", "::1"),
    (b"GET / HTTP/1.1\r\nHost: [0:0:0:0:0:0:0:1]\r\n\r\n", b"Host", "::1"),
    (b"GET / HTTP/1.1\r\nHost: 192.0.2.7:80\r\n\r\n", b"Host", "192.0.2.7"),
    (b"OPTIONS * HTTP/1.1\r\nHost: star.example\r\n\r\n", b"Host", "star.example"),
    (b"CONNECT up.example:443 HTTP/1.1\r\nHost: up.example:443\r\n\r\n", b"Host", "up.example"),
    (b"GET / HTTP/1.1\r\nX-Long: a\r\n  folded\r\nHost: fold.example\r\n\r\n", b"Host", "fold.example"),
    # RFC 9112 2.2: empty lines before the request line are ignored.
    (b"\r\n\r\nGET / HTTP/1.1\r\nHost: late.example\r\n\r\n", b"Host", "late.example"),
    # Absolute form: the target names the host, decided by the request line alone.
    (b"GET http://abs.example/x HTTP/1.1\r\nHost: other.example\r\n\r\n", b"GET", "abs.example"),
    (b"GET HTTPS://User:pw@Abs.Example:8443?q HTTP/1.1\r\n\r\n", b"GET", "abs.example"),
    (b"GET http://[::1]:81/ HTTP/1.1\r\n\r\n", b"GET", "::1"),
]


@pytest.mark.parametrize("request_bytes, marker, host", HTTP_REQUESTS)
def test_http_at_every_offset(request_bytes, marker, host):
    ready = request_bytes.index(b"\n", request_bytes.index(marker)) + 1
    for cut in range(len(request_bytes) + 1):
        expected = NEED_MORE if cut < ready else ("http", host)
        assert sniff(request_bytes[:cut]) == expected, cut


@pytest.mark.parametrize("prefix, message", [
    (b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n", "no Host header"),
    (b"GET / HTTP/1.0\r\n\r\n", "no Host header"),
    (b"GET / HTTP/1.0\n\nHost: after.example\n", "no Host header"),
    (b"\x00\x01\x02", "not an HTTP/1.x request"),
    (b"\x80\x2e\x01\x03\x01", "not an HTTP/1.x request"),  # SSLv2-style hello
    (b" GET / HTTP/1.1", "not an HTTP/1.x request"),
    (b"GET  / HTTP/1.1", "not an HTTP/1.x request"),
    (b"GET / HTTP/2", "not an HTTP/1.x request"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "not an HTTP/1.x request"),
    (b"GET / FTP/1.1", "not an HTTP/1.x request"),
    (b"G\xc3\xa9T / HTTP/1.1", "not an HTTP/1.x request"),
    (b"A" * 21, "not an HTTP/1.x request"),
    (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP/1.x request line"),
    (b"GET /\r\n", "not an HTTP/1.x request line"),  # HTTP/0.9
    (b"GET / HTTP/1.1\r\r\n", "not an HTTP/1.x request line"),
    (b"GET / HTTP/1.1\r\nHost : a.example\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\nNo-Colon\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\nX: a\rb\r\nHost: a.example\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\nX: a\x00b\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\nHost: \r\n", "invalid host name"),
    (b"GET / HTTP/1.1\r\nHost: a b.example\r\n", "invalid host name"),
    (b"GET / HTTP/1.1\r\nHost: a..example\r\n", "invalid host name"),
    (b"GET / HTTP/1.1\r\nHost: b\xfccher.example\r\n", "not ASCII"),
    (b"GET / HTTP/1.1\r\nHost: [::1\r\n", "unclosed IPv6"),
    (b"GET / HTTP/1.1\r\nHost: a.example:80x\r\n", "invalid port"),
    (b"GET http:///x HTTP/1.1\r\nHost: a.example\r\n", "invalid host name"),
])
def test_http_refused(prefix, message):
    with pytest.raises(SniffError, match=message):
        sniff(prefix)


@pytest.mark.parametrize("garbage", [b"\x00", b"\xff", b"\x80", b" ", b"\t", b"{", b"\x16\x02"])
def test_garbage_refused_at_once(garbage):
    with pytest.raises(SniffError):
        sniff(garbage)


def padded_request(size, host_line=b""):
    """A request line and filler headers totalling `size` bytes, then host_line."""
    head = b"GET / HTTP/1.1\r\n"
    filler = b""
    while len(head) + len(filler) < size:
        filler += b"X-Pad: " + b"p" * min(100, size - len(head) - len(filler)) + b"\r\n"
    return head + filler + host_line


def test_huge_headers_without_host_hit_the_limit():
    data = padded_request(20000)
    for cut in range(0, len(data), 97):
        result = sniff_or_error(data[:cut])
        assert result is NEED_MORE if cut < 8192 else isinstance(result, SniffError), cut
    with pytest.raises(SniffError, match="no Host header in the first 8192 bytes"):
        sniff(data[:8192])
    assert sniff(data[:8191]) is NEED_MORE


def test_host_beyond_the_limit_is_refused():
    data = padded_request(9000, b"Host: far.example\r\n")
    with pytest.raises(SniffError, match="first 8192 bytes"):
        sniff(data)
    assert sniff(data, max_header_bytes=len(data)) == ("http", "far.example")
    with pytest.raises(SniffError):
        sniff(data, max_header_bytes=len(data) - 1)


def test_one_endless_line_hits_the_limit():
    assert sniff(b"GET /" + b"a" * 8000) is NEED_MORE
    with pytest.raises(SniffError):
        sniff(b"GET /" + b"a" * 9000)
    with pytest.raises(SniffError):
        sniff(b"GET / HTTP/1.1\r\nHost: " + b"a" * 9000, max_header_bytes=8192)


def test_bytes_like_prefixes():
    data = b"GET / HTTP/1.1\r\nHost: a.example\r\n"
    assert sniff(bytearray(data)) == sniff(memoryview(data)) == ("http", "a.example")


# --- TLS -----------------------------------------------------------------

def ssl_client_hello(server_hostname, tls12_only=False):
    """The bytes an ssl-module client sends first."""
    ctx = ssl.create_default_context()
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if server_hostname is None:
        ctx.check_hostname = False
    outgoing = ssl.MemoryBIO()
    client = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def refragment(hello, size):
    """The same ClientHello split into handshake records of `size` bytes."""
    assert hello[0] == 0x16 and int.from_bytes(hello[3:5], "big") == len(hello) - 5
    stream = hello[5:]
    return b"".join(hello[:3] + len(stream[i:i + size]).to_bytes(2, "big") + stream[i:i + size]
                    for i in range(0, len(stream), size))


# (server_hostname, TLS 1.2 only, name as it travels, name sniff returns)
SSL_HELLOS = [
    ("api.example.com", False, b"api.example.com", "api.example.com"),
    ("api.example.com", True, b"api.example.com", "api.example.com"),
    ("API.Example.COM", False, b"API.Example.COM", "api.example.com"),
    ("b\u00fccher.example", False, b"xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("b\u00fccher.example", True, b"xn--bcher-kva.example", "xn--bcher-kva.example"),
]


@pytest.mark.parametrize("server_hostname, tls12_only, wire_name, name", SSL_HELLOS)
def test_tls_at_every_offset(server_hostname, tls12_only, wire_name, name):
    hello = ssl_client_hello(server_hostname, tls12_only)
    # The name is the last field of the server_name extension: it decides.
    ready = hello.index(wire_name) + len(wire_name)
    for cut in range(len(hello) + 1):
        expected = NEED_MORE if cut < ready else ("tls", name)
        assert sniff(hello[:cut]) == expected, cut


@pytest.mark.parametrize("size", [1, 7, 100, 16384])
def test_tls_hello_over_several_records(size):
    hello = ssl_client_hello("api.example.com")
    data = refragment(hello, size)
    end_in_stream = hello.index(b"api.example.com") + len(b"api.example.com") - 5
    ready = end_in_stream + 5 * ((end_in_stream - 1) // size + 1)
    for cut in range(len(data) + 1):
        expected = NEED_MORE if cut < ready else ("tls", "api.example.com")
        assert sniff(data[:cut]) == expected, cut


CHANGE_CIPHER_SPEC = b"\x14\x03\x03\x00\x01\x01"


def test_tls_records_after_the_hello_do_not_matter():
    hello = ssl_client_hello("api.example.com")
    early_data = b"\x17\x03\x03\x00\x05hello"
    assert sniff(hello + CHANGE_CIPHER_SPEC + early_data) == ("tls", "api.example.com")


def test_tls_hello_interrupted_by_another_record():
    hello = refragment(ssl_client_hello("api.example.com"), 100)
    with pytest.raises(SniffError, match="interrupted"):
        sniff(hello[:105] + CHANGE_CIPHER_SPEC + hello[105:])


@pytest.mark.parametrize("server_hostname, tls12_only", [
    (None, False), (None, True),
    ("127.0.0.1", False),  # ssl sends no SNI for an IP address
])
def test_tls_without_sni(server_hostname, tls12_only):
    hello = ssl_client_hello(server_hostname, tls12_only)
    # Once the last extension header has arrived, its body (padding) cannot
    # add an SNI: the verdict may come before the final byte, never go back.
    verdicts = [sniff_or_error(hello[:cut]) for cut in range(len(hello) + 1)]
    first_error = next(i for i, v in enumerate(verdicts) if v is not NEED_MORE)
    assert all(v is NEED_MORE for v in verdicts[:first_error])
    for verdict in verdicts[first_error:]:
        assert isinstance(verdict, SniffError) and str(verdict) == "TLS ClientHello without SNI"


def u8(n):
    return n.to_bytes(1, "big")


def u16(n):
    return n.to_bytes(2, "big")


def u24(n):
    return n.to_bytes(3, "big")


def sni_extension(*entries, list_len=None):
    """server_name extension body: (name_type, name) entries."""
    names = b"".join(u8(kind) + u16(len(name)) + name for kind, name in entries)
    return u16(len(names) if list_len is None else list_len) + names


def built_hello(extensions=((0, sni_extension((0, b"a.example"))),), *, record=b"\x16\x03\x01",
                record_len=None, hs_type=1, hs_len=None, version=b"\x03\x03", session_id=b"",
                session_id_len=None, suites=b"\x13\x01\x13\x02", suites_len=None,
                compression=b"\x00", ext_len=None, ext_body_len=None, with_extensions=True):
    """A hand-built ClientHello; every length may be overridden to lie."""
    exts = b"".join(u16(kind) + u16(len(body) if ext_body_len is None else ext_body_len) + body
                    for kind, body in extensions)
    body = (version + bytes(32)
            + u8(len(session_id) if session_id_len is None else session_id_len) + session_id
            + u16(len(suites) if suites_len is None else suites_len) + suites
            + u8(len(compression)) + compression)
    if with_extensions:
        body += u16(len(exts) if ext_len is None else ext_len) + exts
    handshake = u8(hs_type) + u24(len(body) if hs_len is None else hs_len) + body
    return record + u16(len(handshake) if record_len is None else record_len) + handshake


ALPN = (16, b"\x00\x03\x02h2")


@pytest.mark.parametrize("hello, expected", [
    (built_hello(), "a.example"),
    (built_hello((ALPN, (0, sni_extension((0, b"Late.Example."))))), "late.example"),
    (built_hello(((0, sni_extension((0, b"a.example"), (0, b"b.example"))),)), "a.example"),
    (built_hello(session_id=bytes(32), version=b"\x03\x01"), "a.example"),
])
def test_tls_built_hellos(hello, expected):
    assert sniff(hello) == ("tls", expected)


@pytest.mark.parametrize("hello, message", [
    (built_hello(record=b"\x16\x02\x00"), "not a TLS record"),
    (built_hello(record_len=0), "record length 0 out of range"),
    (built_hello(record_len=16385), "out of range"),
    (built_hello(hs_type=2), "not a ClientHello"),
    (built_hello(version=b"\x02\x00"), "version"),
    (built_hello(session_id=bytes(33)), "session id of 33 bytes"),
    (built_hello(session_id_len=200), "session id"),
    (built_hello(suites=b"\x13"), "cipher suites length 1"),
    (built_hello(suites=b""), "cipher suites length 0"),
    (built_hello(suites_len=0xFFFE), "overruns"),
    (built_hello(compression=b""), "without compression"),
    (built_hello(with_extensions=False), "without SNI"),
    (built_hello(()), "without SNI"),
    (built_hello((ALPN,)), "without SNI"),
    (built_hello(ext_len=0xFFFF), "extensions length disagrees"),
    (built_hello(ext_len=3), "extensions length disagrees"),
    (built_hello(ext_body_len=0xFFF0), "overruns"),
    (built_hello(hs_len=20), "overruns"),
    (built_hello(((0, sni_extension((0, b"a.example"), list_len=200)),)), "list length disagrees"),
    (built_hello(((0, sni_extension((0, b"a.example"), list_len=2)),)), "list length disagrees"),
    (built_hello(((0, u16(3) + b"\x00\x00\xff"),)), "overruns"),
    (built_hello(((0, b""),)), "overruns"),
    (built_hello(((0, sni_extension((1, b"a.example"))),)), "without SNI"),
    (built_hello(((0, sni_extension((0, b""))),)), "invalid host name"),
    (built_hello(((0, sni_extension((0, b"a example"))),)), "invalid host name"),
    (built_hello(((0, sni_extension((0, b"\xe2\x84\xaa.example"))),)), "not ASCII"),
])
def test_tls_lying_or_malformed(hello, message):
    with pytest.raises(SniffError, match=message):
        sniff(hello)


def test_tls_hello_larger_than_the_limit():
    padding = (21, bytes(9000))  # padding extension before SNI
    data = refragment(built_hello((padding, (0, sni_extension((0, b"a.example"))))), 4000)
    assert len(data) > 8192
    with pytest.raises(SniffError, match="no TLS server name in the first 8192 bytes"):
        sniff(data)
    assert sniff(data, max_header_bytes=len(data)) == ("tls", "a.example")


# --- hostile input -------------------------------------------------------

@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes(data):
    sniff_or_error(data)
    sniff_or_error(b"\x16" + data)
    sniff_or_error(b"\x16\x03\x01" + data)


HTTP_PIECES = [b"GET", b"POST", b" ", b"/", b"*", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n", b"\r",
               b"Host:", b"host: ", b"a.example", b"[::1]", b":80", b"X-A: b", b"\t",
               b"http://", b"@", b".", b"\x00", b"\xff"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(HTTP_PIECES), max_size=30))
def test_random_http_like(pieces):
    data = b"".join(pieces)
    full = sniff_or_error(data)
    # A decision never depends on where the prefix was cut: every shorter
    # prefix waits or gives the same answer.
    if not isinstance(full, SniffError):
        for cut in range(len(data)):
            assert sniff_or_error(data[:cut]) in (NEED_MORE, full), cut


REAL_HELLO = ssl_client_hello("api.example.com")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 700))
def test_mutated_real_hello(mutations, cut):
    hello = bytearray(REAL_HELLO)
    for index, value in mutations:
        if index < len(hello):
            hello[index] = value
    data = bytes(hello[:cut])
    full = sniff_or_error(data)
    if not isinstance(full, SniffError):
        for shorter in range(len(data)):
            assert sniff_or_error(data[:shorter]) in (NEED_MORE, full), shorter


# --- names ---------------------------------------------------------------

@pytest.mark.parametrize("value, host", [
    ("example.com", "example.com"),
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("example.com:8080", "example.com"),
    ("example.com:", "example.com"),
    (" \texample.com \t", "example.com"),
    ("under_score.example", "under_score.example"),
    ("127.0.0.1:80", "127.0.0.1"),
    ("[::1]", "::1"),
    ("[::1]:8080", "::1"),
    ("[2001:DB8:0:0::1]:443", "2001:db8::1"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("a" * 63 + ".example", "a" * 63 + ".example"),
])
def test_parse_host_header_value(value, host):
    assert parse_host_header_value(value) == host


@pytest.mark.parametrize("value", [
    "", " ", ":80", ".", "..", ".example.com", "a..b", "example.com..", "exa mple.com",
    "a:b:c", "::1", "example.com:123456", "example.com:8o", "[::1", "[::1]x", "[::1]:x",
    "[fe80::1%25eth0]", "[127.0.0.1]", "[]", "\u212a.example", "b\u00fccher.example",
    "a" * 64 + ".example", ("a." * 127) + "ab", "a/b", "a%41.example",
])
def test_parse_host_header_value_refuses(value):
    with pytest.raises(SniffError) as info:
        parse_host_header_value(value)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


TABLE = {
    "api": ["api.example.com"],
    "www": ["Example.com.", "*.example.com"],
    "deep": ["*.b.example.com"],
    "local": ["[::1]", "127.0.0.1", "localhost"],
}


@pytest.mark.parametrize("host, app", [
    ("api.example.com", "api"),
    ("API.Example.COM.", "api"),
    ("example.com", "www"),
    ("a.example.com", "www"),
    ("x.api.example.com", "www"),
    ("b.example.com", "www"),  # *.b.example.com does not match b.example.com
    ("a.b.example.com", "deep"),
    ("x.y.b.example.com", "deep"),
    ("::1", "local"),
    ("[0::1]", "local"),
    ("127.0.0.1", "local"),
    ("LOCALHOST", "local"),
    ("example.org", None),
    ("com", None),
    ("notexample.com", None),
    ("", None),
    ("bad name", None),
    ("::2", None),
])
def test_host_table_lookup(host, app):
    assert HostTable(TABLE).lookup(host) == app


def test_host_table_routes_what_sniff_returns():
    table = HostTable(TABLE)
    _, host = sniff(b"GET / HTTP/1.1\r\nHost: [::1]:9000\r\n")
    assert table.lookup(host) == "local"
    _, name = sniff(ssl_client_hello("Z.B.Example.com"))
    assert table.lookup(name) == "deep"


@pytest.mark.parametrize("mapping, message", [
    ({"a": ["x.example"], "b": ["X.Example."]}, "claimed by both 'a' and 'b'"),
    ({"a": ["*.x.example"], "b": ["*.X.EXAMPLE"]}, "claimed by both"),
    ({"a": ["[::1]"], "b": ["0::1"]}, "claimed by both"),
    ({"a": "x.example"}, "not a string"),
    ({"a": [42]}, "not a string"),
    ({"a": ["*"]}, "invalid host pattern"),
    ({"a": ["*."]}, "invalid host pattern"),
    ({"a": ["a.*.example"]}, "invalid host pattern"),
    ({"a": ["*example.com"]}, "invalid host pattern"),
    ({"a": ["**.example.com"]}, "invalid host pattern"),
    ({"a": [".example.com"]}, "invalid host pattern"),
    ({"a": ["example.com:80"]}, "invalid host pattern"),
    ({"a": [""]}, "invalid host pattern"),
    ({"a": ["*.[::1]"]}, "invalid host pattern"),
    ({"a": ["b\u00fccher.example"]}, "invalid host pattern"),
])
def test_host_table_refuses(mapping, message):
    with pytest.raises(ValueError, match=message) as info:
        HostTable(mapping)
    assert "\n" not in str(info.value)


def test_host_table_allows_overlaps_that_are_not_duplicates():
    table = HostTable({"a": ["x.example", "x.example", "*.x.example"], "b": ["*.y.x.example", "y.x.example"]})
    assert [table.lookup(h) for h in ("x.example", "y.x.example", "z.y.x.example", "z.x.example")] == \
        ["a", "b", "b", "a"]
