/* cbw — server/orch/backup.c: pull backups across a set of disks with one
 * point in time.
 *
 * begin (each step named in errors: "backup-begin failed at step S"):
 *   prepare  per disk a sparse backup store file (the cbw session's
 *            target).  By default the cbw filter writes it directly as a
 *            local file target (file:///...: a copy costs one pread and one
 *            pwrite in the guest write's thread); with store target "nbd"
 *            it goes through cbwd's store export if cbwd offers one, else
 *            through an `nbdkit file` we start (every copy then has
 *            cbw-timeout).  The backup record is saved with
 *            pending={backup-begin,ID} before any module is touched
 *   freeze   optional guest freeze (hook or qemu-guest-agent), FIRST: the
 *            guest's fsfreeze writes to these disks, so it must not meet
 *            held writes
 *   quiesce  every disk (cbw filter: writes drained and held)
 *   bitmap   incremental: bitmap backup-DISK (disabled) = union of the
 *            checkpoint bitmaps since the base checkpoint (plan.c);
 *            top: bitmap backup-DISK (disabled) = the top overlay's
 *            allocated extents (overlay.c)
 *   begin    cbw session per disk (the point in time)
 *   checkpoint  optional new checkpoint: bitmap rotation as in checkpoint.c
 *   resume, thaw
 *   export   cbwd PIT export per disk with qemu:dirty-bitmap:backup-DISK,
 *            else the cbw filter's own "pit" export of the disk's nbdkit
 * Any failure before "export" undoes everything in reverse (rollback is
 * idempotent and is also what recovery does with a pending backup-begin).
 *
 * end: pending={backup-end,ID}; remove exports, end sessions, remove the
 * backup bitmaps, stop the stores and delete their files; clear.  Idempotent
 * too, so recovery redoes it.  A reader that disconnects mid-backup simply
 * reconnects: nothing is tied to its connection.
 *
 * offline (a disk that is stopped at begin: no nbdkit, nothing writes it):
 *   no copy-before-write is needed.  Such a disk gets no store, no quiesce
 *   and no session; the orchestrator takes QEMU-compatible read locks on its
 *   image (qemu-img/qemu-io writers are refused, common/imagelock.h) and
 *   cbwd serves the image read-only under the disk's name (the same URI as
 *   an online PIT export), its qemu:dirty-bitmap:backup-DISK context read
 *   from BACKUPDIR/DISK.dirty, the union of its checkpoint bitmaps written
 *   from the bitmap store (bmstore.c).  A checkpoint created with the backup
 *   is rotated in the store (an enabled, empty bitmap the dirtybitmap
 *   filter fills from the disk's next start).  disk-start is refused while
 *   the backup runs (d->offline).  Overlay chains are refused (only the
 *   chain plugin reads a chain right).  Backups may mix running and stopped
 *   disks: the stopped ones need nothing at the point in time.  After a
 *   restart of cbwd the backup is still recorded; the watch thread
 *   publishes its offline exports and takes the locks again.
 *
 * watch: a thread polls the cbw sessions of the running backup every
 *   ORCH_WATCH_MS and reports one that broke (event backup-broken, with the
 *   filter's last error), so the operator learns why without asking.
 *
 * Locking: runs as the busy owner; o->lock only around state changes.  The
 * watch thread reads the backup under o->lock and calls the filters without
 * it (o->lock is never held across I/O).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "imagelock.h"
#include "units.h"
#include "orch_internal.h"

/* Extent list limit for a session's needed ranges (control lines are at
 * most 1 MiB; ~20 bytes per extent). */
#define ORCH_SESSION_EXTENTS_MAX 16384
/* Disks of a backup the watch looks at (the first ones, if more). */
#define ORCH_WATCH_DISKS 256

static struct orch_disk *
disk_by_name (struct cbw_orch *o, const char *name)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  return orch_find_disk (&o->st, name);
}

/* ---- store bounds ---- */

/* A size in cbw's one grammar (common/units.h); false if malformed. */
static bool
parse_size (const char *s, uint64_t *out)
{
  return cbw_parse_size (s, UINT64_MAX, out) == 0;
}

int
orch_backup_config (struct cbw_orch *o, const char *limit, const char *reserve,
                    struct cbw_err *err)
{
  o->store_limit_pct = ORCH_STORE_LIMIT_PCT;
  o->store_limit_bytes = 0;
  o->state_reserve = ORCH_STATE_RESERVE;
  if (limit && limit[0]) {
    size_t n = strlen (limit);
    uint64_t v;
    o->store_limit_pct = 0;
    if (strcmp (limit, "none") == 0)
      ;
    else if (n > 1 && limit[n - 1] == '%') {
      char num[16];
      snprintf (num, sizeof num, "%.*s", (int) (n - 1), limit);
      if (n > sizeof num || !parse_size (num, &v) || v < 1 || v > 100)
        return cbw_err_set (err, EINVAL, "CBW_ORCH_STORE_LIMIT=%.40s: expected N%% "
                            "(1..100) of the free space, a size (10G) or none", limit);
      o->store_limit_pct = (unsigned) v;
    }
    else if (!parse_size (limit, &o->store_limit_bytes) || o->store_limit_bytes == 0)
      return cbw_err_set (err, EINVAL, "CBW_ORCH_STORE_LIMIT=%.40s: expected N%% "
                          "(1..100) of the free space, a size (10G) or none", limit);
  }
  if (reserve && reserve[0] && !parse_size (reserve, &o->state_reserve))
    return cbw_err_set (err, EINVAL, "CBW_ORCH_STATE_RESERVE=%.40s: expected a size "
                        "(128M, 1G, 0)", reserve);
  return 0;
}

/* The store server can enforce a limit: the filter's local file target
 * (target-limit) or cbwd's store export (limit=); not an nbdkit of ours. */
static bool
store_limit_works (const struct cbw_orch *o)
{
  return !o->nbd_store || (o->exports && o->exports->add_store_export);
}

/* Where the stores of a backup go (STORE_DIR/cbwd-HASH-ID, HASH naming the
 * state directory so that cbwds sharing STORE_DIR never meet, else
 * STATE_DIR/backups/ID) and how many bytes each may take on the host:
 * the explicit limit, else the configured default (a share of the free
 * space of the stores' filesystem at begin).  On the state directory's
 * filesystem state_reserve bytes always stay free for the state file and
 * the bitmaps: the stores together get at most the free space beyond it,
 * and the backup is refused if there is none. */
