# nbd-datapathd's /metrics: the fold of the workers' per-volume shards into Prometheus families
# (exact counts), and the HTTP endpoint with its probes on a loopback port.
nbdcsi_add_gtest(metrics_collector_test ${CMAKE_CURRENT_LIST_DIR}/metrics_collector_test.cpp
                 nbd_metrics)
