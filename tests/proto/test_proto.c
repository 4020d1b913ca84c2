/* Transport tests for server/proto on real loopback sockets: the /ts2021
 * upgrade through a stand-in front door (tests/client/tlistener.c), Noise
 * records, HTTP/2 streams and the worker hand-off, and hostile input. After
 * every hostile case a well-behaved client must still get through, and the
 * whole binary runs under ASan/LSan. */
#include <pthread.h>
#include <sodium.h>
#include <string.h>
#include <unistd.h>

#include "crypto/crypto.h"
#include "proto/proto.h"
#include "tc_test.h"
#include "tclient.h"

/* ---- the test handler -------------------------------------------------------- */
static struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int released;      /* /block handlers return when this is set */
  int blocked;       /* /block handlers currently waiting */
  int cancels;       /* cancel callbacks seen */
  int flood_rc;      /* last tc_ctl_stream_write result in /flood */
  bool flood_done;
  struct tc_ctl_stream *held; /* /hold keeps its stream here */
} g = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static void on_cancel(void *arg) {
  pthread_mutex_lock(&g.mu);
  g.cancels++;
  pthread_cond_broadcast(&g.cv);
  pthread_mutex_unlock(&g.mu);
}

static long query_num(const char *path, const char *key) {
  const char *p = strstr(path, key);
  return p ? strtol(p + strlen(key), NULL, 10) : 0;
}

static void handler(void *ctx, const struct tc_ctl_request *req, struct tc_ctl_stream *st) {
  const char *path = req->path;
  if (!strcmp(path, "/echo")) {
    tc_ctl_stream_respond(st, 200, "application/octet-stream", req->body, req->body_len);
  } else if (!strcmp(path, "/busy")) {
    tc_ctl_stream_retry_after(st, 7);
    tc_ctl_stream_respond(st, 429, "text/plain; charset=utf-8", "busy\n", 5);
  } else if (!strcmp(path, "/whoami")) {
    char mk[TC_KEY_TEXT_MAX];
    tc_key_format(TC_KEY_MACHINE, req->machine_key, mk);
    const char *ct = tc_ctl_request_header(req, "Content-Type");
    char *body = tc_xasprintf("%s %u %s %s %llu", mk, req->version, req->method, ct ? ct : "-",
                              (unsigned long long)req->conn_id);
    tc_ctl_stream_respond(st, 200, "text/plain", body, strlen(body));
    free(body);
  } else if (tc_str_has_prefix(path, "/stream")) {
    long n = query_num(path, "n=");
    tc_ctl_stream_begin(st, 200, "application/json");
    for (long i = 0; i < n; i++) {
      char json[64];
      int len = snprintf(json, sizeof json, "{\"Seq\":%ld,\"KeepAlive\":%s}", i, i % 2 ? "true" : "false");
      struct tc_buf fr = TC_BUF_INIT;
      tc_map_frame(json, (size_t)len, &fr);
      tc_ctl_stream_write(st, fr.data, fr.len);
      tc_buf_free(&fr);
      usleep(2000);
    }
    tc_ctl_stream_end(st);
  } else if (!strcmp(path, "/block")) {
    tc_ctl_stream_on_cancel(st, on_cancel, NULL);
    pthread_mutex_lock(&g.mu);
    g.blocked++;
    pthread_cond_broadcast(&g.cv);
    while (!g.released && !tc_ctl_stream_cancelled(st)) pthread_cond_wait(&g.cv, &g.mu);
    g.blocked--;
    pthread_mutex_unlock(&g.mu);
    tc_ctl_stream_respond(st, 200, "text/plain", "unblocked", 9);
  } else if (!strcmp(path, "/hold")) {
    /* Published before begin(): once the client sees the headers, the test
     * can find the stream. */
    tc_ctl_stream_on_cancel(st, on_cancel, NULL);
    pthread_mutex_lock(&g.mu);
    g.held = st; /* the handler's reference moves to the test */
    pthread_cond_broadcast(&g.cv);
    pthread_mutex_unlock(&g.mu);
    tc_ctl_stream_begin(st, 200, "application/json");
  } else if (tc_str_has_prefix(path, "/big")) {
    size_t n = (size_t)query_num(path, "n=");
    char *b = tc_xmalloc(n + 1);
    for (size_t i = 0; i < n; i++) b[i] = (char)('a' + i % 26);
    tc_ctl_stream_respond(st, 200, "application/octet-stream", b, n);
    free(b);
  } else if (tc_str_has_prefix(path, "/sleep")) {
    usleep((useconds_t)query_num(path, "ms=") * 1000);
    tc_ctl_stream_respond(st, 204, NULL, NULL, 0);
  } else if (!strcmp(path, "/flood")) {
    /* Writes until the per-connection cap trips (the client is not reading). */
    tc_ctl_stream_begin(st, 200, "application/octet-stream");
    char *chunk = tc_xcalloc(1, 1 << 20);
    int rc = 0;
    for (int i = 0; i < 64 && rc == 0; i++) rc = tc_ctl_stream_write(st, chunk, 1 << 20);
    free(chunk);
    pthread_mutex_lock(&g.mu);
    g.flood_rc = rc;
    g.flood_done = true;
    pthread_cond_broadcast(&g.cv);
    pthread_mutex_unlock(&g.mu);
    tc_ctl_stream_end(st);
  } else if (tc_str_has_prefix(path, "/dump")) {
    /* Everything the handler sees of the request, to check it arrives whole. */
    struct tc_buf b = TC_BUF_INIT;
    tc_buf_printf(&b, "%s %s %s %zu [%s]\n", req->method, req->path, req->authority, req->body_len,
                  (const char *)req->body);
    for (size_t i = 0; i < req->nheaders; i++) tc_buf_printf(&b, "%s=%s\n", req->headers[i].name, req->headers[i].value);
    tc_ctl_stream_respond(st, 200, "text/plain", b.data, b.len);
    tc_buf_free(&b);
  } else if (!strcmp(path, "/noreply")) {
    /* returns without answering: the server must send 500 */
  } else {
    tc_ctl_stream_respond(st, 404, "text/plain", "no\n", 3);
  }
}

/* ---- fixture ------------------------------------------------------------------- */
struct fx {
  uint8_t priv[32], pub[32];
  struct tc_ctl_server *srv;
  struct tc_tlistener *lis;
  int port;
};

static int fx_start_opts(struct fx *f, struct tc_ctl_server_opts *o);
static int fx_start(struct fx *f) {
  struct tc_ctl_server_opts o = {.workers = 4};
  return fx_start_opts(f, &o);
}

static int fx_start_opts(struct fx *f, struct tc_ctl_server_opts *o) {
  memset(f, 0, sizeof *f);
  pthread_mutex_lock(&g.mu);
  g.released = g.blocked = g.cancels = 0;
  g.flood_done = false;
  g.held = NULL;
  pthread_mutex_unlock(&g.mu);
  tc_x25519_keygen(f->priv, f->pub);
  if (tc_ctl_server_new(handler, NULL, f->priv, o, &f->srv, NULL)) return -1;
  if (tc_tlistener_start(f->pub, tc_ctl_upgrade, f->srv, &f->lis)) return -1;
  f->port = tc_tlistener_port(f->lis);
  return 0;
}

static void fx_stop(struct fx *f) {
  pthread_mutex_lock(&g.mu);
  g.released = 1;
  pthread_cond_broadcast(&g.cv);
  pthread_mutex_unlock(&g.mu);
  tc_tlistener_stop(f->lis);
  tc_ctl_server_stop(f->srv);
}

static struct tc_tclient *client(struct fx *f, uint16_t version) {
  struct tc_tclient_opts o = {.version = version, .server_pub = f->pub, .timeout_ms = 15000};
  struct tc_tclient *c = NULL;
  struct tc_err err = {0};
  if (tc_tclient_connect("127.0.0.1", f->port, &o, &c, &err)) fprintf(stderr, "  connect: %s\n", err.msg);
  return c;
}

/* A fresh, well-behaved client gets a correct answer. */
static bool healthy(struct fx *f) {
  struct tc_tclient *c = client(f, 138);
  if (!c) return false;
  int status = 0;
  char *body = NULL;
  int rc = tc_tclient_request(c, "POST", "/echo", "ping", 4, 15000, &status, &body, NULL);
  bool ok = rc == 0 && status == 200 && body && !strcmp(body, "ping");
  free(body);
  tc_tclient_free(c);
  return ok;
}

