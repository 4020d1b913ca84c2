/* encode: tailcfg JSON written by hand into a tc_buf, so that fragments
 * (one peer Node each) can be produced once and concatenated into many
 * messages. Field names and zero-value rules follow Go's encoding/json as
 * the client decodes them (doc §1.4, §7, §8). Reentrant. */
#include <arpa/inet.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "mapper/mapper_int.h"

#define TAGGED_LOGIN "tagged-devices"
#define TAGGED_DISPLAY "Tagged Devices"

/* ---- DNS and environment ------------------------------------------------------ */

static void resolver_list(struct tc_buf *b, const struct tc_strlist *l) {
  tc_buf_putc(b, '[');
  for (size_t i = 0; i < l->n; i++) {
    if (i) tc_buf_putc(b, ',');
    tc_buf_puts(b, "{\"Addr\":");
    tc_mapper_json_str(b, l->v[i]);
    tc_buf_putc(b, '}');
  }
  tc_buf_putc(b, ']');
}

char *tc_mapper_dns_json(const struct tc_config *cfg) {
  struct tc_buf b = TC_BUF_INIT;
  bool first = true;
  tc_buf_putc(&b, '{');
  const struct tc_strlist *global = &cfg->dns.nameservers.global;
  if (global->n) {
    /* Without override_local_dns the OS resolvers stay in charge; ours only
     * serve as the default behind split DNS (Headscale's reading). */
    tc_mapper_key(&b, &first, cfg->dns.override_local_dns ? "Resolvers" : "FallbackResolvers");
    resolver_list(&b, global);
  }
  if (cfg->dns.nameservers.n_split) {
    tc_mapper_key(&b, &first, "Routes");
    tc_buf_putc(&b, '{');
    for (size_t i = 0; i < cfg->dns.nameservers.n_split; i++) {
      const struct tc_split_dns *sd = &cfg->dns.nameservers.split[i];
      if (i) tc_buf_putc(&b, ',');
      tc_mapper_json_str(&b, sd->domain);
      tc_buf_putc(&b, ':');
      resolver_list(&b, &sd->nameservers);
    }
    tc_buf_putc(&b, '}');
  }
  bool has_base = cfg->dns.base_domain && cfg->dns.base_domain[0];
  if (has_base || cfg->dns.search_domains.n) {
    tc_mapper_key(&b, &first, "Domains");
    tc_buf_putc(&b, '[');
    bool f2 = true;
    if (has_base) {
      tc_mapper_json_str(&b, cfg->dns.base_domain);
      f2 = false;
    }
    for (size_t i = 0; i < cfg->dns.search_domains.n; i++) {
      if (has_base && !strcmp(cfg->dns.search_domains.v[i], cfg->dns.base_domain)) continue;
      if (!f2) tc_buf_putc(&b, ',');
      f2 = false;
      tc_mapper_json_str(&b, cfg->dns.search_domains.v[i]);
    }
    tc_buf_putc(&b, ']');
  }
  tc_mapper_key(&b, &first, "Proxied");
  tc_buf_puts(&b, cfg->dns.magic_dns ? "true" : "false");
  /* extra_records from the config, or from the JSON file extra_records_path
   * names (Headscale's format: [{"name":..,"type":..,"value":..}], keys in
   * either case). A missing or malformed file contributes nothing and is
   * logged: DNS must not take the whole map down. */
  json_t *file = NULL;
  if (cfg->dns.extra_records_path && cfg->dns.extra_records_path[0]) {
    char *text = NULL;
    size_t tl = 0;
    struct tc_err err = {0};
    if (tc_read_file(cfg->dns.extra_records_path, 4u << 20, &text, &tl, &err) == 0) {
      file = json_loadb(text, tl, 0, NULL);
      if (!json_is_array(file)) {
        tc_warn("dns.extra_records_path %s: not a JSON array of records", cfg->dns.extra_records_path);
        json_decref(file);
        file = NULL;
      }
    } else {
      tc_warn("dns.extra_records_path: %s", err.msg);
    }
    free(text);
  }
  size_t nfile = file ? json_array_size(file) : 0;
  if (cfg->dns.n_extra_records || nfile) {
    tc_mapper_key(&b, &first, "ExtraRecords");
    tc_buf_putc(&b, '[');
    bool f3 = true;
    for (size_t i = 0; i < cfg->dns.n_extra_records + nfile; i++) {
      const char *name, *type, *value;
      if (i < cfg->dns.n_extra_records) {
        const struct tc_dns_record *r = &cfg->dns.extra_records[i];
        name = r->name, type = r->type, value = r->value;
      } else {
        json_t *o = json_array_get(file, i - cfg->dns.n_extra_records);
#define GETS(k1, k2) \
  (json_string_value(json_object_get(o, k1)) ? json_string_value(json_object_get(o, k1)) : json_string_value(json_object_get(o, k2)))
        name = GETS("name", "Name");
        type = GETS("type", "Type");
        value = GETS("value", "Value");
#undef GETS
      }
      if (!name || !name[0] || !value || !value[0]) continue;
      if (!f3) tc_buf_putc(&b, ',');
      f3 = false;
      tc_buf_puts(&b, "{\"Name\":");
      tc_mapper_json_str(&b, name);
      if (type && type[0]) {
        tc_buf_puts(&b, ",\"Type\":");
        tc_mapper_json_str(&b, type);
      }
      tc_buf_puts(&b, ",\"Value\":");
      tc_mapper_json_str(&b, value);
      tc_buf_putc(&b, '}');
    }
    tc_buf_putc(&b, ']');
  }
  json_decref(file);
  tc_buf_putc(&b, '}');
  return tc_buf_steal(&b, NULL);
}

