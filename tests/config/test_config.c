/* Tests for server/config: Headscale example configs, canonical print round
 * trips, malformed configs, environment overrides, deprecations, helpers. */
#include "tc_test.h"
#include "base/base.h"
#include "config/config.h"

#include <sys/stat.h>

static const char *const versions[] = {"v0.26.1", "v0.27.1", "v0.28.0", "v0.29.2"};
static const char *const no_env[] = {NULL};

static char *example_path(const char *ver) {
  char rel[128];
  snprintf(rel, sizeof(rel), "testdata/headscale-config/config-example-%s.yaml", ver);
  return tc_test_shared_path(rel);
}

static int load_example(const char *ver, struct tc_config *cfg, struct tc_err *err) {
  char *p = example_path(ver);
  struct tc_config_load_opts o = {.env = no_env};
  int rc = tc_config_load_opts(p, NULL, 0, &o, cfg, err);
  free(p);
  return rc;
}

static bool has_warning(const struct tc_config *cfg, const char *needle) {
  for (size_t i = 0; i < cfg->warnings.n; i++)
    if (strstr(cfg->warnings.v[i], needle)) return true;
  return false;
}

TC_TEST(examples_load_with_expected_values) {
  for (size_t i = 0; i < TC_ARRAY_LEN(versions); i++) {
    const char *ver = versions[i];
    struct tc_config c;
    struct tc_err err = {0};
    int rc = load_example(ver, &c, &err);
    if (rc != 0) fprintf(stderr, "  %s: %s\n", ver, err.msg);
    TC_REQUIRE(rc == 0);
    bool v26 = !strcmp(ver, "v0.26.1"), v27 = !strcmp(ver, "v0.27.1"), v28 = !strcmp(ver, "v0.28.0");
    TC_CHECK_STR(c.server_url, "http://127.0.0.1:8080");
    TC_CHECK_STR(c.server_host, "127.0.0.1");
    TC_CHECK_STR(c.listen_addr, "127.0.0.1:8080");
    TC_CHECK_STR(c.metrics_listen_addr, "127.0.0.1:9090");
    TC_CHECK_STR(c.grpc_listen_addr, "127.0.0.1:50443");
    TC_CHECK(!c.grpc_allow_insecure);
    TC_CHECK_INT(c.trusted_proxies.n, 0);
    TC_CHECK_STR(c.noise.private_key_path, "/var/lib/headscale/noise_private.key");
    TC_CHECK_STR(c.prefixes.v4.text, "100.64.0.0/10");
    TC_CHECK_INT(c.prefixes.v4.family, 4);
    TC_CHECK_INT(c.prefixes.v4.bits, 10);
    TC_CHECK(c.prefixes.v4.addr[0] == 100 && c.prefixes.v4.addr[1] == 64);
    TC_CHECK_STR(c.prefixes.v6.text, "fd7a:115c:a1e0::/48");
    TC_CHECK_INT(c.prefixes.v6.family, 6);
    TC_CHECK_INT(c.prefixes.v6.bits, 48);
    TC_CHECK(c.prefixes.v6.addr[0] == 0xfd && c.prefixes.v6.addr[1] == 0x7a);
    TC_CHECK_INT(c.prefixes.allocation, TC_IP_ALLOC_SEQUENTIAL);
    TC_CHECK_INT(c.database.type, TC_CFG_DB_SQLITE);
    TC_CHECK_STR(c.database.sqlite.path, "/var/lib/headscale/db.sqlite");
    TC_CHECK(c.database.sqlite.write_ahead_log);
    TC_CHECK_INT(c.database.sqlite.wal_autocheckpoint, 1000);
    TC_CHECK_INT(c.database.gorm.slow_threshold_ms, 1000);
    TC_CHECK(c.database.gorm.prepare_stmt);
    TC_CHECK(!c.derp.server.enabled);
    TC_CHECK_INT(c.derp.server.region_id, 999);
    TC_CHECK_STR(c.derp.server.region_code, "headscale");
    TC_CHECK_STR(c.derp.server.region_name, "Headscale Embedded DERP");
    TC_CHECK(c.derp.server.verify_clients); /* absent in 0.26: default true */
    TC_CHECK_STR(c.derp.server.stun_listen_addr, "0.0.0.0:3478");
    TC_CHECK_STR(c.derp.server.ipv4, v26 ? "1.2.3.4" : "198.51.100.1");
    TC_CHECK_STR(c.derp.server.ipv6, "2001:db8::1");
    TC_REQUIRE(c.derp.urls.n == 1);
    TC_CHECK_STR(c.derp.urls.v[0], "https://controlplane.tailscale.com/derpmap/default");
    TC_CHECK_INT(c.derp.paths.n, 0);
    TC_CHECK(c.derp.auto_update_enabled);
    TC_CHECK_INT(c.derp.update_frequency_ms, (v26 ? 24 : 3) * 3600000LL);
    TC_CHECK(!c.disable_check_updates);
    /* 0.26/0.27 use the old top-level key; 0.28+ the node section */
    TC_CHECK_INT(c.node.ephemeral.inactivity_timeout_ms, 30 * 60000LL);
    TC_CHECK_INT(c.node.expiry_ms, 0);
    TC_CHECK_INT(c.node.routes.ha.probe_interval_ms, 10000);
    TC_CHECK_INT(c.node.routes.ha.probe_timeout_ms, 5000);
    TC_CHECK_STR(c.acme_url, "https://acme-v02.api.letsencrypt.org/directory");
    TC_CHECK_STR(c.tls_letsencrypt_cache_dir, "/var/lib/headscale/cache");
    TC_CHECK_INT(c.tls_letsencrypt_challenge_type, TC_ACME_HTTP01);
    TC_CHECK_STR(c.tls_letsencrypt_listen, ":http");
    TC_CHECK_STR(c.tls_cert_path, "");
    TC_CHECK_INT(c.log.level, TC_LOG_INFO);
    TC_CHECK_INT(c.log.format, TC_LOG_FORMAT_TEXT);
    TC_CHECK_INT(c.policy.mode, TC_POLICY_MODE_FILE);
    TC_CHECK_STR(c.policy.path, "");
    TC_CHECK(c.dns.magic_dns);
    TC_CHECK_STR(c.dns.base_domain, "example.com");
    TC_CHECK(c.dns.override_local_dns == !v26);
    TC_REQUIRE(c.dns.nameservers.global.n == 4);
    TC_CHECK_STR(c.dns.nameservers.global.v[0], "1.1.1.1");
    TC_CHECK_STR(c.dns.nameservers.global.v[3], "2606:4700:4700::1001");
    TC_CHECK_INT(c.dns.nameservers.n_split, 0);
    TC_CHECK_INT(c.dns.search_domains.n, 0);
    TC_CHECK_INT(c.dns.n_extra_records, 0);
    TC_CHECK_STR(c.unix_socket, "/var/run/headscale/headscale.sock");
    TC_CHECK_INT(c.unix_socket_permission, 0770);
    TC_CHECK(!c.logtail.enabled);
    TC_CHECK(!c.randomize_client_port);
    TC_CHECK(c.taildrop.enabled);
    TC_CHECK(!c.auto_update.enabled);
    TC_CHECK_STR(c.oidc.issuer, "");
    TC_REQUIRE(c.oidc.scope.n == 3);
    TC_CHECK_STR(c.oidc.scope.v[0], "openid");
    TC_CHECK_STR(c.oidc.pkce.method, "S256");
    /* deprecations per version */
    TC_CHECK(has_warning(&c, "ephemeral_node_inactivity_timeout") == (v26 || v27 || v28));
    TC_CHECK(has_warning(&c, "randomize_client_port") == (v26 || v27 || v28));
    if (!v26 && !v27 && !v28) TC_CHECK_INT(c.warnings.n, 0);
    tc_config_free(&c);
  }
}

