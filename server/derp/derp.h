/* derp: the embedded DERP relay, the STUN server, the DERPMap builder and
 * the small plain-HTTP endpoints a DERP node answers.
 *
 * Parts and their threads:
 *  - tc_derp_server: owns one epoll thread that runs every DERP connection
 *    (handshake, relaying, keep-alives). tc_derp_upgrade is the /derp
 *    tc_upgrade_fn (frontdoor.h) and runs on the listener's thread without
 *    blocking. Every other tc_derp_server_* call may come from any thread.
 *  - tc_stun_server: one thread answering binding requests on a UDP socket.
 *  - tc_derpmap: builds the merged DERPMap JSON; one background thread
 *    refreshes URL/path sources. Getters may be called from any thread; the
 *    change callback runs on the refresh thread (or on the thread that
 *    called tc_derpmap_refresh_now).
 *  - tc_derp_http_handle and the codec helpers are pure functions.
 *
 * Keys are raw 32-byte Curve25519 values; the private key file holds
 * "privkey:<64 hex>" like the Noise key. */
#ifndef TC_DERP_H
#define TC_DERP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <jansson.h>

#include "base/base.h"
#include "http/frontdoor.h"

/* ---- protocol constants (doc §11.4) ------------------------------------ */
enum {
  TC_DERP_FRAME_SERVER_KEY = 0x01,
  TC_DERP_FRAME_CLIENT_INFO = 0x02,
  TC_DERP_FRAME_SERVER_INFO = 0x03,
  TC_DERP_FRAME_SEND_PACKET = 0x04,
  TC_DERP_FRAME_RECV_PACKET = 0x05,
  TC_DERP_FRAME_KEEP_ALIVE = 0x06,
  TC_DERP_FRAME_NOTE_PREFERRED = 0x07,
  TC_DERP_FRAME_PEER_GONE = 0x08,
  TC_DERP_FRAME_PEER_PRESENT = 0x09,
  TC_DERP_FRAME_FORWARD_PACKET = 0x0a,
  TC_DERP_FRAME_WATCH_CONNS = 0x10,
  TC_DERP_FRAME_CLOSE_PEER = 0x11,
  TC_DERP_FRAME_PING = 0x12,
  TC_DERP_FRAME_PONG = 0x13,
  TC_DERP_FRAME_HEALTH = 0x14,
  TC_DERP_FRAME_RESTARTING = 0x15,
};
#define TC_DERP_MAGIC "DERP\xf0\x9f\x94\x91" /* 8 bytes */
#define TC_DERP_PROTOCOL_VERSION 2
#define TC_DERP_MAX_PACKET 65536           /* packet body of SendPacket/RecvPacket */
#define TC_DERP_MAX_FRAME (1u << 20)       /* any frame */
#define TC_DERP_CLIENT_INFO_MIN 56
#define TC_DERP_CLIENT_INFO_MAX (256u << 10)
#define TC_DERP_PEER_GONE_DISCONNECTED 0
#define TC_DERP_PEER_GONE_NOT_HERE 1

/* ---- keys -------------------------------------------------------------- */
/* Reads "privkey:<hex>" from path; if the file does not exist, generates a
 * key and writes it with mode 0600. priv receives 32 bytes. */
int tc_derp_load_or_create_key(const char *path, uint8_t priv[32], struct tc_err *err);

/* ---- codec helpers (pure; used by the server and by tests) -------------- */
/* The ServerKey frame: 5-byte header + magic + public key (45 bytes). */
void tc_derp_server_key_frame(const uint8_t server_pub[32], uint8_t out[45]);
/* Appends a complete ServerInfo frame (nonce ‖ crypto_box of json) to out.
 * TC_EPROTO (nothing appended) if client_pub is a low-order point. */
int tc_derp_server_info_frame(const uint8_t server_priv[32], const uint8_t client_pub[32],
                              const uint8_t nonce[24], const char *json, struct tc_buf *out);
