/* policy: Tailscale's policy language (as Headscale 0.29 accepts it) —
 * a HuJSON reader, parse + validate into an immutable tc_policy, and a
 * compiler that turns a policy plus a topology (users and nodes, given by the
 * caller) into what each node receives: packet filter, visible peers with
 * their AllowedIPs, SSH policy, node capabilities, and the routes that
 * autoApprovers approve.
 *
 * Pure library: no I/O, no globals, no knowledge of the model. The model
 * calls it; it never calls the model. A parsed tc_policy is immutable, so any
 * thread may compile or test against it concurrently; each call's result is
 * owned by that caller.
 *
 * JSON values use jansson and follow its convention: functions returning
 * json_t* hand the caller a new reference unless a comment says borrowed. */
#ifndef TC_POLICY_H
#define TC_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

/* Where and why a policy was refused. line/col are 1-based positions in the
 * policy text (0 when the error is not tied to a position, e.g. a failing
 * test or a reference to an unknown user). */
struct tc_policy_err {
  int code; /* TC_E* (TC_EINVAL for a bad policy) */
  int line, col;
  char msg[512];
};

/* ---- HuJSON --------------------------------------------------------------- */
/* Parses HuJSON (JSON plus // and block comments and trailing commas) into a
 * jansson value. Returns a new reference, or NULL with err set (line:col of
 * the problem). text need not be NUL-terminated. */
json_t *tc_hujson_parse(const char *text, size_t len, struct tc_policy_err *err);
/* Rewrites HuJSON into standard JSON of the same length: comments and
 * trailing commas become spaces, newlines are kept so positions stay valid.
 * Returns an owned NUL-terminated buffer, or NULL with err set (unterminated
 * comment or string). */
char *tc_hujson_standardize(const char *text, size_t len, struct tc_policy_err *err);

/* ---- topology (input) ------------------------------------------------------ */
struct tc_policy_user {
  int64_t id;           /* > 0 */
  const char *name;     /* login name, matched by "name@" */
  const char *email;    /* may be NULL; matched by "email" */
};

struct tc_policy_node {
  int64_t id;                /* > 0, unique */
  const char *hostname;      /* given name */
  int64_t user_id;           /* owner; ignored for identity when tagged */
  const char *const *tags;   /* "tag:x"; ntags == 0 means user-owned */
  size_t ntags;
  const char *ipv4;          /* text, may be NULL */
  const char *ipv6;          /* text, may be NULL */
  const char *const *announced; /* advertised routes (Hostinfo.RoutableIPs), CIDR text */
  size_t nannounced;
  const char *const *approved;  /* approved routes, CIDR text */
  size_t napproved;
};

/* Borrowed arrays; the compiler copies what it keeps. */
struct tc_policy_topo {
  const struct tc_policy_user *users;
  size_t nusers;
  const struct tc_policy_node *nodes;
  size_t nnodes;
  /* Base URL for SSH "check" actions (HoldAndDelegate); NULL = "https://unused". */
  const char *control_url;
  /* The caller reads only filters, SSH policies, CapMaps and peers (the
   * mapper): self_allowed_ips, primary_routes and auto_approved are left
   * NULL, which saves their memory and time on every recompile. */
  bool no_node_extras;
};

/* ---- policy ---------------------------------------------------------------- */
struct tc_policy; /* opaque, immutable after parse */

/* Parses and validates policy text. Empty text (or only whitespace and
 * comments, or "{}") is Headscale's "no policy": allow all (SrcIPs "*"),
 * everyone sees everyone. A policy with other sections but neither `acls`
 * nor `grants` gets the coordination service's default rule {src:*, dst:*:*}.
 * On success *out is an owned policy (free with tc_policy_free). On failure
 * returns TC_EINVAL with err saying where (line:col when known) and why.
 * Does not run the policy's tests (see tc_policy_run_tests). */
int tc_policy_parse(const char *text, size_t len, struct tc_policy **out, struct tc_policy_err *err);
void tc_policy_free(struct tc_policy *pol);
/* True when the policy is the empty allow-all policy. */
bool tc_policy_is_allow_all(const struct tc_policy *pol);

