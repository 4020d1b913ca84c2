/* Policy parse + validate: HuJSON text -> struct tc_policy. Every error
 * names where (a path such as acls[2].dst[0] and its line:col in the text)
 * and why; unknown fields and unsupported features are refused rather than
 * ignored. Pure; any thread. */
#include <ctype.h>
#include <string.h>

#include "policy/policy_int.h"

/* ---- error location ------------------------------------------------------- */
struct seg {
  const char *key; /* NULL: index */
  int idx;
};

struct pctx {
  const char *std; /* standardized text (same offsets as the input) */
  size_t len;
  struct tc_policy *pol;
  struct tc_policy_err *err;
  struct seg path[12];
  int depth;
};

static size_t skip_ws(const char *t, size_t len, size_t i)
{
  while (i < len && (t[i] == ' ' || t[i] == '\t' || t[i] == '\n' || t[i] == '\r'))
    i++;
  return i;
}

static size_t skip_string(const char *t, size_t len, size_t i)
{
  i++;
  while (i < len && t[i] != '"') {
    if (t[i] == '\\')
      i++;
    i++;
  }
  return i < len ? i + 1 : len;
}

static size_t skip_value(const char *t, size_t len, size_t i)
{
  i = skip_ws(t, len, i);
  if (i >= len)
    return len;
  if (t[i] == '"')
    return skip_string(t, len, i);
  if (t[i] == '{' || t[i] == '[') {
    int d = 0;
    while (i < len) {
      if (t[i] == '"') {
        i = skip_string(t, len, i);
        continue;
      }
      if (t[i] == '{' || t[i] == '[')
        d++;
      else if (t[i] == '}' || t[i] == ']') {
        d--;
        if (d == 0)
          return i + 1;
      }
      i++;
    }
    return len;
  }
  while (i < len && !strchr(",]} \t\r\n", t[i]))
    i++;
  return i;
}

/* Offset of the value at the path (best effort; stops at the deepest found). */
static size_t locate(const struct pctx *c)
{
  const char *t = c->std;
  size_t len = c->len, i = skip_ws(t, len, 0);
  for (int d = 0; d < c->depth && i < len; d++) {
    const struct seg *s = &c->path[d];
    if (s->key && t[i] == '{') {
      size_t j = skip_ws(t, len, i + 1);
      bool found = false;
      while (j < len && t[j] == '"') {
        size_t ke = skip_string(t, len, j);
        size_t kl = ke - j - 2;
        bool match = kl == strlen(s->key) && !memcmp(t + j + 1, s->key, kl);
        j = skip_ws(t, len, ke);
        if (j < len && t[j] == ':')
          j = skip_ws(t, len, j + 1);
        if (match) {
          i = j;
          found = true;
          break;
        }
        j = skip_ws(t, len, skip_value(t, len, j));
        if (j < len && t[j] == ',')
          j = skip_ws(t, len, j + 1);
      }
      if (!found)
        return i;
    } else if (!s->key && t[i] == '[') {
      size_t j = skip_ws(t, len, i + 1);
      for (int k = 0; k < s->idx && j < len && t[j] != ']'; k++) {
        j = skip_ws(t, len, skip_value(t, len, j));
        if (j < len && t[j] == ',')
          j = skip_ws(t, len, j + 1);
      }
      if (j >= len || t[j] == ']')
        return i;
      i = j;
    } else {
      return i;
    }
  }
  return i;
}

static void path_text(const struct pctx *c, char *out, size_t outsz)
{
  size_t o = 0;
  out[0] = 0;
  for (int d = 0; d < c->depth && o < outsz; d++) {
    const struct seg *s = &c->path[d];
    int n;
    if (s->key)
      n = snprintf(out + o, outsz - o, d ? "[\"%s\"]" : "%s", s->key);
    else
      n = snprintf(out + o, outsz - o, "[%d]", s->idx);
    if (n < 0)
      break;
    o += (size_t)n;
  }
  /* Prefer a.b style for plain identifiers at depth 1. */
}

static int perr(struct pctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int perr(struct pctx *c, const char *fmt, ...)
{
  char why[300], where[180];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof(why), fmt, ap);
  va_end(ap);
  path_text(c, where, sizeof(where));
  size_t off = locate(c);
  int line = 1, col = 1;
  for (size_t i = 0; i < off && i < c->len; i++) {
    if (c->std[i] == '\n') {
      line++;
      col = 1;
    } else {
      col++;
    }
  }
  if (c->err) {
    c->err->code = TC_EINVAL;
    c->err->line = line;
    c->err->col = col;
    if (where[0])
      snprintf(c->err->msg, sizeof(c->err->msg), "%s: %s", where, why);
    else
      snprintf(c->err->msg, sizeof(c->err->msg), "%s", why);
  }
  return TC_EINVAL;
}

static void push_key(struct pctx *c, const char *k)
{
  if (c->depth < (int)TC_ARRAY_LEN(c->path))
    c->path[c->depth] = (struct seg){k, 0};
  c->depth++;
}
static void push_idx(struct pctx *c, int i)
{
  if (c->depth < (int)TC_ARRAY_LEN(c->path))
    c->path[c->depth] = (struct seg){NULL, i};
  c->depth++;
}
static void pop(struct pctx *c) { c->depth--; }

int tc_policy_err_at(struct tc_policy_err *err, const char *fmt, ...)
{
  if (err) {
    va_list ap;
    va_start(ap, fmt);
    err->code = TC_EINVAL;
    err->line = 0;
    err->col = 0;
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
  }
  return TC_EINVAL;
}

/* ---- small helpers --------------------------------------------------------- */
static char *trim_dup(const char *s)
{
  while (*s == ' ' || *s == '\t')
    s++;
  size_t n = strlen(s);
  while (n && (s[n - 1] == ' ' || s[n - 1] == '\t'))
    n--;
  return tc_xstrndup(s, n);
}

static bool ignorable_key(const char *k) { return k[0] == '#'; }

static int expect_type(struct pctx *c, json_t *v, json_type type, const char *what)
{
  if (!v || json_typeof(v) != type)
    return perr(c, "must be %s", what);
  return 0;
}

static int str_list(struct pctx *c, json_t *v, char ***out, size_t *n, bool allow_null)
{
  *out = NULL;
  *n = 0;
  if (!v || json_is_null(v)) {
    if (allow_null)
      return 0;
    return perr(c, "must be a list of strings");
  }
  if (!json_is_array(v))
    return perr(c, "must be a list of strings");
  size_t sz = json_array_size(v);
  *out = tc_xcalloc(sz ? sz : 1, sizeof(char *));
  for (size_t i = 0; i < sz; i++) {
    json_t *e = json_array_get(v, i);
    if (!json_is_string(e)) {
      push_idx(c, (int)i);
      int rc = perr(c, "must be a string");
      pop(c);
      return rc;
    }
    (*out)[(*n)++] = trim_dup(json_string_value(e));
  }
  return 0;
}

static void free_strv(char **v, size_t n)
{
  for (size_t i = 0; i < n; i++)
    free(v[i]);
  free(v);
}

static const struct name_list *find_list(const struct name_list *l, size_t n, const char *name)
{
  for (size_t i = 0; i < n; i++)
    if (!strcmp(l[i].name, name))
      return &l[i];
  return NULL;
}

static bool host_defined(const struct tc_policy *p, const char *name)
{
  for (size_t i = 0; i < p->nhosts; i++)
    if (!strcmp(p->hosts[i].name, name))
      return true;
  return false;
}

/* ---- protocols -------------------------------------------------------------- */
static const struct {
  const char *name;
  int num;
} protos[] = {
    {"icmp", 1}, {"igmp", 2}, {"ipv4", 4}, {"ip-in-ip", 4}, {"tcp", 6}, {"egp", 8}, {"igp", 9},
    {"udp", 17}, {"gre", 47}, {"esp", 50}, {"ah", 51}, {"ipv6-icmp", 58}, {"sctp", 132}, {"fc", 133},
};

const char *pol_proto_name(int p)
{
  for (size_t i = 0; i < TC_ARRAY_LEN(protos); i++)
    if (protos[i].num == p)
      return protos[i].name;
  return NULL;
}

