/* Integration: what `serve` wires around the API — the embedded DERP
 * relay's HTTP face, /key, TLS termination in front of everything, and
 * SIGHUP reloads. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "base/base.h"
#include "server_harness.h"
#include "tc_test.h"

#define DERP_ON \
    "derp:\n  server:\n    enabled: true\n    region_id: 999\n    region_code: tc\n    region_name: tailcoat\n" \
    "    stun_listen_addr: 127.0.0.1:0\n    private_key_path: \"/tmp/tc-derp-%d.key\"\n" \
    "    automatically_add_embedded_derp_region: true\n    verify_clients: true\n  urls: []\n  paths: []\n"

/* Sends a raw request and returns the status of the first response line
 * (reads only that much: an upgraded connection stays open). */
static int first_status(int port, const char *req) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  struct timeval tv = {5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  int st = 0;
  if (!connect(fd, (struct sockaddr *)&a, sizeof a) && send(fd, req, strlen(req), MSG_NOSIGNAL) > 0) {
    char buf[64] = {0};
    if (read(fd, buf, 12) == 12) sscanf(buf, "HTTP/1.1 %d", &st);
  }
  close(fd);
  return st;
}

TC_TEST(serve_wires_derp_and_key) {
  struct tc_srv s;
  char derp[1024];
  snprintf(derp, sizeof derp, DERP_ON, (int)getpid());
  TC_REQUIRE(tc_srv_init_ex(&s, NULL, derp, NULL));
  TC_REQUIRE(tc_srv_start(&s));
  char *body = NULL;
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/derp", NULL, NULL, &body), 426);
  free(body);
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/derp/probe", NULL, NULL, NULL), 200);
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/generate_204", NULL, NULL, NULL), 204);
  /* an Upgrade: DERP request is handed to the relay, which answers 101 */
  TC_CHECK_INT(first_status(s.port, "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"),
               101);
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/key?v=106", NULL, NULL, &body), 200);
  json_t *k = json_loads(body, 0, NULL);
  TC_CHECK(tc_str_has_prefix(json_string_value(json_object_get(k, "publicKey")), "mkey:"));
  json_decref(k);
  free(body);
  char *m = tc_srv_metrics(&s);
  TC_CHECK(m && strstr(m, "tailcoat_derp_clients ") != NULL);
  TC_CHECK(m && strstr(m, "tailcoat_control_connections 0\n") != NULL);
  TC_CHECK(m && strstr(m, "tailcoat_http_upgrades_total{path=\"/derp\"}") != NULL);
  free(m);
  /* SIGHUP reloads without dying */
  kill(s.pid, SIGHUP);
  usleep(200 * 1000);
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/health", NULL, NULL, NULL), 200);
  int ws = tc_srv_stop(&s, SIGTERM);
  TC_CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
  char keyf[64];
  snprintf(keyf, sizeof keyf, "/tmp/tc-derp-%d.key", (int)getpid());
  unlink(keyf);
  tc_srv_cleanup(&s);
}

TC_TEST(serve_terminates_tls) {
  struct tc_srv s;
  char *dir = tc_test_tmpdir();
  char cmd[1024];
  snprintf(cmd, sizeof cmd,
           "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 "
           "-keyout %s/key.pem -out %s/cert.pem >/dev/null 2>&1",
           dir, dir);
  TC_REQUIRE(system(cmd) == 0);
  char extra[700];
  snprintf(extra, sizeof extra, "tls_cert_path: \"%s/cert.pem\"\ntls_key_path: \"%s/key.pem\"\n", dir, dir);
  TC_REQUIRE(tc_srv_init_ex(&s, NULL, NULL, extra));
  TC_REQUIRE(s.tls);
  TC_REQUIRE(tc_srv_start(&s)); /* /health answered over https */
  char *body = NULL;
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/api/v1/user", NULL, NULL, &body), 401);
  TC_CHECK(body && strstr(body, "\"code\":16") != NULL);
  free(body);
  char *m = tc_srv_metrics(&s);
  TC_CHECK(m && strstr(m, "tailcoat_tls_handshakes_total{result=\"ok\"} ") != NULL);
  free(m);
  /* the CLI still reaches the live server over the unix socket */
  int rc;
  json_t *u = tc_cli_json(&s, &rc, "users", "create", "tls-user", NULL);
  TC_CHECK_INT(rc, 0);
  json_decref(u);
  /* plain HTTP on the TLS port is not served */
  s.tls = false;
  TC_CHECK(tc_http_do(&s, false, "GET", "/health", NULL, NULL, NULL) != 200);
  s.tls = true;
  /* SIGHUP re-reads the certificate */
  kill(s.pid, SIGHUP);
  usleep(300 * 1000);
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/health", NULL, NULL, NULL), 200);
  int ws = tc_srv_stop(&s, SIGTERM);
  TC_CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
  tc_srv_cleanup(&s);
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd)) { /* best effort */ }
  free(dir);
}

