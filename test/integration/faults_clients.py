#!/usr/bin/python3
"""Clients that misbehave, against a live nbd-datapathd started with --workers 1 (so every
connection below shares one io_uring worker with the neighbour). Run by faults_clients.sh.

What it proves, case by case, with raw NBD sockets (the protocol from its spec):
  disconnect   clients vanish mid-request: half a WRITE payload sent (FIN, or RST), a header cut
               short, a header without its payload, pipelined READs never read and a WRITE cut
               short. Nothing half-sent is ever applied (the region keeps its earlier,
               acknowledged content), every acknowledged write reads back, the connections are
               all closed in the daemon afterwards.
  half_open    clients that stop reading replies (small receive buffers, READs pipelined until
               their send blocks): other connections, to other volumes and to the same volume,
               are served all along; a client that sent DISC behind a full socket gets every
               reply once it reads again, then EOF; everything is closed afterwards.
  many         1,000 concurrent connections over 4 volumes (RLIMIT_NOFILE raised): each writes
               a block and reads it back while all are open; closed by DISC, FIN or RST; the
               daemon's open connections, file descriptors and RSS come back to the baseline.
  slow         senders that dribble the handshake, the request header and the WRITE payload a
               byte (or a few) at a time: their writes land intact, and new connections are
               accepted and negotiated promptly while they dribble.
In every case a neighbour volume runs QD1 4 KiB reads and writes from a separate process: its
p50 and p99 over the case stay within the bound below of its solo figure taken just before, and
no request of it fails or stalls. The daemon's log is checked for engine invariant violations by
the wrapper after a clean shutdown.

Bound (stated, with margin for a loaded 2-core machine): p50 <= max(3 x solo p50, solo p50 +
1 ms), p99 <= max(5 x solo p99, solo p99 + 50 ms), max <= 2 s. A blocked worker shows as
seconds, which is what this is for.

Environment: NBD_SOCK, DAEMON_PID, API (nbdctl --api value), NBDCTL (path), FAULTS_CASES
(comma list, default all).
"""
import json
import os
import random
import resource
import select
import socket
import struct
import subprocess
import sys
import threading
import time

from nbd_wire import NBDMAGIC, IHAVEOPT, REPLY_MAGIC, REQ_MAGIC, SIMPLE_MAGIC, Closed, recv_exact

OPT_GO = 7
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
FLAG_FUA = 1
MIB = 1 << 20
VOL_SIZE = 64 * MIB
# What "back to the baseline" allows for the daemon's RSS after the connections closed: the heap
# of gRPC and logging threads moves by a few MiB on its own.
RSS_SLACK_KIB = 8 * 1024
SOCK = os.environ.get("NBD_SOCK", "")


def handshake_bytes(name):
    n = name.encode()
    go = struct.pack(">I", len(n)) + n + struct.pack(">H", 0)
    return struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, len(go)) + go


def finish_handshake(s, name):
    """Reads GO's replies after handshake_bytes(name) was sent (greeting already consumed)."""
    while True:
        magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        assert magic == REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        recv_exact(s, length)
        if rtype == 1:
            return
        assert not rtype & (1 << 31), f"GO {name} refused: {rtype:#x}"


def greeting(s):
    magic, opt, _ = struct.unpack(">QQH", recv_exact(s, 18))
    assert magic == NBDMAGIC and opt == IHAVEOPT, "bad greeting"


def connect(name, timeout=10.0, rcvbuf=None, linger0=False):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if linger0:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.settimeout(timeout)
    s.connect(SOCK)
    greeting(s)
    s.sendall(handshake_bytes(name))
    finish_handshake(s, name)
    return s


def req(cmd, off, length, handle, flags=0):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, handle, off, length)


def reply(s, data_len=0):
    """(handle, error, data) of one simple reply; data only for a successful READ."""
    magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == SIMPLE_MAGIC, f"bad reply magic {magic:#x}"
    return handle, err, (recv_exact(s, data_len) if err == 0 and data_len else b"")


