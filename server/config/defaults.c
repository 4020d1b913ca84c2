/* defaults: the commented config written by `tailcoat config init` for a
 * first start. It must load and validate as is (tested). Reentrant. */
#include "config/config.h"

#include <string.h>

/* data_dir as a double-quoted YAML string. */
static void quoted_path(struct tc_buf *b, const char *dir, const char *file) {
  tc_buf_putc(b, '"');
  for (const char *p = dir; *p; p++) {
    if (*p == '"' || *p == '\\') tc_buf_putc(b, '\\');
    if ((unsigned char)*p < 0x20) {
      tc_buf_printf(b, "\\x%02x", (unsigned char)*p);
      continue;
    }
    tc_buf_putc(b, *p);
  }
  size_t n = strlen(dir);
  if (!n || dir[n - 1] != '/') tc_buf_putc(b, '/');
  tc_buf_puts(b, file);
  tc_buf_putc(b, '"');
}

char *tc_config_default_text(const char *data_dir) {
  struct tc_buf b = TC_BUF_INIT;
  if (!data_dir || !*data_dir) data_dir = ".";
  tc_buf_puts(&b,
              "# tailcoat configuration (Headscale config.yaml format; Headscale configs load unchanged).\n"
              "# Every setting not written here has its Headscale default; see `tailcoat config print`.\n"
              "\n"
              "# The URL clients connect to. Use https:// in production.\n"
              "server_url: http://127.0.0.1:8080\n"
              "listen_addr: 127.0.0.1:8080\n"
              "# /metrics and /debug; keep it private. Empty disables it.\n"
              "metrics_listen_addr: 127.0.0.1:9090\n"
              "\n"
              "noise:\n"
              "  # Created on first start if missing (mode 0600).\n"
              "  private_key_path: ");
  quoted_path(&b, data_dir, "noise_private.key");
  tc_buf_puts(&b,
              "\n"
              "\n"
              "# Tailnet addresses; must lie inside Tailscale's ranges.\n"
              "prefixes:\n"
              "  v4: 100.64.0.0/10\n"
              "  v6: fd7a:115c:a1e0::/48\n"
              "  allocation: sequential\n"
              "\n"
              "database:\n"
              "  type: sqlite\n"
              "  sqlite:\n"
              "    path: ");
  quoted_path(&b, data_dir, "db.sqlite");
  tc_buf_puts(&b,
              "\n"
              "    write_ahead_log: true\n"
              "\n"
              "# DERP relays. Clients need at least one reachable relay before `tailscale up`\n"
              "# completes, so the embedded one is on. DERP always runs over TLS: without\n"
              "# tls_cert_path/tls_key_path and with an http:// server_url, tailcoat answers\n"
              "# TLS on listen_addr itself with a self-signed certificate (created next to\n"
              "# private_key_path) that clients are told to accept unverified. Use https://\n"
              "# and a real certificate beyond a first test. STUN failing to bind is only a\n"
              "# warning. No external DERP map is fetched unless you list one under urls.\n"
              "derp:\n"
              "  server:\n"
              "    enabled: true\n"
              "    automatically_add_embedded_derp_region: true\n"
              "    region_id: 999\n"
              "    region_code: tailcoat\n"
              "    region_name: tailcoat embedded DERP\n"
              "    stun_listen_addr: 0.0.0.0:3478\n"
              "    private_key_path: ");
  quoted_path(&b, data_dir, "derp_server_private.key");
  tc_buf_puts(&b,
              "\n"
              "  urls: []\n"
              "  paths: []\n"
              "\n"
              "node:\n"
              "  # 0 = node keys do not expire by default.\n"
              "  expiry: 0\n"
              "  ephemeral:\n"
              "    inactivity_timeout: 30m\n"
              "\n"
              "# Policy (ACLs/grants) is edited through the API, CLI or web UI.\n"
              "policy:\n"
              "  mode: database\n"
              "\n"
              "dns:\n"
              "  magic_dns: true\n"
              "  # Must differ from server_url's host.\n"
              "  base_domain: tailnet.internal\n"
              "  # false keeps each device's own resolvers; set it to true together\n"
              "  # with nameservers.global to push resolvers to every device.\n"
              "  override_local_dns: false\n"
              "  nameservers:\n"
              "    global: []\n"
              "    split: {}\n"
              "  search_domains: []\n"
              "  extra_records: []\n"
              "\n"
              "log:\n"
              "  level: info\n"
              "  format: text\n"
              "\n"
              "# The local CLI talks to the server through this socket without an API key.\n"
              "unix_socket: ");
  quoted_path(&b, data_dir, "tailcoat.sock");
  tc_buf_puts(&b,
              "\n"
              "unix_socket_permission: \"0770\"\n");
  return tc_buf_steal(&b, NULL);
}
