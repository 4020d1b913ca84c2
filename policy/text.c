/* text: compact JSON text of compiled results, byte for byte what
 * json_dumps(v, JSON_COMPACT) gives, built from memoised pieces.
 *
 * Why: a node's packet filter repeats the same large SrcIPs arrays and
 * destination entries as every other node's (one SrcIPs array of a user
 * with 1,000 devices is ~37 KB of text), and the mapper needs each node's
 * filter as text on every recompile. Dumping every filter with jansson
 * re-formats those shared arrays once per node (N x 37 KB per join);
 * here a value that is shared (refcount > 1) is formatted once per compile
 * and copied afterwards.
 *
 * Texts are refcounted blocks so results of an incremental compile can
 * share them with the previous result. Called by the compiler only, on the
 * compiling thread; the refcount is atomic because a result may be freed on
 * another thread than the one compiling the next (the mapper does both on
 * its dispatcher, but nothing requires that). */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "policy/policy_int.h"

struct ptext {
  _Atomic size_t refs;
  size_t len;
  size_t nspans;
  struct tc_policy_text_span *spans; /* each .shared holds a reference */
  char s[];
};

static struct ptext *ptext_of(const char *s)
{
  return (struct ptext *)(void *)((char *)(uintptr_t)s - offsetof(struct ptext, s));
}

const char *pol_text_new(const char *s, size_t len)
{
  struct ptext *t = tc_xmalloc(sizeof(*t) + len + 1);
  atomic_init(&t->refs, 1);
  t->len = len;
  t->nspans = 0;
  t->spans = NULL;
  memcpy(t->s, s, len);
  t->s[len] = 0;
  return t->s;
}

const char *pol_text_ref(const char *s)
{
  if (s)
    atomic_fetch_add_explicit(&ptext_of(s)->refs, 1, memory_order_relaxed);
  return s;
}

void pol_text_unref(const char *s)
{
  if (!s)
    return;
  struct ptext *t = ptext_of(s);
  if (atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1)
    return;
  for (size_t i = 0; i < t->nspans; i++)
    pol_text_unref(t->spans[i].shared);
  free(t->spans);
  free(t);
}

size_t tc_policy_text_spans(const char *text, const struct tc_policy_text_span **out)
{
  *out = text ? ptext_of(text)->spans : NULL;
  return text ? ptext_of(text)->nspans : 0;
}

size_t pol_text_len(const char *s) { return s ? ptext_of(s)->len : 0; }

/* ---- the writer ---------------------------------------------------------------------- */

struct memo_slot {
  json_t *key;      /* referenced, so the address cannot be reused while memoised */
  const char *text; /* a pol_text */
  size_t len;
};

struct pol_text_memo {
  struct memo_slot *slot;
  size_t cap, n; /* cap: power of two */
  /* spans of the text being rendered (render is not reentrant) */
  struct tc_policy_text_span *spans;
  size_t nspans, spcap;
  /* The text being rendered goes straight into its final block (header
   * first), sized from the previous text of the compile (nodes' texts are
   * much alike) and trimmed at the end: one allocation and one copy per
   * text instead of a chain of reallocs and a final copy. */
  size_t hint; /* length of the last text rendered */
  size_t base; /* where the text starts in the buffer (span offsets are relative to it) */
};

struct pol_text_memo *pol_text_memo_new(void)
{
  struct pol_text_memo *m = tc_xcalloc(1, sizeof(*m));
  m->cap = 64;
  m->slot = tc_xcalloc(m->cap, sizeof(*m->slot));
  return m;
}

void pol_text_memo_free(struct pol_text_memo *m)
{
  if (!m)
    return;
  for (size_t i = 0; i < m->cap; i++)
    if (m->slot[i].key) {
      json_decref(m->slot[i].key);
      pol_text_unref(m->slot[i].text);
    }
  free(m->slot);
  free(m->spans);
  free(m);
}

static size_t memo_hash(const json_t *j)
{
  uint64_t x = (uintptr_t)j;
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return (size_t)x;
}

static struct memo_slot *memo_find(struct pol_text_memo *m, const json_t *j)
{
  size_t h = memo_hash(j) & (m->cap - 1);
  while (m->slot[h].key && m->slot[h].key != j)
    h = (h + 1) & (m->cap - 1);
  return &m->slot[h];
}

static const char *memo_put(struct pol_text_memo *m, json_t *j, const char *text, size_t len)
{
  if (2 * (m->n + 1) > m->cap) {
    struct memo_slot *old = m->slot;
    size_t ocap = m->cap;
    m->cap *= 2;
    m->slot = tc_xcalloc(m->cap, sizeof(*m->slot));
    for (size_t i = 0; i < ocap; i++)
      if (old[i].key)
        *memo_find(m, old[i].key) = old[i];
    free(old);
  }
  struct memo_slot *s = memo_find(m, j);
  s->key = json_incref(j);
  s->text = pol_text_new(text, len);
  s->len = len;
  m->n++;
  return s->text;
}

/* Pieces this large are worth a consumer's effort to treat apart (e.g. to
 * compress once for every node whose filter holds them). */
enum { SPAN_MIN = 256 };

