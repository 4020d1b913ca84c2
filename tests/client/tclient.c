/* tclient: the tailscaled-like test client (see tclient.h). Single-threaded
 * per client: every call pumps the socket itself. */
#include "tclient.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/sha1.h>
#include <mbedtls/ssl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <poll.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zstd.h>

#include "crypto/crypto.h"
#include "proto/proto.h"

struct tstream {
  int32_t id;
  int status;
  int retry_after; /* Retry-After header, seconds (0 if none) */
  bool headers_done, closed;
  uint32_t error_code;
  struct tc_buf body;
  size_t map_off;
  uint8_t *req;
  size_t req_len, req_off;
};

/* TLS as tailscaled does it for https:// control URLs: any certificate is
 * accepted (Noise provides the security), no ALPN. */
struct tls_state {
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  mbedtls_ssl_config conf;
  mbedtls_ssl_context ssl;
};

struct tc_tclient {
  int fd;
  struct tls_state *tls;
  bool ws;
  struct tc_buf wsin;
  struct tc_ts_session sess;
  uint8_t machine_pub[32];
  nghttp2_session *h2;
  struct tc_buf in, pre;
  bool pre_done, first_settings, closed, goaway;
  char *early_json;
  size_t max_record, records;
  struct tstream **streams;
  size_t nstreams;
};