static int
store_plan (struct cbw_orch *o, const struct orch_backup_req *r, const char *id,
            char **bdir, uint64_t *limit, struct cbw_err *err)
{
  struct stat sd, ss;
  struct statvfs sv;
  const char *where = r->store_dir ? r->store_dir : o->state_dir;
  size_t n = r->ndisks ? r->ndisks : 1;

  *bdir = NULL;
  *limit = 0;
  if (r->store_dir) {
    if (r->store_dir[0] != '/')
      return cbw_err_set (err, EINVAL, "store-dir \"%.200s\": must be an absolute path",
                          r->store_dir);
    if (stat (r->store_dir, &sd) < 0)
      return cbw_err_set (err, errno, "store-dir %.200s: %s", r->store_dir, strerror (errno));
    if (!S_ISDIR (sd.st_mode) || access (r->store_dir, W_OK | X_OK) < 0)
      return cbw_err_set (err, EINVAL, "store-dir %.200s: not a writable directory",
                          r->store_dir);
  }
  if (r->store_limit && !store_limit_works (o))
    return cbw_err_set (err, EINVAL, "store-limit: stores served by an nbdkit of cbwd-orch "
                        "cannot be bounded (use the local store target, or cbwd's store "
                        "exports)");
  if (stat (where, &sd) < 0 || stat (o->state_dir, &ss) < 0 || statvfs (where, &sv) < 0)
    return cbw_err_set (err, errno, "%s: %s", where, strerror (errno));
  uint64_t avail = (uint64_t) sv.f_bavail * sv.f_frsize, usable = avail;
  bool state_fs = sd.st_dev == ss.st_dev;
  if (state_fs) {
    if (avail <= o->state_reserve)
      return cbw_err_set (err, ENOSPC, "%s: %llu MiB free, and %llu MiB are kept free "
                          "for cbwd's state and bitmaps (CBW_ORCH_STATE_RESERVE): no room "
                          "for backup stores (free space, or put them on another "
                          "filesystem with store-dir)", where,
                          (unsigned long long) (avail >> 20),
                          (unsigned long long) (o->state_reserve >> 20));
    usable = avail - o->state_reserve;
  }
  if (r->store_limit) {
    if (state_fs && r->store_limit > usable / n)
      return cbw_err_set (err, ENOSPC, "store-limit %llu bytes x %zu disks: the state "
                          "directory's filesystem has %llu bytes free beyond the %llu kept "
                          "for cbwd's state and bitmaps (use a smaller limit, or store-dir "
                          "on another filesystem)", (unsigned long long) r->store_limit, n,
                          (unsigned long long) usable,
                          (unsigned long long) o->state_reserve);
    *limit = r->store_limit;
  }
  else if (!store_limit_works (o))
    *limit = 0;                 /* documented: such stores are not bounded */
  else if (o->store_limit_bytes)
    *limit = state_fs && o->store_limit_bytes > usable / n ? usable / n : o->store_limit_bytes;
  else if (o->store_limit_pct)
    *limit = usable / 100 * o->store_limit_pct / n;
  else
    *limit = state_fs ? usable / n : 0;
  if ((r->store_limit || o->store_limit_bytes || o->store_limit_pct || state_fs) &&
      store_limit_works (o) && *limit == 0)
    *limit = 1;                 /* bounded, with no room: the first copy breaks it */

  if (r->store_dir) {
    uint64_t h = 14695981039346656037ULL;        /* FNV-1a of the state dir */
    for (const char *c = o->state_dir; *c; c++)
      h = (h ^ (unsigned char) *c) * 1099511628211ULL;
    *bdir = orch_strdup_printf ("%s/cbwd-%016llx-%s", r->store_dir,
                                (unsigned long long) h, id);
  }
  else {
    CLEANUP_FREE char *dir = orch_strdup_printf ("%s/backups", o->state_dir);
    if (dir == NULL)
      return cbw_err_set (err, ENOMEM, "out of memory");
    if (mkdir (dir, 0700) < 0 && errno != EEXIST)
      return cbw_err_set (err, errno, "%s: mkdir: %s", dir, strerror (errno));
    *bdir = orch_strdup_printf ("%s/backups/%s", o->state_dir, id);
  }
  return *bdir ? 0 : cbw_err_set (err, ENOMEM, "out of memory");
}

