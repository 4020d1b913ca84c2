/* Address sets as sorted disjoint ranges over 128-bit integers (IPv4 kept
 * in its own family), with the text forms Tailscale uses in filters:
 * bare addresses, CIDR prefixes, and "a-b" ranges. Pure; any thread. */
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

#include "policy/policy_int.h"

void pol_ipset_init(struct ipset *s) { memset(s, 0, sizeof(*s)); }

void pol_ipset_free(struct ipset *s)
{
  free(s->r);
  memset(s, 0, sizeof(*s));
}

void pol_ipset_add(struct ipset *s, struct ip_range r)
{
  if (s->n == s->cap) {
    s->cap = s->cap ? s->cap * 2 : 4;
    s->r = tc_xrealloc(s->r, s->cap * sizeof(*s->r));
  }
  s->r[s->n++] = r;
  s->sorted = s->n == 1;
}

void pol_ipset_add_set(struct ipset *s, const struct ipset *o)
{
  for (size_t i = 0; i < o->n; i++)
    pol_ipset_add(s, o->r[i]);
}

static int range_cmp(const void *a, const void *b)
{
  const struct ip_range *x = a, *y = b;
  if (x->v6 != y->v6)
    return x->v6 < y->v6 ? -1 : 1;
  if (x->lo != y->lo)
    return x->lo < y->lo ? -1 : 1;
  if (x->hi != y->hi)
    return x->hi < y->hi ? -1 : 1;
  return 0;
}

static bool in_order(const struct ip_range *a, const struct ip_range *b)
{
  return a->v6 < b->v6 || (a->v6 == b->v6 && (a->lo < b->lo || (a->lo == b->lo && a->hi <= b->hi)));
}

/* Sets are mostly built from nodes in topology order, which is usually
 * address order within each family, with each node's IPv4 and IPv6
 * address alternating: then a linear check (and a stable split by family)
 * replaces the sort, which was the largest part of resolving the grants on
 * every compile. */
static void sort_ranges(struct ipset *s)
{
  bool sorted = true, fam_sorted = true;
  const struct ip_range *last[2] = {NULL, NULL};
  size_t n4 = 0;
  for (size_t i = 0; i < s->n; i++) {
    const struct ip_range *x = &s->r[i];
    if (i && !in_order(&s->r[i - 1], x))
      sorted = false;
    if (last[!!x->v6] && !in_order(last[!!x->v6], x))
      fam_sorted = false;
    last[!!x->v6] = x;
    n4 += !x->v6;
  }
  if (sorted)
    return;
  if (!fam_sorted) {
    qsort(s->r, s->n, sizeof(*s->r), range_cmp);
    return;
  }
  struct ip_range *out = tc_xmalloc(s->n * sizeof(*out));
  size_t a = 0, b = n4;
  for (size_t i = 0; i < s->n; i++)
    out[s->r[i].v6 ? b++ : a++] = s->r[i];
  free(s->r);
  s->r = out;
  s->cap = s->n;
}

static void norm(struct ipset *s, bool adjacent)
{
  s->sorted = true;
  if (s->n < 2)
    return;
  sort_ranges(s);
  size_t w = 0;
  for (size_t i = 1; i < s->n; i++) {
    struct ip_range *c = &s->r[w];
    struct ip_range *x = &s->r[i];
    if (x->v6 == c->v6 && (x->lo <= c->hi || (adjacent && x->lo == c->hi + 1))) {
      if (x->hi > c->hi)
        c->hi = x->hi;
    } else {
      s->r[++w] = *x;
    }
  }
  s->n = w + 1;
}

void pol_ipset_norm(struct ipset *s) { norm(s, true); }
void pol_ipset_norm_overlap(struct ipset *s) { norm(s, false); }

