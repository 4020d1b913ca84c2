/* bench-policy: compile cost for a large tailnet. 1,000 nodes, 50 users,
 * 20 tags, a 200-rule policy (ACLs over users, groups, tags, hosts and
 * autogroups, some SSH rules). Reports the full compile for all nodes and
 * the incremental cost of one node joining (a full recompile with one more
 * node, which is what the model does today), plus the live-editor check.
 * Usage: bench-policy [nodes] [rounds] [star | POLICY-FILE] [proto]
 * "proto" builds bench-proto's tailnet instead: one user ("bench"), untagged
 * nodes numbered from 100.64.0.1 as the model's sequential allocator gives. */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/base.h"
#include "policy/policy.h"

static char *make_policy(int nusers, int ntags, int nrules)
{
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_puts(&b, "{\n  // generated benchmark policy\n  \"groups\": {\n");
  for (int g = 0; g < 10; g++) {
    tc_buf_printf(&b, "    \"group:g%d\": [", g);
    for (int u = g; u < nusers; u += 10)
      tc_buf_printf(&b, "%s\"user%d@\"", u == g ? "" : ", ", u);
    tc_buf_puts(&b, "],\n");
  }
  tc_buf_puts(&b, "  },\n  \"hosts\": {\"lan\": \"192.168.0.0/16\", \"db\": \"100.64.3.7\"},\n  \"tagOwners\": {\n");
  for (int t = 0; t < ntags; t++)
    tc_buf_printf(&b, "    \"tag:t%d\": [\"group:g%d\"],\n", t, t % 10);
  tc_buf_puts(&b, "  },\n  \"autoApprovers\": {\"routes\": {\"10.0.0.0/8\": [\"tag:t0\"]}, \"exitNode\": [\"tag:t1\"]},\n");
  tc_buf_puts(&b, "  \"acls\": [\n");
  for (int r = 0; r < nrules; r++) {
    const char *proto = r % 7 == 0 ? "\"proto\": \"tcp\", " : "";
    switch (r % 6) {
    case 0:
      tc_buf_printf(&b, "    {\"action\": \"accept\", %s\"src\": [\"group:g%d\"], \"dst\": [\"tag:t%d:%d\"]},\n", proto,
                    r % 10, r % ntags, 1000 + r);
      break;
    case 1:
      tc_buf_printf(&b, "    {\"action\": \"accept\", %s\"src\": [\"user%d@\"], \"dst\": [\"user%d@:22,80\"]},\n", proto,
                    r % nusers, (r * 7) % nusers);
      break;
    case 2:
      tc_buf_printf(&b, "    {\"action\": \"accept\", \"src\": [\"tag:t%d\"], \"dst\": [\"tag:t%d:*\", \"db:5432\"]},\n",
                    r % ntags, (r + 3) % ntags);
      break;
    case 3:
      tc_buf_printf(&b, "    {\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"autogroup:self:%d\"]},\n",
                    2000 + r);
      break;
    case 4:
      tc_buf_printf(&b, "    {\"action\": \"accept\", \"src\": [\"group:g%d\", \"lan\"], \"dst\": [\"10.%d.0.0/16:*\"]},\n",
                    r % 10, r % 50);
      break;
    default:
      tc_buf_printf(&b, "    {\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"tag:t%d:443\"]},\n", r % ntags);
      break;
    }
  }
  tc_buf_puts(&b, "  ],\n  \"ssh\": [\n");
  tc_buf_puts(&b, "    {\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"autogroup:self\"], \"users\": "
                  "[\"autogroup:nonroot\", \"root\"]},\n");
  tc_buf_puts(&b, "    {\"action\": \"check\", \"src\": [\"group:g0\"], \"dst\": [\"tag:t2\"], \"users\": [\"root\"]},\n");
  tc_buf_puts(&b, "  ],\n  // the policy's own tests, as the live editor runs them\n  \"tests\": [\n");
  for (int r = 0; r < nrules; r += 12)
    tc_buf_printf(&b, "    {\"src\": \"user%d@\", \"accept\": [\"tag:t%d:%d\"], \"deny\": [\"tag:t%d:9\"]},\n", r % 10,
                  r % ntags, 1000 + r, r % ntags);
  tc_buf_puts(&b, "  ],\n}\n");
  return tc_buf_steal(&b, NULL);
}

