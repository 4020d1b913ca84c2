/* derp_server: the DERP relay (doc §11). One epoll thread runs every
 * connection; other threads (the listener handing over connections, the
 * model cutting off deleted nodes, /metrics) take the server lock, which the
 * thread holds while it processes one batch of events.
 *
 * A connection moves HEAD (discarding the request head) -> HANDSHAKE (sent
 * 101 + ServerKey, waiting for ClientInfo) -> OPEN -> DEAD. Input is parsed
 * frame by frame from one buffer whose size is bounded by the largest frame
 * we buffer (ClientInfo, 256 KiB); unknown frames are skipped by length
 * without buffering. Output is one buffer refilled from small control
 * frames and two bounded per-destination packet queues (data and disco),
 * each dropping its oldest packet when full. Clients that get packets are
 * flushed once per batch, so many packets leave in one write. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <mbedtls/sha1.h>
#include <sodium.h>

#include "derp/derp.h"

#define IN_INITIAL (5 + 32 + TC_DERP_MAX_PACKET + 64)
#define IN_HANDSHAKE 4096 /* before ClientInfo is accepted; grows on demand */
#define OUT_FILL 65536
#define READ_BUDGET (256 * 1024)
#define MIN_BURST (TC_DERP_MAX_PACKET + 32)

/* ---- a small open-addressing map from 32-byte keys to pointers ---------- */

struct kmap {
  uint8_t (*keys)[32];
  void **vals;
  uint8_t *st; /* 0 empty, 1 used, 2 deleted */
  size_t cap, n, used;
};

static uint8_t g_hash_key[crypto_shorthash_KEYBYTES];

/* Keys come from clients, so the table hash is keyed (SipHash) to keep
 * collisions from being chosen. */
static void init_hash_key(void) { randombytes_buf(g_hash_key, sizeof g_hash_key); }

static uint64_t khash(const uint8_t k[32]) {
  uint8_t h[crypto_shorthash_BYTES];
  crypto_shorthash(h, k, 32, g_hash_key);
  uint64_t v;
  memcpy(&v, h, 8);
  return v;
}

static void kmap_free(struct kmap *m) {
  free(m->keys);
  free(m->vals);
  free(m->st);
  memset(m, 0, sizeof *m);
}

static void kmap_put(struct kmap *m, const uint8_t k[32], void *v);

static void kmap_grow(struct kmap *m) {
  struct kmap old = *m;
  size_t cap = old.cap ? (old.n * 4 > old.cap ? old.cap * 2 : old.cap) : 16;
  m->keys = tc_xcalloc(cap, 32);
  m->vals = tc_xcalloc(cap, sizeof(void *));
  m->st = tc_xcalloc(cap, 1);
  m->cap = cap;
  m->n = m->used = 0;
  for (size_t i = 0; i < old.cap; i++)
    if (old.st[i] == 1) kmap_put(m, old.keys[i], old.vals[i]);
  kmap_free(&old);
}

static size_t kmap_find(const struct kmap *m, const uint8_t k[32]) {
  if (!m->cap) return SIZE_MAX;
  size_t i = khash(k) & (m->cap - 1);
  for (;;) {
    if (m->st[i] == 0) return SIZE_MAX;
    if (m->st[i] == 1 && memcmp(m->keys[i], k, 32) == 0) return i;
    i = (i + 1) & (m->cap - 1);
  }
}

static void *kmap_get(const struct kmap *m, const uint8_t k[32]) {
  size_t i = kmap_find(m, k);
  return i == SIZE_MAX ? NULL : m->vals[i];
}

static void kmap_put(struct kmap *m, const uint8_t k[32], void *v) {
  size_t i = kmap_find(m, k);
  if (i != SIZE_MAX) {
    m->vals[i] = v;
    return;
  }
  if ((m->used + 1) * 10 >= m->cap * 7) kmap_grow(m);
  i = khash(k) & (m->cap - 1);
  while (m->st[i] == 1) i = (i + 1) & (m->cap - 1);
  if (m->st[i] == 0) m->used++;
  m->st[i] = 1;
  memcpy(m->keys[i], k, 32);
  m->vals[i] = v;
  m->n++;
}

static bool kmap_del(struct kmap *m, const uint8_t k[32]) {
  size_t i = kmap_find(m, k);
  if (i == SIZE_MAX) return false;
  m->st[i] = 2;
  m->vals[i] = NULL;
  m->n--;
  return true;
}

/* ---- server state -------------------------------------------------------- */

struct pkt {
  struct pkt *next;
  uint32_t len; /* bytes in data: a whole RecvPacket frame */
  uint8_t data[];
};

struct pq {
  struct pkt *head, *tail;
  int n;
};

enum cstate { CS_HEAD, CS_HANDSHAKE, CS_OPEN, CS_DEAD };

struct client {
  struct client *prev, *next; /* all clients */
  struct client *dirty_next;
  bool dirty;
  struct client *dead_next;
  enum cstate state;
  int fd;
  uint64_t seq;
  char peer[64];
  uint8_t key[32];
  bool active;    /* the connection packets to key go to */
  bool preferred;
  size_t discard_left;
  bool fast_start;
  /* input */
  uint8_t *in;
  size_t in_len, in_cap;
  uint64_t skip_left;
  /* output */
  struct tc_buf out;
  size_t out_off;
  struct tc_buf ctrl; /* queued control frames */
  struct pq q, dq;
  bool pong_pending;
  uint8_t pong[8];
  int64_t stall_since;
  uint32_t ep_events;
  /* timers */
  int64_t hs_deadline, next_keepalive;
  /* receive token bucket */
  double tokens;
  int64_t tokens_at;
  int64_t throttled_until;
  /* PeerGone(not here) limiter: 1/s, burst 3 */
  double pg_tokens;
  int64_t pg_at;
  struct kmap saw_src; /* keys that sent packets to this client */
  /* WebSocket transport (wasm clients): DERP bytes ride in binary messages */
  bool ws;
  char *ws_resp;            /* the 101 for WebSocket, sent unframed */
  struct tc_buf raw_out;    /* unframed bytes that go before everything else */
  size_t raw_off;
  struct tc_buf ws_raw;     /* received, not yet decoded */
  struct tc_buf ws_plain;   /* decoded DERP stream bytes, not yet consumed */
  size_t ws_plain_off;
  bool ws_bad;              /* a WebSocket protocol violation was seen */
  bool again;               /* decoded bytes are waiting: read again soon */
  struct client *again_next;
};