void tc_mapper_env_from_config(struct tc_mapper_env *env, const struct tc_config *cfg) {
  memset(env, 0, sizeof *env);
  const char *base = cfg->dns.base_domain ? cfg->dns.base_domain : "";
  env->base_domain = tc_xstrdup(base);
  env->domain = tc_xstrdup(base);
  env->dns_json = tc_mapper_dns_json(cfg);
  /* Headscale grants every node these attributes; without a policy module
   * everyone is an admin of their own tailnet and may be an SSH target. */
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_puts(&b, "{\"https://tailscale.com/cap/is-admin\":[],\"https://tailscale.com/cap/ssh\":[]");
  if (cfg->taildrop.enabled) tc_buf_puts(&b, ",\"https://tailscale.com/cap/file-sharing\":[]");
  if (cfg->randomize_client_port) tc_buf_puts(&b, ",\"randomize-client-port\":[]");
  tc_buf_printf(&b, ",\"default-auto-update\":[%s]", cfg->auto_update.enabled ? "true" : "false");
  tc_buf_putc(&b, '}');
  env->capmap_json = tc_buf_steal(&b, NULL);
  env->disable_logtail = !cfg->logtail.enabled;
}

void tc_mapper_env_free(struct tc_mapper_env *env) {
  if (!env) return;
  free(env->base_domain);
  free(env->domain);
  free(env->dns_json);
  free(env->derp_json);
  free(env->capmap_json);
  free(env->filter_json);
  free(env->ssh_json);
  memset(env, 0, sizeof *env);
}

/* ---- nodes -------------------------------------------------------------------------- */

char *tc_mapper_fqdn(const struct tc_mapper_env *env, const struct tc_node *n) {
  const char *label = n->given_name && n->given_name[0] ? n->given_name
                      : n->hostname && n->hostname[0]   ? n->hostname
                                                        : NULL;
  char idname[32];
  if (!label) {
    snprintf(idname, sizeof idname, "node-%lld", (long long)n->id);
    label = idname;
  }
  const char *base = env && env->base_domain ? env->base_domain : "";
  if (base[0]) return tc_xasprintf("%s.%s.", label, base);
  return tc_xasprintf("%s.", label);
}

