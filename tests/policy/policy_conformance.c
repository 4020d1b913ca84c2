/* policy-conformance: runs the Tailscale policy captures (one JSON file per
 * case: policy, topology, and what the real coordination service gave each
 * node) through tc_policy and compares, per node: the packet filter, the
 * visible peers with their AllowedIPs and PrimaryRoutes, the SSH policy, the policy-derived
 * node capabilities. Order is ignored only where it carries no meaning
 * (addresses inside a rule, rules of an accept-only filter, principals of an
 * SSH rule); SSH rule order is compared exactly (first match wins).
 *
 * Usage: policy-conformance [DIR] [--baseline FILE] [--verbose]
 * DIR defaults to $TC_SHARED_DIR/testdata/tailscale-policy-captures.
 * Exit status: 0 unless a category's pass count is below the baseline. */
#include <dirent.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "policy/policy.h"

#ifndef TC_SHARED_DIR_DEFAULT
#define TC_SHARED_DIR_DEFAULT "../shared"
#endif

static bool verbose;

/* ---- canonical forms -------------------------------------------------------- */
static int cmp_dump(const void *a, const void *b)
{
  char *x = json_dumps(*(json_t *const *)a, JSON_SORT_KEYS | JSON_COMPACT | JSON_ENCODE_ANY);
  char *y = json_dumps(*(json_t *const *)b, JSON_SORT_KEYS | JSON_COMPACT | JSON_ENCODE_ANY);
  int r = strcmp(x, y);
  free(x);
  free(y);
  return r;
}

/* Returns a new array with elements sorted by their canonical dump. */
static json_t *sorted(json_t *arr)
{
  json_t *out = json_array();
  if (!json_is_array(arr))
    return out;
  size_t n = json_array_size(arr);
  json_t **v = calloc(n + 1, sizeof(json_t *));
  for (size_t i = 0; i < n; i++)
    v[i] = json_array_get(arr, i);
  qsort(v, n, sizeof(json_t *), cmp_dump);
  for (size_t i = 0; i < n; i++)
    json_array_append(out, v[i]);
  free(v);
  return out;
}

static json_t *canon_rule(json_t *r)
{
  json_t *o = json_object();
  json_object_set_new(o, "SrcIPs", sorted(json_object_get(r, "SrcIPs")));
  json_t *dp = json_object_get(r, "DstPorts");
  if (json_array_size(dp))
    json_object_set_new(o, "DstPorts", sorted(dp));
  json_t *pr = json_object_get(r, "IPProto");
  if (json_array_size(pr))
    json_object_set_new(o, "IPProto", sorted(pr));
  json_t *cg = json_object_get(r, "CapGrant");
  if (json_array_size(cg)) {
    json_t *cgs = json_array();
    size_t i;
    json_t *g;
    json_array_foreach(cg, i, g) {
      json_t *cm = json_object_get(g, "CapMap");
      json_t *cmc = json_object();
      const char *k;
      json_t *v;
      json_object_foreach(cm, k, v) json_object_set_new(cmc, k, json_is_null(v) ? json_array() : json_incref(v));
      json_array_append_new(cgs, json_pack("{s:o,s:o}", "Dsts", sorted(json_object_get(g, "Dsts")), "CapMap", cmc));
    }
    json_object_set_new(o, "CapGrant", sorted(cgs));
    json_decref(cgs);
  }
  return o;
}

static json_t *canon_filter(json_t *rules)
{
  json_t *tmp = json_array();
  size_t i;
  json_t *r;
  json_array_foreach(rules, i, r) json_array_append_new(tmp, canon_rule(r));
  json_t *out = sorted(tmp);
  json_decref(tmp);
  return out;
}

static json_t *canon_ssh(json_t *pol)
{
  json_t *out = json_array();
  size_t i;
  json_t *r;
  json_array_foreach(json_object_get(pol, "rules"), i, r) {
    json_t *o = json_object();
    json_object_set_new(o, "principals", sorted(json_object_get(r, "principals")));
    json_object_set(o, "sshUsers", json_object_get(r, "sshUsers") ? json_object_get(r, "sshUsers") : json_null());
    json_object_set(o, "action", json_object_get(r, "action") ? json_object_get(r, "action") : json_null());
    json_t *ae = json_object_get(r, "acceptEnv");
    if (json_array_size(ae))
      json_object_set_new(o, "acceptEnv", sorted(ae));
    json_array_append_new(out, o);
  }
  return out;
}

/* Capabilities that come from tailnet settings, roles or features outside
 * the policy (admin/owner roles, tailnet lock, display name, client tuning,
 * server defaults such as file sharing and SSH availability). */
