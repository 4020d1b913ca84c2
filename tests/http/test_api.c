/* Integration: hostile and malformed requests against the real server,
 * /metrics, /health when the database goes away, and crash safety (SIGKILL
 * in the middle of a stream of acknowledged writes). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <regex.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "base/base.h"
#include "server_harness.h"
#include "tc_test.h"

static const char *pg_url(void) { return getenv("TC_TEST_PG_URL"); }

static int json_code(const char *body) {
  json_t *j = json_loads(body ? body : "", 0, NULL);
  int code = -1;
  if (json_is_object(j) && json_is_integer(json_object_get(j, "code")) &&
      json_is_string(json_object_get(j, "message")) && json_is_array(json_object_get(j, "details")))
    code = (int)json_integer_value(json_object_get(j, "code"));
  json_decref(j);
  return code;
}

/* status + grpc code of one request over the trusted unix socket */
static int req(const struct tc_srv *s, const char *method, const char *path, const char *body, int *grpc) {
  char *rb = NULL;
  const char *hdr[] = {"Content-Type: application/json", NULL};
  int st = tc_http_do(s, true, method, path, hdr, body, &rb);
  *grpc = json_code(rb);
  free(rb);
  return st;
}

static int raw_status_ex(int port, const char *data, size_t len, bool half_close);
static int raw_status(int port, const char *data, size_t len) { return raw_status_ex(port, data, len, false); }

/* Sends data on a fresh TCP connection (then half-closes if asked) and
 * returns the status of the answer, 0 for none, -1 if connect failed. */
static int raw_status_ex(int port, const char *data, size_t len, bool half_close) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof a)) {
    close(fd);
    return -1;
  }
  struct timeval tv = {10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  size_t off = 0;
  while (off < len) {
    ssize_t n = send(fd, data + off, len - off, MSG_NOSIGNAL);
    if (n <= 0) break;
    off += (size_t)n;
  }
  if (half_close) shutdown(fd, SHUT_WR);
  char buf[256] = {0};
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  int st = 0;
  if (n > 0) sscanf(buf, "HTTP/1.%*d %d", &st);
  return st;
}

/* Checks Prometheus text format 0.0.4: every sample line is
 * name{labels} value, every family has exactly one TYPE line before its
 * samples, and no family appears twice. Returns the number of problems. */
static int prom_problems(const char *text) {
  regex_t sample, type;
  regcomp(&sample, "^([a-zA-Z_:][a-zA-Z0-9_:]*)(\\{([a-zA-Z_][a-zA-Z0-9_]*=\"([^\"\\\\]|\\\\.)*\",?)*\\})? [-+0-9.eE]+(Inf|NaN)?$",
          REG_EXTENDED);
  regcomp(&type, "^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$", REG_EXTENDED);
  int bad = 0;
  char families[128][128];
  int nfam = 0;
  char current[128] = "";
  char *copy = strdup(text);
  for (char *save = NULL, *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    regmatch_t m[2];
    if (!strncmp(line, "# HELP ", 7)) continue;
    if (!regexec(&type, line, 2, m, 0)) {
      snprintf(current, sizeof current, "%.*s", (int)(m[1].rm_eo - m[1].rm_so), line + m[1].rm_so);
      for (int i = 0; i < nfam; i++)
        if (!strcmp(families[i], current)) {
          fprintf(stderr, "  family %s declared twice\n", current);
          bad++;
        }
      if (nfam < 128) snprintf(families[nfam++], sizeof families[0], "%s", current);
      continue;
    }
    if (regexec(&sample, line, 2, m, 0)) {
      fprintf(stderr, "  not a sample line: %s\n", line);
      bad++;
      continue;
    }
    if (strncmp(line, current, strlen(current)) || !current[0]) {
      fprintf(stderr, "  sample outside its family: %s\n", line);
      bad++;
    }
  }
  free(copy);
  regfree(&sample);
  regfree(&type);
  return bad;
}

