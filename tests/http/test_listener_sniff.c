/* test_listener_sniff: TLS and plain HTTP on one front-door listener. A
 * connection opening with a TLS handshake record (0x16) goes, unread, to the
 * handoff callback; plain requests are routed; the unix socket and
 * connections fed by the TLS module are never sniffed; without a callback a
 * TLS opener is refused at once (not at the head timeout). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "http/http.h"
#include "tc_test.h"

static void echo(void *ctx, const struct tc_http_req *req, struct tc_http_resp *resp) {
  char b[64];
  snprintf(b, sizeof b, "tls=%d", req->tls ? 1 : 0);
  tc_http_resp_text(resp, 200, "text/plain", b, strlen(b));
}

struct sniffed {
  pthread_mutex_t mu;
  int fd;      /* last handed-over fd, -1 if none */
  char peer[64];
  int count;
};

static void on_tls(void *ctx, int fd, const char *peer) {
  struct sniffed *s = ctx;
  pthread_mutex_lock(&s->mu);
  if (s->fd >= 0) close(s->fd);
  s->fd = fd;
  snprintf(s->peer, sizeof s->peer, "%s", peer ? peer : "");
  s->count++;
  pthread_mutex_unlock(&s->mu);
}

static int wait_sniffed(struct sniffed *s, int count) {
  for (int i = 0; i < 300; i++) {
    pthread_mutex_lock(&s->mu);
    int fd = s->count >= count ? s->fd : -1;
    if (fd >= 0) s->fd = -1;
    pthread_mutex_unlock(&s->mu);
    if (fd >= 0) return fd;
    usleep(10 * 1000);
  }
  return -1;
}

