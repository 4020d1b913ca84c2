/* buf: a growable byte buffer. Not thread-safe; one owner at a time. */
#include "base.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void tc_buf_reserve(struct tc_buf *b, size_t extra) {
  size_t need = b->len + extra + 1;
  if (need <= b->cap) return;
  size_t cap = b->cap ? b->cap : 64;
  while (cap < need) cap *= 2;
  b->data = tc_xrealloc(b->data, cap);
  b->cap = cap;
}

void tc_buf_append(struct tc_buf *b, const void *p, size_t n) {
  tc_buf_reserve(b, n);
  if (n) memcpy(b->data + b->len, p, n);
  b->len += n;
  b->data[b->len] = 0;
}

void tc_buf_puts(struct tc_buf *b, const char *s) { tc_buf_append(b, s, strlen(s)); }

void tc_buf_putc(struct tc_buf *b, char c) { tc_buf_append(b, &c, 1); }

void tc_buf_vprintf(struct tc_buf *b, const char *fmt, va_list ap) {
  va_list ap2;
  va_copy(ap2, ap);
  int n = vsnprintf(NULL, 0, fmt, ap2);
  va_end(ap2);
  if (n < 0) return;
  tc_buf_reserve(b, (size_t)n);
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  b->len += (size_t)n;
}

void tc_buf_printf(struct tc_buf *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  tc_buf_vprintf(b, fmt, ap);
  va_end(ap);
}

void tc_buf_consume(struct tc_buf *b, size_t n) {
  if (n >= b->len) {
    b->len = 0;
  } else {
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
  }
  if (b->data) b->data[b->len] = 0;
}

void tc_buf_reset(struct tc_buf *b) {
  b->len = 0;
  if (b->data) b->data[0] = 0;
}

void tc_buf_free(struct tc_buf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

char *tc_buf_steal(struct tc_buf *b, size_t *len) {
  if (!b->data) tc_buf_reserve(b, 0), b->data[0] = 0;
  char *p = b->data;
  if (len) *len = b->len;
  b->data = NULL;
  b->len = b->cap = 0;
  return p;
}
