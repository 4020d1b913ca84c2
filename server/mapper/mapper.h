/* mapper: everything between a client's Noise session and the model —
 * the tailcfg JSON codecs, the /machine/register and /machine/map handler,
 * and the map streams.
 *
 * Codecs (text.c, request.c, encode.c): parsing RegisterRequest /
 * MapRequest bodies (strict, bounded: every byte is hostile), encoding
 * RegisterResponse, tailcfg.Node (self and peer forms), UserProfile,
 * DNSConfig (from the config's dns section) and whole MapResponse messages
 * (full maps, deltas, keep-alives) as JSON text; framing is LE uint32 + zstd.
 *
 * Performance rule: a node's peer JSON is produced once per change of that
 * node and shared, read-only and refcounted, by every recipient
 * (struct tc_mapper_frag, struct tc_mapper_cache); full maps are made by
 * concatenating fragments, so a change costs O(peers), not O(N^2). The
 * compressed bytes are shared too: a full map (or resync) is several zstd
 * frames, most of them cached chunks of the peer list compressed once per
 * change of one of their nodes (struct tc_mapper_chunks), and the shared runs
 * of policy filter texts likewise (struct tc_mapper_spans).
 *
 * Control logic (control.c, handle.c; needs the model and policy/): see the
 * section "control logic" below. The policy stored in the model decides
 * visibility, filters, SSH policy and CapMap per node; without one (or with
 * the empty policy) everyone sees everyone and the filter allows all.
 *
 * Threads: every function is reentrant. A tc_mapper_cache is internally
 * locked and may be shared by all threads; fragments are immutable once
 * returned and may be read by any thread while a reference is held.
 *
 * Conventions as in base.h: 0 / negative TC_E*; char * results documented
 * "owned" are freed by the caller with free(). */
#ifndef TC_MAPPER_H
#define TC_MAPPER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "model/types.h"

struct tc_config;

/* ---- limits on client input ------------------------------------------------ */
#define TC_MAPPER_MAX_BODY (1024 * 1024)      /* whole request body (Headscale: 1 MiB) */
#define TC_MAPPER_MAX_HOSTINFO (64 * 1024)    /* Hostinfo object re-serialised (the model's limit) */
#define TC_MAPPER_MAX_ENDPOINTS 64
#define TC_MAPPER_MAX_ROUTES 1024             /* Hostinfo.RoutableIPs entries */
#define TC_MAPPER_MAX_TAGS 64                 /* Hostinfo.RequestTags entries */
#define TC_MAPPER_MAX_STR 1024                /* hostname, tag, followup URL... */
#define TC_MAPPER_MAX_AUTHKEY 512

/* Oldest client tailcoat serves: v1.60 (capver 87). */
#define TC_MAPPER_MIN_CAPVER 87

/* The placeholder owner of tagged nodes, as Headscale presents it. */
#define TC_MAPPER_TAGGED_USER_ID INT64_C(2147455555)

/* ---- key text ("nodekey:<64 hex>") ---------------------------------------------- */
enum tc_mapper_key_kind { TC_MKEY_MACHINE, TC_MKEY_NODE, TC_MKEY_DISCO };
#define TC_MAPPER_KEY_TEXT 80 /* enough for "discokey:" + 64 hex + NUL */

/* Parses prefix + 64 hex digits (either case) of exactly len bytes. The empty
 * string and the all-zero key both yield zero bytes and *present=false (Go's
 * encoding treats them as absent). TC_EINVAL on anything else malformed. */
int tc_mapper_key_parse(enum tc_mapper_key_kind kind, const char *s, size_t len, uint8_t out[TC_KEY_LEN],
                        bool *present);
/* Writes the lowercase text form into out. */
void tc_mapper_key_format(enum tc_mapper_key_kind kind, const uint8_t key[TC_KEY_LEN],
                          char out[TC_MAPPER_KEY_TEXT]);
bool tc_mapper_key_is_zero(const uint8_t key[TC_KEY_LEN]);

/* ---- requests ----------------------------------------------------------------- */

