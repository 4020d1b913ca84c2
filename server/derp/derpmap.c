/* derpmap: builds the DERPMap clients receive (tailcfg shape) from the
 * embedded region, derp.urls (JSON over HTTP(S), libcurl) and derp.paths
 * (YAML or JSON files), merged the way Headscale does: urls, then paths,
 * then the embedded region; a later source replaces a region with the same
 * ID, and a region given as null removes it (Headscale's documented way to
 * disable e.g. region 1).
 *
 * Every source keeps its last good map, so a URL that starts failing does
 * not make its regions vanish. The merged map is dumped to canonical JSON
 * (Go's field order and omitempty rules, regions sorted by ID) and the
 * change callback fires only when that text changes.
 *
 * Threads: the refresh thread and tc_derpmap_refresh_now serialise on
 * refresh_mu; readers take mu only to copy the current text/object. */
#include <arpa/inet.h>
#include <ctype.h>
#include <netdb.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <curl/curl.h>
#include <jansson.h>
#include <yaml.h>

#include "derp/derp.h"

#define MAX_SOURCE_BYTES (4u << 20)

/* ---- YAML -> jansson -------------------------------------------------------
 * Scalars become strings (plain null/~/empty become null); the normaliser
 * coerces them per field, as yaml.v3 does when decoding into Go types. */

static json_t *yaml_node_to_json(yaml_document_t *doc, yaml_node_t *n, int depth) {
  if (!n || depth > 32) return NULL;
  switch (n->type) {
    case YAML_SCALAR_NODE: {
      const char *v = (const char *)n->data.scalar.value;
      size_t l = n->data.scalar.length;
      if (n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
          (l == 0 || !strcmp(v, "~") || !strcmp(v, "null") || !strcmp(v, "Null") || !strcmp(v, "NULL")))
        return json_null();
      return json_stringn(v, l);
    }
    case YAML_SEQUENCE_NODE: {
      json_t *a = json_array();
      for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top; it++) {
        json_t *e = yaml_node_to_json(doc, yaml_document_get_node(doc, *it), depth + 1);
        if (!e) {
          json_decref(a);
          return NULL;
        }
        json_array_append_new(a, e);
      }
      return a;
    }
    case YAML_MAPPING_NODE: {
      json_t *o = json_object();
      for (yaml_node_pair_t *p = n->data.mapping.pairs.start; p < n->data.mapping.pairs.top; p++) {
        yaml_node_t *k = yaml_document_get_node(doc, p->key);
        if (!k || k->type != YAML_SCALAR_NODE) {
          json_decref(o);
          return NULL;
        }
        json_t *v = yaml_node_to_json(doc, yaml_document_get_node(doc, p->value), depth + 1);
        if (!v) {
          json_decref(o);
          return NULL;
        }
        char *key = tc_xstrndup((const char *)k->data.scalar.value, k->data.scalar.length);
        json_object_set_new(o, key, v);
        free(key);
      }
      return o;
    }
    default: return NULL;
  }
}

static int yaml_to_json(const char *text, size_t len, json_t **out, struct tc_err *err) {
  yaml_parser_t p;
  yaml_document_t doc;
  int rc = 0;
  *out = NULL;
  if (!yaml_parser_initialize(&p)) return tc_err_set(err, TC_EINTERNAL, "yaml: init failed");
  yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
  if (!yaml_parser_load(&p, &doc)) {
    rc = tc_err_set(err, TC_EINVAL, "yaml: %s at line %zu", p.problem ? p.problem : "parse error",
                    p.problem_mark.line + 1);
    yaml_parser_delete(&p);
    return rc;
  }
  yaml_node_t *root = yaml_document_get_root_node(&doc);
  if (!root) {
    *out = json_object(); /* an empty document is an empty map */
  } else if (!(*out = yaml_node_to_json(&doc, root, 0))) {
    rc = tc_err_set(err, TC_EINVAL, "yaml: unsupported structure (non-scalar keys or too deep)");
  }
  yaml_document_delete(&doc);
  yaml_parser_delete(&p);
  return rc;
}

/* ---- normalising into canonical tailcfg shape ------------------------------ */

static json_t *get_ci(json_t *o, const char *name) {
  const char *k;
  json_t *v;
  json_object_foreach(o, k, v) if (!strcasecmp(k, name)) return v;
  return NULL;
}

enum ftype { F_STR, F_INT, F_BOOL, F_NUM };

struct field {
  const char *name;
  enum ftype t;
};

