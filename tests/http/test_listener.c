/* Tests for the router and the front door: real sockets on loopback, a real
 * libmicrohttpd behind the listener, a dummy upgrade handler. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "http/http.h"
#include "http/metrics.h"
#include "tc_test.h"

/* ---- router (no sockets) ------------------------------------------------------ */

static void echo_handler(void *ctx, const struct tc_http_req *req, struct tc_http_resp *resp) {
  json_t *o = json_object();
  json_object_set_new(o, "tag", json_string(ctx));
  json_object_set_new(o, "route", json_string(req->route));
  json_t *params = json_object();
  for (size_t i = 0; i < req->nparams; i++) json_object_set_new(params, req->params[i].name, json_string(req->params[i].value));
  json_object_set_new(o, "params", params);
  json_t *q = json_object();
  for (size_t i = 0; i < req->nquery; i++) json_object_set_new(q, req->query[i].name, json_string(req->query[i].value));
  json_object_set_new(o, "query", q);
  json_object_set_new(o, "body", json_stringn(req->body, req->body_len));
  json_object_set_new(o, "trusted", json_boolean(req->trusted));
  json_object_set_new(o, "tls", json_boolean(req->tls));
  const char *auth = tc_http_header(req, "Authorization");
  json_object_set_new(o, "auth", auth ? json_string(auth) : json_null());
  tc_http_resp_json(resp, 200, o);
}

static struct tc_router *make_router(void) {
  struct tc_router *r = tc_router_new();
  TC_CHECK_INT(tc_http_route(r, "GET", "/api/v1/node/{id}", echo_handler, "node"), 0);
  TC_CHECK_INT(tc_http_route(r, "POST", "/api/v1/node/{id}/expire", echo_handler, "expire"), 0);
  TC_CHECK_INT(tc_http_route(r, "POST", "/api/v1/node/register", echo_handler, "register"), 0);
  TC_CHECK_INT(tc_http_route(r, "POST", "/api/v1/node/{id}", echo_handler, "nodepost"), 0);
  TC_CHECK_INT(tc_http_route(r, "GET", "/static/{rest*}", echo_handler, "static"), 0);
  TC_CHECK_INT(tc_http_route(r, "POST", "/echo", echo_handler, "echo"), 0);
  TC_CHECK_INT(tc_http_route(r, "GET", "/echo", echo_handler, "echo"), 0);
  TC_CHECK_INT(tc_http_route(r, "GET", "/echo", echo_handler, "dup"), TC_EEXIST);
  TC_CHECK_INT(tc_http_route(r, "GET", "/bad/{x", echo_handler, "bad"), TC_EINVAL);
  TC_CHECK_INT(tc_http_route(r, "GET", "/bad/{x*}/y", echo_handler, "bad"), TC_EINVAL);
  return r;
}

static json_t *raw(struct tc_router *r, const char *method, const char *target, const char *body, int *status) {
  struct tc_http_resp resp = {0};
  tc_router_dispatch_raw(r, method, target, body, body ? strlen(body) : 0, true, &resp);
  *status = resp.status;
  json_t *j = json_loadb(resp.body.data ? resp.body.data : "", resp.body.len, 0, NULL);
  tc_http_resp_free(&resp);
  return j;
}

TC_TEST(router_matches_and_captures) {
  struct tc_router *r = make_router();
  int st;
  json_t *j = raw(r, "GET", "/api/v1/node/42", NULL, &st);
  TC_CHECK_INT(st, 200);
  TC_CHECK_STR(json_string_value(json_object_get(j, "tag")), "node");
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(j, "params"), "id")), "42");
  json_decref(j);
  /* a literal segment beats a capture */
  j = raw(r, "POST", "/api/v1/node/register?user=al%20ice&key=a+b", NULL, &st);
  TC_CHECK_INT(st, 200);
  TC_CHECK_STR(json_string_value(json_object_get(j, "tag")), "register");
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(j, "query"), "user")), "al ice");
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(j, "query"), "key")), "a b");
  json_decref(j);
  j = raw(r, "POST", "/api/v1/node/7/expire", "{}", &st);
  TC_CHECK_INT(st, 200);
  TC_CHECK_STR(json_string_value(json_object_get(j, "tag")), "expire");
  TC_CHECK_STR(json_string_value(json_object_get(j, "route")), "/api/v1/node/{id}/expire");
  TC_CHECK_STR(json_string_value(json_object_get(j, "body")), "{}");
  json_decref(j);
  /* HEAD falls back to the GET route */
  j = raw(r, "HEAD", "/api/v1/node/9", NULL, &st);
  TC_CHECK_INT(st, 200);
  TC_CHECK_STR(json_string_value(json_object_get(j, "tag")), "node");
  json_decref(j);
  j = raw(r, "GET", "/static/css/site.css", NULL, &st);
  TC_CHECK_INT(st, 200);
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(j, "params"), "rest")), "css/site.css");
  json_decref(j);
  tc_router_free(r);
}

