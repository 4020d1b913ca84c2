/* model: tailcoat's in-process state — users, nodes, pre-auth and API keys,
 * the policy text, the online set — and the only writer of storage. It plays
 * the role of Headscale's hscontrol/state: protocol handlers, the REST API,
 * the CLI and the admin GUI all read and change the tailnet through here.
 *
 * Every write follows one path, serialised by the model's writer lock:
 *   validate -> one storage transaction (with an audit entry) -> publish a new
 *   immutable snapshot -> call the change subscribers.
 * A failed validation or transaction changes nothing (no snapshot, no event).
 *
 * Durability: writes that must survive a machine crash (registrations and
 * the keys they consume, revocations: expiry, logout, deletion, key changes,
 * policy) are flushed to stable storage after the writer lock is released
 * and before the call returns; concurrent writers share one flush (group
 * commit) instead of each holding the lock through its own. Every write
 * call, and every refusal, also waits for the flush of the durable writes
 * before it, since its outcome may rest on them. So nothing a caller is told
 * is lost by a crash, but snapshot readers (and through them peers' map
 * streams) may see a durable change up to one flush before it is on disk.
 *
 * Readers take a snapshot (tc_model_snapshot) and read it without any lock for
 * as long as they like; a snapshot never changes after publication. Records
 * that a write does not touch are shared between snapshots by reference, so a
 * write costs O(changed records) allocations plus pointer copies.
 *
 * Threads: every function here may be called from any thread, except that
 * change subscribers run on the writer's thread while the writer lock is held
 * and therefore must not call any tc_model_* write function, subscribe or
 * unsubscribe (they should enqueue and return). Snapshot readers (the
 * tc_snapshot_* functions) never block.
 *
 * Ownership: records reached through a snapshot are borrowed and valid while
 * the caller holds that snapshot. Functions that return strings or arrays say
 * so. Secrets (pre-auth key and API key tokens) are returned once, owned, and
 * must be released with tc_free_secret(p, strlen(p)). Only a prefix and a
 * SHA-256 hash of each secret are kept (a 256-bit random secret needs no slow
 * hash); the hash appears in snapshot records but is useless for logging in.
 *
 * Every administrative write and registration adds one audit entry in its
 * transaction. High-rate telemetry does not: map updates (endpoints,
 * hostinfo), online/offline and API-key last_seen touches.
 *
 * Actor strings passed to writes name who did it, for the audit log:
 * "cli", "api:<key prefix>", "admin:<user>", "node:<id>", "system". NULL
 * means "system". */
#ifndef TC_MODEL_MODEL_H
#define TC_MODEL_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "model/types.h"
#include "policy/policy.h"

struct tc_store;
struct tc_model;

/* ---- configuration ------------------------------------------------------- */
enum tc_model_alloc { TC_MODEL_ALLOC_SEQUENTIAL = 0, TC_MODEL_ALLOC_RANDOM = 1 };

/* Policy validation hook: returns 0 when text is acceptable, else a negative
 * TC_E* with a readable err. text is not NUL-terminated (len bytes). */
typedef int (*tc_model_policy_validate_fn)(void *ctx, const char *text, size_t len,
                                           struct tc_err *err);

struct tc_model_config {
  /* Address pools as prefix text. NULL means the Tailscale default
   * ("100.64.0.0/10", "fd7a:115c:a1e0::/48"); "" disables that family (at
   * least one must be enabled). Subsets of the defaults are expected but any
   * prefix of the right family is accepted. */
  const char *prefix_v4;
  const char *prefix_v6;
  enum tc_model_alloc allocation;
  const char *base_domain; /* MagicDNS base domain; copied; may be NULL */
  int64_t node_expiry_ms;  /* default key expiry for new non-tagged nodes; 0 = never */
  int64_t ephemeral_timeout_ms; /* delete ephemeral nodes offline this long; 0 = 30 min */
  int64_t pending_ttl_ms;       /* interactive registrations live this long; 0 = 15 min */
  tc_model_policy_validate_fn policy_validate; /* NULL = accept any text */
  void *policy_ctx;
  /* Headscale behaviour: when a client reports a new hostname, a given name
   * that was derived from the old one (not chosen by an admin) is derived
   * again from the new one. Off by default. */
  bool given_name_follows_hostname;
};

