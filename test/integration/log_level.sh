#!/usr/bin/env bash
# The log level at run time, against real daemons:
#   - nbd-datapathd: `nbdctl log-level` reports the start level (table and JSON); setting debug
#     makes an NBD connection's debug line appear in the daemon's log where it was absent, and
#     setting info back makes it stop; each change is logged with the old and new level; bad
#     levels and durations exit 2 with a clear message and change nothing; `--for` comes back
#     by itself; SIGUSR1/SIGUSR2 step the level; the Logging service is refused to a uid that
#     --allow-uid does not name (root only) and is not served on the TCP API at all; a shutdown
#     with a timed change pending is clean.
#   - nbd-csi-controller and nbd-csi-node: SIGUSR1 makes a polled call's debug line appear,
#     SIGUSR2 makes it stop, and both changes are logged.
. "$(dirname "$0")/lib.sh"
need jq nbdinfo
is_datapathd || skip "the log level is the daemons' feature"
[ -x "$NBDCSI_BIN/nbd-csi-controller" ] && [ -x "$NBDCSI_BIN/nbd-csi-node" ] ||
  skip "needs nbd-csi-controller and nbd-csi-node in $NBDCSI_BIN"
lib_init

LOG=$W/datapathd.log
level_is() { [ "$(nbdctl -o json log-level | jq -r .level)" = "$1" ]; }
# The datapath logs this at debug for every NBD connection it accepts.
conn_lines() { grep -c "nbd: connection to v1 " "$LOG" || true; }
conn_logged() { [ "$(conn_lines)" -ge 1 ]; }
connect() { nbdinfo --size "$(nbd_uri v1)" >/dev/null || die "nbdinfo on v1 failed"; }
# Lines of FILE matching PATTERN (fixed string).
count() { grep -cF -- "$2" "$1" || true; }
# at_least N FILE PATTERN: FILE has N or more lines with PATTERN (re-read on every call).
at_least() { [ "$(count "$2" "$3")" -ge "$1" ]; }

API_PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The work dir is 0700: other uids must be able to reach the socket for the uid check to decide.
chmod 755 "$W"
daemon_start -- --allow-uid 65534 --api-tcp-listen "127.0.0.1:$API_PORT" --insecure
vol_create v1 64Mi

step "the start level, in table and JSON"
[ "$(nbdctl log-level)" = "Log level: info" ] || die "log-level: $(nbdctl log-level)"
nbdctl -o json log-level | jqx '.level == "info" and .revert_to == null and .revert_in_ms == null and (has("previous") | not)'

step "at info an NBD connection logs no debug line"
connect
sleep 0.3
[ "$(conn_lines)" = 0 ] || die "a debug line at info: $(grep 'nbd: connection to' "$LOG")"

step "set debug: the change is logged, and so is the next connection"
[ "$(nbdctl log-level debug)" = "Log level: info -> debug" ] || die "set debug: $(nbdctl log-level)"
grep -qF "log level info -> debug (management API)" "$LOG" || die "the change is not logged"
level_is debug || die "level is not debug"
connect
wait_for 5 conn_logged || die "no debug line for a connection at debug"

step "set info back: connections are quiet again"
nbdctl -o json log-level info | jqx '.level == "info" and .previous == "debug" and .revert_to == null'
grep -qF "log level debug -> info (management API)" "$LOG" || die "the change back is not logged"
before=$(conn_lines)
connect
sleep 0.3
[ "$(conn_lines)" = "$before" ] || die "a debug line after the level went back to info"

step "bad levels and durations: exit 2, a clear message, nothing changed"
expect_fail 2 'log level "loud": want trace, debug, info, warn or error' nbdctl log-level loud
expect_fail 2 'log level "DEBUG": want trace, debug, info, warn or error' nbdctl log-level DEBUG
expect_fail 2 "--for needs a LEVEL" nbdctl log-level --for 10m
expect_fail 2 'log level "": want trace' nbdctl log-level ""
expect_fail 2 '--for: duration "": empty' nbdctl log-level debug --for ""
expect_fail 2 '--for: duration "10": a unit is required' nbdctl log-level debug --for 10
expect_fail 2 '--for: duration "soon"' nbdctl log-level debug --for soon
expect_fail 2 "--for: duration 8d is longer than 7d" nbdctl log-level debug --for 8d
expect_fail 2 "--for: duration must be greater than 0" nbdctl log-level debug --for 0s
level_is info || die "a refused change changed the level"

step "--for: the level comes back by itself"
nbdctl -o json log-level debug --for 2s >"$W/j"
jqx '.level == "debug" and .previous == "info" and .revert_to == "info" and .revert_in_ms > 0 and .revert_in_ms <= 2000' <"$W/j"
nbdctl log-level | grep -qE '^Log level: debug \(back to info in [12]s\)$' ||
  die "pending revert not shown: $(nbdctl log-level)"
grep -qF "log level info -> debug (management API; for 2s, then back to info)" "$LOG" ||
  die "the timed change is not logged"
wait_for 15 level_is info || die "debug did not revert to info within 15 s"
grep -qF "log level debug -> info (the timed change is over)" "$LOG" || die "the revert is not logged"
nbdctl -o json log-level | jqx '.revert_to == null'

