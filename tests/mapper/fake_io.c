/* The fake tc_mapper_io stream: see fake_io.h. */
#include "tests/mapper/fake_io.h"

#include <stdlib.h>

struct fake *fake_new(void) {
  struct fake *f = calloc(1, sizeof *f);
  pthread_mutex_init(&f->mu, NULL);
  pthread_cond_init(&f->cv, NULL);
  return f;
}

void fake_free(struct fake *f) {
  if (!f) return;
  tc_buf_free(&f->body);
  pthread_mutex_destroy(&f->mu);
  pthread_cond_destroy(&f->cv);
  free(f);
}

static int f_respond(void *st, int status, const char *ct, const void *body, size_t len) {
  struct fake *f = st;
  pthread_mutex_lock(&f->mu);
  f->status = status;
  f->responded = f->ended = true;
  if (len) tc_buf_append(&f->body, body, len);
  pthread_cond_broadcast(&f->cv);
  pthread_mutex_unlock(&f->mu);
  return 0;
}
static int f_begin(void *st, int status, const char *ct) {
  struct fake *f = st;
  pthread_mutex_lock(&f->mu);
  f->status = status;
  f->begun = true;
  pthread_mutex_unlock(&f->mu);
  return 0;
}
static int f_write(void *st, const void *data, size_t len) {
  struct fake *f = st;
  pthread_mutex_lock(&f->mu);
  int rc = f->fail_writes;
  if (!rc) tc_buf_append(&f->body, data, len);
  pthread_cond_broadcast(&f->cv);
  pthread_mutex_unlock(&f->mu);
  return rc;
}
static void f_end(void *st) {
  struct fake *f = st;
  pthread_mutex_lock(&f->mu);
  f->ended = true;
  pthread_cond_broadcast(&f->cv);
  pthread_mutex_unlock(&f->mu);
}
static void f_ref(void *st) {}
static void f_unref(void *st) {}
static void f_on_cancel(void *st, void (*fn)(void *), void *arg) {
  struct fake *f = st;
  pthread_mutex_lock(&f->mu);
  bool now = f->cancelled;
  f->cancel_fn = fn;
  f->cancel_arg = arg;
  pthread_mutex_unlock(&f->mu);
  if (now) fn(arg);
}
static bool f_cancelled(void *st) {
  struct fake *f = st;
  pthread_mutex_lock(&f->mu);
  bool c = f->cancelled;
  pthread_mutex_unlock(&f->mu);
  return c;
}
static void f_retry_after(void *st, int seconds) {
  struct fake *f = st;
  pthread_mutex_lock(&f->mu);
  f->retry_after = seconds;
  pthread_mutex_unlock(&f->mu);
}
const struct tc_mapper_io fio = {f_respond, f_begin, f_write,     f_end,
                                 f_ref,     f_unref, f_on_cancel, f_cancelled,
                                 f_retry_after};
