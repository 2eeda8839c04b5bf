/* cbw — server/orch/protect.c: "is this file one of ours?"
 *
 * A command that writes where a user points it (a push job's target) must
 * never write over what cbwd serves or keeps: a disk's served image, the
 * descriptor, overlay and data files of any overlay chain, a backup store,
 * bitmap descriptors and data files, the state file, anything else in the
 * state directory, or the sockets cbwd and its disks listen on.  Names prove
 * nothing (hard links, symlinks, bind mounts, /proc/self/fd/N all give one
 * file many names), so files are compared by device and inode, and a block
 * device is refused when it IS a protected block device (same st_rdev),
 * holds the filesystem of a protected file (st_rdev == its st_dev), or is
 * the whole disk or a partition of one of those (/sys/dev/block/MAJ:MIN:
 * a partition's sysfs directory is inside its disk's).
 *
 * Use: orch_protect_collect() takes a snapshot of the protected set, then
 * any number of orch_protect_check_*(), then orch_protect_free().  The
 * snapshot is only as fresh as its collection: callers collect right
 * before they open their targets.
 *
 * Locking: o->lock is held only to copy the paths out of the state; every
 * stat, descriptor read and directory walk happens after it is dropped.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "cleanup.h"
#include "orch_internal.h"
#ifdef ORCH_HAVE_FORMATS
#include "overlay.h"
#endif

#define WHY_DISK "refusing to overwrite a live disk"
#define WHY_STORE "refusing to overwrite a backup store"
#define WHY_META "refusing to overwrite cbwd's metadata"
#define WHY_SOCK "refusing to write to a live disk or to cbwd"

struct orch_prot {
  char *path;                   /* the name we know it by */
  char *what;                   /* "disk vda's served image" */
  const char *why;              /* WHY_* */
  dev_t dev, rdev;
  ino_t ino;
  mode_t mode;
};

static int
add_entry (struct orch_protect *ps, const char *path, const char *why,
           const char *fmt, ...) __attribute__ ((format (printf, 4, 5)));

static int
add_entry (struct orch_protect *ps, const char *path, const char *why,
           const char *fmt, ...)
{
  struct stat sb;
  if (path == NULL || path[0] == '\0' || stat (path, &sb) < 0)
    return 0;                   /* nothing there: nothing to overwrite */
  if (ps->n == ps->cap) {
    size_t cap = ps->cap ? ps->cap * 2 : 64;
    struct orch_prot *v = realloc (ps->v, cap * sizeof *v);
    if (v == NULL)
      return -1;
    ps->v = v;
    ps->cap = cap;
  }
  struct orch_prot *e = &ps->v[ps->n];
  va_list ap;
  va_start (ap, fmt);
  int r = vasprintf (&e->what, fmt, ap);
  va_end (ap);
  if (r < 0)
    return -1;
  e->path = strdup (path);
  if (e->path == NULL) {
    free (e->what);
    return -1;
  }
  e->why = why;
  e->dev = sb.st_dev;
  e->ino = sb.st_ino;
  e->rdev = S_ISBLK (sb.st_mode) ? sb.st_rdev : 0;
  e->mode = sb.st_mode;
  ps->n++;
  return 0;
}

/* The files of one overlay chain, from its descriptor (the one source of
 * truth for its layers, docs/formats/overlay.md): the descriptor, the base
 * and each overlay's descriptor, data and map files. */
