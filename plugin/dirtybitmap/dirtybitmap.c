/* cbw — plugin/dirtybitmap/dirtybitmap.c: nbdkit-dirtybitmap-filter, named,
 * persistent, crash-safe dirty bitmaps for incremental backups of any image
 * (man page: docs/nbdkit-dirtybitmap-filter.pod; design:
 * docs/design/dirty-bitmaps.md).
 *
 * This file is only the nbdkit glue: parameters, startup, the control socket
 * and the data path hooks.  Every write, zero and trim is recorded by
 * dbm_tracker_record() (tracker.c) BEFORE it is passed down; if the tracker
 * cannot make the record durable the request fails with EIO and is not sent.
 *
 * Locking: the tracker has its own locks (see tracker.c).  Here, open_lock
 * guards the lazy opening of the tracker when the image size is only known
 * from the plugin (no dirtybitmap-image=); tracker is then read with an
 * acquire load on the data path, without the lock.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-filter.h>

#include "cleanup.h"
#include "commands.h"
#include "control.h"
#include "journal.h"
#include "tracker.h"

static char *descriptor;               /* dirtybitmap= */
static char *image;                    /* dirtybitmap-image= */
static char *journal_path;             /* dirtybitmap-journal= */
static char *control_path;             /* dirtybitmap-control= */
static unsigned interval_s = 30;       /* dirtybitmap-checkpoint-interval= */
static uint64_t region_size = DBM_REGION_SIZE_DEFAULT;
static bool create_store;              /* dirtybitmap-create= */

static pthread_mutex_t open_lock = PTHREAD_MUTEX_INITIALIZER;
static struct dbm_tracker *tracker;
static struct cbw_ctl_server *ctl;
static bool after_fork_done;

static void
log_debug (const char *msg)
{
  nbdkit_debug ("dirtybitmap: %s", msg);
  if (strncmp (msg, "WARNING", 7) == 0)
    fprintf (stderr, "nbdkit: dirtybitmap: %s\n", msg);
}

static void
dbm_unload (void)
{
  free (descriptor);
  free (image);
  free (journal_path);
  free (control_path);
}

static int
dbm_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
            const char *key, const char *value)
{
  if (strcmp (key, "dirtybitmap") == 0 || strcmp (key, "dirtybitmap-image") == 0 ||
      strcmp (key, "dirtybitmap-journal") == 0 || strcmp (key, "dirtybitmap-control") == 0) {
    char **p = strcmp (key, "dirtybitmap") == 0 ? &descriptor
      : strcmp (key, "dirtybitmap-image") == 0 ? &image
      : strcmp (key, "dirtybitmap-journal") == 0 ? &journal_path : &control_path;
    free (*p);
    /* the control socket may not exist yet: absolute_path, not realpath */
    *p = nbdkit_absolute_path (value);
    return *p ? 0 : -1;
  }
  if (strcmp (key, "dirtybitmap-checkpoint-interval") == 0) {
    if (nbdkit_parse_unsigned (key, value, &interval_s) == -1)
      return -1;
    if (interval_s < 1 || interval_s > 86400) {
      nbdkit_error ("%s: must be between 1 and 86400 seconds", key);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "dirtybitmap-create") == 0) {
    /* A missing descriptor is lost metadata unless a new store was asked for. */
    int b = nbdkit_parse_bool (value);
    if (b == -1)
      return -1;
    create_store = b;
    return 0;
  }
  if (strcmp (key, "dirtybitmap-region-size") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1)
      return -1;
    if (r < (int64_t) DBM_REGION_SIZE_MIN || (uint64_t) r > DBM_REGION_SIZE_MAX ||
        (r & (r - 1)) != 0) {
      nbdkit_error ("%s: must be a power of two between 1M and 1T", key);
      return -1;
    }
    region_size = (uint64_t) r;
    return 0;
  }
  return next (nxdata, key, value);
}

