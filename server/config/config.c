/* config: one key table drives defaults, YAML parsing, environment
 * overrides, canonical printing, equality, copy and free (the Redis config
 * pattern), so a key added in one place is handled everywhere.
 * Reentrant; no global state. */
#include "config/config.h"
#include "config/config_int.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

extern char **environ;

/* Bounds against hostile or broken files: a config is small. */
#define MAX_CONFIG_BYTES (4u << 20)
#define MAX_YAML_VISITS 200000
#define MAX_KEY_LEN 256
#define MAX_MAP_PAIRS 2048
#define MAX_YAML_DEPTH 64

#define OFF(f) offsetof(struct tc_config, f)

static const char *const db_names[] = {"sqlite|sqlite3", "postgres", NULL};
static const char *const alloc_names[] = {"sequential", "random", NULL};
static const char *const policy_names[] = {"file", "database", NULL};
static const char *const logfmt_names[] = {"text", "json", NULL};
static const char *const acme_names[] = {"HTTP-01", "TLS-ALPN-01", NULL};
static const char *const level_names[] = {"trace", "debug", "info", "warn", "error", "fatal", NULL};

/* The table. Order is the canonical print order (it follows Headscale's
 * example file). def is the default as text, parsed like a YAML value. */
const struct cfg_key cfg_keys[] = {
    {"server_url", K_STR, OFF(server_url), 0, NULL, NULL, NULL},
    {"listen_addr", K_STR, OFF(listen_addr), 0, NULL, NULL, NULL},
    {"metrics_listen_addr", K_STR, OFF(metrics_listen_addr), 0, NULL, NULL, NULL},
    {"grpc_listen_addr", K_STR, OFF(grpc_listen_addr), 0, NULL, ":50443", NULL},
    {"grpc_allow_insecure", K_BOOL, OFF(grpc_allow_insecure), 0, NULL, "false", NULL},
    {"trusted_proxies", K_PREFIXLIST, OFF(trusted_proxies), 0, NULL, NULL, NULL},
    {"noise.private_key_path", K_STR, OFF(noise.private_key_path), F_PATH, NULL, NULL, NULL},
    {"prefixes.v4", K_PREFIX, OFF(prefixes.v4), 0, NULL, NULL, NULL},
    {"prefixes.v6", K_PREFIX, OFF(prefixes.v6), 0, NULL, NULL, NULL},
    {"prefixes.allocation", K_ENUM, OFF(prefixes.allocation), 0, alloc_names, "sequential", NULL},
    {"derp.server.enabled", K_BOOL, OFF(derp.server.enabled), 0, NULL, "false", NULL},
    {"derp.server.region_id", K_INT, OFF(derp.server.region_id), 0, NULL, "0", NULL},
    {"derp.server.region_code", K_STR, OFF(derp.server.region_code), 0, NULL, NULL, NULL},
    {"derp.server.region_name", K_STR, OFF(derp.server.region_name), 0, NULL, NULL, NULL},
    {"derp.server.verify_clients", K_BOOL, OFF(derp.server.verify_clients), 0, NULL, "true", NULL},
    {"derp.server.stun_listen_addr", K_STR, OFF(derp.server.stun_listen_addr), 0, NULL, NULL, NULL},
    {"derp.server.private_key_path", K_STR, OFF(derp.server.private_key_path), F_PATH, NULL, NULL, NULL},
    {"derp.server.automatically_add_embedded_derp_region", K_BOOL,
     OFF(derp.server.automatically_add_embedded_derp_region), 0, NULL, "true", NULL},
    {"derp.server.ipv4", K_STR, OFF(derp.server.ipv4), 0, NULL, NULL, NULL},
    {"derp.server.ipv6", K_STR, OFF(derp.server.ipv6), 0, NULL, NULL, NULL},
    {"derp.urls", K_STRLIST, OFF(derp.urls), 0, NULL, NULL, NULL},
    {"derp.paths", K_STRLIST, OFF(derp.paths), 0, NULL, NULL, NULL},
    {"derp.auto_update_enabled", K_BOOL, OFF(derp.auto_update_enabled), 0, NULL, "false", NULL},
    {"derp.update_frequency", K_DUR, OFF(derp.update_frequency_ms), 0, NULL, "3h", NULL},
    {"disable_check_updates", K_BOOL, OFF(disable_check_updates), 0, NULL, "false", NULL},
    {"ephemeral_node_inactivity_timeout", K_ALIAS, 0, 0, "node.ephemeral.inactivity_timeout", NULL,
     "use node.ephemeral.inactivity_timeout instead"},
    {"node.expiry", K_DUR, OFF(node.expiry_ms), 0, NULL, "0", NULL},
    {"node.ephemeral.inactivity_timeout", K_DUR, OFF(node.ephemeral.inactivity_timeout_ms), 0, NULL,
     "120s", NULL},
    {"node.routes.ha.probe_interval", K_DUR, OFF(node.routes.ha.probe_interval_ms), 0, NULL, "10s", NULL},
    {"node.routes.ha.probe_timeout", K_DUR, OFF(node.routes.ha.probe_timeout_ms), 0, NULL, "5s", NULL},
    {"preauth_keys.revoked_retention", K_DUR, OFF(preauth_keys.revoked_retention_ms), 0, NULL, "168h",
     NULL},
    {"database.type", K_ENUM, OFF(database.type), 0, db_names, "sqlite", NULL},
    {"database.debug", K_BOOL, OFF(database.debug), 0, NULL, "false", NULL},
    {"database.gorm.prepare_stmt", K_BOOL, OFF(database.gorm.prepare_stmt), 0, NULL, "true", NULL},
    {"database.gorm.parameterized_queries", K_BOOL, OFF(database.gorm.parameterized_queries), 0, NULL,
     "true", NULL},
    {"database.gorm.skip_err_record_not_found", K_BOOL, OFF(database.gorm.skip_err_record_not_found), 0,
     NULL, "true", NULL},
    {"database.gorm.slow_threshold", K_MSINT, OFF(database.gorm.slow_threshold_ms), 0, NULL, "1000", NULL},
    {"database.sqlite.path", K_STR, OFF(database.sqlite.path), F_PATH, NULL, NULL, NULL},
    {"database.sqlite.write_ahead_log", K_BOOL, OFF(database.sqlite.write_ahead_log), 0, NULL, "true",
     NULL},
    {"database.sqlite.wal_autocheckpoint", K_INT, OFF(database.sqlite.wal_autocheckpoint), 0, NULL, "1000",
     NULL},
    {"database.postgres.host", K_STR, OFF(database.postgres.host), 0, NULL, NULL, NULL},
    {"database.postgres.port", K_INT, OFF(database.postgres.port), 0, NULL, "0", NULL},
    {"database.postgres.name", K_STR, OFF(database.postgres.name), 0, NULL, NULL, NULL},
    {"database.postgres.user", K_STR, OFF(database.postgres.user), 0, NULL, NULL, NULL},
    {"database.postgres.pass", K_STR, OFF(database.postgres.pass), F_SECRET, NULL, NULL, NULL},
    {"database.postgres.max_open_conns", K_INT, OFF(database.postgres.max_open_conns), 0, NULL, "10", NULL},
    {"database.postgres.max_idle_conns", K_INT, OFF(database.postgres.max_idle_conns), 0, NULL, "10", NULL},
    {"database.postgres.conn_max_idle_time_secs", K_INT, OFF(database.postgres.conn_max_idle_time_secs), 0,
     NULL, "3600", NULL},
    {"database.postgres.ssl", K_STR, OFF(database.postgres.ssl), 0, NULL, "false", NULL},
    {"acme_url", K_STR, OFF(acme_url), 0, NULL, "https://acme-v02.api.letsencrypt.org/directory", NULL},
    {"acme_email", K_STR, OFF(acme_email), 0, NULL, NULL, NULL},
    {"tls_letsencrypt_hostname", K_STR, OFF(tls_letsencrypt_hostname), 0, NULL, NULL, NULL},
    {"tls_letsencrypt_cache_dir", K_STR, OFF(tls_letsencrypt_cache_dir), F_PATH, NULL, "/var/www/.cache",
     NULL},
    {"tls_letsencrypt_challenge_type", K_ENUM, OFF(tls_letsencrypt_challenge_type), 0, acme_names, "HTTP-01",
     NULL},
    {"tls_letsencrypt_listen", K_STR, OFF(tls_letsencrypt_listen), 0, NULL, ":http", NULL},
    {"tls_cert_path", K_STR, OFF(tls_cert_path), F_PATH, NULL, NULL, NULL},
    {"tls_key_path", K_STR, OFF(tls_key_path), F_PATH, NULL, NULL, NULL},
    {"log.level", K_LOGLEVEL, OFF(log.level), 0, level_names, "info", NULL},
    {"log.format", K_ENUM, OFF(log.format), 0, logfmt_names, "text", NULL},
    {"policy.mode", K_ENUM, OFF(policy.mode), 0, policy_names, "file", NULL},
    {"policy.path", K_STR, OFF(policy.path), 0, NULL, NULL, NULL},
    {"dns.magic_dns", K_BOOL, OFF(dns.magic_dns), 0, NULL, "true", NULL},
    {"dns.base_domain", K_STR, OFF(dns.base_domain), 0, NULL, NULL, NULL},
    {"dns.override_local_dns", K_BOOL, OFF(dns.override_local_dns), 0, NULL, "true", NULL},
    {"dns.nameservers.global", K_STRLIST, OFF(dns.nameservers.global), 0, NULL, NULL, NULL},
    {"dns.nameservers.split", K_SPLIT, OFF(dns.nameservers.split), 0, NULL, NULL, NULL},
    {"dns.search_domains", K_STRLIST, OFF(dns.search_domains), 0, NULL, NULL, NULL},
    {"dns.extra_records", K_RECORDS, OFF(dns.extra_records), 0, NULL, NULL, NULL},
    {"dns.extra_records_path", K_STR, OFF(dns.extra_records_path), 0, NULL, NULL, NULL},
    {"unix_socket", K_STR, OFF(unix_socket), 0, NULL, "/var/run/headscale/headscale.sock", NULL},
    {"unix_socket_permission", K_MODE, OFF(unix_socket_permission), 0, NULL, "0770", NULL},
    {"oidc.only_start_if_oidc_is_available", K_BOOL, OFF(oidc.only_start_if_oidc_is_available), 0, NULL,
     "true", NULL},
    {"oidc.issuer", K_STR, OFF(oidc.issuer), 0, NULL, NULL, NULL},
    {"oidc.client_id", K_STR, OFF(oidc.client_id), 0, NULL, NULL, NULL},
    {"oidc.client_secret", K_STR, OFF(oidc.client_secret), F_SECRET, NULL, NULL, NULL},
    {"oidc.client_secret_path", K_STR, OFF(oidc.client_secret_path), 0, NULL, NULL, NULL},
    {"oidc.expiry", K_DUR, OFF(oidc.expiry_ms), F_DEPR, NULL, "0",
     "use node.expiry instead (Headscale 0.29 refuses this key)"},
    {"oidc.use_expiry_from_token", K_BOOL, OFF(oidc.use_expiry_from_token), 0, NULL, "false", NULL},
    {"oidc.scope", K_STRLIST, OFF(oidc.scope), 0, NULL, "openid profile email", NULL},
    {"oidc.email_verified_required", K_BOOL, OFF(oidc.email_verified_required), 0, NULL, "true", NULL},
    {"oidc.extra_params", K_KV, OFF(oidc.extra_params), 0, NULL, NULL, NULL},
    {"oidc.allowed_domains", K_STRLIST, OFF(oidc.allowed_domains), 0, NULL, NULL, NULL},
    {"oidc.allowed_users", K_STRLIST, OFF(oidc.allowed_users), 0, NULL, NULL, NULL},
    {"oidc.allowed_groups", K_STRLIST, OFF(oidc.allowed_groups), 0, NULL, NULL, NULL},
    {"oidc.strip_email_domain", K_BOOL, OFF(oidc.strip_email_domain), F_DEPR, NULL, "false",
     "removed in Headscale 0.26; the full email is used as the user name"},
    {"oidc.pkce.enabled", K_BOOL, OFF(oidc.pkce.enabled), 0, NULL, "false", NULL},
    {"oidc.pkce.method", K_STR, OFF(oidc.pkce.method), 0, NULL, "S256", NULL},
    {"logtail.enabled", K_BOOL, OFF(logtail.enabled), 0, NULL, "false", NULL},
    {"randomize_client_port", K_BOOL, OFF(randomize_client_port), F_DEPR, NULL, "false",
     "Headscale 0.29 moved it to the policy file (randomizeClientPort)"},
    {"taildrop.enabled", K_BOOL, OFF(taildrop.enabled), 0, NULL, "true", NULL},
    {"auto_update.enabled", K_BOOL, OFF(auto_update.enabled), 0, NULL, "false", NULL},
    {"cli.address", K_STR, OFF(cli.address), 0, NULL, NULL, NULL},
    {"cli.api_key", K_STR, OFF(cli.api_key), F_SECRET, NULL, NULL, NULL},
    {"cli.timeout", K_DUR, OFF(cli.timeout_ms), 0, NULL, "5s", NULL},
    {"cli.insecure", K_BOOL, OFF(cli.insecure), 0, NULL, "false", NULL},
    {"tuning.notifier_send_timeout", K_DUR, OFF(tuning.notifier_send_timeout_ms), 0, NULL, "800ms", NULL},
    {"tuning.batch_change_delay", K_DUR, OFF(tuning.batch_change_delay_ms), 0, NULL, "800ms", NULL},
    {"tuning.node_mapsession_buffered_chan_size", K_INT, OFF(tuning.node_mapsession_buffered_chan_size), 0,
     NULL, "30", NULL},
    {"tuning.batcher_workers", K_INT, OFF(tuning.batcher_workers), 0, NULL, "0", NULL},
    {"tuning.register_cache_expiration", K_DUR, OFF(tuning.register_cache_expiration_ms), 0, NULL, "15m",
     NULL},
    {"tuning.register_cache_max_entries", K_INT, OFF(tuning.register_cache_max_entries), 0, NULL, "1024",
     NULL},
    {"tuning.node_store_batch_size", K_INT, OFF(tuning.node_store_batch_size), 0, NULL, "100", NULL},
    {"tuning.node_store_batch_timeout", K_DUR, OFF(tuning.node_store_batch_timeout_ms), 0, NULL, "500ms",
     NULL},
};
const size_t cfg_nkeys = TC_ARRAY_LEN(cfg_keys);