static const struct field k_node_fields[] = {
    {"Name", F_STR},      {"RegionID", F_INT},         {"HostName", F_STR},   {"CertName", F_STR},
    {"IPv4", F_STR},      {"IPv6", F_STR},             {"STUNPort", F_INT},   {"STUNOnly", F_BOOL},
    {"DERPPort", F_INT},  {"InsecureForTests", F_BOOL}, {"STUNTestIP", F_STR}, {"CanPort80", F_BOOL},
};

static const struct field k_region_fields[] = {
    {"RegionID", F_INT}, {"RegionCode", F_STR},     {"RegionName", F_STR},
    {"Latitude", F_NUM}, {"Longitude", F_NUM},      {"Avoid", F_BOOL},
    {"NoMeasureNoHome", F_BOOL},
};

static int parse_i64(const char *s, long long *v) {
  char *end;
  errno = 0;
  long long x = strtoll(s, &end, 10);
  if (!*s || *end || errno) return -1;
  *v = x;
  return 0;
}

/* Converts v to the field's type into *out (new reference); JSON input is
 * typed strictly like Go's decoder, YAML scalars are coerced from text. */
static int coerce(json_t *v, enum ftype t, bool yaml, json_t **out) {
  *out = NULL;
  if (json_is_null(v)) return 0; /* null leaves the zero value */
  if (yaml && json_is_string(v)) {
    const char *s = json_string_value(v);
    long long i;
    double d;
    char *end;
    switch (t) {
      case F_STR: *out = json_string(s); return 0;
      case F_INT:
        if (parse_i64(s, &i)) return -1;
        *out = json_integer(i);
        return 0;
      case F_BOOL:
        if (!strcmp(s, "true") || !strcmp(s, "True") || !strcmp(s, "TRUE")) *out = json_true();
        else if (!strcmp(s, "false") || !strcmp(s, "False") || !strcmp(s, "FALSE")) *out = json_false();
        else return -1;
        return 0;
      case F_NUM:
        d = strtod(s, &end);
        if (!*s || *end || !isfinite(d)) return -1;
        *out = json_real(d);
        return 0;
    }
  }
  switch (t) {
    case F_STR:
      if (!json_is_string(v)) return -1;
      *out = json_incref(v);
      return 0;
    case F_INT:
      if (json_is_integer(v)) {
        *out = json_incref(v);
        return 0;
      }
      return -1;
    case F_BOOL:
      if (!json_is_boolean(v)) return -1;
      *out = json_incref(v);
      return 0;
    case F_NUM:
      if (!json_is_number(v)) return -1;
      *out = json_real(json_number_value(v));
      return 0;
  }
  return -1;
}

static int norm_fields(json_t *in, const struct field *fs, size_t nf, bool yaml, json_t *out, const char *what,
                       struct tc_err *err) {
  for (size_t i = 0; i < nf; i++) {
    json_t *v = get_ci(in, fs[i].name);
    if (!v) continue;
    json_t *c;
    if (coerce(v, fs[i].t, yaml, &c) != 0)
      return tc_err_set(err, TC_EINVAL, "derpmap: %s field %s has the wrong type", what, fs[i].name);
    if (c) json_object_set_new(out, fs[i].name, c);
  }
  return 0;
}

static int norm_region(json_t *in, long long id, bool yaml, json_t **out, struct tc_err *err) {
  *out = NULL;
  if (!json_is_object(in)) return tc_err_set(err, TC_EINVAL, "derpmap: region %lld is not an object", id);
  json_t *r = json_object();
  int rc = norm_fields(in, k_region_fields, TC_ARRAY_LEN(k_region_fields), yaml, r, "region", err);
  if (rc) goto fail;
  json_int_t rid = json_integer_value(json_object_get(r, "RegionID"));
  if (rid == 0) json_object_set_new(r, "RegionID", json_integer(id));
  else if (rid != id) {
    rc = tc_err_set(err, TC_EINVAL, "derpmap: region key %lld has RegionID %lld", id, (long long)rid);
    goto fail;
  }
  json_t *nodes = json_array();
  json_object_set_new(r, "Nodes", nodes);
  json_t *innodes = get_ci(in, "Nodes");
  if (innodes && !json_is_null(innodes)) {
    if (!json_is_array(innodes)) {
      rc = tc_err_set(err, TC_EINVAL, "derpmap: region %lld Nodes is not a list", id);
      goto fail;
    }
    size_t i;
    json_t *n;
    json_array_foreach(innodes, i, n) {
      if (json_is_null(n)) continue; /* a nil node pointer: skip rather than emit null */
      if (!json_is_object(n)) {
        rc = tc_err_set(err, TC_EINVAL, "derpmap: region %lld node %zu is not an object", id, i);
        goto fail;
      }
      json_t *no = json_object();
      json_array_append_new(nodes, no);
      if ((rc = norm_fields(n, k_node_fields, TC_ARRAY_LEN(k_node_fields), yaml, no, "node", err))) goto fail;
      if (json_integer_value(json_object_get(no, "RegionID")) == 0)
        json_object_set_new(no, "RegionID", json_integer(id));
    }
  }
  *out = r;
  return 0;
fail:
  json_decref(r);
  return rc;
}