static int
dbm_config_complete (nbdkit_next_config_complete *next, nbdkit_backend *nxdata)
{
  if (descriptor == NULL && image == NULL) {
    nbdkit_error ("dirtybitmap: either dirtybitmap=DESCRIPTOR or dirtybitmap-image=PATH "
                  "is required (the filter cannot learn the image path from the plugin)");
    return -1;
  }
  if (descriptor == NULL) {
    descriptor = cbw_bitmap_store_default_path (image);
    if (descriptor == NULL) {
      nbdkit_error ("dirtybitmap: out of memory");
      return -1;
    }
  }
  if (journal_path == NULL && asprintf (&journal_path, "%s.journal", descriptor) < 0) {
    journal_path = NULL;
    nbdkit_error ("dirtybitmap: asprintf: %m");
    return -1;
  }
  return next (nxdata);
}

#define dbm_config_help \
  "dirtybitmap=DESCRIPTOR      Bitmap descriptor (default IMAGE.cbw-bitmaps.json).\n" \
  "dirtybitmap-image=PATH      Image file or device (size, default descriptor).\n" \
  "dirtybitmap-control=SOCKET  Unix control socket.\n" \
  "dirtybitmap-checkpoint-interval=SECS  Fine checkpoint period (default 30).\n" \
  "dirtybitmap-create=BOOL     Create the store if the descriptor is missing\n" \
  "                            (default false: a missing descriptor is an error).\n" \
  "dirtybitmap-region-size=SIZE  Journal region size (default 64M).\n" \
  "dirtybitmap-journal=PATH    Journal file (default DESCRIPTOR.journal)."

static int
image_size_of (const char *path, uint64_t *size)
{
  CLEANUP_CLOSE int fd = open (path, O_RDONLY | O_CLOEXEC);
  struct stat sb;
  off_t end;

  if (fd < 0 || fstat (fd, &sb) < 0) {
    nbdkit_error ("dirtybitmap-image: %s: %m", path);
    return -1;
  }
  if (S_ISREG (sb.st_mode)) {
    *size = (uint64_t) sb.st_size;
    return 0;
  }
  end = lseek (fd, 0, SEEK_END);        /* block devices */
  if (end < 0) {
    nbdkit_error ("dirtybitmap-image: %s: cannot find the size: %m", path);
    return -1;
  }
  *size = (uint64_t) end;
  return 0;
}

/* Called with open_lock held (or before any connection). */
static int
open_tracker (uint64_t size)
{
  struct cbw_err err = { 0 };
  struct dbm_tracker *t;

  t = dbm_tracker_open_flags (descriptor, journal_path, size, region_size,
                              create_store ? CBW_BITMAP_STORE_CREATE : 0, log_debug, &err);
  if (t == NULL) {
    nbdkit_error ("dirtybitmap: %s", err.msg);
    errno = err.errnum;
    return -1;
  }
  __atomic_store_n (&tracker, t, __ATOMIC_RELEASE);
  return 0;
}

static int
start_services (void)
{
  struct cbw_err err = { 0 };

  if (dbm_tracker_start_timer (tracker, interval_s, &err) < 0) {
    nbdkit_error ("dirtybitmap: %s", err.msg);
    errno = err.errnum;
    return -1;
  }
  if (control_path && ctl == NULL) {
    ctl = cbw_ctl_server_start (control_path, &dbm_ctl_table, tracker, &err);
    if (ctl == NULL) {
      nbdkit_error ("dirtybitmap-control: %s", err.msg);
      errno = err.errnum;
      return -1;
    }
  }
  return 0;
}

static int
dbm_get_ready (int thread_model)
{
  uint64_t size;

  (void) thread_model;
  if (image == NULL)
    return 0;                     /* opened at the first connection */
  if (image_size_of (image, &size) < 0)
    return -1;
  /* Open (lock, validate, recover) now so that a locked or corrupt store
   * stops nbdkit before it serves anything. */
  return open_tracker (size);
}