/* A handler's Retry-After reaches the client as a response header; other
 * responses carry none. */
TC_TEST(retry_after_header) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  int32_t sid = tc_tclient_submit(c, "POST", "/busy", NULL, "x", 1);
  TC_REQUIRE(sid > 0);
  TC_CHECK_INT(tc_tclient_wait_closed(c, sid, 10000), 0);
  TC_CHECK_INT(tc_tclient_wait_headers(c, sid, 1000), 429);
  TC_CHECK_INT(tc_tclient_retry_after(c, sid), 7);
  int32_t e = tc_tclient_submit(c, "POST", "/echo", NULL, "y", 1);
  TC_REQUIRE(e > 0);
  TC_CHECK_INT(tc_tclient_wait_closed(c, e, 10000), 0);
  TC_CHECK_INT(tc_tclient_retry_after(c, e), 0);
  tc_tclient_free(c);
  fx_stop(&f);
}

/* Pumps until the server closes the connection. */
static bool closed_within(struct tc_tclient *c, int ms) {
  int64_t deadline = tc_mono_ms() + ms;
  while (tc_mono_ms() < deadline)
    if (tc_tclient_pump(c, 100) == TC_EIO) return true;
  return false;
}

/* Waits until the server holds at most n connections (and, for 0, no stream). */
static bool conns_drain_to(struct fx *f, uint64_t n, int ms) {
  int64_t deadline = tc_mono_ms() + ms;
  struct tc_ctl_stats s;
  do {
    tc_ctl_server_stats(f->srv, &s);
    if (s.conns_open <= n && (n > 0 || s.streams_open == 0)) return true;
    usleep(5000);
  } while (tc_mono_ms() < deadline);
  fprintf(stderr, "  still open: %llu conns, %llu streams\n", (unsigned long long)s.conns_open,
          (unsigned long long)s.streams_open);
  return false;
}

static bool conns_drain(struct fx *f, int ms) { return conns_drain_to(f, 0, ms); }

static void wait_for(int *field, int want, int ms) {
  int64_t deadline = tc_mono_ms() + ms;
  pthread_mutex_lock(&g.mu);
  while (*field < want && tc_mono_ms() < deadline) {
    pthread_mutex_unlock(&g.mu);
    usleep(2000);
    pthread_mutex_lock(&g.mu);
  }
  pthread_mutex_unlock(&g.mu);
}

/* ---- tests ------------------------------------------------------------------------- */
TC_TEST(map_frame_round_trip) {
  struct tc_buf b = TC_BUF_INIT;
  const char *js = "{\"KeepAlive\":true}";
  TC_REQUIRE(tc_map_frame(js, strlen(js), &b) == 0);
  size_t n = (size_t)(uint8_t)b.data[0] | (size_t)(uint8_t)b.data[1] << 8 | (size_t)(uint8_t)b.data[2] << 16 |
             (size_t)(uint8_t)b.data[3] << 24;
  TC_CHECK_INT(n + 4, b.len);
  TC_CHECK(!memcmp(b.data + 4, "\x28\xb5\x2f\xfd", 4)); /* zstd magic */
  TC_REQUIRE(tc_map_frame(js, strlen(js), &b) == 0); /* a second frame appended */
  size_t used;
  char *out;
  size_t olen;
  TC_CHECK_INT(tc_map_unframe((uint8_t *)b.data, 3, 1024, &used, &out, &olen), TC_EAGAIN);
  TC_CHECK_INT(tc_map_unframe((uint8_t *)b.data, n + 3, 1024, &used, &out, &olen), TC_EAGAIN);
  TC_REQUIRE(tc_map_unframe((uint8_t *)b.data, b.len, 1024, &used, &out, &olen) == 0);
  TC_CHECK_INT(used, n + 4);
  TC_CHECK_STR(out, js);
  free(out);
  TC_REQUIRE(tc_map_unframe((uint8_t *)b.data + used, b.len - used, 1024, &used, &out, &olen) == 0);
  TC_CHECK_STR(out, js);
  free(out);
  TC_CHECK_INT(tc_map_unframe((uint8_t *)b.data, b.len, 4, &used, &out, &olen), TC_ETOOBIG);
  b.data[5] ^= 0x40; /* break the magic */
  TC_CHECK_INT(tc_map_unframe((uint8_t *)b.data, b.len, 1024, &used, &out, &olen), TC_EPROTO);
  tc_buf_free(&b);
}

TC_TEST(map_unframe_mutations) {
  uint64_t x = 0x243f6a8885a308d3ull;
  struct tc_buf good = TC_BUF_INIT;
  const char *js = "{\"Peers\":[{\"ID\":1,\"Name\":\"a.example.com.\"},{\"ID\":2}],\"KeepAlive\":false}";
  TC_REQUIRE(tc_map_frame(js, strlen(js), &good) == 0);
  uint8_t m[512];
  TC_REQUIRE(good.len < sizeof m);
  int ok = 0;
  for (int i = 0; i < 20000; i++) {
    memcpy(m, good.data, good.len);
    size_t len = good.len;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    int op = (int)(x % 3);
    if (op == 0)
      m[(x >> 8) % len] ^= (uint8_t)(1u << ((x >> 20) % 8));
    else if (op == 1)
      len = (size_t)((x >> 8) % len);
    else
      m[(x >> 8) % len] = (uint8_t)(x >> 32);
    size_t used = 0, olen = 0;
    char *out = NULL;
    int rc = tc_map_unframe(m, len, 4096, &used, &out, &olen);
    TC_CHECK(rc == 0 || rc == TC_EAGAIN || rc == TC_EPROTO || rc == TC_ETOOBIG);
    if (rc == 0) {
      ok++;
      TC_CHECK(used <= len && strlen(out) <= olen && out[olen] == 0);
      free(out);
    }
    if (tc_test_failures) break;
  }
  TC_CHECK(ok < 20000); /* mutations were noticed at all */
  tc_buf_free(&good);
}

TC_TEST(key_response_logic) {
  uint8_t pub[32];
  for (int i = 0; i < 32; i++) pub[i] = (uint8_t)(0xf0 ^ i);
  int status;
  char *body;
  tc_ctl_key_response(pub, "v=87", &status, &body);
  TC_CHECK_INT(status, 200);
  char want[256], mk[TC_KEY_TEXT_MAX];
  snprintf(want, sizeof want,
           "{\"legacyPublicKey\":\"mkey:0000000000000000000000000000000000000000000000000000000000000000\","
           "\"publicKey\":\"%s\"}",
           tc_key_format(TC_KEY_MACHINE, pub, mk));
  TC_CHECK_STR(body, want);
  free(body);
  tc_ctl_key_response(pub, "", &status, &body);
  TC_CHECK_INT(status, 400);
  free(body);
  tc_ctl_key_response(pub, "x=1&v=", &status, &body);
  TC_CHECK_INT(status, 400);
  free(body);
  tc_ctl_key_response(pub, "a=b&v=138", &status, &body);
  TC_CHECK_INT(status, 200);
  free(body);
  tc_ctl_key_response(pub, "v=1x", &status, &body);
  TC_CHECK_INT(status, 400);
  free(body);
}

