/* request: strict, bounded parsing of the two request bodies a client sends
 * over Noise, RegisterRequest and MapRequest. The body comes from anyone who
 * completed a Noise handshake (any machine key is accepted there), so every
 * length is checked and a known field of the wrong type fails the request
 * the way Go's decoder would. Reentrant. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "mapper/mapper_int.h"

/* Error text never quotes client bytes (they end up in logs). */
#define FAIL(code, ...)                       \
  do {                                        \
    rc = tc_err_set(err, code, __VA_ARGS__);  \
    goto out;                                 \
  } while (0)

/* Looks up name in obj; JSON null counts as absent. */
static json_t *field(json_t *obj, const char *name) {
  json_t *v = json_object_get(obj, name);
  return json_is_null(v) ? NULL : v;
}

static int get_bool(json_t *obj, const char *name, bool *out, struct tc_err *err) {
  json_t *v = field(obj, name);
  if (!v) return 0;
  if (!json_is_boolean(v)) return tc_err_set(err, TC_EINVAL, "%s: expected a boolean", name);
  *out = json_is_true(v);
  return 0;
}

static int get_int(json_t *obj, const char *name, int64_t lo, int64_t hi, int64_t *out,
                   struct tc_err *err) {
  json_t *v = field(obj, name);
  if (!v) return 0;
  if (!json_is_integer(v)) return tc_err_set(err, TC_EINVAL, "%s: expected an integer", name);
  json_int_t x = json_integer_value(v);
  if (x < lo || x > hi) return tc_err_set(err, TC_EINVAL, "%s: out of range", name);
  *out = x;
  return 0;
}

/* Borrowed string or NULL when absent; length bounded by max. */
static int get_str(json_t *obj, const char *name, size_t max, const char **out, size_t *len,
                   struct tc_err *err) {
  *out = NULL;
  if (len) *len = 0;
  json_t *v = field(obj, name);
  if (!v) return 0;
  if (!json_is_string(v)) return tc_err_set(err, TC_EINVAL, "%s: expected a string", name);
  size_t l = json_string_length(v);
  if (l > max) return tc_err_set(err, TC_ETOOBIG, "%s: too long", name);
  *out = json_string_value(v);
  if (len) *len = l;
  return 0;
}

static int get_key(json_t *obj, const char *name, enum tc_mapper_key_kind kind, uint8_t out[TC_KEY_LEN],
                   bool *present, struct tc_err *err) {
  const char *s;
  size_t l;
  int rc = get_str(obj, name, 128, &s, &l, err);
  if (rc) return rc == TC_ETOOBIG ? tc_err_set(err, TC_EINVAL, "%s: malformed key", name) : rc;
  *present = false;
  memset(out, 0, TC_KEY_LEN);
  if (!s) return 0;
  if (tc_mapper_key_parse(kind, s, l, out, present))
    return tc_err_set(err, TC_EINVAL, "%s: malformed key", name);
  return 0;
}

static int get_strv(json_t *obj, const char *name, size_t max_n, size_t max_len, bool prefixes,
                    struct tc_strv *out, struct tc_err *err) {
  json_t *a = field(obj, name);
  if (!a) return 0;
  if (!json_is_array(a)) return tc_err_set(err, TC_EINVAL, "%s: expected an array", name);
  if (json_array_size(a) > max_n) return tc_err_set(err, TC_ETOOBIG, "%s: too many entries", name);
  size_t i;
  json_t *v;
  json_array_foreach(a, i, v) {
    if (!json_is_string(v)) return tc_err_set(err, TC_EINVAL, "%s: expected strings", name);
    if (json_string_length(v) > max_len) return tc_err_set(err, TC_ETOOBIG, "%s: entry too long", name);
    const char *s = json_string_value(v);
    if (prefixes) {
      char canon[64];
      if (tc_mapper_prefix_canon(s, canon)) return tc_err_set(err, TC_EINVAL, "%s: malformed prefix", name);
      if (!tc_strv_contains(out, canon)) tc_strv_push(out, canon);
    } else if (!tc_strv_contains(out, s)) {
      tc_strv_push(out, s);
    }
  }
  return 0;
}

void tc_hostinfo_fields_free(struct tc_hostinfo_fields *h) {
  if (!h) return;
  free(h->hostname);
  free(h->os);
  tc_strv_free(&h->routable_ips);
  tc_strv_free(&h->request_tags);
  memset(h, 0, sizeof *h);
}