static int
dbm_after_fork (nbdkit_backend *nxdata)
{
  (void) nxdata;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&open_lock);
  after_fork_done = true;
  if (tracker)
    return start_services ();
  return 0;
}

static void
dbm_cleanup (nbdkit_backend *nxdata)
{
  struct cbw_err err = { 0 };

  (void) nxdata;
  cbw_ctl_server_stop (ctl);
  ctl = NULL;
  if (tracker && dbm_tracker_close (tracker, true, &err) < 0)
    nbdkit_error ("dirtybitmap: clean shutdown failed, bitmaps will be recovered "
                  "from the journal on next start: %s", err.msg);
  tracker = NULL;
}

static int
dbm_prepare (nbdkit_next *next, void *handle, int readonly)
{
  int64_t size = next->get_size (next);

  (void) handle; (void) readonly;
  if (size == -1)
    return -1;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&open_lock);
  if (tracker == NULL) {
    if (open_tracker ((uint64_t) size) < 0)
      return -1;
    if (after_fork_done && start_services () < 0)
      return -1;
  }
  if ((uint64_t) size != dbm_tracker_image_size (tracker)) {
    nbdkit_error ("dirtybitmap: the plugin's size %" PRIi64 " differs from the size the "
                  "bitmaps were opened with (%" PRIu64 ", from %s)", size,
                  dbm_tracker_image_size (tracker), image ? image : "the first connection");
    errno = EINVAL;
    return -1;
  }
  return 0;
}

static int
record (uint64_t offset, uint32_t count, int *err)
{
  struct dbm_tracker *t = __atomic_load_n (&tracker, __ATOMIC_ACQUIRE);
  struct cbw_err e = { 0 };

  if (t == NULL) {                /* prepare always opens it first */
    nbdkit_error ("dirtybitmap: bitmaps not open");
    *err = EIO;
    return -1;
  }
  if (dbm_tracker_record (t, offset, count, &e) < 0) {
    nbdkit_error ("dirtybitmap: cannot record write at %" PRIu64 "+%" PRIu32 ": %s",
                  offset, count, e.msg);
    *err = EIO;
    return -1;
  }
  return 0;
}

static int
dbm_pwrite (nbdkit_next *next, void *handle, const void *buf, uint32_t count,
            uint64_t offset, uint32_t flags, int *err)
{
  (void) handle;
  if (record (offset, count, err) < 0)
    return -1;
  return next->pwrite (next, buf, count, offset, flags, err);
}

static int
dbm_zero (nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
          uint32_t flags, int *err)
{
  (void) handle;
  if (record (offset, count, err) < 0)
    return -1;
  return next->zero (next, count, offset, flags, err);
}

static int
dbm_trim (nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
          uint32_t flags, int *err)
{
  (void) handle;
  if (record (offset, count, err) < 0)
    return -1;
  return next->trim (next, count, offset, flags, err);
}

static int
dbm_flush (nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
  struct dbm_tracker *t = __atomic_load_n (&tracker, __ATOMIC_ACQUIRE);

  (void) handle;
  if (next->flush (next, flags, err) == -1)
    return -1;
  /* Safety never depends on this (the journal covers every write); it only
   * brings the next fine checkpoint forward, asynchronously. */
  if (t)
    dbm_tracker_kick (t);
  return 0;
}

static struct nbdkit_filter filter = {
  .name = "dirtybitmap",
  .longname = "nbdkit dirtybitmap filter (cbw)",
  .unload = dbm_unload,
  .config = dbm_config,
  .config_complete = dbm_config_complete,
  .config_help = dbm_config_help,
  .get_ready = dbm_get_ready,
  .after_fork = dbm_after_fork,
  .cleanup = dbm_cleanup,
  .prepare = dbm_prepare,
  .pwrite = dbm_pwrite,
  .zero = dbm_zero,
  .trim = dbm_trim,
  .flush = dbm_flush,
};

NBDKIT_REGISTER_FILTER (filter)