/* -1 = any/empty, -2 = invalid, else number. */
int pol_proto_parse(const char *s)
{
  if (!*s)
    return -1;
  for (size_t i = 0; i < TC_ARRAY_LEN(protos); i++)
    if (tc_strieq(protos[i].name, s))
      return protos[i].num;
  if (s[0] == '0' && s[1])
    return -2;
  int v = 0;
  for (const char *p = s; *p; p++) {
    if (!isdigit((unsigned char)*p) || v > 255)
      return -2;
    v = v * 10 + (*p - '0');
  }
  if (v > 255)
    return -2;
  return v;
}

static bool proto_allows_ports(int p)
{
  return p == -1 || p == 6 || p == 17 || p == 132;
}

/* ---- aliases ---------------------------------------------------------------- */
static const char *ag_names[] = {"autogroup:internet", "autogroup:member", "autogroup:tagged",
                                 "autogroup:self", "autogroup:danger-all", "autogroup:nonroot"};

int pol_parse_alias_text(const char *s, struct alias *a, char *why, size_t whysz)
{
  memset(a, 0, sizeof(*a));
  a->s = tc_xstrdup(s);
  if (!strcmp(s, "*")) {
    a->kind = AL_WILDCARD;
    return 0;
  }
  if (!pol_ip_parse_prefix(s, &a->pfx, NULL)) {
    a->kind = AL_PREFIX;
    return 0;
  }
  if (tc_str_has_prefix(s, "autogroup:")) {
    for (size_t i = 0; i < TC_ARRAY_LEN(ag_names); i++) {
      if (!strcmp(s, ag_names[i])) {
        a->kind = AL_AUTOGROUP;
        a->ag = (int)i;
        return 0;
      }
    }
    static const char *roles[] = {"autogroup:admin", "autogroup:owner", "autogroup:it-admin",
                                  "autogroup:network-admin", "autogroup:billing-admin", "autogroup:auditor",
                                  "autogroup:shared"};
    for (size_t i = 0; i < TC_ARRAY_LEN(roles); i++)
      if (!strcmp(s, roles[i])) {
        snprintf(why, whysz, "%s is not supported: tailcoat has no user roles or sharing", s);
        return -1;
      }
    snprintf(why, whysz, "unknown autogroup %s", s);
    return -1;
  }
  if (tc_str_has_prefix(s, "group:")) {
    a->kind = AL_GROUP;
    return 0;
  }
  if (tc_str_has_prefix(s, "tag:")) {
    a->kind = AL_TAG;
    return 0;
  }
  if (tc_str_has_prefix(s, "user:")) {
    /* user:*@domain: every user of an email domain. */
    if (!tc_str_has_prefix(s, "user:*@") || !s[7] || strchr(s + 7, '@') || strchr(s + 7, '*')) {
      snprintf(why, whysz, "%s: expected user:*@<domain>", s);
      return -1;
    }
    a->kind = AL_USER;
    return 0;
  }
  if (strchr(s, '@')) {
    a->kind = AL_USER;
    return 0;
  }
  if (*s && !strchr(s, ':') && !strchr(s, '/')) {
    for (const char *p = s; *p; p++) {
      if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_' && *p != '.') {
        snprintf(why, whysz, "%s: invalid address", s);
        return -1;
      }
    }
    a->kind = AL_HOST;
    return 0;
  }
  snprintf(why, whysz, "%s: invalid address", s);
  return -1;
}

static void alias_free(struct alias *a)
{
  if (a)
    free(a->s);
}

static int tag_syntax(struct pctx *c, const char *t)
{
  const char *r = t + 4;
  if (!isalpha((unsigned char)r[0]))
    return perr(c, "%s: tag names must start with a letter, after 'tag:'", t);
  for (const char *p = r; *p; p++)
    if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_' && *p != '.')
      return perr(c, "%s: tag names can only contain letters, numbers, dashes, underscores and dots", t);
  return 0;
}

enum side { SIDE_SRC, SIDE_DST, SIDE_SSH_SRC, SIDE_SSH_DST, SIDE_ATTR, SIDE_APPROVER };

/* Checks that an alias refers to something defined and is allowed on this side. */
static int check_alias(struct pctx *c, const struct alias *a, enum side side, const char *sidename)
{
  const struct tc_policy *p = c->pol;
  switch (a->kind) {
  case AL_TAG:
    if (tag_syntax(c, a->s))
      return TC_EINVAL;
    if (!find_list(p->tag_owners, p->ntag_owners, a->s))
      return perr(c, "%s=tag not found: \"%s\"", sidename, a->s);
    return 0;
  case AL_GROUP:
    if (!find_list(p->groups, p->ngroups, a->s))
      return perr(c, "%s=group not found: \"%s\"", sidename, a->s);
    return 0;
  case AL_HOST:
    if (side == SIDE_SSH_DST)
      return perr(c, "invalid dst \"%s\"", a->s);
    if (!host_defined(p, a->s))
      return perr(c, "%s=host not found: \"%s\" (not a user, group, tag or defined host)", sidename, a->s);
    return 0;
  case AL_PREFIX:
    if (side == SIDE_SSH_DST)
      return perr(c, "invalid dst \"%s\"", a->s);
    return 0;
  case AL_WILDCARD:
    if (side == SIDE_SSH_DST)
      return perr(c, "wildcard (*) is not supported as SSH destination");
    return 0;
  case AL_USER:
    return 0;
  case AL_AUTOGROUP:
    switch (side) {
    case SIDE_SRC:
      if (a->ag == AG_SELF)
        return perr(c, "\"autogroup:self\" not valid on the src side of a rule");
      if (a->ag == AG_INTERNET)
        return perr(c, "autogroup:internet can only be used in ACL destinations");
      if (a->ag != AG_MEMBER && a->ag != AG_TAGGED && a->ag != AG_DANGER_ALL)
        return perr(c, "%s not valid on the src side of a rule", a->s);
      return 0;
    case SIDE_DST:
      if (a->ag == AG_DANGER_ALL)
        return perr(c, "cannot use autogroup:danger-all as a dst");
      if (a->ag == AG_NONROOT)
        return perr(c, "%s not valid on the dst side of a rule", a->s);
      return 0;
    case SIDE_SSH_SRC:
      if (a->ag != AG_MEMBER && a->ag != AG_TAGGED)
        return perr(c, "%s not valid as an SSH source", a->s);
      return 0;
    case SIDE_SSH_DST:
      if (a->ag != AG_MEMBER && a->ag != AG_TAGGED && a->ag != AG_SELF)
        return perr(c, "%s not valid as an SSH destination", a->s);
      return 0;
    case SIDE_ATTR:
      if (a->ag != AG_MEMBER && a->ag != AG_TAGGED)
        return perr(c, "%s not valid as a nodeAttrs target", a->s);
      return 0;
    case SIDE_APPROVER:
      return perr(c, "%s cannot approve routes", a->s);
    }
  }
  return 0;
}

static int alias_list(struct pctx *c, json_t *v, enum side side, const char *sidename, struct alias **out,
                      size_t *n)
{
  *out = NULL;
  *n = 0;
  if (!v || json_is_null(v))
    return 0;
  if (!json_is_array(v))
    return perr(c, "must be a list of strings");
  size_t sz = json_array_size(v);
  *out = tc_xcalloc(sz ? sz : 1, sizeof(struct alias));
  for (size_t i = 0; i < sz; i++) {
    json_t *e = json_array_get(v, i);
    push_idx(c, (int)i);
    if (!json_is_string(e)) {
      int rc = perr(c, "must be a string");
      pop(c);
      return rc;
    }
    char *s = trim_dup(json_string_value(e));
    char why[300];
    int rc = pol_parse_alias_text(s, &(*out)[*n], why, sizeof(why));
    free(s);
    if (rc) {
      (*n)++;
      rc = perr(c, "%s", why);
      pop(c);
      return rc;
    }
    (*n)++;
    rc = check_alias(c, &(*out)[*n - 1], side, sidename);
    pop(c);
    if (rc)
      return rc;
  }
  return 0;
}

