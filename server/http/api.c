/* api: REST API v1 handlers and /health. Every handler: authenticate
 * (trusted transport or bearer API key) -> parse and bound the input ->
 * one model call -> render from a fresh snapshot. Runs on MHD worker
 * threads or in-process on the CLI's thread. */
#include "http/api.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http/metrics.h"
#include "model/model.h"
#include "policy/policy.h"
#include "storage/store.h"

#define API_NAME_MAX 256
#define API_TAGS_MAX 64

struct route_ctx;

struct tc_api {
  struct tc_api_opts o;
  char *policy_path;
  struct route_ctx *ctxs; /* one per API route: handler + back pointer */
};

struct api_ctx {
  const char *actor; /* "cli" or "api:<prefix>" */
};

typedef void (*api_fn)(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                       struct tc_http_resp *resp);

/* ---- rendering ------------------------------------------------------------------ */

static json_t *time_json(int64_t t) {
  if (!t) return json_null();
  char buf[32];
  return json_string(tc_time_format(t, buf));
}

static json_t *id_json(int64_t id) {
  char buf[32];
  snprintf(buf, sizeof buf, "%lld", (long long)id);
  return json_string(buf);
}

static json_t *str_json(const char *s) {
  json_t *j = json_string(s ? s : "");
  return j ? j : json_string(""); /* invalid UTF-8 from storage: render empty */
}

static json_t *strv_json(const struct tc_strv *sv) {
  json_t *a = json_array();
  for (size_t i = 0; sv && i < sv->n; i++) json_array_append_new(a, str_json(sv->v[i]));
  return a;
}

void tc_api_key_text(const char *kind, const uint8_t key[32], char out[80]) {
  size_t kl = strlen(kind);
  memcpy(out, kind, kl);
  tc_hex_encode(key, 32, out + kl);
}

static json_t *user_json(const struct tc_user *u) {
  if (!u) return json_null();
  json_t *o = json_object();
  json_object_set_new(o, "id", id_json(u->id));
  json_object_set_new(o, "name", str_json(u->name));
  json_object_set_new(o, "createdAt", time_json(u->created_at));
  json_object_set_new(o, "displayName", str_json(u->display_name));
  json_object_set_new(o, "email", str_json(u->email));
  json_object_set_new(o, "providerId", str_json(u->provider_id));
  json_object_set_new(o, "provider", str_json(u->provider));
  json_object_set_new(o, "profilePicUrl", str_json(u->profile_pic_url));
  return o;
}

static json_t *preauth_json(const struct tc_snapshot *s, const struct tc_preauth_key *k, const char *secret) {
  if (!k) return json_null();
  json_t *o = json_object();
  json_object_set_new(o, "user", user_json(k->user_id ? tc_snapshot_user(s, k->user_id) : NULL));
  json_object_set_new(o, "id", id_json(k->id));
  if (secret) {
    json_object_set_new(o, "key", json_string(secret));
  } else {
    /* Listings never show the secret (it is not stored) nor its hash. */
    char *shown = tc_xasprintf("hskey-auth-%s-***", k->prefix ? k->prefix : "");
    json_object_set_new(o, "key", str_json(shown));
    free(shown);
  }
  json_object_set_new(o, "reusable", json_boolean(k->reusable));
  json_object_set_new(o, "ephemeral", json_boolean(k->ephemeral));
  json_object_set_new(o, "used", json_boolean(k->used));
  json_object_set_new(o, "expiration", time_json(k->expiration));
  json_object_set_new(o, "createdAt", time_json(k->created_at));
  json_object_set_new(o, "aclTags", strv_json(&k->tags));
  return o;
}

static json_t *apikey_json(const struct tc_api_key *k) {
  json_t *o = json_object();
  json_object_set_new(o, "id", id_json(k->id));
  json_object_set_new(o, "prefix", str_json(k->prefix));
  json_object_set_new(o, "expiration", time_json(k->expiration));
  json_object_set_new(o, "createdAt", time_json(k->created_at));
  json_object_set_new(o, "lastSeen", time_json(k->last_seen));
  return o;
}

static const char *register_method_enum(enum tc_register_method m) {
  switch (m) {
  case TC_REG_AUTHKEY: return "REGISTER_METHOD_AUTH_KEY";
  case TC_REG_CLI: return "REGISTER_METHOD_CLI";
  case TC_REG_OIDC: return "REGISTER_METHOD_OIDC";
  default: return "REGISTER_METHOD_UNSPECIFIED";
  }
}

static bool key_zero(const uint8_t *k) {
  for (int i = 0; i < TC_KEY_LEN; i++)
    if (k[i]) return false;
  return true;
}

