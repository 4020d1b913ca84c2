/* tc_test: runner for the harness in tc_test.h. Single-threaded; the cases
 * themselves may start threads. Usage: test-bin [-s SHARED_DIR] [case ...] */
#include "tc_test.h"

#include <unistd.h>

int tc_test_failures;
const char *tc_test_shared_dir;

static struct tc_test_case cases[512];
static int ncases;

void tc_test_register(const char *name, tc_test_fn fn) {
  if (ncases < (int)(sizeof cases / sizeof cases[0])) cases[ncases++] = (struct tc_test_case){name, fn};
}

char *tc_test_shared_path(const char *rel) {
  size_t n = strlen(tc_test_shared_dir) + strlen(rel) + 2;
  char *p = malloc(n);
  snprintf(p, n, "%s/%s", tc_test_shared_dir, rel);
  return p;
}

char *tc_test_tmpdir(void) {
  const char *base = getenv("TMPDIR");
  char tmpl[512];
  snprintf(tmpl, sizeof tmpl, "%s/tctest-XXXXXX", base && *base ? base : "/tmp");
  char *d = mkdtemp(tmpl);
  if (!d) {
    perror("mkdtemp");
    exit(2);
  }
  return strdup(d);
}

int tc_test_main(int argc, char **argv) {
  tc_test_shared_dir = getenv("TC_SHARED_DIR");
#ifdef TC_SHARED_DIR_DEFAULT
  if (!tc_test_shared_dir) tc_test_shared_dir = TC_SHARED_DIR_DEFAULT;
#endif
  if (!tc_test_shared_dir) tc_test_shared_dir = "../shared";
  int first = 1;
  if (argc > 2 && !strcmp(argv[1], "-s")) {
    tc_test_shared_dir = argv[2];
    first = 3;
  }
  int passed = 0, failed = 0;
  for (int i = 0; i < ncases; i++) {
    if (first < argc) {
      int want = 0;
      for (int j = first; j < argc; j++) want |= !strcmp(argv[j], cases[i].name);
      if (!want) continue;
    }
    tc_test_failures = 0;
    fprintf(stderr, "[ RUN  ] %s\n", cases[i].name);
    cases[i].fn();
    if (tc_test_failures) {
      fprintf(stderr, "[ FAIL ] %s\n", cases[i].name);
      failed++;
    } else {
      fprintf(stderr, "[  OK  ] %s\n", cases[i].name);
      passed++;
    }
  }
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
