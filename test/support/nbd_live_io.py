#!/usr/bin/python3
"""One libnbd connection doing verified I/O until told to stop. The certificate rotation tests
run it across a rotation, which must not touch the connection (any error, reconnect or wrong
byte fails it): test/controller/tls_rotation_test.cpp (gRPC certificates, plain NBD on a unix
socket) and test/integration/nbd_tls_rotate.sh (the NBD server's own TLS certificates).

usage: nbd_live_io.py [--tls CERT_DIR] [--source FILE] URI PROGRESS_FILE STOP_FILE
Random 4 KiB writes, each read back and checked. --tls requires TLS with the client
certificates in CERT_DIR. --source: the volume's first half holds FILE's bytes (random 64 KiB
reads are checked against it) and the writes go to the second half. PROGRESS_FILE gets the
number of verified operations so far; STOP_FILE appearing ends the loop (exit 0).
"""
import argparse
import os
import random
import sys
import time

import nbd

ap = argparse.ArgumentParser()
ap.add_argument("--tls", metavar="CERT_DIR")
ap.add_argument("--source", metavar="FILE")
ap.add_argument("uri")
ap.add_argument("progress")
ap.add_argument("stop")
args = ap.parse_args()
progress, stop = args.progress, args.stop

h = nbd.NBD()
if args.tls:
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(args.tls)
h.connect_uri(args.uri)
if args.tls:
    assert h.get_tls_negotiated(), "not TLS"
size = h.get_size()
data = b""
if args.source:
    data = open(args.source, "rb").read()
    assert size >= 2 * len(data), f"volume of {size} bytes, want at least {2 * len(data)}"
scratch = len(data)  # writes go to [scratch, size)

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
    if data:
        off = rng.randrange(0, len(data) - 65536) & ~511
        if h.pread(65536, off) != data[off:off + 65536]:
            sys.exit(f"read at {off} differs from the source")
    woff = scratch + (rng.randrange(0, size - scratch - 4096) & ~4095)
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
