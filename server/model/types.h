/* types: the plain records of tailcoat's domain — users, nodes, pre-auth
 * keys, API keys, policies, audit entries — as values. Storage reads and
 * writes these; the model keeps them in snapshots; the API, CLI and GUI
 * render them. No behaviour lives here beyond constructors/destructors and
 * deep copies (types.c), so any module may include this header.
 *
 * Ownership: every char* and array inside a record is owned by that record;
 * tc_*_free() releases the insides (not the struct itself, so records can
 * live in arrays), tc_*_copy() makes a deep copy. Times are Unix seconds,
 * 0 meaning "unset/never". IDs are positive int64 below 2^53, 0 = none. */
#ifndef TC_MODEL_TYPES_H
#define TC_MODEL_TYPES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TC_KEY_LEN 32

/* A vector of owned strings (tags, routes as prefix text, endpoints). */
struct tc_strv {
  char **v;
  size_t n;
};
void tc_strv_push(struct tc_strv *sv, const char *s); /* copies s */
bool tc_strv_contains(const struct tc_strv *sv, const char *s);
void tc_strv_free(struct tc_strv *sv);
void tc_strv_copy(struct tc_strv *dst, const struct tc_strv *src);
/* JSON array text <-> strv, for storage columns. from_json returns 0 or TC_EINVAL. */
char *tc_strv_to_json(const struct tc_strv *sv); /* owned */
int tc_strv_from_json(const char *json, struct tc_strv *out);

struct tc_user {
  int64_t id;
  char *name;            /* unique login name, e.g. "alice" */
  char *display_name;    /* may be NULL */
  char *email;           /* may be NULL */
  char *provider;        /* "" / NULL for local users, "oidc" for OIDC */
  char *provider_id;     /* OIDC subject URL, unique when set; may be NULL */
  char *profile_pic_url; /* may be NULL */
  int64_t created_at;
  int64_t updated_at;
};
void tc_user_free(struct tc_user *u);
void tc_user_copy(struct tc_user *dst, const struct tc_user *src);

enum tc_register_method {
  TC_REG_UNSPECIFIED = 0,
  TC_REG_AUTHKEY = 1,
  TC_REG_CLI = 2, /* interactive, approved with `nodes register` or the GUI */
  TC_REG_OIDC = 3,
};
const char *tc_register_method_name(enum tc_register_method m); /* "authkey", "cli", "oidc", "" */

struct tc_node {
  int64_t id;
  uint8_t machine_key[TC_KEY_LEN];
  uint8_t node_key[TC_KEY_LEN];
  uint8_t disco_key[TC_KEY_LEN]; /* all-zero = unknown */
  bool has_ipv4, has_ipv6;
  uint8_t ipv4[4];
  uint8_t ipv6[16];
  char *hostname;      /* as the client reported it (Hostinfo.Hostname) */
  char *given_name;    /* DNS-safe, unique in the tailnet; the MagicDNS label */
  int64_t user_id;     /* owner; for tagged nodes the user who registered it (may be 0) */
  struct tc_strv tags; /* "tag:x"; non-empty means the node is owned by tags */
  char *hostinfo_json; /* last Hostinfo object, verbatim JSON; may be NULL */
  struct tc_strv endpoints;         /* "ip:port" */
  struct tc_strv announced_routes;  /* prefixes from Hostinfo.RoutableIPs */
  struct tc_strv approved_routes;   /* prefixes an admin or autoApprovers approved */
  int64_t expiry;    /* key expiry; 0 = never */
  int64_t last_seen; /* last time a map stream was open; 0 = never */
  enum tc_register_method register_method;
  int64_t auth_key_id; /* pre-auth key used, 0 if none */
  bool ephemeral;
  int32_t home_derp;   /* Hostinfo.NetInfo.PreferredDERP; 0 = unknown */
  int32_t cap_version; /* from the latest MapRequest */
  int64_t created_at;
  int64_t updated_at;
};
void tc_node_free(struct tc_node *n);
void tc_node_copy(struct tc_node *dst, const struct tc_node *src);

struct tc_preauth_key {
  int64_t id;
  char *prefix;       /* public part shown in listings */
  uint8_t hash[32];   /* hash of the secret part; the secret itself is never stored */
  int64_t user_id;    /* 0 for keys owned only by tags */
  bool reusable;
  bool ephemeral;
  bool used;
  struct tc_strv tags; /* ACL tags applied to nodes that register with it */
  int64_t expiration;  /* 0 = never */
  int64_t created_at;
};
void tc_preauth_key_free(struct tc_preauth_key *k);
void tc_preauth_key_copy(struct tc_preauth_key *dst, const struct tc_preauth_key *src);

struct tc_api_key {
  int64_t id;
  char *prefix;
  uint8_t hash[32];
  int64_t expiration; /* 0 = never */
  int64_t last_seen;
  int64_t created_at;
};
void tc_api_key_free(struct tc_api_key *k);
void tc_api_key_copy(struct tc_api_key *dst, const struct tc_api_key *src);

/* One accepted policy version; the newest is in force in database mode. */
struct tc_policy_rec {
  int64_t id;
  char *data; /* HuJSON text as submitted */
  char *actor;
  int64_t created_at;
};
void tc_policy_rec_free(struct tc_policy_rec *p);

struct tc_audit {
  int64_t id;
  int64_t at;
  char *actor;  /* "cli", "api:<prefix>", "admin:<user>", "node:<id>", "system" */
  char *action; /* "user.create", "node.delete", ... */
  char *target; /* e.g. "user:3" */
  char *detail; /* JSON or free text; may be NULL */
};
void tc_audit_free(struct tc_audit *a);

#endif
