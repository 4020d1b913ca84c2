/* Differential test: random small tailnets with ACL and grant policies, judged twice.
 * A deliberately naive evaluator answers "may node S reach node D on port p
 * with protocol x" straight from the policy's words (no address sets, no
 * compilation); the compiled packet filter of D must give the same answer.
 * Deterministic seed so failures reproduce. */
#include <arpa/inet.h>
#include <string.h>

#include "base/base.h"
#include "policy/policy.h"
#include "tc_test.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;
static unsigned rnd(unsigned n)
{
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (unsigned)(rng_state % n);
}

#define MAXN 10
struct nnode {
  int user; /* 0 = tagged */
  bool tag[3];
  char ip[20];
};
struct world {
  int nn;
  struct nnode n[MAXN];
  bool group[4]; /* users 1..3 in group:g */
  int host_node; /* hosts: h -> this node's IP */
};

static const char *tagname[3] = {"tag:a", "tag:b", "tag:c"};

/* ---- naive evaluator -------------------------------------------------- */
static bool alias_is(const struct world *w, const char *a, int node)
{
  const struct nnode *n = &w->n[node];
  if (!strcmp(a, "*"))
    return true;
  if (!strcmp(a, "autogroup:member"))
    return n->user != 0;
  if (!strcmp(a, "autogroup:tagged"))
    return n->user == 0;
  if (!strcmp(a, "group:g"))
    return n->user != 0 && w->group[n->user];
  if (!strcmp(a, "h"))
    return node == w->host_node;
  for (int t = 0; t < 3; t++)
    if (!strcmp(a, tagname[t]))
      return n->tag[t];
  if (a[0] == 'u' && a[2] == '@')
    return n->user == a[1] - '0';
  if (!strncmp(a, "100.", 4))
    return !strcmp(a, n->ip);
  return false;
}

/* A rule as (source aliases) x (destination alias, protocol, ports)
 * triples: an ACL pairs each dst with its own ports and the rule's proto, a
 * grant pairs every dst with every ip entry. */
struct nrule {
  int nsrc;
  char src[2][24];
  int nt;
  char dst[4][24];
  char ports[4][16];
  int proto[4]; /* 0 = tcp/udp/icmp default, else the number */
};

static bool port_in(const char *ports, int p)
{
  if (!strcmp(ports, "*"))
    return true;
  const char *s = ports;
  while (*s) {
    int a = atoi(s), b = a;
    const char *dash = strchr(s, '-'), *comma = strchr(s, ',');
    if (dash && (!comma || dash < comma))
      b = atoi(dash + 1);
    if (p >= a && p <= b)
      return true;
    if (!comma)
      break;
    s = comma + 1;
  }
  return false;
}

static bool naive_allows(const struct world *w, const struct nrule *rules, int nr, int s, int d, int port, int proto)
{
  for (int r = 0; r < nr; r++) {
    const struct nrule *ru = &rules[r];
    bool sm = false;
    for (int i = 0; i < ru->nsrc; i++)
      sm |= alias_is(w, ru->src[i], s);
    if (!sm)
      continue;
    for (int i = 0; i < ru->nt; i++) {
      bool pm = ru->proto[i] ? ru->proto[i] == proto : (proto == 6 || proto == 17 || proto == 1);
      if (!pm)
        continue;
      bool dm;
      if (!strcmp(ru->dst[i], "autogroup:self"))
        dm = w->n[d].user != 0 && w->n[s].user == w->n[d].user;
      else
        dm = alias_is(w, ru->dst[i], d);
      if (dm && port_in(ru->ports[i], port))
        return true;
    }
  }
  return false;
}

/* ---- compiled filter reading ------------------------------------------- */
static uint32_t v4(const char *s)
{
  struct in_addr a;
  if (inet_pton(AF_INET, s, &a) != 1)
    return 0;
  return ntohl(a.s_addr);
}

static bool text_covers(const char *t, const char *ip)
{
  if (!strcmp(t, "*"))
    return true;
  if (strchr(t, ':'))
    return false; /* IPv6 entries: we probe IPv4 */
  uint32_t x = v4(ip);
  char buf[64];
  snprintf(buf, sizeof(buf), "%s", t);
  char *slash = strchr(buf, '/'), *dash = strchr(buf, '-');
  if (slash) {
    *slash = 0;
    int bits = atoi(slash + 1);
    uint32_t m = bits ? 0xffffffffu << (32 - bits) : 0;
    return (v4(buf) & m) == (x & m);
  }
  if (dash) {
    *dash = 0;
    return x >= v4(buf) && x <= v4(dash + 1);
  }
  return v4(buf) == x;
}