/* What tailcoat reads out of a Hostinfo object (the object itself is kept
 * verbatim, re-serialised compactly). Strings owned; NULL when absent. */
struct tc_hostinfo_fields {
  char *hostname;
  char *os;
  struct tc_strv routable_ips; /* canonical, masked prefixes */
  struct tc_strv request_tags;
  bool has_netinfo;
  int32_t preferred_derp; /* NetInfo.PreferredDERP; 0 = unknown */
};

struct tc_register_request {
  int version;
  bool has_node_key, has_old_node_key; /* false for missing, "" or all-zero */
  uint8_t node_key[TC_KEY_LEN];
  uint8_t old_node_key[TC_KEY_LEN];
  char *auth_key;    /* Auth.AuthKey if non-empty, else NULL. Owned, wiped on free. */
  bool has_expiry;   /* Expiry present and not Go's zero time */
  int64_t expiry;    /* Unix seconds; the logout sentinel is 123 (1970-01-01T00:02:03Z) */
  char *followup;    /* non-empty Followup URL or NULL */
  char *hostinfo_json; /* compact JSON object or NULL */
  struct tc_hostinfo_fields hi;
  bool ephemeral;
  char *tailnet; /* or NULL */
};

struct tc_map_request {
  int version;
  bool compress_zstd; /* Compress == "zstd" */
  bool keep_alive, stream, omit_peers, read_only;
  bool has_node_key, has_disco_key;
  uint8_t node_key[TC_KEY_LEN];
  uint8_t disco_key[TC_KEY_LEN];
  char *hostinfo_json; /* compact JSON object or NULL when absent/null */
  struct tc_hostinfo_fields hi;
  bool has_endpoints;           /* Endpoints present and non-null (possibly empty) */
  struct tc_strv endpoints;     /* canonical "ip:port"; link-local and zoned dropped */
};

/* Parse a body of len bytes (need not be NUL-terminated). Unknown fields are
 * ignored, null is "absent" for every field, a known field of the wrong type
 * or a malformed key/time/prefix/endpoint fails the whole request
 * (TC_EINVAL), as Go's decoder would; over-limit sizes give TC_ETOOBIG. err
 * (may be NULL) gets a short reason that never echoes client bytes. On
 * failure *out is left freed/zeroed. */
int tc_mapper_parse_register(const char *body, size_t len, struct tc_register_request *out,
                             struct tc_err *err);
int tc_mapper_parse_map(const char *body, size_t len, struct tc_map_request *out, struct tc_err *err);
void tc_register_request_free(struct tc_register_request *r); /* NULL ok; zeroes */
void tc_map_request_free(struct tc_map_request *r);           /* NULL ok; zeroes */
void tc_hostinfo_fields_free(struct tc_hostinfo_fields *h);

/* True when s is "1970-01-01T00:02:03Z"-style logout: a present expiry not in the future. */
bool tc_mapper_is_logout(const struct tc_register_request *r, int64_t now);

/* ---- encoding: environment ------------------------------------------------------ */

/* Tailnet-wide encoding settings, derived once from the config (and DERP/policy
 * modules) and then read-only. All strings owned by the struct. */
struct tc_mapper_env {
  char *base_domain;  /* MagicDNS suffix, "" if none */
  char *domain;       /* MapResponse.Domain (tailnet name shown in the UI) */
  char *dns_json;     /* DNSConfig object, NULL = omit */
  char *derp_json;    /* DERPMap object, NULL = omit */
  char *capmap_json;  /* default Node.CapMap object, NULL = omit */
  char *filter_json;  /* PacketFilter array; NULL means allow-all (the default without policy) */
  char *ssh_json;     /* SSHPolicy object, NULL = omit */
  bool disable_logtail; /* Debug.DisableLogTail (Headscale: unless logtail.enabled) */
};
/* Fills env from cfg (base domain, DNSConfig, default CapMap, logtail);
 * derp_json is left NULL for the DERP module to fill. Owned by the caller. */
void tc_mapper_env_from_config(struct tc_mapper_env *env, const struct tc_config *cfg);
void tc_mapper_env_free(struct tc_mapper_env *env); /* NULL ok */

