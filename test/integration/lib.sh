# shellcheck shell=bash
# Sourced by every integration test and benchmark: a private work dir, a server to test, volumes,
# NBD URIs, timed steps, and a trap that leaves nothing behind (children, mounts, files).
#
# Server under test: NBDCSI_SERVER=datapathd (default; what CTest runs), qemu-nbd or nbdkit.
# The two peers exist so a test can be shown to pass on a reference server and to fail where
# a server really differs; with a peer each volume is one file served by its own process and
# socket, because neither peer serves several writable files with per-export flags.
#
# Environment: NBDCSI_BIN (dir of nbd-datapathd/nbdctl; CTest sets it, default <repo>/build/bin),
# NBDCSI_KEEP=1 keeps the work dir for post-mortem, NBDCSI_WORKDIR_BASE (default /tmp).
#
#   . "$(dirname "$0")/lib.sh"
#   lib_init                      # work dir in $W, traps
#   need nbdinfo jq               # exit 77 if a tool is missing
#   daemon_start                  # datapathd: start on $W/pool, wait for both sockets
#   vol_create v1 1Gi [--read-only] [nbdctl flags...]
#   nbd_uri v1                    # nbd+unix:///v1?socket=...
#   step "doing X"; ...; die "why"

set -euo pipefail

LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NBDCSI_SRC=${NBDCSI_SRC:-$(cd "$LIB_DIR/../.." && pwd)}
NBDCSI_BIN=${NBDCSI_BIN:-$NBDCSI_SRC/build/bin}
NBDCSI_SERVER=${NBDCSI_SERVER:-datapathd}
PY=/usr/bin/python3
# nbdsh and the libnbd Python binding live with the system Python; a pyenv or venv earlier in
# PATH would shadow it ("No module named nbd").
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH

LIB_PIDS=()          # every background child we own; killed on exit
LIB_EXIT_HOOKS=()    # commands run (in reverse) on exit before the work dir is removed
DAEMON_PID=
LIB_T0=$(date +%s.%N)
LIB_TSTEP=$LIB_T0
W=

_lib_now() { date +%s.%N; }
_lib_since() { awk -v a="$1" -v b="$(_lib_now)" 'BEGIN { printf "%.2f", b - a }'; }

step() {
  echo "[+$(_lib_since "$LIB_T0")s, prev $(_lib_since "$LIB_TSTEP")s] $*" >&2
  LIB_TSTEP=$(_lib_now)
}

die() {
  echo "FAIL: $*" >&2
  if [ -n "$W" ] && [ -f "$W/datapathd.log" ]; then
    echo "---- last lines of $W/datapathd.log ----" >&2
    tail -n 40 "$W/datapathd.log" >&2 || true
  fi
  exit 1
}

skip() {
  echo "SKIP: $*" >&2
  exit 77
}

need() {
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || skip "needs $t (scripts/deps.sh test installs it)"
  done
}

on_exit() { LIB_EXIT_HOOKS+=("$*"); }

