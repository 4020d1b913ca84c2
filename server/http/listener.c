/* listener: implements frontdoor.h. One epoll thread accepts TCP and unix
 * socket connections (and takes plaintext fds from the TLS module), peeks
 * at each request head without consuming it (a TCP connection whose first
 * byte opens a TLS record goes to the TLS handoff instead, so one port can
 * serve both), and hands the fd either to the
 * upgrade handler registered for its path or, untouched, to one of a few
 * libmicrohttpd daemons (round robin; each has its own epoll thread) that
 * run the router.
 *
 * Threads: tc_frontdoor_new/register/start/free on one controlling thread;
 * tc_frontdoor_add_connection from any thread. Upgrade handlers run on the
 * listener thread; route handlers on libmicrohttpd's threads. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "http/http.h"
#include "http/metrics.h"

#define MAX_UPGRADES 16
#define MAX_DAEMONS 8
#define MAX_PENDING 4096
#define FD_FLAGS_MAX 65536

/* epoll data tags for the non-connection fds */
#define TAG_TCP ((void *)1)
#define TAG_UNIX ((void *)2)
#define TAG_WAKE ((void *)3)

struct pending {
  int fd;
  bool tls, trusted;
  int64_t deadline; /* tc_mono_ms */
  struct sockaddr_storage addr;
  socklen_t addrlen;
  struct pending *prev, *next;
};

struct cidr {
  int family; /* AF_INET / AF_INET6 */
  uint8_t addr[16];
  int bits;
};

struct tc_frontdoor {
  struct tc_frontdoor_opts opts;
  struct cidr *trusted;
  size_t ntrusted;
  char *unix_path;
  int tcp_fd, unix_fd, ep, wake_fd;
  int port;
  struct {
    char *path;
    tc_upgrade_fn fn;
    void *ctx;
  } upgrades[MAX_UPGRADES];
  size_t nupgrades;
  tc_frontdoor_tls_fn tls_fn; /* TLS on the plain listener; NULL = none */
  void *tls_ctx;
  struct MHD_Daemon *daemons[MAX_DAEMONS];
  int ndaemons;
  unsigned rr;
  pthread_t thread;
  bool started, joined;
  atomic_bool stop;
  /* pending connections, ordered by deadline (all get the same timeout) */
  struct pending *head, *tail;
  size_t npending;
  /* handed over by tc_frontdoor_add_connection, guarded by qmu */
  pthread_mutex_t qmu;
  struct pending *queue;
  char peekbuf[TC_HTTP_HEAD_MAX + 1];
};

/* Per-fd marks for connections owned by libmicrohttpd: bit 0 = arrived
 * over TLS. Set before the fd is handed over, read by handlers. */
static _Atomic unsigned char fd_flags[FD_FLAGS_MAX];

/* ---- small helpers ------------------------------------------------------------ */

static void format_peer(const struct sockaddr *sa, socklen_t len, char *out, size_t outlen) {
  char host[INET6_ADDRSTRLEN];
  if (sa->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
    const struct sockaddr_in *s = (const void *)sa;
    inet_ntop(AF_INET, &s->sin_addr, host, sizeof host);
    snprintf(out, outlen, "%s:%u", host, ntohs(s->sin_port));
  } else if (sa->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
    const struct sockaddr_in6 *s = (const void *)sa;
    if (IN6_IS_ADDR_V4MAPPED(&s->sin6_addr)) {
      inet_ntop(AF_INET, &s->sin6_addr.s6_addr[12], host, sizeof host);
      snprintf(out, outlen, "%s:%u", host, ntohs(s->sin6_port));
    } else {
      inet_ntop(AF_INET6, &s->sin6_addr, host, sizeof host);
      snprintf(out, outlen, "[%s]:%u", host, ntohs(s->sin6_port));
    }
  } else if (sa->sa_family == AF_UNIX) {
    snprintf(out, outlen, "unix");
  } else {
    snprintf(out, outlen, "unknown");
  }
}

static const char *status_text(int status) {
  switch (status) {
  case 101: return "Switching Protocols";
  case 200: return "OK";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 408: return "Request Timeout";
  case 413: return "Content Too Large";
  case 426: return "Upgrade Required";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 503: return "Service Unavailable";
  default: return "Error";
  }
}

