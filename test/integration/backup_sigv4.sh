#!/usr/bin/env bash
# The backup S3 client's SigV4 signatures (libcurl's CURLOPT_AWS_SIGV4, datapath/backup/
# s3_store.cpp) checked by an independent verifier: sigv4_proxy.py sits in front of s3rver
# (which checks no signature) and recomputes every request's signature with botocore's signer
# from what arrived, refusing any mismatch with S3's errors. First the verifier's self-test
# (tampered query, header, path, body, secret, date, region, token are refused), then real
# backups through nbd-datapathd and nbdctl against the proxy, in region eu-west-3, under a
# prefix with characters that need URI encoding, with a secret holding '/', '+' and '=':
# full and incremental backup, list, inspect, restore bit-exact, listings of more than 1000
# keys (continuation tokens in the query), delete and GC, an encrypted target, a session token
# (signed as x-amz-security-token), us-east-1 through a second proxy. The verifier's log must
# hold no refusal for all that; a wrong secret and an unknown key must give nbdctl's
# PERMISSION_DENIED and the proxy's SignatureDoesNotMatch / InvalidAccessKeyId.
# Exits 77 when s3rver or python3-botocore is missing, unless CI=true (then it fails).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

NBDCSI_SERVER=datapathd
PY=/usr/bin/python3
PROXY=$(dirname "$0")/sigv4_proxy.py
missing() { if [ "${CI:-}" = true ]; then die "$* (CI=true: required)"; else skip "$*"; fi; }
S3RVER_BIN=$("$NBDCSI_SRC/scripts/get-s3rver.sh" --check 2>/dev/null) ||
  missing "s3rver is not installed (scripts/deps.sh test installs it)"
$PY -c 'import botocore.auth' 2>/dev/null || missing "needs python3-botocore (scripts/deps.sh test)"
need node jq nbdcopy sha256sum curl xargs
$PY -c 'import nbd' 2>/dev/null || skip "needs python3-libnbd"

lib_init

# ---- the verifier can refuse: tampered requests signed by botocore are each rejected ----
$PY "$PROXY" --self-test >"$W/selftest.log" 2>&1 || { cat "$W/selftest.log" >&2; die "the verifier's self-test failed"; }
n=$(grep -c '^pass: ' "$W/selftest.log")
[ "$n" -ge 20 ] || die "the self-test ran $n checks, want >= 20"
step "verifier self-test: $n checks passed (good requests accepted, tampered ones refused)"

MiB=$((1 << 20))
CHUNK=$((4 * MiB))
BUCKET=backups
REGION=eu-west-3
# A prefix with characters SigV4 must encode in the path (and in the listing's prefix= value).
PREFIX="site a+b/night=ly~(1),x!y'z*@\$&;:"
KEY_ID=S3RVER  # s3rver's account (it checks the key id, never the signature)
SECRET='wJalrXUtnFEMI/K7MDENG+bPxRfiCY=EXAMPLE'
export AWS_ACCESS_KEY_ID=$KEY_ID AWS_SECRET_ACCESS_KEY=$SECRET
unset AWS_SESSION_TOKEN AWS_REGION
free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
s3port=$(free_port)
mkdir -p "$W/s3"
# s3rver's listing continuation tokens need OpenSSL 3's legacy provider (see backup_s3.sh).
bg env NODE_OPTIONS=--openssl-legacy-provider "$S3RVER_BIN" -d "$W/s3" -a 127.0.0.1 -p "$s3port" -s --configure-bucket "$BUCKET"
proxy_start() {  # proxy_start PORT REGION LOG
  bg "$PY" "$PROXY" --listen "$1" --upstream "http://127.0.0.1:$s3port" --log "$3" \
    --region "$2" --credential "$KEY_ID:$SECRET"
}
LOG=$W/verdicts.log
LOG_US=$W/verdicts-us-east-1.log
: >"$LOG"; : >"$LOG_US"
pport=$(free_port)
proxy_start "$pport" "$REGION" "$LOG"
pport_us=$(free_port)
proxy_start "$pport_us" us-east-1 "$LOG_US"
for p in "$s3port" "$pport" "$pport_us"; do
  wait_for 30 $PY -c "import socket; socket.create_connection(('127.0.0.1', $p), 1)" ||
    die "nothing listens on $p"