static void roundtrip(struct tc_config *c) {
  struct tc_buf b = TC_BUF_INIT;
  TC_REQUIRE(tc_config_print(c, &b) == 0);
  struct tc_config c2;
  struct tc_err err = {0};
  struct tc_config_load_opts o = {.env = no_env};
  int rc = tc_config_load_opts(NULL, b.data, b.len, &o, &c2, &err);
  if (rc) fprintf(stderr, "  reload: %s\n", err.msg);
  TC_REQUIRE(rc == 0);
  TC_CHECK(tc_config_equal(c, &c2));
  /* the canonical form adds no deprecated keys of its own */
  if (c->warnings.n == 0) TC_CHECK_INT(c2.warnings.n, 0);
  struct tc_buf b2 = TC_BUF_INIT;
  tc_config_print(&c2, &b2);
  TC_CHECK(b.len == b2.len && !memcmp(b.data, b2.data, b.len)); /* printing is a fixed point */
  tc_buf_free(&b);
  tc_buf_free(&b2);
  tc_config_free(&c2);
}

TC_TEST(examples_print_load_equal) {
  for (size_t i = 0; i < TC_ARRAY_LEN(versions); i++) {
    struct tc_config c;
    struct tc_err err = {0};
    TC_REQUIRE(load_example(versions[i], &c, &err) == 0);
    roundtrip(&c);
    tc_config_free(&c);
  }
}

TC_TEST(default_text_loads_and_round_trips) {
  char *dir = tc_test_tmpdir();
  char *text = tc_config_default_text(dir);
  struct tc_config c;
  struct tc_err err = {0};
  struct tc_config_load_opts o = {.env = no_env};
  int rc = tc_config_load_opts(NULL, text, strlen(text), &o, &c, &err);
  if (rc) fprintf(stderr, "  %s\n", err.msg);
  TC_REQUIRE(rc == 0);
  char *want = tc_xasprintf("%s/db.sqlite", dir);
  TC_CHECK_STR(c.database.sqlite.path, want);
  free(want);
  want = tc_xasprintf("%s/noise_private.key", dir);
  TC_CHECK_STR(c.noise.private_key_path, want);
  free(want);
  want = tc_xasprintf("%s/tailcoat.sock", dir);
  TC_CHECK_STR(c.unix_socket, want);
  free(want);
  TC_CHECK_STR(c.server_url, "http://127.0.0.1:8080");
  TC_CHECK_STR(c.listen_addr, "127.0.0.1:8080");
  TC_CHECK_STR(c.metrics_listen_addr, "127.0.0.1:9090");
  TC_CHECK(c.database.sqlite.write_ahead_log);
  TC_CHECK_INT(c.policy.mode, TC_POLICY_MODE_DATABASE);
  TC_CHECK_STR(c.dns.base_domain, "tailnet.internal");
  /* the embedded relay is on out of the box: clients need a DERP region */
  TC_CHECK(c.derp.server.enabled);
  TC_CHECK(c.derp.server.automatically_add_embedded_derp_region);
  TC_CHECK_STR(c.derp.server.stun_listen_addr, "0.0.0.0:3478");
  TC_CHECK_INT(c.derp.urls.n, 0);
  TC_CHECK_INT(c.derp.paths.n, 0);
  TC_CHECK_INT(c.warnings.n, 0);
  roundtrip(&c);
  tc_config_free(&c);
  free(text);
  /* a data dir that needs quoting still yields a valid file */
  text = tc_config_default_text("/tmp/we\"ird dir\\x");
  rc = tc_config_load_opts(NULL, text, strlen(text), &o, &c, &err);
  TC_REQUIRE(rc == 0);
  TC_CHECK_STR(c.database.sqlite.path, "/tmp/we\"ird dir\\x/db.sqlite");
  tc_config_free(&c);
  free(text);
  free(dir);
}

TC_TEST(defaults_round_trip_without_validation) {
  struct tc_config d;
  tc_config_defaults(&d);
  struct tc_buf b = TC_BUF_INIT;
  tc_config_print(&d, &b);
  struct tc_config c;
  struct tc_err err = {0};
  struct tc_config_load_opts o = {.env = no_env, .skip_validate = true};
  TC_REQUIRE(tc_config_load_opts(NULL, b.data, b.len, &o, &c, &err) == 0);
  TC_CHECK(tc_config_equal(&c, &d));
  /* Headscale defaults that matter for compatibility */
  TC_CHECK(c.dns.override_local_dns);
  TC_CHECK(c.dns.magic_dns);
  TC_CHECK_INT(c.node.ephemeral.inactivity_timeout_ms, 120000);
  TC_CHECK_INT(c.unix_socket_permission, 0770);
  TC_CHECK_STR(c.grpc_listen_addr, ":50443");
  TC_CHECK_INT(c.preauth_keys.revoked_retention_ms, 168 * 3600000LL);
  /* defaults alone do not make a usable server */
  TC_CHECK(tc_config_validate(&d, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "server_url") != NULL);
  tc_config_free(&c);
  tc_config_free(&d);
  tc_buf_free(&b);
}

static char *golden_path(const char *name) {
  const char *src = getenv("TC_SOURCE_DIR");
#ifdef TC_SOURCE_DIR
  if (!src) src = TC_SOURCE_DIR;
#endif
  return tc_xasprintf("%s/tests/config/golden/%s", src ? src : ".", name);
}

TC_TEST(golden_canonical_print_v0_29_2) {
  struct tc_config c;
  struct tc_err err = {0};
  TC_REQUIRE(load_example("v0.29.2", &c, &err) == 0);
  struct tc_buf b = TC_BUF_INIT;
  tc_config_print(&c, &b);
  char *gp = golden_path("config-example-v0.29.2.canonical.yaml");
  if (getenv("TC_UPDATE_GOLDEN")) {
    TC_CHECK(tc_write_file_atomic(gp, b.data, b.len, 0644, &err) == 0);
  }
  char *want = NULL;
  size_t wlen = 0;
  int rc = tc_read_file(gp, 1 << 20, &want, &wlen, &err);
  if (rc) fprintf(stderr, "  %s\n", err.msg);
  TC_REQUIRE(rc == 0);
  if (wlen != b.len || memcmp(want, b.data, wlen)) {
    fprintf(stderr, "  golden mismatch for %s; got:\n%s\n", gp, b.data);
    TC_CHECK(false);
  }
  /* the golden file itself is a valid config equal to the source */
  struct tc_config g;
  struct tc_config_load_opts o = {.env = no_env};
  TC_REQUIRE(tc_config_load_opts(gp, NULL, 0, &o, &g, &err) == 0);
  TC_CHECK(tc_config_equal(&c, &g));
  tc_config_free(&g);
  free(want);
  free(gp);
  tc_buf_free(&b);
  tc_config_free(&c);
}

/* ---- malformed configs ----------------------------------------------------- */

static const char base_cfg[] =
    "server_url: https://hs.example.com\n"            /* 1 */
    "listen_addr: 0.0.0.0:8080\n"                     /* 2 */
    "noise:\n"                                        /* 3 */
    "  private_key_path: /var/lib/tc/noise.key\n"     /* 4 */
    "prefixes:\n"                                     /* 5 */
    "  v4: 100.64.0.0/10\n"                           /* 6 */
    "database:\n"                                     /* 7 */
    "  sqlite:\n"                                     /* 8 */
    "    path: /var/lib/tc/db.sqlite\n"               /* 9 */
    "dns:\n"                                          /* 10 */
    "  base_domain: tailnet.example\n"                /* 11 */
    "  override_local_dns: false\n";                  /* 12 */

/* base_cfg with the first occurrence of find replaced (find NULL: append). */
static char *variant(const char *find, const char *repl) {
  if (!find) return tc_xasprintf("%s%s", base_cfg, repl);
  const char *at = strstr(base_cfg, find);
  if (!at) return NULL;
  return tc_xasprintf("%.*s%s%s", (int)(at - base_cfg), base_cfg, repl, at + strlen(find));
}