/* DNSConfig JSON for cfg->dns (Headscale semantics: Proxied = magic_dns,
 * base domain first in Domains then search domains, global nameservers as
 * Resolvers when override_local_dns else FallbackResolvers, split routes,
 * ExtraRecords). Owned. */
char *tc_mapper_dns_json(const struct tc_config *cfg);

/* ---- encoding: nodes --------------------------------------------------------------- */

/* Per-node facts that are not in struct tc_node. */
struct tc_mapper_node_extra {
  bool online_known;
  bool online;
  /* Subnet routes this node is primary for; NULL = every approved and
   * announced subnet route (no HA decision made). */
  const struct tc_strv *primary_routes;
  const char *capmap_json;              /* overrides env->capmap_json when non-NULL */
  /* The complete AllowedIPs as one viewer installs them (a policy may hide a
   * subnet route from viewers that cannot reach it); NULL = the node's own
   * addresses + primary subnet routes + approved exit routes. */
  const struct tc_strv *allowed_ips;
};

enum tc_mapper_form { TC_MAPPER_SELF = 0, TC_MAPPER_PEER = 1 };

/* Appends the tailcfg.Node JSON object of n to out. The self form omits
 * Online/LastSeen; the peer form carries Online when known and LastSeen only
 * while offline. now decides Expired. */
void tc_mapper_encode_node(struct tc_buf *out, const struct tc_mapper_env *env,
                           const struct tc_node *n, const struct tc_mapper_node_extra *x,
                           enum tc_mapper_form form, int64_t now);

/* The Name of a node: "<given>.<base>." (or "<given>." without a base). Owned. */
char *tc_mapper_fqdn(const struct tc_mapper_env *env, const struct tc_node *n);

/* Appends a UserProfile object. u NULL = the tagged-devices placeholder. */
void tc_mapper_encode_user_profile(struct tc_buf *out, const struct tc_user *u);

/* ---- shared peer fragments ---------------------------------------------------------- */

/* An immutable, refcounted JSON fragment (one tailcfg.Node in peer form). */
struct tc_mapper_frag {
  int64_t node_id;
  size_t len;
  /* private: */
  int refs;
  char data[]; /* len bytes + NUL */
};
struct tc_mapper_frag *tc_mapper_frag_ref(struct tc_mapper_frag *f);
void tc_mapper_frag_unref(struct tc_mapper_frag *f); /* NULL ok */

/* Node id -> the latest peer fragment, reused while (version, online,
 * expired) are unchanged. version is any counter the caller bumps whenever the
 * node or what its encoding depends on changes (e.g. the model's per-node
 * revision). */
struct tc_mapper_cache;
struct tc_mapper_cache *tc_mapper_cache_new(void);
void tc_mapper_cache_free(struct tc_mapper_cache *c); /* NULL ok */
/* Returns a new reference (caller unrefs) to n's peer fragment, encoding it
 * only when the cache has no entry for this version/online/expired state. */
struct tc_mapper_frag *tc_mapper_cache_peer(struct tc_mapper_cache *c, const struct tc_mapper_env *env,
                                            const struct tc_node *n, uint64_t version,
                                            const struct tc_mapper_node_extra *x, int64_t now);
void tc_mapper_cache_forget(struct tc_mapper_cache *c, int64_t node_id);
/* Counters for tests and metrics. */
void tc_mapper_cache_stats(struct tc_mapper_cache *c, uint64_t *hits, uint64_t *encodes);

/* ---- encoding: messages ------------------------------------------------------------ */

struct tc_mapper_full {
  const char *self_json;                     /* tc_mapper_encode_node(SELF) output */
  struct tc_mapper_frag *const *peers;       /* sorted by node id */
  size_t n_peers;
  const struct tc_user *users;               /* profiles for self and peers' owners */
  size_t n_users;
  bool tagged_profile;                       /* also add the tagged-devices profile */
  int64_t now;
};
/* Appends one complete first MapResponse (Node, DERPMap, Peers, PacketFilter,
 * DNSConfig, UserProfiles, Domain, CollectServices:false, Debug, ControlTime,
 * SSHPolicy when set). */
