/* End to end through `tailcoat serve`: the CLI creates a user and a key, a
 * tailscaled-like client fetches /key, upgrades /ts2021 (Noise + HTTP/2)
 * and registers with the key, and the CLI then sees and manages the node. */
#include <signal.h>
#include <sys/wait.h>

#include "base/base.h"
#include "server_harness.h"
#include "tc_test.h"
#include "tclient.h"

TC_TEST(e2e_register_with_authkey_then_manage_node) {
  struct tc_srv s;
  TC_REQUIRE(tc_srv_init(&s, NULL));
  TC_REQUIRE(tc_srv_start(&s));
  int rc;
  json_t *u = tc_cli_json(&s, &rc, "users", "create", "alice", NULL);
  TC_REQUIRE(rc == 0);
  json_decref(u);
  json_t *k = tc_cli_json(&s, &rc, "preauthkeys", "create", "--user", "alice", NULL);
  TC_REQUIRE(rc == 0 && json_is_object(k));
  char authkey[200];
  snprintf(authkey, sizeof authkey, "%s", json_string_value(json_object_get(k, "key")));
  json_decref(k);

  struct tc_tclient *c = NULL;
  struct tc_err err = {0};
  struct tc_tclient_opts o = {.timeout_ms = 10000};
  rc = tc_tclient_connect("127.0.0.1", s.port, &o, &c, &err);
  if (rc) fprintf(stderr, "  connect: %s\n", err.msg);
  TC_REQUIRE(rc == 0);
  uint8_t nk[32];
  tc_random(nk, sizeof nk);
  char nkhex[65];
  tc_hex_encode(nk, 32, nkhex);
  char *body = tc_xasprintf("{\"Version\":106,\"NodeKey\":\"nodekey:%s\",\"OldNodeKey\":\"nodekey:"
                            "0000000000000000000000000000000000000000000000000000000000000000\","
                            "\"Auth\":{\"AuthKey\":\"%s\"},\"Expiry\":\"0001-01-01T00:00:00Z\","
                            "\"Hostinfo\":{\"Hostname\":\"E2E Host\",\"OS\":\"linux\"}}",
                            nkhex, authkey);
  int status = 0;
  char *resp = NULL;
  size_t rlen = 0;
  rc = tc_tclient_request(c, "POST", "/machine/register", body, strlen(body), 10000, &status, &resp, &rlen);
  free(body);
  TC_CHECK_INT(rc, 0);
  TC_CHECK_INT(status, 200);
  json_t *rj = json_loadb(resp ? resp : "", rlen, 0, NULL);
  TC_CHECK(json_is_true(json_object_get(rj, "MachineAuthorized")));
  json_decref(rj);
  free(resp);
  tc_tclient_free(c);

  json_t *nodes = tc_cli_json(&s, &rc, "nodes", "list", NULL);
  TC_CHECK_INT(rc, 0);
  TC_REQUIRE(json_is_array(nodes) && json_array_size(nodes) == 1);
  json_t *n = json_array_get(nodes, 0);
  TC_CHECK_STR(json_string_value(json_object_get(n, "name")), "E2E Host");
  TC_CHECK_STR(json_string_value(json_object_get(n, "givenName")), "e2e-host");
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(n, "user"), "name")), "alice");
  TC_CHECK_STR(json_string_value(json_object_get(n, "registerMethod")), "REGISTER_METHOD_AUTH_KEY");
  char want_nk[80];
  snprintf(want_nk, sizeof want_nk, "nodekey:%s", nkhex);
  TC_CHECK_STR(json_string_value(json_object_get(n, "nodeKey")), want_nk);
  TC_CHECK(json_array_size(json_object_get(n, "ipAddresses")) == 2);
  TC_CHECK(tc_str_has_prefix(json_string_value(json_object_get(n, "machineKey")), "mkey:"));
  char id[32];
  snprintf(id, sizeof id, "%s", json_string_value(json_object_get(n, "id")));
  json_decref(nodes);

  /* the single-use key is now used */
  json_t *keys = tc_cli_json(&s, &rc, "preauthkeys", "list", NULL);
  TC_CHECK(json_is_true(json_object_get(json_array_get(keys, 0), "used")));
  json_decref(keys);

  json_t *r = tc_cli_json(&s, &rc, "nodes", "rename", "-i", id, "renamed", NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK_STR(json_string_value(json_object_get(r, "givenName")), "renamed");
  json_decref(r);
  char *out = NULL, *errs = NULL;
  rc = tc_cli(&s, &out, &errs, "nodes", "rename", "-i", id, "Not A Label!", NULL);
  TC_CHECK(rc != 0);
  free(out);
  free(errs);
  r = tc_cli_json(&s, &rc, "nodes", "approve-routes", "-i", id, "-r", "10.0.0.0/24", NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK_STR(json_string_value(json_array_get(json_object_get(r, "approvedRoutes"), 0)), "10.0.0.0/24");
  json_decref(r);
  r = tc_cli_json(&s, &rc, "nodes", "expire", "-i", id, NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK(json_is_true(json_object_get(r, "expired")));
  json_decref(r);
  /* table view */
  rc = tc_cli(&s, &out, NULL, "nodes", "list", NULL);
  TC_CHECK(rc == 0 && strstr(out, "renamed") && strstr(out, "alice"));
  free(out);
  /* a user who owns nodes cannot be destroyed */
  rc = tc_cli(&s, NULL, &errs, "users", "destroy", "alice", NULL);
  TC_CHECK(rc != 0);
  free(errs);
  r = tc_cli_json(&s, &rc, "nodes", "delete", "-i", id, NULL);
  TC_CHECK_INT(rc, 0);
  json_decref(r);
  nodes = tc_cli_json(&s, &rc, "nodes", "list", NULL);
  TC_CHECK(json_is_array(nodes) && json_array_size(nodes) == 0);
  json_decref(nodes);
  int ws = tc_srv_stop(&s, SIGTERM);
  TC_CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
  tc_srv_cleanup(&s);
}

/* Interactive login: the client gets an AuthURL, an admin approves it with
 * the CLI (nodes pending + nodes register), and the node exists. */
TC_TEST(e2e_interactive_registration_approved_by_cli) {
  struct tc_srv s;
  TC_REQUIRE(tc_srv_init(&s, NULL));
  TC_REQUIRE(tc_srv_start(&s));
  int rc;
  json_t *u = tc_cli_json(&s, &rc, "users", "create", "bob", NULL);
  TC_REQUIRE(rc == 0);
  json_decref(u);
  struct tc_tclient *c = NULL;
  struct tc_err err = {0};
  struct tc_tclient_opts o = {.timeout_ms = 10000};
  TC_REQUIRE(tc_tclient_connect("127.0.0.1", s.port, &o, &c, &err) == 0);
  uint8_t nk[32];
  tc_random(nk, sizeof nk);
  char nkhex[65];
  tc_hex_encode(nk, 32, nkhex);
  char *body = tc_xasprintf("{\"Version\":106,\"NodeKey\":\"nodekey:%s\",\"OldNodeKey\":\"nodekey:"
                            "0000000000000000000000000000000000000000000000000000000000000000\","
                            "\"Auth\":{\"AuthKey\":\"\"},\"Expiry\":\"0001-01-01T00:00:00Z\","
                            "\"Hostinfo\":{\"Hostname\":\"laptop\",\"OS\":\"linux\"}}",
                            nkhex);
  int status = 0;
  char *resp = NULL;
  size_t rlen = 0;
  rc = tc_tclient_request(c, "POST", "/machine/register", body, strlen(body), 10000, &status, &resp, &rlen);
  free(body);
  TC_REQUIRE(rc == 0 && status == 200);
  json_t *rj = json_loadb(resp ? resp : "", rlen, 0, NULL);
  free(resp);
  const char *url = json_string_value(json_object_get(rj, "AuthURL"));
  TC_REQUIRE(url && strstr(url, "/register/"));
  char regid[64];
  snprintf(regid, sizeof regid, "%s", strrchr(url, '/') + 1);
  json_decref(rj);
  tc_tclient_free(c);

  /* the AuthURL page tells the admin what to run */
  char path[128], *page = NULL;
  snprintf(path, sizeof path, "/register/%s", regid);
  TC_CHECK_INT(tc_http_do(&s, false, "GET", path, NULL, NULL, &page), 200);
  TC_CHECK(page && strstr(page, "nodes register") && strstr(page, regid));
  free(page);
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/register/%3Cscript%3E", NULL, NULL, NULL), 400);
  json_t *pend = tc_cli_json(&s, &rc, "nodes", "pending", NULL);
  TC_CHECK_INT(rc, 0);
  TC_REQUIRE(json_is_array(pend) && json_array_size(pend) == 1);
  TC_CHECK_STR(json_string_value(json_object_get(json_array_get(pend, 0), "authId")), regid);
  TC_CHECK_STR(json_string_value(json_object_get(json_array_get(pend, 0), "hostname")), "laptop");
  json_decref(pend);
  /* approving without a user is refused for a new machine */
  char *errs = NULL;
  rc = tc_cli(&s, NULL, &errs, "auth", "approve", "--auth-id", regid, NULL);
  TC_CHECK(rc != 0);
  free(errs);
  /* a wrong id is a clear not-found */
  rc = tc_cli(&s, NULL, &errs, "nodes", "register", "--user", "bob", "--key", "nosuchregistration", NULL);
  TC_CHECK(rc != 0);
  free(errs);
  /* by node key (older Headscale CLIs): an unknown one is not found */
  rc = tc_cli(&s, NULL, &errs, "nodes", "register", "--user", "bob", "--key",
              "nodekey:1111111111111111111111111111111111111111111111111111111111111111", NULL);
  TC_CHECK(rc != 0);
  free(errs);
  char bynk[80];
  snprintf(bynk, sizeof bynk, "nodekey:%s", nkhex);
  json_t *n = tc_cli_json(&s, &rc, "nodes", "register", "--user", "bob", "--key", bynk, NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(n, "user"), "name")), "bob");
  TC_CHECK_STR(json_string_value(json_object_get(n, "registerMethod")), "REGISTER_METHOD_CLI");
  json_decref(n);
  json_t *nodes = tc_cli_json(&s, &rc, "nodes", "list", "--user", "bob", NULL);
  TC_CHECK(json_is_array(nodes) && json_array_size(nodes) == 1);
  json_decref(nodes);
  pend = tc_cli_json(&s, &rc, "nodes", "pending", NULL);
  TC_CHECK(json_is_array(pend) && json_array_size(pend) == 0);
  json_decref(pend);
  tc_srv_cleanup(&s);
}
