#!/usr/bin/env bash
# nbdctl snapshots, restores and clones against a real nbd-datapathd: create/list/inspect/delete
# in table and JSON form (JSON checked with jq), the point in time checked with real NBD data
# (write, snapshot, overwrite, restore: the restore holds the first data), and the exit codes of
# the error paths (1 server error, 2 usage). Works on either snapshot method of the pool's file
# system (reflink or background copy); --wait makes the test independent of which one it is.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

BIN=${NBDCSI_BIN:-$NBDCSI_SRC/build/bin}
[ -x "$BIN/nbdctl" ] || skip "no $BIN/nbdctl"
[ -x "$BIN/nbd-datapathd" ] || skip "no $BIN/nbd-datapathd"
"$BIN/nbd-datapathd" --help >/dev/null 2>&1 || skip "nbd-datapathd is still the placeholder"
need jq nbdcopy cmp

lib_init

# nbd_write FILE VOL / nbd_read VOL BYTES FILE: whole-volume I/O through the NBD server.
nbd_write() { nbdcopy "$1" "$(nbd_uri "$2")" || die "nbdcopy to $2 failed"; }
nbd_read() { nbdcopy "$(nbd_uri "$1")" "$2" || die "nbdcopy from $1 failed"; }

daemon_start
SZ=8Mi
SZB=$(to_bytes $SZ)

step "usage errors exit 2"
expect_fail 2 "snapshot" nbdctl snapshot
expect_fail 2 "--volume" nbdctl snapshot create s1
expect_fail 2 "SNAPSHOT" nbdctl snapshot inspect
expect_fail 2 "SNAPSHOT" nbdctl snapshot delete
expect_fail 2 "excludes" nbdctl volume create r --from-snapshot s --from-volume v
expect_fail 2 "--size is required" nbdctl volume create r
expect_fail 2 "unknown suffix" nbdctl volume create r --from-snapshot s --size 1Gx

step "write data, snapshot it (table and json)"
vol_create v $SZ
random_file "$W/orig" "$SZB"
nbd_write "$W/orig" v
nbdctl -o json snapshot create s1 --volume v --wait >"$W/j"
jqx ".name == \"s1\" and .source_volume == \"v\" and .size_bytes == $SZB and .size == \"$SZ\"" <"$W/j"
jqx '.ready == true and .error == "" and (.method == "reflink" or .method == "copy")' <"$W/j"
jqx '(.created | test("^[0-9]{4}-[0-9]{2}-[0-9]{2}T")) and .created_unix_ns > 0' <"$W/j"
jqx 'has("allocated_bytes") and has("copy_done_bytes") and has("copy_total_bytes") and (.data_path | length > 0)' <"$W/j"
CREATED=$(jq -r .created_unix_ns <"$W/j")
METHOD=$(jq -r .method <"$W/j")
# Idempotent: the same name and volume return the same snapshot, not a new point in time.
nbdctl -o json snapshot create s1 --volume v | jqx ".created_unix_ns == $CREATED"
nbdctl snapshot inspect s1 >"$W/t"
grep -qE '^Name: +s1$' "$W/t" || die "inspect table: $(cat "$W/t")"
grep -qE '^Source volume: +v$' "$W/t" || die "inspect table source: $(cat "$W/t")"
grep -qE "^Method: +$METHOD$" "$W/t" || die "inspect table method: $(cat "$W/t")"
grep -qE '^Ready: +yes$' "$W/t" || die "inspect table ready: $(cat "$W/t")"

step "overwrite the volume, restore the snapshot: the restore holds the original data"
random_file "$W/new" "$SZB"
nbd_write "$W/new" v
nbdctl -o json volume create r --from-snapshot s1 --wait >"$W/j"
jqx ".name == \"r\" and .source == \"snapshot/s1\" and .ready == true and .size_bytes == $SZB" <"$W/j"
nbd_read r "$W/r.back"
cmp "$W/r.back" "$W/orig" || die "restored volume differs from the data at the snapshot"
nbd_read v "$W/v.back"
cmp "$W/v.back" "$W/new" || die "the source volume lost its new data"
# A restore may be larger than its snapshot; the tail reads as zeros.
nbdctl -o json volume create rbig --from-snapshot s1 --size 16Mi --max-iops 1000 --wait >"$W/j"
jqx '.size_bytes == 16777216 and .qos.max_iops == 1000 and .ready == true' <"$W/j"
nbd_read rbig "$W/rbig.back"
cmp -n "$SZB" "$W/rbig.back" "$W/orig" || die "larger restore: head differs"
cmp -i "$SZB:0" -n "$SZB" "$W/rbig.back" /dev/zero || die "larger restore: tail is not zero"
expect_fail 1 "smaller than snapshot s1" nbdctl volume create rsmall --from-snapshot s1 --size 4Mi
expect_fail 1 "(invalid argument)" nbdctl volume create rsmall --from-snapshot s1 --size 4Mi

