/* cbw — plugin/chain/rawdisk.c: the raw layer (see rawdisk.h).
 *
 * Fast path: one fd shared by every connection and thread; pread/pwrite go
 * straight to the kernel.  FUA writes use pwritev2(RWF_DSYNC) (only that
 * range is made durable), falling back to pwrite + fdatasync.  Zero prefers
 * punching a hole (when trimming is allowed), then FALLOC_FL_ZERO_RANGE, and
 * otherwise reports ENOTSUP so nbdkit writes zeroes itself (or, for a fast
 * zero, tells the client it would be slow).  Methods the filesystem turns
 * out not to support are remembered (atomic flags) and not retried.
 *
 * direct=true: the fd is O_DIRECT.  Requests whose offset, length or buffer
 * are not multiples of `align` go through an aligned bounce buffer; an
 * unaligned write is a read-modify-write of its first/last block.  The bytes
 * after the last whole block of a file whose size is not a multiple of
 * `align` cannot be written with O_DIRECT without growing the file; they go
 * through a second, buffered fd (`bfd`).
 *
 * Image lock: the buffered fd carries QEMU's OFD lock bytes
 * (common/imagelock.h) from open to close: a writer holds consistent read +
 * write and shares neither write nor resize, so QEMU, qemu-nbd, qemu-img
 * and qemu-io refuse the image while it is served, and an image one of them
 * holds is refused here.  force_share takes only the permission bytes and
 * skips the test.  A block device opened for writing is also opened O_EXCL
 * (for regular files Linux ignores O_EXCL without O_CREAT): the kernel then
 * refuses to mount it or to hand it to device-mapper, md or another
 * exclusive opener while the guest writes it, and an in-use device is
 * refused here with EBUSY.
 *
 * Locking: no lock on the fast path.  In direct mode every write, zero and
 * trim reserves its aligned byte range in `ranges` (a list guarded by
 * `range_lock`, waited on with `range_cond`) for the duration of the I/O, so
 * a read-modify-write never interleaves with another write to the same
 * block.  The mutex itself is only held to edit the list, never across I/O.
 * The `can_*` flags are C11 atomics: they only ever go from true to false.
 * lseek(SEEK_DATA/SEEK_HOLE) moves the shared file offset, which nothing
 * else uses (all I/O is positional), so extents need no lock either.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "cbw_err.h"
#include "cleanup.h"
#include "fileutil.h"
#include "imagelock.h"
#include "rawdisk.h"

/* Error text without locale or gettext: strerror() takes glibc's locale
 * lock, which is unusable in nbdkit under a preloaded ASan runtime, and is
 * not guaranteed thread-safe. */
static inline const char *
errstr (int e)
{
  const char *s = strerrordesc_np (e);
  return s ? s : "Unknown error";
}

#define DEFAULT_DIRECT_ALIGN 4096

struct range {                   /* an in-flight write in direct mode */
  uint64_t start, end;
  struct range *next;
};

struct rawdisk {
  char *path;
  int fd;                        /* the data fd (O_DIRECT if direct) */
  int bfd;                       /* buffered fd for the unaligned tail; == fd
                                    unless direct */
  uint64_t size;
  uint64_t tail_start;           /* size rounded down to align */
  uint32_t align;                /* 1 unless direct */
  bool readonly, direct, block_device;
  bool can_extents;
  atomic_bool can_punch_hole, can_zero_range, can_discard, can_rwf_dsync;

  pthread_mutex_t range_lock;    /* guards ranges */
  pthread_cond_t range_cond;
  struct range *ranges;
};

/* ---- open / close ------------------------------------------------------- */