void tc_http_refuse(int fd, int status, const char *body) {
  if (fd < 0) return;
  if (!body) body = status_text(status);
  char head[256];
  size_t blen = strlen(body);
  int hl = snprintf(head, sizeof head,
                    "HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    "Content-Length: %zu\r\n\r\n",
                    status, status_text(status), blen + 1);
  /* Bounded: a peer that does not read must not hold the caller. */
  struct timeval tv = {1, 0};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_append(&b, head, (size_t)hl);
  tc_buf_append(&b, body, blen);
  tc_buf_putc(&b, '\n');
  size_t off = 0;
  while (off < b.len) {
    ssize_t n = send(fd, b.data + off, b.len - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    off += (size_t)n;
  }
  tc_buf_free(&b);
  /* Closing with unread input makes the kernel send RST, which can destroy
   * the response before the peer reads it: half-close and drain what is
   * already queued first. */
  shutdown(fd, SHUT_WR);
  char sink[4096];
  for (int i = 0; i < 64; i++) {
    ssize_t n = recv(fd, sink, sizeof sink, MSG_DONTWAIT);
    if (n <= 0) break;
  }
  close(fd);
}

const char *tc_http_head_get(const struct tc_http_head *h, const char *name) {
  for (size_t i = 0; i < h->nheaders; i++)
    if (tc_strieq(h->headers[i].name, name)) return h->headers[i].value;
  return NULL;
}

int tc_http_query_get(const struct tc_http_head *h, const char *key, char *out, size_t outlen) {
  const char *p = h->query;
  size_t klen = strlen(key);
  while (p && *p) {
    const char *amp = strchr(p, '&');
    size_t l = amp ? (size_t)(amp - p) : strlen(p);
    const char *eq = memchr(p, '=', l);
    size_t kl = eq ? (size_t)(eq - p) : l;
    if (kl == klen && !memcmp(p, key, klen)) {
      const char *v = eq ? eq + 1 : p + l;
      size_t vl = eq ? l - kl - 1 : 0;
      char *d = tc_http_pct_decode(v, vl, true);
      if (!d) return -1;
      size_t dl = strlen(d);
      int rc = -1;
      if (dl < outlen) {
        memcpy(out, d, dl + 1);
        rc = (int)dl;
      }
      free(d);
      return rc;
    }
    if (!amp) break;
    p = amp + 1;
  }
  return -1;
}

int tc_frontdoor_register_upgrade(struct tc_frontdoor *fdr, const char *path, tc_upgrade_fn fn, void *ctx) {
  if (!fdr || !path || path[0] != '/' || !fn) return TC_EINVAL;
  if (fdr->started) return TC_EINVAL;
  for (size_t i = 0; i < fdr->nupgrades; i++)
    if (!strcmp(fdr->upgrades[i].path, path)) return TC_EEXIST;
  if (fdr->nupgrades == MAX_UPGRADES) return TC_ETOOBIG;
  fdr->upgrades[fdr->nupgrades].path = tc_xstrdup(path);
  fdr->upgrades[fdr->nupgrades].fn = fn;
  fdr->upgrades[fdr->nupgrades].ctx = ctx;
  fdr->nupgrades++;
  return TC_OK;
}

/* ---- sockets -------------------------------------------------------------------- */

static int split_hostport(const char *s, char *host, size_t hostlen, char *port, size_t portlen) {
  const char *colon;
  if (s[0] == '[') {
    const char *rb = strchr(s, ']');
    if (!rb || rb[1] != ':') return TC_EINVAL;
    if ((size_t)(rb - s - 1) >= hostlen) return TC_EINVAL;
    memcpy(host, s + 1, (size_t)(rb - s - 1));
    host[rb - s - 1] = 0;
    colon = rb + 1;
  } else {
    colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= hostlen) return TC_EINVAL;
    if (memchr(s, ':', (size_t)(colon - s))) return TC_EINVAL; /* bare v6 needs brackets */
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
  }
  const char *p = colon + 1;
  if (!*p || strlen(p) >= portlen || strspn(p, "0123456789") != strlen(p) || atoi(p) > 65535)
    return TC_EINVAL;
  strcpy(port, p);
  return TC_OK;
}

int tc_http_listen_tcp(const char *hostport, struct tc_err *err) {
  char host[256], port[8];
  if (!hostport || split_hostport(hostport, host, sizeof host, port, sizeof port))
    return tc_err_set(err, TC_EINVAL, "listen address %s: want host:port", hostport ? hostport : "(null)");
  int fd = -1;
  if (!*host || !strcmp(host, "::")) {
    /* all addresses: one dual-stack socket, falling back to IPv4 only */
    fd = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd >= 0) {
      int off = 0, on = 1;
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
      struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)atoi(port))};
      a.sin6_addr = in6addr_any;
      if (!bind(fd, (struct sockaddr *)&a, sizeof a) && !listen(fd, 512)) {
        tc_tcp_tune(fd);
        return fd;
      }
      int e = errno;
      close(fd);
      fd = -1;
      if (e != EAFNOSUPPORT && e != EADDRNOTAVAIL)
        return tc_err_set(err, TC_EIO, "listen on %s: %s", hostport, strerror(e));
    }
    strcpy(host, "0.0.0.0");
  }
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
  struct addrinfo *res = NULL;
  int gai = getaddrinfo(host, port, &hints, &res);
  if (gai) return tc_err_set(err, TC_EINVAL, "listen address %s: %s", hostport, gai_strerror(gai));
  int lasterr = 0;
  for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      lasterr = errno;
      continue;
    }
    int on = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    if (ai->ai_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on);
    if (!bind(fd, ai->ai_addr, ai->ai_addrlen) && !listen(fd, 512)) break;
    lasterr = errno;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) return tc_err_set(err, TC_EIO, "listen on %s: %s", hostport, strerror(lasterr));
  tc_tcp_tune(fd);
  return fd;
}

