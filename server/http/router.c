/* router: method + path pattern matching, response helpers and the
 * grpc-gateway error shape. Independent of libmicrohttpd so the CLI can
 * dispatch in-process. Registration is single-threaded (before serving);
 * dispatch is read-only and runs on any thread. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/http.h"

#define MAX_SEGS 16

struct route {
  char *method;
  char *pattern;
  size_t nsegs;
  char *segs[MAX_SEGS]; /* literal text, or "{name}" / "{name*}" */
  tc_http_handler fn;
  void *ctx;
};

struct tc_router {
  struct route *routes;
  size_t n, cap;
  tc_http_observer observer;
  void *observer_ctx;
};

/* ---- request / response helpers ------------------------------------------- */

static const char *kv_get(const struct tc_http_kv *kv, size_t n, const char *name) {
  for (size_t i = 0; i < n; i++)
    if (!strcmp(kv[i].name, name)) return kv[i].value;
  return NULL;
}

const char *tc_http_param(const struct tc_http_req *req, const char *name) {
  return kv_get(req->params, req->nparams, name);
}

const char *tc_http_query(const struct tc_http_req *req, const char *name) {
  return kv_get(req->query, req->nquery, name);
}

const char *tc_http_header(const struct tc_http_req *req, const char *name) {
  return req->header_fn ? req->header_fn(req, name) : NULL;
}

void tc_http_resp_json(struct tc_http_resp *resp, int status, json_t *json) {
  tc_buf_reset(&resp->body);
  resp->status = status;
  resp->content_type = NULL;
  if (!json) {
    tc_buf_puts(&resp->body, "{}");
    return;
  }
  char *s = json_dumps(json, JSON_COMPACT | JSON_ENCODE_ANY);
  tc_buf_puts(&resp->body, s ? s : "{}");
  free(s);
  json_decref(json);
}

void tc_http_resp_text(struct tc_http_resp *resp, int status, const char *content_type, const char *body,
                       size_t len) {
  tc_buf_reset(&resp->body);
  resp->status = status;
  resp->content_type = content_type;
  tc_buf_append(&resp->body, body, len);
}

void tc_http_resp_error(struct tc_http_resp *resp, int status, int grpc_code, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  json_t *o = json_pack("{s:i,s:s,s:[]}", "code", grpc_code, "message", msg, "details");
  if (!o) /* message was not valid UTF-8 */
    o = json_pack("{s:i,s:s,s:[]}", "code", grpc_code, "message", "(unprintable message)", "details");
  tc_http_resp_json(resp, status, o);
}

int tc_http_status_for(int code) {
  switch (code) {
  case TC_OK: return 200;
  case TC_EINVAL: return 400;
  case TC_ENOENT: return 404;
  case TC_EEXIST: return 409;
  case TC_EPERM: return 403;
  case TC_ECONFLICT: return 409;
  case TC_EEXPIRED: return 400;
  case TC_ETOOBIG: return 413;
  case TC_EPROTO: return 400;
  case TC_EAGAIN: return 503;
  case TC_EDB: return 500;
  default: return 500;
  }
}

int tc_http_grpc_for(int code) {
  switch (code) {
  case TC_OK: return TC_GRPC_OK;
  case TC_EINVAL: return TC_GRPC_INVALID_ARGUMENT;
  case TC_ENOENT: return TC_GRPC_NOT_FOUND;
  case TC_EEXIST: return TC_GRPC_ALREADY_EXISTS;
  case TC_EPERM: return TC_GRPC_PERMISSION_DENIED;
  case TC_ECONFLICT: return TC_GRPC_ABORTED;
  case TC_EEXPIRED: return TC_GRPC_FAILED_PRECONDITION;
  case TC_ETOOBIG: return TC_GRPC_RESOURCE_EXHAUSTED;
  case TC_EPROTO: return TC_GRPC_INVALID_ARGUMENT;
  case TC_EAGAIN: return TC_GRPC_UNAVAILABLE;
  default: return TC_GRPC_INTERNAL;
  }
}

void tc_http_resp_tc_err(struct tc_http_resp *resp, int code, const char *msg) {
  tc_http_resp_error(resp, tc_http_status_for(code), tc_http_grpc_for(code), "%s",
                     msg && *msg ? msg : tc_strerror(code));
}

void tc_http_resp_header(struct tc_http_resp *resp, const char *name, const char *value) {
  if (resp->nheaders >= TC_HTTP_RESP_HEADERS_MAX) return;
  resp->headers[resp->nheaders].name = tc_xstrdup(name);
  resp->headers[resp->nheaders].value = tc_xstrdup(value);
  resp->nheaders++;
}