static int
start_store (struct cbw_orch *o, const char *bdir, struct orch_disk *d,
             struct orch_backup_disk *bd, const char *id, struct cbw_err *err)
{
  if (mkdir (bdir, 0700) < 0 && errno != EEXIST)
    return cbw_err_set (err, errno, "%s: mkdir: %s", bdir, strerror (errno));
  bd->store_path = orch_strdup_printf ("%s/%s.store", bdir, d->name);
  if (bd->store_path == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (d->size == 0)
    return cbw_err_set (err, EIO, "disk %s: size unknown", d->name);
  int fd = open (bd->store_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0)
    return cbw_err_set (err, errno, "%s: %s", bd->store_path, strerror (errno));
  if (ftruncate (fd, (off_t) d->size) < 0) {
    int e = errno;
    close (fd);
    return cbw_err_set (err, e, "%s: ftruncate: %s", bd->store_path, strerror (e));
  }
  close (fd);

  if (!o->nbd_store)
    return 0;                   /* the filter writes the file itself */
  if (o->exports && o->exports->add_store_export) {
    char uri[512];
    CLEANUP_FREE char *name = orch_strdup_printf ("store-%s-%s", id, d->name);
    if (name == NULL)
      return cbw_err_set (err, ENOMEM, "out of memory");
    if (o->exports->add_store_export (o->exports->opaque, name, bd->store_path,
                                      d->size, bd->store_limit, uri, sizeof uri, err) < 0)
      return -1;
    bd->store_sock = strdup (uri);
    return bd->store_sock ? 0 : cbw_err_set (err, ENOMEM, "out of memory");
  }
  bd->store_sock = orch_strdup_printf ("%s.sock", bd->store_path);
  CLEANUP_FREE char *log = orch_strdup_printf ("%s.log", bd->store_path);
  CLEANUP_FREE char *filearg = orch_strdup_printf ("file=%s", bd->store_path);
  if (!bd->store_sock || !log || !filearg)
    return cbw_err_set (err, ENOMEM, "out of memory");
  char *argv[48];
  size_t n = 0;
  for (size_t i = 0; o->nbdkit_argv[i] && n < 40; i++)
    argv[n++] = o->nbdkit_argv[i];
  argv[n++] = (char *) "-f";
  argv[n++] = (char *) "-U";
  argv[n++] = bd->store_sock;
  argv[n++] = (char *) "file";
  argv[n++] = filearg;
  argv[n] = NULL;
  unlink (bd->store_sock);
  int pidfd;
  pid_t pid = orch_spawn_detached (argv, log, &pidfd, err);
  if (pid < 0)
    return -1;
  if (orch_wait_socket (bd->store_sock, pidfd, o->start_timeout, err) < 0) {
    if (err->errnum != EBADF) {
      orch_kill_wait (pid, pidfd);
      close (pidfd);
    }
    else                        /* internal error: the pidfd is not ours now */
      orch_kill_wait_if (pid, bd->store_sock, true);
    return cbw_err_prefix (err, "backup store of disk %s", d->name);
  }
  close (pidfd);
  bd->store_pid = pid;
  return 0;
}

/* Direct PIT reads (export_pit.c): the cbw session's shared state map.  A
 * plain raw disk (no overlay chain) whose store cbwd serves qualifies.  The
 * map lives in RAM ($XDG_RUNTIME_DIR, else /dev/shm, else the backup's
 * directory); its name is derived from the state directory, backup and disk,
 * so teardown and recovery find it again.  The filter removes it at `end`. */
static bool
pit_direct_ok (struct cbw_orch *o, const struct orch_disk *d,
               const struct orch_backup_disk *bd)
{
  const char *off = getenv ("CBW_PIT_DIRECT");    /* "0": proxy only (A/B, escape hatch) */
  return !(off && strcmp (off, "0") == 0) && o->exports && o->exports->add_pit_export_direct && d->chain == NULL &&
    d->file && bd->store_pid == 0 && bd->store_path;
}

static char *
pit_state_path (struct cbw_orch *o, const char *id, const char *disk)
{
  const char *dir = getenv ("XDG_RUNTIME_DIR");
  uint64_t h = 14695981039346656037ULL;          /* FNV-1a of the state dir */
  for (const char *c = o->state_dir; *c; c++)
    h = (h ^ (unsigned char) *c) * 1099511628211ULL;
  if (dir == NULL || dir[0] != '/' || access (dir, W_OK) < 0)
    dir = access ("/dev/shm", W_OK) == 0 ? "/dev/shm" : NULL;
  if (dir == NULL)
    return orch_strdup_printf ("%s/backups/%s/%s.states", o->state_dir, id, disk);
  return orch_strdup_printf ("%s/cbw-%016llx-%s-%s.states", dir,
                             (unsigned long long) h, id, disk);
}

static char *
store_uri (const struct orch_backup_disk *bd)
{
  if (bd->store_sock == NULL)
    return orch_strdup_printf ("file://%s", bd->store_path);
  if (strncmp (bd->store_sock, "nbd", 3) == 0)
    return strdup (bd->store_sock);
  return orch_strdup_printf ("nbd+unix:///?socket=%s", bd->store_sock);
}

/* ---- offline disks ---- */

static char *
offline_extents_path (struct cbw_orch *o, const char *id, const char *disk)
{
  return orch_strdup_printf ("%s/backups/%s/%s.dirty", o->state_dir, id, disk);
}

/* The image's read locks, held through our own descriptor until teardown
 * (released at once on backup-end, whatever readers still do). */
static int
offline_lock (struct orch_disk *d, struct orch_backup_disk *bd, struct cbw_err *err)
{
  if (bd->locked)
    return 0;
  int fd = open (d->file, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return cbw_err_set (err, errno, "disk %s: %s: %s", d->name, d->file, strerror (errno));
  if (cbw_imagelock_serve (fd, d->file, false, d->force_share, err) < 0) {
    close (fd);
    return cbw_err_prefix (err, "disk %s (stopped): cannot lock its image for the "
                           "offline backup", d->name);
  }
  bd->lock_fd = fd;
  bd->locked = true;
  return 0;
}

static void
offline_unlock (struct orch_backup_disk *bd)
{
  if (bd->locked) {
    cbw_imagelock_release (bd->lock_fd);
    close (bd->lock_fd);
    bd->locked = false;
  }
}

/* Lock and serve a stopped disk's image (begin, and after a restart). */
static int
offline_publish (struct cbw_orch *o, const char *id, struct orch_disk *d,
                 struct orch_backup_disk *bd, struct cbw_err *err)
{
  if (o->exports == NULL || o->exports->add_file_export == NULL)
    return cbw_err_set (err, ENOTSUP, "disk %s is not running, and offline backups "
                        "need cbwd's NBD server", d->name);
  if (offline_lock (d, bd, err) < 0)
    return -1;
  CLEANUP_FREE char *ctx = orch_strdup_printf ("backup-%s", d->name);
  CLEANUP_FREE char *ext = bd->bitmap ? offline_extents_path (o, id, d->name) : NULL;
  if (ctx == NULL || (bd->bitmap && ext == NULL))
    return cbw_err_set (err, ENOMEM, "out of memory");
  char uri[512];
  if (o->exports->add_file_export (o->exports->opaque, d->name, d->file, ext,
                                   ctx, uri, sizeof uri, err) < 0)
    return cbw_err_prefix (err, "disk %s (stopped)", d->name);
  char *u = strdup (uri), *x = bd->export_name ? NULL : strdup (d->name);
  char *old = NULL;
  {
    /* backup-status reads these under o->lock (it is not a busy command) */
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    bd->published = true;
    if (x)
      bd->export_name = x;
    if (u) {
      old = bd->pit_uri;
      bd->pit_uri = u;
    }
  }
  free (old);
  if (bd->export_name == NULL) {        /* teardown could not find it: remove now */
    struct cbw_err e2 = { 0 };
    o->exports->remove_export (o->exports->opaque, d->name, &e2);
  }
  if (u == NULL || bd->export_name == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  return 0;
}

/* Mark (or unmark) the offline disks of b (d->offline: disk-start refused,
 * bitmap primitives on the store). */
static void
set_offline (struct cbw_orch *o, struct orch_backup *b, bool on)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  for (size_t i = 0; b && i < b->ndisks; i++) {
    struct orch_disk *d = orch_find_disk (&o->st, b->disks[i].name);
    if (d && b->disks[i].offline)
      d->offline = on;
  }
}

/* A PIT export that serves only the changed blocks says why it refuses the
 * others (the text ends cbwd's error message to the reader); NULL when it
 * serves the whole disk. */
static char *
unreadable_why (const struct orch_backup *b, const char *disk)
{
  if (b->readable != ORCH_READABLE_CHANGED)
    return NULL;
  if (b->mode == ORCH_BACKUP_TOP)
    return orch_strdup_printf ("backup %s (mode top) serves only the clusters the top "
                               "overlay of disk %s holds (qemu:dirty-bitmap:backup-%s); "
                               "the others are in the layers below", b->id, disk, disk);
  return orch_strdup_printf ("backup %s is an incremental since checkpoint %s begun with "
                             "readable=changed: it serves only the blocks changed since "
                             "then (qemu:dirty-bitmap:backup-%s); this block did not "
                             "change, read it from an earlier backup, or begin the "
                             "backup with readable=all", b->id, b->since, disk);
}

/* Undo everything of backup b (idempotent; errors collected, not fatal, so
 * that a half-dead disk does not keep the rest alive). */
static int
teardown (struct cbw_orch *o, struct orch_backup *b, bool undo_checkpoint,
          bool only_began, struct cbw_err *err)
{
  int ret = 0;
  struct cbw_err e = { 0 };
  for (size_t i = 0; i < b->ndisks; i++) {
    struct orch_backup_disk *bd = &b->disks[i];
    struct orch_disk *d = disk_by_name (o, bd->name);
    if (bd->export_name && o->exports && o->exports->remove_export &&
        o->exports->remove_export (o->exports->opaque, bd->export_name, &e) < 0) {
      /* an export that is gone already is fine */
    }
    if (bd->offline) {
      {
        ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);   /* read by the watch */
        bd->published = false;
      }
      offline_unlock (bd);
      CLEANUP_FREE char *ext = offline_extents_path (o, b->id, bd->name);
      if (ext)
        unlink (ext);
    }
    if (d && !bd->offline && orch_disk_running (o, d) && (bd->began || !only_began)) {
      char cls[32];
      struct json_object *r = orch_mod_call (d->ctl_cbw, "end", NULL, cls, sizeof cls, &e);
      if (r)
        json_object_put (r);
      else if (strcmp (cls, "NotFound") != 0 && ret == 0) {
        *err = e;
        ret = -1;
      }
      if (bd->bitmap && orch_bm_remove (d, bd->bitmap, true, &e) < 0 && ret == 0) {
        *err = e;
        ret = -1;
      }
    }
    if (bd->store_pid == 0 && bd->store_sock && o->exports && o->exports->remove_export) {
      /* the store was a cbwd export (named as in start_store) */
      CLEANUP_FREE char *sname = orch_strdup_printf ("store-%s-%s", b->id, bd->name);
      if (sname)
        o->exports->remove_export (o->exports->opaque, sname, &e);
    }
    if (bd->store_pid > 0) {
      orch_kill_wait_if ((pid_t) bd->store_pid, bd->store_path, false);
      bd->store_pid = 0;
    }
    CLEANUP_FREE char *states = pit_state_path (o, b->id, bd->name);
    if (states)
      unlink (states);          /* the filter's, if its nbdkit died */
    if (bd->store_path) {
      unlink (bd->store_path);
      CLEANUP_FREE char *s = orch_strdup_printf ("%s.sock", bd->store_path);
      CLEANUP_FREE char *l = orch_strdup_printf ("%s.log", bd->store_path);
      if (s) unlink (s);
      if (l) unlink (l);
      char *slash = strrchr (bd->store_path, '/');
      if (slash) {                /* its directory, in store-dir or the state */
        *slash = '\0';
        rmdir (bd->store_path);
        *slash = '/';
      }
    }
  }
  CLEANUP_FREE char *bdir = orch_strdup_printf ("%s/backups/%s", o->state_dir, b->id);
  if (bdir)
    rmdir (bdir);
  if (undo_checkpoint && b->checkpoint[0] && orch_cp_undo (o, b->checkpoint, &e) < 0 &&
      ret == 0) {
    *err = e;
    ret = -1;
  }
  return ret;
}

static void
drop_backup (struct cbw_orch *o)
{
  struct orch_backup *b;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    b = o->st.backup;
    o->st.backup = NULL;
    o->st.pending.op[0] = '\0';
    o->st.pending.name[0] = '\0';
  }
  set_offline (o, b, false);
  for (size_t i = 0; b && i < b->ndisks; i++)
    offline_unlock (&b->disks[i]);
  orch_backup_free (b);
}

