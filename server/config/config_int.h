/* config_int.h: the key table and helpers shared by the files of the config
 * module only (config.c parses/prints, validate.c checks, defaults.c writes
 * the first-start file). Not for other modules. */
#ifndef TC_CONFIG_INT_H
#define TC_CONFIG_INT_H

#include "config/config.h"

enum cfg_ktype {
  K_STR,        /* char * */
  K_BOOL,       /* bool */
  K_INT,        /* int, non-negative */
  K_MSINT,      /* int64_t ms written as an integer (Headscale's gorm.slow_threshold) */
  K_DUR,        /* int64_t ms written as a Go duration */
  K_ENUM,       /* int; aux = NULL-terminated names, "a|b" = spellings of one value */
  K_LOGLEVEL,   /* enum tc_log_level */
  K_MODE,       /* unsigned file mode from an octal string */
  K_PREFIX,     /* struct tc_prefix */
  K_PREFIXLIST, /* struct tc_prefixlist */
  K_STRLIST,    /* struct tc_strlist */
  K_SPLIT,      /* struct tc_split_dns * + size_t count */
  K_RECORDS,    /* struct tc_dns_record * + size_t count */
  K_KV,         /* struct tc_kv * + size_t count */
  K_ALIAS,      /* deprecated duration key feeding aux (a K_DUR path); no storage */
};

enum {
  F_PATH = 1,   /* file path: relative values resolve against the config's directory */
  F_SECRET = 2, /* wiped when freed */
  F_DEPR = 4,   /* deprecated: warn when set; printed only when not default */
};

struct cfg_key {
  const char *path;
  enum cfg_ktype type;
  size_t off;
  unsigned flags;
  const void *aux;  /* enum names, or alias target path */
  const char *def;  /* default as text; NULL = empty */
  const char *note; /* deprecation advice */
};

extern const struct cfg_key cfg_keys[];
extern const size_t cfg_nkeys;

const struct cfg_key *cfg_key_find(const char *path, size_t *idx);
int cfg_set_text(struct tc_config *cfg, const struct cfg_key *k, const char *s, size_t len, bool isnull,
                 char *why, size_t whylen);
void cfg_clear_key(struct tc_config *cfg, const struct cfg_key *k);
bool cfg_key_equal(const struct tc_config *a, const struct tc_config *b, const struct cfg_key *k);
void cfg_add_warning(struct tc_config *cfg, const char *msg);
/* " (line L:C)" or " (from ENV)" for a key when ctx (a load context) knows it. */
void cfg_loc(const void *ctx, const char *path, char *out, size_t outlen);
int cfg_validate(struct tc_config *cfg, const void *ctx, struct tc_err *err);
int cfg_hostport_split2(const char *s, char host[256], int *port, bool named_port);
int cfg_duration_parse(const char *s, int64_t *ms);
/* Go time.Duration.String() text of whole milliseconds into out. */
char *cfg_go_duration(int64_t ms, char out[48]);

#endif