TC_TEST(api_bad_requests_are_json_errors) {
  struct tc_srv s;
  TC_REQUIRE(tc_srv_init(&s, NULL));
  TC_REQUIRE(tc_srv_start(&s));
  int g;
  TC_CHECK_INT(req(&s, "POST", "/api/v1/user", "{\"name\": ", &g), 400);
  TC_CHECK_INT(g, 3);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/user", "[1,2]", &g), 400);
  TC_CHECK_INT(g, 3);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/user", "{\"name\": 5}", &g), 400);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/user", "{\"name\": \"a\\u0000b\"}", &g), 400);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/user", "{\"name\": \"x\xff\"}", &g), 400);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/user", "{\"name\":\"a\",\"name\":\"b\"}", &g), 400);
  char *big = malloc(2u << 20);
  memset(big, ' ', 2u << 20);
  big[0] = '{';
  big[(2u << 20) - 2] = '}';
  big[(2u << 20) - 1] = 0;
  TC_CHECK_INT(req(&s, "POST", "/api/v1/user", big, &g), 413);
  TC_CHECK_INT(g, 8);
  free(big);
  char longname[600];
  memset(longname, 'x', 300);
  snprintf(longname + 300, sizeof longname - 300, "\"}");
  char lbody[700];
  snprintf(lbody, sizeof lbody, "{\"name\":\"longdisplay\",\"displayName\":\"%s", longname);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/user", lbody, &g), 400);
  TC_CHECK_INT(req(&s, "GET", "/api/v1/nothing/here", NULL, &g), 404);
  TC_CHECK_INT(g, 5);
  TC_CHECK_INT(req(&s, "PATCH", "/api/v1/user", "{}", &g), 405);
  TC_CHECK_INT(g, 12);
  TC_CHECK_INT(req(&s, "GET", "/api/v1/node/abc", NULL, &g), 400);
  TC_CHECK_INT(req(&s, "GET", "/api/v1/node/99", NULL, &g), 404);
  TC_CHECK_INT(req(&s, "GET", "/api/v1/node/99999999999999999999999", NULL, &g), 400);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/preauthkey", "{\"user\":\"nobody\"}", &g), 404);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/user", "{\"name\":\"dave\"}", &g), 200);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/user", "{\"name\":\"dave\"}", &g), 409);
  TC_CHECK_INT(g, 6);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/preauthkey", "{\"user\":\"dave\",\"expiration\":\"yesterday\"}", &g), 400);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/preauthkey", "{\"user\":\"dave\",\"aclTags\":\"tag:x\"}", &g), 400);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/preauthkey", "{\"user\":\"dave\",\"aclTags\":[\"tag:x\"]}", &g), 200);
  TC_CHECK_INT(req(&s, "PUT", "/api/v1/policy", "{\"policy\": 3}", &g), 400);
  TC_CHECK_INT(req(&s, "GET", "/api/v1/policy", NULL, &g), 404);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/policy/check", "{\"policy\": \"{\\\"acls\\\": 7}\"}", &g), 400);
  /* a policy whose own tests fail is refused by PUT and by check, and does
   * not replace the one in force; the same policy with a passing test is taken */
  const char *failing = "{\"policy\": \"{\\\"acls\\\": [{\\\"action\\\": \\\"accept\\\", "
                        "\\\"src\\\": [\\\"*\\\"], \\\"dst\\\": [\\\"*:22\\\"]}], "
                        "\\\"tests\\\": [{\\\"src\\\": \\\"100.64.0.9\\\", "
                        "\\\"accept\\\": [\\\"100.64.0.1:80\\\"]}]}\"}";
  TC_CHECK_INT(req(&s, "PUT", "/api/v1/policy", failing, &g), 400);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/policy/check", failing, &g), 400);
  TC_CHECK_INT(req(&s, "GET", "/api/v1/policy", NULL, &g), 404);
  char *passing = strdup(failing);
  memcpy(strstr(passing, ":80"), ":22", 3);
  TC_CHECK_INT(req(&s, "POST", "/api/v1/policy/check", passing, &g), 200);
  TC_CHECK_INT(req(&s, "PUT", "/api/v1/policy", passing, &g), 200);
  TC_CHECK_INT(req(&s, "GET", "/api/v1/policy", NULL, &g), 200);
  free(passing);
  TC_CHECK_INT(req(&s, "DELETE", "/api/v1/apikey/nosuchprefix", NULL, &g), 404);
  /* no credentials over TCP: 401, and a non-bearer scheme too */
  char *rb = NULL;
  TC_CHECK_INT(tc_http_do(&s, false, "POST", "/api/v1/user", NULL, "{\"name\":\"eve\"}", &rb), 401);
  TC_CHECK_INT(json_code(rb), 16);
  free(rb);
  const char *basic[] = {"Authorization: Basic YWxpY2U6cHc=", NULL};
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/api/v1/user", basic, NULL, NULL), 401);
  /* /health needs no credentials */
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/health", NULL, NULL, &rb), 200);
  TC_CHECK(strstr(rb, "\"pass\"") != NULL);
  free(rb);
  /* listener limits on the real server: oversized head -> 431 */
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_puts(&b, "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ");
  for (int i = 0; i < 20000; i++) tc_buf_putc(&b, 'a');
  tc_buf_puts(&b, "\r\n\r\n");
  TC_CHECK_INT(raw_status(s.port, b.data, b.len), 431);
  tc_buf_free(&b);
  TC_CHECK_INT(raw_status(s.port, "\x16\x03\x01\x02\x00\r\n\r\n", 9), 400); /* not HTTP */

  /* still serving, and the metrics saw all of it */
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/health", NULL, NULL, NULL), 200);
  char *m = tc_srv_metrics(&s);
  TC_REQUIRE(m);
  const char *want[] = {"tailcoat_http_requests_total{route=\"/api/v1/user\",code=\"400\"} 7",
                        "tailcoat_http_requests_total{route=\"/api/v1/user\",code=\"409\"} 1",
                        "tailcoat_http_requests_total{route=\"\",code=\"404\"} 1",
                        "tailcoat_http_requests_total{route=\"\",code=\"413\"} 1",
                        "tailcoat_http_connections_dropped_total{reason=\"head_too_large\"} 1",
                        "tailcoat_users 1\n",
                        "tailcoat_nodes 0\n",
                        "tailcoat_nodes_online 0\n",
                        "tailcoat_pending_registrations 0\n",
                        "tailcoat_model_transactions_total{result=\"ok\"} ",
                        "process_cpu_seconds_total ",
                        "process_resident_memory_bytes ",
                        "process_start_time_seconds ",
                        "process_open_fds ",
                        "# TYPE tailcoat_http_requests_total counter",
                        "# TYPE tailcoat_http_request_duration_seconds histogram",
                        "tailcoat_http_request_duration_seconds_bucket{route=\"/health\",le=\"+Inf\"} ",
                        "tailcoat_http_request_duration_seconds_count{route=\"/api/v1/user\"} "};
  /* the checker itself catches bad input */
  TC_CHECK(prom_problems("orphan 1\n") > 0);
  TC_CHECK(prom_problems("# TYPE a gauge\na{x=1} 2\n") > 0);
  TC_CHECK(prom_problems("# TYPE a gauge\na 1\n# TYPE a gauge\na 2\n") > 0);
  TC_CHECK_INT(prom_problems("# TYPE a gauge\na{x=\"q\\\"\",y=\"\"} 2.5\n"), 0);
  TC_CHECK_INT(prom_problems(m), 0);
  for (size_t i = 0; i < TC_ARRAY_LEN(want); i++) {
    if (!strstr(m, want[i])) {
      fprintf(stderr, "  missing in /metrics: %s\n", want[i]);
      tc_test_failures++;
    }
  }
  free(m);
  /* the metrics listener serves nothing else */
  int ws = tc_srv_stop(&s, SIGTERM);
  TC_CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
  tc_srv_cleanup(&s);
}