int
orch_backup_begin (struct cbw_orch *o, const struct orch_backup_req *r,
                   struct json_object **ret, struct cbw_err *err)
{
  const char *step = "validate";
  size_t quiesced = 0;
  bool frozen = false;
  struct orch_backup *b = NULL;
  const char *id = r->id && r->id[0] ? r->id : "backup";
  enum orch_backup_mode mode = ORCH_BACKUP_FULL;
  enum orch_readable readable = ORCH_READABLE_ALL;
  CLEANUP_FREE char *bdir = NULL;       /* where the stores go */
  uint64_t store_limit = 0;             /* per store */

  if (!orch_valid_name (id))
    return cbw_err_set (err, EINVAL, "invalid backup id \"%.80s\"", id);
  if (r->mode && r->mode[0] && orch_backup_mode_parse (r->mode, &mode) < 0)
    return cbw_err_set (err, EINVAL, "mode must be full, incremental, top or none, not "
                        "\"%.40s\"", r->mode);
  bool top = mode == ORCH_BACKUP_TOP, incremental = mode == ORCH_BACKUP_INCREMENTAL;
  if (incremental && (r->since == NULL || r->since[0] == '\0'))
    return cbw_err_set (err, EINVAL, "an incremental backup needs \"since\" (a checkpoint)");
  if (!incremental && r->since && r->since[0])
    return cbw_err_set (err, EINVAL, "\"since\" only makes sense with mode incremental");
  /* readable: incremental only (default all, as libvirt); a full backup
   * serves everything, a top backup what the top overlay holds. */
  if (top)
    readable = ORCH_READABLE_CHANGED;
  if (r->readable && r->readable[0]) {
    if (orch_readable_parse (r->readable, &readable) < 0)
      return cbw_err_set (err, EINVAL, "readable must be all or changed, not \"%.40s\"",
                          r->readable);
    if (!incremental)
      return cbw_err_set (err, EINVAL, "\"readable\" only makes sense with mode incremental "
                          "(a %s backup serves %s)", orch_backup_mode_name (mode),
                          top ? "what the top overlay holds" : "the whole disk");
  }
  if (r->checkpoint && r->checkpoint[0]) {
    if (!orch_valid_name (r->checkpoint))
      return cbw_err_set (err, EINVAL, "invalid checkpoint name \"%.80s\"", r->checkpoint);
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    if (orch_find_cp (&o->st, r->checkpoint))
      return cbw_err_set (err, EEXIST, "checkpoint %s already exists", r->checkpoint);
  }
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    if (o->st.backup)
      return cbw_err_set (err, EBUSY, "backup %s is running (end it first)",
                          o->st.backup->id);
  }
  /* offline[i]: disk i is stopped (offline backup, see the top) */
  CLEANUP_FREE bool *offline = calloc (r->ndisks + 1, sizeof *offline);
  CLEANUP_FREE char **live = calloc (r->ndisks + 1, sizeof *live);
  size_t nlive = 0;
  if (offline == NULL || live == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (orch_check_disks_offline (o, r->disks, r->ndisks, offline, err) < 0)
    return -1;
  for (size_t i = 0; i < r->ndisks; i++) {
    struct orch_disk *d = disk_by_name (o, r->disks[i]);
    if (!offline[i]) {
      live[nlive++] = r->disks[i];
      continue;
    }
    if (o->exports == NULL || o->exports->add_file_export == NULL)
      return cbw_err_set (err, EIO, "disk %s is not running (its nbdkit is dead or "
                          "stopped; offline backups need cbwd's NBD server)", d->name);
    if (d->chain)
      return cbw_err_set (err, EINVAL, "disk %s is stopped and has an overlay chain: "
                          "offline backups read raw images only (start the disk and "
                          "take the backup online)", d->name);
    /* Its bitmaps are read (incremental) or rotated (new checkpoint): the
     * store must be clean, else refuse now rather than half-way. */
    uint64_t size;
    if ((incremental || (r->checkpoint && r->checkpoint[0])) &&
        orch_bm_store_check (d, &size, err) < 0)
      return -1;
  }
  /* Overlays (overlay.c): `top` needs an overlay on every disk; no backup
   * begins while a commit runs on one of its disks (the chain changes when
   * it ends).  top_gran: the backup bitmap's granularity, at most the
   * chain's cluster size so the bitmap holds exactly the top's clusters. */
  CLEANUP_FREE uint64_t *top_gran = calloc (r->ndisks, sizeof *top_gran);
  if (top_gran == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  for (size_t i = 0; i < r->ndisks; i++) {
    struct orch_disk *d = disk_by_name (o, r->disks[i]);
    struct orch_chain_info ci;
    if (offline[i] && !top)
      continue;
    if (d->chain == NULL) {
      if (top)
        return cbw_err_set (err, EINVAL, "disk %s has no overlay chain: mode top backs up "
                            "what the top overlay holds (add the disk with overlays, then "
                            "`cbw disk snapshot %s`)", d->name, d->name);
      continue;
    }
    if (orch_chain_info (d, &ci, err) < 0)
      return -1;
    if (ci.commit_running)
      return cbw_err_set (err, EBUSY, "disk %s: a commit is running (see `cbw disk chain "
                          "%s`; wait for it or cancel it)", d->name, d->name);
    if (top && ci.overlays == 0)
      return cbw_err_set (err, EINVAL, "disk %s has no overlay yet: mode top backs up what "
                          "the top overlay holds (take one with `cbw disk snapshot %s`)",
                          d->name, d->name);
    top_gran[i] = ci.cluster_size < d->granularity ? ci.cluster_size : d->granularity;
  }
  /* direct[i]: disk i's session was begun with a state map (direct PIT reads) */
  CLEANUP_FREE bool *direct = calloc (r->ndisks + 1, sizeof *direct);
  if (direct == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  /* Incremental: every disk must be covered by the base checkpoint. */
  size_t *idx = calloc (o->st.ncps + 1, sizeof *idx);
  if (idx == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (incremental)
    for (size_t i = 0; i < r->ndisks; i++) {
      ssize_t np = orch_plan_since (&o->st, r->disks[i], r->since, idx, err);
      if (np < 0) {
        free (idx);
        return -1;
      }
      /* A checkpoint whose bitmaps were reset or whose recovery failed on
       * this disk cannot tell what changed: never a silent short backup. */
      for (ssize_t k = 0; k < np; k++) {
        const struct orch_checkpoint *c = &o->st.cps[idx[k]];
        const struct orch_unusable *u = orch_cp_unusable (c, r->disks[i]);
        if (u) {
          char when[32];
          time_t t = (time_t) u->since;
          struct tm tm;
          strftime (when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", gmtime_r (&t, &tm));
          free (idx);
          return cbw_err_set (err, EINVAL, "checkpoint %s of disk %s is unusable since %s "
                              "(%s): take a full backup", c->name, r->disks[i], when,
                              u->reason);
        }
      }
    }

  b = calloc (1, sizeof *b);
  if (b == NULL || (b->disks = calloc (r->ndisks, sizeof *b->disks)) == NULL) {
    free (b);
    free (idx);
    return cbw_err_set (err, ENOMEM, "out of memory");
  }
  snprintf (b->id, sizeof b->id, "%s", id);
  b->mode = mode;
  b->readable = readable;
  snprintf (b->since, sizeof b->since, "%s", r->since ? r->since : "");
  snprintf (b->checkpoint, sizeof b->checkpoint, "%s", r->checkpoint ? r->checkpoint : "");
  /* "started" tells two backups of one id apart (job history: a disk a
   * job released cannot be pushed again in that backup), so it must differ
   * from every backup the history knows, also for a begin in the same
   * second as the last one (an end, a restart and a begin take less). */
  b->started = (int64_t) time (NULL);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);        /* then each job's: as job.c */
    for (size_t k = 0; k < o->njobs; k++) {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->jobs[k]->lock);
      if (strcmp (o->jobs[k]->backup, id) == 0 && o->jobs[k]->backup_started >= b->started)
        b->started = o->jobs[k]->backup_started + 1;
    }
  }
  b->cbw_timeout_ms = r->cbw_timeout_ms;
  b->seq = ++o->backup_seq;
  b->ndisks = r->ndisks;
  for (size_t i = 0; i < r->ndisks; i++) {
    snprintf (b->disks[i].name, sizeof b->disks[i].name, "%s", r->disks[i]);
    b->disks[i].offline = offline[i];
  }

  step = "prepare";
  if (store_plan (o, r, id, &bdir, &store_limit, err) < 0)
    goto fail_unrecorded;
  for (size_t i = 0; i < r->ndisks; i++) {
    struct orch_disk *d = disk_by_name (o, r->disks[i]);
    b->disks[i].store_limit = store_limit;
    if (!offline[i] && start_store (o, bdir, d, &b->disks[i], id, err) < 0)
      goto fail_unrecorded;
    if (incremental || top)
      b->disks[i].bitmap = orch_strdup_printf ("backup-%s", d->name);
  }
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    o->st.backup = b;
  }
  set_offline (o, b, true);
  if (b->checkpoint[0]) {
    if (orch_cp_prepare (o, b->checkpoint, r->disks, r->ndisks, "backup-begin", id, err) < 0) {
      set_offline (o, b, false);
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
      o->st.backup = NULL;
      goto fail_unrecorded;
    }
  }
  else {
    orch_set_pending (o, "backup-begin", id);
    if (orch_state_save (o, err) < 0) {
      set_offline (o, b, false);       /* b's stores: teardown below */
      {
        ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
        o->st.backup = NULL;
        o->st.pending.op[0] = '\0';
        o->st.pending.name[0] = '\0';
      }
      goto fail_unrecorded;
    }
  }

  orch_crash_point ("backup-begin:recorded");
  /* Freeze BEFORE quiescing: the guest's fsfreeze flushes its file systems
   * to these disks, and held writes would make it wait for the quiesce
   * timeout.  Once frozen the guest sends no new writes; the quiesce then
   * drains the ones still in flight and holds anything else. */
  step = "freeze";
  if ((r->freeze.hook && r->freeze.hook[0]) || (r->freeze.qga && r->freeze.qga[0])) {
    struct cbw_err fe = { 0 };
    if (orch_guest_run (&r->freeze, "freeze", &fe) < 0) {
      if (r->freeze.required) {
        *err = fe;
        goto fail;
      }
      struct json_object *data = json_object_new_object ();
      json_object_object_add (data, "backup", json_object_new_string (id));
      json_object_object_add (data, "error", json_object_new_string (fe.msg));
      json_object_object_add (data, "consistency", json_object_new_string ("crash"));
      orch_event (o, "freeze-failed", data);
      /* the hook may have frozen part of the guest: thaw anyway */
      orch_guest_run (&r->freeze, "thaw", &fe);
    }
    else
      frozen = true;
  }
  step = "quiesce";
  if (orch_quiesce (o, live, nlive, &quiesced, err) < 0)
    goto fail;
  for (size_t i = 0; i < r->ndisks; i++) {
    struct orch_disk *d = disk_by_name (o, r->disks[i]);
    struct orch_backup_disk *bd = &b->disks[i];
    if (bd->offline) {
      /* Nothing writes it: its dirty extents now are its dirty extents
       * at the point in time, read from the store. */
      if (bd->bitmap) {
        step = "bitmap";
        ssize_t n = orch_plan_since (&o->st, d->name, r->since, idx, err);
        CLEANUP_FREE char **bms = calloc ((n > 0 ? (size_t) n : 0) + 1, sizeof *bms);
        CLEANUP_FREE char *bdir2 = orch_strdup_printf ("%s/backups", o->state_dir);
        CLEANUP_FREE char *bdir3 = orch_strdup_printf ("%s/backups/%s", o->state_dir, id);
        CLEANUP_FREE char *ext = offline_extents_path (o, id, d->name);
        if (n < 0)
          goto fail;
        if (!bms || !bdir2 || !bdir3 || !ext) {
          cbw_err_set (err, ENOMEM, "out of memory");
          goto fail;
        }
        size_t nb = 0;
        int r2 = 0;
        for (ssize_t k = 0; k < n && r2 == 0; k++) {
          /* the checkpoint being created now is not part of "since" */
          if (b->checkpoint[0] && strcmp (o->st.cps[idx[k]].name, b->checkpoint) == 0)
            continue;
          char bm[ORCH_NAME_MAX + 8];
          orch_cp_bitmap (o->st.cps[idx[k]].name, bm, sizeof bm);
          if ((bms[nb++] = strdup (bm)) == NULL)
            r2 = cbw_err_set (err, ENOMEM, "out of memory");
        }
        uint64_t dirty;
        if (r2 == 0 && ((mkdir (bdir2, 0700) < 0 && errno != EEXIST) ||
                        (mkdir (bdir3, 0700) < 0 && errno != EEXIST)))
          r2 = cbw_err_set (err, errno, "%s: mkdir: %s", bdir3, strerror (errno));
        if (r2 == 0)
          r2 = orch_bm_store_union_file (d, bms, nb, ext, &dirty, err);
        for (size_t k = 0; k < nb; k++)
          free (bms[k]);
        if (r2 < 0)
          goto fail;
      }
      continue;
    }
    if (bd->bitmap && top) {
      /* top: the clusters the top overlay holds now (we are quiesced) */
      uint64_t bytes;
      step = "bitmap";
      if (orch_bm_remove (d, bd->bitmap, true, err) < 0 ||
          orch_bm_add_gran (d, bd->bitmap, false, top_gran[i], err) < 0 ||
          orch_chain_top_to_bitmap (d, bd->bitmap, d->size, &bytes, err) < 0) {
        cbw_err_prefix (err, "disk %s", d->name);
        goto fail;
      }
    }
    else if (bd->bitmap) {
      step = "bitmap";
      ssize_t n = orch_plan_since (&o->st, d->name, r->since, idx, err);
      if (n < 0 || orch_bm_remove (d, bd->bitmap, true, err) < 0 ||
          orch_bm_add (d, bd->bitmap, false, err) < 0)
        goto fail;
      for (ssize_t k = 0; k < n; k++) {
        char bm[ORCH_NAME_MAX + 8];
        orch_cp_bitmap (o->st.cps[idx[k]].name, bm, sizeof bm);
        /* the checkpoint being created now is not part of "since" */
        if (b->checkpoint[0] && strcmp (o->st.cps[idx[k]].name, b->checkpoint) == 0)
          continue;
        if (orch_bm_merge (d, bm, bd->bitmap, err) < 0)
          goto fail;
      }
    }
    step = "begin";
    CLEANUP_FREE char *uri = store_uri (bd);
    struct json_object *a = json_object_new_object ();
    json_object_object_add (a, "target", json_object_new_string (uri));
    if (bd->store_limit && bd->store_sock == NULL)   /* the filter's file target */
      json_object_object_add (a, "target-limit", json_object_new_int64
                              ((int64_t) bd->store_limit));
    /* Always explicit: an nbdkit adopted from an older cbwd may run with
     * the filter's own (long) default. */
    json_object_object_add (a, "timeout-ms", json_object_new_int64
                            (b->cbw_timeout_ms ? b->cbw_timeout_ms : orch_disk_cbw_timeout (d)));
    if (bd->bitmap && b->readable == ORCH_READABLE_CHANGED) {
      /* The session protects only the blocks the incremental reader needs:
       * we pass them as an extent list read from the dirtybitmap filter
       * (the bitmap is frozen: disabled, and we are quiesced).  Without
       * extents (readable all) it protects the whole disk. */
      uint64_t dirty;
      struct json_object *ext = orch_bm_extents (d, bd->bitmap, d->size, ORCH_SESSION_EXTENTS_MAX,
                                                 &dirty, err);
      if (ext == NULL) {
        json_object_put (a);
        cbw_err_prefix (err, "disk %s", d->name);
        goto fail;
      }
      json_object_object_add (a, "extents", ext);
    }
    CLEANUP_FREE char *states = pit_direct_ok (o, d, bd) ? pit_state_path (o, id, d->name) : NULL;
    struct json_object *rr = NULL;
    if (states) {
      /* Direct PIT reads need the shared state map; if the filter cannot
       * make one, the backup goes on with the proxy. */
      unlink (states);                  /* stale, from a crashed nbdkit */
      json_object_object_add (a, "state-file", json_object_new_string (states));
      rr = orch_mod_call (d->ctl_cbw, "begin", json_object_get (a), NULL, 0, err);
      if (rr)
        direct[i] = true;
      json_object_object_del (a, "state-file");
    }
    if (rr == NULL)
      rr = orch_mod_call (d->ctl_cbw, "begin", a, NULL, 0, err);
    else
      json_object_put (a);
    if (rr == NULL) {
      cbw_err_prefix (err, "disk %s", d->name);
      goto fail;
    }
    json_object_put (rr);
    bd->began = true;
  }
  orch_crash_point ("backup-begin:begun");
  if (b->checkpoint[0]) {
    step = "checkpoint";
    if (orch_cp_rotate (o, b->checkpoint, r->disks, r->ndisks, err) < 0)
      goto fail;
  }
  step = "resume";
  orch_resume (o, live, quiesced);
  quiesced = 0;
  if (frozen) {
    step = "thaw";
    struct cbw_err te = { 0 };
    frozen = false;
    if (orch_guest_run (&r->freeze, "thaw", &te) < 0) {
      struct json_object *data = json_object_new_object ();
      json_object_object_add (data, "backup", json_object_new_string (id));
      json_object_object_add (data, "error", json_object_new_string (te.msg));
      orch_event (o, "thaw-failed", data);
    }
  }

  orch_crash_point ("backup-begin:resumed");
  step = "export";
  for (size_t i = 0; i < r->ndisks; i++) {
    struct orch_disk *d = disk_by_name (o, r->disks[i]);
    struct orch_backup_disk *bd = &b->disks[i];
    if (bd->offline) {
      if (offline_publish (o, id, d, bd, err) < 0)
        goto fail;
      continue;
    }
    CLEANUP_FREE char *upstream = orch_strdup_printf ("nbd+unix:///pit?socket=%s",
                                                      d->nbd_sock);
    if (upstream == NULL) {
      cbw_err_set (err, ENOMEM, "out of memory");
      goto fail;
    }
    if (o->exports && o->exports->add_pit_export) {
      CLEANUP_FREE char *ctx = orch_strdup_printf ("backup-%s", d->name);
      bd->export_name = strdup (d->name);
      if (!ctx || !bd->export_name) {
        cbw_err_set (err, ENOMEM, "out of memory");
        goto fail;
      }
      char uri[512];
      CLEANUP_FREE char *states = direct[i] ? pit_state_path (o, id, d->name) : NULL;
      CLEANUP_FREE char *why = unreadable_why (b, d->name);
      struct cbw_err de = { 0 };
      if (states &&
          o->exports->add_pit_export_direct (o->exports->opaque, bd->export_name, upstream,
                                             d->ctl_bitmap, bd->bitmap, ctx, why, states, d->file,
                                             bd->store_path, uri, sizeof uri, &de) < 0) {
        struct json_object *data = json_object_new_object ();
        json_object_object_add (data, "disk", json_object_new_string (d->name));
        json_object_object_add (data, "error", json_object_new_string (de.msg));
        orch_event (o, "pit-direct-unavailable", data);
        states[0] = '\0';               /* proxy only */
      }
      if ((!states || !states[0]) &&
          o->exports->add_pit_export (o->exports->opaque, bd->export_name, upstream,
                                      d->ctl_bitmap, bd->bitmap, ctx, why, uri, sizeof uri,
                                      err) < 0)
        goto fail;
      bd->pit_uri = strdup (uri);
    }
    else
      bd->pit_uri = strdup (upstream);
    if (bd->pit_uri == NULL) {
      cbw_err_set (err, ENOMEM, "out of memory");
      goto fail;
    }
  }
  orch_set_pending (o, NULL, NULL);
  if (orch_state_save (o, err) < 0) {
    step = "save";
    goto fail;
  }
  free (idx);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    *ret = orch_backup_to_json (b);
  }
  struct json_object *data = json_object_new_object ();
  json_object_object_add (data, "backup", json_object_new_string (id));
  orch_event (o, "backup-begun", data);
  return 0;

 fail:;
  {
    struct cbw_err e2 = { 0 };
    if (frozen)
      orch_guest_run (&r->freeze, "thaw", &e2);
    orch_resume (o, live, quiesced);
    int t = teardown (o, b, true, true, &e2);
    if (t == 0) {
      drop_backup (o);
      orch_state_save (o, &e2);
    }
    char msg[CBW_ERR_MSG_MAX];
    memcpy (msg, err->msg, sizeof msg);
    cbw_err_set (err, err->errnum, "backup-begin failed at step %s: %s%s%s",
                 step, msg, t < 0 ? "; rollback incomplete (retried at the "
                 "next backup command or restart): " : "", t < 0 ? e2.msg : "");
    free (idx);
    struct json_object *data = json_object_new_object ();
    json_object_object_add (data, "backup", json_object_new_string (id));
    json_object_object_add (data, "step", json_object_new_string (step));
    orch_event (o, "backup-failed", data);
    return -1;
  }

 fail_unrecorded:;
  {
    struct cbw_err e2 = { 0 };
    if (b) {
      teardown (o, b, false, true, &e2);
      orch_backup_free (b);
    }
    free (idx);
    return cbw_err_prefix (err, "backup-begin failed at step %s", step);
  }
}