/* Keys Headscale removed. With repl set: an error unless the replacement is
 * also configured (then a warning, as Headscale does); without: an error. */
struct removed_key {
  const char *path;
  const char *repl; /* key or section that replaced it, or NULL */
  const char *why;
};
static const struct removed_key removed_keys[] = {
    {"dns_config", "dns", "removed in Headscale 0.23; move its settings under dns"},
    {"acl_policy_path", "policy.path", "removed in Headscale 0.23; use policy.path"},
    {"ip_prefixes", NULL, "removed in Headscale 0.23; use prefixes.v4 and prefixes.v6"},
    {"db_type", NULL, "removed in Headscale 0.23; use database.type"},
    {"db_path", NULL, "removed in Headscale 0.23; use database.sqlite.path"},
    {"db_host", NULL, "removed in Headscale 0.23; use database.postgres.host"},
    {"db_port", NULL, "removed in Headscale 0.23; use database.postgres.port"},
    {"db_name", NULL, "removed in Headscale 0.23; use database.postgres.name"},
    {"db_user", NULL, "removed in Headscale 0.23; use database.postgres.user"},
    {"db_pass", NULL, "removed in Headscale 0.23; use database.postgres.pass"},
    {"db_ssl", NULL, "removed in Headscale 0.23; use database.postgres.ssl"},
    {"private_key_path", NULL, "removed; the Noise key is noise.private_key_path"},
    {"dns.use_username_in_magic_dns", NULL, "removed in Headscale 0.23"},
    {"oidc.map_legacy_users", NULL, "removed in Headscale 0.26"},
};

/* ---- small helpers ---------------------------------------------------------- */

const struct cfg_key *cfg_key_find(const char *path, size_t *idx) {
  for (size_t i = 0; i < cfg_nkeys; i++)
    if (!strcmp(cfg_keys[i].path, path)) {
      if (idx) *idx = i;
      return &cfg_keys[i];
    }
  return NULL;
}

static bool is_section(const char *path) {
  size_t n = strlen(path);
  for (size_t i = 0; i < cfg_nkeys; i++)
    if (!strncmp(cfg_keys[i].path, path, n) && cfg_keys[i].path[n] == '.') return true;
  return false;
}

#define FIELD(cfg, k, type) ((type *)((char *)(cfg) + (k)->off))
#define CFIELD(cfg, k, type) ((const type *)((const char *)(cfg) + (k)->off))

static void set_str(char **dst, const char *s, size_t n, bool secret) {
  if (*dst) {
    if (secret) tc_wipe(*dst, strlen(*dst));
    free(*dst);
  }
  *dst = tc_xstrndup(s, n);
}

void tc_strlist_push(struct tc_strlist *l, const char *s) {
  l->v = tc_xrealloc(l->v, (l->n + 1) * sizeof(char *));
  l->v[l->n++] = tc_xstrdup(s);
}

void tc_strlist_free(struct tc_strlist *l) {
  if (!l) return;
  for (size_t i = 0; i < l->n; i++) free(l->v[i]);
  free(l->v);
  l->v = NULL;
  l->n = 0;
}

static void strlist_copy(struct tc_strlist *dst, const struct tc_strlist *src) {
  dst->v = NULL;
  dst->n = 0;
  for (size_t i = 0; i < src->n; i++) tc_strlist_push(dst, src->v[i]);
}

static bool strlist_equal(const struct tc_strlist *a, const struct tc_strlist *b) {
  if (a->n != b->n) return false;
  for (size_t i = 0; i < a->n; i++)
    if (strcmp(a->v[i], b->v[i])) return false;
  return true;
}

static void prefix_free(struct tc_prefix *p) {
  free(p->text);
  memset(p, 0, sizeof(*p));
}

static void prefixlist_free(struct tc_prefixlist *l) {
  for (size_t i = 0; i < l->n; i++) prefix_free(&l->v[i]);
  free(l->v);
  l->v = NULL;
  l->n = 0;
}

static void split_free(struct tc_split_dns **v, size_t *n) {
  for (size_t i = 0; i < *n; i++) {
    free((*v)[i].domain);
    tc_strlist_free(&(*v)[i].nameservers);
  }
  free(*v);
  *v = NULL;
  *n = 0;
}

static void records_free(struct tc_dns_record **v, size_t *n) {
  for (size_t i = 0; i < *n; i++) {
    free((*v)[i].name);
    free((*v)[i].type);
    free((*v)[i].value);
  }
  free(*v);
  *v = NULL;
  *n = 0;
}

static void kv_free(struct tc_kv **v, size_t *n) {
  for (size_t i = 0; i < *n; i++) {
    free((*v)[i].key);
    free((*v)[i].value);
  }
  free(*v);
  *v = NULL;
  *n = 0;
}

/* Counted-array fields (split, records, kv) keep their count right after the
 * pointer in struct tc_config; this asserts that layout at compile time. */
_Static_assert(offsetof(struct tc_config, dns.nameservers.n_split) ==
                   offsetof(struct tc_config, dns.nameservers.split) + sizeof(void *),
               "n_split follows split");
_Static_assert(offsetof(struct tc_config, dns.n_extra_records) ==
                   offsetof(struct tc_config, dns.extra_records) + sizeof(void *),
               "n_extra_records follows extra_records");
_Static_assert(offsetof(struct tc_config, oidc.n_extra_params) ==
                   offsetof(struct tc_config, oidc.extra_params) + sizeof(void *),
               "n_extra_params follows extra_params");
#define COUNT(cfg, k) ((size_t *)((char *)(cfg) + (k)->off + sizeof(void *)))
#define CCOUNT(cfg, k) (*(const size_t *)((const char *)(cfg) + (k)->off + sizeof(void *)))

/* ---- prefixes and addresses --------------------------------------------------- */