/* A client that sends an oversized head and half-closes at once: the FIN
 * often arrives in the same epoll event as the data, which made the listener
 * release the pending connection twice (heap-use-after-free, server killed
 * by ASan) -- a crash that depended on how fast the server got to the event. */
TC_TEST(oversized_head_then_half_close) {
  struct tc_srv s;
  TC_REQUIRE(tc_srv_init(&s, NULL));
  TC_REQUIRE(tc_srv_start(&s));
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_puts(&b, "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ");
  for (int i = 0; i < 20000; i++) tc_buf_putc(&b, 'a');
  tc_buf_puts(&b, "\r\n\r\n");
  int refused = 0;
  for (int i = 0; i < 50; i++) refused += raw_status_ex(s.port, b.data, b.len, true) == 431;
  tc_buf_free(&b);
  TC_CHECK_INT(refused, 50);
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/health", NULL, NULL, NULL), 200);
  TC_CHECK(kill(s.pid, 0) == 0);
  tc_srv_cleanup(&s);
}

TC_TEST(api_health_fails_when_database_is_gone) {
  struct tc_srv s;
  TC_REQUIRE(pg_url() != NULL);
  TC_REQUIRE(tc_srv_init(&s, pg_url()));
  TC_REQUIRE(tc_srv_start(&s));
  char *rb = NULL;
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/api/v1/health", NULL, NULL, NULL), 401);
  int g;
  TC_CHECK_INT(req(&s, "GET", "/api/v1/health", NULL, &g), 200);
  char sql[160];
  snprintf(sql, sizeof sql, "DROP DATABASE %s WITH (FORCE)", s.pg_db);
  TC_REQUIRE(tc_pg_exec(&s, sql) == 0);
  s.pg_db[0] = 0;
  int st = 0;
  for (int i = 0; i < 3; i++) { /* a broken pooled connection may need one retry to notice */
    free(rb);
    rb = NULL;
    st = tc_http_do(&s, false, "GET", "/health", NULL, NULL, &rb);
    if (st == 503) break;
  }
  TC_CHECK_INT(st, 503);
  json_t *j = json_loads(rb ? rb : "", 0, NULL);
  TC_CHECK_STR(json_string_value(json_object_get(j, "status")), "fail");
  json_decref(j);
  free(rb);
  /* the server itself keeps answering */
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/nope", NULL, NULL, NULL), 404);
  tc_srv_cleanup(&s);
}

