/* A fake tc_mapper_io stream for tests that drive server/mapper without a
 * transport: it records the status and every byte the mapper writes, and can
 * be cancelled as if the client went away. Shared by tests/mapper and
 * tests/interop. */
#ifndef TC_TESTS_FAKE_IO_H
#define TC_TESTS_FAKE_IO_H

#include <pthread.h>
#include <stdbool.h>

#include "base/base.h"
#include "mapper/mapper.h"

struct fake {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int status;
  bool responded, begun, ended, cancelled;
  struct tc_buf body;
  size_t consumed;
  void (*cancel_fn)(void *);
  void *cancel_arg;
  int fail_writes; /* non-zero: write returns this */
  int retry_after; /* what the mapper asked to send as Retry-After */
};

/* Owned; free with fake_free (NULL ok). */
struct fake *fake_new(void);
void fake_free(struct fake *f);
/* The io table whose stream argument is a struct fake. */
extern const struct tc_mapper_io fio;

#endif