static void put_addrs(struct tc_buf *b, const struct tc_node *n, const struct tc_strv *extra) {
  char ip[INET6_ADDRSTRLEN];
  bool first = true;
  tc_buf_putc(b, '[');
  if (n->has_ipv4) {
    inet_ntop(AF_INET, n->ipv4, ip, sizeof ip);
    tc_buf_printf(b, "\"%s/32\"", ip);
    first = false;
  }
  if (n->has_ipv6) {
    inet_ntop(AF_INET6, n->ipv6, ip, sizeof ip);
    tc_buf_printf(b, "%s\"%s/128\"", first ? "" : ",", ip);
    first = false;
  }
  for (size_t i = 0; extra && i < extra->n; i++) {
    if (!first) tc_buf_putc(b, ',');
    first = false;
    tc_mapper_json_str(b, extra->v[i]);
  }
  tc_buf_putc(b, ']');
}

static bool is_exit_route(const char *p) { return !strcmp(p, "0.0.0.0/0") || !strcmp(p, "::/0"); }

void tc_mapper_encode_node(struct tc_buf *b, const struct tc_mapper_env *env, const struct tc_node *n,
                           const struct tc_mapper_node_extra *x, enum tc_mapper_form form, int64_t now) {
  static const struct tc_mapper_node_extra none;
  if (!x) x = &none;
  char key[TC_MAPPER_KEY_TEXT];
  bool first = true;
  tc_buf_putc(b, '{');
  tc_mapper_key(b, &first, "ID");
  tc_buf_printf(b, "%lld", (long long)n->id);
  tc_mapper_key(b, &first, "StableID");
  tc_buf_printf(b, "\"%lld\"", (long long)n->id);
  char *name = tc_mapper_fqdn(env, n);
  tc_mapper_key(b, &first, "Name");
  tc_mapper_json_str(b, name);
  free(name);
  tc_mapper_key(b, &first, "User");
  tc_buf_printf(b, "%lld", (long long)(n->tags.n ? TC_MAPPER_TAGGED_USER_ID : n->user_id));
  tc_mapper_key(b, &first, "Key");
  tc_mapper_key_format(TC_MKEY_NODE, n->node_key, key);
  tc_mapper_json_str(b, key);
  tc_mapper_key(b, &first, "KeyExpiry");
  tc_mapper_json_time(b, n->expiry);
  tc_mapper_key(b, &first, "Machine");
  tc_mapper_key_format(TC_MKEY_MACHINE, n->machine_key, key);
  tc_mapper_json_str(b, key);
  if (!tc_mapper_key_is_zero(n->disco_key)) {
    tc_mapper_key(b, &first, "DiscoKey");
    tc_mapper_key_format(TC_MKEY_DISCO, n->disco_key, key);
    tc_mapper_json_str(b, key);
  }
  tc_mapper_key(b, &first, "Addresses");
  put_addrs(b, n, NULL);
  /* Routes count once approved and announced. Without an HA decision from
   * the caller every such subnet route is primary here. */
  struct tc_strv prim = {0}, allowed = {0};
  for (size_t i = 0; i < n->approved_routes.n; i++) {
    const char *r = n->approved_routes.v[i];
    if (!tc_strv_contains(&n->announced_routes, r)) continue;
    if (is_exit_route(r)) {
      tc_strv_push(&allowed, r);
    } else if (!x->primary_routes || tc_strv_contains(x->primary_routes, r)) {
      tc_strv_push(&allowed, r);
      tc_strv_push(&prim, r);
    }
  }
  /* AllowedIPs = addresses + primary subnet routes + exit routes. Always
   * sent: clients below capver 112 need it. */
  tc_mapper_key(b, &first, "AllowedIPs");
  if (x->allowed_ips) tc_mapper_json_strv(b, x->allowed_ips);
  else put_addrs(b, n, &allowed);
  if (prim.n) {
    tc_mapper_key(b, &first, "PrimaryRoutes");
    tc_mapper_json_strv(b, &prim);
  }
  tc_strv_free(&allowed);
  tc_strv_free(&prim);
  if (n->endpoints.n) {
    tc_mapper_key(b, &first, "Endpoints");
    tc_mapper_json_strv(b, &n->endpoints);
  }
  if (n->home_derp > 0) {
    tc_mapper_key(b, &first, "HomeDERP");
    tc_buf_printf(b, "%d", n->home_derp);
    /* Clients below capver 111 (v1.60-v1.78) only read the legacy form. */
    tc_mapper_key(b, &first, "DERP");
    tc_buf_printf(b, "\"127.3.3.40:%d\"", n->home_derp);
  }
  tc_mapper_key(b, &first, "Hostinfo");
  if (n->hostinfo_json && n->hostinfo_json[0] == '{') {
    tc_buf_puts(b, n->hostinfo_json);
  } else {
    tc_buf_puts(b, "{\"Hostname\":");
    tc_mapper_json_str(b, n->hostname ? n->hostname : "");
    tc_buf_putc(b, '}');
  }
  tc_mapper_key(b, &first, "Created");
  tc_mapper_json_time(b, n->created_at);
  if (n->cap_version > 0) {
    tc_mapper_key(b, &first, "Cap");
    tc_buf_printf(b, "%d", n->cap_version);
  }
  if (n->tags.n) {
    tc_mapper_key(b, &first, "Tags");
    tc_mapper_json_strv(b, &n->tags);
  }
  if (form == TC_MAPPER_PEER && x->online_known) {
    tc_mapper_key(b, &first, "Online");
    tc_buf_puts(b, x->online ? "true" : "false");
    /* LastSeen on an online peer confuses clients: only while offline. */
    if (!x->online && n->last_seen) {
      tc_mapper_key(b, &first, "LastSeen");
      tc_mapper_json_time(b, n->last_seen);
    }
  }
  tc_mapper_key(b, &first, "MachineAuthorized");
  tc_buf_puts(b, "true");
  if (n->expiry && n->expiry <= now) {
    tc_mapper_key(b, &first, "Expired");
    tc_buf_puts(b, "true");
  }
  const char *capmap = x->capmap_json ? x->capmap_json : env ? env->capmap_json : NULL;
  if (capmap && capmap[0]) {
    tc_mapper_key(b, &first, "CapMap");
    tc_buf_puts(b, capmap);
  }
  tc_buf_putc(b, '}');
}

