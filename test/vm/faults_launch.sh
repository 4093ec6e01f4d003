#!/usr/bin/env bash
# Host side of vm.faults_io_restart: picks the kill schedule's seed (FAULTS_SEED, else random)
# and its length (FAULTS_KILLS, default 6), hands both to the VM as files next to the shipped
# library, and runs test/vm/nbd-kernel-vm with the rest of the arguments. The runner passes no
# environment into the guest, hence the files.
set -euo pipefail
seed=${FAULTS_SEED:-$(( (RANDOM << 15) | RANDOM ))}
kills=${FAULTS_KILLS:-6}
dir=$(mktemp -d /tmp/nbdcsi-faults-vm.XXXXXX)
trap 'rm -rf "$dir"' EXIT
echo "$seed" >"$dir/seed"
echo "$kills" >"$dir/kills"
echo "faults_io_restart: seed $seed, $kills kill points (FAULTS_SEED=$seed replays the schedule)"
rc=0
"$(dirname "$0")/nbd-kernel-vm" --file "$dir/seed:/opt/lib/faults-seed" \
  --file "$dir/kills:/opt/lib/faults-kills" "$@" || rc=$?
exit $rc