int tc_prefix_parse(const char *s, struct tc_prefix *p) {
  memset(p, 0, sizeof(*p));
  const char *slash = strchr(s, '/');
  if (!slash || slash == s) return TC_EINVAL;
  size_t alen = (size_t)(slash - s);
  if (alen >= 64) return TC_EINVAL;
  char a[64];
  memcpy(a, s, alen);
  a[alen] = 0;
  const char *b = slash + 1;
  if (!*b || strlen(b) > 3) return TC_EINVAL;
  int bits = 0;
  for (const char *q = b; *q; q++) {
    if (!isdigit((unsigned char)*q)) return TC_EINVAL;
    bits = bits * 10 + (*q - '0');
  }
  if (b[0] == '0' && b[1]) return TC_EINVAL; /* Go rejects leading zeros */
  int family, alen_bytes;
  if (inet_pton(AF_INET, a, p->addr) == 1) {
    family = 4;
    alen_bytes = 4;
  } else if (!strchr(a, '%') && inet_pton(AF_INET6, a, p->addr) == 1) {
    family = 6;
    alen_bytes = 16;
  } else {
    return TC_EINVAL;
  }
  if (bits > alen_bytes * 8) {
    memset(p->addr, 0, sizeof(p->addr));
    return TC_EINVAL;
  }
  for (int i = 0; i < alen_bytes; i++) {
    int keep = bits - i * 8;
    if (keep >= 8) continue;
    p->addr[i] &= keep <= 0 ? 0 : (uint8_t)(0xff << (8 - keep));
  }
  p->family = family;
  p->bits = bits;
  p->text = tc_xstrdup(s);
  return 0;
}

bool tc_prefix_contains(const struct tc_prefix *outer, const struct tc_prefix *inner) {
  if (!outer->family || outer->family != inner->family || inner->bits < outer->bits) return false;
  for (int i = 0; i * 8 < outer->bits; i++) {
    int keep = outer->bits - i * 8;
    uint8_t m = keep >= 8 ? 0xff : (uint8_t)(0xff << (8 - keep));
    if ((inner->addr[i] & m) != outer->addr[i]) return false;
  }
  return true;
}

static bool host_chars_ok(const char *h) {
  for (; *h; h++)
    if (!isalnum((unsigned char)*h) && *h != '.' && *h != '-' && *h != '_') return false;
  return true;
}

/* named_port lets ":http" through (Go resolves service names there). */
int cfg_hostport_split2(const char *s, char host[256], int *port, bool named_port) {
  const char *colon;
  host[0] = 0;
  if (s[0] == '[') {
    const char *close = strchr(s, ']');
    if (!close || close[1] != ':') return TC_EINVAL;
    size_t n = (size_t)(close - s - 1);
    if (n == 0 || n >= 256) return TC_EINVAL;
    memcpy(host, s + 1, n);
    host[n] = 0;
    unsigned char tmp[16];
    if (inet_pton(AF_INET6, host, tmp) != 1) return TC_EINVAL;
    colon = close + 1;
  } else {
    colon = strrchr(s, ':');
    if (!colon) return TC_EINVAL;
    size_t n = (size_t)(colon - s);
    if (n >= 256 || memchr(s, ':', n)) return TC_EINVAL; /* bare IPv6 needs brackets */
    memcpy(host, s, n);
    host[n] = 0;
    if (!host_chars_ok(host)) return TC_EINVAL;
  }
  const char *p = colon + 1;
  if (!*p || strlen(p) > 15) return TC_EINVAL;
  bool digits = true;
  for (const char *q = p; *q; q++) {
    if (!isdigit((unsigned char)*q)) digits = false;
    if (!isalnum((unsigned char)*q) && *q != '-') return TC_EINVAL;
  }
  if (digits) {
    long v = strtol(p, NULL, 10);
    if (v > 65535) return TC_EINVAL;
    *port = (int)v;
    return 0;
  }
  if (!named_port) return TC_EINVAL;
  *port = -1;
  return 0;
}

int tc_hostport_split(const char *s, char host[256], int *port) {
  return cfg_hostport_split2(s, host, port, false);
}

/* ---- scalar parsing --------------------------------------------------------------- */

static bool parse_bool(const char *s, bool *out) {
  static const char *const t[] = {"true", "t", "1", "yes", "y", "on"};
  static const char *const f[] = {"false", "f", "0", "no", "n", "off"};
  for (size_t i = 0; i < TC_ARRAY_LEN(t); i++) {
    if (!strcasecmp(s, t[i])) return *out = true, true;
    if (!strcasecmp(s, f[i])) return *out = false, true;
  }
  return false;
}

static bool parse_nonneg_int(const char *s, long long max, long long *out) {
  const char *p = s;
  if (*p == '+') p++;
  if (!*p) return false;
  long long v = 0;
  for (; *p; p++) {
    if (!isdigit((unsigned char)*p)) return false;
    if (v > (max - (*p - '0')) / 10) return false;
    v = v * 10 + (*p - '0');
  }
  *out = v;
  return true;
}

/* Go-style durations with Prometheus' d/w/y, computed in integers so that
 * print -> parse is exact. Sub-millisecond parts are truncated. */
int cfg_duration_parse(const char *s, int64_t *ms) {
  const char *p = s;
  if (*p == '+') p++;
  if (!*p) return TC_EINVAL;
  if (!strcmp(p, "0")) {
    *ms = 0;
    return 0;
  }
  /* accumulate nanoseconds as (whole ms, remainder ns) to avoid overflow */
  int64_t total_ms = 0, rem_ns = 0;
  while (*p) {
    if (!isdigit((unsigned char)*p) && *p != '.') return TC_EINVAL;
    int64_t whole = 0, frac = 0, fscale = 1;
    int nd = 0;
    while (isdigit((unsigned char)*p)) {
      if (whole > INT64_MAX / 10 - 10) return TC_EINVAL;
      whole = whole * 10 + (*p++ - '0');
      nd++;
    }
    if (*p == '.') {
      p++;
      while (isdigit((unsigned char)*p)) {
        if (fscale < 1000000000000LL) {
          frac = frac * 10 + (*p - '0');
          fscale *= 10;
        }
        p++;
        nd++;
      }
    }
    if (!nd) return TC_EINVAL;
    int64_t unit_ns;
    if (!strncmp(p, "ns", 2)) unit_ns = 1, p += 2;
    else if (!strncmp(p, "us", 2)) unit_ns = 1000, p += 2;
    else if (!strncmp(p, "\xc2\xb5s", 3)) unit_ns = 1000, p += 3;
    else if (!strncmp(p, "ms", 2)) unit_ns = 1000000, p += 2;
    else if (*p == 's') unit_ns = 1000000000LL, p++;
    else if (*p == 'm') unit_ns = 60LL * 1000000000LL, p++;
    else if (*p == 'h') unit_ns = 3600LL * 1000000000LL, p++;
    else if (*p == 'd') unit_ns = 86400LL * 1000000000LL, p++;
    else if (*p == 'w') unit_ns = 7 * 86400LL * 1000000000LL, p++;
    else if (*p == 'y') unit_ns = 365 * 86400LL * 1000000000LL, p++;
    else return TC_EINVAL;
    /* whole part: unit_ns is a multiple of 1e6 for ms and larger */
    if (unit_ns >= 1000000) {
      int64_t unit_ms = unit_ns / 1000000;
      if (whole > (INT64_MAX / 4) / unit_ms) return TC_EINVAL;
      total_ms += whole * unit_ms;
      /* fraction: frac/fscale * unit_ms, in ms and leftover ns */
      __int128 fns = (__int128)frac * unit_ns / fscale;
      total_ms += (int64_t)(fns / 1000000);
      rem_ns += (int64_t)(fns % 1000000);
    } else {
      if (whole > INT64_MAX / 4 / unit_ns) return TC_EINVAL;
      __int128 ns = (__int128)whole * unit_ns + (__int128)frac * unit_ns / fscale;
      total_ms += (int64_t)(ns / 1000000);
      rem_ns += (int64_t)(ns % 1000000);
    }
    total_ms += rem_ns / 1000000;
    rem_ns %= 1000000;
    if (total_ms > INT64_MAX / 4) return TC_EINVAL;
  }
  *ms = total_ms;
  return 0;
}

/* Go's time.Duration.String() form for whole milliseconds: "0s", "300ms",
 * "1.5s", "1h30m0s". Written here rather than with tc_duration_format so the
 * canonical output matches Go exactly (sub-second values use "ms"). */
char *cfg_go_duration(int64_t ms, char out[48]) {
  char *o = out;
  uint64_t u = ms < 0 ? (uint64_t)0 - (uint64_t)ms : (uint64_t)ms;
  if (ms < 0) *o++ = '-';
  if (u == 0) {
    strcpy(out, "0s");
    return out;
  }
  if (u < 1000) {
    sprintf(o, "%llums", (unsigned long long)u);
    return out;
  }
  uint64_t h = u / 3600000, m = u / 60000 % 60, sec = u / 1000 % 60, frac = u % 1000;
  if (h) o += sprintf(o, "%lluh", (unsigned long long)h);
  if (h || m) o += sprintf(o, "%llum", (unsigned long long)m);
  o += sprintf(o, "%llu", (unsigned long long)sec);
  if (frac) {
    char f[8];
    sprintf(f, "%03llu", (unsigned long long)frac);
    for (int i = 2; i > 0 && f[i] == '0'; i--) f[i] = 0;
    o += sprintf(o, ".%s", f);
  }
  strcpy(o, "s");
  return out;
}

static int enum_parse(const char *const *names, const char *s) {
  for (int i = 0; names[i]; i++) {
    const char *n = names[i];
    while (*n) {
      const char *bar = strchr(n, '|');
      size_t len = bar ? (size_t)(bar - n) : strlen(n);
      if (strlen(s) == len && !strncmp(s, n, len)) return i;
      n += len + (bar ? 1 : 0);
    }
  }
  return -1;
}

/* First spelling of names[i]. */
static void enum_name(const char *const *names, int i, char *out, size_t outlen) {
  const char *n = names[i];
  const char *bar = strchr(n, '|');
  size_t len = bar ? (size_t)(bar - n) : strlen(n);
  if (len >= outlen) len = outlen - 1;
  memcpy(out, n, len);
  out[len] = 0;
}

static void enum_expected(const char *const *names, char *out, size_t outlen) {
  size_t n = 0;
  while (names[n]) n++;
  out[0] = 0;
  for (size_t i = 0; i < n; i++) {
    char one[64];
    enum_name(names, (int)i, one, sizeof(one));
    size_t used = strlen(out);
    snprintf(out + used, outlen - used, "%s%s", i == 0 ? "" : (i + 1 == n ? " or " : ", "), one);
  }
}

