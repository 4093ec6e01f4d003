#!/usr/bin/env bash
# qemu-io (QEMU's block layer as NBD client): pattern writes at aligned and unaligned offsets,
# FUA writes, flush, discard, write-zeroes with and without unmap, each verified by reading back.
. "$(dirname "$0")/lib.sh"
need qemu-io
lib_init
daemon_start
vol_create q 64Mi

# Every command in one qemu-io session; qemu-io prints the failure but keeps going, so the
# transcript is scanned for failure markers afterwards.
cmds=(
  # aligned
  "write -P 0x11 0 4k"            "read -P 0x11 0 4k"
  "write -P 0x22 1M 1M"           "read -P 0x22 1M 1M"
  # unaligned start, length and both; neighbours must be untouched (read-modify-write correctness)
  "write -P 0x33 5000 3"          "read -P 0x11 0 4k"    "read -P 0 4096 904" "read -P 0x33 5000 3" "read -P 0 5003 3189"
  "write -P 0x44 1048575 2"       "read -P 0 1048574 1"  "read -P 0x44 1048575 2" "read -P 0x22 1048577 1048575"
  "write -P 0x55 10000000 777777" "read -P 0x55 10000000 777777" "read -P 0 9999999 1" "read -P 0 10777777 1"
  # the last byte of the device
  "write -P 0x66 67108863 1"      "read -P 0x66 67108863 1"
  # FUA writes and flush
  "write -f -P 0x77 20M 64k"      "read -P 0x77 20M 64k"
  "write -f -P 0x78 20M 3"        "read -P 0x78 20M 3" "read -P 0x77 20971523 65533"
  "flush"
  # discard: the range reads as zeroes (the daemon advertises no "trim is not zeroing" escape)
  "write -P 0x88 30M 1M"          "discard 30M 512k"     "read -P 0 30M 512k"  "read -P 0x88 30.5M 512k"
  # write zeroes, without and with unmap, aligned and not
  "write -P 0x99 40M 1M"          "write -z 40M 64k"     "read -P 0 40M 64k"   "read -P 0x99 41024k 960k"
  "write -z -u 41M 64k"
  "write -P 0x9a 41M 1M"          "write -z -u 41M 512k" "read -P 0 41M 512k"  "read -P 0x9a 41.5M 512k"
  "write -P 0xab 50M 8k"          "write -z 51201k 100"  "read -P 0xab 50M 1024" "read -P 0 51201k 100" "read -P 0xab 52429924 7068"
  "write -z -f 60M 1M"            "read -P 0 60M 1M"
  "flush"
)
args=()
for c in "${cmds[@]}"; do args+=(-c "$c"); done

run() {
  qemu-io -f raw "${args[@]}" "$(nbd_uri q)" >"$W/qio.out" 2>&1 || { cat "$W/qio.out" >&2; die "qemu-io exited non-zero"; }
  # "Pattern verification failed" for a bad read, "failed:" for an I/O error.
  if grep -Eiq 'fail|error|not supported|invalid' "$W/qio.out"; then
    grep -Ei 'fail|error|not supported|invalid' "$W/qio.out" | head -5 >&2
    die "qemu-io reported a failure ($1)"
  fi
  n=$(grep -c -E '^(read|wrote) [0-9]+/[0-9]+ bytes' "$W/qio.out")
  want=$(printf '%s\n' "${cmds[@]}" | grep -cE '^(read|write)')
  [ "$n" = "$want" ] || die "qemu-io completed $n of $want reads/writes ($1)"
}

step "pattern, FUA, flush, discard, write-zeroes (${#cmds[@]} commands)"
run "session 1"

step "verify everything again from a fresh connection"
# The final state of every range written above (later overwrites win).
args=(-c "read -P 0x11 0 4k" -c "read -P 0x33 5000 3" -c "read -P 0x44 1048575 2"
      -c "read -P 0x55 10000000 777777" -c "read -P 0x66 67108863 1" -c "read -P 0x78 20M 3"
      -c "read -P 0 30M 512k" -c "read -P 0x88 30.5M 512k" -c "read -P 0 40M 64k"
      -c "read -P 0 41M 512k" -c "read -P 0x9a 41.5M 512k" -c "read -P 0 51201k 100"
      -c "read -P 0x99 41024k 960k"
      -c "read -P 0 60M 1M" -c "read -P 0 62M 1M")
qemu-io -f raw -r "${args[@]}" "$(nbd_uri q)" >"$W/qio2.out" 2>&1 || die "qemu-io (2) exited non-zero"
if grep -Eiq 'fail|error' "$W/qio2.out"; then grep -Ei 'fail|error' "$W/qio2.out" | head >&2; die "fresh-connection verification failed"; fi
[ "$(grep -c '^read ' "$W/qio2.out")" = 15 ] || { cat "$W/qio2.out" >&2; die "not all 15 verification reads ran"; }

step "a wrong pattern is detected (the checker itself can fail)"
qemu-io -f raw -r -c "read -P 0x12 0 4k" "$(nbd_uri q)" >"$W/qio3.out" 2>&1 || true
grep -q 'Pattern verification failed' "$W/qio3.out" || die "qemu-io did not flag a wrong pattern"
daemon_alive || die "daemon died"
daemon_stop