static int listen_unix(const char *path, unsigned mode, struct tc_err *err) {
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof a.sun_path) return tc_err_set(err, TC_EINVAL, "unix_socket %s: path too long", path);
  strcpy(a.sun_path, path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return tc_err_set(err, TC_EIO, "unix_socket: %s", strerror(errno));
  /* Like Headscale, create the socket's directory (e.g. /var/run/tailcoat). */
  char dir[sizeof a.sun_path];
  snprintf(dir, sizeof dir, "%s", path);
  for (char *p = dir + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    if (mkdir(dir, 0755) && errno != EEXIST) tc_debug("unix_socket: mkdir %s: %s", dir, strerror(errno));
    *p = '/';
  }
  struct stat st;
  if (!lstat(path, &st)) {
    if (!S_ISSOCK(st.st_mode)) {
      close(fd);
      return tc_err_set(err, TC_EEXIST, "unix_socket %s exists and is not a socket", path);
    }
    /* A socket file is stale unless something still accepts on it. */
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0 && !connect(probe, (struct sockaddr *)&a, sizeof a)) {
      close(probe);
      close(fd);
      return tc_err_set(err, TC_EEXIST, "unix_socket %s: another server is running", path);
    }
    if (probe >= 0) close(probe);
    unlink(path);
  }
  mode_t old = umask(0177);
  int rc = bind(fd, (struct sockaddr *)&a, sizeof a);
  umask(old);
  if (rc || listen(fd, 128)) {
    int e = errno;
    close(fd);
    return tc_err_set(err, TC_EIO, "unix_socket %s: %s", path, strerror(e));
  }
  if (mode && chmod(path, mode & 07777)) tc_warn("unix_socket %s: chmod: %s", path, strerror(errno));
  return fd;
}

/* ---- trusted proxies ---------------------------------------------------------------- */

static int parse_cidr(const char *s, struct cidr *c) {
  char buf[80];
  const char *slash = strchr(s, '/');
  size_t hl = slash ? (size_t)(slash - s) : strlen(s);
  if (hl >= sizeof buf) return TC_EINVAL;
  memcpy(buf, s, hl);
  buf[hl] = 0;
  memset(c, 0, sizeof *c);
  if (inet_pton(AF_INET, buf, c->addr) == 1) c->family = AF_INET;
  else if (inet_pton(AF_INET6, buf, c->addr) == 1) c->family = AF_INET6;
  else return TC_EINVAL;
  int max = c->family == AF_INET ? 32 : 128;
  c->bits = max;
  if (slash) {
    const char *b = slash + 1;
    if (!*b || strlen(b) > 3 || strspn(b, "0123456789") != strlen(b)) return TC_EINVAL;
    c->bits = atoi(b);
    if (c->bits > max) return TC_EINVAL;
  }
  return TC_OK;
}

/* Address of "ip" text (v4, v6, or v4-mapped v6 normalised to v4). */
static bool addr_parse(const char *ip, int *family, uint8_t out[16]) {
  if (inet_pton(AF_INET, ip, out) == 1) {
    *family = AF_INET;
    return true;
  }
  if (inet_pton(AF_INET6, ip, out) == 1) {
    *family = AF_INET6;
    if (IN6_IS_ADDR_V4MAPPED((struct in6_addr *)out)) {
      memmove(out, out + 12, 4);
      *family = AF_INET;
    }
    return true;
  }
  return false;
}

static bool cidr_contains(const struct cidr *c, int family, const uint8_t *a) {
  if (c->family != family) return false;
  int full = c->bits / 8, rest = c->bits % 8;
  if (memcmp(c->addr, a, (size_t)full)) return false;
  if (!rest) return true;
  uint8_t mask = (uint8_t)(0xFF << (8 - rest));
  return (c->addr[full] & mask) == (a[full] & mask);
}

static bool is_trusted(const struct tc_frontdoor *fdr, const char *ip) {
  int fam;
  uint8_t a[16];
  if (!fdr->ntrusted || !addr_parse(ip, &fam, a)) return false;
  for (size_t i = 0; i < fdr->ntrusted; i++)
    if (cidr_contains(&fdr->trusted[i], fam, a)) return true;
  return false;
}

/* The client behind trusted proxies: walking X-Forwarded-For from the right,
 * the first address that is not a trusted proxy. Writes "ip" into out when
 * peer_ip (the TCP peer) is trusted and a usable address is found. */
static bool forwarded_client(const struct tc_frontdoor *fdr, const char *peer_ip, const char *xff, char *out,
                             size_t outlen) {
  if (!xff || !*xff || !is_trusted(fdr, peer_ip)) return false;
  char buf[1024];
  snprintf(buf, sizeof buf, "%s", xff);
  for (;;) {
    char *comma = strrchr(buf, ',');
    char *item = comma ? comma + 1 : buf;
    while (*item == ' ' || *item == '\t') item++;
    char *end = item + strlen(item);
    while (end > item && (end[-1] == ' ' || end[-1] == '\t')) *--end = 0;
    int fam;
    uint8_t a[16];
    if (!addr_parse(item, &fam, a)) return false; /* garbage: keep the TCP peer */
    if (!is_trusted(fdr, item) || !comma) {
      snprintf(out, outlen, "%s", item);
      return true;
    }
    *comma = 0;
  }
}

/* "ip" part of a "ip:port" / "[v6]:port" peer string. */
static void peer_ip(const char *peer, char *out, size_t outlen) {
  if (peer[0] == '[') {
    const char *rb = strchr(peer, ']');
    size_t l = rb ? (size_t)(rb - peer - 1) : 0;
    if (l >= outlen) l = 0;
    memcpy(out, peer + 1, l);
    out[l] = 0;
    return;
  }
  const char *colon = strrchr(peer, ':');
  size_t l = colon ? (size_t)(colon - peer) : strlen(peer);
  if (l >= outlen) l = outlen - 1;
  memcpy(out, peer, l);
  out[l] = 0;
}

/* ---- libmicrohttpd glue --------------------------------------------------------------- */

struct mhd_conn {
  struct tc_buf body;
  bool too_big;
  size_t discarded; /* body bytes dropped after the limit was passed */
  int64_t start_ns; /* first callback of this request */
};