/* ---- users ---------------------------------------------------------------------------- */

static const char *login_name(const struct tc_user *u) {
  return u->email && u->email[0] ? u->email : u->name ? u->name : "";
}

static const char *display_name(const struct tc_user *u) {
  return u->display_name && u->display_name[0] ? u->display_name : u->name ? u->name : "";
}

void tc_mapper_encode_user_profile(struct tc_buf *b, const struct tc_user *u) {
  if (!u) {
    tc_buf_printf(b, "{\"ID\":%lld,\"LoginName\":\"" TAGGED_LOGIN "\",\"DisplayName\":\"" TAGGED_DISPLAY
                     "\",\"ProfilePicURL\":\"\"}",
                  (long long)TC_MAPPER_TAGGED_USER_ID);
    return;
  }
  tc_buf_printf(b, "{\"ID\":%lld,\"LoginName\":", (long long)u->id);
  tc_mapper_json_str(b, login_name(u));
  tc_buf_puts(b, ",\"DisplayName\":");
  tc_mapper_json_str(b, display_name(u));
  tc_buf_puts(b, ",\"ProfilePicURL\":");
  tc_mapper_json_str(b, u->profile_pic_url ? u->profile_pic_url : "");
  tc_buf_putc(b, '}');
}

static void put_profiles(struct tc_buf *b, bool *first, const struct tc_user *users, size_t n, bool tagged) {
  if (!n && !tagged) return;
  tc_mapper_key(b, first, "UserProfiles");
  tc_buf_putc(b, '[');
  for (size_t i = 0; i < n; i++) {
    if (i) tc_buf_putc(b, ',');
    tc_mapper_encode_user_profile(b, &users[i]);
  }
  if (tagged) {
    if (n) tc_buf_putc(b, ',');
    tc_mapper_encode_user_profile(b, NULL);
  }
  tc_buf_putc(b, ']');
}

