/* chunks: multi-frame map messages and the cache of compressed peer-list
 * chunks that full maps share (see mapper.h). Compressing the whole peer
 * list per recipient was most of a full map's cost (~1.3 us per peer at
 * level 1); a chunk is compressed once per change of one of its nodes and
 * its bytes are copied into every recipient's message. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "mapper/mapper_int.h"

#define ZSTD_LEVEL 1
#define MAX_VARIANTS 4 /* distinct peer runs cached per segment (views that differ under a policy) */
#define MIN_RUN 4      /* shorter runs compress badly on their own: per-recipient text */

/* ---- zstd -------------------------------------------------------------------------- */

static pthread_key_t cctx_key;
static pthread_once_t cctx_once = PTHREAD_ONCE_INIT;
static void cctx_free(void *p) { ZSTD_freeCCtx(p); }
static void cctx_init(void) { pthread_key_create(&cctx_key, cctx_free); }

void tc_mapper_zstd(const void *src, size_t len, struct tc_buf *out) {
  /* One compression context per thread: creating one per message costs more
   * than compressing a small delta. Freed at thread exit. */
  static __thread ZSTD_CCtx *cctx;
  if (!cctx) {
    cctx = ZSTD_createCCtx();
    if (!cctx) abort();
    pthread_once(&cctx_once, cctx_init);
    pthread_setspecific(cctx_key, cctx);
  }
  size_t bound = ZSTD_compressBound(len);
  tc_buf_reserve(out, bound + 1);
  size_t z = ZSTD_compressCCtx(cctx, out->data + out->len, bound, src, len, ZSTD_LEVEL);
  if (ZSTD_isError(z)) abort(); /* only possible on a bound bug or OOM */
  out->len += z;
  out->data[out->len] = 0;
}

/* A cached frame keeps only its bytes: compressing reserves the input's
 * bound (~6x a chunk's compressed size), which stayed resident per chunk
 * (~1.8 MiB at N = 1000). */
static void shrink(struct tc_buf *b) {
  b->data = tc_xrealloc(b->data, b->len + 1);
  b->cap = b->len + 1;
}

/* ---- messages ---------------------------------------------------------------------- */

void tc_mapper_msg_init(struct tc_mapper_msg *m) {
  m->frames = (struct tc_buf)TC_BUF_INIT;
  m->text = (struct tc_buf)TC_BUF_INIT;
  tc_buf_append(&m->frames, "\0\0\0\0", 4);
}

void tc_mapper_msg_free(struct tc_mapper_msg *m) {
  if (!m) return;
  tc_buf_free(&m->frames);
  tc_buf_free(&m->text);
}

static void msg_flush(struct tc_mapper_msg *m) {
  if (!m->text.len) return;
  tc_mapper_zstd(m->text.data, m->text.len, &m->frames);
  m->text.len = 0;
}

void tc_mapper_msg_zframes(struct tc_mapper_msg *m, const void *z, size_t len) {
  msg_flush(m);
  tc_buf_append(&m->frames, z, len);
}

void tc_mapper_msg_finish(struct tc_mapper_msg *m, struct tc_buf *out) {
  /* an empty message still gets one frame: the decoder wants at least one */
  if (m->text.len || m->frames.len == 4) tc_mapper_zstd(m->text.data ? m->text.data : "", m->text.len, &m->frames);
  size_t n = m->frames.len - 4;
  uint8_t *p = (uint8_t *)m->frames.data;
  p[0] = (uint8_t)n, p[1] = (uint8_t)(n >> 8), p[2] = (uint8_t)(n >> 16), p[3] = (uint8_t)(n >> 24);
  if (!out->data) {
    *out = m->frames; /* adopt: the common case is a fresh buffer */
    m->frames = (struct tc_buf)TC_BUF_INIT;
  } else {
    tc_buf_append(out, m->frames.data, m->frames.len);
  }
  tc_mapper_msg_free(m);
}

void tc_mapper_frame(const char *json, size_t len, struct tc_buf *out) {
  size_t at = out->len;
  tc_buf_append(out, "\0\0\0\0", 4);
  tc_mapper_zstd(json, len, out);
  size_t n = out->len - at - 4;
  uint8_t *p = (uint8_t *)out->data + at;
  p[0] = (uint8_t)n, p[1] = (uint8_t)(n >> 8), p[2] = (uint8_t)(n >> 16), p[3] = (uint8_t)(n >> 24);
}