static int load_str(const char *text, const char *const *env, struct tc_config *c, struct tc_err *err) {
  struct tc_config_load_opts o = {.env = env ? env : no_env};
  return tc_config_load_opts(NULL, text, strlen(text), &o, c, err);
}

TC_TEST(base_config_is_valid) {
  struct tc_config c;
  struct tc_err err = {0};
  int rc = load_str(base_cfg, NULL, &c, &err);
  if (rc) fprintf(stderr, "  %s\n", err.msg);
  TC_CHECK(rc == 0);
  TC_CHECK_STR(c.server_host, "hs.example.com");
  TC_CHECK_INT(c.prefixes.v6.family, 0);
  TC_CHECK_STR(c.prefixes.v6.text, "");
  tc_config_free(&c);
}

struct bad_case {
  const char *find, *repl;
  const char *want1, *want2;
};

static const struct bad_case bad_cases[] = {
    {NULL, "foo:\n  bar: 1\n", "foo: unknown key", "line 13:1"},
    {NULL, "log:\n  bar: 1\n", "log.bar: unknown key", "line 14:3"},
    {NULL, "derp:\n  server:\n    stun:\n      enabled: true\n", "derp.server.stun: unknown key", "line 15:5"},
    {NULL, "bogus: 1\n", "bogus: unknown key", "line 13:1"},
    {"database:\n", "database:\n  type: mysql\n",
     "database.type: unknown value \"mysql\" (expected sqlite or postgres)", "line 8:9"},
    {"listen_addr: 0.0.0.0:8080", "listen_addr: x", "listen_addr: expected host:port, got \"x\"", "line 2"},
    {"listen_addr: 0.0.0.0:8080", "listen_addr: \"::1:80\"", "listen_addr: expected host:port", NULL},
    {"listen_addr: 0.0.0.0:8080", "listen_addr: 0.0.0.0:99999", "listen_addr: expected host:port", NULL},
    {"listen_addr: 0.0.0.0:8080\n", "", "listen_addr: must be set", NULL},
    {"v4: 100.64.0.0/10", "v4: 100.100.0.0/8", "prefixes.v4: 100.100.0.0/8 is not inside 100.64.0.0/10",
     "line 6"},
    {"v4: 100.64.0.0/10", "v4: banana", "prefixes.v4: invalid CIDR prefix \"banana\"", "line 6"},
    {"v4: 100.64.0.0/10", "v4: 100.64.0.0/33", "prefixes.v4: invalid CIDR prefix", NULL},
    {"v4: 100.64.0.0/10", "v4: fd7a:115c:a1e0::/48", "prefixes.v4: fd7a:115c:a1e0::/48 is not an IPv4", NULL},
    {"v4: 100.64.0.0/10", "v4: 100.64.0.0/10\n  v6: fd00::/8",
     "prefixes.v6: fd00::/8 is not inside fd7a:115c:a1e0::/48", NULL},
    {"prefixes:\n  v4: 100.64.0.0/10\n", "", "prefixes: at least one", NULL},
    {"prefixes:\n  v4: 100.64.0.0/10\n", "prefixes:\n  v4: 100.64.0.0/10\n  allocation: chaotic\n",
     "prefixes.allocation: unknown value \"chaotic\" (expected sequential or random)", NULL},
    {"base_domain: tailnet.example", "base_domain: example.com",
     "dns.base_domain: must not be a suffix of server_url's host", "line 11"},
    {"base_domain: tailnet.example", "base_domain: HS.example.com", "dns.base_domain: must not be the same",
     NULL},
    {"  base_domain: tailnet.example\n", "", "dns.base_domain: must be set when dns.magic_dns", NULL},
    {"base_domain: tailnet.example", "base_domain: bad..domain", "dns.base_domain: \"bad..domain\" is not",
     NULL},
    {"override_local_dns: false", "override_local_dns: true",
     "dns.nameservers.global: must be set when dns.override_local_dns", NULL},
    {NULL, "  nameservers:\n    global: [1.1.1.1, not-an-ip]\n",
     "dns.nameservers.global: \"not-an-ip\" is not an IP address", "line 14"},
    {NULL, "  nameservers:\n    split:\n      corp.example: [bogus]\n", "dns.nameservers.split:", "bogus"},
    {NULL, "  nameservers:\n    split:\n      corp.example: {a: b}\n",
     "dns.nameservers.split.corp.example: expected a list", NULL},
    {NULL, "  extra_records:\n    - {name: a.example, type: CNAME, value: b.example}\n",
     "dns.extra_records[0].type: \"CNAME\" is not supported", "line 14"},
    {NULL, "  extra_records:\n    - {name: a.example, type: A}\n", "dns.extra_records[0].value: required",
     "line 14"},
    {NULL, "  extra_records:\n    - {name: a.example, type: A, value: 100.64.0.1, ttl: 5}\n",
     "dns.extra_records[0].ttl: unknown key", NULL},
    {NULL, "  extra_records:\n    - {name: a.example, type: AAAA, value: 100.64.0.1}\n",
     "dns.extra_records[0].value: \"100.64.0.1\" is not an IPv6 address", NULL},
    {NULL, "  extra_records: [{name: a.example, type: A, value: 100.64.0.1}]\n  extra_records_path: /x.json\n",
     "dns.extra_records_path: cannot be combined", NULL},
    {"server_url: https://hs.example.com", "server_url: ftp://hs.example.com",
     "server_url: must be an http:// or https:// URL, got \"ftp://hs.example.com\"", "line 1"},
    {"server_url: https://hs.example.com", "server_url: https://", "server_url: must be an http", NULL},
    {"server_url: https://hs.example.com", "server_url: https://hs.example.com:70000/",
     "server_url: must be an http", NULL},
    {NULL, "tls_cert_path: /etc/tc/cert.pem\n", "tls_key_path: must be set together with tls_cert_path", NULL},
    {NULL, "tls_key_path: /etc/tc/key.pem\n", "tls_cert_path: must be set together", NULL},
    {NULL, "tls_letsencrypt_hostname: hs.example.com\ntls_cert_path: /a\ntls_key_path: /b\n",
     "tls_letsencrypt_hostname: set either", NULL},
    {NULL, "tls_letsencrypt_challenge_type: DNS-01\n",
     "tls_letsencrypt_challenge_type: unknown value \"DNS-01\" (expected HTTP-01 or TLS-ALPN-01)", NULL},
    {NULL, "unix_socket_permission: \"0999\"\n", "unix_socket_permission: expected an octal", "line 13"},
    {NULL, "unix_socket_permission: \"rwx\"\n", "unix_socket_permission: expected an octal", NULL},
    {NULL, "node:\n  expiry: 5x\n", "node.expiry: expected a duration", "line 14"},
    {NULL, "node:\n  expiry: -5m\n", "node.expiry: expected a duration", NULL},
    {NULL, "node:\n  ephemeral:\n    inactivity_timeout: 30s\n",
     "node.ephemeral.inactivity_timeout: 30s is too low", "line 15"},
    {NULL, "node:\n  routes:\n    ha:\n      probe_interval: 1s\n", "node.routes.ha.probe_interval: must be",
     NULL},
    {NULL, "node:\n  routes:\n    ha:\n      probe_interval: 5s\n      probe_timeout: 5s\n",
     "node.routes.ha.probe_timeout: must be less than", NULL},
    {"database:\n", "database:\n  type: postgres\n", "database.postgres.host: must be set", NULL},
    {"database:\n", "database:\n  type: postgres\n  postgres:\n    host: db\n",
     "database.postgres.name: must be set", NULL},
    {"database:\n", "database:\n  type: postgres\n  postgres:\n    host: db\n    name: x\n    ssl: maybe\n",
     "database.postgres.ssl: unknown value \"maybe\"", NULL},
    {"  sqlite:\n", "  sqlite:\n    wal_autocheckpoint: -1\n",
     "database.sqlite.wal_autocheckpoint: expected a non-negative integer", NULL},
    {"path: /var/lib/tc/db.sqlite", "path: \"\"", "database.sqlite.path: must be set", NULL},
    {"  private_key_path: /var/lib/tc/noise.key\n", "  private_key_path: \"\"\n",
     "noise.private_key_path: must be set", NULL},
    {NULL, "grpc_allow_insecure: maybe\n", "grpc_allow_insecure: expected true or false, got \"maybe\"",
     "line 13"},
    {NULL, "derp:\n  urls:\n    a: b\n", "derp.urls: expected a list", NULL},
    {NULL, "derp:\n  urls: [ftp://x]\n", "derp.urls: \"ftp://x\" is not an http(s) URL", NULL},
    {NULL, "derp:\n  urls: [[nested]]\n", "derp.urls[0]: expected a string", NULL},
    {NULL, "derp:\n  server:\n    enabled: true\n    region_id: 999\n",
     "derp.server.stun_listen_addr: must be set", NULL},
    {NULL, "derp:\n  server:\n    ipv4: 2001:db8::1\n", "derp.server.ipv4: \"2001:db8::1\" is not an IPv4",
     NULL},
    {NULL, "log: 5\n", "log: expected a mapping", "line 13"},
    {NULL, "log:\n  level: loud\n", "log.level: unknown value \"loud\"", NULL},
    {NULL, "log:\n  format: xml\n", "log.format: unknown value \"xml\" (expected text or json)", NULL},
    {NULL, "policy:\n  mode: cloud\n", "policy.mode: unknown value \"cloud\" (expected file or database)", NULL},
    {NULL, "listen_addr: 1.2.3.4:1\n", "listen_addr: duplicate key (first at line 2)", "line 13"},
    {NULL, "ip_prefixes: [100.64.0.0/10]\n", "ip_prefixes: removed in Headscale 0.23", "line 13"},
    {NULL, "db_type: sqlite3\n", "db_type: removed", NULL},
    {NULL, "oidc:\n  map_legacy_users: true\n", "oidc.map_legacy_users: removed", NULL},
    {NULL, "acl_policy_path: /etc/acl.hujson\n", "acl_policy_path: removed in Headscale 0.23; use policy.path",
     NULL},
    {NULL, "oidc:\n  client_secret: a\n  client_secret_path: /b\n",
     "oidc.client_secret_path: cannot be combined with oidc.client_secret", NULL},
    {NULL, "oidc:\n  issuer: https://idp.example.com\n", "oidc.client_id: must be set", NULL},
    {NULL, "oidc:\n  issuer: not a url\n  client_id: x\n", "oidc.issuer: must be an http(s) URL", NULL},
    {NULL, "oidc:\n  pkce:\n    method: S512\n", "oidc.pkce.method: unknown value \"S512\"", NULL},
    {NULL, "oidc:\n  extra_params: [a]\n", "oidc.extra_params: expected a mapping", NULL},
    {NULL, "trusted_proxies: [0.0.0.0/0]\n", "trusted_proxies: 0.0.0.0/0 covers every address", NULL},
    {NULL, "trusted_proxies: [10.0.0.1]\n", "trusted_proxies: item 0: invalid CIDR prefix", NULL},
    {NULL, "tuning:\n  node_store_batch_size: 0\n", "tuning.node_store_batch_size: must be positive", NULL},
    {NULL, "server_url: [a]\n", "server_url: duplicate key", NULL},
    {NULL, "metrics_listen_addr: {a: b}\n", "metrics_listen_addr: expected a single value, got a mapping",
     NULL},
    {NULL, "? [a]\n: b\n", "mapping keys must be non-empty plain strings", "line 13"},
    {NULL, "<<: {bogus: 1}\n", "merge keys", NULL},
    {NULL, "x: \"unterminated\n", "yaml: line ", "quoted scalar"},
    {NULL, "  - list item in a mapping\n", "yaml: line 13", NULL},
    {NULL, "\tlisten_addr: 1\n", "yaml: line 13", NULL},
    {NULL, "---\nfoo: 1\n", "only one YAML document", NULL},
};

