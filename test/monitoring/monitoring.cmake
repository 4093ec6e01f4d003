# The Prometheus alerting rules and the Grafana dashboard in charts/nbd-csi/files: promtool checks
# and unit-tests the rules, and parses every dashboard expression. Seconds; no daemon.
nbdcsi_add_test(NAME unit.monitoring_rules
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/monitoring_test.sh TIMEOUT 120 LABELS unit)