TC_TEST(router_errors_are_grpc_shaped) {
  struct tc_router *r = make_router();
  int st;
  json_t *j = raw(r, "GET", "/nope", NULL, &st);
  TC_CHECK_INT(st, 404);
  TC_CHECK_INT(json_integer_value(json_object_get(j, "code")), TC_GRPC_NOT_FOUND);
  TC_CHECK(json_is_string(json_object_get(j, "message")));
  TC_CHECK(json_is_array(json_object_get(j, "details")));
  json_decref(j);
  j = raw(r, "DELETE", "/api/v1/node/3/expire", NULL, &st);
  TC_CHECK_INT(st, 405);
  TC_CHECK_INT(json_integer_value(json_object_get(j, "code")), TC_GRPC_UNIMPLEMENTED);
  json_decref(j);
  j = raw(r, "GET", "/api/v1/node/%zz", NULL, &st);
  TC_CHECK_INT(st, 400);
  json_decref(j);
  j = raw(r, "GET", "/api/v1/node/%00", NULL, &st);
  TC_CHECK_INT(st, 400);
  json_decref(j);
  /* too many segments: no route can match */
  j = raw(r, "GET", "/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t", NULL, &st);
  TC_CHECK_INT(st, 404);
  json_decref(j);
  struct tc_http_resp resp = {0};
  tc_http_resp_tc_err(&resp, TC_EEXIST, "user alice exists");
  TC_CHECK_INT(resp.status, 409);
  TC_CHECK(strstr(resp.body.data, "\"code\":6") != NULL);
  tc_http_resp_free(&resp);
  tc_router_free(r);
}

/* ---- front door over real sockets ---------------------------------------------------- */

struct upgrade_seen {
  pthread_mutex_t mu;
  int calls;
  char path[64], query[64], upgrade_hdr[64], peer[64];
  char head[4096];
  size_t head_len;
  char after[64]; /* bytes following the head */
};

static void dummy_upgrade(void *ctx, int fd, const struct tc_http_head *head) {
  struct upgrade_seen *s = ctx;
  pthread_mutex_lock(&s->mu);
  s->calls++;
  snprintf(s->path, sizeof s->path, "%s", head->path);
  snprintf(s->query, sizeof s->query, "%s", head->query);
  const char *u = tc_http_head_get(head, "upgrade");
  snprintf(s->upgrade_hdr, sizeof s->upgrade_hdr, "%s", u ? u : "");
  snprintf(s->peer, sizeof s->peer, "%s", head->peer);
  char val[32];
  if (tc_http_query_get(head, "x", val, sizeof val) >= 0) snprintf(s->query, sizeof s->query, "x=%s", val);
  /* the head is still unread in the socket: read exactly head_len bytes */
  size_t got = 0;
  while (got < head->head_len && got < sizeof s->head) {
    ssize_t n = read(fd, s->head + got, head->head_len - got);
    if (n <= 0) break;
    got += (size_t)n;
  }
  s->head_len = got;
  ssize_t n = read(fd, s->after, 5);
  if (n > 0) s->after[n] = 0;
  pthread_mutex_unlock(&s->mu);
  const char *resp = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: dummy\r\nConnection: Upgrade\r\n\r\nhello";
  if (write(fd, resp, strlen(resp)) < 0) { /* test will notice */ }
  close(fd);
}

static int connect_tcp(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof a)) {
    close(fd);
    return -1;
  }
  struct timeval tv = {5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

static int connect_unix(const char *path) {
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof a.sun_path) {
    close(fd);
    return -1;
  }
  memcpy(a.sun_path, path, strlen(path) + 1);
  if (connect(fd, (struct sockaddr *)&a, sizeof a)) {
    close(fd);
    return -1;
  }
  struct timeval tv = {5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

static void send_all(int fd, const char *p, size_t n) {
  while (n) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w <= 0) return;
    p += w;
    n -= (size_t)w;
  }
}