static int dial(const char *host, int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  if (inet_pton(AF_INET, host, &sa.sin_addr) != 1 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    close(fd);
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

static int send_all(int fd, const void *p, size_t n) {
  const char *b = p;
  while (n) {
    ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return TC_EIO;
    b += w;
    n -= (size_t)w;
  }
  return 0;
}

/* ---- transport I/O: plain TCP or TLS --------------------------------------------------- */
static int bio_send(void *ctx, const unsigned char *p, size_t n) {
  ssize_t w = send(*(int *)ctx, p, n, MSG_NOSIGNAL);
  if (w >= 0) return (int)w;
  return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? MBEDTLS_ERR_SSL_WANT_WRITE : -1;
}

static int bio_recv(void *ctx, unsigned char *p, size_t n) {
  ssize_t r = recv(*(int *)ctx, p, n, 0);
  if (r >= 0) return (int)r;
  return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? MBEDTLS_ERR_SSL_WANT_READ : -1;
}

static void tls_free(struct tls_state *t) {
  if (!t) return;
  mbedtls_ssl_free(&t->ssl);
  mbedtls_ssl_config_free(&t->conf);
  mbedtls_ctr_drbg_free(&t->drbg);
  mbedtls_entropy_free(&t->entropy);
  free(t);
}

static int wait_fd(int fd, short ev, int timeout_ms) {
  struct pollfd pfd = {.fd = fd, .events = ev};
  return poll(&pfd, 1, timeout_ms);
}

static int tls_start(struct tc_tclient *c, const char *host, int64_t deadline) {
  struct tls_state *t = tc_xcalloc(1, sizeof *t);
  c->tls = t;
  mbedtls_entropy_init(&t->entropy);
  mbedtls_ctr_drbg_init(&t->drbg);
  mbedtls_ssl_config_init(&t->conf);
  mbedtls_ssl_init(&t->ssl);
  if (mbedtls_ctr_drbg_seed(&t->drbg, mbedtls_entropy_func, &t->entropy, (const unsigned char *)"tclient", 7) ||
      mbedtls_ssl_config_defaults(&t->conf, MBEDTLS_SSL_IS_CLIENT, MBEDTLS_SSL_TRANSPORT_STREAM,
                                  MBEDTLS_SSL_PRESET_DEFAULT))
    return TC_EINTERNAL;
  mbedtls_ssl_conf_authmode(&t->conf, MBEDTLS_SSL_VERIFY_NONE);
  mbedtls_ssl_conf_rng(&t->conf, mbedtls_ctr_drbg_random, &t->drbg);
  mbedtls_ssl_conf_min_version(&t->conf, MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
  if (mbedtls_ssl_setup(&t->ssl, &t->conf) || mbedtls_ssl_set_hostname(&t->ssl, host)) return TC_EINTERNAL;
  mbedtls_ssl_set_bio(&t->ssl, &c->fd, bio_send, bio_recv, NULL);
  int fl = fcntl(c->fd, F_GETFL);
  fcntl(c->fd, F_SETFL, fl | O_NONBLOCK);
  for (;;) {
    int rc = mbedtls_ssl_handshake(&t->ssl);
    if (rc == 0) return 0;
    int left = (int)(deadline - tc_mono_ms());
    if (left <= 0) return TC_EAGAIN;
    if (rc == MBEDTLS_ERR_SSL_WANT_READ)
      wait_fd(c->fd, POLLIN, left);
    else if (rc == MBEDTLS_ERR_SSL_WANT_WRITE)
      wait_fd(c->fd, POLLOUT, left);
    else
      return TC_EPROTO;
  }
}

/* Sends everything (blocking as needed). 0 or TC_EIO. */
static int c_send(struct tc_tclient *c, const void *p, size_t n) {
  if (!c->tls) return send_all(c->fd, p, n);
  const unsigned char *b = p;
  while (n) {
    int w = mbedtls_ssl_write(&c->tls->ssl, b, n);
    if (w == MBEDTLS_ERR_SSL_WANT_WRITE || w == MBEDTLS_ERR_SSL_WANT_READ) {
      wait_fd(c->fd, w == MBEDTLS_ERR_SSL_WANT_WRITE ? POLLOUT : POLLIN, 1000);
      continue;
    }
    if (w <= 0) return TC_EIO;
    b += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Receives some bytes within timeout_ms: > 0 bytes, 0 if none arrived,
 * TC_EIO at EOF or on error. */
static int c_recv(struct tc_tclient *c, void *buf, size_t n, int timeout_ms) {
  if (!c->tls) {
    if (wait_fd(c->fd, POLLIN, timeout_ms) <= 0) return 0;
    ssize_t r = recv(c->fd, buf, n, MSG_DONTWAIT);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
    return r > 0 ? (int)r : TC_EIO;
  }
  int64_t deadline = tc_mono_ms() + timeout_ms;
  for (;;) {
    int r = mbedtls_ssl_read(&c->tls->ssl, buf, n);
    if (r > 0) return r;
    if (r != MBEDTLS_ERR_SSL_WANT_READ && r != MBEDTLS_ERR_SSL_WANT_WRITE) return TC_EIO;
    int left = (int)(deadline - tc_mono_ms());
    if (left <= 0 || wait_fd(c->fd, POLLIN, left) <= 0) return 0;
  }
}

char *tc_traw_exchange(int port, const void *req, size_t len, int timeout_ms, size_t *outlen) {
  struct tc_buf out = TC_BUF_INIT;
  tc_buf_reserve(&out, 1);
  int fd = dial("127.0.0.1", port);
  if (fd >= 0 && send_all(fd, req, len) == 0) {
    int64_t deadline = tc_mono_ms() + timeout_ms;
    for (;;) {
      int left = (int)(deadline - tc_mono_ms());
      if (left <= 0) break;
      struct pollfd pfd = {.fd = fd, .events = POLLIN};
      if (poll(&pfd, 1, left) <= 0) continue;
      char buf[4096];
      ssize_t r = recv(fd, buf, sizeof buf, 0);
      if (r <= 0) break;
      tc_buf_append(&out, buf, (size_t)r);
    }
  }
  if (fd >= 0) close(fd);
  return tc_buf_steal(&out, outlen);
}

int tc_tclient_fetch_key(const char *host, int port, uint16_t version, uint8_t server_pub[32], int *status,
                         struct tc_err *err) {
  char req[256];
  int n = snprintf(req, sizeof req, "GET /key?v=%u HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n",
                   (unsigned)version, host);
  size_t len;
  char *resp = tc_traw_exchange(port, req, (size_t)n, 5000, &len);
  int rc = TC_EPROTO;
  *status = 0;
  if (sscanf(resp, "HTTP/1.1 %d", status) != 1) {
    tc_err_set(err, TC_EPROTO, "no HTTP status from /key");
    goto out;
  }
  char *body = strstr(resp, "\r\n\r\n");
  if (*status != 200 || !body) {
    rc = tc_err_set(err, TC_EPROTO, "/key status %d", *status);
    goto out;
  }
  json_error_t jerr;
  json_t *j = json_loads(body + 4, 0, &jerr);
  const char *pk = j ? json_string_value(json_object_get(j, "publicKey")) : NULL;
  if (pk && tc_key_parse(TC_KEY_MACHINE, pk, strlen(pk), server_pub) == 0)
    rc = 0;
  else
    tc_err_set(err, TC_EPROTO, "bad /key body");
  json_decref(j);
out:
  free(resp);
  return rc;
}

/* ---- stream bookkeeping ------------------------------------------------------ */
static struct tstream *find(struct tc_tclient *c, int32_t id) {
  for (size_t i = 0; i < c->nstreams; i++)
    if (c->streams[i]->id == id) return c->streams[i];
  return NULL;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *user) {
  struct tstream *st = find(user, f->hd.stream_id);
  if (st && namelen == 7 && !memcmp(name, ":status", 7)) {
    char tmp[8] = {0};
    memcpy(tmp, value, TC_MIN(valuelen, sizeof tmp - 1));
    st->status = atoi(tmp);
  } else if (st && namelen == 11 && !memcmp(name, "retry-after", 11)) {
    char tmp[12] = {0};
    memcpy(tmp, value, TC_MIN(valuelen, sizeof tmp - 1));
    st->retry_after = atoi(tmp);
  }
  return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *user) {
  struct tc_tclient *c = user;
  if (f->hd.type == NGHTTP2_GOAWAY) c->goaway = true;
  struct tstream *st = find(user, f->hd.stream_id);
  if (st && f->hd.type == NGHTTP2_HEADERS) st->headers_done = true;
  return 0;
}

static int on_data(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data, size_t len, void *user) {
  struct tstream *st = find(user, id);
  if (st) tc_buf_append(&st->body, data, len);
  return 0;
}

static int on_close(nghttp2_session *s, int32_t id, uint32_t code, void *user) {
  struct tstream *st = find(user, id);
  if (st) {
    st->closed = true;
    st->error_code = code;
  }
  return 0;
}

static ssize_t req_read(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length, uint32_t *flags,
                        nghttp2_data_source *src, void *user) {
  struct tstream *st = src->ptr;
  size_t n = TC_MIN(length, st->req_len - st->req_off);
  if (n) memcpy(buf, st->req + st->req_off, n);
  st->req_off += n;
  if (st->req_off == st->req_len) *flags |= NGHTTP2_DATA_FLAG_EOF;
  return (ssize_t)n;
}

/* ---- Noise records ---------------------------------------------------------------- */
/* Client WebSocket frames are masked (RFC 6455 §5.3). */
static int ws_send(struct tc_tclient *c, uint8_t opcode, const void *p, size_t n) {
  struct tc_buf f = TC_BUF_INIT;
  uint8_t h[14];
  size_t hl = 2;
  h[0] = (uint8_t)(0x80 | opcode);
  if (n < 126) {
    h[1] = (uint8_t)(0x80 | n);
  } else if (n <= 0xffff) {
    h[1] = 0x80 | 126;
    h[2] = (uint8_t)(n >> 8);
    h[3] = (uint8_t)n;
    hl = 4;
  } else {
    h[1] = 0x80 | 127;
    for (int i = 0; i < 8; i++) h[2 + i] = (uint8_t)((uint64_t)n >> (56 - 8 * i));
    hl = 10;
  }
  uint8_t mask[4];
  tc_random(mask, 4);
  memcpy(h + hl, mask, 4);
  hl += 4;
  tc_buf_append(&f, h, hl);
  tc_buf_reserve(&f, n);
  for (size_t i = 0; i < n; i++) f.data[hl + i] = (char)(((const uint8_t *)p)[i] ^ mask[i & 3]);
  f.len += n;
  int rc = c_send(c, f.data, f.len);
  tc_buf_free(&f);
  return rc;
}

int tc_tclient_send_wire(struct tc_tclient *c, const void *p, size_t n) { return c_send(c, p, n); }

int tc_tclient_send_raw(struct tc_tclient *c, const void *p, size_t n) {
  return c->ws ? ws_send(c, 0x2, p, n) : c_send(c, p, n);
}

int tc_tclient_send_record(struct tc_tclient *c, const void *pt, size_t n) {
  uint8_t rec[TC_TS_MAX_MSG];
  int len = tc_ts_seal_record(&c->sess.tx, pt, n, rec);
  if (len < 0) return len;
  return tc_tclient_send_raw(c, rec, (size_t)len);
}

/* Server frames (unmasked) from wsin into the Noise stream in c->in. */
static int ws_decode(struct tc_tclient *c) {
  for (;;) {
    const uint8_t *p = (const uint8_t *)c->wsin.data;
    size_t avail = c->wsin.len;
    if (avail < 2) return 0;
    if (p[1] & 0x80) return TC_EPROTO; /* servers must not mask */
    size_t len = p[1] & 0x7f, hl = 2;
    if (len == 126) {
      if (avail < 4) return 0;
      len = (size_t)p[2] << 8 | p[3];
      hl = 4;
    } else if (len == 127) {
      if (avail < 10) return 0;
      uint64_t l = 0;
      for (int i = 0; i < 8; i++) l = l << 8 | p[2 + i];
      if (l > (64u << 20)) return TC_ETOOBIG;
      len = (size_t)l;
      hl = 10;
    }
    if (avail < hl + len) return 0;
    uint8_t op = p[0] & 0x0f;
    if (op == 0x0 || op == 0x2)
      tc_buf_append(&c->in, p + hl, len);
    else if (op == 0x8)
      return TC_EIO;
    else if (op == 0x9)
      ws_send(c, 0xA, p + hl, len);
    else if (op != 0xA)
      return TC_EPROTO;
    tc_buf_consume(&c->wsin, hl + len);
  }
}

/* Takes n received socket bytes in buf into the Noise stream. */
static int take_wire(struct tc_tclient *c, const char *buf, size_t n) {
  if (!c->ws) {
    tc_buf_append(&c->in, buf, n);
    return 0;
  }
  tc_buf_append(&c->wsin, buf, n);
  return ws_decode(c);
}

/* Reads until c->in holds at least need bytes of the Noise stream. */
static int fill_in(struct tc_tclient *c, size_t need, int64_t deadline) {
  while (c->in.len < need) {
    int left = (int)(deadline - tc_mono_ms());
    if (left <= 0) return TC_EAGAIN;
    char buf[4096];
    int r = c_recv(c, buf, sizeof buf, left);
    if (r < 0) return TC_EIO;
    if (r == 0) continue;
    int rc = take_wire(c, buf, (size_t)r);
    if (rc) return rc;
  }
  return 0;
}

int tc_tclient_send_plain(struct tc_tclient *c, const void *pt, size_t n) {
  const uint8_t *p = pt;
  while (n) {
    size_t k = TC_MIN(n, (size_t)TC_TS_MAX_PLAINTEXT);
    int rc = tc_tclient_send_record(c, p, k);
    if (rc) return rc;
    p += k;
    n -= k;
  }
  return 0;
}

static int flush(struct tc_tclient *c) {
  if (!c->h2) return 0;
  struct tc_buf out = TC_BUF_INIT;
  for (;;) {
    const uint8_t *data;
    ssize_t n = nghttp2_session_mem_send(c->h2, &data);
    if (n < 0) {
      tc_buf_free(&out);
      return TC_EPROTO;
    }
    if (n == 0) break;
    tc_buf_append(&out, data, (size_t)n);
  }
  int rc = out.len ? tc_tclient_send_plain(c, out.data, out.len) : 0;
  tc_buf_free(&out);
  return rc;
}

/* Plaintext from the server: the EarlyNoise check, then HTTP/2. */
static int feed(struct tc_tclient *c, const uint8_t *p, size_t n) {
  if (!c->h2) return 0;
  if (!c->pre_done) {
    tc_buf_append(&c->pre, p, n);
    if (c->pre.len < 9) return 0;
    const uint8_t *b = (const uint8_t *)c->pre.data;
    if (!memcmp(b, "\xff\xff\xffTS", 5)) {
      size_t jl = (size_t)b[5] << 24 | (size_t)b[6] << 16 | (size_t)b[7] << 8 | b[8];
      if (jl > (10u << 20)) return TC_ETOOBIG;
      if (c->pre.len < 9 + jl) return 0;
      free(c->early_json);
      c->early_json = tc_xstrndup(c->pre.data + 9, jl);
      tc_buf_consume(&c->pre, 9 + jl);
      if (c->pre.len < 9) return 0;
      b = (const uint8_t *)c->pre.data;
    }
    /* A frame header: length(3) type(1) flags(1) stream(4). */
    c->first_settings = b[3] == NGHTTP2_SETTINGS && !(b[5] | b[6] | b[7] | b[8]);
    c->pre_done = true;
    ssize_t r = nghttp2_session_mem_recv(c->h2, (const uint8_t *)c->pre.data, c->pre.len);
    tc_buf_free(&c->pre);
    return r < 0 ? TC_EPROTO : 0;
  }
  ssize_t r = nghttp2_session_mem_recv(c->h2, p, n);
  return r < 0 ? TC_EPROTO : 0;
}

static int process_in(struct tc_tclient *c) {
  size_t off = 0;
  uint8_t pt[TC_TS_MAX_MSG];
  for (;;) {
    const uint8_t *p = (const uint8_t *)c->in.data + off;
    size_t avail = c->in.len - off;
    if (avail >= 3) {
      size_t wire = 3 + ((size_t)p[1] << 8 | p[2]);
      if (wire > c->max_record) c->max_record = wire;
    }
    int rl = tc_ts_record_len(p, avail);
    if (rl < 0) return TC_EPROTO;
    if (rl == 0 || avail < (size_t)rl) break;
    size_t ptlen;
    if (tc_ts_open_record(&c->sess.rx, p, (size_t)rl, pt, &ptlen)) return TC_EPROTO;
    c->records++;
    off += (size_t)rl;
    if (ptlen && feed(c, pt, ptlen)) return TC_EPROTO;
  }
  tc_buf_consume(&c->in, off);
  return 0;
}

int tc_tclient_pump(struct tc_tclient *c, int timeout_ms) {
  if (c->closed) return TC_EIO;
  if (flush(c)) goto dead;
  for (int wait = timeout_ms;; wait = 0) {
    char buf[16384];
    int r = c_recv(c, buf, sizeof buf, wait);
    if (r < 0) goto dead;
    if (r == 0) break;
    if (take_wire(c, buf, (size_t)r) || process_in(c)) goto dead;
  }
  if (flush(c)) goto dead;
  return 0;
dead:
  c->closed = true;
  for (size_t i = 0; i < c->nstreams; i++) c->streams[i]->closed = true;
  return TC_EIO;
}

bool tc_tclient_closed(struct tc_tclient *c) { return c->closed; }

/* ---- connect ------------------------------------------------------------------------ */
int tc_tclient_prepare(uint16_t version, const uint8_t *machine_priv, const uint8_t server_pub[32],
                       struct tc_tclient_prepared *out) {
  tc_crypto_init();
  uint8_t mpriv[32];
  if (machine_priv)
    memcpy(mpriv, machine_priv, 32);
  else
    tc_random(mpriv, 32);
  int rc = tc_ts_client_initiate(&out->hs, version ? version : 138, mpriv, server_pub, NULL, out->init);
  tc_wipe(mpriv, sizeof mpriv);
  out->ready = rc == 0;
  return rc;
}

int tc_tclient_connect(const char *host, int port, const struct tc_tclient_opts *opts, struct tc_tclient **out,
                       struct tc_err *err) {
  *out = NULL;
  tc_crypto_init();
  uint16_t version = opts && opts->version ? opts->version : 138;
  int timeout = opts && opts->timeout_ms ? opts->timeout_ms : 5000;
  struct tc_noise_hs hs;
  uint8_t init[TC_TS_INIT_LEN];
  int rc;
  struct tc_tclient_prepared *prep = opts ? opts->prepared : NULL;
  if (prep) {
    if (!prep->ready) return tc_err_set(err, TC_EINVAL, "prepared handshake already used");
    hs = prep->hs;
    memcpy(init, prep->init, sizeof init);
    tc_noise_hs_wipe(&prep->hs);
    prep->ready = false;
  } else {
    uint8_t spub[32];
    if (opts && opts->server_pub) {
      memcpy(spub, opts->server_pub, 32);
    } else {
      int status;
      if ((rc = tc_tclient_fetch_key(host, port, version, spub, &status, err))) return rc;
    }
    struct tc_tclient_prepared p;
    if ((rc = tc_tclient_prepare(version, opts ? opts->machine_priv : NULL, spub, &p)))
      return tc_err_set(err, rc, "initiate failed");
    hs = p.hs;
    memcpy(init, p.init, sizeof init);
    tc_noise_hs_wipe(&p.hs);
  }
  struct tc_tclient *c = tc_xcalloc(1, sizeof *c);
  c->fd = -1;
  /* the handshake derived the machine's public key already (one X25519 base
   * multiplication less per connection) */
  memcpy(c->machine_pub, hs.s_pub, sizeof c->machine_pub);
  char b64[200];
  sodium_bin2base64(b64, sizeof b64, init, sizeof init, sodium_base64_VARIANT_ORIGINAL);
  char req[1024], wskey[32] = "";
  int n;
  c->ws = opts && opts->websocket;
  if (c->ws) {
    char esc[400];
    size_t o = 0;
    for (const char *p = b64; *p; p++) {
      if (*p == '+' || *p == '/' || *p == '=')
        o += (size_t)snprintf(esc + o, sizeof esc - o, "%%%02X", (unsigned char)*p);
      else
        esc[o++] = *p;
    }
    esc[o] = 0;
    uint8_t k[16];
    tc_random(k, sizeof k);
    sodium_bin2base64(wskey, sizeof wskey, k, sizeof k, sodium_base64_VARIANT_ORIGINAL);
    const char *proto = opts->ws_protocol ? opts->ws_protocol : "tailscale-control-protocol";
    n = snprintf(req, sizeof req,
                 "GET /ts2021?X-Tailscale-Handshake=%s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s%s%s\r\n",
                 esc, host, port, wskey, *proto ? "Sec-WebSocket-Protocol: " : "", proto, *proto ? "\r\n" : "");
  } else {
    n = snprintf(req, sizeof req,
                 "POST /ts2021 HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: tailscale-control-protocol\r\n"
                 "Connection: upgrade\r\nX-Tailscale-Handshake: %s\r\nContent-Length: 0\r\n\r\n",
                 host, port, b64);
  }
  int64_t deadline = tc_mono_ms() + timeout;
  c->fd = dial(host, port);
  if (c->fd < 0) {
    rc = tc_err_set(err, TC_EIO, "dial failed");
    goto fail;
  }
  if (opts && opts->tls && (rc = tls_start(c, host, deadline))) {
    tc_err_set(err, rc, "TLS handshake failed");
    goto fail;
  }
  if (c_send(c, req, (size_t)n)) {
    rc = tc_err_set(err, TC_EIO, "sending upgrade request failed");
    goto fail;
  }
  /* Read the response head in chunks, as a buffered reader does; bytes past
   * the blank line are the start of the Noise stream. */
  char head[2048];
  size_t hl = 0, got = 0;
  char *end = NULL;
  while (!end) {
    if (got >= sizeof head - 1) {
      rc = tc_err_set(err, TC_EPROTO, "upgrade response head too long");
      goto fail;
    }
    int left = (int)(deadline - tc_mono_ms());
    int r = left > 0 ? c_recv(c, head + got, sizeof head - 1 - got, left) : 0;
    if (r < 0 || left <= 0) {
      rc = tc_err_set(err, r < 0 ? r : TC_EAGAIN, "reading upgrade response");
      goto fail;
    }
    got += (size_t)r;
    head[got] = 0;
    end = strstr(head, "\r\n\r\n");
  }
  hl = (size_t)(end - head) + 4;
  size_t extra = got - hl;
  char rest[sizeof head];
  memcpy(rest, head + hl, extra);
  head[hl] = 0;
  if (c->ws) {
    char cat[100], want[64], line[128];
    uint8_t sha[20];
    snprintf(cat, sizeof cat, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", wskey);
    mbedtls_sha1_ret((const unsigned char *)cat, strlen(cat), sha);
    sodium_bin2base64(want, sizeof want, sha, sizeof sha, sodium_base64_VARIANT_ORIGINAL);
    snprintf(line, sizeof line, "\r\nSec-WebSocket-Accept: %s\r\n", want);
    if (strncmp(head, "HTTP/1.1 101 ", 13) != 0 || !strstr(head, line)) {
      rc = tc_err_set(err, TC_EPROTO, "websocket upgrade refused: %.80s", head);
      goto fail;
    }
  } else if (strncmp(head, "HTTP/1.1 101 ", 13) != 0 ||
             !strstr(head, "\r\nUpgrade: tailscale-control-protocol\r\n")) {
    rc = tc_err_set(err, TC_EPROTO, "upgrade refused: %.80s", head);
    goto fail;
  }
  if (extra && (rc = take_wire(c, rest, extra))) {
    tc_err_set(err, rc, "reading handshake response");
    goto fail;
  }
  uint8_t resp[TC_TS_RESP_LEN];
  if ((rc = fill_in(c, 3, deadline))) {
    tc_err_set(err, rc, "reading handshake response");
    goto fail;
  }
  memcpy(resp, c->in.data, 3);
  if (resp[0] == TC_TS_MSG_ERROR) {
    size_t ml = TC_MIN((size_t)(resp[1] << 8 | resp[2]), 1000);
    if (fill_in(c, 3 + ml, deadline)) ml = 0;
    rc = tc_err_set(err, TC_EPROTO, "server error: %.*s", (int)ml, c->in.data + 3);
    goto fail;
  }
  if ((rc = fill_in(c, sizeof resp, deadline))) {
    tc_err_set(err, rc, "reading handshake response");
    goto fail;
  }
  memcpy(resp, c->in.data, sizeof resp);
  tc_buf_consume(&c->in, sizeof resp);
  if ((rc = tc_ts_client_finish(&hs, resp, &c->sess))) {
    tc_err_set(err, rc, "handshake failed");
    goto fail;
  }
  if (opts && opts->no_http2) {
    *out = c;
    return 0;
  }
  nghttp2_session_callbacks *cbs;
  nghttp2_session_callbacks_new(&cbs);
  nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_close);
  nghttp2_option *opt;
  nghttp2_option_new(&opt);
  if (opts && opts->ignore_stream_limit) nghttp2_option_set_peer_max_concurrent_streams(opt, 100000);
  rc = nghttp2_session_client_new2(&c->h2, cbs, c, opt);
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cbs);
  if (rc) {
    c->h2 = NULL;
    rc = tc_err_set(err, TC_EINTERNAL, "nghttp2 client");
    goto fail;
  }
  /* What Go's transport advertises: 4 MiB stream window, 1 GiB connection. */
  nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 4u << 20},
                                 {NGHTTP2_SETTINGS_ENABLE_PUSH, 0}};
  nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, iv, 2);
  nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0, 1 << 30);
  /* Records that arrived together with the handshake response. */
  if (flush(c) || (!(opts && opts->ignore_stream_limit) && process_in(c))) {
    rc = tc_err_set(err, TC_EIO, "sending preface");
    goto fail;
  }
  *out = c;
  return 0;
fail:
  tc_noise_hs_wipe(&hs);
  tc_tclient_free(c);
  return rc ? rc : TC_EPROTO;
}

