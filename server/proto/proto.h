/* proto: the /ts2021 control transport. It takes over an upgraded HTTP/1.1
 * connection (see http/frontdoor.h), runs the Noise IK handshake, and serves
 * HTTP/2 (nghttp2, prior knowledge) inside 4096-byte Noise records. Every
 * request on every stream goes to one handler, run on a small worker pool; the
 * handler answers through a tc_ctl_stream (a whole response, or a streamed one
 * such as a map long poll). Also: the map message framing (LE uint32 + zstd)
 * and the pure logic of GET /key.
 *
 * Threads: one event-loop thread owns every connection and every nghttp2
 * session; handlers run on worker threads. tc_ctl_upgrade is called on the
 * listener's thread and never blocks for long. Stream functions are
 * thread-safe. tc_map_frame and tc_ctl_key_response are pure. */
#ifndef TC_PROTO_H
#define TC_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "http/frontdoor.h"

#define TC_CTL_BODY_MAX (1u << 20)        /* request bodies above this get 413 */
#define TC_CTL_MAX_STREAMS 100            /* advertised MAX_CONCURRENT_STREAMS */
#define TC_CTL_WINDOW (1u << 20)          /* advertised INITIAL_WINDOW_SIZE */
#define TC_CTL_HEADER_BYTES_MAX 16384     /* sum of header name+value bytes per request */
#define TC_CTL_HEADERS_MAX 64             /* headers kept per request */
#define TC_CTL_CONN_BUFFER_MAX (16u << 20) /* queued response bytes per connection */

/* A request as the handler sees it. Borrowed from the stream: valid while the
 * handler holds the stream (see tc_ctl_stream_end). */
struct tc_ctl_header {
  char *name; /* lower-case, as HTTP/2 sends them */
  char *value;
};
struct tc_ctl_request {
  const char *method;
  const char *path; /* ":path" including any query */
  const char *authority;
  size_t nheaders;
  const struct tc_ctl_header *headers;
  const uint8_t *body; /* NUL-terminated for convenience; body_len excludes it */
  size_t body_len;
  uint8_t machine_key[32]; /* the Noise initiator static key: the ONLY identity */
  uint16_t version;        /* protocol (capability) version from the handshake */
  uint64_t conn_id;        /* unique per Noise connection in this process */
  int32_t stream_id;
  char peer[64];           /* remote "ip:port" from the front door */
};

/* Case-insensitive lookup of a request header; NULL if absent. Borrowed. */
const char *tc_ctl_request_header(const struct tc_ctl_request *req, const char *name);

struct tc_ctl_stream;

/* The request handler. Runs on a worker thread and may block (database,
 * waiting for a login), but every blocked handler occupies a worker: long
 * waits should hold the stream (tc_ctl_stream_ref) and return.
 *
 * The handler receives one reference to st and owns the obligation to finish
 * the response: tc_ctl_stream_respond(), or tc_ctl_stream_begin() + writes +
 * tc_ctl_stream_end(). Finishing drops that reference. If the handler returns
 * without having called respond/begin, the server answers 500. If it returns
 * after begin() without end(), whoever it handed the stream to must call
 * end() later (also after a cancel). */
typedef void (*tc_ctl_handler_fn)(void *ctx, const struct tc_ctl_request *req, struct tc_ctl_stream *st);

/* Sends a complete response. content_type may be NULL (no header). Copies
 * body. Drops the handler's reference, except on TC_EINVAL for a stream
 * already begun (a caller bug: end() is still owed). Otherwise 0, TC_EINVAL
 * (bad status/content type: a 500 goes out instead), TC_EIO (stream gone) or
 * TC_ETOOBIG (connection buffer full; the stream is reset). */
int tc_ctl_stream_respond(struct tc_ctl_stream *st, int status, const char *content_type, const void *body,
                          size_t len);
/* Starts a streamed response (headers go out promptly). 0 / TC_EINVAL / TC_EIO. */
int tc_ctl_stream_begin(struct tc_ctl_stream *st, int status, const char *content_type);
/* Queues bytes (copied) and wakes the loop; they are flushed promptly within
 * HTTP/2 flow control. 0; TC_EIO if the stream was cancelled; TC_ETOOBIG if
 * the connection's queued bytes would exceed TC_CTL_CONN_BUFFER_MAX (the
 * stream is then reset: a client that does not read is cut off). */
int tc_ctl_stream_write(struct tc_ctl_stream *st, const void *data, size_t len);
/* Ends the response (END_STREAM after the queued bytes) and drops the
 * handler's reference: st must not be used afterwards unless the caller holds
 * another reference. Call exactly once. */
void tc_ctl_stream_end(struct tc_ctl_stream *st);
/* Extra references for holders other than the handler (e.g. a map-stream
 * subscriber list). unref frees on the last reference. NULL ok. */
void tc_ctl_stream_ref(struct tc_ctl_stream *st);
void tc_ctl_stream_unref(struct tc_ctl_stream *st);
/* Registers fn(arg), called at most once when the client resets the stream,
 * the connection dies, or the server stops, before the response ended. It
 * runs on the loop thread (or at once on the caller's thread if the stream is
 * already cancelled) with no lock held; it must not block. The holder must
 * still call tc_ctl_stream_end. */