static json_t *node_json(const struct tc_snapshot *s, const struct tc_node *n) {
  if (!n) return json_null();
  json_t *o = json_object();
  char kt[80];
  json_object_set_new(o, "id", id_json(n->id));
  tc_api_key_text("mkey:", n->machine_key, kt);
  json_object_set_new(o, "machineKey", json_string(kt));
  tc_api_key_text("nodekey:", n->node_key, kt);
  json_object_set_new(o, "nodeKey", json_string(kt));
  if (key_zero(n->disco_key)) {
    json_object_set_new(o, "discoKey", json_string(""));
  } else {
    tc_api_key_text("discokey:", n->disco_key, kt);
    json_object_set_new(o, "discoKey", json_string(kt));
  }
  json_t *ips = json_array();
  char ip[INET6_ADDRSTRLEN];
  if (n->has_ipv4 && inet_ntop(AF_INET, n->ipv4, ip, sizeof ip)) json_array_append_new(ips, json_string(ip));
  if (n->has_ipv6 && inet_ntop(AF_INET6, n->ipv6, ip, sizeof ip)) json_array_append_new(ips, json_string(ip));
  json_object_set_new(o, "ipAddresses", ips);
  json_object_set_new(o, "name", str_json(n->hostname));
  json_object_set_new(o, "user", user_json(n->user_id ? tc_snapshot_user(s, n->user_id) : NULL));
  json_object_set_new(o, "lastSeen", time_json(n->last_seen));
  json_object_set_new(o, "expiry", time_json(n->expiry));
  json_object_set_new(o, "preAuthKey",
                      preauth_json(s, n->auth_key_id ? tc_snapshot_preauth_key(s, n->auth_key_id) : NULL, NULL));
  json_object_set_new(o, "createdAt", time_json(n->created_at));
  json_object_set_new(o, "registerMethod", json_string(register_method_enum(n->register_method)));
  json_object_set_new(o, "givenName", str_json(n->given_name));
  json_object_set_new(o, "online", json_boolean(tc_snapshot_is_online(s, n->id)));
  json_object_set_new(o, "approvedRoutes", strv_json(&n->approved_routes));
  json_object_set_new(o, "availableRoutes", strv_json(&n->announced_routes));
  struct tc_strv prim = {0};
  tc_snapshot_primary_routes(s, n->id, &prim);
  json_object_set_new(o, "subnetRoutes", strv_json(&prim));
  tc_strv_free(&prim);
  json_object_set_new(o, "tags", strv_json(&n->tags));
  /* Headscale <= 0.26 clients and UIs read these; tags are all admin-valid here */
  json_object_set_new(o, "validTags", strv_json(&n->tags));
  json_object_set_new(o, "forcedTags", json_array());
  json_object_set_new(o, "invalidTags", json_array());
  json_object_set_new(o, "expired", json_boolean(tc_node_is_expired(n, tc_now())));
  return o;
}

/* ---- input helpers ----------------------------------------------------------------- */

/* Strict positive decimal id (also accepted as a JSON string or number). */
static bool parse_id(const char *s, int64_t *out) {
  if (!s || !*s || strlen(s) > 18 || strspn(s, "0123456789") != strlen(s)) return false;
  long long v = strtoll(s, NULL, 10);
  if (v <= 0) return false;
  *out = v;
  return true;
}

static bool json_id(json_t *j, int64_t *out) {
  if (json_is_integer(j)) {
    *out = json_integer_value(j);
    return *out > 0;
  }
  return json_is_string(j) && parse_id(json_string_value(j), out);
}

/* Parses the request body as a JSON object; empty body = {}. On failure a
 * 400 is set and NULL returned. Owned result. */
static json_t *body_object(const struct tc_http_req *req, struct tc_http_resp *resp) {
  if (!req->body_len) return json_object();
  json_error_t je;
  json_t *j = json_loadb(req->body, req->body_len, JSON_REJECT_DUPLICATES, &je);
  if (!j) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "invalid JSON body: %s (line %d column %d)", je.text,
                       je.line, je.column);
    return NULL;
  }
  if (!json_is_object(j)) {
    json_decref(j);
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "request body must be a JSON object");
    return NULL;
  }
  return j;
}

/* A user named by id ("3") or by name ("alice"). Borrowed from s. */
static const struct tc_user *find_user(const struct tc_snapshot *s, const char *ref) {
  int64_t id;
  if (parse_id(ref, &id)) {
    const struct tc_user *u = tc_snapshot_user(s, id);
    if (u) return u;
  }
  return tc_snapshot_user_by_name(s, ref);
}

/* Optional RFC 3339 time from a JSON member; *ok false + 400 set when bad. */
static int64_t json_time(json_t *obj, const char *key, bool *ok, struct tc_http_resp *resp) {
  json_t *j = json_object_get(obj, key);
  *ok = true;
  if (!j || json_is_null(j)) return 0;
  int64_t t = 0;
  if (!json_is_string(j) || tc_time_parse(json_string_value(j), &t)) {
    *ok = false;
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "%s: want an RFC 3339 time", key);
  }
  return t;
}

/* A JSON array of strings into sv (bounded). false + 400 when bad. */
static bool json_strv(json_t *obj, const char *key, struct tc_strv *sv, struct tc_http_resp *resp) {
  json_t *a = json_object_get(obj, key);
  if (!a || json_is_null(a)) return true;
  if (!json_is_array(a) || json_array_size(a) > API_TAGS_MAX) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "%s: want an array of at most %d strings", key,
                       API_TAGS_MAX);
    return false;
  }
  size_t i;
  json_t *v;
  json_array_foreach(a, i, v) {
    if (!json_is_string(v) || json_string_length(v) > API_NAME_MAX) {
      tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "%s[%zu]: want a string", key, i);
      return false;
    }
    tc_strv_push(sv, json_string_value(v));
  }
  return true;
}

static void err_resp(struct tc_http_resp *resp, const struct tc_err *e) {
  tc_http_resp_tc_err(resp, e->code ? e->code : TC_EINTERNAL, e->msg);
}

static void respond_node(struct tc_api *api, int64_t id, struct tc_http_resp *resp) {
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  json_t *o = json_object();
  json_object_set_new(o, "node", node_json(s, tc_snapshot_node(s, id)));
  tc_snapshot_release(s);
  tc_http_resp_json(resp, 200, o);
}

static void respond_user(struct tc_api *api, int64_t id, struct tc_http_resp *resp) {
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  json_t *o = json_object();
  json_object_set_new(o, "user", user_json(tc_snapshot_user(s, id)));
  tc_snapshot_release(s);
  tc_http_resp_json(resp, 200, o);
}

/* Resolves {id} of a node route; 400/404 set when it fails. */
static bool node_param(struct tc_api *api, const struct tc_http_req *req, int64_t *id, struct tc_http_resp *resp) {
  const char *p = tc_http_param(req, "id");
  if (!parse_id(p, id)) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "invalid node id \"%.40s\"", p ? p : "");
    return false;
  }
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  bool ok = tc_snapshot_node(s, *id) != NULL;
  tc_snapshot_release(s);
  if (!ok) tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "node %lld not found", (long long)*id);
  return ok;
}