/* ---- ports ------------------------------------------------------------------- */
static int parse_port_num(const char *s, size_t n, uint16_t *out)
{
  if (n == 0 || n > 5)
    return -1;
  unsigned v = 0;
  for (size_t i = 0; i < n; i++) {
    if (!isdigit((unsigned char)s[i]))
      return -1;
    v = v * 10 + (unsigned)(s[i] - '0');
  }
  if (v > 65535)
    return -1;
  *out = (uint16_t)v;
  return 0;
}

/* "*", "22", "80,443", "1000-2000". Returns 0 or writes why. */
static int parse_ports(const char *s, struct port_range **out, size_t *n, char *why, size_t whysz)
{
  *out = NULL;
  *n = 0;
  if (!strcmp(s, "*")) {
    *out = tc_xmalloc(sizeof(**out));
    (*out)[0] = (struct port_range){0, 65535};
    *n = 1;
    return 0;
  }
  size_t cnt = 1;
  for (const char *p = s; *p; p++)
    cnt += *p == ',';
  *out = tc_xcalloc(cnt, sizeof(**out));
  const char *p = s;
  for (;;) {
    const char *e = strchr(p, ',');
    size_t l = e ? (size_t)(e - p) : strlen(p);
    const char *dash = memchr(p, '-', l);
    struct port_range r;
    if (dash) {
      if (parse_port_num(p, (size_t)(dash - p), &r.first)) {
        snprintf(why, whysz, "port range \"%.*s\": invalid first integer", (int)l, p);
        goto bad;
      }
      if (parse_port_num(dash + 1, l - (size_t)(dash - p) - 1, &r.last)) {
        snprintf(why, whysz, "port range \"%.*s\": invalid last integer", (int)l, p);
        goto bad;
      }
    } else {
      if (parse_port_num(p, l, &r.first)) {
        snprintf(why, whysz, "port range \"%.*s\": invalid first integer", (int)l, p);
        goto bad;
      }
      r.last = r.first;
    }
    if (r.first == 0) {
      snprintf(why, whysz, "port range \"%.*s\": first port must be >0, or use '*' for wildcard", (int)l, p);
      goto bad;
    }
    if (r.last < r.first) {
      snprintf(why, whysz, "port range \"%.*s\": last port must be >= first port", (int)l, p);
      goto bad;
    }
    (*out)[(*n)++] = r;
    if (!e)
      break;
    p = e + 1;
  }
  return 0;
bad:
  free(*out);
  *out = NULL;
  *n = 0;
  return -1;
}

int pol_parse_ports_text(const char *s, struct port_range **out, size_t *n, char *why, size_t whysz)
{
  return parse_ports(s, out, n, why, whysz);
}

/* Splits "alias:ports" at the last colon, IPv6-aware. */
static int split_hostport(const char *s, char **alias, char **ports)
{
  const char *colon = strrchr(s, ':');
  if (!colon)
    return -1;
  size_t al = (size_t)(colon - s);
  /* "[v6addr]:ports" */
  if (al >= 2 && s[0] == '[' && s[al - 1] == ']')
    *alias = tc_xstrndup(s + 1, al - 2);
  else
    *alias = tc_xstrndup(s, al);
  *ports = tc_xstrdup(colon + 1);
  return 0;
}

/* ---- sections ------------------------------------------------------------------ */
static int parse_groups(struct pctx *c, json_t *v)
{
  struct tc_policy *p = c->pol;
  if (expect_type(c, v, JSON_OBJECT, "an object"))
    return TC_EINVAL;
  p->groups = tc_xcalloc(json_object_size(v) + 1, sizeof(*p->groups));
  const char *k;
  json_t *m;
  json_object_foreach(v, k, m) {
    if (ignorable_key(k))
      continue;
    push_key(c, k);
    if (!tc_str_has_prefix(k, "group:") || !k[6]) {
      int rc = perr(c, "group names must start with \"group:\"");
      pop(c);
      return rc;
    }
    struct name_list *g = &p->groups[p->ngroups++];
    g->name = tc_xstrdup(k);
    if (str_list(c, m, &g->items, &g->n, false)) {
      pop(c);
      return TC_EINVAL;
    }
    for (size_t i = 0; i < g->n; i++) {
      push_idx(c, (int)i);
      const char *u = g->items[i];
      int rc = 0;
      if (tc_str_has_prefix(u, "group:"))
        rc = perr(c, "\"%s\": group members cannot be recursive", u);
      else if (tc_str_has_prefix(u, "tag:") || tc_str_has_prefix(u, "autogroup:"))
        rc = perr(c, "\"%s\": groups can only contain users", u);
      else if (!strchr(u, '@'))
        rc = perr(c, "\"%s\": group members must be users (name@ or an email)", u);
      pop(c);
      if (rc) {
        pop(c);
        return rc;
      }
    }
    pop(c);
  }
  return 0;
}

static int parse_hosts(struct pctx *c, json_t *v)
{
  struct tc_policy *p = c->pol;
  if (expect_type(c, v, JSON_OBJECT, "an object"))
    return TC_EINVAL;
  p->hosts = tc_xcalloc(json_object_size(v) + 1, sizeof(*p->hosts));
  const char *k;
  json_t *m;
  json_object_foreach(v, k, m) {
    if (ignorable_key(k))
      continue;
    push_key(c, k);
    struct alias a;
    char why[300];
    int rc = 0;
    if (pol_parse_alias_text(k, &a, why, sizeof(why)) || a.kind != AL_HOST)
      rc = perr(c, "host name \"%s\" is not valid (no '@', ':' or '/'; not an address)", k);
    alias_free(&a);
    if (!rc && !json_is_string(m))
      rc = perr(c, "must be an IP address or CIDR string");
    if (!rc) {
      p->hosts[p->nhosts].name = tc_xstrdup(k);
      if (pol_ip_parse_prefix(json_string_value(m), &p->hosts[p->nhosts].pfx, NULL))
        rc = perr(c, "\"%s\": invalid IP address or CIDR", json_string_value(m));
      p->nhosts++;
    }
    pop(c);
    if (rc)
      return rc;
  }
  return 0;
}

static int parse_tag_owners(struct pctx *c, json_t *v)
{
  struct tc_policy *p = c->pol;
  if (expect_type(c, v, JSON_OBJECT, "an object"))
    return TC_EINVAL;
  p->tag_owners = tc_xcalloc(json_object_size(v) + 1, sizeof(*p->tag_owners));
  const char *k;
  json_t *m;
  /* Names first: tags may own tags defined later in the object. */
  json_object_foreach(v, k, m) {
    if (ignorable_key(k))
      continue;
    push_key(c, k);
    int rc = 0;
    if (!tc_str_has_prefix(k, "tag:"))
      rc = perr(c, "tag names must start with \"tag:\"");
    else if (!isalpha((unsigned char)k[4]))
      rc = perr(c, "tag names must start with a letter, after 'tag:'");
    else
      rc = tag_syntax(c, k);
    if (!rc) {
      struct name_list *t = &p->tag_owners[p->ntag_owners++];
      t->name = tc_xstrdup(k);
      rc = str_list(c, m, &t->items, &t->n, true);
    }
    pop(c);
    if (rc)
      return rc;
  }
  for (size_t i = 0; i < p->ntag_owners; i++) {
    struct name_list *t = &p->tag_owners[i];
    push_key(c, t->name);
    for (size_t j = 0; j < t->n; j++) {
      push_idx(c, (int)j);
      const char *o = t->items[j];
      int rc = 0;
      if (tc_str_has_prefix(o, "tag:")) {
        if (!find_list(p->tag_owners, p->ntag_owners, o))
          rc = perr(c, "tag not found: \"%s\"", o);
      } else if (tc_str_has_prefix(o, "group:")) {
        if (!find_list(p->groups, p->ngroups, o))
          rc = perr(c, "group not found: \"%s\"", o);
      } else if (!strcmp(o, "autogroup:admin") || !strcmp(o, "autogroup:member")) {
        /* accepted: role-based owners */
      } else if (!strchr(o, '@')) {
        rc = perr(c, "\"%s\": tag owners must be users, groups or tags", o);
      }
      pop(c);
      if (rc) {
        pop(c);
        return rc;
      }
    }
    pop(c);
  }
  return 0;
}