void tc_http_resp_free(struct tc_http_resp *resp) {
  if (!resp) return;
  tc_buf_free(&resp->body);
  for (size_t i = 0; i < resp->nheaders; i++) {
    free(resp->headers[i].name);
    free(resp->headers[i].value);
  }
  resp->nheaders = 0;
}

/* ---- router ---------------------------------------------------------------- */

struct tc_router *tc_router_new(void) { return tc_xcalloc(1, sizeof(struct tc_router)); }

void tc_router_free(struct tc_router *r) {
  if (!r) return;
  for (size_t i = 0; i < r->n; i++) {
    free(r->routes[i].method);
    free(r->routes[i].pattern);
    for (size_t j = 0; j < r->routes[i].nsegs; j++) free(r->routes[i].segs[j]);
  }
  free(r->routes);
  free(r);
}

void tc_router_set_observer(struct tc_router *r, tc_http_observer fn, void *ctx) {
  r->observer = fn;
  r->observer_ctx = ctx;
}

static bool seg_is_capture(const char *s) { return s[0] == '{'; }
static bool seg_is_rest(const char *s) { size_t n = strlen(s); return n > 3 && s[n - 2] == '*'; }

/* Splits a path into segments (without empty ones from "//" or a trailing
 * '/'). Returns the count or -1 when there are too many. segs point into buf. */
static int split_path(char *buf, char **segs, int max) {
  int n = 0;
  char *p = buf;
  while (*p) {
    while (*p == '/') *p++ = 0;
    if (!*p) break;
    if (n == max) return -1;
    segs[n++] = p;
    while (*p && *p != '/') p++;
  }
  return n;
}

int tc_http_route(struct tc_router *r, const char *method, const char *pattern, tc_http_handler fn,
                  void *ctx) {
  if (!r || !method || !pattern || pattern[0] != '/' || !fn) return TC_EINVAL;
  char *buf = tc_xstrdup(pattern);
  char *segs[MAX_SEGS];
  int n = split_path(buf, segs, MAX_SEGS);
  int rc = TC_OK;
  if (n < 0) {
    rc = TC_EINVAL;
    goto out;
  }
  for (int i = 0; i < n; i++) {
    size_t len = strlen(segs[i]);
    if (segs[i][0] == '{') {
      if (len < 3 || segs[i][len - 1] != '}') {
        rc = TC_EINVAL;
        goto out;
      }
      if (seg_is_rest(segs[i]) && i != n - 1) {
        rc = TC_EINVAL;
        goto out;
      }
    }
  }
  for (size_t i = 0; i < r->n; i++)
    if (!strcmp(r->routes[i].pattern, pattern) && !strcmp(r->routes[i].method, method)) {
      rc = TC_EEXIST;
      goto out;
    }
  if (r->n == r->cap) {
    r->cap = r->cap ? r->cap * 2 : 32;
    r->routes = tc_xrealloc(r->routes, r->cap * sizeof *r->routes);
  }
  struct route *rt = &r->routes[r->n++];
  memset(rt, 0, sizeof *rt);
  rt->method = tc_xstrdup(method);
  rt->pattern = tc_xstrdup(pattern);
  rt->nsegs = (size_t)n;
  for (int i = 0; i < n; i++) rt->segs[i] = tc_xstrdup(segs[i]);
  rt->fn = fn;
  rt->ctx = ctx;
out:
  free(buf);
  return rc;
}

/* Match score: -1 no match; otherwise higher = more literal segments, so
 * /api/v1/node/register beats /api/v1/node/{id}. */
static int match(const struct route *rt, char **segs, int n) {
  int score = 0;
  for (size_t i = 0; i < rt->nsegs; i++) {
    const char *ps = rt->segs[i];
    if (seg_is_capture(ps) && seg_is_rest(ps)) {
      return score;
    }
    if ((int)i >= n) return -1;
    if (seg_is_capture(ps)) continue;
    if (strcmp(ps, segs[i])) return -1;
    score += 2;
  }
  return (int)rt->nsegs == n ? score + 1 : -1;
}