/* ---- users ---------------------------------------------------------------------------- */

static void h_user_list(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                        struct tc_http_resp *resp) {
  const char *fid = tc_http_query(req, "id"), *fname = tc_http_query(req, "name"),
             *femail = tc_http_query(req, "email");
  int64_t want_id = 0;
  if (fid && *fid && !parse_id(fid, &want_id)) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "invalid user id");
    return;
  }
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  json_t *a = json_array();
  for (size_t i = 0; i < s->n_users; i++) {
    const struct tc_user *u = s->users[i];
    if (want_id && u->id != want_id) continue;
    if (fname && *fname && strcmp(u->name, fname)) continue;
    if (femail && *femail && (!u->email || strcmp(u->email, femail))) continue;
    json_array_append_new(a, user_json(u));
  }
  tc_snapshot_release(s);
  json_t *o = json_object();
  json_object_set_new(o, "users", a);
  tc_http_resp_json(resp, 200, o);
}

static const char *opt_str(json_t *o, const char *key) {
  json_t *j = json_object_get(o, key);
  return json_is_string(j) && json_string_length(j) ? json_string_value(j) : NULL;
}

static void h_user_create(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                          struct tc_http_resp *resp) {
  json_t *b = body_object(req, resp);
  if (!b) return;
  const char *name = opt_str(b, "name");
  const char *display = opt_str(b, "displayName"), *email = opt_str(b, "email"), *pic = opt_str(b, "pictureUrl");
  struct tc_err e = {0};
  int64_t id = 0;
  if (!name) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "name is required");
  } else if ((display && strlen(display) > 255) || (email && strlen(email) > 320) || (pic && strlen(pic) > 2048)) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT,
                       "displayName (255), email (320) or pictureUrl (2048 bytes) too long");
  } else if (tc_model_user_create(api->o.model, ac->actor, name, display, email, &id, &e)) {
    err_resp(resp, &e);
  } else if (pic && tc_model_user_update(api->o.model, ac->actor, id, NULL, NULL, pic, &e)) {
    err_resp(resp, &e);
  } else {
    respond_user(api, id, resp);
  }
  json_decref(b);
}

static void h_user_rename(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                          struct tc_http_resp *resp) {
  const char *old = tc_http_param(req, "old"), *nw = tc_http_param(req, "new");
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  const struct tc_user *u = find_user(s, old);
  int64_t id = u ? u->id : 0;
  tc_snapshot_release(s);
  if (!id) {
    tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "user \"%.100s\" not found", old);
    return;
  }
  struct tc_err e = {0};
  if (tc_model_user_rename(api->o.model, ac->actor, id, nw, &e))
    err_resp(resp, &e);
  else
    respond_user(api, id, resp);
}

static void h_user_delete(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                          struct tc_http_resp *resp) {
  const char *ref = tc_http_param(req, "id");
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  const struct tc_user *u = find_user(s, ref);
  int64_t id = u ? u->id : 0;
  tc_snapshot_release(s);
  if (!id) {
    tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "user \"%.100s\" not found", ref);
    return;
  }
  struct tc_err e = {0};
  if (tc_model_user_destroy(api->o.model, ac->actor, id, &e))
    err_resp(resp, &e);
  else
    tc_http_resp_json(resp, 200, json_object());
}

/* The optional ?user= filter of list endpoints: *uid is 0 for "all". On an
 * unknown user answers 404, releases s and returns false. */
static bool query_user(struct tc_snapshot *s, const struct tc_http_req *req, struct tc_http_resp *resp,
                       int64_t *uid) {
  const char *uref = tc_http_query(req, "user");
  *uid = 0;
  if (!uref || !*uref) return true;
  const struct tc_user *u = find_user(s, uref);
  if (!u) {
    tc_snapshot_release(s);
    tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "user \"%.100s\" not found", uref);
    return false;
  }
  *uid = u->id;
  return true;
}

/* ---- nodes ------------------------------------------------------------------------------ */

static void h_node_list(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                        struct tc_http_resp *resp) {
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  int64_t uid;
  if (!query_user(s, req, resp, &uid)) return;
  json_t *a = json_array();
  for (size_t i = 0; i < s->n_nodes; i++)
    if (!uid || s->nodes[i]->user_id == uid) json_array_append_new(a, node_json(s, s->nodes[i]));
  tc_snapshot_release(s);
  json_t *o = json_object();
  json_object_set_new(o, "nodes", a);
  tc_http_resp_json(resp, 200, o);
}

static void h_node_get(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                       struct tc_http_resp *resp) {
  int64_t id;
  if (node_param(api, req, &id, resp)) respond_node(api, id, resp);
}

static void h_node_delete(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                          struct tc_http_resp *resp) {
  int64_t id;
  if (!node_param(api, req, &id, resp)) return;
  struct tc_err e = {0};
  if (tc_model_node_delete(api->o.model, ac->actor, id, &e))
    err_resp(resp, &e);
  else
    tc_http_resp_json(resp, 200, json_object());
}

static void h_node_expire(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                          struct tc_http_resp *resp) {
  int64_t id, at = 0;
  if (!node_param(api, req, &id, resp)) return;
  const char *exp = tc_http_query(req, "expiry");
  if (exp && *exp && tc_time_parse(exp, &at)) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "expiry: want an RFC 3339 time");
    return;
  }
  const char *dis = tc_http_query(req, "disableExpiry");
  if (dis && !strcmp(dis, "true")) {
    tc_http_resp_error(resp, 400, TC_GRPC_UNIMPLEMENTED, "disableExpiry is not supported");
    return;
  }
  struct tc_err e = {0};
  if (tc_model_node_expire(api->o.model, ac->actor, id, at, &e))
    err_resp(resp, &e);
  else
    respond_node(api, id, resp);
}

