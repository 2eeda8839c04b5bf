/* cbw — server/orch/repair.c: explicit recovery of a disk's lost or
 * unreadable metadata (`disk-repair`, `cbw disk repair NAME --reset-bitmaps`).
 *
 * cbwd never recreates lost metadata by itself: a disk whose bitmap
 * descriptor is missing or corrupt does not start (the dirtybitmap filter
 * creates a store only with dirtybitmap-create=true, which cbwd passes at
 * disk-add alone).  Resetting the bitmaps is the operator's decision:
 *   1. the disk must be stopped (its nbdkit holds the store) and not part of
 *      the running backup; the store's lock file must be free;
 *   2. the old descriptor (if any) is kept as DESCRIPTOR.lost-UNIXTIME for
 *      inspection, its journal and data files (bitmaps.*.bmap) are removed;
 *   3. a new store is written with one bitmap cp-NAME per checkpoint that
 *      covers the disk (the latest enabled, as after a rotation), every bit
 *      SET: whatever a reader asks, everything is reported dirty, so the next
 *      incremental copies the whole disk (never less: invariant 2);
 *   4. those checkpoints are marked unusable on this disk (state file), so an
 *      incremental since one of them is refused with "take a full backup"
 *      instead of silently being a full copy; a `disk-repaired` event says so.
 * The disk is then started with `disk-start` as usual.
 *
 * Locking: runs as the busy owner (commands.c); o->lock only to read the
 * checkpoints and to mark them; the files are written without it.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>

#include "cleanup.h"
#include "orch_internal.h"

/* Size of a disk's image (file or block device), without nbdkit. */
int
orch_image_size (const char *file, uint64_t *size, struct cbw_err *err)
{
  int fd = open (file, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return cbw_err_set (err, errno, "%s: %s", file, strerror (errno));
  off_t end = lseek (fd, 0, SEEK_END);
  int e = errno;
  close (fd);
  if (end < 0)
    return cbw_err_set (err, e, "%s: cannot find the size: %s", file, strerror (e));
  *size = (uint64_t) end;
  return 0;
}

#ifdef ORCH_HAVE_FORMATS
#include "bitmap_store.h"


/* Step 1's lock check: nobody (a stray nbdkit) holds the store. */
static int
store_unlocked (const char *descriptor, struct cbw_err *err)
{
  CLEANUP_FREE char *lock = orch_strdup_printf ("%s.lock", descriptor);
  if (lock == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  int fd = open (lock, O_RDWR | O_CLOEXEC);
  if (fd < 0)
    return errno == ENOENT ? 0 : cbw_err_set (err, errno, "%s: %s", lock, strerror (errno));
  int r = flock (fd, LOCK_EX | LOCK_NB);
  int e = errno;
  close (fd);               /* released: the store takes it again below */
  if (r < 0)
    return cbw_err_set (err, EBUSY, "%s: the bitmap store is in use by another process "
                        "(%s): stop it first", lock, strerror (e));
  return 0;
}

/* Step 2: keep the old descriptor aside, drop the journal and data files. */
static int
clear_store_files (const char *dir, const char *descriptor, struct cbw_err *err)
{
  CLEANUP_FREE char *aside = orch_strdup_printf ("%s.lost-%lld", descriptor,
                                                 (long long) time (NULL));
  CLEANUP_FREE char *journal = orch_strdup_printf ("%s.journal", descriptor);
  CLEANUP_FREE char *tmp = orch_strdup_printf ("%s.tmp", descriptor);
  if (!aside || !journal || !tmp)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (rename (descriptor, aside) < 0 && errno != ENOENT)
    return cbw_err_set (err, errno, "%s: keeping it as %s: %s", descriptor, aside,
                        strerror (errno));
  unlink (journal);
  unlink (tmp);
  /* Data files are named after the descriptor without ".json". */
  const char *slash = strrchr (descriptor, '/');
  CLEANUP_FREE char *base = strdup (slash ? slash + 1 : descriptor);
  if (base == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  size_t bl = strlen (base);
  if (bl > 5 && strcmp (base + bl - 5, ".json") == 0)
    base[bl -= 5] = '\0';
  DIR *dh = opendir (dir);
  if (dh == NULL)
    return cbw_err_set (err, errno, "%s: %s", dir, strerror (errno));
  struct dirent *de;
  while ((de = readdir (dh)) != NULL) {
    size_t l = strlen (de->d_name);
    if (strncmp (de->d_name, base, bl) == 0 && de->d_name[bl] == '.' && l > 5 &&
        strcmp (de->d_name + l - 5, ".bmap") == 0)
      unlinkat (dirfd (dh), de->d_name, 0);
  }
  closedir (dh);
  return 0;
}

/* Step 3: the new store, one all-set bitmap per checkpoint of the disk. */
static int
write_all_dirty_store (struct orch_disk *d, char (*bms)[ORCH_NAME_MAX + 8], size_t n,
                       uint64_t size, struct cbw_err *err)
{
  struct cbw_bitmap_store *st = cbw_bitmap_store_open_ex (d->bitmaps, size,
                                                          CBW_BITMAP_STORE_CREATE, err);
  if (st == NULL)
    return -1;
  for (size_t i = 0; i < n; i++) {
    struct cbw_stored_bitmap *b = cbw_bitmap_store_add (st, bms[i], d->granularity,
                                                        i + 1 == n, err);
    if (b == NULL) {
      cbw_bitmap_store_close (st);
      return -1;
    }
    cbw_bitmap_set_range (&b->bits, 0, b->bits.nbits);
  }
  int r = n ? cbw_bitmap_store_save (st, err) : 0;
  cbw_bitmap_store_close (st);
  return r;
}
#endif

int
orch_disk_repair_bitmaps (struct cbw_orch *o, struct orch_disk *d,
                          struct json_object **ret, struct cbw_err *err)
{
#ifndef ORCH_HAVE_FORMATS
  (void) o; (void) d; (void) ret;
  return cbw_err_set (err, ENOSYS, "this cbwd was built without the formats library: "
                      "it cannot write bitmap stores");
#else
  uint64_t size = 0;
  size_t n = 0;
  char (*bms)[ORCH_NAME_MAX + 8] = NULL;
  char reason[160];
  char when[32];
  time_t now = time (NULL);
  struct tm tm;

  if (orch_disk_running (o, d))
    return cbw_err_set (err, EBUSY, "disk %s is running: stop it first (`cbw disk stop %s`)",
                        d->name, d->name);
  if (orch_image_size (d->file, &size, err) < 0 || store_unlocked (d->bitmaps, err) < 0)
    return cbw_err_prefix (err, "disk %s", d->name);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    bms = calloc (o->st.ncps + 1, sizeof *bms);
    for (size_t i = 0; bms && i < o->st.ncps; i++)
      if (orch_cp_has_disk (&o->st.cps[i], d->name))
        orch_cp_bitmap (o->st.cps[i].name, bms[n++], sizeof bms[0]);
  }
  if (bms == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (clear_store_files (d->dir, d->bitmaps, err) < 0 ||
      write_all_dirty_store (d, bms, n, size, err) < 0) {
    free (bms);
    return cbw_err_prefix (err, "disk %s: resetting its bitmaps", d->name);
  }
  free (bms);
  strftime (when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", gmtime_r (&now, &tm));
  snprintf (reason, sizeof reason, "its bitmaps were reset by `cbw disk repair %s "
            "--reset-bitmaps` at %s", d->name, when);
  int marked;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    marked = orch_cp_mark_unusable (&o->st, d->name, reason);
  }
  if (marked < 0)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (orch_state_save (o, err) < 0)
    return cbw_err_prefix (err, "disk %s: bitmaps reset, but saving the state failed",
                           d->name);
  struct json_object *unusable = json_object_new_array ();
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    for (size_t i = 0; i < o->st.ncps; i++)
      if (orch_cp_unusable (&o->st.cps[i], d->name))
        json_object_array_add (unusable, json_object_new_string (o->st.cps[i].name));
  }
  CLEANUP_FREE char *msg = orch_strdup_printf ("the bitmaps of disk %s were reset (all "
                                               "dirty); its checkpoints are unusable: the "
                                               "next backup of %s must be full", d->name,
                                               d->name);
  struct json_object *ev = json_object_new_object ();
  json_object_object_add (ev, "disk", json_object_new_string (d->name));
  json_object_object_add (ev, "unusable", json_object_get (unusable));
  json_object_object_add (ev, "message", json_object_new_string (msg ? msg : ""));
  orch_event (o, "disk-repaired", ev);
  *ret = json_object_new_object ();
  json_object_object_add (*ret, "disk", json_object_new_string (d->name));
  json_object_object_add (*ret, "bitmaps", json_object_new_int ((int) n));
  json_object_object_add (*ret, "unusable", unusable);
  json_object_object_add (*ret, "message", json_object_new_string (msg ? msg : ""));
  return 0;
#endif
}
