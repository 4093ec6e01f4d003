# Fuzz the NBD codec with libFuzzer. run_fuzz.sh compiles with clang on its own (the tree may
# be built with GCC) and skips (77) when clang/libFuzzer are missing. FUZZ_SECONDS in the
# environment overrides the 30 s run.
nbdcsi_add_test(NAME fuzz.nbd_codec
  COMMAND ${CMAKE_CURRENT_LIST_DIR}/run_fuzz.sh
  TIMEOUT 300
  LABELS fuzz
  ENV FUZZ_BUILD_DIR=${CMAKE_BINARY_DIR}/fuzz-nbd)
