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

# vm_etcd_start DIR CLIENT_ADDR: a one-member etcd for the cluster tests (data in DIR/etcd, log
# DIR/etcd.log), in the background; sets ETCDPID and returns once it serves clients. Its port
# opens before it serves (under TCG seconds before): it waits for it to say it is ready. Calls
# the test's `fail` when it does not start.
vm_etcd_start() {
  local dir=$1 addr=$2
  etcd --name vm --data-dir "$dir/etcd" --listen-client-urls "http://$addr" \
    --advertise-client-urls "http://$addr" --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster vm=http://127.0.0.1:2380 \
    >"$dir/etcd.log" 2>&1 &
  ETCDPID=$!
  for _ in $(seq 300); do
    grep -q 'ready to serve client requests' "$dir/etcd.log" && return 0
    kill -0 "$ETCDPID" 2>/dev/null || fail "etcd exited during startup"
    sleep 0.1
  done
  fail "etcd is not ready after 30 s"
}

# vm_wait_socket SOCKET PID WHAT: waits (30 s at most) for a daemon's Unix socket to appear;
# calls the test's `fail` naming WHAT when the daemon exits first or the socket never comes.
vm_wait_socket() {
  local sock=$1 pid=$2 what=$3
  for _ in $(seq 300); do
    [ -S "$sock" ] && return 0
    kill -0 "$pid" 2>/dev/null || fail "$what exited during startup"
    sleep 0.1
  done
  fail "$what: no socket $sock after 30 s"
}

# vm_csi_stage_publish VOLUME: creates VOLUME (1 GiB) through the test's `nbdctl`, then stages it
# (ext4) and publishes it the kubelet's way through the test's `csi` (paths under $D, the node
# $NODE); sets LID, LSTG and LTGT. Calls the test's `fail` when staging or publishing fails.
vm_csi_stage_publish() {
  nbdctl volume create "$1" --size 1Gi >/dev/null
  LID="v1:$NODE:$1" LSTG=$D/staging/$1 LTGT=$D/pods/$1/mount
  mkdir -p "$LSTG"
  csi stage "$LID" --staging-path "$LSTG" --fs-type ext4 >/dev/null || fail "stage $1"
  csi publish "$LID" --staging-path "$LSTG" --target-path "$LTGT" >/dev/null || fail "publish $1"
}

# vm_fio_check PID LOG: waits for the fio run PID (started in the background with --verify and
# --output=LOG), prints LOG, and calls the test's `fail` unless fio exited 0 with err=0 and no
# verify failure.
vm_fio_check() {
  local rc=0
  wait "$1" || rc=$?
  cat "$2"
  [ "$rc" = 0 ] || fail "fio exited $rc"
  grep -qE 'err= *0' "$2" || fail "fio reports errors"
  if grep -qiE 'verify: bad|crc32c: verify failed|bad magic' "$2"; then fail "fio verify failed"; fi
}

# vm_stop_datapaths NODE...: stops each node-NODE's nbd-datapathd (pid ${PID[NODE]}, the test's
# associative array) with SIGTERM; each must exit 0, else the test's `fail`.
vm_stop_datapaths() {
  local n
  for n in "$@"; do
    kill -TERM "${PID[$n]}"
    wait "${PID[$n]}" || fail "node-$n: nbd-datapathd exited $? on SIGTERM"
    unset "PID[$n]"
  done
}

# vm_check_datapath_logs LOG...: calls the test's `fail` when a datapath log reports a broken
# engine rule or a sanitizer error.
vm_check_datapath_logs() {
  if grep -E 'engine invariant violated|stale completions dropped|AddressSanitizer|runtime error:' "$@"; then
    fail "a datapath log reports an engine or sanitizer error"
  fi
}
