/* cbw — server/orch/diskfiles.c: which files a disk may use, and which files
 * are a disk's own.
 *
 * Identity: two names are one image when stat() (links followed) gives the
 * same device + inode, or the same device number for block device nodes
 * (two nodes of one device are one disk).  Names never decide: a hard link
 * or a symlink of a served image is that image.  `disk-add` refuses an image
 * that is another disk's image (Exists), or anything else cbwd serves or
 * keeps (protect.c, the same set push jobs refuse as targets): a file of
 * the state directory (state file, bitmaps, journals, logs, stores, the
 * default chains), a file of another disk's overlay chain, or a block
 * device holding one of them; and a chain descriptor given with `chain`
 * that lies inside the state directory (another disk's directory, or
 * cbwd's internals: they are deleted with their disk); only the disk's own
 * default chain lives there.
 *
 * Own files: `disk-remove` deletes what cbwd and the modules it runs made
 * in STATE/disks/NAME/ (the list below) and nothing else: any other entry
 * is left where it is and reported, and then the directory stays too.
 *
 * Locking: none of its own.  Called by the busy owner (the only one that
 * changes the disk list) without o->lock held: the paths it needs are
 * copied under the lock, the file system work is done unlocked.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cleanup.h"
#include "imagelock.h"
#include "orch_internal.h"

struct fid {
  dev_t dev;
  ino_t ino;
  bool blk;                     /* dev = st_rdev of a block device node */
};

static void
fid_from_stat (const struct stat *sb, struct fid *f)
{
  f->blk = S_ISBLK (sb->st_mode);
  f->dev = f->blk ? sb->st_rdev : sb->st_dev;
  f->ino = f->blk ? 0 : sb->st_ino;
}

static bool
fid_of (const char *path, struct fid *f)
{
  struct stat sb;
  if (path == NULL || stat (path, &sb) < 0)
    return false;
  fid_from_stat (&sb, f);
  return true;
}

static bool
fid_eq (const struct fid *a, const struct fid *b)
{
  return a->blk == b->blk && a->dev == b->dev && a->ino == b->ino;
}

/* The canonical form of a path whose last components may not exist yet. */
static char *
canonical_maybe_missing (const char *path)
{
  CLEANUP_FREE char *head = strdup (path);
  char *tail = NULL;
  if (head == NULL)
    return NULL;
  for (;;) {
    char *real = realpath (head, NULL);
    if (real) {
      char *r = tail ? orch_strdup_printf ("%s%s%s", real,
                                           strcmp (real, "/") == 0 ? "" : "/", tail)
        : strdup (real);
      free (real);
      free (tail);
      return r;
    }
    char *slash = strrchr (head, '/');
    if (errno != ENOENT || slash == NULL || slash == head) {
      free (tail);
      return NULL;
    }
    char *t = tail ? orch_strdup_printf ("%s/%s", slash + 1, tail) : strdup (slash + 1);
    free (tail);
    tail = t;
    if (tail == NULL)
      return NULL;
    *slash = '\0';
  }
}

/* Is the existing directory `dir` (canonical) state_dir or below it?  By
 * identity of each ancestor, so a bind mount of the state directory counts. */
static bool
inside_dir (const char *dir, const struct fid *top)
{
  CLEANUP_FREE char *p = strdup (dir);
  while (p && p[0]) {
    struct fid g;
    if (fid_of (p, &g) && !g.blk && g.dev == top->dev && g.ino == top->ino)
      return true;
    char *slash = strrchr (p, '/');
    if (slash == NULL || slash == p)
      break;
    *slash = '\0';
  }
  return false;
}