TC_TEST(malformed_configs_name_the_key) {
  for (size_t i = 0; i < TC_ARRAY_LEN(bad_cases); i++) {
    const struct bad_case *bc = &bad_cases[i];
    char *text = variant(bc->find, bc->repl);
    if (!text) {
      fprintf(stderr, "  case %zu: find text not in base\n", i);
      TC_CHECK(false);
      continue;
    }
    struct tc_config c;
    struct tc_err err = {0};
    int rc = load_str(text, NULL, &c, &err);
    bool ok = rc < 0 && strstr(err.msg, bc->want1) && (!bc->want2 || strstr(err.msg, bc->want2));
    if (!ok) {
      fprintf(stderr, "  case %zu: rc=%d msg=\"%s\"\n    want \"%s\"%s%s\n", i, rc, err.msg, bc->want1,
              bc->want2 ? " and " : "", bc->want2 ? bc->want2 : "");
      TC_CHECK(false);
    }
    if (rc == 0) tc_config_free(&c);
    tc_config_free(&c); /* zeroed on failure: must be safe */
    free(text);
  }
}

TC_TEST(whole_document_shapes) {
  struct tc_config c;
  struct tc_err err = {0};
  TC_CHECK(load_str("- a\n- b\n", NULL, &c, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "expected a mapping") != NULL);
  TC_CHECK(load_str("", NULL, &c, &err) == TC_EINVAL); /* empty: defaults, which do not validate */
  TC_CHECK(strstr(err.msg, "server_url: must be set") != NULL);
  TC_CHECK(load_str("just a string\n", NULL, &c, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "expected a mapping") != NULL);
  /* NUL bytes inside the text never reach a C string */
  static const char nul[] = "server_url: \"https://a\\0b\"\n";
  TC_CHECK(load_str(nul, NULL, &c, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "server_url") != NULL);
  /* a missing file is a clean error */
  TC_CHECK(tc_config_load("/nonexistent/tailcoat.yaml", &c, &err) < 0);
  TC_CHECK(strstr(err.msg, "/nonexistent/tailcoat.yaml") != NULL);
}

/* ---- environment ------------------------------------------------------------- */