/* Canonical JSON of the policy (keys sorted, comments and trailing commas
 * dropped, two-space indent) appended to buf as a NUL-terminated string;
 * parsing it again gives an equal policy and the same print. Returns 0. */
struct tc_buf;
int tc_policy_print(const struct tc_policy *pol, struct tc_buf *buf);

/* ---- compile ---------------------------------------------------------------- */
/* What one node receives. All json_t fields are owned by the result. */
struct tc_policy_node_result {
  int64_t node_id;
  json_t *packet_filter; /* array of tailcfg.FilterRule (SrcIPs, DstPorts, IPProto, CapGrant); read-only:
                          * nodes with equal filter inputs share one array (same pointer), and SrcIPs
                          * arrays and DstPorts entries may be shared between rules and nodes */
  /* Peers this node may see (in topology order), with the AllowedIPs it
   * installs for each: addresses, the primary subnet routes it may use (or
   * exchange traffic with), approved exit routes. Read them through
   * tc_policy_peer_id / _allowed_ips / _primary_routes / tc_policy_peer_find
   * (k in [0, npeers)): nodes that see the same set of nodes share one
   * stored list (which may hold the node itself, skipped by the accessors),
   * so the result grows with the number of distinct views, not N^2. */
  size_t npeers;
  const struct tc_policy_peers *peers; /* shared; NULL when npeers == 0 */
  size_t peers_self;                   /* position of the node itself in peers, or SIZE_MAX */
  json_t **hole_allowed_ips;    /* per peers->holes entry: this viewer's AllowedIPs (NULL at peers_self) */
  json_t **hole_primary_routes; /* likewise, PrimaryRoutes */
  json_t *ssh_policy;        /* {"rules":[...]} tailcfg.SSHPolicy lowercase shape; NULL if no ssh section;
                              * may be shared by nodes of the same identity: read-only */
  json_t *cap_map;           /* object: node capability -> array|null, from nodeAttrs (+ randomizeClientPort) */
  json_t *self_allowed_ips;  /* array: own addresses, approved subnet routes it serves, approved exit routes */
  json_t *primary_routes;    /* array: subnet routes this node is primary for (tailnet-wide election) */
  json_t *auto_approved;     /* array: announced routes autoApprovers approve for this node */
                             /* these four are read-only: equal values are shared with the previous
                              * result, and empty ones by every node of a result */
  uint64_t filter_sig;       /* internal (incremental compile): what packet_filter was built from; 0 = unknown */
  /* Compact JSON text of packet_filter and ssh_policy: json_dumps(v, JSON_COMPACT) byte for byte,
   * NUL-terminated, owned by the result. Shared like the objects: nodes with the same packet_filter
   * pointer have the same filter_text pointer, and an incremental compile that hands a node the
   * previous result's object hands it that result's text too (so equal pointers across the two
   * results mean equal text; unequal pointers may still hold equal text). ssh_text is NULL when
   * ssh_policy is. Rendering shares the repeated parts (SrcIPs arrays, destination entries), so
   * this is far cheaper than dumping every node's filter. */
  const char *filter_text;
  size_t filter_len;
  const char *ssh_text;
  size_t ssh_len;
  /* internal (incremental compile): what this node's filter and reachability were built from */
  uint64_t input_hash;
  struct pol_reach_block *reach_blk; /* refcounted, shared with the next result when the node is skipped */
  bool reach_ok, reach_all;
};

/* Runs of a filter_text that are the text of a value shared with other nodes'
 * filters (a SrcIPs array, a shared rule part), at least 256 bytes each: the
 * bytes at text + off, len bytes, equal the NUL-terminated `shared`. Under a
 * policy where one user owns many devices most of every node's filter is
 * such a run (e.g. 36 of 37 KB at N = 1000), the same for all nodes, so a
 * consumer can compress or otherwise process it once per compile: `shared`
 * is a stable key (same pointer = same bytes) for as long as a result that
 * holds the text lives. Spans are ascending and do not overlap. Returns how
 * many; *out (borrowed, owned with the text) is NULL when none. text must be
 * a filter_text or ssh_text of a result (not a copy). */