struct tc_derp_server {
  struct tc_derp_server_params p;
  uint8_t priv[32], pub[32];
  pthread_mutex_t mu;
  int ep, wake_fd;
  pthread_t thr;
  clockid_t thr_clock;
  bool started, stop;
  struct client *clients;
  size_t nclients;
  struct kmap active; /* key -> active client */
  struct client *dirty, *dead, *again;
  uint64_t next_seq;
  uint64_t rate_bps, rate_burst;
  struct tc_derp_metrics m;
};

static void set_nonblock(int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void put_header(uint8_t *p, uint8_t type, uint32_t len) {
  p[0] = type;
  p[1] = (uint8_t)(len >> 24);
  p[2] = (uint8_t)(len >> 16);
  p[3] = (uint8_t)(len >> 8);
  p[4] = (uint8_t)len;
}

static void ctrl_frame(struct client *c, uint8_t type, const void *p, size_t n) {
  uint8_t h[5];
  put_header(h, type, (uint32_t)n);
  tc_buf_append(&c->ctrl, h, 5);
  if (n) tc_buf_append(&c->ctrl, p, n);
}

static void mark_dirty(struct tc_derp_server *s, struct client *c) {
  if (c->dirty || c->state == CS_DEAD) return;
  c->dirty = true;
  c->dirty_next = s->dirty;
  s->dirty = c;
}

static void wake(struct tc_derp_server *s) {
  uint64_t one = 1;
  ssize_t r = write(s->wake_fd, &one, sizeof one);
  (void)r;
}

static void ep_update(struct tc_derp_server *s, struct client *c) {
  if (c->state == CS_DEAD) return;
  uint32_t ev = 0;
  int64_t now = tc_mono_ms();
  if (c->throttled_until <= now) ev |= EPOLLIN;
  /* also when queued frames wait: flush() may have stopped on its budget */
  if (c->out_off < c->out.len || c->ctrl.len || c->pong_pending || c->q.n || c->dq.n || c->raw_out.len)
    ev |= EPOLLOUT;
  if (ev == c->ep_events) return;
  struct epoll_event e = {.events = ev, .data.ptr = c};
  epoll_ctl(s->ep, EPOLL_CTL_MOD, c->fd, &e);
  c->ep_events = ev;
}

static void pq_free(struct tc_derp_server *s, struct pq *q, bool count) {
  for (struct pkt *p = q->head, *nx; p; p = nx) {
    nx = p->next;
    if (count) s->m.drops_gone++;
    free(p);
  }
  q->head = q->tail = NULL;
  q->n = 0;
}

/* Queues PeerGone(key, reason) to c. */
static void send_peer_gone(struct tc_derp_server *s, struct client *c, const uint8_t key[32], uint8_t reason) {
  uint8_t b[33];
  memcpy(b, key, 32);
  b[32] = reason;
  ctrl_frame(c, TC_DERP_FRAME_PEER_GONE, b, 33);
  if (reason == TC_DERP_PEER_GONE_DISCONNECTED) s->m.peer_gone_disconnected++;
  else s->m.peer_gone_not_here++;
  mark_dirty(s, c);
}

/* Removes c from the key index; promotes the newest other connection with
 * the same key, or, if none, tells everyone c sent to that it is gone. */
static void unregister(struct tc_derp_server *s, struct client *c) {
  if (c->state != CS_OPEN) return;
  s->m.clients_connected--;
  if (c->preferred) s->m.clients_home--;
  if (!c->active) {
    s->m.clients_duplicate--;
    return;
  }
  c->active = false;
  struct client *best = NULL;
  for (struct client *o = s->clients; o; o = o->next)
    if (o != c && o->state == CS_OPEN && !memcmp(o->key, c->key, 32) && (!best || o->seq > best->seq)) best = o;
  if (best) {
    best->active = true;
    s->m.clients_duplicate--;
    kmap_put(&s->active, c->key, best);
    return;
  }
  kmap_del(&s->active, c->key);
  for (struct client *o = s->clients; o; o = o->next) {
    if (o == c || o->state != CS_OPEN) continue;
    if (kmap_del(&o->saw_src, c->key)) send_peer_gone(s, o, c->key, TC_DERP_PEER_GONE_DISCONNECTED);
  }
}

enum kill_why { K_CLOSED, K_STALL, K_TOOBIG, K_PROTO, K_ADMIN, K_HS };

static void kill_client(struct tc_derp_server *s, struct client *c, enum kill_why why, const char *msg) {
  if (c->state == CS_DEAD) return;
  if (msg) tc_debug("derp: closing %s: %s", c->peer, msg);
  switch (why) {
    case K_STALL: s->m.kills_write_stall++; break;
    case K_TOOBIG: s->m.kills_frame_too_big++; break;
    case K_PROTO: s->m.kills_protocol++; break;
    case K_ADMIN: s->m.kills_admin++; break;
    default: break;
  }
  if (c->state == CS_OPEN) {
    unregister(s, c);
  } else {
    s->m.clients_handshaking--;
    if (why != K_ADMIN) s->m.handshakes_failed++;
  }
  c->state = CS_DEAD;
  epoll_ctl(s->ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  c->fd = -1;
  pq_free(s, &c->q, true);
  pq_free(s, &c->dq, true);
  c->dead_next = s->dead;
  s->dead = c;
}

static void client_free(struct tc_derp_server *s, struct client *c) {
  if (c->prev) c->prev->next = c->next;
  else s->clients = c->next;
  if (c->next) c->next->prev = c->prev;
  s->nclients--;
  free(c->in);
  tc_buf_free(&c->out);
  tc_buf_free(&c->ctrl);
  kmap_free(&c->saw_src);
  free(c->ws_resp);
  tc_buf_free(&c->raw_out);
  tc_buf_free(&c->ws_raw);
  tc_buf_free(&c->ws_plain);
  free(c);
}

static int64_t keepalive_delay(struct tc_derp_server *s) {
  int64_t base = s->p.keepalive_ms;
  int64_t jitter = base / 12;
  return base + (jitter > 0 ? (int64_t)randombytes_uniform((uint32_t)jitter) : 0);
}

/* ---- WebSocket framing (RFC 6455, server side) ------------------------------ */

#define WS_MAX_PAYLOAD (TC_DERP_MAX_FRAME + 64)

static void ws_frame_header(struct tc_buf *b, uint8_t opcode, size_t n) {
  uint8_t h[10];
  size_t hl;
  h[0] = (uint8_t)(0x80 | opcode);
  if (n < 126) {
    h[1] = (uint8_t)n;
    hl = 2;
  } else if (n <= 0xffff) {
    h[1] = 126;
    h[2] = (uint8_t)(n >> 8);
    h[3] = (uint8_t)n;
    hl = 4;
  } else {
    h[1] = 127;
    for (int i = 0; i < 8; i++) h[2 + i] = (uint8_t)((uint64_t)n >> (56 - 8 * i));
    hl = 10;
  }
  tc_buf_append(b, h, hl);
}

/* Decodes every complete frame in ws_raw into ws_plain (data) or answers it
 * (ping -> pong). Returns -1 on a protocol violation or a close frame. */
static int ws_decode(struct client *c) {
  size_t off = 0;
  int rc = 0;
  const uint8_t *b = (const uint8_t *)c->ws_raw.data;
  while (c->ws_raw.len - off >= 2) {
    const uint8_t *h = b + off;
    size_t avail = c->ws_raw.len - off;
    uint8_t opcode = h[0] & 0x0f;
    bool fin = h[0] & 0x80;
    if (h[0] & 0x70 || !(h[1] & 0x80)) { /* no extensions; clients must mask */
      rc = -1;
      break;
    }
    uint64_t len = h[1] & 0x7f;
    size_t hl = 2;
    if (len == 126) {
      if (avail < 4) break;
      len = (uint64_t)h[2] << 8 | h[3];
      hl = 4;
    } else if (len == 127) {
      if (avail < 10) break;
      len = 0;
      for (int i = 0; i < 8; i++) len = len << 8 | h[2 + i];
      hl = 10;
    }
    if (len > WS_MAX_PAYLOAD || (opcode >= 8 && (len > 125 || !fin))) {
      rc = -1;
      break;
    }
    if (avail < hl + 4 + len) break;
    const uint8_t *mask = h + hl;
    uint8_t *payload = (uint8_t *)h + hl + 4;
    for (uint64_t i = 0; i < len; i++) payload[i] ^= mask[i & 3];
    off += hl + 4 + (size_t)len;
    switch (opcode) {
      case 0: /* continuation */
      case 2: /* binary */
        tc_buf_append(&c->ws_plain, payload, (size_t)len);
        break;
      case 9: /* ping -> pong with the same payload */
        ws_frame_header(&c->raw_out, 10, (size_t)len);
        tc_buf_append(&c->raw_out, payload, (size_t)len);
        break;
      case 10: break;
      default: /* close, text (DERP is binary only) or reserved */
        rc = -1;
        break;
    }
    if (rc) break;
  }
  tc_buf_consume(&c->ws_raw, off);
  return rc;
}

/* recv() for the DERP byte stream: plain, or decoded from WebSocket frames. */
static ssize_t conn_recv(struct client *c, void *buf, size_t len) {
  if (!c->ws) return recv(c->fd, buf, len, 0);
  for (;;) {
    size_t have = c->ws_plain.len - c->ws_plain_off;
    if (have) {
      size_t k = TC_MIN(have, len);
      memcpy(buf, c->ws_plain.data + c->ws_plain_off, k);
      c->ws_plain_off += k;
      if (c->ws_plain_off == c->ws_plain.len) {
        tc_buf_reset(&c->ws_plain);
        c->ws_plain_off = 0;
      }
      return (ssize_t)k;
    }
    if (ws_decode(c) != 0) {
      c->ws_bad = true;
      errno = EPROTO;
      return -1;
    }
    if (c->ws_plain.len) continue;
    uint8_t tmp[16384];
    ssize_t n = recv(c->fd, tmp, sizeof tmp, 0);
    if (n <= 0) return n;
    tc_buf_append(&c->ws_raw, tmp, (size_t)n);
  }
}

/* ---- writing -------------------------------------------------------------- */

static void fill_out(struct tc_derp_server *s, struct client *c) {
  tc_buf_reset(&c->out);
  c->out_off = 0;
  if (c->ctrl.len) {
    tc_buf_append(&c->out, c->ctrl.data, c->ctrl.len);
    tc_buf_reset(&c->ctrl);
  }
  if (c->pong_pending) {
    uint8_t h[5];
    put_header(h, TC_DERP_FRAME_PONG, 8);
    tc_buf_append(&c->out, h, 5);
    tc_buf_append(&c->out, c->pong, 8);
    c->pong_pending = false;
  }
  if (c->state != CS_OPEN) return;
  /* disco first: they are small and latency-sensitive */
  struct pq *qs[2] = {&c->dq, &c->q};
  for (int i = 0; i < 2; i++) {
    struct pq *q = qs[i];
    while (q->head && c->out.len < OUT_FILL) {
      struct pkt *p = q->head;
      q->head = p->next;
      if (!q->head) q->tail = NULL;
      q->n--;
      tc_buf_append(&c->out, p->data, p->len);
      free(p);
    }
  }
}

static void fill_out_framed(struct tc_derp_server *s, struct client *c) {
  fill_out(s, c);
  if (!c->ws || c->out.len == 0) return;
  struct tc_buf f = TC_BUF_INIT;
  ws_frame_header(&f, 2, c->out.len);
  tc_buf_append(&f, c->out.data, c->out.len);
  tc_buf_free(&c->out);
  c->out = f;
  c->out_off = 0;
}

static void flush(struct tc_derp_server *s, struct client *c) {
  if (c->state == CS_DEAD || c->state == CS_HEAD) return;
  for (int guard = 0; guard < 32; guard++) {
    if (c->out_off >= c->out.len && c->raw_out.len) {
      /* unframed bytes (the WebSocket 101, pongs) go out between frames */
      tc_buf_free(&c->out);
      c->out = c->raw_out;
      c->raw_out = (struct tc_buf)TC_BUF_INIT;
      c->out_off = 0;
    }
    if (c->out_off >= c->out.len) {
      fill_out_framed(s, c);
      if (c->out.len == 0) {
        c->stall_since = 0;
        break;
      }
    }
    ssize_t n = send(c->fd, c->out.data + c->out_off, c->out.len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      c->out_off += (size_t)n;
      c->stall_since = 0;
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      if (!c->stall_since) c->stall_since = tc_mono_ms();
      break;
    }
    kill_client(s, c, K_CLOSED, "write failed");
    return;
  }
  ep_update(s, c);
}

/* ---- frame handling -------------------------------------------------------- */

static void register_client(struct tc_derp_server *s, struct client *c) {
  struct client *prev = kmap_get(&s->active, c->key);
  if (prev) {
    /* newest connection with a key wins; the older one stays connected but
     * receives nothing until the newer one leaves */
    prev->active = false;
    s->m.clients_duplicate++;
  }
  kmap_put(&s->active, c->key, c);
  c->active = true;
  c->state = CS_OPEN;
  s->m.clients_handshaking--;
  s->m.clients_connected++;
  s->m.handshakes_ok++;
  c->next_keepalive = tc_mono_ms() + keepalive_delay(s);
  if (c->in_cap < IN_INITIAL) {
    c->in = tc_xrealloc(c->in, IN_INITIAL);
    c->in_cap = IN_INITIAL;
  }
}

static int handle_client_info(struct tc_derp_server *s, struct client *c, const uint8_t *p, size_t n) {
  uint8_t key[32];
  char *js = NULL;
  size_t jl = 0;
  if (tc_derp_open_client_info(s->priv, p, n, key, &js, &jl) != 0) {
    kill_client(s, c, K_PROTO, "ClientInfo box does not open");
    return -1;
  }
  json_error_t jerr;
  json_t *info = json_loadb(js, jl, JSON_DECODE_ANY, &jerr);
  bool ok = info && (json_is_object(info) || json_is_null(info));
  json_decref(info);
  free(js);
  if (!ok) {
    kill_client(s, c, K_PROTO, "ClientInfo JSON is not an object");
    return -1;
  }
  memcpy(c->key, key, 32);
  if (s->p.verify && !s->p.verify(s->p.verify_ctx, key)) {
    s->m.clients_rejected++;
    char hex[65];
    tc_hex_encode(key, 32, hex);
    tc_info("derp: refusing unknown node key %s from %s", hex, c->peer);
    kill_client(s, c, K_PROTO, NULL);
    return -1;
  }
  register_client(s, c);
  char json[160];
  if (s->rate_bps)
    snprintf(json, sizeof json, "{\"version\":%d,\"TokenBucketBytesPerSecond\":%llu,\"TokenBucketBytesBurst\":%llu}",
             TC_DERP_PROTOCOL_VERSION, (unsigned long long)s->rate_bps, (unsigned long long)s->rate_burst);
  else
    snprintf(json, sizeof json, "{\"version\":%d}", TC_DERP_PROTOCOL_VERSION);
  uint8_t nonce[24];
  randombytes_buf(nonce, sizeof nonce);
  if (tc_derp_server_info_frame(s->priv, key, nonce, json, &c->ctrl) != 0) {
    kill_client(s, c, K_PROTO, "unusable client key");
    return -1;
  }
  mark_dirty(s, c);
  return 0;
}

static bool peer_gone_allowed(struct client *c) {
  int64_t now = tc_mono_ms();
  c->pg_tokens += (double)(now - c->pg_at) / 1000.0;
  if (c->pg_tokens > 3) c->pg_tokens = 3;
  c->pg_at = now;
  if (c->pg_tokens < 1) return false;
  c->pg_tokens -= 1;
  return true;
}

static void handle_send_packet(struct tc_derp_server *s, struct client *c, const uint8_t *p, size_t n) {
  const uint8_t *dst_key = p;
  const uint8_t *body = p + 32;
  size_t blen = n - 32;
  s->m.packets_recv++;
  s->m.bytes_recv += blen;
  bool disco = tc_derp_looks_like_disco(body, blen);
  struct client *dst = kmap_get(&s->active, dst_key);
  if (!dst) {
    s->m.drops_unknown_dest++;
    if (disco && peer_gone_allowed(c)) send_peer_gone(s, c, dst_key, TC_DERP_PEER_GONE_NOT_HERE);
    return;
  }
  struct pkt *pk = tc_xmalloc(sizeof(*pk) + 5 + 32 + blen);
  pk->next = NULL;
  pk->len = (uint32_t)(5 + 32 + blen);
  put_header(pk->data, TC_DERP_FRAME_RECV_PACKET, (uint32_t)(32 + blen));
  memcpy(pk->data + 5, c->key, 32);
  memcpy(pk->data + 37, body, blen);
  struct pq *q = disco ? &dst->dq : &dst->q;
  if (q->n >= s->p.queue_depth) {
    struct pkt *old = q->head;
    q->head = old->next;
    if (!q->head) q->tail = NULL;
    q->n--;
    free(old);
    s->m.drops_queue_full++;
  }
  if (q->tail) q->tail->next = pk;
  else q->head = pk;
  q->tail = pk;
  q->n++;
  s->m.packets_relayed++;
  s->m.bytes_relayed += blen;
  if (!kmap_get(&dst->saw_src, c->key)) kmap_put(&dst->saw_src, c->key, dst);
  mark_dirty(s, dst);
}

/* Validates a frame header against the limits for the client's state.
 * Returns 1 to buffer the frame, 2 to skip it, -1 if the client was killed. */
static int check_header(struct tc_derp_server *s, struct client *c, uint8_t type, uint32_t len) {
  if (len > TC_DERP_MAX_FRAME) {
    kill_client(s, c, K_TOOBIG, "frame over 1 MiB");
    return -1;
  }
  if (c->state == CS_HANDSHAKE) {
    if (type != TC_DERP_FRAME_CLIENT_INFO) {
      kill_client(s, c, K_PROTO, "first frame is not ClientInfo");
      return -1;
    }
    if (len < TC_DERP_CLIENT_INFO_MIN || len > TC_DERP_CLIENT_INFO_MAX) {
      kill_client(s, c, K_TOOBIG, "ClientInfo size out of bounds");
      return -1;
    }
    return 1;
  }
  switch (type) {
    case TC_DERP_FRAME_SEND_PACKET:
      if (len < 32) {
        kill_client(s, c, K_PROTO, "short SendPacket");
        return -1;
      }
      if (len - 32 > TC_DERP_MAX_PACKET) {
        kill_client(s, c, K_TOOBIG, "packet over 64 KiB");
        return -1;
      }
      return 1;
    case TC_DERP_FRAME_PING:
      if (len < 8 || len > 1000) {
        kill_client(s, c, K_PROTO, "bad ping size");
        return -1;
      }
      return 1;
    case TC_DERP_FRAME_NOTE_PREFERRED:
      if (len != 1) {
        kill_client(s, c, K_PROTO, "bad NotePreferred size");
        return -1;
      }
      return 1;
    case TC_DERP_FRAME_FORWARD_PACKET:
    case TC_DERP_FRAME_WATCH_CONNS:
    case TC_DERP_FRAME_CLOSE_PEER:
      /* mesh frames need the mesh key, which this server does not have */
      kill_client(s, c, K_PROTO, "mesh frame without mesh permission");
      return -1;
    default:
      return 2;
  }
}

static void charge(struct tc_derp_server *s, struct client *c, uint32_t len) {
  if (!s->rate_bps) return;
  int64_t now = tc_mono_ms();
  c->tokens += (double)(now - c->tokens_at) * (double)s->rate_bps / 1000.0;
  if (c->tokens > (double)s->rate_burst) c->tokens = (double)s->rate_burst;
  c->tokens_at = now;
  c->tokens -= (double)TC_MIN(len, (uint32_t)MIN_BURST);
  if (c->tokens < 0) {
    int64_t wait = (int64_t)(-c->tokens * 1000.0 / (double)s->rate_bps) + 1;
    c->throttled_until = now + wait;
    s->m.rate_limited++;
  }
}

static void process_frame(struct tc_derp_server *s, struct client *c, uint8_t type, const uint8_t *p, uint32_t n) {
  if (c->state == CS_HANDSHAKE) {
    handle_client_info(s, c, p, n);
    return;
  }
  switch (type) {
    case TC_DERP_FRAME_SEND_PACKET: handle_send_packet(s, c, p, n); break;
    case TC_DERP_FRAME_PING:
      s->m.pings++;
      /* like Go: one pending pong; a client pinging faster is ignored */
      if (!c->pong_pending) {
        memcpy(c->pong, p, 8);
        c->pong_pending = true;
        mark_dirty(s, c);
      }
      break;
    case TC_DERP_FRAME_NOTE_PREFERRED: {
      bool v = p[0] != 0;
      if (v != c->preferred) {
        if (v) s->m.clients_home++;
        else s->m.clients_home--;
        c->preferred = v;
      }
      break;
    }
    default: break;
  }
}

/* Parses every complete frame in c->in. */
static void parse_input(struct tc_derp_server *s, struct client *c) {
  size_t off = 0;
  while (c->state == CS_HANDSHAKE || c->state == CS_OPEN) {
    if (c->throttled_until > tc_mono_ms()) break;
    size_t avail = c->in_len - off;
    if (avail < 5) break;
    const uint8_t *h = c->in + off;
    uint8_t type = h[0];
    uint32_t len = (uint32_t)h[1] << 24 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 8 | h[4];
    int what = check_header(s, c, type, len);
    if (what < 0) return;
    if (what == 2) {
      /* skip by length, without buffering more than what already arrived */
      size_t have = TC_MIN((size_t)len, avail - 5);
      off += 5 + have;
      c->skip_left = len - have;
      charge(s, c, len);
      if (c->skip_left) break;
      continue;
    }
    if (avail < 5 + (size_t)len) {
      if (c->in_cap < 5 + (size_t)len) {
        /* only ClientInfo can need more than the initial buffer */
        size_t need = 5 + (size_t)len;
        memmove(c->in, c->in + off, avail);
        c->in_len = avail;
        off = 0;
        c->in = tc_xrealloc(c->in, need);
        c->in_cap = need;
      }
      break;
    }
    charge(s, c, len);
    process_frame(s, c, type, h + 5, len);
    off += 5 + (size_t)len;
  }
  if (c->state == CS_DEAD) return;
  if (off) {
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
  }
  /* shrink back after a large ClientInfo */
  if (c->state == CS_OPEN && c->in_cap > IN_INITIAL && c->in_len <= IN_INITIAL) {
    c->in = tc_xrealloc(c->in, IN_INITIAL);
    c->in_cap = IN_INITIAL;
  }
}

/* The request head is consumed: queue the 101 (unless fast start) and the
 * ServerKey frame. */
static void start_handshake(struct tc_derp_server *s, struct client *c) {
  if (c->ws) {
    tc_buf_puts(&c->raw_out, c->ws_resp);
  } else if (!c->fast_start) {
    char hex[65];
    tc_hex_encode(s->pub, 32, hex);
    tc_buf_printf(&c->ctrl,
                  "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                  "Derp-Version: %d\r\nDerp-Public-Key: %s\r\n\r\n",
                  TC_DERP_PROTOCOL_VERSION, hex);
  }
  uint8_t sk[45];
  tc_derp_server_key_frame(s->pub, sk);
  tc_buf_append(&c->ctrl, sk, sizeof sk);
  c->state = CS_HANDSHAKE;
  mark_dirty(s, c);
}

static void on_readable(struct tc_derp_server *s, struct client *c) {
  size_t budget = READ_BUDGET;
  uint8_t scratch[16384];
  while (budget && c->state != CS_DEAD) {
    if (c->throttled_until > tc_mono_ms()) break;
    ssize_t n;
    if (c->discard_left || c->skip_left) {
      size_t want = c->discard_left ? c->discard_left : (size_t)TC_MIN(c->skip_left, (uint64_t)sizeof scratch);
      want = TC_MIN(want, sizeof scratch);
      /* the request head is never WebSocket-framed */
      n = c->discard_left ? recv(c->fd, scratch, want, 0) : conn_recv(c, scratch, want);
      if (n > 0) {
        if (c->discard_left) {
          c->discard_left -= (size_t)n;
          if (!c->discard_left) {
            /* head consumed: now the response (unless fast start) and ServerKey */
            start_handshake(s, c);
          }
        } else {
          c->skip_left -= (uint64_t)n;
        }
        budget -= TC_MIN(budget, (size_t)n);
        continue;
      }
    } else {
      if (c->in_len == c->in_cap) break; /* cannot happen: frames are bounded by in_cap */
      n = conn_recv(c, c->in + c->in_len, c->in_cap - c->in_len);
      if (n > 0) {
        c->in_len += (size_t)n;
        budget -= TC_MIN(budget, (size_t)n);
        parse_input(s, c);
        continue;
      }
    }
    if (n == 0) {
      kill_client(s, c, K_CLOSED, "peer closed");
      return;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    if (errno == EINTR) continue;
    if (c->ws_bad) kill_client(s, c, K_PROTO, "WebSocket protocol violation or close");
    else kill_client(s, c, K_CLOSED, "read failed");
    return;
  }
  if (c->state == CS_DEAD) return;
  /* decoded WebSocket bytes or pongs are invisible to epoll */
  if (c->ws && (c->ws_plain.len > c->ws_plain_off || c->ws_raw.len) && !c->again &&
      c->throttled_until <= tc_mono_ms()) {
    c->again = true;
    c->again_next = s->again;
    s->again = c;
  }
  if (c->raw_out.len) mark_dirty(s, c);
  ep_update(s, c);
}

/* ---- the thread --------------------------------------------------------- */

static void sweep(struct tc_derp_server *s) {
  int64_t now = tc_mono_ms();
  for (struct client *c = s->clients; c; c = c->next) {
    if (c->state == CS_DEAD) continue;
    if ((c->state == CS_HEAD || c->state == CS_HANDSHAKE) && now >= c->hs_deadline) {
      kill_client(s, c, K_HS, "handshake timeout");
      continue;
    }
    if (c->stall_since && now - c->stall_since > s->p.write_timeout_ms) {
      kill_client(s, c, K_STALL, "write stalled");
      continue;
    }
    if (c->state == CS_OPEN && now >= c->next_keepalive) {
      ctrl_frame(c, TC_DERP_FRAME_KEEP_ALIVE, NULL, 0);
      s->m.keepalives_sent++;
      c->next_keepalive = now + keepalive_delay(s);
      mark_dirty(s, c);
    }
    if (c->throttled_until && c->throttled_until <= now) {
      c->throttled_until = 0;
      parse_input(s, c);
      if (c->state != CS_DEAD) {
        ep_update(s, c);
        on_readable(s, c);
      }
    }
  }
}

static void flush_dirty(struct tc_derp_server *s) {
  while (s->dirty) {
    struct client *c = s->dirty;
    s->dirty = c->dirty_next;
    c->dirty = false;
    flush(s, c);
  }
}

static void free_dead(struct tc_derp_server *s) {
  /* a dead client may still sit on the again list: unlink it first */
  for (struct client **pp = &s->again; *pp;) {
    if ((*pp)->state == CS_DEAD) *pp = (*pp)->again_next;
    else pp = &(*pp)->again_next;
  }
  while (s->dead) {
    struct client *c = s->dead;
    s->dead = c->dead_next;
    client_free(s, c);
  }
}

static void *derp_thread(void *arg) {
  struct tc_derp_server *s = arg;
  struct epoll_event evs[128];
  int64_t next_sweep = tc_mono_ms() + 100;
  for (;;) {
    pthread_mutex_lock(&s->mu);
    bool pending_again = s->again != NULL;
    pthread_mutex_unlock(&s->mu);
    int n = epoll_wait(s->ep, evs, 128, pending_again ? 0 : 100);
    pthread_mutex_lock(&s->mu);
    if (s->stop) {
      pthread_mutex_unlock(&s->mu);
      break;
    }
    struct client *ag = s->again;
    s->again = NULL;
    while (ag) {
      struct client *c = ag;
      ag = c->again_next;
      c->again = false;
      if (c->state != CS_DEAD) on_readable(s, c);
    }
    for (int i = 0; i < n; i++) {
      struct client *c = evs[i].data.ptr;
      if (!c) {
        uint64_t v;
        ssize_t r = read(s->wake_fd, &v, sizeof v);
        (void)r;
        continue;
      }
      if (c->state == CS_DEAD) continue;
      if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(s, c);
      if (c->state != CS_DEAD && (evs[i].events & EPOLLOUT)) flush(s, c);
    }
    int64_t now = tc_mono_ms();
    if (now >= next_sweep) {
      sweep(s);
      next_sweep = now + 100;
    }
    flush_dirty(s);
    free_dead(s);
    pthread_mutex_unlock(&s->mu);
  }
  return NULL;
}

/* ---- public API ------------------------------------------------------------- */

int tc_derp_server_new(const struct tc_derp_server_params *p, struct tc_derp_server **out, struct tc_err *err) {
  *out = NULL;
  if (sodium_init() < 0) return tc_err_set(err, TC_EINTERNAL, "derp: libsodium init failed");
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, init_hash_key);
  struct tc_derp_server *s = tc_xcalloc(1, sizeof(*s));
  int rc = 0;
  s->p = *p;
  s->ep = s->wake_fd = -1;
  pthread_mutex_init(&s->mu, NULL);
  if (s->p.queue_depth <= 0) s->p.queue_depth = 32;
  if (s->p.write_timeout_ms <= 0) s->p.write_timeout_ms = 2000;
  if (s->p.handshake_timeout_ms <= 0) s->p.handshake_timeout_ms = 10000;
  if (s->p.keepalive_ms <= 0) s->p.keepalive_ms = 60000;
  if (s->p.max_clients == 0) s->p.max_clients = 100000;
  if (p->private_key) {
    memcpy(s->priv, p->private_key, 32);
  } else if ((rc = tc_derp_load_or_create_key(p->private_key_path, s->priv, err)) != 0) {
    goto fail;
  }
  crypto_scalarmult_base(s->pub, s->priv);
  tc_derp_server_set_rate_limit(s, p->rate_bytes_per_sec, p->rate_burst_bytes);
  s->ep = epoll_create1(EPOLL_CLOEXEC);
  s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (s->ep < 0 || s->wake_fd < 0) {
    rc = tc_err_set(err, TC_EIO, "derp: epoll/eventfd: %s", strerror(errno));
    goto fail;
  }
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(s->ep, EPOLL_CTL_ADD, s->wake_fd, &ev);
  if (pthread_create(&s->thr, NULL, derp_thread, s) != 0) {
    rc = tc_err_set(err, TC_EINTERNAL, "derp: cannot start thread");
    goto fail;
  }
  pthread_getcpuclockid(s->thr, &s->thr_clock);
  s->started = true;
  *out = s;
  return 0;
fail:
  tc_derp_server_free(s);
  return rc;
}

void tc_derp_server_public_key(const struct tc_derp_server *s, uint8_t out[32]) { memcpy(out, s->pub, 32); }

static int accept_conn(struct tc_derp_server *s, int fd, const char *peer, size_t discard, bool fast_start,
                       char *ws_resp) {
  set_nonblock(fd);
  pthread_mutex_lock(&s->mu);
  s->m.accepts++;
  if (s->stop || s->nclients >= s->p.max_clients) {
    pthread_mutex_unlock(&s->mu);
    close(fd);
    free(ws_resp);
    return TC_EAGAIN;
  }
  struct client *c = tc_xcalloc(1, sizeof(*c));
  c->fd = fd;
  c->seq = ++s->next_seq;
  snprintf(c->peer, sizeof c->peer, "%s", peer ? peer : "");
  /* small until the client is admitted: unauthenticated connections should
   * cost little memory */
  c->in_cap = IN_HANDSHAKE;
  c->in = tc_xmalloc(c->in_cap);
  c->fast_start = fast_start;
  c->ws = ws_resp != NULL;
  c->ws_resp = ws_resp;
  c->hs_deadline = tc_mono_ms() + s->p.handshake_timeout_ms;
  c->tokens = (double)s->rate_burst;
  c->tokens_at = tc_mono_ms();
  c->pg_tokens = 3;
  c->pg_at = c->tokens_at;
  c->state = CS_HEAD;
  c->discard_left = discard;
  c->next = s->clients;
  if (s->clients) s->clients->prev = c;
  s->clients = c;
  s->nclients++;
  s->m.clients_handshaking++;
  if (discard == 0) start_handshake(s, c); /* nothing to discard */
  c->ep_events = EPOLLIN;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
  if (epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
    kill_client(s, c, K_CLOSED, "epoll add failed");
  }
  /* wake before unlocking: once the lock is released the server thread may
   * finish this client's handshake, and the client's owner may then free the
   * server while this thread would still touch it */
  wake(s);
  pthread_mutex_unlock(&s->mu);
  return 0;
}

int tc_derp_server_accept(struct tc_derp_server *s, int fd, const char *peer, size_t discard, bool fast_start) {
  return accept_conn(s, fd, peer, discard, fast_start, NULL);
}

static const char *head_get(const struct tc_http_head *h, const char *name) {
  for (size_t i = 0; i < h->nheaders && i < TC_HTTP_HEADERS_MAX; i++)
    if (h->headers[i].name && tc_strieq(h->headers[i].name, name)) return h->headers[i].value;
  return NULL;
}

/* Writes a short error response on a refused upgrade. The head is read
 * first so the close does not turn into a reset that eats the response. */
static void refuse(int fd, const struct tc_http_head *head, int status, const char *reason, const char *body) {
  struct timeval tv = {.tv_sec = 1};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  char buf[4096];
  size_t left = head->head_len;
  while (left) {
    ssize_t n = recv(fd, buf, TC_MIN(left, sizeof buf), 0);
    if (n <= 0) break;
    left -= (size_t)n;
  }
  char resp[512];
  int n = snprintf(resp, sizeof resp,
                   "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %zu\r\n"
                   "Connection: close\r\n\r\n%s",
                   status, reason, strlen(body), body);
  ssize_t w = send(fd, resp, (size_t)n, MSG_NOSIGNAL);
  (void)w;
  shutdown(fd, SHUT_WR);
  close(fd);
}

void tc_derp_upgrade(void *ctx, int fd, const struct tc_http_head *head) {
  struct tc_derp_server *s = ctx;
  const char *up = head_get(head, "Upgrade");
  if (up && tc_strieq(up, "websocket")) {
    const char *proto = head_get(head, "Sec-WebSocket-Protocol");
    if (proto && strstr(proto, "derp")) {
      const char *key = head_get(head, "Sec-WebSocket-Key");
      uint8_t raw[32];
      size_t rawlen = 0;
      if (!key || strlen(key) > 40 ||
          sodium_base642bin(raw, sizeof raw, key, strlen(key), NULL, &rawlen, NULL, sodium_base64_VARIANT_ORIGINAL) ||
          rawlen != 16) {
        refuse(fd, head, 400, "Bad Request", "bad Sec-WebSocket-Key");
        return;
      }
      /* RFC 6455 §4.2.2: accept = base64(SHA-1(key ‖ GUID)) */
      char cat[128];
      snprintf(cat, sizeof cat, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
      uint8_t sha[20];
      mbedtls_sha1_ret((const unsigned char *)cat, strlen(cat), sha);
      char acc[64];
      sodium_bin2base64(acc, sizeof acc, sha, sizeof sha, sodium_base64_VARIANT_ORIGINAL);
      char *resp = tc_xasprintf("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                "Sec-WebSocket-Accept: %s\r\nSec-WebSocket-Protocol: derp\r\n\r\n",
                                acc);
      accept_conn(s, fd, head->peer, head->head_len, false, resp);
      return;
    }
  }
  if (!up || !tc_strieq(up, "derp")) {
    refuse(fd, head, 426, "Upgrade Required", "DERP requires connection upgrade");
    return;
  }
  const char *fs = head_get(head, "Derp-Fast-Start");
  tc_derp_server_accept(s, fd, head->peer, head->head_len, fs && !strcmp(fs, "1"));
}

int tc_derp_server_disconnect_key(struct tc_derp_server *s, const uint8_t node_key[32]) {
  int n = 0;
  pthread_mutex_lock(&s->mu);
  for (struct client *c = s->clients; c; c = c->next) {
    if (c->state == CS_OPEN && !memcmp(c->key, node_key, 32)) {
      kill_client(s, c, K_ADMIN, "node key disconnected by the server");
      n++;
    }
  }
  if (n) wake(s);
  pthread_mutex_unlock(&s->mu);
  return n;
}

int tc_derp_server_send_health(struct tc_derp_server *s, const uint8_t *node_key, const char *text) {
  size_t tl = text ? strlen(text) : 0;
  if (tl > 4096) return TC_ETOOBIG;
  int n = 0;
  pthread_mutex_lock(&s->mu);
  for (struct client *c = s->clients; c; c = c->next) {
    if (c->state != CS_OPEN || (node_key && memcmp(c->key, node_key, 32))) continue;
    ctrl_frame(c, TC_DERP_FRAME_HEALTH, text, tl);
    mark_dirty(s, c);
    n++;
  }
  pthread_mutex_unlock(&s->mu);
  wake(s);
  return n;
}

void tc_derp_server_send_restarting(struct tc_derp_server *s, uint32_t reconnect_in_ms, uint32_t try_for_ms) {
  uint8_t b[8] = {(uint8_t)(reconnect_in_ms >> 24), (uint8_t)(reconnect_in_ms >> 16),
                  (uint8_t)(reconnect_in_ms >> 8),  (uint8_t)reconnect_in_ms,
                  (uint8_t)(try_for_ms >> 24),      (uint8_t)(try_for_ms >> 16),
                  (uint8_t)(try_for_ms >> 8),       (uint8_t)try_for_ms};
  pthread_mutex_lock(&s->mu);
  for (struct client *c = s->clients; c; c = c->next) {
    if (c->state != CS_OPEN) continue;
    ctrl_frame(c, TC_DERP_FRAME_RESTARTING, b, 8);
    mark_dirty(s, c);
  }
  pthread_mutex_unlock(&s->mu);
  wake(s);
}

void tc_derp_server_set_rate_limit(struct tc_derp_server *s, uint64_t bytes_per_sec, uint64_t burst) {
  pthread_mutex_lock(&s->mu);
  s->rate_bps = bytes_per_sec;
  s->rate_burst = bytes_per_sec ? TC_MAX(burst, (uint64_t)MIN_BURST) : 0;
  for (struct client *c = s->clients; c; c = c->next) {
    c->tokens = (double)s->rate_burst;
    c->tokens_at = tc_mono_ms();
  }
  pthread_mutex_unlock(&s->mu);
}

void tc_derp_server_get_metrics(struct tc_derp_server *s, struct tc_derp_metrics *out) {
  pthread_mutex_lock(&s->mu);
  *out = s->m;
  pthread_mutex_unlock(&s->mu);
}

int64_t tc_derp_server_thread_cpu_ns(struct tc_derp_server *s) {
  struct timespec ts;
  if (!s->started || clock_gettime(s->thr_clock, &ts) != 0) return -1;
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void tc_derp_server_shutdown(struct tc_derp_server *s, uint32_t restart_hint_ms, int flush_ms) {
  if (!s) return;
  if (s->started && restart_hint_ms) tc_derp_server_send_restarting(s, restart_hint_ms, restart_hint_ms * 10);
  if (s->started && flush_ms > 0) {
    int64_t end = tc_mono_ms() + flush_ms;
    for (;;) {
      bool pending = false;
      pthread_mutex_lock(&s->mu);
      for (struct client *c = s->clients; c && !pending; c = c->next)
        if (c->state != CS_DEAD && (c->ctrl.len || c->out_off < c->out.len)) pending = true;
      pthread_mutex_unlock(&s->mu);
      if (!pending || tc_mono_ms() >= end) break;
      struct timespec ts = {0, 10 * 1000000};
      nanosleep(&ts, NULL);
    }
  }
  tc_derp_server_free(s);
}

void tc_derp_server_free(struct tc_derp_server *s) {
  if (!s) return;
  if (s->started) {
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_mutex_unlock(&s->mu);
    wake(s);
    pthread_join(s->thr, NULL);
  }
  for (struct client *c = s->clients; c; c = c->next) {
    if (c->state == CS_DEAD) continue;
    if (c->fd >= 0) close(c->fd);
    pq_free(s, &c->q, false);
    pq_free(s, &c->dq, false);
    c->state = CS_DEAD;
  }
  while (s->clients) client_free(s, s->clients);
  kmap_free(&s->active);
  if (s->ep >= 0) close(s->ep);
  if (s->wake_fd >= 0) close(s->wake_fd);
  pthread_mutex_destroy(&s->mu);
  tc_wipe(s->priv, sizeof s->priv);
  free(s);
}