/* Loads everything from store (borrowed: must outlive the model) and returns
 * an owned model with its first snapshot published (seq 1). Fails with
 * TC_EINVAL on a bad config (bad prefix text), TC_EDB etc. from storage. */
int tc_model_open(const struct tc_model_config *cfg, struct tc_store *store,
                  struct tc_model **out, struct tc_err *err);
/* Wakes threads blocked in tc_model_pending_wait (they return TC_ENOENT) and
 * waits for them to leave, drops the current snapshot and frees the model.
 * Snapshots still held by readers stay valid until released. NULL ok. Apart
 * from such waiters, no other call may be running or start. */
void tc_model_close(struct tc_model *m);
/* The configured MagicDNS base domain (borrowed; "" when unset). */
const char *tc_model_base_domain(const struct tc_model *m);

/* Counters for /metrics and the GUI; cheap, any thread. */
struct tc_model_stats {
  uint64_t seq;          /* current snapshot */
  size_t users, nodes, online, pending, subscribers;
  uint64_t tx_ok;        /* storage transactions committed by writes */
  uint64_t tx_failed;    /* writes whose transaction failed (after retries) */
  uint64_t tx_retries;   /* TC_EAGAIN retries */
  int64_t last_tx_us;    /* duration of the latest write transaction */
  int64_t max_tx_us;     /* slowest since open */
  /* Where write time goes (cumulative since open, for benchmarks and
   * /metrics): wall and thread-CPU microseconds inside storage transactions
   * (retries included), the durable ones among them, and the CPU of
   * publishing snapshots including the change subscribers' callbacks. */
  uint64_t tx_wall_us, tx_cpu_us;
  uint64_t tx_durable, tx_durable_wall_us;
  uint64_t publishes, publish_cpu_us;
  /* Group commit: write calls that waited for durable commits to be
   * flushed, their total wait, and the flushes storage did. */
  uint64_t sync_waits, sync_wait_us, store_syncs;
};
void tc_model_stats(struct tc_model *m, struct tc_model_stats *out);

/* ---- snapshots ----------------------------------------------------------- */
/* The primary router chosen for one subnet route among online nodes that
 * announce it and have it approved. Exit routes (0.0.0.0/0, ::/0) are not
 * subnet routes and have no primary. */
struct tc_route_primary {
  const char *prefix; /* canonical prefix text */
  int64_t node_id;
};

/* A consistent, immutable view. All arrays are sorted by id (online by node
 * id, primaries by prefix text) and borrowed from the snapshot. */
struct tc_snapshot {
  uint64_t seq; /* strictly increasing per published snapshot */
  int64_t published_at_ms;
  const struct tc_user *const *users;
  size_t n_users;
  const struct tc_node *const *nodes;
  size_t n_nodes;
  const struct tc_preauth_key *const *preauth_keys; /* metadata + hash, never the secret */
  size_t n_preauth_keys;
  const struct tc_api_key *const *api_keys;
  size_t n_api_keys;
  const char *policy; /* current policy text (NUL-terminated), NULL when none */
  size_t policy_len;
  int64_t policy_id;  /* storage id of that version, 0 when none */
  const int64_t *online; /* node ids with at least one open map stream */
  size_t n_online;
  const struct tc_route_primary *primaries;
  size_t n_primaries;
  struct tc_snapshot_priv *priv; /* indexes; not for callers */
};

/* Returns a new reference to the current snapshot (never NULL while the model
 * is open). Release it with tc_snapshot_release. Lock-free for practical
 * purposes: it holds a mutex only to copy a pointer and bump a count. */
struct tc_snapshot *tc_model_snapshot(struct tc_model *m);
/* Adds a reference to s and returns it (for subscribers that keep it). */
struct tc_snapshot *tc_snapshot_ref(struct tc_snapshot *s);
/* Drops a reference; the last one frees it. NULL ok. */
void tc_snapshot_release(struct tc_snapshot *s);

/* Lookups: O(1) or O(log n); borrowed results, NULL when absent. */
const struct tc_user *tc_snapshot_user(const struct tc_snapshot *s, int64_t id);
const struct tc_user *tc_snapshot_user_by_name(const struct tc_snapshot *s, const char *name);
const struct tc_node *tc_snapshot_node(const struct tc_snapshot *s, int64_t id);
const struct tc_node *tc_snapshot_node_by_node_key(const struct tc_snapshot *s,
                                                   const uint8_t key[TC_KEY_LEN]);