TC_TEST(handshake_identity_and_echo) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  uint8_t fetched[32];
  int status = 0;
  TC_CHECK_INT(tc_tclient_fetch_key("127.0.0.1", f.port, 87, fetched, &status, NULL), 0);
  TC_CHECK_INT(status, 200);
  TC_CHECK(memcmp(fetched, f.pub, 32) == 0);

  uint8_t mpriv[32], mpub[32];
  tc_x25519_keygen(mpriv, mpub);
  struct tc_tclient_opts o = {.version = 87, .machine_priv = mpriv}; /* fetches /key itself */
  struct tc_tclient *c = NULL;
  struct tc_err err = {0};
  TC_REQUIRE(tc_tclient_connect("127.0.0.1", f.port, &o, &c, &err) == 0);
  char *body = NULL;
  TC_CHECK_INT(tc_tclient_request(c, "POST", "/whoami", "{}", 2, 5000, &status, &body, NULL), 0);
  TC_CHECK_INT(status, 200);
  char mk[TC_KEY_TEXT_MAX], want[200];
  tc_key_format(TC_KEY_MACHINE, mpub, mk);
  snprintf(want, sizeof want, "%s 87 POST application/json", mk);
  TC_CHECK(body && tc_str_has_prefix(body, want));
  free(body);
  TC_CHECK(tc_tclient_first_frame_settings(c));
  TC_CHECK(tc_tclient_early_json(c) == NULL);
  TC_CHECK_INT(tc_tclient_request(c, "POST", "/echo", "hello", 5, 5000, &status, &body, NULL), 0);
  TC_CHECK_INT(status, 200);
  TC_CHECK_STR(body, "hello");
  free(body);
  TC_CHECK_INT(tc_tclient_request(c, "GET", "/nothing", NULL, 0, 5000, &status, &body, NULL), 0);
  TC_CHECK_INT(status, 404);
  free(body);
  /* HEAD (the ping-callback method): status only, never DATA. */
  size_t hlen = 99;
  TC_CHECK_INT(tc_tclient_request(c, "HEAD", "/big?n=100", NULL, 0, 5000, &status, &body, &hlen), 0);
  TC_CHECK_INT(status, 200);
  TC_CHECK_INT(hlen, 0);
  free(body);
  TC_CHECK_INT(tc_tclient_request(c, "POST", "/noreply", NULL, 0, 5000, &status, &body, NULL), 0);
  TC_CHECK_INT(status, 500);
  free(body);
  TC_CHECK(tc_tclient_max_record(c) <= TC_TS_MAX_MSG);
  tc_tclient_free(c);
  struct tc_ctl_stats s;
  tc_ctl_server_stats(f.srv, &s);
  TC_CHECK(s.requests_total >= 4);
  fx_stop(&f);
}

TC_TEST(streaming_map_messages) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  int32_t sid = tc_tclient_submit(c, "POST", "/stream?n=6", NULL, "{}", 2);
  TC_REQUIRE(sid > 0);
  TC_CHECK_INT(tc_tclient_wait_headers(c, sid, 5000), 200);
  for (int i = 0; i < 6; i++) {
    char *js = NULL;
    size_t len;
    TC_REQUIRE(tc_tclient_map_next(c, sid, 5000, &js, &len) == 0);
    char want[64];
    snprintf(want, sizeof want, "{\"Seq\":%d,\"KeepAlive\":%s}", i, i % 2 ? "true" : "false");
    TC_CHECK_STR(js, want);
    free(js);
  }
  char *js = NULL;
  size_t len;
  TC_CHECK_INT(tc_tclient_map_next(c, sid, 5000, &js, &len), TC_EIO); /* ended cleanly */
  TC_CHECK_INT(tc_tclient_stream_error(c, sid), 0);
  tc_tclient_free(c);
  fx_stop(&f);
}

TC_TEST(concurrent_streams_one_blocks) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  int32_t blk = tc_tclient_submit(c, "POST", "/block", NULL, "{}", 2);
  int32_t hold = tc_tclient_submit(c, "POST", "/hold", NULL, "{}", 2);
  TC_REQUIRE(blk > 0 && hold > 0);
  TC_CHECK_INT(tc_tclient_wait_headers(c, hold, 5000), 200);
  wait_for(&g.blocked, 1, 15000);
  /* The held stream (a map-poll stand-in) keeps flowing, as do others. */
  pthread_mutex_lock(&g.mu);
  struct tc_ctl_stream *held = g.held;
  pthread_mutex_unlock(&g.mu);
  TC_REQUIRE(held != NULL);
  struct tc_buf fr = TC_BUF_INIT;
  tc_map_frame("{\"KeepAlive\":true}", 18, &fr);
  int64_t t0 = tc_mono_ns();
  TC_CHECK_INT(tc_ctl_stream_write(held, fr.data, fr.len), 0);
  tc_buf_free(&fr);
  char *js = NULL;
  size_t len;
  TC_CHECK_INT(tc_tclient_map_next(c, hold, 5000, &js, &len), 0);
  int64_t lat_us = (tc_mono_ns() - t0) / 1000;
  TC_CHECK(lat_us < 2000000); /* prompt (a lost wake-up would stall forever; generous for loaded CI) */
  TC_CHECK_STR(js, "{\"KeepAlive\":true}");
  free(js);
  int32_t s1 = tc_tclient_submit(c, "POST", "/stream?n=3", NULL, "{}", 2);
  int32_t s2 = tc_tclient_submit(c, "POST", "/echo", NULL, "abc", 3);
  TC_CHECK_INT(tc_tclient_wait_closed(c, s1, 5000), 0);
  TC_CHECK_INT(tc_tclient_wait_closed(c, s2, 5000), 0);
  size_t n;
  TC_CHECK(!strcmp(tc_tclient_body(c, s2, &n), "abc"));
  TC_CHECK_INT(tc_tclient_wait_headers(c, blk, 50), TC_EAGAIN); /* still blocked */
  pthread_mutex_lock(&g.mu);
  g.released = 1;
  pthread_cond_broadcast(&g.cv);
  pthread_mutex_unlock(&g.mu);
  TC_CHECK_INT(tc_tclient_wait_closed(c, blk, 5000), 0);
  TC_CHECK(!strcmp(tc_tclient_body(c, blk, &n), "unblocked"));
  /* The client resets the held stream: the cancel callback fires and
   * writes fail; the holder still ends it. */
  TC_CHECK_INT(tc_tclient_reset(c, hold), 0);
  wait_for(&g.cancels, 1, 15000);
  TC_CHECK_INT(g.cancels, 1);
  TC_CHECK(tc_ctl_stream_cancelled(held));
  TC_CHECK_INT(tc_ctl_stream_write(held, "x", 1), TC_EIO);
  tc_ctl_stream_end(held);
  tc_tclient_free(c);
  fx_stop(&f);
}

/* ---- idle memory release -------------------------------------------------------- */
/* A map-like JSON message of about n bytes that zstd cannot shrink to
 * nothing (pseudo-random hex), so its frame spans many HTTP/2 DATA frames
 * and more than the client's initial stream window. Owned by the caller. */
static char *noisy_json(size_t n, uint32_t seed) {
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_printf(&b, "{\"Seed\":%u,\"Peers\":\"", seed);
  uint32_t x = seed | 1;
  while (b.len < n) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    tc_buf_printf(&b, "%08x", x);
  }
  tc_buf_puts(&b, "\"}");
  return tc_buf_steal(&b, NULL);
}

/* Sends json on the held stream and checks the client decodes exactly it. */
static bool map_roundtrip(struct tc_tclient *c, int32_t sid, struct tc_ctl_stream *held, const char *json) {
  struct tc_buf fr = TC_BUF_INIT;
  bool ok = tc_map_frame(json, strlen(json), &fr) == 0 && tc_ctl_stream_write(held, fr.data, fr.len) == 0;
  tc_buf_free(&fr);
  char *got = NULL;
  size_t len = 0;
  ok = ok && tc_tclient_map_next(c, sid, 15000, &got, &len) == 0 && len == strlen(json) && !strcmp(got, json);
  free(got);
  return ok;
}

/* Waits until the server has released idle pages more than `after` times
 * and then nothing more for 300 ms (a large map may be released in parts
 * while flow control holds it back); returns the stats then. */
static struct tc_ctl_stats wait_release(struct fx *f, uint64_t after, int ms) {
  struct tc_ctl_stats s;
  int64_t deadline = tc_mono_ms() + ms, changed = tc_mono_ms();
  uint64_t last = after;
  do {
    tc_ctl_server_stats(f->srv, &s);
    if (s.idle_releases != last) {
      last = s.idle_releases;
      changed = tc_mono_ms();
    }
    if (s.idle_releases > after && tc_mono_ms() - changed >= 300) break;
    usleep(10000);
  } while (tc_mono_ms() < deadline);
  return s;
}

/* An idle map stream gives its HTTP/2 frame buffer pages back, and the
 * stream still carries large maps (many DATA frames, beyond the initial
 * flow-control window) and keep-alives correctly afterwards. */