static int
add_chain (struct orch_protect *ps, const char *disk, const char *desc)
{
  if (add_entry (ps, desc, WHY_DISK, "disk %s's overlay chain descriptor", disk) < 0)
    return -1;
#ifdef ORCH_HAVE_FORMATS
  struct cbw_chain_desc c = { 0 };
  struct cbw_err e = { 0 };
  if (cbw_chain_desc_load (desc, &c, &e) < 0)
    return 0;                   /* unreadable: the walk of its directory below */
  CLEANUP_FREE char *dir = cbw_ovl_dirname (desc);
  int r = 0;
  if (dir == NULL || add_entry (ps, dir, WHY_DISK, "the directory of disk %s's overlay "
                                "chain", disk) < 0)
    r = -1;
  if (r == 0 && c.base) {
    CLEANUP_FREE char *base = cbw_ovl_join (dir, c.base);
    if (base == NULL || add_entry (ps, base, WHY_DISK, "the base image of disk %s's "
                                   "overlay chain", disk) < 0)
      r = -1;
  }
  for (size_t i = 0; r == 0 && i < c.nlayers; i++) {
    struct cbw_ovl_desc od = { 0 };
    CLEANUP_FREE char *p = cbw_ovl_join (dir, c.layers[i]);
    if (p == NULL || add_entry (ps, p, WHY_DISK, "overlay %s of disk %s's chain",
                                c.layers[i], disk) < 0) {
      r = -1;
      break;
    }
    /* data and map names as the descriptor says, else the usual ones */
    bool have = cbw_ovl_desc_load (dir, c.layers[i], &od, &e) == 0;
    CLEANUP_FREE char *data = have && od.data ? cbw_ovl_join (dir, od.data)
      : orch_strdup_printf ("%s.data", p);
    CLEANUP_FREE char *map = have && od.map ? cbw_ovl_join (dir, od.map)
      : orch_strdup_printf ("%s.map", p);
    if (have)
      cbw_ovl_desc_free (&od);
    if (data == NULL || map == NULL ||
        add_entry (ps, data, WHY_DISK, "the data file of overlay %s of disk %s's chain",
                   c.layers[i], disk) < 0 ||
        add_entry (ps, map, WHY_DISK, "the map file of overlay %s of disk %s's chain",
                   c.layers[i], disk) < 0)
      r = -1;
  }
  cbw_chain_desc_free (&c);
  return r;
#else
  return 0;
#endif
}

/* Everything else in the state directory (bitmap data files, journals,
 * logs, stores, sockets): nftw has no user pointer, hence the static (the
 * walk runs on the control thread only, one command at a time). */
static struct orch_protect *walk_ps;
static int walk_err;

static int
walk_one (const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
  (void) sb; (void) ftw;
  if (type == FTW_D || type == FTW_DP || type == FTW_DNR || type == FTW_NS)
    return 0;
  size_t n = strlen (path);
  bool bmap = n > 5 && strcmp (path + n - 5, ".bmap") == 0;
  if (add_entry (walk_ps, path, WHY_META, bmap ? "a dirty bitmap data file of cbwd"
                 : "a file in cbwd's state directory") < 0)
    walk_err = -1;
  return walk_err;
}

static pthread_mutex_t walk_lock = PTHREAD_MUTEX_INITIALIZER;

static int
add_tree (struct orch_protect *ps, const char *dir)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&walk_lock);
  walk_ps = ps;
  walk_err = 0;
  /* FTW_PHYS: a symlink in there is not a reason to refuse its target */
  nftw (dir, walk_one, 16, FTW_PHYS | FTW_MOUNT);
  walk_ps = NULL;
  return walk_err;
}

/* Paths copied out of the state under o->lock. */
struct plist {
  size_t n;
  struct { char *path, *what; const char *why; bool chain; char *disk; } v[];
};

