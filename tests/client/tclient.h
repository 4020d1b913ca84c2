/* tclient: a test client that talks to a tailcoat server the way tailscaled
 * does (GET /key, POST /ts2021 with the Noise initiation in a header, Noise
 * IK, HTTP/2 with prior knowledge inside 4096-byte Noise records, map
 * messages as LE uint32 + zstd frames), plus low-level hooks to misbehave.
 * Also a tiny loopback HTTP/1.1 listener that stands in for server/http in
 * transport tests (serves /key and hands /ts2021 to tc_ctl_upgrade).
 *
 * Threads: a tc_tclient is used by one thread at a time; all calls block
 * (bounded by the given timeouts). Use one client per thread. */
#ifndef TC_TCLIENT_H
#define TC_TCLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "crypto/crypto.h"
#include "http/frontdoor.h"

struct tc_tclient;

/* The part of a connection's Noise IK that needs no reply from the server:
 * the machine key pair, the ephemeral key and the es/ss mixes, as a real
 * client has them before it dials. The benchmark prepares these before its
 * clock starts so that it measures the server, not its own key generation. */
struct tc_tclient_prepared {
  struct tc_noise_hs hs;
  uint8_t init[TC_TS_INIT_LEN];
  bool ready; /* cleared (and hs wiped) when a connect consumes it */
};
/* machine_priv NULL = a random machine key. 0 or TC_E*. */
int tc_tclient_prepare(uint16_t version, const uint8_t *machine_priv, const uint8_t server_pub[32],
                       struct tc_tclient_prepared *out);

struct tc_tclient_opts {
  uint16_t version;            /* capability version, default 138 */
  const uint8_t *machine_priv; /* 32 bytes; NULL = random */
  const uint8_t *server_pub;   /* 32 bytes; NULL = fetch GET /key first */
  int timeout_ms;              /* dial + handshake budget, default 5000 */
  bool ignore_stream_limit;    /* misbehave: open streams beyond the server's limit */
  bool no_http2;               /* stop after Noise: no preface, plaintext is discarded */
  bool websocket;              /* the browser variant: GET + WebSocket binary messages */
  bool tls;                    /* TLS first (any certificate accepted, as tailscaled does) */
  const char *ws_protocol;     /* Sec-WebSocket-Protocol to offer, default the control one; "" = none */
  struct tc_tclient_prepared *prepared; /* if set: used (and consumed) instead of machine_priv/server_pub */
};

/* GET /key?v=version over plain HTTP (use server_pub with TLS listeners). *status is the HTTP status; on 200
 * the publicKey is parsed into server_pub. 0 or TC_E*. */
int tc_tclient_fetch_key(const char *host, int port, uint16_t version, uint8_t server_pub[32], int *status,
                         struct tc_err *err);

/* Dials, upgrades, finishes Noise and starts HTTP/2. On a Noise error frame
 * returns TC_EPROTO with "server error: <text>" in err. *out is owned. */
int tc_tclient_connect(const char *host, int port, const struct tc_tclient_opts *opts, struct tc_tclient **out,
                       struct tc_err *err);
void tc_tclient_free(struct tc_tclient *c);

/* Submits a request (body copied; may be NULL). Returns the stream id > 0
 * or a negative TC_E*. Nothing is awaited. */
int32_t tc_tclient_submit(struct tc_tclient *c, const char *method, const char *path, const char *content_type,
                          const void *body, size_t len);
/* Like submit, with extra request headers: extra is a NULL-terminated list of
 * name, value pairs (names lower-case). */
int32_t tc_tclient_submit_hdrs(struct tc_tclient *c, const char *method, const char *path,
                               const char *const *extra, const void *body, size_t len);
/* Waits for the response headers; returns the status (> 0), TC_EAGAIN on
 * timeout, TC_EIO if the stream was reset or the connection closed. */
int tc_tclient_wait_headers(struct tc_tclient *c, int32_t sid, int timeout_ms);
/* Waits until the stream is closed. 0, TC_EAGAIN (timeout) or TC_EIO. */
int tc_tclient_wait_closed(struct tc_tclient *c, int32_t sid, int timeout_ms);
/* Body bytes received so far (borrowed; valid until the next call). For a
 * stream read with map_next, bytes already returned may have been dropped. */