TC_TEST(idle_stream_releases_frame_buffer) {
  struct fx f;
  struct tc_ctl_server_opts o = {.workers = 2, .idle_release_ms = 50};
  TC_REQUIRE(fx_start_opts(&f, &o) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  int32_t hold = tc_tclient_submit(c, "POST", "/hold", NULL, "{}", 2);
  TC_REQUIRE(hold > 0);
  TC_CHECK_INT(tc_tclient_wait_headers(c, hold, 5000), 200);
  pthread_mutex_lock(&g.mu);
  struct tc_ctl_stream *held = g.held;
  pthread_mutex_unlock(&g.mu);
  TC_REQUIRE(held != NULL);
  struct tc_ctl_stats s0;
  tc_ctl_server_stats(f.srv, &s0);
  /* The 16 KiB frame buffer lives in its own pages, the rest on the heap. */
  TC_CHECK(s0.h2_mapped_bytes >= 16384);
  TC_CHECK(s0.h2_heap_bytes > 4096);

  char *big1 = noisy_json(450000, 7);
  TC_CHECK(map_roundtrip(c, hold, held, big1));
  /* Full 16 KiB DATA frames touched every page of the buffer; once quiet,
   * they go back. */
  struct tc_ctl_stats s1 = wait_release(&f, s0.idle_releases, 10000);
  TC_CHECK(s1.idle_releases > s0.idle_releases);
  TC_CHECK(s1.idle_released_bytes - s0.idle_released_bytes >= 16384);

  /* A keep-alive touches one page, which is released again. */
  TC_CHECK(map_roundtrip(c, hold, held, "{\"KeepAlive\":true}"));
  struct tc_ctl_stats s2 = wait_release(&f, s1.idle_releases, 10000);
  TC_CHECK(s2.idle_releases > s1.idle_releases);
  TC_CHECK(s2.idle_released_bytes - s1.idle_released_bytes >= 4096);
  TC_CHECK(s2.idle_released_bytes - s1.idle_released_bytes < 16384);

  /* Released pages come back zeroed: nothing nghttp2 needs was in them. */
  char *big2 = noisy_json(450000, 99);
  TC_CHECK(map_roundtrip(c, hold, held, big2));
  TC_CHECK(map_roundtrip(c, hold, held, big1));
  TC_CHECK(map_roundtrip(c, hold, held, "{\"KeepAlive\":true}"));
  /* The connection still serves other requests. */
  int status = 0;
  char *body = NULL;
  TC_CHECK_INT(tc_tclient_request(c, "POST", "/echo", "after", 5, 15000, &status, &body, NULL), 0);
  TC_CHECK(status == 200 && body && !strcmp(body, "after"));
  free(body);
  free(big1);
  free(big2);
  tc_ctl_stream_end(held);
  TC_CHECK_INT(tc_tclient_wait_closed(c, hold, 5000), 0);
  tc_tclient_free(c);
  TC_CHECK(conns_drain(&f, 10000));
  /* Every session's memory went back through the allocator. */
  struct tc_ctl_stats s3;
  tc_ctl_server_stats(f.srv, &s3);
  TC_CHECK_INT((long long)s3.h2_heap_bytes, 0);
  TC_CHECK_INT((long long)s3.h2_mapped_bytes, 0);
  /* The connection's frame buffer was kept for the next one... */
  TC_CHECK(s3.h2_pooled_bytes >= 16384 && s3.h2_pooled_bytes <= 32 * 20480);
  /* ...which takes it instead of mapping a new one. */
  c = client(&f, 138);
  TC_REQUIRE(c);
  TC_CHECK_INT(tc_tclient_request(c, "POST", "/echo", "again", 5, 15000, &status, &body, NULL), 0);
  TC_CHECK(status == 200 && body && !strcmp(body, "again"));
  free(body);
  struct tc_ctl_stats s4;
  tc_ctl_server_stats(f.srv, &s4);
  TC_CHECK(s4.h2_mapped_bytes >= 16384);
  TC_CHECK_INT((long long)(s4.h2_mapped_bytes + s4.h2_pooled_bytes), (long long)s3.h2_pooled_bytes);
  tc_tclient_free(c);
  fx_stop(&f);
}

/* A map larger than the client's 4 MiB stream window, sent while the client
 * is not reading: the server's output backs up (socket full, or the window
 * spent) for far longer than idle_release_ms, with the map half sent. The
 * release check runs all along and must neither touch a frame in progress
 * (nor bytes waiting in our buffers) nor lose anything: every byte must
 * arrive in order once the client reads. */
TC_TEST(idle_release_during_flow_control_stall) {
  struct fx f;
  struct tc_ctl_server_opts o = {.workers = 2, .idle_release_ms = 20};
  TC_REQUIRE(fx_start_opts(&f, &o) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  int32_t hold = tc_tclient_submit(c, "POST", "/hold", NULL, "{}", 2);
  TC_REQUIRE(hold > 0);
  TC_CHECK_INT(tc_tclient_wait_headers(c, hold, 5000), 200);
  pthread_mutex_lock(&g.mu);
  struct tc_ctl_stream *held = g.held;
  pthread_mutex_unlock(&g.mu);
  TC_REQUIRE(held != NULL);
  char *huge = noisy_json(12u << 20, 12345);
  struct tc_buf fr = TC_BUF_INIT;
  TC_REQUIRE(tc_map_frame(huge, strlen(huge), &fr) == 0);
  TC_CHECK(fr.len > (5u << 20)); /* beyond the stream window */
  TC_CHECK_INT(tc_ctl_stream_write(held, fr.data, fr.len), 0);
  tc_buf_free(&fr);
  struct tc_ctl_stats s0;
  tc_ctl_server_stats(f.srv, &s0);
  usleep(400 * 1000); /* not reading */
  char *got = NULL;
  size_t len = 0;
  TC_CHECK_INT(tc_tclient_map_next(c, hold, 30000, &got, &len), 0);
  TC_CHECK(got && len == strlen(huge) && !strcmp(got, huge));
  free(got);
  /* And a small one after it all. */
  TC_CHECK(map_roundtrip(c, hold, held, "{\"KeepAlive\":true}"));
  struct tc_ctl_stats s1 = wait_release(&f, s0.idle_releases, 10000);
  TC_CHECK(s1.idle_releases > s0.idle_releases);
  free(huge);
  tc_ctl_stream_end(held);
  tc_tclient_free(c);
  TC_CHECK(conns_drain(&f, 10000));
  fx_stop(&f);
}

/* idle_release_ms < 0 turns the release off. */
TC_TEST(idle_release_disabled) {
  struct fx f;
  struct tc_ctl_server_opts o = {.workers = 2, .idle_release_ms = -1};
  TC_REQUIRE(fx_start_opts(&f, &o) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  int32_t hold = tc_tclient_submit(c, "POST", "/hold", NULL, "{}", 2);
  TC_REQUIRE(hold > 0);
  TC_CHECK_INT(tc_tclient_wait_headers(c, hold, 5000), 200);
  pthread_mutex_lock(&g.mu);
  struct tc_ctl_stream *held = g.held;
  pthread_mutex_unlock(&g.mu);
  TC_REQUIRE(held != NULL);
  char *big = noisy_json(100000, 3);
  TC_CHECK(map_roundtrip(c, hold, held, big));
  free(big);
  struct tc_ctl_stats s = wait_release(&f, 0, 500);
  TC_CHECK_INT((long long)s.idle_releases, 0);
  tc_ctl_stream_end(held);
  tc_tclient_free(c);
  TC_CHECK(conns_drain(&f, 10000));
  fx_stop(&f);
}

TC_TEST(cancel_on_connection_death) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  int32_t hold = tc_tclient_submit(c, "POST", "/hold", NULL, "{}", 2);
  int32_t blk = tc_tclient_submit(c, "POST", "/block", NULL, "{}", 2);
  TC_CHECK_INT(tc_tclient_wait_headers(c, hold, 5000), 200);
  TC_CHECK(blk > 0);
  wait_for(&g.blocked, 1, 15000);
  tc_tclient_free(c); /* connection drops */
  wait_for(&g.cancels, 2, 15000);
  TC_CHECK_INT(g.cancels, 2); /* the held stream and the blocked handler */
  pthread_mutex_lock(&g.mu);
  struct tc_ctl_stream *held = g.held;
  pthread_mutex_unlock(&g.mu);
  TC_REQUIRE(held);
  TC_CHECK_INT(tc_ctl_stream_write(held, "x", 1), TC_EIO);
  tc_ctl_stream_end(held);
  TC_CHECK(healthy(&f));
  TC_CHECK(conns_drain(&f, 10000));
  fx_stop(&f);
}

TC_TEST(large_bodies_split_into_records) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  size_t n = 300000;
  char *big = tc_xmalloc(n);
  for (size_t i = 0; i < n; i++) big[i] = (char)(i * 7);
  int status;
  char *body = NULL;
  size_t blen = 0;
  TC_CHECK_INT(tc_tclient_request(c, "POST", "/echo", big, n, 10000, &status, &body, &blen), 0);
  TC_CHECK_INT(status, 200);
  TC_CHECK_INT(blen, n);
  TC_CHECK(body && memcmp(body, big, n) == 0);
  free(body);
  /* 3 MB response: above the initial windows, many full records. */
  TC_CHECK_INT(tc_tclient_request(c, "GET", "/big?n=3000000", NULL, 0, 20000, &status, &body, &blen), 0);
  TC_CHECK_INT(blen, 3000000);
  TC_CHECK(body && body[2999999] == (char)('a' + 2999999 % 26));
  free(body);
  TC_CHECK_INT(tc_tclient_max_record(c), TC_TS_MAX_MSG); /* full records, never more */
  TC_CHECK(tc_tclient_records(c) > 3000000 / TC_TS_MAX_PLAINTEXT);
  tc_tclient_free(c);
  free(big);
  fx_stop(&f);
}

/* The request the handler gets (kept in one block for the stream's life)
 * has every header, in order, and the body NUL-terminated. */
TC_TEST(request_fields_intact) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  char v3[3000];
  memset(v3, 'v', sizeof v3 - 1);
  v3[sizeof v3 - 1] = 0;
  const char *extra[] = {"x-one", "1", "x-empty", "", "x-long", v3, "content-type", "application/json", NULL};
  int32_t sid = tc_tclient_submit_hdrs(c, "POST", "/dump?q=1", extra, "{\"a\":1}", 7);
  TC_REQUIRE(sid > 0);
  TC_CHECK_INT(tc_tclient_wait_closed(c, sid, 10000), 0);
  size_t n = 0;
  const char *body = tc_tclient_body(c, sid, &n);
  char *want = tc_xasprintf("POST /dump?q=1 tailcoat.test 7 [{\"a\":1}]\ncontent-length=7\nx-one=1\nx-empty=\n"
                            "x-long=%s\ncontent-type=application/json\n",
                            v3);
  if (!(body && n == strlen(want) && !memcmp(body, want, n))) fprintf(stderr, "  got: %.*s\n", (int)TC_MIN(n, 200), body ? body : "");
  TC_CHECK(body && n == strlen(want) && !memcmp(body, want, n));
  free(want);
  /* No body: an empty, NUL-terminated one. */
  int status = 0;
  char *resp = NULL;
  TC_CHECK_INT(tc_tclient_request(c, "GET", "/dump", NULL, 0, 10000, &status, &resp, NULL), 0);
  TC_CHECK(resp && tc_str_has_prefix(resp, "GET /dump tailcoat.test 0 []\ncontent-length=0\n"));
  free(resp);
  tc_tclient_free(c);
  fx_stop(&f);
}

