# Which test runs under which build in CI (scripts/test.sh with CI=true; README "Sanitizers").
#
#   build/       (ci preset, optimised)  everything not in the ASan suite: the VM tests but one,
#                                        deploy, fuzz, and the tests whose throughput or rate
#                                        bands only hold for an optimised build
#   build-asan/  (ASan + UBSan, -O1)     with NBDCSI_SANITIZERS=1: every unit, controller and
#                                        integration test, and vm.attach_restart: one ASan
#                                        nbd-datapathd on the kernel NBD path (label asan-suite);
#                                        with CI=true alone: CI's share of it (label asan-ci, only
#                                        its targets are built: target sanitize_asan_ci)
#   build-tsan/  (TSan)                  the engine, pool, NBD and gRPC service tests, the ones
#                                        with threads of their own (label tsan-suite); only their
#                                        targets are built (target sanitize_tsan_tests)
#
# The plain tree runs the two sanitizer trees through asan.suite and tsan.suite
# (test/sanitizers/suite.sh), so one CTest summary covers the three builds.

# Optimised-build bands: fio's throughput floor and the QoS limiter's measured rate. Under ASan they
# measure the sanitizer, not the product; everything else they check is covered elsewhere under
# ASan (the engine and QoS unit tests, proto_edge, the interop tests).
set(NBDCSI_NOT_UNDER_ASAN integration.interop_fio integration.qos_throttle)
# The one VM test that runs with an ASan nbd-datapathd: kill -9, restarts, LINK_DEAD repairs and
# detach under fio verify, the path where the engine's slot bug of issue 12 lived.
set(NBDCSI_ASAN_VM vm.attach_restart)
# TSan: the tests that run the engine's workers, the pool's locks and copy jobs, NBD TLS's
# terminator thread, and the datapath's gRPC service (its handlers on gRPC's threads, the pool and
# engine behind them), the log level's revert timer thread, and the schedule runner (its thread,
# the backup jobs' threads and the pool's copies; it builds datapath/backup under TSan too), and
# peer_copy_test (a copy job's thread, the replica client's io thread and the flush thread). The CSI-side gRPC tests
# (csi_server, node_service, registry) are left out for the budget: they need the CSI protos and
# nbd-datapathd built a third time, and their handlers share nothing the datapath service test
# does not already cover under TSan.
# copy_job_test is out too: no TSan report, but its "a writer is admitted before the copy passes a
# quarter" check (WriterToAnUncopiedChunkIsServedFirst) measured 35 MiB against 32 MiB under TSan's
# slowdown; it runs under ASan. To do: a bound that does not depend on relative thread speed.
set(NBDCSI_TSAN_TESTS
  engine_test backend_export_test request_state_test write_gate_test qos_test
  pool_test pool_create_test pool_rules_test pool_metadata_test pool_snapshot_test
  name_locks_test
  nbd_codec_test nbd_negotiate_test nbd_tls_test replica_client_test replica_set_test
  cluster_agent_test
  region_bitmap_test resync_test
  api_service_test log_level_test
  schedule_runner_test peer_copy_test)

# CI's ASan share (label asan-ci; CI=true builds build-asan for these targets only, README
# "Sanitizers"): the TSan list, the other pool, backup, attach, TLS and parser unit tests, the
# controller's in-process decision tests, and vm.attach_restart with an ASan nbd-datapathd on the
# kernel NBD path. Together 191 compile steps (the plain tree has 260) and about 110 s of tests
# (the VM test 80 s of it); the whole asan-suite (every integration test) stays on request
# (NBDCSI_SANITIZERS=1): it does not fit CI's budget.
set(NBDCSI_ASAN_CI_TESTS ${NBDCSI_TSAN_TESTS}
  copy_job_test pool_crash_test pool_fulldisk_test pool_data_file_test stats_test fence_test
  backup_engine_test backup_jobs_test cron_test
  attach_manager_test attach_target_test attach_socketpair_test
  tls_test csi_ids_test csi_params_test quantity_test endpoint_test
  controller_unit_test controller_decisions_test controller_replicated_test controller_backups_test)

