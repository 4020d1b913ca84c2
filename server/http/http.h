/* http: tailcoat's HTTP front — the listener (frontdoor.h: accept, peek the
 * request head, hand Upgrade requests to their modules, everything else to
 * libmicrohttpd), a small method+path router that any module registers plain
 * routes on, JSON responses and Headscale/grpc-gateway shaped errors.
 *
 * The router is independent of libmicrohttpd: a request is a plain struct
 * tc_http_req, so the CLI can run the very same handlers in-process when no
 * server is running (tc_router_dispatch_raw).
 *
 * Threads: routes are registered before the front door starts. Handlers run
 * on libmicrohttpd's worker threads (several at once) or on the caller's
 * thread for in-process dispatch; they must be thread-safe. The listener runs
 * one epoll thread of its own. */
#ifndef TC_HTTP_HTTP_H
#define TC_HTTP_HTTP_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

#include "base/base.h"
#include "http/frontdoor.h"

#define TC_HTTP_BODY_MAX_DEFAULT (1024 * 1024)
#define TC_HTTP_PARAMS_MAX 8
#define TC_HTTP_QUERY_MAX 16
#define TC_HTTP_RESP_HEADERS_MAX 8

/* gRPC status codes used in error bodies (grpc-gateway shape). */
enum {
  TC_GRPC_OK = 0,
  TC_GRPC_CANCELLED = 1,
  TC_GRPC_UNKNOWN = 2,
  TC_GRPC_INVALID_ARGUMENT = 3,
  TC_GRPC_NOT_FOUND = 5,
  TC_GRPC_ALREADY_EXISTS = 6,
  TC_GRPC_PERMISSION_DENIED = 7,
  TC_GRPC_RESOURCE_EXHAUSTED = 8,
  TC_GRPC_FAILED_PRECONDITION = 9,
  TC_GRPC_ABORTED = 10,
  TC_GRPC_UNIMPLEMENTED = 12,
  TC_GRPC_INTERNAL = 13,
  TC_GRPC_UNAVAILABLE = 14,
  TC_GRPC_UNAUTHENTICATED = 16,
};

struct tc_http_kv {
  const char *name;
  const char *value;
};

/* One request as a handler sees it. Everything is borrowed for the duration
 * of the handler call. */
struct tc_http_req {
  const char *method;
  const char *path;  /* decoded path without the query */
  size_t nparams;    /* values captured by {name} segments of the route pattern */
  struct tc_http_kv params[TC_HTTP_PARAMS_MAX];
  size_t nquery;     /* decoded query arguments, in order */
  struct tc_http_kv query[TC_HTTP_QUERY_MAX];
  const char *body;  /* NUL-terminated for convenience; body_len bytes */
  size_t body_len;
  bool trusted;      /* came over the local unix socket or in-process (CLI) */
  bool tls;
  const char *peer;  /* "ip:port", "unix" or "local" */
  const char *route; /* the matched route pattern (for metrics), "" if none */
  /* Header lookup supplied by the transport; may be NULL (no headers). */
  const char *(*header_fn)(const struct tc_http_req *req, const char *name);
  void *transport; /* private to the transport */
};

/* A response under construction. body is JSON unless content_type says
 * otherwise. Free with tc_http_resp_free. */
struct tc_http_resp {
  int status;               /* 0 until set; the router turns 0 into 500 */
  const char *content_type; /* static string; NULL = application/json */
  struct tc_buf body;
  size_t nheaders;
  struct {
    char *name; /* owned */
    char *value; /* owned */
  } headers[TC_HTTP_RESP_HEADERS_MAX];
};

/* Borrowed: route parameter / query argument / header value, or NULL. */
const char *tc_http_param(const struct tc_http_req *req, const char *name);
const char *tc_http_query(const struct tc_http_req *req, const char *name);
const char *tc_http_header(const struct tc_http_req *req, const char *name);

/* Sets status and a JSON body; steals `json` (NULL allowed -> "{}"). */
void tc_http_resp_json(struct tc_http_resp *resp, int status, json_t *json);
/* Sets status and a plain body of the given content type (copied). */
void tc_http_resp_text(struct tc_http_resp *resp, int status, const char *content_type, const char *body,
                       size_t len);