static bool non_policy_cap(const char *k)
{
  static const char *skip[] = {
      "https://tailscale.com/cap/is-admin", "https://tailscale.com/cap/is-owner",
      "https://tailscale.com/cap/tailnet-lock", "https://tailscale.com/cap/file-sharing",
      "https://tailscale.com/cap/ssh", "https://tailscale.com/cap/warn-funnel-no-https",
      "service-host", "store-appc-routes", "tailnet-display-name", "max-key-duration", "native-ipv4",
      "probe-udp-lifetime", "ssh-behavior-v1", "ssh-env-vars", "default-auto-update",
  };
  for (size_t i = 0; i < TC_ARRAY_LEN(skip); i++)
    if (!strcmp(k, skip[i]))
      return true;
  return tc_str_has_prefix(k, "https://tailscale.com/cap/funnel-ports?");
}

static json_t *canon_caps(json_t *m)
{
  json_t *o = json_object();
  const char *k;
  json_t *v;
  json_object_foreach(m, k, v) {
    if (non_policy_cap(k))
      continue;
    json_object_set_new(o, k, json_is_null(v) ? json_array() : json_incref(v));
  }
  return o;
}

/* ---- one case --------------------------------------------------------------- */
struct topo_owned {
  struct tc_policy_topo t;
  struct tc_policy_user *users;
  struct tc_policy_node *nodes;
  const char **names;
};

static const char **strv_of(json_t *arr, size_t *n)
{
  *n = json_array_size(arr);
  const char **v = calloc(*n + 1, sizeof(char *));
  for (size_t i = 0; i < *n; i++)
    v[i] = json_string_value(json_array_get(arr, i));
  return v;
}

static void build_topo(json_t *topo, struct topo_owned *o)
{
  memset(o, 0, sizeof(*o));
  json_t *users = json_object_get(topo, "users");
  json_t *nodes = json_object_get(topo, "nodes");
  o->users = calloc(json_array_size(users) + 1, sizeof(*o->users));
  size_t i;
  json_t *u;
  json_array_foreach(users, i, u) {
    o->users[i].id = json_integer_value(json_object_get(u, "id"));
    if (!o->users[i].id)
      o->users[i].id = (int64_t)i + 1;
    o->users[i].name = json_string_value(json_object_get(u, "name"));
    o->users[i].email = json_string_value(json_object_get(u, "email"));
  }
  o->t.users = o->users;
  o->t.nusers = json_array_size(users);
  o->nodes = calloc(json_object_size(nodes) + 1, sizeof(*o->nodes));
  o->names = calloc(json_object_size(nodes) + 1, sizeof(char *));
  const char *name;
  json_t *n;
  size_t k = 0;
  json_object_foreach(nodes, name, n) {
    struct tc_policy_node *pn = &o->nodes[k];
    pn->id = (int64_t)k + 1;
    pn->hostname = name;
    o->names[k] = name;
    pn->tags = strv_of(json_object_get(n, "tags"), &pn->ntags);
    pn->ipv4 = json_string_value(json_object_get(n, "ipv4"));
    pn->ipv6 = json_string_value(json_object_get(n, "ipv6"));
    pn->announced = strv_of(json_object_get(n, "routable_ips"), &pn->nannounced);
    pn->approved = strv_of(json_object_get(n, "approved_routes"), &pn->napproved);
    const char *un = json_string_value(json_object_get(n, "user"));
    if (!pn->ntags) {
      pn->user_id = o->t.nusers ? o->users[0].id : 0;
      for (size_t j = 0; un && j < o->t.nusers; j++)
        if (o->users[j].name && !strcmp(o->users[j].name, un))
          pn->user_id = o->users[j].id;
    }
    k++;
  }
  o->t.nodes = o->nodes;
  o->t.nnodes = k;
  o->t.control_url = "https://unused";
}

static void free_topo(struct topo_owned *o)
{
  for (size_t i = 0; i < o->t.nnodes; i++) {
    free((void *)o->nodes[i].tags);
    free((void *)o->nodes[i].announced);
    free((void *)o->nodes[i].approved);
  }
  free(o->nodes);
  free(o->users);
  free(o->names);
}

static void diff_note(struct tc_buf *why, const char *node, const char *what, json_t *want, json_t *got)
{
  if (why->len)
    return; /* first difference is enough to explain the failure */
  char *w = json_dumps(want, JSON_SORT_KEYS | JSON_COMPACT | JSON_ENCODE_ANY);
  char *g = json_dumps(got, JSON_SORT_KEYS | JSON_COMPACT | JSON_ENCODE_ANY);
  if (verbose)
    tc_buf_printf(why, "%s: %s differs\n      want %s\n      got  %s", node, what, w, g);
  else
    tc_buf_printf(why, "%s: %s differs (want %.300s%s; got %.300s%s)", node, what, w, strlen(w) > 300 ? "..." : "", g,
                  strlen(g) > 300 ? "..." : "");
  free(w);
  free(g);
}