/* ---- id lists ------------------------------------------------------------------------ */

void tc_mapper_idv_push(struct tc_mapper_idv *v, int64_t id) {
  if (v->n && v->v[v->n - 1] == id) return; /* runs of one owner are the common case */
  if (v->n == v->cap) {
    v->cap = v->cap ? v->cap * 2 : 16;
    v->v = tc_xrealloc(v->v, v->cap * sizeof *v->v);
  }
  v->v[v->n++] = id;
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

void tc_mapper_idv_sort_unique(struct tc_mapper_idv *v) {
  if (v->n < 2) return;
  qsort(v->v, v->n, sizeof *v->v, cmp_i64);
  size_t m = 1;
  for (size_t i = 1; i < v->n; i++)
    if (v->v[i] != v->v[m - 1]) v->v[m++] = v->v[i];
  v->n = m;
}

void tc_mapper_idv_free(struct tc_mapper_idv *v) {
  if (!v) return;
  free(v->v);
  memset(v, 0, sizeof *v);
}

/* ---- chunk cache ------------------------------------------------------------------------ */

/* One compressed run of peers. It stays right while no member changed (a
 * change drops the whole segment's variants) and while the members' Expired
 * flags, which depend on the clock, are what they were when it was built:
 * valid for valid_from <= now < valid_until. */
struct variant {
  bool comma; /* starts with ',' (not the first run of its message) */
  int64_t valid_from, valid_until;
  size_t n;
  int64_t *ids;
  struct tc_mapper_idv users; /* owners (sorted, distinct) */
  bool tagged;
  struct tc_buf z; /* one zstd frame */
  uint64_t used;   /* LRU tick */
};

struct seg {
  int64_t lo; /* first id of the segment; the next segment's lo ends it */
  struct variant *v[MAX_VARIANTS];
  size_t nv;
};

struct tc_mapper_chunks {
  size_t target;
  /* Finer segments (target / 4) for a segment that cannot be shared whole
   * (it holds the viewer, or a peer encoded for this viewer): only the fine
   * segment holding that one is then private. Fine frames compress worse
   * (each frame starts without history), so only these use them. */
  struct tc_mapper_chunks *fine;
  struct seg *segs;
  size_t nsegs;
  bool laid_out;
  uint64_t layout_seq;
  uint64_t tick;
  uint64_t hits, builds, text_peers, drops;
};

static void variant_free(struct variant *v) {
  if (!v) return;
  free(v->ids);
  tc_mapper_idv_free(&v->users);
  tc_buf_free(&v->z);
  free(v);
}

static void seg_drop(struct tc_mapper_chunks *c, struct seg *s) {
  for (size_t i = 0; i < s->nv; i++) variant_free(s->v[i]);
  c->drops += s->nv;
  s->nv = 0;
}

static struct tc_mapper_chunks *chunks_new(size_t target, bool with_fine) {
  struct tc_mapper_chunks *c = tc_xcalloc(1, sizeof *c);
  c->target = target < 2 ? 2 : target;
  if (with_fine && c->target >= 16) c->fine = chunks_new(c->target / 4, false); /* two levels only */
  c->nsegs = 1;
  c->segs = tc_xcalloc(1, sizeof *c->segs);
  c->segs[0].lo = INT64_MIN;
  return c;
}

struct tc_mapper_chunks *tc_mapper_chunks_new(size_t target) { return chunks_new(target, true); }

void tc_mapper_chunks_free(struct tc_mapper_chunks *c) {
  if (!c) return;
  tc_mapper_chunks_free(c->fine);
  for (size_t i = 0; i < c->nsegs; i++) seg_drop(c, &c->segs[i]);
  free(c->segs);
  free(c);
}

/* Index of the segment holding id. */
static size_t seg_of(const struct tc_mapper_chunks *c, int64_t id) {
  size_t lo = 0, hi = c->nsegs; /* segs[0].lo is INT64_MIN */
  while (hi - lo > 1) {
    size_t mid = (lo + hi) / 2;
    if (c->segs[mid].lo <= id) lo = mid;
    else hi = mid;
  }
  return lo;
}

void tc_mapper_chunks_touch(struct tc_mapper_chunks *c, int64_t node_id) {
  if (!c) return;
  seg_drop(c, &c->segs[seg_of(c, node_id)]);
  tc_mapper_chunks_touch(c->fine, node_id);
}

void tc_mapper_chunks_reset(struct tc_mapper_chunks *c) {
  if (!c) return;
  tc_mapper_chunks_reset(c->fine);
  for (size_t i = 0; i < c->nsegs; i++) seg_drop(c, &c->segs[i]);
}

static bool is_forced(const struct seg *forced, size_t nforced, int64_t lo) {
  size_t a = 0, b = nforced;
  while (a < b) {
    size_t mid = (a + b) / 2;
    if (forced[mid].lo == lo) return true;
    if (forced[mid].lo < lo) a = mid + 1;
    else b = mid;
  }
  return false;
}

/* forced: the coarse level's segments, whose boundaries the fine level
 * keeps too (a coarse segment then splits into whole fine segments, and a
 * viewer's run never cuts a fine segment in two). */
static void layout_level(struct tc_mapper_chunks *c, const struct tc_node *const *nodes, size_t n,
                         const struct seg *forced, size_t nforced) {
  size_t T = c->target;
  for (size_t f = 1; f < nforced; f++) {
    size_t s = seg_of(c, forced[f].lo);
    if (c->segs[s].lo == forced[f].lo) continue;
    seg_drop(c, &c->segs[s]);
    c->segs = tc_xrealloc(c->segs, (c->nsegs + 1) * sizeof *c->segs);
    memmove(&c->segs[s + 2], &c->segs[s + 1], (c->nsegs - s - 1) * sizeof *c->segs);
    c->segs[s + 1] = (struct seg){.lo = forced[f].lo};
    c->nsegs++;
  }
  /* members of each segment: start index into nodes and count */
  size_t *start = tc_xcalloc(c->nsegs + 1, sizeof *start);
  for (size_t s = 0, k = 0; s < c->nsegs; s++) {
    start[s] = k;
    int64_t hi = s + 1 < c->nsegs ? c->segs[s + 1].lo : INT64_MAX;
    while (k < n && nodes[k]->id < hi) k++;
    start[s + 1] = k;
  }
  struct seg *ns = NULL;
  size_t nn = 0, cap = 0;
#define PUSH(seg_)                                             \
  do {                                                         \
    if (nn == cap) {                                           \
      cap = cap ? cap * 2 : 16;                                \
      ns = tc_xrealloc(ns, cap * sizeof *ns);                  \
    }                                                          \
    ns[nn++] = (seg_);                                         \
  } while (0)
  for (size_t i = 0; i < c->nsegs;) {
    size_t cnt = start[i + 1] - start[i], j = i + 1;
    /* a segment thinned out by removals joins its successor */
    while (cnt < T / 2 && j < c->nsegs && cnt + (start[j + 1] - start[j]) <= 2 * T &&
           !is_forced(forced, nforced, c->segs[j].lo)) {
      cnt += start[j + 1] - start[j];
      j++;
    }
    if (j > i + 1) {
      for (size_t q = i; q < j; q++) seg_drop(c, &c->segs[q]);
      PUSH(((struct seg){.lo = c->segs[i].lo}));
    } else if (cnt > 2 * T) {
      /* grown by joins: cut into pieces of target..2*target */
      seg_drop(c, &c->segs[i]);
      size_t pieces = cnt / T, at = start[i];
      for (size_t p = 0; p < pieces; p++) {
        size_t sz = cnt / pieces + (p < cnt % pieces);
        PUSH(((struct seg){.lo = p ? nodes[at]->id : c->segs[i].lo}));
        at += sz;
      }
    } else {
      PUSH(c->segs[i]); /* unchanged: keeps its chunks */
    }
    i = j;
  }
#undef PUSH
  free(start);
  free(c->segs);
  c->segs = ns;
  c->nsegs = nn;
}

void tc_mapper_chunks_layout(struct tc_mapper_chunks *c, const struct tc_node *const *nodes, size_t n, uint64_t seq) {
  if (!c || (c->laid_out && c->layout_seq == seq)) return;
  c->laid_out = true;
  c->layout_seq = seq;
  layout_level(c, nodes, n, NULL, 0);
  if (c->fine) {
    c->fine->laid_out = true;
    c->fine->layout_seq = seq;
    layout_level(c->fine, nodes, n, c->segs, c->nsegs);
  }
}

static bool variant_matches(const struct variant *v, const struct tc_node *const *nodes, size_t n, bool comma,
                            int64_t now) {
  if (v->comma != comma || v->n != n || now < v->valid_from || now >= v->valid_until) return false;
  for (size_t i = 0; i < n; i++)
    if (v->ids[i] != nodes[i]->id) return false;
  return true;
}

static void owner(const struct tc_node *n, struct tc_mapper_idv *users, bool *tagged) {
  if (n->tags.n) *tagged = true;
  else if (n->user_id > 0) tc_mapper_idv_push(users, n->user_id);
}

/* Compresses peers [k, k+n) into a new variant of segment s. */
static struct variant *build(struct tc_mapper_chunks *c, struct seg *s, const struct tc_mapper_chunk_peers *p,
                             size_t k, size_t n, bool comma) {
  struct variant *v = tc_xcalloc(1, sizeof *v);
  v->comma = comma;
  v->n = n;
  v->ids = tc_xmalloc(n * sizeof *v->ids);
  v->valid_from = INT64_MIN;
  v->valid_until = INT64_MAX;
  struct tc_buf text = TC_BUF_INIT;
  for (size_t i = 0; i < n; i++) {
    const struct tc_node *nd = p->nodes[k + i];
    v->ids[i] = nd->id;
    if (nd->expiry) {
      if (nd->expiry <= p->now) v->valid_from = TC_MAX(v->valid_from, nd->expiry);
      else v->valid_until = TC_MIN(v->valid_until, nd->expiry);
    }
    owner(nd, &v->users, &v->tagged);
    struct tc_mapper_frag *f = p->frag(p->ctx, k + i);
    if (comma || i) tc_buf_putc(&text, ',');
    tc_buf_append(&text, f->data, f->len);
    tc_mapper_frag_unref(f);
  }
  tc_mapper_idv_sort_unique(&v->users);
  tc_mapper_zstd(text.data, text.len, &v->z);
  shrink(&v->z);
  tc_buf_free(&text);
  if (s->nv == MAX_VARIANTS) {
    size_t old = 0;
    for (size_t i = 1; i < s->nv; i++)
      if (s->v[i]->used < s->v[old]->used) old = i;
    variant_free(s->v[old]);
    c->drops++;
    s->v[old] = s->v[--s->nv];
  }
  s->v[s->nv++] = v;
  c->builds++;
  return v;
}

/* Peers [k0, k1) of p; *first: nothing written to the Peers array yet. */
static void append_range(struct tc_mapper_chunks *c, struct tc_mapper_msg *m, const struct tc_mapper_chunk_peers *p,
                         size_t k0, size_t k1, bool *first, struct tc_mapper_idv *users, bool *tagged) {
  size_t k = k0, s = 0;
  while (k < k1) {
    size_t j = k + 1;
    bool shared = false, split = false;
    if (c) {
      while (s + 1 < c->nsegs && c->segs[s + 1].lo <= p->nodes[k]->id) s++;
      int64_t lo = c->segs[s].lo, hi = s + 1 < c->nsegs ? c->segs[s + 1].lo : INT64_MAX;
      while (j < k1 && p->nodes[j]->id < hi) j++;
      bool own = p->viewer_id >= lo && p->viewer_id < hi, priv = false;
      for (size_t q = k; p->priv && q < j && !priv; q++) priv = p->priv[q];
      shared = j - k >= TC_MIN((size_t)MIN_RUN, c->target) && !own && !priv;
      /* the viewer itself or a viewer-specific peer in here: share the rest
       * of the segment at the finer grain */
      split = (own || priv) && j - k >= MIN_RUN;
    } else {
      j = k1;
    }
    if (shared) {
      struct seg *sg = &c->segs[s];
      bool comma = !*first;
      struct variant *v = NULL;
      for (size_t i = 0; i < sg->nv && !v; i++)
        if (variant_matches(sg->v[i], p->nodes + k, j - k, comma, p->now)) v = sg->v[i];
      if (v) c->hits++;
      else v = build(c, sg, p, k, j - k, comma);
      v->used = ++c->tick;
      tc_mapper_msg_zframes(m, v->z.data, v->z.len);
      for (size_t i = 0; i < v->users.n; i++) tc_mapper_idv_push(users, v->users.v[i]);
      *tagged |= v->tagged;
      *first = false;
    } else if (split && c->fine) {
      append_range(c->fine, m, p, k, j, first, users, tagged);
    } else {
      for (size_t q = k; q < j; q++) {
        struct tc_mapper_frag *f = p->frag(p->ctx, q);
        if (!*first) tc_buf_putc(&m->text, ',');
        *first = false;
        tc_buf_append(&m->text, f->data, f->len);
        tc_mapper_frag_unref(f);
        owner(p->nodes[q], users, tagged);
      }
      if (c) c->text_peers += j - k;
    }
    k = j;
  }
}

void tc_mapper_chunks_append(struct tc_mapper_chunks *c, struct tc_mapper_msg *m, const struct tc_mapper_chunk_peers *p,
                             struct tc_mapper_idv *users, bool *tagged) {
  bool first = true;
  /* A short list is one frame of its own: sharing fine chunks at N = 100
   * made maps 1.8x cheaper but 22 % larger (each frame starts without
   * history), and the per-map cost there is mostly not the peers. */
  if (c && p->n < c->target) {
    append_range(NULL, m, p, 0, p->n, &first, users, tagged);
    c->text_peers += p->n;
    return;
  }
  append_range(c, m, p, 0, p->n, &first, users, tagged);
}

void tc_mapper_chunks_stats(const struct tc_mapper_chunks *c, struct tc_mapper_chunk_stats *o) {
  memset(o, 0, sizeof *o);
  if (!c) return;
  tc_mapper_chunks_stats(c->fine, o);
  o->hits += c->hits;
  o->builds += c->builds;
  o->text_peers += c->text_peers;
  o->drops += c->drops;
  o->segments += c->nsegs;
  for (size_t i = 0; i < c->nsegs; i++) {
    o->cached += c->segs[i].nv;
    for (size_t q = 0; q < c->segs[i].nv; q++) o->cached_bytes += c->segs[i].v[q]->z.len;
  }
}

/* ---- shared runs of per-recipient text ------------------------------------------------ */

#define SPAN_MIN 256      /* shorter runs are not worth a frame of their own */
#define SPAN_ENTRIES 256  /* cleared when full: keys of one compile are few */

struct span_entry {
  const void *key;
  size_t len;
  struct tc_buf z;
};

struct tc_mapper_spans {
  struct span_entry *e;
  size_t n;
  uint64_t hits, builds;
};

struct tc_mapper_spans *tc_mapper_spans_new(void) {
  struct tc_mapper_spans *c = tc_xcalloc(1, sizeof *c);
  c->e = tc_xcalloc(SPAN_ENTRIES, sizeof *c->e);
  return c;
}

void tc_mapper_spans_clear(struct tc_mapper_spans *c) {
  if (!c) return;
  for (size_t i = 0; i < c->n; i++) tc_buf_free(&c->e[i].z);
  c->n = 0;
}

void tc_mapper_spans_free(struct tc_mapper_spans *c) {
  if (!c) return;
  tc_mapper_spans_clear(c);
  free(c->e);
  free(c);
}

void tc_mapper_spans_append(struct tc_mapper_spans *c, struct tc_mapper_msg *m, const char *text, size_t len,
                            size_t at, const char *src, const struct tc_mapper_span *sp, size_t n) {
  size_t pos = 0;
  for (size_t i = 0; c && i < n; i++) {
    size_t o = at + sp[i].off, l = sp[i].len;
    if (l < SPAN_MIN || o < pos || o > len || l > len - o || memcmp(text + o, src + sp[i].off, l)) continue;
    struct span_entry *e = NULL;
    for (size_t k = 0; k < c->n && !e; k++)
      if (c->e[k].key == sp[i].key && c->e[k].len == l) e = &c->e[k];
    if (e) {
      c->hits++;
    } else {
      if (c->n == SPAN_ENTRIES) tc_mapper_spans_clear(c);
      e = &c->e[c->n++];
      e->key = sp[i].key;
      e->len = l;
      e->z = (struct tc_buf)TC_BUF_INIT;
      tc_mapper_zstd(src + sp[i].off, l, &e->z);
      shrink(&e->z);
      c->builds++;
    }
    tc_buf_append(&m->text, text + pos, o - pos);
    tc_mapper_msg_zframes(m, e->z.data, e->z.len);
    pos = o + l;
  }
  tc_buf_append(&m->text, text + pos, len - pos);
}

void tc_mapper_spans_stats(const struct tc_mapper_spans *c, uint64_t *hits, uint64_t *builds) {
  *hits = c ? c->hits : 0;
  *builds = c ? c->builds : 0;
}
