/* config: tailcoat's configuration — Headscale's config.yaml format (v0.26 to
 * v0.29 example files load unchanged), parsed with libyaml, then overridden
 * from HEADSCALE_* / TAILCOAT_* environment variables, then validated.
 * Also owns the key files that the config names (Noise machine key).
 *
 * Threads: every function here is reentrant; a loaded struct tc_config is a
 * plain value that any thread may read. Reload = load into a fresh struct and
 * swap on success (the old one is freed by its owner).
 *
 * Conventions for struct tc_config after a successful load:
 *   - every char * is owned by the config and never NULL ("" = unset);
 *   - durations are int64 milliseconds (0 = zero/disabled as in Headscale);
 *   - lists are {v, n} arrays, owned;
 *   - relative file paths are resolved against the config file's directory
 *     (as Headscale does) when loaded with tc_config_load(). */
#ifndef TC_CONFIG_H
#define TC_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

/* ---- value types --------------------------------------------------------- */

/* An owned list of owned strings. */
struct tc_strlist {
  char **v;
  size_t n;
};

/* An IP prefix kept as written plus its parsed form. family is 0 when unset
 * (text ""), 4 or 6 otherwise. addr holds 4 (IPv4) or 16 bytes, already
 * masked to bits. */
struct tc_prefix {
  char *text;
  int family;
  uint8_t addr[16];
  int bits;
};

struct tc_prefixlist {
  struct tc_prefix *v;
  size_t n;
};

/* dns.nameservers.split: one domain and the resolvers that serve it. */
struct tc_split_dns {
  char *domain;
  struct tc_strlist nameservers;
};

/* dns.extra_records entry, e.g. {name: grafana.example.com, type: A, value: 100.64.0.3}. */
struct tc_dns_record {
  char *name;
  char *type;
  char *value;
};

/* oidc.extra_params entry. */
struct tc_kv {
  char *key;
  char *value;
};

enum tc_config_db_type { TC_CFG_DB_SQLITE = 0, TC_CFG_DB_POSTGRES = 1 };
enum tc_ip_allocation { TC_IP_ALLOC_SEQUENTIAL = 0, TC_IP_ALLOC_RANDOM = 1 };
enum tc_policy_mode { TC_POLICY_MODE_FILE = 0, TC_POLICY_MODE_DATABASE = 1 };
enum tc_log_format { TC_LOG_FORMAT_TEXT = 0, TC_LOG_FORMAT_JSON = 1 };
enum tc_acme_challenge { TC_ACME_HTTP01 = 0, TC_ACME_TLSALPN01 = 1 };

/* ---- the configuration ----------------------------------------------------- */
struct tc_config {
  /* Where the config came from ("" for text/defaults). Informational. */
  char *source_path;

  char *server_url;          /* http(s)://host[:port][/path] */
  char *server_host;         /* derived: host part of server_url, no port/brackets */
  char *listen_addr;         /* host:port */
  char *metrics_listen_addr; /* host:port, "" disables */
  char *grpc_listen_addr;    /* host:port; tailcoat has no gRPC, kept for compat */
  bool grpc_allow_insecure;
  struct tc_prefixlist trusted_proxies; /* CIDRs whose forwarding headers are honoured */
  bool disable_check_updates;

  struct {
    char *private_key_path;
  } noise;

  struct {
    struct tc_prefix v4; /* inside 100.64.0.0/10, or unset */
    struct tc_prefix v6; /* inside fd7a:115c:a1e0::/48, or unset; one of v4/v6 is set */
    enum tc_ip_allocation allocation;
  } prefixes;

  struct {
    enum tc_config_db_type type; /* "sqlite" and "sqlite3" both mean TC_CFG_DB_SQLITE */
    bool debug;
    struct {
      bool prepare_stmt;
      bool parameterized_queries;
      bool skip_err_record_not_found;
      int64_t slow_threshold_ms; /* YAML: integer milliseconds, as Headscale */
    } gorm;
    struct {
      char *path;
      bool write_ahead_log;
      int wal_autocheckpoint; /* frames; 0 disables */
    } sqlite;
    struct {
      char *host; /* host name or unix socket directory */
      int port;   /* 0 = libpq default */
      char *name;
      char *user;
      char *pass; /* secret: wiped by tc_config_free */
      int max_open_conns;
      int max_idle_conns;
      int conn_max_idle_time_secs;
      char *ssl; /* "false" | "true" | an sslmode such as "verify-full" */
    } postgres;
  } database;

  struct {
    enum tc_policy_mode mode;
    char *path; /* HuJSON file for mode file; "" = allow all */
  } policy;

  struct {
    bool magic_dns;
    char *base_domain;
    bool override_local_dns;
    struct {
      struct tc_strlist global; /* IPs or DoH https:// URLs */
      struct tc_split_dns *split;
      size_t n_split;
    } nameservers;
    struct tc_strlist search_domains;
    struct tc_dns_record *extra_records;
    size_t n_extra_records;
    char *extra_records_path; /* JSON file; exclusive with extra_records */
  } dns;

