#!/bin/bash
# Test certificates for the controller <-> datapath mutual TLS, made with the openssl CLI.
#
#   make-certs.sh DIR [NODE_ID...]
#
# DIR/ca.{crt,key}          the CA both ends trust
# DIR/server.{crt,key}      signed by ca (e.g. the datapath's)
# DIR/client.{crt,key}      signed by ca (e.g. the controller's)
#                           Both: SAN DNS:localhost, IP:127.0.0.1; EKU serverAuth and clientAuth,
#                           since each daemon uses its one certificate in both roles.
# DIR/client-expired.{crt,key}  signed by ca, valid only in January 2020 (clientAuth): "expired
#                           certificate" tests present it and must be refused
# DIR/other/...             the same files from a second, unrelated CA: "wrong certificate"
#                           tests present these and must be refused (rotation tests rotate to it)
# For each NODE_ID (a Kubernetes node name):
# DIR/node-NODE_ID.{crt,key}          a datapath's certificate bound to its node: SAN
#                           URI:spiffe://nbd.csi.io/node/NODE_ID (what the controller checks),
#                           DNS:localhost, IP:127.0.0.1; EKU serverAuth and clientAuth
# DIR/node-NODE_ID-expired.{crt,key}  the same, valid only in January 2020
# DIR/other/node-NODE_ID.{crt,key}    the same as the first, from the other CA
#
# EC P-256 keys (fast), 0600 key files, 30-day validity. Idempotent: a complete set is left
# as is; a partial one (an interrupted run) is made again from scratch, node certificates
# included; a node certificate that is missing is added to a complete set.
set -euo pipefail

if [[ $# -lt 1 || -z "$1" ]]; then
  echo "usage: $0 DIR [NODE_ID...]" >&2
  exit 2
fi
dir=$1
shift
nodes=("$@")
for n in "${nodes[@]}"; do
  [[ $n =~ ^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$ ]] ||
    { echo "$0: \"$n\" is not a node name ([a-z0-9.-], 1-253)" >&2; exit 2; }
done
command -v openssl >/dev/null || { echo "$0: openssl not found" >&2; exit 1; }

files=(ca.crt ca.key server.crt server.key client.crt client.key client-expired.crt
       client-expired.key)

complete() {
  local d=$1 f
  for f in "${files[@]}"; do [[ -s $d/$f ]] || return 1; done
}

key() {  # key PATH: a fresh P-256 key, never readable by others, not even briefly
  (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null)
  chmod 0600 "$1"
}

# leaf D NAME CN EXT: D/NAME.{key,crt} signed by D/ca
leaf() {
  local d=$1 name=$2 cn=$3 ext=$4
  key "$d/$name.key"
  openssl req -new -key "$d/$name.key" -subj "/CN=$cn" -out "$d/$name.csr" 2>/dev/null
  printf '%s\n' "$ext" >"$d/$name.ext"
  openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 30 -sha256 -extfile "$d/$name.ext" -out "$d/$name.crt" 2>/dev/null
  rm -f "$d/$name.csr" "$d/$name.ext"
}

# expired D NAME CN EKU SAN: D/NAME.{key,crt}, signed by D/ca with a validity wholly in the past.
# `openssl x509 -req` (OpenSSL 3.0) cannot set start and end dates, `openssl ca` can; it wants
# a small CA database, kept in a temp dir.
expired() {
  local d=$1 name=$2 cn=$3 eku=$4 san=$5 db
  db=$(mktemp -d)
  touch "$db/index.txt"
  echo 1000 >"$db/serial"
  printf '%s\n' '[ca]' 'default_ca = test' '[test]' "database = $db/index.txt" \
    "serial = $db/serial" "new_certs_dir = $db" 'default_md = sha256' 'policy = any' \
    'unique_subject = no' '[any]' 'commonName = supplied' '[leaf]' 'basicConstraints = CA:FALSE' \
    'keyUsage = critical,digitalSignature' "extendedKeyUsage = $eku" \
    "subjectAltName = $san" >"$db/ca.cnf"
  key "$d/$name.key"
  openssl req -new -key "$d/$name.key" -subj "/CN=$cn" \
    -out "$db/req.csr" 2>/dev/null
  openssl ca -batch -config "$db/ca.cnf" -cert "$d/ca.crt" -keyfile "$d/ca.key" \
    -startdate 20200101000000Z -enddate 20200201000000Z -extensions leaf -notext \
    -in "$db/req.csr" -out "$d/$name.crt" 2>/dev/null
  rm -rf "$db"
  # Signed by the CA and refused for its dates only.
  if openssl verify -CAfile "$d/ca.crt" "$d/$name.crt" >/dev/null 2>&1; then
    echo "$0: $d/$name.crt is not expired" >&2
    exit 1
  fi
  openssl verify -no_check_time -CAfile "$d/ca.crt" "$d/$name.crt" >/dev/null
}

node_san() { echo "URI:spiffe://nbd.csi.io/node/$1,DNS:localhost,IP:127.0.0.1"; }

# node D ID [expired]: D/node-ID.{crt,key} (and D/node-ID-expired.*), unless already there.
node() {
  local d=$1 id=$2 with_expired=${3:-}
  if [[ ! -s $d/node-$id.crt || ! -s $d/node-$id.key ]]; then
    leaf "$d" "node-$id" "nbd-csi test node $id" "$(printf '%s\n' 'basicConstraints=CA:FALSE' \
      'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth,clientAuth' \
      "subjectAltName=$(node_san "$id")")"
    rm -f "$d/ca.srl"
    openssl verify -CAfile "$d/ca.crt" "$d/node-$id.crt" >/dev/null
  fi
  if [[ -n $with_expired && ( ! -s $d/node-$id-expired.crt || ! -s $d/node-$id-expired.key ) ]]
  then
    expired "$d" "node-$id-expired" "nbd-csi test node $id expired" "serverAuth,clientAuth" \
      "$(node_san "$id")"
  fi
}

make_set() {  # make_set D LABEL
  local d=$1 label=$2
  complete "$d" && return 0
  mkdir -p "$d"
  rm -f "$d"/ca.* "$d"/server.* "$d"/client.* "$d"/client-expired.* "$d"/node-*
  key "$d/ca.key"
  openssl req -new -x509 -key "$d/ca.key" -subj "/CN=nbd-csi test CA $label" -days 30 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$d/ca.crt" 2>/dev/null
  # Each daemon presents one certificate in both roles (the datapath serves its API and dials
  # the controller; the controller serves the Registry and dials datapaths), so both leaves are
  # good for serverAuth and clientAuth and carry the loopback SANs.
  local ext
  ext=$(printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=critical,digitalSignature' \
    'extendedKeyUsage=serverAuth,clientAuth' 'subjectAltName=DNS:localhost,IP:127.0.0.1')
  leaf "$d" server "nbd-csi test server $label" "$ext"
  leaf "$d" client "nbd-csi test client $label" "$ext"
  expired "$d" client-expired "nbd-csi test client expired" clientAuth \
    "DNS:localhost,IP:127.0.0.1"
  rm -f "$d/ca.srl"
  openssl verify -CAfile "$d/ca.crt" "$d/server.crt" "$d/client.crt" >/dev/null
}

make_set "$dir" main
make_set "$dir/other" other
for n in "${nodes[@]}"; do
  node "$dir" "$n" expired
  node "$dir/other" "$n"
done
