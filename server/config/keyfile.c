/* keyfile: private key files named by the config (the Noise machine key),
 * stored the way Headscale stores them: "privkey:<64 lowercase hex>\n",
 * mode 0600. Creation is race-free: the key is written to a temporary file
 * and hard-linked into place, so two processes starting at once end up
 * using the same key. Reentrant. */
#include "config/config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define KEY_PREFIX "privkey:"
#define MAX_KEYFILE 4096

void tc_keyfile_format(const uint8_t priv[32], char out[73]) {
  memcpy(out, KEY_PREFIX, 8);
  tc_hex_encode(priv, 32, out + 8);
}

int tc_keyfile_parse(const char *text, size_t len, uint8_t priv[32], struct tc_err *err) {
  while (len && isspace((unsigned char)text[len - 1])) len--;
  if (len != 8 + 64 || memcmp(text, KEY_PREFIX, 8))
    return tc_err_set(err, TC_EINVAL, "expected \"privkey:\" followed by 64 hex digits");
  for (size_t i = 8; i < len; i++)
    if (!isxdigit((unsigned char)text[i]))
      return tc_err_set(err, TC_EINVAL, "expected \"privkey:\" followed by 64 hex digits");
  if (tc_hex_decode(text + 8, 64, priv, 32) < 0) {
    tc_wipe(priv, 32);
    return tc_err_set(err, TC_EINVAL, "expected \"privkey:\" followed by 64 hex digits");
  }
  static const uint8_t zero[32];
  if (tc_ct_equal(priv, zero, 32)) return tc_err_set(err, TC_EINVAL, "the key is all zeros");
  return 0;
}

/* mkdir -p for the parent of path, new directories 0700. */
static int make_parents(const char *path, struct tc_err *err) {
  char *dir = tc_xstrdup(path);
  int rc = 0;
  char *slash = strrchr(dir, '/');
  if (!slash || slash == dir) goto out;
  *slash = 0;
  for (char *p = dir + 1;; p++) {
    if (*p == '/' || *p == 0) {
      char c = *p;
      *p = 0;
      if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
        rc = tc_err_set(err, TC_EIO, "%s: creating directory %s: %s", path, dir, strerror(errno));
        goto out;
      }
      *p = c;
      if (!c) break;
    }
  }
out:
  free(dir);
  return rc;
}

static int load_existing(const char *path, uint8_t priv[32], struct tc_err *err) {
  /* symlinks are followed: Kubernetes secret volumes are made of them */
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return TC_ENOENT;
    return tc_err_set(err, TC_EIO, "%s: %s", path, strerror(errno));
  }
  struct stat st;
  char buf[MAX_KEYFILE];
  ssize_t n = 0;
  int rc;
  if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
    rc = tc_err_set(err, TC_EINVAL, "%s: not a regular file", path);
    goto out;
  }
  for (;;) {
    ssize_t r = read(fd, buf + n, sizeof(buf) - (size_t)n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      rc = tc_err_set(err, TC_EIO, "%s: %s", path, strerror(errno));
      goto out;
    }
    if (r == 0) break;
    n += r;
    if ((size_t)n == sizeof(buf)) {
      rc = tc_err_set(err, TC_EINVAL, "%s: malformed key file: too large", path);
      goto out;
    }
  }
  rc = tc_keyfile_parse(buf, (size_t)n, priv, err);
  if (rc < 0) {
    tc_err_prefix(err, "%s: malformed key file", path);
    tc_wipe(priv, 32);
    goto out;
  }
  rc = TC_KEYFILE_LOADED;
  if (st.st_mode & 077) {
    tc_err_set(err, TC_OK, "%s: key file mode is %04o; it should be 0600 (chmod 600 %s)", path,
               (unsigned)(st.st_mode & 07777), path);
    rc = TC_KEYFILE_INSECURE;
  }
out:
  tc_wipe(buf, sizeof(buf));
  close(fd);
  return rc;
}

int tc_keyfile_load_or_create(const char *path, uint8_t priv[32], struct tc_err *err) {
  if (!path || !*path) return tc_err_set(err, TC_EINVAL, "key file path is empty");
  int rc = load_existing(path, priv, err);
  if (rc != TC_ENOENT) return rc;

  if ((rc = make_parents(path, err)) < 0) return rc;
  char text[74];
  tc_random(priv, 32);
  tc_keyfile_format(priv, text);
  text[72] = '\n';
  text[73] = 0;
  char *tmp = tc_xasprintf("%s.tmp.%d", path, (int)getpid());
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    rc = tc_err_set(err, TC_EIO, "%s: %s", tmp, strerror(errno));
    goto out;
  }
  fchmod(fd, 0600); /* the umask may have narrowed it; never widen */
  size_t off = 0;
  while (off < 73) {
    ssize_t w = write(fd, text + off, 73 - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) break;
    off += (size_t)w;
  }
  if (off != 73 || fsync(fd) < 0) {
    rc = tc_err_set(err, TC_EIO, "%s: %s", tmp, strerror(errno));
    close(fd);
    unlink(tmp);
    goto out;
  }
  close(fd);
  /* link() refuses to replace: if another process won the race, use its key. */
  if (link(tmp, path) < 0) {
    int e = errno;
    unlink(tmp);
    if (e == EEXIST) {
      rc = load_existing(path, priv, err);
      goto out;
    }
    rc = tc_err_set(err, TC_EIO, "%s: %s", path, strerror(e));
    goto out;
  }
  unlink(tmp);
  /* make the new name durable */
  char *dir = tc_xstrdup(path);
  char *slash = strrchr(dir, '/');
  if (slash) {
    *(slash == dir ? slash + 1 : slash) = 0;
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      fsync(dfd);
      close(dfd);
    }
  }
  free(dir);
  rc = TC_KEYFILE_CREATED;
out:
  tc_wipe(text, sizeof(text));
  if (rc < 0) tc_wipe(priv, 32);
  free(tmp);
  return rc;
}