const char *tc_tclient_body(struct tc_tclient *c, int32_t sid, size_t *len);
/* RST_STREAM code received for the stream (0 if none). */
uint32_t tc_tclient_stream_error(struct tc_tclient *c, int32_t sid);
/* The response's Retry-After in seconds (0 if none). */
int tc_tclient_retry_after(struct tc_tclient *c, int32_t sid);
/* Frees the client's record of a stream (resetting it if still open); the
 * id is unknown afterwards. Long-running clients call this to bound memory. */
void tc_tclient_forget(struct tc_tclient *c, int32_t sid);
/* submit + wait_closed: *status and an owned body; the stream is forgotten
 * afterwards. 0 or TC_E*. */
int tc_tclient_request(struct tc_tclient *c, const char *method, const char *path, const void *body, size_t len,
                       int timeout_ms, int *status, char **resp, size_t *resp_len);
/* Next map message of a streaming response, decoded (owned JSON). 0,
 * TC_EAGAIN (timeout), TC_EIO (stream ended without another message),
 * TC_EPROTO (bad frame). */
int tc_tclient_map_next(struct tc_tclient *c, int32_t sid, int timeout_ms, char **json, size_t *len);
/* Decodes one map message (what map_next uses; exposed for tests): LE
 * uint32 length, then that many bytes of zstd frames (skippable ones
 * allowed) whose decoded concatenation is the JSON. 0 with an owned
 * NUL-terminated *json and *consumed = 4 + length; TC_EAGAIN when buf does
 * not hold the whole message yet; TC_ETOOBIG past max_json (checked before
 * allocating from declared sizes, and while decoding frames that declare
 * none); TC_EPROTO for anything malformed. Uses one zstd context per thread. */
int tc_tclient_unframe(const uint8_t *buf, size_t len, size_t max_json, size_t *consumed, char **json,
                       size_t *json_len);
/* Resets a stream (RST_STREAM CANCEL). */
int tc_tclient_reset(struct tc_tclient *c, int32_t sid);

/* Reads and processes whatever arrives within timeout_ms (at least one
 * poll). 0, or TC_EIO once the server has closed the connection. */
int tc_tclient_pump(struct tc_tclient *c, int timeout_ms);
bool tc_tclient_closed(struct tc_tclient *c);

/* Misbehaviour and inspection. */
int tc_tclient_send_raw(struct tc_tclient *c, const void *p, size_t n);      /* bytes on the Noise stream */
int tc_tclient_send_wire(struct tc_tclient *c, const void *p, size_t n);     /* bytes on the socket (no WS framing) */
int tc_tclient_send_record(struct tc_tclient *c, const void *pt, size_t n);  /* one sealed record, n <= 4077 */
int tc_tclient_send_plain(struct tc_tclient *c, const void *pt, size_t n);   /* plaintext, split into records */
size_t tc_tclient_max_record(struct tc_tclient *c);  /* largest server record seen, bytes on the wire */
size_t tc_tclient_records(struct tc_tclient *c);     /* server records seen */
bool tc_tclient_first_frame_settings(struct tc_tclient *c); /* server's first HTTP/2 frame was SETTINGS */
const char *tc_tclient_early_json(struct tc_tclient *c);   /* EarlyNoise JSON, or NULL */
bool tc_tclient_goaway(struct tc_tclient *c);              /* the server sent GOAWAY */
const uint8_t *tc_tclient_machine_pub(struct tc_tclient *c);
int tc_tclient_fd(struct tc_tclient *c);
/* With TLS, bytes may wait inside the TLS layer where poll() on the fd does
 * not see them: pump when this is true before polling. */
bool tc_tclient_pending(struct tc_tclient *c);

/* ---- loopback listener --------------------------------------------------- */
struct tc_tlistener;
/* Listens on 127.0.0.1 (ephemeral port). GET /key?v= answers from
 * server_pub; POST/GET /ts2021 goes to upgrade(ctx, fd, head) on the
 * listener thread (the frontdoor contract). */
int tc_tlistener_start(const uint8_t server_pub[32], tc_upgrade_fn upgrade, void *ctx,
                       struct tc_tlistener **out);
int tc_tlistener_port(struct tc_tlistener *l);
/* Serves an already connected stream socket (e.g. the plaintext end from
 * server/tls) like an accepted one. Steals fd. Any thread, never blocks. */
void tc_tlistener_handoff(struct tc_tlistener *l, int fd);
void tc_tlistener_stop(struct tc_tlistener *l);

/* Connects to 127.0.0.1:port, sends req verbatim, returns everything the
 * server sends until it closes or timeout_ms passes (owned). */
char *tc_traw_exchange(int port, const void *req, size_t len, int timeout_ms, size_t *outlen);

#endif
