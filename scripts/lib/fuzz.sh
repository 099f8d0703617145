# shellcheck shell=bash
# Shared by scripts/fuzz and scripts/test: build the libFuzzer targets of
# tests/fuzz (clang, ASan+UBSan) in a build directory of their own and run
# them. Source it; do not run it. It sources scripts/lib/common.sh itself if
# that is not loaded yet.
#
#   custos_fuzz_smoke            build, then run every target for
#                                CUSTOS_FUZZ_SECONDS (default 5) seconds each
#   custos_fuzz_build            configure (once) and build the targets
#   custos_fuzz_run T S [--merge] [LIBFUZZER_ARGS...]
#                                run target T for S seconds
#   custos_fuzz_targets          list the targets
#
# Runs never write into the committed corpus (tests/fuzz/corpus/T): it is
# copied to a work directory under the build directory, where new inputs and
# crashes go. Only --merge adds new inputs (minimised) to the committed one.

if ! declare -F say >/dev/null; then
  # shellcheck source=common.sh
  source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
fi

CUSTOS_FUZZ_BUILD=${CUSTOS_FUZZ_BUILD:-$CUSTOS_ROOT/build-fuzz}
CUSTOS_FUZZ_DIR=$CUSTOS_ROOT/tests/fuzz
# Where runs keep their corpus, crashes and logs (one directory per target).
CUSTOS_FUZZ_WORK=${CUSTOS_FUZZ_WORK:-$CUSTOS_FUZZ_BUILD/fuzz-work}
# On top of CUSTOS_PACKAGES: clang 14 and its runtimes (libFuzzer, ASan,
# UBSan).
CUSTOS_FUZZ_PACKAGES=(clang libclang-rt-14-dev)

# The targets, one per tests/fuzz/*_fuzz.cc.
custos_fuzz_targets() {
  local f
  for f in "$CUSTOS_FUZZ_DIR"/*_fuzz.cc; do
    f=${f##*/}
    printf '%s\n' "${f%.cc}"
  done
}

custos_fuzz_build() {
  custos_install_deps "${CUSTOS_FUZZ_PACKAGES[@]}"
  if [ ! -f "$CUSTOS_FUZZ_BUILD/build.ninja" ]; then
    say "configuring $CUSTOS_FUZZ_BUILD (clang, libFuzzer, ASan+UBSan)"
    CC=clang CXX=clang++ cmake -S "$CUSTOS_ROOT" -B "$CUSTOS_FUZZ_BUILD" \
      -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCUSTOS_FUZZ=ON \
      -DBUILD_TESTING=OFF >/dev/null
  fi
  say "building fuzz targets"
  cmake --build "$CUSTOS_FUZZ_BUILD" --target custos_fuzz_all -j "$(nproc)"
}

# The first value of libFuzzer's final statistic NAME in LOG, or "?".
_custos_fuzz_stat() {
  local value
  value=$(sed -n "s/^stat::$1: *//p" "$2" | head -n 1)
  printf '%s' "${value:-?}"
}

# custos_fuzz_run TARGET SECONDS [--merge] [LIBFUZZER_ARGS...]
# Returns non-zero if the target crashed, leaked, hung or ran out of memory,
# after printing the end of its log and the path of the input that did it.
custos_fuzz_run() {
  local target=$1 seconds=$2
  shift 2
  local merge=0
  if [ "${1:-}" = --merge ]; then
    merge=1
    shift
  fi
  local bin=$CUSTOS_FUZZ_BUILD/bin/$target
  local seeds=$CUSTOS_FUZZ_DIR/corpus/$target
  local regressions=$CUSTOS_FUZZ_DIR/regressions/$target
  local dict=$CUSTOS_FUZZ_DIR/$target.dict
  local work=$CUSTOS_FUZZ_WORK/$target
  local corpus=$work/corpus artifacts=$work/artifacts log=$work/fuzz.log
  if [ ! -x "$bin" ]; then
    say "no fuzz target $target (known: $(custos_fuzz_targets | paste -sd ' '))"
    return 2
  fi
  mkdir -p "$corpus" "$artifacts"
  if [ -d "$seeds" ]; then cp -R "$seeds/." "$corpus/"; fi

  local args=(-max_total_time="$seconds" -print_final_stats=1 -timeout=25
              -rss_limit_mb=2048 -artifact_prefix="$artifacts/")
  if [ -f "$dict" ]; then args+=(-dict="$dict"); fi
  # New inputs go to the first directory only; saved crashers run first and
  # are never written to.
  local inputs=("$corpus")
  if [ -d "$regressions" ]; then inputs+=("$regressions"); fi

  say "fuzzing $target for ${seconds}s"
  local start rc=0
  start=$(date +%s)
  "$bin" "${args[@]}" "$@" "${inputs[@]}" >"$log" 2>&1 || rc=$?
  local elapsed=$(($(date +%s) - start))
  local execs rate files
  execs=$(_custos_fuzz_stat number_of_executed_units "$log")
  rate=$(_custos_fuzz_stat average_exec_per_sec "$log")
  files=$(find "$corpus" -type f | wc -l)

  if [ "$rc" -ne 0 ]; then
    tail -n 60 "$log" >&2
    local written
    written=$(sed -n 's/.*Test unit written to //p' "$log" | tail -n 1)
    say "$target FAILED (exit $rc) after ${elapsed}s, $execs executions"
    say "input that did it: ${written:-(none written; see $log)}"
    say "reproduce: $bin $written"
    return 1
  fi
  printf '%s: %s executions in %ss (%s exec/s), corpus %s inputs\n' \
    "$target" "$execs" "$elapsed" "$rate" "$files"

  if [ "$merge" -eq 1 ]; then
    local before after
    mkdir -p "$seeds"
    before=$(find "$seeds" -type f | wc -l)
    "$bin" -merge=1 "$seeds" "$corpus" >"$work/merge.log" 2>&1 || {
      tail -n 30 "$work/merge.log" >&2
      say "merge into $seeds failed"
      return 1
    }
    after=$(find "$seeds" -type f | wc -l)
    say "merged $((after - before)) new inputs into ${seeds#"$CUSTOS_ROOT"/}"
  fi
}

# For scripts/test: every target for a few seconds each, from a fresh work
# directory, so that the smoke test neither grows nor depends on earlier runs.
custos_fuzz_smoke() {
  local seconds=${CUSTOS_FUZZ_SECONDS:-5}
  custos_fuzz_build
  local work=$CUSTOS_FUZZ_BUILD/fuzz-smoke
  rm -rf "$work"
  local target failed=()
  for target in $(custos_fuzz_targets); do
    CUSTOS_FUZZ_WORK=$work custos_fuzz_run "$target" "$seconds" ||
      failed+=("$target")
  done
  if [ ${#failed[@]} -gt 0 ]; then
    say "fuzz smoke test failed: ${failed[*]}"
    return 1
  fi
}