static bool parse_mode(const char *s, unsigned *out) {
  const char *p = s;
  if (p[0] == '0' && (p[1] == 'o' || p[1] == 'O')) p += 2;
  if (!*p || strlen(p) > 5) return false;
  unsigned v = 0;
  for (; *p; p++) {
    if (*p < '0' || *p > '7') return false;
    v = v * 8 + (unsigned)(*p - '0');
  }
  if (v > 07777) return false;
  *out = v;
  return true;
}

/* Splits a list given as one string (environment, or a YAML scalar where a
 * list belongs) on whitespace and commas, as viper's string slices do. */
static void split_words(const char *s, struct tc_strlist *out) {
  const char *p = s;
  while (*p) {
    while (*p && (isspace((unsigned char)*p) || *p == ',')) p++;
    const char *st = p;
    while (*p && !isspace((unsigned char)*p) && *p != ',') p++;
    if (p > st) {
      out->v = tc_xrealloc(out->v, (out->n + 1) * sizeof(char *));
      out->v[out->n++] = tc_xstrndup(st, (size_t)(p - st));
    }
  }
}

/* Assigns a list of strings to a K_STRLIST / K_PREFIXLIST field (steals
 * items on success; frees them on failure). */
static int assign_list(struct tc_config *cfg, const struct cfg_key *k, struct tc_strlist *items,
                       char *why, size_t whylen) {
  if (k->type == K_STRLIST) {
    for (size_t i = 0; i < items->n; i++)
      if (!items->v[i][0]) {
        snprintf(why, whylen, "item %zu is empty", i);
        tc_strlist_free(items);
        return TC_EINVAL;
      }
    struct tc_strlist *dst = FIELD(cfg, k, struct tc_strlist);
    tc_strlist_free(dst);
    *dst = *items;
    items->v = NULL;
    items->n = 0;
    return 0;
  }
  /* K_PREFIXLIST */
  struct tc_prefixlist nl = {tc_xcalloc(items->n ? items->n : 1, sizeof(struct tc_prefix)), 0};
  for (size_t i = 0; i < items->n; i++) {
    if (tc_prefix_parse(items->v[i], &nl.v[i]) < 0) {
      snprintf(why, whylen, "item %zu: invalid CIDR prefix \"%.200s\"", i, items->v[i]);
      prefixlist_free(&nl);
      tc_strlist_free(items);
      return TC_EINVAL;
    }
    nl.n = i + 1;
  }
  struct tc_prefixlist *dst = FIELD(cfg, k, struct tc_prefixlist);
  prefixlist_free(dst);
  *dst = nl;
  tc_strlist_free(items);
  return 0;
}

/* Parses text (NUL-terminated, len bytes) for a scalar or list key. isnull
 * marks YAML null (an empty value). On error fills why (no key path). */
int cfg_set_text(struct tc_config *cfg, const struct cfg_key *k, const char *s, size_t len, bool isnull,
                 char *why, size_t whylen) {
  if (memchr(s, 0, len)) {
    snprintf(why, whylen, "value contains a NUL byte");
    return TC_EINVAL;
  }
  /* An empty value means "use the default", as viper falls through to its
   * defaults for null (e.g. "port:" left blank for a unix socket). Strings
   * and lists without a default become empty. */
  bool scalar = k->type != K_STR && k->type != K_PREFIX && k->type != K_STRLIST &&
                k->type != K_PREFIXLIST && k->type != K_SPLIT && k->type != K_RECORDS && k->type != K_KV;
  if (isnull || (scalar && len == 0)) {
    if (k->type == K_ALIAS) return 0;
    if (k->def) return cfg_set_text(cfg, k, k->def, strlen(k->def), false, why, whylen);
    s = "", len = 0;
    switch (k->type) {
    case K_BOOL: *FIELD(cfg, k, bool) = false; return 0;
    case K_INT: *FIELD(cfg, k, int) = 0; return 0;
    case K_MSINT:
    case K_DUR: *FIELD(cfg, k, int64_t) = 0; return 0;
    default: break;
    }
  }
  switch (k->type) {
  case K_STR:
    set_str(FIELD(cfg, k, char *), s, len, k->flags & F_SECRET);
    return 0;
  case K_BOOL: {
    bool v;
    if (!parse_bool(s, &v)) {
      snprintf(why, whylen, "expected true or false, got \"%.200s\"", s);
      return TC_EINVAL;
    }
    *FIELD(cfg, k, bool) = v;
    return 0;
  }
  case K_INT: {
    long long v;
    if (!parse_nonneg_int(s, INT_MAX, &v)) {
      snprintf(why, whylen, "expected a non-negative integer, got \"%.200s\"", s);
      return TC_EINVAL;
    }
    *FIELD(cfg, k, int) = (int)v;
    return 0;
  }
  case K_MSINT: {
    long long v;
    int64_t ms;
    if (parse_nonneg_int(s, INT64_MAX / 4, &v)) {
      *FIELD(cfg, k, int64_t) = v;
      return 0;
    }
    if (*s && cfg_duration_parse(s, &ms) == 0) {
      *FIELD(cfg, k, int64_t) = ms;
      return 0;
    }
    snprintf(why, whylen, "expected milliseconds as an integer, got \"%.200s\"", s);
    return TC_EINVAL;
  }
  case K_DUR:
  case K_ALIAS: {
    int64_t ms;
    if (!*s || cfg_duration_parse(s, &ms) < 0) {
      snprintf(why, whylen, "expected a duration such as 30m, 1h30m or 180d, got \"%.200s\"", s);
      return TC_EINVAL;
    }
    if (k->type == K_ALIAS) {
      const struct cfg_key *t = cfg_key_find(k->aux, NULL);
      *FIELD(cfg, t, int64_t) = ms;
    } else {
      *FIELD(cfg, k, int64_t) = ms;
    }
    return 0;
  }
  case K_ENUM: {
    int v = enum_parse(k->aux, s);
    if (v < 0) {
      char exp[200];
      enum_expected(k->aux, exp, sizeof(exp));
      snprintf(why, whylen, "unknown value \"%.100s\" (expected %s)", s, exp);
      return TC_EINVAL;
    }
    *FIELD(cfg, k, int) = v;
    return 0;
  }
  case K_LOGLEVEL: {
    int v = tc_log_level_parse(s);
    if (v < 0 || !*s) {
      snprintf(why, whylen, "unknown value \"%.100s\" (expected trace, debug, info, warn, error or fatal)",
               s);
      return TC_EINVAL;
    }
    *FIELD(cfg, k, enum tc_log_level) = (enum tc_log_level)v;
    return 0;
  }
  case K_MODE: {
    unsigned v;
    if (!parse_mode(s, &v)) {
      snprintf(why, whylen, "expected an octal file mode such as \"0770\", got \"%.100s\"", s);
      return TC_EINVAL;
    }
    *FIELD(cfg, k, unsigned) = v;
    return 0;
  }
  case K_PREFIX: {
    struct tc_prefix np = {0};
    if (!*s) {
      np.text = tc_xstrdup("");
    } else if (tc_prefix_parse(s, &np) < 0) {
      snprintf(why, whylen, "invalid CIDR prefix \"%.200s\"", s);
      return TC_EINVAL;
    }
    struct tc_prefix *dst = FIELD(cfg, k, struct tc_prefix);
    prefix_free(dst);
    *dst = np;
    return 0;
  }
  case K_STRLIST:
  case K_PREFIXLIST: {
    struct tc_strlist items = {0};
    split_words(s, &items);
    return assign_list(cfg, k, &items, why, whylen);
  }
  case K_SPLIT:
  case K_RECORDS:
  case K_KV:
    if (isnull || !*s) {
      cfg_clear_key(cfg, k);
      return 0;
    }
    snprintf(why, whylen, "expected a %s", k->type == K_RECORDS ? "list of records" : "mapping");
    return TC_EINVAL;
  }
  snprintf(why, whylen, "internal: unhandled key type");
  return TC_EINTERNAL;
}

/* Releases a field's storage and leaves it empty ("" for strings). */
void cfg_clear_key(struct tc_config *cfg, const struct cfg_key *k) {
  switch (k->type) {
  case K_STR: {
    char **p = FIELD(cfg, k, char *);
    if (*p && (k->flags & F_SECRET)) tc_wipe(*p, strlen(*p));
    free(*p);
    *p = NULL;
    break;
  }
  case K_PREFIX:
    prefix_free(FIELD(cfg, k, struct tc_prefix));
    break;
  case K_PREFIXLIST:
    prefixlist_free(FIELD(cfg, k, struct tc_prefixlist));
    break;
  case K_STRLIST:
    tc_strlist_free(FIELD(cfg, k, struct tc_strlist));
    break;
  case K_SPLIT:
    split_free(FIELD(cfg, k, struct tc_split_dns *), COUNT(cfg, k));
    break;
  case K_RECORDS:
    records_free(FIELD(cfg, k, struct tc_dns_record *), COUNT(cfg, k));
    break;
  case K_KV:
    kv_free(FIELD(cfg, k, struct tc_kv *), COUNT(cfg, k));
    break;
  default:
    break;
  }
}

/* ---- defaults, free, copy, equal ------------------------------------------------- */

void tc_config_defaults(struct tc_config *out) {
  memset(out, 0, sizeof(*out));
  out->source_path = tc_xstrdup("");
  out->server_host = tc_xstrdup("");
  for (size_t i = 0; i < cfg_nkeys; i++) {
    const struct cfg_key *k = &cfg_keys[i];
    if (k->type == K_ALIAS) continue;
    char why[256];
    const char *d = k->def ? k->def : "";
    int rc = cfg_set_text(out, k, d, strlen(d), !k->def, why, sizeof(why));
    if (rc < 0) { /* a broken default is a programming error */
      tc_error("config: default for %s: %s", k->path, why);
      abort();
    }
  }
}

void tc_config_free(struct tc_config *cfg) {
  if (!cfg) return;
  for (size_t i = 0; i < cfg_nkeys; i++)
    if (cfg_keys[i].type != K_ALIAS) cfg_clear_key(cfg, &cfg_keys[i]);
  free(cfg->source_path);
  free(cfg->server_host);
  tc_strlist_free(&cfg->warnings);
  memset(cfg, 0, sizeof(*cfg));
}

