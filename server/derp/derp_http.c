/* derp_http: the plain HTTP endpoints of a DERP node (doc §11.2) as pure
 * functions the HTTP router calls: /derp/probe, /derp/latency-check,
 * /generate_204 and /bootstrap-dns. Thread-safe. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "derp/derp.h"

static void add_header(struct tc_derp_http_resp *r, const char *name, const char *value) {
  if (r->nheaders >= TC_DERP_HTTP_MAX_HEADERS) return;
  snprintf(r->headers[r->nheaders].name, sizeof r->headers[0].name, "%s", name);
  snprintf(r->headers[r->nheaders].value, sizeof r->headers[0].value, "%s", value);
  r->nheaders++;
}

static void set_body(struct tc_derp_http_resp *r, const char *s) {
  r->body = tc_xstrdup(s);
  r->body_len = strlen(s);
}

/* The captive-portal challenge is echoed only if it is short and made of a
 * conservative character set, so it cannot inject into the header block. */
static bool challenge_ok(const char *c) {
  size_t n = strlen(c);
  if (n == 0 || n > 64) return false;
  for (const char *p = c; *p; p++) {
    char ch = *p;
    if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
          ch == '-' || ch == '_' || ch == ':'))
      return false;
  }
  return true;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Percent-decodes the value of `key` from a query string into out. */
static bool query_get(const char *q, const char *key, char *out, size_t outlen) {
  size_t kl = strlen(key);
  for (const char *p = q; p && *p;) {
    const char *amp = strchr(p, '&');
    const char *end = amp ? amp : p + strlen(p);
    if ((size_t)(end - p) > kl && !strncmp(p, key, kl) && p[kl] == '=') {
      size_t o = 0;
      for (const char *s = p + kl + 1; s < end; s++) {
        if (o + 1 >= outlen) return false;
        if (*s == '%' && s + 2 < end && hexval(s[1]) >= 0 && hexval(s[2]) >= 0) {
          out[o++] = (char)(hexval(s[1]) << 4 | hexval(s[2]));
          s += 2;
        } else if (*s == '+') {
          out[o++] = ' ';
        } else {
          out[o++] = *s;
        }
      }
      out[o] = 0;
      return true;
    }
    p = amp ? amp + 1 : NULL;
  }
  return false;
}

bool tc_derp_http_handle(const char *method, const char *path, const char *query, tc_derp_header_get_fn get,
                         void *get_ctx, const char *dns_json, struct tc_derp_http_resp *resp) {
  memset(resp, 0, sizeof *resp);
  if (!strcmp(path, "/derp/probe") || !strcmp(path, "/derp/latency-check")) {
    if (!strcmp(method, "GET") || !strcmp(method, "HEAD")) {
      resp->status = 200;
      add_header(resp, "Access-Control-Allow-Origin", "*");
    } else {
      resp->status = 405;
      add_header(resp, "Content-Type", "text/plain; charset=utf-8");
      set_body(resp, "bogus probe method\n");
    }
    return true;
  }
  if (!strcmp(path, "/generate_204")) {
    const char *c = get ? get(get_ctx, "X-Tailscale-Challenge") : NULL;
    if (c && challenge_ok(c)) {
      char v[80];
      snprintf(v, sizeof v, "response %s", c);
      add_header(resp, "X-Tailscale-Response", v);
    }
    add_header(resp, "Cache-Control", "no-cache, no-store, must-revalidate, no-transform, max-age=0");
    resp->status = 204;
    return true;
  }
  if (!strcmp(path, "/bootstrap-dns")) {
    resp->status = 200;
    add_header(resp, "Content-Type", "application/json");
    add_header(resp, "Connection", "close");
    json_t *cache = dns_json ? json_loads(dns_json, 0, NULL) : NULL;
    if (!json_is_object(cache)) {
      json_decref(cache);
      cache = json_object();
    }
    char q[256];
    json_t *out;
    json_t *hit = query_get(query ? query : "", "q", q, sizeof q) && *q ? json_object_get(cache, q) : NULL;
    if (hit) {
      /* a name we know: answer just that name */
      out = json_object();
      json_object_set(out, q, hit);
    } else {
      /* like derper: otherwise the whole published cache */
      out = json_incref(cache);
    }
    char *s = json_dumps(out, JSON_COMPACT);
    resp->body = s ? s : tc_xstrdup("{}");
    resp->body_len = strlen(resp->body);
    json_decref(out);
    json_decref(cache);
    return true;
  }
  return false;
}