def write(s, off, data, handle=1, flags=FLAG_FUA):
    s.sendall(req(CMD_WRITE, off, len(data), handle, flags) + data)
    h, err, _ = reply(s)
    assert h == handle and err == 0, f"WRITE at {off} failed: handle {h} error {err}"


def read(s, off, length, handle=2):
    s.sendall(req(CMD_READ, off, length, handle))
    h, err, data = reply(s, length)
    assert h == handle and err == 0, f"READ at {off} failed: handle {h} error {err}"
    return data


def disc(s):
    try:
        s.sendall(req(CMD_DISC, 0, 0, 0))
    except OSError:
        pass
    s.close()


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


def percentile(sorted_us, p):
    if not sorted_us:
        return 0.0
    return sorted_us[min(len(sorted_us) - 1, int(p / 100.0 * len(sorted_us)))]


# ---- the neighbour: QD1 probe in its own process -------------------------------------------


def probe_main():
    """Alternates 4 KiB READ and WRITE (FUA off) at random offsets of volume `nb`, one at a
    time. stdin: "start" opens a window, "stop" prints its figures as one JSON line."""
    s = connect("nb", timeout=10.0)
    rnd = random.Random(7)
    buf = os.urandom(4096)
    lat, errors, window = [], 0, False
    handle = 0
    while True:
        r, _, _ = select.select([sys.stdin], [], [], 0)
        if r:
            line = sys.stdin.readline().strip()
            if line == "start":
                lat, errors, window = [], 0, True
            elif line == "stop":
                lat.sort()
                print(json.dumps({"n": len(lat), "p50": percentile(lat, 50),
                                  "p99": percentile(lat, 99), "max": lat[-1] if lat else 0,
                                  "errors": errors}), flush=True)
                window = False
            elif line in ("quit", ""):
                disc(s)
                return
        off = rnd.randrange(VOL_SIZE // 4096) * 4096
        handle += 1
        t0 = time.monotonic()
        try:
            if handle & 1:
                s.sendall(req(CMD_READ, off, 4096, handle))
                h, err, _ = reply(s, 4096)
            else:
                s.sendall(req(CMD_WRITE, off, 4096, handle) + buf)
                h, err, _ = reply(s)
            ok = h == handle and err == 0
        except (OSError, Closed, AssertionError) as e:
            print(f"probe: request failed: {e}", file=sys.stderr, flush=True)
            ok = False
            s = connect("nb", timeout=10.0)
        us = (time.monotonic() - t0) * 1e6
        if window:
            lat.append(us)
            errors += 0 if ok else 1


class Probe:
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, __file__, "probe"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1)

    def window(self, fn):
        """Runs fn() while the probe measures; returns (fn's result, figures)."""
        self.p.stdin.write("start\n")
        self.p.stdin.flush()
        try:
            res = fn()
        finally:
            # Even when fn failed: the next window must not read this one's figures.
            self.p.stdin.write("stop\n")
            self.p.stdin.flush()
            figs = json.loads(self.p.stdout.readline())
        return res, figs

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass
        self.p.wait(timeout=10)


def check_neighbour(case, solo, during):
    fmt = lambda f: (f"n={f['n']} p50={f['p50'] / 1000:.2f} ms p99={f['p99'] / 1000:.2f} ms "
                     f"max={f['max'] / 1000:.1f} ms errors={f['errors']}")
    print(f"  neighbour solo:   {fmt(solo)}")
    print(f"  neighbour during: {fmt(during)}")
    p50_bound = max(3 * solo["p50"], solo["p50"] + 1000)
    p99_bound = max(5 * solo["p99"], solo["p99"] + 50000)
    bad = []
    if during["errors"]:
        bad.append(f"{during['errors']} neighbour requests failed")
    if during["n"] < 20:
        bad.append(f"only {during['n']} neighbour requests completed during the case")
    if during["p50"] > p50_bound:
        bad.append(f"p50 {during['p50']:.0f} us > bound {p50_bound:.0f} us")
    if during["p99"] > p99_bound:
        bad.append(f"p99 {during['p99']:.0f} us > bound {p99_bound:.0f} us")
    if during["max"] > 2e6:
        bad.append(f"a neighbour request took {during['max'] / 1e6:.1f} s")
    assert not bad, f"{case}: neighbour volume hurt: " + "; ".join(bad)


