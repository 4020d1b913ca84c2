/* base: the small utilities every module uses — error codes and messages,
 * allocation wrappers, a growable byte buffer, logging, clocks, hex and
 * time/duration text, TCP socket options. Everything here is thread-safe unless a comment says
 * otherwise; nothing here knows about the rest of tailcoat. */
#ifndef TC_BASE_H
#define TC_BASE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* ---- errors ------------------------------------------------------------ */
enum {
  TC_OK = 0,
  TC_EINVAL = -1,    /* bad input from a caller or a client */
  TC_ENOMEM = -2,
  TC_ENOENT = -3,    /* no such object */
  TC_EEXIST = -4,    /* unique constraint: the object exists already */
  TC_EIO = -5,       /* file or socket I/O */
  TC_EPERM = -6,     /* not allowed */
  TC_EAGAIN = -7,    /* transient; retry may succeed */
  TC_ECONFLICT = -8, /* concurrent change lost a race (e.g. key consumed) */
  TC_EEXPIRED = -9,
  TC_ETOOBIG = -10,  /* a length over its limit */
  TC_EPROTO = -11,   /* protocol violation by a peer */
  TC_EDB = -12,      /* storage failure */
  TC_ESCHEMA = -13,  /* database schema newer than this binary */
  TC_EINTERNAL = -14,
};

/* A person-readable error. code is one of the TC_E* values. */
struct tc_err {
  int code;
  char msg[512];
};

