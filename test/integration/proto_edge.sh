#!/usr/bin/env bash
# Runs proto_edge.py (protocol edge cases from raw sockets and libnbd) against a fresh server,
# then checks the daemon still shuts down cleanly. Extra args select cases by name.
. "$(dirname "$0")/lib.sh"
"$PY" -c 'import nbd' 2>/dev/null || skip "needs python3-libnbd for $PY"
lib_init
daemon_start
vol_create edge 64Mi
vol_create edge-ro 16Mi --read-only
step "proto_edge.py"
zero=einval
is_datapathd || zero=any
NBD_SOCK=$(nbd_sock edge) RO_SOCK=$(nbd_sock edge-ro) VOL=edge RO_VOL=edge-ro \
  VOL_SIZE=$((64 << 20)) SERVER_PID=${DAEMON_PID:-0} EDGE_ZERO_LEN=$zero \
  timeout 150 "$PY" "$(dirname "$0")/proto_edge.py" "$@" || die "protocol edge cases failed"
daemon_alive || die "daemon died"
daemon_stop