static const double duration_buckets[] = {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};

static void observe_duration(const char *route, int64_t start_ns) {
  struct tc_buf lb = TC_BUF_INIT;
  tc_buf_puts(&lb, "route=\"");
  tc_metrics_label_escape(&lb, route ? route : "");
  tc_buf_putc(&lb, '"');
  struct tc_histogram *h = tc_metrics_histogram("tailcoat_http_request_duration_seconds", lb.data,
                                                duration_buckets, TC_ARRAY_LEN(duration_buckets));
  tc_histogram_observe(h, (double)(tc_mono_ns() - start_ns) / 1e9);
  tc_buf_free(&lb);
}

static const char *mhd_header(const struct tc_http_req *req, const char *name) {
  return MHD_lookup_connection_value((struct MHD_Connection *)req->transport, MHD_HEADER_KIND, name);
}

static enum MHD_Result collect_arg(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
  struct tc_http_req *req = cls;
  if (req->nquery >= TC_HTTP_QUERY_MAX) return MHD_NO;
  req->query[req->nquery].name = key;
  req->query[req->nquery].value = value ? value : "";
  req->nquery++;
  return MHD_YES;
}

static enum MHD_Result send_resp(struct MHD_Connection *c, struct tc_http_resp *resp) {
  struct MHD_Response *r =
      MHD_create_response_from_buffer(resp->body.len, resp->body.data ? resp->body.data : (void *)"",
                                      MHD_RESPMEM_MUST_COPY);
  if (!r) return MHD_NO;
  bool own_ct = false;
  for (size_t i = 0; i < resp->nheaders; i++) own_ct |= tc_strieq(resp->headers[i].name, "Content-Type");
  if (!own_ct)
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE,
                            resp->content_type ? resp->content_type : "application/json");
  for (size_t i = 0; i < resp->nheaders; i++)
    MHD_add_response_header(r, resp->headers[i].name, resp->headers[i].value);
  enum MHD_Result ret = MHD_queue_response(c, (unsigned)(resp->status ? resp->status : 500), r);
  MHD_destroy_response(r);
  return ret;
}

static enum MHD_Result access_cb(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                 const char *version, const char *upload_data, size_t *upload_data_size,
                                 void **con_cls) {
  struct tc_frontdoor *fdr = cls;
  size_t max = fdr->opts.body_max;
  struct mhd_conn *st = *con_cls;
  if (!st) {
    st = tc_xcalloc(1, sizeof *st);
    st->start_ns = tc_mono_ns();
    *con_cls = st;
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl && strtoull(cl, NULL, 10) > max) {
      /* Refuse before reading the body; MHD closes the connection after. */
      struct tc_http_resp resp = {0};
      tc_http_resp_error(&resp, 413, TC_GRPC_RESOURCE_EXHAUSTED, "request body larger than %zu bytes", max);
      tc_metrics_inc("tailcoat_http_requests_total", "route=\"\",code=\"413\"");
      enum MHD_Result ret = send_resp(c, &resp);
      tc_http_resp_free(&resp);
      return ret;
    }
    return MHD_YES;
  }
  if (*upload_data_size) {
    /* libmicrohttpd 0.9.75 cannot answer in the middle of an upload, so an
     * oversized chunked body is read and discarded to its end for a proper
     * 413, but only up to a cap: an endless stream is cut off there. */
    if (!st->too_big && st->body.len + *upload_data_size <= max) {
      tc_buf_append(&st->body, upload_data, *upload_data_size);
    } else {
      if (!st->too_big) st->discarded = st->body.len;
      st->too_big = true;
      tc_buf_free(&st->body);
      st->discarded += *upload_data_size;
      if (st->discarded > 4 * max + 65536) {
        tc_metrics_inc("tailcoat_http_connections_dropped_total", "reason=\"body_too_large\"");
        return MHD_NO;
      }
    }
    *upload_data_size = 0;
    return MHD_YES;
  }
  struct tc_http_resp resp = {0};
  if (st->too_big) {
    tc_http_resp_error(&resp, 413, TC_GRPC_RESOURCE_EXHAUSTED, "request body larger than %zu bytes", max);
    tc_metrics_inc("tailcoat_http_requests_total", "route=\"\",code=\"413\"");
  } else {
    struct tc_http_req req;
    memset(&req, 0, sizeof req);
    req.method = method;
    req.path = url;
    tc_buf_reserve(&st->body, 1);
    req.body = st->body.data;
    req.body_len = st->body.len;
    req.header_fn = mhd_header;
    req.transport = c;
    char peer[80] = "unknown";
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (ci && ci->client_addr) {
      format_peer(ci->client_addr, sizeof(struct sockaddr_storage), peer, sizeof peer);
      req.trusted = ci->client_addr->sa_family == AF_UNIX;
    }
    const union MHD_ConnectionInfo *fi = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (fi && fi->connect_fd >= 0 && fi->connect_fd < FD_FLAGS_MAX) req.tls = atomic_load(&fd_flags[fi->connect_fd]) & 1;
    char fwd[64];
    char pip[64];
    peer_ip(peer, pip, sizeof pip);
    if (forwarded_client(fdr, pip, MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Forwarded-For"), fwd,
                         sizeof fwd))
      snprintf(peer, sizeof peer, "%s", fwd);
    req.peer = peer;
    MHD_get_connection_values(c, MHD_GET_ARGUMENT_KIND, collect_arg, &req);
    tc_router_dispatch(fdr->opts.router, &req, &resp);
    observe_duration(req.route, st->start_ns);
  }
  enum MHD_Result ret = send_resp(c, &resp);
  tc_http_resp_free(&resp);
  return ret;
}

