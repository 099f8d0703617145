// CUSTOS_FUZZ_CHECK: the invariant checks of the fuzz targets. A broken
// invariant prints where and why, then aborts, which libFuzzer reports as a
// crash and saves the input for. (The targets must not use assert(): the
// fuzz build is RelWithDebInfo, where NDEBUG turns it off.)
#ifndef CUSTOS_TESTS_FUZZ_FUZZ_CHECK_H_
#define CUSTOS_TESTS_FUZZ_FUZZ_CHECK_H_

#include <cstdio>
#include <cstdlib>

#define CUSTOS_FUZZ_CHECK(cond, what)                                      \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "%s:%d: invariant broken: %s (%s)\n", __FILE__, \
                   __LINE__, #cond, what);                                 \
      std::abort();                                                        \
    }                                                                      \
  } while (0)

#endif  // CUSTOS_TESTS_FUZZ_FUZZ_CHECK_H_