int
orch_backup_end (struct cbw_orch *o, const char *id, struct cbw_err *err)
{
  struct orch_backup *b;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    b = o->st.backup;
    if (b == NULL)
      return cbw_err_set (err, ENOENT, "no backup is running");
    if (id && id[0] && strcmp (id, b->id) != 0)
      return cbw_err_set (err, ENOENT, "no backup named %s (running: %s)", id, b->id);
  }
  orch_set_pending (o, "backup-end", b->id);
  if (orch_state_save (o, err) < 0)
    return -1;
  orch_crash_point ("backup-end:recorded");
  char bid[ORCH_NAME_MAX + 1];
  snprintf (bid, sizeof bid, "%s", b->id);
  if (teardown (o, b, false, false, err) < 0)
    return cbw_err_prefix (err, "ending backup %s (partly done; retried at the next "
                           "backup command or restart)", bid);
  drop_backup (o);
  if (orch_state_save (o, err) < 0)
    return -1;
  struct json_object *data = json_object_new_object ();
  json_object_object_add (data, "backup", json_object_new_string (bid));
  orch_event (o, "backup-ended", data);
  return 0;
}

/* ---- watch ---- */

/* Ask each disk of the running backup whose session was not yet reported
 * broken for its status; report the ones that broke.  Called with o->lock
 * held; drops it around the control calls and the events. */
