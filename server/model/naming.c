/* naming: the text rules of the model — user names (Headscale-compatible),
 * DNS-safe given names derived from hostnames, tags, and the
 * "hskey-<kind>-<prefix>-<secret>" tokens of pre-auth and API keys. Pure
 * functions; any thread. */
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model_int.h"

#define NAME_MAX_LEN 63

static bool is_lower_alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }
static bool is_alpha(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

int tc_model_validate_username(const char *name, struct tc_err *err) {
  if (!name) return tc_err_set(err, TC_EINVAL, "user name is required");
  size_t len = strlen(name);
  if (len < 2) return tc_err_set(err, TC_EINVAL, "user name must be at least 2 characters long");
  if (len > 255) return tc_err_set(err, TC_EINVAL, "user name must be at most 255 bytes long");
  const unsigned char *s = (const unsigned char *)name;
  /* Non-ASCII bytes count as letters: Headscale accepts Unicode letters and
   * we do not carry a Unicode table for the rare name that needs it. */
  if (!is_alpha(s[0]) && s[0] < 0x80)
    return tc_err_set(err, TC_EINVAL, "user name must start with a letter");
  int ats = 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = s[i];
    if (c >= 0x80 || is_alpha(c) || is_digit(c) || c == '-' || c == '.' || c == '_') continue;
    if (c == '@') {
      if (++ats > 1) return tc_err_set(err, TC_EINVAL, "user name cannot contain more than one '@'");
      continue;
    }
    if (c < 0x20 || c == 0x7f)
      return tc_err_set(err, TC_EINVAL, "user name contains a control character");
    return tc_err_set(err, TC_EINVAL, "user name contains invalid character '%c'", c);
  }
  return 0;
}

char *tc_model_sanitize_hostname(const char *hostname) {
  char out[NAME_MAX_LEN + 1];
  size_t o = 0;
  bool dash = false;
  for (const char *p = hostname ? hostname : ""; *p && o < NAME_MAX_LEN; p++) {
    char c = *p;
    if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
    if (is_lower_alnum(c)) {
      if (dash && o > 0) {
        out[o++] = '-';
        if (o >= NAME_MAX_LEN) break;
      }
      dash = false;
      out[o++] = c;
    } else {
      dash = true; /* runs of anything else become one '-', never leading */
    }
  }
  while (o > 0 && out[o - 1] == '-') o--;
  out[o] = 0;
  return tc_xstrdup(o ? out : "node");
}

int tc_model_validate_given_name(const char *name, struct tc_err *err) {
  if (!name || !*name) return tc_err_set(err, TC_EINVAL, "node name must not be empty");
  size_t len = strlen(name);
  if (len > NAME_MAX_LEN)
    return tc_err_set(err, TC_EINVAL, "node name must be at most %d characters", NAME_MAX_LEN);
  for (size_t i = 0; i < len; i++) {
    char c = name[i];
    if (!is_lower_alnum(c) && c != '-')
      return tc_err_set(err, TC_EINVAL,
                        "node name \"%.63s\" is not DNS-safe: use lowercase letters, digits and '-'",
                        name);
  }
  if (name[0] == '-' || name[len - 1] == '-')
    return tc_err_set(err, TC_EINVAL, "node name must not start or end with '-'");
  return 0;
}

char *tc_model_unique_name(const char *hostname, tc_name_taken_fn taken, void *ctx) {
  char *base = tc_model_sanitize_hostname(hostname);
  if (!taken || !taken(ctx, base)) return base;
  /* Many nodes may share one hostname, so this loop runs often: format into
   * a stack buffer rather than allocating per candidate. */
  char cand[NAME_MAX_LEN + 1];
  size_t base_len = strlen(base);
  for (unsigned i = 1;; i++) {
    char suffix[16], digits[12];
    int nd = 0;
    for (unsigned v = i; v; v /= 10) digits[nd++] = (char)('0' + v % 10);
    int sl = 0;
    suffix[sl++] = '-';
    while (nd) suffix[sl++] = digits[--nd];
    suffix[sl] = 0;
    size_t bl = base_len;
    if (bl + (size_t)sl > NAME_MAX_LEN) bl = NAME_MAX_LEN - (size_t)sl;
    while (bl > 0 && base[bl - 1] == '-') bl--; /* truncation may expose a '-' */
    memcpy(cand, base, bl);
    memcpy(cand + bl, suffix, (size_t)sl + 1);
    if (!taken(ctx, cand)) {
      free(base);
      return tc_xstrdup(cand);
    }
  }
}

