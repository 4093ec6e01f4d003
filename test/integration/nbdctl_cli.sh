#!/usr/bin/env bash
# nbdctl against a real nbd-datapathd: every command in table and JSON form (JSON checked with
# jq), and every error path's exit code (1 server error, 2 usage) and stderr message.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

BIN=${NBDCSI_BIN:-$NBDCSI_SRC/build/bin}
[ -x "$BIN/nbdctl" ] || skip "no $BIN/nbdctl"
[ -x "$BIN/nbd-datapathd" ] || skip "no $BIN/nbd-datapathd"
# The skeleton's placeholder daemon exits 1 at once and has no --help.
"$BIN/nbd-datapathd" --help >/dev/null 2>&1 || skip "nbd-datapathd is still the placeholder"
need jq nbdcopy

lib_init

step "daemon not running"
API_SOCK=$W/api.sock
expect_fail 1 "cannot reach nbd-datapathd at unix://$W/api.sock: is it running?" \
  nbdctl volume list
expect_fail 1 "does not exist" nbdctl pool info
NBDCTL_API="unix://$W/api.sock" expect_fail 1 "is it running?" "$BIN/nbdctl" volume list

daemon_start

step "usage errors exit 2"
expect_fail 2 "--size" nbdctl volume create nosize
expect_fail 2 'invalid quantity "1Gx": unknown suffix "Gx"' nbdctl volume create v --size 1Gx
expect_fail 2 "not a whole number of bytes" nbdctl volume create v --size 0.1Ki
expect_fail 2 "greater than 0" nbdctl volume create v --size 0
expect_fail 2 '--max-bps: invalid quantity "fast"' nbdctl volume create v --size 1Mi --max-bps fast
expect_fail 2 "nothing to change" nbdctl volume qos v
expect_fail 2 "output" nbdctl -o yaml volume list
expect_fail 2 "--api" "$BIN/nbdctl" --api unix://relative volume list
expect_fail 2 "volume" nbdctl volume
expect_fail 2 "bogus" nbdctl bogus
# Global options are accepted after the command too; bad values there are still usage errors.
expect_fail 2 "output" "$BIN/nbdctl" volume list -o yaml --api "unix://$API_SOCK"
expect_fail 2 "--api" "$BIN/nbdctl" volume list --api unix://relative
expect_fail 2 "--timeout" "$BIN/nbdctl" pool info --timeout 0 --api "unix://$API_SOCK"
"$BIN/nbdctl" --help | grep -q "volume" || die "--help lacks the volume command"
NBDCTL_API="unix://$API_SOCK" "$BIN/nbdctl" pool info >/dev/null || die "NBDCTL_API not honoured"

step "volume create (table and json)"
nbdctl volume create alpha --size 1Gi --max-iops 500 --max-write-bps 100Mi --burst-ms 200 \
  >"$W/t"
grep -qE '^Name: +alpha$' "$W/t" || die "create table: $(cat "$W/t")"
grep -qE '^Size: +1Gi \(1073741824 bytes\)$' "$W/t" || die "create table size: $(cat "$W/t")"
nbdctl -o json volume create beta --size 1.5Gi --read-only --iops-per-gib 10 >"$W/j"
jqx '.name == "beta" and .size_bytes == 1610612736 and .size == "1536Mi" and .read_only == true' <"$W/j"
jqx ".qos.iops_per_gib == 10 and .effective_qos.iops == 20" <"$W/j"   # per-GiB rounds the size up
nbdctl -o json volume create alpha --size 1Gi --max-iops 500 --max-write-bps 100Mi --burst-ms 200 \
  | jqx '.name == "alpha"'   # idempotent
expect_fail 1 'cannot create volume "alpha"' nbdctl volume create alpha --size 2Gi
expect_fail 1 "already exists" nbdctl volume create alpha --size 2Gi
expect_fail 1 "invalid argument" nbdctl volume create "../x" --size 1Gi
expect_fail 1 "multiple of 4096" nbdctl volume create odd --size 1000

step "volume list"
nbdctl volume list >"$W/t"
head -1 "$W/t" | grep -qE '^NAME +SIZE +ALLOCATED +RO +CONNS +IOPS +BPS +READY +SOURCE +CREATED$' ||
  die "list header: $(head -1 "$W/t")"
grep -qE '^alpha +1Gi .* no +0 +500 ' "$W/t" || die "list row alpha: $(cat "$W/t")"
grep -qE '^beta +1536Mi .* yes ' "$W/t" || die "list row beta: $(cat "$W/t")"
# Columns are aligned: SIZE starts at the same offset on every line.
awk 'NR==1 { c = index($0, "SIZE") } NR>1 && substr($0, c-2, 2) != "  " { exit 1 }' "$W/t" ||
  die "list not aligned"
