#!/usr/bin/env python3
"""STARTTLS on the wire, from raw sockets (Python's ssl module is OpenSSL, a second TLS stack
next to libnbd's and qemu's GnuTLS): what a server in TLS-required mode must refuse before TLS,
the STARTTLS exchange itself, a full session inside TLS, and the certificates it must refuse.

Environment: PORT (the daemon's TLS listener on 127.0.0.1), CERTS (make-certs.sh output),
VOL (a writable volume of at least 1 MiB). Arguments select cases by name.
"""
import os
import socket
import ssl
import struct
import sys
import warnings

HOST = "127.0.0.1"
PORT = int(os.environ["PORT"])
CERTS = os.environ["CERTS"]
VOL = os.environ["VOL"].encode()

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_PEEK, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 4, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
ERR = 1 << 31
REP_ERR_INVALID, REP_ERR_TLS_REQD, REP_ERR_POLICY = ERR | 3, ERR | 5, ERR | 2
REQ_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3


class Fail(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Fail(what)


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def connect():
    s = socket.create_connection((HOST, PORT), timeout=15)
    magic, opt, hflags = struct.unpack(">QQH", recv_exact(s, 18))
    check(magic == NBDMAGIC and opt == IHAVEOPT, "bad greeting")
    check(hflags & 1, "server is not fixed newstyle")
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    return s


def send_opt(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def read_reply(s):
    magic, opt, typ, ln = struct.unpack(">QIII", recv_exact(s, 20))
    check(magic == REPLY_MAGIC, f"bad option reply magic {magic:#x}")
    return opt, typ, recv_exact(s, ln)


def single_reply(s, opt, data=b""):
    send_opt(s, opt, data)
    ropt, typ, _ = read_reply(s)
    check(ropt == opt, f"reply for option {ropt}, sent {opt}")
    return typ


def info_payload(name, infos=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_payload(name, queries):
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q
    return out


def tls_ctx(cert="client", ca=None, min_v=None, max_v=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca or os.path.join(CERTS, "ca.crt"))
    if cert:
        base = os.path.join(CERTS, cert)
        ctx.load_cert_chain(base + ".crt", base + ".key")
    if min_v:
        ctx.minimum_version = min_v
    if max_v:
        ctx.maximum_version = max_v
    return ctx


def starttls(ctx):
    s = connect()
    check(single_reply(s, OPT_STARTTLS) == REP_ACK, "STARTTLS not acked")
    return ctx.wrap_socket(s, server_hostname=HOST)


def closed_without_reply(s):
    """True when the server hangs up without sending anything (or only a TLS alert)."""
    try:
        data = s.recv(64)
    except (ConnectionResetError, ssl.SSLError):
        return True
    return data == b""


def refused_inside_tls(ctx, what):
    """The handshake, or the first exchange after it (TLS 1.3 clients finish their side before
    the server has looked at their certificate), must fail; no option reply may come."""
    try:
        t = starttls(ctx)
        send_opt(t, OPT_LIST)
        got = t.recv(20)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, EOFError) as e:
        return str(e)
    check(got == b"", f"{what}: the server answered ({got!r}) instead of refusing")
    return "EOF"


# ---- cases ----

def case_refused_before_tls():
    s = connect()
    for what, opt, data in [
        ("LIST", OPT_LIST, b""),
        ("INFO", OPT_INFO, info_payload(VOL, (1, 2, 3))),
        ("GO", OPT_GO, info_payload(VOL)),
        ("STRUCTURED_REPLY", OPT_STRUCTURED_REPLY, b""),
        ("LIST_META_CONTEXT", OPT_LIST_META, meta_payload(VOL, [])),
        ("SET_META_CONTEXT", OPT_SET_META, meta_payload(VOL, [b"base:allocation"])),
        ("PEEK_EXPORT", OPT_PEEK, b""),
        ("unknown 0x4242", 0x4242, b"junk"),
    ]:
        typ = single_reply(s, opt, data)
        check(typ == REP_ERR_TLS_REQD, f"{what} before TLS: reply {typ:#x}, want ERR_TLS_REQD")
    typ = single_reply(s, OPT_STARTTLS, b"x")
    check(typ == REP_ERR_INVALID, f"STARTTLS with data: reply {typ:#x}, want ERR_INVALID")
    check(single_reply(s, OPT_ABORT) == REP_ACK, "ABORT before TLS is not acked")
    check(closed_without_reply(s), "connection still open after ABORT")


def case_export_name_before_tls_closes():
    s = connect()
    send_opt(s, OPT_EXPORT_NAME, VOL)
    check(closed_without_reply(s), "EXPORT_NAME before TLS was answered")


def case_oversize_option_before_tls_closes():
    s = connect()
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_LIST, 65 * 1024 + 1))
    check(closed_without_reply(s), "an oversize option before TLS was not refused by hanging up")