static void span_add(struct pol_text_memo *m, size_t off, const char *shared, size_t len)
{
  if (len < SPAN_MIN)
    return;
  if (m->nspans == m->spcap) {
    m->spcap = m->spcap ? 2 * m->spcap : 8;
    m->spans = tc_xrealloc(m->spans, m->spcap * sizeof(*m->spans));
  }
  m->spans[m->nspans++] = (struct tc_policy_text_span){off, len, shared};
}

/* jansson's own text for what this writer does not spell out itself
 * (reals, strings needing escapes): the reference, so exact by definition. */
static void put_jansson(struct tc_buf *b, const json_t *j)
{
  char *t = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
  if (t)
    tc_buf_puts(b, t);
  free(t);
}

/* Whether s can be written between quotes as it is: printable ASCII other
 * than the two characters JSON escapes (jansson escapes nothing else in
 * that range without JSON_ESCAPE_SLASH / JSON_ENSURE_ASCII). */
static bool plain(const char *s, size_t n)
{
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c < 0x20 || c > 0x7e || c == '"' || c == '\\')
      return false;
  }
  return true;
}

static void put_string(struct tc_buf *b, const char *s, size_t n)
{
  if (plain(s, n)) {
    tc_buf_reserve(b, n + 2);
    b->data[b->len++] = '"';
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len++] = '"';
    b->data[b->len] = 0;
    return;
  }
  json_t *t = json_stringn_nocheck(s, n);
  put_jansson(b, t);
  json_decref(t);
}

static void put_value(struct pol_text_memo *m, struct tc_buf *b, json_t *j);

static void put_inner(struct pol_text_memo *m, struct tc_buf *b, json_t *j)
{
  switch (json_typeof(j)) {
  case JSON_OBJECT: {
    tc_buf_putc(b, '{');
    bool first = true;
    const char *k;
    json_t *v;
    json_object_foreach(j, k, v) {
      if (!first)
        tc_buf_putc(b, ',');
      first = false;
      put_string(b, k, strlen(k));
      tc_buf_putc(b, ':');
      put_value(m, b, v);
    }
    tc_buf_putc(b, '}');
    break;
  }
  case JSON_ARRAY: {
    tc_buf_putc(b, '[');
    size_t n = json_array_size(j);
    for (size_t i = 0; i < n; i++) {
      if (i)
        tc_buf_putc(b, ',');
      put_value(m, b, json_array_get(j, i));
    }
    tc_buf_putc(b, ']');
    break;
  }
  case JSON_STRING:
    put_string(b, json_string_value(j), json_string_length(j));
    break;
  case JSON_INTEGER: {
    char t[32];
    int n = snprintf(t, sizeof(t), "%" JSON_INTEGER_FORMAT, json_integer_value(j));
    tc_buf_append(b, t, (size_t)n);
    break;
  }
  case JSON_TRUE:
    tc_buf_puts(b, "true");
    break;
  case JSON_FALSE:
    tc_buf_puts(b, "false");
    break;
  case JSON_NULL:
    tc_buf_puts(b, "null");
    break;
  default:
    put_jansson(b, j);
    break;
  }
}

/* Shared containers (held by more than this parent) are formatted once and
 * then copied: that is where the repetition is. */
static void put_value(struct pol_text_memo *m, struct tc_buf *b, json_t *j)
{
  bool container = json_is_array(j) || json_is_object(j);
  if (!m || !container || j->refcount < 2) {
    put_inner(m, b, j);
    return;
  }
  struct memo_slot *s = memo_find(m, j);
  if (s->key) {
    span_add(m, b->len - m->base, s->text, s->len);
    tc_buf_append(b, s->text, s->len);
    return;
  }
  size_t at = b->len, first = m->nspans;
  put_inner(m, b, j);
  const char *t = memo_put(m, j, b->data + at, b->len - at);
  /* the whole value is one span: drop the ones found inside it */
  m->nspans = first;
  span_add(m, at - m->base, t, b->len - at);
}

const char *pol_text_render(struct pol_text_memo *m, json_t *j)
{
  if (!j)
    return NULL;
  if (!m) {
    struct tc_buf b = TC_BUF_INIT;
    put_inner(NULL, &b, j);
    const char *t = pol_text_new(b.data ? b.data : "", b.len);
    tc_buf_free(&b);
    return t;
  }
  const size_t hdr = offsetof(struct ptext, s);
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_reserve(&b, hdr + m->hint + m->hint / 8 + 64);
  b.len = hdr;
  m->base = hdr;
  m->nspans = 0;
  put_inner(m, &b, j); /* the root is shared by pointer, not through the memo */
  size_t len = b.len - hdr;
  m->hint = len;
  struct ptext *pt = tc_xrealloc(b.data, hdr + len + 1); /* trims: no copy */
  atomic_init(&pt->refs, 1);
  pt->len = len;
  pt->nspans = 0;
  pt->spans = NULL;
  pt->s[len] = 0;
  const char *t = pt->s;
  if (m->nspans) {
    pt->spans = tc_xmalloc(m->nspans * sizeof(*pt->spans));
    pt->nspans = m->nspans;
    for (size_t i = 0; i < m->nspans; i++) {
      pt->spans[i] = m->spans[i];
      pol_text_ref(pt->spans[i].shared);
    }
  }
  return t;
}