static void h_node_rename(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                          struct tc_http_resp *resp) {
  int64_t id;
  if (!node_param(api, req, &id, resp)) return;
  struct tc_err e = {0};
  if (tc_model_node_rename(api->o.model, ac->actor, id, tc_http_param(req, "name"), &e))
    err_resp(resp, &e);
  else
    respond_node(api, id, resp);
}

static void h_node_tags(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                        struct tc_http_resp *resp) {
  int64_t id;
  if (!node_param(api, req, &id, resp)) return;
  json_t *b = body_object(req, resp);
  if (!b) return;
  struct tc_strv tags = {0};
  struct tc_err e = {0};
  if (json_strv(b, "tags", &tags, resp)) {
    for (size_t i = 0; i < tags.n; i++)
      if (!tc_str_has_prefix(tags.v[i], "tag:") || !tags.v[i][4]) {
        tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "tag \"%.100s\" must start with \"tag:\"",
                           tags.v[i]);
        goto out;
      }
    if (tc_model_node_set_tags(api->o.model, ac->actor, id, &tags, &e))
      err_resp(resp, &e);
    else
      respond_node(api, id, resp);
  }
out:
  tc_strv_free(&tags);
  json_decref(b);
}

static void h_node_routes(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                          struct tc_http_resp *resp) {
  int64_t id;
  if (!node_param(api, req, &id, resp)) return;
  json_t *b = body_object(req, resp);
  if (!b) return;
  struct tc_strv routes = {0};
  struct tc_err e = {0};
  if (json_strv(b, "routes", &routes, resp)) {
    if (tc_model_node_approve_routes(api->o.model, ac->actor, id, &routes, &e))
      err_resp(resp, &e);
    else
      respond_node(api, id, resp);
  }
  tc_strv_free(&routes);
  json_decref(b);
}

static void h_node_user(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                        struct tc_http_resp *resp) {
  int64_t id;
  if (!node_param(api, req, &id, resp)) return;
  json_t *b = body_object(req, resp);
  if (!b) return;
  json_t *ju = json_object_get(b, "user");
  const char *uref = tc_http_query(req, "user");
  char buf[32];
  if (!uref && json_is_string(ju)) uref = json_string_value(ju);
  if (!uref && json_is_integer(ju)) {
    snprintf(buf, sizeof buf, "%lld", (long long)json_integer_value(ju));
    uref = buf;
  }
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  const struct tc_user *u = uref ? find_user(s, uref) : NULL;
  int64_t uid = u ? u->id : 0;
  tc_snapshot_release(s);
  struct tc_err e = {0};
  if (!uid)
    tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "user not found");
  else if (tc_model_node_set_user(api->o.model, ac->actor, id, uid, &e))
    err_resp(resp, &e);
  else
    respond_node(api, id, resp);
  json_decref(b);
}

static void h_node_register(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                            struct tc_http_resp *resp) {
  const char *uref = tc_http_query(req, "user"), *key = tc_http_query(req, "key");
  if (!uref || !*uref || !key || !*key) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "user and key are required");
    return;
  }
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  const struct tc_user *u = find_user(s, uref);
  int64_t uid = u ? u->id : 0;
  tc_snapshot_release(s);
  if (!uid) {
    tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "user \"%.100s\" not found", uref);
    return;
  }
  /* Headscale prints registration ids with this prefix in its login page. */
  if (tc_str_has_prefix(key, "hskey-reg-")) key += strlen("hskey-reg-");
  /* Older Headscale CLIs pass the machine's node or machine key instead:
   * find the pending registration that carries it. */
  char found[32] = "";
  bool is_nk = tc_str_has_prefix(key, "nodekey:"), is_mk = tc_str_has_prefix(key, "mkey:");
  if (is_nk || is_mk) {
    const char *hex = key + (is_nk ? 8 : 5);
    uint8_t want[32];
    struct tc_pending_info *v = NULL;
    size_t n = 0;
    if (strlen(hex) == 64 && !tc_hex_decode(hex, 64, want, 32) && !tc_model_pending_list(api->o.model, &v, &n)) {
      for (size_t i = 0; i < n; i++)
        if (v[i].state == 0 && !memcmp(is_nk ? v[i].node_key : v[i].machine_key, want, 32))
          snprintf(found, sizeof found, "%s", v[i].reg_id);
      tc_model_pending_free(v, n);
    }
    if (!found[0]) {
      tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "no pending registration for that key");
      return;
    }
    key = found;
  }
  int64_t nid = 0;
  struct tc_err e = {0};
  if (tc_model_pending_approve(api->o.model, ac->actor, key, uid, &nid, &e))
    err_resp(resp, &e);
  else
    respond_node(api, nid, resp);
}

/* Interactive registrations (Headscale's /api/v1/auth/... routes): approve for a
 * user, approve for the machine's existing owner, or reject. */
static const char *auth_id_of(json_t *b) {
  const char *id = opt_str(b, "authId");
  if (id && tc_str_has_prefix(id, "hskey-reg-")) id += strlen("hskey-reg-");
  return id;
}

static void h_auth_register(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                            struct tc_http_resp *resp) {
  json_t *b = body_object(req, resp);
  if (!b) return;
  const char *id = auth_id_of(b);
  json_t *ju = json_object_get(b, "user");
  char ubuf[32];
  const char *uref = json_is_string(ju) ? json_string_value(ju) : NULL;
  if (json_is_integer(ju)) {
    snprintf(ubuf, sizeof ubuf, "%lld", (long long)json_integer_value(ju));
    uref = ubuf;
  }
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  const struct tc_user *u = uref ? find_user(s, uref) : NULL;
  int64_t uid = u ? u->id : 0;
  tc_snapshot_release(s);
  int64_t nid = 0;
  struct tc_err e = {0};
  if (!id)
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "authId is required");
  else if (!uid)
    tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "user not found");
  else if (tc_model_pending_approve(api->o.model, ac->actor, id, uid, &nid, &e))
    err_resp(resp, &e);
  else
    respond_node(api, nid, resp);
  json_decref(b);
}

