/* The policy's own `tests` and `sshTests`: assertions a policy must satisfy
 * before it is accepted, and the live editor's check. Semantics follow the
 * coordination service: a test passes only if every source address reaches
 * (accept) or fails to reach (deny) every destination. Pure; any thread. */
#include <string.h>

#include "policy/policy_int.h"

static int resolve_text(const struct tc_policy *pol, const struct ctopo *ct, const char *s, struct ipset *out)
{
  struct alias a;
  char why[300];
  if (pol_parse_alias_text(s, &a, why, sizeof(why))) {
    free(a.s);
    return -1;
  }
  pol_resolve_alias(pol, ct, &a, out);
  free(a.s);
  return 0;
}

static bool host_is_cidr(const struct tc_policy *pol, const char *name)
{
  for (size_t i = 0; i < pol->nhosts; i++)
    if (!strcmp(pol->hosts[i].name, name))
      return pol->hosts[i].pfx.lo != pol->hosts[i].pfx.hi;
  return false;
}

/* Decomposes a set into CIDR prefixes. */
static void set_prefixes(const struct ipset *s, struct ip_range **out, size_t *n)
{
  json_t *arr = json_array();
  pol_ipset_append_prefixes(s, arr, false);
  *n = json_array_size(arr);
  *out = tc_xcalloc(*n + 1, sizeof(**out));
  for (size_t i = 0; i < *n; i++)
    pol_ip_parse_prefix(json_string_value(json_array_get(arr, i)), &(*out)[i], NULL);
  json_decref(arr);
}

static int run_acl_tests(const struct tc_policy *pol, const struct ctopo *ct, const struct compiled *cp,
                         struct tc_policy_err *err)
{
  for (size_t ti = 0; ti < pol->ntests; ti++) {
    const struct pol_test *t = &pol->tests[ti];
    if (!t->naccept && !t->ndeny)
      return tc_policy_err_at(err, "test(s) failed: tests[%zu]: test entry must have at least one of \"accept\" or "
                                   "\"deny\"", ti);
    int protos[4] = {6, 17, 1, 58};
    size_t nprotos = 4;
    if (t->proto && *t->proto) {
      int p = pol_proto_parse(t->proto);
      if (p != 6 && p != 17 && p != 132)
        return tc_policy_err_at(err, "test(s) failed: tests[%zu]: test protocol must be tcp, udp, sctp, or empty: "
                                     "\"%s\"", ti, t->proto);
      protos[0] = p;
      nprotos = 1;
    }
    struct ipset src;
    pol_ipset_init(&src);
    if (!*t->src || resolve_text(pol, ct, t->src, &src) || pol_ipset_empty(&src)) {
      pol_ipset_free(&src);
      return tc_policy_err_at(err, "test(s) failed: tests[%zu]: source \"%s\" resolved to no IP addresses", ti,
                              t->src);
    }
    struct ip_range *sp;
    size_t nsp;
    set_prefixes(&src, &sp, &nsp);
    pol_ipset_free(&src);
    for (int pass = 0; pass < 2; pass++) {
      char **list = pass ? t->deny : t->accept;
      size_t nl = pass ? t->ndeny : t->naccept;
      for (size_t di = 0; di < nl; di++) {
        const char *d = list[di];
        const char *colon = strrchr(d, ':');
        char *al = colon ? tc_xstrndup(d, (size_t)(colon - d)) : NULL;
        /* "[v6addr]:port" */
        if (al && al[0] == '[' && al[strlen(al) - 1] == ']') {
          memmove(al, al + 1, strlen(al));
          al[strlen(al) - 1] = 0;
        }
        struct port_range *ports = NULL;
        size_t nports = 0;
        char why[300];
        struct ipset dst;
        pol_ipset_init(&dst);
        int rc = 0;
        struct alias a = {0};
        if (!colon || pol_parse_ports_text(colon + 1, &ports, &nports, why, sizeof(why)))
          rc = tc_policy_err_at(err, "test(s) failed: tests[%zu]: bad destination \"%s\" (want host:port)", ti, d);
        else if (nports != 1 || ports[0].first != ports[0].last)
          rc = tc_policy_err_at(err, "test(s) failed: tests[%zu]: \"%s\": test destination port must be a single "
                                     "port", ti, d);
        else if (pol_parse_alias_text(al, &a, why, sizeof(why)))
          rc = tc_policy_err_at(err, "test(s) failed: tests[%zu]: \"%s\": %s", ti, d, why);
        else if (a.kind == AL_PREFIX && strchr(al, '/'))
          rc = tc_policy_err_at(err, "test(s) failed: tests[%zu]: \"%s\": test destination must be a single host, "
                                     "not a CIDR range", ti, d);
        else if (a.kind == AL_HOST && host_is_cidr(pol, a.s))
          rc = tc_policy_err_at(err, "test(s) failed: tests[%zu]: \"%s\": test destination must be a single host, "
                                     "not a CIDR range", ti, d);
        else if (a.kind == AL_AUTOGROUP && a.ag == AG_INTERNET)
          rc = tc_policy_err_at(err, "test(s) failed: tests[%zu]: autogroup:internet not valid as a test "
                                     "destination", ti);
        else {
          pol_resolve_alias(pol, ct, &a, &dst);
          if (pol_ipset_empty(&dst))
            rc = tc_policy_err_at(err, "test(s) failed: tests[%zu]: destination \"%s\" resolved to no IP addresses",
                                  ti, d);
        }
        bool allowed = true;
        if (!rc && pol->has_acls_or_grants) {
          size_t nrules;
          const struct rule **rules = pol_compiled_rules_to(cp, &dst, ports, nports, protos, nprotos, &nrules);
          for (size_t k = 0; k < nsp && allowed; k++)
            allowed = pol_rules_accept_from(rules, nrules, sp[k]);
          free(rules);
        }
        if (!rc && allowed != (pass == 0))
          rc = tc_policy_err_at(err, "test(s) failed: %s -> %s: expected %s, got %s", t->src, d,
                                pass ? "DENIED" : "ALLOWED", allowed ? "ALLOWED" : "DENIED");
        free(a.s);
        free(al);
        free(ports);
        pol_ipset_free(&dst);
        if (rc) {
          free(sp);
          return rc;
        }
      }
    }
    free(sp);
  }
  return 0;
}

