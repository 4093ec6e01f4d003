#!/usr/bin/env bash
# The alerting rules and the Grafana dashboard under promtool (Debian's prometheus package):
#   - `promtool check rules` accepts charts/nbd-csi/files/prometheus-rules.yaml;
#   - `promtool test rules` runs prometheus-rules.test.yaml: every alert fires on its input
#     series with its labels and annotations, and stays silent under its threshold and before its
#     `for:` has run out;
#   - the same cases FAIL against the rules with every `for:` removed (the cases check timing);
#   - every PromQL expression of the dashboard parses (check_monitoring.py).
# Metric names against the daemons' live /metrics: test/integration/metrics_csi.sh.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
command -v promtool >/dev/null || { echo "SKIP: needs promtool (scripts/deps.sh test)"; exit 77; }
rules=$src/charts/nbd-csi/files/prometheus-rules.yaml
dash=$src/charts/nbd-csi/files/grafana-dashboard.json
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

promtool check rules "$rules"
promtool test rules "$src/test/monitoring/prometheus-rules.test.yaml"

mkdir -p "$tmp/charts/nbd-csi/files" "$tmp/test/monitoring"
grep -v '^ *for: ' "$rules" >"$tmp/charts/nbd-csi/files/prometheus-rules.yaml"
cp "$src/test/monitoring/prometheus-rules.test.yaml" "$tmp/test/monitoring/"
if promtool test rules "$tmp/test/monitoring/prometheus-rules.test.yaml" >"$tmp/mutant.out" 2>&1; then
  echo "FAIL: the rule tests pass with every 'for:' removed: they do not check timing" >&2
  exit 1
fi
echo "ok: the rule tests catch rules without 'for:'"

python3 "$src/test/monitoring/check_monitoring.py" --dashboard "$dash" --rules "$rules" --self-test
