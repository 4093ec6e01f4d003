# shellcheck shell=bash
# Sourced by the scripts that run INSIDE the VM (test/vm/*.sh; the *.cmake entries ship it to
# /opt/lib/nbdcsi-vm.sh next to the binaries in /opt/bin): PATH, and timed steps on the guest's
# uptime clock.
set -euo pipefail
export PATH=/opt/bin:$PATH

T0=$(cut -d' ' -f1 /proc/uptime) TSTEP=$T0
now() { cut -d' ' -f1 /proc/uptime; }
step() {
  local t; t=$(now)
  awk -v a="$T0" -v b="$TSTEP" -v t="$t" -v m="$*" 'BEGIN { printf "[+%6.2fs, prev %5.2fs] %s\n", t - a, t - b, m }'
  TSTEP=$t
}