static uint32_t
file_dio_align (int fd)
{
  struct statx sx;
  uint32_t a = 0;

  if (statx (fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
      (sx.stx_mask & STATX_DIOALIGN) && sx.stx_dio_offset_align > 0) {
    a = sx.stx_dio_offset_align;
    if (sx.stx_dio_mem_align > a)
      a = sx.stx_dio_mem_align;
  }
  return a ? a : DEFAULT_DIRECT_ALIGN;
}

struct rawdisk *
rawdisk_open (const char *path, const struct rawdisk_opts *o,
              struct cbw_err *err)
{
  struct rawdisk *d;
  struct stat st;
  int flags, e;

  if (stat (path, &st) == -1) {
    e = errno;
    cbw_err_set (err, e, "%s: %s", path,
                 e == ENOENT ? "no such file or block device" : errstr (e));
    return NULL;
  }
  if (S_ISDIR (st.st_mode)) {
    cbw_err_set (err, EISDIR, "%s: is a directory, expected a raw file or a "
                 "block device", path);
    return NULL;
  }
  if (!S_ISREG (st.st_mode) && !S_ISBLK (st.st_mode)) {
    cbw_err_set (err, ENODEV, "%s: not a regular file or a block device",
                 path);
    return NULL;
  }

  d = calloc (1, sizeof *d);
  if (d == NULL || (d->path = strdup (path)) == NULL) {
    free (d);
    cbw_err_set (err, ENOMEM, "%s: out of memory", path);
    return NULL;
  }
  d->fd = d->bfd = -1;
  d->readonly = o->readonly;
  d->direct = o->direct;
  pthread_mutex_init (&d->range_lock, NULL);
  pthread_cond_init (&d->range_cond, NULL);

  flags = (o->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  d->bfd = open (path, flags | (o->readonly ? 0 : O_EXCL));
  if (d->bfd == -1) {
    e = errno;
    if (e == EBUSY && S_ISBLK (st.st_mode))
      cbw_err_set (err, e, "%s: block device in use (mounted, or held by "
                   "device-mapper, md or another exclusive opener)", path);
    else if (!o->readonly && (e == EACCES || e == EPERM || e == EROFS))
      cbw_err_set (err, e, "%s: cannot open for writing: %s (use "
                   "readonly=true to serve it read-only)", path, errstr (e));
    else
      cbw_err_set (err, e, "%s: open: %s", path, errstr (e));
    goto fail;
  }
  if (fstat (d->bfd, &st) == -1) {
    cbw_err_set (err, errno, "%s: fstat: %s", path, errstr (errno));
    goto fail;
  }
  if (cbw_imagelock_serve (d->bfd, path, !o->readonly, o->force_share, err) == -1)
    goto fail;
  d->block_device = S_ISBLK (st.st_mode);
  if (d->block_device) {
    if (ioctl (d->bfd, BLKGETSIZE64, &d->size) == -1) {
      cbw_err_set (err, errno, "%s: cannot get the size of the block device "
                   "(BLKGETSIZE64): %s", path, errstr (errno));
      goto fail;
    }
  }
  else if (S_ISREG (st.st_mode))
    d->size = (uint64_t) st.st_size;
  else {
    cbw_err_set (err, ENODEV, "%s: not a regular file or a block device",
                 path);
    goto fail;
  }

  d->align = 1;
  d->fd = d->bfd;
  if (o->direct) {
    d->fd = open (path, flags | O_DIRECT);
    if (d->fd == -1) {
      e = errno;
      cbw_err_set (err, e, "%s: open with O_DIRECT: %s", path,
                   e == EINVAL ? "the filesystem does not support direct I/O "
                   "(use direct=false)" : errstr (e));
      goto fail;
    }
    if (d->block_device) {
      int lbs = 0;
      if (ioctl (d->fd, BLKSSZGET, &lbs) == -1 || lbs <= 0)
        lbs = 512;
      d->align = (uint32_t) lbs;
    }
    else
      d->align = file_dio_align (d->fd);
    if (d->align & (d->align - 1)) {
      cbw_err_set (err, EINVAL, "%s: direct I/O alignment %u is not a power "
                   "of two", path, d->align);
      goto fail;
    }
  }
  d->tail_start = d->size & ~((uint64_t) d->align - 1);

  atomic_init (&d->can_rwf_dsync, true);
  if (d->block_device) {
    atomic_init (&d->can_punch_hole, true);
    atomic_init (&d->can_zero_range, true);
    atomic_init (&d->can_discard, true);
    d->can_extents = false;
  }
  else {
    off_t r;
    atomic_init (&d->can_punch_hole, true);
    atomic_init (&d->can_zero_range, true);
    atomic_init (&d->can_discard, false);
    r = lseek (d->bfd, 0, SEEK_DATA);
    d->can_extents = r >= 0 || errno == ENXIO;
  }
  return d;

 fail:
  rawdisk_close (d);
  return NULL;
}

void
rawdisk_close (struct rawdisk *d)
{
  if (d == NULL)
    return;
  if (d->fd >= 0 && d->fd != d->bfd)
    close (d->fd);
  if (d->bfd >= 0)
    close (d->bfd);
  pthread_mutex_destroy (&d->range_lock);
  pthread_cond_destroy (&d->range_cond);
  free (d->path);
  free (d);
}

void
rawdisk_get_info (const struct rawdisk *d, struct rawdisk_info *info)
{
  struct rawdisk *m = (struct rawdisk *) d;   /* atomics need non-const */

  info->path = d->path;
  info->size = d->size;
  info->readonly = d->readonly;
  info->direct = d->direct;
  info->block_device = d->block_device;
  info->align = d->align;
  info->can_extents = d->can_extents;
  info->can_punch_hole = atomic_load (&m->can_punch_hole);
  info->can_zero_range = atomic_load (&m->can_zero_range);
  info->can_discard = atomic_load (&m->can_discard);
}

uint64_t rawdisk_size (const struct rawdisk *d) { return d->size; }
uint32_t rawdisk_align (const struct rawdisk *d) { return d->align; }

/* ---- helpers ------------------------------------------------------------ */

static int
check_range (struct rawdisk *d, uint32_t count, uint64_t offset,
             struct cbw_err *err)
{
  /* nbdkit already checks requests against the size; this is the layer's
   * own guard for other callers (overlays, tests). */
  if (offset > d->size || count > d->size - offset)
    return cbw_err_set (err, EINVAL, "%s: request [%llu, +%u) beyond the end "
                        "(%llu bytes)", d->path, (unsigned long long) offset,
                        count, (unsigned long long) d->size);
  return 0;
}

static int
check_writable (struct rawdisk *d, struct cbw_err *err)
{
  if (d->readonly)
    return cbw_err_set (err, EROFS, "%s: opened read-only", d->path);
  return 0;
}

/* Write fully; with fua, durable before return. */
static int
write_full (struct rawdisk *d, int fd, const void *buf, size_t len,
            uint64_t offset, bool fua)
{
  const char *p = buf;

  if (fua && atomic_load_explicit (&d->can_rwf_dsync, memory_order_relaxed)) {
    while (len > 0) {
      struct iovec iov = { .iov_base = (void *) p, .iov_len = len };
      ssize_t r = pwritev2 (fd, &iov, 1, (off_t) offset, RWF_DSYNC);
      if (r < 0) {
        if (errno == EINTR) continue;
        if (errno == EOPNOTSUPP || errno == ENOSYS) {
          atomic_store (&d->can_rwf_dsync, false);
          break;                 /* finish below, the classic way */
        }
        return -1;
      }
      p += r; len -= (size_t) r; offset += (uint64_t) r;
    }
    if (len == 0)
      return 0;
  }
  if (cbw_pwrite_full (fd, p, len, offset) == -1)
    return -1;
  if (fua && cbw_fdatasync (fd) == -1)
    return -1;
  return 0;
}

/* Direct mode splits a request at mid: [offset, mid) goes through the
 * O_DIRECT fd, [mid, end) (the disk's last, partial aligned block) through
 * the buffered one. */
static uint64_t
direct_mid (const struct rawdisk *d, uint64_t end, uint64_t offset)
{
  uint64_t mid = end < d->tail_start ? end : d->tail_start;
  return mid < offset ? offset : mid;
}

static inline bool
is_aligned (uint64_t v, uint32_t a)
{
  return (v & (a - 1)) == 0;
}

static void *
bounce_alloc (struct rawdisk *d, size_t len)
{
  void *p = NULL;
  if (posix_memalign (&p, d->align < 4096 ? 4096 : d->align, len) != 0)
    return NULL;
  return p;
}

/* Reserve [start, end) against other direct-mode writes. */
static void
range_reserve (struct rawdisk *d, struct range *r, uint64_t start,
               uint64_t end)
{
  struct range *it;

  r->start = start;
  r->end = end;
  pthread_mutex_lock (&d->range_lock);
 again:
  for (it = d->ranges; it; it = it->next)
    if (it->start < end && start < it->end) {
      pthread_cond_wait (&d->range_cond, &d->range_lock);
      goto again;
    }
  r->next = d->ranges;
  d->ranges = r;
  pthread_mutex_unlock (&d->range_lock);
}

static void
range_release (struct rawdisk *d, struct range *r)
{
  struct range **pp;

  pthread_mutex_lock (&d->range_lock);
  for (pp = &d->ranges; *pp; pp = &(*pp)->next)
    if (*pp == r) {
      *pp = r->next;
      break;
    }
  pthread_cond_broadcast (&d->range_cond);
  pthread_mutex_unlock (&d->range_lock);
}

static uint64_t
round_down (uint64_t v, uint32_t a)
{
  return v & ~((uint64_t) a - 1);
}

static uint64_t
round_up (uint64_t v, uint32_t a)
{
  return (v + a - 1) & ~((uint64_t) a - 1);
}

/* ---- read --------------------------------------------------------------- */

/* Direct-mode read of [offset, offset+count) below tail_start. */
static int
direct_pread (struct rawdisk *d, char *buf, size_t count, uint64_t offset,
              struct cbw_err *err)
{
  uint64_t a0, a1;
  char *b;

  if (is_aligned (offset, d->align) && is_aligned (count, d->align) &&
      is_aligned ((uintptr_t) buf, d->align)) {
    if (cbw_pread_full_or_zero (d->fd, buf, count, offset) == -1)
      return cbw_err_set (err, errno, "%s: read at %llu: %s", d->path,
                          (unsigned long long) offset, errstr (errno));
    return 0;
  }
  a0 = round_down (offset, d->align);
  a1 = round_up (offset + count, d->align);
  b = bounce_alloc (d, a1 - a0);
  if (b == NULL)
    return cbw_err_set (err, ENOMEM, "%s: out of memory for a %llu byte "
                        "bounce buffer", d->path,
                        (unsigned long long) (a1 - a0));
  if (cbw_pread_full_or_zero (d->fd, b, a1 - a0, a0) == -1) {
    int e = errno;
    free (b);
    return cbw_err_set (err, e, "%s: read at %llu: %s", d->path,
                        (unsigned long long) a0, errstr (e));
  }
  memcpy (buf, b + (offset - a0), count);
  free (b);
  return 0;
}

int
rawdisk_pread (struct rawdisk *d, void *buf, uint32_t count, uint64_t offset,
               struct cbw_err *err)
{
  if (!d->direct) {
    if (cbw_pread_full (d->fd, buf, count, offset) == -1) {
      if (errno == EIO && check_range (d, count, offset, err) == -1)
        return -1;
      return cbw_err_set (err, errno, "%s: read at %llu (%u bytes): %s",
                          d->path, (unsigned long long) offset, count,
                          errstr (errno));
    }
    return 0;
  }

  if (check_range (d, count, offset, err) == -1)
    return -1;
  uint64_t end = offset + count, mid = direct_mid (d, end, offset);
  if (mid > offset &&
      direct_pread (d, buf, (size_t) (mid - offset), offset, err) == -1)
    return -1;
  if (end > mid &&
      cbw_pread_full (d->bfd, (char *) buf + (mid - offset),
                      (size_t) (end - mid), mid) == -1)
    return cbw_err_set (err, errno, "%s: read at %llu: %s", d->path,
                        (unsigned long long) mid, errstr (errno));
  return 0;
}

/* ---- write -------------------------------------------------------------- */

static int
direct_pwrite (struct rawdisk *d, const char *buf, size_t count,
               uint64_t offset, bool fua, struct cbw_err *err)
{
  uint64_t a0 = round_down (offset, d->align);
  uint64_t a1 = round_up (offset + count, d->align);
  struct range r;
  char *b = NULL;
  int ret = 0, e;

  range_reserve (d, &r, a0, a1);
  if (a0 == offset && a1 == offset + count &&
      is_aligned ((uintptr_t) buf, d->align)) {
    if (write_full (d, d->fd, buf, count, offset, fua) == -1) {
      e = errno;
      ret = cbw_err_set (err, e, "%s: write at %llu: %s", d->path,
                         (unsigned long long) offset, errstr (e));
    }
    goto out;
  }
  b = bounce_alloc (d, a1 - a0);
  if (b == NULL) {
    ret = cbw_err_set (err, ENOMEM, "%s: out of memory for a bounce buffer",
                       d->path);
    goto out;
  }
  /* read-modify-write of the partial first and last blocks */
  if (offset != a0 && cbw_pread_full_or_zero (d->fd, b, d->align, a0) == -1)
    goto read_error;
  if (offset + count != a1 && (a1 - d->align != a0 || offset == a0) &&
      cbw_pread_full_or_zero (d->fd, b + (a1 - a0 - d->align), d->align,
                              a1 - d->align) == -1)
    goto read_error;
  memcpy (b + (offset - a0), buf, count);
  if (write_full (d, d->fd, b, a1 - a0, a0, fua) == -1) {
    e = errno;
    ret = cbw_err_set (err, e, "%s: write at %llu: %s", d->path,
                       (unsigned long long) a0, errstr (e));
  }
  goto out;

 read_error:
  e = errno;
  ret = cbw_err_set (err, e, "%s: read for read-modify-write: %s", d->path,
                     errstr (e));
 out:
  free (b);
  range_release (d, &r);
  return ret;
}

int
rawdisk_pwrite (struct rawdisk *d, const void *buf, uint32_t count,
                uint64_t offset, bool fua, struct cbw_err *err)
{
  if (check_writable (d, err) == -1)
    return -1;
  if (!d->direct) {
    if (write_full (d, d->fd, buf, count, offset, fua) == -1)
      return cbw_err_set (err, errno, "%s: write at %llu (%u bytes): %s",
                          d->path, (unsigned long long) offset, count,
                          errstr (errno));
    return 0;
  }

  if (check_range (d, count, offset, err) == -1)
    return -1;
  uint64_t end = offset + count, mid = direct_mid (d, end, offset);
  if (mid > offset &&
      direct_pwrite (d, buf, (size_t) (mid - offset), offset, fua, err) == -1)
    return -1;
  if (end > mid) {
    struct range r;
    int ret = 0;
    range_reserve (d, &r, d->tail_start, UINT64_MAX);
    if (write_full (d, d->bfd, (const char *) buf + (mid - offset),
                    (size_t) (end - mid), mid, fua) == -1)
      ret = cbw_err_set (err, errno, "%s: write at %llu: %s", d->path,
                         (unsigned long long) mid, errstr (errno));
    range_release (d, &r);
    return ret;
  }
  return 0;
}

/* ---- zero, trim, flush, cache ------------------------------------------- */

static bool
unsupported (int e)
{
  return e == EOPNOTSUPP || e == ENOTSUP || e == ENOSYS || e == ENOTTY;
}

/* fallocate, remembering "not supported" in *flag.  Returns 0, -1 with errno
 * (ENOTSUP when the method is not available). */
static int
try_fallocate (int fd, int mode, uint64_t offset, uint64_t len,
               atomic_bool *flag)
{
  if (!atomic_load_explicit (flag, memory_order_relaxed)) {
    errno = ENOTSUP;
    return -1;
  }
  for (;;) {
    if (fallocate (fd, mode, (off_t) offset, (off_t) len) == 0)
      return 0;
    if (errno == EINTR)
      continue;
    if (unsupported (errno)) {
      atomic_store (flag, false);
      errno = ENOTSUP;
    }
    return -1;
  }
}

static int
do_zero (struct rawdisk *d, uint32_t count, uint64_t offset, bool may_trim,
         bool fast)
{
  int e = ENOTSUP;

  if (d->block_device) {
    /* The block layer wants logical-block alignment; otherwise let nbdkit
     * write the zeroes. */
    int lbs = 512;
    if (ioctl (d->bfd, BLKSSZGET, &lbs) == -1 || lbs <= 0)
      lbs = 512;
    if (!is_aligned (offset, (uint32_t) lbs) ||
        !is_aligned (count, (uint32_t) lbs)) {
      errno = ENOTSUP;
      return -1;
    }
    /* PUNCH_HOLE on a block device never falls back to writing zeroes:
     * fast.  ZERO_RANGE may, so not for a fast zero. */
    if (may_trim) {
      if (try_fallocate (d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                         offset, count, &d->can_punch_hole) == 0)
        return 0;
      e = errno;
      if (e != ENOTSUP && e != EINVAL)
        return -1;
    }
    if (!fast) {
      if (try_fallocate (d->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                         offset, count, &d->can_zero_range) == 0)
        return 0;
      e = errno;
      if (e != ENOTSUP && e != EINVAL)
        return -1;
    }
    errno = ENOTSUP;
    return -1;
  }

  if (may_trim) {
    if (try_fallocate (d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       offset, count, &d->can_punch_hole) == 0)
      return 0;
    if (errno != ENOTSUP)
      return -1;
  }
  if (try_fallocate (d->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                     offset, count, &d->can_zero_range) == 0)
    return 0;
  (void) e;
  return -1;                     /* errno: ENOTSUP or the real error */
}

int
rawdisk_zero (struct rawdisk *d, uint32_t count, uint64_t offset,
              bool may_trim, bool fast, bool fua, struct cbw_err *err)
{
  struct range r;
  int ret;

  if (check_writable (d, err) == -1 || check_range (d, count, offset, err))
    return -1;
  if (count == 0)
    return 0;
  if (d->direct)
    range_reserve (d, &r, round_down (offset, d->align),
                   round_up (offset + count, d->align));
  ret = do_zero (d, count, offset, may_trim, fast);
  if (ret == -1) {
    int e = errno;
    if (e == ENOTSUP)
      cbw_err_set (err, ENOTSUP, "%s: no %s way to zero [%llu, +%u)",
                   d->path, fast ? "fast" : "efficient",
                   (unsigned long long) offset, count);
    else
      cbw_err_set (err, e, "%s: zero at %llu (%u bytes): %s", d->path,
                   (unsigned long long) offset, count, errstr (e));
  }
  else if (fua && cbw_fdatasync (d->fd) == -1)
    ret = cbw_err_set (err, errno, "%s: fdatasync: %s", d->path,
                       errstr (errno));
  if (d->direct)
    range_release (d, &r);
  return ret;
}

int
rawdisk_trim (struct rawdisk *d, uint32_t count, uint64_t offset, bool fua,
              struct cbw_err *err)
{
  struct range r;
  int ret = 0;

  if (check_writable (d, err) == -1 || check_range (d, count, offset, err))
    return -1;
  if (count == 0)
    return 0;
  if (d->direct)
    range_reserve (d, &r, round_down (offset, d->align),
                   round_up (offset + count, d->align));
  if (d->block_device) {
    /* Discard only whole logical blocks inside the range: trim is a hint. */
    int lbs = 512;
    if (ioctl (d->bfd, BLKSSZGET, &lbs) == -1 || lbs <= 0)
      lbs = 512;
    uint64_t s = round_up (offset, (uint32_t) lbs);
    uint64_t e = round_down (offset + count, (uint32_t) lbs);
    if (e > s && atomic_load (&d->can_discard)) {
      uint64_t range[2] = { s, e - s };
      if (ioctl (d->fd, BLKDISCARD, range) == -1) {
        if (unsupported (errno) || errno == EINVAL)
          atomic_store (&d->can_discard, false);
        else
          ret = cbw_err_set (err, errno, "%s: BLKDISCARD at %llu: %s",
                             d->path, (unsigned long long) s,
                             errstr (errno));
      }
    }
  }
  else if (try_fallocate (d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          offset, count, &d->can_punch_hole) == -1 &&
           errno != ENOTSUP)
    ret = cbw_err_set (err, errno, "%s: punch hole at %llu (%u bytes): %s",
                       d->path, (unsigned long long) offset, count,
                       errstr (errno));
  if (ret == 0 && fua && cbw_fdatasync (d->fd) == -1)
    ret = cbw_err_set (err, errno, "%s: fdatasync: %s", d->path,
                       errstr (errno));
  if (d->direct)
    range_release (d, &r);
  return ret;
}

int
rawdisk_flush (struct rawdisk *d, struct cbw_err *err)
{
  if (cbw_fdatasync (d->fd) == -1)
    return cbw_err_set (err, errno, "%s: fdatasync: %s", d->path,
                        errstr (errno));
  return 0;
}

int
rawdisk_cache (struct rawdisk *d, uint32_t count, uint64_t offset,
               struct cbw_err *err)
{
  int r;

  if (d->direct)
    return 0;                    /* no page cache to warm */
  r = posix_fadvise (d->fd, (off_t) offset, (off_t) count,
                     POSIX_FADV_WILLNEED);
  if (r != 0)
    return cbw_err_set (err, r, "%s: posix_fadvise: %s", d->path,
                        errstr (r));
  return 0;
}

/* ---- extents ------------------------------------------------------------ */

int
rawdisk_extents (struct rawdisk *d, uint32_t count, uint64_t offset,
                 bool req_one, rawdisk_extent_fn fn, void *opaque,
                 struct cbw_err *err)
{
  uint64_t end, pos = offset;

  if (offset >= d->size)
    return 0;
  end = count > d->size - offset ? d->size : offset + count;

  if (!d->can_extents)
    return fn (opaque, offset, end - offset, 0, err);

  while (pos < end) {
    off_t data = lseek (d->bfd, (off_t) pos, SEEK_DATA);
    uint64_t next;

    if (data == -1) {
      if (errno != ENXIO)
        return cbw_err_set (err, errno, "%s: lseek SEEK_DATA at %llu: %s",
                            d->path, (unsigned long long) pos,
                            errstr (errno));
      /* no data after pos (or the file shrank): hole up to end */
      return fn (opaque, pos, end - pos, RAWDISK_HOLE | RAWDISK_ZERO, err);
    }
    if ((uint64_t) data > pos) {
      next = (uint64_t) data < end ? (uint64_t) data : end;
      if (fn (opaque, pos, next - pos, RAWDISK_HOLE | RAWDISK_ZERO, err) == -1)
        return -1;
      pos = next;
      if (req_one)
        break;
      continue;
    }
    off_t hole = lseek (d->bfd, (off_t) pos, SEEK_HOLE);
    if (hole == -1) {
      if (errno != ENXIO)
        return cbw_err_set (err, errno, "%s: lseek SEEK_HOLE at %llu: %s",
                            d->path, (unsigned long long) pos,
                            errstr (errno));
      hole = (off_t) end;
    }
    if ((uint64_t) hole <= pos)  /* cannot happen; never loop forever */
      hole = (off_t) end;
    next = (uint64_t) hole < end ? (uint64_t) hole : end;
    if (fn (opaque, pos, next - pos, 0, err) == -1)
      return -1;
    pos = next;
    if (req_one)
      break;
  }
  return 0;
}
