#!/usr/bin/env bash
# Renders the Helm chart (charts/nbd-csi) with its default values into manifests/nbd-csi.yaml,
# the plain YAML for `kubectl apply -f`.
#
# One difference from a Helm install: no TLS secrets are generated. A committed file must not
# carry a private key that every user of it would share, so the manifests reference the two
# secrets by name and manifests/README.md says how to create them.
#
#   scripts/render-manifests.sh            rewrite manifests/nbd-csi.yaml
#   scripts/render-manifests.sh --stdout   print the rendering instead
#   scripts/render-manifests.sh --check    exit 1 with a diff when the committed file is stale
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-write}
case $mode in
  write|--stdout|--check) ;;
  *) echo "usage: $0 [--stdout|--check]" >&2; exit 2 ;;
esac

RELEASE=nbd-csi
NAMESPACE=nbd-csi
helm=$("$src/scripts/get-helm.sh")

render() {
  cat <<HDR
# nbd-csi: plain manifests rendered from charts/nbd-csi with its default values by
# scripts/render-manifests.sh. Do not edit: change the chart and re-render.
# Before applying, create the TLS secrets ${RELEASE}-controller-tls and ${RELEASE}-datapath-tls
# in namespace ${NAMESPACE} (manifests/README.md).
---
apiVersion: v1
kind: Namespace
metadata:
  name: ${NAMESPACE}
  labels:
    # The node plugin and the datapath are privileged by design.
    pod-security.kubernetes.io/enforce: privileged
HDR
  # For Kubernetes 1.24 and later (CSIStorageCapacity v1, policy/v1) with the snapshot CRDs:
  # stated here, not left to helm's default, so that the file does not change with helm's
  # version. Older clusters and clusters without the CRDs: install the chart, which asks.
  "$helm" template "$RELEASE" "$src/charts/nbd-csi" --namespace "$NAMESPACE" \
    --kube-version 1.24.0 --api-versions snapshot.storage.k8s.io/v1 \
    --set tls.existingSecret.controller=${RELEASE}-controller-tls \
    --set tls.existingSecret.datapath=${RELEASE}-datapath-tls
}

out=$src/manifests/nbd-csi.yaml
case $mode in
  --stdout) render ;;
  --check)
    tmp=$(mktemp)
    trap 'rm -f "$tmp"' EXIT
    render >"$tmp"
    if ! diff -u "$out" "$tmp" >&2; then
      echo "render-manifests: $out is stale; run scripts/render-manifests.sh and commit it" >&2
      exit 1
    fi ;;
  write)
    tmp=$(mktemp "$out.XXXXXX")
    trap 'rm -f "$tmp"' EXIT
    render >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$out"
    trap - EXIT
    echo "wrote $out" >&2 ;;
esac