TC_TEST(env_overrides) {
  struct tc_config c;
  struct tc_err err = {0};
  const char *env1[] = {"HEADSCALE_DNS_BASE_DOMAIN=hs-env.example",
                        "HEADSCALE_LISTEN_ADDR=127.0.0.1:1",
                        "TAILCOAT_LISTEN_ADDR=127.0.0.1:2",
                        "HEADSCALE_DNS_NAMESERVERS_GLOBAL=1.1.1.1, 8.8.8.8  9.9.9.9",
                        "TAILCOAT_LOGTAIL_ENABLED=true",
                        "HEADSCALE_DNS_MAGIC_DNS=FALSE",
                        "TAILCOAT_NODE_EXPIRY=90d",
                        "HEADSCALE_DERP_UPDATE_FREQUENCY=1h30m",
                        "HEADSCALE_DATABASE_POSTGRES_PORT=5433",
                        "HEADSCALE_UNIX_SOCKET_PERMISSION=0o700",
                        "TAILCOAT_METRICS_LISTEN_ADDR=",  /* empty: ignored, viper-style */
                        "HEADSCALE_METRICS_LISTEN_ADDR=127.0.0.1:9999",
                        "HEADSCALE_LOG_LEVEL=debug",
                        "UNRELATED=1",
                        NULL};
  int rc = load_str(base_cfg, env1, &c, &err);
  if (rc) fprintf(stderr, "  %s\n", err.msg);
  TC_REQUIRE(rc == 0);
  TC_CHECK_STR(c.dns.base_domain, "hs-env.example"); /* env beats the file */
  TC_CHECK_STR(c.listen_addr, "127.0.0.1:2");        /* TAILCOAT_ beats HEADSCALE_ */
  TC_REQUIRE(c.dns.nameservers.global.n == 3);
  TC_CHECK_STR(c.dns.nameservers.global.v[1], "8.8.8.8");
  TC_CHECK_STR(c.dns.nameservers.global.v[2], "9.9.9.9");
  TC_CHECK(c.logtail.enabled);
  TC_CHECK(!c.dns.magic_dns);
  TC_CHECK_INT(c.node.expiry_ms, 90LL * 86400000);
  TC_CHECK_INT(c.derp.update_frequency_ms, 90LL * 60000);
  TC_CHECK_INT(c.database.postgres.port, 5433);
  TC_CHECK_INT(c.unix_socket_permission, 0700);
  TC_CHECK_STR(c.metrics_listen_addr, "127.0.0.1:9999");
  TC_CHECK_INT(c.log.level, TC_LOG_DEBUG);
  tc_config_free(&c);

  /* bad values name the key and the variable */
  const char *env2[] = {"TAILCOAT_LOGTAIL_ENABLED=perhaps", NULL};
  TC_CHECK(load_str(base_cfg, env2, &c, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "logtail.enabled: expected true or false") != NULL);
  TC_CHECK(strstr(err.msg, "TAILCOAT_LOGTAIL_ENABLED") != NULL);
  const char *env3[] = {"HEADSCALE_LISTEN_ADDR=x", NULL};
  TC_CHECK(load_str(base_cfg, env3, &c, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "listen_addr: expected host:port, got \"x\" (from HEADSCALE_LISTEN_ADDR)") != NULL);
  const char *env4[] = {"HEADSCALE_NODE_EPHEMERAL_INACTIVITY_TIMEOUT=soon", NULL};
  TC_CHECK(load_str(base_cfg, env4, &c, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "node.ephemeral.inactivity_timeout: expected a duration") != NULL);

  /* no_env ignores the process environment; real environ is used otherwise */
  setenv("TAILCOAT_DNS_BASE_DOMAIN", "from-environ.example", 1);
  struct tc_config_load_opts o = {.no_env = true};
  TC_REQUIRE(tc_config_load_opts(NULL, base_cfg, strlen(base_cfg), &o, &c, &err) == 0);
  TC_CHECK_STR(c.dns.base_domain, "tailnet.example");
  tc_config_free(&c);
  TC_REQUIRE(tc_config_load_text(base_cfg, strlen(base_cfg), &c, &err) == 0);
  TC_CHECK_STR(c.dns.base_domain, "from-environ.example");
  tc_config_free(&c);
  unsetenv("TAILCOAT_DNS_BASE_DOMAIN");
}

/* ---- deprecated and removed keys ------------------------------------------------ */

TC_TEST(deprecated_keys) {
  struct tc_config c;
  struct tc_err err = {0};
  /* old key alone feeds the new one */
  char *t = variant(NULL, "ephemeral_node_inactivity_timeout: 10m\n");
  TC_REQUIRE(load_str(t, NULL, &c, &err) == 0);
  TC_CHECK_INT(c.node.ephemeral.inactivity_timeout_ms, 600000);
  TC_CHECK(has_warning(&c, "ephemeral_node_inactivity_timeout: deprecated (line 13)"));
  tc_config_free(&c);
  free(t);
  /* the new key wins in either order */
  t = variant(NULL, "ephemeral_node_inactivity_timeout: 10m\nnode:\n  ephemeral:\n    inactivity_timeout: 20m\n");
  TC_REQUIRE(load_str(t, NULL, &c, &err) == 0);
  TC_CHECK_INT(c.node.ephemeral.inactivity_timeout_ms, 1200000);
  tc_config_free(&c);
  free(t);
  t = variant(NULL, "node:\n  ephemeral:\n    inactivity_timeout: 20m\nephemeral_node_inactivity_timeout: 10m\n");
  TC_REQUIRE(load_str(t, NULL, &c, &err) == 0);
  TC_CHECK_INT(c.node.ephemeral.inactivity_timeout_ms, 1200000);
  tc_config_free(&c);
  /* ... also when the old key comes from the environment */
  const char *env[] = {"HEADSCALE_EPHEMERAL_NODE_INACTIVITY_TIMEOUT=5m", NULL};
  TC_REQUIRE(load_str(t, env, &c, &err) == 0);
  TC_CHECK_INT(c.node.ephemeral.inactivity_timeout_ms, 1200000);
  tc_config_free(&c);
  free(t);
  TC_REQUIRE(load_str(base_cfg, env, &c, &err) == 0);
  TC_CHECK_INT(c.node.ephemeral.inactivity_timeout_ms, 300000);
  TC_CHECK(has_warning(&c, "HEADSCALE_EPHEMERAL_NODE_INACTIVITY_TIMEOUT"));
  tc_config_free(&c);

  /* keys Headscale still accepts load with a warning and keep their value */
  t = variant(NULL, "randomize_client_port: true\noidc:\n  expiry: 180d\n  strip_email_domain: true\n");
  TC_REQUIRE(load_str(t, NULL, &c, &err) == 0);
  TC_CHECK(c.randomize_client_port);
  TC_CHECK_INT(c.oidc.expiry_ms, 180LL * 86400000);
  TC_CHECK(c.oidc.strip_email_domain);
  TC_CHECK(has_warning(&c, "randomize_client_port: deprecated"));
  TC_CHECK(has_warning(&c, "oidc.expiry: deprecated"));
  TC_CHECK(has_warning(&c, "oidc.strip_email_domain: deprecated"));
  /* and survive the canonical round trip (printed because non-default) */
  struct tc_buf b = TC_BUF_INIT;
  tc_config_print(&c, &b);
  TC_CHECK(strstr(b.data, "randomize_client_port: true") != NULL);
  struct tc_config c2;
  TC_REQUIRE(load_str(b.data, NULL, &c2, &err) == 0);
  TC_CHECK(tc_config_equal(&c, &c2));
  tc_config_free(&c2);
  tc_buf_free(&b);
  tc_config_free(&c);
  free(t);

  /* dns_config next to dns: ignored with a warning; alone: refused */
  t = variant(NULL, "dns_config:\n  magic_dns: true\n");
  TC_REQUIRE(load_str(t, NULL, &c, &err) == 0);
  TC_CHECK(has_warning(&c, "dns_config: ignored"));
  tc_config_free(&c);
  free(t);
  t = variant("dns:\n  base_domain: tailnet.example\n  override_local_dns: false\n",
              "dns_config:\n  base_domain: tailnet.example\n");
  TC_REQUIRE(t != NULL);
  TC_CHECK(load_str(t, NULL, &c, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "dns_config: removed in Headscale 0.23; move its settings under dns") != NULL);
  free(t);
}

/* ---- other behaviour ---------------------------------------------------------------- */

