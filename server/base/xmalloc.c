/* xmalloc: allocation that aborts on failure, and secret wiping. */
#include "base.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void oom(size_t n) {
  fprintf(stderr, "tailcoat: out of memory allocating %zu bytes\n", n);
  abort();
}

void *tc_xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) oom(n);
  return p;
}

void *tc_xcalloc(size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size ? size : 1);
  if (!p) oom(n * size);
  return p;
}

void *tc_xrealloc(void *p, size_t n) {
  void *q = realloc(p, n ? n : 1);
  if (!q) oom(n);
  return q;
}

char *tc_xstrdup(const char *s) {
  if (!s) return NULL;
  return tc_xstrndup(s, strlen(s));
}

char *tc_xstrndup(const char *s, size_t n) {
  char *p = tc_xmalloc(n + 1);
  memcpy(p, s, n);
  p[n] = 0;
  return p;
}

char *tc_xasprintf(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char *out = NULL;
  int r = vasprintf(&out, fmt, ap);
  va_end(ap);
  if (r < 0) oom(0);
  return out;
}

void tc_wipe(void *p, size_t n) {
  if (!p) return;
  explicit_bzero(p, n);
}

void tc_free_secret(void *p, size_t n) {
  if (!p) return;
  explicit_bzero(p, n);
  free(p);
}
