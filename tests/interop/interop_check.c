/* interop_check: see interop_check.h. */
#include "interop_check.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mapper/mapper_int.h"
#include "tc_test.h"

/* ---- the checker ------------------------------------------------------------ */

int load_schema(struct schema *s, const char *ref) {
  memset(s, 0, sizeof *s);
  const char *src = getenv("TC_SOURCE_DIR");
  char path[1024];
  snprintf(path, sizeof path, "%s/tests/interop/tailcfg_schema_%s.json", src ? src : TC_SOURCE_DIR, ref);
  json_error_t je;
  s->root = json_load_file(path, 0, &je);
  if (!s->root) {
    fprintf(stderr, "  cannot load %s: %s\n", path, je.text);
    return -1;
  }
  s->structs = json_object_get(s->root, "structs");
  s->named = json_object_get(s->root, "named");
  s->ref = ref;
  return s->structs && s->named ? 0 : -1;
}

__attribute__((format(printf, 3, 4))) static void problem(struct check *c, const char *path, const char *fmt, ...) {
  c->problems++;
  if (c->quiet) return;
  fprintf(stderr, "  [%s] %s: ", c->s->ref, path);
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
}

static bool is_hex64(const char *s) {
  for (int i = 0; i < 64; i++)
    if (!isxdigit((unsigned char)s[i]) || isupper((unsigned char)s[i])) return false;
  return s[64] == 0;
}

/* Integer kinds Go decodes from a JSON number (and from a map key string). */
int int_kind(const char *t, bool *is_unsigned, int *bits) {
  static const struct {
    const char *n;
    bool u;
    int bits;
  } k[] = {{"int", false, 64},    {"int64", false, 64},  {"int32", false, 32}, {"int16", false, 16},
           {"int8", false, 8},    {"uint", true, 64},    {"uint64", true, 64}, {"uint32", true, 32},
           {"uint16", true, 16},  {"uint8", true, 8},    {"time.Duration", false, 64}};
  for (size_t i = 0; i < sizeof k / sizeof k[0]; i++)
    if (!strcmp(t, k[i].n)) {
      *is_unsigned = k[i].u;
      *bits = k[i].bits;
      return 1;
    }
  return 0;
}

/* Follows named types (NodeID -> ID -> int64) to a type expression. */
const char *resolve(const struct schema *s, const char *t) {
  for (int i = 0; i < 8; i++) {
    if (!strcmp(t, "RawMessage")) return t; /* a string type with raw-JSON marshalling */
    const char *n = json_string_value(json_object_get(s->named, t));
    if (!n) return t;
    t = n;
  }
  return t;
}


static bool int_fits(json_t *v, bool uns, int bits) {
  if (!json_is_integer(v)) return false;
  json_int_t x = json_integer_value(v);
  if (uns) return x >= 0 && (bits >= 64 || x < ((json_int_t)1 << bits));
  if (bits >= 64) return true;
  json_int_t lim = (json_int_t)1 << (bits - 1);
  return x >= -lim && x < lim;
}

static void check_struct(struct check *c, json_t *v, const char *name, json_t *fields, const char *path) {
  if (!json_is_object(v)) {
    problem(c, path, "expected an object for %s", name);
    return;
  }
  const char *k;
  json_t *fv;
  json_object_foreach(v, k, fv) {
    char sub[512];
    snprintf(sub, sizeof sub, "%s.%s", path, k);
    const char *ft = json_string_value(json_object_get(fields, k));
    if (!ft) {
      /* Exact spelling only: Go would match case-insensitively, but a field
       * the struct lacks is silently dropped. Remember it per version. */
      size_t l = strlen(c->unknown);
      snprintf(c->unknown + l, sizeof c->unknown - l, "%s.%s ", name, k);
      bool ci = false;
      const char *fk;
      json_t *fx;
      json_object_foreach(fields, fk, fx) if (!strcasecmp(fk, k)) ci = true;
      if (ci) problem(c, sub, "field spelt differently from the Go struct (%s)", name);
      continue;
    }
    check_value(c, fv, ft, sub);
  }
}

