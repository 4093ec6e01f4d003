#!/usr/bin/env python3
"""Fencing through real libnbd clients (fence.sh drives it; docs/design.md "Fencing").

  fence_clients.py takeover SOCK VOL   epoch 3 writes, epoch 4 takes over: the epoch-3 client's
                                       next write fails with EPERM and never lands; reconnects
                                       at 3 and without an epoch are refused with the messages;
                                       malformed names are refused saying what is wrong.
  fence_clients.py connect SOCK NAME   GO for NAME: exit 0 if granted, else print the error, 1.
  fence_clients.py split-brain SOCK VOL BASE ROUNDS SECONDS
                                       two writers take turns claiming the volume with rising
                                       epochs while both hammer the same 64 blocks; afterwards
                                       no block holds a write issued after a newer epoch was
                                       accepted, and every block holds its newest acknowledged
                                       write.
"""
import errno
import random
import struct
import sys
import threading
import time

import nbd

BLOCK = 4096


def connect(sock, name):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h


def refused(sock, name):
    """The server's message for a GO of NAME that must be refused (fails the test if it is
    granted). libnbd keeps the message out of its error string and shows it in its debug
    output only ("server error message: ..."), so that is where it is taken from."""
    msgs = []
    h = nbd.NBD()
    h.set_debug_callback(lambda ctx, msg: msgs.append(msg))
    h.set_debug(True)
    h.set_export_name(name)
    try:
        h.connect_unix(sock)
    except nbd.Error as e:
        said = [m.split("server error message: ", 1)[1] for m in msgs
                if "server error message: " in m]
        return " | ".join(said) + " | " + (e.string or "")
    h.shutdown()
    sys.exit(f"FAIL: export {name!r} was granted, want a refusal")


def expect(cond, what):
    if not cond:
        sys.exit(f"FAIL: {what}")


def cmd_takeover(sock, vol):
    a = connect(sock, f"{vol}@epoch=3")
    pat_a = bytes([0xA3]) * (1 << 20)
    a.pwrite(pat_a, 0)
    a.flush()
    t0 = time.monotonic()
    b = connect(sock, f"{vol}@epoch=4")
    print(f"takeover: epoch 4 accepted in {(time.monotonic() - t0) * 1000:.2f} ms")
    try:
        a.pwrite(bytes([0xA4]) * (1 << 20), 1 << 20)
        sys.exit("FAIL: the epoch-3 client wrote after epoch 4 took over")
    except nbd.Error as e:
        expect(e.errnum == errno.EPERM, f"epoch-3 write failed with {e.errno} ({e.string}), want EPERM")
    try:
        a.pread(4096, 0)
        sys.exit("FAIL: the epoch-3 client read after epoch 4 took over")
    except nbd.Error as e:
        expect(e.errnum == errno.EPERM, f"epoch-3 read failed with {e.errno}, want EPERM")
    expect(b.pread(1 << 20, 0) == pat_a, "epoch 3's write before the takeover is lost")
    expect(b.pread(1 << 20, 1 << 20) == bytes(1 << 20), "epoch 3's refused write landed")
    b.pwrite(bytes([0xB4]) * 4096, 2 << 20)
    b.flush()
    msg = refused(sock, f"{vol}@epoch=3")
    expect(f"stale epoch 3, volume {vol} is at 4" in msg, f"reconnect at 3 said: {msg!r}")
    msg = refused(sock, vol)
    expect(f"volume {vol} is fenced at epoch 4: name an epoch" in msg,
           f"epoch-less connect said: {msg!r}")
    for bad, says in [(f"{vol}@epoch=04", "leading zero"), (f"{vol}@epoch=x", "not a decimal"),
                      (f"{vol}@epoch=0", "is 0"), (f"{vol}@grow@epoch=5", "cannot be combined"),
                      (f"{vol}@epoch=99999999999999999999", "too large")]:
        msg = refused(sock, bad)
        expect(says in msg and "export name" in msg, f"{bad!r} refused with {msg!r}")
    a.shutdown()
    b.shutdown()
    print("takeover: PASS")


def cmd_connect(sock, name):
    try:
        h = connect(sock, name)
    except nbd.Error:
        print(refused(sock, name))
        return 1
    h.shutdown()
    return 0


# ---- split brain ---------------------------------------------------------------------------------

REGION = 64  # blocks everyone fights over
STAMP = struct.Struct("<QQQ")  # epoch, global sequence, writer