const struct tc_node *tc_snapshot_node_by_machine_key(const struct tc_snapshot *s,
                                                      const uint8_t key[TC_KEY_LEN]);
const struct tc_node *tc_snapshot_node_by_given_name(const struct tc_snapshot *s,
                                                     const char *given_name);
/* Node by IPv4 (4 bytes) or IPv6 (16 bytes) address. */
const struct tc_node *tc_snapshot_node_by_ip(const struct tc_snapshot *s, const uint8_t *addr,
                                             size_t addr_len);
/* The binding rule: a node key belongs to one machine key. Returns the node
 * with node key nk if its machine key is mk. Otherwise NULL and, when err is
 * given, TC_ENOENT ("node key not registered") or TC_EPERM ("node exists with
 * a different machine key") so the handler can answer 404 vs 401. */
const struct tc_node *tc_snapshot_node_for_machine(const struct tc_snapshot *s,
                                                   const uint8_t nk[TC_KEY_LEN],
                                                   const uint8_t mk[TC_KEY_LEN],
                                                   struct tc_err *err);
const struct tc_preauth_key *tc_snapshot_preauth_key(const struct tc_snapshot *s, int64_t id);
const struct tc_api_key *tc_snapshot_api_key(const struct tc_snapshot *s, int64_t id);
bool tc_snapshot_is_online(const struct tc_snapshot *s, int64_t node_id);
/* True when the node's key expiry is set and <= now (Unix seconds). */
bool tc_node_is_expired(const struct tc_node *n, int64_t now);
/* Number of nodes owned by user id (user_id match, tagged or not). */
size_t tc_snapshot_user_node_count(const struct tc_snapshot *s, int64_t user_id);
/* Subnet routes for which node_id is the primary router, appended to out
 * (strings copied; caller frees out with tc_strv_free). */
void tc_snapshot_primary_routes(const struct tc_snapshot *s, int64_t node_id,
                                struct tc_strv *out);

/* ---- change events ------------------------------------------------------- */
enum tc_change_kind {
  TC_CHANGE_USER_ADDED = 1,
  TC_CHANGE_USER_CHANGED,
  TC_CHANGE_USER_REMOVED,
  TC_CHANGE_NODE_ADDED,
  TC_CHANGE_NODE_CHANGED,    /* generic: see fields for what */
  TC_CHANGE_NODE_REMOVED,
  TC_CHANGE_NODE_ONLINE,
  TC_CHANGE_NODE_OFFLINE,
  TC_CHANGE_NODE_ENDPOINTS,  /* endpoints, disco key, home DERP, cap, hostinfo (peer patch) */
  TC_CHANGE_NODE_KEY_ROTATED,
  TC_CHANGE_NODE_EXPIRED,    /* expiry set/changed by logout or admin, or expiry time passed */
  TC_CHANGE_NODE_ROUTES,     /* announced/approved routes changed (node_id set), or only the
                                primary assignments moved (node_id 0, fields TC_NODE_F_PRIMARY;
                                emitted after the event of the write that moved them) */
  TC_CHANGE_NODE_TAGS,
  TC_CHANGE_NODE_RENAMED,
  TC_CHANGE_POLICY,
  TC_CHANGE_PREAUTH_KEY,     /* created, expired, used or deleted */
  TC_CHANGE_API_KEY,         /* created, expired or deleted (not last_seen touches) */
  TC_CHANGE_REGISTRATION,    /* an interactive registration finished (reg_id, node_id) */
};
/* Static name, e.g. "node.added". */
const char *tc_change_kind_name(enum tc_change_kind k);

/* Bits in tc_change.fields: what changed on the node record. */
enum {
  TC_NODE_F_ENDPOINTS = 1u << 0,
  TC_NODE_F_DISCO = 1u << 1,
  TC_NODE_F_DERP = 1u << 2,
  TC_NODE_F_HOSTINFO = 1u << 3,
  TC_NODE_F_CAP = 1u << 4,
  TC_NODE_F_KEY = 1u << 5,
  TC_NODE_F_EXPIRY = 1u << 6,
  TC_NODE_F_ROUTES = 1u << 7, /* announced or approved */
  TC_NODE_F_TAGS = 1u << 8,
  TC_NODE_F_NAME = 1u << 9,   /* given name */
  TC_NODE_F_USER = 1u << 10,
  TC_NODE_F_ONLINE = 1u << 11,
  TC_NODE_F_LAST_SEEN = 1u << 12,
  TC_NODE_F_HOSTNAME = 1u << 13,
  TC_NODE_F_PRIMARY = 1u << 14, /* primary route assignments changed */
};