/* ---- messages --------------------------------------------------------------------------- */

#define ALLOW_ALL_FILTER "[{\"SrcIPs\":[\"*\"],\"DstPorts\":[{\"IP\":\"*\",\"Ports\":{\"First\":0,\"Last\":65535}}]}]"

static void put_frags(struct tc_buf *b, struct tc_mapper_frag *const *f, size_t n) {
  tc_buf_putc(b, '[');
  for (size_t i = 0; i < n; i++) {
    if (i) tc_buf_putc(b, ',');
    tc_buf_append(b, f[i]->data, f[i]->len);
  }
  tc_buf_putc(b, ']');
}

void tc_mapper_encode_full_open(struct tc_buf *b, const struct tc_mapper_env *env, const struct tc_mapper_full *m) {
  bool first = true;
  tc_buf_putc(b, '{');
  tc_mapper_key(b, &first, "ControlTime");
  tc_mapper_json_time(b, m->now);
  tc_mapper_key(b, &first, "Node");
  tc_buf_puts(b, m->self_json);
  if (env->derp_json) {
    tc_mapper_key(b, &first, "DERPMap");
    tc_buf_puts(b, env->derp_json);
  }
  /* "Peers":[] means "unchanged": omit the key when there are none. */
  if (m->n_peers) tc_buf_puts(b, ",\"Peers\":[");
}

void tc_mapper_encode_full_close(struct tc_buf *b, const struct tc_mapper_env *env, const struct tc_mapper_full *m) {
  bool first = false; /* ControlTime came first */
  if (m->n_peers) tc_buf_putc(b, ']');
  tc_mapper_key(b, &first, "PacketFilter");
  tc_buf_puts(b, env->filter_json ? env->filter_json : ALLOW_ALL_FILTER);
  if (env->dns_json) {
    tc_mapper_key(b, &first, "DNSConfig");
    tc_buf_puts(b, env->dns_json);
  }
  if (env->ssh_json) {
    tc_mapper_key(b, &first, "SSHPolicy");
    tc_buf_puts(b, env->ssh_json);
  }
  put_profiles(b, &first, m->users, m->n_users, m->tagged_profile);
  tc_mapper_key(b, &first, "Domain");
  tc_mapper_json_str(b, env->domain ? env->domain : "");
  tc_mapper_key(b, &first, "CollectServices");
  tc_buf_puts(b, "false");
  if (env->disable_logtail) {
    tc_mapper_key(b, &first, "Debug");
    tc_buf_puts(b, "{\"DisableLogTail\":true}");
  }
  tc_buf_putc(b, '}');
}

void tc_mapper_encode_full(struct tc_buf *b, const struct tc_mapper_env *env, const struct tc_mapper_full *m) {
  tc_mapper_encode_full_open(b, env, m);
  for (size_t i = 0; i < m->n_peers; i++) {
    if (i) tc_buf_putc(b, ',');
    tc_buf_append(b, m->peers[i]->data, m->peers[i]->len);
  }
  tc_mapper_encode_full_close(b, env, m);
}

