#!/usr/bin/env bash
# Configures (once) and builds nbd-csi into build/; binaries land in build/bin/.
#   scripts/build.sh [preset]   (default: "default"; CI uses "ci", warnings are errors)
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-default}
if [ ! -f build/build.ninja ] || [ "$(cat build/.preset 2>/dev/null)" != "$preset" ]; then
  cmake --preset "$preset" >/dev/null
  echo "$preset" > build/.preset
fi
cmake --build build -j"$(nproc)"