void tc_config_copy(struct tc_config *out, const struct tc_config *src) {
  memcpy(out, src, sizeof(*out)); /* scalars; owned parts replaced below */
  out->source_path = tc_xstrdup(src->source_path ? src->source_path : "");
  out->server_host = tc_xstrdup(src->server_host ? src->server_host : "");
  strlist_copy(&out->warnings, &src->warnings);
  for (size_t i = 0; i < cfg_nkeys; i++) {
    const struct cfg_key *k = &cfg_keys[i];
    switch (k->type) {
    case K_STR: {
      const char *s = *CFIELD(src, k, char *);
      *FIELD(out, k, char *) = tc_xstrdup(s ? s : "");
      break;
    }
    case K_PREFIX: {
      const struct tc_prefix *s = CFIELD(src, k, struct tc_prefix);
      FIELD(out, k, struct tc_prefix)->text = tc_xstrdup(s->text ? s->text : "");
      break;
    }
    case K_PREFIXLIST: {
      const struct tc_prefixlist *s = CFIELD(src, k, struct tc_prefixlist);
      struct tc_prefixlist *d = FIELD(out, k, struct tc_prefixlist);
      d->v = tc_xcalloc(s->n ? s->n : 1, sizeof(struct tc_prefix));
      for (size_t j = 0; j < s->n; j++) {
        d->v[j] = s->v[j];
        d->v[j].text = tc_xstrdup(s->v[j].text);
      }
      break;
    }
    case K_STRLIST:
      strlist_copy(FIELD(out, k, struct tc_strlist), CFIELD(src, k, struct tc_strlist));
      break;
    case K_SPLIT: {
      const struct tc_split_dns *s = *CFIELD(src, k, struct tc_split_dns *);
      size_t n = CCOUNT(src, k);
      struct tc_split_dns *d = tc_xcalloc(n ? n : 1, sizeof(*d));
      for (size_t j = 0; j < n; j++) {
        d[j].domain = tc_xstrdup(s[j].domain);
        strlist_copy(&d[j].nameservers, &s[j].nameservers);
      }
      *FIELD(out, k, struct tc_split_dns *) = d;
      break;
    }
    case K_RECORDS: {
      const struct tc_dns_record *s = *CFIELD(src, k, struct tc_dns_record *);
      size_t n = CCOUNT(src, k);
      struct tc_dns_record *d = tc_xcalloc(n ? n : 1, sizeof(*d));
      for (size_t j = 0; j < n; j++) {
        d[j].name = tc_xstrdup(s[j].name);
        d[j].type = tc_xstrdup(s[j].type);
        d[j].value = tc_xstrdup(s[j].value);
      }
      *FIELD(out, k, struct tc_dns_record *) = d;
      break;
    }
    case K_KV: {
      const struct tc_kv *s = *CFIELD(src, k, struct tc_kv *);
      size_t n = CCOUNT(src, k);
      struct tc_kv *d = tc_xcalloc(n ? n : 1, sizeof(*d));
      for (size_t j = 0; j < n; j++) {
        d[j].key = tc_xstrdup(s[j].key);
        d[j].value = tc_xstrdup(s[j].value);
      }
      *FIELD(out, k, struct tc_kv *) = d;
      break;
    }
    default:
      break;
    }
  }
}

static bool str_eq(const char *a, const char *b) { return !strcmp(a ? a : "", b ? b : ""); }

bool cfg_key_equal(const struct tc_config *a, const struct tc_config *b, const struct cfg_key *k) {
  switch (k->type) {
  case K_ALIAS:
    return true;
  case K_STR:
    return str_eq(*CFIELD(a, k, char *), *CFIELD(b, k, char *));
  case K_BOOL:
    return *CFIELD(a, k, bool) == *CFIELD(b, k, bool);
  case K_INT:
  case K_ENUM:
    return *CFIELD(a, k, int) == *CFIELD(b, k, int);
  case K_LOGLEVEL:
    return *CFIELD(a, k, enum tc_log_level) == *CFIELD(b, k, enum tc_log_level);
  case K_MODE:
    return *CFIELD(a, k, unsigned) == *CFIELD(b, k, unsigned);
  case K_DUR:
  case K_MSINT:
    return *CFIELD(a, k, int64_t) == *CFIELD(b, k, int64_t);
  case K_PREFIX: {
    const struct tc_prefix *x = CFIELD(a, k, struct tc_prefix), *y = CFIELD(b, k, struct tc_prefix);
    return str_eq(x->text, y->text) && x->family == y->family && x->bits == y->bits &&
           !memcmp(x->addr, y->addr, 16);
  }
  case K_PREFIXLIST: {
    const struct tc_prefixlist *x = CFIELD(a, k, struct tc_prefixlist),
                               *y = CFIELD(b, k, struct tc_prefixlist);
    if (x->n != y->n) return false;
    for (size_t i = 0; i < x->n; i++)
      if (!str_eq(x->v[i].text, y->v[i].text) || x->v[i].bits != y->v[i].bits ||
          memcmp(x->v[i].addr, y->v[i].addr, 16))
        return false;
    return true;
  }
  case K_STRLIST:
    return strlist_equal(CFIELD(a, k, struct tc_strlist), CFIELD(b, k, struct tc_strlist));
  case K_SPLIT: {
    size_t n = CCOUNT(a, k);
    if (n != CCOUNT(b, k)) return false;
    const struct tc_split_dns *x = *CFIELD(a, k, struct tc_split_dns *),
                              *y = *CFIELD(b, k, struct tc_split_dns *);
    for (size_t i = 0; i < n; i++)
      if (strcmp(x[i].domain, y[i].domain) || !strlist_equal(&x[i].nameservers, &y[i].nameservers))
        return false;
    return true;
  }
  case K_RECORDS: {
    size_t n = CCOUNT(a, k);
    if (n != CCOUNT(b, k)) return false;
    const struct tc_dns_record *x = *CFIELD(a, k, struct tc_dns_record *),
                               *y = *CFIELD(b, k, struct tc_dns_record *);
    for (size_t i = 0; i < n; i++)
      if (strcmp(x[i].name, y[i].name) || strcmp(x[i].type, y[i].type) || strcmp(x[i].value, y[i].value))
        return false;
    return true;
  }
  case K_KV: {
    size_t n = CCOUNT(a, k);
    if (n != CCOUNT(b, k)) return false;
    const struct tc_kv *x = *CFIELD(a, k, struct tc_kv *), *y = *CFIELD(b, k, struct tc_kv *);
    for (size_t i = 0; i < n; i++)
      if (strcmp(x[i].key, y[i].key) || strcmp(x[i].value, y[i].value)) return false;
    return true;
  }
  }
  return false;
}

bool tc_config_equal(const struct tc_config *a, const struct tc_config *b) {
  if (!a || !b) return a == b;
  for (size_t i = 0; i < cfg_nkeys; i++)
    if (!cfg_key_equal(a, b, &cfg_keys[i])) return false;
  return true;
}

/* ---- YAML loading ------------------------------------------------------------------ */

struct src_info {
  bool set;        /* given by the file or the environment */
  int line, col;   /* 1-based, 0 when not from the file */
  char env[160];   /* variable name when from the environment */
};

struct lctx {
  struct tc_config *cfg;
  struct tc_err *err;
  yaml_document_t *doc;
  size_t visits;
  struct src_info src[TC_ARRAY_LEN(cfg_keys)];
  /* removed keys seen in the file, checked once everything is loaded */
  struct {
    const struct removed_key *rk;
    int line, col;
  } removed[32];
  size_t nremoved;
};

static void add_warning(struct tc_config *cfg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_warning(struct tc_config *cfg, const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  for (size_t i = 0; i < cfg->warnings.n; i++)
    if (!strcmp(cfg->warnings.v[i], buf)) return;
  tc_strlist_push(&cfg->warnings, buf);
}

void cfg_add_warning(struct tc_config *cfg, const char *msg) { add_warning(cfg, "%s", msg); }

static int yerr(struct lctx *c, const yaml_node_t *n, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int yerr(struct lctx *c, const yaml_node_t *n, const char *path, const char *fmt, ...) {
  char why[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof(why), fmt, ap);
  va_end(ap);
  return tc_err_set(c->err, TC_EINVAL, "%s: %s (line %d:%d)", path, why, (int)n->start_mark.line + 1,
                    (int)n->start_mark.column + 1);
}

static bool node_is_null(const yaml_node_t *n) {
  if (n->type != YAML_SCALAR_NODE) return false;
  if (n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE && n->data.scalar.style != YAML_ANY_SCALAR_STYLE)
    return false;
  const char *v = (const char *)n->data.scalar.value;
  size_t len = n->data.scalar.length;
  return len == 0 || (len == 1 && v[0] == '~') ||
         (len == 4 && (!memcmp(v, "null", 4) || !memcmp(v, "Null", 4) || !memcmp(v, "NULL", 4)));
}

static yaml_node_t *node_at(struct lctx *c, int idx) {
  c->visits++;
  return yaml_document_get_node(c->doc, idx);
}

/* A scalar as a NUL-free C string; NULL (with error set) otherwise. */
static const char *scalar_str(struct lctx *c, yaml_node_t *n, const char *path) {
  if (n->type != YAML_SCALAR_NODE) {
    yerr(c, n, path, "expected a single value, got a %s",
         n->type == YAML_SEQUENCE_NODE ? "list" : "mapping");
    return NULL;
  }
  if (memchr(n->data.scalar.value, 0, n->data.scalar.length)) {
    yerr(c, n, path, "value contains a NUL byte");
    return NULL;
  }
  return (const char *)n->data.scalar.value;
}

/* Collects a YAML list (or a single scalar, split into words) of strings. */
static int node_strings(struct lctx *c, yaml_node_t *n, const char *path, struct tc_strlist *out) {
  if (node_is_null(n)) return 0;
  if (n->type == YAML_SCALAR_NODE) {
    const char *s = scalar_str(c, n, path);
    if (!s) return TC_EINVAL;
    split_words(s, out);
    return 0;
  }
  if (n->type != YAML_SEQUENCE_NODE) return yerr(c, n, path, "expected a list, got a mapping");
  size_t i = 0;
  for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top; it++, i++) {
    yaml_node_t *e = node_at(c, *it);
    if (!e) return tc_err_set(c->err, TC_EINVAL, "%s: broken YAML document", path);
    char ipath[MAX_KEY_LEN + 32];
    snprintf(ipath, sizeof(ipath), "%s[%zu]", path, i);
    if (e->type != YAML_SCALAR_NODE || node_is_null(e))
      return yerr(c, e, ipath, "expected a string");
    const char *s = scalar_str(c, e, ipath);
    if (!s) return TC_EINVAL;
    tc_strlist_push(out, s);
  }
  return 0;
}

/* Checks a mapping for duplicate and non-scalar keys before it is used. */
static int check_map_keys(struct lctx *c, yaml_node_t *map, const char *path) {
  /* the duplicate check below is quadratic; no real config comes close */
  if (map->data.mapping.pairs.top - map->data.mapping.pairs.start > MAX_MAP_PAIRS)
    return yerr(c, map, path[0] ? path : "(top level)", "more than %d keys in one mapping", MAX_MAP_PAIRS);
  for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
    yaml_node_t *k = node_at(c, p->key);
    if (!k) return tc_err_set(c->err, TC_EINVAL, "%s: broken YAML document", path);
    if (k->type != YAML_SCALAR_NODE || memchr(k->data.scalar.value, 0, k->data.scalar.length) ||
        k->data.scalar.length == 0 || k->data.scalar.length > MAX_KEY_LEN)
      return yerr(c, k, path[0] ? path : "(top level)", "mapping keys must be non-empty plain strings");
    if (k->data.scalar.length == 2 && !memcmp(k->data.scalar.value, "<<", 2))
      return yerr(c, k, path[0] ? path : "(top level)", "YAML merge keys (<<) are not supported");
    for (yaml_node_pair_t *q = map->data.mapping.pairs.start; q < p; q++) {
      yaml_node_t *k2 = yaml_document_get_node(c->doc, q->key);
      if (k2->data.scalar.length == k->data.scalar.length &&
          !memcmp(k2->data.scalar.value, k->data.scalar.value, k->data.scalar.length)) {
        char kp[MAX_KEY_LEN * 2 + 4];
        snprintf(kp, sizeof(kp), "%s%s%s", path, path[0] ? "." : "", (const char *)k->data.scalar.value);
        return yerr(c, k, kp, "duplicate key (first at line %d)", (int)k2->start_mark.line + 1);
      }
    }
  }
  return 0;
}