void tc_tclient_free(struct tc_tclient *c) {
  if (!c) return;
  if (c->h2) nghttp2_session_del(c->h2);
  if (c->tls && c->fd >= 0) mbedtls_ssl_close_notify(&c->tls->ssl);
  tls_free(c->tls);
  if (c->fd >= 0) close(c->fd);
  for (size_t i = 0; i < c->nstreams; i++) {
    tc_buf_free(&c->streams[i]->body);
    free(c->streams[i]->req);
    free(c->streams[i]);
  }
  free(c->streams);
  tc_buf_free(&c->in);
  tc_buf_free(&c->wsin);
  tc_buf_free(&c->pre);
  free(c->early_json);
  tc_wipe(&c->sess, sizeof c->sess);
  free(c);
}

/* ---- requests ------------------------------------------------------------------------ */
int32_t tc_tclient_submit_hdrs(struct tc_tclient *c, const char *method, const char *path,
                               const char *const *extra, const void *body, size_t len) {
  if (c->closed || !c->h2) return TC_EIO;
  struct tstream *st = tc_xcalloc(1, sizeof *st);
  if (len) {
    st->req = tc_xmalloc(len);
    memcpy(st->req, body, len);
  }
  st->req_len = len;
  char clen[24];
  snprintf(clen, sizeof clen, "%zu", len);
  nghttp2_nv nva[64];
  size_t n = 0;
#define NV(nm, v) nva[n++] = (nghttp2_nv){(uint8_t *)(nm), (uint8_t *)(v), strlen(nm), strlen(v), NGHTTP2_NV_FLAG_NONE}
  NV(":method", method);
  NV(":scheme", "https");
  NV(":authority", "tailcoat.test");
  NV(":path", path);
  NV("content-length", clen);
  for (size_t i = 0; extra && extra[i] && extra[i + 1] && n < TC_ARRAY_LEN(nva); i += 2) NV(extra[i], extra[i + 1]);
#undef NV
  nghttp2_data_provider prd = {.source.ptr = st, .read_callback = req_read};
  int32_t id = nghttp2_submit_request(c->h2, NULL, nva, n, len ? &prd : NULL, st);
  if (id < 0) {
    free(st->req);
    free(st);
    return TC_EPROTO;
  }
  st->id = id;
  c->streams = tc_xrealloc(c->streams, (c->nstreams + 1) * sizeof *c->streams);
  c->streams[c->nstreams++] = st;
  if (flush(c)) return TC_EIO;
  return id;
}