TC_TEST(empty_records_are_skipped) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  TC_CHECK_INT(tc_tclient_send_record(c, "", 0), 0);
  TC_CHECK_INT(tc_tclient_send_record(c, "", 0), 0);
  int status;
  char *body = NULL;
  TC_CHECK_INT(tc_tclient_request(c, "POST", "/echo", "after-empty", 11, 5000, &status, &body, NULL), 0);
  TC_CHECK_STR(body, "after-empty");
  free(body);
  tc_tclient_free(c);
  fx_stop(&f);
}

/* ---- hostile upgrades --------------------------------------------------------------- */
static char *upgrade_raw(struct fx *f, const char *upgrade, const char *hs, size_t *outlen) {
  struct tc_buf req = TC_BUF_INIT;
  tc_buf_puts(&req, "POST /ts2021 HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n");
  if (upgrade) tc_buf_printf(&req, "Upgrade: %s\r\n", upgrade);
  if (hs) tc_buf_printf(&req, "X-Tailscale-Handshake: %s\r\n", hs);
  tc_buf_puts(&req, "Content-Length: 0\r\n\r\n");
  char *out = tc_traw_exchange(f->port, req.data, req.len, 10000, outlen);
  tc_buf_free(&req);
  return out;
}

static char *b64(const uint8_t *p, size_t n) {
  size_t cap = sodium_base64_encoded_len(n, sodium_base64_VARIANT_ORIGINAL);
  char *s = tc_xmalloc(cap);
  sodium_bin2base64(s, cap, p, n, sodium_base64_VARIANT_ORIGINAL);
  return s;
}

TC_TEST(hostile_upgrade_requests) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  uint8_t mpriv[32], init[TC_TS_INIT_LEN];
  tc_random(mpriv, 32);
  struct tc_noise_hs hs;
  TC_REQUIRE(tc_ts_client_initiate(&hs, 138, mpriv, f.pub, NULL, init) == 0);
  tc_noise_hs_wipe(&hs);
  char *good = b64(init, sizeof init);
  size_t len;
  char *r;

  r = upgrade_raw(&f, NULL, good, &len);
  TC_CHECK(tc_str_has_prefix(r, "HTTP/1.1 400 "));
  TC_CHECK(strstr(r, "missing next protocol") != NULL);
  free(r);
  TC_CHECK(healthy(&f));

  r = upgrade_raw(&f, "h2c", good, &len);
  TC_CHECK(tc_str_has_prefix(r, "HTTP/1.1 400 "));
  TC_CHECK(strstr(r, "unknown next protocol") != NULL);
  free(r);

  r = upgrade_raw(&f, "Tailscale-Control-Protocol", NULL, &len);
  TC_CHECK(tc_str_has_prefix(r, "HTTP/1.1 400 "));
  TC_CHECK(strstr(r, "missing Tailscale handshake header") != NULL);
  free(r);

  r = upgrade_raw(&f, "tailscale-control-protocol", "AFcB!!!notbase64", &len);
  TC_CHECK(tc_str_has_prefix(r, "HTTP/1.1 400 "));
  TC_CHECK(strstr(r, "invalid tailscale handshake header") != NULL);
  free(r);
  TC_CHECK(healthy(&f));

  /* 100 bytes: 101, then a Noise error frame, then close. */
  char *short100 = b64(init, 100);
  r = upgrade_raw(&f, "tailscale-control-protocol", short100, &len);
  TC_CHECK(tc_str_has_prefix(r, "HTTP/1.1 101 "));
  char *end = strstr(r, "\r\n\r\n");
  TC_REQUIRE(end);
  const uint8_t *ef = (const uint8_t *)end + 4;
  size_t eflen = len - (size_t)((const char *)ef - r);
  TC_CHECK(eflen == 3 + 31);
  TC_CHECK(ef[0] == TC_TS_MSG_ERROR && ef[1] == 0 && ef[2] == 31);
  TC_CHECK(eflen >= 34 && !memcmp(ef + 3, "wrong handshake initiation size", 31));
  free(r);
  free(short100);

  /* Corrupted tag: 101, no Noise response, closed. */
  init[100] ^= 1;
  char *badtag = b64(init, sizeof init);
  init[100] ^= 1;
  r = upgrade_raw(&f, "tailscale-control-protocol", badtag, &len);
  TC_CHECK(tc_str_has_prefix(r, "HTTP/1.1 101 "));
  end = strstr(r, "\r\n\r\n");
  TC_CHECK(end && (size_t)(end + 4 - r) == len); /* nothing after the head */
  free(r);
  free(badtag);

  /* The good one works raw, too: 101 + exactly 51 bytes of response. */
  r = upgrade_raw(&f, "tailscale-control-protocol", good, &len);
  end = strstr(r, "\r\n\r\n");
  TC_CHECK(tc_str_has_prefix(r, "HTTP/1.1 101 Switching Protocols\r\n"));
  TC_CHECK(strstr(r, "\r\nUpgrade: tailscale-control-protocol\r\n") != NULL);
  TC_CHECK(end && (uint8_t)end[4] == TC_TS_MSG_RESPONSE && (uint8_t)end[6] == 48);
  free(r);
  free(good);
  TC_CHECK(healthy(&f));
  struct tc_ctl_stats s;
  tc_ctl_server_stats(f.srv, &s);
  TC_CHECK_INT(s.handshakes_failed, 2);
  TC_CHECK(conns_drain(&f, 10000));
  fx_stop(&f);
}