static bool compiled_allows(json_t *filter, const char *sip, const char *dip, int port, int proto)
{
  size_t i, k;
  json_t *r, *v;
  json_array_foreach(filter, i, r) {
    json_t *pr = json_object_get(r, "IPProto");
    bool pm = false;
    if (!pr)
      pm = proto == 6 || proto == 17 || proto == 1;
    json_array_foreach(pr, k, v) pm |= json_integer_value(v) == proto;
    if (!pm)
      continue;
    bool sm = false;
    json_array_foreach(json_object_get(r, "SrcIPs"), k, v) sm |= text_covers(json_string_value(v), sip);
    if (!sm)
      continue;
    json_array_foreach(json_object_get(r, "DstPorts"), k, v) {
      json_t *ports = json_object_get(v, "Ports");
      if (text_covers(json_string_value(json_object_get(v, "IP")), dip) &&
          port >= json_integer_value(json_object_get(ports, "First")) &&
          port <= json_integer_value(json_object_get(ports, "Last")))
        return true;
    }
  }
  return false;
}

static void pick_alias(const struct world *w, char *out, bool dst, bool allow_self)
{
  for (;;) {
    unsigned k = rnd(10);
    switch (k) {
    case 0: strcpy(out, "*"); return;
    case 1: snprintf(out, 24, "u%u@", 1 + rnd(3)); return;
    case 2: strcpy(out, "group:g"); return;
    case 3: strcpy(out, tagname[rnd(3)]); return;
    case 4: strcpy(out, "autogroup:member"); return;
    case 5: strcpy(out, "autogroup:tagged"); return;
    case 6: strcpy(out, "h"); return;
    case 7: snprintf(out, 24, "%s", w->n[rnd((unsigned)w->nn)].ip); return;
    case 8:
      if (dst && allow_self) {
        strcpy(out, "autogroup:self");
        return;
      }
      break;
    default: snprintf(out, 24, "u%u@", 1 + rnd(3)); return;
    }
  }
}

