/* text: the small text formats of tailcfg — key strings, IP prefixes,
 * ip:port endpoints, JSON string literals — parsed strictly and written in
 * the canonical form Go's encoder produces. Reentrant. */
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

#include "mapper/mapper_int.h"

static const char *key_prefix(enum tc_mapper_key_kind kind) {
  switch (kind) {
  case TC_MKEY_MACHINE: return "mkey:";
  case TC_MKEY_NODE: return "nodekey:";
  case TC_MKEY_DISCO: return "discokey:";
  }
  return "?:";
}

bool tc_mapper_key_is_zero(const uint8_t key[TC_KEY_LEN]) {
  uint8_t acc = 0;
  for (int i = 0; i < TC_KEY_LEN; i++) acc |= key[i];
  return acc == 0;
}

int tc_mapper_key_parse(enum tc_mapper_key_kind kind, const char *s, size_t len, uint8_t out[TC_KEY_LEN],
                        bool *present) {
  memset(out, 0, TC_KEY_LEN);
  if (present) *present = false;
  if (len == 0) return 0; /* Go's key types accept "" as the zero key */
  const char *pfx = key_prefix(kind);
  size_t pl = strlen(pfx);
  if (len != pl + 2 * TC_KEY_LEN || memcmp(s, pfx, pl)) return TC_EINVAL;
  if (tc_hex_decode(s + pl, 2 * TC_KEY_LEN, out, TC_KEY_LEN)) {
    memset(out, 0, TC_KEY_LEN);
    return TC_EINVAL;
  }
  if (present) *present = !tc_mapper_key_is_zero(out);
  return 0;
}

void tc_mapper_key_format(enum tc_mapper_key_kind kind, const uint8_t key[TC_KEY_LEN],
                          char out[TC_MAPPER_KEY_TEXT]) {
  const char *pfx = key_prefix(kind);
  size_t pl = strlen(pfx);
  memcpy(out, pfx, pl);
  tc_hex_encode(key, TC_KEY_LEN, out + pl);
}

/* Parses a bare address (no zone) into bytes; returns 4, 6 or 0 on error. */
static int parse_ip(const char *s, size_t len, uint8_t addr[16]) {
  char tmp[64];
  if (len == 0 || len >= sizeof tmp) return 0;
  memcpy(tmp, s, len);
  tmp[len] = 0;
  if (strchr(tmp, ':')) return inet_pton(AF_INET6, tmp, addr) == 1 ? 6 : 0;
  /* inet_pton(AF_INET) refuses leading zeros and short forms: as strict as Go. */
  return inet_pton(AF_INET, tmp, addr) == 1 ? 4 : 0;
}

static int parse_dec(const char *s, size_t len, int max, int *out) {
  if (len == 0 || len > 5) return TC_EINVAL;
  int v = 0;
  for (size_t i = 0; i < len; i++) {
    if (s[i] < '0' || s[i] > '9') return TC_EINVAL;
    v = v * 10 + (s[i] - '0');
  }
  if (len > 1 && s[0] == '0') return TC_EINVAL; /* Go refuses leading zeros */
  if (v > max) return TC_EINVAL;
  *out = v;
  return 0;
}

int tc_mapper_prefix_canon(const char *s, char out[64]) {
  const char *slash = strchr(s, '/');
  if (!slash) return TC_EINVAL;
  uint8_t addr[16];
  int fam = parse_ip(s, (size_t)(slash - s), addr);
  if (!fam) return TC_EINVAL;
  int bits;
  if (parse_dec(slash + 1, strlen(slash + 1), fam == 4 ? 32 : 128, &bits)) return TC_EINVAL;
  int nbytes = fam == 4 ? 4 : 16;
  for (int i = 0; i < nbytes; i++) {
    int keep = bits - 8 * i;
    if (keep <= 0) addr[i] = 0;
    else if (keep < 8) addr[i] &= (uint8_t)(0xff00 >> keep);
  }
  char ip[INET6_ADDRSTRLEN];
  inet_ntop(fam == 4 ? AF_INET : AF_INET6, addr, ip, sizeof ip);
  snprintf(out, 64, "%s/%d", ip, bits);
  return 0;
}