static void h_auth_approve(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                           struct tc_http_resp *resp) {
  json_t *b = body_object(req, resp);
  if (!b) return;
  const char *id = auth_id_of(b);
  struct tc_pending_info pi;
  memset(&pi, 0, sizeof pi);
  struct tc_err e = {0};
  int64_t uid = 0, nid = 0;
  if (!id) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "authId is required");
    goto out;
  }
  if (tc_model_pending_get(api->o.model, id, &pi)) {
    tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "registration not found or expired");
    goto out;
  }
  /* Without a user, only a machine that already has a node can be approved
   * (re-authentication): it keeps its owner. */
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  const struct tc_node *n = tc_snapshot_node_by_machine_key(s, pi.machine_key);
  uid = n ? n->user_id : 0;
  tc_snapshot_release(s);
  if (!uid)
    tc_http_resp_error(resp, 400, TC_GRPC_FAILED_PRECONDITION,
                       "a new machine needs a user: use /api/v1/auth/register (tailcoat nodes register)");
  else if (tc_model_pending_approve(api->o.model, ac->actor, id, uid, &nid, &e))
    err_resp(resp, &e);
  else
    tc_http_resp_json(resp, 200, json_object());
out:
  free(pi.hostname);
  json_decref(b);
}

static void h_auth_reject(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                          struct tc_http_resp *resp) {
  json_t *b = body_object(req, resp);
  if (!b) return;
  const char *id = auth_id_of(b);
  struct tc_err e = {0};
  if (!id)
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "authId is required");
  else if (tc_model_pending_reject(api->o.model, ac->actor, id, &e))
    err_resp(resp, &e);
  else
    tc_http_resp_json(resp, 200, json_object());
  json_decref(b);
}

/* tailcoat extension: the interactive registrations waiting for approval. */
static void h_auth_pending(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                           struct tc_http_resp *resp) {
  struct tc_pending_info *v = NULL;
  size_t n = 0;
  if (tc_model_pending_list(api->o.model, &v, &n)) {
    tc_http_resp_error(resp, 500, TC_GRPC_INTERNAL, "could not list registrations");
    return;
  }
  json_t *a = json_array();
  for (size_t i = 0; i < n; i++) {
    if (v[i].state != 0) continue;
    char kt[80];
    json_t *o = json_object();
    json_object_set_new(o, "authId", json_string(v[i].reg_id));
    json_object_set_new(o, "hostname", str_json(v[i].hostname));
    tc_api_key_text("mkey:", v[i].machine_key, kt);
    json_object_set_new(o, "machineKey", json_string(kt));
    tc_api_key_text("nodekey:", v[i].node_key, kt);
    json_object_set_new(o, "nodeKey", json_string(kt));
    json_object_set_new(o, "createdAt", time_json(v[i].created_at));
    json_object_set_new(o, "expiresAt", time_json(v[i].expires_at));
    json_array_append_new(a, o);
  }
  tc_model_pending_free(v, n);
  json_t *o = json_object();
  json_object_set_new(o, "registrations", a);
  tc_http_resp_json(resp, 200, o);
}

/* ---- pre-auth keys ------------------------------------------------------------------------- */

static void h_preauth_list(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                           struct tc_http_resp *resp) {
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  int64_t uid;
  if (!query_user(s, req, resp, &uid)) return;
  json_t *a = json_array();
  for (size_t i = 0; i < s->n_preauth_keys; i++)
    if (!uid || s->preauth_keys[i]->user_id == uid) json_array_append_new(a, preauth_json(s, s->preauth_keys[i], NULL));
  tc_snapshot_release(s);
  json_t *o = json_object();
  json_object_set_new(o, "preAuthKeys", a);
  tc_http_resp_json(resp, 200, o);
}

static void h_preauth_create(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                             struct tc_http_resp *resp) {
  json_t *b = body_object(req, resp);
  if (!b) return;
  struct tc_strv tags = {0};
  char *secret = NULL;
  struct tc_preauth_opts po = {0};
  json_t *ju = json_object_get(b, "user");
  if (ju && !json_is_null(ju) && !(json_is_string(ju) && !json_string_length(ju))) {
    struct tc_snapshot *s = tc_model_snapshot(api->o.model);
    const struct tc_user *u = NULL;
    int64_t id;
    if (json_id(ju, &id)) u = tc_snapshot_user(s, id);
    if (!u && json_is_string(ju)) u = tc_snapshot_user_by_name(s, json_string_value(ju));
    po.user_id = u ? u->id : 0;
    tc_snapshot_release(s);
    if (!po.user_id) {
      tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "user not found");
      goto out;
    }
  }
  po.reusable = json_is_true(json_object_get(b, "reusable"));
  po.ephemeral = json_is_true(json_object_get(b, "ephemeral"));
  bool ok;
  po.expiration = json_time(b, "expiration", &ok, resp);
  if (!ok) goto out;
  if (!json_strv(b, "aclTags", &tags, resp)) goto out;
  po.tags = &tags;
  if (!po.user_id && !tags.n) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "a pre-auth key needs a user or tags");
    goto out;
  }
  int64_t id = 0;
  struct tc_err e = {0};
  if (tc_model_preauth_create(api->o.model, ac->actor, &po, &id, &secret, &e)) {
    err_resp(resp, &e);
    goto out;
  }
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  json_t *o = json_object();
  json_object_set_new(o, "preAuthKey", preauth_json(s, tc_snapshot_preauth_key(s, id), secret));
  tc_snapshot_release(s);
  tc_http_resp_json(resp, 200, o);
out:
  if (secret) tc_free_secret(secret, strlen(secret));
  tc_strv_free(&tags);
  json_decref(b);
}

