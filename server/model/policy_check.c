/* policy_check: the tailnet as the policy engine sees it (built from a
 * snapshot), and a policy's own `tests` and `sshTests` run against it. Every path that accepts a policy
 * (REST API, CLI through the API, a policy file reload) calls this before
 * tc_model_policy_set, so a policy whose tests fail never replaces the one
 * in force. Any thread may call it; it only reads a snapshot. */
#include <arpa/inet.h>
#include <stdlib.h>

#include "model/model.h"
#include "policy/policy.h"

void tc_model_topo_build(const struct tc_snapshot *s, struct tc_model_topo *t) {
  struct tc_policy_user *users = tc_xcalloc(s->n_users + 1, sizeof *users);
  for (size_t i = 0; i < s->n_users; i++)
    users[i] = (struct tc_policy_user){s->users[i]->id, s->users[i]->name, s->users[i]->email};
  struct tc_policy_node *nodes = tc_xcalloc(s->n_nodes + 1, sizeof *nodes);
  t->ip4 = tc_xcalloc(s->n_nodes + 1, sizeof *t->ip4);
  t->ip6 = tc_xcalloc(s->n_nodes + 1, sizeof *t->ip6);
  for (size_t i = 0; i < s->n_nodes; i++) {
    const struct tc_node *n = s->nodes[i];
    nodes[i] = (struct tc_policy_node){.id = n->id, .hostname = n->given_name, .user_id = n->user_id,
                                       .tags = (const char *const *)n->tags.v, .ntags = n->tags.n,
                                       .announced = (const char *const *)n->announced_routes.v,
                                       .nannounced = n->announced_routes.n,
                                       .approved = (const char *const *)n->approved_routes.v,
                                       .napproved = n->approved_routes.n};
    if (n->has_ipv4) nodes[i].ipv4 = inet_ntop(AF_INET, n->ipv4, t->ip4[i], sizeof t->ip4[i]);
    if (n->has_ipv6) nodes[i].ipv6 = inet_ntop(AF_INET6, n->ipv6, t->ip6[i], sizeof t->ip6[i]);
  }
  t->users = users;
  t->nodes = nodes;
  t->topo = (struct tc_policy_topo){.users = users, .nusers = s->n_users, .nodes = nodes, .nnodes = s->n_nodes};
}

void tc_model_topo_free(struct tc_model_topo *t) {
  if (!t) return;
  free(t->users);
  free(t->nodes);
  free(t->ip4);
  free(t->ip6);
  t->users = NULL;
  t->nodes = NULL;
  t->ip4 = NULL;
  t->ip6 = NULL;
}

int tc_model_policy_test(struct tc_model *m, const char *text, size_t len, struct tc_err *err) {
  struct tc_policy *pol = NULL;
  struct tc_policy_err pe = {0};
  /* Parse errors are reported (with line and column) by the validate hook
   * that tc_model_policy_set runs; here only a parsed policy is tested. */
  if (tc_policy_parse(text, len, &pol, &pe)) return TC_OK;
  struct tc_snapshot *s = tc_model_snapshot(m);
  struct tc_model_topo t;
  tc_model_topo_build(s, &t);
  int rc = tc_policy_run_tests(pol, &t.topo, &pe);
  if (rc) tc_err_set(err, rc, "policy: %s", pe.msg);
  tc_model_topo_free(&t);
  tc_snapshot_release(s);
  tc_policy_free(pol);
  return rc;
}