int tc_derpmap_parse(const char *text, size_t len, bool yaml, json_t **out, struct tc_err *err) {
  *out = NULL;
  json_t *root = NULL, *res = NULL;
  int rc;
  if (yaml) {
    if ((rc = yaml_to_json(text, len, &root, err))) return rc;
  } else {
    json_error_t je;
    root = json_loadb(text, len, JSON_DECODE_ANY, &je);
    if (!root) return tc_err_set(err, TC_EINVAL, "derpmap: JSON line %d: %s", je.line, je.text);
  }
  if (!json_is_object(root)) {
    rc = tc_err_set(err, TC_EINVAL, "derpmap: the document is not an object");
    goto out;
  }
  res = json_object();
  json_t *regions = json_object();
  json_object_set_new(res, "Regions", regions);
  json_t *in = get_ci(root, "Regions");
  if (in && !json_is_null(in)) {
    if (!json_is_object(in)) {
      rc = tc_err_set(err, TC_EINVAL, "derpmap: Regions is not a map");
      goto out;
    }
    const char *k;
    json_t *v;
    json_object_foreach(in, k, v) {
      long long id;
      if (parse_i64(k, &id) || id <= 0 || id > (1LL << 53) - 1) {
        rc = tc_err_set(err, TC_EINVAL, "derpmap: region key \"%s\" is not a positive integer", k);
        goto out;
      }
      char key[24];
      snprintf(key, sizeof key, "%lld", id);
      if (json_is_null(v)) {
        json_object_set_new(regions, key, json_null());
        continue;
      }
      json_t *r;
      if ((rc = norm_region(v, id, yaml, &r, err))) goto out;
      json_object_set_new(regions, key, r);
    }
  }
  *out = res;
  res = NULL;
  rc = 0;
out:
  json_decref(root);
  json_decref(res);
  return rc;
}

json_t *tc_derpmap_merge(json_t *const *maps, size_t n) {
  json_t *regions = json_object();
  for (size_t i = 0; i < n; i++) {
    if (!maps[i]) continue;
    json_t *r = json_object_get(maps[i], "Regions");
    const char *k;
    json_t *v;
    json_object_foreach(r, k, v) {
      if (json_is_null(v)) json_object_del(regions, k);
      else json_object_set_new(regions, k, json_deep_copy(v));
    }
  }
  json_t *res = json_object();
  json_object_set_new(res, "Regions", regions);
  return res;
}

/* ---- canonical dump ---------------------------------------------------------- */

static void put_str(struct tc_buf *b, const char *s) {
  tc_buf_putc(b, '"');
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p == '"' || *p == '\\') {
      tc_buf_putc(b, '\\');
      tc_buf_putc(b, (char)*p);
    } else if (*p < 0x20 || *p == '<' || *p == '>' || *p == '&') {
      /* Go's encoder escapes control characters and <, >, & as \u00XX */
      tc_buf_printf(b, "\\u%04x", *p);
    } else {
      tc_buf_putc(b, (char)*p);
    }
  }
  tc_buf_putc(b, '"');
}

/* Shortest text that reads back as the same double, like Go's 'g' -1. */
static void put_num(struct tc_buf *b, double d) {
  char tmp[40];
  for (int prec = 1; prec <= 17; prec++) {
    snprintf(tmp, sizeof tmp, "%.*g", prec, d);
    if (strtod(tmp, NULL) == d) break;
  }
  tc_buf_puts(b, tmp);
}