  struct {
    struct {
      bool enabled;
      int region_id;
      char *region_code;
      char *region_name;
      bool verify_clients;
      char *stun_listen_addr;
      char *private_key_path;
      bool automatically_add_embedded_derp_region;
      char *ipv4;
      char *ipv6;
    } server;
    struct tc_strlist urls;  /* JSON DERP maps fetched over HTTP(S) */
    struct tc_strlist paths; /* local YAML DERP map files */
    bool auto_update_enabled;
    int64_t update_frequency_ms;
  } derp;

  struct {
    int64_t expiry_ms; /* default key expiry for non-tagged nodes; 0 = never */
    struct {
      /* also fed by the deprecated top-level ephemeral_node_inactivity_timeout */
      int64_t inactivity_timeout_ms;
    } ephemeral;
    struct {
      struct {
        int64_t probe_interval_ms; /* 0 disables HA probing */
        int64_t probe_timeout_ms;
      } ha;
    } routes;
  } node;

  struct {
    int64_t revoked_retention_ms;
  } preauth_keys;

  struct {
    enum tc_log_level level; /* base.h levels; Headscale's "panic" maps to FATAL */
    enum tc_log_format format;
  } log;

  char *tls_cert_path;
  char *tls_key_path;
  char *tls_letsencrypt_hostname;
  char *tls_letsencrypt_cache_dir;
  enum tc_acme_challenge tls_letsencrypt_challenge_type;
  char *tls_letsencrypt_listen;
  char *acme_url;
  char *acme_email;

  char *unix_socket;
  unsigned unix_socket_permission; /* mode bits, parsed from an octal string */

  struct {
    bool only_start_if_oidc_is_available;
    char *issuer; /* "" = OIDC off */
    char *client_id;
    char *client_secret;      /* secret: wiped by tc_config_free */
    char *client_secret_path; /* exclusive with client_secret; not read here */
    struct tc_strlist scope;
    struct tc_kv *extra_params;
    size_t n_extra_params;
    struct tc_strlist allowed_domains;
    struct tc_strlist allowed_users;
    struct tc_strlist allowed_groups;
    bool email_verified_required;
    int64_t expiry_ms; /* deprecated (node.expiry); kept for old configs */
    bool use_expiry_from_token;
    bool strip_email_domain; /* removed in Headscale 0.26; accepted with a warning */
    struct {
      bool enabled;
      char *method; /* "plain" | "S256" */
    } pkce;
  } oidc;

  struct {
    bool enabled;
  } logtail;
  bool randomize_client_port; /* deprecated in Headscale 0.29 (moved to policy) */
  struct {
    bool enabled;
  } taildrop;
  struct {
    bool enabled;
  } auto_update;

  /* Headscale remote-CLI settings, honoured by `tailcoat` CLI commands. */
  struct {
    char *address;
    char *api_key; /* secret: wiped by tc_config_free */
    int64_t timeout_ms;
    bool insecure;
  } cli;

  struct {
    int64_t notifier_send_timeout_ms;
    int64_t batch_change_delay_ms;
    int node_mapsession_buffered_chan_size;
    int batcher_workers; /* 0 = choose automatically */
    int64_t register_cache_expiration_ms;
    int register_cache_max_entries;
    int node_store_batch_size;
    int64_t node_store_batch_timeout_ms;
  } tuning;

  /* Person-readable notes about deprecated keys, collected during load (the
   * library prints nothing). Not part of tc_config_equal. */
  struct tc_strlist warnings;
};

/* ---- loading ---------------------------------------------------------------- */

/* Options for tc_config_load_opts. Zero-initialised means: environment from
 * `environ`, validate. */
struct tc_config_load_opts {
  /* NULL-terminated "NAME=value" array used instead of `environ`. */
  const char *const *env;
  bool no_env;        /* ignore the environment entirely */
  bool skip_validate; /* parse and apply env only (for tooling / tests) */
};

/* Fills out with built-in defaults (Headscale's). out must be uninitialised or
 * freed; it is owned by the caller (tc_config_free). Defaults alone do not
 * validate: server_url and noise.private_key_path have no default. */
void tc_config_defaults(struct tc_config *out);

/* Loads defaults, then the YAML file at path, then the environment, then
 * validates.
 *
 * Environment (viper style): key path a.b_c is read from TAILCOAT_A_B_C,
 * else HEADSCALE_A_B_C; an empty variable counts as unset. Lists are
 * space- or comma-separated. Map- and record-valued keys
 * (dns.nameservers.split, dns.extra_records, oidc.extra_params) come from
 * the file only. A blank/null value in the file means the key's default.
 * Keys Headscale deprecated but still accepts load with a note in
 * out->warnings; removed keys and unknown keys are errors.
 * On success out is owned by the caller; on failure out is left
 * zeroed (nothing to free, tc_config_free is still safe) and err names the key
 * path and reason, with "line L col C" for errors located in the file. */