void pol_ipset_remove(struct ipset *s, struct ip_range r)
{
  struct ipset out;
  pol_ipset_init(&out);
  for (size_t i = 0; i < s->n; i++) {
    struct ip_range c = s->r[i];
    if (c.v6 != r.v6 || c.hi < r.lo || c.lo > r.hi) {
      pol_ipset_add(&out, c);
      continue;
    }
    if (c.lo < r.lo)
      pol_ipset_add(&out, (struct ip_range){c.v6, c.lo, r.lo - 1});
    if (c.hi > r.hi)
      pol_ipset_add(&out, (struct ip_range){c.v6, r.hi + 1, c.hi});
  }
  free(s->r);
  *s = out;
  s->sorted = true; /* removal from a sorted disjoint set keeps it so */
}

/* Index of the first range (in family order) whose end is >= (v6, a), or n. */
static size_t lower_bound(const struct ipset *s, uint8_t v6, tc_u128 a)
{
  size_t lo = 0, hi = s->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    const struct ip_range *m = &s->r[mid];
    if (m->v6 < v6 || (m->v6 == v6 && m->hi < a))
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

bool pol_ipset_contains(const struct ipset *s, uint8_t v6, tc_u128 a)
{
  if (s->sorted) {
    size_t i = lower_bound(s, v6, a);
    return i < s->n && s->r[i].v6 == v6 && s->r[i].lo <= a;
  }
  for (size_t i = 0; i < s->n; i++)
    if (s->r[i].v6 == v6 && s->r[i].lo <= a && a <= s->r[i].hi)
      return true;
  return false;
}

bool pol_ip_range_overlaps(struct ip_range a, struct ip_range b)
{
  return a.v6 == b.v6 && a.lo <= b.hi && b.lo <= a.hi;
}

bool pol_ipset_overlaps(const struct ipset *s, struct ip_range r)
{
  if (s->sorted) {
    size_t i = lower_bound(s, r.v6, r.lo);
    return i < s->n && s->r[i].v6 == r.v6 && s->r[i].lo <= r.hi;
  }
  for (size_t i = 0; i < s->n; i++)
    if (pol_ip_range_overlaps(s->r[i], r))
      return true;
  return false;
}

bool pol_ipset_covers(const struct ipset *s, struct ip_range r)
{
  if (s->sorted) {
    size_t i = lower_bound(s, r.v6, r.lo);
    return i < s->n && s->r[i].v6 == r.v6 && s->r[i].lo <= r.lo && r.hi <= s->r[i].hi;
  }
  for (size_t i = 0; i < s->n; i++)
    if (s->r[i].v6 == r.v6 && s->r[i].lo <= r.lo && r.hi <= s->r[i].hi)
      return true;
  return false;
}

bool pol_ipset_empty(const struct ipset *s) { return s->n == 0; }

static int family_bits(uint8_t v6) { return v6 ? 128 : 32; }

static tc_u128 host_mask(uint8_t v6, int bits)
{
  int hb = family_bits(v6) - bits;
  if (hb <= 0)
    return 0;
  if (hb >= 128)
    return ~(tc_u128)0;
  return ((tc_u128)1 << hb) - 1;
}

int pol_ip_parse_addr(const char *s, uint8_t *v6, tc_u128 *a)
{
  unsigned char b[16];
  if (strchr(s, ':')) {
    if (strchr(s, '%') || inet_pton(AF_INET6, s, b) != 1)
      return -1;
    tc_u128 x = 0;
    for (int i = 0; i < 16; i++)
      x = (x << 8) | b[i];
    *v6 = 1;
    *a = x;
    return 0;
  }
  /* inet_pton accepts only dotted quads with no leading zeros issues handled by us. */
  if (inet_pton(AF_INET, s, b) != 1)
    return -1;
  for (const char *p = s; *p; p++) {
    if (*p == '0' && (p == s || p[-1] == '.') && p[1] >= '0' && p[1] <= '9')
      return -1; /* Go rejects leading zeros */
  }
  *v6 = 0;
  *a = ((tc_u128)b[0] << 24) | ((tc_u128)b[1] << 16) | ((tc_u128)b[2] << 8) | b[3];
  return 0;
}

int pol_ip_parse_prefix(const char *s, struct ip_range *out, int *bits_out)
{
  char buf[128];
  size_t n = strlen(s);
  if (n == 0 || n >= sizeof(buf))
    return -1;
  memcpy(buf, s, n + 1);
  char *slash = strchr(buf, '/');
  int bits = -1;
  if (slash) {
    *slash = 0;
    const char *b = slash + 1;
    if (!*b || strlen(b) > 3)
      return -1;
    bits = 0;
    for (; *b; b++) {
      if (*b < '0' || *b > '9')
        return -1;
      bits = bits * 10 + (*b - '0');
    }
    if (slash[1] == '0' && slash[2])
      return -1;
  }
  uint8_t v6;
  tc_u128 a;
  if (pol_ip_parse_addr(buf, &v6, &a))
    return -1;
  if (bits < 0)
    bits = family_bits(v6);
  if (bits > family_bits(v6))
    return -1;
  tc_u128 m = host_mask(v6, bits);
  out->v6 = v6;
  out->lo = a & ~m;
  out->hi = out->lo | m;
  if (!v6) {
    out->lo &= 0xffffffffu;
    out->hi &= 0xffffffffu;
  }
  if (bits_out)
    *bits_out = bits;
  return 0;
}

static void copy_out(const char *t, size_t n, char *out, size_t outsz)
{
  if (!outsz)
    return;
  if (n >= outsz)
    n = outsz - 1;
  memcpy(out, t, n);
  out[n] = 0;
}

/* Formatting runs for every address of every rule and node, so it avoids
 * inet_ntop's sprintf; the output is the same (RFC 5952: lower-case hex,
 * the first longest run of two or more zero groups as "::"). Addresses
 * whose first 80 bits are zero (where inet_ntop may print an embedded IPv4
 * address) still go through inet_ntop. */
void pol_ip_format_addr(uint8_t v6, tc_u128 a, char *out, size_t outsz)
{
  unsigned char b[16];
  char t[48], *p = t;
  if (!v6) {
    for (int i = 3; i >= 0; i--) {
      unsigned v = (unsigned)(a >> (8 * i)) & 0xff;
      if (v >= 100)
        *p++ = (char)('0' + v / 100);
      if (v >= 10)
        *p++ = (char)('0' + v / 10 % 10);
      *p++ = (char)('0' + v % 10);
      if (i)
        *p++ = '.';
    }
    copy_out(t, (size_t)(p - t), out, outsz);
    return;
  }
  unsigned w[8];
  for (int i = 0; i < 8; i++)
    w[i] = (unsigned)(a >> (16 * (7 - i))) & 0xffff;
  if (!w[0] && !w[1] && !w[2] && !w[3] && !w[4]) {
    for (int i = 15; i >= 0; i--) {
      b[i] = (unsigned char)a;
      a >>= 8;
    }
    inet_ntop(AF_INET6, b, out, (socklen_t)outsz);
    return;
  }
  int best = -1, bestlen = 0;
  for (int i = 0; i < 8;) {
    int j = i;
    while (j < 8 && !w[j])
      j++;
    if (j - i > bestlen && j - i >= 2)
      best = i, bestlen = j - i;
    i = j > i ? j : i + 1;
  }
  static const char hex[] = "0123456789abcdef";
  for (int i = 0; i < 8; i++) {
    if (i == best) {
      *p++ = ':';
      if (i == 0)
        *p++ = ':';
      i += bestlen - 1;
      continue;
    }
    bool lead = true;
    for (int sh = 12; sh >= 0; sh -= 4) {
      unsigned d = (w[i] >> sh) & 0xf;
      if (lead && d == 0 && sh)
        continue;
      lead = false;
      *p++ = hex[d];
    }
    if (i < 7)
      *p++ = ':';
  }
  copy_out(t, (size_t)(p - t), out, outsz);
}

/* Prefix length if [lo,hi] is exactly one prefix, else -1. */
static int range_prefix_bits(struct ip_range r)
{
  tc_u128 size_m1 = r.hi - r.lo;
  /* size must be a power of two and lo aligned to it */
  tc_u128 size = size_m1 + 1;
  int fb = family_bits(r.v6);
  if (size == 0) /* whole v6 space */
    return r.lo == 0 ? 0 : -1;
  if (size & size_m1)
    return -1;
  if (r.lo & size_m1)
    return -1;
  int hb = 0;
  while (((tc_u128)1 << hb) != size)
    hb++;
  return fb - hb;
}

bool pol_ip_range_prefix(struct ip_range r, char *out, size_t outsz)
{
  int bits = range_prefix_bits(r);
  if (bits < 0)
    return false;
  char a[64];
  pol_ip_format_addr(r.v6, r.lo, a, sizeof(a));
  size_t n = strlen(a);
  a[n++] = '/';
  if (bits >= 100)
    a[n++] = (char)('0' + bits / 100);
  if (bits >= 10)
    a[n++] = (char)('0' + bits / 10 % 10);
  a[n++] = (char)('0' + bits % 10);
  copy_out(a, n, out, outsz);
  return true;
}

bool pol_ip_range_is_exit(struct ip_range r)
{
  return r.lo == 0 && (r.v6 ? r.hi == ~(tc_u128)0 : r.hi == 0xffffffffu);
}

void pol_ipset_append_strings(const struct ipset *s, json_t *arr)
{
  char a[64], b[64], t[160];
  for (size_t i = 0; i < s->n; i++) {
    struct ip_range r = s->r[i];
    if (r.lo == r.hi) {
      pol_ip_format_addr(r.v6, r.lo, a, sizeof(a));
      json_array_append_new(arr, json_string(a));
    } else if (pol_ip_range_prefix(r, t, sizeof(t))) {
      json_array_append_new(arr, json_string(t));
    } else {
      pol_ip_format_addr(r.v6, r.lo, a, sizeof(a));
      pol_ip_format_addr(r.v6, r.hi, b, sizeof(b));
      snprintf(t, sizeof(t), "%s-%s", a, b);
      json_array_append_new(arr, json_string(t));
    }
  }
}

size_t pol_ipset_prefix_ranges(const struct ipset *s, struct ip_range **out)
{
  size_t n = 0, cap = s->n + 4;
  *out = tc_xmalloc(cap * sizeof(**out));
  for (size_t i = 0; i < s->n; i++) {
    struct ip_range r = s->r[i];
    tc_u128 lo = r.lo;
    int fb = family_bits(r.v6);
    for (;;) {
      /* largest aligned block starting at lo that fits in [lo, hi] */
      int hb = 0;
      while (hb < fb) {
        tc_u128 sz = (tc_u128)1 << (hb + 1);
        if (hb + 1 >= 128 || (lo & (sz - 1)) || lo + (sz - 1) > r.hi || lo + (sz - 1) < lo)
          break;
        hb++;
      }
      if (hb + 1 == 128 && lo == 0 && r.hi == ~(tc_u128)0)
        hb = 128;
      struct ip_range p = {r.v6, lo, hb >= 128 ? ~(tc_u128)0 : lo + (((tc_u128)1 << hb) - 1)};
      if (n == cap) {
        cap *= 2;
        *out = tc_xrealloc(*out, cap * sizeof(**out));
      }
      (*out)[n++] = p;
      if (p.hi >= r.hi)
        break;
      lo = p.hi + 1;
    }
  }
  return n;
}

void pol_ip_range_text(struct ip_range p, bool bare_single, char *out, size_t outsz)
{
  if (bare_single && p.lo == p.hi)
    pol_ip_format_addr(p.v6, p.lo, out, outsz);
  else
    pol_ip_range_prefix(p, out, outsz);
}

void pol_ipset_append_prefixes(const struct ipset *s, json_t *arr, bool bare_single)
{
  char t[160];
  struct ip_range *pr;
  size_t n = pol_ipset_prefix_ranges(s, &pr);
  for (size_t i = 0; i < n; i++) {
    pol_ip_range_text(pr[i], bare_single, t, sizeof(t));
    json_array_append_new(arr, json_string(t));
  }
  free(pr);
}