static void dump_fields(struct tc_buf *b, json_t *o, const struct field *fs, size_t nf, bool *first,
                        const char *const *always) {
  for (size_t i = 0; i < nf; i++) {
    json_t *v = json_object_get(o, fs[i].name);
    bool must = false;
    for (const char *const *a = always; *a; a++)
      if (!strcmp(*a, fs[i].name)) must = true;
    bool zero = !v || (fs[i].t == F_STR && !*json_string_value(v)) ||
                (fs[i].t == F_INT && json_integer_value(v) == 0) || (fs[i].t == F_BOOL && !json_is_true(v)) ||
                (fs[i].t == F_NUM && json_number_value(v) == 0);
    if (zero && !must) continue;
    if (!*first) tc_buf_putc(b, ',');
    *first = false;
    put_str(b, fs[i].name);
    tc_buf_putc(b, ':');
    switch (fs[i].t) {
      case F_STR: put_str(b, v ? json_string_value(v) : ""); break;
      case F_INT: tc_buf_printf(b, "%lld", v ? (long long)json_integer_value(v) : 0LL); break;
      case F_BOOL: tc_buf_puts(b, v && json_is_true(v) ? "true" : "false"); break;
      case F_NUM: put_num(b, v ? json_number_value(v) : 0); break;
    }
  }
}

static int cmp_ll(const void *a, const void *b) {
  long long x = *(const long long *)a, y = *(const long long *)b;
  return x < y ? -1 : x > y;
}

char *tc_derpmap_dump(json_t *map) {
  struct tc_buf b = TC_BUF_INIT;
  json_t *regions = json_object_get(map, "Regions");
  size_t n = json_is_object(regions) ? json_object_size(regions) : 0;
  long long *ids = tc_xcalloc(n ? n : 1, sizeof *ids);
  size_t k = 0;
  const char *key;
  json_t *v;
  json_object_foreach(regions, key, v) {
    long long id;
    if (json_is_object(v) && parse_i64(key, &id) == 0) ids[k++] = id;
  }
  qsort(ids, k, sizeof *ids, cmp_ll);
  /* Go field order of tailcfg.DERPRegion / DERPNode; fields without
   * omitempty are always written */
  static const char *const region_always[] = {"RegionID", "RegionCode", "RegionName", NULL};
  static const char *const node_always[] = {"Name", "RegionID", "HostName", NULL};
  tc_buf_puts(&b, "{\"Regions\":{");
  for (size_t i = 0; i < k; i++) {
    char ks[24];
    snprintf(ks, sizeof ks, "%lld", ids[i]);
    json_t *r = json_object_get(regions, ks);
    if (i) tc_buf_putc(&b, ',');
    put_str(&b, ks);
    tc_buf_puts(&b, ":{");
    bool first = true;
    dump_fields(&b, r, k_region_fields, TC_ARRAY_LEN(k_region_fields), &first, region_always);
    tc_buf_puts(&b, ",\"Nodes\":[");
    json_t *nodes = json_object_get(r, "Nodes");
    size_t j;
    json_t *nd;
    json_array_foreach(nodes, j, nd) {
      if (j) tc_buf_putc(&b, ',');
      tc_buf_putc(&b, '{');
      bool nf = true;
      dump_fields(&b, nd, k_node_fields, TC_ARRAY_LEN(k_node_fields), &nf, node_always);
      tc_buf_putc(&b, '}');
    }
    tc_buf_puts(&b, "]}");
  }
  tc_buf_puts(&b, "}}");
  free(ids);
  return tc_buf_steal(&b, NULL);
}

/* ---- the embedded region ------------------------------------------------------ */

