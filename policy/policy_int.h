/* policy internals shared by the policy/ sources only: address sets, the
 * parsed policy representation, and helpers. Not for other modules. */
#ifndef TC_POLICY_INT_H
#define TC_POLICY_INT_H

#include "base/base.h"
#include "policy/policy.h"

typedef unsigned __int128 tc_u128;

/* An inclusive address range within one family (v6 = 0: IPv4 in the low 32 bits). */
struct ip_range {
  uint8_t v6;
  tc_u128 lo, hi;
};

/* A set of addresses: after ipset_norm, ranges are sorted (v4 first) and
 * disjoint and non-adjacent. */
struct ipset {
  struct ip_range *r;
  size_t n, cap;
  bool sorted; /* sorted and disjoint: lookups may binary-search */
};

void pol_ipset_init(struct ipset *s);
void pol_ipset_free(struct ipset *s);
void pol_ipset_add(struct ipset *s, struct ip_range r);
void pol_ipset_add_set(struct ipset *s, const struct ipset *o);
void pol_ipset_norm(struct ipset *s);
/* Sorts and merges overlapping ranges only (adjacent ones stay apart). */
void pol_ipset_norm_overlap(struct ipset *s);
/* Removes r (s must be normalised; stays normalised). */
void pol_ipset_remove(struct ipset *s, struct ip_range r);
bool pol_ipset_contains(const struct ipset *s, uint8_t v6, tc_u128 a);
bool pol_ipset_overlaps(const struct ipset *s, struct ip_range r);
/* r fully inside the set. */
bool pol_ipset_covers(const struct ipset *s, struct ip_range r);
bool pol_ipset_empty(const struct ipset *s);
/* Appends strings: single address, CIDR when the range is one prefix, "a-b" otherwise. */
void pol_ipset_append_strings(const struct ipset *s, json_t *arr);
/* The minimal CIDR decomposition as ranges (owned array); returns its length. */
size_t pol_ipset_prefix_ranges(const struct ipset *s, struct ip_range **out);
/* Text of one prefix range: a bare address when single and bare_single. */
void pol_ip_range_text(struct ip_range p, bool bare_single, char *out, size_t outsz);
/* Appends the minimal CIDR decomposition, single addresses without /len when bare. */
void pol_ipset_append_prefixes(const struct ipset *s, json_t *arr, bool bare_single);

/* Parses "a.b.c.d", "v6", or either with "/bits". Masks host bits. Returns 0 or -1.
 * bits_out may be NULL; exact_out (may be NULL) says whether host bits were zero. */
int pol_ip_parse_prefix(const char *s, struct ip_range *out, int *bits_out);
int pol_ip_parse_addr(const char *s, uint8_t *v6, tc_u128 *a);
void pol_ip_format_addr(uint8_t v6, tc_u128 a, char *out, size_t outsz);
/* Formats a range as prefix text if it is exactly one prefix (always with /len). */
bool pol_ip_range_prefix(struct ip_range r, char *out, size_t outsz);
bool pol_ip_range_overlaps(struct ip_range a, struct ip_range b);
bool pol_ip_range_is_exit(struct ip_range r);

/* ---- text (text.c) ------------------------------------------------------------ */
/* Refcounted NUL-terminated texts: pol_text_new copies s (owned, one
 * reference); _ref adds one and returns s; _unref drops one (NULL ok). */
const char *pol_text_new(const char *s, size_t len);
const char *pol_text_ref(const char *s);
void pol_text_unref(const char *s);
size_t pol_text_len(const char *s);
/* json_dumps(j, JSON_COMPACT) byte for byte, as a new refcounted text
 * (NULL for NULL j). Shared arrays and objects inside j (refcount > 1) are
 * formatted once per memo and copied afterwards; they must not change while
 * the memo lives (it holds a reference to each). */
struct pol_text_memo;
struct pol_text_memo *pol_text_memo_new(void);
void pol_text_memo_free(struct pol_text_memo *m);
const char *pol_text_render(struct pol_text_memo *m, json_t *j);

/* ---- parsed policy --------------------------------------------------------- */
enum alias_kind { AL_WILDCARD, AL_USER, AL_GROUP, AL_TAG, AL_HOST, AL_PREFIX, AL_AUTOGROUP };
enum autogroup { AG_INTERNET, AG_MEMBER, AG_TAGGED, AG_SELF, AG_DANGER_ALL, AG_NONROOT };

struct alias {
  int kind;
  int ag;          /* for AL_AUTOGROUP */
  char *s;         /* text as written (trimmed) */
  struct ip_range pfx; /* for AL_PREFIX */
};

struct port_range {
  uint16_t first, last;
};

struct dst_port {
  struct alias a;
  struct port_range *ports;
  size_t nports;
};

struct proto_ports {
  int proto; /* -1 = any (omit IPProto) */
  struct port_range *ports;
  size_t nports;
};

struct grant {
  struct alias *src;
  size_t nsrc;
  struct alias *dst;
  size_t ndst;
  struct proto_ports *ip;
  size_t nip;
  json_t *app; /* object cap -> array, or NULL */
  char **via;
  size_t nvia;
};

