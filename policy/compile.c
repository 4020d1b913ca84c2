/* Compile a policy against a topology into what each node receives.
 *
 * Shape of the work (mirrors how Tailscale's coordination service and
 * Headscale's policy v2 derive their output): every grant (ACLs are turned
 * into grants at parse time) is resolved ONCE into global rules — source
 * address strings plus destination port ranges. A node's packet filter is
 * the subset of those rules whose destinations touch the node (its
 * addresses, its approved subnet routes, or the internet when it is an
 * approved exit node), plus per-node rules for autogroup:self and via.
 * Nodes with the same identity (user, tags, routes) get their rule
 * selection computed once and shared; only address text differs.
 * Pure; any thread with its own result. */
#include <limits.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <stdatomic.h>
#include <string.h>

#include "policy/policy_int.h"

/* ---- topology ------------------------------------------------------------- */
static int user_index(const struct tc_policy_topo *t, int64_t id)
{
  for (size_t i = 0; i < t->nusers; i++)
    if (t->users[i].id == id)
      return (int)i;
  return -1;
}

static bool route_auto_approved(const struct tc_policy *pol, const struct ctopo *ct, const struct cnode *n,
                                struct ip_range r);

int pol_ctopo_build(const struct tc_policy *pol, const struct tc_policy_topo *t, struct ctopo *ct,
                struct tc_policy_err *err)
{
  memset(ct, 0, sizeof(*ct));
  ct->t = t;
  ct->nn = t->nnodes;
  ct->n = tc_xcalloc(t->nnodes + 1, sizeof(*ct->n));
  for (size_t i = 0; i < t->nnodes; i++) {
    const struct tc_policy_node *s = &t->nodes[i];
    struct cnode *n = &ct->n[i];
    n->src = s;
    n->id = s->id;
    n->tagged = s->ntags > 0;
    n->user = s->user_id ? user_index(t, s->user_id) : -1;
    pol_ipset_init(&n->ips);
    uint8_t fam;
    if (s->ipv4 && *s->ipv4) {
      if (pol_ip_parse_addr(s->ipv4, &fam, &n->a4) || fam) {
        pol_ctopo_free(ct);
        return tc_policy_err_at(err, "node %lld: bad IPv4 address \"%s\"", (long long)s->id, s->ipv4);
      }
      n->has4 = true;
      pol_ipset_add(&n->ips, (struct ip_range){0, n->a4, n->a4});
    }
    if (s->ipv6 && *s->ipv6) {
      if (pol_ip_parse_addr(s->ipv6, &fam, &n->a6) || !fam) {
        pol_ctopo_free(ct);
        return tc_policy_err_at(err, "node %lld: bad IPv6 address \"%s\"", (long long)s->id, s->ipv6);
      }
      n->has6 = true;
      pol_ipset_add(&n->ips, (struct ip_range){1, n->a6, n->a6});
    }
    n->subnets = tc_xcalloc(s->nannounced + 1, sizeof(struct ip_range));
    for (size_t j = 0; j < s->nannounced; j++) {
      struct ip_range r;
      if (pol_ip_parse_prefix(s->announced[j], &r, NULL))
        continue;
      bool approved = false;
      for (size_t k = 0; k < s->napproved && !approved; k++) {
        struct ip_range a;
        approved = !pol_ip_parse_prefix(s->approved[k], &a, NULL) && a.v6 == r.v6 && a.lo == r.lo && a.hi == r.hi;
      }
      /* Routes autoApprovers approve count as approved. */
      if (!approved && pol)
        approved = route_auto_approved(pol, ct, n, r);
      if (!approved)
        continue;
      if (pol_ip_range_is_exit(r)) {
        if (r.v6)
          n->exit6 = true;
        else
          n->exit4 = true;
      } else {
        n->subnets[n->nsubnets++] = r;
      }
    }
  }
  /* Each user's own (untagged) devices, for autogroup:self. */
  ct->user_nodes = tc_xcalloc(t->nusers + 1, sizeof(size_t *));
  ct->nuser_nodes = tc_xcalloc(t->nusers + 1, sizeof(size_t));
  for (size_t i = 0; i < ct->nn; i++) {
    int u = ct->n[i].user;
    if (ct->n[i].tagged || u < 0)
      continue;
    ct->user_nodes[u] = tc_xrealloc(ct->user_nodes[u], (ct->nuser_nodes[u] + 1) * sizeof(size_t));
    ct->user_nodes[u][ct->nuser_nodes[u]++] = i;
  }
  return 0;
}

void pol_ctopo_free(struct ctopo *ct)
{
  for (size_t u = 0; ct->user_nodes && u < ct->t->nusers; u++)
    free(ct->user_nodes[u]);
  free(ct->user_nodes);
  free(ct->nuser_nodes);
  for (size_t i = 0; i < ct->nn; i++) {
    pol_ipset_free(&ct->n[i].ips);
    free(ct->n[i].subnets);
  }
  free(ct->n);
  memset(ct, 0, sizeof(*ct));
}

bool pol_node_has_tag(const struct cnode *n, const char *tag)
{
  for (size_t i = 0; i < n->src->ntags; i++)
    if (!strcmp(n->src->tags[i], tag))
      return true;
  return false;
}

bool pol_node_in_set(const struct cnode *n, const struct ipset *s)
{
  return (n->has4 && pol_ipset_contains(s, 0, n->a4)) || (n->has6 && pol_ipset_contains(s, 1, n->a6));
}

static bool node_is_exit(const struct cnode *n) { return n->exit4 || n->exit6; }

/* Users match "name@" / "email" / "name"; ambiguous tokens match nobody. */
int pol_find_user(const struct ctopo *ct, const char *token)
{
  size_t n = strlen(token);
  if (n && token[n - 1] == '@')
    n--;
  int found = -1, count = 0;
  for (size_t i = 0; i < ct->t->nusers; i++) {
    const struct tc_policy_user *u = &ct->t->users[i];
    if ((u->email && strlen(u->email) == n && !strncmp(u->email, token, n)) ||
        (u->name && strlen(u->name) == n && !strncmp(u->name, token, n))) {
      found = (int)i;
      count++;
    }
  }
  return count == 1 ? found : -1;
}

void pol_wildcard_set(struct ipset *s)
{
  struct ip_range r;
  pol_ip_parse_prefix("100.64.0.0/10", &r, NULL);
  pol_ipset_add(s, r);
  pol_ip_parse_prefix("fd7a:115c:a1e0::/48", &r, NULL);
  pol_ipset_add(s, r);
  pol_ipset_norm(s);
  pol_ip_parse_prefix("100.115.92.0/23", &r, NULL);
  pol_ipset_remove(s, r);
}

void pol_the_internet(struct ipset *s)
{
  struct ip_range r;
  pol_ip_parse_prefix("0.0.0.0/0", &r, NULL);
  pol_ipset_add(s, r);
  pol_ip_parse_prefix("2000::/3", &r, NULL);
  pol_ipset_add(s, r);
  pol_ipset_norm(s);
  static const char *minus[] = {"fc00::/7", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                "fd7a:115c:a1e0::/48", "100.64.0.0/10", "fe80::/10", "169.254.0.0/16"};
  for (size_t i = 0; i < TC_ARRAY_LEN(minus); i++) {
    pol_ip_parse_prefix(minus[i], &r, NULL);
    pol_ipset_remove(s, r);
  }
}

static void add_user_nodes(const struct ctopo *ct, int user, struct ipset *out)
{
  if (user < 0)
    return;
  for (size_t i = 0; i < ct->nn; i++)
    if (!ct->n[i].tagged && ct->n[i].user == user)
      pol_ipset_add_set(out, &ct->n[i].ips);
}

static const struct name_list *group_of(const struct tc_policy *pol, const char *name)
{
  for (size_t i = 0; i < pol->ngroups; i++)
    if (!strcmp(pol->groups[i].name, name))
      return &pol->groups[i];
  return NULL;
}

void pol_resolve_alias(const struct tc_policy *pol, const struct ctopo *ct, const struct alias *a, struct ipset *out)
{
  switch (a->kind) {
  case AL_WILDCARD:
    pol_wildcard_set(out);
    break;
  case AL_USER:
    if (tc_str_has_prefix(a->s, "user:*@")) {
      /* Every user whose email is in the domain. */
      for (size_t i = 0; i < ct->t->nusers; i++) {
        const char *e = ct->t->users[i].email, *at = e ? strrchr(e, '@') : NULL;
        if (at && tc_strieq(at + 1, a->s + 7))
          add_user_nodes(ct, (int)i, out);
      }
    } else {
      add_user_nodes(ct, pol_find_user(ct, a->s), out);
    }
    break;
  case AL_GROUP: {
    const struct name_list *g = group_of(pol, a->s);
    for (size_t i = 0; g && i < g->n; i++)
      add_user_nodes(ct, pol_find_user(ct, g->items[i]), out);
    break;
  }
  case AL_TAG:
    for (size_t i = 0; i < ct->nn; i++)
      if (pol_node_has_tag(&ct->n[i], a->s))
        pol_ipset_add_set(out, &ct->n[i].ips);
    break;
  case AL_HOST:
    for (size_t i = 0; i < pol->nhosts; i++)
      if (!strcmp(pol->hosts[i].name, a->s))
        pol_ipset_add(out, pol->hosts[i].pfx);
    break;
  case AL_PREFIX:
    pol_ipset_add(out, a->pfx);
    break;
  case AL_AUTOGROUP:
    switch (a->ag) {
    case AG_INTERNET:
      pol_the_internet(out);
      break;
    case AG_MEMBER:
    case AG_TAGGED:
      for (size_t i = 0; i < ct->nn; i++)
        if (ct->n[i].tagged == (a->ag == AG_TAGGED) && (ct->n[i].tagged || ct->n[i].user >= 0))
          pol_ipset_add_set(out, &ct->n[i].ips);
      break;
    case AG_DANGER_ALL: {
      struct ip_range r;
      pol_ip_parse_prefix("0.0.0.0/0", &r, NULL);
      pol_ipset_add(out, r);
      pol_ip_parse_prefix("::/0", &r, NULL);
      pol_ipset_add(out, r);
      break;
    }
    default:
      break;
    }
    break;
  }
  /* Keep adjacent node addresses apart: filters list them one by one. */
  pol_ipset_norm_overlap(out);
}

/* ---- global rules ---------------------------------------------------------------- */
struct dport {
  char *ip;          /* text as emitted */
  struct ipset set;  /* what it covers ("*" = everything) */
  bool star;
  struct port_range pr;
  json_t *js; /* {"IP","Ports"} shared by every node's filter (compile only), or NULL */
};

struct rule {
  json_t *src;        /* SrcIPs array (strings) */
  struct ipset srcset; /* parsed SrcIPs, for reachability and peers */
  bool src_all;       /* "*" */
  int proto;          /* -1: no IPProto */
  struct dport *dp;
  size_t ndp;
  bool addr_dp;       /* some destination came from an address alias (IP, CIDR, host, internet) */
  size_t *single;     /* dports naming one address, sorted by that address */
  size_t nsingle;
  size_t *other;      /* the rest ("*", prefixes, ranges) */
  size_t nother;
  json_t *capgrant;   /* for CapGrant rules: array of {Dsts:[...], CapMap} with dst sets below */
  struct ipset *capdst; /* per capgrant entry */
  size_t ncap;
  bool self;          /* autogroup:self template (per-node) */
};

struct cgrant {
  const struct grant *g;
  struct ipset src;     /* merged sources */
  struct ipset srcset;  /* what SrcIPs covers: sources, plus approved subnet routes next to "*" */
  bool src_all;         /* autogroup:danger-all: SrcIPs "*" */
  struct ipset *srcs;   /* per-source sets, for autogroup:self */
  size_t nsrcs;
  json_t *srcstr;       /* final SrcIPs */
  bool src_shared;      /* srcstr came through the SrcIPs cache (equal ranges: same array) */
  bool any_src;         /* sources resolved to something */
  struct rule *rules;
  size_t nrules;
  bool has_self;
  bool via;
  struct ipset via_dst;  /* via: destination prefixes (unions kept as list below) */
  struct ip_range *via_pfx;
  size_t nvia_pfx;
  bool via_internet;
};

static __thread const struct rule *sort_rule_tl;

static int single_cmp(const void *x, const void *y)
{
  const struct ip_range *a = &sort_rule_tl->dp[*(const size_t *)x].set.r[0];
  const struct ip_range *b = &sort_rule_tl->dp[*(const size_t *)y].set.r[0];
  if (a->v6 != b->v6)
    return a->v6 < b->v6 ? -1 : 1;
  if (a->lo != b->lo)
    return a->lo < b->lo ? -1 : 1;
  return *(const size_t *)x < *(const size_t *)y ? -1 : 1;
}

/* Indexes the destination entries so a node finds its own in log time. */
static void rule_index(struct rule *r)
{
  r->single = tc_xcalloc(r->ndp + 1, sizeof(size_t));
  r->other = tc_xcalloc(r->ndp + 1, sizeof(size_t));
  for (size_t i = 0; i < r->ndp; i++) {
    const struct dport *d = &r->dp[i];
    if (!d->star && d->set.n == 1 && d->set.r[0].lo == d->set.r[0].hi)
      r->single[r->nsingle++] = i;
    else
      r->other[r->nother++] = i;
  }
  sort_rule_tl = r;
  qsort(r->single, r->nsingle, sizeof(size_t), single_cmp);
  sort_rule_tl = NULL;
}

static void rule_free(struct rule *r)
{
  free(r->single);
  free(r->other);
  json_decref(r->src);
  pol_ipset_free(&r->srcset);
  for (size_t i = 0; i < r->ndp; i++) {
    free(r->dp[i].ip);
    pol_ipset_free(&r->dp[i].set);
    json_decref(r->dp[i].js);
  }
  free(r->dp);
  json_decref(r->capgrant);
  for (size_t i = 0; i < r->ncap; i++)
    pol_ipset_free(&r->capdst[i]);
  free(r->capdst);
}

/* Parses a SrcIPs string into the set. */
static void add_src_string(struct ipset *s, const char *str, bool *all)
{
  if (!strcmp(str, "*")) {
    *all = true;
    return;
  }
  const char *dash = strchr(str, '-');
  struct ip_range r;
  if (dash && !strchr(str, '/')) {
    char a[64];
    size_t l = (size_t)(dash - str);
    if (l >= sizeof(a))
      return;
    memcpy(a, str, l);
    a[l] = 0;
    uint8_t f1, f2;
    tc_u128 lo, hi;
    if (pol_ip_parse_addr(a, &f1, &lo) || pol_ip_parse_addr(dash + 1, &f2, &hi) || f1 != f2)
      return;
    pol_ipset_add(s, (struct ip_range){f1, lo, hi});
    return;
  }
  if (!pol_ip_parse_prefix(str, &r, NULL))
    pol_ipset_add(s, r);
}

static void rule_set_src(struct rule *r, json_t *src)
{
  r->src = src;
  pol_ipset_init(&r->srcset);
  size_t i;
  json_t *v;
  json_array_foreach(src, i, v) add_src_string(&r->srcset, json_string_value(v), &r->src_all);
  pol_ipset_norm(&r->srcset);
}

static void append_subnet_routes(const struct ctopo *ct, json_t *arr)
{
  char t[160];
  for (size_t i = 0; i < ct->nn; i++) {
    for (size_t j = 0; j < ct->n[i].nsubnets; j++) {
      pol_ip_range_prefix(ct->n[i].subnets[j], t, sizeof(t));
      bool seen = false;
      size_t k;
      json_t *v;
      json_array_foreach(arr, k, v) seen |= !strcmp(json_string_value(v), t);
      if (!seen)
        json_array_append_new(arr, json_string(t));
    }
  }
}

static bool json_str_in(json_t *arr, const char *s)
{
  size_t k;
  json_t *v;
  json_array_foreach(arr, k, v) if (!strcmp(json_string_value(v), s)) return true;
  return false;
}

static void dport_add(struct rule *r, const char *ip, const struct ipset *set, bool star, struct port_range pr)
{
  r->dp = tc_xrealloc(r->dp, (r->ndp + 1) * sizeof(*r->dp));
  struct dport *d = &r->dp[r->ndp++];
  d->ip = tc_xstrdup(ip);
  pol_ipset_init(&d->set);
  if (set)
    pol_ipset_add_set(&d->set, set);
  d->star = star;
  d->pr = pr;
  d->js = NULL;
}

/* Gives r the grant's sources: the shared SrcIPs text (when built) and the
 * address set it stands for. */
