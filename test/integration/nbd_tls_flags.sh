#!/usr/bin/env bash
# The NBD TLS flags of nbd-datapathd: a tcp:// listener without TLS material refuses to start
# (exit 2, naming the flags), so do incomplete, conflicting, useless or unloadable TLS flags;
# --insecure-nbd-tcp serves plaintext with a warning and refuses STARTTLS by policy.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nbd_tls_lib.sh"
need nbdinfo
lib_init
tls_certs
port=$(free_port)
tcp=(--nbd-listen "tcp://127.0.0.1:$port")
good=(--nbd-tls-cert "$CERTS/server.crt" --nbd-tls-key "$CERTS/server.key"
      --nbd-tls-ca "$CERTS/ca.crt")

# refused_start WANT_MESSAGE ARGS...: the daemon exits 2 at once with WANT_MESSAGE in its log and
# leaves no socket behind.
refused_start() {
  local want=$1; shift
  local rc=0
  rm -f "$W/api.sock" "$W/nbd.sock"
  timeout 20 "$NBDCSI_BIN/nbd-datapathd" --pool "$W/pool" --api "unix://$W/api.sock" \
    --nbd-listen "unix://$W/nbd.sock" "$@" >"$W/refused.log" 2>&1 || rc=$?
  [ $rc = 2 ] || { cat "$W/refused.log" >&2; die "exit $rc, want 2, for: $*"; }
  grep -qF -- "$want" "$W/refused.log" || { cat "$W/refused.log" >&2; die "no '$want' for: $*"; }
  [ ! -e "$W/api.sock" ] && [ ! -e "$W/nbd.sock" ] || die "sockets left behind by a refused start"
}

step "refused starts"
refused_start "NBD over TCP requires TLS: give --nbd-tls-cert, --nbd-tls-key and --nbd-tls-ca" \
  "${tcp[@]}"
refused_start "missing --nbd-tls-key, --nbd-tls-ca" "${tcp[@]}" --nbd-tls-cert "$CERTS/server.crt"
refused_start "--insecure-nbd-tcp cannot be combined" "${tcp[@]}" "${good[@]}" --insecure-nbd-tcp
refused_start "applies to a tcp:// --nbd-listen, and none is given" "${good[@]}"
refused_start "--insecure-nbd-tcp applies to a tcp:// --nbd-listen" --insecure-nbd-tcp
refused_start "does not belong to --nbd-tls-cert" "${tcp[@]}" --nbd-tls-cert "$CERTS/server.crt" \
  --nbd-tls-key "$CERTS/client.key" --nbd-tls-ca "$CERTS/ca.crt"
refused_start "expired on" "${tcp[@]}" --nbd-tls-cert "$CERTS/client-expired.crt" \
  --nbd-tls-key "$CERTS/client-expired.key" --nbd-tls-ca "$CERTS/ca.crt"
refused_start "--nbd-tls-ca" "${tcp[@]}" --nbd-tls-cert "$CERTS/server.crt" \
  --nbd-tls-key "$CERTS/server.key" --nbd-tls-ca "$W/nonexistent.pem"
head -c 300 "$CERTS/server.crt" >"$W/truncated.crt"
refused_start "unreadable certificate (bad end line)" "${tcp[@]}" \
  --nbd-tls-cert "$W/truncated.crt" --nbd-tls-key "$CERTS/server.key" --nbd-tls-ca "$CERTS/ca.crt"
refused_start "no readable PEM private key" "${tcp[@]}" --nbd-tls-cert "$CERTS/server.crt" \
  --nbd-tls-key "$CERTS/server.crt" --nbd-tls-ca "$CERTS/ca.crt"

step "--insecure-nbd-tcp: plaintext with a warning, STARTTLS refused by policy"
daemon_start -- "${tcp[@]}" --insecure-nbd-tcp
vol_create plain 8Mi
grep -q "WITHOUT TLS (--insecure-nbd-tcp)" "$W/datapathd.log" || die "no warning for plaintext TCP"
[ "$(nbdinfo --size "nbd://127.0.0.1:$port/plain")" = $((8 << 20)) ] || die "plaintext TCP"
tls_client good "$CERTS/ca.crt" "$CERTS/client.crt" "$CERTS/client.key"
PORT=$port
expect_refused "nbds:// to a plaintext listener" nbdinfo --size "$(tls_uri plain good)"
PORT=$port CERTS=$CERTS VOL=plain "$PY" - <<'PY' || die "STARTTLS on the plaintext listener"
import os, socket, struct
s = socket.create_connection(("127.0.0.1", int(os.environ["PORT"])), timeout=10)
s.recv(18)
s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 5, 0))
hdr = b""
while len(hdr) < 20:
    hdr += s.recv(20 - len(hdr))
magic, opt, typ, ln = struct.unpack(">QIII", hdr)
assert opt == 5 and typ == (1 << 31 | 2), f"STARTTLS reply {typ:#x}, want ERR_POLICY"
PY
daemon_stop