static void put_patch(struct tc_buf *b, const struct tc_mapper_patch *p) {
  char key[TC_MAPPER_KEY_TEXT];
  tc_buf_printf(b, "{\"NodeID\":%lld", (long long)p->node_id);
  if (p->set & TC_PATCH_DERP) tc_buf_printf(b, ",\"DERPRegion\":%d", p->derp_region);
  if (p->set & TC_PATCH_CAP) tc_buf_printf(b, ",\"Cap\":%d", p->cap);
  if (p->set & TC_PATCH_ENDPOINTS) {
    tc_buf_puts(b, ",\"Endpoints\":");
    tc_mapper_json_strv(b, p->endpoints);
  }
  if (p->set & TC_PATCH_KEY) {
    tc_mapper_key_format(TC_MKEY_NODE, p->key, key);
    tc_buf_puts(b, ",\"Key\":");
    tc_mapper_json_str(b, key);
  }
  /* A zero disco key must not travel as text the client might adopt. */
  if ((p->set & TC_PATCH_DISCO) && !tc_mapper_key_is_zero(p->disco_key)) {
    tc_mapper_key_format(TC_MKEY_DISCO, p->disco_key, key);
    tc_buf_puts(b, ",\"DiscoKey\":");
    tc_mapper_json_str(b, key);
  }
  if (p->set & TC_PATCH_ONLINE) tc_buf_printf(b, ",\"Online\":%s", p->online ? "true" : "false");
  if (p->set & TC_PATCH_LASTSEEN) {
    tc_buf_puts(b, ",\"LastSeen\":");
    tc_mapper_json_time(b, p->last_seen);
  }
  if (p->set & TC_PATCH_KEYEXPIRY) {
    tc_buf_puts(b, ",\"KeyExpiry\":");
    tc_mapper_json_time(b, p->key_expiry);
  }
  tc_buf_putc(b, '}');
}

bool tc_mapper_encode_delta(struct tc_buf *b, const struct tc_mapper_env *env, const struct tc_mapper_delta *d) {
  if (!tc_mapper_encode_delta_open(b, env, d)) return false;
  for (size_t i = 0; i < d->n_peers; i++) {
    if (i) tc_buf_putc(b, ',');
    tc_buf_append(b, d->peers[i]->data, d->peers[i]->len);
  }
  tc_mapper_encode_delta_close(b, env, d);
  return true;
}

bool tc_mapper_encode_delta_open(struct tc_buf *b, const struct tc_mapper_env *env, const struct tc_mapper_delta *d) {
  bool any = d->self_json || d->n_peers || d->n_changed || d->n_removed || d->n_patches || d->n_online || d->with_filter ||
             d->with_dns || (d->with_derp && env->derp_json) || (d->with_ssh && env->ssh_json);
  if (!any) return false;
  bool first = true;
  tc_buf_putc(b, '{');
  tc_mapper_key(b, &first, "ControlTime");
  tc_mapper_json_time(b, d->now);
  if (d->self_json) {
    tc_mapper_key(b, &first, "Node");
    tc_buf_puts(b, d->self_json);
  }
  if (d->with_derp && env->derp_json) {
    tc_mapper_key(b, &first, "DERPMap");
    tc_buf_puts(b, env->derp_json);
  }
  /* A non-empty "Peers" replaces the client's whole peer set, and v1.60 to
   * v1.98 then skip every other peer delta in the same message (removed,
   * changed, OnlineChange, patches): callers send it alone. */
  if (d->n_peers) tc_buf_puts(b, ",\"Peers\":[");
  return true;
}

