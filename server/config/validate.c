/* validate: the rules a loaded configuration must satisfy before the server
 * uses it — Headscale's own checks plus the ones that keep tailcoat from
 * starting in a state the Tailscale client cannot work with. The first
 * failing rule is reported with its key path. Reentrant. */
#include "config/config_int.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct vctx {
  struct tc_config *cfg;
  const void *lctx;
  struct tc_err *err;
};

static int fail(struct vctx *v, const char *path, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(struct vctx *v, const char *path, const char *fmt, ...) {
  char why[400], loc[200];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof(why), fmt, ap);
  va_end(ap);
  cfg_loc(v->lctx, path, loc, sizeof(loc));
  return tc_err_set(v->err, TC_EINVAL, "%s: %s%s", path, why, loc);
}

static void warn(struct vctx *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void warn(struct vctx *v, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  cfg_add_warning(v->cfg, msg);
}

static bool is_ip(const char *s, int family) {
  unsigned char buf[16];
  if (family != 6 && inet_pton(AF_INET, s, buf) == 1) return true;
  if (family != 4 && inet_pton(AF_INET6, s, buf) == 1) return true;
  return false;
}

/* http(s)://host[:port][/...]; copies the host (no brackets, no port) to host. */
static bool parse_http_url(const char *s, char host[256], bool *https) {
  const char *p;
  if (!strncasecmp(s, "https://", 8)) {
    p = s + 8;
    if (https) *https = true;
  } else if (!strncasecmp(s, "http://", 7)) {
    p = s + 7;
    if (https) *https = false;
  } else {
    return false;
  }
  size_t alen = strcspn(p, "/?#");
  if (alen == 0 || alen >= 256) return false;
  char auth[256];
  memcpy(auth, p, alen);
  auth[alen] = 0;
  if (strchr(auth, '@')) return false; /* credentials do not belong in these URLs */
  for (const char *q = p + alen; *q; q++)
    if (isspace((unsigned char)*q) || iscntrl((unsigned char)*q)) return false;
  char *portp = NULL;
  if (auth[0] == '[') {
    char *close = strchr(auth, ']');
    if (!close) return false;
    *close = 0;
    if (!is_ip(auth + 1, 6)) return false;
    snprintf(host, 256, "%s", auth + 1);
    if (close[1] == ':') portp = close + 2;
    else if (close[1]) return false;
  } else {
    char *colon = strchr(auth, ':');
    if (colon) {
      *colon = 0;
      portp = colon + 1;
    }
    if (!auth[0]) return false;
    for (const char *q = auth; *q; q++)
      if (!isalnum((unsigned char)*q) && *q != '.' && *q != '-' && *q != '_') return false;
    snprintf(host, 256, "%s", auth);
  }
  if (portp) {
    if (!*portp || strlen(portp) > 5) return false;
    for (const char *q = portp; *q; q++)
      if (!isdigit((unsigned char)*q)) return false;
    if (atoi(portp) > 65535) return false;
  }
  return true;
}

static bool hostport_ok(const char *s, bool named) {
  char host[256];
  int port;
  return cfg_hostport_split2(s, host, &port, named) == 0;
}

static int check_addr(struct vctx *v, const char *path, const char *val, bool required, bool named) {
  if (!*val) {
    if (required) return fail(v, path, "must be set (host:port)");
    return 0;
  }
  if (!hostport_ok(val, named)) return fail(v, path, "expected host:port, got \"%.200s\"", val);
  return 0;
}

/* A DNS name: labels of letters, digits, '-' and '_', no empty labels. */
static bool domain_ok(const char *s) {
  size_t n = strlen(s);
  if (!n || n > 253 || s[0] == '.' || s[n - 1] == '.' || strstr(s, "..")) return false;
  size_t label = 0;
  for (const char *p = s; *p; p++) {
    if (*p == '.') {
      label = 0;
      continue;
    }
    if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_') return false;
    if (++label > 63) return false;
  }
  return true;
}

/* A resolver as Tailscale accepts it: IP, IP:port, [v6]:port, or a URL
 * (DoH https://, or tls:// / http://). */
static bool nameserver_ok(const char *s) {
  if (is_ip(s, 0)) return true;
  char host[256];
  int port;
  if (cfg_hostport_split2(s, host, &port, false) == 0 && is_ip(host, 0)) return true;
  if (!strncasecmp(s, "https://", 8) || !strncasecmp(s, "http://", 7)) return parse_http_url(s, host, NULL);
  if (!strncasecmp(s, "tls://", 6)) return s[6] != 0 && !strpbrk(s, " \t\r\n");
  return false;
}

static bool str_in(const char *s, const char *const *set) {
  for (; *set; set++)
    if (!strcmp(s, *set)) return true;
  return false;
}

static int check_prefix(struct vctx *v, const char *path, const struct tc_prefix *p, int family,
                        const char *range) {
  if (!p->family) return 0;
  if (p->family != family)
    return fail(v, path, "%s is not an IPv%d prefix", p->text, family);
  struct tc_prefix outer;
  if (tc_prefix_parse(range, &outer) < 0) return tc_err_set(v->err, TC_EINTERNAL, "bad built-in range");
  bool inside = tc_prefix_contains(&outer, p);
  free(outer.text);
  if (!inside) return fail(v, path, "%s is not inside %s", p->text, range);
  return 0;
}

int cfg_validate(struct tc_config *cfg, const void *lctx, struct tc_err *err) {
  struct vctx vv = {cfg, lctx, err}, *v = &vv;
  char host[256];
  int rc;

  /* server_url */
  if (!cfg->server_url[0]) return fail(v, "server_url", "must be set (e.g. https://headscale.example.com)");
  bool https;
  if (!parse_http_url(cfg->server_url, host, &https))
    return fail(v, "server_url", "must be an http:// or https:// URL, got \"%.200s\"", cfg->server_url);
  free(cfg->server_host);
  cfg->server_host = tc_xstrdup(host);

  /* listeners */
  if ((rc = check_addr(v, "listen_addr", cfg->listen_addr, true, false)) < 0) return rc;
  if ((rc = check_addr(v, "metrics_listen_addr", cfg->metrics_listen_addr, false, false)) < 0) return rc;
  if ((rc = check_addr(v, "grpc_listen_addr", cfg->grpc_listen_addr, false, false)) < 0) return rc;
  for (size_t i = 0; i < cfg->trusted_proxies.n; i++)
    if (cfg->trusted_proxies.v[i].bits == 0)
      return fail(v, "trusted_proxies", "%s covers every address; list the proxies' own ranges",
                  cfg->trusted_proxies.v[i].text);

  if (!cfg->noise.private_key_path[0])
    return fail(v, "noise.private_key_path", "must be set (the Noise key is created there if missing)");

  /* prefixes */
  if (!cfg->prefixes.v4.family && !cfg->prefixes.v6.family)
    return fail(v, "prefixes", "at least one of prefixes.v4 and prefixes.v6 must be set");
  if ((rc = check_prefix(v, "prefixes.v4", &cfg->prefixes.v4, 4, "100.64.0.0/10")) < 0) return rc;
  if ((rc = check_prefix(v, "prefixes.v6", &cfg->prefixes.v6, 6, "fd7a:115c:a1e0::/48")) < 0) return rc;

  /* database */
  if (cfg->database.type == TC_CFG_DB_SQLITE) {
    if (!cfg->database.sqlite.path[0])
      return fail(v, "database.sqlite.path", "must be set when database.type is sqlite");
  } else {
    if (!cfg->database.postgres.host[0])
      return fail(v, "database.postgres.host", "must be set when database.type is postgres");
    if (!cfg->database.postgres.name[0])
      return fail(v, "database.postgres.name", "must be set when database.type is postgres");
    if (cfg->database.postgres.port > 65535)
      return fail(v, "database.postgres.port", "%d is not a TCP port", cfg->database.postgres.port);
    static const char *const ssl[] = {"true",    "false",     "disable",     "allow", "prefer",
                                      "require", "verify-ca", "verify-full", NULL};
    if (!str_in(cfg->database.postgres.ssl, ssl))
      return fail(v, "database.postgres.ssl",
                  "unknown value \"%.100s\" (expected true, false or a libpq sslmode)",
                  cfg->database.postgres.ssl);
  }

  /* policy */
  if (cfg->policy.mode == TC_POLICY_MODE_DATABASE && cfg->policy.path[0])
    warn(v, "policy.path: ignored because policy.mode is database");

  /* DNS */
  const char *bd = cfg->dns.base_domain;
  if (bd[0]) {
    if (!domain_ok(bd))
      return fail(v, "dns.base_domain", "\"%.200s\" is not a domain name (FQDN without trailing dot)", bd);
    size_t hl = strlen(cfg->server_host), bl = strlen(bd);
    if (!strcasecmp(cfg->server_host, bd))
      return fail(v, "dns.base_domain", "must not be the same as server_url's host (%s)", cfg->server_host);
    if (hl > bl && cfg->server_host[hl - bl - 1] == '.' && !strcasecmp(cfg->server_host + hl - bl, bd))
      return fail(v, "dns.base_domain", "must not be a suffix of server_url's host (%s)", cfg->server_host);
  } else if (cfg->dns.magic_dns) {
    return fail(v, "dns.base_domain", "must be set when dns.magic_dns is true");
  }
  if (cfg->dns.override_local_dns && cfg->dns.nameservers.global.n == 0)
    return fail(v, "dns.nameservers.global", "must be set when dns.override_local_dns is true");
  for (size_t i = 0; i < cfg->dns.nameservers.global.n; i++)
    if (!nameserver_ok(cfg->dns.nameservers.global.v[i]))
      return fail(v, "dns.nameservers.global", "\"%.200s\" is not an IP address or DoH URL",
                  cfg->dns.nameservers.global.v[i]);
  for (size_t i = 0; i < cfg->dns.nameservers.n_split; i++) {
    const struct tc_split_dns *s = &cfg->dns.nameservers.split[i];
    if (!domain_ok(s->domain))
      return fail(v, "dns.nameservers.split", "\"%.200s\" is not a domain name", s->domain);
    for (size_t j = 0; j < s->nameservers.n; j++)
      if (!nameserver_ok(s->nameservers.v[j]))
        return fail(v, "dns.nameservers.split", "%s[%zu]: \"%.200s\" is not an IP address or DoH URL",
                  s->domain, j, s->nameservers.v[j]);
  }
  for (size_t i = 0; i < cfg->dns.search_domains.n; i++)
    if (!domain_ok(cfg->dns.search_domains.v[i]))
      return fail(v, "dns.search_domains", "\"%.200s\" is not a domain name", cfg->dns.search_domains.v[i]);
  for (size_t i = 0; i < cfg->dns.n_extra_records; i++) {
    const struct tc_dns_record *r = &cfg->dns.extra_records[i];
    char path[80];
    snprintf(path, sizeof(path), "dns.extra_records[%zu].type", i);
    if (strcmp(r->type, "A") && strcmp(r->type, "AAAA"))
      return fail(v, path, "\"%.50s\" is not supported (expected A or AAAA)", r->type);
    snprintf(path, sizeof(path), "dns.extra_records[%zu].value", i);
    if (!is_ip(r->value, r->type[1] ? 6 : 4))
      return fail(v, path, "\"%.100s\" is not an IPv%d address", r->value, r->type[1] ? 6 : 4);
    snprintf(path, sizeof(path), "dns.extra_records[%zu].name", i);
    if (!domain_ok(r->name)) return fail(v, path, "\"%.200s\" is not a domain name", r->name);
  }
  if (cfg->dns.n_extra_records && cfg->dns.extra_records_path[0])
    return fail(v, "dns.extra_records_path", "cannot be combined with dns.extra_records");

  /* DERP */
  for (size_t i = 0; i < cfg->derp.urls.n; i++)
    if (!parse_http_url(cfg->derp.urls.v[i], host, NULL))
      return fail(v, "derp.urls", "\"%.200s\" is not an http(s) URL", cfg->derp.urls.v[i]);
  if (cfg->derp.server.enabled) {
    if (!cfg->derp.server.stun_listen_addr[0])
      return fail(v, "derp.server.stun_listen_addr", "must be set when derp.server.enabled is true");
    if ((rc = check_addr(v, "derp.server.stun_listen_addr", cfg->derp.server.stun_listen_addr, true, false)) <
        0)
      return rc;
    if (cfg->derp.server.region_id <= 0)
      return fail(v, "derp.server.region_id", "must be a positive region number when derp.server.enabled");
    if (!cfg->derp.server.private_key_path[0])
      return fail(v, "derp.server.private_key_path", "must be set when derp.server.enabled is true");
    if (!cfg->derp.server.automatically_add_embedded_derp_region && cfg->derp.paths.n == 0)
      return fail(v, "derp.server.automatically_add_embedded_derp_region",
                  "false requires the embedded region to be described in derp.paths");
    /* http:// without a certificate is the out-of-the-box setup: serve
     * answers TLS itself with a self-signed certificate (and says so). */
    if (!https && cfg->tls_cert_path[0])
      warn(v, "derp.server.enabled: DERP needs TLS; server_url should use https:// (or a TLS proxy in front)");
  }
  if (cfg->derp.server.ipv4[0] && !is_ip(cfg->derp.server.ipv4, 4))
    return fail(v, "derp.server.ipv4", "\"%.100s\" is not an IPv4 address", cfg->derp.server.ipv4);
  if (cfg->derp.server.ipv6[0] && !is_ip(cfg->derp.server.ipv6, 6))
    return fail(v, "derp.server.ipv6", "\"%.100s\" is not an IPv6 address", cfg->derp.server.ipv6);
  if (cfg->derp.auto_update_enabled && cfg->derp.update_frequency_ms <= 0)
    return fail(v, "derp.update_frequency", "must be positive when derp.auto_update_enabled is true");

  /* nodes: Tailscale clients keep-alive every 60s, so anything shorter than
   * that plus slack would delete live ephemeral nodes. */
  if (cfg->node.ephemeral.inactivity_timeout_ms <= 65000) {
    char d[48];
    return fail(v, "node.ephemeral.inactivity_timeout", "%s is too low, must be more than 1m5s",
                cfg_go_duration(cfg->node.ephemeral.inactivity_timeout_ms, d));
  }
  if (cfg->node.routes.ha.probe_interval_ms > 0) {
    if (cfg->node.routes.ha.probe_interval_ms < 2000)
      return fail(v, "node.routes.ha.probe_interval", "must be at least 2s (or 0 to disable)");
    if (cfg->node.routes.ha.probe_timeout_ms < 1000)
      return fail(v, "node.routes.ha.probe_timeout", "must be at least 1s");
    if (cfg->node.routes.ha.probe_timeout_ms >= cfg->node.routes.ha.probe_interval_ms)
      return fail(v, "node.routes.ha.probe_timeout", "must be less than node.routes.ha.probe_interval");
  }

  /* TLS */
  if (cfg->tls_cert_path[0] && !cfg->tls_key_path[0])
    return fail(v, "tls_key_path", "must be set together with tls_cert_path");
  if (cfg->tls_key_path[0] && !cfg->tls_cert_path[0])
    return fail(v, "tls_cert_path", "must be set together with tls_key_path");
  if (cfg->tls_letsencrypt_hostname[0]) {
    if (cfg->tls_cert_path[0])
      return fail(v, "tls_letsencrypt_hostname", "set either tls_letsencrypt_hostname or tls_cert_path/tls_key_path, not both");
    if (!domain_ok(cfg->tls_letsencrypt_hostname))
      return fail(v, "tls_letsencrypt_hostname", "\"%.200s\" is not a domain name", cfg->tls_letsencrypt_hostname);
    if (!parse_http_url(cfg->acme_url, host, NULL))
      return fail(v, "acme_url", "must be an http(s) URL of an ACME directory, got \"%.200s\"", cfg->acme_url);
    if (cfg->tls_letsencrypt_challenge_type == TC_ACME_HTTP01 && !cfg->tls_letsencrypt_listen[0])
      return fail(v, "tls_letsencrypt_listen", "must be set for the HTTP-01 challenge");
    if (cfg->tls_letsencrypt_challenge_type == TC_ACME_TLSALPN01) {
      size_t n = strlen(cfg->listen_addr);
      if (n < 4 || strcmp(cfg->listen_addr + n - 4, ":443"))
        warn(v, "tls_letsencrypt_challenge_type: TLS-ALPN-01 needs the server reachable on port 443; "
                "listen_addr is %s", cfg->listen_addr);
    }
  }
  if ((rc = check_addr(v, "tls_letsencrypt_listen", cfg->tls_letsencrypt_listen, false, true)) < 0) return rc;

  /* OIDC */
  if (cfg->oidc.client_secret[0] && cfg->oidc.client_secret_path[0])
    return fail(v, "oidc.client_secret_path", "cannot be combined with oidc.client_secret");
  if (strcmp(cfg->oidc.pkce.method, "plain") && strcmp(cfg->oidc.pkce.method, "S256"))
    return fail(v, "oidc.pkce.method", "unknown value \"%.50s\" (expected plain or S256)", cfg->oidc.pkce.method);
  if (cfg->oidc.issuer[0]) {
    if (!parse_http_url(cfg->oidc.issuer, host, NULL))
      return fail(v, "oidc.issuer", "must be an http(s) URL, got \"%.200s\"", cfg->oidc.issuer);
    if (!cfg->oidc.client_id[0]) return fail(v, "oidc.client_id", "must be set when oidc.issuer is set");
    bool openid = false;
    for (size_t i = 0; i < cfg->oidc.scope.n; i++)
      if (!strcmp(cfg->oidc.scope.v[i], "openid")) openid = true;
    if (!openid) warn(v, "oidc.scope: does not include \"openid\"; most providers will refuse the login");
  }

  /* tuning */
  if (cfg->tuning.node_store_batch_size <= 0)
    return fail(v, "tuning.node_store_batch_size", "must be positive");
  if (cfg->tuning.node_store_batch_timeout_ms <= 0)
    return fail(v, "tuning.node_store_batch_timeout", "must be positive");
  return 0;
}
