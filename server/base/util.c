/* util: clocks, time and duration text, hex, randomness, small string and
 * file helpers. All functions are thread-safe. */
#include "base.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static _Atomic int64_t g_clock_shift;

int64_t tc_mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t tc_mono_ms(void) { return tc_mono_ns() / 1000000; }

int64_t tc_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000 + g_clock_shift * 1000;
}

int64_t tc_now(void) { return tc_now_ms() / 1000; }

void tc_clock_shift(int64_t delta_seconds) { g_clock_shift += delta_seconds; }

char *tc_time_format(int64_t t, char out[32]) {
  if (t == 0) {
    strcpy(out, "0001-01-01T00:00:00Z");
    return out;
  }
  time_t tt = (time_t)t;
  struct tm tm;
  gmtime_r(&tt, &tm);
  strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return out;
}

static int digits(const char **p, int n, int *out) {
  int v = 0;
  for (int i = 0; i < n; i++) {
    if (!isdigit((unsigned char)(*p)[i])) return -1;
    v = v * 10 + ((*p)[i] - '0');
  }
  *p += n;
  *out = v;
  return 0;
}

int tc_time_parse(const char *s, int64_t *out) {
  if (!s) return TC_EINVAL;
  const char *p = s;
  int Y, M, D, h, m, sec;
  if (digits(&p, 4, &Y) || *p++ != '-' || digits(&p, 2, &M) || *p++ != '-' || digits(&p, 2, &D))
    return TC_EINVAL;
  if (*p != 'T' && *p != 't' && *p != ' ') return TC_EINVAL;
  p++;
  if (digits(&p, 2, &h) || *p++ != ':' || digits(&p, 2, &m) || *p++ != ':' || digits(&p, 2, &sec))
    return TC_EINVAL;
  if (M < 1 || M > 12 || D < 1 || D > 31 || h > 23 || m > 59 || sec > 60) return TC_EINVAL;
  if (*p == '.') {
    p++;
    if (!isdigit((unsigned char)*p)) return TC_EINVAL;
    while (isdigit((unsigned char)*p)) p++;
  }
  int off = 0;
  if (*p == 'Z' || *p == 'z') {
    p++;
  } else if (*p == '+' || *p == '-') {
    int sign = *p == '-' ? -1 : 1, oh, om;
    p++;
    if (digits(&p, 2, &oh) || *p++ != ':' || digits(&p, 2, &om)) return TC_EINVAL;
    off = sign * (oh * 3600 + om * 60);
  } else {
    return TC_EINVAL;
  }
  if (*p) return TC_EINVAL;
  if (Y == 1 && M == 1 && D == 1 && h == 0 && m == 0 && sec == 0 && off == 0) {
    *out = 0;
    return 0;
  }
  /* days from civil (Howard Hinnant's algorithm), valid for all Gregorian dates */
  int y = Y - (M <= 2);
  int era = (y >= 0 ? y : y - 399) / 400;
  unsigned yoe = (unsigned)(y - era * 400);
  unsigned doy = (unsigned)((153 * (M + (M > 2 ? -3 : 9)) + 2) / 5 + D - 1);
  unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  int64_t days = (int64_t)era * 146097 + (int64_t)doe - 719468;
  *out = days * 86400 + h * 3600 + m * 60 + sec - off;
  return 0;
}

int tc_duration_parse(const char *s, int64_t *ms) {
  if (!s || !*s) return TC_EINVAL;
  const char *p = s;
  int neg = 0;
  if (*p == '-' || *p == '+') neg = *p++ == '-';
  if (!strcmp(p, "0")) {
    *ms = 0;
    return 0;
  }
  double total = 0;
  int units = 0;
  while (*p) {
    if (!isdigit((unsigned char)*p) && *p != '.') return TC_EINVAL;
    char *end;
    errno = 0;
    double v = strtod(p, &end);
    if (end == p || errno) return TC_EINVAL;
    p = end;
    double mult;
    if (!strncmp(p, "ns", 2)) mult = 1e-6, p += 2;
    else if (!strncmp(p, "us", 2)) mult = 1e-3, p += 2;
    else if (!strncmp(p, "\xc2\xb5s", 3)) mult = 1e-3, p += 3;
    else if (!strncmp(p, "ms", 2)) mult = 1, p += 2;
    else if (*p == 's') mult = 1000, p++;
    else if (*p == 'm') mult = 60e3, p++;
    else if (*p == 'h') mult = 3600e3, p++;
    else if (*p == 'd') mult = 86400e3, p++;
    else if (*p == 'w') mult = 7 * 86400e3, p++;
    else return TC_EINVAL;
    total += v * mult;
    units++;
  }
  if (!units || total > 9.2e15) return TC_EINVAL;
  *ms = (int64_t)(neg ? -total : total);
  return 0;
}

char *tc_duration_format(int64_t ms, char out[48]) {
  char *o = out;
  if (ms < 0) *o++ = '-', ms = -ms;
  if (ms == 0) {
    strcpy(o, "0s");
    return out;
  }
  int64_t h = ms / 3600000, m = ms / 60000 % 60, s = ms / 1000 % 60, r = ms % 1000;
  if (h) o += sprintf(o, "%ldh", (long)h);
  if (h || m) o += sprintf(o, "%ldm", (long)m);
  if (r) sprintf(o, "%ld.%03lds", (long)s, (long)r);
  else sprintf(o, "%lds", (long)s);
  /* trim trailing zeros of a fraction, as Go does */
  if (strchr(out, '.')) {
    char *e = out + strlen(out) - 1; /* the 's' */
    *e-- = 0;
    while (*e == '0') *e-- = 0;
    strcat(out, "s");
  }
  return out;
}

