/* test_tls: TLS termination over real loopback sockets — certificate chains
 * generated at test time, verification by an mbedTLS client, echo through
 * the plaintext socketpair, reload, timeouts and garbage input. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/base.h"
#include "tc_test.h"
#include "tls/tls.h"
#include "tls_testutil.h"

static atomic_int g_delivered;

__attribute__((constructor)) static void ignore_sigpipe(void) { signal(SIGPIPE, SIG_IGN); }
static char g_last_peer[64];
static pthread_mutex_t g_peer_mu = PTHREAD_MUTEX_INITIALIZER;

static void last_peer(char out[64]) {
  pthread_mutex_lock(&g_peer_mu);
  memcpy(out, g_last_peer, 64);
  pthread_mutex_unlock(&g_peer_mu);
}

static void *echo_thread(void *arg) {
  int fd = (int)(intptr_t)arg;
  char buf[8192];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) break;
    if (n == 5 && !memcmp(buf, "QUIT\n", 5)) break; /* server-initiated close */
    ssize_t off = 0;
    while (off < n) {
      ssize_t w = send(fd, buf + off, (size_t)(n - off), MSG_NOSIGNAL);
      if (w <= 0) goto done;
      off += w;
    }
  }
done:
  close(fd);
  return NULL;
}

static void deliver_echo(void *ctx, int fd, const char *peer) {
  atomic_fetch_add(&g_delivered, 1);
  pthread_mutex_lock(&g_peer_mu);
  snprintf(g_last_peer, sizeof g_last_peer, "%s", peer);
  pthread_mutex_unlock(&g_peer_mu);
  pthread_t th;
  pthread_create(&th, NULL, echo_thread, (void *)(intptr_t)fd);
  pthread_detach(th);
}

struct fixture {
  char *dir, *ca, *chain, *key;
  struct tc_tls *tls;
  int port;
};

static int g_threads = 0;

static int fixture_start(struct fixture *f, int hs_timeout_ms) {
  memset(f, 0, sizeof *f);
  f->dir = tc_test_tmpdir();
  if (tt_make_chain(f->dir, "a", "localhost", &f->ca, &f->chain, &f->key)) return -1;
  struct tc_tls_params p = {.cert_path = f->chain, .key_path = f->key, .deliver = deliver_echo,
                            .handshake_timeout_ms = hs_timeout_ms, .threads = g_threads};
  struct tc_err err = {0};
  if (tc_tls_new(&p, &f->tls, &err)) {
    fprintf(stderr, "tc_tls_new: %s\n", err.msg);
    return -1;
  }
  int lfd = tc_tls_listen_tcp("127.0.0.1:0", &f->port, &err);
  if (lfd < 0) return -1;
  return tc_tls_add_listener(f->tls, lfd, &err);
}

static void fixture_stop(struct fixture *f) {
  tc_tls_free(f->tls);
  free(f->ca);
  free(f->chain);
  free(f->key);
  free(f->dir);
}

