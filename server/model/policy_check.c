/* policy_check: a policy's own `tests` and `sshTests` run against the
 * tailnet as the current snapshot has it. Every path that accepts a policy
 * (REST API, CLI through the API, a policy file reload) calls this before
 * tc_model_policy_set, so a policy whose tests fail never replaces the one
 * in force. Any thread may call it; it only reads a snapshot. */
#include <arpa/inet.h>
#include <stdlib.h>

#include "model/model.h"
#include "policy/policy.h"

int tc_model_policy_test(struct tc_model *m, const char *text, size_t len, struct tc_err *err) {
  struct tc_policy *pol = NULL;
  struct tc_policy_err pe = {0};
  /* Parse errors are reported (with line and column) by the validate hook
   * that tc_model_policy_set runs; here only a parsed policy is tested. */
  if (tc_policy_parse(text, len, &pol, &pe)) return TC_OK;
  struct tc_snapshot *s = tc_model_snapshot(m);
  struct tc_policy_user *users = tc_xcalloc(s->n_users + 1, sizeof *users);
  for (size_t i = 0; i < s->n_users; i++)
    users[i] = (struct tc_policy_user){s->users[i]->id, s->users[i]->name, s->users[i]->email};
  struct tc_policy_node *nodes = tc_xcalloc(s->n_nodes + 1, sizeof *nodes);
  char (*ip4)[INET_ADDRSTRLEN] = tc_xcalloc(s->n_nodes + 1, sizeof *ip4);
  char (*ip6)[INET6_ADDRSTRLEN] = tc_xcalloc(s->n_nodes + 1, sizeof *ip6);
  for (size_t i = 0; i < s->n_nodes; i++) {
    const struct tc_node *n = s->nodes[i];
    nodes[i] = (struct tc_policy_node){.id = n->id, .hostname = n->given_name, .user_id = n->user_id,
                                       .tags = (const char *const *)n->tags.v, .ntags = n->tags.n,
                                       .announced = (const char *const *)n->announced_routes.v,
                                       .nannounced = n->announced_routes.n,
                                       .approved = (const char *const *)n->approved_routes.v,
                                       .napproved = n->approved_routes.n};
    if (n->has_ipv4) nodes[i].ipv4 = inet_ntop(AF_INET, n->ipv4, ip4[i], INET_ADDRSTRLEN);
    if (n->has_ipv6) nodes[i].ipv6 = inet_ntop(AF_INET6, n->ipv6, ip6[i], INET6_ADDRSTRLEN);
  }
  struct tc_policy_topo topo = {.users = users, .nusers = s->n_users, .nodes = nodes, .nnodes = s->n_nodes};
  int rc = tc_policy_run_tests(pol, &topo, &pe);
  if (rc) tc_err_set(err, rc, "policy: %s", pe.msg);
  free(users);
  free(nodes);
  free(ip4);
  free(ip6);
  tc_snapshot_release(s);
  tc_policy_free(pol);
  return rc;
}