TC_TEST(structured_values_parse_and_print) {
  struct tc_config c;
  struct tc_err err = {0};
  char *t = variant(NULL,
                    "  nameservers:\n"
                    "    global: [1.1.1.1, \"https://dns.nextdns.io/abc123\", \"[2606:4700::1111]:53\"]\n"
                    "    split:\n"
                    "      corp.example: [10.0.0.53]\n"
                    "      lab.example:\n"
                    "        - 10.1.0.53\n"
                    "        - 10.1.0.54\n"
                    "  search_domains: corp.example lab.example\n"
                    "  extra_records:\n"
                    "    - name: grafana.tailnet.example\n"
                    "      type: A\n"
                    "      value: 100.64.0.3\n"
                    "    - {name: \"v6.tailnet.example\", type: \"AAAA\", value: \"fd7a:115c:a1e0::3\"}\n"
                    "oidc:\n"
                    "  issuer: https://idp.example.com/realms/x\n"
                    "  client_id: tailcoat\n"
                    "  client_secret: \"s3cr\\\"et\\n\"\n"
                    "  extra_params:\n"
                    "    domain_hint: example.com\n"
                    "    prompt: ~\n"
                    "  allowed_groups: [/headscale]\n"
                    "trusted_proxies: [127.0.0.1/32, \"10.1.2.3/8\"]\n"
                    "derp:\n"
                    "  paths: [relative.yaml]\n");
  int rc = load_str(t, NULL, &c, &err);
  if (rc) fprintf(stderr, "  %s\n", err.msg);
  TC_REQUIRE(rc == 0);
  TC_CHECK_INT(c.dns.nameservers.global.n, 3);
  TC_REQUIRE(c.dns.nameservers.n_split == 2);
  TC_CHECK_STR(c.dns.nameservers.split[1].domain, "lab.example");
  TC_CHECK_INT(c.dns.nameservers.split[1].nameservers.n, 2);
  TC_CHECK_INT(c.dns.search_domains.n, 2);
  TC_REQUIRE(c.dns.n_extra_records == 2);
  TC_CHECK_STR(c.dns.extra_records[1].type, "AAAA");
  TC_CHECK_STR(c.oidc.client_secret, "s3cr\"et\n");
  TC_REQUIRE(c.oidc.n_extra_params == 2);
  TC_CHECK_STR(c.oidc.extra_params[0].key, "domain_hint");
  TC_CHECK_STR(c.oidc.extra_params[1].value, "");
  TC_REQUIRE(c.trusted_proxies.n == 2);
  TC_CHECK_INT(c.trusted_proxies.v[1].bits, 8);
  TC_CHECK(c.trusted_proxies.v[1].addr[0] == 10 && c.trusted_proxies.v[1].addr[1] == 0); /* masked */
  TC_CHECK_STR(c.trusted_proxies.v[1].text, "10.1.2.3/8");
  roundtrip(&c);
  /* copy is deep and equal; a change is noticed */
  struct tc_config d;
  tc_config_copy(&d, &c);
  TC_CHECK(tc_config_equal(&c, &d));
  free(d.dns.nameservers.split[0].nameservers.v[0]);
  d.dns.nameservers.split[0].nameservers.v[0] = tc_xstrdup("10.0.0.54");
  TC_CHECK(!tc_config_equal(&c, &d));
  tc_config_free(&d);
  tc_config_copy(&d, &c);
  d.node.expiry_ms++;
  TC_CHECK(!tc_config_equal(&c, &d));
  tc_config_free(&d);
  tc_config_free(&c);
  free(t);
}

TC_TEST(relative_paths_resolve_against_config_dir) {
  char *dir = tc_test_tmpdir();
  char *path = tc_xasprintf("%s/config.yaml", dir);
  char *t = variant("  private_key_path: /var/lib/tc/noise.key\n", "  private_key_path: keys/noise.key\n");
  struct tc_err err = {0};
  TC_REQUIRE(tc_write_file_atomic(path, t, strlen(t), 0644, &err) == 0);
  struct tc_config c;
  struct tc_config_load_opts o = {.env = no_env};
  TC_REQUIRE(tc_config_load_opts(path, NULL, 0, &o, &c, &err) == 0);
  char *want = tc_xasprintf("%s/keys/noise.key", dir);
  TC_CHECK_STR(c.noise.private_key_path, want);
  TC_CHECK_STR(c.database.sqlite.path, "/var/lib/tc/db.sqlite");
  TC_CHECK_STR(c.source_path, path);
  free(want);
  tc_config_free(&c);
  free(t);
  free(path);
  free(dir);
}

TC_TEST(durations_are_exact_and_go_formatted) {
  struct tc_config c;
  struct tc_err err = {0};
  char *t = variant(NULL,
                    "derp:\n  update_frequency: 0.3s\n"
                    "node:\n  expiry: 1.5h\n  ephemeral:\n    inactivity_timeout: 2w\n"
                    "preauth_keys:\n  revoked_retention: 1y\n"
                    "tuning:\n  batch_change_delay: 1500us\n"
                    "database:\n  gorm:\n    slow_threshold: 2s\n");
  /* database is already in base: use a separate slow_threshold check below */
  TC_CHECK(load_str(t, NULL, &c, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "database: duplicate key") != NULL);
  free(t);
  t = variant(NULL,
              "derp:\n  update_frequency: 0.3s\n"
              "node:\n  expiry: 1.5h\n  ephemeral:\n    inactivity_timeout: 2w\n"
              "preauth_keys:\n  revoked_retention: 1y\n"
              "tuning:\n  batch_change_delay: 1500us\n");
  TC_REQUIRE(load_str(t, NULL, &c, &err) == 0);
  TC_CHECK_INT(c.derp.update_frequency_ms, 300);
  TC_CHECK_INT(c.node.expiry_ms, 5400000);
  TC_CHECK_INT(c.node.ephemeral.inactivity_timeout_ms, 14LL * 86400000);
  TC_CHECK_INT(c.preauth_keys.revoked_retention_ms, 365LL * 86400000);
  TC_CHECK_INT(c.tuning.batch_change_delay_ms, 1);
  struct tc_buf b = TC_BUF_INIT;
  tc_config_print(&c, &b);
  TC_CHECK(strstr(b.data, "  update_frequency: 300ms\n") != NULL);
  TC_CHECK(strstr(b.data, "  batch_change_delay: 1ms\n") != NULL);
  TC_CHECK(strstr(b.data, "  expiry: 1h30m0s\n") != NULL);
  TC_CHECK(strstr(b.data, "    inactivity_timeout: 336h0m0s\n") != NULL);
  tc_buf_free(&b);
  roundtrip(&c);
  tc_config_free(&c);
  free(t);
}

TC_TEST(prefix_and_hostport_helpers) {
  struct tc_prefix p, q;
  TC_REQUIRE(tc_prefix_parse("100.64.1.2/24", &p) == 0);
  TC_CHECK(p.addr[2] == 1 && p.addr[3] == 0);
  TC_REQUIRE(tc_prefix_parse("100.64.0.0/10", &q) == 0);
  TC_CHECK(tc_prefix_contains(&q, &p));
  TC_CHECK(!tc_prefix_contains(&p, &q));
  free(p.text);
  TC_REQUIRE(tc_prefix_parse("100.128.0.0/16", &p) == 0);
  TC_CHECK(!tc_prefix_contains(&q, &p));
  free(p.text);
  free(q.text);
  TC_CHECK(tc_prefix_parse("100.64.0.0", &p) == TC_EINVAL);
  TC_CHECK(tc_prefix_parse("100.64.0.0/010", &p) == TC_EINVAL);
  TC_CHECK(tc_prefix_parse("fd7a::/129", &p) == TC_EINVAL);
  TC_CHECK(tc_prefix_parse("/8", &p) == TC_EINVAL);
  char host[256];
  int port;
  TC_CHECK(tc_hostport_split("[::1]:443", host, &port) == 0);
  TC_CHECK_STR(host, "::1");
  TC_CHECK_INT(port, 443);
  TC_CHECK(tc_hostport_split(":8080", host, &port) == 0);
  TC_CHECK_STR(host, "");
  TC_CHECK(tc_hostport_split("localhost:0", host, &port) == 0);
  TC_CHECK(tc_hostport_split("localhost", host, &port) == TC_EINVAL);
  TC_CHECK(tc_hostport_split("a b:1", host, &port) == TC_EINVAL);
  TC_CHECK(tc_hostport_split("[::1]443", host, &port) == TC_EINVAL);
  TC_CHECK(tc_hostport_split(":http", host, &port) == TC_EINVAL);
}

TC_TEST(mode_and_bool_spellings) {
  struct tc_config c;
  struct tc_err err = {0};
  char *t = variant(NULL, "unix_socket_permission: 0660\ngrpc_allow_insecure: \"True\"\nlogtail:\n  enabled: yes\n");
  TC_REQUIRE(load_str(t, NULL, &c, &err) == 0);
  TC_CHECK_INT(c.unix_socket_permission, 0660); /* an unquoted 0660 is still octal text */
  TC_CHECK(c.grpc_allow_insecure);
  TC_CHECK(c.logtail.enabled);
  tc_config_free(&c);
  free(t);
  t = variant("database:\n", "database:\n  type: sqlite3\n");
  TC_REQUIRE(load_str(t, NULL, &c, &err) == 0);
  TC_CHECK_INT(c.database.type, TC_CFG_DB_SQLITE);
  tc_config_free(&c);
  free(t);
}