void tc_mapper_encode_delta_close(struct tc_buf *b, const struct tc_mapper_env *env, const struct tc_mapper_delta *d) {
  bool first = false; /* ControlTime came first */
  if (d->n_peers) tc_buf_putc(b, ']');
  if (d->n_removed) {
    tc_mapper_key(b, &first, "PeersRemoved");
    tc_buf_putc(b, '[');
    for (size_t i = 0; i < d->n_removed; i++) tc_buf_printf(b, "%s%lld", i ? "," : "", (long long)d->removed[i]);
    tc_buf_putc(b, ']');
  }
  if (d->n_changed) {
    tc_mapper_key(b, &first, "PeersChanged");
    put_frags(b, d->changed, d->n_changed);
  }
  if (d->n_online) {
    tc_mapper_key(b, &first, "OnlineChange");
    tc_buf_putc(b, '{');
    for (size_t i = 0; i < d->n_online; i++)
      tc_buf_printf(b, "%s\"%lld\":%s", i ? "," : "", (long long)d->online_ids[i],
                    d->online_vals[i] ? "true" : "false");
    tc_buf_putc(b, '}');
  }
  if (d->n_patches) {
    tc_mapper_key(b, &first, "PeersChangedPatch");
    tc_buf_putc(b, '[');
    for (size_t i = 0; i < d->n_patches; i++) {
      if (i) tc_buf_putc(b, ',');
      put_patch(b, &d->patches[i]);
    }
    tc_buf_putc(b, ']');
  }
  if (d->with_filter) {
    tc_mapper_key(b, &first, "PacketFilter");
    tc_buf_puts(b, env->filter_json ? env->filter_json : ALLOW_ALL_FILTER);
  }
  if (d->with_dns && env->dns_json) {
    tc_mapper_key(b, &first, "DNSConfig");
    tc_buf_puts(b, env->dns_json);
  }
  if (d->with_ssh && env->ssh_json) {
    tc_mapper_key(b, &first, "SSHPolicy");
    tc_buf_puts(b, env->ssh_json);
  }
  put_profiles(b, &first, d->users, d->n_users, d->tagged_profile);
  tc_buf_putc(b, '}');
}

void tc_mapper_encode_keepalive(struct tc_buf *b) { tc_buf_puts(b, "{\"KeepAlive\":true}"); }

/* ---- register response --------------------------------------------------------------------- */

char *tc_mapper_encode_register_response(const struct tc_mapper_register_response *r) {
  struct tc_buf b = TC_BUF_INIT;
  bool first = true;
  tc_buf_putc(&b, '{');
  if (r->user || r->tagged) {
    long long id = r->tagged ? (long long)TC_MAPPER_TAGGED_USER_ID : (long long)r->user->id;
    const char *dn = r->tagged ? TAGGED_DISPLAY : display_name(r->user);
    const char *ln = r->tagged ? TAGGED_LOGIN : login_name(r->user);
    const char *pic = !r->tagged && r->user->profile_pic_url ? r->user->profile_pic_url : "";
    tc_mapper_key(&b, &first, "User");
    tc_buf_printf(&b, "{\"ID\":%lld,\"DisplayName\":", id);
    tc_mapper_json_str(&b, dn);
    tc_buf_puts(&b, ",\"ProfilePicURL\":");
    tc_mapper_json_str(&b, pic);
    tc_buf_puts(&b, ",\"Created\":");
    tc_mapper_json_time(&b, r->tagged ? 0 : r->user->created_at);
    tc_buf_putc(&b, '}');
    tc_mapper_key(&b, &first, "Login");
    tc_buf_printf(&b, "{\"ID\":%lld,\"Provider\":", id);
    tc_mapper_json_str(&b, !r->tagged && r->user->provider ? r->user->provider : "");
    tc_buf_puts(&b, ",\"LoginName\":");
    tc_mapper_json_str(&b, ln);
    tc_buf_puts(&b, ",\"DisplayName\":");
    tc_mapper_json_str(&b, dn);
    tc_buf_puts(&b, ",\"ProfilePicURL\":");
    tc_mapper_json_str(&b, pic);
    tc_buf_putc(&b, '}');
  }
  tc_mapper_key(&b, &first, "NodeKeyExpired");
  tc_buf_puts(&b, r->node_key_expired ? "true" : "false");
  tc_mapper_key(&b, &first, "MachineAuthorized");
  tc_buf_puts(&b, r->machine_authorized ? "true" : "false");
  tc_mapper_key(&b, &first, "AuthURL");
  tc_mapper_json_str(&b, r->auth_url ? r->auth_url : "");
  if (r->error && r->error[0]) {
    tc_mapper_key(&b, &first, "Error");
    tc_mapper_json_str(&b, r->error);
  }
  tc_buf_putc(&b, '}');
  return tc_buf_steal(&b, NULL);
}