done
ENDPOINT=http://127.0.0.1:$pport
step "s3rver on :$s3port, verifying proxies on :$pport ($REGION) and :$pport_us (us-east-1)"

T=(--target "s3://$BUCKET/$PREFIX" --endpoint "$ENDPOINT" --region "$REGION")
denials() { grep -c '^DENY ' "$1" || true; }
oks() { grep -c '^OK ' "$1" || true; }
no_denials() {  # no_denials WHAT: the verifier refused nothing so far
  local d
  d=$(denials "$LOG")
  [ "$d" = 0 ] || { grep '^DENY ' "$LOG" | head -n 5 >&2; die "$1: the verifier refused $d request(s)"; }
  # ... and every target went out in canonical form (the same to any server's reading).
  d=$(grep -c ' noncanonical-target$' "$LOG" || true)
  [ "$d" = 0 ] || { grep -m5 ' noncanonical-target$' "$LOG" >&2; die "$1: $d request(s) not in canonical form"; }
}
vol_sha() {
  nbdcopy "$(nbd_uri "$1")" "$W/read.$1" || die "nbdcopy from $1 failed"
  sha256sum <"$W/read.$1" | cut -d' ' -f1
  rm -f "$W/read.$1"
}
run() {  # run OUT CMD...: nbdctl with its stderr shown on failure
  local out=$1; shift
  "$@" >"$out" 2>"$W/err" || { cat "$W/err" >&2; die "failed: $*"; }
}

daemon_start
# ---- full backup of 12 chunks of data (8 regions of 4 MiB + 16 MiB), then an incremental ----
vol_create src 128Mi
for i in 0 1 2 3 4 5 6 7; do
  random_file "$W/part$i" "$CHUNK"
  nbd_pwrite src $(( i * 2 * CHUNK )) "$W/part$i"
done
random_file "$W/tail" $((16 * MiB))
nbd_pwrite src $((100 * MiB)) "$W/tail"
nbdctl snapshot create s1 --volume src --wait >/dev/null
sha_s1=$(vol_sha src)
run "$W/b1.json" nbdctl -o json backup create b1 "${T[@]}" --snapshot s1 --wait
jqx '.state == "succeeded" and .chunks_uploaded == 12' <"$W/b1.json"
puts=$(grep -c '^OK PUT .*/chunks/' "$LOG" || true)
[ "$puts" -ge 12 ] || die "the verifier saw $puts chunk PUTs, want >= 12"
# The prefix reached the server as itself (decoded from the signed path).
[ -d "$W/s3/$BUCKET/$PREFIX/chunks" ] || die "no chunks under the prefix on the server: $(ls "$W/s3/$BUCKET")"
grep -q '^OK PUT /backups/site%20a%2Bb/night%3Dly~%281%29' "$LOG" ||
  die "no PUT with the encoded prefix in the log: $(grep '^OK PUT' "$LOG" | head -n 1)"
random_file "$W/change" $((64 * 1024))
nbd_pwrite src $((2 * CHUNK + 4096)) "$W/change"
nbdctl snapshot create s2 --volume src --wait >/dev/null
sha_s2=$(vol_sha src)
run "$W/b2.json" nbdctl -o json backup create b2 "${T[@]}" --snapshot s2 --wait
jqx '.state == "succeeded" and .chunks_uploaded == 1 and .chunks_reused == 11' <"$W/b2.json"
no_denials "full and incremental backups"
step "b1 (12 chunks) and b2 (1 new chunk) through the verifier: $(oks "$LOG") requests verified, 0 refused"

