/* test_unframe: the test client's map message decoder against good and
 * hostile messages (its verdicts decide whether transport and benchmark
 * tests believe the server). */
#include <pthread.h>
#include <string.h>
#include <zstd.h>

#include "base/base.h"
#include "tc_test.h"
#include "tclient.h"

/* Appends one zstd frame of text; with_size false streams it so the frame
 * header declares no content size. */
static void add_frame(struct tc_buf *b, const char *text, bool with_size) {
  size_t n = strlen(text), cap = ZSTD_compressBound(n);
  tc_buf_reserve(b, cap);
  size_t got;
  if (with_size) {
    got = ZSTD_compress(b->data + b->len, cap, text, n, 1);
  } else {
    ZSTD_CCtx *c = ZSTD_createCCtx();
    ZSTD_inBuffer in = {text, n, 0};
    ZSTD_outBuffer out = {b->data + b->len, cap, 0};
    size_t r;
    do r = ZSTD_compressStream2(c, &out, &in, ZSTD_e_end);
    while (r > 0 && !ZSTD_isError(r));
    got = ZSTD_isError(r) ? r : out.pos;
    ZSTD_freeCCtx(c);
  }
  TC_REQUIRE(!ZSTD_isError(got));
  b->len += got;
}

static void add_skippable(struct tc_buf *b) {
  const uint8_t sk[] = {0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 'x', 'y', 'z'};
  tc_buf_append(b, sk, sizeof sk);
}

/* LE uint32 length + payload. */
static void frame_msg(struct tc_buf *out, const struct tc_buf *payload) {
  uint8_t h[4] = {(uint8_t)payload->len, (uint8_t)(payload->len >> 8), (uint8_t)(payload->len >> 16),
                  (uint8_t)(payload->len >> 24)};
  tc_buf_append(out, h, 4);
  tc_buf_append(out, payload->data, payload->len);
}

static int decode(const struct tc_buf *m, size_t max, char **js, size_t *used) {
  size_t jl = 0;
  *js = NULL;
  int rc = tc_tclient_unframe((const uint8_t *)m->data, m->len, max, used, js, &jl);
  if (rc == 0) TC_CHECK_INT(jl, strlen(*js));
  return rc;
}

TC_TEST(single_and_concatenated_frames) {
  struct tc_buf p = TC_BUF_INIT, m = TC_BUF_INIT;
  add_frame(&p, "{\"Peers\":[1,2,3]}", true);
  frame_msg(&m, &p);
  /* a second message right behind the first */
  struct tc_buf p2 = TC_BUF_INIT;
  add_frame(&p2, "{\"KeepAlive\":", true);
  add_skippable(&p2);
  add_frame(&p2, "true}", false);
  frame_msg(&m, &p2);
  char *js;
  size_t used;
  TC_REQUIRE(decode(&m, 1024, &js, &used) == 0);
  TC_CHECK_STR(js, "{\"Peers\":[1,2,3]}");
  TC_CHECK_INT(used, 4 + p.len);
  free(js);
  struct tc_buf rest = TC_BUF_INIT;
  tc_buf_append(&rest, m.data + used, m.len - used);
  TC_REQUIRE(decode(&rest, 1024, &js, &used) == 0);
  TC_CHECK_STR(js, "{\"KeepAlive\":true}"); /* frames concatenate; skippable ones add nothing */
  TC_CHECK_INT(used, rest.len);
  free(js);
  tc_buf_free(&p);
  tc_buf_free(&p2);
  tc_buf_free(&m);
  tc_buf_free(&rest);
}

TC_TEST(incomplete_is_eagain) {
  struct tc_buf p = TC_BUF_INIT, m = TC_BUF_INIT;
  add_frame(&p, "{\"a\":1}", true);
  frame_msg(&m, &p);
  char *js;
  size_t used;
  for (size_t cut = 0; cut < m.len; cut++) {
    struct tc_buf part = TC_BUF_INIT;
    tc_buf_append(&part, m.data, cut);
    TC_CHECK_INT(decode(&part, 1024, &js, &used), TC_EAGAIN);
    tc_buf_free(&part);
  }
  tc_buf_free(&p);
  tc_buf_free(&m);
}

