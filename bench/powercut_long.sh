#!/usr/bin/env bash
# The power-cut test (test/vm/powercut.sh) at a larger scale than its CTest runs: more churn cycles
# and writer rounds, so more crash points, on xfs and ext4. Not a CTest test: under QEMU TCG a point
# costs one to three seconds, so the defaults run for about half an hour per file system.
#   bench/powercut_long.sh [xfs|ext4|both]   CYCLES=10 ROUNDS=150 SEED=... NBDCSI_BUILD=build
# Needs root (the VM runner reads /boot and may apt-get qemu and the guest tools). Prints each run's
# "powercut:" summary lines; exits non-zero if any run found an inconsistent crash point.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
B=${NBDCSI_BUILD:-$root/build}
which=${1:-both}
case $which in xfs|ext4) fss=$which ;; both) fss="xfs ext4" ;; *) echo "usage: $0 [xfs|ext4|both]" >&2; exit 2 ;; esac
for f in "$B/bin/nbd-datapathd" "$B/bin/nbdctl" "$B/bin/logwrites" "$B/test-bin/powercut-writer" \
         "$B/test-bin/powercut-replay" "$B/test-bin/libpowercut-fault.so"; do
  [ -f "$f" ] || { echo "powercut_long: $f missing: build first (scripts/build.sh)" >&2; exit 2; }
done
rc=0
for fs in $fss; do
  env=(--env "POWERCUT_FS=$fs" --env "POWERCUT_CYCLES=${CYCLES:-10}" --env "POWERCUT_ROUNDS=${ROUNDS:-150}")
  [ -z "${SEED:-}" ] || env+=(--env "POWERCUT_SEED=$SEED")
  "$root/test/vm/nbd-kernel-vm" --timeout "${TIMEOUT:-5400}" --mem 3072 \
    --modules dm-log-writes,dm-snapshot "${env[@]}" \
    --file "$root/test/vm/lib.sh:/opt/lib/nbdcsi-vm.sh" \
    --file "$B/bin/nbd-datapathd:/opt/bin/" --file "$B/bin/nbdctl:/opt/bin/" \
    --file "$B/bin/logwrites:/opt/bin/" --file "$B/test-bin/powercut-writer:/opt/bin/" \
    --file "$B/test-bin/powercut-replay:/opt/bin/" \
    --file "$B/test-bin/libpowercut-fault.so:/opt/lib/libpowercut-fault.so" \
    "$root/test/vm/powercut.sh" | tee "/tmp/powercut_long.$fs.log" || rc=1
done
grep -h '^powercut: \(xfs\|ext4\):' /tmp/powercut_long.*.log || true
exit $rc
