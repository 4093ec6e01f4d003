# The chart installed on a real Kubernetes (test/e2e/e2e.sh): the bundled single-node cluster
# (../shared/k8s), started and stopped by the test, unless KUBECONFIG names another cluster.
nbdcsi_add_test(NAME e2e.kubernetes
  COMMAND ${CMAKE_SOURCE_DIR}/test/e2e/e2e.sh
  TIMEOUT 1200 LABELS e2e SERIAL)
set_tests_properties(e2e.kubernetes PROPERTIES FIXTURES_REQUIRED nbdcsi_image)