TC_TEST(hostile_yaml_is_bounded) {
  /* deep nesting and alias fan-out must fail fast and cleanly, not blow up */
  struct tc_buf b = TC_BUF_INIT;
  for (int i = 0; i < 5000; i++) tc_buf_puts(&b, "[");
  struct tc_config c;
  struct tc_err err = {0};
  TC_CHECK(load_str(b.data, NULL, &c, &err) < 0);
  tc_buf_reset(&b);
  tc_buf_puts(&b, "a: &a [x, x, x, x, x, x, x, x]\n");
  tc_buf_puts(&b, "derp:\n  urls: *a\n");
  TC_CHECK(load_str(b.data, NULL, &c, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "a: unknown key") != NULL);
  tc_buf_free(&b);
}

TC_TEST(huge_inputs_fail_cleanly) {
  struct tc_config c;
  struct tc_err err = {0};
  /* deep nesting: libyaml must not recurse itself to death */
  size_t n = 200000;
  char *deep = tc_xmalloc(2 * n + 1);
  memset(deep, '[', n);
  memset(deep + n, ']', n);
  deep[2 * n] = 0;
  int64_t t0 = tc_mono_ms();
  TC_CHECK(load_str(deep, NULL, &c, &err) == TC_ETOOBIG);
  TC_CHECK(strstr(err.msg, "nested deeper than") != NULL);
  TC_CHECK(tc_mono_ms() - t0 < 5000);
  free(deep);
  /* a mapping with very many keys is refused before the quadratic duplicate check */
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_puts(&b, "oidc:\n  extra_params:\n");
  for (int i = 0; i < 5000; i++) tc_buf_printf(&b, "    k%d: v\n", i);
  TC_CHECK(load_str(b.data, NULL, &c, &err) == TC_EINVAL);
  TC_CHECK(strstr(err.msg, "oidc.extra_params: more than") != NULL);
  tc_buf_free(&b);
}

/* Property: random byte mutations of a real config either fail with a
 * message or load into something that survives print -> load -> equal. */
TC_TEST(mutated_examples_never_crash_and_round_trip) {
  char *p = example_path("v0.29.2");
  char *orig = NULL;
  size_t len = 0;
  struct tc_err err = {0};
  TC_REQUIRE(tc_read_file(p, 1 << 20, &orig, &len, &err) == 0);
  free(p);
  uint64_t seed = 0x9e3779b97f4a7c15ULL;
  static const char alphabet[] = " :-[]{}\"'\n#&*!|>?,0a.\\\t";
  int loaded = 0;
  for (int iter = 0; iter < 400; iter++) {
    char *t = tc_xmalloc(len + 1);
    memcpy(t, orig, len + 1);
    int flips = 1 + iter % 4;
    for (int f = 0; f < flips; f++) {
      seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
      size_t pos = (size_t)(seed % len);
      t[pos] = alphabet[(seed >> 32) % (sizeof(alphabet) - 1)];
    }
    struct tc_config c;
    struct tc_config_load_opts o = {.env = no_env};
    int rc = tc_config_load_opts(NULL, t, len, &o, &c, &err);
    if (rc == 0) {
      loaded++;
      roundtrip(&c);
      tc_config_free(&c);
    } else {
      TC_CHECK(err.msg[0] != 0);
    }
    free(t);
  }
  TC_CHECK(loaded > 0); /* most flips land in comments */
  free(orig);
}

TC_TEST(blank_values_mean_default) {
  struct tc_config c;
  struct tc_err err = {0};
  char *t = variant("database:\n", "database:\n  type: postgres\n  postgres:\n    host: /run/postgresql\n"
                                    "    port:\n    name: tc\n    max_open_conns: \"\"\n");
  TC_REQUIRE(t != NULL);
  char *t2 = tc_xasprintf("%s%s", t,
                          "derp:\n  server:\n    verify_clients:\n  update_frequency: ~\n"
                          "unix_socket:\noidc:\n  scope: null\n");
  int rc = load_str(t2, NULL, &c, &err);
  if (rc) fprintf(stderr, "  %s\n", err.msg);
  TC_REQUIRE(rc == 0);
  TC_CHECK_INT(c.database.type, TC_CFG_DB_POSTGRES);
  TC_CHECK_INT(c.database.postgres.port, 0);
  TC_CHECK_INT(c.database.postgres.max_open_conns, 10);
  TC_CHECK(c.derp.server.verify_clients);
  TC_CHECK_INT(c.derp.update_frequency_ms, 3 * 3600000LL);
  TC_CHECK_STR(c.unix_socket, "/var/run/headscale/headscale.sock");
  TC_CHECK_INT(c.oidc.scope.n, 3);
  roundtrip(&c);
  tc_config_free(&c);
  free(t2);
  free(t);
}

TC_TEST(find_and_oidc_secret) {
  char *dir = tc_test_tmpdir();
  char *cfgp = tc_xasprintf("%s/my.yaml", dir);
  struct tc_err err = {0};
  TC_REQUIRE(tc_write_file_atomic(cfgp, base_cfg, strlen(base_cfg), 0644, &err) == 0);
  char *e1 = tc_xasprintf("HEADSCALE_CONFIG=%s", cfgp);
  const char *env[] = {"TAILCOAT_CONFIG=/nonexistent/x.yaml", e1, NULL};
  char *found = tc_config_find(env);
  TC_CHECK_STR(found, cfgp);
  free(found);

  char *secp = tc_xasprintf("%s/creds/oidc_client_secret", dir);
  char *credsdir = tc_xasprintf("%s/creds", dir);
  TC_REQUIRE(mkdir(credsdir, 0700) == 0);
  TC_REQUIRE(tc_write_file_atomic(secp, "  hunter2\n", 10, 0600, &err) == 0);
  char *e2 = tc_xasprintf("CREDENTIALS_DIRECTORY=%s", credsdir);
  const char *env2[] = {e2, NULL};
  char *t = variant(NULL, "oidc:\n  client_secret_path: \"${CREDENTIALS_DIRECTORY}/oidc_client_secret\"\n");
  struct tc_config c;
  TC_REQUIRE(load_str(t, NULL, &c, &err) == 0);
  char *secret = NULL;
  TC_CHECK(tc_config_oidc_client_secret(&c, env2, &secret, &err) == 0);
  TC_CHECK_STR(secret, "hunter2");
  free(secret);
  const char *env3[] = {NULL};
  TC_CHECK(tc_config_oidc_client_secret(&c, env3, &secret, &err) < 0); /* expands to /oidc_client_secret */
  TC_CHECK(strstr(err.msg, "oidc.client_secret_path") != NULL);
  TC_CHECK(secret == NULL);
  tc_config_free(&c);
  free(t);
  t = variant(NULL, "oidc:\n  client_secret: inline\n");
  TC_REQUIRE(load_str(t, NULL, &c, &err) == 0);
  TC_CHECK(tc_config_oidc_client_secret(&c, env3, &secret, &err) == 0);
  TC_CHECK_STR(secret, "inline");
  free(secret);
  tc_config_free(&c);
  free(t);
  free(e1);
  free(e2);
  free(secp);
  free(credsdir);
  free(cfgp);
  free(dir);
}