/* One event. All pointers are borrowed for the duration of the callback;
 * take tc_snapshot_ref(snap) to keep the snapshot. */
struct tc_change {
  enum tc_change_kind kind;
  uint64_t seq;               /* == snap->seq */
  struct tc_snapshot *snap;   /* the snapshot that contains this change */
  int64_t user_id;            /* the user concerned, or the node's owner; 0 if none */
  int64_t node_id;            /* 0 if not about a node */
  int64_t key_id;             /* pre-auth / API key id; policy id for TC_CHANGE_POLICY */
  unsigned fields;            /* TC_NODE_F_* for node kinds */
  const struct tc_node *old_node; /* record before the change (removals, changes); may be NULL */
  const char *reg_id;         /* TC_CHANGE_REGISTRATION only */
};

typedef void (*tc_change_fn)(void *ctx, const struct tc_change *c);
/* Registers fn; returns a positive subscription id (0, nothing registered,
 * when fn is NULL). Events are delivered in seq order, one at a time, after
 * the snapshot is published. */
int64_t tc_model_subscribe(struct tc_model *m, tc_change_fn fn, void *ctx);
/* After return fn is never called again for this id. Must not be called from
 * inside a callback. */
void tc_model_unsubscribe(struct tc_model *m, int64_t sub_id);

/* ---- users --------------------------------------------------------------- */
/* Headscale-compatible name rules: at least 2 bytes, at most 255, starts with
 * a letter, then letters, digits, '-', '.', '_' and at most one '@'
 * (non-ASCII UTF-8 letters are accepted). 0 or TC_EINVAL with a message. */
int tc_model_validate_username(const char *name, struct tc_err *err);
/* Creates a user; *id_out (may be NULL) gets its id. display_name and email
 * may be NULL. TC_EEXIST when the name is taken. */
int tc_model_user_create(struct tc_model *m, const char *actor, const char *name,
                         const char *display_name, const char *email, int64_t *id_out,
                         struct tc_err *err);
int tc_model_user_rename(struct tc_model *m, const char *actor, int64_t id, const char *new_name,
                         struct tc_err *err);
/* Updates display name / email / profile picture (NULL leaves a field alone). */
int tc_model_user_update(struct tc_model *m, const char *actor, int64_t id,
                         const char *display_name, const char *email,
                         const char *profile_pic_url, struct tc_err *err);
/* Refused with TC_ECONFLICT while the user owns nodes. The user's pre-auth
 * keys are deleted with it. */
int tc_model_user_destroy(struct tc_model *m, const char *actor, int64_t id, struct tc_err *err);

/* ---- pre-auth keys -------------------------------------------------------- */
struct tc_preauth_opts {
  int64_t user_id;  /* 0 = owned only by tags (then tags must be non-empty) */
  bool reusable;
  bool ephemeral;
  int64_t expiration; /* Unix seconds; 0 = never; must be in the future */
  const struct tc_strv *tags; /* "tag:x" each; may be NULL */
};
/* Creates a key. *secret_out gets the full token "hskey-auth-<12>-<64>",
 * owned, shown once (release with tc_free_secret). *id_out may be NULL. */
int tc_model_preauth_create(struct tc_model *m, const char *actor,
                            const struct tc_preauth_opts *opts, int64_t *id_out,
                            char **secret_out, struct tc_err *err);
/* Sets the expiration to now. */
int tc_model_preauth_expire(struct tc_model *m, const char *actor, int64_t id,
                            struct tc_err *err);
int tc_model_preauth_delete(struct tc_model *m, const char *actor, int64_t id,
                            struct tc_err *err);
/* Finds the key a token names and checks it is usable (not expired, not a
 * used single-use key). Read-only: does not consume. *id_out gets the id.
 * TC_EPERM "invalid pre auth key" (unknown, malformed, wrong secret, used) or
 * TC_EEXPIRED "pre auth key expired". */
int tc_model_preauth_check(struct tc_model *m, const char *token, int64_t *id_out,
                           struct tc_err *err);