int32_t tc_tclient_submit(struct tc_tclient *c, const char *method, const char *path, const char *content_type,
                          const void *body, size_t len) {
  const char *extra[] = {"content-type", content_type ? content_type : "application/json", NULL};
  return tc_tclient_submit_hdrs(c, method, path, extra, body, len);
}

int tc_tclient_wait_headers(struct tc_tclient *c, int32_t sid, int timeout_ms) {
  struct tstream *st = find(c, sid);
  if (!st) return TC_ENOENT;
  int64_t deadline = tc_mono_ms() + timeout_ms;
  while (!st->headers_done || !st->status) {
    if (st->closed) return TC_EIO;
    int left = (int)(deadline - tc_mono_ms());
    if (left <= 0) return TC_EAGAIN;
    tc_tclient_pump(c, left);
  }
  return st->status;
}

int tc_tclient_wait_closed(struct tc_tclient *c, int32_t sid, int timeout_ms) {
  struct tstream *st = find(c, sid);
  if (!st) return TC_ENOENT;
  int64_t deadline = tc_mono_ms() + timeout_ms;
  while (!st->closed) {
    int left = (int)(deadline - tc_mono_ms());
    if (left <= 0) return TC_EAGAIN;
    tc_tclient_pump(c, left);
  }
  return st->error_code || !st->status ? TC_EIO : 0;
}