/* Sends req, reads until EOF; owned response text. */
static char *exchange(int fd, const char *req, size_t len) {
  send_all(fd, req, len);
  struct tc_buf b = TC_BUF_INIT;
  char tmp[4096];
  for (;;) {
    ssize_t n = read(fd, tmp, sizeof tmp);
    if (n <= 0) break;
    tc_buf_append(&b, tmp, (size_t)n);
  }
  close(fd);
  tc_buf_putc(&b, 0);
  return tc_buf_steal(&b, NULL);
}

static int status_of(const char *resp) {
  int st = 0;
  if (sscanf(resp, "HTTP/1.%*d %d", &st) != 1) return 0;
  return st;
}

static json_t *body_of(const char *resp) {
  const char *b = strstr(resp, "\r\n\r\n");
  return b ? json_loads(b + 4, 0, NULL) : NULL;
}

struct fixture {
  struct tc_router *router;
  struct tc_frontdoor *fdr;
  struct upgrade_seen seen;
  char sock[256];
  int port;
};

static bool fixture_start(struct fixture *f, int head_timeout_ms) {
  memset(f, 0, sizeof *f);
  pthread_mutex_init(&f->seen.mu, NULL);
  f->router = make_router();
  char *dir = tc_test_tmpdir();
  /* a missing directory is created, as Headscale does */
  snprintf(f->sock, sizeof f->sock, "%s/run/tailcoat/tc.sock", dir);
  free(dir);
  struct tc_frontdoor_opts o = {.listen_addr = "127.0.0.1:0", .unix_socket = f->sock, .unix_socket_mode = 0770,
                                .head_timeout_ms = head_timeout_ms, .body_max = 1000, .router = f->router};
  struct tc_err err = {0};
  if (tc_frontdoor_new(&o, &f->fdr, &err)) {
    fprintf(stderr, "frontdoor: %s\n", err.msg);
    return false;
  }
  if (tc_frontdoor_register_upgrade(f->fdr, "/up", dummy_upgrade, &f->seen)) return false;
  if (tc_frontdoor_register_upgrade(f->fdr, "/up", dummy_upgrade, &f->seen) != TC_EEXIST) return false;
  if (tc_frontdoor_start(f->fdr, &err)) {
    fprintf(stderr, "start: %s\n", err.msg);
    return false;
  }
  f->port = tc_frontdoor_port(f->fdr);
  return f->port > 0;
}

static void fixture_stop(struct fixture *f) {
  tc_frontdoor_free(f->fdr);
  tc_router_free(f->router);
  TC_CHECK(access(f->sock, F_OK) != 0); /* unix socket removed */
}

