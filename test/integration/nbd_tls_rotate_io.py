#!/usr/bin/env python3
"""One libnbd connection over TLS doing verified I/O until told to stop, for the certificate
rotation test: it must survive every rotation untouched (any error, reconnect or wrong byte
fails it).

usage: nbd_tls_rotate_io.py URI CERT_DIR SOURCE_FILE PROGRESS_FILE STOP_FILE
The volume's first half holds SOURCE_FILE's bytes (random reads are checked against it); the
second half is scratch (random writes, each read back and checked). PROGRESS_FILE gets the
number of verified operations so far; STOP_FILE appearing ends the loop (exit 0).
"""
import os
import random
import sys
import time

import nbd

uri, cert_dir, source, progress, stop = sys.argv[1:6]
data = open(source, "rb").read()
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(cert_dir)
h.connect_uri(uri)
assert h.get_tls_negotiated(), "not TLS"
size = h.get_size()
half = len(data)
assert size >= 2 * half, f"volume of {size} bytes, want at least {2 * half}"

ops = 0
deadline = time.monotonic() + 240  # the test stops us long before; never run away
rng = random.Random(1234)


def report():
    with open(progress + ".tmp", "w") as f:
        f.write(str(ops))
    os.replace(progress + ".tmp", progress)


while not os.path.exists(stop):
    if time.monotonic() > deadline:
        sys.exit("not stopped within 240 s")
    off = rng.randrange(0, half - 65536) & ~511
    got = h.pread(65536, off)
    if got != data[off:off + 65536]:
        sys.exit(f"read at {off} differs from the source")
    woff = half + (rng.randrange(0, half - 4096) & ~4095)
    block = os.urandom(4096)
    h.pwrite(block, woff)
    if h.pread(4096, woff) != block:
        sys.exit(f"write at {woff} did not read back")
    ops += 1
    if ops % 10 == 0:
        report()
h.flush()
h.shutdown()
report()
print(f"{ops} verified operations on one connection")