nbdctl -o json volume list | jqx '(.volumes | map(.name)) == ["alpha", "beta"]'

step "global options after the command (kubectl/pxctl style) and before it"
A="unix://$API_SOCK"
"$BIN/nbdctl" volume list -o json --api "$A" | jqx '(.volumes | map(.name)) == ["alpha", "beta"]'
"$BIN/nbdctl" --api "$A" -o json volume list | jqx '(.volumes | map(.name)) == ["alpha", "beta"]'
"$BIN/nbdctl" --api "$A" volume ls --output json | jqx '.volumes | length == 2'
"$BIN/nbdctl" -o json volume inspect alpha --api "$A" | jqx '.name == "alpha"'
"$BIN/nbdctl" volume create gamma --size 1Gi --api "$A" >"$W/t"
grep -qE '^Name: +gamma$' "$W/t" || die "create with --api after: $(cat "$W/t")"
"$BIN/nbdctl" volume create gamma --size 1Gi -o json --api "$A" --timeout 5 | jqx '.name == "gamma"'
"$BIN/nbdctl" stats gamma -o json --api "$A" | jqx '.name == "gamma" and has("ops")'
"$BIN/nbdctl" pool info --api "$A" -o json | jqx '.volumes == 3'
# The option after the command must actually take effect, not just parse: a wrong --api there
# must override the environment and fail to connect.
NBDCTL_API="$A" expect_fail 1 "cannot reach nbd-datapathd at unix://$W/nope.sock" \
  "$BIN/nbdctl" volume list --api "unix://$W/nope.sock"
"$BIN/nbdctl" volume delete gamma --api "$A" -o json | jqx '.deleted == "gamma"'

step "volume inspect"
nbdctl volume inspect alpha | grep -qE '^Burst: +200ms$' || die "inspect burst"
nbdctl -o json volume inspect alpha >"$W/j"
jqx '.qos.max_iops == 500 and .qos.max_write_bps == 104857600 and .qos.burst_ms == 200' <"$W/j"
jqx '.effective_qos.iops == 500 and (.created | test("^[0-9]{4}-[0-9]{2}-[0-9]{2}T"))' <"$W/j"
jqx '.open_connections == 0 and (.data_path | length > 0) and .allocated_bytes >= 0' <"$W/j"
expect_fail 1 'cannot inspect volume "ghost"' nbdctl volume inspect ghost
expect_fail 1 "(not found)" nbdctl volume inspect ghost

step "volume qos: given flags change, others kept; --clear"
nbdctl -o json volume qos alpha --max-iops 1000 >"$W/j"
jqx '.qos.max_iops == 1000 and .qos.max_write_bps == 104857600 and .qos.burst_ms == 200' <"$W/j"
nbdctl -o json volume qos alpha --max-write-bps 0 | jqx '.qos.max_write_bps == 0 and .qos.max_iops == 1000'
nbdctl -o json volume qos alpha --clear | jqx '.qos | to_entries | all(.value == 0)'
nbdctl -o json volume qos alpha --clear --bps-per-gib 10Mi >"$W/j"
jqx '.qos.bps_per_gib == 10485760 and .effective_qos.bps == 10485760 and .qos.max_iops == 0' <"$W/j"
nbdctl volume qos alpha --max-read-iops 42 | grep -qE '^iops \(set\) +- +42 ' || die "qos table"
nbdctl -o json volume inspect alpha | jqx '.qos.max_read_iops == 42'
expect_fail 1 "burst_ms" nbdctl volume qos alpha --burst-ms 70000
expect_fail 1 'volume "ghost"' nbdctl volume qos ghost --max-iops 1

step "volume resize"
nbdctl -o json volume resize alpha --size 2Gi | jqx '.size_bytes == 2147483648 and .size == "2Gi"'
nbdctl volume resize alpha --size 2Gi | grep -qE '^Size: +2Gi' || die "resize table"
expect_fail 1 "shrink" nbdctl volume resize alpha --size 1Gi
expect_fail 1 'cannot resize volume "ghost"' nbdctl volume resize ghost --size 1Gi
expect_fail 2 "--size" nbdctl volume resize alpha
expect_fail 2 "unknown suffix" nbdctl volume resize alpha --size 3Gx

step "stats after real NBD I/O"
head -c 1048576 /dev/urandom >"$W/data"
nbdcopy "$W/data" "nbd+unix:///alpha?socket=$NBD_SOCK" || die "nbdcopy write failed"
# /usr/bin/python3 has the libnbd bindings (nbdsh would pick up whatever python3 is first).
"$PY" -c 'import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); sys.stdout.buffer.write(h.pread(1048576, 0))' \
  "nbd+unix:///alpha?socket=$NBD_SOCK" >"$W/back" || die "libnbd read failed"