static int url_host_port(const char *url, char *host, size_t hostlen, int *port, struct tc_err *err) {
  const char *p = strstr(url, "://");
  if (!p) return tc_err_set(err, TC_EINVAL, "derpmap: server_url %s has no scheme", url);
  bool https = (size_t)(p - url) == 5 && !strncasecmp(url, "https", 5);
  bool http = (size_t)(p - url) == 4 && !strncasecmp(url, "http", 4);
  if (!https && !http) return tc_err_set(err, TC_EINVAL, "derpmap: server_url %s is not http(s)", url);
  p += 3;
  const char *end = p + strcspn(p, "/?#");
  const char *at = memchr(p, '@', (size_t)(end - p));
  if (at) p = at + 1;
  const char *hs = p, *he;
  const char *portp = NULL;
  if (*p == '[') {
    const char *rb = memchr(p, ']', (size_t)(end - p));
    if (!rb) return tc_err_set(err, TC_EINVAL, "derpmap: server_url %s: bad IPv6 host", url);
    hs = p + 1;
    he = rb;
    if (rb + 1 < end && rb[1] == ':') portp = rb + 2;
  } else {
    const char *c = memchr(p, ':', (size_t)(end - p));
    he = c ? c : end;
    if (c) portp = c + 1;
  }
  if (he <= hs || (size_t)(he - hs) >= hostlen)
    return tc_err_set(err, TC_EINVAL, "derpmap: server_url %s: bad host", url);
  memcpy(host, hs, (size_t)(he - hs));
  host[he - hs] = 0;
  if (portp) {
    char tmp[8];
    size_t pl = (size_t)(end - portp);
    long long v;
    if (pl == 0 || pl >= sizeof tmp) return tc_err_set(err, TC_EINVAL, "derpmap: server_url %s: bad port", url);
    memcpy(tmp, portp, pl);
    tmp[pl] = 0;
    if (parse_i64(tmp, &v) || v <= 0 || v > 65535)
      return tc_err_set(err, TC_EINVAL, "derpmap: server_url %s: bad port", url);
    *port = (int)v;
  } else {
    *port = 0; /* the scheme's, decided by the caller */
  }
  return 0;
}

json_t *tc_derpmap_embedded_region(const struct tc_derpmap_params *p, struct tc_err *err) {
  if (p->region_id <= 0) {
    tc_err_set(err, TC_EINVAL, "derpmap: derp.server.region_id must be positive");
    return NULL;
  }
  char host[256];
  int port = 0;
  if (!p->server_url || url_host_port(p->server_url, host, sizeof host, &port, err)) {
    if (!p->server_url) tc_err_set(err, TC_EINVAL, "derpmap: server_url is required for the embedded region");
    return NULL;
  }
  /* DERP is reached where the control URL is: with a port-less URL that is
   * the scheme's port, whatever listen_addr says (a forward maps it). */
  if (!port) port = !strncasecmp(p->server_url, "https", 5) ? 443 : 80;
  /* An IP literal host needs no DNS; naming the address also stops the
   * client racing a dial over the other family that cannot succeed
   * ("none" is tailcfg's conventional "do not use this family"). */
  const char *ipv4 = p->ipv4 && *p->ipv4 ? p->ipv4 : NULL;
  const char *ipv6 = p->ipv6 && *p->ipv6 ? p->ipv6 : NULL;
  unsigned char abuf[16];
  if (!ipv4 && !ipv6) {
    if (inet_pton(AF_INET, host, abuf) == 1) ipv4 = host, ipv6 = "none";
    else if (inet_pton(AF_INET6, host, abuf) == 1) ipv6 = host, ipv4 = "none";
  }
  int stun_port = 3478;
  if (p->stun_listen_addr && *p->stun_listen_addr) {
    const char *c = strrchr(p->stun_listen_addr, ':');
    long long v;
    if (!c || parse_i64(c + 1, &v) || v < 0 || v > 65535) {
      tc_err_set(err, TC_EINVAL, "derpmap: stun_listen_addr %s has no valid port", p->stun_listen_addr);
      return NULL;
    }
    stun_port = (int)v;
  }
  char name[24];
  snprintf(name, sizeof name, "%d", p->region_id); /* Headscale names the node after the region */
  json_t *node = json_object();
  json_object_set_new(node, "Name", json_string(name));
  json_object_set_new(node, "RegionID", json_integer(p->region_id));
  json_object_set_new(node, "HostName", json_string(host));
  if (ipv4) json_object_set_new(node, "IPv4", json_string(ipv4));
  if (ipv6) json_object_set_new(node, "IPv6", json_string(ipv6));
  json_object_set_new(node, "STUNPort", json_integer(stun_port));
  json_object_set_new(node, "DERPPort", json_integer(port));
  if (p->insecure_tls) json_object_set_new(node, "InsecureForTests", json_true());
  json_t *r = json_object();
  json_object_set_new(r, "RegionID", json_integer(p->region_id));
  json_object_set_new(r, "RegionCode", json_string(p->region_code ? p->region_code : ""));
  json_object_set_new(r, "RegionName", json_string(p->region_name ? p->region_name : ""));
  json_t *nodes = json_array();
  json_array_append_new(nodes, node);
  json_object_set_new(r, "Nodes", nodes);
  return r;
}

/* ---- sources ------------------------------------------------------------------------ */

struct fetch_buf {
  struct tc_buf b;
  bool too_big;
};