/* Opens a ClientInfo payload (key ‖ nonce ‖ box). On success client_pub is
 * set and *json (owned, NUL-terminated) holds the plaintext. TC_EPROTO when
 * the size is out of bounds or the box does not open. */
int tc_derp_open_client_info(const uint8_t server_priv[32], const uint8_t *payload, size_t len,
                             uint8_t client_pub[32], char **json, size_t *json_len);
/* Disco packets start with "TS💬" and are at least 62 bytes. */
bool tc_derp_looks_like_disco(const uint8_t *p, size_t n);

/* ---- DERP server --------------------------------------------------------- */
struct tc_derp_server;

/* Admission check for a node key (derp.server.verify_clients). Runs on the
 * DERP thread during a handshake: must be quick and must not call back into
 * the DERP server. */
typedef bool (*tc_derp_verify_fn)(void *ctx, const uint8_t node_key[32]);

struct tc_derp_server_params {
  const char *private_key_path;  /* derp.server.private_key_path */
  const uint8_t *private_key;    /* 32 raw bytes; overrides the path (tests, bench) */
  tc_derp_verify_fn verify;      /* NULL admits every key */
  void *verify_ctx;
  uint64_t rate_bytes_per_sec;   /* per-client receive limit; 0 = none */
  uint64_t rate_burst_bytes;     /* raised to at least 64 KiB + 32 */
  int queue_depth;               /* per destination, each of data/disco; 0 = 32 */
  int write_timeout_ms;          /* a write stalled this long kills the client; 0 = 2000 */
  int handshake_timeout_ms;      /* 0 = 10000 */
  int keepalive_ms;              /* 0 = 60000; jitter adds up to 1/12 of it */
  size_t max_clients;            /* connections at once; 0 = 100000 */
};

struct tc_derp_metrics {
  uint64_t clients_connected;    /* handshake done, currently connected */
  uint64_t clients_handshaking;
  uint64_t clients_home;         /* said NotePreferred(1) */
  uint64_t clients_duplicate;    /* connected but superseded by a newer one with the key */
  uint64_t accepts;
  uint64_t handshakes_ok;
  uint64_t handshakes_failed;    /* bad ClientInfo, timeout, early close */
  uint64_t clients_rejected;     /* verify callback said no */
  uint64_t packets_recv, bytes_recv;       /* SendPacket bodies accepted */
  uint64_t packets_relayed, bytes_relayed; /* RecvPacket bodies queued for writing */
  uint64_t drops_unknown_dest;
  uint64_t drops_queue_full;     /* oldest packet dropped from a full queue */
  uint64_t drops_gone;           /* destination disconnected with packets queued */
  uint64_t peer_gone_disconnected, peer_gone_not_here; /* PeerGone frames queued */
  uint64_t pings, keepalives_sent;
  uint64_t kills_write_stall, kills_frame_too_big, kills_protocol, kills_admin;
  uint64_t rate_limited;         /* times a client was paused by its token bucket */
};

/* Loads or creates the key and starts the DERP thread. *out owned by the
 * caller. */
int tc_derp_server_new(const struct tc_derp_server_params *p, struct tc_derp_server **out,
                       struct tc_err *err);
void tc_derp_server_public_key(const struct tc_derp_server *s, uint8_t out[32]);

/* The /derp tc_upgrade_fn; ctx is the struct tc_derp_server *. Accepts
 * "Upgrade: DERP" (any case; "Derp-Fast-Start: 1" skips the 101) and
 * "Upgrade: websocket" with the "derp" subprotocol (DERP bytes in binary
 * WebSocket messages, as wasm clients speak it); anything else gets 426
 * "DERP requires connection upgrade". Never blocks for long. */
void tc_derp_upgrade(void *ctx, int fd, const struct tc_http_head *head);

/* Lower-level entry: takes ownership of a connected stream socket whose next
 * `discard` bytes are the request head; writes the 101 unless fast_start.
 * peer is borrowed (copied). 0, or TC_EAGAIN when full or stopping (fd is
 * closed either way on failure). */