TC_TEST(frontdoor_plain_requests_reach_router) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 2000));
  const char *req = "POST /echo?a=1&b=x%2Fy HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer abc\r\n"
                    "Content-Length: 7\r\nConnection: close\r\n\r\n{\"k\":1}";
  char *resp = exchange(connect_tcp(f.port), req, strlen(req));
  TC_CHECK_INT(status_of(resp), 200);
  TC_CHECK(strstr(resp, "Content-Type: application/json") != NULL);
  json_t *j = body_of(resp);
  TC_REQUIRE(j);
  TC_CHECK_STR(json_string_value(json_object_get(j, "body")), "{\"k\":1}");
  TC_CHECK_STR(json_string_value(json_object_get(j, "auth")), "Bearer abc");
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(j, "query"), "b")), "x/y");
  TC_CHECK(json_is_false(json_object_get(j, "trusted")));
  TC_CHECK(json_is_false(json_object_get(j, "tls")));
  json_decref(j);
  free(resp);

  /* the unix socket is trusted */
  req = "GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
  resp = exchange(connect_unix(f.sock), req, strlen(req));
  TC_CHECK_INT(status_of(resp), 200);
  j = body_of(resp);
  TC_CHECK(json_is_true(json_object_get(j, "trusted")));
  json_decref(j);
  free(resp);

  /* a fd fed by the TLS module is marked tls and routed the same way */
  int sp[2];
  TC_REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, sp) == 0);
  struct sockaddr_in peer = {.sin_family = AF_INET, .sin_port = htons(4242)};
  peer.sin_addr.s_addr = htonl(0x01020304);
  TC_CHECK_INT(tc_frontdoor_add_connection(f.fdr, sp[1], (struct sockaddr *)&peer, sizeof peer, true), 0);
  struct timeval tv = {5, 0};
  setsockopt(sp[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  resp = exchange(sp[0], req, strlen(req));
  TC_CHECK_INT(status_of(resp), 200);
  j = body_of(resp);
  TC_CHECK(json_is_true(json_object_get(j, "tls")));
  TC_CHECK(json_is_false(json_object_get(j, "trusted")));
  json_decref(j);
  free(resp);

  /* keep-alive: two requests on one connection */
  int fd = connect_tcp(f.port);
  const char *two = "GET /echo HTTP/1.1\r\nHost: t\r\n\r\nGET /api/v1/node/5 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
  resp = exchange(fd, two, strlen(two));
  TC_CHECK(strstr(resp, "\"tag\":\"echo\"") != NULL);
  TC_CHECK(strstr(resp, "\"tag\":\"node\"") != NULL);
  free(resp);

  /* the request counter saw these */
  struct tc_buf m = TC_BUF_INIT;
  tc_metrics_render(&m);
  TC_CHECK(strstr(m.data, "tailcoat_http_requests_total{route=\"/echo\",code=\"200\"}") != NULL);
  TC_CHECK(strstr(m.data, "process_open_fds") != NULL);
  tc_buf_free(&m);
  fixture_stop(&f);
}

TC_TEST(frontdoor_errors_are_json_and_server_survives) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 2000));
  const char *req = "GET /nowhere HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
  char *resp = exchange(connect_tcp(f.port), req, strlen(req));
  TC_CHECK_INT(status_of(resp), 404);
  json_t *j = body_of(resp);
  TC_CHECK_INT(json_integer_value(json_object_get(j, "code")), 5);
  json_decref(j);
  free(resp);

  req = "PUT /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
  resp = exchange(connect_tcp(f.port), req, strlen(req));
  TC_CHECK_INT(status_of(resp), 405);
  free(resp);

  /* body over the limit announced by Content-Length: refused without reading it */
  char big[3000];
  int hl = snprintf(big, sizeof big, "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n");
  memset(big + hl, 'x', 2000);
  resp = exchange(connect_tcp(f.port), big, (size_t)hl + 2000);
  TC_CHECK_INT(status_of(resp), 413);
  j = body_of(resp);
  TC_CHECK_INT(json_integer_value(json_object_get(j, "code")), TC_GRPC_RESOURCE_EXHAUSTED);
  json_decref(j);
  free(resp);

  /* chunked body over the limit */
  struct tc_buf cb = TC_BUF_INIT;
  tc_buf_puts(&cb, "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
  for (int i = 0; i < 3; i++) {
    tc_buf_puts(&cb, "200\r\n");
    for (int k = 0; k < 0x200; k++) tc_buf_putc(&cb, 'y');
    tc_buf_puts(&cb, "\r\n");
  }
  tc_buf_puts(&cb, "0\r\n\r\n");
  resp = exchange(connect_tcp(f.port), cb.data, cb.len);
  TC_CHECK_INT(status_of(resp), 413);
  free(resp);
  /* ... and an endless chunked body is cut off (closed) after a bounded
   * amount, instead of being read forever */
  cb.len -= 5; /* drop the terminating chunk */
  int fdc = connect_tcp(f.port);
  send_all(fdc, cb.data, cb.len);
  struct tc_buf chunk = TC_BUF_INIT;
  tc_buf_puts(&chunk, "400\r\n");
  for (int k = 0; k < 0x400; k++) tc_buf_putc(&chunk, 'z');
  tc_buf_puts(&chunk, "\r\n");
  size_t sent = 0;
  for (int k = 0; k < 200; k++) { /* up to ~200 KiB, far past 4x the 1000-byte limit */
    ssize_t w = send(fdc, chunk.data, chunk.len, MSG_NOSIGNAL);
    if (w <= 0) break;
    sent += (size_t)w;
  }
  char sink[256];
  int64_t t0 = tc_mono_ms();
  ssize_t got = read(fdc, sink, sizeof sink);
  int rerr = errno;
  /* EOF or reset: the server closed it (a timeout would be EAGAIN) */
  TC_CHECK(got == 0 || (got < 0 && rerr == ECONNRESET));
  TC_CHECK(tc_mono_ms() - t0 < 4000);
  (void)sent;
  close(fdc);
  tc_buf_free(&chunk);
  tc_buf_free(&cb);

  /* malformed head */
  req = "GARBAGE\r\n\r\n";
  resp = exchange(connect_tcp(f.port), req, strlen(req));
  TC_CHECK_INT(status_of(resp), 400);
  free(resp);

  /* still serving */
  req = "GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
  resp = exchange(connect_tcp(f.port), req, strlen(req));
  TC_CHECK_INT(status_of(resp), 200);
  free(resp);
  fixture_stop(&f);
}