static int check_dst_prefix_all(struct pctx *c, const struct alias *a)
{
  if (a->kind == AL_PREFIX && pol_ip_range_is_exit(a->pfx))
    return perr(c, "dst \"%s\": to allow all IP addresses, use \"*\" or \"autogroup:internet\"", a->s);
  return 0;
}

static int parse_acls(struct pctx *c, json_t *v)
{
  struct tc_policy *p = c->pol;
  if (expect_type(c, v, JSON_ARRAY, "a list"))
    return TC_EINVAL;
  size_t n = json_array_size(v);
  size_t idx;
  json_t *r;
  json_array_foreach(v, idx, r) {
    push_idx(c, (int)idx);
    if (!json_is_object(r)) {
      int rc = perr(c, "must be an object");
      pop(c);
      return rc;
    }
    const char *k;
    json_t *m;
    json_object_foreach(r, k, m) {
      if (ignorable_key(k) || !strcmp(k, "action") || !strcmp(k, "src") || !strcmp(k, "dst") ||
          !strcmp(k, "proto"))
        continue;
      push_key(c, k);
      int rc = !strcmp(k, "srcPosture") ? perr(c, "device posture is not supported")
                                        : perr(c, "unknown field \"%s\"", k);
      pop(c);
      pop(c);
      return rc;
    }
    json_t *act = json_object_get(r, "action");
    push_key(c, "action");
    if (!act || !json_is_string(act) || strcmp(json_string_value(act), "accept")) {
      int rc = act && json_is_string(act) ? perr(c, "action=\"%s\" is not supported (only \"accept\")",
                                                 json_string_value(act))
                                          : perr(c, "action must be \"accept\"");
      pop(c);
      pop(c);
      return rc;
    }
    pop(c);
    int proto = -1;
    json_t *pr = json_object_get(r, "proto");
    if (pr) {
      push_key(c, "proto");
      int rc = 0;
      if (!json_is_string(pr))
        rc = perr(c, "must be a string");
      else if ((proto = pol_proto_parse(json_string_value(pr))) == -2)
        rc = perr(c, "proto name \"%s\" not known; use protocol number 0-255 or protocol name (icmp, tcp, "
                     "udp, etc.)", json_string_value(pr));
      pop(c);
      if (rc) {
        pop(c);
        return rc;
      }
    }
    struct grant g = {0};
    push_key(c, "src");
    int rc = alias_list(c, json_object_get(r, "src"), SIDE_SRC, "src", &g.src, &g.nsrc);
    pop(c);
    json_t *dv = json_object_get(r, "dst");
    push_key(c, "dst");
    if (!rc && (!dv || !json_is_array(dv)))
      rc = perr(c, "must be a list of \"host:ports\" strings");
    size_t nd = rc ? 0 : json_array_size(dv);
    struct dst_port *dp = tc_xcalloc(nd + 1, sizeof(*dp));
    size_t ndp = 0;
    for (size_t i = 0; !rc && i < nd; i++) {
      json_t *e = json_array_get(dv, i);
      push_idx(c, (int)i);
      if (!json_is_string(e)) {
        rc = perr(c, "must be a string");
      } else {
        char *s = trim_dup(json_string_value(e)), *al = NULL, *ports = NULL;
        char why[300];
        if (split_hostport(s, &al, &ports)) {
          rc = perr(c, "dst=\"%s\": missing port (want host:ports)", s);
        } else if (parse_ports(ports, &dp[ndp].ports, &dp[ndp].nports, why, sizeof(why))) {
          rc = perr(c, "dst=\"%s\": %s", s, why);
        } else if (pol_parse_alias_text(al, &dp[ndp].a, why, sizeof(why))) {
          ndp++;
          rc = perr(c, "dst=\"%s\": %s", s, why);
        } else {
          ndp++;
          char side[300];
          snprintf(side, sizeof(side), "dst=\"%s\": ", s);
          if (dp[ndp - 1].a.kind == AL_TAG && !find_list(p->tag_owners, p->ntag_owners, dp[ndp - 1].a.s))
            rc = perr(c, "dst=\"%s\": tag not found: \"%s\"", s, dp[ndp - 1].a.s);
          else
            rc = check_alias(c, &dp[ndp - 1].a, SIDE_DST, "dst");
          if (!rc && !proto_allows_ports(proto) &&
              !(dp[ndp - 1].nports == 1 && dp[ndp - 1].ports[0].first == 0 && dp[ndp - 1].ports[0].last == 65535))
            rc = perr(c, "dst=\"%s\": protocol %s does not support specific ports", s, json_string_value(pr));
        }
        free(s);
        free(al);
        free(ports);
      }
      pop(c);
    }
    pop(c);
    /* autogroup:self destinations need identity sources. */
    bool has_self = false;
    for (size_t i = 0; i < ndp; i++)
      has_self |= dp[i].a.kind == AL_AUTOGROUP && dp[i].a.ag == AG_SELF;
    for (size_t i = 0; !rc && has_self && i < g.nsrc; i++) {
      const struct alias *a = &g.src[i];
      if (!(a->kind == AL_USER || a->kind == AL_GROUP || a->kind == AL_WILDCARD ||
            (a->kind == AL_AUTOGROUP && a->ag == AG_MEMBER)))
        rc = perr(c, "autogroup:self can only be used with users, groups, or supported autogroups");
    }
    if (rc) {
      for (size_t i = 0; i < g.nsrc; i++)
        alias_free(&g.src[i]);
      free(g.src);
      for (size_t i = 0; i < ndp; i++) {
        alias_free(&dp[i].a);
        free(dp[i].ports);
      }
      free(dp);
      pop(c);
      return rc;
    }
    /* One grant per destination (keeps ports per destination); self last. */
    for (int pass = 0; pass < 2; pass++) {
      for (size_t i = 0; i < ndp; i++) {
        bool self = dp[i].a.kind == AL_AUTOGROUP && dp[i].a.ag == AG_SELF;
        if ((pass == 0) == self)
          continue;
        p->grants = tc_xrealloc(p->grants, (p->ngrants + 1) * sizeof(*p->grants));
        struct grant *ng = &p->grants[p->ngrants++];
        memset(ng, 0, sizeof(*ng));
        ng->nsrc = g.nsrc;
        ng->src = tc_xcalloc(g.nsrc + 1, sizeof(struct alias));
        for (size_t j = 0; j < g.nsrc; j++) {
          ng->src[j] = g.src[j];
          ng->src[j].s = tc_xstrdup(g.src[j].s);
        }
        ng->ndst = 1;
        ng->dst = tc_xmalloc(sizeof(struct alias));
        ng->dst[0] = dp[i].a;
        ng->dst[0].s = tc_xstrdup(dp[i].a.s);
        ng->nip = 1;
        ng->ip = tc_xmalloc(sizeof(struct proto_ports));
        ng->ip[0].proto = proto;
        ng->ip[0].nports = dp[i].nports;
        ng->ip[0].ports = tc_xmalloc(dp[i].nports * sizeof(struct port_range));
        memcpy(ng->ip[0].ports, dp[i].ports, dp[i].nports * sizeof(struct port_range));
      }
    }
    for (size_t i = 0; i < g.nsrc; i++)
      alias_free(&g.src[i]);
    free(g.src);
    for (size_t i = 0; i < ndp; i++) {
      alias_free(&dp[i].a);
      free(dp[i].ports);
    }
    free(dp);
    pop(c);
  }
  (void)n;
  return 0;
}