step "clone a live volume"
nbdctl volume create c --from-volume v --wait >"$W/t"
grep -qE '^Source: +volume/v$' "$W/t" || die "clone table source: $(cat "$W/t")"
grep -qE '^Ready: +yes$' "$W/t" || die "clone table ready: $(cat "$W/t")"
nbd_read c "$W/c.back"
cmp "$W/c.back" "$W/new" || die "clone differs from its source"
# Idempotent without --size (the source's size); a different request is ALREADY_EXISTS.
nbdctl -o json volume create c --from-volume v | jqx '.source == "volume/v"'
expect_fail 1 'cannot create volume "c"' nbdctl volume create c --from-volume v --size 16Mi
expect_fail 1 "(already exists)" nbdctl volume create c --from-snapshot s1
expect_fail 1 "(invalid argument)" nbdctl volume create v --from-volume v

step "volume list / inspect show SOURCE and READY"
nbdctl volume list >"$W/t"
head -1 "$W/t" | grep -qE '^NAME +SIZE +ALLOCATED +RO +CONNS +IOPS +BPS +READY +SOURCE +CREATED$' ||
  die "list header: $(head -1 "$W/t")"
grep -qE '^r +8Mi .* yes +snapshot/s1 +[0-9]{4}-' "$W/t" || die "list row r: $(cat "$W/t")"
grep -qE '^c +8Mi .* yes +volume/v +[0-9]{4}-' "$W/t" || die "list row c: $(cat "$W/t")"
grep -qE '^v +8Mi .* yes +- +[0-9]{4}-' "$W/t" || die "list row v: $(cat "$W/t")"
nbdctl -o json volume list >"$W/j"
jqx '[.volumes[] | {(.name): .source}] | add == {"c": "volume/v", "r": "snapshot/s1", "rbig": "snapshot/s1", "v": ""}' <"$W/j"
jqx 'all(.volumes[]; .ready == true and has("copy_done_bytes") and has("copy_total_bytes"))' <"$W/j"
nbdctl -o json volume inspect v | jqx '.source == "" and .ready == true'

step "snapshot list, filter, namespaces"
nbdctl snapshot create s2 --volume c --wait >/dev/null
# A snapshot may share a volume's name: separate namespaces (and separate API locks).
nbdctl snapshot create v --volume v --wait >/dev/null
nbdctl -o json snapshot list | jqx '(.snapshots | map(.name)) == ["s1", "s2", "v"]'
nbdctl -o json snapshot list --volume v | jqx '(.snapshots | map(.name)) == ["s1", "v"]'
nbdctl -o json snapshot ls --volume nobody | jqx '.snapshots == []'
nbdctl snapshot list >"$W/t"
head -1 "$W/t" | grep -qE '^NAME +VOLUME +SIZE +ALLOCATED +METHOD +READY +CREATED$' ||
  die "snapshot list header: $(head -1 "$W/t")"
grep -qE "^s2 +c +8Mi .* $METHOD +yes +[0-9]{4}-" "$W/t" || die "snapshot row s2: $(cat "$W/t")"
expect_fail 1 "invalid argument" nbdctl snapshot list --volume "../x"

step "pool info shows reflink, snapshots, abandoned copies"
nbdctl -o json pool info >"$W/j"
jqx '.snapshots == 3 and (.reflink | type) == "boolean" and .abandoned_copies == []' <"$W/j"
if [ "$METHOD" = reflink ]; then jqx '.reflink == true' <"$W/j"; else jqx '.reflink == false' <"$W/j"; fi
nbdctl pool info >"$W/t"
grep -qE '^Snapshots: +3$' "$W/t" || die "pool table snapshots: $(cat "$W/t")"
grep -qE '^Reflink: +(yes|no) ' "$W/t" || die "pool table reflink: $(cat "$W/t")"
grep -qE '^Abandoned copies: +none$' "$W/t" || die "pool table abandoned: $(cat "$W/t")"

step "server errors exit 1"
expect_fail 1 'cannot create snapshot "s1"' nbdctl snapshot create s1 --volume c
expect_fail 1 "(already exists)" nbdctl snapshot create s1 --volume c
expect_fail 1 "(not found)" nbdctl snapshot create s9 --volume ghost
expect_fail 1 "(not found)" nbdctl snapshot inspect ghost
expect_fail 1 'cannot delete snapshot "ghost"' nbdctl snapshot delete ghost
expect_fail 1 "snapshot name" nbdctl snapshot inspect ".hidden"
expect_fail 1 "(not found)" nbdctl volume create r2 --from-snapshot ghost
expect_fail 1 "(not found)" nbdctl volume create r2 --from-volume ghost
nbdctl volume list | grep -q '^r2 ' && die "a failed restore left a volume behind"

step "the snapshot outlives its source; delete"
nbdctl volume delete v >/dev/null
nbdctl volume create r3 --from-snapshot s1 --wait >/dev/null
nbd_read r3 "$W/r3.back"
cmp "$W/r3.back" "$W/orig" || die "restore after the source was deleted differs"
nbdctl snapshot delete s1 | grep -qF 'snapshot "s1" deleted' || die "delete table"
nbdctl -o json snapshot rm s2 | jqx '.deleted == "s2"'
nbdctl -o json snapshot delete v | jqx '.deleted == "v"'
nbdctl -o json snapshot list | jqx '.snapshots == []'
nbd_read r "$W/r.back2"
cmp "$W/r.back2" "$W/orig" || die "a restored volume changed when its snapshot was deleted"
nbdctl -o json pool info | jqx '.snapshots == 0'

step "daemon down"
daemon_stop
expect_fail 1 "is it running?" nbdctl snapshot list
step "ok"