static int raw_connect(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* Waits up to ms for the peer to close fd; returns true if it did. */
static bool closed_within(int fd, int ms) {
  int64_t end = tc_mono_ms() + ms;
  char buf[4096];
  while (tc_mono_ms() < end) {
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    if (poll(&pfd, 1, 50) == 1) {
      ssize_t n = read(fd, buf, sizeof buf);
      if (n == 0 || (n < 0 && errno == ECONNRESET)) return true;
    }
  }
  return false;
}

TC_TEST(chain_verifies_and_echoes) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 0) == 0);
  struct tt_client c;
  int rc = tt_client_connect(&c, f.port, f.ca, "localhost");
  TC_CHECK_INT(rc, 0);
  TC_CHECK_INT(c.verify_flags, 0);
  /* Only TLS 1.2+ with an AEAD suite may be negotiated. */
  const char *suite = mbedtls_ssl_get_ciphersuite(&c.ssl);
  TC_CHECK(suite && (strstr(suite, "GCM") || strstr(suite, "CHACHA20")));
  TC_CHECK(suite && strstr(suite, "ECDHE"));
  const char *ver = mbedtls_ssl_get_version(&c.ssl);
  TC_CHECK(ver && (!strcmp(ver, "TLSv1.2") || !strcmp(ver, "TLSv1.3")));
  /* 1 MiB round trip exercises backpressure through the bounded buffers. */
  size_t n = 1 << 20;
  unsigned char *out = malloc(n), *in = malloc(n);
  for (size_t i = 0; i < n; i++) out[i] = (unsigned char)(i * 7 + (i >> 9));
  size_t sent = 0, got = 0;
  while (got < n) {
    if (sent < n) {
      size_t chunk = TC_MIN((size_t)65536, n - sent);
      TC_REQUIRE(tt_client_write(&c, out + sent, chunk) == 0);
      sent += chunk;
    }
    while (got < sent) {
      int r = tt_client_read_some(&c, in + got, sent - got);
      TC_REQUIRE(r > 0);
      got += (size_t)r;
    }
  }
  TC_CHECK(memcmp(in, out, n) == 0);
  char lp[64];
  last_peer(lp);
  TC_CHECK(tc_str_has_prefix(lp, "127.0.0.1:"));
  /* The plaintext side closing ends the TLS connection with close_notify. */
  TC_REQUIRE(tt_client_write(&c, "QUIT\n", 5) == 0);
  char b;
  TC_CHECK_INT(tt_client_read_some(&c, &b, 1), 0);
  tt_client_close(&c);
  struct tc_tls_stats st;
  tc_tls_get_stats(f.tls, &st);
  TC_CHECK(st.handshakes_ok >= 1);
  TC_CHECK(st.bytes_in >= n);
  TC_CHECK(st.bytes_out >= n);
  free(out);
  free(in);
  fixture_stop(&f);
}

TC_TEST(wrong_ca_and_wrong_name_are_rejected_by_client) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 0) == 0);
  char *ca2, *chain2, *key2;
  TC_REQUIRE(tt_make_chain(f.dir, "other", "localhost", &ca2, &chain2, &key2) == 0);
  struct tt_client c;
  TC_CHECK(tt_client_connect(&c, f.port, ca2, "localhost") != 0);
  tt_client_close(&c);
  TC_CHECK(tt_client_connect(&c, f.port, f.ca, "not-localhost.example") != 0);
  tt_client_close(&c);
  free(ca2);
  free(chain2);
  free(key2);
  fixture_stop(&f);
}

static void copy_file(const char *from, const char *to) {
  char *data;
  size_t len;
  struct tc_err err;
  if (tc_read_file(from, 1 << 20, &data, &len, &err) == 0) {
    tc_write_file_atomic(to, data, len, 0600, &err);
    free(data);
  }
}

TC_TEST(reload_switches_new_connections_only) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 0) == 0);
  struct tt_client old;
  TC_REQUIRE(tt_client_connect(&old, f.port, f.ca, "localhost") == 0);
  char *ca2, *chain2, *key2;
  TC_REQUIRE(tt_make_chain(f.dir, "b", "localhost", &ca2, &chain2, &key2) == 0);
  copy_file(chain2, f.chain);
  copy_file(key2, f.key);
  struct tc_err err = {0};
  TC_CHECK_INT(tc_tls_reload(f.tls, &err), 0);
  struct tt_client c;
  TC_CHECK_INT(tt_client_connect(&c, f.port, ca2, "localhost"), 0);
  TC_CHECK(tt_client_write(&c, "hi", 2) == 0);
  char buf[2];
  TC_CHECK(tt_client_read(&c, buf, 2) == 0 && !memcmp(buf, "hi", 2));
  tt_client_close(&c);
  TC_CHECK(tt_client_connect(&c, f.port, f.ca, "localhost") != 0);
  tt_client_close(&c);
  /* the established connection keeps its certificate and keeps working */
  TC_CHECK(tt_client_write(&old, "ok", 2) == 0);
  TC_CHECK(tt_client_read(&old, buf, 2) == 0 && !memcmp(buf, "ok", 2));
  tt_client_close(&old);
  /* a broken file fails the reload and keeps the last good certificate */
  TC_REQUIRE(tc_write_file_atomic(f.chain, "garbage", 7, 0600, &err) == 0);
  TC_CHECK(tc_tls_reload(f.tls, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "certificate") != NULL);
  TC_CHECK_INT(tt_client_connect(&c, f.port, ca2, "localhost"), 0);
  tt_client_close(&c);
  struct tc_tls_stats st;
  tc_tls_get_stats(f.tls, &st);
  TC_CHECK_INT(st.reloads, 1);
  free(ca2);
  free(chain2);
  free(key2);
  fixture_stop(&f);
}

