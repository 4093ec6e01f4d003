# libFuzzer targets. The tree is normally built with GCC, and libFuzzer needs clang, so the fuzz
# targets live in a second configure of this same project (test/fuzz/build.sh: clang++-14,
# NBDCSI_FUZZ_TARGETS=ON, coverage + ASan + UBSan on every object) that builds only the targets
# below and the libraries they link: the code fuzzed is the product's own libraries, compiled from
# the same CMake lists. The outer configure registers the tests: fuzz.build compiles the targets
# (a fixture, so the builds are not run twice in parallel), then each fuzz.<target> runs one for
# FUZZ_SECONDS (default 20) from its seed corpus in test/fuzz/corpus/<target>/.
# Without clang or its libFuzzer runtime every fuzz test skips (77).
set(NBDCSI_FUZZ_TARGET_NAMES
    nbd_codec nbd_negotiate api_request qos_params csi_ids pool_metadata pool_load
    backup_manifest)

if(NBDCSI_FUZZ_TARGETS)
  set(_fuzz_dir ${CMAKE_CURRENT_LIST_DIR})
  # Generated protobuf code is not what is fuzzed (libprotobuf itself is not instrumented
  # either); without sanitizers and coverage it compiles in a fraction of the time.
  foreach(gen nbd_api_proto nbdcsi_csi_proto)
    target_compile_options(${gen} PRIVATE -fno-sanitize=all)
  endforeach()
  add_custom_target(fuzz_targets)
  function(nbdcsi_fuzz_target name)
    add_executable(fuzz_${name} ${_fuzz_dir}/${name}_fuzz.cpp)
    target_include_directories(fuzz_${name} PRIVATE ${CMAKE_SOURCE_DIR})
    target_link_libraries(fuzz_${name} PRIVATE ${ARGN})
    target_link_options(fuzz_${name} PRIVATE -fsanitize=fuzzer)
    set_target_properties(fuzz_${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/fuzz-bin)
    add_dependencies(fuzz_targets fuzz_${name})
  endfunction()
  nbdcsi_fuzz_target(nbd_codec nbd_codec)
  nbdcsi_fuzz_target(nbd_negotiate nbd_codec)
  # The API service alone: the rest of nbd_api (the heartbeat client) is not fuzzed.
  nbdcsi_fuzz_target(api_request nbd_api_proto nbd_pool)
  target_sources(fuzz_api_request PRIVATE ${CMAKE_SOURCE_DIR}/datapath/api/service.cpp)
  nbdcsi_fuzz_target(qos_params nbdcsi_csi nbd_pool)
  nbdcsi_fuzz_target(csi_ids nbdcsi_csi nbd_pool)
  nbdcsi_fuzz_target(pool_metadata nbd_pool)
  nbdcsi_fuzz_target(pool_load nbd_pool)
  # The manifest parser and the chunk helpers it uses, without the S3 client and the engine.
  find_package(OpenSSL REQUIRED COMPONENTS Crypto)
  pkg_check_modules(ZSTD REQUIRED IMPORTED_TARGET libzstd)
  nbdcsi_fuzz_target(backup_manifest nbdcsi_common nlohmann_json::nlohmann_json OpenSSL::Crypto
                     PkgConfig::ZSTD)
  target_sources(fuzz_backup_manifest PRIVATE ${CMAKE_SOURCE_DIR}/datapath/backup/manifest.cpp
                                              ${CMAKE_SOURCE_DIR}/datapath/backup/chunk.cpp
                                              ${CMAKE_SOURCE_DIR}/datapath/backup/crypto.cpp)
  # The controller's StorageClass / VolumeAttributesClass layer, without the rest of the
  # controller (its library pulls in the whole service).
  target_sources(fuzz_qos_params PRIVATE ${CMAKE_SOURCE_DIR}/controller/csi_request.cpp
                                         ${CMAKE_SOURCE_DIR}/controller/csi_status.cpp)
  target_link_libraries(fuzz_qos_params PRIVATE nbd_api_proto)
else()
  nbdcsi_add_test(NAME fuzz.build
    COMMAND ${CMAKE_CURRENT_LIST_DIR}/build.sh
    TIMEOUT 900
    LABELS fuzz
    ENV FUZZ_BUILD_DIR=${CMAKE_BINARY_DIR}/fuzz)
  set_tests_properties(fuzz.build PROPERTIES FIXTURES_SETUP fuzz_bin)
  foreach(t ${NBDCSI_FUZZ_TARGET_NAMES})
    nbdcsi_add_test(NAME fuzz.${t}
      COMMAND ${CMAKE_CURRENT_LIST_DIR}/run_fuzz.sh ${t}
      TIMEOUT 300
      LABELS fuzz
      # pool_load's pool goes on the build directory's file system rather than tmpfs: its corpus
      # holds a reproducer that only fails where file sizes are limited (ext4).
      ENV FUZZ_BUILD_DIR=${CMAKE_BINARY_DIR}/fuzz FUZZ_POOL_BASE=${CMAKE_BINARY_DIR}/fuzz)
    set_tests_properties(fuzz.${t} PROPERTIES FIXTURES_REQUIRED fuzz_bin)
  endforeach()
endif()