/* Extracts what tailcoat needs from a Hostinfo object and keeps the object
 * itself as compact JSON. */
static int parse_hostinfo(json_t *hi, char **json_out, struct tc_hostinfo_fields *f, struct tc_err *err) {
  int rc = 0;
  const char *s;
  if (!json_is_object(hi)) return tc_err_set(err, TC_EINVAL, "Hostinfo: expected an object");
  if ((rc = get_str(hi, "Hostname", TC_MAPPER_MAX_STR, &s, NULL, err))) return rc;
  if (s) f->hostname = tc_xstrdup(s);
  if ((rc = get_str(hi, "OS", TC_MAPPER_MAX_STR, &s, NULL, err))) return rc;
  if (s) f->os = tc_xstrdup(s);
  if ((rc = get_strv(hi, "RoutableIPs", TC_MAPPER_MAX_ROUTES, 64, true, &f->routable_ips, err))) return rc;
  if ((rc = get_strv(hi, "RequestTags", TC_MAPPER_MAX_TAGS, 256, false, &f->request_tags, err))) return rc;
  json_t *ni = field(hi, "NetInfo");
  if (ni) {
    if (!json_is_object(ni)) return tc_err_set(err, TC_EINVAL, "Hostinfo.NetInfo: expected an object");
    f->has_netinfo = true;
    int64_t d = 0;
    if ((rc = get_int(ni, "PreferredDERP", 0, INT32_MAX, &d, err))) return rc;
    f->preferred_derp = (int32_t)d;
  }
  char *dump = json_dumps(hi, JSON_COMPACT | JSON_PRESERVE_ORDER);
  if (!dump) return tc_err_set(err, TC_EINVAL, "Hostinfo: cannot serialise");
  if (strlen(dump) > TC_MAPPER_MAX_HOSTINFO) {
    free(dump);
    return tc_err_set(err, TC_ETOOBIG, "Hostinfo: too large");
  }
  *json_out = dump;
  return 0;
}

static json_t *load_body(const char *body, size_t len, struct tc_err *err, int *rc) {
  if (len > TC_MAPPER_MAX_BODY) {
    *rc = tc_err_set(err, TC_ETOOBIG, "request body too large");
    return NULL;
  }
  json_error_t je;
  /* No JSON_REJECT_DUPLICATES: Go keeps the last duplicate, and so does jansson. */
  json_t *root = json_loadb(body, len, 0, &je);
  if (!root) {
    *rc = tc_err_set(err, TC_EINVAL, "malformed JSON at byte %d", je.position);
    return NULL;
  }
  if (!json_is_object(root)) {
    json_decref(root);
    *rc = tc_err_set(err, TC_EINVAL, "expected a JSON object");
    return NULL;
  }
  *rc = 0;
  return root;
}

void tc_register_request_free(struct tc_register_request *r) {
  if (!r) return;
  if (r->auth_key) tc_free_secret(r->auth_key, strlen(r->auth_key));
  free(r->followup);
  free(r->hostinfo_json);
  free(r->tailnet);
  tc_hostinfo_fields_free(&r->hi);
  memset(r, 0, sizeof *r);
}

void tc_map_request_free(struct tc_map_request *r) {
  if (!r) return;
  free(r->hostinfo_json);
  tc_hostinfo_fields_free(&r->hi);
  tc_strv_free(&r->endpoints);
  memset(r, 0, sizeof *r);
}