struct tc_policy_text_span {
  size_t off, len;
  const char *shared;
};
size_t tc_policy_text_spans(const char *text, const struct tc_policy_text_span **out);

/* One stored peer list, shared by the nodes of a result that see the same
 * nodes (read-only; owned by the result). AllowedIPs that do not depend on
 * the viewer are shared entries; the rest (subnet routers, whose routes are
 * filtered by what the viewer may reach) are holes: NULL here, and each
 * viewer's own value sits in its hole_* arrays. */
struct tc_policy_peers {
  size_t refs;
  size_t n;
  bool sorted;              /* ids ascending: tc_policy_peer_find bisects */
  int64_t *ids;
  json_t **allowed_ips;     /* n entries, NULL at holes */
  json_t **primary_routes;  /* n entries, NULL at holes */
  size_t nholes;
  size_t *holes;            /* ascending positions of the holes */
  size_t *hole_nodes;       /* internal: topology index of each hole's peer */
};

static inline size_t tc_policy_peer_pos_(const struct tc_policy_node_result *nr, size_t k)
{
  return k < nr->peers_self ? k : k + 1;
}

static inline size_t tc_policy_peer_hole_(const struct tc_policy_peers *p, size_t pos)
{
  size_t lo = 0, hi = p->nholes;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (p->holes[mid] < pos)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

/* Id of the k-th peer (k < npeers). */
static inline int64_t tc_policy_peer_id(const struct tc_policy_node_result *nr, size_t k)
{
  return nr->peers->ids[tc_policy_peer_pos_(nr, k)];
}

/* Borrowed: the AllowedIPs array this node installs for its k-th peer. */
static inline json_t *tc_policy_peer_allowed_ips(const struct tc_policy_node_result *nr, size_t k)
{
  size_t pos = tc_policy_peer_pos_(nr, k);
  json_t *v = nr->peers->allowed_ips[pos];
  return v ? v : nr->hole_allowed_ips[tc_policy_peer_hole_(nr->peers, pos)];
}

/* Borrowed: the k-th peer's subnet routes this node installs (PrimaryRoutes). */
static inline json_t *tc_policy_peer_primary_routes(const struct tc_policy_node_result *nr, size_t k)
{
  size_t pos = tc_policy_peer_pos_(nr, k);
  json_t *v = nr->peers->primary_routes[pos];
  return v ? v : nr->hole_primary_routes[tc_policy_peer_hole_(nr->peers, pos)];
}

/* Index k of peer id among nr's peers, or -1 (O(log n) when the topology
 * was given in id order, as the mapper does; linear otherwise). */
long tc_policy_peer_find(const struct tc_policy_node_result *nr, int64_t id);

struct tc_policy_result {
  size_t nnodes; /* same order as topo->nodes */
  struct tc_policy_node_result *nodes;
  size_t ngroups; /* distinct identity groups the compiler computed (for tests/bench) */
  size_t nreused; /* packet filters taken over from the previous result (incremental compile) */
  size_t nskipped; /* of those, nodes whose rules were not evaluated at all (inputs and rules unchanged) */
  size_t npeer_lists;   /* distinct stored peer lists (for tests/bench) */
  size_t npeer_entries; /* entries stored across them (sum of their n) */
  uint64_t policy_uid; /* internal: which parsed policy produced it */
  struct pol_src_cache *src_cache; /* internal: its SrcIPs arrays by address ranges, for the next compile */
  /* internal: each rule's SrcIPs array (by global rule index) and each autogroup:self source array
   * (grant x user index), referenced, and the users' ids, for the next incremental compile */
  json_t **rule_src;
  size_t nrule_src;
  json_t **self_src;
  size_t nself_src;
  int64_t *user_ids;
  size_t nuser_ids;
};

/* Compiles pol against topo. *out is owned (tc_policy_result_free).
 * Announced routes count as approved when listed in `approved` or approved
 * by autoApprovers; among routers serving the same route the lowest node id
 * (first registered) is primary. Grants resolve once for the tailnet; nodes
 * the policy treats alike (same user or tags, routes) share rule
 * applicability and SSH policy; only address-dependent parts are computed
 * per node. Returns 0, or TC_EINVAL when the topology is malformed (bad
 * address text). */
int tc_policy_compile(const struct tc_policy *pol, const struct tc_policy_topo *topo,
                      struct tc_policy_result **out, struct tc_policy_err *err);
void tc_policy_result_free(struct tc_policy_result *res);
/* Same output as tc_policy_compile, reusing prev (an earlier result of a
 * compile of the same pol, or NULL): a node whose filter would be built
 * from exactly the same inputs (its own addresses and routes, the rules
 * that apply to it, their SrcIPs content and the destination entries kept)
 * gets prev's packet_filter (shared, read-only) instead of a new one. The
 * caller keeps prev and may free it afterwards. Meant for the mapper, which
 * recompiles on every topology change: a join changes few nodes' filters.
 * A prev from another tc_policy (even with the same text) reuses nothing;
 * policies with via grants are always compiled in full. */
int tc_policy_compile_incremental(const struct tc_policy *pol, const struct tc_policy_topo *topo,
                                  const struct tc_policy_result *prev, struct tc_policy_result **out,
                                  struct tc_policy_err *err);
/* ---- comparing two results (the mapper, after a recompile) ---------------------- */
/* Whether a viewer's set of peers changed between two results, other than in
 * a given set of node ids (the nodes a change touched, which the mapper sends
 * on their own). Viewers share stored peer lists, so the answer is worked out
 * once per distinct pair of stored lists (one merge walk) and then costs
 * O(1) per viewer: O(N x distinct pairs) per change instead of O(N^2).
 *
 *   struct tc_policy_peers_cmp *c = tc_policy_peers_cmp_new(ids, nids);
 *   for each viewer: changed = tc_policy_peers_differ(c, old_r, new_r);
 *   tc_policy_peers_cmp_free(c);
 *
 * skip: ascending node ids, borrowed until _free. a and b: the same node's
 * entries in the old and the new result (either may be NULL: no peers); the
 * results must outlive the comparer. Returns true when some node other than
 * the viewer and the skipped ones is a peer in one and not in the other.
 * One comparer per thread; it only reads the results. */
struct tc_policy_peers_cmp;
struct tc_policy_peers_cmp *tc_policy_peers_cmp_new(const int64_t *skip, size_t nskip);
bool tc_policy_peers_differ(struct tc_policy_peers_cmp *c, const struct tc_policy_node_result *a,
                            const struct tc_policy_node_result *b);
/* Distinct stored-list pairs walked so far (for tests). */
size_t tc_policy_peers_cmp_walks(const struct tc_policy_peers_cmp *c);
void tc_policy_peers_cmp_free(struct tc_policy_peers_cmp *c);

/* Borrowed pointer to the result for node id, or NULL. */
const struct tc_policy_node_result *tc_policy_result_node(const struct tc_policy_result *res, int64_t id);

/* Routes in `announced` that autoApprovers approve for node (by its user,
 * groups and tags). Returns a new JSON array of prefix strings. */
json_t *tc_policy_auto_approve(const struct tc_policy *pol, const struct tc_policy_topo *topo,
                               const struct tc_policy_node *node);

/* ---- tests and the live editor ------------------------------------------------ */
/* Checks what needs the tailnet (SSH `user:*@domain` and `localpart:*@domain`
 * must name the tailnet's domain: the lowest-id user's email domain), then
 * runs the policy's `tests` and `sshTests` against topo. 0 when all pass;
 * TC_EINVAL with err naming the first failure ("test(s) failed: ...")
 * otherwise. A policy must pass this before it replaces the current one. */
int tc_policy_run_tests(const struct tc_policy *pol, const struct tc_policy_topo *topo,
                        struct tc_policy_err *err);
/* Parse + validate + run tests, for the GUI's live editor. 0 or TC_EINVAL. */
int tc_policy_check(const char *text, size_t len, const struct tc_policy_topo *topo,
                    struct tc_policy_err *err);

#endif
