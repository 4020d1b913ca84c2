/* diff: comparing two results' peer sets per viewer, at the cost of the
 * distinct stored lists rather than of every viewer.
 *
 * After a recompile the mapper asks, for every connected node, whether the
 * set of peers it may see changed other than in the nodes the change itself
 * touched (those get their own PeersChanged / PeersRemoved). Walking both
 * lists per viewer is O(N) each, O(N^2) per change; but viewers share
 * stored lists, and a viewer's set is its stored list without itself, so
 * the answer for a pair of stored lists is the same for all viewers that
 * hold that pair except for the viewer's own id. One walk per distinct pair
 * is enough: it keeps the first two ids of the symmetric difference outside
 * the skip set, and a viewer's answer is whether one of them is not itself.
 *
 * Any thread may use its own tc_policy_peers_cmp; it borrows the skip array
 * and reads the results, which must outlive it. */
#include <stdlib.h>
#include <string.h>

#include "policy/policy_int.h"

struct pair_slot {
  const struct tc_policy_peers *a, *b; /* a == NULL && b == NULL && !used: empty */
  bool used;
  unsigned nd;  /* ids in the difference outside skip, capped at 2 */
  int64_t d[2]; /* the first nd of them */
};

struct tc_policy_peers_cmp {
  const int64_t *skip;
  size_t nskip;
  struct pair_slot *slot;
  size_t cap, n; /* cap: power of two */
  size_t walks;  /* distinct pairs walked (tests) */
};

struct tc_policy_peers_cmp *tc_policy_peers_cmp_new(const int64_t *skip, size_t nskip)
{
  struct tc_policy_peers_cmp *c = tc_xcalloc(1, sizeof(*c));
  c->skip = skip;
  c->nskip = nskip;
  c->cap = 16;
  c->slot = tc_xcalloc(c->cap, sizeof(*c->slot));
  return c;
}

void tc_policy_peers_cmp_free(struct tc_policy_peers_cmp *c)
{
  if (!c)
    return;
  free(c->slot);
  free(c);
}

size_t tc_policy_peers_cmp_walks(const struct tc_policy_peers_cmp *c) { return c ? c->walks : 0; }

static size_t pair_hash(const void *a, const void *b)
{
  uint64_t x = (uintptr_t)a * 0x9E3779B97F4A7C15ull ^ (uintptr_t)b * 0xC2B2AE3D27D4EB4Full;
  x ^= x >> 31;
  return (size_t)x;
}

static struct pair_slot *pair_find(struct tc_policy_peers_cmp *c, const struct tc_policy_peers *a,
                                   const struct tc_policy_peers *b)
{
  size_t h = pair_hash(a, b) & (c->cap - 1);
  while (c->slot[h].used && (c->slot[h].a != a || c->slot[h].b != b))
    h = (h + 1) & (c->cap - 1);
  return &c->slot[h];
}

static bool in_sorted(const int64_t *v, size_t n, int64_t id)
{
  size_t lo = 0, hi = n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (v[mid] < id)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < n && v[lo] == id;
}

static int cmp_id(const void *x, const void *y)
{
  int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
  return a < b ? -1 : a > b;
}

/* The stored list's ids in ascending order: the list itself when it is
 * (the mapper's topology comes in id order), else a sorted copy (*tmp). */
static const int64_t *sorted_ids(const struct tc_policy_peers *l, int64_t **tmp)
{
  *tmp = NULL;
  if (!l)
    return NULL;
  if (l->sorted)
    return l->ids;
  *tmp = tc_xmalloc((l->n + 1) * sizeof(int64_t));
  memcpy(*tmp, l->ids, l->n * sizeof(int64_t));
  qsort(*tmp, l->n, sizeof(int64_t), cmp_id);
  return *tmp;
}

static void note(struct tc_policy_peers_cmp *c, struct pair_slot *s, int64_t id)
{
  if (s->nd < 2 && !in_sorted(c->skip, c->nskip, id))
    s->d[s->nd++] = id;
}

/* One merge walk over the two stored lists (whole, selves included). */
static void walk(struct tc_policy_peers_cmp *c, struct pair_slot *s)
{
  int64_t *ta, *tb;
  const int64_t *a = sorted_ids(s->a, &ta), *b = sorted_ids(s->b, &tb);
  size_t na = s->a ? s->a->n : 0, nb = s->b ? s->b->n : 0, i = 0, j = 0;
  while ((i < na || j < nb) && s->nd < 2) {
    if (j == nb || (i < na && a[i] < b[j]))
      note(c, s, a[i++]);
    else if (i == na || b[j] < a[i])
      note(c, s, b[j++]);
    else
      i++, j++;
  }
  free(ta);
  free(tb);
  c->walks++;
}

bool tc_policy_peers_differ(struct tc_policy_peers_cmp *c, const struct tc_policy_node_result *a,
                            const struct tc_policy_node_result *b)
{
  const struct tc_policy_peers *la = a ? a->peers : NULL, *lb = b ? b->peers : NULL;
  int64_t self = a ? a->node_id : b ? b->node_id : 0;
  if (la == lb)
    return false; /* same stored list: the same set without the viewer */
  if (2 * (c->n + 1) > c->cap) {
    struct pair_slot *old = c->slot;
    size_t ocap = c->cap;
    c->cap *= 2;
    c->slot = tc_xcalloc(c->cap, sizeof(*c->slot));
    for (size_t k = 0; k < ocap; k++)
      if (old[k].used)
        *pair_find(c, old[k].a, old[k].b) = old[k];
    free(old);
  }
  struct pair_slot *s = pair_find(c, la, lb);
  if (!s->used) {
    *s = (struct pair_slot){.a = la, .b = lb, .used = true};
    walk(c, s);
    c->n++;
  }
  /* The viewer is in neither set: a difference that is only the viewer
   * (one list holds it, the other does not) is no difference. */
  for (unsigned k = 0; k < s->nd; k++)
    if (s->d[k] != self)
      return true;
  return false;
}
