#!/usr/bin/env bash
# Fencing with real clients (docs/design.md "Fencing"): libnbd (fence_clients.py), nbdinfo and
# nbdcopy against nbd-datapathd, and nbdctl. An epoch-4 client takes a volume over from an
# epoch-3 one, whose next write fails and never lands; stale, epoch-less and malformed names
# are refused with clear messages; a restart keeps the epoch; `nbdctl volume fence` stops the
# clients of older epochs and inspect shows the epoch; two writers then take turns claiming
# the volume while both hammer the same blocks (split-brain attempt).
. "$(dirname "$0")/lib.sh"
is_datapathd || skip "fencing is an nbd-datapathd feature"
need nbdinfo nbdcopy
lib_init
HERE=$(cd "$(dirname "$0")" && pwd)
fc() { "$PY" "$HERE/fence_clients.py" "$@"; }
# nbdinfo prints libnbd's error class; the server's message is in libnbd's debug output.
nbdinfo_dbg() { LIBNBD_DEBUG=1 nbdinfo "$@" 2>&1; }
# JSON field of stdin.
jfield() { "$PY" -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

daemon_start
vol_create v1 16Mi
vol_create plain 16Mi

step "an unfenced volume serves epoch-less clients as before"
nbdinfo --size "$(nbd_uri plain)" >/dev/null || die "nbdinfo on an unfenced volume failed"
[ "$(nbdctl -o json volume inspect plain | jfield fence_epoch)" = 0 ] || die "plain is fenced?"

step "takeover: epoch 3 writes, epoch 4 connects"
fc takeover "$NBD_SOCK" v1 || die "takeover scenario failed"

step "real clients without an epoch are refused"
if out=$(nbdinfo_dbg "$(nbd_uri v1)"); then die "nbdinfo without an epoch was served"; fi
grep -q "fenced at epoch 4: name an epoch" <<<"$out" || die "nbdinfo said: $out"
nbdinfo --size "nbd+unix:///v1@epoch=4?socket=$NBD_SOCK" >/dev/null ||
  die "nbdinfo at epoch 4 was refused"
if out=$(nbdinfo_dbg "nbd+unix:///v1@epoch=2?socket=$NBD_SOCK"); then
  die "nbdinfo at epoch 2 was served"
fi
grep -q "stale epoch 2, volume v1 is at 4" <<<"$out" || die "nbdinfo said: $out"

step "inspect shows the epoch (table and JSON)"
nbdctl volume inspect v1 | grep -Eq "^Fence epoch: +4$" || die "inspect: $(nbdctl volume inspect v1)"
[ "$(nbdctl -o json volume inspect v1 | jfield fence_epoch)" = 4 ] || die "inspect -o json"
nbdctl -o json volume list | "$PY" -c '
import json, sys
v = {x["name"]: x["fence_epoch"] for x in json.load(sys.stdin)["volumes"]}
assert v == {"plain": 0, "v1": 4}, v' || die "volume list fence_epoch"

step "a restart keeps epoch 4"
daemon_stop
daemon_start
[ "$(nbdctl -o json volume inspect v1 | jfield fence_epoch)" = 4 ] || die "epoch lost on restart"
if out=$(fc connect "$NBD_SOCK" v1@epoch=3); then die "epoch 3 served after restart"; fi
grep -q "stale epoch 3, volume v1 is at 4" <<<"$out" || die "after restart: $out"
if fc connect "$NBD_SOCK" v1 >/dev/null; then die "epoch-less served after restart"; fi
# The data of the epoch-3 client from before the takeover, and nothing of what it tried after.
nbdcopy "nbd+unix:///v1@epoch=4?socket=$NBD_SOCK" "$W/v1.img" || die "nbdcopy at epoch 4"
"$PY" - "$W/v1.img" <<'PYEOF' || die "volume content after the takeover"
import sys
d = open(sys.argv[1], "rb").read()
M = 1 << 20
assert d[:M] == b"\xa3" * M, "epoch 3's acknowledged write"
assert d[M:2 * M] == bytes(M), "epoch 3's refused write landed"
assert d[2 * M:2 * M + 4096] == b"\xb4" * 4096, "epoch 4's write"
PYEOF

step "nbdctl volume fence stops older clients"
# An epoch-4 writer (nbdcopy from a pipe would finish too fast: a held nbdsh session instead).
"$PY" - "$NBD_SOCK" <<'PYEOF' &
import errno, sys, time
import nbd
h = nbd.NBD()
h.set_export_name("v1@epoch=4")
h.connect_unix(sys.argv[1])
h.pwrite(b"\x44" * 4096, 3 << 20)
open(sys.argv[1] + ".ready", "w").close()
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        h.pwrite(b"\x45" * 4096, 4 << 20)
    except nbd.Error as e:
        sys.exit(0 if e.errnum == errno.EPERM else 3)
    time.sleep(0.01)
sys.exit(2)  # never fenced
PYEOF
writer=$!
LIB_PIDS+=("$writer")
wait_for 10 test -e "$NBD_SOCK.ready" || die "the epoch-4 writer never started"
out=$(nbdctl volume fence v1 --epoch 6) || die "nbdctl volume fence: $out"
grep -q 'volume "v1" is fenced at epoch 6' <<<"$out" || die "fence said: $out"
rc=0; wait "$writer" || rc=$?
[ $rc = 0 ] || die "the epoch-4 writer was not stopped with EPERM (exit $rc)"
[ "$(nbdctl -o json volume fence v1 --epoch 6 | jfield fence_epoch)" = 6 ] ||
  die "fencing at the same epoch again is not idempotent"
if out=$(nbdctl volume fence v1 --epoch 5 2>&1); then die "fence back to 5 succeeded"; fi
grep -q "(failed precondition)" <<<"$out" && grep -q "stale epoch 5, volume v1 is at 6" <<<"$out" ||
  die "fence to 5 said: $out"
if out=$(nbdctl volume fence v1 --epoch 0 2>&1); then die "fence to 0 succeeded"; fi
grep -q "(invalid argument)" <<<"$out" || die "fence to 0 said: $out"
if out=$(nbdctl volume fence nope --epoch 1 2>&1); then die "fence of a missing volume"; fi
grep -q "(not found)" <<<"$out" || die "fence of a missing volume said: $out"
[ "$(nbdctl -o json volume inspect v1 | jfield fence_epoch)" = 6 ] || die "epoch is not 6"

step "malformed names through nbdinfo"
for bad in "v1@epoch=06" "v1@epoch=" "v1@grow@epoch=7"; do
  if out=$(nbdinfo_dbg "nbd+unix:///$bad?socket=$NBD_SOCK"); then die "$bad was served"; fi
  grep -q "export name" <<<"$out" || die "$bad: $out"
done

step "split-brain attempt: two writers take turns over 8 epochs"
vol_create sb 16Mi
fc split-brain "$NBD_SOCK" sb 10 8 "${FENCE_SPLIT_SECONDS:-3}" || die "split-brain check failed"
grep -o "volume sb fenced at epoch [0-9]* (was [0-9]*; metadata + drain [0-9.]* ms)" \
  "$W/datapathd.log" | tail -3 >&2 || true
daemon_stop
step "PASS"