/* Finds a pre-auth key by {"id"} or by {"key"} (full token or its prefix). */
static int64_t preauth_ref(struct tc_api *api, json_t *b) {
  int64_t id = 0;
  if (json_id(json_object_get(b, "id"), &id)) return id;
  const char *key = opt_str(b, "key");
  if (!key) return 0;
  if (tc_str_has_prefix(key, "hskey-auth-")) key += strlen("hskey-auth-");
  size_t kl = strcspn(key, "-");
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  for (size_t i = 0; i < s->n_preauth_keys; i++) {
    const char *p = s->preauth_keys[i]->prefix;
    if (p && strlen(p) == kl && !strncmp(p, key, kl)) id = s->preauth_keys[i]->id;
  }
  tc_snapshot_release(s);
  return id;
}

static void h_preauth_expire(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                             struct tc_http_resp *resp) {
  json_t *b = body_object(req, resp);
  if (!b) return;
  int64_t id = preauth_ref(api, b);
  struct tc_err e = {0};
  if (!id)
    tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "pre-auth key not found");
  else if (tc_model_preauth_expire(api->o.model, ac->actor, id, &e))
    err_resp(resp, &e);
  else
    tc_http_resp_json(resp, 200, json_object());
  json_decref(b);
}

static void h_preauth_delete(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                             struct tc_http_resp *resp) {
  int64_t id = 0;
  if (!parse_id(tc_http_query(req, "id"), &id)) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "id is required");
    return;
  }
  struct tc_err e = {0};
  if (tc_model_preauth_delete(api->o.model, ac->actor, id, &e))
    err_resp(resp, &e);
  else
    tc_http_resp_json(resp, 200, json_object());
}

/* ---- API keys --------------------------------------------------------------------------------- */

static void h_apikey_list(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                          struct tc_http_resp *resp) {
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  json_t *a = json_array();
  for (size_t i = 0; i < s->n_api_keys; i++) json_array_append_new(a, apikey_json(s->api_keys[i]));
  tc_snapshot_release(s);
  json_t *o = json_object();
  json_object_set_new(o, "apiKeys", a);
  tc_http_resp_json(resp, 200, o);
}

static void h_apikey_create(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                            struct tc_http_resp *resp) {
  json_t *b = body_object(req, resp);
  if (!b) return;
  bool ok;
  int64_t exp = json_time(b, "expiration", &ok, resp);
  json_decref(b);
  if (!ok) return;
  char *token = NULL;
  int64_t id = 0;
  struct tc_err e = {0};
  if (tc_model_apikey_create(api->o.model, ac->actor, exp, &id, &token, &e)) {
    err_resp(resp, &e);
    return;
  }
  json_t *o = json_object();
  json_object_set_new(o, "apiKey", json_string(token));
  tc_free_secret(token, strlen(token));
  tc_http_resp_json(resp, 200, o);
}

static int64_t apikey_by_prefix(struct tc_api *api, const char *prefix) {
  if (!prefix) return 0;
  if (tc_str_has_prefix(prefix, "hskey-api-")) prefix += strlen("hskey-api-");
  size_t pl = strcspn(prefix, "-");
  int64_t id = 0;
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  for (size_t i = 0; i < s->n_api_keys; i++) {
    const char *p = s->api_keys[i]->prefix;
    if (p && strlen(p) == pl && !strncmp(p, prefix, pl)) id = s->api_keys[i]->id;
  }
  tc_snapshot_release(s);
  return id;
}

static void h_apikey_expire(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                            struct tc_http_resp *resp) {
  json_t *b = body_object(req, resp);
  if (!b) return;
  int64_t id = 0;
  if (!json_id(json_object_get(b, "id"), &id)) id = apikey_by_prefix(api, opt_str(b, "prefix"));
  json_decref(b);
  struct tc_err e = {0};
  if (!id)
    tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "API key not found");
  else if (tc_model_apikey_expire(api->o.model, ac->actor, id, &e))
    err_resp(resp, &e);
  else
    tc_http_resp_json(resp, 200, json_object());
}

static void h_apikey_delete(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                            struct tc_http_resp *resp) {
  int64_t id = 0;
  if (!parse_id(tc_http_query(req, "id"), &id)) id = apikey_by_prefix(api, tc_http_param(req, "prefix"));
  struct tc_err e = {0};
  if (!id)
    tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "API key not found");
  else if (tc_model_apikey_delete(api->o.model, ac->actor, id, &e))
    err_resp(resp, &e);
  else
    tc_http_resp_json(resp, 200, json_object());
}

/* ---- policy ------------------------------------------------------------------------------------ */

int tc_api_policy_validate(void *ctx, const char *text, size_t len, struct tc_err *err) {
  struct tc_policy *pol = NULL;
  struct tc_policy_err pe = {0};
  int rc = tc_policy_parse(text, len, &pol, &pe);
  tc_policy_free(pol);
  if (rc) {
    if (pe.line)
      return tc_err_set(err, rc, "policy line %d column %d: %s", pe.line, pe.col, pe.msg);
    return tc_err_set(err, rc, "policy: %s", pe.msg);
  }
  return TC_OK;
}

/* The policy in force: the model's current text. In file mode that is the
 * file as last loaded (at start, on SIGHUP, or when the watcher saw it change). */
static void h_policy_get(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                         struct tc_http_resp *resp) {
  json_t *o = json_object();
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  if (!s->policy) {
    tc_snapshot_release(s);
    if (api->o.policy_file_mode) {
      /* file mode without a policy file: allow-all, like Headscale */
      json_object_set_new(o, "policy", json_string(""));
      json_object_set_new(o, "updatedAt", json_null());
      tc_http_resp_json(resp, 200, o);
      return;
    }
    json_decref(o);
    tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "no policy has been set");
    return;
  }
  json_t *pj = json_stringn(s->policy, s->policy_len);
  json_object_set_new(o, "policy", pj ? pj : json_string(""));
  tc_snapshot_release(s);
  struct tc_policy_rec *hist = NULL;
  size_t n = 0;
  struct tc_err e = {0};
  if (!tc_model_policy_history(api->o.model, 1, &hist, &n, &e) && n)
    json_object_set_new(o, "updatedAt", time_json(hist[0].created_at));
  else
    json_object_set_new(o, "updatedAt", json_null());
  for (size_t i = 0; i < n; i++) tc_policy_rec_free(&hist[i]);
  free(hist);
  tc_http_resp_json(resp, 200, o);
}