_lib_cleanup() {
  local rc=$? i pid
  trap - EXIT INT TERM
  set +e
  for pid in "${LIB_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  # Give servers a moment to exit cleanly, then stop waiting: a hung child must not hang CTest.
  for _ in $(seq 30); do
    local alive=0
    for pid in "${LIB_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for pid in "${LIB_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  wait 2>/dev/null
  # Hooks (unmounts) run once nothing of ours holds files open under them.
  for ((i = ${#LIB_EXIT_HOOKS[@]} - 1; i >= 0; i--)); do
    eval "${LIB_EXIT_HOOKS[$i]}" >/dev/null 2>&1
  done
  if [ -n "$W" ] && [ -d "$W" ]; then
    if [ "${NBDCSI_KEEP:-0}" = 1 ] || { [ $rc != 0 ] && [ $rc != 77 ] && [ "${NBDCSI_KEEP:-0}" = onfail ]; }; then
      echo "work dir kept: $W" >&2
    else
      rm -rf "$W"
    fi
  fi
  exit $rc
}

# expect_fail [-i] CODE SUBSTRING CMD...: CMD exits CODE, says SUBSTRING on stderr (-i: in any
# case, for messages that quote a library's wording), prints nothing on stdout, and does not
# crash. Needs lib_init ($W).
expect_fail() {
  local icase=
  [ "$1" = -i ] && { icase=i; shift; }
  local want=$1 says=$2; shift 2
  local rc=0
  "$@" >"$W/out" 2>"$W/err" || rc=$?
  [ "$rc" = "$want" ] || { cat "$W/err" >&2; die "'$*' exited $rc, want $want"; }
  grep -q${icase}F -- "$says" "$W/err" || { cat "$W/err" >&2; die "'$*': stderr lacks '$says'"; }
  [ ! -s "$W/out" ] || die "'$*' printed to stdout on failure: $(cat "$W/out")"
  ! grep -qiE 'terminate called|Aborted|core dumped|what\(\)' "$W/err" || die "'$*' crashed"
}
# jqx FILTER: stdin passes the jq test FILTER.
jqx() { jq -e "$1" >/dev/null || die "jq check failed: $1"; }

lib_init() {
  W=$(mktemp -d "${NBDCSI_WORKDIR_BASE:-/tmp}/nbdcsi-it.XXXXXX")
  mkdir -p "$W/pool"
  trap _lib_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  case $NBDCSI_SERVER in
    datapathd)
      [ -x "$NBDCSI_BIN/nbd-datapathd" ] || die "no $NBDCSI_BIN/nbd-datapathd (build it, or set NBDCSI_BIN)"
      [ -x "$NBDCSI_BIN/nbdctl" ] || die "no $NBDCSI_BIN/nbdctl (build it, or set NBDCSI_BIN)"
      ;;
    qemu-nbd) need qemu-nbd ;;
    nbdkit) need nbdkit ;;
    *) die "NBDCSI_SERVER must be datapathd, qemu-nbd or nbdkit, not '$NBDCSI_SERVER'" ;;
  esac
  step "work dir $W, server $NBDCSI_SERVER"
}

is_datapathd() { [ "$NBDCSI_SERVER" = datapathd ]; }

# Run a command in the background, owned by this test (killed on exit). Sets BG_PID.
bg() {
  "$@" &
  BG_PID=$!
  LIB_PIDS+=("$BG_PID")
}

# cpu_ticks PID: utime+stime of a process, all its threads (the thread group's figure in
# /proc/PID/stat), in clock ticks (getconf CLK_TCK a second). The command name in field 2 may
# hold spaces: fields are counted after its ')'.
cpu_ticks() {
  local s; s=$(cat "/proc/$1/stat") || die "process $1 is gone"
  s=${s##*) }
  awk '{ print $12 + $13 }' <<<"$s"
}

# wait_for SECONDS CMD...: poll until CMD succeeds; 1 if it never did.
wait_for() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.05
  done
}

# 1Gi / 64Mi / 4Ki / 512 -> bytes.
to_bytes() {
  local v=$1
  case $v in
    *Ti) echo $(( ${v%Ti} << 40 )) ;;
    *Gi) echo $(( ${v%Gi} << 30 )) ;;
    *Mi) echo $(( ${v%Mi} << 20 )) ;;
    *Ki) echo $(( ${v%Ki} << 10 )) ;;
    *) echo $(( v )) ;;
  esac
}

API_SOCK=
NBD_SOCK=