static char *policy_of(const struct tc_srv *s, int *status) {
  char *body = NULL;
  const char *hdr[] = {NULL};
  *status = tc_http_do(s, true, "GET", "/api/v1/policy", hdr, NULL, &body);
  json_t *j = json_loads(body ? body : "", 0, NULL);
  free(body);
  const char *p = json_string_value(json_object_get(j, "policy"));
  char *out = p ? strdup(p) : NULL;
  json_decref(j);
  return out;
}

TC_TEST(serve_policy_file_mode_reloads_on_sighup) {
  struct tc_srv s;
  char *dir = tc_test_tmpdir();
  char pfile[400], extra[600];
  snprintf(pfile, sizeof pfile, "%s/policy.hujson", dir);
  const char *a = "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}]}\n";
  const char *b = "// only ssh\n{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:22\"]}]}\n";
  const char *bad = "{\"acls\": [{\"action\": \"accept\", \"src\": 5}]}\n";
  TC_REQUIRE(tc_write_file_atomic(pfile, a, strlen(a), 0600, NULL) == 0);
  snprintf(extra, sizeof extra, "policy:\n  mode: file\n  path: \"%s\"\n", pfile);
  TC_REQUIRE(tc_srv_init_ex(&s, NULL, NULL, extra));
  TC_REQUIRE(tc_srv_start(&s));
  int st;
  char *p = policy_of(&s, &st);
  TC_CHECK_INT(st, 200);
  TC_CHECK_STR(p, a);
  free(p);
  /* writes through the API are refused in file mode */
  const char *hdr[] = {NULL};
  char *body = NULL;
  TC_CHECK_INT(tc_http_do(&s, true, "PUT", "/api/v1/policy", hdr, "{\"policy\":\"{}\"}", &body), 400);
  TC_CHECK(body && strstr(body, "file") != NULL);
  free(body);
  /* edit + SIGHUP: the new file is in force */
  TC_REQUIRE(tc_write_file_atomic(pfile, b, strlen(b), 0600, NULL) == 0);
  kill(s.pid, SIGHUP);
  bool seen = false;
  for (int i = 0; i < 50 && !seen; i++) {
    usleep(100 * 1000);
    p = policy_of(&s, &st);
    seen = p && !strcmp(p, b);
    free(p);
  }
  TC_CHECK(seen);
  /* a broken file is refused on reload; the last good policy stays */
  TC_REQUIRE(tc_write_file_atomic(pfile, bad, strlen(bad), 0600, NULL) == 0);
  kill(s.pid, SIGHUP);
  usleep(500 * 1000);
  p = policy_of(&s, &st);
  TC_CHECK_STR(p, b);
  free(p);
  int ws = tc_srv_stop(&s, SIGTERM);
  TC_CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
  /* a broken policy file stops the server from starting, with a clear error */
  TC_REQUIRE(tc_srv_start(&s) == false);
  char *log = NULL;
  size_t n;
  TC_REQUIRE(tc_read_file(s.log, 1 << 20, &log, &n, NULL) == 0);
  TC_CHECK(strstr(log, "policy") != NULL);
  free(log);
  tc_srv_cleanup(&s);
  char cmd[500];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd)) { /* best effort */ }
  free(dir);
}
