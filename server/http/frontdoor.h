/* frontdoor: the contract between the listener (server/http, which accepts
 * TCP connections, terminates TLS through server/tls, and serves ordinary
 * HTTP with libmicrohttpd) and the modules that take over a connection
 * after an HTTP/1.1 Upgrade: the control protocol (/ts2021, server/proto)
 * and the DERP relay (/derp, server/derp).
 *
 * How a connection flows: the listener accepts it (for TLS, server/tls
 * decrypts and hands the listener the plaintext end of a socketpair, so
 * upgrade handlers only ever see a plain stream socket). It peeks at the
 * request head without consuming it (bounded size and time). If the path has
 * a registered upgrade handler, the handler gets the fd; otherwise the fd goes
 * to libmicrohttpd untouched.
 *
 * This header is implemented by server/http (listener.c). */
#ifndef TC_HTTP_FRONTDOOR_H
#define TC_HTTP_FRONTDOOR_H

#include <stdbool.h>
#include <stddef.h>

#define TC_HTTP_HEAD_MAX 16384   /* a longer request head is refused with 431 */
#define TC_HTTP_HEADERS_MAX 64

struct tc_http_header {
  const char *name;
  const char *value;
};

/* A parsed request head. All strings are NUL-terminated and borrowed: they
 * live until the upgrade handler returns (copy what you keep). */
struct tc_http_head {
  const char *method;
  const char *path;  /* without the query, percent-decoding not applied */
  const char *query; /* after '?', "" if none */
  size_t nheaders;
  struct tc_http_header headers[TC_HTTP_HEADERS_MAX];
  size_t head_len;   /* bytes of the head incl. the final CRLFCRLF, still unread in the fd */
  bool tls;          /* arrived over TLS */
  char peer[64];     /* remote "ip:port" ("[v6]:port") */
};

/* Case-insensitive header lookup; NULL if absent. Borrowed. */
const char *tc_http_head_get(const struct tc_http_head *h, const char *name);
/* Looks up a query parameter, percent-decoding it into out (NUL-terminated).
 * Returns the decoded length or -1 if absent/too long. */
int tc_http_query_get(const struct tc_http_head *h, const char *key, char *out, size_t outlen);

/* An upgrade handler takes ownership of fd (a connected stream socket, in
 * blocking mode) and must close it eventually. The request head is still
 * unread in the socket: read and discard head->head_len bytes before writing
 * the response (101, or an error status). It runs on the listener's thread
 * and must not block: hand the fd to your own thread/event loop. */
typedef void (*tc_upgrade_fn)(void *ctx, int fd, const struct tc_http_head *head);

struct tc_frontdoor;

/* Routes requests whose path equals `path` exactly to fn. Call before the
 * server starts. Returns 0 or a negative TC_E* code. */
int tc_frontdoor_register_upgrade(struct tc_frontdoor *fdr, const char *path, tc_upgrade_fn fn, void *ctx);

/* Writes a complete minimal HTTP/1.1 response (status, "Connection: close",
 * Content-Type text/plain, body) to fd and closes it. For handlers refusing
 * an upgrade. Best effort, never blocks for long. */
void tc_http_refuse(int fd, int status, const char *body);

#endif