static void rule_take_src(struct rule *r, const struct cgrant *cg)
{
  r->src = cg->srcstr ? json_incref(cg->srcstr) : NULL;
  pol_ipset_init(&r->srcset);
  pol_ipset_add_set(&r->srcset, &cg->srcset);
  pol_ipset_norm(&r->srcset);
  r->src_all = cg->src_all;
}

/* ---- SrcIPs texts kept across compiles --------------------------------------
 * A SrcIPs array is a function of its address ranges alone. Resolving the
 * grants again on every topology change is cheap; building thousands of
 * address strings (and freeing the previous ones) is not. Each result keeps
 * the arrays it used, keyed by their ranges; the next compile takes them
 * over for every source set that did not change, and grants (or
 * autogroup:self sources) with equal ranges share one array. */
struct src_entry {
  uint64_t h; /* 0: empty slot */
  struct ip_range *r;
  size_t n;
  json_t *arr; /* referenced */
};

/* Destination entries ({"IP", "Ports"}) likewise, keyed by their text. */
struct dp_entry {
  uint64_t h; /* 0: empty slot */
  char *ip;
  struct port_range pr;
  json_t *js; /* referenced */
};

struct pol_src_cache {
  struct src_entry *e;
  size_t cap, n; /* cap: power of two */
  struct dp_entry *d;
  size_t dcap, dn;
  /* SrcIPs arrays not described by ranges alone ("*" sources, which add
   * subnet routes): keyed by their strings */
  struct { uint64_t h; json_t *arr; } *t;
  size_t tcap, tn;
};

struct src_caches {
  const struct pol_src_cache *prev; /* the previous result's (read only), or NULL */
  struct pol_src_cache *cur;        /* this compile's, handed to the result */
};

static uint64_t ranges_hash(const struct ipset *s)
{
  uint64_t h = 0x5bd1e995u ^ s->n;
  for (size_t i = 0; i < s->n; i++) {
    h = (h ^ s->r[i].v6) * 0x100000001b3ull;
    h = (h ^ (uint64_t)s->r[i].lo ^ (uint64_t)(s->r[i].lo >> 64) * 31) * 0x9E3779B97F4A7C15ull;
    h = (h ^ (uint64_t)s->r[i].hi ^ (uint64_t)(s->r[i].hi >> 64) * 37) * 0xC2B2AE3D27D4EB4Full;
    h ^= h >> 29;
  }
  return h | 1;
}

static json_t *src_cache_get(const struct pol_src_cache *c, const struct ipset *s, uint64_t h)
{
  if (!c || !c->cap)
    return NULL;
  for (size_t k = h & (c->cap - 1); c->e[k].h; k = (k + 1) & (c->cap - 1)) {
    const struct src_entry *e = &c->e[k];
    if (e->h != h || e->n != s->n)
      continue;
    bool same = true;
    for (size_t i = 0; same && i < s->n; i++)
      same = e->r[i].v6 == s->r[i].v6 && e->r[i].lo == s->r[i].lo && e->r[i].hi == s->r[i].hi;
    if (same)
      return e->arr;
  }
  return NULL;
}

static void src_cache_put(struct pol_src_cache *c, const struct ipset *s, uint64_t h, json_t *arr)
{
  if (2 * (c->n + 1) > c->cap) {
    struct src_entry *old = c->e;
    size_t ocap = c->cap;
    c->cap = c->cap ? 2 * c->cap : 64;
    c->e = tc_xcalloc(c->cap, sizeof(*c->e));
    for (size_t i = 0; i < ocap; i++) {
      if (!old[i].h)
        continue;
      size_t k = old[i].h & (c->cap - 1);
      while (c->e[k].h)
        k = (k + 1) & (c->cap - 1);
      c->e[k] = old[i];
    }
    free(old);
  }
  size_t k = h & (c->cap - 1);
  while (c->e[k].h)
    k = (k + 1) & (c->cap - 1);
  c->e[k].h = h;
  c->e[k].n = s->n;
  c->e[k].r = tc_xmalloc((s->n + 1) * sizeof(*s->r));
  if (s->n)
    memcpy(c->e[k].r, s->r, s->n * sizeof(*s->r));
  c->e[k].arr = json_incref(arr);
  c->n++;
}

void pol_src_cache_free(struct pol_src_cache *c)
{
  if (!c)
    return;
  for (size_t i = 0; i < c->cap; i++)
    if (c->e[i].h) {
      free(c->e[i].r);
      json_decref(c->e[i].arr);
    }
  for (size_t i = 0; i < c->dcap; i++)
    if (c->d[i].h) {
      free(c->d[i].ip);
      json_decref(c->d[i].js);
    }
  for (size_t i = 0; i < c->tcap; i++)
    json_decref(c->t[i].arr);
  free(c->e);
  free(c->d);
  free(c->t);
  free(c);
}

static uint64_t strings_hash(const json_t *arr)
{
  uint64_t h = 0x84222325cbf29ce4ull ^ json_array_size(arr);
  size_t i;
  json_t *v;
  json_array_foreach(arr, i, v) {
    for (const char *p = json_string_value(v); p && *p; p++)
      h = (h ^ (unsigned char)*p) * 0x100000001b3ull;
    h = (h ^ 0xff) * 0x9E3779B97F4A7C15ull;
  }
  return (h ^ h >> 29) | 1;
}

static json_t *txt_cache_get(const struct pol_src_cache *c, const json_t *arr, uint64_t h)
{
  if (!c || !c->tcap)
    return NULL;
  for (size_t k = h & (c->tcap - 1); c->t[k].h; k = (k + 1) & (c->tcap - 1))
    if (c->t[k].h == h && json_equal(c->t[k].arr, (json_t *)arr))
      return c->t[k].arr;
  return NULL;
}

static void txt_cache_put(struct pol_src_cache *c, json_t *arr, uint64_t h)
{
  if (2 * (c->tn + 1) > c->tcap) {
    size_t ocap = c->tcap;
    void *old = c->t;
    c->tcap = c->tcap ? 2 * c->tcap : 16;
    c->t = tc_xcalloc(c->tcap, sizeof(*c->t));
    for (size_t i = 0; i < ocap; i++) {
      uint64_t oh = ((__typeof__(c->t))old)[i].h;
      if (!oh)
        continue;
      size_t k = oh & (c->tcap - 1);
      while (c->t[k].h)
        k = (k + 1) & (c->tcap - 1);
      c->t[k] = ((__typeof__(c->t))old)[i];
    }
    free(old);
  }
  size_t k = h & (c->tcap - 1);
  while (c->t[k].h)
    k = (k + 1) & (c->tcap - 1);
  c->t[k].h = h;
  c->t[k].arr = json_incref(arr);
  c->tn++;
}

/* arr (stolen) or an equal array from this compile or the previous result
 * (new reference): the same strings then stay the same object. */
static json_t *src_intern(struct src_caches *sc, json_t *arr)
{
  if (!sc)
    return arr;
  uint64_t h = strings_hash(arr);
  json_t *o = txt_cache_get(sc->cur, arr, h);
  if (o) {
    json_decref(arr);
    return json_incref(o);
  }
  o = txt_cache_get(sc->prev, arr, h);
  if (o) {
    json_decref(arr);
    arr = json_incref(o);
  }
  txt_cache_put(sc->cur, arr, h);
  return arr;
}

static uint64_t dp_hash(const char *ip, struct port_range pr)
{
  uint64_t h = 0xcbf29ce484222325ull;
  for (const char *p = ip; *p; p++)
    h = (h ^ (unsigned char)*p) * 0x100000001b3ull;
  h = (h ^ ((uint64_t)pr.first << 16 | pr.last)) * 0x9E3779B97F4A7C15ull;
  return (h ^ h >> 31) | 1;
}

static json_t *dp_cache_get(const struct pol_src_cache *c, const char *ip, struct port_range pr, uint64_t h)
{
  if (!c || !c->dcap)
    return NULL;
  for (size_t k = h & (c->dcap - 1); c->d[k].h; k = (k + 1) & (c->dcap - 1)) {
    const struct dp_entry *e = &c->d[k];
    if (e->h == h && e->pr.first == pr.first && e->pr.last == pr.last && !strcmp(e->ip, ip))
      return e->js;
  }
  return NULL;
}

static void dp_cache_put(struct pol_src_cache *c, const char *ip, struct port_range pr, uint64_t h, json_t *js)
{
  if (2 * (c->dn + 1) > c->dcap) {
    struct dp_entry *old = c->d;
    size_t ocap = c->dcap;
    c->dcap = c->dcap ? 2 * c->dcap : 64;
    c->d = tc_xcalloc(c->dcap, sizeof(*c->d));
    for (size_t i = 0; i < ocap; i++) {
      if (!old[i].h)
        continue;
      size_t k = old[i].h & (c->dcap - 1);
      while (c->d[k].h)
        k = (k + 1) & (c->dcap - 1);
      c->d[k] = old[i];
    }
    free(old);
  }
  size_t k = h & (c->dcap - 1);
  while (c->d[k].h)
    k = (k + 1) & (c->dcap - 1);
  c->d[k] = (struct dp_entry){h, tc_xstrdup(ip), pr, json_incref(js)};
  c->dn++;
}

/* The SrcIPs array for the address set s (normalised for overlap only):
 * this compile's, the previous result's, or built now. New reference. */
static json_t *src_text(struct src_caches *sc, const struct ipset *s)
{
  uint64_t h = sc ? ranges_hash(s) : 0;
  json_t *arr = sc ? src_cache_get(sc->cur, s, h) : NULL;
  if (arr)
    return json_incref(arr);
  arr = sc ? src_cache_get(sc->prev, s, h) : NULL;
  if (arr)
    arr = json_incref(arr);
  else {
    arr = json_array();
    pol_ipset_append_strings(s, arr);
  }
  if (sc)
    src_cache_put(sc->cur, s, h, arr);
  return arr;
}

static void compile_grant(const struct tc_policy *pol, const struct ctopo *ct, const struct grant *g,
                          struct cgrant *cg, bool want_text, struct src_caches *sc)
{
  memset(cg, 0, sizeof(*cg));
  cg->g = g;
  pol_ipset_init(&cg->src);
  cg->srcs = tc_xcalloc(g->nsrc + 1, sizeof(struct ipset));
  bool wild = false, danger = false;
  for (size_t i = 0; i < g->nsrc; i++) {
    const struct alias *a = &g->src[i];
    wild |= a->kind == AL_WILDCARD;
    danger |= a->kind == AL_AUTOGROUP && a->ag == AG_DANGER_ALL;
    pol_ipset_init(&cg->srcs[i]);
    pol_resolve_alias(pol, ct, a, &cg->srcs[i]);
    pol_ipset_add_set(&cg->src, &cg->srcs[i]);
  }
  cg->nsrcs = g->nsrc;
  pol_ipset_norm(&cg->src);
  cg->any_src = !pol_ipset_empty(&cg->src);
  pol_ipset_init(&cg->srcset);
  if (g->nsrc == 0 || g->ndst == 0)
    return;
  cg->src_all = danger;
  pol_ipset_add_set(&cg->srcset, &cg->src);
  if (wild)
    for (size_t i = 0; i < ct->nn; i++)
      for (size_t k = 0; k < ct->n[i].nsubnets; k++)
        pol_ipset_add(&cg->srcset, ct->n[i].subnets[k]);
  pol_ipset_norm(&cg->srcset);
  if (want_text)
    cg->srcstr = json_array();
  if (!want_text) {
    /* the tests only need the address sets */
  } else if (danger) {
    json_array_append_new(cg->srcstr, json_string("*"));
    cg->srcstr = src_intern(sc, cg->srcstr);
  } else if (cg->any_src) {
    /* Node addresses stay separate entries even when adjacent. */
    struct ipset txt;
    pol_ipset_init(&txt);
    for (size_t i = 0; i < g->nsrc; i++)
      pol_ipset_add_set(&txt, &cg->srcs[i]);
    pol_ipset_norm_overlap(&txt);
    if (!wild) {
      json_decref(cg->srcstr);
      cg->srcstr = src_text(sc, &txt);
      cg->src_shared = sc != NULL;
    } else {
      pol_ipset_append_strings(&txt, cg->srcstr);
    }
    pol_ipset_free(&txt);
    if (wild) {
      append_subnet_routes(ct, cg->srcstr);
      /* Explicit sources next to "*" keep their own entries. */
      for (size_t i = 0; i < g->nsrc; i++) {
        if (g->src[i].kind == AL_WILDCARD)
          continue;
        json_t *tmp = json_array();
        pol_ipset_append_strings(&cg->srcs[i], tmp);
        size_t k;
        json_t *v;
        json_array_foreach(tmp, k, v) if (!json_str_in(cg->srcstr, json_string_value(v)))
            json_array_append(cg->srcstr, v);
        json_decref(tmp);
      }
      cg->srcstr = src_intern(sc, cg->srcstr);
    }
  }
  if (g->nvia) {
    cg->via = true;
    cg->via_pfx = tc_xcalloc(1, sizeof(struct ip_range));
    for (size_t i = 0; i < g->ndst; i++) {
      const struct alias *a = &g->dst[i];
      if (a->kind == AL_AUTOGROUP && a->ag == AG_INTERNET) {
        cg->via_internet = true;
        continue;
      }
      if (a->kind == AL_AUTOGROUP && a->ag == AG_SELF)
        continue;
      struct ipset s;
      pol_ipset_init(&s);
      pol_resolve_alias(pol, ct, a, &s);
      json_t *pf = json_array();
      pol_ipset_append_prefixes(&s, pf, false);
      size_t k;
      json_t *v;
      json_array_foreach(pf, k, v) {
        cg->via_pfx = tc_xrealloc(cg->via_pfx, (cg->nvia_pfx + 1) * sizeof(struct ip_range));
        pol_ip_parse_prefix(json_string_value(v), &cg->via_pfx[cg->nvia_pfx++], NULL);
      }
      json_decref(pf);
      pol_ipset_free(&s);
    }
    return;
  }
  for (size_t i = 0; i < g->ndst; i++)
    cg->has_self |= g->dst[i].kind == AL_AUTOGROUP && g->dst[i].ag == AG_SELF;
  /* Network rules for the non-self destinations. */
  bool has_other = false;
  for (size_t i = 0; i < g->ndst; i++)
    has_other |= !(g->dst[i].kind == AL_AUTOGROUP && g->dst[i].ag == AG_SELF);
  if (!has_other)
    return;
  struct ipset *dsets = tc_xcalloc(g->ndst, sizeof(struct ipset));
  for (size_t i = 0; i < g->ndst; i++) {
    pol_ipset_init(&dsets[i]);
    if (g->dst[i].kind != AL_WILDCARD && !(g->dst[i].kind == AL_AUTOGROUP && g->dst[i].ag == AG_SELF))
      pol_resolve_alias(pol, ct, &g->dst[i], &dsets[i]);
  }
  for (size_t p = 0; p < g->nip && cg->any_src; p++) {
    struct rule r = {0};
    r.proto = g->ip[p].proto;
    for (size_t i = 0; i < g->ndst; i++) {
      const struct alias *a = &g->dst[i];
      if (a->kind == AL_AUTOGROUP && a->ag == AG_SELF)
        continue;
      if (a->kind == AL_WILDCARD) {
        for (size_t k = 0; k < g->ip[p].nports; k++)
          dport_add(&r, "*", NULL, true, g->ip[p].ports[k]);
        continue;
      }
      if (a->kind == AL_PREFIX || a->kind == AL_HOST || a->kind == AL_AUTOGROUP)
        r.addr_dp = true;
      struct ip_range *pr;
      size_t npr = pol_ipset_prefix_ranges(&dsets[i], &pr);
      char t[160] = "";
      for (size_t k = 0; k < npr; k++) {
        struct ipset one;
        pol_ipset_init(&one);
        pol_ipset_add(&one, pr[k]);
        if (want_text)
          pol_ip_range_text(pr[k], true, t, sizeof(t));
        for (size_t q = 0; q < g->ip[p].nports; q++)
          dport_add(&r, t, &one, false, g->ip[p].ports[q]);
        pol_ipset_free(&one);
      }
      free(pr);
    }
    if (r.ndp) {
      rule_index(&r);
      rule_take_src(&r, cg);
      cg->rules = tc_xrealloc(cg->rules, (cg->nrules + 1) * sizeof(*cg->rules));
      cg->rules[cg->nrules++] = r;
    } else {
      rule_free(&r);
    }
  }
  if (g->app && want_text) {
    struct rule r = {0};
    r.proto = -1;
    rule_take_src(&r, cg);
    r.capgrant = json_array();
    r.capdst = tc_xcalloc(g->ndst, sizeof(struct ipset));
    json_t *dststrs = json_array();
    bool dst_wild = false;
    for (size_t i = 0; i < g->ndst; i++) {
      const struct alias *a = &g->dst[i];
      if (a->kind == AL_AUTOGROUP && a->ag == AG_SELF)
        continue;
      struct ipset s;
      pol_ipset_init(&s);
      pol_resolve_alias(pol, ct, a, &s);
      dst_wild |= a->kind == AL_WILDCARD;
      json_t *pf = json_array();
      pol_ipset_append_prefixes(&s, pf, false);
      json_array_append_new(r.capgrant, json_pack("{s:o,s:O}", "Dsts", pf, "CapMap", g->app));
      pol_ipset_append_strings(&s, dststrs);
      r.capdst[r.ncap++] = s;
    }
    cg->rules = tc_xrealloc(cg->rules, (cg->nrules + 3) * sizeof(*cg->rules));
    cg->rules[cg->nrules++] = r;
    if (dst_wild)
      append_subnet_routes(ct, dststrs);
    /* Companion capabilities flow the other way: from destinations to sources. */
    static const char *companions[][2] = {{"tailscale.com/cap/drive", "tailscale.com/cap/drive-sharer"},
                                          {"tailscale.com/cap/relay", "tailscale.com/cap/relay-target"}};
    for (size_t ci = 0; ci < TC_ARRAY_LEN(companions); ci++) {
      if (!json_object_get(g->app, companions[ci][0]))
        continue;
      struct rule cr = {0};
      cr.proto = -1;
      rule_set_src(&cr, json_deep_copy(dststrs));
      cr.capgrant = json_array();
      cr.capdst = tc_xcalloc(1, sizeof(struct ipset));
      pol_ipset_init(&cr.capdst[0]);
      for (size_t i = 0; i < g->nsrc; i++)
        pol_ipset_add_set(&cr.capdst[0], &cg->srcs[i]);
      pol_ipset_norm(&cr.capdst[0]);
      cr.ncap = 1;
      json_t *pf = json_array();
      pol_ipset_append_prefixes(&cr.capdst[0], pf, false);
      json_array_append_new(cr.capgrant,
                            json_pack("{s:o,s:{s:n}}", "Dsts", pf, "CapMap", companions[ci][1]));
      cg->rules[cg->nrules++] = cr;
    }
    json_decref(dststrs);
  }
  for (size_t i = 0; i < g->ndst; i++)
    pol_ipset_free(&dsets[i]);
  free(dsets);
}

