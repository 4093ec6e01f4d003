#!/usr/bin/python3
"""Point-in-time checker for snapshots taken under live writes (used by snap_pit.sh).

  snap_pit.py write URI LOG [--conns N] [--qd N] [--pre S] [--post S] -- SNAPSHOT CMD...
  snap_pit.py verify-snapshot URI LOG
  snap_pit.py verify-live URI LOG

Every 4 KiB block written carries a stamp: magic, block number, global sequence number and a
CRC32 over the whole block, so a block read back names the exact write that produced it (a torn
or mixed block fails the CRC). The writer keeps QD requests in flight on each of N connections,
never two to the same block at once (so each block's writes are totally ordered by sequence
number), and records for every write the monotonic time it was issued and acknowledged. While
writing, it runs the snapshot command, recording t0 (just before it is started) and t1 (once it
has exited), and keeps writing for a while afterwards.

A snapshot is point-in-time correct when, for every block, its content is the stamp of a
write to that block (or zeros if no write to the block was acknowledged before t0) that is
  - at least as new as the newest write to the block acknowledged before t0 (nothing acked
    before the snapshot began may be missing), and
  - issued before t1 (nothing written after the snapshot completed may appear).
Issue times are taken before the request is queued and ack times when the completion is
processed, so both errors lean towards accepting: the check cannot fail because of our own
timing slack, only because the snapshot holds data it must not.
"""
import os
import pickle
import random
import select
import struct
import subprocess
import sys
import time
import zlib

import nbd

BS = 4096
MAGIC = 0x534E4150504954  # "SNAPPIT"
HDR = struct.Struct("<QQQI")  # magic, block, seq, crc32 (of the block with this field zeroed)
ZERO = bytes(BS)


def stamp(block, seq):
    body = random.randbytes(BS - HDR.size)
    crc = zlib.crc32(HDR.pack(MAGIC, block, seq, 0) + body)
    return HDR.pack(MAGIC, block, seq, crc) + body


def parse(data):
    """(block, seq) of a valid stamp, None for zeros, raises ValueError for anything else."""
    if data == ZERO:
        return None
    magic, block, seq, crc = HDR.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("no stamp (magic %#x)" % magic)
    if zlib.crc32(HDR.pack(magic, block, seq, 0) + data[HDR.size:]) != crc:
        raise ValueError("stamp of block %d seq %d fails its CRC (torn or mixed write)" % (block, seq))
    return block, seq


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


class Writer:
    def __init__(self, uri, conns, qd):
        self.hs = [connect(uri) for _ in range(conns)]
        self.size = self.hs[0].get_size()
        self.blocks = self.size // BS
        self.qd = qd
        self.seq = 0
        self.busy = set()
        self.inflight = [0] * conns
        # Per write: [block, issue_ns, ack_ns]; the list index is the sequence number.
        self.writes = []
        self.errors = []

    def issue(self, ci, block):
        seq = self.seq
        self.seq += 1
        buf = nbd.Buffer.from_bytearray(bytearray(stamp(block, seq)))
        rec = [block, time.monotonic_ns(), 0]
        self.writes.append(rec)
        self.busy.add(block)
        self.inflight[ci] += 1

        def done(err, rec=rec, ci=ci, seq=seq, buf=buf):
            rec[2] = time.monotonic_ns()
            self.busy.discard(rec[0])
            self.inflight[ci] -= 1
            if err.value:
                self.errors.append("write seq %d block %d: errno %d" % (seq, rec[0], err.value))
            return 1  # retire the command

        self.hs[ci].aio_pwrite(buf, block * BS, completion=done)

    def pump(self, timeout):
        rl, wl = [], []
        for h in self.hs:
            d = h.aio_get_direction()
            if d & nbd.AIO_DIRECTION_READ:
                rl.append(h)
            if d & nbd.AIO_DIRECTION_WRITE:
                wl.append(h)
        fds = {h.aio_get_fd(): h for h in self.hs}
        r, w, _ = select.select([h.aio_get_fd() for h in rl], [h.aio_get_fd() for h in wl], [], timeout)
        for fd in w:
            fds[fd].aio_notify_write()
        for fd in r:
            fds[fd].aio_notify_read()
        if self.errors:
            sys.exit("FAIL: " + "; ".join(self.errors[:5]))

    def fill(self, next_block):
        for ci in range(len(self.hs)):
            while self.inflight[ci] < self.qd:
                b = next_block()
                if b is None:
                    return
                self.issue(ci, b)

    def random_block(self):
        for _ in range(64):
            b = random.randrange(self.blocks)
            if b not in self.busy:
                return b
        return None

    def drain(self):
        while sum(self.inflight):
            self.pump(0.01)