void tc_mapper_encode_full(struct tc_buf *out, const struct tc_mapper_env *env,
                           const struct tc_mapper_full *m);
/* The same message in two halves around the content of the Peers array:
 * open writes everything up to and including "Peers":[ (m->n_peers only
 * says whether there are peers; m->peers is not read), close writes the ]
 * and the rest. open + comma-separated fragments + close ==
 * tc_mapper_encode_full. */
void tc_mapper_encode_full_open(struct tc_buf *out, const struct tc_mapper_env *env,
                                const struct tc_mapper_full *m);
void tc_mapper_encode_full_close(struct tc_buf *out, const struct tc_mapper_env *env,
                                 const struct tc_mapper_full *m);

/* PeersChangedPatch entry; fields flagged in `set` are present. */
enum {
  TC_PATCH_DERP = 1 << 0,
  TC_PATCH_CAP = 1 << 1,
  TC_PATCH_ENDPOINTS = 1 << 2,
  TC_PATCH_KEY = 1 << 3,
  TC_PATCH_DISCO = 1 << 4,
  TC_PATCH_ONLINE = 1 << 5,
  TC_PATCH_LASTSEEN = 1 << 6,
  TC_PATCH_KEYEXPIRY = 1 << 7,
};
struct tc_mapper_patch {
  int64_t node_id;
  unsigned set;
  int32_t derp_region;
  int32_t cap;
  const struct tc_strv *endpoints;
  uint8_t key[TC_KEY_LEN];
  uint8_t disco_key[TC_KEY_LEN];
  bool online;
  int64_t last_seen;
  int64_t key_expiry;
};

struct tc_mapper_delta {
  const char *self_json;                 /* new self Node, or NULL */
  struct tc_mapper_frag *const *peers;   /* non-empty: "Peers", a complete replacement (resync) */
  size_t n_peers;
  struct tc_mapper_frag *const *changed; /* PeersChanged */
  size_t n_changed;
  const int64_t *removed;                /* PeersRemoved */
  size_t n_removed;
  const struct tc_mapper_patch *patches; /* PeersChangedPatch */
  size_t n_patches;
  const int64_t *online_ids;             /* OnlineChange {"id":bool} */
  const bool *online_vals;
  size_t n_online;
  const struct tc_user *users;           /* UserProfiles to add/refresh */
  size_t n_users;
  bool tagged_profile;
  bool with_filter, with_dns, with_derp, with_ssh; /* resend from env */
  int64_t now;
};
/* Appends one delta MapResponse. Returns false (and appends nothing) when the
 * delta carries nothing; the caller then sends nothing. */
bool tc_mapper_encode_delta(struct tc_buf *out, const struct tc_mapper_env *env,
                            const struct tc_mapper_delta *d);

/* The same in two halves around the content of a non-empty Peers array, as
 * tc_mapper_encode_full_open/_close (d->peers is not read). open returns
 * false and appends nothing when the delta carries nothing. */
bool tc_mapper_encode_delta_open(struct tc_buf *out, const struct tc_mapper_env *env, const struct tc_mapper_delta *d);
void tc_mapper_encode_delta_close(struct tc_buf *out, const struct tc_mapper_env *env, const struct tc_mapper_delta *d);

/* Appends {"KeepAlive":true}. */
void tc_mapper_encode_keepalive(struct tc_buf *out);

/* ---- encoding: register response ----------------------------------------------------- */
struct tc_mapper_register_response {
  const struct tc_user *user; /* owner; NULL with tagged=false omits User/Login */
  bool tagged;                /* present the tagged-devices placeholder */
  bool node_key_expired;
  bool machine_authorized;
  const char *auth_url; /* NULL/"" = none */
  const char *error;    /* NULL/"" = none */
};
/* Returns the owned JSON text of a RegisterResponse. */
char *tc_mapper_encode_register_response(const struct tc_mapper_register_response *r);

/* ---- small helpers shared with handlers and tests ------------------------------------ */
/* Appends s as a JSON string literal (escaped; invalid UTF-8 becomes U+FFFD). NULL -> "". */
void tc_mapper_json_str(struct tc_buf *out, const char *s);

