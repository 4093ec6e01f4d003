# shellcheck shell=bash
# Numbered, timed steps for the user-facing scripts (quickstart.sh, datapath-tour.sh):
#   TOTAL=9; . scripts/lib/steps.sh
#   step "Build"; ...; done_step [result]     # "[2/9] Build" ... "done in 1.23s"
#   print_summary                             # one line per step, and the total time
# Sets STEP and STEP_NAME, which the caller's fail() reports.
STEP=0
STEP_NAME="start"
STEPS_T0=$(date +%s.%N)
SUMMARY=()

now() { date +%s.%N; }
step() {
  STEP=$((STEP + 1))
  STEP_T=$(now)
  STEP_NAME=$*
  printf '\n[%d/%d] %s\n' "$STEP" "$TOTAL" "$*"
}
done_step() {
  local dt
  dt=$(awk -v a="$STEP_T" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
  printf '      done in %ss\n' "$dt"
  SUMMARY+=("$(printf '%-3s %-66s %7ss  %s' "$STEP" "$STEP_NAME" "$dt" "${1:-ok}")")
}
print_summary() {
  printf '\nSummary (%.1fs total)\n' "$(awk -v a="$STEPS_T0" -v b="$(now)" 'BEGIN { print b - a }')"
  printf '%s\n' "${SUMMARY[@]}"
}
