#!/usr/bin/env python3
"""The NBD seeds: whole client transcripts in the layout nbd_codec_fuzz.cpp documents, so the
fuzzer starts from inputs that reach every negotiation branch and the transmission phase instead
of having to discover the magics itself. make_seeds.py writes them into corpus/nbd_codec and
corpus/nbd_negotiate; run alone, this writes them into OUTDIR.

usage: make_nbd_seeds.py OUTDIR
"""
import os
import struct
import sys

IHAVEOPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513
(OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO,
 OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META) = (1, 2, 3, 5, 6, 7, 8, 9, 10)
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def flags(f):
    return struct.pack(">I", f)


def opt(option, payload=b"", length=None):
    n = len(payload) if length is None else length
    return struct.pack(">QII", IHAVEOPT, option, n) + payload


def info(name, infos=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta(name, queries):
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def req(cmd, off=0, length=0, fl=0, cookie=1, data=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, fl, cmd, cookie, off, length) + data


SEEDS = {
    "go_basic": flags(3) + opt(OPT_GO, info("disk0", (1, 2, 3))) + req(READ, 0, 4096)
    + req(WRITE, 512, 16, FUA, 2, b"x" * 16) + req(FLUSH) + req(TRIM, 0, 4096)
    + req(WRITE_ZEROES, 0, 8192, NO_HOLE | FAST_ZERO) + req(CACHE, 0, 1) + req(DISC),
    "go_structured_meta": flags(1) + opt(OPT_STRUCTURED_REPLY)
    + opt(OPT_LIST_META, meta("disk0", ["base:"]))
    + opt(OPT_SET_META, meta("disk0", ["base:allocation"])) + opt(OPT_GO, info("disk0"))
    + req(BLOCK_STATUS, 0, 65536, REQ_ONE, 40) + b"\x02" + struct.pack(">IIII", 4096, 3, 8192, 0)
    + req(READ, 4096, 512, DF) + req(WRITE, (1 << 20) - 8, 16, 0, 3, b"y" * 16),
    "export_name_ro": flags(1) + opt(OPT_EXPORT_NAME, b"ro") + req(WRITE, 0, 8, 0, 1, b"z" * 8)
    + req(READ, 4096, 4) + req(READ, 0, 0),
    "export_name_default_nozeroes": flags(3) + opt(OPT_EXPORT_NAME) + req(READ, 0, 1),
    "options_then_abort": flags(3) + opt(OPT_LIST) + opt(OPT_INFO, info("nope"))
    + opt(OPT_INFO, info("big", (1,))) + opt(0x4242, b"junk") + opt(OPT_STARTTLS)
    + opt(OPT_SET_META, meta("disk0", ["base:allocation"])) + opt(OPT_ABORT),
    "big_export_edges": flags(3) + opt(OPT_GO, info("big"))
    + req(READ, 0xFFFFFFFFFFFFF000, 8192) + req(WRITE, 0, (64 << 20) + 1),
    "oversize_option": flags(3) + opt(OPT_GO, length=70000) + b"\0" * 64
    + opt(OPT_GO, info("disk0")) + req(READ, 0, 1),
    # Meant for the TLS-required pass: refused options, a bad STARTTLS, the real one, then a
    # full session inside TLS, including a second STARTTLS (invalid once TLS runs). In the
    # no-TLS pass the same bytes show STARTTLS refused by policy.
    "starttls_then_go": flags(3) + opt(OPT_LIST) + opt(OPT_GO, info("disk0"))
    + opt(OPT_STRUCTURED_REPLY) + opt(OPT_STARTTLS, b"x") + opt(OPT_STARTTLS)
    + opt(OPT_STARTTLS) + opt(OPT_STRUCTURED_REPLY)
    + opt(OPT_SET_META, meta("disk0", ["base:allocation"])) + opt(OPT_GO, info("disk0", (1,)))
    + req(BLOCK_STATUS, 0, 4096, 0, 7) + b"\x01" + struct.pack(">II", 4096, 0) + req(READ, 0, 512)
    + req(DISC),
    "starttls_export_name": flags(1) + opt(OPT_STARTTLS) + opt(OPT_EXPORT_NAME, b"ro")
    + req(READ, 0, 8),
    "export_name_before_tls": flags(3) + opt(OPT_EXPORT_NAME, b"disk0") + req(READ, 0, 1),
    "oversize_before_tls": flags(3) + opt(OPT_LIST, length=70000) + b"\0" * 64,
    "malformed_meta": flags(3) + opt(OPT_STRUCTURED_REPLY)
    + opt(OPT_SET_META, struct.pack(">I", 5) + b"disk0" + struct.pack(">II", 9, 50) + b"base:")
    + opt(OPT_GO, struct.pack(">I", 99) + b"disk0"),
}


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