/* ---- control logic (control.c: needs the model) ------------------------------------------
 *
 * struct tc_mapper answers every request a client makes over Noise: it routes
 * /machine/register and /machine/map, runs the registration decision
 * procedure against the model, and keeps one map stream per node. A single
 * dispatcher thread owns all streams: it receives the model's change events
 * (in seq order, through a queue — subscribers must not block), computes each
 * delta once, frames it once (LE uint32 + zstd) and writes the same bytes to
 * every stream that may see it; it also sends full maps to new streams (queued
 * behind the events before them, so nothing is missed or duplicated) and
 * keep-alives every 50-59 s. Follow-up long polls run on their own threads.
 *
 * Threads: tc_mapper_serve / tc_mapper_handle may be called from any number
 * of worker threads and may block briefly on the model. */
struct tc_mapper;
struct tc_model;
struct tc_snapshot;

/* The transport's stream operations (proto's tc_ctl_stream_* fit directly;
 * tests use a fake). Same contract as proto.h: the handler owns one reference
 * and must finish with respond() or begin()+write()*+end(). */
struct tc_mapper_io {
  int (*respond)(void *st, int status, const char *content_type, const void *body, size_t len);
  int (*begin)(void *st, int status, const char *content_type);
  int (*write)(void *st, const void *data, size_t len);
  void (*end)(void *st);
  void (*ref)(void *st);
  void (*unref)(void *st);
  void (*on_cancel)(void *st, void (*fn)(void *arg), void *arg);
  bool (*cancelled)(void *st);
  void (*retry_after)(void *st, int seconds); /* optional: Retry-After on the coming response */
};

struct tc_mapper_opts {
  struct tc_model *model;          /* borrowed; must outlive the mapper */
  const struct tc_mapper_env *env; /* copied */
  const char *server_url;          /* AuthURL base, e.g. "https://ctl.example.com" */
  int64_t keepalive_ms;            /* 0 = 50 s; a random 0..jitter is added */
  int64_t keepalive_jitter_ms;     /* 0 = 9 s; < 0 = none */
  int64_t followup_timeout_ms;     /* 0 = 15 min */
  int max_followups;               /* concurrent Followup waits; 0 = 256 */
  int64_t offline_grace_ms;        /* a closed stream's node goes offline this much later
                                      unless it reconnects; 0 = 10 s (Headscale), < 0 = at once */
  int full_map_chunk;              /* peers per shared compressed chunk of full maps; 0 = 128,
                                      < 0 = none (every full map one frame) */
};

int tc_mapper_new(const struct tc_mapper_opts *opts, struct tc_mapper **out, struct tc_err *err);
/* Stops the dispatcher, ends every open stream and frees everything. Stop the
 * transport first (its cancel callbacks may still reference sessions). NULL ok. */
void tc_mapper_free(struct tc_mapper *mp);

/* Handles one request. machine_key is the Noise-authenticated identity;
 * path may carry a query. Always finishes the response (see tc_mapper_io). */
void tc_mapper_serve(struct tc_mapper *mp, const uint8_t machine_key[TC_KEY_LEN], const char *method,
                     const char *path, const void *body, size_t len, const struct tc_mapper_io *io, void *st);

/* The transport's handler (proto.h tc_ctl_handler_fn), ctx = the tc_mapper:
 * pass it to tc_ctl_server_new. Built only when server/proto is present. */
struct tc_ctl_request;
struct tc_ctl_stream;
void tc_mapper_handle(void *ctx, const struct tc_ctl_request *req, struct tc_ctl_stream *st);

/* Replaces the encoding environment (config reload, new DERP map, new
 * policy output); every open stream receives DERPMap, DNSConfig, filter and
 * SSH policy again. env is copied. */
void tc_mapper_set_env(struct tc_mapper *mp, const struct tc_mapper_env *env);
/* Deep copy of an env. */
void tc_mapper_env_copy(struct tc_mapper_env *dst, const struct tc_mapper_env *src);