cmp "$W/back" "$W/data" || die "read back differs"
nbdctl -o json stats alpha >"$W/j"
jqx '.name == "alpha" and .ops.write.ops > 0 and .ops.write.bytes >= 1048576' <"$W/j"
jqx '.ops.read.ops > 0 and .ops.read.bytes >= 1048576 and .ops.read.errors == 0' <"$W/j"
jqx '.latency.write.samples == .ops.write.ops and (.latency.write.p50_us | type) == "number"' <"$W/j"
jqx '(.latency.read.buckets | length) == 24 and .latency.read.buckets[-1].lt_us == null' <"$W/j"
jqx '.latency.write.p50_us <= .latency.write.p90_us and .latency.write.p90_us <= .latency.write.p99_us' <"$W/j"
jqx 'has("throttled_ns") and has("throttled_ops") and .open_connections == 0' <"$W/j"
nbdctl stats alpha >"$W/t"
grep -qE '^OP +OPS +ERRORS +BYTES$' "$W/t" || die "stats table header: $(cat "$W/t")"
grep -qE '^write +[1-9][0-9]* +0 +' "$W/t" || die "stats write row: $(cat "$W/t")"
grep -qE '^write +[0-9]+ +[<>]' "$W/t" || die "stats latency row: $(cat "$W/t")"
expect_fail 1 'cannot get stats of volume "ghost"' nbdctl stats ghost
expect_fail 2 "NAME" nbdctl stats

step "pool info"
nbdctl -o json pool info >"$W/j"
jqx '.volumes == 2 and .provisioned_bytes == (2147483648 + 1610612736)' <"$W/j"
jqx '.capacity_bytes > 0 and (.fs_type | length > 0) and (.cleaned_orphans | type) == "array"' <"$W/j"
jqx 'has("free_bytes") and has("allocated_bytes") and has("overcommit_ratio") and has("provisionable_bytes")' <"$W/j"
jqx ".dir == \"$W/pool\"" <"$W/j"
nbdctl pool info | grep -qE '^Volumes: +2$' || die "pool table"

step "broken volume: reported by pool info, named in errors, deletable"
nbdctl volume create vbad --size 1Mi >/dev/null
daemon_stop
printf '{not json' >"$W/pool/volumes/vbad.json"
daemon_start
grep -qF "pool: broken volume vbad: $W/pool/volumes/vbad.json" "$W/datapathd.log" ||
  die "daemon did not warn about the broken volume at startup"
nbdctl -o json pool info >"$W/j"
jqx '(.broken_volumes | length) == 1 and (.broken_volumes[0] | startswith("vbad: "))' <"$W/j"
jqx '.volumes == 2' <"$W/j"
nbdctl pool info >"$W/t"
grep -qE '^Broken volumes: +1 ' "$W/t" || die "pool table lacks the broken count: $(cat "$W/t")"
grep -qE "^  vbad: $W/pool/volumes/vbad.json" "$W/t" || die "pool table lacks vbad: $(cat "$W/t")"
nbdctl volume list | grep -q '^vbad ' && die "a broken volume must not be listed as usable"
expect_fail 1 'cannot inspect volume "vbad": volume vbad is broken' nbdctl volume inspect vbad
expect_fail 1 "(internal error)" nbdctl volume inspect vbad
expect_fail 1 "is broken" nbdctl stats vbad
expect_fail 1 "is broken" nbdctl volume resize vbad --size 2Mi
[ -f "$W/pool/volumes/vbad.json" ] && [ -f "$W/pool/volumes/vbad.img" ] ||
  die "failed calls on a broken volume removed its files"
nbdctl volume delete vbad | grep -qF 'volume "vbad" deleted' || die "delete broken volume"
nbdctl -o json pool info | jqx '.broken_volumes == []'
nbdctl pool info | grep -qE '^Broken volumes: +none$' || die "pool table after delete"

step "volume delete"
nbdctl volume delete beta | grep -qF 'volume "beta" deleted' || die "delete table"
nbdctl -o json volume rm alpha | jqx '.deleted == "alpha"'
expect_fail 1 'cannot delete volume "alpha"' nbdctl volume delete alpha
nbdctl -o json volume list | jqx '.volumes == []'
nbdctl volume list | awk 'NR > 1 { exit 1 }' || die "empty list prints only the header"

step "daemon gone again"
daemon_stop
expect_fail 1 "is it running?" nbdctl volume list
step "ok"
