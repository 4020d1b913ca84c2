/* tc_test: a minimal assertion harness for tailcoat's C tests. Each test
 * binary registers cases with TC_TEST and runs them from tc_test_main; it
 * prints one line per failed check and a closing "N passed, N failed". */
#ifndef TC_TEST_H
#define TC_TEST_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void (*tc_test_fn)(void);
struct tc_test_case {
  const char *name;
  tc_test_fn fn;
};

extern int tc_test_failures;   /* checks failed in the current case */
extern const char *tc_test_shared_dir; /* ../shared, from TC_SHARED_DIR or argv */

void tc_test_register(const char *name, tc_test_fn fn);
int tc_test_main(int argc, char **argv);
/* Returns an owned path under the shared testdata directory. */
char *tc_test_shared_path(const char *rel);
/* Creates a fresh temporary directory, owned path. */
char *tc_test_tmpdir(void);

#define TC_TEST(name)                                                            \
  static void name(void);                                                        \
  __attribute__((constructor)) static void tc_reg_##name(void) { tc_test_register(#name, name); } \
  static void name(void)

#define TC_CHECK(cond)                                                           \
  do {                                                                           \
    if (!(cond)) {                                                               \
      fprintf(stderr, "  FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);          \
      tc_test_failures++;                                                        \
    }                                                                            \
  } while (0)

/* Stops the current case when the check fails (later steps depend on it). */
#define TC_REQUIRE(cond)                                                         \
  do {                                                                           \
    if (!(cond)) {                                                               \
      fprintf(stderr, "  FAIL %s:%d: %s (required)\n", __FILE__, __LINE__, #cond); \
      tc_test_failures++;                                                        \
      return;                                                                    \
    }                                                                            \
  } while (0)

#define TC_CHECK_INT(a, b)                                                       \
  do {                                                                           \
    long long va_ = (long long)(a), vb_ = (long long)(b);                        \
    if (va_ != vb_) {                                                            \
      fprintf(stderr, "  FAIL %s:%d: %s == %s (%lld != %lld)\n", __FILE__, __LINE__, #a, #b, va_, vb_); \
      tc_test_failures++;                                                        \
    }                                                                            \
  } while (0)

#define TC_CHECK_STR(a, b)                                                       \
  do {                                                                           \
    const char *sa_ = (a), *sb_ = (b);                                           \
    if (!sa_ || !sb_ || strcmp(sa_, sb_)) {                                      \
      fprintf(stderr, "  FAIL %s:%d: %s == %s (\"%s\" != \"%s\")\n", __FILE__, __LINE__, #a, #b, \
              sa_ ? sa_ : "(null)", sb_ ? sb_ : "(null)");                        \
      tc_test_failures++;                                                        \
    }                                                                            \
  } while (0)

#endif
