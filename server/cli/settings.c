/* settings: converts a loaded struct tc_config into the neutral backend
 * settings (see cli_int.h for why this is a separate file). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_int.h"
#include "config/config.h"

/* Appends key='value' with libpq's quoting (backslash-escape ' and \). */
static void kv(struct tc_buf *b, const char *key, const char *value) {
  if (!value || !*value) return;
  if (b->len) tc_buf_putc(b, ' ');
  tc_buf_printf(b, "%s='", key);
  for (const char *p = value; *p; p++) {
    if (*p == '\'' || *p == '\\') tc_buf_putc(b, '\\');
    tc_buf_putc(b, *p);
  }
  tc_buf_putc(b, '\'');
}

void tc_backend_settings_from_config(const struct tc_config *cfg, struct tc_backend_settings *s) {
  memset(s, 0, sizeof *s);
  s->postgres = cfg->database.type == TC_CFG_DB_POSTGRES;
  s->sqlite_path = cfg->database.sqlite.path;
  s->sqlite_wal = cfg->database.sqlite.write_ahead_log;
  if (s->postgres) {
    struct tc_buf b = TC_BUF_INIT;
    const struct tc_config *c = cfg;
    kv(&b, "host", c->database.postgres.host);
    if (c->database.postgres.port) {
      char port[16];
      snprintf(port, sizeof port, "%d", c->database.postgres.port);
      kv(&b, "port", port);
    }
    kv(&b, "dbname", c->database.postgres.name);
    kv(&b, "user", c->database.postgres.user);
    kv(&b, "password", c->database.postgres.pass);
    const char *ssl = c->database.postgres.ssl;
    if (ssl && *ssl) kv(&b, "sslmode", !strcmp(ssl, "false") ? "disable" : !strcmp(ssl, "true") ? "require" : ssl);
    s->pg_conninfo = tc_buf_steal(&b, NULL);
    s->pg_max_conns = c->database.postgres.max_open_conns > 0 ? c->database.postgres.max_open_conns : 0;
  }
  s->prefix_v4 = cfg->prefixes.v4.text ? cfg->prefixes.v4.text : "";
  s->prefix_v6 = cfg->prefixes.v6.text ? cfg->prefixes.v6.text : "";
  s->alloc_random = cfg->prefixes.allocation == TC_IP_ALLOC_RANDOM;
  s->base_domain = cfg->dns.magic_dns || (cfg->dns.base_domain && *cfg->dns.base_domain) ? cfg->dns.base_domain : NULL;
  s->node_expiry_ms = cfg->node.expiry_ms;
  s->ephemeral_timeout_ms = cfg->node.ephemeral.inactivity_timeout_ms;
  s->policy_file_mode = cfg->policy.mode == TC_POLICY_MODE_FILE;
  s->policy_path = cfg->policy.path;
}

void tc_backend_settings_free(struct tc_backend_settings *s) {
  if (!s) return;
  if (s->pg_conninfo) tc_free_secret(s->pg_conninfo, strlen(s->pg_conninfo));
  s->pg_conninfo = NULL;
}