static void
watch_once (struct cbw_orch *o, uint64_t *bseq, bool *reported)
{
  struct orch_backup *b = o->st.backup;
  if (b == NULL || o->st.pending.op[0])
    return;                     /* none, or beginning/ending: not yet/any more */
  if (*bseq != b->seq + 1) {    /* another backup than last time */
    *bseq = b->seq + 1;
    memset (reported, 0, ORCH_WATCH_DISKS * sizeof *reported);
  }
  size_t n = b->ndisks < ORCH_WATCH_DISKS ? b->ndisks : ORCH_WATCH_DISKS;
  char *socks[ORCH_WATCH_DISKS] = { NULL }, *names[ORCH_WATCH_DISKS] = { NULL };
  for (size_t i = 0; i < n; i++) {
    struct orch_disk *d = orch_find_disk (&o->st, b->disks[i].name);
    if (reported[i] || d == NULL || d->run != ORCH_DISK_RUNNING)
      continue;
    socks[i] = strdup (d->ctl_cbw);
    names[i] = strdup (d->name);
  }
  char id[ORCH_NAME_MAX + 1];
  snprintf (id, sizeof id, "%s", b->id);
  uint64_t seq = *bseq;
  pthread_mutex_unlock (&o->lock);
  bool broke[ORCH_WATCH_DISKS] = { false };
  for (size_t i = 0; i < n; i++) {
    struct cbw_err e = { 0 };
    struct json_object *st, *v;
    if (socks[i] == NULL || names[i] == NULL)
      continue;
    st = orch_mod_call (socks[i], "status", NULL, NULL, 0, &e);
    if (st && json_object_object_get_ex (st, "state", &v) &&
        strcmp (json_object_get_string (v), "broken") == 0) {
      struct json_object *data = json_object_new_object ();
      json_object_object_add (data, "backup", json_object_new_string (id));
      json_object_object_add (data, "disk", json_object_new_string (names[i]));
      if (json_object_object_get_ex (st, "last-error", &v))
        json_object_object_add (data, "error", json_object_get (v));
      if (json_object_object_get_ex (st, "failed-blocks", &v))
        json_object_object_add (data, "failed-blocks", json_object_get (v));
      if (json_object_object_get_ex (st, "timeout-ms", &v))
        json_object_object_add (data, "cbw-timeout-ms", json_object_get (v));
      orch_event (o, "backup-broken", data);
      broke[i] = true;
    }
    json_object_put (st);
  }
  for (size_t i = 0; i < n; i++) {
    free (socks[i]);
    free (names[i]);
  }
  pthread_mutex_lock (&o->lock);
  if (*bseq == seq)
    for (size_t i = 0; i < n; i++)
      reported[i] |= broke[i];
}