TC_TEST(frontdoor_head_too_large_gets_431) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 3000));
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_puts(&b, "GET /echo HTTP/1.1\r\nHost: t\r\n");
  while (b.len <= TC_HTTP_HEAD_MAX + 100) tc_buf_puts(&b, "X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
  tc_buf_puts(&b, "\r\n");
  char *resp = exchange(connect_tcp(f.port), b.data, b.len);
  TC_CHECK_INT(status_of(resp), 431);
  free(resp);
  tc_buf_free(&b);
  /* too many header fields */
  tc_buf_puts(&b, "GET /up HTTP/1.1\r\nHost: t\r\nUpgrade: dummy\r\n");
  for (int i = 0; i < TC_HTTP_HEADERS_MAX + 5; i++) tc_buf_printf(&b, "X-%d: v\r\n", i);
  tc_buf_puts(&b, "\r\n");
  resp = exchange(connect_tcp(f.port), b.data, b.len);
  TC_CHECK_INT(status_of(resp), 431);
  free(resp);
  tc_buf_free(&b);
  fixture_stop(&f);
}

TC_TEST(frontdoor_slow_head_is_closed) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 300));
  /* t0 before connecting: the head clock starts at accept, and a loaded
   * machine may take a while to get from connect to the read */
  int64_t t0 = tc_mono_ms();
  int fd = connect_tcp(f.port);
  TC_REQUIRE(fd >= 0);
  send_all(fd, "GET /echo HTTP/1.1\r\nHost:", 25);
  char c;
  ssize_t n = read(fd, &c, 1);
  int64_t dt = tc_mono_ms() - t0;
  TC_CHECK_INT(n, 0); /* closed without a response */
  TC_CHECK(dt >= 200 && dt < 3000);
  close(fd);
  /* a peer that half-closes mid-head is closed at once, not at the timeout;
   * against a 20 s head timeout so that "at once" (< 5 s) cannot be
   * confused with the timeout even on a slow machine (it was < 200 ms
   * against 300 ms) */
  struct fixture f2;
  TC_REQUIRE(fixture_start(&f2, 20000));
  fd = connect_tcp(f2.port);
  send_all(fd, "GET /echo HTTP/1.1\r\n", 20);
  shutdown(fd, SHUT_WR);
  t0 = tc_mono_ms();
  n = read(fd, &c, 1);
  TC_CHECK_INT(n, 0);
  TC_CHECK(tc_mono_ms() - t0 < 5000);
  close(fd);
  fixture_stop(&f2);
  /* a client that sends nothing is closed too */
  fd = connect_tcp(f.port);
  n = read(fd, &c, 1);
  TC_CHECK_INT(n, 0);
  close(fd);
  fixture_stop(&f);
}

