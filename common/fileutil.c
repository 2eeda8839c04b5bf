/* cbw — common/fileutil.c: see fileutil.h. */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cleanup.h"
#include "fileutil.h"

/* Read len bytes; at the end of the file, fail with EIO or (zero_eof)
 * zero the rest of buf. */
static int
pread_loop (int fd, void *buf, size_t len, uint64_t offset, bool zero_eof)
{
  char *p = buf;
  while (len > 0) {
    ssize_t r = pread (fd, p, len, (off_t) offset);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (r == 0) {
      if (!zero_eof) { errno = EIO; return -1; }
      memset (p, 0, len);
      return 0;
    }
    p += r; len -= (size_t) r; offset += (uint64_t) r;
  }
  return 0;
}

int
cbw_pread_full (int fd, void *buf, size_t len, uint64_t offset)
{
  return pread_loop (fd, buf, len, offset, false);
}

int
cbw_pread_full_or_zero (int fd, void *buf, size_t len, uint64_t offset)
{
  return pread_loop (fd, buf, len, offset, true);
}

int
cbw_pwrite_full (int fd, const void *buf, size_t len, uint64_t offset)
{
  const char *p = buf;
  while (len > 0) {
    ssize_t r = pwrite (fd, p, len, (off_t) offset);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += r; len -= (size_t) r; offset += (uint64_t) r;
  }
  return 0;
}

int
cbw_open_direct (const char *path, int fd)
{
  int dfd = open (path, O_RDWR | O_CLOEXEC | O_NOCTTY | O_DIRECT);
  if (dfd == -1)
    return -1;
  int e = posix_fadvise (fd, 0, 0, POSIX_FADV_RANDOM);
  if (e != 0) {
    close (dfd);
    errno = e;
    return -1;
  }
  return dfd;
}

bool
cbw_direct_aligned (_Atomic bool *direct, const void *buf, size_t len,
                    uint64_t off)
{
  return atomic_load_explicit (direct, memory_order_relaxed) &&
    (uintptr_t) buf % CBW_DIRECT_ALIGN == 0 && len % CBW_DIRECT_ALIGN == 0 &&
    off % CBW_DIRECT_ALIGN == 0;
}

ssize_t
cbw_pwrite_maybe_direct (int fd, int dfd, _Atomic bool *direct,
                         const void *buf, size_t len, uint64_t off)
{
  if (cbw_direct_aligned (direct, buf, len, off)) {
    if (cbw_pwrite_full (dfd, buf, len, off) == 0)
      return (ssize_t) len;
    if (errno != EINVAL)
      return -1;
    atomic_store (direct, false);       /* alignment: page cache from now on */
  }
  return cbw_pwrite_full (fd, buf, len, off) == 0 ? 0 : -1;
}

int
cbw_fsync (int fd)
{
  int r;
  do r = fsync (fd); while (r < 0 && errno == EINTR);
  return r;
}

int
cbw_fdatasync (int fd)
{
  int r;
  do r = fdatasync (fd); while (r < 0 && errno == EINTR);
  return r;
}

