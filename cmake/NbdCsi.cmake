# One place that decides how every test runs: timeout, labels, environment and the
# "skipped" exit code (77) that privileged tests use when a prerequisite is missing.
#
#   nbdcsi_add_test(NAME name COMMAND cmd... [TIMEOUT s] [LABELS l...] [ENV k=v...] [SERIAL])
function(nbdcsi_add_test)
  cmake_parse_arguments(T "SERIAL" "NAME;TIMEOUT" "COMMAND;LABELS;ENV" ${ARGN})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 120)
  endif()
  # In a sanitizer tree every test runs under test/sanitizers/run.sh, which points each process's
  # reports at a per-test directory and fails the test when one appears (a report in a daemon
  # started by a script would otherwise go unseen). The wrapper needs the first word as a path.
  if(NBDCSI_SANITIZE OR NBDCSI_TSAN)
    list(POP_FRONT T_COMMAND first)
    if(TARGET ${first})
      set(first $<TARGET_FILE:${first}>)
    endif()
    if(NBDCSI_TSAN)
      set(kind tsan)
    else()
      set(kind asan)
    endif()
    set(T_COMMAND ${CMAKE_SOURCE_DIR}/test/sanitizers/run.sh ${kind}
        ${CMAKE_BINARY_DIR}/sanitizer-reports/${T_NAME} ${first} ${T_COMMAND})
  endif()
  add_test(NAME ${T_NAME} COMMAND ${T_COMMAND} WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
  set(env "NBDCSI_BIN=${CMAKE_BINARY_DIR}/bin" "NBDCSI_SRC=${CMAKE_SOURCE_DIR}" ${T_ENV})
  set_tests_properties(${T_NAME} PROPERTIES
    TIMEOUT ${T_TIMEOUT}
    SKIP_RETURN_CODE 77
    LABELS "${T_LABELS}"
    ENVIRONMENT "${env}")
  if(T_SERIAL)
    set_tests_properties(${T_NAME} PROPERTIES RUN_SERIAL TRUE)
  endif()
endfunction()

# A gtest executable from one source file, linked with the given libraries and registered
# through nbdcsi_add_test so that its timeout and labels are set like every other test.
function(nbdcsi_add_gtest name source)
  add_executable(${name} ${source})
  target_link_libraries(${name} PRIVATE ${ARGN} GTest::gtest_main GTest::gmock)
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/test-bin)
  nbdcsi_add_test(NAME unit.${name} COMMAND ${name} TIMEOUT 120 LABELS unit)
endfunction()

# Compiles PROTO (a path relative to the source root, e.g. datapath/api/datapath.proto) with
# protoc + grpc_cpp_plugin into ${CMAKE_BINARY_DIR}/gen and appends the generated .cc files to
# the list variable OUT_SRCS. Include ${CMAKE_BINARY_DIR}/gen to use the headers.
function(nbdcsi_grpc_proto PROTO OUT_SRCS)
  set(gen_dir ${CMAKE_BINARY_DIR}/gen)
  string(REGEX REPLACE "\\.proto$" "" base ${gen_dir}/${PROTO})
  get_filename_component(name ${PROTO} NAME)
  set(srcs ${base}.pb.cc ${base}.grpc.pb.cc)
  add_custom_command(
    OUTPUT ${srcs} ${base}.pb.h ${base}.grpc.pb.h
    COMMAND ${CMAKE_COMMAND} -E make_directory ${gen_dir}
    COMMAND protobuf::protoc
      --proto_path=${CMAKE_SOURCE_DIR}
      --cpp_out=${gen_dir}
      --grpc_out=${gen_dir}
      --plugin=protoc-gen-grpc=$<TARGET_FILE:gRPC::grpc_cpp_plugin>
      ${CMAKE_SOURCE_DIR}/${PROTO}
    DEPENDS ${CMAKE_SOURCE_DIR}/${PROTO} protobuf::protoc gRPC::grpc_cpp_plugin
    COMMENT "Generating ${name} C++ and gRPC code"
    VERBATIM)
  set(${OUT_SRCS} ${${OUT_SRCS}} ${srcs} PARENT_SCOPE)
endfunction()
