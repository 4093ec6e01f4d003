# nbd-datapathd's /metrics: the fold of the workers' per-volume shards into Prometheus families
# (exact counts), and the HTTP endpoint with its probes on a loopback port.
nbdcsi_add_gtest(metrics_collector_test ${CMAKE_CURRENT_LIST_DIR}/metrics_collector_test.cpp
                 nbd_metrics)
# The CSI daemons' metrics: the gRPC interceptor on a real CSI server over loopback, the
# controller's registry gauges (fake clock) and placement refusals, the node's timed steps under a
# real NodeStageVolume on the fake seams.
if(TARGET nbdcsi_controller AND TARGET nbdcsi_node)
  nbdcsi_add_gtest(csi_metrics_test ${CMAKE_CURRENT_LIST_DIR}/csi_metrics_test.cpp
                   nbdcsi_controller nbdcsi_node)
endif()
# --log-format json: lines that parse back, with the call context (request_id, volume_id).
nbdcsi_add_gtest(log_format_test ${CMAKE_CURRENT_LIST_DIR}/log_format_test.cpp nbdcsi_common
                 nlohmann_json::nlohmann_json)