static void cgrant_free(struct cgrant *cg)
{
  pol_ipset_free(&cg->src);
  pol_ipset_free(&cg->srcset);
  for (size_t i = 0; i < cg->nsrcs; i++)
    pol_ipset_free(&cg->srcs[i]);
  free(cg->srcs);
  json_decref(cg->srcstr);
  for (size_t i = 0; i < cg->nrules; i++)
    rule_free(&cg->rules[i]);
  free(cg->rules);
  free(cg->via_pfx);
}

/* ---- per node ------------------------------------------------------------------- */
static bool dport_matches(const struct cnode *n, const struct dport *d, const struct ipset *internet)
{
  if (d->star)
    return true;
  if (pol_node_in_set(n, &d->set))
    return true;
  for (size_t i = 0; i < n->nsubnets; i++)
    if (pol_ipset_overlaps(&d->set, n->subnets[i]))
      return true;
  if (node_is_exit(n)) {
    bool sub = d->set.n > 0;
    for (size_t i = 0; i < d->set.n && sub; i++)
      sub = pol_ipset_covers(internet, d->set.r[i]);
    if (sub)
      return true;
  }
  return false;
}

static json_t *ports_json(struct port_range pr)
{
  json_t *o = json_object();
  json_object_set_new_nocheck(o, "First", json_integer(pr.first));
  json_object_set_new_nocheck(o, "Last", json_integer(pr.last));
  return o;
}

/* {"IP": ip, "Ports": {...}}: built directly, as json_pack's format parsing
 * showed up in profiles (one per destination entry per node). */
static json_t *dport_json(const char *ip, struct port_range pr)
{
  json_t *o = json_object();
  json_object_set_new_nocheck(o, "IP", json_string(ip));
  json_object_set_new_nocheck(o, "Ports", ports_json(pr));
  return o;
}

struct pol_src_cache;
static json_t *dp_cache_get(const struct pol_src_cache *c, const char *ip, struct port_range pr, uint64_t h);
static void dp_cache_put(struct pol_src_cache *c, const char *ip, struct port_range pr, uint64_t h, json_t *js);
static uint64_t dp_hash(const char *ip, struct port_range pr);

/* The shared entry for (ip, pr): this compile's, the previous result's, or
 * built now (new reference). */
static json_t *dport_json_cached(const struct pol_src_cache *prev, struct pol_src_cache *cur, const char *ip,
                                 struct port_range pr)
{
  uint64_t h = dp_hash(ip, pr);
  json_t *js = dp_cache_get(cur, ip, pr, h);
  if (js)
    return json_incref(js);
  js = dp_cache_get(prev, ip, pr, h);
  js = js ? json_incref(js) : dport_json(ip, pr);
  dp_cache_put(cur, ip, pr, h, js);
  return js;
}

/* ---- filter signatures (incremental compile) ----------------------------------
 * A node's packet filter is a function of the sequence of rule
 * contributions it receives (sources, protocol, destination entries kept)
 * in policy order; the signature hashes exactly that sequence, so equal
 * signatures under the same parsed policy mean equal filters (up to a
 * 2^-64 collision). SrcIPs arrays are hashed by content once per compile. */
struct sig_memo {
  const json_t **key;
  uint64_t *val;
  size_t cap, n; /* cap: power of two */
};

struct fsig {
  uint64_t h;
  bool unusable; /* a contribution the signature does not cover (via, app grants to self) */
  struct sig_memo *memo;
};

