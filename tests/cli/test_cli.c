/* Integration: the real `tailcoat serve` binary on loopback with SQLite or
 * PostgreSQL, driven by the real CLI (-o json parsed with jansson) and by
 * the REST API with bearer keys. */
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "base/base.h"
#include "server_harness.h"
#include "tc_test.h"

static const char *pg_url(void) { return getenv("TC_TEST_PG_URL"); }

static json_t *find_by(json_t *arr, const char *field, const char *value) {
  size_t i;
  json_t *e;
  json_array_foreach(arr, i, e) {
    const char *v = json_string_value(json_object_get(e, field));
    if (v && !strcmp(v, value)) return e;
  }
  return NULL;
}

static void roundtrip(bool pg) {
  struct tc_srv s;
  if (pg) TC_REQUIRE(pg_url() != NULL);
  TC_REQUIRE(tc_srv_init(&s, pg ? pg_url() : NULL));
  TC_REQUIRE(tc_srv_start(&s));
  int rc;
  char *out = NULL, *err = NULL;

  /* users */
  json_t *u = tc_cli_json(&s, &rc, "users", "create", "alice", "--email", "alice@example.com", NULL);
  TC_CHECK_INT(rc, 0);
  TC_REQUIRE(json_is_object(u));
  TC_CHECK_STR(json_string_value(json_object_get(u, "name")), "alice");
  TC_CHECK_STR(json_string_value(json_object_get(u, "email")), "alice@example.com");
  TC_CHECK(json_is_string(json_object_get(u, "id"))); /* int64 as a string */
  TC_CHECK(json_is_string(json_object_get(u, "createdAt")));
  char alice_id[32];
  snprintf(alice_id, sizeof alice_id, "%s", json_string_value(json_object_get(u, "id")));
  json_decref(u);

  rc = tc_cli(&s, &out, &err, "users", "create", "alice", NULL);
  TC_CHECK(rc != 0);
  TC_CHECK(strstr(err, "Error:") == err);
  TC_CHECK(strchr(err, '\n') == err + strlen(err) - 1); /* one line */
  free(out);
  free(err);

  rc = tc_cli(&s, &out, &err, "users", "create", "9bad name", NULL);
  TC_CHECK(rc != 0);
  TC_CHECK(*err != 0);
  free(out);
  free(err);

  json_t *users = tc_cli_json(&s, &rc, "users", "list", NULL);
  TC_CHECK_INT(rc, 0);
  TC_REQUIRE(json_is_array(users));
  TC_CHECK_INT(json_array_size(users), 1);
  TC_CHECK(find_by(users, "name", "alice") != NULL);
  json_decref(users);

  /* the table output is readable and has a header */
  rc = tc_cli(&s, &out, NULL, "users", "list", NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK(strstr(out, "ID") == out);
  TC_CHECK(strstr(out, "alice") != NULL);
  free(out);

  /* pre-auth keys: the secret is shown once, listings show the prefix only */
  json_t *k = tc_cli_json(&s, &rc, "preauthkeys", "create", "--user", "alice", "--reusable", "--expiration", "2h",
                          "--tags", "tag:ci", NULL);
  TC_CHECK_INT(rc, 0);
  TC_REQUIRE(json_is_object(k));
  const char *secret = json_string_value(json_object_get(k, "key"));
  TC_REQUIRE(secret && tc_str_has_prefix(secret, "hskey-auth-"));
  char secret_copy[200];
  snprintf(secret_copy, sizeof secret_copy, "%s", secret);
  TC_CHECK(json_is_true(json_object_get(k, "reusable")));
  TC_CHECK(json_is_false(json_object_get(k, "ephemeral")));
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(k, "user"), "name")), "alice");
  TC_CHECK_STR(json_string_value(json_array_get(json_object_get(k, "aclTags"), 0)), "tag:ci");
  int64_t expires = 0;
  TC_CHECK(tc_time_parse(json_string_value(json_object_get(k, "expiration")), &expires) == 0);
  TC_CHECK(expires > tc_now() + 7000 && expires <= tc_now() + 7201);
  char key_id[32];
  snprintf(key_id, sizeof key_id, "%s", json_string_value(json_object_get(k, "id")));
  json_decref(k);

  rc = tc_cli(&s, &out, NULL, "-o", "json", "preauthkeys", "list", NULL);
  TC_CHECK_INT(rc, 0);
  /* the secret part (after the prefix) never appears, nor any hash */
  const char *secret_tail = strrchr(secret_copy, '-') + 1;
  TC_CHECK(strstr(out, secret_tail) == NULL);
  TC_CHECK(strstr(out, "hash") == NULL);
  json_t *keys = json_loads(out, 0, NULL);
  free(out);
  TC_REQUIRE(json_is_array(keys));
  TC_CHECK_INT(json_array_size(keys), 1);
  const char *shown = json_string_value(json_object_get(json_array_get(keys, 0), "key"));
  TC_CHECK(shown && strlen(shown) < strlen(secret_copy) && !strncmp(shown, secret_copy, 23));
  json_decref(keys);

  json_t *r = tc_cli_json(&s, &rc, "preauthkeys", "expire", "--id", key_id, NULL);
  TC_CHECK_INT(rc, 0);
  json_decref(r);
  keys = tc_cli_json(&s, &rc, "preauthkeys", "list", "--user", "alice", NULL);
  TC_REQUIRE(json_is_array(keys));
  TC_CHECK(tc_time_parse(json_string_value(json_object_get(json_array_get(keys, 0), "expiration")), &expires) == 0);
  TC_CHECK(expires <= tc_now());
  json_decref(keys);

  /* nodes: none yet, and a clear error for a missing one */
  json_t *nodes = tc_cli_json(&s, &rc, "nodes", "list", NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK(json_is_array(nodes) && json_array_size(nodes) == 0);
  json_decref(nodes);
  rc = tc_cli(&s, NULL, &err, "nodes", "expire", "-i", "999", NULL);
  TC_CHECK(rc != 0);
  TC_CHECK(strstr(err, "not found") != NULL);
  free(err);

  /* API keys and the REST API with a bearer key */
  json_t *ak = tc_cli_json(&s, &rc, "apikeys", "create", "--expiration", "1d", NULL);
  TC_CHECK_INT(rc, 0);
  TC_REQUIRE(json_is_string(ak));
  char token[200], bearer[260];
  snprintf(token, sizeof token, "%s", json_string_value(ak));
  json_decref(ak);
  TC_CHECK(tc_str_has_prefix(token, "hskey-api-"));
  snprintf(bearer, sizeof bearer, "Authorization: Bearer %s", token);
  char prefix[32];
  snprintf(prefix, sizeof prefix, "%.12s", token + strlen("hskey-api-"));

  json_t *aks = tc_cli_json(&s, &rc, "apikeys", "list", NULL);
  TC_REQUIRE(json_is_array(aks));
  TC_CHECK_INT(json_array_size(aks), 1);
  TC_CHECK_STR(json_string_value(json_object_get(json_array_get(aks, 0), "prefix")), prefix);
  json_decref(aks);

  char *body = NULL;
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/api/v1/user", NULL, NULL, &body), 401);
  json_t *e = json_loads(body, 0, NULL);
  TC_CHECK_INT(json_integer_value(json_object_get(e, "code")), 16);
  TC_CHECK(json_is_array(json_object_get(e, "details")));
  json_decref(e);
  free(body);
  const char *bad_hdr[] = {"Authorization: Bearer hskey-api-aaaaaaaaaaaa-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", NULL};
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/api/v1/user", bad_hdr, NULL, NULL), 401);
  const char *hdr[] = {bearer, "Content-Type: application/json", NULL};
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/api/v1/user", hdr, NULL, &body), 200);
  json_t *lu = json_loads(body, 0, NULL);
  TC_CHECK(find_by(json_object_get(lu, "users"), "name", "alice") != NULL);
  json_decref(lu);
  free(body);
  TC_CHECK_INT(tc_http_do(&s, false, "POST", "/api/v1/user", hdr, "{\"name\":\"bob\",\"displayName\":\"Bob B\"}", &body), 200);
  json_t *bob = json_loads(body, 0, NULL);
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(bob, "user"), "displayName")), "Bob B");
  json_decref(bob);
  free(body);

  /* the API key's last-seen is tracked; expiring it locks it out */
  r = tc_cli_json(&s, &rc, "apikeys", "expire", "--prefix", prefix, NULL);
  TC_CHECK_INT(rc, 0);
  json_decref(r);
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/api/v1/user", hdr, NULL, NULL), 401);
  r = tc_cli_json(&s, &rc, "apikeys", "delete", "--prefix", prefix, NULL);
  TC_CHECK_INT(rc, 0);
  json_decref(r);
  aks = tc_cli_json(&s, &rc, "apikeys", "list", NULL);
  TC_CHECK(json_is_array(aks) && json_array_size(aks) == 0);
  json_decref(aks);

  /* policy set/get/check */
  char pfile[400], badfile[400];
  snprintf(pfile, sizeof pfile, "%s/policy.hujson", s.dir);
  snprintf(badfile, sizeof badfile, "%s/bad.hujson", s.dir);
  const char *policy = "{\n  // everyone may reach everyone\n  \"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}],\n}\n";
  TC_REQUIRE(tc_write_file_atomic(pfile, policy, strlen(policy), 0600, NULL) == 0);
  const char *badpol = "{\"acls\": [{\"action\": \"maybe\"}]}";
  TC_REQUIRE(tc_write_file_atomic(badfile, badpol, strlen(badpol), 0600, NULL) == 0);
  r = tc_cli_json(&s, &rc, "policy", "set", "-f", pfile, NULL);
  TC_CHECK_INT(rc, 0);
  json_decref(r);
  r = tc_cli_json(&s, &rc, "policy", "get", NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK_STR(json_string_value(json_object_get(r, "policy")), policy);
  TC_CHECK(json_is_string(json_object_get(r, "updatedAt")));
  json_decref(r);
  rc = tc_cli(&s, NULL, &err, "policy", "set", "-f", badfile, NULL);
  TC_CHECK(rc != 0);
  TC_CHECK(*err);
  free(err);
  rc = tc_cli(&s, &out, NULL, "policy", "check", "-f", pfile, NULL);
  TC_CHECK_INT(rc, 0);
  free(out);
  rc = tc_cli(&s, NULL, NULL, "policy", "check", "-f", badfile, NULL);
  TC_CHECK(rc != 0);
  r = tc_cli_json(&s, &rc, "policy", "get", NULL); /* the bad one was not stored */
  TC_CHECK_STR(json_string_value(json_object_get(r, "policy")), policy);
  json_decref(r);
  /* check and set run the policy's own tests: a failing one is reported
   * (naming the test) and nothing is stored */
  char tfile[600];
  snprintf(tfile, sizeof tfile, "%s/failing-test.hujson", s.dir);
  const char *ftext = "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:22\"]}],\n"
                      " \"tests\": [{\"src\": \"100.64.0.9\", \"accept\": [\"100.64.0.1:80\"]}]}\n";
  TC_REQUIRE(tc_write_file_atomic(tfile, ftext, strlen(ftext), 0600, NULL) == 0);
  err = NULL;
  rc = tc_cli(&s, NULL, &err, "policy", "check", "-f", tfile, NULL);
  TC_CHECK(rc != 0);
  TC_CHECK(err && strstr(err, "100.64.0.1:80"));
  free(err);
  rc = tc_cli(&s, NULL, NULL, "policy", "set", "-f", tfile, NULL);
  TC_CHECK(rc != 0);
  r = tc_cli_json(&s, &rc, "policy", "get", NULL);
  TC_CHECK_STR(json_string_value(json_object_get(r, "policy")), policy);
  json_decref(r);

  /* rename, destroy */
  r = tc_cli_json(&s, &rc, "users", "rename", "alice", "alice2", NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK_STR(json_string_value(json_object_get(r, "name")), "alice2");
  TC_CHECK_STR(json_string_value(json_object_get(r, "id")), alice_id);
  json_decref(r);
  r = tc_cli_json(&s, &rc, "users", "destroy", "alice2", NULL);
  TC_CHECK_INT(rc, 0);
  json_decref(r);
  users = tc_cli_json(&s, &rc, "users", "list", NULL);
  TC_CHECK(find_by(users, "name", "alice2") == NULL);
  TC_CHECK(find_by(users, "name", "bob") != NULL);
  json_decref(users);

  /* yaml output parses as what we expect (spot check) */
  rc = tc_cli(&s, &out, NULL, "-o", "yaml", "users", "list", NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK(strstr(out, "- id: \"") == out);
  TC_CHECK(strstr(out, "  name: \"bob\"\n") != NULL);
  free(out);

  /* the CLI went through the live server's unix socket */
  char *m = tc_srv_metrics(&s);
  TC_REQUIRE(m);
  TC_CHECK(strstr(m, "tailcoat_http_connections_total{listener=\"unix\"}") != NULL);
  TC_CHECK(strstr(m, "tailcoat_users 1\n") != NULL);
  free(m);

  /* the socket carries unix_socket_permission */
  struct stat sst;
  TC_CHECK(stat(s.sock, &sst) == 0 && (sst.st_mode & 0777) == 0770);
  /* clean shutdown removes the socket; the CLI then works in-process */
  int ws = tc_srv_stop(&s, SIGTERM);
  TC_CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
  struct stat st;
  TC_CHECK(stat(s.sock, &st) != 0);
  users = tc_cli_json(&s, &rc, "users", "list", NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK(find_by(users, "name", "bob") != NULL);
  json_decref(users);
  u = tc_cli_json(&s, &rc, "users", "create", "carol", NULL);
  TC_CHECK_INT(rc, 0);
  json_decref(u);
  /* and a restarted server sees what the offline CLI wrote */
  TC_REQUIRE(tc_srv_start(&s));
  users = tc_cli_json(&s, &rc, "users", "list", NULL);
  TC_CHECK(find_by(users, "name", "carol") != NULL);
  json_decref(users);
  tc_srv_cleanup(&s);
}

TC_TEST(cli_roundtrip_sqlite) { roundtrip(false); }
TC_TEST(cli_roundtrip_pg) { roundtrip(true); }

TC_TEST(cli_offline_commands) {
  struct tc_srv s;
  TC_REQUIRE(tc_srv_init(&s, NULL));
  char *out = NULL, *err = NULL;
  int rc = tc_cli(&s, &out, NULL, "version", NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK(tc_str_has_prefix(out, "tailcoat "));
  free(out);
  json_t *j = tc_cli_json(&s, &rc, "generate", "private-key", NULL);
  TC_CHECK_INT(rc, 0);
  const char *pk = json_string_value(json_object_get(j, "private_key"));
  TC_CHECK(pk && tc_str_has_prefix(pk, "privkey:") && strlen(pk) == 72);
  json_decref(j);
  rc = tc_cli(&s, &out, NULL, "configtest", NULL);
  TC_CHECK_INT(rc, 0);
  free(out);
  rc = tc_cli(&s, &out, NULL, "config", "print", NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK(strstr(out, "listen_addr:") != NULL);
  free(out);
  char initf[400];
  snprintf(initf, sizeof initf, "%s/init.yaml", s.dir);
  rc = tc_cli(&s, NULL, NULL, "config", "init", "-o", initf, "--data-dir", s.dir, NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK(access(initf, R_OK) == 0);
  rc = tc_cli(&s, NULL, &err, "config", "init", "-o", initf, NULL); /* no silent overwrite */
  TC_CHECK(rc != 0);
  free(err);
  /* config errors name the key and fail */
  char badcfg[400];
  snprintf(badcfg, sizeof badcfg, "%s/bad.yaml", s.dir);
  const char *bad = "server_url: http://x\nlisten_addr: 127.0.0.1:1\nnoise:\n  private_key_path: /tmp/k\nprefixes:\n  v4: 10.0.0.0/8\n";
  tc_write_file_atomic(badcfg, bad, strlen(bad), 0600, NULL);
  const char *bin_dir = getenv("TC_BINARY_DIR");
  char cmd[1200];
  snprintf(cmd, sizeof cmd, "%s/tailcoat -c %s configtest 2>%s/bad.err >/dev/null", bin_dir ? bin_dir : TC_BINARY_DIR,
           badcfg, s.dir);
  int ws = system(cmd);
  TC_CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 1);
  snprintf(cmd, sizeof cmd, "%s/bad.err", s.dir);
  char *errtext = NULL;
  size_t n;
  TC_REQUIRE(tc_read_file(cmd, 1 << 16, &errtext, &n, NULL) == 0);
  TC_CHECK(strstr(errtext, "prefixes") != NULL);
  free(errtext);
  rc = tc_cli(&s, NULL, &err, "frobnicate", NULL);
  TC_CHECK_INT(rc, 2);
  free(err);
  rc = tc_cli(&s, NULL, &err, "preauthkeys", "create", "--user", "x", "--resuable", NULL);
  TC_CHECK_INT(rc, 2);
  TC_CHECK(strstr(err, "--resuable") != NULL);
  free(err);
  rc = tc_cli(&s, NULL, &err, "preauthkeys", "create", "--user", "--reusable", NULL);
  TC_CHECK_INT(rc, 2);
  free(err);
  rc = tc_cli(&s, NULL, &err, "-o", "xml", "users", "list", NULL);
  TC_CHECK(rc != 0);
  TC_CHECK(strstr(err, "xml") != NULL);
  free(err);
  tc_srv_cleanup(&s);
}

/* cli.address + cli.api_key: the CLI talks HTTP(S) to a remote server with
 * a bearer key instead of the local socket. */
TC_TEST(cli_remote_address_with_api_key) {
  struct tc_srv s;
  TC_REQUIRE(tc_srv_init(&s, NULL));
  TC_REQUIRE(tc_srv_start(&s));
  int rc;
  json_t *ak = tc_cli_json(&s, &rc, "apikeys", "create", NULL);
  TC_REQUIRE(rc == 0 && json_is_string(ak));
  char *base = NULL;
  size_t n;
  TC_REQUIRE(tc_read_file(s.config, 1 << 20, &base, &n, NULL) == 0);
  struct tc_srv r = s; /* same server, another config for the CLI */
  snprintf(r.config, sizeof r.config, "%s/remote.yaml", s.dir);
  char *text = tc_xasprintf("%scli:\n  address: http://127.0.0.1:%d\n  api_key: %s\n  timeout: 5s\n", base, s.port,
                            json_string_value(ak));
  TC_REQUIRE(tc_write_file_atomic(r.config, text, strlen(text), 0600, NULL) == 0);
  free(text);
  json_t *u = tc_cli_json(&r, &rc, "users", "create", "remote-user", NULL);
  TC_CHECK_INT(rc, 0);
  TC_CHECK_STR(json_string_value(json_object_get(u, "name")), "remote-user");
  json_decref(u);
  /* it went over TCP with the key: the API key's prefix shows up as last seen */
  json_t *keys = tc_cli_json(&s, &rc, "apikeys", "list", NULL);
  TC_CHECK(json_is_string(json_object_get(json_array_get(keys, 0), "lastSeen")));
  json_decref(keys);
  /* a wrong key is refused with the server's message */
  text = tc_xasprintf("%scli:\n  address: http://127.0.0.1:%d\n  api_key: hskey-api-aaaaaaaaaaaa-bbbb\n", base, s.port);
  TC_REQUIRE(tc_write_file_atomic(r.config, text, strlen(text), 0600, NULL) == 0);
  free(text);
  char *err = NULL;
  rc = tc_cli(&r, NULL, &err, "users", "list", NULL);
  TC_CHECK(rc != 0);
  TC_CHECK(err && strstr(err, "invalid API key") != NULL);
  free(err);
  free(base);
  json_decref(ak);
  tc_srv_cleanup(&s);
}