static size_t on_data(char *p, size_t sz, size_t n, void *ud) {
  struct fetch_buf *f = ud;
  size_t l = sz * n;
  if (f->b.len + l > MAX_SOURCE_BYTES) {
    f->too_big = true;
    return 0;
  }
  tc_buf_append(&f->b, p, l);
  return l;
}

static int fetch_url(const char *url, long timeout_ms, json_t **out, struct tc_err *err) {
  *out = NULL;
  CURL *h = curl_easy_init();
  if (!h) return tc_err_set(err, TC_EINTERNAL, "derpmap: curl init failed");
  struct fetch_buf f = {TC_BUF_INIT, false};
  char ebuf[CURL_ERROR_SIZE] = "";
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &f);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(h, CURLOPT_MAXREDIRS, 3L);
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, ebuf);
  curl_easy_setopt(h, CURLOPT_USERAGENT, "tailcoat-derpmap");
  CURLcode cc = curl_easy_perform(h);
  long status = 0;
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(h);
  int rc;
  if (f.too_big) rc = tc_err_set(err, TC_ETOOBIG, "derpmap: %s: body over %u bytes", url, MAX_SOURCE_BYTES);
  else if (cc != CURLE_OK) rc = tc_err_set(err, TC_EIO, "derpmap: %s: %s", url, *ebuf ? ebuf : curl_easy_strerror(cc));
  else if (status != 200) rc = tc_err_set(err, TC_EIO, "derpmap: %s: HTTP status %ld", url, status);
  else if ((rc = tc_derpmap_parse(f.b.data ? f.b.data : "", f.b.len, false, out, err)) && err)
    tc_err_prefix(err, "%s", url);
  tc_buf_free(&f.b);
  return rc;
}

static bool looks_yaml(const char *path) {
  const char *dot = strrchr(path, '.');
  return !(dot && !strcasecmp(dot, ".json"));
}

static int load_path(const char *path, json_t **out, struct tc_err *err) {
  char *text = NULL;
  size_t len = 0;
  int rc = tc_read_file(path, MAX_SOURCE_BYTES, &text, &len, err);
  if (rc) return rc;
  /* Headscale reads every path with a YAML decoder; JSON is valid YAML too,
   * but a .json file is parsed as JSON for exact types */
  rc = tc_derpmap_parse(text, len, looks_yaml(path), out, err);
  if (rc && err) tc_err_prefix(err, "%s", path);
  free(text);
  return rc;
}

/* ---- the object --------------------------------------------------------------------- */

struct tc_derpmap {
  struct tc_derpmap_params p;
  char **urls, **paths;
  json_t *embedded;          /* region object or NULL */
  json_t **last_good;        /* per source: urls then paths */
  pthread_mutex_t refresh_mu; /* serialises refreshes */
  pthread_mutex_t mu;        /* guards cur_json, cur, gen, stop */
  pthread_cond_t cv;
  char *cur_json;
  json_t *cur;
  char *dns_json;            /* guarded by mu */
  uint64_t gen;
  bool stop;
  pthread_t thr;
  bool started;
};

static int do_refresh(struct tc_derpmap *dm, bool notify, struct tc_err *err) {
  pthread_mutex_lock(&dm->refresh_mu);
  int first_rc = 0;
  size_t ns = dm->p.nurls + dm->p.npaths;
  for (size_t i = 0; i < ns; i++) {
    json_t *m = NULL;
    struct tc_err e = {0};
    int rc = i < dm->p.nurls ? fetch_url(dm->urls[i], dm->p.http_timeout_ms, &m, &e)
                             : load_path(dm->paths[i - dm->p.nurls], &m, &e);
    if (rc) {
      tc_warn("derpmap: %s (keeping the last good copy)", e.msg);
      if (!first_rc) {
        first_rc = rc;
        if (err) *err = e;
      }
      continue;
    }
    json_decref(dm->last_good[i]);
    dm->last_good[i] = m;
  }
  json_t **maps = tc_xcalloc(ns + 1, sizeof *maps);
  for (size_t i = 0; i < ns; i++) maps[i] = dm->last_good[i];
  json_t *emb = NULL;
  if (dm->embedded) {
    emb = json_object();
    json_t *regs = json_object();
    char key[24];
    snprintf(key, sizeof key, "%d", dm->p.region_id);
    json_object_set(regs, key, dm->embedded);
    json_object_set_new(emb, "Regions", regs);
    maps[ns] = emb;
  }
  json_t *merged = tc_derpmap_merge(maps, ns + 1);
  free(maps);
  json_decref(emb);
  char *text = tc_derpmap_dump(merged);
  /* keep the object in the same canonical shape as the text */
  json_decref(merged);
  merged = json_loads(text, 0, NULL);
  pthread_mutex_lock(&dm->mu);
  bool changed = !dm->cur_json || strcmp(dm->cur_json, text) != 0;
  if (changed) {
    free(dm->cur_json);
    json_decref(dm->cur);
    dm->cur_json = text;
    dm->cur = merged;
    dm->gen++;
    text = NULL;
    merged = NULL;
  }
  char *notify_copy = changed && notify && dm->p.on_change ? tc_xstrdup(dm->cur_json) : NULL;
  pthread_mutex_unlock(&dm->mu);
  if (notify_copy) {
    dm->p.on_change(dm->p.change_ctx, notify_copy, strlen(notify_copy));
    free(notify_copy);
  }
  free(text);
  json_decref(merged);
  pthread_mutex_unlock(&dm->refresh_mu);
  return first_rc;
}

