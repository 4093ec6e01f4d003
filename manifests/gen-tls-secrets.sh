#!/usr/bin/env bash
# Prints the two TLS Secrets that manifests/nbd-csi.yaml expects (a new CA, a controller
# certificate and a datapath certificate, all ECDSA P-256), for `kubectl apply -f -`:
#
#   manifests/gen-tls-secrets.sh | kubectl apply -f -
#
# The CA's private key is not kept: to add or renew certificates, run this again and restart
# the controller and datapath pods so that both ends load the new CA together.
#   gen-tls-secrets.sh [NAMESPACE [RELEASE [DAYS]]]     (default nbd-csi nbd-csi 3650)
set -euo pipefail
ns=${1:-nbd-csi}
release=${2:-nbd-csi}
days=${3:-3650}
# The name the controller expects in every datapath's certificate (chart: tls.datapathServerName).
datapath_name=${NBDCSI_DATAPATH_SERVER_NAME:-nbd-datapathd}
svc=$release-controller

command -v openssl >/dev/null || { echo "gen-tls-secrets: openssl is needed" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
umask 077

openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days "$days" \
  -subj "/CN=$release-ca" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout ca.key -out ca.crt 2>/dev/null

issue() {  # name common-name subjectAltName
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj "/CN=$2" \
    -keyout "$1.key" -out "$1.csr" 2>/dev/null
  # Both usages: each side is a TLS server to the other for one service and a client for the
  # other (Registry on the controller, Datapath API on the node).
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
}
issue controller nbd-csi-controller \
  "DNS:$svc,DNS:$svc.$ns,DNS:$svc.$ns.svc,DNS:$svc.$ns.svc.cluster.local"
issue datapath "$datapath_name" "DNS:$datapath_name"

b64() { base64 -w0 <"$1"; }
for role in controller datapath; do
  cat <<YAML
---
apiVersion: v1
kind: Secret
metadata:
  name: $release-$role-tls
  namespace: $ns
type: kubernetes.io/tls
data:
  ca.crt: $(b64 ca.crt)
  tls.crt: $(b64 $role.crt)
  tls.key: $(b64 $role.key)
YAML
done