static int parse_ip_list(struct pctx *c, json_t *v, struct grant *g)
{
  if (!v || json_is_null(v))
    return 0;
  if (!json_is_array(v))
    return perr(c, "must be a list of \"proto:ports\" strings");
  size_t n = json_array_size(v);
  g->ip = tc_xcalloc(n + 1, sizeof(*g->ip));
  for (size_t i = 0; i < n; i++) {
    json_t *e = json_array_get(v, i);
    push_idx(c, (int)i);
    int rc = 0;
    char why[300];
    if (!json_is_string(e)) {
      rc = perr(c, "must be a string");
    } else {
      const char *s = json_string_value(e);
      struct proto_ports *pp = &g->ip[g->nip];
      pp->proto = -1;
      const char *colon = strchr(s, ':');
      if (!strcmp(s, "*")) {
        parse_ports("*", &pp->ports, &pp->nports, why, sizeof(why));
      } else if (!colon) {
        if (parse_ports(s, &pp->ports, &pp->nports, why, sizeof(why)))
          rc = perr(c, "%s", why);
      } else {
        if (strchr(colon + 1, ':')) {
          rc = perr(c, "\"%s\": expected only one colon in Internet protocol and port type", s);
        } else {
          char *pn = tc_xstrndup(s, (size_t)(colon - s));
          pp->proto = pol_proto_parse(pn);
          if (pp->proto == -2 || !*pn)
            rc = perr(c, "proto name \"%s\" not known; use protocol number 0-255 or protocol name (icmp, tcp, "
                         "udp, etc.)", pn);
          else if (parse_ports(colon + 1, &pp->ports, &pp->nports, why, sizeof(why)))
            rc = perr(c, "%s", why);
          else if (!proto_allows_ports(pp->proto) &&
                   !(pp->nports == 1 && pp->ports[0].first == 0 && pp->ports[0].last == 65535))
            rc = perr(c, "protocol %s does not support specific ports", pn);
          free(pn);
        }
      }
      if (!rc)
        g->nip++;
      else {
        free(pp->ports);
        pp->ports = NULL;
      }
    }
    pop(c);
    if (rc)
      return rc;
  }
  return 0;
}

static int check_cap_name(struct pctx *c, const char *name)
{
  if (strstr(name, "://") || !strchr(name, '/'))
    return perr(c, "capability name must have the form {domain}/{path}");
  if (tc_str_has_prefix(name, "tailscale.com/")) {
    static const char *allowed[] = {"tailscale.com/cap/drive", "tailscale.com/cap/relay",
                                    "tailscale.com/cap/webui", "tailscale.com/cap/kubernetes",
                                    "tailscale.com/cap/tsidp", "tailscale.com/cap/secrets"};
    for (size_t i = 0; i < TC_ARRAY_LEN(allowed); i++)
      if (!strcmp(name, allowed[i]))
        return 0;
    return perr(c, "capability name must not be in the tailscale.com domain");
  }
  return 0;
}

static int parse_grants(struct pctx *c, json_t *v)
{
  struct tc_policy *p = c->pol;
  if (expect_type(c, v, JSON_ARRAY, "a list"))
    return TC_EINVAL;
  size_t idx;
  json_t *r;
  json_array_foreach(v, idx, r) {
    push_idx(c, (int)idx);
    int rc = 0;
    if (!json_is_object(r)) {
      rc = perr(c, "must be an object");
      pop(c);
      return rc;
    }
    const char *k;
    json_t *m;
    json_object_foreach(r, k, m) {
      if (ignorable_key(k) || !strcmp(k, "src") || !strcmp(k, "dst") || !strcmp(k, "ip") ||
          !strcmp(k, "app") || !strcmp(k, "via"))
        continue;
      push_key(c, k);
      rc = !strcmp(k, "srcPosture") ? perr(c, "device posture is not supported")
                                    : perr(c, "unknown field \"%s\"", k);
      pop(c);
      pop(c);
      return rc;
    }
    p->grants = tc_xrealloc(p->grants, (p->ngrants + 1) * sizeof(*p->grants));
    struct grant *g = &p->grants[p->ngrants++];
    memset(g, 0, sizeof(*g));
    push_key(c, "src");
    rc = alias_list(c, json_object_get(r, "src"), SIDE_SRC, "src", &g->src, &g->nsrc);
    pop(c);
    if (!rc) {
      push_key(c, "dst");
      rc = alias_list(c, json_object_get(r, "dst"), SIDE_DST, "dst", &g->dst, &g->ndst);
      for (size_t i = 0; !rc && i < g->ndst; i++) {
        push_idx(c, (int)i);
        rc = check_dst_prefix_all(c, &g->dst[i]);
        pop(c);
      }
      pop(c);
    }
    if (!rc) {
      push_key(c, "ip");
      rc = parse_ip_list(c, json_object_get(r, "ip"), g);
      pop(c);
    }
    json_t *app = json_object_get(r, "app");
    if (!rc && app && !json_is_null(app)) {
      push_key(c, "app");
      if (!json_is_object(app)) {
        rc = perr(c, "must be an object of capability name to list of values");
      } else {
        const char *cn;
        json_t *cv;
        json_object_foreach(app, cn, cv) {
          push_key(c, cn);
          rc = check_cap_name(c, cn);
          if (!rc && !json_is_array(cv) && !json_is_null(cv))
            rc = perr(c, "capability values must be a list of objects");
          pop(c);
          if (rc)
            break;
        }
        if (!rc && json_object_size(app))
          g->app = json_incref(app);
      }
      pop(c);
    }
    json_t *via = json_object_get(r, "via");
    if (!rc && via) {
      push_key(c, "via");
      rc = str_list(c, via, &g->via, &g->nvia, true);
      for (size_t i = 0; !rc && i < g->nvia; i++) {
        push_idx(c, (int)i);
        if (!tc_str_has_prefix(g->via[i], "tag:"))
          rc = perr(c, "via can only be a tag");
        else if (!find_list(p->tag_owners, p->ntag_owners, g->via[i]))
          rc = perr(c, "tag \"%s\" not found", g->via[i]);
        pop(c);
      }
      pop(c);
    }
    if (!rc && g->nip == 0 && !g->app)
      rc = perr(c, "ip and app can not both be empty");
    bool has_self = false, has_internet = false;
    for (size_t i = 0; i < g->ndst; i++) {
      has_self |= g->dst[i].kind == AL_AUTOGROUP && g->dst[i].ag == AG_SELF;
      has_internet |= g->dst[i].kind == AL_AUTOGROUP && g->dst[i].ag == AG_INTERNET;
    }
    if (!rc && has_internet && g->app)
      rc = perr(c, "cannot use app grants with autogroup:internet");
    for (size_t i = 0; !rc && has_self && i < g->nsrc; i++) {
      const struct alias *a = &g->src[i];
      if (!(a->kind == AL_USER || a->kind == AL_GROUP || (a->kind == AL_AUTOGROUP && a->ag == AG_MEMBER)))
        rc = perr(c, "autogroup:self can only be used with users, groups, or supported autogroups");
    }
    pop(c);
    if (rc)
      return rc;
  }
  return 0;
}

static bool valid_ssh_user(const char *u)
{
  if (!*u || !strcmp(u, "*"))
    return false;
  for (const char *p = u; *p; p++)
    if (isspace((unsigned char)*p))
      return false;
  return true;
}