def case_session_inside_tls():
    t = starttls(tls_ctx())
    check(t.version() == "TLSv1.3", f"negotiated {t.version()}, want TLSv1.3 (preferred)")
    check(t.getpeercert() is not None, "no server certificate")
    send_opt(t, OPT_LIST)
    names = []
    while True:
        opt, typ, data = read_reply(t)
        if typ == REP_ACK:
            break
        check(typ == REP_SERVER, f"LIST inside TLS: reply {typ:#x}")
        names.append(data[4:4 + struct.unpack(">I", data[:4])[0]])
    check(VOL in names, f"LIST inside TLS does not name {VOL!r}: {names}")
    check(single_reply(t, OPT_STARTTLS) == REP_ERR_INVALID, "a second STARTTLS is not ERR_INVALID")
    send_opt(t, OPT_GO, info_payload(VOL))
    size = None
    while True:
        opt, typ, data = read_reply(t)
        if typ == REP_ACK:
            break
        check(typ == REP_INFO, f"GO inside TLS: reply {typ:#x}")
        if struct.unpack(">H", data[:2])[0] == 0:
            size = struct.unpack(">Q", data[2:10])[0]
    check(size is not None and size >= 1 << 20, f"GO: export size {size}")
    # Transmission inside TLS: write, flush, read back, disconnect.
    # Requests in flight together may complete in any order, so each waits for the one before.
    payload = os.urandom(65536)

    def request(cmd, cookie, offset, length, data=b""):
        t.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, cmd, cookie, offset, length) + data)
        magic, err, got_cookie = struct.unpack(">IIQ", recv_exact(t, 16))
        check(magic == SIMPLE_REPLY_MAGIC and err == 0 and got_cookie == cookie,
              f"reply {magic:#x} error {err} cookie {got_cookie}, want cookie {cookie}")
        return recv_exact(t, length) if cmd == CMD_READ else b""

    request(CMD_WRITE, 7, 4096, len(payload), payload)
    request(CMD_FLUSH, 8, 0, 0)
    check(request(CMD_READ, 9, 4096, len(payload)) == payload,
          "read back inside TLS differs from the write")
    t.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_DISC, 10, 0, 0))
    check(closed_without_reply(t), "the server kept the connection after DISC")


def case_tls12_is_accepted():
    t = starttls(tls_ctx(max_v=ssl.TLSVersion.TLSv1_2))
    check(t.version() == "TLSv1.2", f"negotiated {t.version()}")
    check(single_reply(t, OPT_STRUCTURED_REPLY) == REP_ACK, "STRUCTURED_REPLY inside TLS 1.2")


def case_tls11_is_refused():
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # offering 1.1 is the point
    ctx = tls_ctx(min_v=ssl.TLSVersion.TLSv1, max_v=ssl.TLSVersion.TLSv1_1)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer 1.1 at all
    s = connect()
    check(single_reply(s, OPT_STARTTLS) == REP_ACK, "STARTTLS not acked")
    try:
        ctx.wrap_socket(s, server_hostname=HOST)
    except ssl.SSLError as e:
        # The server's answer, not a local refusal: a protocol_version alert.
        check("VERSION" in e.reason.upper() or "PROTOCOL" in e.reason.upper(),
              f"TLS 1.1 refused for another reason: {e}")
        return
    raise Fail("a TLS 1.1 handshake succeeded")


def case_plaintext_behind_starttls_is_not_processed():
    # A man in the middle appends a plaintext option behind STARTTLS: it must never be
    # answered as an option; the TLS handshake that follows fails on it instead.
    s = connect()
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0) +
              struct.pack(">QII", IHAVEOPT, OPT_STRUCTURED_REPLY, 0))
    opt, typ, _ = read_reply(s)
    check(opt == OPT_STARTTLS and typ == REP_ACK, "STARTTLS not acked")
    rest = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            rest += chunk
    except ConnectionResetError:
        pass
    check(struct.pack(">Q", REPLY_MAGIC) not in rest, "the injected option was answered")
    check(rest == b"" or rest[0] == 0x15, f"expected EOF or a TLS alert, got {rest[:16]!r}")


def case_no_client_certificate():
    refused_inside_tls(tls_ctx(cert=None), "no client certificate")


def case_certificate_of_another_ca():
    refused_inside_tls(tls_ctx(cert="other/client"), "another CA's certificate")


def case_expired_certificate():
    refused_inside_tls(tls_ctx(cert="client-expired"), "an expired certificate")


def case_server_certificate_verifies():
    # The client side of mutual TLS: the server proves itself with the configured chain, and a
    # client trusting only the other CA refuses it.
    t = starttls(tls_ctx())
    check(t.getpeercert()["subject"][0][0][1] == "nbd-csi test server main", "server subject")
    t.close()
    try:
        starttls(tls_ctx(ca=os.path.join(CERTS, "other", "ca.crt")))
    except ssl.SSLCertVerificationError:
        return
    raise Fail("a client trusting another CA accepted the server")


CASES = {n[5:]: f for n, f in sorted(globals().items()) if n.startswith("case_")}


def main():
    names = sys.argv[1:] or list(CASES)
    failed = 0
    for name in names:
        try:
            CASES[name]()
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - every failure is reported by name
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
    print(f"{len(names) - failed}/{len(names)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