/* ---- crash safety --------------------------------------------------------------------- */

struct killer {
  pid_t pid;
  int after_ms;
};

static void *kill_later(void *arg) {
  struct killer *k = arg;
  usleep((useconds_t)k->after_ms * 1000);
  kill(k->pid, SIGKILL);
  return NULL;
}

static void crash_safety(bool pg) {
  struct tc_srv s;
  if (pg) TC_REQUIRE(pg_url() != NULL);
  TC_REQUIRE(tc_srv_init(&s, pg ? pg_url() : NULL));
  TC_REQUIRE(tc_srv_start(&s));
  /* warm up: a few acknowledged writes before the killer starts */
  enum { MAX = 2000 };
  bool *acked = calloc(MAX, sizeof *acked);
  int sent = 0;
  uint8_t r;
  tc_random(&r, 1);
  struct killer k = {.pid = s.pid, .after_ms = 300 + (r % 700)};
  pthread_t th;
  pthread_create(&th, NULL, kill_later, &k);
  for (; sent < MAX; sent++) {
    char body[64];
    snprintf(body, sizeof body, "{\"name\":\"user%04d\"}", sent);
    int g;
    int st = req(&s, "POST", "/api/v1/user", body, &g);
    if (st == 200) {
      acked[sent] = true;
      continue;
    }
    if (st != 0) fprintf(stderr, "  unexpected status %d for %s\n", st, body);
    break; /* the server is gone */
  }
  pthread_join(th, NULL);
  int ws;
  waitpid(s.pid, &ws, 0);
  s.pid = 0;
  TC_CHECK(WIFSIGNALED(ws) && WTERMSIG(ws) == SIGKILL);
  int nacked = 0;
  for (int i = 0; i < sent; i++) nacked += acked[i];
  fprintf(stderr, "  %d writes acknowledged before SIGKILL\n", nacked);
  TC_CHECK(nacked > 0);

  TC_REQUIRE(tc_srv_start(&s));
  char *rb = NULL;
  const char *hdr[] = {NULL};
  TC_REQUIRE(tc_http_do(&s, true, "GET", "/api/v1/user", hdr, NULL, &rb) == 200);
  json_t *j = json_loads(rb, 0, NULL);
  free(rb);
  json_t *users = json_object_get(j, "users");
  TC_REQUIRE(json_is_array(users));
  bool *present = calloc(MAX, sizeof *present);
  size_t i;
  json_t *u;
  json_array_foreach(users, i, u) {
    const char *name = json_string_value(json_object_get(u, "name"));
    int n = -1;
    TC_CHECK(name && sscanf(name, "user%d", &n) == 1 && n >= 0 && n < MAX);
    if (n >= 0 && n < MAX) present[n] = true;
    /* whole records only */
    TC_CHECK(json_string_length(json_object_get(u, "id")) > 0);
    TC_CHECK(json_is_string(json_object_get(u, "createdAt")));
  }
  int lost = 0, extra = 0;
  for (int n = 0; n < MAX; n++) {
    if (acked[n] && !present[n]) lost++;
    if (present[n] && !acked[n]) extra++;
  }
  TC_CHECK_INT(lost, 0);
  /* only the request in flight at the kill may have landed unacknowledged */
  TC_CHECK(extra <= 1);
  TC_CHECK_INT(json_array_size(users), nacked + extra);
  json_decref(j);
  /* and the server is fully usable after the crash */
  int g;
  TC_CHECK_INT(req(&s, "POST", "/api/v1/user", "{\"name\":\"after-crash\"}", &g), 200);
  free(acked);
  free(present);
  tc_srv_cleanup(&s);
}

