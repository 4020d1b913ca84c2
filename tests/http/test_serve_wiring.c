/* Integration: what `serve` wires around the API — the embedded DERP
 * relay's HTTP face, /key, TLS termination in front of everything, and
 * SIGHUP reloads. */
#include <signal.h>
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
  const char *up[] = {"Upgrade: DERP", "Connection: Upgrade", NULL};
  int st = tc_http_do(&s, false, "GET", "/derp", up, NULL, NULL);
  TC_CHECK(st == 101 || st == 0); /* curl may give up after the switch */
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/key?v=106", NULL, NULL, &body), 200);
  json_t *k = json_loads(body, 0, NULL);
  TC_CHECK(tc_str_has_prefix(json_string_value(json_object_get(k, "publicKey")), "mkey:"));
  json_decref(k);
  free(body);
  char *m = tc_srv_metrics(&s);
  TC_CHECK(m && strstr(m, "tailcoat_derp_clients ") != NULL);
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