/* Resolves every node HostName of map (IP literals resolve to themselves
 * without DNS). Returns the cache as compact JSON (owned). */
static char *resolve_hosts(json_t *map) {
  json_t *cache = json_object();
  const char *k;
  json_t *r;
  json_object_foreach(json_object_get(map, "Regions"), k, r) {
    size_t i;
    json_t *n;
    json_array_foreach(json_object_get(r, "Nodes"), i, n) {
      const char *host = json_string_value(json_object_get(n, "HostName"));
      if (!host || !*host || json_object_get(cache, host) || strlen(host) > 253) continue;
      struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
      if (getaddrinfo(host, NULL, &hints, &res) != 0) continue;
      json_t *ips = json_array();
      for (struct addrinfo *a = res; a; a = a->ai_next) {
        char ip[INET6_ADDRSTRLEN] = "";
        if (a->ai_family == AF_INET)
          inet_ntop(AF_INET, &((struct sockaddr_in *)a->ai_addr)->sin_addr, ip, sizeof ip);
        else if (a->ai_family == AF_INET6)
          inet_ntop(AF_INET6, &((struct sockaddr_in6 *)a->ai_addr)->sin6_addr, ip, sizeof ip);
        bool dup = false;
        size_t j;
        json_t *e;
        json_array_foreach(ips, j, e) if (!strcmp(json_string_value(e), ip)) dup = true;
        if (*ip && !dup) json_array_append_new(ips, json_string(ip));
      }
      freeaddrinfo(res);
      if (json_array_size(ips)) json_object_set_new(cache, host, ips);
      else json_decref(ips);
    }
  }
  char *s = json_dumps(cache, JSON_COMPACT | JSON_SORT_KEYS);
  json_decref(cache);
  return s ? s : tc_xstrdup("{}");
}

static void refresh_dns(struct tc_derpmap *dm) {
  if (!dm->p.bootstrap_dns) return;
  json_t *m = tc_derpmap_get(dm);
  char *s = resolve_hosts(m);
  json_decref(m);
  pthread_mutex_lock(&dm->mu);
  free(dm->dns_json);
  dm->dns_json = s;
  pthread_mutex_unlock(&dm->mu);
}

char *tc_derpmap_bootstrap_dns_json(struct tc_derpmap *dm) {
  pthread_mutex_lock(&dm->mu);
  char *s = tc_xstrdup(dm->dns_json ? dm->dns_json : "{}");
  pthread_mutex_unlock(&dm->mu);
  return s;
}

static void *refresh_thread(void *arg) {
  struct tc_derpmap *dm = arg;
  for (;;) {
    pthread_mutex_lock(&dm->mu);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t ns = (int64_t)ts.tv_nsec + (dm->p.update_frequency_ms % 1000) * 1000000;
    ts.tv_sec += dm->p.update_frequency_ms / 1000 + ns / 1000000000;
    ts.tv_nsec = ns % 1000000000;
    while (!dm->stop) {
      if (pthread_cond_timedwait(&dm->cv, &dm->mu, &ts) == ETIMEDOUT) break;
    }
    bool stop = dm->stop;
    pthread_mutex_unlock(&dm->mu);
    if (stop) break;
    do_refresh(dm, true, NULL);
    refresh_dns(dm);
  }
  return NULL;
}

static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