/* Returns true on pass; why explains a failure. */
static bool run_case(json_t *c, struct tc_buf *why)
{
  json_t *pj = json_object_get(c, "policy");
  char *text = json_is_string(pj) ? strdup(json_string_value(pj)) : pj ? json_dumps(pj, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
  if (!text)
    text = strdup(""); /* no policy at all: Headscale's allow-all */
  struct topo_owned topo;
  build_topo(json_object_get(c, "topology"), &topo);
  bool want_err = json_is_true(json_object_get(c, "expect_error"));
  struct tc_policy *pol = NULL;
  struct tc_policy_err err;
  int rc = tc_policy_parse(text, strlen(text), &pol, &err);
  if (!rc)
    rc = tc_policy_run_tests(pol, &topo.t, &err);
  bool pass = true;
  if (want_err) {
    if (!rc) {
      json_t *m = json_object_get(json_object_get(c, "saas_message"), "message");
      tc_buf_printf(why, "policy accepted, service rejected it: %s", m ? json_string_value(m) : "?");
      pass = false;
    }
    goto out;
  }
  if (rc) {
    tc_buf_printf(why, "policy rejected (%d:%d: %s)", err.line, err.col, err.msg);
    pass = false;
    goto out;
  }
  struct tc_policy_result *res;
  if (tc_policy_compile(pol, &topo.t, &res, &err)) {
    tc_buf_printf(why, "compile failed: %s", err.msg);
    pass = false;
    goto out;
  }
  json_t *expect = json_object_get(c, "expect");
  const char *node;
  json_t *e;
  json_object_foreach(expect, node, e) {
    size_t idx = topo.t.nnodes;
    for (size_t i = 0; i < topo.t.nnodes; i++)
      if (!strcmp(topo.names[i], node))
        idx = i;
    if (idx == topo.t.nnodes) {
      tc_buf_printf(why, "%s: node not in topology", node);
      pass = false;
      break;
    }
    const struct tc_policy_node_result *nr = &res->nodes[idx];
    /* packet filter */
    json_t *w = canon_filter(json_object_get(e, "packet_filter_rules"));
    json_t *g = canon_filter(nr->packet_filter);
    if (!json_equal(w, g)) {
      diff_note(why, node, "packet filter", w, g);
      pass = false;
    }
    json_decref(w);
    json_decref(g);
    /* peers and their AllowedIPs */
    json_t *wp = json_object(), *gp = json_object();
    size_t i;
    json_t *p;
    json_array_foreach(json_object_get(e, "peers"), i, p) {
      json_t *pr = json_object_get(p, "primary_routes");
      json_object_set_new(wp, json_string_value(json_object_get(p, "name")),
                          json_pack("{s:o,s:o}", "allowed_ips", sorted(json_object_get(p, "allowed_ips")),
                                    "primary_routes", pr ? sorted(pr) : json_array()));
    }
    for (size_t j = 0; j < nr->npeers; j++)
      json_object_set_new(gp, topo.names[tc_policy_peer_id(nr, j) - 1],
                          json_pack("{s:o,s:o}", "allowed_ips", sorted(tc_policy_peer_allowed_ips(nr, j)), "primary_routes",
                                    sorted(tc_policy_peer_primary_routes(nr, j))));
    if (!json_equal(wp, gp)) {
      diff_note(why, node, "peers/AllowedIPs/PrimaryRoutes", wp, gp);
      pass = false;
    }
    json_decref(wp);
    json_decref(gp);
    /* SSH policy */
    json_t *ws = canon_ssh(json_object_get(e, "ssh_policy"));
    json_t *gs = canon_ssh(nr->ssh_policy);
    if (!json_equal(ws, gs)) {
      diff_note(why, node, "ssh policy", ws, gs);
      pass = false;
    }
    json_decref(ws);
    json_decref(gs);
    /* node capabilities from nodeAttrs */
    json_t *wc = canon_caps(json_object_get(e, "self_cap_map"));
    json_t *gc = canon_caps(nr->cap_map);
    if (!json_equal(wc, gc)) {
      diff_note(why, node, "capabilities", wc, gc);
      pass = false;
    }
    json_decref(wc);
    json_decref(gc);
  }
  tc_policy_result_free(res);
out:
  tc_policy_free(pol);
  free_topo(&topo);
  free(text);
  return pass;
}

/* ---- driver ---------------------------------------------------------------- */
static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static char **list_dir(const char *path, bool dirs, size_t *n)
{
  *n = 0;
  DIR *d = opendir(path);
  if (!d)
    return NULL;
  char **v = NULL;
  struct dirent *de;
  while ((de = readdir(d))) {
    if (de->d_name[0] == '.')
      continue;
    size_t l = strlen(de->d_name);
    bool is_json = l > 5 && !strcmp(de->d_name + l - 5, ".json");
    char *full = tc_xasprintf("%s/%s", path, de->d_name);
    DIR *sub = opendir(full);
    bool is_dir = sub != NULL;
    if (sub)
      closedir(sub);
    free(full);
    if (dirs ? !is_dir : !is_json)
      continue;
    v = tc_xrealloc(v, (*n + 1) * sizeof(char *));
    v[(*n)++] = tc_xstrdup(de->d_name);
  }
  closedir(d);
  if (*n)
    qsort(v, *n, sizeof(char *), cmp_str);
  return v;
}

int main(int argc, char **argv)
{
  const char *dir = NULL, *baseline = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--baseline") && i + 1 < argc)
      baseline = argv[++i];
    else if (!strcmp(argv[i], "--verbose") || !strcmp(argv[i], "-v"))
      verbose = true;
    else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      printf("usage: %s [DIR] [--baseline FILE] [--verbose]\n", argv[0]);
      return 0;
    } else
      dir = argv[i];
  }
  char *dflt = NULL;
  if (!dir) {
    const char *shared = getenv("TC_SHARED_DIR");
    dflt = tc_xasprintf("%s/testdata/tailscale-policy-captures", shared && *shared ? shared : TC_SHARED_DIR_DEFAULT);
    dir = dflt;
  }
  size_t ncat;
  char **cats = list_dir(dir, true, &ncat);
  if (!cats) {
    fprintf(stderr, "policy-conformance: cannot read %s\n", dir);
    free(dflt);
    return 2;
  }
  int *passed = calloc(ncat + 1, sizeof(int)), *failed = calloc(ncat + 1, sizeof(int));
  int tp = 0, tf = 0;
  int64_t t0 = tc_mono_ms();
  for (size_t ci = 0; ci < ncat; ci++) {
    char *cdir = tc_xasprintf("%s/%s", dir, cats[ci]);
    size_t nf;
    char **files = list_dir(cdir, false, &nf);
    for (size_t fi = 0; fi < nf; fi++) {
      char *path = tc_xasprintf("%s/%s", cdir, files[fi]);
      json_error_t je;
      json_t *c = json_load_file(path, 0, &je);
      struct tc_buf why = TC_BUF_INIT;
      bool ok = c && run_case(c, &why);
      if (!c)
        tc_buf_printf(&why, "unreadable case: %s", je.text);
      if (ok) {
        passed[ci]++;
      } else {
        failed[ci]++;
        printf("FAIL %s/%s: %s\n", cats[ci], files[fi], why.data ? why.data : "?");
      }
      tc_buf_free(&why);
      json_decref(c);
      free(path);
      free(files[fi]);
    }
    free(files);
    free(cdir);
  }
  printf("\n");
  for (size_t ci = 0; ci < ncat; ci++) {
    printf("%s: %d passed, %d failed\n", cats[ci], passed[ci], failed[ci]);
    tp += passed[ci];
    tf += failed[ci];
  }
  printf("total: %d passed, %d failed (%lld ms)\n", tp, tf, (long long)(tc_mono_ms() - t0));
  int status = 0;
  if (baseline) {
    FILE *f = fopen(baseline, "r");
    if (!f) {
      fprintf(stderr, "policy-conformance: cannot read baseline %s\n", baseline);
      status = 1;
    } else {
      char line[256];
      while (fgets(line, sizeof(line), f)) {
        char cat[128];
        int want;
        if (line[0] == '#' || sscanf(line, "%127s %d", cat, &want) != 2)
          continue;
        int got = -1;
        for (size_t ci = 0; ci < ncat; ci++)
          if (!strcmp(cats[ci], cat))
            got = passed[ci];
        if (!strcmp(cat, "total"))
          got = tp;
        if (got < want) {
          printf("RATCHET: %s passes %d, baseline requires %d\n", cat, got, want);
          status = 1;
        }
      }
      fclose(f);
    }
  }
  for (size_t ci = 0; ci < ncat; ci++)
    free(cats[ci]);
  free(cats);
  free(passed);
  free(failed);
  free(dflt);
  return status;
}