int
orch_disk_check_files (struct cbw_orch *o, const char *name, const char *image,
                       const char *chain, bool chain_given, struct cbw_err *err)
{
  struct fid img, g;
  struct orch_protect ps;
  bool have_ps = false;
  size_t n = 0;
  char **names = NULL, **files = NULL, **chains = NULL;
  int r = 0;

  if (!fid_of (image, &img))
    return cbw_err_set (err, errno, "%s: %s", image, strerror (errno));
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    n = o->st.ndisks;
    names = calloc (n + 1, sizeof *names);
    files = calloc (n + 1, sizeof *files);
    chains = calloc (n + 1, sizeof *chains);
    for (size_t i = 0; names && files && chains && i < n; i++) {
      names[i] = strdup (o->st.disks[i]->name);
      files[i] = strdup (o->st.disks[i]->file);
      chains[i] = o->st.disks[i]->chain ? strdup (o->st.disks[i]->chain) : NULL;
    }
  }
  if (names == NULL || files == NULL || chains == NULL) {
    r = cbw_err_set (err, ENOMEM, "out of memory");
    goto out;
  }

  /* another disk's image: by identity, never by name */
  for (size_t i = 0; i < n; i++)
    if (fid_of (files[i], &g) ? fid_eq (&g, &img) : strcmp (files[i], image) == 0) {
      r = cbw_err_set (err, EEXIST, "%s is already served as disk %s (%s is the same %s)",
                       image, names[i], files[i], img.blk ? "block device" : "file");
      goto out;
    }

  /* anything else cbwd serves or keeps (protect.c): a file of the state
   * directory, of another disk's chain, a store, ... */
  if (orch_protect_collect (o, &ps, err) < 0) {
    r = -1;
    goto out;
  }
  have_ps = true;
  if (orch_protect_check_path (&ps, "image", image, err) < 0) {
    r = -1;
    goto out;
  }

  if (chain) {
    CLEANUP_FREE char *canon = canonical_maybe_missing (chain);
    CLEANUP_FREE char *own = orch_chain_default_path (o->state_dir, name);
    if (canon == NULL) {
      r = cbw_err_set (err, errno ? errno : EINVAL, "chain %s: %s", chain,
                       strerror (errno ? errno : EINVAL));
      goto out;
    }
    /* an existing chain of another disk, by identity */
    struct fid cf;
    bool cf_ok = fid_of (canon, &cf);
    for (size_t i = 0; i < n; i++)
      if (chains[i] && (cf_ok && fid_of (chains[i], &g) ? fid_eq (&g, &cf)
                        : strcmp (chains[i], canon) == 0)) {
        r = cbw_err_set (err, EEXIST, "chain %s already belongs to disk %s", chain, names[i]);
        goto out;
      }
    if (chain_given && (own == NULL || strcmp (canon, own) != 0)) {
      struct fid top;
      CLEANUP_FREE char *cdir = strdup (canon);
      char *slash = cdir ? strrchr (cdir, '/') : NULL;
      if (slash && slash != cdir)
        *slash = '\0';
      /* the deepest existing ancestor decides */
      while (cdir && access (cdir, F_OK) < 0 && (slash = strrchr (cdir, '/')) && slash != cdir)
        *slash = '\0';
      top.dev = ps.state_dev;
      top.ino = ps.state_ino;
      top.blk = false;
      if (cdir && ps.have_state && inside_dir (cdir, &top)) {
        r = cbw_err_set (err, EINVAL, "chain %s is inside cbwd's state directory %s (whose "
                         "disk directories are deleted with their disks): keep a chain "
                         "outside it, or leave out `chain` to use the disk's own (%s)",
                         chain, o->state_dir, own ? own : "?");
        goto out;
      }
    }
  }

 out:
  if (have_ps)
    orch_protect_free (&ps);
  for (size_t i = 0; i < n; i++) {
    if (names) free (names[i]);
    if (files) free (files[i]);
    if (chains) free (chains[i]);
  }
  free (names); free (files); free (chains);
  return r;
}

int
orch_disk_check_lock (struct orch_disk *d, struct cbw_err *err)
{
  unsigned perm, shared;
  if (d->force_share) {
    fprintf (stderr, "cbwd: disk %s: force-share: %s is served without exclusive image "
             "locks; another writer (QEMU, qemu-nbd) can corrupt it\n", d->name, d->file);
    return 0;
  }
  cbw_imagelock_perms (true, false, &perm, &shared);
  if (cbw_imagelock_probe (d->file, perm, shared, err) < 0) {
    char msg[CBW_ERR_MSG_MAX];
    memcpy (msg, err->msg, sizeof msg);
    if (err->errnum == EBUSY)
      return cbw_err_set (err, EBUSY, "disk %s: %s (stop the other user first, or add "
                          "the disk with force-share if you are sure it is safe)",
                          d->name, msg);
    return cbw_err_set (err, err->errnum, "disk %s: %s", d->name, msg);
  }
  return 0;
}

/* ---- disk-remove: the disk's own files ---- */