/* After a restart of cbwd the running backup's offline disks are recorded
 * but not served: publish them again (locks, export) as the busy owner,
 * so no command changes the backup meanwhile.  Called with o->lock held;
 * drops it around the I/O.  A failure is reported once as an event
 * (backup-offline-unavailable) and retried at the next tick. */
static void
republish_once (struct cbw_orch *o, uint64_t *reported_seq)
{
  struct orch_backup *b = o->st.backup;
  if (b == NULL || o->st.pending.op[0] || o->busy)
    return;
  bool need = false;
  for (size_t i = 0; i < b->ndisks; i++)
    need = need || (b->disks[i].offline && !b->disks[i].published);
  if (!need)
    return;
  o->busy = true;
  pthread_mutex_unlock (&o->lock);
  for (size_t i = 0; i < b->ndisks; i++) {
    struct orch_backup_disk *bd = &b->disks[i];
    struct cbw_err e = { 0 };
    struct orch_disk *d = disk_by_name (o, bd->name);
    if (!bd->offline || bd->published || d == NULL)
      continue;
    if (offline_publish (o, b->id, d, bd, &e) < 0) {
      offline_unlock (bd);
      if (*reported_seq != b->seq + 1) {
        struct json_object *data = json_object_new_object ();
        json_object_object_add (data, "backup", json_object_new_string (b->id));
        json_object_object_add (data, "disk", json_object_new_string (bd->name));
        json_object_object_add (data, "error", json_object_new_string (e.msg));
        orch_event (o, "backup-offline-unavailable", data);
      }
      *reported_seq = b->seq + 1;
    }
    else {
      struct json_object *data = json_object_new_object ();
      json_object_object_add (data, "backup", json_object_new_string (b->id));
      json_object_object_add (data, "disk", json_object_new_string (bd->name));
      json_object_object_add (data, "uri", json_object_new_string (bd->pit_uri));
      orch_event (o, "backup-offline-served", data);
    }
  }
  pthread_mutex_lock (&o->lock);
  o->busy = false;
}