TC_TEST(frontdoor_upgrade_handler_gets_fd_with_head_intact) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 2000));
  const char *head = "POST /up?x=a%20b HTTP/1.1\r\nHost: t\r\nUpgrade: tailscale-control-protocol\r\n"
                     "Connection: upgrade\r\nX-Tailscale-Handshake: AAAA\r\n\r\n";
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_puts(&b, head);
  tc_buf_puts(&b, "EARLY");
  int fd = connect_tcp(f.port);
  /* the head arrives in two pieces to exercise re-peeking */
  send_all(fd, b.data, 20);
  usleep(50000);
  char *resp = exchange(fd, b.data + 20, b.len - 20);
  TC_CHECK_INT(status_of(resp), 101);
  TC_CHECK(strstr(resp, "\r\n\r\nhello") != NULL);
  free(resp);
  pthread_mutex_lock(&f.seen.mu);
  TC_CHECK_INT(f.seen.calls, 1);
  TC_CHECK_STR(f.seen.path, "/up");
  TC_CHECK_STR(f.seen.query, "x=a b");
  TC_CHECK_STR(f.seen.upgrade_hdr, "tailscale-control-protocol");
  TC_CHECK_INT(f.seen.head_len, strlen(head));
  TC_CHECK(f.seen.head_len == strlen(head) && !memcmp(f.seen.head, head, strlen(head)));
  TC_CHECK_STR(f.seen.after, "EARLY");
  TC_CHECK(!strncmp(f.seen.peer, "127.0.0.1:", 10));
  pthread_mutex_unlock(&f.seen.mu);
  tc_buf_free(&b);

  /* the same path without an Upgrade header goes to the router (404 there) */
  const char *plain = "GET /up HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
  resp = exchange(connect_tcp(f.port), plain, strlen(plain));
  TC_CHECK_INT(status_of(resp), 404);
  free(resp);
  pthread_mutex_lock(&f.seen.mu);
  TC_CHECK_INT(f.seen.calls, 1);
  pthread_mutex_unlock(&f.seen.mu);
  fixture_stop(&f);
}

TC_TEST(metrics_listener_serves_prometheus_text) {
  tc_metrics_declare("tailcoat_test_widgets", TC_METRIC_GAUGE, "Widgets.");
  tc_metrics_set("tailcoat_test_widgets", "kind=\"a\"", 7);
  struct tc_metrics_server *ms = NULL;
  struct tc_err err = {0};
  TC_REQUIRE(tc_metrics_server_start("127.0.0.1:0", &ms, &err) == 0);
  int port = tc_metrics_server_port(ms);
  const char *req = "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
  char *resp = exchange(connect_tcp(port), req, strlen(req));
  TC_CHECK_INT(status_of(resp), 200);
  TC_CHECK(strstr(resp, "# TYPE tailcoat_test_widgets gauge\ntailcoat_test_widgets{kind=\"a\"} 7\n") != NULL);
  TC_CHECK(strstr(resp, "process_resident_memory_bytes ") != NULL);
  TC_CHECK(strstr(resp, "process_start_time_seconds ") != NULL);
  free(resp);
  req = "GET /other HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
  resp = exchange(connect_tcp(port), req, strlen(req));
  TC_CHECK_INT(status_of(resp), 404);
  free(resp);
  tc_metrics_server_stop(ms);
  /* listen address errors are reported */
  TC_CHECK(tc_metrics_server_start("nonsense", &ms, &err) < 0);
  TC_CHECK(strstr(err.msg, "nonsense") != NULL);
}

/* Random and malformed heads: every one gets an answer or a close, never a
 * crash or a hang, and the server keeps serving afterwards. */
TC_TEST(frontdoor_survives_hostile_heads) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 1000));
  static const char *const fixed[] = {
      "GET http://example.com/echo HTTP/1.1\r\nHost: x\r\n\r\n",
      "GET /echo HTTP/9.9\r\n\r\n",
      "GET  /echo HTTP/1.1\r\n\r\n",
      "get /echo HTTP/1.1\r\n\r\n",
      "GET /echo HTTP/1.1\r\n: novalue\r\n\r\n",
      "GET /echo HTTP/1.1\r\nNoColon\r\n\r\n",
      "GET /echo HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
      "GET /up HTTP/1.1\r\nUpgrade:\r\nConnection: close\r\n\r\n",
      "\r\n\r\n",
      "GET /echo\r\n\r\n",
      "POST /echo HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
      "POST /echo HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
      "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
  };
  for (size_t i = 0; i < TC_ARRAY_LEN(fixed); i++) {
    int fd = connect_tcp(f.port);
    TC_REQUIRE(fd >= 0);
    int64_t t0 = tc_mono_ms();
    char *resp = exchange(fd, fixed[i], strlen(fixed[i]));
    if (tc_mono_ms() - t0 > 1000) fprintf(stderr, "  case %zu took %lld ms\n", i, (long long)(tc_mono_ms() - t0));
    int st = status_of(resp);
    /* an answer must be a 4xx, or nothing (closed); never a 2xx for garbage
     * (the absolute-form target is refused by design) */
    if (st && (st < 400 || st > 499)) {
      fprintf(stderr, "  case %zu answered %d\n", i, st);
      tc_test_failures++;
    }
    free(resp);
  }
  uint8_t buf[600];
  for (int i = 0; i < 150; i++) {
    tc_random(buf, sizeof buf);
    size_t n = 20 + buf[0] % 500;
    if (i % 2) memcpy(buf, "GET /", 5); /* half of them look like a start */
    memcpy(buf + n, "\r\n\r\n", 4);
    int fd = connect_tcp(f.port);
    TC_REQUIRE(fd >= 0);
    free(exchange(fd, (const char *)buf, n + 4));
  }
  /* a client that connects and closes at once */
  for (int i = 0; i < 20; i++) close(connect_tcp(f.port));
  const char *req = "GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
  char *resp = exchange(connect_tcp(f.port), req, strlen(req));
  TC_CHECK_INT(status_of(resp), 200);
  free(resp);
  fixture_stop(&f);
}