static uint64_t mix64(uint64_t x)
{
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

static void fsig_u64(struct fsig *s, uint64_t v)
{
  s->h = mix64(s->h ^ mix64(v + 0x9e3779b97f4a7c15ull));
}

static uint64_t str_hash(const char *t)
{
  uint64_t h = 0xcbf29ce484222325ull;
  for (; t && *t; t++)
    h = (h ^ (unsigned char)*t) * 0x100000001b3ull;
  return h;
}

static void fsig_str(struct fsig *s, const char *t)
{
  fsig_u64(s, str_hash(t));
}

static void sig_memo_free(struct sig_memo *m)
{
  for (size_t i = 0; i < m->cap; i++)
    json_decref((json_t *)m->key[i]);
  free(m->key);
  free(m->val);
}

/* Content hash of an array of strings (NULL: 0), memoised by pointer. */
static uint64_t sig_of_array(struct sig_memo *m, const json_t *arr)
{
  if (!arr || !m)
    return 0;
  if (2 * (m->n + 1) > m->cap) {
    struct sig_memo big = {tc_xcalloc(m->cap ? 2 * m->cap : 64, sizeof(*big.key)), NULL, m->cap ? 2 * m->cap : 64, 0};
    big.val = tc_xcalloc(big.cap, sizeof(*big.val));
    for (size_t i = 0; i < m->cap; i++)
      if (m->key[i]) {
        size_t h = (size_t)mix64((uintptr_t)m->key[i]) & (big.cap - 1);
        while (big.key[h])
          h = (h + 1) & (big.cap - 1);
        big.key[h] = m->key[i];
        big.val[h] = m->val[i];
        big.n++;
      }
    free(m->key); /* the references move to big */
    free(m->val);
    *m = big;
  }
  size_t h = (size_t)mix64((uintptr_t)arr) & (m->cap - 1);
  while (m->key[h] && m->key[h] != arr)
    h = (h + 1) & (m->cap - 1);
  if (m->key[h])
    return m->val[h];
  uint64_t v = mix64(json_array_size(arr));
  size_t i;
  json_t *e;
  json_array_foreach(arr, i, e) v = mix64(v ^ str_hash(json_string_value(e)));
  /* Held until the compile ends: a freed array's address must not come
   * back as another array with this one's hash. */
  m->key[h] = json_incref((json_t *)arr);
  m->val[h] = v;
  m->n++;
  return v;
}

/* The CapGrant rule of r restricted to node n, or NULL; records what it
 * covers in dst_out. */
static json_t *reduce_capgrant(const struct cnode *n, const struct rule *r, struct ipset *dst_out)
{
  json_t *cgs = json_array();
  for (size_t i = 0; i < r->ncap; i++) {
    const struct ipset *ds = &r->capdst[i];
    struct ipset m;
    pol_ipset_init(&m);
    /* Addresses of this node inside the destination, and subnet routes overlapping it. */
    if (n->has4 && pol_ipset_contains(ds, 0, n->a4))
      pol_ipset_add(&m, (struct ip_range){0, n->a4, n->a4});
    if (n->has6 && pol_ipset_contains(ds, 1, n->a6))
      pol_ipset_add(&m, (struct ip_range){1, n->a6, n->a6});
    json_t *dsts = json_array();
    pol_ipset_norm(&m);
    pol_ipset_append_prefixes(&m, dsts, false);
    json_t *orig = json_object_get(json_array_get(r->capgrant, i), "Dsts");
    size_t k;
    json_t *v;
    json_array_foreach(orig, k, v) {
      struct ip_range pr;
      pol_ip_parse_prefix(json_string_value(v), &pr, NULL);
      for (size_t s = 0; s < n->nsubnets; s++)
        if (pol_ip_range_overlaps(pr, n->subnets[s]) && !json_str_in(dsts, json_string_value(v)))
          json_array_append(dsts, v);
    }
    pol_ipset_add_set(dst_out, &m);
    for (size_t sn = 0; sn < n->nsubnets; sn++)
      if (pol_ipset_overlaps(ds, n->subnets[sn]))
        pol_ipset_add(dst_out, n->subnets[sn]);
    pol_ipset_free(&m);
    if (json_array_size(dsts))
      json_array_append_new(cgs, json_pack("{s:o,s:O}", "Dsts", dsts, "CapMap",
                                           json_object_get(json_array_get(r->capgrant, i), "CapMap")));
    else
      json_decref(dsts);
  }
  if (!json_array_size(cgs)) {
    json_decref(cgs);
    return NULL;
  }
  return json_pack("{s:O,s:o}", "SrcIPs", r->src, "CapGrant", cgs);
}

/* Builds a FilterRule JSON from a rule restricted to the node's entries;
 * returns NULL when nothing applies. */
/* Also records in dst_out / dst_all what the kept entries cover (for peer
 * visibility and route reachability). */
static json_t *reduce_rule(const struct cnode *n, const struct rule *r, const struct ipset *internet,
                           struct ipset *dst_out, bool *dst_all, bool emit, bool *applied, struct fsig *sig)
{
  *applied = false;
  if (r->capgrant) {
    /* rare: always built; the signature covers its text */
    json_t *o = reduce_capgrant(n, r, dst_out);
    if (o) {
      *applied = true;
      char *t = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
      fsig_str(sig, t);
      free(t);
    }
    if (!emit) {
      json_decref(o);
      return NULL;
    }
    return o;
  }
  /* Entries that apply: those naming one of the node's addresses (found by
   * binary search) and the broader ones (checked one by one). */
  /* (runs per node and rule: no allocation for the usual few entries) */
  size_t local[32];
  size_t *hit = r->ndp < TC_ARRAY_LEN(local) ? local : tc_xcalloc(r->ndp + 1, sizeof(size_t)), nhit = 0;
  for (int fam = 0; fam < 2; fam++) {
    if (fam ? !n->has6 : !n->has4)
      continue;
    tc_u128 a = fam ? n->a6 : n->a4;
    size_t lo = 0, hi = r->nsingle;
    while (lo < hi) {
      size_t mid = lo + (hi - lo) / 2;
      const struct ip_range *m = &r->dp[r->single[mid]].set.r[0];
      if (m->v6 < fam || (m->v6 == fam && m->lo < a))
        lo = mid + 1;
      else
        hi = mid;
    }
    for (; lo < r->nsingle; lo++) {
      const struct ip_range *m = &r->dp[r->single[lo]].set.r[0];
      if (m->v6 != fam || m->lo != a)
        break;
      hit[nhit++] = r->single[lo];
    }
  }
  if (n->nsubnets || node_is_exit(n)) {
    /* Routers also take single-address entries inside their routes. */
    for (size_t i = 0; i < r->nsingle; i++)
      if (!pol_node_in_set(n, &r->dp[r->single[i]].set) && dport_matches(n, &r->dp[r->single[i]], internet))
        hit[nhit++] = r->single[i];
  }
  for (size_t i = 0; i < r->nother; i++)
    if (dport_matches(n, &r->dp[r->other[i]], internet))
      hit[nhit++] = r->other[i];
  /* Keep the policy's order. */
  for (size_t i = 1; i < nhit; i++)
    for (size_t j = i; j > 0 && hit[j - 1] > hit[j]; j--) {
      size_t t = hit[j];
      hit[j] = hit[j - 1];
      hit[j - 1] = t;
    }
  if (nhit) {
    *applied = true;
    fsig_u64(sig, 0x5255u); /* a rule: sources, protocol, entries */
    fsig_u64(sig, sig_of_array(sig->memo, r->src));
    fsig_u64(sig, (uint64_t)(int64_t)r->proto);
  }
  json_t *dp = emit && nhit ? json_array() : NULL;
  for (size_t i = 0; i < nhit; i++) {
    const struct dport *d = &r->dp[hit[i]];
    fsig_str(sig, d->ip);
    fsig_u64(sig, (uint64_t)d->pr.first << 16 | d->pr.last);
    if (dp)
      json_array_append_new(dp, d->js ? json_incref(d->js) : dport_json(d->ip, d->pr));
    if (r->dp[hit[i]].star)
      *dst_all = true;
    else
      pol_ipset_add_set(dst_out, &r->dp[hit[i]].set);
  }
  if (hit != local)
    free(hit);
  if (!dp)
    return NULL;
  json_t *o = json_object();
  json_object_set_nocheck(o, "SrcIPs", r->src);
  json_object_set_new_nocheck(o, "DstPorts", dp);
  if (r->proto >= 0)
    json_object_set_new_nocheck(o, "IPProto", json_pack("[i]", r->proto));
  return o;
}

/* Whether two SrcIPs arrays hold the same strings. Most are the same
 * shared array or differ; content hashes (memoised per array and compile)
 * settle the unequal ones without walking thousands of strings per merge,
 * which made up a third of a compile when one user owns every device. */
static bool same_sources(struct sig_memo *m, json_t *a, json_t *b)
{
  if (a == b)
    return true;
  if (!a || !b || json_array_size(a) != json_array_size(b))
    return false;
  if (m && sig_of_array(m, a) != sig_of_array(m, b))
    return false;
  return json_equal(a, b);
}

/* Rules with the same sources and protocol are merged (their ports joined),
 * as the coordination service does. CapGrant rules are never merged. */
static void merge_into(json_t *out, json_t *rule, struct sig_memo *memo)
{
  if (!json_object_get(rule, "CapGrant")) {
    size_t i;
    json_t *o;
    json_array_foreach(out, i, o) {
      if (json_object_get(o, "CapGrant"))
        continue;
      json_t *p1 = json_object_get(o, "IPProto"), *p2 = json_object_get(rule, "IPProto");
      json_t *s1 = json_object_get(o, "SrcIPs"), *s2 = json_object_get(rule, "SrcIPs");
      if (same_sources(memo, s1, s2) && ((!p1 && !p2) || (p1 && p2 && json_equal(p1, p2)))) {
        json_array_extend(json_object_get(o, "DstPorts"), json_object_get(rule, "DstPorts"));
        json_decref(rule);
        return;
      }
    }
  }
  json_array_append_new(out, rule);
}

/* The rule merge_into would merge a non-CapGrant rule with these sources
 * and protocol (proto < 0: none) into, or NULL. Borrowed. */
static json_t *merge_target(json_t *out, json_t *src, int proto, struct sig_memo *memo)
{
  size_t i;
  json_t *o;
  json_array_foreach(out, i, o) {
    if (json_object_get(o, "CapGrant"))
      continue;
    json_t *p1 = json_object_get(o, "IPProto"), *s1 = json_object_get(o, "SrcIPs");
    if (!same_sources(memo, s1, src))
      continue;
    if (proto < 0 ? !p1
                  : (p1 && json_array_size(p1) == 1 && json_is_integer(json_array_get(p1, 0)) &&
                     json_integer_value(json_array_get(p1, 0)) == proto))
      return o;
  }
  return NULL;
}

/* Sources of an autogroup:self grant as seen by one user's devices: that
 * user's own devices that the grant's sources include. Every device of the
 * user gets the same list, so it is computed once per (grant, user). */
static json_t *self_sources(const struct ctopo *ct, const struct cgrant *cg, int user, struct ipset *src,
                            struct src_caches *sc)
{
  pol_ipset_init(src);
  for (size_t k = 0; k < ct->nuser_nodes[user]; k++) {
    const struct cnode *o = &ct->n[ct->user_nodes[user][k]];
    for (size_t s = 0; s < cg->nsrcs; s++)
      if (pol_node_in_set(o, &cg->srcs[s])) {
        pol_ipset_add_set(src, &o->ips);
        break;
      }
  }
  pol_ipset_norm_overlap(src);
  return src_text(sc, src);
}

/* Per-node rules for autogroup:self destinations. */
/* One node's own {"IP","Ports"} entries, kept while its filter is built:
 * autogroup:self grants mostly repeat the same few port ranges. */
struct self_dp {
  char a4[64], a6[64];
  size_t n;
  struct {
    struct port_range pr;
    json_t *j4, *j6;
  } e[16];
};

static void self_dp_init(struct self_dp *c, const struct cnode *n)
{
  c->n = 0;
  c->a4[0] = c->a6[0] = 0;
  if (n->has4)
    pol_ip_format_addr(0, n->a4, c->a4, sizeof(c->a4));
  if (n->has6)
    pol_ip_format_addr(1, n->a6, c->a6, sizeof(c->a6));
}

static void self_dp_free(struct self_dp *c)
{
  for (size_t i = 0; i < c->n; i++) {
    json_decref(c->e[i].j4);
    json_decref(c->e[i].j6);
  }
  c->n = 0;
}

/* Appends the node's entries for pr (v4 and/or v6) to dp. */
static void self_dp_append(struct self_dp *c, const struct cnode *n, struct port_range pr, json_t *dp)
{
  size_t i = 0;
  while (i < c->n && (c->e[i].pr.first != pr.first || c->e[i].pr.last != pr.last))
    i++;
  if (i == c->n) {
    if (c->n == TC_ARRAY_LEN(c->e)) {
      if (n->has4)
        json_array_append_new(dp, dport_json(c->a4, pr));
      if (n->has6)
        json_array_append_new(dp, dport_json(c->a6, pr));
      return;
    }
    c->e[i].pr = pr;
    c->e[i].j4 = n->has4 ? dport_json(c->a4, pr) : NULL;
    c->e[i].j6 = n->has6 ? dport_json(c->a6, pr) : NULL;
    c->n++;
  }
  if (c->e[i].j4)
    json_array_append(dp, c->e[i].j4);
  if (c->e[i].j6)
    json_array_append(dp, c->e[i].j6);
}

static void self_rules(const struct ctopo *ct, const struct cgrant *cg, json_t *srcstr, const struct cnode *n,
                       struct self_dp *sdp, json_t *out, struct sig_memo *memo)
{
  if (n->tagged || n->user < 0 || !json_array_size(srcstr))
    return;
  const struct grant *g = cg->g;
  for (size_t p = 0; p < g->nip; p++) {
    json_t *dp = json_array();
    /* Only this node's own addresses survive reduction. */
    for (size_t k = 0; k < g->ip[p].nports; k++)
      self_dp_append(sdp, n, g->ip[p].ports[k], dp);
    if (!json_array_size(dp)) {
      json_decref(dp);
      continue;
    }
    /* Most self rules merge into one already in the filter (same sources
     * and protocol): extend it directly rather than build and drop one. */
    json_t *into = merge_target(out, srcstr, g->ip[p].proto, memo);
    if (into) {
      json_array_extend(json_object_get(into, "DstPorts"), dp);
      json_decref(dp);
      continue;
    }
    json_t *o = json_object();
    json_object_set_nocheck(o, "SrcIPs", srcstr);
    json_object_set_new_nocheck(o, "DstPorts", dp);
    if (g->ip[p].proto >= 0)
      json_object_set_new_nocheck(o, "IPProto", json_pack("[i]", g->ip[p].proto));
    json_array_append_new(out, o);
  }
  if (g->app) {
    json_t *dsts = json_array();
    pol_ipset_append_prefixes(&n->ips, dsts, false);
    json_t *cgs = json_pack("[{s:o,s:O}]", "Dsts", dsts, "CapMap", g->app);
    json_array_append_new(out, json_pack("{s:O,s:o}", "SrcIPs", srcstr, "CapGrant", cgs));
    /* Companion capability back from the user's devices to this one, when
     * this device is among the grant's sources. */
    static const char *companions[][2] = {{"tailscale.com/cap/drive", "tailscale.com/cap/drive-sharer"},
                                          {"tailscale.com/cap/relay", "tailscale.com/cap/relay-target"}};
    bool is_src = false;
    for (size_t s = 0; s < cg->nsrcs && !is_src; s++)
      is_src = pol_node_in_set(n, &cg->srcs[s]);
    for (size_t ci = 0; is_src && ci < TC_ARRAY_LEN(companions); ci++) {
      if (!json_object_get(g->app, companions[ci][0]))
        continue;
      struct ipset own;
      pol_ipset_init(&own);
      for (size_t k = 0; k < ct->nuser_nodes[n->user]; k++)
        pol_ipset_add_set(&own, &ct->n[ct->user_nodes[n->user][k]].ips);
      pol_ipset_norm_overlap(&own);
      json_t *srcs = json_array();
      pol_ipset_append_strings(&own, srcs);
      pol_ipset_free(&own);
      json_t *d2 = json_array();
      pol_ipset_append_prefixes(&n->ips, d2, false);
      json_array_append_new(out, json_pack("{s:o,s:[{s:o,s:{s:n}}]}", "SrcIPs", srcs, "CapGrant", "Dsts", d2,
                                           "CapMap", companions[ci][1]));
    }
  }
}

/* Per-node reachability, recorded while the node's filter is built: for
 * every rule in it, who may send (sources, borrowed from the compiled rule)
 * and to what (the entries kept for this node). */
struct reach_rule {
  const struct ipset *src;
  bool src_all;
  struct ipset dst;
  bool dst_all;
  int key; /* which rule: >= 0 global rule index, < 0 autogroup:self of grant -key-1, INT_MIN via */
  bool dst_borrowed; /* dst points into a previous result's record block */
};

struct reach {
  struct reach_rule *r;
  size_t n, cap;
  bool all;
};

static struct reach_rule *reach_push(struct reach *rc, const struct ipset *src, bool src_all, int key)
{
  if (rc->n == rc->cap) {
    rc->cap = rc->cap ? rc->cap * 2 : 8;
    rc->r = tc_xrealloc(rc->r, rc->cap * sizeof(*rc->r));
  }
  struct reach_rule *rr = &rc->r[rc->n++];
  rr->src = src;
  rr->src_all = src_all;
  pol_ipset_init(&rr->dst);
  rr->dst_all = false;
  rr->key = key;
  rr->dst_borrowed = false;
  return rr;
}

static void free_reach(struct reach *rc)
{
  for (size_t i = 0; i < rc->n; i++)
    if (!rc->r[i].dst_borrowed)
      pol_ipset_free(&rc->r[i].dst);
  free(rc->r);
}

static void via_rules(const struct cgrant *cg, const struct cnode *n, const struct ipset *internet, json_t *out,
                      struct reach *rc)
{
  const struct grant *g = cg->g;
  bool match = false;
  for (size_t i = 0; i < g->nvia && !match; i++)
    match = pol_node_has_tag(n, g->via[i]);
  if (!match || !cg->srcstr || !json_array_size(cg->srcstr))
    return;
  json_t *pfx = json_array();
  char t[160];
  for (size_t i = 0; i < cg->nvia_pfx; i++) {
    bool ov = false;
    for (size_t s = 0; s < n->nsubnets && !ov; s++)
      ov = pol_ip_range_overlaps(cg->via_pfx[i], n->subnets[s]);
    if (ov) {
      pol_ip_range_prefix(cg->via_pfx[i], t, sizeof(t));
      json_array_append_new(pfx, json_string(t));
    }
  }
  if (cg->via_internet && node_is_exit(n))
    pol_ipset_append_prefixes(internet, pfx, false);
  if (!json_array_size(pfx)) {
    json_decref(pfx);
    return;
  }
  struct reach_rule *rr = reach_push(rc, &cg->srcset, cg->src_all, INT_MIN);
  for (size_t i = 0; i < cg->nvia_pfx; i++)
    for (size_t sn = 0; sn < n->nsubnets; sn++)
      if (pol_ip_range_overlaps(cg->via_pfx[i], n->subnets[sn]))
        pol_ipset_add(&rr->dst, cg->via_pfx[i]);
  if (cg->via_internet && node_is_exit(n))
    pol_ipset_add_set(&rr->dst, internet);
  pol_ipset_norm(&rr->dst);
  for (size_t p = 0; p < g->nip; p++) {
    json_t *dp = json_array();
    size_t k;
    json_t *v;
    json_array_foreach(pfx, k, v) for (size_t q = 0; q < g->ip[p].nports; q++)
        json_array_append_new(dp, json_pack("{s:O,s:o}", "IP", v, "Ports", ports_json(g->ip[p].ports[q])));
    json_t *o = json_pack("{s:O,s:o}", "SrcIPs", cg->srcstr, "DstPorts", dp);
    if (g->ip[p].proto >= 0)
      json_object_set_new(o, "IPProto", json_pack("[i]", g->ip[p].proto));
    merge_into(out, o, NULL);
  }
  json_decref(pfx);
}

/* ---- SSH --------------------------------------------------------------------------- */
/* Users in ascending id order (principals are grouped that way). */
static int *users_by_id(const struct ctopo *ct)
{
  int *order = tc_xcalloc(ct->t->nusers + 1, sizeof(int));
  for (size_t i = 0; i < ct->t->nusers; i++)
    order[i] = (int)i;
  for (size_t i = 1; i < ct->t->nusers; i++)
    for (size_t j = i; j > 0 && ct->t->users[order[j - 1]].id > ct->t->users[order[j]].id; j--) {
      int tmp = order[j];
      order[j] = order[j - 1];
      order[j - 1] = tmp;
    }
  return order;
}

static void append_addrs(json_t *arr, const struct ipset *s)
{
  char a[64];
  for (size_t r = 0; r < s->n; r++)
    for (tc_u128 x = s->r[r].lo;; x++) {
      pol_ip_format_addr(s->r[r].v6, x, a, sizeof(a));
      /* (not json_pack: its format parser was most of this, one per device) */
      json_t *o = json_object();
      json_object_set_new_nocheck(o, "nodeIP", json_string_nocheck(a));
      json_array_append_new(arr, o);
      if (x == s->r[r].hi)
        break;
    }
}

/* Principals for one user's devices inside src. */
static void user_principals(const struct ctopo *ct, const struct ipset *src, int u, json_t *arr)
{
  struct ipset s;
  pol_ipset_init(&s);
  for (size_t k = 0; k < ct->nuser_nodes[u]; k++) {
    const struct cnode *o = &ct->n[ct->user_nodes[u][k]];
    if (pol_node_in_set(o, src))
      pol_ipset_add_set(&s, &o->ips);
  }
  pol_ipset_norm(&s);
  append_addrs(arr, &s);
  pol_ipset_free(&s);
}

/* Tagged devices inside src, once per tag they carry (as the service does). */
static void tagged_principals(const struct ctopo *ct, const struct ipset *src, json_t *arr)
{
  char a[64];
  for (size_t i = 0; i < ct->nn; i++) {
    const struct cnode *n = &ct->n[i];
    if (!n->tagged || !pol_node_in_set(n, src))
      continue;
    for (size_t t = 0; t < n->src->ntags; t++) {
      if (n->has4) {
        pol_ip_format_addr(0, n->a4, a, sizeof(a));
        json_array_append_new(arr, json_pack("{s:s}", "nodeIP", a));
      }
      if (n->has6) {
        pol_ip_format_addr(1, n->a6, a, sizeof(a));
        json_array_append_new(arr, json_pack("{s:s}", "nodeIP", a));
      }
    }
  }
}

/* One SSH rule resolved once for the whole tailnet. */
struct ssh_pre {
  const struct ssh_rule *sr;
  bool skip;
  struct ipset src, dst;
  bool self_dst, other;
  json_t *action, *umap;
  const char *lp_domain;
  json_t **by_user;  /* principals per user index (may be empty arrays) */
  json_t *tagged;    /* tagged principals */
  json_t *all;       /* users (by id) then tagged */
  char **lp;         /* per user: email local part when in lp_domain */
};

struct ssh_pres {
  struct ssh_pre *r;
  size_t n;
  int *order;
  size_t nusers;
};

struct ssh_pres *pol_ssh_prepare(const struct tc_policy *pol, const struct ctopo *ct)
{
  struct ssh_pres *sp = tc_xcalloc(1, sizeof(*sp));
  sp->r = tc_xcalloc(pol->nssh + 1, sizeof(*sp->r));
  sp->n = pol->nssh;
  sp->order = users_by_id(ct);
  sp->nusers = ct->t->nusers;
  const char *base = ct->t->control_url ? ct->t->control_url : "https://unused";
  for (size_t ri = 0; ri < pol->nssh; ri++) {
    struct ssh_pre *p = &sp->r[ri];
    const struct ssh_rule *sr = &pol->ssh[ri];
    p->sr = sr;
    pol_ipset_init(&p->src);
    pol_ipset_init(&p->dst);
    for (size_t i = 0; i < sr->nsrc; i++)
      pol_resolve_alias(pol, ct, &sr->src[i], &p->src);
    pol_ipset_norm(&p->src);
    if (pol_ipset_empty(&p->src)) {
      p->skip = true;
      continue;
    }
    if (sr->check) {
      char *url = tc_xasprintf("%s/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=$LOCAL_USER", base);
      p->action = json_pack("{s:s}", "holdAndDelegate", url);
      free(url);
    } else {
      p->action = json_pack("{s:b,s:b,s:b,s:b}", "accept", 1, "allowAgentForwarding", 1, "allowLocalPortForwarding",
                            1, "allowRemotePortForwarding", 1);
    }
    p->umap = json_object();
    bool root = false, nonroot = false;
    for (size_t i = 0; i < sr->nusers; i++) {
      const char *u = sr->users[i];
      if (!strcmp(u, "root"))
        root = true;
      else if (!strcmp(u, "autogroup:nonroot"))
        nonroot = true;
      else if (tc_str_has_prefix(u, "localpart:*@") && u[12])
        p->lp_domain = u + 12;
      else
        json_object_set_new(p->umap, u, json_string(u));
    }
    if (nonroot)
      json_object_set_new(p->umap, "*", json_string("="));
    json_object_set_new(p->umap, "root", json_string(root ? "root" : ""));
    for (size_t i = 0; i < sr->ndst; i++) {
      if (sr->dst[i].kind == AL_AUTOGROUP && sr->dst[i].ag == AG_SELF) {
        p->self_dst = true;
      } else {
        p->other = true;
        pol_resolve_alias(pol, ct, &sr->dst[i], &p->dst);
      }
    }
    pol_ipset_norm(&p->dst);
    p->by_user = tc_xcalloc(sp->nusers + 1, sizeof(json_t *));
    p->lp = tc_xcalloc(sp->nusers + 1, sizeof(char *));
    p->all = json_array();
    for (size_t ui = 0; ui < sp->nusers; ui++) {
      int u = sp->order[ui];
      p->by_user[u] = json_array();
      user_principals(ct, &p->src, u, p->by_user[u]);
      json_array_extend(p->all, p->by_user[u]);
      const struct tc_policy_user *us = &ct->t->users[u];
      const char *at = us->email ? strrchr(us->email, '@') : NULL;
      if (p->lp_domain && at && tc_strieq(at + 1, p->lp_domain))
        p->lp[u] = tc_xstrndup(us->email, (size_t)(at - us->email));
    }
    p->tagged = json_array();
    tagged_principals(ct, &p->src, p->tagged);
    json_array_extend(p->all, p->tagged);
  }
  return sp;
}

void pol_ssh_pres_free(struct ssh_pres *sp)
{
  if (!sp)
    return;
  for (size_t i = 0; i < sp->n; i++) {
    struct ssh_pre *p = &sp->r[i];
    pol_ipset_free(&p->src);
    pol_ipset_free(&p->dst);
    json_decref(p->action);
    json_decref(p->umap);
    for (size_t u = 0; p->by_user && u < sp->nusers; u++) {
      json_decref(p->by_user[u]);
      free(p->lp[u]);
    }
    free(p->by_user);
    free(p->lp);
    json_decref(p->tagged);
    json_decref(p->all);
  }
  free(sp->r);
  free(sp->order);
  free(sp);
}

/* Appends the rule for these principals and, when the rule maps local
 * parts and uid's email is in the domain, the local-part rule after it. */
static void ssh_emit(const struct ssh_pre *p, json_t *target, json_t *principals, int uid)
{
  if (!json_array_size(principals))
    return;
  json_t *rule = json_pack("{s:O,s:O,s:O}", "principals", principals, "sshUsers", p->umap, "action", p->action);
  if (p->sr->accept_env)
    json_object_set(rule, "acceptEnv", p->sr->accept_env);
  json_array_append_new(target, rule);
  if (uid >= 0 && p->lp[uid]) {
    json_t *r2 = json_pack("{s:O,s:{s:s},s:O}", "principals", principals, "sshUsers", p->lp[uid], p->lp[uid],
                           "action", p->action);
    if (p->sr->accept_env)
      json_object_set(r2, "acceptEnv", p->sr->accept_env);
    json_array_append_new(target, r2);
  }
}

json_t *pol_ssh_node(const struct ssh_pres *sp, const struct ctopo *ct, const struct cnode *n)
{
  json_t *check_rules = json_array(), *accept_rules = json_array();
  for (size_t ri = 0; ri < sp->n; ri++) {
    const struct ssh_pre *p = &sp->r[ri];
    if (p->skip)
      continue;
    json_t *target = p->sr->check ? check_rules : accept_rules;
    if (p->self_dst && !n->tagged && n->user >= 0)
      ssh_emit(p, target, p->by_user[n->user], n->user);
    if (p->other && pol_node_in_set(n, &p->dst)) {
      if (p->lp_domain) {
        /* Per user, so each user's local-part rule follows their own. */
        for (size_t ui = 0; ui < sp->nusers; ui++)
          ssh_emit(p, target, p->by_user[sp->order[ui]], sp->order[ui]);
        ssh_emit(p, target, p->tagged, -1);
      } else {
        ssh_emit(p, target, p->all, -1);
      }
    } else if (p->other && p->lp_domain && pol_node_in_set(n, &p->src)) {
      /* A source outside the destinations still gets its own user's rules. */
      if (n->tagged) {
        json_t *pr = json_array();
        append_addrs(pr, &n->ips);
        ssh_emit(p, target, pr, -1);
        json_decref(pr);
      } else if (n->user >= 0) {
        ssh_emit(p, target, p->by_user[n->user], n->user);
      }
    }
  }
  /* Check rules first: the most restrictive action wins. */
  json_array_extend(check_rules, accept_rules);
  json_decref(accept_rules);
  (void)ct;
  return json_pack("{s:o}", "rules", check_rules);
}

static bool ssh_has_localpart(const struct ssh_pres *sp)
{
  for (size_t i = 0; i < sp->n; i++)
    if (sp->r[i].lp_domain)
      return true;
  return false;
}

/* ---- node attributes --------------------------------------------------------------- */
/* nodeAttrs targets resolved once per compile. */
static struct ipset *attr_targets(const struct tc_policy *pol, const struct ctopo *ct)
{
  struct ipset *t = tc_xcalloc(pol->nnattrs + 1, sizeof(*t));
  for (size_t i = 0; i < pol->nnattrs; i++) {
    pol_ipset_init(&t[i]);
    for (size_t k = 0; k < pol->nattrs[i].ntarget; k++)
      pol_resolve_alias(pol, ct, &pol->nattrs[i].target[k], &t[i]);
    pol_ipset_norm(&t[i]);
  }
  return t;
}

static void attr_targets_free(const struct tc_policy *pol, struct ipset *t)
{
  for (size_t i = 0; i < pol->nnattrs; i++)
    pol_ipset_free(&t[i]);
  free(t);
}

static json_t *capmap_for_node(const struct tc_policy *pol, const struct ipset *targets, const struct cnode *n)
{
  json_t *m = json_object();
  if (pol->randomize_client_port)
    json_object_set_new(m, "randomize-client-port", json_null());
  for (size_t i = 0; i < pol->nnattrs; i++) {
    const struct node_attr *na = &pol->nattrs[i];
    if (na->nattrs && pol_node_in_set(n, &targets[i]))
      for (size_t a = 0; a < na->nattrs; a++)
        if (!json_object_get(m, na->attrs[a]))
          json_object_set_new(m, na->attrs[a], json_null());
  }
  return m;
}

/* ---- auto approvers ---------------------------------------------------------------- */
static bool approver_matches(const struct tc_policy *pol, const struct ctopo *ct, const struct cnode *n,
                             const char *ap)
{
  if (tc_str_has_prefix(ap, "tag:"))
    return pol_node_has_tag(n, ap);
  if (n->tagged)
    return false;
  if (tc_str_has_prefix(ap, "group:")) {
    const struct name_list *g = group_of(pol, ap);
    for (size_t i = 0; g && i < g->n; i++)
      if (n->user >= 0 && pol_find_user(ct, g->items[i]) == n->user)
        return true;
    return false;
  }
  return n->user >= 0 && pol_find_user(ct, ap) == n->user;
}

static bool route_auto_approved(const struct tc_policy *pol, const struct ctopo *ct, const struct cnode *n,
                                struct ip_range r)
{
  if (pol_ip_range_is_exit(r)) {
    for (size_t a = 0; a < pol->nexit; a++)
      if (approver_matches(pol, ct, n, pol->exit_approvers[a]))
        return true;
    return false;
  }
  /* Exit routes are approved by autoApprovers.exitNode only; a routes entry
   * for 0.0.0.0/0 approves subnet routes, not exit nodes. */
  for (size_t k = 0; k < pol->nroutes; k++) {
    const struct auto_route *ar = &pol->routes[k];
    /* An approver of a prefix approves it and everything inside it. */
    if (ar->pfx.v6 != r.v6 || r.lo < ar->pfx.lo || r.hi > ar->pfx.hi)
      continue;
    for (size_t a = 0; a < ar->n; a++)
      if (approver_matches(pol, ct, n, ar->approvers[a]))
        return true;
  }
  return false;
}

static json_t *auto_approve_node(const struct tc_policy *pol, const struct ctopo *ct, const struct cnode *n)
{
  json_t *out = json_array();
  for (size_t i = 0; i < n->src->nannounced; i++) {
    struct ip_range r;
    if (!pol_ip_parse_prefix(n->src->announced[i], &r, NULL) && route_auto_approved(pol, ct, n, r))
      json_array_append_new(out, json_string(n->src->announced[i]));
  }
  return out;
}

json_t *tc_policy_auto_approve(const struct tc_policy *pol, const struct tc_policy_topo *topo,
                               const struct tc_policy_node *node)
{
  struct ctopo ct;
  if (pol_ctopo_build(pol, topo, &ct, NULL))
    return json_array();
  json_t *out = json_array();
  for (size_t i = 0; i < ct.nn; i++)
    if (ct.n[i].src == node || ct.n[i].id == node->id) {
      json_decref(out);
      out = auto_approve_node(pol, &ct, &ct.n[i]);
      break;
    }
  pol_ctopo_free(&ct);
  return out;
}

/* ---- driver --------------------------------------------------------------------------- */
struct compiled {
  struct cgrant *cg;
  size_t ncg;
  struct ipset internet;
  json_t **self_src; /* [grant * nusers + user], filled lazily */
  struct ipset *self_set; /* the same sources as address sets */
  size_t nusers;
  bool any_via;
  struct src_caches sc;
};

struct compiled *pol_compiled_build(const struct tc_policy *pol, const struct ctopo *ct, bool want_text)
{
  return pol_compiled_build_cached(pol, ct, want_text, NULL, NULL);
}

struct compiled *pol_compiled_build_cached(const struct tc_policy *pol, const struct ctopo *ct, bool want_text,
                                           const struct pol_src_cache *prev, struct pol_src_cache *cur)
{
  struct compiled *cp = tc_xcalloc(1, sizeof(*cp));
  pol_ipset_init(&cp->internet);
  pol_the_internet(&cp->internet);
  cp->sc = (struct src_caches){prev, cur};
  struct src_caches *sc = want_text && cur ? &cp->sc : NULL;
  cp->cg = tc_xcalloc(pol->ngrants + 1, sizeof(*cp->cg));
  for (size_t i = 0; i < pol->ngrants; i++)
    compile_grant(pol, ct, &pol->grants[i], &cp->cg[cp->ncg++], want_text, sc);
  /* Grants with the same sources share one SrcIPs array, so merging rules
   * per node compares pointers instead of long address lists. (Arrays that
   * came through the cache are shared already; the others are compared.) */
  for (size_t i = 0; want_text && i < cp->ncg; i++) {
    struct cgrant *cg = &cp->cg[i];
    for (size_t j = 0; cg->srcstr && j < i; j++) {
      if (cg->src_shared && cp->cg[j].src_shared)
        continue;
      json_t *other = cp->cg[j].srcstr;
      if (!other || other == cg->srcstr || json_array_size(other) != json_array_size(cg->srcstr) ||
          !json_equal(other, cg->srcstr))
        continue;
      for (size_t r = 0; r < cg->nrules; r++)
        if (cg->rules[r].src == cg->srcstr) {
          json_decref(cg->rules[r].src);
          cg->rules[r].src = json_incref(other);
        }
      json_decref(cg->srcstr);
      cg->srcstr = json_incref(other);
      break;
    }
  }
  cp->nusers = ct->t->nusers;
  for (size_t i = 0; i < cp->ncg; i++)
    cp->any_via |= cp->cg[i].via;
  cp->self_src = tc_xcalloc(cp->ncg * cp->nusers + 1, sizeof(json_t *));
  cp->self_set = tc_xcalloc(cp->ncg * cp->nusers + 1, sizeof(struct ipset));
  return cp;
}

void pol_compiled_free(struct compiled *cp)
{
  if (!cp)
    return;
  for (size_t i = 0; i < cp->ncg; i++)
    cgrant_free(&cp->cg[i]);
  free(cp->cg);
  for (size_t i = 0; i < cp->ncg * cp->nusers; i++)
  {
    json_decref(cp->self_src[i]);
    pol_ipset_free(&cp->self_set[i]);
  }
  free(cp->self_src);
  free(cp->self_set);
  pol_ipset_free(&cp->internet);
  free(cp);
}

/* Network rules that let traffic reach any of dst on one of the requested
 * ports with one of the protocols (the policy tests' semantics). Returns an
 * owned array of borrowed rule pointers; *n is its length. */
const struct rule **pol_compiled_rules_to(const struct compiled *cp, const struct ipset *dst,
                                      const struct port_range *ports, size_t nports, const int *protos,
                                      size_t nprotos, size_t *n)
{
  size_t cap = 8;
  const struct rule **out = tc_xmalloc(cap * sizeof(*out));
  *n = 0;
  for (size_t g = 0; g < cp->ncg; g++) {
    const struct cgrant *cg = &cp->cg[g];
    for (size_t r = 0; r < cg->nrules; r++) {
      const struct rule *ru = &cg->rules[r];
      if (ru->capgrant)
        continue;
      if (ru->proto >= 0) {
        bool pm = false;
        for (size_t k = 0; k < nprotos; k++)
          pm |= protos[k] == ru->proto;
        if (!pm)
          continue;
      }
      bool ok = false;
      for (size_t d = 0; d < ru->ndp && !ok; d++) {
        const struct dport *dp = &ru->dp[d];
        bool hit = dp->star;
        /* dst is sorted: look each (usually single) entry range up in it. */
        for (size_t k = 0; !hit && k < dp->set.n; k++)
          hit = pol_ipset_overlaps(dst, dp->set.r[k]);
        if (!hit)
          continue;
        if (!nports)
          ok = true;
        for (size_t k = 0; k < nports && !ok; k++)
          ok = ports[k].first >= dp->pr.first && ports[k].last <= dp->pr.last;
      }
      if (!ok)
        continue;
      if (*n == cap) {
        cap *= 2;
        out = tc_xrealloc(out, cap * sizeof(*out));
      }
      out[(*n)++] = ru;
    }
  }
  return out;
}

/* Whether one of rules accepts traffic from src. */
bool pol_rules_accept_from(const struct rule *const *rules, size_t n, struct ip_range src)
{
  for (size_t i = 0; i < n; i++)
    if (rules[i]->src_all || pol_ipset_overlaps(&rules[i]->srcset, src))
      return true;
  return false;
}

static bool rr_src_has(const struct reach_rule *rr, const struct cnode *a)
{
  if (rr->src_all || pol_node_in_set(a, rr->src))
    return true;
  for (size_t i = 0; i < a->nsubnets; i++)
    if (pol_ipset_overlaps(rr->src, a->subnets[i]))
      return true;
  return false;
}

/* Whether a may send into route (served by the owner of rc). */
static bool reach_route(const struct reach *rc, const struct cnode *a, struct ip_range route)
{
  if (rc->all)
    return true;
  for (size_t i = 0; i < rc->n; i++)
    if (rr_src_has(&rc->r[i], a) && (rc->r[i].dst_all || pol_ipset_overlaps(&rc->r[i].dst, route)))
      return true;
  return false;
}

static bool serves_same(const struct cnode *v, struct ip_range r)
{
  for (size_t i = 0; i < v->nsubnets; i++)
    if (v->subnets[i].v6 == r.v6 && v->subnets[i].lo == r.lo && v->subnets[i].hi == r.hi)
      return true;
  return false;
}

/* Whether traffic from inside route may reach the owner of rc. */
static bool route_reaches(const struct reach *rc, struct ip_range route)
{
  if (rc->all)
    return true;
  for (size_t i = 0; i < rc->n; i++)
    if (rc->r[i].src_all || pol_ipset_overlaps(rc->r[i].src, route))
      return true;
  return false;
}

/* Sources of autogroup:self grant i as user's devices see them (computed
 * once per compile and user; borrowed). */
static json_t *self_src_get(const struct ctopo *ct, struct compiled *cp, size_t i, int user, struct sig_memo *memo)
{
  size_t slot = i * cp->nusers + (size_t)user;
  const struct cgrant *cg = &cp->cg[i];
  if (!cp->self_src[slot]) {
    cp->self_src[slot] = self_sources(ct, cg, user, &cp->self_set[slot], cp->sc.cur ? &cp->sc : NULL);
    /* The same sources from another autogroup:self grant share one
     * array, so merging rules finds them equal by pointer. */
    const struct ipset *mine = &cp->self_set[slot];
    for (size_t j = 0; j < i; j++) {
      size_t other = j * cp->nusers + (size_t)user;
      const struct ipset *os = &cp->self_set[other];
      bool same = cp->self_src[other] && cp->self_src[other] != cp->self_src[slot] && os->n == mine->n;
      for (size_t q = 0; same && q < mine->n; q++)
        same = os->r[q].v6 == mine->r[q].v6 && os->r[q].lo == mine->r[q].lo && os->r[q].hi == mine->r[q].hi;
      if (same) {
        json_decref(cp->self_src[slot]);
        cp->self_src[slot] = json_incref(cp->self_src[other]);
        break;
      }
    }
    /* Likewise a grant's own sources with the same addresses (one user
     * owning every device in a group): merges then compare pointers
     * rather than walking thousands of equal strings per node. */
    for (size_t j = 0; j < cp->ncg; j++) {
      json_t *o = cp->cg[j].srcstr;
      if (o && o != cp->self_src[slot] && same_sources(memo, o, cp->self_src[slot])) {
        json_decref(cp->self_src[slot]);
        cp->self_src[slot] = json_incref(o);
        break;
      }
    }
  }
  return cp->self_src[slot];
}

/* Nodes with the same identity (user or tags, addresses present, routes)
 * match the same identity-derived destinations, each with its own address.
 * The first node of a group records which rules applied to it (applies);
 * the others skip every rule that did not apply to it unless the rule has
 * address-derived destinations, which are checked for every node. */
/* Builds node n's packet filter and records its reachability in rc. With
 * emit false only rc and the signature are computed (returns NULL). */
static json_t *node_filter(const struct tc_policy *pol, const struct ctopo *ct, struct compiled *cp,
                           const struct cnode *n, uint8_t *applies, bool record, struct reach *rc, bool emit,
                           struct fsig *sig)
{
  memset(rc, 0, sizeof(*rc));
  if (!pol->has_acls_or_grants) {
    rc->all = true;
    fsig_u64(sig, 0xa11);
    if (!emit)
      return NULL;
    return json_pack("[{s:[s],s:[{s:s,s:{s:i,s:i}}]}]", "SrcIPs", "*", "DstPorts", "IP", "*", "Ports", "First", 0,
                     "Last", 65535);
  }
  json_t *out = emit ? json_array() : NULL;
  size_t gi = 0;
  struct ipset dst;
  pol_ipset_init(&dst);
  struct self_dp sdp;
  bool sdp_ready = false;
  for (size_t i = 0; i < cp->ncg; i++) {
    const struct cgrant *cg = &cp->cg[i];
    for (size_t r = 0; r < cg->nrules; r++, gi++) {
      const struct rule *ru = &cg->rules[r];
      if (!record && !applies[gi] && !ru->addr_dp && !ru->capgrant)
        continue;
      bool dst_all = false;
      dst.n = 0;
      bool applied;
      json_t *o = reduce_rule(n, ru, &cp->internet, &dst, &dst_all, emit, &applied, sig);
      if (record)
        applies[gi] = applied;
      if (!applied)
        continue;
      if (o)
        merge_into(out, o, sig->memo);
      struct reach_rule *rr = reach_push(rc, &ru->srcset, ru->src_all, (int)gi);
      pol_ipset_add_set(&rr->dst, &dst);
      pol_ipset_norm(&rr->dst);
      rr->dst_all = dst_all;
    }
    if (cg->has_self && !n->tagged && n->user >= 0) {
      size_t slot = i * cp->nusers + (size_t)n->user;
      self_src_get(ct, cp, i, n->user, sig->memo);
      if (json_array_size(cp->self_src[slot])) {
        if (!sdp_ready) {
          self_dp_init(&sdp, n);
          sdp_ready = true;
        }
        if (emit)
          self_rules(ct, cg, cp->self_src[slot], n, &sdp, out, sig->memo);
        /* what self_rules emits: per protocol entry, these sources, the
         * node's addresses and the grant's ports (app grants: not covered) */
        fsig_u64(sig, 0x5e1f);
        fsig_u64(sig, sig_of_array(sig->memo, cp->self_src[slot]));
        fsig_str(sig, sdp.a4);
        fsig_str(sig, sdp.a6);
        for (size_t p = 0; p < cg->g->nip; p++) {
          fsig_u64(sig, (uint64_t)(int64_t)cg->g->ip[p].proto);
          for (size_t k = 0; k < cg->g->ip[p].nports; k++)
            fsig_u64(sig, (uint64_t)cg->g->ip[p].ports[k].first << 16 | cg->g->ip[p].ports[k].last);
        }
        if (cg->g->app)
          sig->unusable = true;
        struct reach_rule *rr = reach_push(rc, &cp->self_set[slot], false, -(int)i - 1);
        pol_ipset_add_set(&rr->dst, &n->ips);
        pol_ipset_norm(&rr->dst);
      }
    }
    if (cg->via) {
      sig->unusable = true;
      json_t *scratch = out ? NULL : json_array();
      via_rules(cg, n, &cp->internet, out ? out : scratch, rc);
      json_decref(scratch);
    }
  }
  pol_ipset_free(&dst);
  if (sdp_ready)
    self_dp_free(&sdp);
  return out;
}

/* Primary route election: among nodes serving the same approved subnet route,
 * the one with the lowest id is primary. */
static bool is_primary(const struct ctopo *ct, const struct cnode *n, struct ip_range r)
{
  for (size_t i = 0; i < ct->nn; i++) {
    const struct cnode *o = &ct->n[i];
    if (o == n || o->id >= n->id)
      continue;
    for (size_t j = 0; j < o->nsubnets; j++)
      if (o->subnets[j].v6 == r.v6 && o->subnets[j].lo == r.lo && o->subnets[j].hi == r.hi)
        return false;
  }
  return true;
}

/* AllowedIPs of n as seen by viewer (NULL: n itself): its addresses, the
 * primary subnet routes the viewer may use, and approved exit routes. */
static bool has_any_tag(const struct cnode *n, char *const *tags, size_t ntags)
{
  for (size_t t = 0; t < ntags; t++)
    if (pol_node_has_tag(n, tags[t]))
      return true;
  return false;
}

/* Via grants pick, per viewer, which routers may serve a route: among the
 * routers carrying a via tag of a grant that covers this viewer and route,
 * the lowest id is the viewer's primary. Returns 1 when that is peer, 0 when
 * it is another router, -1 when no via grant applies. */
/* Whether a grant without via lets viewer send into route. */
static bool plain_reaches(const struct compiled *cp, const struct cnode *viewer, struct ip_range route)
{
  for (size_t g = 0; g < cp->ncg; g++) {
    const struct cgrant *cg = &cp->cg[g];
    if (cg->via)
      continue;
    for (size_t r = 0; r < cg->nrules; r++) {
      const struct rule *ru = &cg->rules[r];
      if (ru->capgrant || !(ru->src_all || pol_node_in_set(viewer, &ru->srcset)))
        continue;
      for (size_t d = 0; d < ru->ndp; d++)
        if (!ru->dp[d].star && pol_ipset_overlaps(&ru->dp[d].set, route))
          return true;
    }
  }
  return false;
}

static int via_choice(const struct compiled *cp, const struct ctopo *ct, const struct cnode *viewer,
                      const struct cnode *peer, struct ip_range route)
{
  if (!cp || !cp->any_via)
    return -1;
  /* A plain grant to the route keeps the tailnet-wide primary router. */
  if (plain_reaches(cp, viewer, route))
    return -1;
  for (size_t g = 0; cp && g < cp->ncg; g++) {
    const struct cgrant *cg = &cp->cg[g];
    if (!cg->via || !pol_node_in_set(viewer, &cg->src))
      continue;
    bool covers = false;
    for (size_t i = 0; i < cg->nvia_pfx && !covers; i++)
      covers = pol_ip_range_overlaps(cg->via_pfx[i], route);
    if (!covers)
      continue;
    const struct cnode *best = NULL;
    for (size_t i = 0; i < ct->nn; i++) {
      const struct cnode *o = &ct->n[i];
      if (!has_any_tag(o, cg->g->via, cg->g->nvia))
        continue;
      bool serves = false;
      for (size_t k = 0; k < o->nsubnets && !serves; k++)
        serves = o->subnets[k].v6 == route.v6 && o->subnets[k].lo == route.lo && o->subnets[k].hi == route.hi;
      if (serves && (!best || o->id < best->id))
        best = o;
    }
    if (best)
      return best == peer ? 1 : 0;
  }
  return -1;
}

static json_t *allowed_ips(const struct ctopo *ct, const struct compiled *via_cp, const struct cnode *n,
                           const struct cnode *viewer, const struct reach *nreach, const struct reach *vreach,
                           json_t **primary)
{
  json_t *a = json_array();
  char t[160];
  *primary = json_array();
  /* nodeAttrs disable-ipv4: no IPv4 peering to or from such a node. */
  if (n->has4 && !(viewer && (n->no_v4 || viewer->no_v4))) {
    pol_ip_format_addr(0, n->a4, t, sizeof(t));
    strcat(t, "/32"); /* (not json_sprintf: vsnprintf per node and viewer) */
    json_array_append_new(a, json_string_nocheck(t));
  }
  if (n->has6) {
    pol_ip_format_addr(1, n->a6, t, sizeof(t));
    strcat(t, "/128");
    json_array_append_new(a, json_string_nocheck(t));
  }
  for (size_t i = 0; i < n->nsubnets; i++) {
    int via = viewer ? via_choice(via_cp, ct, viewer, n, n->subnets[i]) : -1;
    if (via == 0 || (via < 0 && !is_primary(ct, n, n->subnets[i])))
      continue;
    pol_ip_range_prefix(n->subnets[i], t, sizeof(t));
    /* A peer's route is installed when traffic may flow between the viewer
     * and the route in either direction, or when the viewer serves the same
     * route itself (HA standby routers); a via grant decides on its own. */
    if (via != 1 && viewer && !reach_route(nreach, viewer, n->subnets[i]) &&
        !route_reaches(vreach, n->subnets[i]) && !serves_same(viewer, n->subnets[i]))
      continue;
    /* Primary routes as this viewer knows them: the ones it installs. */
    json_array_append_new(*primary, json_string(t));
    json_array_append_new(a, json_string(t));
  }
  if (n->exit4)
    json_array_append_new(a, json_string("0.0.0.0/0"));
  if (n->exit6)
    json_array_append_new(a, json_string("::/0"));
  return a;
}

struct addr_ix {
  uint8_t v6;
  tc_u128 a;
  size_t ix;
};

static int addr_ix_cmp(const void *x, const void *y)
{
  const struct addr_ix *a = x, *b = y;
  if (a->v6 != b->v6)
    return a->v6 < b->v6 ? -1 : 1;
  if (a->a != b->a)
    return a->a < b->a ? -1 : 1;
  return 0;
}

/* The nodes a source set lets send, as a bitset over node indices: their
 * addresses fall in the set, or (subnet routers speak for their routes) one
 * of their approved subnet routes overlaps it. Rules share source sets
 * (one per rule or per autogroup:self user), so each set is walked once
 * per compile instead of once per destination node. */
struct src_memo {
  const struct ipset **key;
  uint64_t **bits;
  size_t cap; /* power of two */
};

static void src_memo_init(struct src_memo *m, const struct reach *reach, size_t nn)
{
  size_t total = 0;
  for (size_t i = 0; i < nn; i++)
    total += reach[i].n;
  m->cap = 16;
  while (m->cap < 2 * total)
    m->cap *= 2;
  m->key = tc_xcalloc(m->cap, sizeof(*m->key));
  m->bits = tc_xcalloc(m->cap, sizeof(*m->bits));
}

static void src_memo_free(struct src_memo *m)
{
  for (size_t i = 0; i < m->cap; i++)
    free(m->bits[i]);
  free(m->key);
  free(m->bits);
}

static const uint64_t *src_bits(struct src_memo *m, const struct ipset *src, const struct ctopo *ct,
                                const struct addr_ix *ax, size_t nax, const size_t *routers, size_t nrouters,
                                size_t words)
{
  size_t h = ((uintptr_t)src >> 4) * 0x9E3779B97F4A7C15ull & (m->cap - 1);
  while (m->key[h] && m->key[h] != src)
    h = (h + 1) & (m->cap - 1);
  if (m->key[h])
    return m->bits[h];
  uint64_t *w = tc_xcalloc(words + 1, sizeof(uint64_t));
  m->key[h] = src;
  m->bits[h] = w;
  for (size_t k = 0; k < src->n; k++) {
    size_t lo = 0, hi = nax;
    while (lo < hi) { /* first address >= range start */
      size_t mid = lo + (hi - lo) / 2;
      if (ax[mid].v6 < src->r[k].v6 || (ax[mid].v6 == src->r[k].v6 && ax[mid].a < src->r[k].lo))
        lo = mid + 1;
      else
        hi = mid;
    }
    for (size_t q = lo; q < nax && ax[q].v6 == src->r[k].v6 && ax[q].a <= src->r[k].hi; q++)
      w[ax[q].ix / 64] |= 1ull << (ax[q].ix % 64);
  }
  for (size_t ri = 0; ri < nrouters; ri++) {
    size_t i = routers[ri];
    for (size_t s = 0; s < ct->n[i].nsubnets; s++)
      if (pol_ipset_overlaps(src, ct->n[i].subnets[s]))
        w[i / 64] |= 1ull << (i % 64);
  }
  return w;
}

static __thread char **sort_keys_tl;

static int key_cmp(const void *x, const void *y)
{
  int c = strcmp(sort_keys_tl[*(const size_t *)x], sort_keys_tl[*(const size_t *)y]);
  if (c)
    return c;
  return *(const size_t *)x < *(const size_t *)y ? -1 : 1;
}

/* Identity key: nodes with equal keys get the same rule selection shape. */
static char *identity_key(const struct cnode *n)
{
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_printf(&b, "u%d|", n->tagged ? -1 : n->user);
  for (size_t i = 0; i < n->src->ntags; i++)
    tc_buf_printf(&b, "%s,", n->src->tags[i]);
  tc_buf_putc(&b, '|');
  char t[160];
  for (size_t i = 0; i < n->nsubnets; i++) {
    pol_ip_range_prefix(n->subnets[i], t, sizeof(t));
    tc_buf_printf(&b, "%s,", t);
  }
  tc_buf_printf(&b, "|%d%d|%d%d", n->exit4, n->exit6, n->has4, n->has6);
  return tc_buf_steal(&b, NULL);
}

struct filter_slot {
  uint64_t h; /* filter_sig; 0 = empty */
  json_t *f;  /* borrowed from the result being built */
};

static int prev_cmp(const void *x, const void *y)
{
  int64_t a = ((const int64_t *)x)[0], b = ((const int64_t *)y)[0];
  return a < b ? -1 : a > b;
}

/* ---- peer lists ---------------------------------------------------------------------- */

static void peers_unref(struct tc_policy_peers *l)
{
  if (!l || --l->refs)
    return;
  for (size_t k = 0; k < l->n; k++) {
    json_decref(l->allowed_ips[k]);
    json_decref(l->primary_routes[k]);
  }
  free(l->ids);
  free(l->allowed_ips);
  free(l->primary_routes);
  free(l->holes);
  free(l->hole_nodes);
  free(l);
}

long tc_policy_peer_find(const struct tc_policy_node_result *nr, int64_t id)
{
  const struct tc_policy_peers *l = nr ? nr->peers : NULL;
  if (!l)
    return -1;
  size_t pos = l->n;
  if (l->sorted) {
    size_t lo = 0, hi = l->n;
    while (lo < hi) {
      size_t mid = (lo + hi) / 2;
      if (l->ids[mid] < id)
        lo = mid + 1;
      else
        hi = mid;
    }
    if (lo < l->n && l->ids[lo] == id)
      pos = lo;
  } else {
    for (size_t k = 0; k < l->n && pos == l->n; k++)
      if (l->ids[k] == id)
        pos = k;
  }
  if (pos == l->n || pos == nr->peers_self)
    return -1;
  return (long)(pos > nr->peers_self ? pos - 1 : pos);
}

static uint64_t row_hash(const uint64_t *row, size_t words)
{
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t q = 0; q < words; q++)
    h = (h ^ row[q]) * 0x100000001b3ull ^ (h >> 29);
  return h;
}