# daemon_start [POOL_DIR] [-- extra daemon args...]. A no-op apart from the pool dir for peers.
daemon_start() {
  local pool=$W/pool
  if [ $# -gt 0 ] && [ "$1" != -- ]; then pool=$1; shift; fi
  [ "${1:-}" = -- ] && shift
  mkdir -p "$pool"
  DAEMON_POOL=$pool
  is_datapathd || return 0
  API_SOCK=$W/api.sock
  NBD_SOCK=$W/nbd.sock
  rm -f "$API_SOCK" "$NBD_SOCK"
  bg "$NBDCSI_BIN/nbd-datapathd" --pool "$pool" --api "unix://$API_SOCK" \
    --nbd-listen "unix://$NBD_SOCK" --log-level "${NBDCSI_LOG_LEVEL:-info}" "$@" \
    >>"$W/datapathd.log" 2>&1
  DAEMON_PID=$BG_PID
  local deadline=$(( $(date +%s) + 15 ))
  until [ -S "$API_SOCK" ] && [ -S "$NBD_SOCK" ]; do
    kill -0 "$DAEMON_PID" 2>/dev/null || { wait "$DAEMON_PID"; die "nbd-datapathd exited ($?) during startup"; }
    [ "$(date +%s)" -lt "$deadline" ] || die "nbd-datapathd did not create its sockets within 15 s"
    sleep 0.05
  done
  step "nbd-datapathd pid $DAEMON_PID ready"
}

# daemon_stop: SIGTERM and require a clean exit 0 within 10 s.
daemon_stop() {
  is_datapathd || return 0
  [ -n "$DAEMON_PID" ] || return 0
  kill -TERM "$DAEMON_PID"
  local i rc
  for i in $(seq 200); do
    kill -0 "$DAEMON_PID" 2>/dev/null || break
    sleep 0.05
  done
  kill -0 "$DAEMON_PID" 2>/dev/null && die "nbd-datapathd ignored SIGTERM for 10 s"
  rc=0; wait "$DAEMON_PID" || rc=$?
  [ $rc = 0 ] || die "nbd-datapathd exited $rc on SIGTERM (want 0)"
  DAEMON_PID=
  step "nbd-datapathd stopped cleanly"
}

# daemon_reap [SECONDS]: wait (bounded, default 15 s) for a daemon that is expected to exit on
# its own (fault injection, kill -9) and set DAEMON_RC to its exit status. Call it in the main
# shell, never inside $(...): a subshell cannot wait for its parent's children.
daemon_reap() {
  local deadline=$(( $(date +%s) + ${1:-15} ))
  while kill -0 "$DAEMON_PID" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || die "nbd-datapathd (pid $DAEMON_PID) did not exit within ${1:-15} s"
    sleep 0.05
  done
  DAEMON_RC=0
  wait "$DAEMON_PID" || DAEMON_RC=$?
  DAEMON_PID=
}

daemon_alive() {
  is_datapathd || return 0
  kill -0 "$DAEMON_PID" 2>/dev/null
}

nbdctl() {
  is_datapathd || die "nbdctl needs NBDCSI_SERVER=datapathd"
  "$NBDCSI_BIN/nbdctl" --api "unix://$API_SOCK" "$@"
}

# vol_create NAME SIZE [--read-only] [more nbdctl volume-create flags...]
vol_create() {
  local name=$1 size=$2; shift 2
  if is_datapathd; then
    nbdctl volume create "$name" --size "$size" "$@" >"$W/create.$name.out" 2>&1 ||
      { cat "$W/create.$name.out" >&2; die "nbdctl volume create $name failed"; }
    return 0
  fi
  local ro=0 a
  for a in "$@"; do
    case $a in
      --read-only) ro=1 ;;
      *) skip "peer $NBDCSI_SERVER cannot do volume option $a" ;;
    esac
  done
  local file=$DAEMON_POOL/$name.img sock=$W/$name.sock
  truncate -s "$(to_bytes "$size")" "$file"
  case $NBDCSI_SERVER in
    qemu-nbd)
      local roflag=(); [ $ro = 1 ] && roflag=(--read-only)
      bg qemu-nbd --socket="$sock" --format=raw --cache=none --aio=io_uring -x "$name" --persistent \
        --discard=unmap --shared=128 "${roflag[@]}" "$file" >>"$W/peer.$name.log" 2>&1 ;;
    nbdkit)
      local roflag=(); [ $ro = 1 ] && roflag=(-r)
      bg nbdkit -f -U "$sock" --exportname="$name" "${roflag[@]}" file "$file" \
        >>"$W/peer.$name.log" 2>&1 ;;
  esac
  wait_for 10 test -S "$sock" || die "$NBDCSI_SERVER for $name did not create $sock"
}

vol_file() { echo "$DAEMON_POOL/$1.img"; }

nbd_sock() {
  if is_datapathd; then echo "$NBD_SOCK"; else echo "$W/$1.sock"; fi
}

nbd_uri() { echo "nbd+unix:///$1?socket=$(nbd_sock "$1")"; }

# Server-side NBD connections currently open on the socket that serves NAME.
nbd_conn_count() {
  local sock; sock=$(nbd_sock "$1")
  # Accepted sockets carry the listening path as their local address; the listener itself is
  # in LISTEN state and not counted by "state connected".
  ss -xHn state connected 2>/dev/null | awk -v s="$sock" '$5 == s' | wc -l
}

# A pattern byte's file: fill_file PATH BYTES (random data, reproducible within one run).
random_file() {
  head -c "$2" /dev/urandom >"$1"
}

# FILE's bytes written at OFFSET of VOLUME over NBD (libnbd's Python binding), then flushed.
nbd_pwrite() {  # nbd_pwrite VOLUME OFFSET FILE
  /usr/bin/python3 - "$(nbd_uri "$1")" "$2" "$3" <<'PY' || die "NBD write to $1 failed"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
with open(sys.argv[3], "rb") as f:
    data = f.read()
h.pwrite(data, int(sys.argv[2]))
h.flush()
h.shutdown()
PY
}