const char *tc_tclient_body(struct tc_tclient *c, int32_t sid, size_t *len) {
  struct tstream *st = find(c, sid);
  *len = st ? st->body.len : 0;
  return st && st->body.data ? st->body.data : "";
}

int tc_tclient_retry_after(struct tc_tclient *c, int32_t sid) {
  struct tstream *st = find(c, sid);
  return st ? st->retry_after : 0;
}

uint32_t tc_tclient_stream_error(struct tc_tclient *c, int32_t sid) {
  struct tstream *st = find(c, sid);
  return st ? st->error_code : 0;
}

int tc_tclient_request(struct tc_tclient *c, const char *method, const char *path, const void *body, size_t len,
                       int timeout_ms, int *status, char **resp, size_t *resp_len) {
  *status = 0;
  if (resp) *resp = NULL;
  int32_t sid = tc_tclient_submit(c, method, path, NULL, body, len);
  if (sid < 0) return sid;
  int rc = tc_tclient_wait_closed(c, sid, timeout_ms);
  struct tstream *st = find(c, sid);
  *status = st->status;
  if (resp) {
    size_t n;
    const char *b = tc_tclient_body(c, sid, &n);
    *resp = tc_xstrndup(b, n);
    if (resp_len) *resp_len = n;
  }
  if (st->closed) tc_tclient_forget(c, sid);
  return rc;
}

