/* tls: TLS termination in front of the HTTP listener, with mbedTLS.
 *
 * libmicrohttpd's own TLS is GnuTLS, so tailcoat terminates TLS itself: this
 * module accepts TCP connections (from listening sockets it was given, or
 * connections handed to it), runs the server handshake (TLS 1.2+, ECDHE with
 * AEAD suites only) and then pumps plaintext both ways through a socketpair.
 * The plaintext end of the socketpair is handed to a delivery callback that
 * treats it exactly like an accepted plain TCP connection, so /ts2021, /derp
 * and ordinary HTTP all work over TLS unchanged.
 *
 * Threads: `threads` epoll threads (default 1) do the handshakes and all
 * pumping with non-blocking mbedTLS I/O; each connection stays on one thread
 * (accepted sockets are dealt out round-robin). Every public function may be called from
 * any thread; tc_tls_reload is meant for the SIGHUP path (call it from a
 * normal thread, never from inside a signal handler). The deliver callback
 * runs on the TLS thread and must not block. */
#ifndef TC_TLS_H
#define TC_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

struct tc_tls;

/* Receives the plaintext end of an established TLS connection. plain_fd is a
 * connected AF_UNIX stream socket in blocking mode, owned by the callee from
 * here on (close it when done; closing it closes the TLS connection after
 * any queued data is flushed). peer is the remote "ip:port" or "[v6]:port",
 * borrowed for the duration of the call. Runs on the TLS thread. */
typedef void (*tc_tls_deliver_fn)(void *ctx, int plain_fd, const char *peer);

struct tc_tls_params {
  const char *cert_path;      /* PEM: leaf certificate first, then intermediates */
  const char *key_path;       /* PEM private key (RSA or EC) matching the leaf */
  tc_tls_deliver_fn deliver;  /* required */
  void *deliver_ctx;
  int handshake_timeout_ms;   /* 0 = 10000 */
  int idle_close_timeout_ms;  /* after one side closed, max wait to flush the other; 0 = 10000 */
  size_t max_conns;           /* connections (handshaking + open) at once; 0 = 65536 */
  int threads;                /* epoll threads sharing the connections; 0 = 1 */
};

/* Counters; a snapshot copied under the module's lock. */
struct tc_tls_stats {
  uint64_t accepted;          /* TCP connections taken in */
  uint64_t handshakes_ok;
  uint64_t handshakes_failed; /* bad ClientHello, alert, I/O error */
  uint64_t handshake_timeouts;
  uint64_t refused_full;      /* over max_conns */
  uint64_t active;            /* connections currently held */
  uint64_t bytes_in;          /* plaintext bytes decrypted from clients */
  uint64_t bytes_out;         /* plaintext bytes encrypted to clients */
  uint64_t reloads;           /* successful tc_tls_reload calls */
};

/* Loads the certificate chain and key, and starts the TLS thread. On success
 * *out is owned by the caller (free with tc_tls_free). Errors: TC_EINVAL
 * (missing parameter, unparsable or mismatched PEM), TC_EIO. */
int tc_tls_new(const struct tc_tls_params *p, struct tc_tls **out, struct tc_err *err);

/* Re-reads cert_path/key_path. On success new connections use the new
 * certificate and established ones keep theirs; on failure the old
 * certificate stays in use and err says why. */
int tc_tls_reload(struct tc_tls *t, struct tc_err *err);

/* Adds a listening TCP socket; the TLS thread accepts on it from now on.
 * Steals listen_fd (closed by tc_tls_free). */
int tc_tls_add_listener(struct tc_tls *t, int listen_fd, struct tc_err *err);

/* Hands over one accepted TCP connection (steals fd; it is closed on error
 * too). peer may be NULL (then it is read with getpeername). */
int tc_tls_handoff(struct tc_tls *t, int fd, const char *peer);

void tc_tls_get_stats(struct tc_tls *t, struct tc_tls_stats *out);
/* CPU time consumed by the TLS threads so far, in nanoseconds (-1 if unknown). */
int64_t tc_tls_thread_cpu_ns(struct tc_tls *t);

/* The embedded DERP relay's fallback certificate (selfsigned.c): reuses the
 * PEM pair at cert_path/key_path if both parse, match and are unexpired;
 * otherwise writes a new self-signed ECDSA P-256 certificate (about ten
 * years, subjectAltName = host as an IP address or DNS name) and its key
 * (mode 0600), creating their directory (0700) if missing. *created (may be
 * NULL) tells which happened. Clients can verify it only by being told to
 * skip verification (the DERP map's InsecureForTests). Any thread; blocks
 * on file I/O. Errors: TC_EINVAL (missing argument), TC_EIO. */
int tc_tls_generate_self_signed(const char *host, const char *cert_path, const char *key_path, bool *created,
                                struct tc_err *err);

/* First step of a shutdown: new connections to the listeners are refused
 * from now on (the listening sockets are shut down and leave the thread's
 * epoll; their fds stay open until tc_tls_free so the numbers are not reused
 * under a worker). Established connections keep being served. Main thread
 * only; idempotent; NULL ok. */
void tc_tls_stop_accepting(struct tc_tls *t);
/* Stops the thread and closes every connection and listener. NULL ok. */
void tc_tls_free(struct tc_tls *t);

/* Convenience for callers and tests: a non-blocking listening TCP socket on
 * "host:port" ("127.0.0.1:0", "[::1]:8443", ":443"). *port_out (may be NULL)
 * receives the bound port. Returns the fd or a negative TC_E* code. */
int tc_tls_listen_tcp(const char *addr, int *port_out, struct tc_err *err);

#endif