/* Error in grpc-gateway shape {"code":grpc,"message":msg,"details":[]}. */
void tc_http_resp_error(struct tc_http_resp *resp, int status, int grpc_code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Maps a TC_E* code (and its message) to status and gRPC code. */
void tc_http_resp_tc_err(struct tc_http_resp *resp, int code, const char *msg);
/* Adds a response header (copied). Silently ignored past TC_HTTP_RESP_HEADERS_MAX.
 * A Content-Type added here replaces content_type. */
void tc_http_resp_header(struct tc_http_resp *resp, const char *name, const char *value);
void tc_http_resp_free(struct tc_http_resp *resp);
/* Maps a TC_E* code to HTTP status / gRPC code. */
int tc_http_status_for(int tc_code);
int tc_http_grpc_for(int tc_code);

/* ---- router ------------------------------------------------------------------ */

typedef void (*tc_http_handler)(void *ctx, const struct tc_http_req *req, struct tc_http_resp *resp);

struct tc_router;

/* Owned; free with tc_router_free (NULL ok). */
struct tc_router *tc_router_new(void);
void tc_router_free(struct tc_router *r);

/* Registers method ("GET", "POST", ... or "*" for any) + pattern. A pattern is
 * a path of literal segments and {name} segments that capture one segment;
 * a last segment {name*} captures the rest of the path (possibly empty).
 * Literal routes win over captures when both match. Returns 0, TC_EINVAL for
 * a malformed pattern, TC_EEXIST for a duplicate. Not thread-safe: register
 * before serving. */
int tc_http_route(struct tc_router *r, const char *method, const char *pattern, tc_http_handler fn,
                  void *ctx);

/* Hook run after every dispatched request (metrics): route pattern ("" when
 * nothing matched) and final status. */
typedef void (*tc_http_observer)(void *ctx, const struct tc_http_req *req, int status);
void tc_router_set_observer(struct tc_router *r, tc_http_observer fn, void *ctx);

/* Finds the route for req->method/req->path, fills req->params and
 * req->route and runs the handler; 404 / 405 errors (JSON) when nothing
 * matches. resp must be zero-initialised by the caller. */
void tc_router_dispatch(struct tc_router *r, struct tc_http_req *req, struct tc_http_resp *resp);

/* In-process request: target is "/path?query" (percent-encoded), body may be
 * NULL. trusted as for the unix socket. Used by the CLI without a server. */
void tc_router_dispatch_raw(struct tc_router *r, const char *method, const char *target, const char *body,
                            size_t body_len, bool trusted, struct tc_http_resp *resp);

/* Percent-decodes src (len bytes; '+' -> ' ' when form is true) into an
 * owned string. Returns NULL on a malformed escape or an embedded NUL. */
char *tc_http_pct_decode(const char *src, size_t len, bool form);

/* ---- front door (listener + libmicrohttpd) ------------------------------------- */

struct tc_frontdoor_opts {
  const char *listen_addr;  /* "host:port" ("" / NULL: no TCP listener) */
  const char *unix_socket;  /* path ("" / NULL: none); requests on it are trusted */
  unsigned unix_socket_mode; /* e.g. 0770; 0 = leave umask default */
  int head_timeout_ms;      /* 0 = 10 s: a request head must be complete by then */
  size_t body_max;          /* 0 = TC_HTTP_BODY_MAX_DEFAULT -> 413 above */
  int threads;              /* libmicrohttpd worker threads, 0 = 4 */
  /* CIDRs ("10.0.0.0/8", "::1/128") of reverse proxies whose
   * X-Forwarded-For is believed: a request from one of them gets the
   * forwarded client address as its peer (for logs and handlers).
   * Copied; NULL/0 = trust nobody. Malformed entries fail tc_frontdoor_new. */
  const char *const *trusted_proxies;
  size_t n_trusted_proxies;
  struct tc_router *router; /* borrowed; must outlive the front door */
};

/* Creates the front door and binds its sockets (so address errors show up at
 * once). Owned; free with tc_frontdoor_free. */
int tc_frontdoor_new(const struct tc_frontdoor_opts *opts, struct tc_frontdoor **out, struct tc_err *err);
/* Starts libmicrohttpd and the listener thread. */
int tc_frontdoor_start(struct tc_frontdoor *fdr, struct tc_err *err);
/* The TCP port actually bound (useful with port 0), or -1. */
int tc_frontdoor_port(const struct tc_frontdoor *fdr);
/* Feeds an already connected plaintext stream socket (e.g. the TLS module's
 * decrypted end) through the same peek/route logic. Takes ownership of fd in
 * every case. peer is the real client address. Thread-safe. 0 or TC_E*. */
int tc_frontdoor_add_connection(struct tc_frontdoor *fdr, int fd, const struct sockaddr *peer,
                                socklen_t peerlen, bool tls);
/* Receives a TCP connection whose first byte is a TLS handshake record
 * (0x16), still unread; takes ownership of fd. peer is "ip:port", borrowed.
 * Runs on the listener thread and must not block. */
typedef void (*tc_frontdoor_tls_fn)(void *ctx, int fd, const char *peer);
/* Serves TLS and plain HTTP on the same TCP listener: connections on
 * listen_addr that open with a TLS record go to fn (e.g. tc_tls_handoff),
 * the rest are served as plain HTTP. Without it such connections are
 * closed at once. Call before tc_frontdoor_start. */
void tc_frontdoor_set_tls_handoff(struct tc_frontdoor *fdr, tc_frontdoor_tls_fn fn, void *ctx);
/* First step of a shutdown: stops the listener thread and closes the
 * listening sockets (unlinks the unix socket), so that new connections are
 * refused at once instead of waiting in the backlog while the rest of the
 * server shuts down (clients then retry sooner after a restart). Requests
 * already handed to libmicrohttpd keep being served. Main thread only;
 * idempotent; NULL ok. */
void tc_frontdoor_stop_accepting(struct tc_frontdoor *fdr);
/* Stops the listener and libmicrohttpd, closes sockets (unlinks the unix
 * socket), frees. NULL ok. Upgrade handlers own their fds and are unaffected. */
void tc_frontdoor_free(struct tc_frontdoor *fdr);

/* Binds a listening TCP socket for "host:port" ("" host = all addresses,
 * dual-stack). Returns the fd or a negative TC_E* with err set. */
int tc_http_listen_tcp(const char *hostport, struct tc_err *err);

/* ---- metrics listener ------------------------------------------------------------ */

/* A separate plain HTTP listener serving GET /metrics (Prometheus text from
 * metrics.h) and nothing else. Owned; stop with tc_metrics_server_stop. */
struct tc_metrics_server;
int tc_metrics_server_start(const char *listen_addr, struct tc_metrics_server **out, struct tc_err *err);
int tc_metrics_server_port(const struct tc_metrics_server *ms);
void tc_metrics_server_stop(struct tc_metrics_server *ms); /* NULL ok */

#endif