static int parse_ssh(struct pctx *c, json_t *v)
{
  struct tc_policy *p = c->pol;
  if (expect_type(c, v, JSON_ARRAY, "a list"))
    return TC_EINVAL;
  p->has_ssh = true;
  p->ssh = tc_xcalloc(json_array_size(v) + 1, sizeof(*p->ssh));
  size_t idx;
  json_t *r;
  json_array_foreach(v, idx, r) {
    push_idx(c, (int)idx);
    int rc = 0;
    if (!json_is_object(r)) {
      rc = perr(c, "must be an object");
      pop(c);
      return rc;
    }
    const char *k;
    json_t *m;
    json_object_foreach(r, k, m) {
      if (ignorable_key(k) || !strcmp(k, "action") || !strcmp(k, "src") || !strcmp(k, "dst") ||
          !strcmp(k, "users") || !strcmp(k, "checkPeriod") || !strcmp(k, "acceptEnv"))
        continue;
      push_key(c, k);
      rc = perr(c, "unknown field \"%s\"", k);
      pop(c);
      pop(c);
      return rc;
    }
    struct ssh_rule *s = &p->ssh[p->nssh++];
    s->check_period_ms = -1;
    json_t *act = json_object_get(r, "action");
    push_key(c, "action");
    char *an = act && json_is_string(act) ? trim_dup(json_string_value(act)) : NULL;
    if (!an || !*an)
      rc = perr(c, "action must be specified");
    else if (!strcmp(an, "check"))
      s->check = true;
    else if (strcmp(an, "accept"))
      rc = perr(c, "\"%s\" is not a valid action", json_string_value(act));
    free(an);
    pop(c);
    if (!rc) {
      push_key(c, "src");
      rc = alias_list(c, json_object_get(r, "src"), SIDE_SSH_SRC, "src", &s->src, &s->nsrc);
      pop(c);
    }
    if (!rc) {
      push_key(c, "dst");
      rc = alias_list(c, json_object_get(r, "dst"), SIDE_SSH_DST, "dst", &s->dst, &s->ndst);
      pop(c);
    }
    if (!rc) {
      push_key(c, "users");
      json_t *u = json_object_get(r, "users");
      if (!u || json_is_null(u) || (json_is_array(u) && json_array_size(u) == 0))
        rc = perr(c, "users must be specified");
      else
        rc = str_list(c, u, &s->users, &s->nusers, false);
      for (size_t i = 0; !rc && i < s->nusers; i++) {
        push_idx(c, (int)i);
        const char *un = s->users[i];
        /* Only localpart:*@<domain> maps users by email; other spellings are
         * plain login names, as the coordination service treats them. */
        if (tc_str_has_prefix(un, "localpart:*@") && un[12] && strchr(un + 12, '*')) {
          rc = perr(c, "%s is not associated with this Tailnet and cannot be used in user:*@<domain> expressions",
                    un + 12);
        } else if (!valid_ssh_user(un)) {
          rc = perr(c, "user \"%s\" is not valid", un);
        }
        pop(c);
      }
      pop(c);
    }
    json_t *ae = json_object_get(r, "acceptEnv");
    if (!rc && ae && !json_is_null(ae)) {
      push_key(c, "acceptEnv");
      if (!json_is_array(ae))
        rc = perr(c, "must be a list of strings");
      for (size_t i = 0; !rc && i < json_array_size(ae); i++) {
        json_t *e = json_array_get(ae, i);
        push_idx(c, (int)i);
        if (!json_is_string(e) || !*json_string_value(e))
          rc = perr(c, "acceptEnv values cannot be empty");
        pop(c);
      }
      if (!rc)
        s->accept_env = json_incref(ae);
      pop(c);
    }
    json_t *cp = json_object_get(r, "checkPeriod");
    if (!rc && cp && !json_is_null(cp)) {
      push_key(c, "checkPeriod");
      int64_t ms = 0;
      char tb[64];
      if (!json_is_string(cp))
        rc = perr(c, "must be a duration string");
      else if (!strcmp(json_string_value(cp), "always"))
        s->check_period_ms = 0;
      else if (tc_duration_parse(json_string_value(cp), &ms))
        rc = perr(c, "time: invalid duration \"%s\"", json_string_value(cp));
      else if (ms == 0)
        s->check_period_ms = 0; /* zero: check every time, like "always" */
      else if (ms < 0)
        rc = perr(c, "checkPeriod %s must be a positive duration",
                  ms < 0 ? (tc_duration_format(-ms, tb + 8), tb[7] = '-', tb + 7) : "0s");
      else if (ms > 168LL * 3600 * 1000)
        rc = perr(c, "checkPeriod %s is above the max (168h)", tc_duration_format(ms, tb));
      else if (!s->check)
        rc = perr(c, "checkPeriod is only valid with action \"check\"");
      else
        s->check_period_ms = ms;
      pop(c);
    }
    /* Who may reach whom over SSH: tags cannot reach user-owned devices. */
    bool src_tagged = false, src_group = false;
    int nusers_src = 0;
    const char *one_user = NULL;
    for (size_t i = 0; i < s->nsrc; i++) {
      const struct alias *a = &s->src[i];
      if (a->kind == AL_TAG || (a->kind == AL_AUTOGROUP && a->ag == AG_TAGGED))
        src_tagged = true;
      else if (a->kind == AL_GROUP || (a->kind == AL_AUTOGROUP && a->ag == AG_MEMBER))
        src_group = true;
      else if (a->kind == AL_USER) {
        if (!one_user || strcmp(one_user, a->s))
          nusers_src++;
        one_user = a->s;
      }
    }
    for (size_t i = 0; !rc && i < s->ndst; i++) {
      const struct alias *a = &s->dst[i];
      push_key(c, "dst");
      push_idx(c, (int)i);
      if (a->kind == AL_USER) {
        if (src_tagged)
          rc = perr(c, "tags in SSH source cannot access user-owned devices (%s)", a->s);
        else if (src_group || nusers_src != 1 || strcmp(one_user, a->s))
          rc = perr(c, "user destination requires source to contain only that same user \"%s\"; use "
                       "autogroup:self instead for same-user SSH access", a->s);
      } else if (a->kind == AL_AUTOGROUP && a->ag == AG_SELF && src_tagged) {
        rc = perr(c, "autogroup:self destination requires source to contain only users or groups, not tags or "
                     "autogroup:tagged");
      } else if (a->kind == AL_AUTOGROUP && a->ag == AG_MEMBER && src_tagged) {
        rc = perr(c, "tags in SSH source cannot access autogroup:member (user-owned devices)");
      }
      pop(c);
      pop(c);
    }
    pop(c);
    if (rc)
      return rc;
  }
  return 0;
}

static int parse_node_attrs(struct pctx *c, json_t *v)
{
  struct tc_policy *p = c->pol;
  if (expect_type(c, v, JSON_ARRAY, "a list"))
    return TC_EINVAL;
  p->nattrs = tc_xcalloc(json_array_size(v) + 1, sizeof(*p->nattrs));
  size_t idx;
  json_t *r;
  json_array_foreach(v, idx, r) {
    push_idx(c, (int)idx);
    int rc = 0;
    if (!json_is_object(r)) {
      rc = perr(c, "must be an object");
      pop(c);
      return rc;
    }
    const char *k;
    json_t *m;
    json_object_foreach(r, k, m) {
      if (ignorable_key(k) || !strcmp(k, "target") || !strcmp(k, "attr") || !strcmp(k, "ipPool"))
        continue;
      push_key(c, k);
      rc = !strcmp(k, "app") ? perr(c, "nodeAttrs \"app\" (app connectors) is not supported")
                             : perr(c, "unknown field \"%s\"", k);
      pop(c);
      pop(c);
      return rc;
    }
    struct node_attr *na = &p->nattrs[p->nnattrs++];
    push_key(c, "target");
    rc = alias_list(c, json_object_get(r, "target"), SIDE_ATTR, "target", &na->target, &na->ntarget);
    pop(c);
    if (!rc) {
      push_key(c, "attr");
      rc = str_list(c, json_object_get(r, "attr"), &na->attrs, &na->nattrs, true);
      pop(c);
    }
    json_t *pool = json_object_get(r, "ipPool");
    if (!rc && pool && !json_is_null(pool)) {
      push_key(c, "ipPool");
      char **pv = NULL;
      size_t pn = 0;
      rc = str_list(c, pool, &pv, &pn, true);
      struct ip_range cgnat, r1, r2;
      pol_ip_parse_prefix("100.64.0.0/10", &cgnat, NULL);
      pol_ip_parse_prefix("100.100.100.0/24", &r1, NULL);
      pol_ip_parse_prefix("100.115.92.0/23", &r2, NULL);
      for (size_t i = 0; !rc && i < pn; i++) {
        struct ip_range pr;
        push_idx(c, (int)i);
        if (pol_ip_parse_prefix(pv[i], &pr, NULL))
          rc = perr(c, "\"%s\": invalid prefix", pv[i]);
        else if (pr.v6 || pr.lo < cgnat.lo || pr.hi > cgnat.hi)
          rc = perr(c, "IPPool(%s): network must be within 100.64.0.0/10", pv[i]);
        else if (pol_ip_range_overlaps(pr, r1) || pol_ip_range_overlaps(pr, r2))
          rc = perr(c, "IPPool(%s): network within reserved range", pv[i]);
        pop(c);
      }
      free_strv(pv, pn);
      if (!rc)
        rc = perr(c, "ipPool (per-node address pools) is not supported");
      pop(c);
    }
    pop(c);
    if (rc)
      return rc;
  }
  return 0;
}