static void completed_cb(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
  struct mhd_conn *st = *con_cls;
  if (!st) return;
  tc_buf_free(&st->body);
  free(st);
  *con_cls = NULL;
}

static void mhd_log(void *cls, const char *fmt, va_list ap) {
  if (!tc_log_enabled(TC_LOG_DEBUG)) return;
  char msg[512];
  vsnprintf(msg, sizeof msg, fmt, ap);
  size_t n = strlen(msg);
  while (n && msg[n - 1] == '\n') msg[--n] = 0;
  tc_debug("microhttpd: %s", msg);
}

/* ---- the listener thread ---------------------------------------------------------------- */

static void pending_unlink(struct tc_frontdoor *fdr, struct pending *p) {
  if (p->prev) p->prev->next = p->next;
  else fdr->head = p->next;
  if (p->next) p->next->prev = p->prev;
  else fdr->tail = p->prev;
  p->prev = p->next = NULL;
  fdr->npending--;
}

static void pending_track(struct tc_frontdoor *fdr, struct pending *p) {
  if (fdr->npending >= MAX_PENDING) {
    tc_metrics_inc("tailcoat_http_connections_dropped_total", "reason=\"overload\"");
    close(p->fd);
    free(p);
    return;
  }
  p->deadline = tc_mono_ms() + fdr->opts.head_timeout_ms;
  struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.ptr = p};
  if (epoll_ctl(fdr->ep, EPOLL_CTL_ADD, p->fd, &ev)) {
    close(p->fd);
    free(p);
    return;
  }
  p->prev = fdr->tail;
  p->next = NULL;
  if (fdr->tail) fdr->tail->next = p;
  else fdr->head = p;
  fdr->tail = p;
  fdr->npending++;
}

/* Stops watching p (it is done one way or another) and frees it; the fd is
 * left open for the caller. */
static int pending_release(struct tc_frontdoor *fdr, struct pending *p) {
  int fd = p->fd;
  epoll_ctl(fdr->ep, EPOLL_CTL_DEL, fd, NULL);
  pending_unlink(fdr, p);
  free(p);
  return fd;
}

/* Closes a connection we give up on. Unread input would make the kernel
 * answer with RST; draining what is queued gives the peer a clean EOF. */
static void close_quietly(int fd) {
  char sink[4096];
  for (int i = 0; i < 8; i++)
    if (recv(fd, sink, sizeof sink, MSG_DONTWAIT) <= 0) break;
  close(fd);
}

static void accept_all(struct tc_frontdoor *fdr, int lfd, bool trusted) {
  for (;;) {
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    /* Accepted sockets stay blocking: upgrade handlers expect that, and
     * libmicrohttpd sets its own mode. Peeks use MSG_DONTWAIT. */
    int fd = accept4(lfd, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) tc_debug("accept: %s", strerror(errno));
      return;
    }
    /* TCP_NODELAY and keepalive come from the listening socket */
    struct pending *p = tc_xcalloc(1, sizeof *p);
    p->fd = fd;
    p->trusted = trusted;
    memcpy(&p->addr, &ss, sl);
    p->addrlen = sl;
    tc_metrics_inc("tailcoat_http_connections_total", trusted ? "listener=\"unix\"" : "listener=\"tcp\"");
    pending_track(fdr, p);
  }
}

/* Parses the head in buf (len bytes incl. CRLFCRLF, NUL-terminated copy that
 * this function cuts up). Returns 0, 400 or 431. */