static int assign_split(struct lctx *c, const struct cfg_key *k, yaml_node_t *n) {
  struct tc_config *cfg = c->cfg;
  if (node_is_null(n)) {
    cfg_clear_key(cfg, k);
    return 0;
  }
  if (n->type != YAML_MAPPING_NODE)
    return yerr(c, n, k->path, "expected a mapping of domain to nameservers");
  int rc = check_map_keys(c, n, k->path);
  if (rc < 0) return rc;
  size_t cnt = (size_t)(n->data.mapping.pairs.top - n->data.mapping.pairs.start);
  struct tc_split_dns *v = tc_xcalloc(cnt ? cnt : 1, sizeof(*v));
  size_t i = 0;
  for (yaml_node_pair_t *p = n->data.mapping.pairs.start; p < n->data.mapping.pairs.top; p++, i++) {
    yaml_node_t *kn = node_at(c, p->key), *vn = node_at(c, p->value);
    v[i].domain = tc_xstrdup((const char *)kn->data.scalar.value);
    char ipath[MAX_KEY_LEN * 2 + 4];
    snprintf(ipath, sizeof(ipath), "%s.%s", k->path, v[i].domain);
    if (!vn) {
      rc = tc_err_set(c->err, TC_EINVAL, "%s: broken YAML document", ipath);
    } else {
      rc = node_strings(c, vn, ipath, &v[i].nameservers);
    }
    if (rc < 0) {
      size_t nn = i + 1;
      split_free(&v, &nn);
      return rc;
    }
  }
  cfg_clear_key(cfg, k);
  *FIELD(cfg, k, struct tc_split_dns *) = v;
  *COUNT(cfg, k) = cnt;
  return 0;
}

static int assign_kv(struct lctx *c, const struct cfg_key *k, yaml_node_t *n) {
  struct tc_config *cfg = c->cfg;
  if (node_is_null(n)) {
    cfg_clear_key(cfg, k);
    return 0;
  }
  if (n->type != YAML_MAPPING_NODE) return yerr(c, n, k->path, "expected a mapping of names to values");
  int rc = check_map_keys(c, n, k->path);
  if (rc < 0) return rc;
  size_t cnt = (size_t)(n->data.mapping.pairs.top - n->data.mapping.pairs.start);
  struct tc_kv *v = tc_xcalloc(cnt ? cnt : 1, sizeof(*v));
  size_t i = 0;
  for (yaml_node_pair_t *p = n->data.mapping.pairs.start; p < n->data.mapping.pairs.top; p++, i++) {
    yaml_node_t *kn = node_at(c, p->key), *vn = node_at(c, p->value);
    char ipath[MAX_KEY_LEN * 2 + 4];
    snprintf(ipath, sizeof(ipath), "%s.%s", k->path, (const char *)kn->data.scalar.value);
    const char *s = vn ? scalar_str(c, vn, ipath) : NULL;
    if (!s) {
      if (!vn) tc_err_set(c->err, TC_EINVAL, "%s: broken YAML document", ipath);
      kv_free(&v, &i);
      return TC_EINVAL;
    }
    v[i].key = tc_xstrdup((const char *)kn->data.scalar.value);
    v[i].value = tc_xstrdup(node_is_null(vn) ? "" : s);
  }
  cfg_clear_key(cfg, k);
  *FIELD(cfg, k, struct tc_kv *) = v;
  *COUNT(cfg, k) = cnt;
  return 0;
}

static int assign_records(struct lctx *c, const struct cfg_key *k, yaml_node_t *n) {
  struct tc_config *cfg = c->cfg;
  if (node_is_null(n)) {
    cfg_clear_key(cfg, k);
    return 0;
  }
  if (n->type != YAML_SEQUENCE_NODE)
    return yerr(c, n, k->path, "expected a list of {name, type, value} records");
  size_t cnt = (size_t)(n->data.sequence.items.top - n->data.sequence.items.start);
  struct tc_dns_record *v = tc_xcalloc(cnt ? cnt : 1, sizeof(*v));
  size_t done = 0;
  int rc = 0;
  for (size_t i = 0; i < cnt; i++) {
    yaml_node_t *e = node_at(c, n->data.sequence.items.start[i]);
    char ipath[MAX_KEY_LEN + 32];
    snprintf(ipath, sizeof(ipath), "%s[%zu]", k->path, i);
    done = i + 1;
    if (!e || e->type != YAML_MAPPING_NODE) {
      rc = e ? yerr(c, e, ipath, "expected a mapping with name, type and value")
             : tc_err_set(c->err, TC_EINVAL, "%s: broken YAML document", ipath);
      goto fail;
    }
    if ((rc = check_map_keys(c, e, ipath)) < 0) goto fail;
    for (yaml_node_pair_t *p = e->data.mapping.pairs.start; p < e->data.mapping.pairs.top; p++) {
      yaml_node_t *kn = node_at(c, p->key), *vn = node_at(c, p->value);
      const char *key = (const char *)kn->data.scalar.value;
      char fpath[MAX_KEY_LEN * 2 + 40];
      snprintf(fpath, sizeof(fpath), "%s.%s", ipath, key);
      char **slot = !strcmp(key, "name")    ? &v[i].name
                    : !strcmp(key, "type")  ? &v[i].type
                    : !strcmp(key, "value") ? &v[i].value
                                            : NULL;
      if (!slot) {
        rc = yerr(c, kn, fpath, "unknown key (expected name, type or value)");
        goto fail;
      }
      if (!vn) {
        rc = tc_err_set(c->err, TC_EINVAL, "%s: broken YAML document", fpath);
        goto fail;
      }
      const char *s = scalar_str(c, vn, fpath);
      if (!s) {
        rc = TC_EINVAL;
        goto fail;
      }
      if (node_is_null(vn) || !*s) {
        rc = yerr(c, vn, fpath, "must not be empty");
        goto fail;
      }
      free(*slot); /* duplicates were refused, but stay leak-free regardless */
      *slot = tc_xstrdup(s);
    }
    const char *missing = !v[i].name ? "name" : !v[i].type ? "type" : !v[i].value ? "value" : NULL;
    if (missing) {
      rc = tc_err_set(c->err, TC_EINVAL, "%s.%s: required (line %d:%d)", ipath, missing,
                      (int)e->start_mark.line + 1, (int)e->start_mark.column + 1);
      goto fail;
    }
  }
  cfg_clear_key(cfg, k);
  *FIELD(cfg, k, struct tc_dns_record *) = v;
  *COUNT(cfg, k) = cnt;
  return 0;
fail:
  records_free(&v, &done);
  return rc;
}

static void note_deprecated(struct lctx *c, const struct cfg_key *k, const char *where) {
  add_warning(c->cfg, "%s: deprecated (%s): %s", k->path, where, k->note ? k->note : "");
}

static int assign_node(struct lctx *c, size_t idx, yaml_node_t *kn, yaml_node_t *vn) {
  const struct cfg_key *k = &cfg_keys[idx];
  char why[400];
  int rc;
  char where[64];
  snprintf(where, sizeof(where), "line %d", (int)kn->start_mark.line + 1);
  switch (k->type) {
  case K_SPLIT:
    rc = assign_split(c, k, vn);
    break;
  case K_KV:
    rc = assign_kv(c, k, vn);
    break;
  case K_RECORDS:
    rc = assign_records(c, k, vn);
    break;
  case K_STRLIST:
  case K_PREFIXLIST: {
    if (node_is_null(vn)) { /* null: back to the default, as for scalars */
      rc = cfg_set_text(c->cfg, k, "", 0, true, why, sizeof(why));
      break;
    }
    struct tc_strlist items = {0};
    rc = node_strings(c, vn, k->path, &items);
    if (rc < 0) {
      tc_strlist_free(&items);
      break;
    }
    rc = assign_list(c->cfg, k, &items, why, sizeof(why));
    if (rc < 0) yerr(c, vn, k->path, "%s", why);
    break;
  }
  case K_ALIAS: {
    size_t tidx = 0;
    cfg_key_find(k->aux, &tidx);
    note_deprecated(c, k, where);
    const char *s = scalar_str(c, vn, k->path);
    if (!s) return TC_EINVAL;
    if (c->src[tidx].set) return 0; /* the new key wins, whatever the order */
    rc = cfg_set_text(c->cfg, k, s, vn->data.scalar.length, node_is_null(vn), why, sizeof(why));
    if (rc < 0) yerr(c, vn, k->path, "%s", why);
    break;
  }
  default: {
    const char *s = scalar_str(c, vn, k->path);
    if (!s) return TC_EINVAL;
    rc = cfg_set_text(c->cfg, k, s, vn->data.scalar.length, node_is_null(vn), why, sizeof(why));
    if (rc < 0) yerr(c, vn, k->path, "%s", why);
    break;
  }
  }
  if (rc < 0) return rc;
  if (k->flags & F_DEPR) note_deprecated(c, k, where);
  c->src[idx].set = true;
  c->src[idx].line = (int)vn->start_mark.line + 1;
  c->src[idx].col = (int)vn->start_mark.column + 1;
  return 0;
}