# ---- the daemon, seen from outside -----------------------------------------------------------


def nbdctl_json(*args):
    out = subprocess.run([os.environ["NBDCTL"], "--api", os.environ["API"], "-o", "json", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def open_connections(vol):
    return nbdctl_json("volume", "inspect", vol)["open_connections"]


def wait_closed(vols, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        left = {v: open_connections(v) for v in vols}
        if not any(left.values()):
            return
        assert time.monotonic() < deadline, f"connections still open after {timeout} s: {left}"
        time.sleep(0.05)


def daemon_fds():
    return len(os.listdir(f"/proc/{os.environ['DAEMON_PID']}/fd"))


def daemon_rss_kib():
    with open(f"/proc/{os.environ['DAEMON_PID']}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ---- the cases -------------------------------------------------------------------------------

FIGURES = {}


def case_disconnect():
    """Returns (events, verified regions)."""
    vols = ["v1", "v2"]
    rnd = random.Random(11)
    # Each region gets acknowledged content first; an event that sends half a write over it
    # must leave it so.
    regions = {}  # (vol, off) -> data
    seeds = iter(range(10**6))
    events = 0
    for i in range(240):
        vol = vols[i % 2]
        kind = i % 6
        off = (i // 2) * 256 * 1024  # distinct 256 KiB regions per volume
        length = 256 * 1024
        if kind in (0, 1, 3, 4, 5):
            base = pattern(next(seeds), length)
            s = connect(vol)
            write(s, off, base)
            disc(s)
            regions[(vol, off)] = base
        s = connect(vol, linger0=(kind == 1))
        new = pattern(next(seeds), length)
        if kind in (0, 1):      # half the payload, then FIN (0) or RST (1)
            s.sendall(req(CMD_WRITE, off, length, 9) + new[: length // 2])
        elif kind == 2:         # a header cut short
            s.sendall(req(CMD_WRITE, off, length, 9)[: rnd.randrange(1, 28)])
        elif kind == 3:         # a header and no payload
            s.sendall(req(CMD_WRITE, off, length, 9))
        elif kind == 4:         # READs pipelined and never read, then half a WRITE
            for h in range(8):
                s.sendall(req(CMD_READ, rnd.randrange(VOL_SIZE // MIB) * MIB, MIB, 100 + h))
            s.sendall(req(CMD_WRITE, off, length, 9) + new[: length // 3])
        else:                   # an acknowledged write, then a second one cut short
            write(s, off, new)
            regions[(vol, off)] = new
            s.sendall(req(CMD_WRITE, off, length, 10, FLAG_FUA) + pattern(next(seeds), length)[:1000])
        s.close()
        events += 1
    wait_closed(vols)
    verified = 0
    for vol in vols:
        s = connect(vol)
        for (v, off), data in sorted(regions.items()):
            if v != vol:
                continue
            got = read(s, off, len(data))
            assert got == data, f"{vol} at {off}: a half-sent write changed acknowledged data"
            verified += 1
        disc(s)
    wait_closed(vols)
    return events, verified


def case_half_open():
    """Returns (half-open clients, round trips served next to them)."""
    holders = []
    stuck_sends = 0
    rss0 = daemon_rss_kib()
    for i in range(8):
        vol = ["v1", "v2", "nb"][i % 3]
        s = connect(vol, rcvbuf=4096, linger0=(i % 2 == 0))
        s.setblocking(False)
        sent = 0
        for h in range(512):
            # 128 KiB: two replies fill what the socket holds, so 64 slots wait on a stuck
            # send. (Bigger READs of holes cost the worker inline zero-filling when they run:
            # 1-2 s for 8 x 64 x 1 MiB here, which would measure the burst, not the socket.)
            msg = req(CMD_READ, (h % 64) * MIB, 128 * 1024, 1000 + h)
            try:
                n = s.send(msg)
            except BlockingIOError:
                n = 0
            if n < len(msg):
                # The daemon stopped reading this client (its replies cannot go out): the rest
                # of the header would only wait in our buffer. That is the backpressure.
                stuck_sends += 1
                break
            sent += 1
        holders.append((s, sent))
    # One more: READs then DISC behind a full socket; it must get every reply once it reads.
    dc = connect("v1", rcvbuf=4096)
    for h in range(32):
        dc.sendall(req(CMD_READ, h * MIB, MIB, 5000 + h))
    dc.sendall(req(CMD_DISC, 0, 0, 0))

    trips = 0
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        for vol in ("v1", "v2", "nb"):  # the same volumes as the stuck clients
            s = connect(vol, timeout=5.0)
            data = os.urandom(4096)
            write(s, 32 * MIB + trips * 4096 % (16 * MIB), data)
            assert read(s, 32 * MIB + trips * 4096 % (16 * MIB), 4096) == data
            disc(s)
            trips += 1
        time.sleep(0.05)

    dc.settimeout(20)
    got = set()
    for _ in range(32):
        h, err, _ = reply(dc, MIB)
        assert err == 0, f"READ {h} behind DISC failed: {err}"
        got.add(h)
    assert got == set(range(5000, 5032)), "replies missing after DISC"
    assert dc.recv(1) == b"", "the daemon did not close after answering DISC"
    dc.close()
    for s, _ in holders:
        s.close()
    wait_closed(["v1", "v2"])
    # nb: only the probe's own connection may remain.
    deadline = time.monotonic() + 10
    while open_connections("nb") > 1:
        assert time.monotonic() < deadline, "half-open connections to nb not closed"
        time.sleep(0.05)
    FIGURES["half_open_backpressured"] = stuck_sends
    FIGURES["half_open_rss_kib_before_after"] = [rss0, daemon_rss_kib()]
    return len(holders) + 1, trips


def case_many(n=1000):
    """Returns a dict of figures."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(hard, want)))
    vols = ["m0", "m1", "m2", "m3"]
    wait_closed(vols)
    fds0, rss0 = daemon_fds(), daemon_rss_kib()
    conns = []
    t0 = time.monotonic()
    for i in range(n):
        conns.append(connect(vols[i % 4], timeout=30.0, linger0=(i % 3 == 2)))
    t_open = time.monotonic() - t0
    peak_conn = sum(open_connections(v) for v in vols)
    fds_peak = daemon_fds()
    # Every connection writes its own block, all pipelined at once, then reads it back.
    for i, s in enumerate(conns):
        s.sendall(req(CMD_WRITE, (i // 4) * 4096, 4096, i, FLAG_FUA) + pattern(i, 4096))
    for i, s in enumerate(conns):
        h, err, _ = reply(s)
        assert h == i and err == 0, f"connection {i}: write failed ({err})"
    for i, s in enumerate(conns):
        s.sendall(req(CMD_READ, (i // 4) * 4096, 4096, i))
    for i, s in enumerate(conns):
        h, err, data = reply(s, 4096)
        assert h == i and err == 0 and data == pattern(i, 4096), f"connection {i}: read back"
    rss_peak = daemon_rss_kib()
    for i, s in enumerate(conns):
        if i % 3 == 0:
            disc(s)
        else:
            s.close()  # FIN, or RST for the ones with linger 0
    wait_closed(vols, timeout=30)
    deadline = time.monotonic() + 10
    while daemon_fds() != fds0 and time.monotonic() < deadline:
        time.sleep(0.05)
    fds1, rss1 = daemon_fds(), daemon_rss_kib()
    FIGURES["many"] = {"fds": [fds0, fds_peak, fds1], "rss_kib": [rss0, rss_peak, rss1]}
    assert peak_conn == n, f"the daemon counted {peak_conn} connections, not {n}"
    assert fds1 == fds0, f"daemon fds {fds0} before, {fds1} after (peak {fds_peak})"
    # Each connection's buffers are mappings of their own (datapath/engine/worker.cpp), so they
    # go back to the kernel when it closes; through malloc, glibc kept about 14 MiB of them.
    # Under ASan the RSS is the sanitizer's: freed chunks sit in its quarantine and size-class
    # caches, and their shadow stays resident (+43 MiB measured; +17 MiB with quarantine_size_mb=0).
    # There LSan's check at the daemon's exit is what catches per-connection state that is never
    # freed; the bound holds in the plain tree.
    if os.environ.get("NBDCSI_SANITIZER") == "asan":
        print(f"  many: RSS {rss0} -> {rss_peak} -> {rss1} KiB (ASan allocator; bound not applied)")
    else:
        assert rss1 <= rss0 + RSS_SLACK_KIB, (
            f"daemon RSS {rss0} KiB before, {rss_peak} at the peak, {rss1} after the 1,000 "
            f"connections closed: not back to the baseline (+{RSS_SLACK_KIB} KiB allowed)")
    return {"connections": n, "open_s": round(t_open, 2), "fds": [fds0, fds_peak, fds1],
            "rss_kib": [rss0, rss_peak, rss1]}


def case_slow(clients=12):
    """Returns (slow writes verified, fresh connections timed, slowest fresh connect in s)."""
    errors = []
    done = []

    def dribble(s, data, chunk, pause):
        for i in range(0, len(data), chunk):
            s.sendall(data[i:i + chunk])
            time.sleep(pause)

    def slow_client(i):
        try:
            vol = ("v1", "v2")[i % 2]
            off = 48 * MIB + i * 8192
            data = pattern(10_000 + i, 4096)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(20)
            s.connect(SOCK)
            greeting(s)
            dribble(s, handshake_bytes(vol), 1, 0.005)
            finish_handshake(s, vol)
            dribble(s, req(CMD_WRITE, off, len(data), 77, FLAG_FUA), 1, 0.01)
            dribble(s, data, 1 if i % 3 == 0 else 16, 0.0005 if i % 3 == 0 else 0.002)
            h, err, _ = reply(s)
            assert h == 77 and err == 0, f"slow write {i}: error {err}"
            dribble(s, req(CMD_READ, off, len(data), 78), 3, 0.01)
            h, err, got = reply(s, len(data))
            assert h == 78 and err == 0 and got == data, f"slow client {i}: read back differs"
            disc(s)
            done.append(i)
        except Exception as e:  # reported by the main thread
            errors.append(f"slow client {i}: {e!r}")

    threads = [threading.Thread(target=slow_client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    fresh = []
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        s = connect("v2", timeout=10)
        read(s, 0, 4096)
        disc(s)
        fresh.append(time.monotonic() - t0)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert not errors, "; ".join(errors)
    assert len(done) == clients
    assert fresh and max(fresh) < 1.0, f"a new connection took {max(fresh):.2f} s next to slow senders"
    wait_closed(["v1", "v2"])
    return len(done), len(fresh), max(fresh)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        probe_main()
        return
    cases = os.environ.get("FAULTS_CASES", "many,disconnect,half_open,slow").split(",")
    probe = Probe()
    failed = []
    try:
        for case in cases:
            print(f"case {case}:", flush=True)
            _, solo = probe.window(lambda: time.sleep(1.5))
            fn = {"disconnect": case_disconnect, "half_open": case_half_open,
                  "many": case_many, "slow": case_slow}[case]
            try:
                res, during = probe.window(fn)
                print(f"  result: {res}")
                check_neighbour(case, solo, during)
                print(f"  {case}: PASS", flush=True)
            except (AssertionError, OSError, Closed) as e:
                print(f"  {case}: FAIL: {e}", flush=True)
                failed.append(case)
    finally:
        probe.close()
    if FIGURES:
        print(f"figures: {FIGURES}")
    if failed:
        print(f"FAILED cases: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
