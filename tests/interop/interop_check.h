/* interop_check: checks JSON against the tailcfg schemas generated from the
 * official client's source (tailcfg_schema_<tag>.json, see
 * gen_tailcfg_schema.py). Shared by the interop tests; single-threaded. */
#ifndef TC_INTEROP_CHECK_H
#define TC_INTEROP_CHECK_H

#include <jansson.h>
#include <stdbool.h>

struct schema {
  json_t *root;
  json_t *structs, *named;
  const char *ref;
};

struct check {
  const struct schema *s;
  int problems;    /* decode errors and unknown fields */
  char unknown[2048]; /* "Struct.Field " for every field this version lacks */
  bool quiet;
};

extern struct schema S60, S98; /* v1.60.0 and v1.98.0, loaded by need_schemas */

int load_schema(struct schema *s, const char *ref);
void need_schemas(void);
/* Follows named types (NodeID -> ID -> int64). */
const char *resolve(const struct schema *s, const char *t);
/* 1 if t is an integer kind Go decodes from a JSON number. */
int int_kind(const char *t, bool *is_unsigned, int *bits);
void check_value(struct check *c, json_t *v, const char *gotype, const char *path);
/* Problems found in text as a document of Go type `type`; unknown fields in c->unknown. */
int check_doc(struct check *c, const struct schema *s, const char *text, const char *type);
/* Runs TC_CHECKs: both versions decode text, v1.98 knows every field, v1.60
 * every field but the allow-listed newer ones. Returns the problem count. */
int check_both(const char *text, const char *type);

#endif
