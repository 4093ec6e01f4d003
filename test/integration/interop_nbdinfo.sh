#!/usr/bin/env bash
# nbdinfo (libnbd) sees what the handshake promises: size, every transmission flag the daemon
# advertises, the base:allocation context, INFO_BLOCK_SIZE, the export list and read-only.
. "$(dirname "$0")/lib.sh"
need nbdinfo jq
lib_init
daemon_start
vol_create alpha 1Gi
vol_create beta 3Mi
vol_create frozen 64Mi --read-only

step "nbdinfo --json alpha"
info=$(nbdinfo --json "$(nbd_uri alpha)") || die "nbdinfo alpha failed"
x() { jq -er ".exports[0].$1" <<<"$info"; }
[ "$(jq -r .protocol <<<"$info")" = newstyle-fixed ] || die "protocol is not fixed newstyle"
[ "$(jq -r .structured <<<"$info")" = true ] || die "structured replies not negotiated"
[ "$(x '"export-size"')" = 1073741824 ] || die "alpha size $(x '"export-size"') != 1Gi"
[ "$(x '"export-name"')" = alpha ] || die "export name mismatch"
for f in can_flush can_fua can_trim can_zero can_df can_multi_conn can_fast_zero; do
  [ "$(x "$f")" = true ] || die "alpha: $f is not advertised"
done
[ "$(x is_read_only)" = false ] || die "alpha is read-only"
jq -e '.exports[0].contexts | index("base:allocation")' <<<"$info" >/dev/null ||
  die "base:allocation context missing: $(jq -c .exports[0].contexts <<<"$info")"
[ "$(x block_size_minimum)" = 1 ] || die "min block size $(x block_size_minimum) != 1"
[ "$(x block_size_preferred)" = 4096 ] || die "preferred block size $(x block_size_preferred) != 4096"
[ "$(x block_size_maximum)" = 33554432 ] || die "max block size $(x block_size_maximum) != 32 MiB"

step "sizes that are not a multiple of 1 MiB are exact"
[ "$(nbdinfo --size "$(nbd_uri beta)")" = 3145728 ] || die "beta size wrong"

step "read-only volume"
ro=$(nbdinfo --json "$(nbd_uri frozen)") || die "nbdinfo frozen failed"
[ "$(jq -r '.exports[0].is_read_only' <<<"$ro")" = true ] || die "frozen is not read-only"
# A read-only export has nothing to write, trim or zero; advertising it would invite EPERM.
for f in can_trim can_zero can_fast_zero; do
  [ "$(jq -r ".exports[0].$f" <<<"$ro")" != true ] || die "read-only frozen advertises $f"
done

step "nbdinfo --list"
if is_datapathd; then
  names=$(nbdinfo --list --json "$(nbd_uri alpha)" | jq -r '.exports[]."export-name"' | sort | tr '\n' ' ')
  [ "$names" = "alpha beta frozen " ] || die "export list '$names' != 'alpha beta frozen '"
else
  nbdinfo --list "$(nbd_uri alpha)" >/dev/null || die "nbdinfo --list failed"
fi

step "an unknown export is refused"
if nbdinfo "$(nbd_uri nosuch | sed 's/?socket=.*//')?socket=$(nbd_sock alpha)" >/dev/null 2>"$W/err"; then
  die "nbdinfo accepted export 'nosuch'"
fi
daemon_alive || die "daemon died"
daemon_stop

if is_datapathd; then
  step "optional plaintext TCP listener (--insecure-nbd-tcp) next to the Unix socket, same pool"
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  daemon_start -- --nbd-listen "tcp://127.0.0.1:$port" --insecure-nbd-tcp
  wait_for 5 nbdinfo --size "nbd://127.0.0.1:$port/alpha" || die "no NBD over tcp://127.0.0.1:$port"
  [ "$(nbdinfo --size "nbd://127.0.0.1:$port/alpha")" = 1073741824 ] || die "alpha over TCP: wrong size"
  [ "$(nbdinfo --size "$(nbd_uri beta)")" = 3145728 ] || die "the Unix listener stopped working"
  daemon_stop
fi