enum kind { K_SOCK, K_FILE };
static const struct { const char *name; enum kind kind; } own_files[] = {
  { "nbd.sock", K_SOCK },        /* nbdkit -U */
  { "chain.ctl", K_SOCK },       /* control sockets of the modules */
  { "cbw.ctl", K_SOCK },
  { "dirtybitmap.ctl", K_SOCK },
  { "nbdkit.log", K_FILE },
  { "bitmaps.json", K_FILE },    /* the dirtybitmap filter's store */
  { "bitmaps.json.lock", K_FILE },
  { "bitmaps.json.tmp", K_FILE },
  { "bitmaps.json.journal", K_FILE },  /* the filter's dirty-region journal */
  { "bitmaps.json.journal.tmp", K_FILE },
  { "bitmaps.json.livemap", K_FILE },  /* the filter's live bitmaps (MAP_SHARED) */
  { "bitmaps.json.livemap.tmp", K_FILE },
};

/* bitmaps.NAME.GEN.bmap: a data file of the disk's bitmap store
 * (formats/bitmap_store.c names them B.NAME.GEN.bmap, B = "bitmaps"); and
 * bitmaps.json.lost-UNIXTIME: a lost descriptor `disk-repair` kept aside
 * (repair.c). */
static bool
is_bitmap_data (const char *n)
{
  const char *lost = "bitmaps.json.lost-";
  if (strncmp (n, lost, strlen (lost)) == 0) {
    const char *p = n + strlen (lost);
    if (*p == '\0')
      return false;
    for (; *p; p++)
      if (*p < '0' || *p > '9')
        return false;
    return true;
  }
  size_t len = strlen (n);
  const char *pre = "bitmaps.", *suf = ".bmap";
  if (len <= strlen (pre) + strlen (suf) || strncmp (n, pre, strlen (pre)) != 0 ||
      strcmp (n + len - strlen (suf), suf) != 0)
    return false;
  const char *end = n + len - strlen (suf), *p = end;
  while (p > n && p[-1] >= '0' && p[-1] <= '9')
    p--;
  return p < end && p[-1] == '.' && p - 1 > n + strlen (pre);
}

static bool
unlink_if (int dfd, const char *n, enum kind k)
{
  struct stat sb;
  if (fstatat (dfd, n, &sb, AT_SYMLINK_NOFOLLOW) < 0)
    return errno == ENOENT;
  if (k == K_SOCK ? !S_ISSOCK (sb.st_mode) : !S_ISREG (sb.st_mode))
    return false;               /* not what we made under that name */
  return unlinkat (dfd, n, 0) == 0 || errno == ENOENT;
}

/* Delete the own files of directory path, then the directory if it is
 * empty; every other entry goes to `left`.  own_chain: the chain file name
 * cbwd made there (overlays/), or NULL. */
static void
remove_own (const char *path, const char *own_chain, bool top, struct json_object *left)
{
  int dfd = open (path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (dfd < 0) {
    if (errno != ENOENT)
      json_object_array_add (left, json_object_new_string (path));
    return;
  }
  if (top)
    for (size_t i = 0; i < sizeof own_files / sizeof *own_files; i++)
      unlink_if (dfd, own_files[i].name, own_files[i].kind);
  else if (own_chain) {
    CLEANUP_FREE char *tmp = orch_strdup_printf ("%s.tmp", own_chain);
    unlink_if (dfd, own_chain, K_FILE);
    if (tmp)
      unlink_if (dfd, tmp, K_FILE);
  }
  int d2 = dup (dfd);
  DIR *dir = d2 >= 0 ? fdopendir (d2) : NULL;
  struct dirent *de;
  while (dir && (de = readdir (dir)) != NULL) {
    if (strcmp (de->d_name, ".") == 0 || strcmp (de->d_name, "..") == 0)
      continue;
    CLEANUP_FREE char *p = orch_strdup_printf ("%s/%s", path, de->d_name);
    if (p == NULL)
      continue;
    if (top && is_bitmap_data (de->d_name) && unlink_if (dfd, de->d_name, K_FILE))
      continue;
    if (top && own_chain && strcmp (de->d_name, "overlays") == 0) {
      remove_own (p, own_chain, false, left);
      continue;
    }
    json_object_array_add (left, json_object_new_string (p));
  }
  if (dir)
    closedir (dir);
  else if (d2 >= 0)
    close (d2);
  close (dfd);
  rmdir (path);                 /* fails, as it should, when something is left */
}

struct json_object *
orch_disk_remove_files (struct cbw_orch *o, struct orch_disk *d)
{
  struct json_object *left = json_object_new_array ();
  CLEANUP_FREE char *own = orch_chain_default_path (o->state_dir, d->name);
  const char *own_chain = NULL;
  if (d->chain && own && strcmp (d->chain, own) == 0)
    own_chain = strrchr (own, '/') + 1;
  if (left == NULL)
    return NULL;
  remove_own (d->dir, own_chain, true, left);
  return left;
}
