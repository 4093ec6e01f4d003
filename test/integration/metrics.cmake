# nbd-datapathd's /metrics, /healthz and /readyz under a real Prometheus server that scrapes it
# while fio and nbdsh do known request counts. SERIAL: the throttle step measures rates.
nbdcsi_add_test(NAME integration.metrics_prometheus
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/metrics_prometheus.sh TIMEOUT 180 LABELS integration SERIAL)