static void h_policy_set(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                         struct tc_http_resp *resp) {
  if (api->o.policy_file_mode) {
    tc_http_resp_error(resp, 400, TC_GRPC_FAILED_PRECONDITION,
                       "policy.mode is \"file\": edit %s instead, or use policy.mode \"database\"",
                       api->policy_path && *api->policy_path ? api->policy_path : "the policy file");
    return;
  }
  json_t *b = body_object(req, resp);
  if (!b) return;
  json_t *p = json_object_get(b, "policy");
  struct tc_err e = {0};
  if (!json_is_string(p)) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "policy: want the policy text as a string");
  } else if (tc_api_policy_validate(NULL, json_string_value(p), json_string_length(p), &e) ||
             /* a policy whose own tests fail never replaces the one in force */
             tc_model_policy_test(api->o.model, json_string_value(p), json_string_length(p), &e) ||
             tc_model_policy_set(api->o.model, ac->actor, json_string_value(p), json_string_length(p), NULL, &e)) {
    err_resp(resp, &e);
  } else {
    json_t *o = json_object();
    json_object_set_new(o, "policy", json_incref(p));
    json_object_set_new(o, "updatedAt", time_json(tc_now()));
    tc_http_resp_json(resp, 200, o);
  }
  json_decref(b);
}

static void h_policy_check(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                           struct tc_http_resp *resp) {
  json_t *b = body_object(req, resp);
  if (!b) return;
  json_t *p = json_object_get(b, "policy");
  struct tc_err e = {0};
  if (!json_is_string(p))
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "policy: want the policy text as a string");
  else if (tc_api_policy_validate(NULL, json_string_value(p), json_string_length(p), &e) ||
           tc_model_policy_test(api->o.model, json_string_value(p), json_string_length(p), &e))
    err_resp(resp, &e);
  else
    tc_http_resp_json(resp, 200, json_object());
  json_decref(b);
}

/* ---- health ---------------------------------------------------------------------------------- */

static bool db_ok(struct tc_api *api, struct tc_err *e) {
  return !api->o.store || tc_store_ping(api->o.store, e) == 0;
}

static void h_api_health(struct tc_api *api, const struct api_ctx *ac, const struct tc_http_req *req,
                         struct tc_http_resp *resp) {
  struct tc_err e = {0};
  bool ok = db_ok(api, &e);
  json_t *o = json_object();
  json_object_set_new(o, "databaseConnectivity", json_boolean(ok));
  tc_http_resp_json(resp, ok ? 200 : 503, o);
}

/* GET /health is unauthenticated, like Headscale's. */
static void h_health(void *ctx, const struct tc_http_req *req, struct tc_http_resp *resp) {
  struct tc_api *api = ctx;
  struct tc_err e = {0};
  if (db_ok(api, &e)) {
    tc_http_resp_json(resp, 200, json_pack("{s:s}", "status", "pass"));
  } else {
    json_t *o = json_pack("{s:s}", "status", "fail");
    json_t *out = json_string(e.msg);
    json_object_set_new(o, "output", out ? out : json_string("database unreachable"));
    tc_http_resp_json(resp, 503, o);
  }
  resp->content_type = "application/health+json";
}

/* ---- dispatch with authentication ---------------------------------------------------------------- */

struct route_def {
  const char *method, *pattern;
  api_fn fn;
};

static const struct route_def routes[] = {
    {"GET", "/api/v1/user", h_user_list},
    {"POST", "/api/v1/user", h_user_create},
    {"PUT", "/api/v1/user/{old}/rename/{new}", h_user_rename},
    {"POST", "/api/v1/user/{old}/rename/{new}", h_user_rename},
    {"DELETE", "/api/v1/user/{id}", h_user_delete},
    {"GET", "/api/v1/node", h_node_list},
    {"POST", "/api/v1/node/register", h_node_register},
    {"GET", "/api/v1/node/{id}", h_node_get},
    {"DELETE", "/api/v1/node/{id}", h_node_delete},
    {"POST", "/api/v1/node/{id}/expire", h_node_expire},
    {"POST", "/api/v1/node/{id}/rename/{name}", h_node_rename},
    {"POST", "/api/v1/node/{id}/tags", h_node_tags},
    {"POST", "/api/v1/node/{id}/approve_routes", h_node_routes},
    {"POST", "/api/v1/node/{id}/user", h_node_user},
    {"POST", "/api/v1/auth/register", h_auth_register},
    {"POST", "/api/v1/auth/approve", h_auth_approve},
    {"POST", "/api/v1/auth/reject", h_auth_reject},
    {"GET", "/api/v1/auth/pending", h_auth_pending},
    {"GET", "/api/v1/preauthkey", h_preauth_list},
    {"POST", "/api/v1/preauthkey", h_preauth_create},
    {"POST", "/api/v1/preauthkey/expire", h_preauth_expire},
    {"DELETE", "/api/v1/preauthkey", h_preauth_delete},
    {"GET", "/api/v1/apikey", h_apikey_list},
    {"POST", "/api/v1/apikey", h_apikey_create},
    {"POST", "/api/v1/apikey/expire", h_apikey_expire},
    {"DELETE", "/api/v1/apikey/{prefix}", h_apikey_delete},
    {"GET", "/api/v1/policy", h_policy_get},
    {"PUT", "/api/v1/policy", h_policy_set},
    {"POST", "/api/v1/policy/check", h_policy_check},
    {"GET", "/api/v1/health", h_api_health},
};

