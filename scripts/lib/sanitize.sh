# shellcheck shell=bash
# Shared by scripts/test: build the unit and integration tests under
# AddressSanitizer+UndefinedBehaviorSanitizer (build-asan/), and the tests
# that exercise concurrency under ThreadSanitizer (build-tsan/), each in a
# build directory of its own (-DCUSTOS_SANITIZE=address / thread), and run
# them. Only the test executables are built there, never custosd or the e2e
# tests. Source it; do not run it. It sources scripts/lib/common.sh itself if
# that is not loaded yet.
#
#   custos_asan_tests [CTEST_ARGS...]   every test labelled unit or
#                                       integration, under ASan+UBSan
#   custos_tsan_tests                   the concurrency tests (below), under
#                                       TSan
#
# Any sanitizer report fails the run (halt_on_error, abort_on_error). The
# suppression files for third-party code that is not instrumented are in
# tests/sanitizers/, one comment per entry; our own code is never suppressed.

if ! declare -F say >/dev/null; then
  # shellcheck source=common.sh
  source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
fi

CUSTOS_ASAN_BUILD=${CUSTOS_ASAN_BUILD:-$CUSTOS_ROOT/build-asan}
CUSTOS_TSAN_BUILD=${CUSTOS_TSAN_BUILD:-$CUSTOS_ROOT/build-tsan}
CUSTOS_SANITIZERS_DIR=$CUSTOS_ROOT/tests/sanitizers

# The ThreadSanitizer set: "test binary|gtest filter", one a line. These are
# the tests in which several threads share our objects:
#   audit_log_test       every test: each log has a writer and a completer
#                        thread; the Concurrent* tests and
#                        AsyncAndSyncAppendsRacingShutdown* add many callers
#                        (AppendAsync, Append, CompleterLoop, destruction)
#   hsm_fault_test       every test: SessionPool's worker threads, deadlines
#                        that abandon hung workers, broken-session recovery
#                        under concurrent load
#   hsm_integration_test the pool under eight threads, and its recovery after
#                        every session was closed behind its back (the other
#                        tests make one call at a time; one of them runs
#                        custos-hsmtool, which lacks the abseil annotations
#                        of tests/sanitizers/absl_tsan_annotations.cc)
#   key_service_test     every test: each call hands its result from the
#                        audit log's completer thread to the caller (the
#                        synchronous forms wait on the asynchronous ones) and
#                        its HSM work to a pool worker; and rotation racing
#                        encryption (KeyServiceRotationTest), reconcile racing
#                        creation and rotation (KeyServiceReconcileTest), the
#                        asynchronous forms racing rotations, through
#                        Hsm::GenerateAndSealAesGcm (KeyServiceAsyncTest).
#                        The whole binary costs a second more than those.
#   store_test           the Store contract's tests in which threads share a
#                        store or two stores ("replicas") race on one
#                        database, on SQLite and PostgreSQL, and the
#                        PostgreSQL store's change feed and leadership
CUSTOS_TSAN_SET=(
  "audit_log_test|*"
  "hsm_fault_test|*"
  "hsm_integration_test|HsmTest.EightThreads*:HsmTest.RecoversAfterAllSessions*"
  "key_service_test|*"
  "store_test|*Concurrent*:*Replicas*:*OneStoreIsSafe*:*ReadsWhile*:PostgresStoreTest.ChangeFeed*:PostgresStoreTest.*Lead*"
)

# _custos_sanitize_configure DIR KIND: configure DIR once with
# -DCUSTOS_SANITIZE=KIND. Warnings are not errors here even in CI: the main
# build holds our code to -Werror, and GCC's sanitizer instrumentation brings
# warnings of its own (-Wmaybe-uninitialized, -Wstringop-overflow) that say
# nothing about the code. -O1: what the sanitizers' authors recommend (whole
# stack traces, little inlining), and it compiles faster than -O2.
_custos_sanitize_configure() {
  local dir=$1 kind=$2
  if [ -f "$dir/build.ninja" ]; then return 0; fi
  say "configuring $dir (CUSTOS_SANITIZE=$kind)"
  cmake -S "$CUSTOS_ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_C_FLAGS_RELWITHDEBINFO=-O1 -g -DNDEBUG" \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g -DNDEBUG" \
    -DCUSTOS_WERROR=OFF -DCUSTOS_SANITIZE="$kind" >/dev/null
}