struct par_arg {
  int port;
  int ok;
};

static void *par_client(void *arg) {
  struct par_arg *a = arg;
  for (int i = 0; i < 40; i++) {
    /* alternate short-lived and keep-alive (two requests) connections */
    const char *req = i % 2 ? "GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                            : "GET /echo HTTP/1.1\r\nHost: t\r\n\r\nGET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    int fd = connect_tcp(a->port);
    if (fd < 0) continue;
    char *resp = exchange(fd, req, strlen(req));
    int n = 0;
    for (const char *p = resp; (p = strstr(p, "HTTP/1.1 200")); p++) n++;
    if (n == (i % 2 ? 1 : 2)) a->ok++;
    free(resp);
  }
  return NULL;
}

TC_TEST(frontdoor_parallel_clients) {
  struct fixture f;
  TC_REQUIRE(fixture_start(&f, 2000));
  enum { N = 8 };
  pthread_t th[N];
  struct par_arg args[N];
  for (int i = 0; i < N; i++) {
    args[i].port = f.port;
    args[i].ok = 0;
    pthread_create(&th[i], NULL, par_client, &args[i]);
  }
  int ok = 0;
  for (int i = 0; i < N; i++) {
    pthread_join(th[i], NULL);
    ok += args[i].ok;
  }
  TC_CHECK_INT(ok, N * 40);
  fixture_stop(&f);
}

TC_TEST(metrics_histogram_renders_cumulative_buckets) {
  static const double b[] = {0.001, 0.01, 1};
  struct tc_histogram *h = tc_metrics_histogram("tailcoat_test_latency_seconds", "op=\"x\"", b, 3);
  TC_REQUIRE(h == tc_metrics_histogram("tailcoat_test_latency_seconds", "op=\"x\"", b, 3));
  tc_histogram_observe(h, 0.0005);
  tc_histogram_observe(h, 0.001); /* le is inclusive */
  tc_histogram_observe(h, 0.02);
  tc_histogram_observe(h, 3);
  tc_histogram_observe(h, 100);
  struct tc_buf out = TC_BUF_INIT;
  tc_metrics_render(&out);
  TC_CHECK(strstr(out.data, "# TYPE tailcoat_test_latency_seconds histogram\n"
                            "tailcoat_test_latency_seconds_bucket{op=\"x\",le=\"0.001\"} 2\n"
                            "tailcoat_test_latency_seconds_bucket{op=\"x\",le=\"0.01\"} 2\n"
                            "tailcoat_test_latency_seconds_bucket{op=\"x\",le=\"1\"} 3\n"
                            "tailcoat_test_latency_seconds_bucket{op=\"x\",le=\"+Inf\"} 5\n"
                            "tailcoat_test_latency_seconds_sum{op=\"x\"} 103.0215\n"
                            "tailcoat_test_latency_seconds_count{op=\"x\"} 5\n") != NULL);
  tc_buf_free(&out);
}

