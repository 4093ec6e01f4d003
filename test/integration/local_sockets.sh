#!/usr/bin/env bash
# The local sockets of all three daemons, entered as another user: the datapath API, the NBD
# socket, and the CSI sockets of nbd-csi-node and nbd-csi-controller.
#
#  1. Every socket is mode 0600 and root-owned: uid 65534 cannot even connect.
#  2. Sockets loosened by hand to 0666: uid 65534 connects, and the daemon refuses every call with
#     PERMISSION_DENIED after reading its uid with SO_PEERCRED (and logs it); root still works.
#  3. The daemons restarted with --allow-uid 65534: the sockets are 0666 on purpose, uid 65534 is
#     served, uid 65533 is refused.
#
# The other user is real: nbdctl runs under setpriv --reuid/--regid, so the kernel records that
# uid for the connection. Needs root (setpriv); exit 77 otherwise.
. "$(dirname "$0")/lib.sh"
lib_init
need setpriv stat
[ "$(id -u)" = 0 ] || skip "needs root to run a client as another uid"

# The other users must reach the sockets (and nbdctl) through the work dir.
chmod 0711 "$W"
cp "$NBDCSI_BIN/nbdctl" "$W/nbdctl"
chmod 0755 "$W/nbdctl"
mkdir -p "$W/kubelet"
NODE_SOCK=$W/node-csi.sock
CTL_SOCK=$W/ctl-csi.sock
REG_PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

as_uid() {  # as_uid UID CMD...: stdout+stderr, exit status of CMD
  local uid=$1; shift
  setpriv --reuid "$uid" --regid "$uid" --clear-groups "$@" 2>&1
}

start_all() {  # start_all [extra flags for every daemon...]
  daemon_start -- "$@"
  rm -f "$NODE_SOCK" "$CTL_SOCK"
  bg "$NBDCSI_BIN/nbd-csi-node" --csi-endpoint "unix://$NODE_SOCK" --node-id n1 \
    --datapath "unix://$API_SOCK" --kubelet-root "$W/kubelet" "$@" >>"$W/node.log" 2>&1
  NODE_PID=$BG_PID
  bg "$NBDCSI_BIN/nbd-csi-controller" --csi-endpoint "unix://$CTL_SOCK" \
    --registry-listen "127.0.0.1:$REG_PORT" --insecure "$@" >>"$W/controller.log" 2>&1
  CTL_PID=$BG_PID
  wait_for 15 test -S "$NODE_SOCK" || die "nbd-csi-node did not start: $(tail -5 "$W/node.log")"
  wait_for 15 test -S "$CTL_SOCK" || die "nbd-csi-controller did not start: $(tail -5 "$W/controller.log")"
}

stop_all() {
  kill -TERM "$NODE_PID" "$CTL_PID"
  wait "$NODE_PID" "$CTL_PID" || die "a CSI daemon did not exit cleanly"
  daemon_stop
}

# Each check: a datapath API call and a CSI call on each CSI socket.
calls() {  # calls UID: runs the three calls as UID, prints "rc output" per call
  local uid=$1
  as_uid "$uid" "$W/nbdctl" --api "unix://$API_SOCK" pool info; echo "rc=$?"
  as_uid "$uid" "$W/nbdctl" csi --endpoint "unix://$NODE_SOCK" identity info; echo "rc=$?"
  as_uid "$uid" "$W/nbdctl" csi --endpoint "unix://$CTL_SOCK" identity info; echo "rc=$?"
}

expect_served() {  # expect_served UID
  local out
  out=$(calls "$1")
  [ "$(grep -c '^rc=0$' <<<"$out")" = 3 ] || die "uid $1 was not served on every socket: $out"
}

expect_denied() {  # expect_denied UID: every call refused by the daemon itself
  local out
  out=$(calls "$1")
  [ "$(grep -c '^rc=1$' <<<"$out")" = 3 ] || die "uid $1 was served somewhere: $out"
  # nbdctl prints the datapath's refusal as "(permission denied)", a CSI plugin's as the code.
  [ "$(grep -ci 'permission.denied' <<<"$out")" -ge 3 ] || die "not PERMISSION_DENIED everywhere: $out"
}

step "1. default: every socket 0600, root-owned"
start_all
for s in "$API_SOCK" "$NBD_SOCK" "$NODE_SOCK" "$CTL_SOCK"; do
  [ "$(stat -c '%a %u %F' "$s")" = "600 0 socket" ] || die "$s: $(stat -c '%a %u %F' "$s")"
done
expect_served 0
out=$(calls 65534)
[ "$(grep -c '^rc=1$' <<<"$out")" = 3 ] || die "uid 65534 got through a 0600 socket: $out"
grep -q "no permission on socket" <<<"$out" || die "expected a refused connect(): $out"
# The NBD socket: connect(2) itself is refused.
if as_uid 65534 "$PY" -c "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])" \
     "$NBD_SOCK" >/dev/null; then
  die "uid 65534 connected to the NBD socket"
fi

step "2. sockets loosened by hand to 0666: SO_PEERCRED refuses uid 65534"
chmod 0666 "$API_SOCK" "$NODE_SOCK" "$CTL_SOCK"
expect_denied 65534
expect_served 0
for log in datapathd node controller; do
  grep -q "refused a connection from uid 65534" "$W/$log.log" || die "$log.log does not name the refused uid"
done
stop_all

step "3. --allow-uid 65534: 0666 sockets, 65534 served, 65533 refused"
start_all --allow-uid 65534
for s in "$API_SOCK" "$NODE_SOCK" "$CTL_SOCK"; do
  [ "$(stat -c '%a' "$s")" = 666 ] || die "$s: mode $(stat -c '%a' "$s") with --allow-uid"
done
[ "$(stat -c '%a' "$NBD_SOCK")" = 600 ] || die "the NBD socket changed mode"
expect_served 65534
expect_denied 65533
expect_served 0
stop_all
step "local sockets: OK"