int tc_config_load(const char *path, struct tc_config *out, struct tc_err *err);
/* Same from text in memory (len bytes, need not be NUL-terminated). */
int tc_config_load_text(const char *text, size_t len, struct tc_config *out, struct tc_err *err);
/* Full form: path or text (exactly one non-NULL), with options (NULL = defaults). */
int tc_config_load_opts(const char *path, const char *text, size_t len,
                        const struct tc_config_load_opts *opts, struct tc_config *out,
                        struct tc_err *err);

/* Runs the validation rules on an already filled config (load does this).
 * May append warnings to cfg->warnings. 0 or TC_EINVAL. */
int tc_config_validate(struct tc_config *cfg, struct tc_err *err);

/* Appends the effective config in canonical YAML (fixed key order, every
 * key present, durations in Go form) to out. Loading it again gives a config
 * tc_config_equal to cfg. Secrets are printed (the output is a config file). */
int tc_config_print(const struct tc_config *cfg, struct tc_buf *out);

/* Deep equality of every setting (ignores source_path and warnings). */
bool tc_config_equal(const struct tc_config *a, const struct tc_config *b);

/* Deep copy into out (owned by the caller). */
void tc_config_copy(struct tc_config *out, const struct tc_config *src);

/* Frees everything the config owns (wiping secrets) and zeroes it. NULL ok. */
void tc_config_free(struct tc_config *cfg);

/* A small commented config for first start (`tailcoat config init`), with
 * state files under data_dir. Returns owned text. */
char *tc_config_default_text(const char *data_dir);

/* The config file to use when none is given: the first that exists of
 * $TAILCOAT_CONFIG, $HEADSCALE_CONFIG, /etc/tailcoat/config.yaml,
 * /etc/headscale/config.yaml, $HOME/.headscale/config.yaml, ./config.yaml.
 * env as in tc_config_load_opts (NULL = environ). Returns an owned path, or
 * NULL when none exists. */
char *tc_config_find(const char *const *env);

/* The OIDC client secret: oidc.client_secret, or the trimmed contents of
 * oidc.client_secret_path after expanding $VAR / ${VAR} from env (NULL =
 * environ), as Headscale does for systemd's $CREDENTIALS_DIRECTORY.
 * *out is owned by the caller (free with tc_free_secret(p, strlen(p))).
 * 0, or TC_EIO / TC_EINVAL with err naming oidc.client_secret_path. */
int tc_config_oidc_client_secret(const struct tc_config *cfg, const char *const *env, char **out,
                                 struct tc_err *err);

/* ---- helpers others may use ---------------------------------------------------- */

/* Parses "a.b.c.d/n" or "v6/n" into p (p->text owned, copied from s). 0 or TC_EINVAL. */
int tc_prefix_parse(const char *s, struct tc_prefix *p);
/* True if inner lies entirely within outer (same family). */
bool tc_prefix_contains(const struct tc_prefix *outer, const struct tc_prefix *inner);
/* Splits "host:port" / "[v6]:port" / ":port"; host may be "" (all addresses).
 * host (>= 256 bytes) and port are filled. 0 or TC_EINVAL. */
int tc_hostport_split(const char *s, char host[256], int *port);
void tc_strlist_free(struct tc_strlist *l);
void tc_strlist_push(struct tc_strlist *l, const char *s); /* copies s */

/* ---- key files (keyfile.c) --------------------------------------------------------- */

/* Flag returned (as a positive value) by tc_keyfile_load_or_create. */
enum {
  TC_KEYFILE_LOADED = 0,
  TC_KEYFILE_CREATED = 1,  /* file was missing and has been written (mode 0600) */
  TC_KEYFILE_INSECURE = 2, /* loaded, but group/other may access it (mode wider than 0600);
                              err->msg describes it for a warning */
};

/* Loads the 32-byte private key stored as "privkey:<64 lowercase hex>\n" at
 * path; if the file does not exist, generates a random key and writes it
 * atomically with mode 0600, creating parent directories (0700). Returns
 * TC_KEYFILE_LOADED/CREATED/INSECURE (>= 0) or a negative TC_E* with err set
 * (malformed file: TC_EINVAL, I/O: TC_EIO). priv is wiped on failure. */
int tc_keyfile_load_or_create(const char *path, uint8_t priv[32], struct tc_err *err);

/* Formats priv as "privkey:<64 hex>" (no newline) into out (>= 73 bytes). */
void tc_keyfile_format(const uint8_t priv[32], char out[73]);

/* Parses the text of a key file (trailing whitespace tolerated). 0 or TC_EINVAL. */
int tc_keyfile_parse(const char *text, size_t len, uint8_t priv[32], struct tc_err *err);

#endif