TC_TEST(hostile_records) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  struct tc_tclient *c;

  /* Wrong record type. */
  c = client(&f, 138);
  TC_REQUIRE(c);
  TC_CHECK_INT(tc_tclient_send_raw(c, "\x02\x00\x10xxxxxxxxxxxxxxxx", 19), 0);
  TC_CHECK(closed_within(c, 10000));
  tc_tclient_free(c);
  TC_CHECK(healthy(&f));

  /* Oversized length field (4094 bytes of ciphertext). */
  c = client(&f, 138);
  TC_REQUIRE(c);
  TC_CHECK_INT(tc_tclient_send_raw(c, "\x04\x0f\xfe", 3), 0);
  TC_CHECK(closed_within(c, 10000));
  tc_tclient_free(c);

  /* Garbled ciphertext: authentication fails. */
  c = client(&f, 138);
  TC_REQUIRE(c);
  uint8_t junk[3 + 40] = {4, 0, 40};
  for (int i = 3; i < 43; i++) junk[i] = (uint8_t)i;
  TC_CHECK_INT(tc_tclient_send_raw(c, junk, sizeof junk), 0);
  TC_CHECK(closed_within(c, 10000));
  tc_tclient_free(c);
  TC_CHECK(healthy(&f));

  /* HTTP/2 garbage inside valid records: DATA on stream 0. */
  c = client(&f, 138);
  TC_REQUIRE(c);
  TC_CHECK_INT(tc_tclient_send_plain(c, "\x00\x00\x04\x00\x00\x00\x00\x00\x00" "abcd", 13), 0);
  TC_CHECK(closed_within(c, 10000));
  tc_tclient_free(c);
  TC_CHECK(healthy(&f));
  TC_CHECK(conns_drain(&f, 10000));
  fx_stop(&f);
}

/* Random bytes in every position a peer controls: after the handshake (raw
 * and inside valid records), and as the initiation itself. */
TC_TEST(hostile_random_input) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  uint8_t junk[3000];
  for (int round = 0; round < 20; round++) {
    tc_random(junk, sizeof junk);
    struct tc_tclient *c = client(&f, 138);
    TC_REQUIRE(c);
    if (round % 3 == 0) {
      junk[0] = (uint8_t)(junk[0] == 4 ? 5 : junk[0]); /* not a record: fatal at once */
      tc_tclient_send_raw(c, junk, sizeof junk);
      TC_CHECK(closed_within(c, 10000));
    } else if (round % 3 == 1) {
      junk[0] = 4; /* a complete record with a random body: authentication fails */
      size_t clen = 16 + junk[1] % 2000;
      junk[1] = (uint8_t)(clen >> 8);
      junk[2] = (uint8_t)clen;
      tc_tclient_send_raw(c, junk, 3 + clen);
      TC_CHECK(closed_within(c, 10000));
    } else {
      /* Authentic records, garbage HTTP/2: a random frame may just be
       * ignored or await more bytes, so only survival is required here
       * (and the connection must go away with the client, see below). */
      tc_tclient_send_plain(c, junk, sizeof junk);
      tc_tclient_pump(c, 100);
    }
    tc_tclient_free(c);
  }
  for (int round = 0; round < 10; round++) {
    uint8_t init[TC_TS_INIT_LEN];
    tc_random(init, sizeof init);
    if (round % 2) {
      init[2] = 1; /* right type and length, random keys and tags */
      init[3] = 0;
      init[4] = 96;
    }
    char *hs = b64(init, sizeof init);
    size_t len;
    char *r = upgrade_raw(&f, "tailscale-control-protocol", hs, &len);
    TC_CHECK(tc_str_has_prefix(r, "HTTP/1.1 101 "));
    char *end = strstr(r, "\r\n\r\n");
    /* Either an error frame (bad header) or nothing (bad crypto); never a response. */
    TC_CHECK(end && (end + 4 == r + len || (uint8_t)end[4] == TC_TS_MSG_ERROR));
    free(r);
    free(hs);
  }
  TC_CHECK(healthy(&f));
  TC_CHECK(conns_drain(&f, 10000));
  fx_stop(&f);
}

TC_TEST(hostile_http2_limits) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  /* Body over 1 MiB: 413, connection survives. */
  size_t n = TC_CTL_BODY_MAX + 1000;
  char *big = tc_xcalloc(1, n);
  int status;
  char *body = NULL;
  tc_tclient_request(c, "POST", "/echo", big, n, 10000, &status, &body, NULL);
  TC_CHECK_INT(status, 413);
  free(body);
  body = NULL;
  TC_CHECK_INT(tc_tclient_request(c, "POST", "/echo", "still", 5, 5000, &status, &body, NULL), 0);
  TC_CHECK_STR(body, "still");
  free(body);
  free(big);

  /* Huge headers: the connection is dropped. */
  char *huge = tc_xmalloc(20001);
  memset(huge, 'h', 20000);
  huge[20000] = 0;
  const char *extra[] = {"x-huge", huge, NULL};
  int32_t sid = tc_tclient_submit_hdrs(c, "POST", "/echo", extra, "a", 1);
  TC_CHECK(sid > 0);
  TC_CHECK(closed_within(c, 10000));
  free(huge);
  tc_tclient_free(c);
  TC_CHECK(healthy(&f));

  /* Many small headers beyond the count limit. */
  c = client(&f, 138);
  TC_REQUIRE(c);
  const char *many[2 * 60 + 1];
  char names[60][16];
  for (int i = 0; i < 60; i++) {
    snprintf(names[i], sizeof names[i], "x-h%d", i);
    many[2 * i] = names[i];
    many[2 * i + 1] = "v";
  }
  many[120] = NULL;
  sid = tc_tclient_submit_hdrs(c, "POST", "/echo", many, "a", 1);
  TC_CHECK(sid > 0);
  TC_CHECK_INT(tc_tclient_wait_closed(c, sid, 5000), 0); /* 60 + content-length is within 64 */
  tc_tclient_free(c);

  /* Stream flood beyond MAX_CONCURRENT_STREAMS, sent before the client has
   * seen the server's SETTINGS. */
  struct tc_tclient_opts o = {.version = 138, .server_pub = f.pub, .ignore_stream_limit = true};
  struct tc_err err;
  TC_REQUIRE(tc_tclient_connect("127.0.0.1", f.port, &o, &c, &err) == 0);
  int32_t ids[250];
  int sent = 0;
  for (int i = 0; i < 250; i++) {
    ids[i] = tc_tclient_submit(c, "POST", "/block", NULL, NULL, 0);
    if (ids[i] > 0) sent++;
  }
  TC_CHECK_INT(sent, 250);
  /* Handlers block, so nothing completes and frees a slot: exactly the
   * streams beyond the limit are refused. */
  int refused = 0;
  int64_t deadline = tc_mono_ms() + 10000;
  while (refused < 250 - TC_CTL_MAX_STREAMS && tc_mono_ms() < deadline) {
    tc_tclient_pump(c, 50);
    refused = 0;
    for (int i = 0; i < 250; i++) refused += tc_tclient_wait_closed(c, ids[i], 0) == TC_EIO;
  }
  fprintf(stderr, "  flood: %d refused\n", refused);
  TC_CHECK_INT(refused, 250 - TC_CTL_MAX_STREAMS);
  pthread_mutex_lock(&g.mu);
  g.released = 1;
  pthread_cond_broadcast(&g.cv);
  pthread_mutex_unlock(&g.mu);
  int ok = 0;
  for (int i = 0; i < 250; i++) ok += tc_tclient_wait_closed(c, ids[i], 20000) == 0;
  TC_CHECK_INT(ok, TC_CTL_MAX_STREAMS);
  tc_tclient_free(c);
  TC_CHECK(healthy(&f));
  TC_CHECK(conns_drain(&f, 10000));
  fx_stop(&f);
}

TC_TEST(slow_reader_is_cut_off) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  int32_t sid = tc_tclient_submit(c, "POST", "/flood", NULL, NULL, 0);
  TC_REQUIRE(sid > 0);
  /* Do not read: the server's queue for this connection fills up. */
  int64_t deadline = tc_mono_ms() + 20000;
  pthread_mutex_lock(&g.mu);
  while (!g.flood_done && tc_mono_ms() < deadline) {
    pthread_mutex_unlock(&g.mu);
    usleep(5000);
    pthread_mutex_lock(&g.mu);
  }
  bool done = g.flood_done;
  int rc = g.flood_rc;
  pthread_mutex_unlock(&g.mu);
  TC_CHECK(done);
  TC_CHECK_INT(rc, TC_ETOOBIG);
  /* Now reading: the stream was reset, the connection still works. */
  tc_tclient_wait_closed(c, sid, 20000);
  TC_CHECK(tc_tclient_stream_error(c, sid) != 0);
  int status;
  char *body = NULL;
  TC_CHECK_INT(tc_tclient_request(c, "POST", "/echo", "alive", 5, 10000, &status, &body, NULL), 0);
  TC_CHECK_STR(body, "alive");
  free(body);
  tc_tclient_free(c);
  fx_stop(&f);
}

