# nbd-datapathd's /metrics, /healthz and /readyz under a real Prometheus server that scrapes it
# while fio and nbdsh do known request counts. SERIAL: the throttle step measures rates.
nbdcsi_add_test(NAME integration.metrics_prometheus
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/metrics_prometheus.sh TIMEOUT 180 LABELS integration SERIAL)
# nbd-csi-controller, nbd-csi-node and nbd-datapathd together under a real Prometheus: CSI calls
# counted by method and code, heartbeat age, /readyz before and after, the dashboard's and the
# rules' metric names against the live scrapes.
nbdcsi_add_test(NAME integration.metrics_csi
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/metrics_csi.sh TIMEOUT 180 LABELS integration)
