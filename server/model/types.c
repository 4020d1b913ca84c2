/* types: destructors, deep copies and JSON helpers for the domain records. */
#include "model/types.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"

void tc_strv_push(struct tc_strv *sv, const char *s) {
  sv->v = tc_xrealloc(sv->v, (sv->n + 1) * sizeof *sv->v);
  sv->v[sv->n++] = tc_xstrdup(s);
}

bool tc_strv_contains(const struct tc_strv *sv, const char *s) {
  for (size_t i = 0; i < sv->n; i++)
    if (!strcmp(sv->v[i], s)) return true;
  return false;
}

void tc_strv_free(struct tc_strv *sv) {
  if (!sv) return;
  for (size_t i = 0; i < sv->n; i++) free(sv->v[i]);
  free(sv->v);
  sv->v = NULL;
  sv->n = 0;
}

void tc_strv_copy(struct tc_strv *dst, const struct tc_strv *src) {
  dst->v = NULL;
  dst->n = 0;
  for (size_t i = 0; i < src->n; i++) tc_strv_push(dst, src->v[i]);
}

char *tc_strv_to_json(const struct tc_strv *sv) {
  json_t *a = json_array();
  for (size_t i = 0; i < sv->n; i++) json_array_append_new(a, json_string(sv->v[i]));
  char *s = json_dumps(a, JSON_COMPACT);
  json_decref(a);
  char *out = tc_xstrdup(s ? s : "[]");
  free(s);
  return out;
}

int tc_strv_from_json(const char *json, struct tc_strv *out) {
  out->v = NULL;
  out->n = 0;
  if (!json || !*json) return 0;
  json_t *a = json_loads(json, JSON_REJECT_DUPLICATES, NULL);
  if (!a) return TC_EINVAL;
  if (json_is_null(a)) {
    json_decref(a);
    return 0;
  }
  if (!json_is_array(a)) {
    json_decref(a);
    return TC_EINVAL;
  }
  size_t i;
  json_t *v;
  json_array_foreach(a, i, v) {
    if (!json_is_string(v)) {
      tc_strv_free(out);
      json_decref(a);
      return TC_EINVAL;
    }
    tc_strv_push(out, json_string_value(v));
  }
  json_decref(a);
  return 0;
}

static char *dup_or_null(const char *s) { return s ? tc_xstrdup(s) : NULL; }

void tc_user_free(struct tc_user *u) {
  if (!u) return;
  free(u->name);
  free(u->display_name);
  free(u->email);
  free(u->provider);
  free(u->provider_id);
  free(u->profile_pic_url);
  memset(u, 0, sizeof *u);
}

void tc_user_copy(struct tc_user *dst, const struct tc_user *src) {
  *dst = *src;
  dst->name = dup_or_null(src->name);
  dst->display_name = dup_or_null(src->display_name);
  dst->email = dup_or_null(src->email);
  dst->provider = dup_or_null(src->provider);
  dst->provider_id = dup_or_null(src->provider_id);
  dst->profile_pic_url = dup_or_null(src->profile_pic_url);
}

const char *tc_register_method_name(enum tc_register_method m) {
  switch (m) {
  case TC_REG_AUTHKEY: return "authkey";
  case TC_REG_CLI: return "cli";
  case TC_REG_OIDC: return "oidc";
  default: return "";
  }
}

void tc_node_free(struct tc_node *n) {
  if (!n) return;
  free(n->hostname);
  free(n->given_name);
  tc_strv_free(&n->tags);
  free(n->hostinfo_json);
  tc_strv_free(&n->endpoints);
  tc_strv_free(&n->announced_routes);
  tc_strv_free(&n->approved_routes);
  memset(n, 0, sizeof *n);
}

void tc_node_copy(struct tc_node *dst, const struct tc_node *src) {
  *dst = *src;
  dst->hostname = dup_or_null(src->hostname);
  dst->given_name = dup_or_null(src->given_name);
  tc_strv_copy(&dst->tags, &src->tags);
  dst->hostinfo_json = dup_or_null(src->hostinfo_json);
  tc_strv_copy(&dst->endpoints, &src->endpoints);
  tc_strv_copy(&dst->announced_routes, &src->announced_routes);
  tc_strv_copy(&dst->approved_routes, &src->approved_routes);
}

void tc_preauth_key_free(struct tc_preauth_key *k) {
  if (!k) return;
  free(k->prefix);
  tc_strv_free(&k->tags);
  memset(k, 0, sizeof *k);
}

void tc_preauth_key_copy(struct tc_preauth_key *dst, const struct tc_preauth_key *src) {
  *dst = *src;
  dst->prefix = dup_or_null(src->prefix);
  tc_strv_copy(&dst->tags, &src->tags);
}

void tc_api_key_free(struct tc_api_key *k) {
  if (!k) return;
  free(k->prefix);
  memset(k, 0, sizeof *k);
}

void tc_api_key_copy(struct tc_api_key *dst, const struct tc_api_key *src) {
  *dst = *src;
  dst->prefix = dup_or_null(src->prefix);
}

void tc_policy_rec_free(struct tc_policy_rec *p) {
  if (!p) return;
  free(p->data);
  free(p->actor);
  memset(p, 0, sizeof *p);
}

void tc_audit_free(struct tc_audit *a) {
  if (!a) return;
  free(a->actor);
  free(a->action);
  free(a->target);
  free(a->detail);
  memset(a, 0, sizeof *a);
}