void tc_router_dispatch(struct tc_router *r, struct tc_http_req *req, struct tc_http_resp *resp) {
  char *buf = tc_xstrdup(req->path ? req->path : "/");
  /* copy kept intact for captures of the rest (segments in buf get NULs) */
  char *orig = tc_xstrdup(req->path ? req->path : "/");
  char *segs[MAX_SEGS + 1];
  int n = split_path(buf, segs, MAX_SEGS + 1);
  const struct route *best = NULL;
  int best_score = -1;
  bool path_matched = false;
  char *rest_copy = NULL;
  req->route = "";
  if (n >= 0) {
    for (size_t i = 0; i < r->n; i++) {
      int sc = match(&r->routes[i], segs, n);
      if (sc < 0) continue;
      path_matched = true;
      if (strcmp(r->routes[i].method, "*") && strcmp(r->routes[i].method, req->method)) continue;
      if (sc > best_score) {
        best_score = sc;
        best = &r->routes[i];
      }
    }
  }
  if (!best && path_matched && !strcmp(req->method, "HEAD")) {
    /* HEAD is GET without a body (the transport drops it) */
    for (size_t i = 0; n >= 0 && i < r->n; i++) {
      int sc = match(&r->routes[i], segs, n);
      if (sc > best_score && !strcmp(r->routes[i].method, "GET")) {
        best_score = sc;
        best = &r->routes[i];
      }
    }
  }
  if (!best) {
    if (path_matched)
      tc_http_resp_error(resp, 405, TC_GRPC_UNIMPLEMENTED, "Method Not Allowed");
    else
      tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "Not Found");
    goto out;
  }
  /* Handlers ask for "name"; the route stores "{name}" / "{name*}". */
  char names[TC_HTTP_PARAMS_MAX][64];
  req->nparams = 0;
  for (size_t i = 0; i < best->nsegs && req->nparams < TC_HTTP_PARAMS_MAX; i++) {
    const char *ps = best->segs[i];
    if (!seg_is_capture(ps)) continue;
    bool rest = seg_is_rest(ps);
    size_t len = strlen(ps) - 2 - (rest ? 1 : 0);
    if (len >= sizeof names[0]) len = sizeof names[0] - 1;
    char *name = names[req->nparams];
    memcpy(name, ps + 1, len);
    name[len] = 0;
    struct tc_http_kv *kv = &req->params[req->nparams++];
    kv->name = name;
    if (rest) {
      /* the rest of the original path from segment i on, slashes kept */
      const char *p = orig;
      for (size_t k = 0; k < i; k++) {
        while (*p == '/') p++;
        while (*p && *p != '/') p++;
      }
      while (*p == '/') p++;
      rest_copy = tc_xstrdup(p);
      kv->value = rest_copy;
    } else {
      kv->value = segs[i];
    }
  }
  req->route = best->pattern;
  best->fn(best->ctx, req, resp);
  if (!resp->status) resp->status = 500;
  req->nparams = 0; /* names/values die with this frame */
out:
  if (r->observer) r->observer(r->observer_ctx, req, resp->status);
  free(rest_copy);
  free(buf);
  free(orig);
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

char *tc_http_pct_decode(const char *src, size_t len, bool form) {
  char *out = tc_xmalloc(len + 1);
  size_t o = 0;
  for (size_t i = 0; i < len; i++) {
    char c = src[i];
    if (c == '%') {
      if (i + 2 >= len) goto bad;
      int h = hexval(src[i + 1]), l = hexval(src[i + 2]);
      if (h < 0 || l < 0) goto bad;
      c = (char)(h * 16 + l);
      if (!c) goto bad;
      i += 2;
    } else if (c == '+' && form) {
      c = ' ';
    } else if (!c) {
      goto bad;
    }
    out[o++] = c;
  }
  out[o] = 0;
  return out;
bad:
  free(out);
  return NULL;
}

void tc_router_dispatch_raw(struct tc_router *r, const char *method, const char *target, const char *body,
                            size_t body_len, bool trusted, struct tc_http_resp *resp) {
  struct tc_http_req req;
  memset(&req, 0, sizeof req);
  char *owned[2 * TC_HTTP_QUERY_MAX + 1];
  size_t nowned = 0;
  const char *q = strchr(target, '?');
  size_t plen = q ? (size_t)(q - target) : strlen(target);
  char *path = tc_http_pct_decode(target, plen, false);
  if (!path) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "malformed path");
    return;
  }
  owned[nowned++] = path;
  if (q) {
    const char *p = q + 1;
    while (*p && req.nquery < TC_HTTP_QUERY_MAX) {
      const char *amp = strchr(p, '&');
      size_t l = amp ? (size_t)(amp - p) : strlen(p);
      const char *eq = memchr(p, '=', l);
      size_t kl = eq ? (size_t)(eq - p) : l;
      char *k = tc_http_pct_decode(p, kl, true);
      char *v = eq ? tc_http_pct_decode(eq + 1, l - kl - 1, true) : tc_xstrdup("");
      if (k && v && *k) {
        owned[nowned++] = k;
        owned[nowned++] = v;
        req.query[req.nquery].name = k;
        req.query[req.nquery].value = v;
        req.nquery++;
      } else {
        free(k);
        free(v);
      }
      if (!amp) break;
      p = amp + 1;
    }
  }
  req.method = method;
  req.path = path;
  req.body = body ? body : "";
  req.body_len = body ? body_len : 0;
  req.trusted = trusted;
  req.peer = "local";
  tc_router_dispatch(r, &req, resp);
  for (size_t i = 0; i < nowned; i++) free(owned[i]);
}