struct peers_slot {
  uint64_t h;
  const uint64_t *row; /* the row the list was built from (NULL: empty slot) */
  struct tc_policy_peers *l;
};

static struct tc_policy_peers *peers_lookup(const struct peers_slot *tab, size_t mask, uint64_t h,
                                            const uint64_t *row, size_t words)
{
  for (size_t s = h & mask; tab[s].row; s = (s + 1) & mask)
    if (tab[s].h == h && !memcmp(tab[s].row, row, words * sizeof(uint64_t)))
      return tab[s].l;
  return NULL;
}

/* The list of the nodes marked in row, in topology order. viewer >= 0 makes
 * it that viewer's own list (every AllowedIPs computed for it, no holes);
 * otherwise peers whose AllowedIPs depend on the viewer become holes. */
static struct tc_policy_peers *peers_build(const struct ctopo *ct, const struct compiled *cp,
                                           const struct reach *reach, const uint64_t *row, size_t words,
                                           json_t *const *shared, json_t *no_routes, long viewer)
{
  struct tc_policy_peers *l = tc_xcalloc(1, sizeof(*l));
  l->refs = 0;
  size_t n = 0;
  for (size_t q = 0; q < words; q++)
    n += (size_t)__builtin_popcountll(row[q]);
  l->ids = tc_xcalloc(n + 1, sizeof(int64_t));
  l->allowed_ips = tc_xcalloc(n + 1, sizeof(json_t *));
  l->primary_routes = tc_xcalloc(n + 1, sizeof(json_t *));
  l->sorted = true;
  for (size_t q = 0; q < words; q++) {
    for (uint64_t w = row[q]; w; w &= w - 1) {
      size_t j = q * 64 + (size_t)__builtin_ctzll(w);
      size_t k = l->n++;
      l->ids[k] = ct->n[j].id;
      if (k && l->ids[k - 1] >= l->ids[k])
        l->sorted = false;
      if (viewer >= 0) {
        l->allowed_ips[k] = allowed_ips(ct, cp, &ct->n[j], &ct->n[viewer], &reach[j], &reach[viewer],
                                        &l->primary_routes[k]);
      } else if (shared[j]) {
        l->allowed_ips[k] = json_incref(shared[j]);
        l->primary_routes[k] = json_incref(no_routes);
      } else {
        l->holes = tc_xrealloc(l->holes, (l->nholes + 1) * sizeof(size_t));
        l->hole_nodes = tc_xrealloc(l->hole_nodes, (l->nholes + 1) * sizeof(size_t));
        l->holes[l->nholes] = k;
        l->hole_nodes[l->nholes++] = j;
      }
    }
  }
  return l;
}