static int parse_head(char *buf, size_t len, struct tc_http_head *h) {
  char *eol = strstr(buf, "\r\n");
  if (!eol) return 400;
  *eol = 0;
  char *sp1 = strchr(buf, ' ');
  if (!sp1) return 400;
  *sp1 = 0;
  char *target = sp1 + 1;
  char *sp2 = strchr(target, ' ');
  if (!sp2) return 400;
  *sp2 = 0;
  if (strncmp(sp2 + 1, "HTTP/1.", 7)) return 400;
  if (!*buf || strspn(buf, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") != strlen(buf)) return 400;
  if (target[0] != '/') return 400;
  h->method = buf;
  char *q = strchr(target, '?');
  if (q) *q++ = 0;
  h->path = target;
  h->query = q ? q : "";
  char *p = eol + 2;
  h->nheaders = 0;
  while (p < buf + len && !(p[0] == '\r' && p[1] == '\n')) {
    char *e = strstr(p, "\r\n");
    if (!e) return 400;
    *e = 0;
    char *colon = strchr(p, ':');
    if (!colon || colon == p) return 400;
    if (p[0] == ' ' || p[0] == '\t') return 400; /* obsolete line folding */
    *colon = 0;
    char *v = colon + 1;
    while (*v == ' ' || *v == '\t') v++;
    char *vend = v + strlen(v);
    while (vend > v && (vend[-1] == ' ' || vend[-1] == '\t')) *--vend = 0;
    if (h->nheaders == TC_HTTP_HEADERS_MAX) return 431;
    h->headers[h->nheaders].name = p;
    h->headers[h->nheaders].value = v;
    h->nheaders++;
    p = e + 2;
  }
  return 0;
}

static void hand_to_mhd(struct tc_frontdoor *fdr, int fd, struct pending *p) {
  if (fd < FD_FLAGS_MAX) atomic_store(&fd_flags[fd], p->tls ? 1 : 0);
  unsigned i = fdr->rr++ % (unsigned)fdr->ndaemons;
  /* MHD closes the socket itself if it cannot take it. */
  if (MHD_add_connection(fdr->daemons[i], fd, (struct sockaddr *)&p->addr, p->addrlen) != MHD_YES)
    tc_debug("http: could not hand a connection to microhttpd: %s", strerror(errno));
}

static void try_peek(struct tc_frontdoor *fdr, struct pending *p, uint32_t events) {
  ssize_t n;
  do n = recv(p->fd, fdr->peekbuf, TC_HTTP_HEAD_MAX + 1, MSG_PEEK | MSG_DONTWAIT);
  while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
  if (n <= 0) {
    close(pending_release(fdr, p));
    return;
  }
  /* A TLS ClientHello starts with a handshake record (0x16); no HTTP
   * method does. Only connections accepted here are sniffed: the TLS
   * module's plaintext ends and the unix socket are never TLS. */
  if ((unsigned char)fdr->peekbuf[0] == 0x16 && !p->tls && !p->trusted) {
    char peer[64];
    format_peer((struct sockaddr *)&p->addr, p->addrlen, peer, sizeof peer);
    int fd = pending_release(fdr, p);
    if (fdr->tls_fn) {
      fdr->tls_fn(fdr->tls_ctx, fd, peer);
    } else {
      /* not HTTP, and no TLS here: refuse now rather than at the head timeout */
      tc_metrics_inc("tailcoat_http_connections_dropped_total", "reason=\"bad_head\"");
      tc_http_refuse(fd, 400, "malformed request head (TLS is not served on this port)");
    }
    return;
  }
  char *end = memmem(fdr->peekbuf, (size_t)n, "\r\n\r\n", 4);
  size_t head_len = end ? (size_t)(end - fdr->peekbuf) + 4 : 0;
  if (!end || head_len > TC_HTTP_HEAD_MAX) {
    if ((size_t)n > TC_HTTP_HEAD_MAX || head_len > TC_HTTP_HEAD_MAX) {
      tc_metrics_inc("tailcoat_http_connections_dropped_total", "reason=\"head_too_large\"");
      tc_http_refuse(pending_release(fdr, p), 431, "request head too large");
      return; /* p is freed: the hang-up check below must not touch it */
    }
    if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
      /* the peer stopped sending before the head was complete */
      close_quietly(pending_release(fdr, p));
      return;
    }
    return; /* wait for more (edge-triggered: the next segment wakes us) */
  }
  char *copy = tc_xmalloc(head_len + 1);
  memcpy(copy, fdr->peekbuf, head_len);
  copy[head_len] = 0;
  struct tc_http_head *h = tc_xcalloc(1, sizeof *h);
  int bad = memchr(copy, 0, head_len) ? 400 : parse_head(copy, head_len, h);
  if (bad) {
    tc_metrics_inc("tailcoat_http_connections_dropped_total", "reason=\"bad_head\"");
    tc_http_refuse(pending_release(fdr, p), bad, bad == 431 ? "too many header fields" : "malformed request head");
    goto out;
  }
  h->head_len = head_len;
  h->tls = p->tls;
  format_peer((struct sockaddr *)&p->addr, p->addrlen, h->peer, sizeof h->peer);
  if (fdr->ntrusted) {
    char pip[64], fwd[64];
    peer_ip(h->peer, pip, sizeof pip);
    if (forwarded_client(fdr, pip, tc_http_head_get(h, "X-Forwarded-For"), fwd, sizeof fwd))
      snprintf(h->peer, sizeof h->peer, "%s", fwd);
  }
  const char *upg = tc_http_head_get(h, "Upgrade");
  if (upg && *upg) {
    for (size_t i = 0; i < fdr->nupgrades; i++) {
      if (strcmp(fdr->upgrades[i].path, h->path)) continue;
      int fd = pending_release(fdr, p);
      char labels[160];
      struct tc_buf lb = TC_BUF_INIT;
      tc_metrics_label_escape(&lb, fdr->upgrades[i].path);
      snprintf(labels, sizeof labels, "path=\"%s\"", lb.data);
      tc_buf_free(&lb);
      tc_metrics_inc("tailcoat_http_upgrades_total", labels);
      fdr->upgrades[i].fn(fdr->upgrades[i].ctx, fd, h);
      goto out;
    }
  }
  struct pending keep = *p;
  int fd = pending_release(fdr, p);
  hand_to_mhd(fdr, fd, &keep);
out:
  free(h);
  free(copy);
}

static void *listener_main(void *arg) {
  struct tc_frontdoor *fdr = arg;
  struct epoll_event evs[64];
  while (!atomic_load(&fdr->stop)) {
    int timeout = -1;
    if (fdr->head) {
      int64_t d = fdr->head->deadline - tc_mono_ms();
      timeout = d < 0 ? 0 : (int)TC_MIN(d, 60000);
    }
    int n = epoll_wait(fdr->ep, evs, (int)TC_ARRAY_LEN(evs), timeout);
    if (n < 0 && errno != EINTR) {
      tc_error("http: epoll_wait: %s", strerror(errno));
      break;
    }
    for (int i = 0; i < n; i++) {
      void *tag = evs[i].data.ptr;
      if (tag == TAG_TCP) {
        accept_all(fdr, fdr->tcp_fd, false);
      } else if (tag == TAG_UNIX) {
        accept_all(fdr, fdr->unix_fd, true);
      } else if (tag == TAG_WAKE) {
        uint64_t v;
        if (read(fdr->wake_fd, &v, sizeof v) < 0) { /* nothing to do */ }
        pthread_mutex_lock(&fdr->qmu);
        struct pending *q = fdr->queue;
        fdr->queue = NULL;
        pthread_mutex_unlock(&fdr->qmu);
        while (q) {
          struct pending *next = q->next;
          q->next = NULL;
          pending_track(fdr, q);
          q = next;
        }
      } else {
        /* A connection handled earlier in this batch cannot appear again:
         * each fd is registered once and events are per fd. */
        try_peek(fdr, tag, evs[i].events);
      }
    }
    int64_t now = tc_mono_ms();
    while (fdr->head && fdr->head->deadline <= now) {
      tc_metrics_inc("tailcoat_http_connections_dropped_total", "reason=\"head_timeout\"");
      close_quietly(pending_release(fdr, fdr->head));
    }
  }
  return NULL;
}

/* Counts every routed request as tailcoat_http_requests_total{route,code};
 * the route pattern (not the raw path) keeps the label set bounded. */
static void count_request(void *ctx, const struct tc_http_req *req, int status) {
  tc_debug("http: %s %s -> %d (%s%s)", req->method, req->path, status, req->peer ? req->peer : "?",
           req->tls ? ", tls" : "");
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_puts(&b, "route=\"");
  tc_metrics_label_escape(&b, req->route ? req->route : "");
  tc_buf_printf(&b, "\",code=\"%d\"", status);
  tc_metrics_inc("tailcoat_http_requests_total", b.data);
  tc_buf_free(&b);
}

/* ---- lifecycle ------------------------------------------------------------------------- */

int tc_frontdoor_new(const struct tc_frontdoor_opts *opts, struct tc_frontdoor **out, struct tc_err *err) {
  *out = NULL;
  if (!opts || !opts->router) return tc_err_set(err, TC_EINVAL, "front door needs a router");
  struct tc_frontdoor *fdr = tc_xcalloc(1, sizeof *fdr);
  int rc = TC_OK;
  fdr->opts = *opts;
  fdr->opts.listen_addr = NULL; /* not kept: the caller's string */
  fdr->opts.unix_socket = NULL;
  if (!fdr->opts.head_timeout_ms) fdr->opts.head_timeout_ms = 10000;
  if (!fdr->opts.body_max) fdr->opts.body_max = TC_HTTP_BODY_MAX_DEFAULT;
  if (fdr->opts.threads <= 0) fdr->opts.threads = 4;
  if (fdr->opts.threads > MAX_DAEMONS) fdr->opts.threads = MAX_DAEMONS;
  fdr->opts.trusted_proxies = NULL;
  fdr->tcp_fd = fdr->unix_fd = fdr->ep = fdr->wake_fd = -1;
  fdr->port = -1;
  pthread_mutex_init(&fdr->qmu, NULL);
  if (opts->n_trusted_proxies) {
    fdr->trusted = tc_xcalloc(opts->n_trusted_proxies, sizeof *fdr->trusted);
    for (size_t i = 0; i < opts->n_trusted_proxies; i++) {
      if (parse_cidr(opts->trusted_proxies[i], &fdr->trusted[i])) {
        rc = tc_err_set(err, TC_EINVAL, "trusted_proxies: \"%s\" is not an address or CIDR",
                        opts->trusted_proxies[i]);
        goto fail;
      }
      fdr->ntrusted++;
    }
  }
  fdr->ep = epoll_create1(EPOLL_CLOEXEC);
  fdr->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fdr->ep < 0 || fdr->wake_fd < 0) {
    rc = tc_err_set(err, TC_EIO, "epoll/eventfd: %s", strerror(errno));
    goto fail;
  }
  if (opts->listen_addr && *opts->listen_addr) {
    fdr->tcp_fd = tc_http_listen_tcp(opts->listen_addr, err);
    if (fdr->tcp_fd < 0) {
      rc = fdr->tcp_fd;
      goto fail;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (!getsockname(fdr->tcp_fd, (struct sockaddr *)&ss, &sl))
      fdr->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);
  }
  if (opts->unix_socket && *opts->unix_socket) {
    fdr->unix_fd = listen_unix(opts->unix_socket, opts->unix_socket_mode, err);
    if (fdr->unix_fd < 0) {
      rc = fdr->unix_fd;
      fdr->unix_fd = -1;
      goto fail;
    }
    fdr->unix_path = tc_xstrdup(opts->unix_socket);
  }
  *out = fdr;
  return TC_OK;
fail:
  if (fdr->tcp_fd < 0) fdr->tcp_fd = -1;
  tc_frontdoor_free(fdr);
  return rc;
}