/* Who sees whom and which filter a node gets when the model holds no policy
 * (or the empty allow-all one): everyone, and the env's filter (NULL = allow
 * all). With a policy the dispatcher uses the compiled policy instead. */
bool tc_mapper_visible(const struct tc_snapshot *snap, const struct tc_node *viewer, const struct tc_node *peer);
const char *tc_mapper_filter_for(const struct tc_mapper_env *env, const struct tc_snapshot *snap,
                                 const struct tc_node *node);

struct tc_mapper_stats {
  uint64_t streams_open;  /* currently open map streams */
  uint64_t full_maps, deltas, keepalives, bytes_out, streams_cut, events;
  uint64_t frag_hits, frag_encodes;
  /* full maps' shared peer chunks (see tc_mapper_chunks) */
  uint64_t chunk_hits, chunk_builds, chunk_text_peers, chunk_drops;
  /* shared runs of policy filter/SSH texts spliced in as cached frames */
  uint64_t span_hits, span_builds;
  /* malloc arenas handed back to the system after work (glibc only) */
  uint64_t trims;
};
void tc_mapper_get_stats(struct tc_mapper *mp, struct tc_mapper_stats *out);

/* Waits until the dispatcher has handled everything queued so far (tests). */
void tc_mapper_sync(struct tc_mapper *mp);

/* Frames one map message: LE uint32 length + one zstd frame of json. */
void tc_mapper_frame(const char *json, size_t len, struct tc_buf *out);

/* ---- multi-frame map messages and shared peer chunks (chunks.c) -----------------------
 *
 * A map message's payload may be several zstd frames back to back: the
 * client's decoder (klauspost/compress Decoder.DecodeAll, used by v1.60's
 * smallzstd and v1.80+'s zstdframe.AppendDecode) decodes every frame of its
 * input and concatenates the output. So a full map is sent as frames of
 * per-recipient text (head, the viewer's own part of the peer list, tail)
 * around compressed chunks of the peer list that were compressed once and
 * are shared by every recipient that sees exactly those peers. Each frame
 * records its content size and is single-segment (window = content size),
 * well within the decoder's limits (v1.60: no limit set beyond the library
 * defaults of a 512 MiB window and 64 GiB output; v1.80: the same window,
 * no output limit). */

/* Appends one zstd frame (level 1, content size recorded) of src to out. */
void tc_mapper_zstd(const void *src, size_t len, struct tc_buf *out);

/* A message under construction: text not yet compressed, and the frames so far. */
struct tc_mapper_msg {
  struct tc_buf frames; /* 4 bytes reserved for the length, then zstd frames */
  struct tc_buf text;   /* per-recipient JSON for the next frame; append freely */
};
void tc_mapper_msg_init(struct tc_mapper_msg *m);
void tc_mapper_msg_free(struct tc_mapper_msg *m); /* NULL ok */
/* Compresses pending text into its own frame, then appends the complete zstd
 * frame(s) z (a shared chunk, copied). */
void tc_mapper_msg_zframes(struct tc_mapper_msg *m, const void *z, size_t len);
/* Flushes pending text and appends the framed message (LE uint32 length +
 * frames) to out. Frees m (init it again to reuse it). */
void tc_mapper_msg_finish(struct tc_mapper_msg *m, struct tc_buf *out);

/* Growable list of int64 (user ids collected for UserProfiles). Owned. */
struct tc_mapper_idv {
  int64_t *v;
  size_t n, cap;
};
void tc_mapper_idv_push(struct tc_mapper_idv *v, int64_t id);
/* Sorts and removes duplicates. */
void tc_mapper_idv_sort_unique(struct tc_mapper_idv *v);
void tc_mapper_idv_free(struct tc_mapper_idv *v);

/* Compressed chunks of peer lists. The node id space is cut into segments
 * of target..2*target nodes (boundaries move only when a segment grows past
 * 2*target or shrinks below target/2 by joins and removals); the fragments
 * of a viewer's visible peers within one segment are compressed into one
 * frame, cached by (segment, exact list of peer ids, leading comma), and
 * reused by every viewer that sees exactly that run. A node's change drops
 * the cached frames of its segment only.
 *
 * A segment that holds the viewer itself (not its own peer) or a fragment
 * specific to this viewer (a subnet router under a policy) is cut again into
 * fine segments of target/4 (shared the same way); the fine segment with the
 * viewer or router goes into the per-recipient text, as do runs shorter
 * than a few peers and whole lists shorter than target.
 *
 * Threads: one thread at a time (the dispatcher owns it). */