/* Gives every node its peers: i sees j when either may send to the other
 * (who[j] marks the nodes that may send to j). Nodes whose sets are equal
 * once each counts itself in (everyone under allow-all, the members of an
 * identity group that see each other) share one stored list; a node whose
 * set equals a stored list exactly shares it without a self entry. Only
 * AllowedIPs that depend on the viewer (subnet routers' routes, viewers
 * without IPv4) are computed per viewer. */
static void build_peer_lists(const struct ctopo *ct, const struct compiled *cp, const struct reach *reach,
                             const uint64_t *who, size_t words, json_t *const *shared, json_t *no_routes,
                             struct tc_policy_result *res)
{
  size_t nn = ct->nn;
  uint64_t *vis = tc_xcalloc(nn * words + 1, sizeof(uint64_t));
  for (size_t j = 0; j < nn; j++) {
    const uint64_t *wj = &who[j * words];
    uint64_t *vj = &vis[j * words];
    for (size_t q = 0; q < words; q++) {
      vj[q] |= wj[q];
      for (uint64_t w = wj[q]; w; w &= w - 1) {
        size_t i = q * 64 + (size_t)__builtin_ctzll(w);
        vis[i * words + j / 64] |= 1ull << (j % 64);
      }
    }
  }
  size_t cap = 16;
  while (cap < 4 * nn)
    cap *= 2;
  struct peers_slot *tab = tc_xcalloc(cap, sizeof(*tab));
  size_t mask = cap - 1;
  uint64_t *tmp = tc_xcalloc(words + 1, sizeof(uint64_t));
  struct tc_policy_peers **all = tc_xcalloc(nn + 1, sizeof(*all));
  size_t nall = 0;
  for (size_t i = 0; i < nn; i++) {
    struct tc_policy_node_result *nr = &res->nodes[i];
    uint64_t *row = &vis[i * words];
    uint64_t self = 1ull << (i % 64);
    row[i / 64] &= ~self;
    nr->peers_self = SIZE_MAX;
    bool any = false;
    for (size_t q = 0; q < words && !any; q++)
      any = row[q] != 0;
    if (!any)
      continue;
    struct tc_policy_peers *l = NULL;
    if (ct->n[i].no_v4) {
      l = peers_build(ct, cp, reach, row, words, shared, no_routes, (long)i);
      all[nall++] = l;
    } else {
      /* with itself counted in first: that is how lists are stored */
      row[i / 64] |= self;
      uint64_t h = row_hash(row, words);
      l = peers_lookup(tab, mask, h, row, words);
      bool with_self = l != NULL;
      if (!l) {
        memcpy(tmp, row, words * sizeof(uint64_t));
        tmp[i / 64] &= ~self;
        l = peers_lookup(tab, mask, row_hash(tmp, words), tmp, words);
      }
      if (!l) {
        l = peers_build(ct, cp, reach, row, words, shared, no_routes, -1);
        all[nall++] = l;
        size_t s = h & mask;
        while (tab[s].row)
          s = (s + 1) & mask;
        tab[s] = (struct peers_slot){h, row, l};
        with_self = true;
      }
      if (with_self) {
        /* positions follow topology order: count the nodes marked before i */
        size_t before = (size_t)__builtin_popcountll(row[i / 64] & (self - 1));
        for (size_t q = 0; q < i / 64; q++)
          before += (size_t)__builtin_popcountll(row[q]);
        nr->peers_self = before;
      }
    }
    l->refs++;
    nr->peers = l;
    nr->npeers = l->n - (nr->peers_self != SIZE_MAX);
    if (l->nholes) {
      nr->hole_allowed_ips = tc_xcalloc(l->nholes, sizeof(json_t *));
      nr->hole_primary_routes = tc_xcalloc(l->nholes, sizeof(json_t *));
      for (size_t k = 0; k < l->nholes; k++) {
        if (l->holes[k] == nr->peers_self)
          continue;
        size_t j = l->hole_nodes[k];
        nr->hole_allowed_ips[k] =
            allowed_ips(ct, cp, &ct->n[j], &ct->n[i], &reach[j], &reach[i], &nr->hole_primary_routes[k]);
      }
    }
  }
  for (size_t k = 0; k < nall; k++)
    res->npeer_entries += all[k]->n;
  res->npeer_lists = nall;
  free(all);
  free(tmp);
  free(tab);
  free(vis);
}

