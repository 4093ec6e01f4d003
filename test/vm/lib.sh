# shellcheck shell=bash
# Sourced by the scripts that run INSIDE the VM (test/vm/*.sh; the *.cmake entries ship it to
# /opt/lib/nbdcsi-vm.sh next to the binaries in /opt/bin): PATH, timed steps on the guest's
# uptime clock, and loading the runner's optional modules with parameters.
set -euo pipefail
export PATH=/opt/bin:$PATH

T0=$(cut -d' ' -f1 /proc/uptime) TSTEP=$T0
now() { cut -d' ' -f1 /proc/uptime; }
step() {
  local t; t=$(now)
  awk -v a="$T0" -v b="$TSTEP" -v t="$t" -v m="$*" 'BEGIN { printf "[+%6.2fs, prev %5.2fs] %s\n", t - a, t - b, m }'
  TSTEP=$t
}

# vm_insmod MODULE [PARAM=VALUE...]: loads one of the runner's optional modules (nbd-kernel-vm
# --modules lists them) with its dependencies; the parameters go to MODULE itself. Already loaded:
# nothing to do (its parameters cannot change then: say so).
vm_insmod() {
  local top=$1 ko n last
  shift
  last=$(awk -v t="$top" '$1 == t {k = $2} END {print k}' /etc/nbdvm-modules-opt)
  [ -n "$last" ] || { echo "vm_insmod: $top is not an optional module of this initramfs" >&2; return 1; }
  # A pipe, not < <(...): the guest has no /dev/fd.
  awk -v t="$top" '$1 == t' /etc/nbdvm-modules-opt | while read -r _ ko; do
    n=$(basename "$ko" .ko | tr - _)
    if [ -d "/sys/module/$n" ]; then
      if [ "$ko" = "$last" ] && [ $# -gt 0 ]; then echo "vm_insmod: $top already loaded, $* ignored" >&2; fi
      continue
    fi
    if [ "$ko" = "$last" ]; then insmod "$ko" "$@"; else insmod "$ko"; fi
  done
}