int tc_derp_server_accept(struct tc_derp_server *s, int fd, const char *peer, size_t discard, bool fast_start);

/* Closes every connection using node_key (e.g. a node was deleted). Returns
 * how many were closed. */
int tc_derp_server_disconnect_key(struct tc_derp_server *s, const uint8_t node_key[32]);
/* Queues a Health frame (text "" clears) to node_key, or to all if NULL.
 * Returns the number of clients it was queued for, or TC_ETOOBIG (> 4 KiB). */
int tc_derp_server_send_health(struct tc_derp_server *s, const uint8_t *node_key, const char *text);
/* Queues a Restarting frame to every client. */
void tc_derp_server_send_restarting(struct tc_derp_server *s, uint32_t reconnect_in_ms, uint32_t try_for_ms);
/* Changes the per-client rate limit for existing and future clients (0 = none). */
void tc_derp_server_set_rate_limit(struct tc_derp_server *s, uint64_t bytes_per_sec, uint64_t burst);
void tc_derp_server_get_metrics(struct tc_derp_server *s, struct tc_derp_metrics *out);
/* CPU time consumed by the DERP thread so far, in nanoseconds. */
int64_t tc_derp_server_thread_cpu_ns(struct tc_derp_server *s);
/* Sends Restarting (when restart_hint_ms > 0), gives queued data up to
 * flush_ms to drain, then stops and closes everything. NULL ok. */
void tc_derp_server_shutdown(struct tc_derp_server *s, uint32_t restart_hint_ms, int flush_ms);
void tc_derp_server_free(struct tc_derp_server *s);

/* ---- STUN (doc §12) ------------------------------------------------------ */
/* Accepts only a well-formed Tailscale binding request: type 0x0001, magic
 * cookie, attribute lengths consistent with the datagram, SOFTWARE
 * "tailnode" and a last-attribute FINGERPRINT that verifies. 0 and the
 * transaction ID, or TC_EPROTO. */
int tc_stun_parse_binding_request(const uint8_t *b, size_t n, uint8_t txid[12]);
/* Writes a success response with XOR-MAPPED-ADDRESS for addr (IPv4-mapped
 * IPv6 addresses are reported as IPv4). Returns the length (32 or 44) or 0
 * for an unsupported family. out must hold 44 bytes. */
size_t tc_stun_response(const uint8_t txid[12], const struct sockaddr *addr, uint8_t out[44]);

struct tc_stun_server;
struct tc_stun_stats {
  uint64_t requests, replies, bad_packets;
};
/* Binds "host:port" (":3478", "0.0.0.0:3478" and "[::]:3478" bind one
 * dual-stack socket; a specific address binds that family only) and starts
 * the thread. */
int tc_stun_server_new(const char *listen_addr, struct tc_stun_server **out, struct tc_err *err);
int tc_stun_server_port(const struct tc_stun_server *s);
void tc_stun_server_get_stats(struct tc_stun_server *s, struct tc_stun_stats *out);
void tc_stun_server_free(struct tc_stun_server *s);

/* ---- DERPMap ------------------------------------------------------------- */
struct tc_derpmap;

/* Called with the new compact JSON (borrowed for the call) whenever the
 * merged map changed. */
typedef void (*tc_derpmap_change_fn)(void *ctx, const char *json, size_t len);