static void check_key(struct check *c, json_t *v, const char *prefix, const char *path) {
  const char *s = json_string_value(v);
  size_t pl = strlen(prefix);
  if (!s) {
    problem(c, path, "key must be a string (%s...)", prefix);
    return;
  }
  /* Go's key UnmarshalText refuses "" and anything without the exact prefix. */
  if (strncmp(s, prefix, pl) || !is_hex64(s + pl)) problem(c, path, "malformed key text \"%s\"", s);
}

void check_value(struct check *c, json_t *v, const char *gotype, const char *path) {
  const struct schema *s = c->s;
  const char *t = resolve(s, gotype);
  if (json_is_null(v)) return; /* null leaves any Go value at its zero: always decodable */
  if (!strncmp(t, "*", 1)) {
    check_value(c, v, t + 1, path);
    return;
  }
  if (!strcmp(t, "[]byte") || !strcmp(t, "tkatype.MarshaledSignature")) {
    if (!json_is_string(v)) problem(c, path, "expected base64 text for %s", t);
    return;
  }
  if (!strncmp(t, "[]", 2)) {
    if (!json_is_array(v)) {
      problem(c, path, "expected an array for %s", t);
      return;
    }
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e) {
      char sub[512];
      snprintf(sub, sizeof sub, "%s[%zu]", path, i);
      check_value(c, e, t + 2, sub);
    }
    return;
  }
  if (!strncmp(t, "map[", 4)) {
    const char *rb = strchr(t, ']');
    char kt[128];
    snprintf(kt, sizeof kt, "%.*s", (int)(rb - t - 4), t + 4);
    const char *kres = resolve(s, kt);
    bool uns = false;
    int bits = 0;
    bool ikey = int_kind(kres, &uns, &bits);
    if (!json_is_object(v)) {
      problem(c, path, "expected an object for %s", t);
      return;
    }
    const char *k;
    json_t *e;
    json_object_foreach(v, k, e) {
      char sub[512];
      snprintf(sub, sizeof sub, "%s[%s]", path, k);
      if (ikey) {
        char *end;
        long long x = strtoll(k, &end, 10);
        if (!k[0] || *end || (uns && x < 0)) problem(c, sub, "map key must be a decimal integer (%s)", kres);
      }
      check_value(c, e, rb + 1, sub);
    }
    return;
  }
  bool uns;
  int bits;
  if (int_kind(t, &uns, &bits)) {
    if (!int_fits(v, uns, bits)) problem(c, path, "expected an integer for %s", t);
    return;
  }
  if (!strcmp(t, "float64") || !strcmp(t, "float32")) {
    if (!json_is_number(v)) problem(c, path, "expected a number for %s", t);
    return;
  }
  if (!strcmp(t, "bool")) {
    if (!json_is_boolean(v)) problem(c, path, "expected a boolean for %s", t);
    return;
  }
  if (!strcmp(t, "opt.Bool")) {
    /* opt.Bool decodes true/false/null; the strings are its Go text form,
     * not what a server should send. */
    if (!json_is_boolean(v)) problem(c, path, "expected true/false for %s", t);
    return;
  }
  if (!strcmp(t, "string")) {
    if (!json_is_string(v)) problem(c, path, "expected a string for %s", t);
    return;
  }
  if (!strcmp(t, "RawMessage") || !strcmp(t, "json.RawMessage") || !strcmp(t, "any") ||
      !strcmp(t, "emptyStructJSONSlice"))
    return;
  if (!strcmp(t, "time.Time")) {
    const char *ts = json_string_value(v);
    int64_t x;
    if (!ts || tc_time_parse(ts, &x)) problem(c, path, "expected RFC 3339 time text, got %s", ts ? ts : "non-string");
    return;
  }
  if (!strcmp(t, "key.NodePublic")) return check_key(c, v, "nodekey:", path);
  if (!strcmp(t, "key.MachinePublic")) return check_key(c, v, "mkey:", path);
  if (!strcmp(t, "key.DiscoPublic")) return check_key(c, v, "discokey:", path);
  if (!strcmp(t, "key.NLPublic")) return check_key(c, v, "nlpub:", path);
  if (!strcmp(t, "netip.Prefix")) {
    char canon[64];
    const char *ps = json_string_value(v);
    if (!ps || tc_mapper_prefix_canon(ps, canon)) problem(c, path, "malformed IP prefix %s", ps ? ps : "non-string");
    return;
  }
  if (!strcmp(t, "netip.Addr")) {
    const char *as = json_string_value(v);
    uint8_t buf[16];
    if (!as || (inet_pton(AF_INET, as, buf) != 1 && inet_pton(AF_INET6, as, buf) != 1))
      problem(c, path, "malformed IP address %s", as ? as : "non-string");
    return;
  }
  if (!strcmp(t, "netip.AddrPort")) {
    char canon[64];
    bool drop;
    const char *as = json_string_value(v);
    if (!as || tc_mapper_addrport_canon(as, canon, &drop)) problem(c, path, "malformed ip:port %s", as ? as : "non-string");
    return;
  }
  /* Hostinfo is the client's own object passed through: it decodes into
   * whatever the receiving client knows, so only its shape matters. */
  if (!strcmp(t, "HostinfoView") || !strcmp(t, "Hostinfo")) {
    if (!json_is_object(v)) problem(c, path, "expected an object for %s", t);
    return;
  }
  json_t *fields = json_object_get(s->structs, t);
  if (!fields) {
    size_t l = strlen(t);
    if (l > 4 && !strcmp(t + l - 4, "View")) {
      char base[128];
      snprintf(base, sizeof base, "%.*s", (int)(l - 4), t);
      fields = json_object_get(s->structs, base);
    }
  }
  if (!fields) {
    problem(c, path, "no rule for Go type %s (extend the checker)", t);
    return;
  }
  check_struct(c, v, t, fields, path);
}