TC_TEST(json_config_loads) {
  /* Headscale also reads config.json; JSON is YAML, so the same loader works */
  static const char json[] =
      "{\"server_url\": \"https://hs.example.com\", \"listen_addr\": \"0.0.0.0:8080\",\n"
      " \"noise\": {\"private_key_path\": \"/k\"}, \"prefixes\": {\"v6\": \"fd7a:115c:a1e0::/64\"},\n"
      " \"database\": {\"type\": \"sqlite3\", \"sqlite\": {\"path\": \"/db\"}},\n"
      " \"dns\": {\"magic_dns\": false, \"override_local_dns\": false,\n"
      "         \"extra_records\": [{\"name\": \"x.y\", \"type\": \"A\", \"value\": \"100.64.0.9\"}]},\n"
      " \"log\": {\"level\": \"trace\", \"format\": \"json\"}}\n";
  struct tc_config c;
  struct tc_err err = {0};
  int rc = load_str(json, NULL, &c, &err);
  if (rc) fprintf(stderr, "  %s\n", err.msg);
  TC_REQUIRE(rc == 0);
  TC_CHECK_INT(c.prefixes.v4.family, 0);
  TC_CHECK_INT(c.prefixes.v6.bits, 64);
  TC_CHECK_INT(c.dns.n_extra_records, 1);
  TC_CHECK_INT(c.log.level, TC_LOG_TRACE);
  TC_CHECK_INT(c.log.format, TC_LOG_FORMAT_JSON);
  roundtrip(&c);
  tc_config_free(&c);
}

/* Un-comments the example blocks "# oidc:", "  # postgres:" and "# tuning:"
 * of a Headscale example file, so the keys Headscale documents only in
 * comments are proven known too. drop_line: lines containing it are left out. */
static char *uncomment_blocks(const char *text, const char *drop_line) {
  struct tc_buf out = TC_BUF_INIT;
  const char *p = text;
  int in_block = -1; /* indentation of the current block, or -1 */
  while (*p) {
    const char *nl = strchr(p, '\n');
    size_t n = nl ? (size_t)(nl - p) : strlen(p);
    char *line = tc_xstrndup(p, n);
    p += n + (nl ? 1 : 0);
    int ind = 0;
    while (line[ind] == ' ') ind++;
    if (in_block < 0) {
      static const char *const starts[] = {"# oidc:", "# postgres:", "# tuning:"};
      for (size_t i = 0; i < TC_ARRAY_LEN(starts); i++)
        if (!strcmp(line + ind, starts[i])) in_block = ind;
    } else if (!line[0]) {
      /* a blank line continues the block only if nested content follows */
      const char *q = p;
      while (*q == '\n') q++;
      int qi = 0;
      while (q[qi] == ' ') qi++;
      if (!(qi == in_block && !strncmp(q + qi, "#  ", 3))) in_block = -1;
    } else if (!(ind == in_block && line[ind] == '#')) {
      in_block = -1;
    }
    if (in_block >= 0 && line[0]) {
      if (drop_line && strstr(line, drop_line)) {
        free(line);
        continue;
      }
      size_t skip = (size_t)ind + 1 + (line[ind + 1] == ' ' ? 1 : 0);
      tc_buf_append(&out, line, (size_t)ind);
      tc_buf_puts(&out, line + skip);
    } else {
      tc_buf_puts(&out, line);
    }
    tc_buf_putc(&out, '\n');
    free(line);
  }
  return tc_buf_steal(&out, NULL);
}

TC_TEST(examples_commented_blocks_are_known_keys) {
  for (size_t i = 0; i < TC_ARRAY_LEN(versions); i++) {
    const char *ver = versions[i];
    char *p = example_path(ver);
    char *orig = NULL;
    size_t len = 0;
    struct tc_err err = {0};
    TC_REQUIRE(tc_read_file(p, 1 << 20, &orig, &len, &err) == 0);
    free(p);
    struct tc_config c;
    /* the oidc example sets both secret forms, which Headscale refuses too */
    char *t = uncomment_blocks(orig, NULL);
    TC_CHECK(strstr(t, "\noidc:\n") != NULL);
    TC_CHECK(strstr(t, "\n  postgres:\n") != NULL);
    TC_CHECK(strstr(t, "\n    host: localhost\n") != NULL);
    TC_CHECK(load_str(t, NULL, &c, &err) == TC_EINVAL);
    TC_CHECK(strstr(err.msg, "oidc.client_secret_path: cannot be combined") != NULL);
    free(t);
    t = uncomment_blocks(orig, "client_secret_path:");
    int rc = load_str(t, NULL, &c, &err);
    if (rc) fprintf(stderr, "  %s: %s\n", ver, err.msg);
    TC_REQUIRE(rc == 0);
    bool v26 = !strcmp(ver, "v0.26.1"), v29 = !strcmp(ver, "v0.29.2");
    TC_CHECK(c.oidc.only_start_if_oidc_is_available);
    TC_CHECK_STR(c.oidc.issuer, "https://your-oidc.issuer.com/path");
    TC_CHECK_STR(c.oidc.client_id, "your-oidc-client-id");
    TC_CHECK_STR(c.oidc.client_secret, "your-oidc-client-secret");
    TC_CHECK_INT(c.oidc.scope.n, v26 ? 4 : 3);
    TC_REQUIRE(c.oidc.n_extra_params == 1);
    TC_CHECK_STR(c.oidc.extra_params[0].key, "domain_hint");
    TC_CHECK_STR(c.oidc.extra_params[0].value, "example.com");
    TC_REQUIRE(c.oidc.allowed_domains.n == 1 && c.oidc.allowed_users.n == 1 && c.oidc.allowed_groups.n == 1);
    TC_CHECK_STR(c.oidc.allowed_users.v[0], "alice@example.com");
    TC_CHECK_STR(c.oidc.allowed_groups.v[0], "/headscale");
    TC_CHECK(!c.oidc.pkce.enabled);
    TC_CHECK_STR(c.oidc.pkce.method, "S256");
    TC_CHECK(!c.oidc.use_expiry_from_token);
    /* oidc.expiry lived in the examples until 0.28; 0.29 moved it to node.expiry */
    TC_CHECK_INT(c.oidc.expiry_ms, v29 ? 0 : 180LL * 86400000);
    TC_CHECK(has_warning(&c, "oidc.expiry") == !v29);
    TC_CHECK_INT(c.database.type, TC_CFG_DB_SQLITE); /* postgres settings present but unused */
    TC_CHECK_STR(c.database.postgres.host, "localhost");
    TC_CHECK_INT(c.database.postgres.port, 5432);
    TC_CHECK_STR(c.database.postgres.name, "headscale");
    TC_CHECK_STR(c.database.postgres.user, "foo");
    TC_CHECK_STR(c.database.postgres.pass, "bar");
    TC_CHECK_INT(c.database.postgres.max_open_conns, 10);
    TC_CHECK_INT(c.database.postgres.conn_max_idle_time_secs, 3600);
    roundtrip(&c);
    tc_config_free(&c);
    free(t);
    free(orig);
  }
}

TC_TEST(crlf_bom_and_ipv6_server_url) {
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_puts(&b, "\xef\xbb\xbf"); /* UTF-8 BOM, as some Windows editors write */
  for (const char *p = base_cfg; *p; p++) {
    if (*p == '\n') tc_buf_putc(&b, '\r');
    tc_buf_putc(&b, *p);
  }
  struct tc_config c, d;
  struct tc_err err = {0};
  int rc = load_str(b.data, NULL, &c, &err);
  if (rc) fprintf(stderr, "  %s\n", err.msg);
  TC_REQUIRE(rc == 0);
  TC_REQUIRE(load_str(base_cfg, NULL, &d, &err) == 0);
  TC_CHECK(tc_config_equal(&c, &d)); /* no stray \r in any value */
  tc_config_free(&c);
  tc_config_free(&d);
  tc_buf_free(&b);
  char *t = variant("server_url: https://hs.example.com", "server_url: \"http://[fd00::1]:8080/hs\"");
  TC_REQUIRE(load_str(t, NULL, &c, &err) == 0);
  TC_CHECK_STR(c.server_host, "fd00::1");
  tc_config_free(&c);
  free(t);
}