# ---- list, inspect, restore bit-exact ----
nbdctl -o json backup list "${T[@]}" | jqx '.backups | map(.name) == ["b1", "b2"]'
run "$W/inspect.json" nbdctl -o json backup inspect b2 "${T[@]}"
jqx '.backup.chunks == 12' <"$W/inspect.json"
run /dev/null nbdctl backup restore b1 "${T[@]}" --volume r1 --wait
run /dev/null nbdctl backup restore b2 "${T[@]}" --volume r2 --wait
[ "$(vol_sha r1)" = "$sha_s1" ] || die "r1 differs from s1"
[ "$(vol_sha r2)" = "$sha_s2" ] || die "r2 differs from s2"
grep -q '^OK HEAD ' "$LOG" || die "no HEAD went through the verifier"
grep -q '^OK GET .*/chunks/' "$LOG" || die "no chunk GET went through the verifier"
# S3's error answers come back through the proxy: a missing backup, a missing bucket.
expect_fail -i 1 "does not exist" nbdctl backup restore nope "${T[@]}" --volume r0 --wait
expect_fail -i 1 "bucket \"nosuchbucket\" does not exist" nbdctl backup list \
  --target s3://nosuchbucket/x --endpoint "$ENDPOINT" --region "$REGION"
no_denials "list, inspect, restore"
step "list, inspect, b1 and b2 restored bit-exact; a missing backup and bucket reported as such"

# ---- listings of more than 1000 keys: 1005 stray objects put straight into s3rver; the
# continuation tokens go back in signed queries; delete + GC collects them (1005 DELETEs) ----
seq 1 1005 | xargs -P 8 -I{} curl -sf --aws-sigv4 aws:amz:us-east-1:s3 --user "$KEY_ID:$SECRET" \
  -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -X PUT --data-binary {} -o /dev/null \
  "http://127.0.0.1:$s3port/$BUCKET/$(jq -rn --arg p "$PREFIX" '$p|@uri')/chunks/zz/stray{}" ||
  die "putting stray objects failed"
[ "$(find "$W/s3/$BUCKET/$PREFIX/chunks/zz" -name '*._S3rver_object' | wc -l)" = 1005 ] ||
  die "the stray objects are not under the prefix"
run "$W/del1.json" nbdctl -o json backup delete b1 "${T[@]}"
jqx '.gc_deferred == false and .chunks_deleted == 1006' <"$W/del1.json"
tokens=$(grep -c '^OK GET /backups?continuation-token=' "$LOG" || true)
[ "$tokens" -ge 1 ] || die "no listing with a continuation token went through the verifier"
grep '^OK GET /backups?continuation-token=' "$LOG" | grep -q '%2B\|%2F\|%3D' ||
  die "no continuation token held a character to encode: $(grep -m1 'continuation-token=' "$LOG")"
[ "$(grep -c '^OK DELETE .*/chunks/zz/stray' "$LOG")" = 1005 ] || die "not 1005 stray DELETEs verified"
no_denials "paged listings and GC"
run /dev/null nbdctl backup restore b2 "${T[@]}" --volume r3 --wait
[ "$(vol_sha r3)" = "$sha_s2" ] || die "r3 differs from s2"
step "b1 deleted, 1005 strays + 1 chunk collected through $tokens continued listing(s); b2 still restores"

# ---- an encrypted target ----
EP="$PREFIX/encrypted"
ET=(--target "s3://$BUCKET/$EP" --endpoint "$ENDPOINT" --region "$REGION")
printf 'sigv4 passphrase %s\n' "$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$W/enc.key"
run "$W/e1.json" nbdctl -o json backup create e1 "${ET[@]}" --snapshot s2 --encryption-key-file "$W/enc.key" --wait
jqx '.state == "succeeded" and .chunks_uploaded == 12' <"$W/e1.json"
[ -f "$W/s3/$BUCKET/$EP/config.json._S3rver_object" ] || die "no config.json in the encrypted prefix"
run /dev/null nbdctl backup restore e1 "${ET[@]}" --encryption-key-file "$W/enc.key" --volume er1 --wait
[ "$(vol_sha er1)" = "$sha_s2" ] || die "er1 differs from s2"
run "$W/dele.json" nbdctl -o json backup delete e1 "${ET[@]}" --encryption-key-file "$W/enc.key"
jqx '.chunks_deleted == 12' <"$W/dele.json"
no_denials "encrypted target"
step "encrypted target: backup, restore bit-exact, delete"

# ---- a session token: sent as x-amz-security-token and signed ----
before=$(oks "$LOG")
AWS_SESSION_TOKEN='FwoGZXIvYXdzEDo+session/token=' nbdctl -o json backup list "${T[@]}" |
  jqx '.backups | map(.name) == ["b2"]'