/* ---- API keys ------------------------------------------------------------- */
/* Creates a key; *token_out "hskey-api-<12>-<64>", owned, shown once. */
int tc_model_apikey_create(struct tc_model *m, const char *actor, int64_t expiration,
                           int64_t *id_out, char **token_out, struct tc_err *err);
int tc_model_apikey_expire(struct tc_model *m, const char *actor, int64_t id,
                           struct tc_err *err);
int tc_model_apikey_delete(struct tc_model *m, const char *actor, int64_t id,
                           struct tc_err *err);
/* Verifies a bearer token (len bytes, not NUL-terminated; network input).
 * 0 and *id_out on success, and last_seen is updated (persisted at most once
 * a minute per key). TC_EPERM "invalid API key" for unknown/malformed/wrong,
 * TC_EEXPIRED "API key expired". *prefix_out (optional, owned) gets the prefix
 * for an actor string like "api:<prefix>". */
int tc_model_apikey_verify(struct tc_model *m, const char *token, size_t len, int64_t *id_out,
                           char **prefix_out, struct tc_err *err);

/* ---- node registration (protocol handlers) --------------------------------- */
/* What a RegisterRequest carries, already decoded by the protocol layer.
 * Pointers are borrowed for the call. */
struct tc_register_req {
  uint8_t machine_key[TC_KEY_LEN];   /* from the Noise session */
  uint8_t node_key[TC_KEY_LEN];
  uint8_t old_node_key[TC_KEY_LEN];  /* all zero when not rotating */
  const char *hostinfo_json;         /* verbatim Hostinfo object; may be NULL; <= 64 KiB */
  const char *hostname;              /* Hostinfo.Hostname; may be NULL/"" */
  bool ephemeral;                    /* RegisterRequest.Ephemeral */
  int64_t expiry;                    /* requested key expiry (Unix s); 0 = default */
  const char *authkey;               /* Auth.AuthKey; NULL/"" for interactive */
  const struct tc_strv *announced_routes; /* Hostinfo.RoutableIPs; may be NULL */
};

/* Registers (or re-registers) a node with a pre-auth key, in one durable
 * transaction that also consumes a single-use key. The key decides the owner
 * (user and/or tags) and ephemerality (key or request). If a node with this
 * machine key exists it is reused: same ID and IPs, new node key, hostinfo,
 * expiry and owner (a tagged key makes the node tag-owned, with no expiry by
 * default and user_id = the key's user, possibly 0; a tagged node stays
 * tagged when it re-registers with an untagged key). If old_node_key names
 * a known node, that node must have
 * the same machine key (rotation); an unknown old key is ignored. Nodes
 * without tags get the default expiry unless req->expiry is in the future;
 * tagged nodes never expire by default. *node_id_out gets the node id; the
 * current snapshot contains it when this returns. The audit actor is
 * "preauthkey:<prefix>".
 * Errors: TC_EPERM "invalid pre auth key" (unknown, wrong secret, single-use
 * already used — also when another thread won the race), TC_EEXPIRED
 * "pre auth key expired", TC_EPERM when old_node_key or node_key belongs to a
 * different machine key, TC_ETOOBIG for oversized hostinfo, TC_EINTERNAL
 * "no free IPv4 address left in <prefix>" when a pool is exhausted,
 * TC_EAGAIN/TC_EDB from storage. */
int tc_model_register_authkey(struct tc_model *m, const struct tc_register_req *req,
                              int64_t *node_id_out, struct tc_err *err);

/* Interactive registration: remembers req in memory for cfg.pending_ttl_ms
 * and returns an owned random registration id (24 chars, [a-z0-9]) for the
 * /register/<id> URL. authkey in req is ignored. Bounded because anyone can
 * ask: a machine key keeps at most 4 open requests (the oldest is dropped),
 * and beyond 10000 live requests this fails TC_EAGAIN. */
int tc_model_pending_create(struct tc_model *m, const struct tc_register_req *req,
                            char **reg_id_out, struct tc_err *err);
/* Approves a pending registration for user_id: creates (or re-registers /
 * rotates) the node exactly as register_authkey would for a key of that
 * user, wakes waiters and emits TC_CHANGE_REGISTRATION after the node event.
 * TC_ENOENT "registration not found or expired". */
int tc_model_pending_approve(struct tc_model *m, const char *actor, const char *reg_id,
                             int64_t user_id, int64_t *node_id_out, struct tc_err *err);