TC_TEST(crash_safety_sqlite) { crash_safety(false); }
TC_TEST(crash_safety_pg) { crash_safety(true); }

struct writer {
  const struct tc_srv *s;
  int base;
  int ok;
};

static void *write_users(void *arg) {
  struct writer *w = arg;
  for (int i = 0; i < 25; i++) {
    char body[64];
    snprintf(body, sizeof body, "{\"name\":\"par%d-%d\"}", w->base, i);
    int g;
    if (req(w->s, "POST", "/api/v1/user", body, &g) == 200) w->ok++;
  }
  return NULL;
}

/* Writers in parallel on the unix socket and readers on TCP: every write
 * lands exactly once with its own id. */
TC_TEST(api_parallel_writers) {
  struct tc_srv s;
  TC_REQUIRE(tc_srv_init(&s, NULL));
  TC_REQUIRE(tc_srv_start(&s));
  enum { N = 8 };
  pthread_t th[N];
  struct writer w[N];
  for (int i = 0; i < N; i++) {
    w[i] = (struct writer){.s = &s, .base = i};
    pthread_create(&th[i], NULL, write_users, &w[i]);
  }
  int ok = 0;
  for (int i = 0; i < N; i++) {
    pthread_join(th[i], NULL);
    ok += w[i].ok;
  }
  TC_CHECK_INT(ok, N * 25);
  char *rb = NULL;
  const char *hdr[] = {NULL};
  TC_REQUIRE(tc_http_do(&s, true, "GET", "/api/v1/user", hdr, NULL, &rb) == 200);
  json_t *j = json_loads(rb, 0, NULL);
  free(rb);
  json_t *users = json_object_get(j, "users");
  TC_CHECK_INT(json_array_size(users), N * 25);
  /* ids are distinct and increasing (the snapshot lists by id) */
  long long prev = 0;
  size_t i;
  json_t *u;
  json_array_foreach(users, i, u) {
    long long id = atoll(json_string_value(json_object_get(u, "id")));
    TC_CHECK(id > prev);
    prev = id;
  }
  json_decref(j);
  char *m = tc_srv_metrics(&s);
  TC_CHECK(m && strstr(m, "tailcoat_users 200\n") != NULL);
  free(m);
  tc_srv_cleanup(&s);
}