static const struct removed_key *removed_find(const char *path) {
  for (size_t i = 0; i < TC_ARRAY_LEN(removed_keys); i++)
    if (!strcmp(removed_keys[i].path, path)) return &removed_keys[i];
  return NULL;
}

static int walk_map(struct lctx *c, yaml_node_t *map, const char *prefix) {
  int rc = check_map_keys(c, map, prefix);
  if (rc < 0) return rc;
  for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
    if (c->visits > MAX_YAML_VISITS)
      return tc_err_set(c->err, TC_ETOOBIG, "config: YAML document too large or too deeply aliased");
    yaml_node_t *kn = node_at(c, p->key), *vn = node_at(c, p->value);
    if (!vn) return tc_err_set(c->err, TC_EINVAL, "config: broken YAML document");
    char path[MAX_KEY_LEN * 4];
    int plen = snprintf(path, sizeof(path), "%s%s%s", prefix, prefix[0] ? "." : "",
                        (const char *)kn->data.scalar.value);
    if (plen < 0 || (size_t)plen >= sizeof(path)) return yerr(c, kn, prefix, "key path too long");
    size_t idx;
    const struct removed_key *rk;
    if (cfg_key_find(path, &idx)) {
      if ((rc = assign_node(c, idx, kn, vn)) < 0) return rc;
    } else if ((rk = removed_find(path))) {
      /* decided after the whole file is read: the replacement may come later */
      if (c->nremoved == TC_ARRAY_LEN(c->removed)) return yerr(c, kn, path, "%s", rk->why);
      c->removed[c->nremoved].rk = rk;
      c->removed[c->nremoved].line = (int)kn->start_mark.line + 1;
      c->removed[c->nremoved].col = (int)kn->start_mark.column + 1;
      c->nremoved++;
    } else if (is_section(path)) {
      if (node_is_null(vn)) continue;
      if (vn->type != YAML_MAPPING_NODE) return yerr(c, vn, path, "expected a mapping");
      if ((rc = walk_map(c, vn, path)) < 0) return rc;
    } else {
      return yerr(c, kn, path, "unknown key");
    }
  }
  return 0;
}

static int parser_error(struct lctx *c, const yaml_parser_t *parser) {
  const char *prob = parser->problem ? parser->problem : "syntax error";
  if (parser->context)
    return tc_err_set(c->err, TC_EINVAL, "yaml: line %d:%d: %s %s (line %d)",
                      (int)parser->problem_mark.line + 1, (int)parser->problem_mark.column + 1, prob,
                      parser->context, (int)parser->context_mark.line + 1);
  return tc_err_set(c->err, TC_EINVAL, "yaml: line %d:%d: %s", (int)parser->problem_mark.line + 1,
                    (int)parser->problem_mark.column + 1, prob);
}

/* libyaml's scanner does work proportional to the current nesting depth for
 * every token, so a hostile "[[[[..." costs quadratic time before the
 * document loader returns. Stream the events first and stop at a depth no
 * config needs. */
static int prescan(struct lctx *c, const char *text, size_t len) {
  yaml_parser_t parser;
  if (!yaml_parser_initialize(&parser)) return tc_err_set(c->err, TC_ENOMEM, "config: out of memory");
  yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
  int rc = 0, depth = 0;
  size_t events = 0;
  for (;;) {
    yaml_event_t ev;
    if (!yaml_parser_parse(&parser, &ev)) {
      rc = parser_error(c, &parser);
      break;
    }
    yaml_event_type_t t = ev.type;
    int line = (int)ev.start_mark.line + 1;
    yaml_event_delete(&ev);
    if (t == YAML_SEQUENCE_START_EVENT || t == YAML_MAPPING_START_EVENT) depth++;
    if (t == YAML_SEQUENCE_END_EVENT || t == YAML_MAPPING_END_EVENT) depth--;
    if (depth > MAX_YAML_DEPTH) {
      rc = tc_err_set(c->err, TC_ETOOBIG, "yaml: line %d: nested deeper than %d levels", line,
                      MAX_YAML_DEPTH);
      break;
    }
    if (++events > MAX_YAML_VISITS) {
      rc = tc_err_set(c->err, TC_ETOOBIG, "yaml: more than %d elements", MAX_YAML_VISITS);
      break;
    }
    if (t == YAML_STREAM_END_EVENT) break;
  }
  yaml_parser_delete(&parser);
  return rc;
}

static int load_yaml(struct lctx *c, const char *text, size_t len) {
  yaml_parser_t parser;
  yaml_document_t doc;
  int rc = prescan(c, text, len);
  if (rc < 0) return rc;
  if (!yaml_parser_initialize(&parser)) return tc_err_set(c->err, TC_ENOMEM, "config: out of memory");
  yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
  if (!yaml_parser_load(&parser, &doc)) {
    rc = parser_error(c, &parser);
    yaml_parser_delete(&parser);
    return rc;
  }
  c->doc = &doc;
  yaml_node_t *root = yaml_document_get_root_node(&doc);
  if (root && !node_is_null(root)) {
    if (root->type != YAML_MAPPING_NODE) {
      rc = yerr(c, root, "(top level)", "expected a mapping of settings");
    } else {
      rc = walk_map(c, root, "");
    }
  }
  c->doc = NULL;
  yaml_document_delete(&doc);
  if (rc == 0 && root) {
    /* A second document would be silently ignored by most readers; refuse it. */
    yaml_document_t doc2;
    if (!yaml_parser_load(&parser, &doc2)) {
      rc = parser_error(c, &parser);
    } else {
      yaml_node_t *r2 = yaml_document_get_root_node(&doc2);
      if (r2)
        rc = tc_err_set(c->err, TC_EINVAL, "yaml: line %d: only one YAML document is allowed",
                        (int)r2->start_mark.line + 1);
      yaml_document_delete(&doc2);
    }
  }
  yaml_parser_delete(&parser);
  return rc;
}

/* ---- environment --------------------------------------------------------------------- */

static void env_name(const char *prefix, const char *path, char *out, size_t outlen) {
  size_t n = (size_t)snprintf(out, outlen, "%s", prefix);
  for (const char *p = path; *p && n + 1 < outlen; p++)
    out[n++] = *p == '.' ? '_' : (char)toupper((unsigned char)*p);
  out[n] = 0;
}

static const char *env_get(const char *const *env, const char *name) {
  size_t n = strlen(name);
  for (; env && *env; env++)
    if (!strncmp(*env, name, n) && (*env)[n] == '=') return *env + n + 1;
  return NULL;
}

static int apply_env(struct lctx *c, const char *const *env) {
  for (size_t i = 0; i < cfg_nkeys; i++) {
    const struct cfg_key *k = &cfg_keys[i];
    if (k->type == K_SPLIT || k->type == K_RECORDS || k->type == K_KV) continue;
    char name[160];
    env_name("TAILCOAT_", k->path, name, sizeof(name));
    const char *v = env_get(env, name);
    if (!v || !*v) { /* empty means unset, as viper treats it */
      env_name("HEADSCALE_", k->path, name, sizeof(name));
      v = env_get(env, name);
    }
    if (!v || !*v) continue;
    if (k->type == K_ALIAS) {
      size_t tidx = 0;
      cfg_key_find(k->aux, &tidx);
      add_warning(c->cfg, "%s: deprecated (from %s): %s", k->path, name, k->note);
      if (c->src[tidx].set) continue;
    }
    char why[400];
    if (cfg_set_text(c->cfg, k, v, strlen(v), false, why, sizeof(why)) < 0)
      return tc_err_set(c->err, TC_EINVAL, "%s: %s (from %s)", k->path, why, name);
    if (k->flags & F_DEPR) add_warning(c->cfg, "%s: deprecated (from %s): %s", k->path, name, k->note);
    c->src[i].set = true;
    c->src[i].line = c->src[i].col = 0;
    snprintf(c->src[i].env, sizeof(c->src[i].env), "%s", name);
  }
  return 0;
}

static bool any_set(const struct lctx *c, const char *path) {
  size_t n = strlen(path);
  for (size_t i = 0; i < cfg_nkeys; i++)
    if (c->src[i].set && !strncmp(cfg_keys[i].path, path, n) &&
        (cfg_keys[i].path[n] == 0 || cfg_keys[i].path[n] == '.'))
      return true;
  return false;
}

static int check_removed(struct lctx *c) {
  for (size_t i = 0; i < c->nremoved; i++) {
    const struct removed_key *rk = c->removed[i].rk;
    if (rk->repl && any_set(c, rk->repl)) {
      add_warning(c->cfg, "%s: ignored (line %d): %s", rk->path, c->removed[i].line, rk->why);
      continue;
    }
    return tc_err_set(c->err, TC_EINVAL, "%s: %s (line %d:%d)", rk->path, rk->why, c->removed[i].line,
                      c->removed[i].col);
  }
  return 0;
}

/* Relative paths are relative to the config file's directory, as in Headscale. */
static void resolve_paths(struct tc_config *cfg, const char *config_path) {
  const char *slash = strrchr(config_path, '/');
  if (!slash) return;
  size_t dlen = (size_t)(slash - config_path);
  for (size_t i = 0; i < cfg_nkeys; i++) {
    const struct cfg_key *k = &cfg_keys[i];
    if (!(k->flags & F_PATH)) continue;
    char **p = FIELD(cfg, k, char *);
    if (!**p || (*p)[0] == '/') continue;
    char *abs = tc_xasprintf("%.*s/%s", (int)dlen, config_path, *p);
    free(*p);
    *p = abs;
  }
}