TC_TEST(stop_with_open_streams) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  int32_t blk = tc_tclient_submit(c, "POST", "/block", NULL, "{}", 2);
  int32_t hold = tc_tclient_submit(c, "POST", "/hold", NULL, "{}", 2);
  TC_CHECK(blk > 0);
  TC_CHECK_INT(tc_tclient_wait_headers(c, hold, 5000), 200);
  wait_for(&g.blocked, 1, 15000);
  tc_tlistener_stop(f.lis);
  tc_ctl_server_stop(f.srv); /* cancels both; the blocked handler returns */
  TC_CHECK_INT(g.cancels, 2);
  TC_CHECK(closed_within(c, 10000));
  TC_CHECK(tc_tclient_goaway(c)); /* a clean goodbye, not just a dropped socket */
  TC_CHECK(g.held && tc_ctl_stream_cancelled(g.held));
  tc_ctl_stream_end(g.held); /* outlives the server as memory */
  tc_tclient_free(c);
}

static char *early(void *ctx, const uint8_t mk[32], uint16_t version) {
  uint8_t chal[32], priv[32];
  tc_x25519_keygen(priv, chal);
  char txt[TC_KEY_TEXT_MAX];
  return tc_xasprintf("{\"nodeKeyChallenge\":\"%s\",\"v\":%u}", tc_key_format(TC_KEY_CHALLENGE, chal, txt),
                      version);
}

TC_TEST(early_payload_and_any_version) {
  struct fx f;
  struct tc_ctl_server_opts o = {.workers = 2, .early_payload = early};
  TC_REQUIRE(fx_start_opts(&f, &o) == 0);
  /* Versions are not judged at this layer: 9999 handshakes fine. */
  struct tc_tclient *c = client(&f, 9999);
  TC_REQUIRE(c);
  int status;
  char *body = NULL;
  TC_CHECK_INT(tc_tclient_request(c, "POST", "/whoami", NULL, 0, 5000, &status, &body, NULL), 0);
  TC_CHECK(body && strstr(body, " 9999 POST ") != NULL);
  free(body);
  const char *ej = tc_tclient_early_json(c);
  TC_CHECK(ej && tc_str_has_prefix(ej, "{\"nodeKeyChallenge\":\"chalpub:"));
  TC_CHECK(ej && strstr(ej, "\"v\":9999}") != NULL);
  TC_CHECK(tc_tclient_first_frame_settings(c)); /* SETTINGS right after the payload */
  tc_tclient_free(c);
  fx_stop(&f);
}

TC_TEST(idle_connections_get_goaway) {
  struct fx f;
  struct tc_ctl_server_opts o = {.workers = 2, .idle_timeout_ms = 300};
  TC_REQUIRE(fx_start_opts(&f, &o) == 0);
  /* Busy: a held stream keeps the connection however quiet it is. */
  struct tc_tclient *busy = client(&f, 138);
  TC_REQUIRE(busy);
  int32_t hold = tc_tclient_submit(busy, "POST", "/hold", NULL, "{}", 2);
  TC_CHECK_INT(tc_tclient_wait_headers(busy, hold, 10000), 200);
  /* Idle: one request, then silence. */
  struct tc_tclient *idle = client(&f, 138);
  TC_REQUIRE(idle);
  int status;
  char *body = NULL;
  /* t0 before the request: the server's idle clock starts at the request's
   * last byte, which a loaded machine may deliver the response for much
   * later (t0 after the response made the lower bound below flaky) */
  int64_t t0 = tc_mono_ms();
  TC_CHECK_INT(tc_tclient_request(idle, "POST", "/echo", "x", 1, 10000, &status, &body, NULL), 0);
  free(body);
  TC_CHECK(closed_within(idle, 10000));
  TC_CHECK(tc_mono_ms() - t0 >= 250);
  TC_CHECK(tc_tclient_goaway(idle));
  tc_tclient_free(idle);
  TC_CHECK(tc_tclient_pump(busy, 500) == 0); /* still open */
  TC_CHECK(!tc_tclient_closed(busy));
  pthread_mutex_lock(&g.mu);
  struct tc_ctl_stream *held = g.held;
  pthread_mutex_unlock(&g.mu);
  TC_REQUIRE(held);
  tc_ctl_stream_end(held);
  tc_tclient_free(busy);
  TC_CHECK(conns_drain(&f, 10000));
  fx_stop(&f);
}

TC_TEST(connection_limit) {
  struct fx f;
  struct tc_ctl_server_opts o = {.workers = 2, .max_conns = 2};
  TC_REQUIRE(fx_start_opts(&f, &o) == 0);
  struct tc_tclient *a = client(&f, 138), *b = client(&f, 138);
  TC_REQUIRE(a && b);
  /* A third is refused with 503 before any Noise byte. */
  uint8_t mpriv[32], init[TC_TS_INIT_LEN];
  tc_random(mpriv, 32);
  struct tc_noise_hs hs;
  TC_REQUIRE(tc_ts_client_initiate(&hs, 138, mpriv, f.pub, NULL, init) == 0);
  tc_noise_hs_wipe(&hs);
  char *good = b64(init, sizeof init);
  size_t len;
  char *r = upgrade_raw(&f, "tailscale-control-protocol", good, &len);
  TC_CHECK(tc_str_has_prefix(r, "HTTP/1.1 503 "));
  free(r);
  /* Refusals (400) do not leak slots. */
  for (int i = 0; i < 5; i++) {
    tc_tclient_free(b);
    b = NULL;
    TC_CHECK(conns_drain_to(&f, 1, 10000));
    r = upgrade_raw(&f, "nope", good, &len);
    TC_CHECK(tc_str_has_prefix(r, "HTTP/1.1 400 "));
    free(r);
    b = client(&f, 138);
    TC_CHECK(b != NULL);
    if (!b) break;
  }
  int status;
  char *body = NULL;
  TC_CHECK_INT(tc_tclient_request(a, "POST", "/echo", "a", 1, 10000, &status, &body, NULL), 0);
  free(body);
  tc_tclient_free(a);
  tc_tclient_free(b);
  free(good);
  TC_CHECK(conns_drain(&f, 10000)); /* the slots come back as the server sees the closes */
  TC_CHECK(healthy(&f));
  fx_stop(&f);
}

TC_TEST(bad_preface_and_silent_clients_are_closed) {
  struct fx f;
  struct tc_ctl_server_opts o = {.workers = 2, .first_request_timeout_ms = 300};
  TC_REQUIRE(fx_start_opts(&f, &o) == 0);
  struct tc_tclient_opts co = {.version = 138, .server_pub = f.pub, .no_http2 = true};
  struct tc_tclient *c = NULL;
  struct tc_err err;
  /* HTTP/1 instead of the HTTP/2 preface. */
  TC_REQUIRE(tc_tclient_connect("127.0.0.1", f.port, &co, &c, &err) == 0);
  TC_CHECK_INT(tc_tclient_send_plain(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27), 0);
  TC_CHECK(closed_within(c, 10000));
  tc_tclient_free(c);
  /* Says nothing at all after the handshake. t0 before connecting: the
   * server's clock starts at accept, and the handshake may take a while on
   * a loaded machine. */
  int64_t t0 = tc_mono_ms();
  TC_REQUIRE(tc_tclient_connect("127.0.0.1", f.port, &co, &c, &err) == 0);
  TC_CHECK(closed_within(c, 10000));
  TC_CHECK(tc_mono_ms() - t0 >= 200);
  tc_tclient_free(c);
  TC_CHECK(healthy(&f));
  TC_CHECK(conns_drain(&f, 10000));
  fx_stop(&f);
}

TC_TEST(rapid_reset_flood) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  struct tc_tclient *c = client(&f, 138);
  TC_REQUIRE(c);
  int opened = 0;
  for (int i = 0; i < 2000; i++) {
    int32_t sid = tc_tclient_submit(c, "POST", "/sleep?ms=5", NULL, NULL, 0);
    if (sid < 0) break;
    opened++;
    if (tc_tclient_reset(c, sid)) break;
  }
  TC_CHECK(opened > 100);
  /* Either the server kept up or it dropped the connection; both are fine,
   * as long as it is still serving others. */
  tc_tclient_pump(c, 200);
  tc_tclient_free(c);
  TC_CHECK(healthy(&f));
  TC_CHECK(conns_drain(&f, 10000)); /* the flooding connection is gone, nothing leaks */
  fx_stop(&f);
}