/* ---- skipping unchanged nodes (incremental compile) ------------------------------
 * A node's filter and reachability are a function of its own inputs and of
 * the rules that apply to it. For a node without routes whose inputs did
 * not change, the rules that apply to it did not change either (rule
 * destinations name nodes by identity or are fixed prefixes), so when every
 * rule it received keeps the very same SrcIPs array (arrays are taken over
 * by content, so the same object means the same text) and its user's
 * autogroup:self sources are the same arrays, its previous filter is its
 * filter, and its reachability is rebuilt from the previous records
 * without evaluating any rule. */
struct pol_reach_rec {
  int key;
  bool src_all, dst_all;
  size_t off, n; /* its destination ranges: block->r[off .. off + n) */
};

/* One node's records in one allocation, shared by the results in which the
 * node was skipped. */
struct pol_reach_block {
  _Atomic size_t refs;
  size_t n;
  struct pol_reach_rec *rec;
  struct ip_range *r;
};

static struct pol_reach_block *reach_block_of(const struct reach *rc)
{
  size_t nr = 0;
  for (size_t k = 0; k < rc->n; k++)
    nr += rc->r[k].dst.n;
  struct pol_reach_block *b =
      tc_xmalloc(sizeof(*b) + (rc->n + 1) * sizeof(struct pol_reach_rec) + (nr + 1) * sizeof(struct ip_range));
  atomic_init(&b->refs, 1);
  b->n = rc->n;
  b->rec = (struct pol_reach_rec *)(void *)(b + 1);
  b->r = (struct ip_range *)(void *)(b->rec + rc->n + 1);
  size_t at = 0;
  for (size_t k = 0; k < rc->n; k++) {
    const struct reach_rule *rr = &rc->r[k];
    b->rec[k] = (struct pol_reach_rec){rr->key, rr->src_all, rr->dst_all, at, rr->dst.n};
    if (rr->dst.n)
      memcpy(b->r + at, rr->dst.r, rr->dst.n * sizeof(*b->r));
    at += rr->dst.n;
  }
  return b;
}

static void reach_block_unref(struct pol_reach_block *b)
{
  if (b && atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) == 1)
    free(b);
}

static uint64_t input_hash(const struct ctopo *ct, const struct cnode *n)
{
  struct fsig h = {0x1d9u, false, NULL};
  fsig_u64(&h, (uint64_t)n->has4 << 1 | n->has6);
  fsig_u64(&h, (uint64_t)n->a4);
  fsig_u64(&h, (uint64_t)(n->a6 >> 64));
  fsig_u64(&h, (uint64_t)n->a6);
  fsig_u64(&h, (uint64_t)n->tagged << 2 | (uint64_t)n->exit4 << 1 | n->exit6);
  for (size_t i = 0; i < n->src->ntags; i++)
    fsig_str(&h, n->src->tags[i]);
  fsig_u64(&h, n->src->ntags);
  /* the user by id, name and email: aliases name users */
  if (n->user >= 0) {
    const struct tc_policy_user *u = &ct->t->users[n->user];
    fsig_u64(&h, (uint64_t)u->id);
    fsig_str(&h, u->name);
    fsig_str(&h, u->email ? u->email : "\x01");
  } else {
    fsig_u64(&h, 0x0badu);
  }
  for (size_t i = 0; i < n->nsubnets; i++) {
    fsig_u64(&h, (uint64_t)n->subnets[i].lo);
    fsig_u64(&h, (uint64_t)n->subnets[i].hi);
  }
  fsig_u64(&h, n->nsubnets);
  return h.h | 1;
}



/* Texts of every node's filter and SSH policy: taken from the previous
 * result with its object, shared between nodes with the same object, and
 * otherwise rendered once with the repeated inner arrays formatted once. */
struct text_slot {
  const json_t *j;
  const char *t; /* borrowed from the node result that owns a reference */
};

static const char *text_for(struct text_slot *tab, size_t mask, struct pol_text_memo *memo, json_t *j,
                            const char *old_text, const json_t *old_j)
{
  if (!j)
    return NULL;
  size_t h = ((uintptr_t)j >> 4) * 0x9E3779B97F4A7C15ull & mask;
  while (tab[h].j && tab[h].j != j)
    h = (h + 1) & mask;
  if (tab[h].j)
    return pol_text_ref(tab[h].t);
  tab[h].j = j;
  tab[h].t = old_j == j && old_text ? pol_text_ref(old_text) : pol_text_render(memo, j);
  return tab[h].t;
}

static void render_texts(struct tc_policy_result *res, const struct tc_policy_node_result *const *olds)
{
  size_t cap = 16;
  while (cap < 4 * res->nnodes)
    cap *= 2;
  struct text_slot *tab = tc_xcalloc(cap, sizeof(*tab));
  struct pol_text_memo *memo = pol_text_memo_new();
  for (size_t i = 0; i < res->nnodes; i++) {
    struct tc_policy_node_result *nr = &res->nodes[i];
    const struct tc_policy_node_result *o = olds[i];
    nr->filter_text = text_for(tab, cap - 1, memo, nr->packet_filter, o ? o->filter_text : NULL,
                               o ? o->packet_filter : NULL);
    nr->filter_len = pol_text_len(nr->filter_text);
    nr->ssh_text = text_for(tab, cap - 1, memo, nr->ssh_policy, o ? o->ssh_text : NULL, o ? o->ssh_policy : NULL);
    nr->ssh_len = pol_text_len(nr->ssh_text);
  }
  pol_text_memo_free(memo);
  free(tab);
}

/* Arrays that grow with the tailnet (N records, N x N/64 bitsets) and live
 * one compile or one result: at a thousand nodes they are 100-200 KiB, and
 * the mapper recompiles on every join. From malloc, glibc's rising mmap
 * threshold soon serves them from the heap, and each one freed leaves a
 * hole that long-lived small allocations fill, so resident memory creeps
 * up with every recompile. Large ones are mapped and unmapped instead. */
#define BIG_MIN (64u * 1024)
struct big_hdr {
  size_t len; /* mapped bytes incl. the header; 0 = from calloc */
  size_t pad;
};

static void *big_calloc(size_t n, size_t size)
{
  if (size && n > (SIZE_MAX - sizeof(struct big_hdr)) / size)
    abort();
  size_t len = n * size + sizeof(struct big_hdr);
  struct big_hdr *h;
  if (len < BIG_MIN) {
    h = tc_xcalloc(1, len);
  } else {
    h = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (h == MAP_FAILED) {
      h = tc_xcalloc(1, len);
      len = 0;
    }
    h->len = len;
  }
  return h + 1;
}

static void big_free(void *p)
{
  if (!p)
    return;
  struct big_hdr *h = (struct big_hdr *)p - 1;
  if (h->len)
    munmap(h, h->len);
  else
    free(h);
}

/* A node's result value that equals prev's becomes prev's (shared,
 * read-only, like the filters), and empty arrays and objects are one per
 * result: a steady tailnet then allocates no per-node containers on a
 * recompile, and most nodes cost none at all (no routes, no attributes). */
static void share_json(json_t **v, json_t *old, json_t *empties[2])
{
  if (!*v)
    return;
  if (old && old != *v && json_equal(*v, old)) {
    json_decref(*v);
    *v = json_incref(old);
    return;
  }
  bool obj = json_is_object(*v);
  if (obj ? json_object_size(*v) != 0 : !json_is_array(*v) || json_array_size(*v) != 0)
    return;
  if (!empties[obj]) {
    empties[obj] = json_incref(*v);
  } else if (empties[obj] != *v) {
    json_decref(*v);
    *v = json_incref(empties[obj]);
  }
}