struct ssh_rule {
  bool check;
  struct alias *src;
  size_t nsrc;
  struct alias *dst;
  size_t ndst;
  char **users;
  size_t nusers;
  json_t *accept_env; /* array or NULL */
  int64_t check_period_ms; /* -1 unset, 0 always */
};

struct name_list {
  char *name;
  char **items;
  size_t n;
};

struct node_attr {
  struct alias *target;
  size_t ntarget;
  char **attrs;
  size_t nattrs;
  json_t *ippool;
};

struct auto_route {
  struct ip_range pfx;
  char *text;
  char **approvers;
  size_t n;
};

struct pol_test {
  char *src;
  char *proto; /* may be NULL */
  char **accept;
  size_t naccept;
  char **deny;
  size_t ndeny;
};

struct ssh_test {
  char *src;
  char **dst;
  size_t ndst;
  char **accept;
  size_t naccept;
  char **check;
  size_t ncheck;
  char **deny;
  size_t ndeny;
};

struct tc_policy {
  uint64_t uid; /* unique per parse in this process (incremental compile matches results by it) */
  bool allow_all;
  json_t *doc; /* the document as parsed (standard JSON) */
  struct name_list *groups;
  size_t ngroups;
  struct name_list *tag_owners;
  size_t ntag_owners;
  struct { char *name; struct ip_range pfx; } *hosts;
  size_t nhosts;
  struct grant *grants; /* grants section first, then acls converted */
  size_t ngrants;
  bool has_acls_or_grants;
  struct ssh_rule *ssh;
  size_t nssh;
  bool has_ssh;
  struct node_attr *nattrs;
  size_t nnattrs;
  struct auto_route *routes;
  size_t nroutes;
  char **exit_approvers;
  size_t nexit;
  bool randomize_client_port;
  struct pol_test *tests;
  size_t ntests;
  struct ssh_test *ssh_tests;
  size_t nssh_tests;
};

/* Compiled topology view used by compile and tests. */
struct cnode {
  const struct tc_policy_node *src;
  int64_t id;
  int user; /* index into topo users, -1 none */
  bool tagged;
  bool has4, has6;
  tc_u128 a4, a6;
  struct ipset ips;    /* own addresses */
  struct ip_range *subnets; /* approved+announced non-exit */
  size_t nsubnets;
  bool exit4, exit6;   /* approved+announced exit routes */
  bool no_v4;          /* nodeAttrs disable-ipv4 */
};

struct ctopo {
  const struct tc_policy_topo *t;
  struct cnode *n;
  size_t nn;
  size_t **user_nodes; /* per user index: indices of their untagged nodes */
  size_t *nuser_nodes;
};

int pol_ctopo_build(const struct tc_policy *pol, const struct tc_policy_topo *t, struct ctopo *ct, struct tc_policy_err *err);
void pol_ctopo_free(struct ctopo *ct);
/* Resolves an alias into addresses. self_user >= 0 restricts autogroup:self. */
void pol_resolve_alias(const struct tc_policy *pol, const struct ctopo *ct, const struct alias *a,
                   struct ipset *out);
int pol_find_user(const struct ctopo *ct, const char *token);
bool pol_node_has_tag(const struct cnode *n, const char *tag);
bool pol_node_in_set(const struct cnode *n, const struct ipset *s);
void pol_the_internet(struct ipset *s);
void pol_wildcard_set(struct ipset *s);

int pol_parse_alias_text(const char *s, struct alias *a, char *why, size_t whysz);
int tc_policy_err_at(struct tc_policy_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *pol_proto_name(int p);
int pol_proto_parse(const char *s);

struct compiled;
/* want_text=false skips the text forms (for the policy tests, which only
 * need address sets). */
struct compiled *pol_compiled_build(const struct tc_policy *pol, const struct ctopo *ct, bool want_text);
/* The same, taking SrcIPs arrays over from prev (a previous result's cache,
 * read only; NULL: none) and recording every array used in cur (owned by
 * the caller, who hands it to the result). */
struct pol_src_cache;
struct compiled *pol_compiled_build_cached(const struct tc_policy *pol, const struct ctopo *ct, bool want_text,
                                           const struct pol_src_cache *prev, struct pol_src_cache *cur);
void pol_src_cache_free(struct pol_src_cache *c);
void pol_compiled_free(struct compiled *cp);
struct rule;
const struct rule **pol_compiled_rules_to(const struct compiled *cp, const struct ipset *dst,
                                      const struct port_range *ports, size_t nports, const int *protos,
                                      size_t nprotos, size_t *n);
bool pol_rules_accept_from(const struct rule *const *rules, size_t n, struct ip_range src);
/* SSH rules resolved once per compile; ssh_node gives one node's policy. */
struct ssh_pres;
struct ssh_pres *pol_ssh_prepare(const struct tc_policy *pol, const struct ctopo *ct);
json_t *pol_ssh_node(const struct ssh_pres *sp, const struct ctopo *ct, const struct cnode *n);
void pol_ssh_pres_free(struct ssh_pres *sp);
int pol_parse_ports_text(const char *s, struct port_range **out, size_t *n, char *why, size_t whysz);

#endif