int tc_frontdoor_port(const struct tc_frontdoor *fdr) { return fdr ? fdr->port : -1; }

int tc_frontdoor_start(struct tc_frontdoor *fdr, struct tc_err *err) {
  if (fdr->started) return tc_err_set(err, TC_EINVAL, "front door already started");
  tc_metrics_declare("tailcoat_http_requests_total", TC_METRIC_COUNTER, "HTTP requests by route and status.");
  tc_metrics_declare("tailcoat_http_connections_total", TC_METRIC_COUNTER, "Accepted connections.");
  tc_metrics_declare("tailcoat_http_connections_dropped_total", TC_METRIC_COUNTER,
                     "Connections closed before routing, by reason.");
  tc_metrics_declare("tailcoat_http_upgrades_total", TC_METRIC_COUNTER, "Connections handed to upgrade handlers.");
  tc_metrics_declare("tailcoat_http_request_duration_seconds", TC_METRIC_GAUGE,
                     "Time from the request head to the response being queued, by route.");
  tc_router_set_observer(fdr->opts.router, count_request, NULL);
  for (int i = 0; i < fdr->opts.threads; i++) {
    fdr->daemons[i] = MHD_start_daemon(
        MHD_USE_NO_LISTEN_SOCKET | MHD_USE_EPOLL_INTERNAL_THREAD | MHD_USE_ITC | MHD_USE_ERROR_LOG, 0, NULL,
        NULL, access_cb, fdr, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, MHD_OPTION_NOTIFY_COMPLETED, completed_cb,
        NULL, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)60, MHD_OPTION_CONNECTION_LIMIT, (unsigned)2048,
        MHD_OPTION_END);
    if (!fdr->daemons[i]) return tc_err_set(err, TC_EIO, "could not start libmicrohttpd");
    fdr->ndaemons++;
  }
  struct epoll_event ev = {.events = EPOLLIN};
  if (fdr->tcp_fd >= 0) {
    ev.data.ptr = TAG_TCP;
    epoll_ctl(fdr->ep, EPOLL_CTL_ADD, fdr->tcp_fd, &ev);
  }
  if (fdr->unix_fd >= 0) {
    ev.data.ptr = TAG_UNIX;
    epoll_ctl(fdr->ep, EPOLL_CTL_ADD, fdr->unix_fd, &ev);
  }
  ev.data.ptr = TAG_WAKE;
  epoll_ctl(fdr->ep, EPOLL_CTL_ADD, fdr->wake_fd, &ev);
  if (pthread_create(&fdr->thread, NULL, listener_main, fdr))
    return tc_err_set(err, TC_EIO, "could not start the listener thread");
  fdr->started = true;
  return TC_OK;
}