static int compile_impl(const struct tc_policy *pol, const struct tc_policy_topo *topo,
                        const struct tc_policy_result *prev, struct tc_policy_result **out, struct tc_policy_err *err)
{
  *out = NULL;
  struct ctopo ct;
  int rc = pol_ctopo_build(pol, topo, &ct, err);
  if (rc)
    return rc;
  /* SrcIPs arrays are taken over from prev by content (any policy). */
  struct pol_src_cache *srcc = tc_xcalloc(1, sizeof(*srcc));
  struct compiled *cp = pol_compiled_build_cached(pol, &ct, true, prev ? prev->src_cache : NULL, srcc);
  /* Destination entries look the same in every node's filter: build each
   * once and share it (read-only) instead of once per node. */
  for (size_t g = 0; g < cp->ncg; g++)
    for (size_t r = 0; r < cp->cg[g].nrules; r++)
      for (size_t k = 0; k < cp->cg[g].rules[r].ndp; k++) {
        struct dport *d = &cp->cg[g].rules[r].dp[k];
        d->js = dport_json_cached(prev ? prev->src_cache : NULL, srcc, d->ip, d->pr);
      }
  struct ssh_pres *sshp = pol->has_ssh ? pol_ssh_prepare(pol, &ct) : NULL;
  struct ipset *targets = attr_targets(pol, &ct);
  bool ssh_shareable = sshp && !ssh_has_localpart(sshp);
  char **ssh_keys = tc_xcalloc(ct.nn + 1, sizeof(char *));
  for (size_t i = 0; ssh_shareable && i < ct.nn; i++) {
    struct tc_buf kb = TC_BUF_INIT;
    if (ct.n[i].tagged)
      for (size_t t = 0; t < ct.n[i].src->ntags; t++)
        tc_buf_printf(&kb, "%s,", ct.n[i].src->tags[t]);
    else
      tc_buf_printf(&kb, "user:%d", ct.n[i].user);
    ssh_keys[i] = tc_buf_steal(&kb, NULL);
  }
  /* ssh_first[i]: the first node with i's SSH key (sorted by key, then index). */
  size_t *ssh_first = tc_xcalloc(ct.nn + 1, sizeof(size_t));
  if (ssh_shareable) {
    size_t *ord = tc_xcalloc(ct.nn + 1, sizeof(size_t));
    for (size_t i = 0; i < ct.nn; i++)
      ord[i] = i;
    sort_keys_tl = ssh_keys;
    qsort(ord, ct.nn, sizeof(size_t), key_cmp);
    sort_keys_tl = NULL;
    for (size_t k = 0; k < ct.nn; k++)
      ssh_first[ord[k]] = k > 0 && !strcmp(ssh_keys[ord[k]], ssh_keys[ord[k - 1]]) ? ssh_first[ord[k - 1]] : ord[k];
    free(ord);
  }
  struct tc_policy_result *res = tc_xcalloc(1, sizeof(*res));
  res->nnodes = ct.nn;
  res->nodes = big_calloc(ct.nn + 1, sizeof(*res->nodes));
  struct reach *reach = big_calloc(ct.nn + 1, sizeof(*reach));
  char **keys = tc_xcalloc(ct.nn + 1, sizeof(char *));
  size_t *order = tc_xcalloc(ct.nn + 1, sizeof(size_t)), *group = tc_xcalloc(ct.nn + 1, sizeof(size_t));
  for (size_t i = 0; i < ct.nn; i++) {
    keys[i] = identity_key(&ct.n[i]);
    order[i] = i;
  }
  sort_keys_tl = keys;
  qsort(order, ct.nn, sizeof(size_t), key_cmp);
  sort_keys_tl = NULL;
  for (size_t k = 0; k < ct.nn; k++) {
    if (k == 0 || strcmp(keys[order[k]], keys[order[k - 1]]))
      res->ngroups++;
    group[order[k]] = res->ngroups - 1;
  }
  size_t nrules_all = 0;
  for (size_t g = 0; g < cp->ncg; g++)
    nrules_all += cp->cg[g].nrules;
  uint8_t *applies = tc_xcalloc(res->ngroups * nrules_all + 1, 1);
  bool *recorded = tc_xcalloc(res->ngroups + 1, sizeof(bool));
  /* Incremental: the previous result's filters, by node id, when it came
   * from the same parsed policy and the policy has no via grants (whose
   * per-viewer choices the signature does not cover). */
  struct sig_memo smemo = {0};
  int64_t (*pidx)[2] = NULL;
  size_t npidx = 0;
  /* (Every previous node is indexed: SSH policies, CapMaps and texts are
   * taken over by content, filters only by signature, never with via.) */
  if (prev && prev->policy_uid == pol->uid) {
    pidx = tc_xcalloc(prev->nnodes + 1, sizeof(*pidx));
    for (size_t i = 0; i < prev->nnodes; i++) {
      pidx[npidx][0] = prev->nodes[i].node_id;
      pidx[npidx++][1] = (int64_t)i;
    }
    qsort(pidx, npidx, sizeof(*pidx), prev_cmp);
  }
  const struct tc_policy_node_result **olds = tc_xcalloc(ct.nn + 1, sizeof(*olds));
  res->policy_uid = pol->uid;
  /* Filters by signature, within this compile (not with via grants, whose
   * per-viewer choices the signature does not cover). */
  bool fshare = !cp->any_via;
  size_t fcap = 16;
  while (fcap < 2 * ct.nn)
    fcap *= 2;
  struct filter_slot *ftab = fshare ? tc_xcalloc(fcap, sizeof(*ftab)) : NULL;
  size_t fhit = 0, fmiss = 0; /* filters shared or reused / built, so far */
  /* Rules by global index, and the SrcIPs array each carries now (kept in
   * the result for the next compile's comparison). */
  const struct rule **rule_at = tc_xcalloc(nrules_all + 1, sizeof(*rule_at));
  json_t **rule_src = tc_xcalloc(nrules_all + 1, sizeof(*rule_src));
  for (size_t g = 0, gi = 0; g < cp->ncg; g++)
    for (size_t r = 0; r < cp->cg[g].nrules; r++, gi++) {
      rule_at[gi] = &cp->cg[g].rules[r];
      rule_src[gi] = rule_at[gi]->src ? json_incref(rule_at[gi]->src) : NULL;
    }
  bool may_skip = npidx && fshare && prev->nrule_src == nrules_all && prev->nuser_ids == topo->nusers &&
                  prev->nself_src == cp->ncg * cp->nusers;
  for (size_t u = 0; may_skip && u < topo->nusers; u++)
    may_skip = prev->user_ids[u] == topo->users[u].id;
  size_t fmask = fcap - 1;
  json_t *empties[2] = {NULL, NULL};
  for (size_t i = 0; i < ct.nn; i++) {
    const struct cnode *n = &ct.n[i];
    struct tc_policy_node_result *nr = &res->nodes[i];
    nr->node_id = n->id;
    size_t grp = group[i];
    struct fsig sig = {0x7c0a7, false, &smemo};
    const struct tc_policy_node_result *old = NULL;
    if (npidx) {
      int64_t key[2] = {n->id, 0};
      int64_t(*hit)[2] = bsearch(key, pidx, npidx, sizeof(*pidx), prev_cmp);
      old = hit ? &prev->nodes[(*hit)[1]] : NULL;
    }
    olds[i] = old;
    uint64_t ih = input_hash(&ct, n);
    nr->input_hash = ih;
    bool skipped = false;
    if (may_skip && old && old->reach_ok && old->filter_sig && old->input_hash == ih && !n->nsubnets && !n->exit4 &&
        !n->exit6) {
      bool same = true;
      const struct pol_reach_block *ob = old->reach_blk;
      for (size_t k = 0; same && ob && k < ob->n; k++) {
        int key = ob->rec[k].key;
        same = key >= 0 && (size_t)key < nrules_all && rule_src[key] == prev->rule_src[key];
        if (key < 0 && key != INT_MIN && !n->tagged && n->user >= 0)
          same = true; /* autogroup:self: checked below for every such grant */
      }
      for (size_t g = 0; same && g < cp->ncg; g++) {
        if (!cp->cg[g].has_self || n->tagged || n->user < 0)
          continue;
        json_t *cur = self_src_get(&ct, cp, g, n->user, &smemo);
        same = cur && cur == prev->self_src[g * cp->nusers + (size_t)n->user];
      }
      if (same) {
        memset(&reach[i], 0, sizeof(reach[i]));
        reach[i].all = old->reach_all;
        for (size_t k = 0; ob && k < ob->n; k++) {
          const struct pol_reach_rec *rec = &ob->rec[k];
          const struct ipset *src =
              rec->key >= 0 ? &rule_at[rec->key]->srcset
                            : &cp->self_set[(size_t)(-rec->key - 1) * cp->nusers + (size_t)n->user];
          struct reach_rule *rr = reach_push(&reach[i], src, rec->src_all, rec->key);
          /* read only from here on: borrow the previous result's ranges */
          rr->dst = (struct ipset){ob->r + rec->off, rec->n, rec->n, true};
          rr->dst_borrowed = true;
          rr->dst_all = rec->dst_all;
        }
        nr->reach_blk = old->reach_blk;
        atomic_fetch_add_explicit(&nr->reach_blk->refs, 1, memory_order_relaxed);
        nr->packet_filter = json_incref(old->packet_filter);
        nr->filter_sig = old->filter_sig;
        res->nreused++;
        res->nskipped++;
        fhit++;
        size_t slot = old->filter_sig & fmask;
        while (ftab[slot].h && ftab[slot].h != old->filter_sig)
          slot = (slot + 1) & fmask;
        if (!ftab[slot].h)
          ftab[slot] = (struct filter_slot){old->filter_sig, nr->packet_filter};
        skipped = true;
      }
    }
    if (skipped) {
      /* nothing evaluated: the group's rule record is left to its next node */
    } else if (fshare) {
      /* Signature first (no JSON): a node whose filter inputs equal another
       * node's in this compile, or its own in prev, shares that filter.
       * When that mostly misses (every node's filter differs, e.g. each
       * holds its own address and a source list that just changed), the
       * signature pass is only overhead: then the filter is built in the
       * same pass and dropped again on the rare hit. */
      bool sig_first = fmiss <= 8 || fmiss <= 2 * fhit;
      json_t *built = node_filter(pol, &ct, cp, n, &applies[grp * nrules_all], !recorded[grp], &reach[i],
                                  !sig_first, &sig);
      recorded[grp] = true;
      uint64_t h = sig.unusable ? 0 : (sig.h | 1);
      json_t *same = NULL;
      size_t slot = h & fmask;
      if (h) {
        while (ftab[slot].h && ftab[slot].h != h)
          slot = (slot + 1) & fmask;
        same = ftab[slot].f;
      }
      if (h && old && h == old->filter_sig && !cp->any_via) {
        nr->packet_filter = json_incref(old->packet_filter);
        res->nreused++;
        fhit++;
        json_decref(built);
      } else if (same) {
        nr->packet_filter = json_incref(same);
        fhit++;
        json_decref(built);
      } else if (built) {
        nr->packet_filter = built;
        fmiss++;
      } else {
        free_reach(&reach[i]);
        sig = (struct fsig){0x7c0a7, false, &smemo};
        nr->packet_filter =
            node_filter(pol, &ct, cp, n, &applies[grp * nrules_all], false, &reach[i], true, &sig);
        fmiss++;
      }
      nr->filter_sig = h;
      if (h && !same)
        ftab[slot] = (struct filter_slot){h, nr->packet_filter};
    }
    if (!nr->packet_filter) {
      sig = (struct fsig){0x7c0a7, false, &smemo};
      nr->packet_filter =
          node_filter(pol, &ct, cp, n, &applies[grp * nrules_all], !recorded[grp], &reach[i], true, &sig);
      nr->filter_sig = sig.unusable ? 0 : (sig.h | 1);
    }
    if (!skipped)
      recorded[grp] = true;
    if (sshp) {
      /* SSH policy depends only on identity (user or tags), unless a rule
       * maps local parts for sources outside its destinations: share it
       * across each identity group. */
      size_t g = ssh_shareable ? ssh_first[i] : i;
      nr->ssh_policy = g < i ? json_incref(res->nodes[g].ssh_policy) : pol_ssh_node(sshp, &ct, n);
      /* Unchanged since prev: keep prev's object (and so its text), so
       * that equal pointers tell the mapper nothing changed. Once per
       * identity group; the group's other nodes share it from here. */
      if (ssh_shareable && g == i && old && old->ssh_policy && nr->ssh_policy &&
          json_equal(old->ssh_policy, nr->ssh_policy)) {
        json_decref(nr->ssh_policy);
        nr->ssh_policy = json_incref(old->ssh_policy);
      }
    }
    nr->cap_map = capmap_for_node(pol, targets, n);
    share_json(&nr->cap_map, old ? old->cap_map : NULL, empties);
    ct.n[i].no_v4 = json_object_get(nr->cap_map, "disable-ipv4") != NULL;
    if (topo->no_node_extras)
      continue;
    json_t *prim;
    json_decref(allowed_ips(&ct, NULL, n, NULL, NULL, NULL, &prim));
    nr->primary_routes = prim;
    /* Its own view: addresses, every approved route it serves, exit routes. */
    nr->self_allowed_ips = json_array();
    pol_ipset_append_prefixes(&n->ips, nr->self_allowed_ips, false);
    char t[160];
    for (size_t k = 0; k < n->nsubnets; k++) {
      pol_ip_range_prefix(n->subnets[k], t, sizeof(t));
      json_array_append_new(nr->self_allowed_ips, json_string(t));
    }
    if (n->exit4)
      json_array_append_new(nr->self_allowed_ips, json_string("0.0.0.0/0"));
    if (n->exit6)
      json_array_append_new(nr->self_allowed_ips, json_string("::/0"));
    nr->auto_approved = auto_approve_node(pol, &ct, n);
    share_json(&nr->primary_routes, old ? old->primary_routes : NULL, empties);
    share_json(&nr->self_allowed_ips, old ? old->self_allowed_ips : NULL, empties);
    share_json(&nr->auto_approved, old ? old->auto_approved : NULL, empties);
  }
  json_decref(empties[0]);
  json_decref(empties[1]);
  render_texts(res, olds);
  free(olds);
  /* A sees B when either may reach the other. who[j] marks the nodes that
   * may send to j; it is filled by walking each rule's source ranges over
   * the sorted node addresses, so the cost follows the answer rather than
   * nodes x nodes x rules. */
  size_t words = (ct.nn + 63) / 64;
  uint64_t *who = big_calloc(ct.nn * words + 1, sizeof(uint64_t));
  struct addr_ix *ax = tc_xcalloc(2 * ct.nn + 1, sizeof(*ax));
  size_t nax = 0;
  for (size_t i = 0; i < ct.nn; i++) {
    if (ct.n[i].has4)
      ax[nax++] = (struct addr_ix){0, ct.n[i].a4, i};
    if (ct.n[i].has6)
      ax[nax++] = (struct addr_ix){1, ct.n[i].a6, i};
  }
  qsort(ax, nax, sizeof(*ax), addr_ix_cmp);
  size_t *routers = tc_xcalloc(ct.nn + 1, sizeof(size_t)), nrouters = 0;
  for (size_t i = 0; i < ct.nn; i++)
    if (ct.n[i].nsubnets)
      routers[nrouters++] = i;
  struct src_memo memo;
  src_memo_init(&memo, reach, ct.nn);
  for (size_t j = 0; j < ct.nn; j++) {
    uint64_t *w = &who[j * words];
    const struct reach *rj = &reach[j];
    bool all = rj->all;
    for (size_t r = 0; r < rj->n && !all; r++)
      all = rj->r[r].src_all;
    if (all) {
      for (size_t i = 0; i < ct.nn; i++)
        w[i / 64] |= 1ull << (i % 64);
      continue;
    }
    for (size_t r = 0; r < rj->n; r++) {
      const uint64_t *bits = src_bits(&memo, rj->r[r].src, &ct, ax, nax, routers, nrouters, words);
      for (size_t q = 0; q < words; q++)
        w[q] |= bits[q];
    }
  }
  free(ax);
  free(routers);
  src_memo_free(&memo);
  /* App-only via grants put nothing in any filter, yet their sources and the
   * via routers serving the destinations see each other. */
  for (size_t g = 0; g < cp->ncg; g++) {
    const struct cgrant *cg = &cp->cg[g];
    if (!cg->via || cg->g->nip)
      continue;
    for (size_t o = 0; o < ct.nn; o++) {
      if (!has_any_tag(&ct.n[o], cg->g->via, cg->g->nvia))
        continue;
      bool serves = false;
      for (size_t k = 0; k < ct.n[o].nsubnets && !serves; k++)
        for (size_t q = 0; q < cg->nvia_pfx && !serves; q++)
          serves = pol_ip_range_overlaps(ct.n[o].subnets[k], cg->via_pfx[q]);
      for (size_t i = 0; serves && i < ct.nn; i++)
        if (pol_node_in_set(&ct.n[i], &cg->src))
          who[o * words + i / 64] |= 1ull << (i % 64);
    }
  }
  /* Most peers look the same to every viewer (no routes to filter): build
   * their AllowedIPs once and share the array. */
  json_t **shared = tc_xcalloc(ct.nn + 1, sizeof(json_t *));
  json_t *no_routes = json_array();
  for (size_t j = 0; j < ct.nn; j++) {
    if (ct.n[j].nsubnets || ct.n[j].no_v4)
      continue;
    json_t *prim;
    shared[j] = allowed_ips(&ct, NULL, &ct.n[j], NULL, NULL, NULL, &prim);
    json_decref(prim);
  }
  build_peer_lists(&ct, cp, reach, who, words, shared, no_routes, res);
  for (size_t j = 0; j < ct.nn; j++)
    json_decref(shared[j]);
  free(shared);
  json_decref(no_routes);
  big_free(who);
  free(applies);
  free(recorded);
  free(order);
  free(group);
  for (size_t i = 0; i < ct.nn; i++) {
    /* what the next incremental compile needs to skip this node */
    struct tc_policy_node_result *nr = &res->nodes[i];
    nr->reach_ok = !cp->any_via;
    nr->reach_all = reach[i].all;
    for (size_t k = 0; k < reach[i].n; k++)
      nr->reach_ok &= reach[i].r[k].key != INT_MIN;
    if (!nr->reach_blk) /* (skipped nodes share the previous block) */
      nr->reach_blk = reach_block_of(&reach[i]);
    free_reach(&reach[i]);
    free(keys[i]);
  }
  res->rule_src = rule_src;
  res->nrule_src = nrules_all;
  res->nself_src = cp->ncg * cp->nusers;
  res->self_src = tc_xcalloc(res->nself_src + 1, sizeof(*res->self_src));
  for (size_t k = 0; k < res->nself_src; k++)
    res->self_src[k] = cp->self_src[k] ? json_incref(cp->self_src[k]) : NULL;
  res->nuser_ids = topo->nusers;
  res->user_ids = tc_xcalloc(topo->nusers + 1, sizeof(*res->user_ids));
  for (size_t u = 0; u < topo->nusers; u++)
    res->user_ids[u] = topo->users[u].id;
  free(rule_at);
  big_free(reach);
  free(keys);
  for (size_t i = 0; i < ct.nn; i++)
    free(ssh_keys[i]);
  free(ssh_keys);
  free(ssh_first);
  pol_compiled_free(cp);
  pol_ssh_pres_free(sshp);
  attr_targets_free(pol, targets);
  pol_ctopo_free(&ct);
  sig_memo_free(&smemo);
  free(pidx);
  free(ftab);
  res->src_cache = srcc;
  *out = res;
  return 0;
}

int tc_policy_compile(const struct tc_policy *pol, const struct tc_policy_topo *topo, struct tc_policy_result **out,
                      struct tc_policy_err *err)
{
  return compile_impl(pol, topo, NULL, out, err);
}

int tc_policy_compile_incremental(const struct tc_policy *pol, const struct tc_policy_topo *topo,
                                  const struct tc_policy_result *prev, struct tc_policy_result **out,
                                  struct tc_policy_err *err)
{
  return compile_impl(pol, topo, prev, out, err);
}

void tc_policy_result_free(struct tc_policy_result *res)
{
  if (!res)
    return;
  for (size_t i = 0; i < res->nnodes; i++) {
    struct tc_policy_node_result *nr = &res->nodes[i];
    json_decref(nr->packet_filter);
    pol_text_unref(nr->filter_text);
    pol_text_unref(nr->ssh_text);
    if (nr->peers) {
      for (size_t h = 0; h < nr->peers->nholes; h++) {
        json_decref(nr->hole_allowed_ips[h]);
        json_decref(nr->hole_primary_routes[h]);
      }
      peers_unref((struct tc_policy_peers *)nr->peers);
    }
    free(nr->hole_allowed_ips);
    free(nr->hole_primary_routes);
    json_decref(nr->ssh_policy);
    json_decref(nr->cap_map);
    json_decref(nr->self_allowed_ips);
    json_decref(nr->primary_routes);
    json_decref(nr->auto_approved);
  }
  for (size_t i = 0; i < res->nnodes; i++)
    reach_block_unref(res->nodes[i].reach_blk);
  big_free(res->nodes);
  pol_src_cache_free(res->src_cache);
  for (size_t k = 0; k < res->nrule_src; k++)
    json_decref(res->rule_src[k]);
  free(res->rule_src);
  for (size_t k = 0; k < res->nself_src; k++)
    json_decref(res->self_src[k]);
  free(res->self_src);
  free(res->user_ids);
  free(res);
}

const struct tc_policy_node_result *tc_policy_result_node(const struct tc_policy_result *res, int64_t id)
{
  for (size_t i = 0; res && i < res->nnodes; i++)
    if (res->nodes[i].node_id == id)
      return &res->nodes[i];
  return NULL;
}