static int check_approver(struct pctx *c, const char *a)
{
  const struct tc_policy *p = c->pol;
  if (tc_str_has_prefix(a, "tag:")) {
    if (!find_list(p->tag_owners, p->ntag_owners, a))
      return perr(c, "tag not found: \"%s\"", a);
  } else if (tc_str_has_prefix(a, "group:")) {
    if (!find_list(p->groups, p->ngroups, a))
      return perr(c, "group not found: \"%s\"", a);
  } else if (!strchr(a, '@')) {
    return perr(c, "\"%s\": auto approvers must be users, groups or tags", a);
  }
  return 0;
}

static int parse_auto_approvers(struct pctx *c, json_t *v)
{
  struct tc_policy *p = c->pol;
  if (json_is_null(v))
    return 0;
  if (expect_type(c, v, JSON_OBJECT, "an object"))
    return TC_EINVAL;
  const char *k;
  json_t *m;
  json_object_foreach(v, k, m) {
    if (ignorable_key(k))
      continue;
    push_key(c, k);
    int rc = 0;
    if (!strcmp(k, "routes")) {
      if (!json_is_object(m) && !json_is_null(m)) {
        rc = perr(c, "must be an object of route to approvers");
      } else if (json_is_object(m)) {
        p->routes = tc_xcalloc(json_object_size(m) + 1, sizeof(*p->routes));
        const char *rk;
        json_t *rv;
        json_object_foreach(m, rk, rv) {
          push_key(c, rk);
          struct auto_route *ar = &p->routes[p->nroutes];
          if (pol_ip_parse_prefix(rk, &ar->pfx, NULL)) {
            rc = perr(c, "\"%s\": invalid route prefix", rk);
          } else {
            ar->text = tc_xstrdup(rk);
            p->nroutes++;
            rc = str_list(c, rv, &ar->approvers, &ar->n, true);
            for (size_t i = 0; !rc && i < ar->n; i++) {
              push_idx(c, (int)i);
              rc = check_approver(c, ar->approvers[i]);
              pop(c);
            }
          }
          pop(c);
          if (rc)
            break;
        }
      }
    } else if (!strcmp(k, "exitNode")) {
      rc = str_list(c, m, &p->exit_approvers, &p->nexit, true);
      for (size_t i = 0; !rc && i < p->nexit; i++) {
        push_idx(c, (int)i);
        rc = check_approver(c, p->exit_approvers[i]);
        pop(c);
      }
    } else {
      rc = perr(c, "unknown field \"%s\"", k);
    }
    pop(c);
    if (rc)
      return rc;
  }
  return 0;
}

static int parse_tests(struct pctx *c, json_t *v)
{
  struct tc_policy *p = c->pol;
  if (json_is_null(v))
    return 0;
  if (expect_type(c, v, JSON_ARRAY, "a list"))
    return TC_EINVAL;
  p->tests = tc_xcalloc(json_array_size(v) + 1, sizeof(*p->tests));
  size_t idx;
  json_t *r;
  json_array_foreach(v, idx, r) {
    push_idx(c, (int)idx);
    int rc = 0;
    if (!json_is_object(r))
      rc = perr(c, "must be an object");
    const char *k;
    json_t *m;
    if (!rc) {
      json_object_foreach(r, k, m) {
        if (ignorable_key(k) || !strcmp(k, "src") || !strcmp(k, "proto") || !strcmp(k, "accept") ||
            !strcmp(k, "deny"))
          continue;
        push_key(c, k);
        rc = !strcmp(k, "srcPostureAttrs") ? perr(c, "device posture is not supported")
                                           : perr(c, "unknown field \"%s\"", k);
        pop(c);
        break;
      }
    }
    if (!rc) {
      struct pol_test *t = &p->tests[p->ntests++];
      json_t *s = json_object_get(r, "src");
      push_key(c, "src");
      if (!s || !json_is_string(s))
        rc = perr(c, "must be a string");
      else
        t->src = trim_dup(json_string_value(s));
      pop(c);
      json_t *pr = json_object_get(r, "proto");
      if (!rc && pr) {
        push_key(c, "proto");
        if (!json_is_string(pr))
          rc = perr(c, "must be a string");
        else
          t->proto = tc_xstrdup(json_string_value(pr));
        pop(c);
      }
      if (!rc) {
        push_key(c, "accept");
        rc = str_list(c, json_object_get(r, "accept"), &t->accept, &t->naccept, true);
        pop(c);
      }
      if (!rc) {
        push_key(c, "deny");
        rc = str_list(c, json_object_get(r, "deny"), &t->deny, &t->ndeny, true);
        pop(c);
      }
    }
    pop(c);
    if (rc)
      return rc;
  }
  return 0;
}

static int parse_ssh_tests(struct pctx *c, json_t *v)
{
  struct tc_policy *p = c->pol;
  if (json_is_null(v))
    return 0;
  if (expect_type(c, v, JSON_ARRAY, "a list"))
    return TC_EINVAL;
  p->ssh_tests = tc_xcalloc(json_array_size(v) + 1, sizeof(*p->ssh_tests));
  size_t idx;
  json_t *r;
  json_array_foreach(v, idx, r) {
    push_idx(c, (int)idx);
    int rc = 0;
    if (!json_is_object(r))
      rc = perr(c, "must be an object");
    const char *k;
    json_t *m;
    if (!rc) {
      json_object_foreach(r, k, m) {
        if (ignorable_key(k) || !strcmp(k, "src") || !strcmp(k, "dst") || !strcmp(k, "accept") ||
            !strcmp(k, "check") || !strcmp(k, "deny"))
          continue;
        push_key(c, k);
        rc = !strcmp(k, "srcPostureAttrs") ? perr(c, "device posture is not supported")
                                           : perr(c, "unknown field \"%s\"", k);
        pop(c);
        break;
      }
    }
    if (!rc) {
      struct ssh_test *t = &p->ssh_tests[p->nssh_tests++];
      json_t *s = json_object_get(r, "src");
      push_key(c, "src");
      if (!s || !json_is_string(s) || !*json_string_value(s))
        rc = perr(c, "SSH tests entry must have a non-empty src");
      else
        t->src = trim_dup(json_string_value(s));
      pop(c);
      if (!rc) {
        push_key(c, "dst");
        rc = str_list(c, json_object_get(r, "dst"), &t->dst, &t->ndst, true);
        if (!rc && !t->ndst)
          rc = perr(c, "SSH tests entry must have at least one dst");
        for (size_t i = 0; !rc && i < t->ndst; i++) {
          push_idx(c, (int)i);
          const char *d = t->dst[i];
          struct ip_range v6r;
          if (tc_str_has_prefix(d, "autogroup:") && strcmp(d, "autogroup:member") && strcmp(d, "autogroup:tagged") &&
              strcmp(d, "autogroup:self"))
            rc = perr(c, "SSH tests dst contains disallowed element \"%s\"", d);
          else if (strchr(d, ':') && !pol_ip_parse_prefix(d, &v6r, NULL))
            /* The service refuses bare IPv6 addresses as SSH test destinations. */
            rc = perr(c, "SSH tests dst contains disallowed element \"%s\" (IPv6 address)", d);
          else if (tc_str_has_prefix(d, "tag:") && !find_list(p->tag_owners, p->ntag_owners, d))
            rc = perr(c, "SSH tests dst contains unknown tag \"%s\"", d);
          pop(c);
        }
        pop(c);
      }
      const char *lists[] = {"accept", "check", "deny"};
      char ***outs[] = {&t->accept, &t->check, &t->deny};
      size_t *ns[] = {&t->naccept, &t->ncheck, &t->ndeny};
      for (int i = 0; !rc && i < 3; i++) {
        push_key(c, lists[i]);
        rc = str_list(c, json_object_get(r, lists[i]), outs[i], ns[i], true);
        for (size_t j = 0; !rc && j < *ns[i]; j++) {
          push_idx(c, (int)j);
          const char *u = (*outs[i])[j];
          if (!valid_ssh_user(u))
            rc = perr(c, "user \"%s\" is not valid", u);
          pop(c);
        }
        pop(c);
      }
    }
    pop(c);
    if (rc)
      return rc;
  }
  return 0;
}

