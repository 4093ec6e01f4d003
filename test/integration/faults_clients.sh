#!/usr/bin/env bash
# Clients that misbehave (disconnects mid-write, half-open sockets, 1,000 connections, slow
# senders) against nbd-datapathd with one I/O worker, a neighbour volume's QD1 latency watched
# throughout: faults_clients.py says what each case proves. Afterwards the daemon must stop
# cleanly (exit 0) and its log must show no engine invariant violation and no stale completion.
# Extra args: a comma list of cases (many,disconnect,half_open,slow; "many" first, so that its
# RSS baseline is a fresh daemon's, not memory an earlier case left in the allocator).
. "$(dirname "$0")/lib.sh"
is_datapathd || skip "the misbehaving-client cases are about nbd-datapathd's engine"
lib_init
# 1,000 client sockets here and as many accepted ones in the daemon.
ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge 2300 ] || skip "RLIMIT_NOFILE hard limit $(ulimit -Hn) is below 2300"
daemon_start -- --workers 1
for v in v1 v2 nb m0 m1 m2 m3; do vol_create "$v" 64Mi; done
step "faults_clients.py ${1:-all cases}"
rc=0
NBD_SOCK=$NBD_SOCK DAEMON_PID=$DAEMON_PID API="unix://$API_SOCK" NBDCTL="$NBDCSI_BIN/nbdctl" \
  FAULTS_CASES=${1:-many,disconnect,half_open,slow} \
  timeout 300 "$PY" "$(dirname "$0")/faults_clients.py" || rc=$?
daemon_alive || die "nbd-datapathd died"
daemon_stop
if grep -E 'engine invariant violated|stale completions dropped|AddressSanitizer|runtime error:' "$W/datapathd.log"; then
  die "the daemon log reports an engine error"
fi
[ $rc = 0 ] || die "faults_clients.py failed ($rc)"
step "PASS: engine log clean"
