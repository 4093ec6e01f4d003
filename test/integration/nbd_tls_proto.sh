#!/usr/bin/env bash
# Runs nbd_tls_proto.py (STARTTLS from raw sockets: refusals before TLS, the exchange, a session
# inside TLS, TLS versions, refused certificates) against a daemon with a TLS TCP listener, then
# checks that the daemon logged why it refused each certificate and still stops cleanly. Extra
# args select cases by name.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nbd_tls_lib.sh"
lib_init
tls_certs
tls_daemon_start
vol_create edge 16Mi
step "nbd_tls_proto.py"
PORT=$PORT CERTS=$CERTS VOL=edge timeout 120 "$PY" "$(dirname "$0")/nbd_tls_proto.py" "$@" ||
  die "STARTTLS protocol cases failed"
if [ $# = 0 ]; then
  step "the daemon says why each certificate was refused"
  for why in "peer did not return a certificate" \
    "client certificate refused: unable to get local issuer certificate" \
    "client certificate refused: certificate has expired" "unsupported protocol"; do
    grep -q "TLS handshake with 127.0.0.1:[0-9]* failed: .*$why" "$W/datapathd.log" ||
      die "no log line for a refusal: $why"
  done
fi
daemon_alive || die "daemon died"
daemon_stop