/* ---- top level --------------------------------------------------------------- */
void tc_policy_free(struct tc_policy *p)
{
  if (!p)
    return;
  json_decref(p->doc);
  for (size_t i = 0; i < p->ngroups; i++) {
    free(p->groups[i].name);
    free_strv(p->groups[i].items, p->groups[i].n);
  }
  free(p->groups);
  for (size_t i = 0; i < p->ntag_owners; i++) {
    free(p->tag_owners[i].name);
    free_strv(p->tag_owners[i].items, p->tag_owners[i].n);
  }
  free(p->tag_owners);
  for (size_t i = 0; i < p->nhosts; i++)
    free(p->hosts[i].name);
  free(p->hosts);
  for (size_t i = 0; i < p->ngrants; i++) {
    struct grant *g = &p->grants[i];
    for (size_t j = 0; j < g->nsrc; j++)
      alias_free(&g->src[j]);
    free(g->src);
    for (size_t j = 0; j < g->ndst; j++)
      alias_free(&g->dst[j]);
    free(g->dst);
    for (size_t j = 0; j < g->nip; j++)
      free(g->ip[j].ports);
    free(g->ip);
    json_decref(g->app);
    free_strv(g->via, g->nvia);
  }
  free(p->grants);
  for (size_t i = 0; i < p->nssh; i++) {
    struct ssh_rule *s = &p->ssh[i];
    for (size_t j = 0; j < s->nsrc; j++)
      alias_free(&s->src[j]);
    free(s->src);
    for (size_t j = 0; j < s->ndst; j++)
      alias_free(&s->dst[j]);
    free(s->dst);
    free_strv(s->users, s->nusers);
    json_decref(s->accept_env);
  }
  free(p->ssh);
  for (size_t i = 0; i < p->nnattrs; i++) {
    for (size_t j = 0; j < p->nattrs[i].ntarget; j++)
      alias_free(&p->nattrs[i].target[j]);
    free(p->nattrs[i].target);
    free_strv(p->nattrs[i].attrs, p->nattrs[i].nattrs);
  }
  free(p->nattrs);
  for (size_t i = 0; i < p->nroutes; i++) {
    free(p->routes[i].text);
    free_strv(p->routes[i].approvers, p->routes[i].n);
  }
  free(p->routes);
  free_strv(p->exit_approvers, p->nexit);
  for (size_t i = 0; i < p->ntests; i++) {
    free(p->tests[i].src);
    free(p->tests[i].proto);
    free_strv(p->tests[i].accept, p->tests[i].naccept);
    free_strv(p->tests[i].deny, p->tests[i].ndeny);
  }
  free(p->tests);
  for (size_t i = 0; i < p->nssh_tests; i++) {
    struct ssh_test *t = &p->ssh_tests[i];
    free(t->src);
    free_strv(t->dst, t->ndst);
    free_strv(t->accept, t->naccept);
    free_strv(t->check, t->ncheck);
    free_strv(t->deny, t->ndeny);
  }
  free(p->ssh_tests);
  free(p);
}

bool tc_policy_is_allow_all(const struct tc_policy *pol) { return !pol || pol->allow_all; }

static const char *unsupported_sections[] = {"postures", "defaultSrcPosture", "ipsets", "derpMap",
                                             "disableIPv4", "OneCGNATRoute"};

int tc_policy_parse(const char *text, size_t len, struct tc_policy **out, struct tc_policy_err *err)
{
  *out = NULL;
  if (err)
    memset(err, 0, sizeof(*err));
  if (len > (8u << 20))
    return tc_policy_err_at(err, "policy is larger than 8 MiB");
  char *std = tc_hujson_standardize(text, len, err);
  if (!std)
    return TC_EINVAL;
  struct tc_policy *p = tc_xcalloc(1, sizeof(*p));
  static _Atomic uint64_t next_uid = 1;
  p->uid = next_uid++;
  bool blank = true;
  for (size_t i = 0; i < len; i++)
    if (!isspace((unsigned char)std[i])) {
      blank = false;
      break;
    }
  if (blank) {
    free(std);
    p->allow_all = true;
    p->doc = json_object();
    *out = p;
    return 0;
  }
  json_t *doc = tc_hujson_parse(text, len, err);
  if (!doc) {
    free(std);
    free(p);
    return TC_EINVAL;
  }
  p->doc = doc;
  struct pctx c = {.std = std, .len = len, .pol = p, .err = err};
  int rc = 0;
  if (!json_is_object(doc)) {
    rc = perr(&c, "policy must be a JSON object");
    goto done;
  }
  const char *k;
  json_t *v;
  json_object_foreach(doc, k, v) {
    static const char *known[] = {"groups", "hosts", "tagOwners", "acls", "grants", "ssh", "autoApprovers",
                                  "nodeAttrs", "tests", "sshTests", "randomizeClientPort"};
    bool ok = ignorable_key(k);
    for (size_t i = 0; !ok && i < TC_ARRAY_LEN(known); i++)
      ok = !strcmp(k, known[i]);
    if (!ok) {
      push_key(&c, k);
      bool unsup = false;
      for (size_t i = 0; i < TC_ARRAY_LEN(unsupported_sections); i++)
        unsup |= !strcmp(k, unsupported_sections[i]);
      rc = unsup ? perr(&c, "\"%s\" is not supported", k) : perr(&c, "unknown field \"%s\"", k);
      goto done;
    }
  }
  /* Order matters: later sections refer to names defined by earlier ones. */
  static const struct {
    const char *key;
    int (*fn)(struct pctx *, json_t *);
  } sections[] = {
      {"groups", parse_groups},   {"hosts", parse_hosts}, {"tagOwners", parse_tag_owners},
      {"grants", parse_grants},   {"acls", parse_acls},   {"ssh", parse_ssh},
      {"nodeAttrs", parse_node_attrs}, {"autoApprovers", parse_auto_approvers}, {"tests", parse_tests},
      {"sshTests", parse_ssh_tests},
  };
  for (size_t i = 0; i < TC_ARRAY_LEN(sections); i++) {
    json_t *sv = json_object_get(doc, sections[i].key);
    if (!sv)
      continue;
    if (json_is_null(sv) && strcmp(sections[i].key, "ssh"))
      continue;
    if (json_is_null(sv))
      continue;
    push_key(&c, sections[i].key);
    rc = sections[i].fn(&c, sv);
    pop(&c);
    if (rc)
      goto done;
  }
  json_t *rcp = json_object_get(doc, "randomizeClientPort");
  if (rcp) {
    push_key(&c, "randomizeClientPort");
    if (!json_is_boolean(rcp)) {
      rc = perr(&c, "must be true or false");
      goto done;
    }
    pop(&c);
    p->randomize_client_port = json_is_true(rcp);
  }
  p->has_acls_or_grants = json_object_get(doc, "acls") || json_object_get(doc, "grants");
  if (json_object_size(doc) == 0) {
    /* "{}" says nothing, like empty text: Headscale's allow-all. */
    p->allow_all = true;
  } else if (!p->has_acls_or_grants) {
    /* A policy without acls or grants allows everything, as the
     * coordination service's default rule {src:*, dst:*:*} does. */
    p->grants = tc_xcalloc(1, sizeof(*p->grants));
    struct grant *g = &p->grants[p->ngrants++];
    char why[64];
    g->src = tc_xcalloc(1, sizeof(struct alias));
    pol_parse_alias_text("*", &g->src[0], why, sizeof(why));
    g->nsrc = 1;
    g->dst = tc_xcalloc(1, sizeof(struct alias));
    pol_parse_alias_text("*", &g->dst[0], why, sizeof(why));
    g->ndst = 1;
    g->ip = tc_xcalloc(1, sizeof(struct proto_ports));
    g->ip[0].proto = -1;
    parse_ports("*", &g->ip[0].ports, &g->ip[0].nports, why, sizeof(why));
    g->nip = 1;
    p->has_acls_or_grants = true;
  }
done:
  free(std);
  if (rc) {
    tc_policy_free(p);
    return rc;
  }
  *out = p;
  return 0;
}

int tc_policy_print(const struct tc_policy *pol, struct tc_buf *buf)
{
  char *s = json_dumps(pol->doc, JSON_SORT_KEYS | JSON_INDENT(2));
  tc_buf_puts(buf, s ? s : "{}");
  tc_buf_putc(buf, '\n');
  free(s);
  return 0;
}