struct tc_mapper_chunks;
/* target: peers per chunk (>= 2). Owned; free with tc_mapper_chunks_free. */
struct tc_mapper_chunks *tc_mapper_chunks_new(size_t target);
void tc_mapper_chunks_free(struct tc_mapper_chunks *c); /* NULL ok */
/* Adapts the segment boundaries to the node set (sorted by id). Cheap when
 * seq is the one of the previous call. */
void tc_mapper_chunks_layout(struct tc_mapper_chunks *c, const struct tc_node *const *nodes, size_t n,
                             uint64_t seq);
/* node_id's peer fragment may have changed: drop its segment's chunks. */
void tc_mapper_chunks_touch(struct tc_mapper_chunks *c, int64_t node_id);
/* Every fragment may have changed (encoding environment, cache reset). */
void tc_mapper_chunks_reset(struct tc_mapper_chunks *c);

struct tc_mapper_chunk_peers {
  const struct tc_node *const *nodes; /* the viewer's visible peers, ascending id */
  size_t n;
  const bool *priv;  /* NULL, or per peer: its fragment is specific to this viewer */
  int64_t viewer_id; /* its segment is never shared */
  /* New reference to the fragment of nodes[k] as this viewer receives it. */
  struct tc_mapper_frag *(*frag)(void *ctx, size_t k);
  void *ctx;
  int64_t now; /* decides which cached chunks' Expired flags are still right */
};
/* Appends the Peers array content (fragments separated by commas, no
 * brackets) to m, from cached chunks where possible (c may be NULL: all
 * text). Owners of the peers go to users (ids; tagged nodes set *tagged). */
void tc_mapper_chunks_append(struct tc_mapper_chunks *c, struct tc_mapper_msg *m, const struct tc_mapper_chunk_peers *p,
                             struct tc_mapper_idv *users, bool *tagged);

/* Shared runs inside a per-recipient text (e.g. the SrcIPs text that every
 * node's packet filter holds under a policy where one user owns many
 * devices): each run is compressed once into its own frame, found again by
 * key, and spliced into every message that carries it. */
struct tc_mapper_span {
  size_t off, len; /* within the source text */
  const void *key; /* same key = same bytes, while the cache is not cleared */
};
struct tc_mapper_spans;
struct tc_mapper_spans *tc_mapper_spans_new(void);
void tc_mapper_spans_free(struct tc_mapper_spans *c); /* NULL ok */
/* Forgets every key (call before the texts the keys point into are freed). */
void tc_mapper_spans_clear(struct tc_mapper_spans *c);
/* Appends text[0, len) to m's text, except that each span of src (which
 * sits at text + at) whose bytes are really there goes in as the cached
 * frame of its bytes. A span that does not match is left as text, so the
 * decoded message is text byte for byte. c NULL: all text. */
void tc_mapper_spans_append(struct tc_mapper_spans *c, struct tc_mapper_msg *m, const char *text, size_t len,
                            size_t at, const char *src, const struct tc_mapper_span *sp, size_t n);
/* Spliced runs so far (hits) and frames compressed (builds). */
void tc_mapper_spans_stats(const struct tc_mapper_spans *c, uint64_t *hits, uint64_t *builds);

struct tc_mapper_chunk_stats {
  uint64_t hits;        /* chunks sent from the cache */
  uint64_t builds;      /* chunks compressed and cached */
  uint64_t text_peers;  /* peers sent in per-recipient text */
  uint64_t drops;       /* cached chunks dropped by touch/reset/layout */
  size_t segments, cached, cached_bytes;
};
void tc_mapper_chunks_stats(const struct tc_mapper_chunks *c, struct tc_mapper_chunk_stats *out);

#endif