/* Checks text as a JSON document of Go type `type` against one schema.
 * Returns the number of problems; unknown fields land in c->unknown. */
int check_doc(struct check *c, const struct schema *s, const char *text, const char *type) {
  memset(c, 0, sizeof *c);
  c->s = s;
  json_error_t je;
  /* Go keeps the last of duplicate keys: a duplicate is always a bug here. */
  json_t *v = json_loads(text, JSON_REJECT_DUPLICATES, &je);
  if (!v) {
    fprintf(stderr, "  [%s] %s: not JSON: %s\n  %.300s\n", s->ref, type, je.text, text);
    return 1;
  }
  check_value(c, v, type, type);
  json_decref(v);
  return c->problems;
}

/* Fields the v1.60 client lacks and why their absence is harmless. */
static bool known_new_field(const char *f) {
  static const char *ok[] = {
      "Node.HomeDERP", /* v1.60-v1.78 read the legacy "DERP":"127.3.3.40:N", which is always sent too */
      "dnstype.Resolver.UseWithExitNode",
  };
  for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
    if (!strcmp(f, ok[i])) return true;
  return false;
}

struct schema S60, S98;
static bool schemas_loaded;

void need_schemas(void) {
  if (schemas_loaded) return;
  TC_REQUIRE(load_schema(&S60, "v1.60.0") == 0);
  TC_REQUIRE(load_schema(&S98, "v1.98.0") == 0);
  schemas_loaded = true;
}

/* Both versions decode text without error; v1.98 knows every field; v1.60
 * knows every field except the documented capver-gated ones. */
int check_both(const char *text, const char *type) {
  struct check c;
  int before = tc_test_failures;
  TC_CHECK_INT(check_doc(&c, &S98, text, type), 0);
  if (c.unknown[0]) fprintf(stderr, "  [v1.98.0] %s: fields the client does not know: %s\n", type, c.unknown);
  TC_CHECK_STR(c.unknown, "");
  TC_CHECK_INT(check_doc(&c, &S60, text, type), 0);
  char *save = NULL;
  for (char *f = strtok_r(c.unknown, " ", &save); f; f = strtok_r(NULL, " ", &save)) {
    if (!known_new_field(f)) fprintf(stderr, "  [v1.60.0] %s: field unknown to v1.60: %s\n", type, f);
    TC_CHECK(known_new_field(f));
  }
  return tc_test_failures - before;
}