/* Many clients in parallel, each mixing requests and streams. */
struct par_arg {
  struct fx *f;
  int ok;
};

static void *par_main(void *arg) {
  struct par_arg *a = arg;
  struct tc_tclient *c = client(a->f, 138);
  if (!c) return NULL;
  for (int i = 0; i < 30; i++) {
    char msg[32];
    int n = snprintf(msg, sizeof msg, "msg-%d", i);
    int32_t e = tc_tclient_submit(c, "POST", "/echo", NULL, msg, (size_t)n);
    int32_t s = tc_tclient_submit(c, "POST", "/stream?n=2", NULL, "{}", 2);
    size_t len;
    char *js = NULL;
    bool good = tc_tclient_wait_closed(c, e, 10000) == 0;
    const char *b = tc_tclient_body(c, e, &len);
    good = good && len == (size_t)n && !memcmp(b, msg, len);
    for (int k = 0; k < 2 && good; k++) {
      good = tc_tclient_map_next(c, s, 10000, &js, &len) == 0;
      free(js);
      js = NULL;
    }
    if (good) a->ok++;
    tc_tclient_forget(c, e);
    tc_tclient_forget(c, s); /* closed, or reset if the server were slow */
  }
  tc_tclient_free(c);
  return NULL;
}

TC_TEST(parallel_clients) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  pthread_t th[8];
  struct par_arg args[8];
  for (int i = 0; i < 8; i++) {
    args[i] = (struct par_arg){&f, 0};
    pthread_create(&th[i], NULL, par_main, &args[i]);
  }
  int total = 0;
  for (int i = 0; i < 8; i++) {
    pthread_join(th[i], NULL);
    total += args[i].ok;
  }
  TC_CHECK_INT(total, 8 * 30);
  struct tc_ctl_stats s;
  tc_ctl_server_stats(f.srv, &s);
  TC_CHECK_INT(s.conns_total, 8);
  TC_CHECK(conns_drain(&f, 10000));
  fx_stop(&f);
}

/* ---- the WebSocket variant ---------------------------------------------------------- */
static struct tc_tclient *ws_client(struct fx *f, const char *proto, struct tc_err *err) {
  struct tc_tclient_opts o = {.version = 138, .server_pub = f->pub, .websocket = true, .ws_protocol = proto};
  struct tc_tclient *c = NULL;
  if (tc_tclient_connect("127.0.0.1", f->port, &o, &c, err)) return NULL;
  return c;
}

TC_TEST(websocket_variant) {
  struct fx f;
  struct tc_ctl_server_opts o = {.workers = 2, .early_payload = early};
  TC_REQUIRE(fx_start_opts(&f, &o) == 0);
  struct tc_err err = {0};
  struct tc_tclient *c = ws_client(&f, NULL, &err);
  if (!c) fprintf(stderr, "  ws connect: %s\n", err.msg);
  TC_REQUIRE(c);
  int status;
  char *body = NULL;
  TC_CHECK_INT(tc_tclient_request(c, "POST", "/echo", "over-ws", 7, 5000, &status, &body, NULL), 0);
  TC_CHECK_STR(body, "over-ws");
  free(body);
  TC_CHECK(tc_tclient_early_json(c) == NULL); /* none on this path */
  TC_CHECK(tc_tclient_first_frame_settings(c));
  int32_t sid = tc_tclient_submit(c, "POST", "/stream?n=3", NULL, "{}", 2);
  for (int i = 0; i < 3; i++) {
    char *js = NULL;
    size_t len;
    TC_CHECK_INT(tc_tclient_map_next(c, sid, 5000, &js, &len), 0);
    free(js);
  }
  size_t blen = 0;
  TC_CHECK_INT(tc_tclient_request(c, "GET", "/big?n=500000", NULL, 0, 10000, &status, &body, &blen), 0);
  TC_CHECK_INT(blen, 500000);
  free(body);
  TC_CHECK(tc_tclient_max_record(c) <= TC_TS_MAX_MSG);
  /* An empty record and a client ping frame in between are fine. */
  TC_CHECK_INT(tc_tclient_send_record(c, "", 0), 0);
  TC_CHECK_INT(tc_tclient_send_wire(c, "\x89\x80\x00\x00\x00\x00", 6), 0); /* masked empty ping */
  TC_CHECK_INT(tc_tclient_request(c, "POST", "/echo", "again", 5, 5000, &status, &body, NULL), 0);
  TC_CHECK_STR(body, "again");
  free(body);
  /* An unmasked client frame is a protocol violation. */
  TC_CHECK_INT(tc_tclient_send_wire(c, "\x82\x03" "abc", 5), 0);
  TC_CHECK(closed_within(c, 10000));
  tc_tclient_free(c);

  /* A close frame from the client is answered and the connection ends. */
  c = ws_client(&f, NULL, &err);
  TC_REQUIRE(c);
  TC_CHECK_INT(tc_tclient_send_wire(c, "\x88\x82\x00\x00\x00\x00\x03\xe8", 8), 0);
  TC_CHECK(closed_within(c, 10000));
  tc_tclient_free(c);

  /* No subprotocol: upgraded, then closed with 1008 before any Noise byte. */
  c = ws_client(&f, "", &err);
  TC_CHECK(c == NULL);
  tc_tclient_free(c);
  TC_CHECK(healthy(&f));
  TC_CHECK(conns_drain(&f, 10000));
  fx_stop(&f);
}

TC_TEST(websocket_refusals_raw) {
  struct fx f;
  TC_REQUIRE(fx_start(&f) == 0);
  size_t len;
  /* No subprotocol offered: 101 without Sec-WebSocket-Protocol, close 1008. */
  const char *req1 = "GET /ts2021?X-Tailscale-Handshake=AAAA HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n";
  char *r = tc_traw_exchange(f.port, req1, strlen(req1), 10000, &len);
  TC_CHECK(tc_str_has_prefix(r, "HTTP/1.1 101 "));
  TC_CHECK(strstr(r, "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n") != NULL); /* RFC 6455 example */
  TC_CHECK(strstr(r, "Sec-WebSocket-Protocol") == NULL);
  char *end = strstr(r, "\r\n\r\n");
  TC_REQUIRE(end);
  const uint8_t *fr = (const uint8_t *)end + 4;
  TC_CHECK(fr[0] == 0x88 && fr[2] == 0x03 && fr[3] == 0xf0);
  TC_CHECK(memmem(fr, len - (size_t)((const char *)fr - r), "control subprotocol", 19) != NULL);
  free(r);
  /* Subprotocol but no handshake parameter. */
  const char *req2 = "GET /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Protocol: tailscale-control-protocol\r\n\r\n";
  r = tc_traw_exchange(f.port, req2, strlen(req2), 10000, &len);
  TC_CHECK(strstr(r, "Sec-WebSocket-Protocol: tailscale-control-protocol\r\n") != NULL);
  TC_CHECK(memmem(r, len, "missing Tailscale handshake parameter", 37) != NULL);
  free(r);
  /* Broken base64 in the parameter. */
  const char *req3 = "GET /ts2021?X-Tailscale-Handshake=%%%zz HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tailscale-control-protocol\r\n\r\n";
  r = tc_traw_exchange(f.port, req3, strlen(req3), 10000, &len);
  TC_CHECK(memmem(r, len, "missing Tailscale handshake parameter", 37) != NULL);
  free(r);
  const char *req4 = "GET /ts2021?X-Tailscale-Handshake=AB!C HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tailscale-control-protocol\r\n\r\n";
  r = tc_traw_exchange(f.port, req4, strlen(req4), 10000, &len);
  TC_CHECK(memmem(r, len, "invalid tailscale handshake parameter", 37) != NULL);
  free(r);
  /* Not a valid WebSocket request at all. */
  const char *req5 = "GET /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n";
  r = tc_traw_exchange(f.port, req5, strlen(req5), 10000, &len);
  TC_CHECK(tc_str_has_prefix(r, "HTTP/1.1 400 "));
  free(r);
  TC_CHECK(healthy(&f));
  TC_CHECK(conns_drain(&f, 10000));
  fx_stop(&f);
}

__attribute__((constructor)) static void init_crypto(void) {
  if (tc_crypto_init()) abort();
}