void tc_hex_encode(const uint8_t *p, size_t n, char *out) {
  static const char hx[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = hx[p[i] >> 4];
    out[2 * i + 1] = hx[p[i] & 15];
  }
  out[2 * n] = 0;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

int tc_hex_decode(const char *s, size_t slen, uint8_t *out, size_t n) {
  if (slen != 2 * n) return TC_EINVAL;
  for (size_t i = 0; i < n; i++) {
    int a = hexval(s[2 * i]), b = hexval(s[2 * i + 1]);
    if (a < 0 || b < 0) return TC_EINVAL;
    out[i] = (uint8_t)(a << 4 | b);
  }
  return 0;
}

bool tc_ct_equal(const void *a, const void *b, size_t n) {
  const volatile uint8_t *x = a, *y = b;
  uint8_t d = 0;
  for (size_t i = 0; i < n; i++) d |= x[i] ^ y[i];
  return d == 0;
}

void tc_random(void *p, size_t n) {
  uint8_t *o = p;
  while (n) {
    ssize_t r = getrandom(o, n, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      abort(); /* no entropy means no safe keys: refuse to continue */
    }
    o += r;
    n -= (size_t)r;
  }
}

char *tc_random_token(size_t nbytes) {
  static const char al[] = "abcdefghijklmnopqrstuvwxyz234567";
  uint8_t *raw = tc_xmalloc(nbytes);
  tc_random(raw, nbytes);
  size_t outlen = (nbytes * 8 + 4) / 5;
  char *out = tc_xmalloc(outlen + 1);
  size_t bits = 0, acc = 0, o = 0;
  for (size_t i = 0; i < nbytes; i++) {
    acc = (acc << 8) | raw[i];
    bits += 8;
    while (bits >= 5) {
      out[o++] = al[(acc >> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits) out[o++] = al[(acc << (5 - bits)) & 31];
  out[o] = 0;
  tc_free_secret(raw, nbytes);
  return out;
}

bool tc_strieq(const char *a, const char *b) { return a && b && !strcasecmp(a, b); }

bool tc_str_has_prefix(const char *s, const char *prefix) {
  return s && prefix && !strncmp(s, prefix, strlen(prefix));
}

int tc_read_file(const char *path, size_t max, char **out, size_t *len, struct tc_err *err) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return tc_err_set(err, errno == ENOENT ? TC_ENOENT : TC_EIO, "%s: %s", path, strerror(errno));
  struct tc_buf b = TC_BUF_INIT;
  char tmp[8192];
  for (;;) {
    ssize_t r = read(fd, tmp, sizeof tmp);
    if (r < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      close(fd);
      tc_buf_free(&b);
      return tc_err_set(err, TC_EIO, "%s: %s", path, strerror(e));
    }
    if (r == 0) break;
    if (b.len + (size_t)r > max) {
      close(fd);
      tc_buf_free(&b);
      return tc_err_set(err, TC_ETOOBIG, "%s: larger than %zu bytes", path, max);
    }
    tc_buf_append(&b, tmp, (size_t)r);
  }
  close(fd);
  *out = tc_buf_steal(&b, len);
  return 0;
}

int tc_write_file_atomic(const char *path, const void *data, size_t len, int mode, struct tc_err *err) {
  char *tmp = tc_xasprintf("%s.tmp.%d", path, (int)getpid());
  int rc = 0;
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) {
    rc = tc_err_set(err, TC_EIO, "%s: %s", tmp, strerror(errno));
    goto out;
  }
  fchmod(fd, (mode_t)mode);
  const char *p = data;
  size_t left = len;
  while (left) {
    ssize_t w = write(fd, p, left);
    if (w < 0) {
      if (errno == EINTR) continue;
      rc = tc_err_set(err, TC_EIO, "%s: %s", tmp, strerror(errno));
      close(fd);
      unlink(tmp);
      goto out;
    }
    p += w;
    left -= (size_t)w;
  }
  if (fsync(fd) < 0 || close(fd) < 0) {
    rc = tc_err_set(err, TC_EIO, "%s: %s", tmp, strerror(errno));
    unlink(tmp);
    goto out;
  }
  if (rename(tmp, path) < 0) {
    rc = tc_err_set(err, TC_EIO, "rename %s: %s", path, strerror(errno));
    unlink(tmp);
  }
out:
  free(tmp);
  return rc;
}

/* ---- sockets ------------------------------------------------------------ */
enum { KEEPIDLE_S = 30, KEEPINTVL_S = 15, KEEPCNT = 4 };

void tc_tcp_tune(int fd) {
  int one = 1, idle = KEEPIDLE_S, intvl = KEEPINTVL_S, cnt = KEEPCNT;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
}

bool tc_tcp_tuned(int fd) {
  /* KEEPCNT is the last option tc_tcp_tune sets */
  int v = 0;
  socklen_t l = sizeof v;
  return getsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &v, &l) == 0 && v == KEEPCNT;
}