TC_TEST(listen_addresses_parse_and_bind) {
  struct tc_err err = {0};
  int fd = tc_http_listen_tcp("127.0.0.1:0", &err);
  TC_CHECK(fd >= 0);
  if (fd >= 0) close(fd);
  fd = tc_http_listen_tcp(":0", &err); /* all addresses, dual stack when possible */
  TC_CHECK(fd >= 0);
  if (fd >= 0) close(fd);
  fd = tc_http_listen_tcp("[::1]:0", &err);
  if (fd >= 0) close(fd);
  else fprintf(stderr, "  (no IPv6 loopback here: %s)\n", err.msg);
  static const char *const bad[] = {"nonsense", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:-1", "::1:80",
                                    "[::1]80", "127.0.0.1:8x", ""};
  for (size_t i = 0; i < TC_ARRAY_LEN(bad); i++) {
    memset(&err, 0, sizeof err);
    fd = tc_http_listen_tcp(bad[i], &err);
    if (fd >= 0) {
      fprintf(stderr, "  \"%s\" was accepted\n", bad[i]);
      tc_test_failures++;
      close(fd);
    } else {
      TC_CHECK(err.msg[0] != 0);
    }
  }
  /* a port in use is an error naming the address */
  int a = tc_http_listen_tcp("127.0.0.1:0", &err);
  TC_REQUIRE(a >= 0);
  struct sockaddr_in sa;
  socklen_t sl = sizeof sa;
  getsockname(a, (struct sockaddr *)&sa, &sl);
  char addr[64];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", ntohs(sa.sin_port));
  fd = tc_http_listen_tcp(addr, &err);
  TC_CHECK(fd < 0);
  TC_CHECK(strstr(err.msg, addr) != NULL);
  if (fd >= 0) close(fd);
  close(a);
}

static void peer_handler(void *ctx, const struct tc_http_req *req, struct tc_http_resp *resp) {
  tc_http_resp_text(resp, 200, "text/plain", req->peer, strlen(req->peer));
}

static char *peer_seen(int port, const char *xff) {
  char req[512];
  snprintf(req, sizeof req, "GET /peer HTTP/1.1\r\nHost: t\r\n%s%s%sConnection: close\r\n\r\n",
           xff ? "X-Forwarded-For: " : "", xff ? xff : "", xff ? "\r\n" : "");
  char *resp = exchange(connect_tcp(port), req, strlen(req));
  const char *b = strstr(resp, "\r\n\r\n");
  char *out = strdup(b ? b + 4 : "");
  free(resp);
  return out;
}

TC_TEST(frontdoor_trusted_proxies_forwarded_for) {
  struct tc_router *r = tc_router_new();
  tc_http_route(r, "GET", "/peer", peer_handler, NULL);
  struct tc_err err = {0};
  struct tc_frontdoor *fdr = NULL;
  const char *bad[] = {"10.0.0.0/33"};
  struct tc_frontdoor_opts o = {.listen_addr = "127.0.0.1:0", .router = r, .trusted_proxies = bad,
                                .n_trusted_proxies = 1};
  TC_CHECK(tc_frontdoor_new(&o, &fdr, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "10.0.0.0/33") != NULL);
  /* first: nobody trusted, the header is ignored */
  o.trusted_proxies = NULL;
  o.n_trusted_proxies = 0;
  TC_REQUIRE(tc_frontdoor_new(&o, &fdr, &err) == 0);
  TC_REQUIRE(tc_frontdoor_start(fdr, &err) == 0);
  char *p = peer_seen(tc_frontdoor_port(fdr), "203.0.113.7");
  TC_CHECK(tc_str_has_prefix(p, "127.0.0.1:"));
  free(p);
  tc_frontdoor_free(fdr);
  /* loopback trusted: the right-most untrusted hop is the client */
  const char *trusted[] = {"127.0.0.0/8", "10.1.0.0/16"};
  o.trusted_proxies = trusted;
  o.n_trusted_proxies = 2;
  TC_REQUIRE(tc_frontdoor_new(&o, &fdr, &err) == 0);
  TC_REQUIRE(tc_frontdoor_start(fdr, &err) == 0);
  int port = tc_frontdoor_port(fdr);
  p = peer_seen(port, "203.0.113.7");
  TC_CHECK_STR(p, "203.0.113.7");
  free(p);
  p = peer_seen(port, "198.51.100.1, 203.0.113.7, 10.1.2.3");
  TC_CHECK_STR(p, "203.0.113.7"); /* spoofed left-most entries are not believed */
  free(p);
  p = peer_seen(port, "2001:db8::5");
  TC_CHECK_STR(p, "2001:db8::5");
  free(p);
  p = peer_seen(port, "not-an-ip");
  TC_CHECK(tc_str_has_prefix(p, "127.0.0.1:"));
  free(p);
  p = peer_seen(port, NULL);
  TC_CHECK(tc_str_has_prefix(p, "127.0.0.1:"));
  free(p);
  tc_frontdoor_free(fdr);
  tc_router_free(r);
}
