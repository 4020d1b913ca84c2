/* Tests for server/config/keyfile.c: the Noise private key file. */
#include "tc_test.h"
#include "base/base.h"
#include "config/config.h"

#include <sys/stat.h>
#include <unistd.h>

TC_TEST(create_then_reload_same_key) {
  char *dir = tc_test_tmpdir();
  char *path = tc_xasprintf("%s/a/b/noise_private.key", dir);
  uint8_t k1[32], k2[32];
  struct tc_err err = {0};
  int rc = tc_keyfile_load_or_create(path, k1, &err);
  if (rc < 0) fprintf(stderr, "  %s\n", err.msg);
  TC_REQUIRE(rc == TC_KEYFILE_CREATED);
  struct stat st;
  TC_REQUIRE(stat(path, &st) == 0);
  TC_CHECK_INT(st.st_mode & 07777, 0600);
  char *dirpath = tc_xasprintf("%s/a/b", dir);
  TC_REQUIRE(stat(dirpath, &st) == 0);
  TC_CHECK_INT(st.st_mode & 0077, 0); /* created parents are private */
  free(dirpath);
  char *text = NULL;
  size_t len = 0;
  TC_REQUIRE(tc_read_file(path, 4096, &text, &len, &err) == 0);
  TC_CHECK_INT(len, 73);
  TC_CHECK(tc_str_has_prefix(text, "privkey:"));
  TC_CHECK(text[72] == '\n');
  for (size_t i = 8; i < 72; i++) TC_CHECK((text[i] >= '0' && text[i] <= '9') || (text[i] >= 'a' && text[i] <= 'f'));
  char fmt[73];
  tc_keyfile_format(k1, fmt);
  TC_CHECK(!memcmp(fmt, text, 72));
  free(text);
  TC_CHECK_INT(tc_keyfile_load_or_create(path, k2, &err), TC_KEYFILE_LOADED);
  TC_CHECK(!memcmp(k1, k2, 32));
  /* no temporary files left behind */
  char *tmp = tc_xasprintf("%s.tmp.%d", path, (int)getpid());
  TC_CHECK(access(tmp, F_OK) != 0);
  free(tmp);
  /* wider permissions: still loads, but flagged */
  TC_REQUIRE(chmod(path, 0644) == 0);
  memset(k2, 0, 32);
  rc = tc_keyfile_load_or_create(path, k2, &err);
  TC_CHECK_INT(rc, TC_KEYFILE_INSECURE);
  TC_CHECK(!memcmp(k1, k2, 32));
  TC_CHECK(strstr(err.msg, "0644") != NULL);
  /* a second key file gets a different key */
  char *path2 = tc_xasprintf("%s/other.key", dir);
  TC_CHECK_INT(tc_keyfile_load_or_create(path2, k2, &err), TC_KEYFILE_CREATED);
  TC_CHECK(memcmp(k1, k2, 32) != 0);
  free(path2);
  free(path);
  free(dir);
}

TC_TEST(tolerates_whitespace_refuses_malformed) {
  char *dir = tc_test_tmpdir();
  char *path = tc_xasprintf("%s/k", dir);
  struct tc_err err = {0};
  uint8_t k[32];
  const char *good = "privkey:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff \r\n\n";
  TC_REQUIRE(tc_write_file_atomic(path, good, strlen(good), 0600, &err) == 0);
  TC_CHECK_INT(tc_keyfile_load_or_create(path, k, &err), TC_KEYFILE_LOADED);
  TC_CHECK(k[0] == 0x00 && k[1] == 0x11 && k[31] == 0xff);
  static const char *const bad[] = {
      "",
      "privkey:",
      "privkey:00112233445566778899aabbccddeeff00112233445566778899aabbccddee",     /* short */
      "privkey:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff00", /* long */
      "privkey:0011223344556677889zaabbccddeeff00112233445566778899aabbccddeeff",   /* not hex */
      "nodekey:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
      " privkey:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
      "privkey:0000000000000000000000000000000000000000000000000000000000000000",
  };
  for (size_t i = 0; i < TC_ARRAY_LEN(bad); i++) {
    TC_REQUIRE(tc_write_file_atomic(path, bad[i], strlen(bad[i]), 0600, &err) == 0);
    memset(k, 0xaa, 32);
    int rc = tc_keyfile_load_or_create(path, k, &err);
    if (rc != TC_EINVAL) fprintf(stderr, "  case %zu: rc=%d\n", i, rc);
    TC_CHECK_INT(rc, TC_EINVAL);
    TC_CHECK(strstr(err.msg, "malformed key file") != NULL);
    TC_CHECK(strstr(err.msg, path) != NULL);
    /* the file was not replaced by a fresh key */
    char *text = NULL;
    size_t len;
    TC_REQUIRE(tc_read_file(path, 4096, &text, &len, &err) == 0);
    TC_CHECK(len == strlen(bad[i]) && !memcmp(text, bad[i], len));
    free(text);
  }
  /* a directory where the key should be */
  char *sub = tc_xasprintf("%s/d", dir);
  TC_REQUIRE(mkdir(sub, 0700) == 0);
  TC_CHECK(tc_keyfile_load_or_create(sub, k, &err) < 0);
  TC_CHECK(tc_keyfile_load_or_create("", k, &err) == TC_EINVAL);
  free(sub);
  free(path);
  free(dir);
}

TC_TEST(format_parse_round_trip) {
  uint8_t k[32], k2[32];
  tc_random(k, 32);
  char out[73];
  tc_keyfile_format(k, out);
  TC_CHECK_INT(strlen(out), 72);
  struct tc_err err = {0};
  TC_CHECK(tc_keyfile_parse(out, strlen(out), k2, &err) == 0);
  TC_CHECK(!memcmp(k, k2, 32));
}