struct world {
  struct tc_policy_user *users;
  struct tc_policy_node *nodes;
  char (*ip4)[20], (*ip6)[40], (*host)[16];
  const char **tagnames;
  const char *route[2];
};

static void make_world(struct world *w, int nusers, int ntags, int nnodes, bool proto)
{
  w->users = calloc((size_t)nusers, sizeof(*w->users));
  for (int u = 0; u < nusers; u++) {
    w->users[u].id = u + 1;
    w->users[u].name = proto ? tc_xstrdup("bench") : tc_xasprintf("user%d", u);
    w->users[u].email = proto ? NULL : tc_xasprintf("user%d@example.com", u);
  }
  w->tagnames = calloc((size_t)ntags, sizeof(char *));
  for (int t = 0; t < ntags; t++)
    w->tagnames[t] = tc_xasprintf("tag:t%d", t);
  w->route[0] = "10.1.0.0/16";
  w->route[1] = "0.0.0.0/0";
  w->nodes = calloc((size_t)nnodes, sizeof(*w->nodes));
  w->ip4 = calloc((size_t)nnodes, sizeof(*w->ip4));
  w->ip6 = calloc((size_t)nnodes, sizeof(*w->ip6));
  w->host = calloc((size_t)nnodes, sizeof(*w->host));
  for (int i = 0; i < nnodes; i++) {
    struct tc_policy_node *n = &w->nodes[i];
    n->id = i + 1;
    snprintf(w->host[i], sizeof(w->host[i]), "n%d", i);
    n->hostname = w->host[i];
    snprintf(w->ip4[i], sizeof(w->ip4[i]), "100.64.%d.%d", i / 250, 1 + i % 250);
    if (proto)
      snprintf(w->ip4[i], sizeof(w->ip4[i]), "100.64.%d.%d", (i + 1) / 256, (i + 1) % 256);
    snprintf(w->ip6[i], sizeof(w->ip6[i]), "fd7a:115c:a1e0::%x", i + 1);
    n->ipv4 = w->ip4[i];
    n->ipv6 = w->ip6[i];
    if (proto) {
      n->user_id = 1;
    } else if (i % 4 == 0) { /* a quarter of the nodes are tagged servers */
      n->tags = &w->tagnames[i % ntags];
      n->ntags = 1;
      if (i % 40 == 0) {
        n->announced = w->route;
        n->nannounced = 2;
      }
    } else {
      n->user_id = 1 + i % nusers;
    }
  }
}

/* FNV-1a over the canonical JSON of everything a compile returns: lets a
 * change to the compiler be checked for identical output on this tailnet
 * (BENCH_DIGEST=1). */
static uint64_t fnv(uint64_t h, const char *s)
{
  for (; s && *s; s++)
    h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
  return h * 0x100000001b3ull;
}

static uint64_t json_fnv(uint64_t h, const json_t *j)
{
  char *t = j ? json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
  h = fnv(h, t ? t : "null");
  free(t);
  return h;
}

static uint64_t result_digest(const struct tc_policy_result *res)
{
  uint64_t h = 0xcbf29ce484222325ull;
  char b[32];
  for (size_t i = 0; i < res->nnodes; i++) {
    const struct tc_policy_node_result *n = &res->nodes[i];
    snprintf(b, sizeof b, "%lld/%zu", (long long)n->node_id, n->npeers);
    h = fnv(h, b);
    h = json_fnv(h, n->packet_filter);
    for (size_t k = 0; k < n->npeers; k++) {
      snprintf(b, sizeof b, "%lld", (long long)tc_policy_peer_id(n, k));
      h = fnv(h, b);
      h = json_fnv(h, tc_policy_peer_allowed_ips(n, k));
      h = json_fnv(h, tc_policy_peer_primary_routes(n, k));
    }
    h = json_fnv(h, n->ssh_policy);
    h = json_fnv(h, n->cap_map);
    h = json_fnv(h, n->self_allowed_ips);
    h = json_fnv(h, n->primary_routes);
    h = json_fnv(h, n->auto_approved);
  }
  return h;
}