TC_TEST(limits) {
  char big[4096];
  memset(big, 'a', sizeof big - 1);
  big[sizeof big - 1] = 0;
  char *js;
  size_t used;
  for (int with_size = 0; with_size < 2; with_size++) {
    struct tc_buf p = TC_BUF_INIT, m = TC_BUF_INIT;
    add_frame(&p, big, with_size);
    frame_msg(&m, &p);
    TC_CHECK_INT(decode(&m, sizeof big - 2, &js, &used), TC_ETOOBIG); /* one byte over */
    TC_REQUIRE(decode(&m, sizeof big - 1, &js, &used) == 0);          /* exactly at the limit */
    TC_CHECK_INT(strlen(js), sizeof big - 1);
    free(js);
    tc_buf_free(&p);
    tc_buf_free(&m);
  }
  /* a declared length far beyond the limit is refused before waiting for it */
  const uint8_t huge[] = {0xff, 0xff, 0xff, 0x7f, 0x28, 0xb5};
  struct tc_buf m = TC_BUF_INIT;
  tc_buf_append(&m, huge, sizeof huge);
  TC_CHECK_INT(decode(&m, 1 << 20, &js, &used), TC_ETOOBIG);
  tc_buf_free(&m);
}

TC_TEST(malformed_is_eproto) {
  char *js;
  size_t used;
  struct tc_buf p = TC_BUF_INIT;
  add_frame(&p, "{\"Peers\":[\"a long enough string to have a body\"]}", true);
  /* empty payload, garbage, a truncated frame, a frame with trailing bytes, a corrupted body */
  struct tc_buf cases[5];
  for (int i = 0; i < 5; i++) cases[i] = (struct tc_buf)TC_BUF_INIT;
  struct tc_buf q = TC_BUF_INIT;
  frame_msg(&cases[0], &q);
  tc_buf_append(&q, "not zstd at all", 15);
  frame_msg(&cases[1], &q);
  tc_buf_free(&q);
  tc_buf_append(&q, p.data, p.len - 3);
  frame_msg(&cases[2], &q);
  tc_buf_free(&q);
  tc_buf_append(&q, p.data, p.len);
  tc_buf_append(&q, "zz", 2);
  frame_msg(&cases[3], &q);
  tc_buf_free(&q);
  tc_buf_append(&q, p.data, p.len);
  for (size_t i = 8; i < q.len - 4; i++) q.data[i] ^= 0x5a;
  frame_msg(&cases[4], &q);
  tc_buf_free(&q);
  for (int i = 0; i < 5; i++) {
    int rc = decode(&cases[i], 1 << 20, &js, &used);
    if (rc != TC_EPROTO) fprintf(stderr, "case %d: rc %d\n", i, rc);
    TC_CHECK_INT(rc, TC_EPROTO);
    tc_buf_free(&cases[i]);
  }
  /* the same without a declared size (the streaming path) */
  struct tc_buf s = TC_BUF_INIT, sm = TC_BUF_INIT;
  add_frame(&s, "{\"Peers\":[\"a long enough string to have a body\"]}", false);
  tc_buf_append(&q, s.data, s.len - 3);
  frame_msg(&sm, &q);
  TC_CHECK_INT(decode(&sm, 1 << 20, &js, &used), TC_EPROTO);
  tc_buf_free(&q);
  tc_buf_free(&sm);
  tc_buf_free(&s);
  tc_buf_free(&p);
}

/* Each thread has its own context; a context reused after an error decodes
 * the next good message. */
static void *reuse_worker(void *arg) {
  int *bad = arg;
  struct tc_buf p = TC_BUF_INIT, good = TC_BUF_INIT, broken = TC_BUF_INIT;
  add_frame(&p, "{\"n\":12345678901234567890}", false);
  frame_msg(&good, &p);
  struct tc_buf q = TC_BUF_INIT;
  tc_buf_append(&q, p.data, p.len - 2);
  frame_msg(&broken, &q);
  for (int i = 0; i < 200; i++) {
    char *js = NULL;
    size_t used, jl;
    if (tc_tclient_unframe((const uint8_t *)broken.data, broken.len, 1024, &used, &js, &jl) != TC_EPROTO) (*bad)++;
    if (tc_tclient_unframe((const uint8_t *)good.data, good.len, 1024, &used, &js, &jl) != 0 ||
        strcmp(js, "{\"n\":12345678901234567890}"))
      (*bad)++;
    free(js);
  }
  tc_buf_free(&p);
  tc_buf_free(&q);
  tc_buf_free(&good);
  tc_buf_free(&broken);
  return NULL;
}

TC_TEST(context_reuse_across_threads) {
  pthread_t th[4];
  int bad[4] = {0};
  for (int i = 0; i < 4; i++) TC_REQUIRE(pthread_create(&th[i], NULL, reuse_worker, &bad[i]) == 0);
  for (int i = 0; i < 4; i++) {
    pthread_join(th[i], NULL);
    TC_CHECK_INT(bad[i], 0);
  }
}