/* Rejects: waiters fail with TC_EPERM. */
int tc_model_pending_reject(struct tc_model *m, const char *actor, const char *reg_id,
                            struct tc_err *err);
/* Blocks up to timeout_ms for the registration to finish. 0 and *node_id_out
 * when approved; TC_EAGAIN on timeout (still pending); TC_EPERM rejected;
 * TC_ENOENT unknown, expired or model closing. A finished registration stays
 * answerable until its TTL passes, so a waiter that arrives late still sees it. */
int tc_model_pending_wait(struct tc_model *m, const char *reg_id, int64_t timeout_ms,
                          int64_t *node_id_out, struct tc_err *err);
/* A pending registration's public facts, for the GUI and `nodes register`. */
struct tc_pending_info {
  char reg_id[32];
  uint8_t machine_key[TC_KEY_LEN];
  uint8_t node_key[TC_KEY_LEN];
  char *hostname;      /* owned by the array */
  int64_t created_at;  /* Unix seconds */
  int64_t expires_at;
  int state;           /* 0 pending, 1 approved, 2 rejected */
  int64_t node_id;     /* when approved */
};
/* Copies one pending registration; TC_ENOENT when unknown or expired. Free
 * out->hostname with free(). */
int tc_model_pending_get(struct tc_model *m, const char *reg_id, struct tc_pending_info *out);
/* All live pending registrations; owned array, free with tc_model_pending_free. */
int tc_model_pending_list(struct tc_model *m, struct tc_pending_info **out, size_t *n);
void tc_model_pending_free(struct tc_pending_info *v, size_t n);

/* Replaces the node key of node_id (already authenticated by the caller),
 * keeping ID and IPs; expiry becomes `expiry` (0 = config default). Emits
 * TC_CHANGE_NODE_KEY_ROTATED. TC_EEXIST if new_node_key belongs to another node. */
int tc_model_node_rotate_key(struct tc_model *m, const char *actor, int64_t node_id,
                             const uint8_t new_node_key[TC_KEY_LEN], int64_t expiry,
                             struct tc_err *err);
/* Logout (register with a past Expiry): ephemeral nodes are deleted, others
 * get expiry = now. Emits NODE_REMOVED or NODE_EXPIRED. */
int tc_model_node_logout(struct tc_model *m, const char *actor, int64_t node_id,
                         struct tc_err *err);

/* What a MapRequest reported; NULL / zero members mean "not reported" and
 * never overwrite stored values. */
struct tc_map_update {
  const char *hostinfo_json;         /* verbatim; <= 64 KiB */
  const char *hostname;              /* Hostinfo.Hostname */
  const struct tc_strv *endpoints;   /* "ip:port" */
  const uint8_t *disco_key;          /* TC_KEY_LEN bytes; all-zero ignored */
  int32_t home_derp;                 /* 0 = not reported */
  int32_t cap_version;               /* 0 = not reported */
  const struct tc_strv *announced_routes; /* Hostinfo.RoutableIPs; NULL = not reported */
};
/* Applies a map request's facts. Compares with the stored node and only when
 * something differs writes storage, publishes and emits one event
 * (NODE_ENDPOINTS, or NODE_ROUTES when announced routes changed) with the
 * TC_NODE_F_* bits; *changed_out (may be NULL) gets those bits (0 = nothing
 * changed, no write, no event). */
int tc_model_node_update_from_map(struct tc_model *m, int64_t node_id,
                                  const struct tc_map_update *u, unsigned *changed_out,
                                  struct tc_err *err);
/* Map stream bookkeeping, counted: each open stream calls (id, true) once and
 * (id, false) once when it ends. The node is online while the count is > 0,
 * so a superseding stream opening before the old one closes keeps it online.
 * Emits NODE_ONLINE / NODE_OFFLINE on transitions; going offline persists
 * last_seen = now. In-memory otherwise. */
int tc_model_node_set_online(struct tc_model *m, int64_t node_id, bool online,
                             struct tc_err *err);

/* ---- node administration --------------------------------------------------- */
/* Sets the key expiry to `at` (Unix seconds; 0 = now). */
int tc_model_node_expire(struct tc_model *m, const char *actor, int64_t node_id, int64_t at,
                         struct tc_err *err);
/* new_name must already be DNS-safe (see tc_model_validate_given_name) and
 * unused by another node: TC_EINVAL / TC_EEXIST with a clear message. */