int
orch_protect_collect (struct cbw_orch *o, struct orch_protect *ps, struct cbw_err *err)
{
  memset (ps, 0, sizeof *ps);
  struct stat sb;
  if (stat (o->state_dir, &sb) == 0) {
    ps->state_dev = sb.st_dev;
    ps->state_ino = sb.st_ino;
    ps->have_state = true;
  }
  ps->state_dir = strdup (o->state_dir);
  if (ps->state_dir == NULL)
    goto nomem;

  struct plist *pl = NULL;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    size_t max = 8 + o->nlisten + o->st.ndisks * 8 +
      (o->st.backup ? o->st.backup->ndisks * 2 : 0);
    pl = calloc (1, sizeof *pl + max * sizeof pl->v[0]);
    if (pl == NULL)
      goto nomem;
#define PUT(P, WHY, CH, D, ...)                                         \
    do {                                                                \
      if ((P) != NULL) {                                                \
        pl->v[pl->n].path = strdup (P);                                 \
        pl->v[pl->n].what = orch_strdup_printf (__VA_ARGS__);           \
        pl->v[pl->n].disk = strdup (D);                                 \
        pl->v[pl->n].why = (WHY);                                       \
        pl->v[pl->n].chain = (CH);                                      \
        pl->n++;                                                        \
      }                                                                 \
    } while (0)
    for (size_t i = 0; i < o->st.ndisks; i++) {
      struct orch_disk *d = o->st.disks[i];
      PUT (d->file, WHY_DISK, false, d->name, "disk %s's served image", d->name);
      PUT (d->chain, WHY_DISK, true, d->name, "chain");
      PUT (d->nbd_sock, WHY_SOCK, false, d->name, "disk %s's NBD socket", d->name);
      PUT (d->ctl_chain, WHY_SOCK, false, d->name, "disk %s's chain control socket", d->name);
      PUT (d->ctl_cbw, WHY_SOCK, false, d->name, "disk %s's cbw control socket", d->name);
      PUT (d->ctl_bitmap, WHY_SOCK, false, d->name, "disk %s's dirtybitmap control socket",
           d->name);
      PUT (d->bitmaps, WHY_META, false, d->name, "disk %s's bitmap descriptor", d->name);
    }
    for (size_t i = 0; o->st.backup && i < o->st.backup->ndisks; i++) {
      struct orch_backup_disk *bd = &o->st.backup->disks[i];
      PUT (bd->store_path, WHY_STORE, false, bd->name, "the backup store of disk %s",
           bd->name);
      /* a path, or cbwd's own URI (its listener is below) */
      if (bd->store_sock && bd->store_sock[0] == '/')
        PUT (bd->store_sock, WHY_STORE, false, bd->name,
             "the NBD socket of disk %s's backup store", bd->name);
    }
    PUT (o->state_path, WHY_META, false, "", "cbwd's state file");
    PUT (o->ctl_path, WHY_SOCK, false, "", "cbwd's control socket");
    for (size_t i = 0; i < o->nlisten; i++)
      PUT (o->listen[i], WHY_SOCK, false, "", "cbwd's NBD listener socket");
#undef PUT
  }
  int r = 0;
  for (size_t i = 0; i < pl->n; i++) {
    if (!pl->v[i].path || !pl->v[i].what || !pl->v[i].disk)
      r = -1;
    else if (pl->v[i].chain)
      r = add_chain (ps, pl->v[i].disk, pl->v[i].path);
    else
      r = add_entry (ps, pl->v[i].path, pl->v[i].why, "%s", pl->v[i].what);
    if (r < 0)
      break;
  }
  for (size_t i = 0; i < pl->n; i++) {
    free (pl->v[i].path);
    free (pl->v[i].what);
    free (pl->v[i].disk);
  }
  free (pl);
  if (r < 0 || add_tree (ps, o->state_dir) < 0)
    goto nomem;
  return 0;

 nomem:
  orch_protect_free (ps);
  return cbw_err_set (err, ENOMEM, "out of memory");
}

void
orch_protect_free (struct orch_protect *ps)
{
  for (size_t i = 0; i < ps->n; i++) {
    free (ps->v[i].path);
    free (ps->v[i].what);
  }
  free (ps->v);
  free (ps->state_dir);
  memset (ps, 0, sizeof *ps);
}

/* realpath of /sys/dev/block/MAJ:MIN, or NULL (not a block device sysfs
 * knows, e.g. the anonymous device of a tmpfs). */
static char *
sys_block_path (dev_t d)
{
  char p[64];
  snprintf (p, sizeof p, "/sys/dev/block/%u:%u", major (d), minor (d));
  return realpath (p, NULL);
}

/* Is one of the two sysfs paths the other or inside it (disk/partition)? */
static bool
sys_related (const char *a, const char *b)
{
  size_t la = strlen (a), lb = strlen (b);
  if (la > lb) {
    const char *t = a; a = b; b = t;
    size_t tl = la; la = lb; lb = tl;
  }
  return strncmp (a, b, la) == 0 && (b[la] == '\0' || b[la] == '/');
}