static int connect_tcp(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                          .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (connect(fd, (struct sockaddr *)&a, sizeof a)) {
    close(fd);
    return -1;
  }
  struct timeval tv = {.tv_sec = 5};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

static int connect_unix(const char *path) {
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  size_t n = strlen(path);
  if (n >= sizeof a.sun_path) { /* explicit check: -O2 flags snprintf truncation */
    close(fd);
    return -1;
  }
  memcpy(a.sun_path, path, n + 1);
  if (connect(fd, (struct sockaddr *)&a, sizeof a)) {
    close(fd);
    return -1;
  }
  struct timeval tv = {.tv_sec = 5};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

/* Sends req and returns the status of the response (0 if none). */
static int status_after(int fd, const void *req, size_t n, char *body, size_t cap) {
  if (send(fd, req, n, MSG_NOSIGNAL) != (ssize_t)n) return 0;
  char buf[4096];
  size_t have = 0;
  ssize_t r;
  while (have + 1 < sizeof buf && (r = recv(fd, buf + have, sizeof buf - 1 - have, 0)) > 0) {
    have += (size_t)r;
    buf[have] = 0;
    char *e = strstr(buf, "\r\n\r\n");
    if (e && strstr(buf, "Content-Length: ") && strlen(e + 4) >= (size_t)atoi(strstr(buf, "Content-Length: ") + 16))
      break;
  }
  buf[have] = 0;
  if (body) {
    char *e = strstr(buf, "\r\n\r\n");
    snprintf(body, cap, "%s", e ? e + 4 : "");
  }
  return have > 9 && !strncmp(buf, "HTTP/1.", 7) ? atoi(buf + 9) : 0;
}

/* A ClientHello's first bytes: handshake record, TLS 1.0 record version. */
static const unsigned char k_hello[] = {0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00};

TC_TEST(tls_opener_goes_to_handoff_unread_plain_is_routed) {
  struct tc_router *r = tc_router_new();
  tc_http_route(r, "GET", "/echo", echo, NULL);
  char *dir = tc_test_tmpdir();
  char sock[300];
  snprintf(sock, sizeof sock, "%s/s.sock", dir);
  struct tc_frontdoor_opts o = {.listen_addr = "127.0.0.1:0", .unix_socket = sock, .router = r,
                                .head_timeout_ms = 3000};
  struct tc_frontdoor *fdr = NULL;
  struct tc_err err = {0};
  TC_REQUIRE(tc_frontdoor_new(&o, &fdr, &err) == 0);
  struct sniffed s = {.mu = PTHREAD_MUTEX_INITIALIZER, .fd = -1};
  tc_frontdoor_set_tls_handoff(fdr, on_tls, &s);
  TC_REQUIRE(tc_frontdoor_start(fdr, &err) == 0);
  int port = tc_frontdoor_port(fdr);

  /* TLS opener: handed over with every byte still unread */
  int c = connect_tcp(port);
  TC_REQUIRE(c >= 0);
  TC_REQUIRE(send(c, k_hello, sizeof k_hello, 0) == (ssize_t)sizeof k_hello);
  int got = wait_sniffed(&s, 1);
  TC_REQUIRE(got >= 0);
  unsigned char buf[sizeof k_hello];
  size_t have = 0;
  while (have < sizeof buf) {
    ssize_t n = recv(got, buf + have, sizeof buf - have, 0);
    if (n <= 0) break;
    have += (size_t)n;
  }
  TC_CHECK_INT(have, sizeof k_hello);
  TC_CHECK(!memcmp(buf, k_hello, sizeof k_hello));
  TC_CHECK(!strncmp(s.peer, "127.0.0.1:", 10));
  /* the callback owns the fd: what it writes reaches the client */
  TC_CHECK(send(got, "x", 1, MSG_NOSIGNAL) == 1);
  char x = 0;
  TC_CHECK(recv(c, &x, 1, 0) == 1 && x == 'x');
  close(got);
  close(c);

  /* a lone first byte is enough to decide */
  c = connect_tcp(port);
  TC_REQUIRE(send(c, "\x16", 1, 0) == 1);
  got = wait_sniffed(&s, 2);
  TC_CHECK(got >= 0);
  if (got >= 0) close(got);
  close(c);

  /* plain HTTP on the same port */
  char body[128];
  c = connect_tcp(port);
  static const char get[] = "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  TC_CHECK_INT(status_after(c, get, sizeof get - 1, body, sizeof body), 200);
  TC_CHECK_STR(body, "tls=0");
  close(c);

  /* the unix socket is never sniffed: a TLS-looking head is just bad HTTP */
  c = connect_unix(sock);
  TC_REQUIRE(c >= 0);
  static const char bad[] = "\x16\x03\x01 / HTTP/1.1\r\n\r\n";
  TC_CHECK_INT(status_after(c, bad, sizeof bad - 1, NULL, 0), 400);
  close(c);
  /* nor is the plaintext end the TLS module delivers */
  int sv[2];
  TC_REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  TC_REQUIRE(tc_frontdoor_add_connection(fdr, sv[1], NULL, 0, true) == 0);
  struct timeval tv = {.tv_sec = 5};
  setsockopt(sv[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  TC_CHECK_INT(status_after(sv[0], bad, sizeof bad - 1, NULL, 0), 400);
  close(sv[0]);
  pthread_mutex_lock(&s.mu);
  TC_CHECK_INT(s.count, 2);
  pthread_mutex_unlock(&s.mu);

  tc_frontdoor_free(fdr);
  tc_router_free(r);
  rmdir(dir);
  free(dir);
}

TC_TEST(tls_opener_without_handoff_is_refused_at_once) {
  struct tc_router *r = tc_router_new();
  tc_http_route(r, "GET", "/echo", echo, NULL);
  struct tc_frontdoor_opts o = {.listen_addr = "127.0.0.1:0", .router = r, .head_timeout_ms = 10000};
  struct tc_frontdoor *fdr = NULL;
  struct tc_err err = {0};
  TC_REQUIRE(tc_frontdoor_new(&o, &fdr, &err) == 0);
  TC_REQUIRE(tc_frontdoor_start(fdr, &err) == 0);
  int c = connect_tcp(tc_frontdoor_port(fdr));
  int64_t t0 = tc_mono_ms();
  TC_CHECK_INT(status_after(c, k_hello, sizeof k_hello, NULL, 0), 400);
  TC_CHECK(tc_mono_ms() - t0 < 5000); /* long before the 10 s head timeout */
  close(c);
  tc_frontdoor_free(fdr);
  tc_router_free(r);
}