void tc_ctl_stream_on_cancel(struct tc_ctl_stream *st, void (*fn)(void *arg), void *arg);
bool tc_ctl_stream_cancelled(struct tc_ctl_stream *st);
/* Adds "Retry-After: seconds" to the response; call before respond/begin.
 * Clients since capability version 137 wait that long before retrying a
 * refused registration (others back off on their own). */
void tc_ctl_stream_retry_after(struct tc_ctl_stream *st, int seconds);
/* The request this stream answers. Borrowed, valid while a reference is held. */
const struct tc_ctl_request *tc_ctl_stream_request(struct tc_ctl_stream *st);

/* ---- server ------------------------------------------------------------- */
struct tc_ctl_server;

#define TC_CTL_WORKERS_DEFAULT 8

struct tc_ctl_server_opts {
  int workers;          /* handler threads (they also run new connections' Noise handshakes), default 8 */
  int first_request_timeout_ms; /* close a connection that sends no request, default 30000 */
  int max_conns;        /* Noise connections at once (incl. ones being set up); more get 503. Default 65536 */
  int idle_timeout_ms;  /* GOAWAY + close after this long with no open stream and no input, default 300000 */
  /* A connection that has sent nothing for this long gives its HTTP/2 frame
   * buffer pages back to the kernel (checked every 100 ms). Default (0) 200;
   * negative: never. */
  int idle_release_ms;
  /* Optional: bytes to send as the EarlyNoise payload (before SETTINGS);
   * called on the loop thread right after the handshake, must not block.
   * Return an owned JSON string or NULL for none. */
  char *(*early_payload)(void *ctx, const uint8_t machine_key[32], uint16_t version);
  void *early_ctx;
};

/* Creates the server and starts its loop and workers. server_priv is the
 * Noise static private key (copied, wiped on free). opts may be NULL. */
int tc_ctl_server_new(tc_ctl_handler_fn handler, void *ctx, const uint8_t server_priv[32],
                      const struct tc_ctl_server_opts *opts, struct tc_ctl_server **out, struct tc_err *err);
/* Closes every connection (cancelling open streams; clients get GOAWAY),
 * waits for the loop and the workers to finish (handlers must return; never
 * call this from a handler), frees the server. NULL ok.
 * Streams still referenced by holders stay valid memory; writes fail. */
void tc_ctl_server_stop(struct tc_ctl_server *srv);
/* The tc_upgrade_fn for "/ts2021"; ctx is the tc_ctl_server. Checks, in the
 * reference server's order: Upgrade present (400 "missing next protocol"),
 * "websocket" -> the WebSocket variant (GET, handshake in the query,
 * subprotocol tailscale-control-protocol, else 101 + close 1008), otherwise
 * it must be tailscale-control-protocol (400), X-Tailscale-Handshake present
 * and base64 (400); a decoded length other than 101 gets 101 + a Noise error
 * frame. Then the connection moves to the loop. Note: the front door only
 * calls this when an Upgrade header is present; a plain POST /ts2021 should
 * get 400 "missing next protocol" from the HTTP router. */
void tc_ctl_upgrade(void *ctx, int fd, const struct tc_http_head *head);

/* Counters for tests and metrics (approximate, lock-free reads). */
struct tc_ctl_stats {
  uint64_t conns_open, conns_total, handshakes_failed, streams_open, requests_total;
  uint64_t h2_heap_bytes;       /* malloc'd memory nghttp2 holds now (all sessions) */
  uint64_t h2_mapped_bytes;     /* its large blocks, mapped separately (virtual size) */
  uint64_t h2_pooled_bytes;     /* such blocks freed and kept for new connections (at most 32) */
  uint64_t idle_released_bytes; /* resident pages of those given back when idle, in total */
  uint64_t idle_releases;       /* connections released so (each time one went quiet) */
};
void tc_ctl_server_stats(struct tc_ctl_server *srv, struct tc_ctl_stats *out);

/* ---- map framing and /key ------------------------------------------------ */
/* Frames one map message: LE uint32 length + one zstd frame of json.
 * Appends to out. 0 or TC_EINTERNAL. */
int tc_map_frame(const char *json, size_t len, struct tc_buf *out);
/* Decodes one framed message from buf (for clients/tests). Its payload is
 * one or more zstd frames (the mapper sends full maps as several: shared
 * peer chunks), decoded and joined as Go's zstd DecodeAll does. On success
 * *consumed is the frame size and *json an owned NUL-terminated string.
 * Returns 0, TC_EAGAIN (need more bytes), TC_EPROTO or TC_ETOOBIG (max_json). */
int tc_map_unframe(const uint8_t *buf, size_t len, size_t max_json, size_t *consumed, char **json, size_t *json_len);

/* GET /key?v=N: query is the raw query string (no '?'). Sets *status and an
 * owned JSON body (text/plain error message for 400). */
void tc_ctl_key_response(const uint8_t server_pub[32], const char *query, int *status, char **body);

#endif