static void *
watch_thread (void *arg)
{
  struct cbw_orch *o = arg;
  uint64_t bseq = 0;            /* the backup watched: its seq + 1, 0 = none yet */
  bool reported[ORCH_WATCH_DISKS];
  uint64_t offline_reported = 0; /* republish failure reported for seq + 1 */

  pthread_mutex_lock (&o->lock);
  while (!o->watch_stop) {
    struct timespec ts;
    clock_gettime (CLOCK_MONOTONIC, &ts);
    ts.tv_nsec += ORCH_WATCH_MS * 1000000L;
    ts.tv_sec += ts.tv_nsec / 1000000000;
    ts.tv_nsec %= 1000000000;
    pthread_cond_timedwait (&o->watch_cond, &o->lock, &ts);
    if (!o->watch_stop)
      watch_once (o, &bseq, reported);
    if (!o->watch_stop)
      republish_once (o, &offline_reported);
  }
  pthread_mutex_unlock (&o->lock);
  return NULL;
}

int
orch_backup_watch_start (struct cbw_orch *o, struct cbw_err *err)
{
  pthread_condattr_t ca;
  int r;
  if (o->watch_started)
    return 0;
  pthread_condattr_init (&ca);
  pthread_condattr_setclock (&ca, CLOCK_MONOTONIC);
  pthread_cond_init (&o->watch_cond, &ca);
  pthread_condattr_destroy (&ca);
  o->watch_stop = false;
  r = pthread_create (&o->watch_thread, NULL, watch_thread, o);
  if (r != 0) {
    pthread_cond_destroy (&o->watch_cond);
    return cbw_err_set (err, r, "backup watch thread: %s", strerror (r));
  }
  o->watch_started = true;
  return 0;
}

void
orch_backup_watch_stop (struct cbw_orch *o)
{
  if (!o->watch_started)
    return;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    o->watch_stop = true;
    pthread_cond_signal (&o->watch_cond);
  }
  pthread_join (o->watch_thread, NULL);
  pthread_cond_destroy (&o->watch_cond);
  o->watch_started = false;
}

int
orch_backup_abandon (struct cbw_orch *o, const char *why, struct json_object *failed)
{
  struct orch_backup *b;
  bool begin;
  struct cbw_err e = { 0 };
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    b = o->st.backup;
    begin = strcmp (o->st.pending.op, "backup-begin") == 0;
  }
  int ret = 0;
  if (b) {
    /* Sessions, backup bitmaps, exports and stores: errors are left over
     * on disks that cannot be reached (a dead nbdkit has no session). */
    teardown (o, b, false, false, &e);
    if (begin && b->checkpoint[0])
      ret = orch_cp_abandon (o, b->checkpoint, false, why, failed);
  }
  drop_backup (o);
  return ret;
}

int
orch_backup_reconcile (struct cbw_orch *o, struct cbw_err *err)
{
  struct orch_backup *b;
  bool begin;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    b = o->st.backup;
    begin = strcmp (o->st.pending.op, "backup-begin") == 0;
  }
  if (b && teardown (o, b, begin, false, err) < 0)
    return -1;
  drop_backup (o);
  return orch_state_save (o, err);
}