int tc_model_node_rename(struct tc_model *m, const char *actor, int64_t node_id,
                         const char *new_name, struct tc_err *err);
/* Deletes the node and frees its addresses. */
int tc_model_node_delete(struct tc_model *m, const char *actor, int64_t node_id,
                         struct tc_err *err);
/* Replaces the node's tags ("tag:<name>" each, de-duplicated and sorted;
 * empty clears them, returning ownership to node->user_id, which must then
 * be non-zero). */
int tc_model_node_set_tags(struct tc_model *m, const char *actor, int64_t node_id,
                           const struct tc_strv *tags, struct tc_err *err);
/* Replaces the approved routes (valid prefixes, canonicalised). Like Headscale
 * 0.29, routes need not be announced to be approved; they take effect only
 * while announced.
 * autoApprovers: whenever announced routes, tags or the owner change, and
 * when a new policy is set, the model adds the announced routes that the
 * current policy's autoApprovers approve (parsed with policy/policy.h) to the
 * approved routes, in the same transaction; approvals are never withdrawn
 * automatically. */
int tc_model_node_approve_routes(struct tc_model *m, const char *actor, int64_t node_id,
                                 const struct tc_strv *routes, struct tc_err *err);
/* Moves the node to another user. */
int tc_model_node_set_user(struct tc_model *m, const char *actor, int64_t node_id,
                           int64_t user_id, struct tc_err *err);

/* ---- naming ----------------------------------------------------------------- */
/* DNS-safe label from a hostname: lowercase, runs of characters outside
 * [a-z0-9-] become one '-', no leading/trailing '-', at most 63 bytes,
 * "node" when nothing is left. Returns owned text. */
char *tc_model_sanitize_hostname(const char *hostname);
/* 0 when name is a valid given name (1..63 of [a-z0-9-], no leading or
 * trailing '-'), else TC_EINVAL with the reason. */
int tc_model_validate_given_name(const char *name, struct tc_err *err);

/* ---- policy ----------------------------------------------------------------- */
/* Validates text with cfg.policy_validate, stores it as a new version,
 * publishes and emits TC_CHANGE_POLICY. *id_out may be NULL. */
int tc_model_policy_set(struct tc_model *m, const char *actor, const char *text, size_t len,
                        int64_t *id_out, struct tc_err *err);
/* The users and nodes of a snapshot in the policy engine's input form.
 * Strings are borrowed from the snapshot (keep it referenced while `topo`
 * is used); the arrays are owned and freed with tc_model_topo_free. */
struct tc_model_topo {
  struct tc_policy_topo topo;
  struct tc_policy_user *users;
  struct tc_policy_node *nodes;
  char (*ip4)[16];
  char (*ip6)[46];
};
void tc_model_topo_build(const struct tc_snapshot *s, struct tc_model_topo *t);
void tc_model_topo_free(struct tc_model_topo *t);
/* Runs the policy's own `tests` and `sshTests` against the tailnet in the
 * current snapshot: 0, or the engine's error (TC_EINVAL) with the failing
 * test in err. Text that does not parse returns 0 (the validate hook of
 * tc_model_policy_set reports it). Callers that accept a policy from a
 * person call this first. */
int tc_model_policy_test(struct tc_model *m, const char *text, size_t len, struct tc_err *err);
/* Stored versions, newest first, at most limit (<= 0: all). Owned array;
 * free each with tc_policy_rec_free and then the array. */
int tc_model_policy_history(struct tc_model *m, int limit, struct tc_policy_rec **out,
                            size_t *n, struct tc_err *err);

/* ---- audit log -------------------------------------------------------------- */
/* Newest first, at most limit (<= 0: all). Owned array; free each with
 * tc_audit_free and then the array. */
int tc_model_audit_list(struct tc_model *m, int limit, struct tc_audit **out, size_t *n,
                        struct tc_err *err);

/* ---- lifecycle -------------------------------------------------------------- */
/* Periodic housekeeping, called by the server (every few seconds) with the
 * wall clock in ms: deletes ephemeral nodes offline longer than the inactivity
 * timeout (actor "system"), drops expired pending registrations, and emits
 * TC_CHANGE_NODE_EXPIRED once for each node whose key expiry passed since the
 * last tick. Expired nodes are kept. Returns the number of nodes deleted, or
 * a negative TC_E*. */
int tc_model_tick(struct tc_model *m, int64_t now_ms, struct tc_err *err);

#endif