void tc_tclient_forget(struct tc_tclient *c, int32_t sid) {
  for (size_t i = 0; i < c->nstreams; i++) {
    struct tstream *st = c->streams[i];
    if (st->id != sid) continue;
    if (!st->closed && c->h2 && !c->closed) {
      /* Still open: reset it. nghttp2 may still hold st as the source of
       * the request body, so the record stays (anonymous) until free. */
      nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, sid, NGHTTP2_CANCEL);
      flush(c);
      st->id = -1;
      tc_buf_free(&st->body);
      return;
    }
    tc_buf_free(&st->body);
    free(st->req);
    free(st);
    c->streams[i] = c->streams[--c->nstreams];
    return;
  }
}

/* ---- map message decoding ------------------------------------------------------------ */
/* One zstd decompression context per thread, reused for every message: a
 * context per message (what a one-shot ZSTD_decompress does) cost ~5 us of
 * setup per message, about as much as decoding a small delta, and bench-proto
 * decodes tens of thousands of them. */
static pthread_key_t dctx_key;
static pthread_once_t dctx_once = PTHREAD_ONCE_INIT;
static void dctx_free(void *p) { ZSTD_freeDCtx(p); }
static void dctx_key_init(void) { pthread_key_create(&dctx_key, dctx_free); }