/* Sets err (may be NULL) and returns code, so callers can `return tc_err_set(...)`. */
int tc_err_set(struct tc_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prefixes err->msg with "prefix: " (keeps code). */
void tc_err_prefix(struct tc_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Static name of a code, e.g. "not found". */
const char *tc_strerror(int code);

/* ---- allocation -------------------------------------------------------- */
/* The x-variants abort on allocation failure: a server out of memory cannot
 * make progress safely, and checking every small allocation hides real bugs. */
void *tc_xmalloc(size_t n);
void *tc_xcalloc(size_t n, size_t size);
void *tc_xrealloc(void *p, size_t n);
char *tc_xstrdup(const char *s);
/* Copies exactly n bytes (which may include NULs: callers use it for
 * binary bodies) and appends a terminator. Unlike strndup, s must hold n
 * readable bytes. */
char *tc_xstrndup(const char *s, size_t n);
/* Returns an owned, formatted string. */
char *tc_xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Wipes n bytes in a way the compiler will not elide, then frees. NULL ok. */
void tc_free_secret(void *p, size_t n);
void tc_wipe(void *p, size_t n);

/* ---- byte buffer --------------------------------------------------------- */
/* Growable buffer; data is always NUL-terminated past len for convenience. */
struct tc_buf {
  char *data;
  size_t len;
  size_t cap;
};
#define TC_BUF_INIT {NULL, 0, 0}
void tc_buf_reserve(struct tc_buf *b, size_t extra);
void tc_buf_append(struct tc_buf *b, const void *p, size_t n);
void tc_buf_puts(struct tc_buf *b, const char *s);
void tc_buf_putc(struct tc_buf *b, char c);
void tc_buf_printf(struct tc_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void tc_buf_vprintf(struct tc_buf *b, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
/* Removes the first n bytes. */
void tc_buf_consume(struct tc_buf *b, size_t n);
void tc_buf_reset(struct tc_buf *b);
void tc_buf_free(struct tc_buf *b);
/* Hands the data to the caller (owned) and resets b. Never NULL. */
char *tc_buf_steal(struct tc_buf *b, size_t *len);

/* ---- logging ------------------------------------------------------------- */
enum tc_log_level { TC_LOG_TRACE, TC_LOG_DEBUG, TC_LOG_INFO, TC_LOG_WARN, TC_LOG_ERROR, TC_LOG_FATAL };
/* Parses "trace|debug|info|warn|error|fatal" (also "warning", "panic"); -1 if unknown. */
int tc_log_level_parse(const char *s);
void tc_log_set_level(enum tc_log_level lvl);
/* json=true writes one JSON object per line. */
void tc_log_set_json(bool json);
bool tc_log_enabled(enum tc_log_level lvl);
void tc_log(enum tc_log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define tc_debug(...) do { if (tc_log_enabled(TC_LOG_DEBUG)) tc_log(TC_LOG_DEBUG, __VA_ARGS__); } while (0)
#define tc_info(...) tc_log(TC_LOG_INFO, __VA_ARGS__)
#define tc_warn(...) tc_log(TC_LOG_WARN, __VA_ARGS__)
#define tc_error(...) tc_log(TC_LOG_ERROR, __VA_ARGS__)

/* ---- clocks and time text ------------------------------------------------ */
/* Monotonic milliseconds / nanoseconds, for timeouts and latency. */
int64_t tc_mono_ms(void);
int64_t tc_mono_ns(void);
/* Wall clock, Unix seconds and milliseconds. Tests may shift it. */
int64_t tc_now(void);
int64_t tc_now_ms(void);
/* Adds delta seconds to every later tc_now()/tc_now_ms() (test hook). */
void tc_clock_shift(int64_t delta_seconds);
/* RFC 3339 UTC "2006-01-02T15:04:05Z" into out (>= 32 bytes). 0 means Go's
 * zero time "0001-01-01T00:00:00Z". Returns out. */
char *tc_time_format(int64_t unix_seconds, char out[32]);
/* Parses RFC 3339 (fractional seconds and offsets allowed). Go's zero time
 * parses as 0. Returns 0 or TC_EINVAL. */
int tc_time_parse(const char *s, int64_t *unix_seconds);
/* Go-style durations: "90s", "1h30m", "500ms", "0", plus "d" for days and "w"
 * for weeks as Headscale's CLI accepts. Result in milliseconds. 0 or TC_EINVAL. */
int tc_duration_parse(const char *s, int64_t *ms);
/* Canonical Go-style text of a duration in ms ("1h30m0s", "0s"). out >= 48. */
char *tc_duration_format(int64_t ms, char out[48]);

/* ---- bytes and text ------------------------------------------------------ */
/* Lowercase hex of n bytes into out (2n+1). */
void tc_hex_encode(const uint8_t *p, size_t n, char *out);
/* Decodes exactly 2n hex chars into n bytes. 0 or TC_EINVAL. */
int tc_hex_decode(const char *s, size_t slen, uint8_t *out, size_t n);
/* Constant-time equality. */
bool tc_ct_equal(const void *a, const void *b, size_t n);
/* Fills with cryptographically secure random bytes. */
void tc_random(void *p, size_t n);
/* URL-safe random token of nbytes entropy, base32-ish lowercase alnum. Owned. */
char *tc_random_token(size_t nbytes);
/* Case-insensitive ASCII compare with explicit length for network strings. */
bool tc_strieq(const char *a, const char *b);
bool tc_str_has_prefix(const char *s, const char *prefix);
/* Reads a whole file (bounded by max); owned, NUL-terminated. */
int tc_read_file(const char *path, size_t max, char **out, size_t *len, struct tc_err *err);
/* Writes atomically (tmp + fsync + rename) with the given mode. */
int tc_write_file_atomic(const char *path, const void *data, size_t len, int mode, struct tc_err *err);

#define TC_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define TC_MIN(a, b) ((a) < (b) ? (a) : (b))
#define TC_MAX(a, b) ((a) > (b) ? (a) : (b))

/* ---- sockets ------------------------------------------------------------ */
/* TCP_NODELAY (latency over batching) and keepalive probes (30 s idle, every
 * 15 s, 4 of them: a map poll to a vanished laptop ends in ~90 s instead of
 * when retransmissions give up). Set them on a listening socket: Linux
 * copies them into every accepted socket, so a connection needs no
 * setsockopt of its own; tc_tcp_tuned tells (one
 * getsockopt) whether fd has them (false for non-TCP fds, on which
 * tc_tcp_tune's calls fail harmlessly). */
void tc_tcp_tune(int fd);
bool tc_tcp_tuned(int fd);

#endif