int tc_mapper_addrport_canon(const char *s, char out[64], bool *drop) {
  *drop = false;
  size_t len = strlen(s);
  const char *host, *port;
  size_t hlen;
  if (len > 0 && s[0] == '[') {
    const char *rb = strchr(s, ']');
    if (!rb || rb[1] != ':') return TC_EINVAL;
    host = s + 1;
    hlen = (size_t)(rb - host);
    port = rb + 2;
    const char *zone = memchr(host, '%', hlen);
    if (zone) {
      if (zone == host || zone + 1 == rb) return TC_EINVAL; /* "[%z]" or "[ip%]" */
      *drop = true;
      hlen = (size_t)(zone - host);
    }
  } else {
    const char *colon = strrchr(s, ':');
    if (!colon || memchr(s, ':', (size_t)(colon - s))) return TC_EINVAL; /* bare v6 needs [] */
    host = s;
    hlen = (size_t)(colon - s);
    port = colon + 1;
  }
  uint8_t addr[16];
  int fam = parse_ip(host, hlen, addr);
  if (!fam) return TC_EINVAL;
  if (s[0] == '[' && fam != 6) return TC_EINVAL;
  int p;
  if (parse_dec(port, strlen(port), 65535, &p)) return TC_EINVAL;
  if (fam == 6 && addr[0] == 0xfe && (addr[1] & 0xc0) == 0x80) *drop = true; /* fe80::/10 */
  if (fam == 4 && addr[0] == 169 && addr[1] == 254) *drop = true;              /* 169.254/16 */
  char ip[INET6_ADDRSTRLEN];
  inet_ntop(fam == 4 ? AF_INET : AF_INET6, addr, ip, sizeof ip);
  if (fam == 4) snprintf(out, 64, "%s:%d", ip, p);
  else snprintf(out, 64, "[%s]:%d", ip, p);
  return 0;
}

/* Length of the valid UTF-8 sequence at p (n bytes left), 0 if invalid. */
static size_t utf8_len(const unsigned char *p, size_t n) {
  unsigned c = p[0];
  size_t need;
  unsigned min;
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) need = 2, min = 0x80;
  else if (c >= 0xe0 && c <= 0xef) need = 3, min = 0x800;
  else if (c >= 0xf0 && c <= 0xf4) need = 4, min = 0x10000;
  else return 0;
  if (n < need) return 0;
  unsigned v = c & (0xff >> (need + 1));
  for (size_t i = 1; i < need; i++) {
    if ((p[i] & 0xc0) != 0x80) return 0;
    v = (v << 6) | (p[i] & 0x3f);
  }
  if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff)) return 0;
  return need;
}

void tc_mapper_json_str(struct tc_buf *b, const char *s) {
  tc_buf_putc(b, '"');
  if (s) {
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s);
    while (n > 0) {
      unsigned c = *p;
      if (c == '"' || c == '\\') {
        tc_buf_putc(b, '\\');
        tc_buf_putc(b, (char)c);
        p++, n--;
      } else if (c < 0x20 || c == 0x7f) {
        tc_buf_printf(b, "\\u%04x", c);
        p++, n--;
      } else if (c < 0x80) {
        tc_buf_putc(b, (char)c);
        p++, n--;
      } else {
        size_t l = utf8_len(p, n);
        if (l == 0) {
          tc_buf_puts(b, "\\ufffd");
          p++, n--;
        } else {
          tc_buf_append(b, p, l);
          p += l, n -= l;
        }
      }
    }
  }
  tc_buf_putc(b, '"');
}

void tc_mapper_key(struct tc_buf *b, bool *first, const char *name) {
  if (!*first) tc_buf_putc(b, ',');
  *first = false;
  tc_buf_putc(b, '"');
  tc_buf_puts(b, name);
  tc_buf_puts(b, "\":");
}

void tc_mapper_json_time(struct tc_buf *b, int64_t t) {
  char tmp[32];
  /* Go's time text has 4-digit years; anything outside would fail the
   * client's whole decode, so clamp instead of passing it through. */
  if (t > INT64_C(253402300799)) t = INT64_C(253402300799);
  if (t < INT64_C(-62135596800)) t = 0;
  tc_buf_putc(b, '"');
  tc_buf_puts(b, tc_time_format(t, tmp));
  tc_buf_putc(b, '"');
}

void tc_mapper_json_strv(struct tc_buf *b, const struct tc_strv *sv) {
  tc_buf_putc(b, '[');
  for (size_t i = 0; sv && i < sv->n; i++) {
    if (i) tc_buf_putc(b, ',');
    tc_mapper_json_str(b, sv->v[i]);
  }
  tc_buf_putc(b, ']');
}