TC_TEST(handshake_timeout_and_garbage_close) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 1000) == 0);
  int delivered = atomic_load(&g_delivered);
  /* t0 before connecting: the server's handshake clock starts at accept */
  int64_t t0 = tc_mono_ms();
  int idle = raw_connect(f.port);
  TC_REQUIRE(idle >= 0);
  TC_CHECK(closed_within(idle, 10000));
  TC_CHECK(tc_mono_ms() - t0 >= 900);
  close(idle);
  int junk = raw_connect(f.port);
  TC_REQUIRE(junk >= 0);
  const char req[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  TC_CHECK(write(junk, req, sizeof req - 1) == (ssize_t)(sizeof req - 1));
  TC_CHECK(closed_within(junk, 3000));
  close(junk);
  struct tc_tls_stats st;
  tc_tls_get_stats(f.tls, &st);
  TC_CHECK(st.handshake_timeouts >= 1);
  TC_CHECK(st.handshakes_failed >= 1);
  TC_CHECK_INT(atomic_load(&g_delivered), delivered);
  /* the server still serves after both */
  struct tt_client c;
  TC_CHECK_INT(tt_client_connect(&c, f.port, f.ca, "localhost"), 0);
  tt_client_close(&c);
  fixture_stop(&f);
}

struct handoff_client {
  int port;
  const char *ca;
  int rc;
  char echoed[8];
};

static void *handoff_client_thread(void *arg) {
  struct handoff_client *h = arg;
  struct tt_client c;
  h->rc = tt_client_connect(&c, h->port, h->ca, "localhost");
  if (h->rc == 0 && tt_client_write(&c, "abcd", 4) == 0) tt_client_read(&c, h->echoed, 4);
  tt_client_close(&c);
  return NULL;
}

TC_TEST(handoff_of_accepted_connection) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 0) == 0);
  struct tc_err err;
  int port;
  int lfd = tc_tls_listen_tcp("127.0.0.1:0", &port, &err);
  TC_REQUIRE(lfd >= 0);
  struct handoff_client h = {.port = port, .ca = f.ca, .rc = -1};
  pthread_t th;
  pthread_create(&th, NULL, handoff_client_thread, &h);
  struct pollfd pfd = {.fd = lfd, .events = POLLIN};
  TC_REQUIRE(poll(&pfd, 1, 5000) == 1);
  int cfd = accept(lfd, NULL, NULL);
  TC_REQUIRE(cfd >= 0);
  TC_CHECK_INT(tc_tls_handoff(f.tls, cfd, "192.0.2.1:1234"), 0);
  pthread_join(th, NULL);
  TC_CHECK_INT(h.rc, 0);
  TC_CHECK(!memcmp(h.echoed, "abcd", 4));
  char lp[64];
  last_peer(lp);
  TC_CHECK_STR(lp, "192.0.2.1:1234");
  close(lfd);
  fixture_stop(&f);
}

TC_TEST(stop_accepting_refuses_new_keeps_established) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 0) == 0);
  struct tt_client c;
  TC_REQUIRE(tt_client_connect(&c, f.port, f.ca, "localhost") == 0);
  tc_tls_stop_accepting(f.tls);
  tc_tls_stop_accepting(f.tls); /* idempotent */
  /* a shut-down listener answers a new SYN with a reset: refused at once,
   * not left waiting in the backlog */
  int64_t t0 = tc_mono_ms();
  int fd = raw_connect(f.port);
  TC_CHECK(fd < 0);
  TC_CHECK(tc_mono_ms() - t0 < 1000);
  if (fd >= 0) close(fd);
  /* the established connection still echoes */
  TC_REQUIRE(tt_client_write(&c, "still here", 10) == 0);
  char buf[16] = {0};
  TC_REQUIRE(tt_client_read(&c, buf, 10) == 0);
  TC_CHECK(!memcmp(buf, "still here", 10));
  tt_client_close(&c);
  tc_tls_stop_accepting(NULL);
  fixture_stop(&f);
}

