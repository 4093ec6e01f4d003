#!/usr/bin/env bash
# Certificate rotation without a restart. The daemon reads its NBD TLS files through a
# Kubernetes-style secret directory (tls.crt -> ..data/tls.crt, ..data -> ..VERSION, swapped
# atomically as kubelet and cert-manager do). While one TLS connection does verified I/O:
#   - a half-written certificate (rewritten in place) does not load: the old material stays,
#     and once the file is whole again it loads;
#   - a swap to a mismatched pair (new certificate, old key) does not load: the old one stays;
#   - a swap to a set from another CA loads: new clients are verified against the new CA only
#     (a client of the old CA is refused, one of the new CA is served);
# and the connection opened before all of it keeps going with no error.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nbd_tls_lib.sh"
need nbdinfo nbdcopy
"$PY" -c 'import nbd' 2>/dev/null || skip "needs python3-libnbd for $PY"
lib_init
tls_certs
tls_client old "$CERTS/ca.crt" "$CERTS/client.crt" "$CERTS/client.key"
tls_client new "$CERTS/other/ca.crt" "$CERTS/other/client.crt" "$CERTS/other/client.key"
# Trusts the new server, but holds a certificate of the old CA: the server must refuse it.
tls_client mixed "$CERTS/other/ca.crt" "$CERTS/client.crt" "$CERTS/client.key"

S=$W/secret
# version NAME CERT KEY CA: a new ..NAME directory, then the atomic swap of ..data to it.
version() {
  local name=$1
  mkdir -p "$S/..$name"
  cp "$2" "$S/..$name/tls.crt"
  cp "$3" "$S/..$name/tls.key"
  cp "$4" "$S/..$name/ca.crt"
  ln -sfn "..$name" "$S/..data_tmp"
  mv -T "$S/..data_tmp" "$S/..data"
}
mkdir -p "$S"
version v1 "$CERTS/server.crt" "$CERTS/server.key" "$CERTS/ca.crt"
for f in tls.crt tls.key ca.crt; do ln -s "..data/$f" "$S/$f"; done

tls_daemon_start "$S/tls.crt" "$S/tls.key" "$S/ca.crt"
vol_create disk 64Mi
random_file "$W/src.raw" $((32 << 20))
nbdcopy "$W/src.raw" "$(nbd_uri disk)" || die "filling the volume failed"

loaded() { grep -c "nbd tls: new certificate in force" "$W/datapathd.log" || true; }
refused() {
  grep -c "nbd tls: the certificate files changed but do not load" "$W/datapathd.log" || true
}
server_refusals() {
  local why="peer did not return a certificate|client certificate refused"
  grep -cE "TLS handshake with .* failed: ($why)" "$W/datapathd.log" || true
}
progress() { cat "$W/progress" 2>/dev/null || echo 0; }
# wait_count SECONDS FUNC N: FUNC's count reaches N.
wait_count() {
  local deadline=$(( $(date +%s) + $1 ))
  until [ "$($2)" -ge "$3" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "$2 did not reach $3 within $1 s (is $($2))"
    sleep 0.1
  done
}
# advances: the long connection makes progress (20 more verified operations within 30 s).
advances() {
  local from; from=$(progress)
  wait_count 30 progress $((from + 20))
}

step "a long TLS connection starts verified I/O"
bg "$PY" "$(dirname "$0")/../support/nbd_live_io.py" --tls "$W/cli-old" --source "$W/src.raw" \
  "nbds://127.0.0.1:$PORT/disk" "$W/progress" "$W/stop"
IO_PID=$BG_PID
wait_count 30 progress 20
nbdinfo --is tls "$(tls_uri disk old)" || die "the old CA's client is refused before any rotation"

step "a half-written certificate (rewritten in place) does not replace the working one"
head -c 200 "$CERTS/other/server.crt" >"$S/tls.crt"
wait_count 15 refused 1
nbdinfo --is tls "$(tls_uri disk old)" || die "the old material was dropped for a broken file"
advances
step "written whole again, it loads (the same certificate as before)"
cat "$CERTS/server.crt" >"$S/tls.crt"
wait_count 15 loaded 1
nbdinfo --is tls "$(tls_uri disk old)" || die "the old CA's client is refused after the reload"

step "a swap to a mismatched pair (new certificate, old key) does not load"
version v2 "$CERTS/other/server.crt" "$CERTS/server.key" "$CERTS/other/ca.crt"
wait_count 15 refused 2
grep -q "does not belong to --nbd-tls-cert" "$W/datapathd.log" || die "mismatch not named"
nbdinfo --is tls "$(tls_uri disk old)" || die "the old material was dropped for a mismatched pair"
expect_refused "new CA's client before the rotation" nbdinfo --size "$(tls_uri disk new)"
advances

step "a swap to another CA's set loads; new handshakes are verified against the new CA only"
version v3 "$CERTS/other/server.crt" "$CERTS/other/server.key" "$CERTS/other/ca.crt"
wait_count 15 loaded 2
grep -q "new certificate in force for new connections: /CN=nbd-csi test server other" \
  "$W/datapathd.log" || die "the log does not name the new certificate"
nbdinfo --is tls "$(tls_uri disk new)" || die "the new CA's client is refused after the rotation"
expect_refused "the old CA's client after the rotation" nbdinfo --size "$(tls_uri disk old)"
n=$(server_refusals)
expect_refused "a client certificate of the old CA, trusting the new server" \
  nbdinfo --size "$(tls_uri disk mixed)"
wait_count 5 server_refusals $((n + 1))  # refused by the server, not by the client
rm -rf "$S/..v1" "$S/..v2"  # what kubelet does with old versions

step "the connection from before every rotation is still doing verified I/O"
advances
touch "$W/stop"
rc=0
wait "$IO_PID" || rc=$?
[ $rc = 0 ] || die "the long TLS connection failed (exit $rc)"
step "$(progress) verified operations on the long connection"
daemon_alive || die "daemon died"
daemon_stop