void tc_frontdoor_set_tls_handoff(struct tc_frontdoor *fdr, tc_frontdoor_tls_fn fn, void *ctx) {
  if (!fdr || fdr->started) return; /* the listener thread reads these unlocked */
  fdr->tls_fn = fn;
  fdr->tls_ctx = ctx;
}

int tc_frontdoor_add_connection(struct tc_frontdoor *fdr, int fd, const struct sockaddr *peer, socklen_t peerlen,
                                bool tls) {
  if (!fdr || fd < 0) {
    if (fd >= 0) close(fd);
    return TC_EINVAL;
  }
  struct pending *p = tc_xcalloc(1, sizeof *p);
  p->fd = fd;
  p->tls = tls;
  if (peer && peerlen <= (socklen_t)sizeof p->addr) {
    memcpy(&p->addr, peer, peerlen);
    p->addrlen = peerlen;
  } else {
    /* MHD wants some address; an unspecified IPv4 one stands in. */
    struct sockaddr_in *a = (struct sockaddr_in *)&p->addr;
    a->sin_family = AF_INET;
    p->addrlen = sizeof *a;
  }
  pthread_mutex_lock(&fdr->qmu);
  p->next = fdr->queue;
  fdr->queue = p;
  pthread_mutex_unlock(&fdr->qmu);
  uint64_t one = 1;
  if (write(fdr->wake_fd, &one, sizeof one) < 0) { /* counter saturated: a wakeup is pending anyway */ }
  return TC_OK;
}

static void stop_thread(struct tc_frontdoor *fdr) {
  if (!fdr->started || fdr->joined) return;
  atomic_store(&fdr->stop, true);
  uint64_t one = 1;
  if (write(fdr->wake_fd, &one, sizeof one) < 0) { /* ignore */ }
  pthread_join(fdr->thread, NULL);
  fdr->joined = true;
}

static void close_listeners(struct tc_frontdoor *fdr) {
  if (fdr->tcp_fd >= 0) close(fdr->tcp_fd);
  fdr->tcp_fd = -1;
  if (fdr->unix_fd >= 0) {
    close(fdr->unix_fd);
    if (fdr->unix_path) unlink(fdr->unix_path);
  }
  fdr->unix_fd = -1;
}

void tc_frontdoor_stop_accepting(struct tc_frontdoor *fdr) {
  if (!fdr) return;
  stop_thread(fdr); /* it polls the listening sockets: gone before they close */
  close_listeners(fdr);
}

void tc_frontdoor_free(struct tc_frontdoor *fdr) {
  if (!fdr) return;
  stop_thread(fdr);
  while (fdr->head) close(pending_release(fdr, fdr->head));
  for (struct pending *q = fdr->queue, *next; q; q = next) {
    next = q->next;
    close(q->fd);
    free(q);
  }
  for (int i = 0; i < fdr->ndaemons; i++) MHD_stop_daemon(fdr->daemons[i]);
  close_listeners(fdr);
  if (fdr->ep >= 0) close(fdr->ep);
  if (fdr->wake_fd >= 0) close(fdr->wake_fd);
  for (size_t i = 0; i < fdr->nupgrades; i++) free(fdr->upgrades[i].path);
  free(fdr->unix_path);
  free(fdr->trusted);
  pthread_mutex_destroy(&fdr->qmu);
  free(fdr);
}
