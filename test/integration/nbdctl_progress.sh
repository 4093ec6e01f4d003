#!/usr/bin/env bash
# `nbdctl ... --wait` progress on background copies (tools/nbdctl/progress.h), against a real
# nbd-datapathd whose pool copies instead of reflinking (--no-reflink). The source is a sparse
# 4 GiB volume holding 192 MiB of data in 48 islands, so progress counted in virtual size and
# progress counted in allocated data cannot be mistaken for each other:
#   - snapshot create, restore and clone with --wait on a pseudo-terminal (script(1)): every
#     progress line counts "of 192 MiB allocated data", percentages never go down, and each
#     ends with "done, 192 MiB of allocated data copied" (100 % of what is allocated)
#   - the API's copy_data_* fields polled during a restore: the total is the source's data,
#     the copied bytes never pass it
#   - -o json on a terminal: JSON only, no progress text; stderr not a terminal: no \r
set -euo pipefail
. "$(dirname "$0")/lib.sh"

need jq script nbdsh
lib_init
daemon_start -- --no-reflink

ISLANDS=48 ISLAND=$((4 << 20)) STRIDE=$((80 << 20))
WANT=$((ISLANDS * ISLAND))
vol_create src 4Gi
nbdsh -u "$(nbd_uri src)" -c "
import os
for i in range($ISLANDS):
    h.pwrite(os.urandom($ISLAND), i * $STRIDE)
h.flush()
" || die "writing the islands failed"
# The test's premise, from the pool's own file: exactly that much data, in a 4 GiB address space.
data=$($PY - "$(nbdctl -o json volume inspect src | jq -r .data_path)" <<'PY'
import os, sys
fd, off, n = os.open(sys.argv[1], os.O_RDONLY), 0, 0
size = os.fstat(fd).st_size
while off < size:
    try:
        d = os.lseek(fd, off, os.SEEK_DATA)
    except OSError:
        break
    h = os.lseek(fd, d, os.SEEK_HOLE)
    n, off = n + h - d, h
print(n)
PY
)
[ "$data" = "$WANT" ] || die "premise: the source holds $data data bytes, want $WANT"
step "source: 4 GiB volume, $((WANT >> 20)) MiB of data in $ISLANDS islands"

# on_tty NAME CMD...: runs nbdctl on a pseudo-terminal (stdout and stderr both), output in
# $W/NAME.tty.
on_tty() {
  local name=$1; shift
  local cmd; printf -v cmd '%q ' "$NBDCSI_BIN/nbdctl" --api "unix://$API_SOCK" "$@"
  script -qec "$cmd" "$W/$name.tty" >/dev/null </dev/null || {
    cat "$W/$name.tty" >&2; die "nbdctl $* failed on a terminal"; }
}
# check_progress NAME PREFIX: the progress lines of $W/NAME.tty.
check_progress() {
  $PY - "$W/$1.tty" "$2" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
prefix = sys.argv[2] + ": "
lines = [l.replace("\x1b[K", "").strip() for l in re.split(r"[\r\n]+", text)]
lines = [l for l in lines if l.startswith(prefix)]
done = [l for l in lines if l.startswith(prefix + "done, ")]
progress = [l for l in lines if "allocated data (" in l]
if len(done) != 1 or not done[0].startswith(prefix + "done, 192 MiB of allocated data copied in "):
    sys.exit(f"want one summary counting 192 MiB of allocated data; lines: {lines}")
pcts = []
for l in progress:
    m = re.search(r": (\S+ \S+) of (\S+ \S+) allocated data \((\d+)%\)", l)
    if not m or m.group(2) != "192 MiB":
        sys.exit(f"a progress line does not count the 192 MiB of data: {l!r}")
    pcts.append(int(m.group(3)))
if pcts != sorted(pcts):
    sys.exit(f"the percentage went down: {pcts}")
print(f"{len(progress)} progress line(s) {pcts}; {done[0]}")
PY
}

on_tty snap snapshot create s1 --volume src --wait
msg=$(check_progress snap "snapshot s1") || die "snapshot create --wait: $msg"
step "snapshot create --wait: $msg"

on_tty restore volume create r1 --from-snapshot s1 --wait
msg=$(check_progress restore "restore r1") || die "volume create --from-snapshot --wait: $msg"
step "restore --wait: $msg"

on_tty clone volume create c1 --from-volume src --wait
msg=$(check_progress clone "clone c1") || die "volume create --from-volume --wait: $msg"
step "clone --wait: $msg"

# The API fields behind it, sampled while a restore runs.
nbdctl -o json volume create r2 --from-snapshot s1 >"$W/r2.0.json" || die "restore r2 failed"
i=0
cp "$W/r2.0.json" "$W/r2.samples"
until jq -e .ready "$W/r2.last" >/dev/null 2>&1; do
  nbdctl -o json volume inspect r2 >"$W/r2.last" || die "inspect r2 failed"
  cat "$W/r2.last" >>"$W/r2.samples"
  i=$((i + 1)); [ $i -lt 3000 ] || die "restore r2 not ready after 3000 polls"
done
jq -s --argjson want "$WANT" '
  [.[] | select(.ready | not)] as $copying
  | {copying: ($copying | length),
     totals: ($copying | map(.copy_data_total_bytes) | unique),
     over: ($copying | map(select(.copy_data_total_bytes != null
                                  and .copy_data_done_bytes > .copy_data_total_bytes)) | length),
     last: .[-1]}' "$W/r2.samples" >"$W/r2.summary"
jq -e --argjson want "$WANT" '(.totals - [null]) | all(. == $want)' "$W/r2.summary" >/dev/null ||
  die "copy_data_total_bytes is not the source's data ($WANT): $(jq -c .totals "$W/r2.summary")"
jq -e '.over == 0' "$W/r2.summary" >/dev/null || die "copy_data_done_bytes passed the total"
jq -e '.last.ready and .last.copy_data_total_bytes == null and .last.copy_data_done_bytes == 0' \
  "$W/r2.summary" >/dev/null || die "a ready volume still reports a copy: $(jq -c .last "$W/r2.summary")"
step "API samples during restore r2: $(jq -c '{copying, totals}' "$W/r2.summary")"

# JSON on a terminal: nothing but the JSON.
on_tty json -o json volume create r3 --from-snapshot s1 --wait
# script(1) frames the typescript with its own "Script started/done" lines.
tr -d '\r' <"$W/json.tty" | sed '/^Script started on /d; /^Script done on /d' |
  jq -e '.ready == true' >/dev/null || {
  cat "$W/json.tty" >&2; die "-o json --wait printed more than JSON"; }
! grep -q "allocated data" "$W/json.tty" || die "-o json --wait printed progress"
step "-o json --wait on a terminal: JSON only"

# stderr not a terminal: no rewritten line (and, for a copy under 5 s, nothing at all).
nbdctl volume create r4 --from-snapshot s1 --wait >"$W/r4.out" 2>"$W/r4.err" ||
  die "restore r4 failed: $(cat "$W/r4.err")"
! grep -q $'\r' "$W/r4.err" || die "progress rewrote a line on a pipe"
grep -v '^restore r4: ' "$W/r4.err" | grep -q . && die "unexpected stderr: $(cat "$W/r4.err")"
step "--wait with stderr on a pipe: $(wc -l <"$W/r4.err") progress line(s)"

daemon_stop
