#!/usr/bin/env bash
# Real NBD clients over TLS (STARTTLS, client certificates) on the daemon's TCP listener:
# nbdinfo, nbdcopy (write, read back, checksum), qemu-img and qemu-io; refused: no certificate,
# a certificate from another CA, an expired one, and a plaintext client. The Unix socket stays
# plaintext next to it.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nbd_tls_lib.sh"
need nbdinfo nbdcopy qemu-img qemu-io sha256sum
lib_init
tls_certs
tls_client good "$CERTS/ca.crt" "$CERTS/client.crt" "$CERTS/client.key"
tls_client nocert "$CERTS/ca.crt"
tls_client otherca "$CERTS/ca.crt" "$CERTS/other/client.crt" "$CERTS/other/client.key"
tls_client expired "$CERTS/ca.crt" "$CERTS/client-expired.crt" "$CERTS/client-expired.key"
tls_daemon_start
vol_create disk 128Mi

step "nbdinfo over TLS: TLS is in use and the export is what the pool says"
nbdinfo --is tls "$(tls_uri disk good)" || die "nbdinfo --is tls: not TLS (or refused)"
[ "$(nbdinfo --size "$(tls_uri disk good)")" = $((128 << 20)) ] || die "wrong size over TLS"
nbdinfo --json "$(tls_uri disk good)" >"$W/info.json" || die "nbdinfo --json failed"
"$PY" - "$W/info.json" <<'EOF' || die "nbdinfo --json over TLS: unexpected content"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["TLS"] is True, j
e = j["exports"][0]
assert e["export-name"] == "disk" and e["can_multi_conn"] and "base:allocation" in e["contexts"], e
EOF
nbdinfo --list "$(tls_uri "" good)" | grep -q 'export="disk"' || die "nbdinfo --list over TLS"

step "nbdcopy a 96 MiB random image in over TLS, read it back, compare checksums"
src=$W/src.raw
random_file "$src" $((96 << 20))
dd if=/dev/zero of="$src" bs=1M seek=40 count=8 conv=notrunc status=none  # zero run: WRITE_ZEROES
want=$(sha256sum <"$src" | cut -d' ' -f1)
timeout 120 nbdcopy --flush "$src" "$(tls_uri disk good)" || die "nbdcopy in over TLS failed"
timeout 120 nbdcopy --connections=4 "$(tls_uri disk good)" "$W/back.raw" ||
  die "nbdcopy out over TLS failed"
got=$(head -c $((96 << 20)) "$W/back.raw" | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || die "read back over TLS differs from what was written"
# The tail past the image was never written: zeroes.
tail_sum=$(tail -c +$(((96 << 20) + 1)) "$W/back.raw" | tr -d '\0' | wc -c)
[ "$tail_sum" = 0 ] || die "the unwritten tail of the volume is not zero"
rm -f "$W/back.raw"
step "the same bytes through the Unix socket (plaintext, local)"
nbdcopy "$(nbd_uri disk)" "$W/unix.raw" || die "nbdcopy out over the Unix socket failed"
got=$(head -c $((96 << 20)) "$W/unix.raw" | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || die "the Unix socket reads other bytes than TLS wrote"
rm -f "$W/unix.raw"

step "qemu-img info and compare over TLS"
qemu_tls good disk
qemu-img info "${QEMU_TLS[@]}" --image-opts "$QEMU_IMG" >"$W/qemu-info.out" ||
  { cat "$W/qemu-info.out" >&2; die "qemu-img info over TLS failed"; }
grep -q "virtual size: 128 MiB" "$W/qemu-info.out" || die "qemu-img info: $(cat "$W/qemu-info.out")"
truncate -s $((128 << 20)) "$src"
qemu-img compare "${QEMU_TLS[@]}" --image-opts "driver=raw,file.filename=$src" "$QEMU_IMG" ||
  die "qemu-img compare over TLS reports a difference"

step "qemu-io writes and reads a pattern over TLS"
qemu-io "${QEMU_TLS[@]}" --image-opts "$QEMU_IMG" -c 'write -P 0xa5 64M 1M' \
  -c 'read -P 0xa5 64M 1M' -c 'flush' -c 'write -z 65M 64k' -c 'read -P 0 65M 64k' \
  >"$W/qemu-io.out" 2>&1 || { cat "$W/qemu-io.out" >&2; die "qemu-io over TLS failed"; }
grep -q "Pattern verification failed" "$W/qemu-io.out" && die "qemu-io: $(cat "$W/qemu-io.out")"
grep -c "^read " "$W/qemu-io.out" | grep -qx 2 ||
  die "qemu-io did not read twice: $(cat "$W/qemu-io.out")"
nbdcopy "$(nbd_uri disk)" "$W/unix.raw" || die "nbdcopy out over the Unix socket failed"
got=$(dd if="$W/unix.raw" bs=1M skip=64 count=1 status=none | tr -d '\245' | wc -c)
[ "$got" = 0 ] || die "qemu-io's pattern is not on the volume"
rm -f "$W/unix.raw"

step "refused: no client certificate, another CA's certificate, an expired certificate"
expect_refused "nbdinfo without a client certificate" nbdinfo --size "$(tls_uri disk nocert)"
log_wait 5 "TLS handshake with 127\.0\.0\.1:[0-9]+ failed: peer did not return a certificate"
expect_refused "nbdinfo with another CA's certificate" nbdinfo --size "$(tls_uri disk otherca)"
expect_refused "nbdinfo with an expired certificate" nbdinfo --size "$(tls_uri disk expired)"
log_wait 5 "failed: client certificate refused: certificate has expired"
qemu_tls nocert disk
expect_refused "qemu-img without a client certificate" \
  qemu-img info "${QEMU_TLS[@]}" --image-opts "$QEMU_IMG"
qemu_tls otherca disk
expect_refused "qemu-img with another CA's certificate" \
  qemu-img info "${QEMU_TLS[@]}" --image-opts "$QEMU_IMG"

step "refused: plaintext on the TLS listener (the server wants STARTTLS first)"
expect_refused "plaintext nbdinfo" nbdinfo --size "nbd://127.0.0.1:$PORT/disk"
grep -qi "not supported\|TLS" "$W/refused.out" || die "plaintext refusal: $(cat "$W/refused.out")"

step "the refusals cost nothing: TLS clients still work, the volume counts no stale connection"
nbdinfo --is tls "$(tls_uri disk good)" || die "a good client is refused after the bad ones"
wait_for 10 sh -c "'$NBDCSI_BIN/nbdctl' --api 'unix://$API_SOCK' volume inspect disk |
  grep -qE '^Connections: +0$'" || die "connections left open: $(nbdctl volume inspect disk)"
daemon_alive || die "daemon died"
daemon_stop