get_property(_san_tests DIRECTORY PROPERTY TESTS)
foreach(t ${_san_tests})
  get_test_property(${t} LABELS labels)
  if(t IN_LIST NBDCSI_ASAN_VM OR
     (labels MATCHES "(^|;)(unit|integration|controller)(;|$)" AND NOT t IN_LIST NBDCSI_NOT_UNDER_ASAN))
    set_property(TEST ${t} APPEND PROPERTY LABELS asan-suite)
  endif()
  string(REGEX REPLACE "^unit\\." "" bare ${t})
  # asan-vm: the plain tree leaves it out whenever an ASan tree runs it instead.
  if(t IN_LIST NBDCSI_ASAN_VM)
    set_property(TEST ${t} APPEND PROPERTY LABELS asan-ci asan-vm)
  elseif(bare IN_LIST NBDCSI_ASAN_CI_TESTS AND labels MATCHES "(^|;)unit(;|$)")
    set_property(TEST ${t} APPEND PROPERTY LABELS asan-ci)
  endif()
  if(bare IN_LIST NBDCSI_TSAN_TESTS)
    set_property(TEST ${t} APPEND PROPERTY LABELS tsan-suite)
  endif()
  # Sanitized code runs slower (ASan about 2x at -O1, TSan 5-15x): give every test of those trees
  # proportionally more time, so that a CTest timeout still means a hang, not the sanitizer.
  # ASan integration tests: 4x. They start many short processes (nbdctl, daemon restarts), and each
  # pays ASan's start-up and LSan's scan at exit; measured 2026-12-06 at -j2 beside two builds:
  # pool_crash 228 s (22.6 s plain, limit 240 s at 2x), faults_disk 480 s (34.5 s plain),
  # nbdctl_cli 209 s (29.7 s plain).
  if(NBDCSI_SANITIZE OR NBDCSI_TSAN)
    # Which sanitizer the test runs under, for the few checks that measure the runtime's memory
    # rather than the product's (faults_clients.py's RSS bound).
    if(NBDCSI_TSAN)
      set_property(TEST ${t} APPEND PROPERTY ENVIRONMENT NBDCSI_SANITIZER=tsan)
    else()
      set_property(TEST ${t} APPEND PROPERTY ENVIRONMENT NBDCSI_SANITIZER=asan)
    endif()
    get_test_property(${t} TIMEOUT timeout)
    if(NBDCSI_TSAN)
      math(EXPR timeout "${timeout} * 5")
    elseif(labels MATCHES "(^|;)integration(;|$)")
      math(EXPR timeout "${timeout} * 4")
    else()
      math(EXPR timeout "${timeout} * 2")
    endif()
    set_tests_properties(${t} PROPERTIES TIMEOUT ${timeout})
  endif()
endforeach()

if(NBDCSI_TSAN)
  add_custom_target(sanitize_tsan_tests)
  foreach(t ${NBDCSI_TSAN_TESTS})
    add_dependencies(sanitize_tsan_tests ${t})
  endforeach()
endif()

if(NBDCSI_SANITIZE)
  add_custom_target(sanitize_asan_ci DEPENDS nbd-datapathd nbdctl)
  foreach(t ${NBDCSI_ASAN_CI_TESTS})
    add_dependencies(sanitize_asan_ci ${t})
  endforeach()
endif()

if(NOT NBDCSI_SANITIZE AND NOT NBDCSI_TSAN)
  set(NBDCSI_ASAN_TREE ${CMAKE_SOURCE_DIR}/build-asan CACHE PATH "The ASan tree asan.suite runs")
  set(NBDCSI_TSAN_TREE ${CMAKE_SOURCE_DIR}/build-tsan CACHE PATH "The TSan tree tsan.suite runs")
  # SERIAL: each nested run uses both cores itself. The limits are the nested runs' budgets on a
  # loaded 2-core machine, well above their measured times (README "Sanitizers").
  nbdcsi_add_test(NAME asan.suite
    COMMAND ${CMAKE_CURRENT_LIST_DIR}/sanitizers/suite.sh asan ${NBDCSI_ASAN_TREE} asan-suite
    TIMEOUT 3600 LABELS sanitize SERIAL)
  nbdcsi_add_test(NAME tsan.suite
    COMMAND ${CMAKE_CURRENT_LIST_DIR}/sanitizers/suite.sh tsan ${NBDCSI_TSAN_TREE} tsan-suite
    TIMEOUT 1800 LABELS sanitize SERIAL)
endif()