static ZSTD_DCtx *thread_dctx(void) {
  pthread_once(&dctx_once, dctx_key_init);
  ZSTD_DCtx *d = pthread_getspecific(dctx_key);
  if (!d) {
    d = ZSTD_createDCtx();
    if (d) pthread_setspecific(dctx_key, d);
  }
  return d;
}

int tc_tclient_unframe(const uint8_t *buf, size_t len, size_t max_json, size_t *consumed, char **json, size_t *json_len) {
  if (len < 4) return TC_EAGAIN;
  size_t n = (size_t)buf[0] | (size_t)buf[1] << 8 | (size_t)buf[2] << 16 | (size_t)buf[3] << 24;
  if (n > max_json + 64) return TC_ETOOBIG;
  if (len < 4 + n) return TC_EAGAIN;
  if (n == 0) return TC_EPROTO;
  ZSTD_DCtx *d = thread_dctx();
  if (!d) return TC_EINTERNAL;
  ZSTD_DCtx_reset(d, ZSTD_reset_session_only);
  const uint8_t *src = buf + 4;
  /* The sum of the frames' declared sizes, UNKNOWN if one declares none. */
  unsigned long long want = 0;
  for (size_t off = 0; off < n;) {
    size_t fl = ZSTD_findFrameCompressedSize(src + off, n - off);
    if (ZSTD_isError(fl) || fl == 0) return TC_EPROTO;
    unsigned long long sz = ZSTD_getFrameContentSize(src + off, fl);
    if (sz == ZSTD_CONTENTSIZE_ERROR) return TC_EPROTO;
    if (sz == ZSTD_CONTENTSIZE_UNKNOWN || want == ZSTD_CONTENTSIZE_UNKNOWN)
      want = ZSTD_CONTENTSIZE_UNKNOWN;
    else if ((want += sz) > max_json)
      return TC_ETOOBIG;
    off += fl;
  }
  char *out;
  size_t got;
  if (want != ZSTD_CONTENTSIZE_UNKNOWN) {
    if (want > max_json) return TC_ETOOBIG;
    out = tc_xmalloc((size_t)want + 1);
    got = ZSTD_decompressDCtx(d, out, (size_t)want, src, n);
    if (ZSTD_isError(got) || got != want) goto bad;
  } else {
    /* Streamed, growing the output up to max_json + 1 bytes. */
    size_t cap = TC_MIN(max_json + 1, 4 * n + 256);
    out = tc_xmalloc(cap + 1);
    ZSTD_inBuffer in = {src, n, 0};
    ZSTD_outBuffer ob = {out, cap, 0};
    size_t r = 1;
    while (in.pos < in.size || r != 0) {
      if (ob.pos == ob.size) {
        if (ob.size > max_json) { /* a byte past the limit was produced */
          free(out);
          return TC_ETOOBIG;
        }
        ob.size = TC_MIN(max_json + 1, ob.size * 2);
        out = tc_xrealloc(out, ob.size + 1);
        ob.dst = out;
      }
      size_t before_in = in.pos, before_out = ob.pos;
      r = ZSTD_decompressStream(d, &ob, &in);
      if (ZSTD_isError(r)) goto bad;
      /* input exhausted inside a frame, nothing more produced: truncated */
      if (in.pos == in.size && r != 0 && ob.pos == before_out && in.pos == before_in && ob.pos < ob.size)
        goto bad;
    }
    if (ob.pos > max_json) {
      free(out);
      return TC_ETOOBIG;
    }
    got = ob.pos;
  }
  out[got] = 0;
  *json = out;
  if (json_len) *json_len = got;
  *consumed = 4 + n;
  return 0;
bad:
  free(out);
  return TC_EPROTO;
}