/* How many existing nodes a join changes (BENCH_DIGEST=1): what an exact
 * incremental compile could at best skip. */
static void join_changes(const struct tc_policy_result *a, const struct tc_policy_result *b)
{
  size_t filters = 0, peers = 0, ssh = 0;
  for (size_t i = 0; i < a->nnodes && i < b->nnodes; i++) {
    const struct tc_policy_node_result *x = &a->nodes[i], *y = &b->nodes[i];
    char *fx = json_dumps(x->packet_filter, JSON_COMPACT), *fy = json_dumps(y->packet_filter, JSON_COMPACT);
    filters += strcmp(fx ? fx : "", fy ? fy : "") != 0;
    free(fx);
    free(fy);
    peers += x->npeers != y->npeers;
    ssh += !json_equal(x->ssh_policy, y->ssh_policy) && (x->ssh_policy || y->ssh_policy);
  }
  printf("join changes: filters of %zu, peer lists of %zu, SSH policies of %zu of %zu existing nodes\n", filters,
         peers, ssh, a->nnodes);
}

/* Process CPU time, not wall time: the build machine is shared, and waiting
 * for a core is not the compiler's cost. */
static int64_t cpu_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double ms_since(int64_t t0) { return (double)(cpu_ns() - t0) / 1e6; }