int
cbw_fsync_dir_of (const char *path, struct cbw_err *err)
{
  CLEANUP_FREE char *copy = strdup (path);
  CLEANUP_CLOSE int fd = -1;

  if (copy == NULL)
    return cbw_err_set (err, ENOMEM, "%s: strdup: %s", path, strerror (errno));
  const char *dir = dirname (copy);
  fd = open (dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return cbw_err_set (err, errno, "%s: open directory: %s", dir, strerror (errno));
  if (cbw_fsync (fd) < 0)
    return cbw_err_set (err, errno, "%s: fsync directory: %s", dir, strerror (errno));
  return 0;
}

int
cbw_random_hex (char *out, size_t nbytes)
{
  static const char hex[] = "0123456789abcdef";
  unsigned char b[64];
  size_t got = 0;

  if (nbytes > sizeof b) {
    errno = EINVAL;
    return -1;
  }
  while (got < nbytes) {
    ssize_t r = getrandom (b + got, nbytes - got, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    got += (size_t) r;
  }
  for (size_t i = 0; i < nbytes; i++) {
    out[2 * i] = hex[b[i] >> 4];
    out[2 * i + 1] = hex[b[i] & 15];
  }
  out[2 * nbytes] = '\0';
  return 0;
}

/* Write buf to a file just created as fd (named path), fsync, close.  On
 * failure the file is unlinked. */
static int
fill_new_file (int fd, const char *path, const void *buf, size_t len,
               struct cbw_err *err)
{
  int e;
  if (cbw_pwrite_full (fd, buf, len, 0) < 0 || cbw_fsync (fd) < 0) {
    e = errno;
    close (fd);
    unlink (path);
    return cbw_err_set (err, e, "%s: write: %s", path, strerror (e));
  }
  if (close (fd) < 0) {
    e = errno;
    unlink (path);
    return cbw_err_set (err, e, "%s: close: %s", path, strerror (e));
  }
  return 0;
}

int
cbw_write_file_new (const char *path, const void *buf, size_t len,
                    struct cbw_err *err)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (errno == EEXIST)
      return cbw_err_set (err, EEXIST, "%s: already exists (a new file was to be "
                          "created there; the existing one is left untouched)", path);
    return cbw_err_set (err, errno, "%s: create: %s", path, strerror (errno));
  }
  return fill_new_file (fd, path, buf, len, err);
}

int
cbw_write_file_atomic (const char *path, const void *buf, size_t len,
                       struct cbw_err *err)
{
  CLEANUP_FREE char *tmp = NULL;
  char id[17];
  int fd = -1, e;

  /* A fresh name per attempt: an existing file is never opened (O_EXCL). */
  for (int attempt = 0; fd < 0 && attempt < 8; attempt++) {
    free (tmp);
    tmp = NULL;
    if (cbw_random_hex (id, 8) < 0)
      return cbw_err_set (err, errno, "%s: getrandom: %s", path, strerror (errno));
    if (asprintf (&tmp, "%s.tmp-%s", path, id) < 0) {
      tmp = NULL;
      return cbw_err_set (err, ENOMEM, "%s: asprintf: %s", path, strerror (errno));
    }
    fd = open (tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EEXIST)
      return cbw_err_set (err, errno, "%s: create: %s", tmp, strerror (errno));
  }
  if (fd < 0)
    return cbw_err_set (err, EEXIST, "%s: create: every temp name tried exists", tmp);
  if (fill_new_file (fd, tmp, buf, len, err) < 0)
    return -1;
  if (rename (tmp, path) < 0) {
    e = errno;
    unlink (tmp);
    return cbw_err_set (err, e, "%s: rename to %s: %s", tmp, path, strerror (e));
  }
  return cbw_fsync_dir_of (path, err);
}

int
cbw_read_file (const char *path, size_t max_len, char **buf_out,
               size_t *len_out, struct cbw_err *err)
{
  CLEANUP_CLOSE int fd = open (path, O_RDONLY | O_CLOEXEC);
  struct stat st;
  char *buf;

  if (fd < 0)
    return cbw_err_set (err, errno, "%s: open: %s", path, strerror (errno));
  if (fstat (fd, &st) < 0)
    return cbw_err_set (err, errno, "%s: stat: %s", path, strerror (errno));
  if (!S_ISREG (st.st_mode))
    return cbw_err_set (err, EINVAL, "%s: not a regular file", path);
  if ((uint64_t) st.st_size > max_len)
    return cbw_err_set (err, EFBIG, "%s: file too large (%lld bytes, limit %zu)",
                        path, (long long) st.st_size, max_len);
  buf = malloc ((size_t) st.st_size + 1);
  if (buf == NULL)
    return cbw_err_set (err, ENOMEM, "%s: out of memory", path);
  if (cbw_pread_full (fd, buf, (size_t) st.st_size, 0) < 0) {
    int e = errno;
    free (buf);
    return cbw_err_set (err, e, "%s: read: %s", path,
                        e == EIO ? "file shrank while reading" : strerror (e));
  }
  buf[st.st_size] = '\0';
  *buf_out = buf;
  if (len_out) *len_out = (size_t) st.st_size;
  return 0;
}