TC_TEST(compiled_filters_match_naive_evaluator)
{
  static const char *portsets[] = {"*", "22", "80,443", "1000-2000", "22,8000-8100"};
  static const int probe_ports[] = {22, 80, 443, 1500, 8050, 9999};
  static const int probe_protos[] = {6, 17, 1};
  int checked = 0, mismatches = 0;
  for (int iter = 0; iter < 250; iter++) {
    struct world w = {0};
    w.nn = 3 + (int)rnd(MAXN - 2);
    for (int i = 0; i < w.nn; i++) {
      if (rnd(3) == 0) {
        w.n[i].user = 0;
        w.n[i].tag[rnd(3)] = true;
        if (rnd(2))
          w.n[i].tag[rnd(3)] = true;
      } else {
        w.n[i].user = 1 + (int)rnd(3);
      }
      snprintf(w.n[i].ip, sizeof(w.n[i].ip), "100.64.%d.%d", (int)rnd(4), 1 + i * 3);
    }
    for (int u = 1; u <= 3; u++)
      w.group[u] = rnd(2);
    w.host_node = (int)rnd((unsigned)w.nn);
    /* policy text: ACLs and grants mixed */
    struct nrule rules[4];
    int nr = 1 + (int)rnd(4);
    struct tc_buf acl = TC_BUF_INIT, grants = TC_BUF_INIT;
    for (int r = 0; r < nr; r++) {
      struct nrule *ru = &rules[r];
      memset(ru, 0, sizeof(*ru));
      bool as_grant = rnd(2);
      ru->nsrc = 1 + (int)rnd(2);
      bool identity_src = true, has_star = false;
      for (int i = 0; i < ru->nsrc; i++) {
        pick_alias(&w, ru->src[i], false, false);
        const char *sa = ru->src[i];
        has_star |= !strcmp(sa, "*");
        identity_src &= !strcmp(sa, "*") || !strcmp(sa, "group:g") || !strcmp(sa, "autogroup:member") ||
                        (sa[0] == 'u' && sa[2] == '@');
      }
      bool self_ok = identity_src && !(as_grant && has_star);
      int ndst = 1 + (int)rnd(2);
      char dsts[2][24];
      for (int i = 0; i < ndst; i++)
        pick_alias(&w, dsts[i], true, self_ok);
      static const char *pname[] = {"", "tcp", "17"};
      static const int pnum[] = {0, 6, 17};
      struct tc_buf *b = as_grant ? &grants : &acl;
      if (!as_grant) {
        int pk = (int)rnd(3);
        tc_buf_printf(b, "  {\"action\": \"accept\"%s%s%s, \"src\": [", pk ? ", \"proto\": \"" : "", pname[pk],
                      pk ? "\"" : "");
        for (int i = 0; i < ru->nsrc; i++)
          tc_buf_printf(b, "%s\"%s\"", i ? ", " : "", ru->src[i]);
        tc_buf_puts(b, "], \"dst\": [");
        for (int i = 0; i < ndst; i++) {
          const char *ps = portsets[rnd(TC_ARRAY_LEN(portsets))];
          tc_buf_printf(b, "%s\"%s:%s\"", i ? ", " : "", dsts[i], ps);
          memcpy(ru->dst[ru->nt], dsts[i], sizeof ru->dst[0]); /* same 24-byte size; snprintf trips -Wformat-truncation at -O2 */
          snprintf(ru->ports[ru->nt], 16, "%s", ps);
          ru->proto[ru->nt++] = pnum[pk];
        }
        tc_buf_puts(b, "]},\n");
      } else {
        int nip = 1 + (int)rnd(2);
        int pks[2];
        const char *pss[2];
        for (int k = 0; k < nip; k++) {
          pks[k] = (int)rnd(3);
          pss[k] = portsets[rnd(TC_ARRAY_LEN(portsets))];
        }
        tc_buf_puts(b, "  {\"src\": [");
        for (int i = 0; i < ru->nsrc; i++)
          tc_buf_printf(b, "%s\"%s\"", i ? ", " : "", ru->src[i]);
        tc_buf_puts(b, "], \"dst\": [");
        for (int i = 0; i < ndst; i++)
          tc_buf_printf(b, "%s\"%s\"", i ? ", " : "", dsts[i]);
        tc_buf_puts(b, "], \"ip\": [");
        for (int k = 0; k < nip; k++)
          tc_buf_printf(b, "%s\"%s%s%s\"", k ? ", " : "", pname[pks[k]], pks[k] ? ":" : "", pss[k]);
        tc_buf_puts(b, "]},\n");
        for (int i = 0; i < ndst; i++)
          for (int k = 0; k < nip; k++) {
            memcpy(ru->dst[ru->nt], dsts[i], sizeof ru->dst[0]); /* same 24-byte size; snprintf trips -Wformat-truncation at -O2 */
            snprintf(ru->ports[ru->nt], 16, "%s", pss[k]);
            ru->proto[ru->nt++] = pnum[pks[k]];
          }
      }
    }
    struct tc_buf b = TC_BUF_INIT;
    tc_buf_puts(&b, "{\"tagOwners\": {\"tag:a\": [\"u1@\"], \"tag:b\": [\"u1@\"], \"tag:c\": [\"tag:a\"]},\n");
    tc_buf_puts(&b, " \"groups\": {\"group:g\": [");
    bool first = true;
    for (int u = 1; u <= 3; u++)
      if (w.group[u]) {
        tc_buf_printf(&b, "%s\"u%d@\"", first ? "" : ", ", u);
        first = false;
      }
    tc_buf_printf(&b, "]},\n \"hosts\": {\"h\": \"%s\"},\n", w.n[w.host_node].ip);
    tc_buf_printf(&b, " \"acls\": [\n%s ],\n \"grants\": [\n%s ]}\n", acl.data ? acl.data : "",
                  grants.data ? grants.data : "");
    tc_buf_free(&acl);
    tc_buf_free(&grants);
    /* topology */
    struct tc_policy_user users[3] = {{1, "u1", "u1@ex.com"}, {2, "u2", "u2@ex.com"}, {3, "u3", "u3@ex.com"}};
    struct tc_policy_node nodes[MAXN];
    const char *tagv[MAXN][3];
    memset(nodes, 0, sizeof(nodes));
    for (int i = 0; i < w.nn; i++) {
      nodes[i].id = i + 1;
      nodes[i].hostname = "n";
      nodes[i].user_id = w.n[i].user;
      size_t nt = 0;
      for (int t = 0; t < 3; t++)
        if (w.n[i].tag[t])
          tagv[i][nt++] = tagname[t];
      nodes[i].tags = tagv[i];
      nodes[i].ntags = nt;
      nodes[i].ipv4 = w.n[i].ip;
    }
    struct tc_policy_topo topo = {users, 3, nodes, (size_t)w.nn, NULL};
    struct tc_policy *pol;
    struct tc_policy_err err;
    int rc = tc_policy_parse(b.data, b.len, &pol, &err);
    if (rc) {
      fprintf(stderr, "  generated policy refused: %s\n%s", err.msg, b.data);
      TC_CHECK(rc == 0);
      tc_buf_free(&b);
      continue;
    }
    struct tc_policy_result *res;
    TC_REQUIRE(tc_policy_compile(pol, &topo, &res, &err) == 0);
    for (int s = 0; s < w.nn; s++)
      for (int d = 0; d < w.nn; d++)
        for (size_t pi = 0; pi < TC_ARRAY_LEN(probe_ports); pi++)
          for (size_t qi = 0; qi < TC_ARRAY_LEN(probe_protos); qi++) {
            int port = probe_ports[pi], proto = probe_protos[qi];
            bool want = naive_allows(&w, rules, nr, s, d, port, proto);
            bool got = compiled_allows(res->nodes[d].packet_filter, w.n[s].ip, w.n[d].ip, port, proto);
            checked++;
            if (want != got && mismatches++ < 5) {
              char *f = json_dumps(res->nodes[d].packet_filter, JSON_COMPACT);
              fprintf(stderr, "  mismatch: node%d -> node%d port %d proto %d: naive %d compiled %d\n%s\nfilter %s\n", s + 1,
                      d + 1, port, proto, want, got, b.data, f);
              free(f);
            }
          }
    tc_policy_result_free(res);
    tc_policy_free(pol);
    tc_buf_free(&b);
  }
  fprintf(stderr, "  %d reachability questions checked\n", checked);
  TC_CHECK_INT(mismatches, 0);
  TC_CHECK(checked > 10000);
}