int tc_derpmap_new(const struct tc_derpmap_params *p, struct tc_derpmap **out, struct tc_err *err) {
  *out = NULL;
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, curl_init_once);
  struct tc_derpmap *dm = tc_xcalloc(1, sizeof *dm);
  int rc = 0;
  dm->p = *p;
  if (dm->p.update_frequency_ms <= 0) dm->p.update_frequency_ms = 3LL * 3600 * 1000;
  if (dm->p.http_timeout_ms <= 0) dm->p.http_timeout_ms = 10000;
  dm->urls = tc_xcalloc(p->nurls + 1, sizeof(char *));
  dm->paths = tc_xcalloc(p->npaths + 1, sizeof(char *));
  for (size_t i = 0; i < p->nurls; i++) dm->urls[i] = tc_xstrdup(p->urls[i]);
  for (size_t i = 0; i < p->npaths; i++) dm->paths[i] = tc_xstrdup(p->paths[i]);
  dm->p.urls = NULL;
  dm->p.paths = NULL;
  dm->p.region_code = dm->p.region_name = dm->p.server_url = dm->p.ipv4 = dm->p.ipv6 = NULL;
  dm->p.stun_listen_addr = NULL;
  dm->last_good = tc_xcalloc(p->nurls + p->npaths + 1, sizeof(json_t *));
  pthread_mutex_init(&dm->refresh_mu, NULL);
  pthread_mutex_init(&dm->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&dm->cv, &ca);
  pthread_condattr_destroy(&ca);
  if (p->embedded && !(dm->embedded = tc_derpmap_embedded_region(p, err))) {
    rc = err ? err->code : TC_EINVAL;
    goto fail;
  }
  struct tc_err ferr = {0};
  rc = do_refresh(dm, false, &ferr);
  if (rc && p->fail_on_initial_error) {
    if (err) *err = ferr;
    goto fail;
  }
  rc = 0;
  refresh_dns(dm);
  if (p->auto_update && p->nurls + p->npaths > 0) {
    if (pthread_create(&dm->thr, NULL, refresh_thread, dm) != 0) {
      rc = tc_err_set(err, TC_EINTERNAL, "derpmap: cannot start the refresh thread");
      goto fail;
    }
    dm->started = true;
  }
  *out = dm;
  return 0;
fail:
  tc_derpmap_free(dm);
  return rc;
}

int tc_derpmap_refresh_now(struct tc_derpmap *dm, struct tc_err *err) {
  int rc = do_refresh(dm, true, err);
  refresh_dns(dm);
  return rc;
}

char *tc_derpmap_json(struct tc_derpmap *dm) {
  pthread_mutex_lock(&dm->mu);
  char *s = tc_xstrdup(dm->cur_json ? dm->cur_json : "{\"Regions\":{}}");
  pthread_mutex_unlock(&dm->mu);
  return s;
}

json_t *tc_derpmap_get(struct tc_derpmap *dm) {
  pthread_mutex_lock(&dm->mu);
  json_t *j = dm->cur ? json_deep_copy(dm->cur) : NULL;
  pthread_mutex_unlock(&dm->mu);
  if (!j) {
    j = json_object();
    json_object_set_new(j, "Regions", json_object());
  }
  return j;
}

uint64_t tc_derpmap_generation(struct tc_derpmap *dm) {
  pthread_mutex_lock(&dm->mu);
  uint64_t g = dm->gen;
  pthread_mutex_unlock(&dm->mu);
  return g;
}

void tc_derpmap_free(struct tc_derpmap *dm) {
  if (!dm) return;
  if (dm->started) {
    pthread_mutex_lock(&dm->mu);
    dm->stop = true;
    pthread_cond_broadcast(&dm->cv);
    pthread_mutex_unlock(&dm->mu);
    pthread_join(dm->thr, NULL);
  }
  size_t ns = dm->p.nurls + dm->p.npaths;
  for (size_t i = 0; i < ns; i++) json_decref(dm->last_good[i]);
  free(dm->last_good);
  for (size_t i = 0; i < dm->p.nurls; i++) free(dm->urls[i]);
  for (size_t i = 0; i < dm->p.npaths; i++) free(dm->paths[i]);
  free(dm->urls);
  free(dm->paths);
  json_decref(dm->embedded);
  json_decref(dm->cur);
  free(dm->cur_json);
  free(dm->dns_json);
  pthread_cond_destroy(&dm->cv);
  pthread_mutex_destroy(&dm->mu);
  pthread_mutex_destroy(&dm->refresh_mu);
  free(dm);
}