static bool principal_has(json_t *principals, const char *ip)
{
  size_t i;
  json_t *p;
  json_array_foreach(principals, i, p) {
    const char *v = json_string_value(json_object_get(p, "nodeIP"));
    if (v && !strcmp(v, ip))
      return true;
  }
  return false;
}

static bool usermap_allows(json_t *m, const char *user)
{
  if (!*user)
    return false;
  json_t *v = json_object_get(m, user);
  if (v)
    return *json_string_value(v) != 0;
  if (!strcmp(user, "root"))
    return false;
  v = json_object_get(m, "*");
  return v && *json_string_value(v);
}

static void ssh_reach(json_t *pol, const char *ip, const char *user, bool *acc, bool *chk)
{
  *acc = *chk = false;
  size_t i;
  json_t *r;
  json_array_foreach(json_object_get(pol, "rules"), i, r) {
    if (!principal_has(json_object_get(r, "principals"), ip) || !usermap_allows(json_object_get(r, "sshUsers"), user))
      continue;
    *acc = true;
    if (json_object_get(json_object_get(r, "action"), "holdAndDelegate"))
      *chk = true;
  }
}

static int run_ssh_tests(const struct tc_policy *pol, const struct ctopo *ct, struct tc_policy_err *err)
{
  json_t **cache = tc_xcalloc(ct->nn + 1, sizeof(json_t *));
  struct ssh_pres *sp = pol->has_ssh ? pol_ssh_prepare(pol, ct) : NULL;
  int rc = 0;
  for (size_t ti = 0; !rc && ti < pol->nssh_tests; ti++) {
    const struct ssh_test *t = &pol->ssh_tests[ti];
    struct ipset src;
    pol_ipset_init(&src);
    int src_user = -1;
    struct alias sa;
    char why[300];
    if (pol_parse_alias_text(t->src, &sa, why, sizeof(why))) {
      rc = tc_policy_err_at(err, "test(s) failed: sshTests[%zu]: %s", ti, why);
    } else {
      pol_resolve_alias(pol, ct, &sa, &src);
      if (sa.kind == AL_USER)
        src_user = pol_find_user(ct, sa.s);
    }
    free(sa.s);
    if (!rc && pol_ipset_empty(&src))
      rc = tc_policy_err_at(err, "test(s) failed: sshTests[%zu]: source \"%s\" resolved to no IP addresses", ti,
                            t->src);
    if (!rc && !t->naccept && !t->ndeny && !t->ncheck)
      rc = tc_policy_err_at(err, "test(s) failed: sshTests[%zu]: no accept, deny, or check assertions specified", ti);
    bool *dsel = tc_xcalloc(ct->nn + 1, sizeof(bool));
    for (size_t d = 0; !rc && d < t->ndst; d++) {
      bool matched = false;
      struct alias da;
      if (pol_parse_alias_text(t->dst[d], &da, why, sizeof(why))) {
        rc = tc_policy_err_at(err, "test(s) failed: sshTests[%zu]: %s", ti, why);
        free(da.s);
        break;
      }
      if (da.kind == AL_AUTOGROUP && da.ag == AG_SELF) {
        for (size_t i = 0; src_user >= 0 && i < ct->nn; i++)
          if (!ct->n[i].tagged && ct->n[i].user == src_user)
            dsel[i] = matched = true;
      } else {
        struct ipset ds;
        pol_ipset_init(&ds);
        pol_resolve_alias(pol, ct, &da, &ds);
        for (size_t i = 0; i < ct->nn; i++)
          if (pol_node_in_set(&ct->n[i], &ds))
            dsel[i] = matched = true;
        pol_ipset_free(&ds);
      }
      if (!matched)
        rc = tc_policy_err_at(err, "test(s) failed: sshTests[%zu]: dst alias \"%s\" resolved to no nodes", ti,
                              t->dst[d]);
      free(da.s);
    }
    for (size_t i = 0; !rc && i < ct->nn; i++) {
      if (!dsel[i])
        continue;
      if (!cache[i])
        cache[i] = pol->has_ssh ? pol_ssh_node(sp, ct, &ct->n[i]) : json_pack("{s:[]}", "rules");
      char **lists[] = {t->accept, t->deny, t->check};
      size_t ns[] = {t->naccept, t->ndeny, t->ncheck};
      for (int kind = 0; !rc && kind < 3; kind++) {
        for (size_t u = 0; !rc && u < ns[kind]; u++) {
          for (size_t r = 0; !rc && r < src.n; r++) {
            for (tc_u128 x = src.r[r].lo;; x++) {
              char ip[64];
              bool acc, chk;
              pol_ip_format_addr(src.r[r].v6, x, ip, sizeof(ip));
              ssh_reach(cache[i], ip, lists[kind][u], &acc, &chk);
              bool ok = kind == 0 ? acc : kind == 1 ? !acc : chk;
              if (!ok) {
                rc = tc_policy_err_at(err, "test(s) failed: %s/%s -> %s: expected %s", t->src, lists[kind][u],
                                      ct->n[i].src->hostname ? ct->n[i].src->hostname : "?",
                                      kind == 0 ? "ALLOWED, got DENIED"
                                      : kind == 1 ? "DENIED, got ALLOWED"
                                                  : "ALLOWED via check");
                break;
              }
              if (x == src.r[r].hi || src.r[r].hi - src.r[r].lo > 65536)
                break;
            }
          }
        }
      }
    }
    free(dsel);
    pol_ipset_free(&src);
  }
  for (size_t i = 0; i < ct->nn; i++)
    json_decref(cache[i]);
  free(cache);
  pol_ssh_pres_free(sp);
  return rc;
}