int tc_mapper_parse_register(const char *body, size_t len, struct tc_register_request *out,
                             struct tc_err *err) {
  int rc;
  memset(out, 0, sizeof *out);
  json_t *root = load_body(body, len, err, &rc);
  if (!root) return rc;
  int64_t ver = 0;
  const char *s;
  size_t sl;
  if ((rc = get_int(root, "Version", 0, 1000000, &ver, err))) goto out;
  out->version = (int)ver;
  if ((rc = get_key(root, "NodeKey", TC_MKEY_NODE, out->node_key, &out->has_node_key, err))) goto out;
  if ((rc = get_key(root, "OldNodeKey", TC_MKEY_NODE, out->old_node_key, &out->has_old_node_key, err)))
    goto out;
  /* v1.60-v1.64 always send an Auth object with an empty AuthKey; v1.66+
   * omit it. Only a non-empty AuthKey means "register with this key". */
  json_t *auth = field(root, "Auth");
  if (auth) {
    if (!json_is_object(auth)) FAIL(TC_EINVAL, "Auth: expected an object");
    if ((rc = get_str(auth, "AuthKey", TC_MAPPER_MAX_AUTHKEY, &s, &sl, err))) goto out;
    if (s && sl) out->auth_key = tc_xstrndup(s, sl);
  }
  if ((rc = get_str(root, "Expiry", 64, &s, NULL, err))) goto out;
  if (s) {
    int64_t t;
    if (tc_time_parse(s, &t)) FAIL(TC_EINVAL, "Expiry: malformed time");
    /* tc_time_parse maps Go's zero time to 0; the Unix epoch itself is a real (past) time. */
    out->has_expiry = t != 0 || strncmp(s, "0001-", 5) != 0;
    out->expiry = t;
  }
  if ((rc = get_str(root, "Followup", TC_MAPPER_MAX_STR, &s, &sl, err))) goto out;
  if (s && sl) out->followup = tc_xstrndup(s, sl);
  if ((rc = get_bool(root, "Ephemeral", &out->ephemeral, err))) goto out;
  if ((rc = get_str(root, "Tailnet", TC_MAPPER_MAX_STR, &s, &sl, err))) goto out;
  if (s && sl) out->tailnet = tc_xstrndup(s, sl);
  json_t *hi = field(root, "Hostinfo");
  if (hi && (rc = parse_hostinfo(hi, &out->hostinfo_json, &out->hi, err))) goto out;
  rc = 0;
out:
  json_decref(root);
  if (rc) tc_register_request_free(out);
  return rc;
}

int tc_mapper_parse_map(const char *body, size_t len, struct tc_map_request *out, struct tc_err *err) {
  int rc;
  memset(out, 0, sizeof *out);
  json_t *root = load_body(body, len, err, &rc);
  if (!root) return rc;
  int64_t ver = 0;
  const char *s;
  if ((rc = get_int(root, "Version", 0, 1000000, &ver, err))) goto out;
  out->version = (int)ver;
  if ((rc = get_str(root, "Compress", 64, &s, NULL, err))) goto out;
  out->compress_zstd = s && !strcmp(s, "zstd");
  if ((rc = get_bool(root, "KeepAlive", &out->keep_alive, err))) goto out;
  if ((rc = get_bool(root, "Stream", &out->stream, err))) goto out;
  if ((rc = get_bool(root, "OmitPeers", &out->omit_peers, err))) goto out;
  if ((rc = get_bool(root, "ReadOnly", &out->read_only, err))) goto out;
  if ((rc = get_key(root, "NodeKey", TC_MKEY_NODE, out->node_key, &out->has_node_key, err))) goto out;
  if ((rc = get_key(root, "DiscoKey", TC_MKEY_DISCO, out->disco_key, &out->has_disco_key, err))) goto out;
  json_t *hi = field(root, "Hostinfo");
  if (hi && (rc = parse_hostinfo(hi, &out->hostinfo_json, &out->hi, err))) goto out;
  json_t *eps = field(root, "Endpoints");
  if (eps) {
    if (!json_is_array(eps)) FAIL(TC_EINVAL, "Endpoints: expected an array");
    /* A host with many interfaces (Docker, Kubernetes, IPv6 privacy
     * addresses) may report more endpoints than we keep. tailscaled sends
     * them all and has no way to shrink the list, so refusing the request
     * would cost it its map for good: keep the first ones, bound the rest. */
    if (json_array_size(eps) > 64 * TC_MAPPER_MAX_ENDPOINTS) FAIL(TC_ETOOBIG, "Endpoints: too many entries");
    out->has_endpoints = true;
    size_t i;
    json_t *v;
    json_array_foreach(eps, i, v) {
      if (!json_is_string(v) || json_string_length(v) > 64) FAIL(TC_EINVAL, "Endpoints: malformed entry");
      char canon[64];
      bool drop;
      if (tc_mapper_addrport_canon(json_string_value(v), canon, &drop))
        FAIL(TC_EINVAL, "Endpoints: malformed entry");
      if (!drop && out->endpoints.n < TC_MAPPER_MAX_ENDPOINTS && !tc_strv_contains(&out->endpoints, canon))
        tc_strv_push(&out->endpoints, canon);
    }
  }
  rc = 0;
out:
  json_decref(root);
  if (rc) tc_map_request_free(out);
  return rc;
}

bool tc_mapper_is_logout(const struct tc_register_request *r, int64_t now) {
  return r->has_expiry && r->expiry <= now;
}