def cmd_write(args):
    opts = {"--conns": 2, "--qd": 8, "--pre": 1.0, "--post": 1.5}
    uri, log = args[0], args[1]
    i = 2
    while args[i] != "--":
        opts[args[i]] = float(args[i + 1]) if "." in args[i + 1] else int(args[i + 1])
        i += 2
    snap_cmd = args[i + 1:]
    w = Writer(uri, opts["--conns"], opts["--qd"])

    # Every block gets a stamp first, so that "zeros" in the snapshot can only mean a lost write.
    order = iter(range(w.blocks))
    while True:
        w.fill(lambda: next(order, None))
        if w.seq >= w.blocks:
            break
        w.pump(0.01)
    w.drain()
    filled = w.seq

    end = time.monotonic() + opts["--pre"]
    while time.monotonic() < end:
        w.fill(w.random_block)
        w.pump(0.005)

    t0 = time.monotonic_ns()
    proc = subprocess.Popen(snap_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while proc.poll() is None:
        w.fill(w.random_block)
        w.pump(0.001)
    t1 = time.monotonic_ns()
    out = proc.stdout.read().decode(errors="replace")
    if proc.returncode != 0:
        sys.exit("FAIL: snapshot command %s exited %d: %s" % (snap_cmd, proc.returncode, out))
    at_snapshot = w.seq

    end = time.monotonic() + opts["--post"]
    while time.monotonic() < end:
        w.fill(w.random_block)
        w.pump(0.005)
    w.drain()
    for h in w.hs:
        h.flush()
        h.shutdown()
    with open(log, "wb") as f:
        pickle.dump({"size": w.size, "writes": w.writes, "t0": t0, "t1": t1}, f)
    window = sum(1 for _, iss, ack in w.writes if iss < t1 and ack >= t0)
    print("writes: %d prefill, %d before the snapshot returned, %d total; snapshot command "
          "%.1f ms; %d writes in flight during it (the ambiguous window)"
          % (filled, at_snapshot, w.seq, (t1 - t0) / 1e6, window))


def read_blocks(uri, size):
    h = connect(uri)
    if h.get_size() < size:
        sys.exit("FAIL: %s is %d bytes, want >= %d" % (uri, h.get_size(), size))
    chunk = 4 << 20
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        data = h.pread(n, off)
        for i in range(0, n, BS):
            yield (off + i) // BS, data[i:i + BS]
    h.shutdown()


def load(log):
    with open(log, "rb") as f:
        d = pickle.load(f)
    per_block = {}
    for seq, (b, _, _) in enumerate(d["writes"]):
        per_block.setdefault(b, []).append(seq)
    return d, per_block


def cmd_verify_snapshot(uri, log):
    d, per_block = load(log)
    writes, t0, t1 = d["writes"], d["t0"], d["t1"]
    bad, newer, window = [], 0, 0
    for b, data in read_blocks(uri, d["size"]):
        seqs = per_block.get(b, [])
        acked = [s for s in seqs if writes[s][2] < t0]
        floor = acked[-1] if acked else None
        try:
            st = parse(data)
        except ValueError as e:
            bad.append("block %d: %s" % (b, e))
            continue
        if st is None:
            if floor is not None:
                bad.append("block %d reads zeros, but write seq %d was acked %.3f ms before the "
                           "snapshot began" % (b, floor, (t0 - writes[floor][2]) / 1e6))
            continue
        blk, seq = st
        if blk != b or seq >= len(writes) or writes[seq][0] != b:
            bad.append("block %d holds the stamp of block %d seq %d (misplaced write)" % (b, blk, seq))
        elif floor is not None and seq < floor:
            bad.append("block %d holds seq %d, older than seq %d acked %.3f ms before the snapshot "
                       "began" % (b, seq, floor, (t0 - writes[floor][2]) / 1e6))
        elif writes[seq][1] >= t1:
            bad.append("block %d holds seq %d, issued %.3f ms after the snapshot returned"
                       % (b, seq, (writes[seq][1] - t1) / 1e6))
        elif seq != floor:
            newer += 1  # a write from the ambiguous window made it in: allowed
    window = sum(1 for _, iss, ack in writes if iss < t1 and ack >= t0)
    after = sum(1 for _, iss, _ in writes if iss >= t1)
    for m in bad[:20]:
        print("  " + m, file=sys.stderr)
    print("snapshot: %d blocks checked, %d bad; %d writes in the ambiguous window, %d of them "
          "captured; %d writes issued after the snapshot returned (all excluded)"
          % (d["size"] // BS, len(bad), window, newer, after))
    if window == 0 or after == 0:
        sys.exit("FAIL: the snapshot did not happen under live writes (window %d, after %d): "
                 "the check would be vacuous" % (window, after))
    sys.exit(1 if bad else 0)


def cmd_verify_live(uri, log):
    d, per_block = load(log)
    bad = []
    for b, data in read_blocks(uri, d["size"]):
        want = per_block[b][-1] if b in per_block else None
        try:
            st = parse(data)
        except ValueError as e:
            bad.append("block %d: %s" % (b, e))
            continue
        got = st[1] if st else None
        if st and st[0] != b:
            bad.append("block %d holds the stamp of block %d" % (b, st[0]))
        elif got != want:
            bad.append("block %d holds seq %s, newest write was seq %s" % (b, got, want))
    for m in bad[:20]:
        print("  " + m, file=sys.stderr)
    print("live volume: %d blocks, %d not holding their newest write" % (d["size"] // BS, len(bad)))
    sys.exit(1 if bad else 0)


def main():
    a = sys.argv[1:]
    if len(a) >= 3 and a[0] == "write" and "--" in a:
        cmd_write(a[1:])
    elif len(a) == 3 and a[0] == "verify-snapshot":
        cmd_verify_snapshot(a[1], a[2])
    elif len(a) == 3 and a[0] == "verify-live":
        cmd_verify_live(a[1], a[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
