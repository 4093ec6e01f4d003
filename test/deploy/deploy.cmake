# The Helm chart, the rendered manifests and the examples (test/deploy/deploy_test.sh).
# helm comes from scripts/get-helm.sh; without it these skip (77) unless CI=true.
foreach(case lint template drift check version kernel-nbd)
  nbdcsi_add_test(NAME deploy.${case}
    COMMAND ${CMAKE_SOURCE_DIR}/test/deploy/deploy_test.sh ${case}
    TIMEOUT 300 LABELS deploy
    ENV NBDCSI_PROJECT_VERSION=${CMAKE_PROJECT_VERSION})
endforeach()
# The daemons run with the rendered arguments in a private network and mount namespace (root).
foreach(mode plain helm)
  nbdcsi_add_test(NAME deploy.smoke-${mode}
    COMMAND ${CMAKE_SOURCE_DIR}/test/deploy/smoke.sh ${mode}
    TIMEOUT 180 LABELS deploy)
endforeach()