AWS_SESSION_TOKEN='FwoGZXIvYXdzEDo+session/token=' run /dev/null nbdctl backup inspect b2 "${T[@]}"
n=$(tail -n +$((before + 1)) "$LOG" | grep -c '^OK .*signed=.*x-amz-security-token' || true)
[ "$n" -ge 2 ] || die "$n requests signed x-amz-security-token, want >= 2"
no_denials "session token"
step "session token: $n requests signed with x-amz-security-token"

# ---- us-east-1 through the second proxy ----
TU=(--target "s3://$BUCKET/$PREFIX" --endpoint "http://127.0.0.1:$pport_us" --region us-east-1)
nbdctl -o json backup list "${TU[@]}" | jqx '.backups | map(.name) == ["b2"]'
run /dev/null nbdctl backup restore b2 "${TU[@]}" --volume r4 --wait
[ "$(vol_sha r4)" = "$sha_s2" ] || die "r4 differs from s2"
{ [ "$(denials "$LOG_US")" = 0 ] && [ "$(oks "$LOG_US")" -ge 12 ] && ! grep -q noncanonical "$LOG_US"; } || die "us-east-1 verdicts: $(sort "$LOG_US" | cut -d' ' -f1-2 | uniq -c)"
step "us-east-1: list and restore verified"

# ---- all of it verified: not one refusal ----
total=$(oks "$LOG")
no_denials "the whole run"
step "verifier: $total + $(oks "$LOG_US") requests verified, 0 refused"

# ---- refused: a wrong region, a wrong secret, an unknown key ----
# The region is in the scope: us-east-1 signatures are refused by the eu-west-3 endpoint (a 400
# on S3, which nbdctl shows with S3's code).
expect_fail -i 1 "AuthorizationHeaderMalformed" "$NBDCSI_BIN/nbdctl" --api "unix://$API_SOCK" \
  backup list --target "s3://$BUCKET/$PREFIX" --endpoint "$ENDPOINT" --region us-east-1
grep -q '^DENY AuthorizationHeaderMalformed .*scope region' "$LOG" || die "the wrong region was not refused by the verifier"
expect_fail -i 1 "(permission denied)" env AWS_SECRET_ACCESS_KEY='wJalrXUtnFEMI/K7MDENG+bPxRfiCY=EXAMPLf' \
  "$NBDCSI_BIN/nbdctl" --api "unix://$API_SOCK" backup list "${T[@]}"
grep -qF 'SignatureDoesNotMatch' "$W/err" || die "nbdctl does not relay S3's code: $(cat "$W/err")"
grep -q '^DENY SignatureDoesNotMatch ' "$LOG" || die "the verifier did not log SignatureDoesNotMatch for the wrong secret"
expect_fail -i 1 "(permission denied)" env AWS_ACCESS_KEY_ID=AKIDNOBODY \
  "$NBDCSI_BIN/nbdctl" --api "unix://$API_SOCK" backup list "${T[@]}"
grep -q '^DENY InvalidAccessKeyId ' "$LOG" || die "the verifier did not log InvalidAccessKeyId for the unknown key"
expect_fail -i 1 "(permission denied)" env AWS_SECRET_ACCESS_KEY=wrong \
  "$NBDCSI_BIN/nbdctl" --api "unix://$API_SOCK" backup create bx "${T[@]}" --snapshot s2 --wait
nbdctl -o json backup list "${T[@]}" | jqx '.backups | map(.name) == ["b2"]'
unexpected=$(grep '^DENY ' "$LOG" | grep -cvE '^DENY (SignatureDoesNotMatch|InvalidAccessKeyId|AuthorizationHeaderMalformed) ' || true)
[ "$unexpected" = 0 ] || die "unexpected refusals: $(grep '^DENY ' "$LOG" | cut -c1-200)"
step "wrong region refused (AuthorizationHeaderMalformed); wrong secret and unknown key: PERMISSION_DENIED; the verifier logged $(denials "$LOG") refusal(s): $(grep '^DENY' "$LOG" | cut -d' ' -f2 | sort | uniq -c | tr -s ' \n' ' ')"

daemon_stop
step "done"