/* Location of a key's value, for validation messages. */
void cfg_loc(const void *vctx, const char *path, char *out, size_t outlen) {
  const struct lctx *c = vctx;
  out[0] = 0;
  size_t idx;
  if (!c) return;
  /* "dns.extra_records[2].type" -> the location of "dns.extra_records" */
  char base[MAX_KEY_LEN];
  snprintf(base, sizeof(base), "%.*s", (int)strcspn(path, "["), path);
  while (!cfg_key_find(base, &idx)) {
    char *dot = strrchr(base, '.');
    if (!dot) return;
    *dot = 0;
  }
  if (c->src[idx].line)
    snprintf(out, outlen, " (line %d:%d)", c->src[idx].line, c->src[idx].col);
  else if (c->src[idx].env[0])
    snprintf(out, outlen, " (from %s)", c->src[idx].env);
}

int tc_config_load_opts(const char *path, const char *text, size_t len,
                        const struct tc_config_load_opts *opts, struct tc_config *out,
                        struct tc_err *err) {
  struct tc_config_load_opts dflt = {0};
  if (!opts) opts = &dflt;
  memset(out, 0, sizeof(*out));
  if ((path == NULL) == (text == NULL))
    return tc_err_set(err, TC_EINVAL, "config: give either a path or text");
  char *filebuf = NULL;
  int rc;
  if (path) {
    size_t flen;
    rc = tc_read_file(path, MAX_CONFIG_BYTES, &filebuf, &flen, err);
    if (rc < 0) {
      tc_err_prefix(err, "config");
      return rc;
    }
    text = filebuf;
    len = flen;
  } else if (len > MAX_CONFIG_BYTES) {
    return tc_err_set(err, TC_ETOOBIG, "config: larger than %u bytes", MAX_CONFIG_BYTES);
  }
  struct lctx *c = tc_xcalloc(1, sizeof(*c));
  struct tc_config cfg;
  tc_config_defaults(&cfg);
  c->cfg = &cfg;
  c->err = err;
  if (path) set_str(&cfg.source_path, path, strlen(path), false);
  if ((rc = load_yaml(c, text, len)) < 0) goto fail;
  if (!opts->no_env) {
    const char *const *env = opts->env ? opts->env : (const char *const *)environ;
    if ((rc = apply_env(c, env)) < 0) goto fail;
  }
  if ((rc = check_removed(c)) < 0) goto fail;
  if (path) resolve_paths(&cfg, path);
  if (!opts->skip_validate && (rc = cfg_validate(&cfg, c, err)) < 0) goto fail;
  *out = cfg;
  free(c);
  free(filebuf);
  return 0;
fail:
  tc_config_free(&cfg);
  free(c);
  free(filebuf);
  return rc;
}

int tc_config_load(const char *path, struct tc_config *out, struct tc_err *err) {
  return tc_config_load_opts(path, NULL, 0, NULL, out, err);
}

int tc_config_load_text(const char *text, size_t len, struct tc_config *out, struct tc_err *err) {
  return tc_config_load_opts(NULL, text, len, NULL, out, err);
}

int tc_config_validate(struct tc_config *cfg, struct tc_err *err) { return cfg_validate(cfg, NULL, err); }

/* ---- printing ------------------------------------------------------------------------------ */

static void put_quoted(struct tc_buf *b, const char *s) {
  tc_buf_putc(b, '"');
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    switch (*p) {
    case '"': tc_buf_puts(b, "\\\""); break;
    case '\\': tc_buf_puts(b, "\\\\"); break;
    case '\n': tc_buf_puts(b, "\\n"); break;
    case '\t': tc_buf_puts(b, "\\t"); break;
    case '\r': tc_buf_puts(b, "\\r"); break;
    default:
      if (*p < 0x20 || *p == 0x7f) tc_buf_printf(b, "\\x%02x", *p);
      else tc_buf_putc(b, (char)*p);
    }
  }
  tc_buf_putc(b, '"');
}

static void indent(struct tc_buf *b, int depth) {
  for (int i = 0; i < depth; i++) tc_buf_puts(b, "  ");
}

static void put_strlist(struct tc_buf *b, const struct tc_strlist *l, int depth) {
  if (!l->n) {
    tc_buf_puts(b, " []\n");
    return;
  }
  tc_buf_putc(b, '\n');
  for (size_t i = 0; i < l->n; i++) {
    indent(b, depth);
    tc_buf_puts(b, "- ");
    put_quoted(b, l->v[i]);
    tc_buf_putc(b, '\n');
  }
}

static void put_value(struct tc_buf *b, const struct tc_config *cfg, const struct cfg_key *k, int depth) {
  char tmp[64];
  switch (k->type) {
  case K_ALIAS:
    break;
  case K_STR:
    tc_buf_putc(b, ' ');
    put_quoted(b, *CFIELD(cfg, k, char *) ? *CFIELD(cfg, k, char *) : "");
    tc_buf_putc(b, '\n');
    break;
  case K_BOOL:
    tc_buf_puts(b, *CFIELD(cfg, k, bool) ? " true\n" : " false\n");
    break;
  case K_INT:
    tc_buf_printf(b, " %d\n", *CFIELD(cfg, k, int));
    break;
  case K_MSINT:
    tc_buf_printf(b, " %lld\n", (long long)*CFIELD(cfg, k, int64_t));
    break;
  case K_DUR: {
    char d[48];
    tc_buf_printf(b, " %s\n", cfg_go_duration(*CFIELD(cfg, k, int64_t), d));
    break;
  }
  case K_ENUM:
    enum_name(k->aux, *CFIELD(cfg, k, int), tmp, sizeof(tmp));
    tc_buf_printf(b, " %s\n", tmp);
    break;
  case K_LOGLEVEL: {
    int lv = (int)*CFIELD(cfg, k, enum tc_log_level);
    tc_buf_printf(b, " %s\n", lv >= 0 && lv <= TC_LOG_FATAL ? level_names[lv] : "info");
    break;
  }
  case K_MODE:
    tc_buf_printf(b, " \"%04o\"\n", *CFIELD(cfg, k, unsigned));
    break;
  case K_PREFIX: {
    const struct tc_prefix *p = CFIELD(cfg, k, struct tc_prefix);
    tc_buf_putc(b, ' ');
    put_quoted(b, p->text ? p->text : "");
    tc_buf_putc(b, '\n');
    break;
  }
  case K_PREFIXLIST: {
    const struct tc_prefixlist *l = CFIELD(cfg, k, struct tc_prefixlist);
    if (!l->n) {
      tc_buf_puts(b, " []\n");
      break;
    }
    tc_buf_putc(b, '\n');
    for (size_t i = 0; i < l->n; i++) {
      indent(b, depth);
      tc_buf_puts(b, "- ");
      put_quoted(b, l->v[i].text);
      tc_buf_putc(b, '\n');
    }
    break;
  }
  case K_STRLIST:
    put_strlist(b, CFIELD(cfg, k, struct tc_strlist), depth);
    break;
  case K_SPLIT: {
    size_t n = CCOUNT(cfg, k);
    const struct tc_split_dns *v = *CFIELD(cfg, k, struct tc_split_dns *);
    if (!n) {
      tc_buf_puts(b, " {}\n");
      break;
    }
    tc_buf_putc(b, '\n');
    for (size_t i = 0; i < n; i++) {
      indent(b, depth);
      put_quoted(b, v[i].domain);
      tc_buf_putc(b, ':');
      put_strlist(b, &v[i].nameservers, depth + 1);
    }
    break;
  }
  case K_RECORDS: {
    size_t n = CCOUNT(cfg, k);
    const struct tc_dns_record *v = *CFIELD(cfg, k, struct tc_dns_record *);
    if (!n) {
      tc_buf_puts(b, " []\n");
      break;
    }
    tc_buf_putc(b, '\n');
    for (size_t i = 0; i < n; i++) {
      indent(b, depth);
      tc_buf_puts(b, "- name: ");
      put_quoted(b, v[i].name);
      tc_buf_putc(b, '\n');
      indent(b, depth);
      tc_buf_puts(b, "  type: ");
      put_quoted(b, v[i].type);
      tc_buf_putc(b, '\n');
      indent(b, depth);
      tc_buf_puts(b, "  value: ");
      put_quoted(b, v[i].value);
      tc_buf_putc(b, '\n');
    }
    break;
  }
  case K_KV: {
    size_t n = CCOUNT(cfg, k);
    const struct tc_kv *v = *CFIELD(cfg, k, struct tc_kv *);
    if (!n) {
      tc_buf_puts(b, " {}\n");
      break;
    }
    tc_buf_putc(b, '\n');
    for (size_t i = 0; i < n; i++) {
      indent(b, depth);
      put_quoted(b, v[i].key);
      tc_buf_puts(b, ": ");
      put_quoted(b, v[i].value);
      tc_buf_putc(b, '\n');
    }
    break;
  }
  }
}

int tc_config_print(const struct tc_config *cfg, struct tc_buf *out) {
  struct tc_config dflt;
  tc_config_defaults(&dflt);
  tc_buf_puts(out, "# tailcoat effective configuration (canonical form; Headscale config.yaml format)\n");
  const char *prev = "";
  for (size_t i = 0; i < cfg_nkeys; i++) {
    const struct cfg_key *k = &cfg_keys[i];
    if (k->type == K_ALIAS) continue;
    /* Deprecated keys appear only when they carry a non-default value, so the
     * canonical form loads without warnings in the common case. */
    if ((k->flags & F_DEPR) && cfg_key_equal(cfg, &dflt, k)) continue;
    /* Count the section segments shared with the previous key. */
    const char *a = prev, *p = k->path;
    int shared = 0;
    for (;;) {
      const char *da = strchr(a, '.'), *dp = strchr(p, '.');
      if (!da || !dp || da - a != dp - p || strncmp(a, p, (size_t)(da - a))) break;
      shared++;
      a = da + 1;
      p = dp + 1;
    }
    /* a blank line around top-level sections; plain top-level keys stay grouped */
    if (shared == 0 && prev[0] && (strchr(prev, '.') || strchr(k->path, '.'))) tc_buf_putc(out, '\n');
    /* open the sections not shared */
    int depth = shared;
    const char *seg = p;
    for (const char *dot; (dot = strchr(seg, '.')); seg = dot + 1, depth++) {
      indent(out, depth);
      tc_buf_append(out, seg, (size_t)(dot - seg));
      tc_buf_puts(out, ":\n");
    }
    indent(out, depth);
    tc_buf_puts(out, seg);
    tc_buf_putc(out, ':');
    put_value(out, cfg, k, depth + 1);
    prev = k->path;
  }
  tc_config_free(&dflt);
  return 0;
}
