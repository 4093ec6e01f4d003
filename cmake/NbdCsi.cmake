# One place that decides how every test runs: timeout, labels, environment and the
# "skipped" exit code (77) that privileged tests use when a prerequisite is missing.
#
#   nbdcsi_add_test(NAME name COMMAND cmd... [TIMEOUT s] [LABELS l...] [ENV k=v...] [SERIAL])
function(nbdcsi_add_test)
  cmake_parse_arguments(T "SERIAL" "NAME;TIMEOUT" "COMMAND;LABELS;ENV" ${ARGN})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 120)
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