TC_TEST(bad_parameters) {
  struct tc_err err = {0};
  struct tc_tls *t = NULL;
  struct tc_tls_params p = {.cert_path = "/nonexistent/cert.pem", .key_path = "/nonexistent/key.pem",
                            .deliver = deliver_echo};
  TC_CHECK_INT(tc_tls_new(&p, &t, &err), TC_EINVAL);
  TC_CHECK(t == NULL);
  /* a key that does not belong to the certificate */
  char *dir = tc_test_tmpdir();
  char *ca, *chain, *key, *ca2, *chain2, *key2;
  TC_REQUIRE(tt_make_chain(dir, "x", "localhost", &ca, &chain, &key) == 0);
  TC_REQUIRE(tt_make_chain(dir, "y", "localhost", &ca2, &chain2, &key2) == 0);
  p.cert_path = chain;
  p.key_path = key2;
  TC_CHECK_INT(tc_tls_new(&p, &t, &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "does not match") != NULL);
  p.deliver = NULL;
  TC_CHECK_INT(tc_tls_new(&p, &t, &err), TC_EINVAL);
  TC_CHECK(tc_tls_listen_tcp("nonsense", NULL, &err) < 0);
  int port6 = 0, portany = 0;
  int fd6 = tc_tls_listen_tcp("[::1]:0", &port6, &err);
  TC_CHECK(fd6 >= 0 && port6 > 0);
  int fdany = tc_tls_listen_tcp(":0", &portany, &err);
  TC_CHECK(fdany >= 0 && portany > 0);
  /* nodelay and keepalive for the TCP side of TLS connections: the control
   * transport behind them only sees AF_UNIX pairs */
  TC_CHECK(fdany >= 0 && tc_tcp_tuned(fdany));
  if (fd6 >= 0) close(fd6);
  if (fdany >= 0) close(fdany);
  TC_CHECK(tc_tls_listen_tcp("127.0.0.1:65536", NULL, &err) < 0);
  TC_CHECK(tc_tls_listen_tcp("[::1:0", NULL, &err) < 0);
  TC_CHECK(tc_tls_listen_tcp("example.com:80", NULL, &err) < 0);
  tc_tls_free(NULL);
  free(ca), free(chain), free(key), free(ca2), free(chain2), free(key2), free(dir);
}

struct par_client {
  int port;
  const char *ca;
  int ok;
};

static void *par_client_thread(void *arg) {
  struct par_client *pc = arg;
  struct tt_client c;
  if (tt_client_connect(&c, pc->port, pc->ca, "localhost") == 0) {
    unsigned char out[50000], in[50000];
    for (size_t i = 0; i < sizeof out; i++) out[i] = (unsigned char)(i ^ (size_t)pc);
    if (tt_client_write(&c, out, sizeof out) == 0 && tt_client_read(&c, in, sizeof in) == 0 &&
        !memcmp(in, out, sizeof in))
      pc->ok = 1;
  }
  tt_client_close(&c);
  return NULL;
}

TC_TEST(several_threads_share_connections) {
  struct fixture f;
  g_threads = 3;
  int rc = fixture_start(&f, 0);
  g_threads = 0;
  TC_REQUIRE(rc == 0);
  struct par_client pcs[8];
  pthread_t th[8];
  for (int i = 0; i < 8; i++) {
    pcs[i] = (struct par_client){f.port, f.ca, 0};
    pthread_create(&th[i], NULL, par_client_thread, &pcs[i]);
  }
  int ok = 0;
  for (int i = 0; i < 8; i++) {
    pthread_join(th[i], NULL);
    ok += pcs[i].ok;
  }
  TC_CHECK_INT(ok, 8);
  struct tc_err err = {0};
  TC_CHECK_INT(tc_tls_reload(f.tls, &err), 0);
  struct tt_client c;
  TC_CHECK_INT(tt_client_connect(&c, f.port, f.ca, "localhost"), 0);
  tt_client_close(&c);
  /* the server counts a handshake just after sending its Finished, so the
   * client can get there first */
  struct tc_tls_stats st;
  for (int i = 0; i < 3000; i++) { /* <= 30 s on a loaded machine */
    tc_tls_get_stats(f.tls, &st);
    if (st.handshakes_ok >= 9) break;
    usleep(10000);
  }
  TC_CHECK(st.handshakes_ok >= 9);
  TC_CHECK(tc_tls_thread_cpu_ns(f.tls) > 0);
  fixture_stop(&f);
}