# _custos_sanitize_build DIR TARGET...: build only these targets (and what
# they depend on), timing it.
_custos_sanitize_build() {
  local dir=$1
  shift
  say "building ${dir#"$CUSTOS_ROOT"/}: $*"
  local start
  start=$(date +%s)
  cmake --build "$dir" -j "$(nproc)" --target "$@"
  say "built ${dir#"$CUSTOS_ROOT"/} in $(($(date +%s) - start))s"
}

# _custos_sanitize_suppressions TOOL [SEP]: "SEPsuppressions=FILE" if
# tests/sanitizers/TOOL.supp exists, else nothing.
_custos_sanitize_suppressions() {
  local file=$CUSTOS_SANITIZERS_DIR/$1.supp
  if [ -f "$file" ]; then printf '%ssuppressions=%s' "${2:-}" "$file"; fi
}

# The ctest names (= executable targets, see custos_test() in
# tests/CMakeLists.txt) that carry one of the labels of regex $2 in DIR.
_custos_sanitize_tests_labelled() {
  (cd "$1" && ctest -N -L "$2") | sed -n 's/^ *Test *#[0-9]*: *//p'
}

custos_asan_tests() {
  custos_install_deps
  _custos_sanitize_configure "$CUSTOS_ASAN_BUILD" address
  local tests
  mapfile -t tests < <(_custos_sanitize_tests_labelled "$CUSTOS_ASAN_BUILD" \
    'unit|integration')
  if [ ${#tests[@]} -eq 0 ]; then
    say "no unit or integration tests found in $CUSTOS_ASAN_BUILD"
    return 1
  fi
  _custos_sanitize_build "$CUSTOS_ASAN_BUILD" "${tests[@]}"
  say "running unit and integration tests under ASan+UBSan"
  local start rc=0
  start=$(date +%s)
  # detect_leaks: LeakSanitizer at exit. abort_on_error: a report ends the
  # process with SIGABRT, so that ctest sees it fail even if a test binary
  # would otherwise exit 0. UBSan: -fno-sanitize-recover (CMakeLists.txt)
  # already makes every finding fatal; halt_on_error says so again for the
  # runtime.
  (cd "$CUSTOS_ASAN_BUILD" &&
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    LSAN_OPTIONS=$(_custos_sanitize_suppressions lsan) \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
      ctest --output-on-failure -j "$(nproc)" -L 'unit|integration' "$@") ||
    rc=$?
  say "ASan+UBSan tests took $(($(date +%s) - start))s"
  return "$rc"
}

custos_tsan_tests() {
  custos_install_deps
  _custos_sanitize_configure "$CUSTOS_TSAN_BUILD" thread
  local entry targets=()
  for entry in "${CUSTOS_TSAN_SET[@]}"; do targets+=("${entry%%|*}"); done
  _custos_sanitize_build "$CUSTOS_TSAN_BUILD" "${targets[@]}"
  say "running the concurrency tests under TSan"
  local start failed=() binary filter launcher=()
  # GCC 12's TSan runtime cannot lay out its shadow memory when the kernel
  # randomises mmap addresses with more than 28 bits (vm.mmap_rnd_bits=32 on
  # some CI hosts: "FATAL: ThreadSanitizer: unexpected memory mapping").
  # Without ASLR it always can: use setarch -R where the container allows it.
  if setarch "$(uname -m)" -R true 2>/dev/null; then
    launcher=(setarch "$(uname -m)" -R)
  fi
  start=$(date +%s)
  for entry in "${CUSTOS_TSAN_SET[@]}"; do
    binary=${entry%%|*}
    filter=${entry#*|}
    say "tsan: $binary --gtest_filter=$filter"
    # halt_on_error: the first race fails the binary. second_deadlock_stack:
    # lock-order reports show where both locks were taken. The binaries run
    # one at a time: TSan's shadow memory and the races it looks for both
    # want the cores to themselves.
    if ! (cd "$CUSTOS_TSAN_BUILD" &&
      TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1$(_custos_sanitize_suppressions tsan :) \
        "${launcher[@]}" timeout 900 "bin/$binary" --gtest_filter="$filter" \
        --gtest_brief=1); then
      failed+=("$binary")
    fi
  done
  say "TSan tests took $(($(date +%s) - start))s"
  if [ ${#failed[@]} -gt 0 ]; then
    say "ThreadSanitizer run failed: ${failed[*]}"
    return 1
  fi
}