int tc_model_validate_tag(const char *tag, struct tc_err *err) {
  if (!tag || strncmp(tag, "tag:", 4) != 0)
    return tc_err_set(err, TC_EINVAL, "tag \"%.80s\" must start with \"tag:\"", tag ? tag : "");
  const char *n = tag + 4;
  size_t len = strlen(n);
  if (len == 0 || len > 128) return tc_err_set(err, TC_EINVAL, "tag \"%.80s\" has a bad length", tag);
  if (!is_alpha((unsigned char)n[0]))
    return tc_err_set(err, TC_EINVAL, "tag \"%.80s\": the name must start with a letter", tag);
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)n[i];
    if (!is_alpha(c) && !is_digit(c) && c != '-' && c != '_' && c != '.')
      return tc_err_set(err, TC_EINVAL, "tag \"%.80s\" contains invalid characters", tag);
  }
  return 0;
}

/* ---- tokens ------------------------------------------------------------------ */
static void random_alnum(char *out, size_t n) {
  static const char al[] = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
  size_t o = 0;
  uint8_t buf[64];
  while (o < n) {
    tc_random(buf, sizeof buf);
    for (size_t i = 0; i < sizeof buf && o < n; i++)
      if (buf[i] < 248) out[o++] = al[buf[i] % 62]; /* 248 = 4*62: no modulo bias */
  }
  tc_wipe(buf, sizeof buf);
}

static void hash_secret(const char *secret, size_t len, uint8_t hash[32]) {
  crypto_hash_sha256(hash, (const unsigned char *)secret, len);
}

char *tc_token_new(const char *kind_prefix, char prefix[13], uint8_t hash[32]) {
  size_t kl = strlen(kind_prefix);
  size_t total = kl + TC_KEY_PREFIX_LEN + 1 + TC_KEY_SECRET_LEN;
  char *tok = tc_xmalloc(total + 1);
  memcpy(tok, kind_prefix, kl);
  /* The prefix is lowercase-only so it reads well in listings and actors. */
  random_alnum(tok + kl, TC_KEY_PREFIX_LEN);
  for (size_t i = 0; i < TC_KEY_PREFIX_LEN; i++) {
    char *c = &tok[kl + i];
    if (*c >= 'A' && *c <= 'Z') *c = (char)(*c - 'A' + 'a');
  }
  tok[kl + TC_KEY_PREFIX_LEN] = '-';
  random_alnum(tok + kl + TC_KEY_PREFIX_LEN + 1, TC_KEY_SECRET_LEN);
  tok[total] = 0;
  memcpy(prefix, tok + kl, TC_KEY_PREFIX_LEN);
  prefix[TC_KEY_PREFIX_LEN] = 0;
  hash_secret(tok + kl + TC_KEY_PREFIX_LEN + 1, TC_KEY_SECRET_LEN, hash);
  return tok;
}

int tc_token_parse(const char *tok, size_t len, const char *kind_prefix, char prefix[13],
                   uint8_t hash[32]) {
  size_t kl = strlen(kind_prefix);
  if (!tok || len != kl + TC_KEY_PREFIX_LEN + 1 + TC_KEY_SECRET_LEN) return TC_EINVAL;
  if (memcmp(tok, kind_prefix, kl) != 0) return TC_EINVAL;
  const char *p = tok + kl;
  for (size_t i = 0; i < TC_KEY_PREFIX_LEN; i++)
    if (!is_lower_alnum(p[i])) return TC_EINVAL;
  if (p[TC_KEY_PREFIX_LEN] != '-') return TC_EINVAL;
  const char *s = p + TC_KEY_PREFIX_LEN + 1;
  for (size_t i = 0; i < TC_KEY_SECRET_LEN; i++)
    if (!is_alpha((unsigned char)s[i]) && !is_digit((unsigned char)s[i])) return TC_EINVAL;
  memcpy(prefix, p, TC_KEY_PREFIX_LEN);
  prefix[TC_KEY_PREFIX_LEN] = 0;
  hash_secret(s, TC_KEY_SECRET_LEN, hash);
  return 0;
}