int main(int argc, char **argv)
{
  int nnodes = argc > 1 ? atoi(argv[1]) : 1000;
  int rounds = argc > 2 ? atoi(argv[2]) : 3;
  const int ntags = 20, nrules = 200;
  bool proto = argc > 4 && !strcmp(argv[4], "proto");
  const int nusers = proto ? 1 : 50;
  char *text = make_policy(nusers, ntags, nrules);
  /* "star": bench-proto's one-rule policy (everyone sees everyone) */
  if (argc > 3 && !strcmp(argv[3], "star")) {
    free(text);
    text = tc_xstrdup("{\"acls\":[{\"action\":\"accept\",\"src\":[\"*\"],\"dst\":[\"*:*\"]}]}\n");
  } else if (argc > 3) {
    free(text);
    size_t tl;
    struct tc_err ferr = {0};
    if (tc_read_file(argv[3], 1 << 20, &text, &tl, &ferr)) {
      fprintf(stderr, "%s: %s\n", argv[3], ferr.msg);
      return 1;
    }
  }
  int lines = 0;
  for (const char *p = text; *p; p++)
    lines += *p == '\n';
  struct world w;
  make_world(&w, nusers, ntags, nnodes + 1, proto);
  struct tc_policy_topo topo = {w.users, (size_t)nusers, w.nodes, (size_t)nnodes, NULL};
  struct tc_policy *pol;
  struct tc_policy_err err;
  int64_t t0 = cpu_ns();
  if (tc_policy_parse(text, strlen(text), &pol, &err)) {
    fprintf(stderr, "parse: %d:%d %s\n", err.line, err.col, err.msg);
    return 1;
  }
  double parse_ms = ms_since(t0);
  int rc = 0;
  double check_ms = 1e18;
  for (int r = 0; r < rounds; r++) {
    t0 = cpu_ns();
    rc = tc_policy_check(text, strlen(text), &topo, &err);
    double c = ms_since(t0);
    if (c < check_ms)
      check_ms = c;
  }
  if (rc)
    fprintf(stderr, "check: %s\n", err.msg);
  double best_full = 1e18, best_join = 1e18, best_inc = 1e18;
  size_t reused = 0, skipped = 0, heap = 0, lists = 0, entries = 0;
  double best_free = 1e18;
  size_t groups = 0, rules_total = 0, peers_total = 0;
  for (int r = 0; r < rounds; r++) {
    struct tc_policy_result *res;
    topo.nnodes = (size_t)nnodes;
    size_t heap0 = mallinfo2().uordblks;
    t0 = cpu_ns();
    tc_policy_compile(pol, &topo, &res, &err);
    double full = ms_since(t0);
    heap = mallinfo2().uordblks - heap0;
    lists = res->npeer_lists;
    entries = res->npeer_entries;
    if (full < best_full)
      best_full = full;
    groups = res->ngroups;
    if (r == 0 && getenv("BENCH_DIGEST")) {
      printf("digest: %016llx\n", (unsigned long long)result_digest(res));
      size_t bad = 0;
      for (size_t i = 0; i < res->nnodes; i++) {
        char *f = json_dumps(res->nodes[i].packet_filter, JSON_COMPACT);
        char *sh = res->nodes[i].ssh_policy ? json_dumps(res->nodes[i].ssh_policy, JSON_COMPACT) : NULL;
        bad += !f || !res->nodes[i].filter_text || strcmp(f, res->nodes[i].filter_text) ||
               (sh ? !res->nodes[i].ssh_text || strcmp(sh, res->nodes[i].ssh_text) : res->nodes[i].ssh_text != NULL);
        free(f);
        free(sh);
      }
      printf("filter/SSH texts equal to json_dumps: %s (%zu differ)\n", bad ? "NO" : "yes", bad);
    }
    rules_total = peers_total = 0;
    for (size_t i = 0; i < res->nnodes; i++) {
      rules_total += json_array_size(res->nodes[i].packet_filter);
      peers_total += res->nodes[i].npeers;
    }
    struct tc_policy_result *before = res;
    topo.nnodes = (size_t)nnodes + 1; /* one node joins */
    t0 = cpu_ns();
    tc_policy_compile(pol, &topo, &res, &err);
    double join = ms_since(t0);
    if (join < best_join)
      best_join = join;
    if (r == 0 && getenv("BENCH_DIGEST"))
      join_changes(before, res);
    /* the same join, reusing the previous result's unchanged filters */
    struct tc_policy_result *inc = NULL;
    t0 = cpu_ns();
    tc_policy_compile_incremental(pol, &topo, before, &inc, &err);
    double ij = ms_since(t0);
    if (ij < best_inc)
      best_inc = ij;
    reused = inc->nreused;
    skipped = inc->nskipped;
    if (r == 0 && getenv("BENCH_DIGEST"))
      printf("incremental join digest %s full join digest (%zu filters reused)\n",
             result_digest(inc) == result_digest(res) ? "==" : "!=", inc->nreused);
    tc_policy_result_free(inc);
    tc_policy_result_free(before);
    t0 = cpu_ns();
    tc_policy_result_free(res);
    double fr = ms_since(t0);
    if (fr < best_free)
      best_free = fr;
  }
  printf("policy: %d lines, %d rules; tailnet: %d nodes, %d users, %d tags (times: process CPU)\n", lines, nrules,
         nnodes, nusers, ntags);
  printf("parse+validate:            %8.2f ms\n", parse_ms);
  printf("check (parse+tests):       %8.2f ms (rc %d, best of %d)\n", check_ms, rc, rounds);
  printf("full compile, all nodes:   %8.2f ms (best of %d; %zu identity groups, %zu filter rules, %zu peer entries)\n",
         best_full, rounds, groups, rules_total, peers_total);
  printf("one node joins (recompile): %7.2f ms\n", best_join);
  printf("result heap:               %8.2f MiB (%zu stored peer lists, %zu stored entries)\n",
         (double)heap / (1 << 20), lists, entries);
  printf("free a result:             %8.2f ms\n", best_free);
  printf("one node joins (incremental): %5.2f ms (%zu of %d filters reused, %zu nodes not evaluated)\n", best_inc,
         reused, nnodes + 1, skipped);
  tc_policy_free(pol);
  free(text);
  for (int u = 0; u < nusers; u++) {
    free((void *)w.users[u].name);
    free((void *)w.users[u].email);
  }
  for (int t = 0; t < ntags; t++)
    free((void *)w.tagnames[t]);
  free(w.tagnames);
  free(w.users);
  free(w.nodes);
  free(w.ip4);
  free(w.ip6);
  free(w.host);
  return 0;
}
