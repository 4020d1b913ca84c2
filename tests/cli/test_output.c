/* The CLI's YAML output read back with libyaml must give the same JSON
 * value (strings stay strings, nesting is kept), for awkward inputs. */
#include <yaml.h>

#include "cli/cli_int.h"
#include "tc_test.h"

/* Minimal YAML -> JSON for the subset the emitter writes (block maps and
 * sequences, flow [] and {}, plain and double-quoted scalars). */
static json_t *scalar_json(const yaml_event_t *ev) {
  const char *v = (const char *)ev->data.scalar.value;
  size_t len = ev->data.scalar.length;
  if (ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return json_stringn(v, len);
  if (!strcmp(v, "null") || !strcmp(v, "~")) return json_null();
  if (!strcmp(v, "true")) return json_true();
  if (!strcmp(v, "false")) return json_false();
  json_t *num = json_loads(v, JSON_DECODE_ANY, NULL);
  if (num && json_is_number(num)) return num;
  json_decref(num);
  return json_stringn(v, len);
}

static json_t *parse_node(yaml_parser_t *p, yaml_event_t *first);

static json_t *parse_node(yaml_parser_t *p, yaml_event_t *ev) {
  if (ev->type == YAML_SCALAR_EVENT) return scalar_json(ev);
  if (ev->type == YAML_SEQUENCE_START_EVENT) {
    json_t *a = json_array();
    for (;;) {
      yaml_event_t e;
      if (!yaml_parser_parse(p, &e)) return json_decref(a), NULL;
      if (e.type == YAML_SEQUENCE_END_EVENT) {
        yaml_event_delete(&e);
        return a;
      }
      json_t *v = parse_node(p, &e);
      yaml_event_delete(&e);
      if (!v) return json_decref(a), NULL;
      json_array_append_new(a, v);
    }
  }
  if (ev->type == YAML_MAPPING_START_EVENT) {
    json_t *o = json_object();
    for (;;) {
      yaml_event_t k;
      if (!yaml_parser_parse(p, &k)) return json_decref(o), NULL;
      if (k.type == YAML_MAPPING_END_EVENT) {
        yaml_event_delete(&k);
        return o;
      }
      if (k.type != YAML_SCALAR_EVENT) return yaml_event_delete(&k), json_decref(o), NULL;
      char *key = strndup((const char *)k.data.scalar.value, k.data.scalar.length);
      yaml_event_delete(&k);
      yaml_event_t ve;
      if (!yaml_parser_parse(p, &ve)) return free(key), json_decref(o), NULL;
      json_t *v = parse_node(p, &ve);
      yaml_event_delete(&ve);
      if (!v) return free(key), json_decref(o), NULL;
      json_object_set_new(o, key, v);
      free(key);
    }
  }
  return NULL;
}

static json_t *yaml_to_json(const char *text) {
  yaml_parser_t p;
  yaml_parser_initialize(&p);
  yaml_parser_set_input_string(&p, (const unsigned char *)text, strlen(text));
  json_t *out = NULL;
  for (;;) {
    yaml_event_t e;
    if (!yaml_parser_parse(&p, &e)) {
      fprintf(stderr, "  yaml error: %s at line %zu\n", p.problem, p.problem_mark.line + 1);
      break;
    }
    yaml_event_type_t t = e.type;
    if (t == YAML_SCALAR_EVENT || t == YAML_SEQUENCE_START_EVENT || t == YAML_MAPPING_START_EVENT) {
      out = parse_node(&p, &e);
      yaml_event_delete(&e);
      break;
    }
    yaml_event_delete(&e);
    if (t == YAML_STREAM_END_EVENT) break;
  }
  yaml_parser_delete(&p);
  return out;
}

static void roundtrip(const char *json_text) {
  json_t *in = json_loads(json_text, JSON_DECODE_ANY, NULL);
  TC_REQUIRE(in);
  struct tc_buf b = TC_BUF_INIT;
  tc_out_yaml(in, &b);
  json_t *back = yaml_to_json(b.data ? b.data : "");
  if (!back || !json_equal(in, back)) {
    char *bs = back ? json_dumps(back, JSON_ENCODE_ANY) : NULL;
    fprintf(stderr, "  yaml round trip failed for %s\n--- yaml:\n%s--- back: %s\n", json_text, b.data,
            bs ? bs : "(unparsable)");
    free(bs);
    tc_test_failures++;
  }
  json_decref(back);
  json_decref(in);
  tc_buf_free(&b);
}

TC_TEST(yaml_output_round_trips) {
  roundtrip("{\"id\":\"1\",\"name\":\"alice\",\"n\":3,\"ok\":true,\"no\":false,\"nil\":null}");
  roundtrip("[{\"a\":\"x: y\",\"b\":\"- dash\",\"c\":\"#hash\",\"d\":\"true\",\"e\":\"null\",\"f\":\"12\"}]");
  roundtrip("{\"multi\":\"line1\\nline2\\ttab\",\"quote\":\"say \\\"hi\\\"\",\"uni\":\"caf\\u00e9 \\u65e5\"}");
  roundtrip("{\"empty_obj\":{},\"empty_arr\":[],\"nested\":{\"deeper\":{\"list\":[1,[2,3],{\"k\":\"v\"}]}}}");
  roundtrip("[[],[{}],[[\"a\"]]]");
  roundtrip("{\"yes\":\"on\",\"true\":1,\"key with space\":\"v\",\"ключ\":\"значение\",\"\":\"empty key\"}");
  roundtrip("\"just a string: with colon\"");
  roundtrip("[]");
  roundtrip("{\"users\":[{\"id\":\"1\",\"createdAt\":\"2026-01-02T03:04:05Z\",\"tags\":[\"tag:a\",\"tag:b\"]}]}");
}