step "a later untimed set cancels a pending revert"
nbdctl log-level debug --for 1s >/dev/null
nbdctl log-level warn >/dev/null
sleep 2
level_is warn || die "the cancelled revert happened anyway: $(nbdctl log-level)"
nbdctl log-level info >/dev/null

step "SIGUSR1 / SIGUSR2 step the datapath's level"
kill -USR1 "$DAEMON_PID"
wait_for 5 level_is debug || die "SIGUSR1 did not make it debug: $(nbdctl log-level)"
grep -qF "log level info -> debug (SIGUSR1)" "$LOG" || die "SIGUSR1's change is not logged"
kill -USR2 "$DAEMON_PID"
wait_for 5 level_is info || die "SIGUSR2 did not make it info: $(nbdctl log-level)"
daemon_alive || die "a signal killed the datapath"

step "the API's access control: a uid --allow-uid does not name is refused"
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
  as() { local u=$1; shift; setpriv --reuid "$u" --regid "$u" --clear-groups "$@"; }
  expect_fail 1 "permission denied" as 65533 "$NBDCSI_BIN/nbdctl" --api "unix://$API_SOCK" \
    log-level debug
  level_is info || die "a refused uid changed the level"
  as 65534 "$NBDCSI_BIN/nbdctl" --api "unix://$API_SOCK" log-level debug >/dev/null ||
    die "--allow-uid 65534 may not set the level"
  level_is debug || die "the allowed uid's change did not happen"
  nbdctl log-level info >/dev/null
else
  echo "(not root: the uid check is left to unit.unix_listener and the other API tests)" >&2
fi

step "the TCP API (the controller's) does not carry the Logging service"
expect_fail 1 "not supported by this nbd-datapathd" \
  "$NBDCSI_BIN/nbdctl" --api "tcp://127.0.0.1:$API_PORT" log-level debug
level_is info || die "the TCP API changed the level"

step "a shutdown with a timed change pending is clean and prompt"
nbdctl log-level debug --for 1h >/dev/null
daemon_stop

step "nbd-csi-node and nbd-csi-controller: SIGUSR1 / SIGUSR2"
REG_PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$W/kubelet"
bg "$NBDCSI_BIN/nbd-csi-node" --csi-endpoint "unix://$W/node.sock" --node-id n1 \
  --datapath "unix://$W/api.sock" --kubelet-root "$W/kubelet" --log-level info \
  >>"$W/node.log" 2>&1
NODE_PID=$BG_PID
bg "$NBDCSI_BIN/nbd-csi-controller" --csi-endpoint "unix://$W/ctl.sock" --insecure \
  --registry-listen "127.0.0.1:$REG_PORT" --log-level info >>"$W/controller.log" 2>&1
CTL_PID=$BG_PID
wait_for 15 test -S "$W/node.sock" || die "the node plugin did not serve: $(cat "$W/node.log")"
wait_for 15 test -S "$W/ctl.sock" || die "the controller did not serve: $(cat "$W/controller.log")"
# GetPluginInfo is logged at debug only (kubelet and the sidecars poll it). Not Probe: the
# node's fails while its datapath is away, and a failed call is logged at info.
probe() { "$NBDCSI_BIN/nbdctl" csi --timeout 10 --endpoint "unix://$1" identity info >/dev/null ||
  die "GetPluginInfo of $1 failed"; }
for d in node:$NODE_PID ctl:$CTL_PID; do
  name=${d%%:*} pid=${d#*:}
  log=$W/$name.log
  [ "$name" = ctl ] && log=$W/controller.log
  probe "$W/$name.sock"
  sleep 0.3
  [ "$(count "$log" "GetPluginInfo")" = 0 ] || die "$name logs GetPluginInfo at info: $(grep GetPluginInfo "$log")"
  kill -USR1 "$pid"
  wait_for 5 grep -qF "log level info -> debug (SIGUSR1)" "$log" ||
    die "$name did not log SIGUSR1's change: $(tail -5 "$log")"
  probe "$W/$name.sock"
  wait_for 5 at_least 1 "$log" "GetPluginInfo" || die "$name: no GetPluginInfo line at debug"
  kill -USR2 "$pid"
  wait_for 5 grep -qF "log level debug -> info (SIGUSR2)" "$log" ||
    die "$name did not log SIGUSR2's change: $(tail -5 "$log")"
  n=$(count "$log" "GetPluginInfo")
  probe "$W/$name.sock"
  sleep 0.3
  [ "$(count "$log" "GetPluginInfo")" = "$n" ] || die "$name still logs GetPluginInfo after SIGUSR2"
  kill -0 "$pid" 2>/dev/null || die "a signal killed $name"
done
for pid in "$NODE_PID" "$CTL_PID"; do
  kill -TERM "$pid"
  rc=0
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -0 "$pid" 2>/dev/null && die "pid $pid ignored SIGTERM for 10 s"
  wait "$pid" || rc=$?
  [ $rc = 0 ] || die "pid $pid exited $rc on SIGTERM"
done
step "done"