/* The tailnet's own email domain: the first (lowest id) user's. Domain
 * expressions in SSH rules (user:*@d, localpart:*@d) must name it. */
static const char *tailnet_domain(const struct tc_policy_topo *t)
{
  const struct tc_policy_user *first = NULL;
  for (size_t i = 0; i < t->nusers; i++)
    if (t->users[i].email && strchr(t->users[i].email, '@') && (!first || t->users[i].id < first->id))
      first = &t->users[i];
  return first ? strrchr(first->email, '@') + 1 : NULL;
}

static int check_domains(const struct tc_policy *pol, const struct tc_policy_topo *t, struct tc_policy_err *err)
{
  const char *dom = tailnet_domain(t);
  for (size_t i = 0; i < pol->nssh; i++) {
    const struct ssh_rule *r = &pol->ssh[i];
    for (size_t j = 0; j < r->nsrc + r->ndst; j++) {
      const struct alias *a = j < r->nsrc ? &r->src[j] : &r->dst[j - r->nsrc];
      if (a->kind == AL_USER && tc_str_has_prefix(a->s, "user:*@") && (!dom || strcmp(a->s + 7, dom)))
        return tc_policy_err_at(err, "ssh[%zu]: [ssh] %s is not associated with this Tailnet and cannot be used in "
                                     "user:*@<domain> expressions", i, a->s + 7);
    }
    for (size_t j = 0; j < r->nusers; j++) {
      const char *u = r->users[j];
      if (tc_str_has_prefix(u, "localpart:*@") && u[12] && (!dom || strcmp(u + 12, dom)))
        return tc_policy_err_at(err, "ssh[%zu]: %s is not associated with this Tailnet and cannot be used in "
                                     "user:*@<domain> expressions", i, u + 12);
    }
  }
  return 0;
}

int tc_policy_run_tests(const struct tc_policy *pol, const struct tc_policy_topo *topo, struct tc_policy_err *err)
{
  int rc = check_domains(pol, topo, err);
  if (rc)
    return rc;
  if (!pol->ntests && !pol->nssh_tests)
    return 0;
  struct ctopo ct;
  rc = pol_ctopo_build(pol, topo, &ct, err);
  if (rc)
    return rc;
  if (pol->ntests) {
    struct compiled *cp = pol_compiled_build(pol, &ct, false);
    rc = run_acl_tests(pol, &ct, cp, err);
    pol_compiled_free(cp);
  }
  if (!rc && pol->nssh_tests)
    rc = run_ssh_tests(pol, &ct, err);
  pol_ctopo_free(&ct);
  return rc;
}

int tc_policy_check(const char *text, size_t len, const struct tc_policy_topo *topo, struct tc_policy_err *err)
{
  struct tc_policy *pol;
  int rc = tc_policy_parse(text, len, &pol, err);
  if (rc)
    return rc;
  rc = tc_policy_run_tests(pol, topo, err);
  tc_policy_free(pol);
  return rc;
}