struct tc_derpmap_params {
  /* the embedded region (derp.server.* with enabled &&
   * automatically_add_embedded_derp_region) */
  bool embedded;
  int region_id;
  const char *region_code, *region_name;
  const char *server_url;        /* hostname and DERPPort come from it */
  const char *ipv4, *ipv6;       /* optional hints; default: server_url's host if it is an
                                    IP literal (the other family then "none") */
  const char *stun_listen_addr;  /* STUNPort comes from its port */
  bool insecure_tls;             /* InsecureForTests: clients skip certificate checks (only
                                    for the self-signed certificate tailcoat generated) */
  /* other sources, merged in this order: urls, then paths, then embedded */
  const char *const *urls;
  size_t nurls;
  const char *const *paths;
  size_t npaths;
  bool auto_update;              /* start the refresh thread */
  int64_t update_frequency_ms;   /* 0 = 3 h */
  long http_timeout_ms;          /* per URL fetch; 0 = 10000 */
  bool fail_on_initial_error;    /* tc_derpmap_new fails if a source fails (Headscale) */
  bool bootstrap_dns;            /* resolve every node HostName after each build, for
                                    /bootstrap-dns (getaddrinfo on the build thread) */
  tc_derpmap_change_fn on_change;
  void *change_ctx;
};

/* Builds the first map (sources are fetched/read synchronously) and starts
 * the refresh thread if asked. */
int tc_derpmap_new(const struct tc_derpmap_params *p, struct tc_derpmap **out, struct tc_err *err);
/* Re-reads every source now; a failing source keeps its last good map. Fires
 * the change callback if the merged JSON changed. Returns 0 if every source
 * loaded, else the first error (the merged map is still updated). */
int tc_derpmap_refresh_now(struct tc_derpmap *dm, struct tc_err *err);
/* The current merged map as compact JSON (owned). Never NULL. */
char *tc_derpmap_json(struct tc_derpmap *dm);
/* The current map as a jansson object (new reference). */
json_t *tc_derpmap_get(struct tc_derpmap *dm);
/* The bootstrap DNS cache {"host":["ip",...]} as compact JSON (owned;
 * "{}" when bootstrap_dns is off or nothing resolved). */
char *tc_derpmap_bootstrap_dns_json(struct tc_derpmap *dm);
/* How many times the merged map changed (the first build counts as 1). */
uint64_t tc_derpmap_generation(struct tc_derpmap *dm);
void tc_derpmap_free(struct tc_derpmap *dm);

/* Pure pieces, exposed for tests and for callers with their own sources:
 * parses a DERPMap in JSON (any key case, as Go decodes) or Headscale's YAML
 * shape into canonical form {"Regions":{"<id>":{...}}} (a region that is
 * null stays null: it deletes that region when merged). Owned result. */
int tc_derpmap_parse(const char *text, size_t len, bool yaml, json_t **out, struct tc_err *err);
/* Merges canonical maps in order (later regions replace earlier ones with the
 * same ID, null removes) and returns the canonical result (owned). */
json_t *tc_derpmap_merge(json_t *const *maps, size_t n);
/* Compact JSON text of a canonical map, with Go's field order and
 * omitempty rules; regions sorted by ID; never null. Owned. */
char *tc_derpmap_dump(json_t *map);
/* The embedded region object built from params (owned), or NULL + err. */
json_t *tc_derpmap_embedded_region(const struct tc_derpmap_params *p, struct tc_err *err);

/* ---- plain HTTP endpoints ---------------------------------------------- */
#define TC_DERP_HTTP_MAX_HEADERS 6
struct tc_derp_http_resp {
  int status;
  size_t nheaders;
  struct {
    char name[40];
    char value[128];
  } headers[TC_DERP_HTTP_MAX_HEADERS];
  char *body;       /* owned; may be NULL for an empty body */
  size_t body_len;
};
typedef const char *(*tc_derp_header_get_fn)(void *ctx, const char *name);

/* Answers /derp/probe, /derp/latency-check, /generate_204 and
 * /bootstrap-dns. query is the raw query string (without '?'). dns_json is
 * the bootstrap DNS cache, a JSON object {"host":["ip",...]} (NULL = none).
 * Returns true and fills resp if path is one of these; false otherwise.
 * Free resp->body with free(). */
bool tc_derp_http_handle(const char *method, const char *path, const char *query, tc_derp_header_get_fn get,
                         void *get_ctx, const char *dns_json, struct tc_derp_http_resp *resp);

#endif
