/* ipalloc: address pools for node IPs (100.64.0.0/10, fd7a:115c:a1e0::/48 or
 * configured subsets), sequential or random allocation, Tailscale's reserved
 * addresses, and canonical prefix text. The pool keeps no "used" set of its
 * own: the caller answers in_use from its current snapshot, so an address is
 * free again exactly when the node holding it is gone. Called under the
 * model's writer lock only. */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model_int.h"

/* Scanning more than this many candidates means the pool is effectively
 * full (only reachable for absurdly large pools that are also full). */
#define SCAN_LIMIT ((tc_u128)1 << 24)

static tc_u128 addr_to_u128(const uint8_t *a, int family) {
  tc_u128 v = 0;
  int n = family == 4 ? 4 : 16;
  for (int i = 0; i < n; i++) v = (v << 8) | a[i];
  return v;
}

static void u128_to_addr(tc_u128 v, int family, uint8_t *out) {
  int n = family == 4 ? 4 : 16;
  for (int i = n - 1; i >= 0; i--) {
    out[i] = (uint8_t)(v & 0xff);
    v >>= 8;
  }
}

/* Parses "addr/len" of either family into addr (16 bytes) with family set. */
static int parse_prefix(const char *in, int *family, uint8_t addr[16], int *plen) {
  if (!in) return TC_EINVAL;
  const char *slash = strchr(in, '/');
  if (!slash || slash == in || (size_t)(slash - in) >= 64) return TC_EINVAL;
  char host[64];
  memcpy(host, in, (size_t)(slash - in));
  host[slash - in] = 0;
  const char *ls = slash + 1;
  if (!*ls || strlen(ls) > 3) return TC_EINVAL;
  int len = 0;
  for (const char *c = ls; *c; c++) {
    if (*c < '0' || *c > '9') return TC_EINVAL;
    len = len * 10 + (*c - '0');
  }
  if (ls[0] == '0' && ls[1]) return TC_EINVAL; /* no leading zeros */
  memset(addr, 0, 16);
  if (inet_pton(AF_INET, host, addr) == 1) {
    if (len > 32) return TC_EINVAL;
    *family = 4;
  } else if (inet_pton(AF_INET6, host, addr) == 1) {
    if (len > 128) return TC_EINVAL;
    *family = 6;
  } else {
    return TC_EINVAL;
  }
  *plen = len;
  return 0;
}

static tc_u128 host_mask(int family, int plen) {
  int bits = family == 4 ? 32 : 128;
  int hb = bits - plen;
  if (hb >= 128) return ~(tc_u128)0;
  return ((tc_u128)1 << hb) - 1;
}

static void format_prefix(int family, const uint8_t *addr, int plen, char out[64]) {
  char host[INET6_ADDRSTRLEN];
  inet_ntop(family == 4 ? AF_INET : AF_INET6, addr, host, sizeof host);
  snprintf(out, 64, "%s/%d", host, plen);
}

int tc_prefix_canon(const char *in, char out[64], struct tc_err *err) {
  int family, plen;
  uint8_t a[16];
  if (parse_prefix(in, &family, a, &plen))
    return tc_err_set(err, TC_EINVAL, "invalid prefix \"%.80s\"", in ? in : "");
  if (addr_to_u128(a, family) & host_mask(family, plen))
    return tc_err_set(err, TC_EINVAL, "invalid prefix \"%.80s\": host bits set", in);
  format_prefix(family, a, plen, out);
  return 0;
}

int tc_ippool_init(struct tc_ippool *p, int family, const char *text, struct tc_err *err) {
  memset(p, 0, sizeof *p);
  if (text && !*text) return 0; /* disabled */
  if (!text) text = family == 4 ? "100.64.0.0/10" : "fd7a:115c:a1e0::/48";
  int fam, plen;
  uint8_t a[16];
  if (parse_prefix(text, &fam, a, &plen))
    return tc_err_set(err, TC_EINVAL, "invalid IP prefix \"%.80s\"", text);
  if (fam != family)
    return tc_err_set(err, TC_EINVAL, "prefix \"%.80s\" is not an IPv%d prefix", text, family);
  int bits = family == 4 ? 32 : 128;
  /* /0../7 for v6 would need more than 120 host bits; nobody wants that. */
  if (bits - plen > 120 || bits - plen < 1)
    return tc_err_set(err, TC_EINVAL, "prefix \"%.80s\" has an unusable length", text);
  tc_u128 v = addr_to_u128(a, family) & ~host_mask(family, plen);
  u128_to_addr(v, family, p->net);
  p->enabled = true;
  p->family = family;
  p->plen = plen;
  p->size = (tc_u128)1 << (bits - plen);
  p->cursor = 0;
  format_prefix(family, p->net, plen, p->text);
  return 0;
}

bool tc_ip_is_reserved(int family, const uint8_t *a) {
  if (family == 4) {
    if (a[0] == 100 && a[1] == 100 && a[2] == 100 && a[3] == 100) return true; /* quad-100 */
    if (a[0] == 100 && a[1] == 115 && (a[2] & 0xfe) == 92) return true;      /* ChromeOS VM range */
    return false;
  }
  static const uint8_t dns6[16] = {0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x53};
  return memcmp(a, dns6, 16) == 0;
}

bool tc_ippool_contains(const struct tc_ippool *p, const uint8_t *addr) {
  if (!p->enabled) return false;
  tc_u128 v = addr_to_u128(addr, p->family), net = addr_to_u128(p->net, p->family);
  return v - net < p->size && v >= net;
}

void tc_ippool_note_used(struct tc_ippool *p, const uint8_t *addr) {
  if (!tc_ippool_contains(p, addr)) return;
  tc_u128 off = addr_to_u128(addr, p->family) - addr_to_u128(p->net, p->family);
  if (off > p->cursor) p->cursor = off;
}

static tc_u128 random_offset(tc_u128 size) {
  tc_u128 r;
  tc_random(&r, sizeof r);
  return r % size; /* bias is negligible: size <= 2^120 against 2^128 */
}

int tc_ippool_next(struct tc_ippool *p, enum tc_model_alloc strategy, tc_ip_in_use_fn in_use,
                   void *ctx, uint8_t out[16], struct tc_err *err) {
  if (!p->enabled) return tc_err_set(err, TC_EINVAL, "IPv%d allocation is disabled", p->family);
  tc_u128 net = addr_to_u128(p->net, p->family);
  tc_u128 start = strategy == TC_MODEL_ALLOC_RANDOM ? random_offset(p->size) : p->cursor + 1;
  tc_u128 limit = p->size < SCAN_LIMIT ? p->size : SCAN_LIMIT;
  for (tc_u128 i = 0; i < limit; i++) {
    tc_u128 off = (start + i) % p->size;
    if (off == 0) continue; /* the network address */
    uint8_t a[16] = {0};
    u128_to_addr(net + off, p->family, a);
    if (tc_ip_is_reserved(p->family, a)) continue;
    if (in_use && in_use(ctx, a, p->family == 4 ? 4 : 16)) continue;
    memcpy(out, a, p->family == 4 ? 4 : 16);
    if (strategy == TC_MODEL_ALLOC_SEQUENTIAL) p->cursor = off;
    return 0;
  }
  return tc_err_set(err, TC_EINTERNAL, "no free IPv%d address left in %s", p->family, p->text);
}