int
orch_protect_check_stat (const struct orch_protect *ps, const char *label,
                         const char *name, const struct stat *sb, struct cbw_err *err)
{
  for (size_t i = 0; i < ps->n; i++) {
    const struct orch_prot *e = &ps->v[i];
    if (e->dev == sb->st_dev && e->ino == sb->st_ino)
      return cbw_err_set (err, EINVAL, "%s %s is %s (same device and inode as %s); %s",
                          label, name, e->what, e->path, e->why);
  }
  if (!S_ISBLK (sb->st_mode))
    return 0;
  for (size_t i = 0; i < ps->n; i++) {
    const struct orch_prot *e = &ps->v[i];
    if (e->rdev && e->rdev == sb->st_rdev)
      return cbw_err_set (err, EINVAL, "%s %s is %s (same block device %u:%u as %s); %s",
                          label, name, e->what, major (sb->st_rdev), minor (sb->st_rdev),
                          e->path, e->why);
    if (e->dev == sb->st_rdev)
      return cbw_err_set (err, EINVAL, "%s %s is block device %u:%u, which holds the "
                          "filesystem of %s (%s); %s", label, name, major (sb->st_rdev),
                          minor (sb->st_rdev), e->what, e->path, e->why);
  }
  CLEANUP_FREE char *tsys = sys_block_path (sb->st_rdev);
  if (tsys == NULL)
    return 0;
  for (size_t i = 0; i < ps->n; i++) {
    const struct orch_prot *e = &ps->v[i];
    dev_t ds[2] = { e->rdev, e->dev };
    for (int k = 0; k < 2; k++) {
      if (ds[k] == 0 || (k == 1 && i > 0 && ps->v[i - 1].dev == e->dev))
        continue;               /* neighbours often share a filesystem */
      CLEANUP_FREE char *esys = sys_block_path (ds[k]);
      if (esys && sys_related (tsys, esys))
        return cbw_err_set (err, EINVAL, "%s %s is block device %u:%u, the whole disk or a "
                            "partition of block device %u:%u, which %s %s (%s); %s", label,
                            name, major (sb->st_rdev), minor (sb->st_rdev), major (ds[k]),
                            minor (ds[k]), k == 0 ? "is" : "holds the filesystem of",
                            e->what, e->path, e->why);
    }
  }
  return 0;
}

int
orch_protect_check_path (const struct orch_protect *ps, const char *label,
                         const char *path, struct cbw_err *err)
{
  struct stat sb;
  if (stat (path, &sb) < 0)
    return 0;                   /* nothing there: nothing of ours */
  return orch_protect_check_stat (ps, label, path, &sb, err);
}

int
orch_protect_check_newdir (const struct orch_protect *ps, const char *label,
                           const char *name, int dirfd, struct cbw_err *err)
{
  struct stat sb;
  if (!ps->have_state)
    return 0;
  /* Walk up with "..": no name of the directory is trusted. */
  int fd = dup (dirfd);
  if (fd < 0)
    return cbw_err_set (err, errno, "%s %s: dup: %s", label, name, strerror (errno));
  for (int depth = 0; depth < 4096; depth++) {
    if (fstat (fd, &sb) < 0) {
      int e = errno;
      close (fd);
      return cbw_err_set (err, e, "%s %s: fstat: %s", label, name, strerror (e));
    }
    if (sb.st_dev == ps->state_dev && sb.st_ino == ps->state_ino) {
      close (fd);
      return cbw_err_set (err, EINVAL, "%s %s would be created inside cbwd's state "
                          "directory %s; %s", label, name, ps->state_dir, WHY_META);
    }
    /* a chain's directory: only its own files belong there */
    for (size_t i = 0; depth == 0 && i < ps->n; i++)
      if (S_ISDIR (ps->v[i].mode) && ps->v[i].dev == sb.st_dev && ps->v[i].ino == sb.st_ino) {
        close (fd);
        return cbw_err_set (err, EINVAL, "%s %s would be created inside %s (%s); %s",
                            label, name, ps->v[i].what, ps->v[i].path, ps->v[i].why);
      }
    int up = openat (fd, "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    struct stat ub;
    if (up < 0 || fstat (up, &ub) < 0) {
      if (up >= 0)
        close (up);
      break;
    }
    close (fd);
    fd = up;
    if (ub.st_dev == sb.st_dev && ub.st_ino == sb.st_ino)
      break;                    /* the root */
  }
  close (fd);
  return 0;
}
