#!/usr/bin/python3
"""One libnbd connection doing verified I/O until told to stop: the gRPC certificate rotation
test runs it across the rotation, which must not touch NBD (any error, reconnect or wrong byte
fails it).

usage: nbd_live_io.py URI PROGRESS_FILE STOP_FILE
Random 4 KiB writes, each read back and checked. PROGRESS_FILE gets the number of verified
operations so far; STOP_FILE appearing ends the loop (exit 0).
"""
import os
import random
import sys
import time

import nbd

uri, progress, stop = sys.argv[1:4]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
ops = 0
deadline = time.monotonic() + 240  # the test stops us long before; never run away
rng = random.Random(4321)


def report():
    with open(progress + ".tmp", "w") as f:
        f.write(str(ops))
    os.replace(progress + ".tmp", progress)


while not os.path.exists(stop):
    if time.monotonic() > deadline:
        sys.exit("not stopped within 240 s")
    off = rng.randrange(0, size - 4096) & ~4095
    block = os.urandom(4096)
    h.pwrite(block, off)
    if h.pread(4096, off) != block:
        sys.exit(f"write at {off} did not read back")
    ops += 1
    if ops % 10 == 0:
        report()
h.flush()
h.shutdown()
report()
print(f"{ops} verified operations on one connection")