class Hammer:
    def __init__(self, sock, vol):
        self.sock, self.vol = sock, vol
        self.lock = threading.Lock()
        self.gseq = 0
        self.accepted = {}  # epoch -> gseq counter right after its connect returned
        self.acked = {}     # gseq -> (block, epoch, writer)
        self.refused = 0
        self.stale_connects = 0
        self.failures = []
        self.stop = False
        self.claims = [[], []]  # per writer: epochs to claim next (set by the coordinator)
        self.cv = threading.Condition(self.lock)

    def writer(self, w):
        h, epoch = None, 0
        rng = random.Random(w)
        while True:
            with self.lock:
                if self.stop:
                    break
                claim = self.claims[w].pop(0) if self.claims[w] else None
            if claim is not None:
                if h:
                    h.shutdown()
                h = connect(self.sock, f"{self.vol}@epoch={claim}")
                with self.cv:
                    self.accepted[claim] = self.gseq
                    self.cv.notify_all()
                epoch = claim
            if not h:
                time.sleep(0.001)
                continue
            block = rng.randrange(REGION)
            with self.lock:
                self.gseq += 1
                seq = self.gseq
            buf = STAMP.pack(epoch, seq, w) + bytes([seq & 0xFF]) * (BLOCK - STAMP.size)
            try:
                h.pwrite(buf, block * BLOCK)
                with self.lock:
                    self.acked[seq] = (block, epoch, w)
            except nbd.Error as e:
                if e.errnum != errno.EPERM:
                    raise
                with self.lock:
                    self.refused += 1
                # An old target that keeps trying: a stale reconnect must be refused too.
                try:
                    connect(self.sock, f"{self.vol}@epoch={epoch}").shutdown()
                    with self.lock:
                        self.failures.append(f"writer {w} reconnected at stale epoch {epoch}")
                except nbd.Error:
                    with self.lock:
                        self.stale_connects += 1
        if h:
            h.shutdown()


def cmd_split_brain(sock, vol, base, rounds, seconds):
    hm = Hammer(sock, vol)
    threads = [threading.Thread(target=hm.writer, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    per_round = seconds / rounds
    for r in range(rounds):
        epoch = base + r
        with hm.cv:
            hm.claims[r % 2].append(epoch)
            if not hm.cv.wait_for(lambda: epoch in hm.accepted, timeout=10):
                sys.exit(f"FAIL: epoch {epoch} was never accepted")
        time.sleep(per_round)  # let both writers fight at this epoch: pacing, not sync
    with hm.lock:
        hm.stop = True
    for t in threads:
        t.join()

    h = connect(sock, f"{vol}@epoch={base + rounds - 1}")
    data = h.pread(REGION * BLOCK, 0)
    h.shutdown()
    newest = {}  # block -> gseq of its newest acknowledged write
    for seq, (block, _, _) in hm.acked.items():
        newest[block] = max(newest.get(block, 0), seq)
    bad = len(hm.failures)
    for f in hm.failures:
        print(f)
    # No write issued after a newer epoch was accepted may have been acknowledged either.
    for seq, (block, epoch, w) in sorted(hm.acked.items()):
        late = [e for e, at in hm.accepted.items() if e > epoch and seq > at]
        if late:
            print(f"write seq {seq} (epoch {epoch}, writer {w}) was acknowledged after epoch "
                  f"{late[0]} was accepted at seq {hm.accepted[late[0]]}")
            bad += 1
    for block in range(REGION):
        epoch, seq, w = STAMP.unpack_from(data, block * BLOCK)
        if seq == 0:
            expect(block not in newest, f"block {block} lost its acknowledged write {newest.get(block)}")
            continue
        # A write issued after a newer epoch had been accepted must never be on disk.
        late = [e for e, at in hm.accepted.items() if e > epoch and seq > at]
        if late:
            print(f"block {block}: epoch {epoch} seq {seq} writer {w} landed after epoch {late[0]} "
                  f"was accepted at seq {hm.accepted[late[0]]}")
            bad += 1
        if newest.get(block) != seq:
            print(f"block {block}: holds seq {seq} (epoch {epoch}), newest acknowledged is "
                  f"{newest.get(block)}")
            bad += 1
    print(f"split-brain: {len(hm.acked)} writes acknowledged, {hm.refused} refused (EPERM), "
          f"{hm.stale_connects} stale reconnects refused, {rounds} takeovers")
    expect(bad == 0, f"{bad} blocks broke the fence")
    expect(hm.refused > 0, "no write was ever refused: the writers never overlapped")
    print("split-brain: PASS")


def main():
    cmd = sys.argv[1]
    if cmd == "takeover":
        cmd_takeover(sys.argv[2], sys.argv[3])
    elif cmd == "connect":
        sys.exit(cmd_connect(sys.argv[2], sys.argv[3]))
    elif cmd == "split-brain":
        cmd_split_brain(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                        float(sys.argv[6]))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