int tc_tclient_map_next(struct tc_tclient *c, int32_t sid, int timeout_ms, char **json, size_t *len) {
  struct tstream *st = find(c, sid);
  if (!st) return TC_ENOENT;
  int64_t deadline = tc_mono_ms() + timeout_ms;
  for (;;) {
    size_t consumed;
    int rc = tc_tclient_unframe((const uint8_t *)st->body.data + st->map_off, st->body.len - st->map_off, 64u << 20,
                                &consumed, json, len);
    if (rc == 0) {
      st->map_off += consumed;
      if (st->map_off >= 65536) { /* long polls: drop what was read */
        tc_buf_consume(&st->body, st->map_off);
        st->map_off = 0;
      }
      return 0;
    }
    if (rc != TC_EAGAIN) return rc;
    if (st->closed) return TC_EIO;
    int left = (int)(deadline - tc_mono_ms());
    if (left <= 0) return TC_EAGAIN;
    tc_tclient_pump(c, left);
  }
}

int tc_tclient_reset(struct tc_tclient *c, int32_t sid) {
  if (!c->h2 || nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, sid, NGHTTP2_CANCEL)) return TC_EINVAL;
  return flush(c) ? TC_EIO : 0;
}

size_t tc_tclient_max_record(struct tc_tclient *c) { return c->max_record; }
size_t tc_tclient_records(struct tc_tclient *c) { return c->records; }
bool tc_tclient_first_frame_settings(struct tc_tclient *c) { return c->first_settings; }
bool tc_tclient_goaway(struct tc_tclient *c) { return c->goaway; }
const char *tc_tclient_early_json(struct tc_tclient *c) { return c->early_json; }
const uint8_t *tc_tclient_machine_pub(struct tc_tclient *c) { return c->machine_pub; }
int tc_tclient_fd(struct tc_tclient *c) { return c->fd; }
bool tc_tclient_pending(struct tc_tclient *c) {
  return c->tls && (mbedtls_ssl_get_bytes_avail(&c->tls->ssl) > 0 || mbedtls_ssl_check_pending(&c->tls->ssl));
}