struct route_ctx {
  struct tc_api *api;
  api_fn fn;
};


static void api_entry(void *ctx, const struct tc_http_req *req, struct tc_http_resp *resp) {
  const struct route_ctx *rc = ctx;
  struct api_ctx ac = {.actor = "cli"};
  char *prefix = NULL;
  char actor[64];
  if (!req->trusted) {
    const char *auth = tc_http_header(req, "Authorization");
    if (!auth || !*auth) {
      tc_http_resp_error(resp, 401, TC_GRPC_UNAUTHENTICATED, "missing API key (Authorization: Bearer <key>)");
      tc_http_resp_header(resp, "WWW-Authenticate", "Bearer");
      return;
    }
    if (strncasecmp(auth, "Bearer ", 7)) {
      tc_http_resp_error(resp, 401, TC_GRPC_UNAUTHENTICATED, "authorization must be a Bearer API key");
      tc_http_resp_header(resp, "WWW-Authenticate", "Bearer");
      return;
    }
    const char *tok = auth + 7;
    while (*tok == ' ') tok++;
    size_t tl = strlen(tok);
    int64_t kid = 0;
    struct tc_err e = {0};
    if (tl > 256 || tc_model_apikey_verify(rc->api->o.model, tok, tl, &kid, &prefix, &e)) {
      tc_http_resp_error(resp, 401, TC_GRPC_UNAUTHENTICATED, "%s",
                         e.code == TC_EEXPIRED ? "API key expired" : "invalid API key");
      tc_http_resp_header(resp, "WWW-Authenticate", "Bearer error=\"invalid_token\"");
      free(prefix);
      return;
    }
    snprintf(actor, sizeof actor, "api:%s", prefix ? prefix : "?");
    ac.actor = actor;
  }
  rc->fn(rc->api, &ac, req, resp);
  free(prefix);
}

static void metrics_hook(void *ctx, struct tc_buf *out) {
  struct tc_api *api = ctx;
  struct tc_snapshot *s = tc_model_snapshot(api->o.model);
  size_t n_pak = s->n_preauth_keys;
  tc_snapshot_release(s);
  struct tc_model_stats st;
  memset(&st, 0, sizeof st);
  tc_model_stats(api->o.model, &st);
  tc_buf_printf(out,
                "# HELP tailcoat_nodes Registered nodes.\n# TYPE tailcoat_nodes gauge\ntailcoat_nodes %zu\n"
                "# HELP tailcoat_users Users.\n# TYPE tailcoat_users gauge\ntailcoat_users %zu\n"
                "# HELP tailcoat_nodes_online Nodes with an open map stream.\n"
                "# TYPE tailcoat_nodes_online gauge\ntailcoat_nodes_online %zu\n"
                "# HELP tailcoat_preauth_keys Pre-auth keys.\n# TYPE tailcoat_preauth_keys gauge\n"
                "tailcoat_preauth_keys %zu\n"
                "# HELP tailcoat_pending_registrations Interactive registrations waiting for approval.\n"
                "# TYPE tailcoat_pending_registrations gauge\ntailcoat_pending_registrations %zu\n"
                "# HELP tailcoat_snapshot_seq Sequence number of the current model snapshot.\n"
                "# TYPE tailcoat_snapshot_seq gauge\ntailcoat_snapshot_seq %llu\n"
                "# HELP tailcoat_model_transactions_total Model write transactions by result.\n"
                "# TYPE tailcoat_model_transactions_total counter\n"
                "tailcoat_model_transactions_total{result=\"ok\"} %llu\n"
                "tailcoat_model_transactions_total{result=\"failed\"} %llu\n"
                "# HELP tailcoat_model_transaction_retries_total Write transactions retried after a transient error.\n"
                "# TYPE tailcoat_model_transaction_retries_total counter\n"
                "tailcoat_model_transaction_retries_total %llu\n"
                "# HELP tailcoat_model_transaction_max_seconds Slowest write transaction since start.\n"
                "# TYPE tailcoat_model_transaction_max_seconds gauge\n"
                "tailcoat_model_transaction_max_seconds %.6f\n",
                st.nodes, st.users, st.online, n_pak, st.pending, (unsigned long long)st.seq,
                (unsigned long long)st.tx_ok, (unsigned long long)st.tx_failed, (unsigned long long)st.tx_retries,
                (double)st.max_tx_us / 1e6);
}

int tc_api_register(struct tc_router *r, const struct tc_api_opts *opts, struct tc_api **out) {
  *out = NULL;
  if (!opts || !opts->model) return TC_EINVAL;
  struct tc_api *api = tc_xcalloc(1, sizeof *api);
  api->ctxs = tc_xcalloc(TC_ARRAY_LEN(routes), sizeof *api->ctxs);
  api->o = *opts;
  api->policy_path = tc_xstrdup(opts->policy_path ? opts->policy_path : "");
  api->o.policy_path = api->policy_path;
  int rc = tc_http_route(r, "GET", "/health", h_health, api);
  for (size_t i = 0; !rc && i < TC_ARRAY_LEN(routes); i++) {
    api->ctxs[i].api = api;
    api->ctxs[i].fn = routes[i].fn;
    rc = tc_http_route(r, routes[i].method, routes[i].pattern, api_entry, &api->ctxs[i]);
  }
  if (rc) {
    /* routes already added point at api: the caller must drop the router */
    api->o.metrics_hook = false;
    tc_api_free(api);
    return rc;
  }
  if (opts->metrics_hook) tc_metrics_add_hook(metrics_hook, api);
  *out = api;
  return TC_OK;
}

void tc_api_free(struct tc_api *api) {
  if (!api) return;
  if (api->o.metrics_hook) tc_metrics_remove_hook(metrics_hook, api);
  free(api->ctxs);
  free(api->policy_path);
  free(api);
}
