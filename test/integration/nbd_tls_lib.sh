# shellcheck shell=bash
# Helpers for the NBD-over-TLS tests (nbd_tls_*.sh), on top of lib.sh: certificates from
# test/tls/make-certs.sh, client certificate directories in the layout libnbd and qemu read
# (ca-cert.pem, client-cert.pem, client-key.pem), and a daemon with a TLS TCP listener.
#
#   . "$(dirname "$0")/lib.sh"; . "$(dirname "$0")/nbd_tls_lib.sh"
#   lib_init
#   tls_certs                       # $CERTS: main CA set, $CERTS/other: an unrelated CA
#   tls_client NAME CA [CERT KEY]   # $W/cli-NAME; without CERT/KEY: a client with no certificate
#   tls_daemon_start [daemon args...]  # TLS listener on 127.0.0.1:$PORT with the main set
#   tls_uri EXPORT CLIENT           # nbds://127.0.0.1:$PORT/EXPORT?tls-certificates=$W/cli-CLIENT
#   qemu_tls CLIENT EXPORT          # sets QEMU_TLS=(--object ... --image-opts) and QEMU_IMG=opts

CERTS=
PORT=

tls_certs() {
  need openssl
  CERTS=$W/certs
  bash "$NBDCSI_SRC/test/tls/make-certs.sh" "$CERTS" >"$W/make-certs.log" 2>&1 ||
    { cat "$W/make-certs.log" >&2; die "make-certs.sh failed"; }
}

tls_client() {
  local name=$1 ca=$2 cert=${3:-} key=${4:-}
  local d=$W/cli-$name
  mkdir -p "$d"
  cp "$ca" "$d/ca-cert.pem"
  if [ -n "$cert" ]; then
    cp "$cert" "$d/client-cert.pem"
    (umask 077 && cp "$key" "$d/client-key.pem")
  fi
}

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# tls_daemon_start [CERT KEY CA] -- [more daemon args]: defaults to the main set's server files.
tls_daemon_start() {
  local cert=$CERTS/server.crt key=$CERTS/server.key ca=$CERTS/ca.crt
  if [ $# -ge 3 ] && [ "$1" != -- ]; then cert=$1 key=$2 ca=$3; shift 3; fi
  [ "${1:-}" = -- ] && shift
  PORT=$(free_port)
  daemon_start -- --nbd-listen "tcp://127.0.0.1:$PORT" --nbd-tls-cert "$cert" \
    --nbd-tls-key "$key" --nbd-tls-ca "$ca" "$@"
}

tls_uri() { echo "nbds://127.0.0.1:$PORT/$1?tls-certificates=$W/cli-$2"; }

qemu_tls() {
  local client=$1 export=$2
  QEMU_TLS=(--object "tls-creds-x509,id=tls0,dir=$W/cli-$client,endpoint=client")
  QEMU_IMG="driver=nbd,host=127.0.0.1,port=$PORT,export=$export,tls-creds=tls0"
}

# expect_refused WHAT CMD...: CMD must fail within 20 s (a refused client must not hang).
expect_refused() {
  local what=$1; shift
  local rc=0
  timeout 20 "$@" >"$W/refused.out" 2>&1 || rc=$?
  [ $rc != 0 ] || die "$what: accepted (want refused): $(cat "$W/refused.out")"
  [ $rc != 124 ] || die "$what: hung instead of being refused"
}

# log_wait SECONDS PATTERN: the daemon log shows PATTERN (grep -E) within SECONDS.
log_wait() {
  wait_for "$1" grep -qE "$2" "$W/datapathd.log" || die "no '$2' in the daemon log within $1 s"
}
