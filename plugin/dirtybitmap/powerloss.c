/* cbw — plugin/dirtybitmap/powerloss.c: power-loss simulation test hook (see
 * powerloss.h).  Off unless CBW_TEST_POWERLOSS_DIR is set.
 *
 * The hook copies every regular file of the store directory, so a test that
 * uses it gives the descriptor a directory of its own (not the image's).
 *
 * Locking: none; the journal writer protocol and the checkpoint lock of the
 * tracker serialise all callers.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cleanup.h"
#include "fileutil.h"
#include "powerloss.h"

#define MAX_MIRRORED_FILE (1ULL << 30)

static uint64_t store_gen;

const char *
dbm_powerloss_dir (void)
{
  const char *d = getenv ("CBW_TEST_POWERLOSS_DIR");
  return d && *d ? d : NULL;
}

static int
copy_file (const char *src, const char *dst, struct cbw_err *err)
{
  CLEANUP_FREE char *buf = NULL;
  size_t len;

  if (cbw_read_file (src, MAX_MIRRORED_FILE, &buf, &len, err) < 0)
    return -1;
  return cbw_write_file_atomic (dst, buf, len, err);
}

int
dbm_powerloss_journal_synced (const char *journal_path, struct cbw_err *err)
{
  const char *dir = dbm_powerloss_dir ();
  CLEANUP_FREE char *dst = NULL;

  if (dir == NULL)
    return 0;
  if (asprintf (&dst, "%s/journal", dir) < 0) {
    dst = NULL;
    return cbw_err_set (err, ENOMEM, "powerloss hook: out of memory");
  }
  if (copy_file (journal_path, dst, err) < 0)
    return cbw_err_prefix (err, "powerloss hook");
  return 0;
}

static void
remove_tree (const char *path)
{
  DIR *d = opendir (path);
  struct dirent *e;
  char p[4096];

  if (d == NULL)
    return;
  while ((e = readdir (d)) != NULL) {
    if (strcmp (e->d_name, ".") == 0 || strcmp (e->d_name, "..") == 0)
      continue;
    if (snprintf (p, sizeof p, "%s/%s", path, e->d_name) < (int) sizeof p)
      unlink (p);
  }
  closedir (d);
  rmdir (path);
}

static bool skip_name (const char *name, const char *journal_base);

int
dbm_powerloss_store_saved (const char *store_dir, const char *journal_path,
                           struct cbw_err *err)
{
  const char *dir = dbm_powerloss_dir ();
  CLEANUP_FREE char *jcopy = NULL;
  char newdir[4096], src[4096], dst[4096], link_tmp[4096], link_cur[4096];
  char target[64], old[4096];
  const char *jbase;
  struct dirent *e;
  DIR *d;
  ssize_t n;

  if (dir == NULL)
    return 0;
  jcopy = strdup (journal_path ? journal_path : "");
  if (jcopy == NULL)
    return cbw_err_set (err, ENOMEM, "powerloss hook: out of memory");
  jbase = basename (jcopy);

  /* Pick a generation not used yet (also after a restart of nbdkit). */
  do {
    snprintf (target, sizeof target, "store.%" PRIu64 ".%ld", ++store_gen, (long) getpid ());
    if (snprintf (newdir, sizeof newdir, "%s/%s", dir, target) >= (int) sizeof newdir)
      return cbw_err_set (err, ENAMETOOLONG, "powerloss hook: %s: name too long", dir);
  } while (access (newdir, F_OK) == 0);
  if (mkdir (newdir, 0755) < 0)
    return cbw_err_set (err, errno, "powerloss hook: mkdir %s: %s", newdir, strerror (errno));

  d = opendir (store_dir);
  if (d == NULL)
    return cbw_err_set (err, errno, "powerloss hook: opendir %s: %s", store_dir, strerror (errno));
  while ((e = readdir (d)) != NULL) {
    struct stat sb;
    if (skip_name (e->d_name, jbase))
      continue;
    if (snprintf (src, sizeof src, "%s/%s", store_dir, e->d_name) >= (int) sizeof src ||
        snprintf (dst, sizeof dst, "%s/%s", newdir, e->d_name) >= (int) sizeof dst) {
      closedir (d);
      return cbw_err_set (err, ENAMETOOLONG, "powerloss hook: %s: name too long", e->d_name);
    }
    if (stat (src, &sb) < 0 || !S_ISREG (sb.st_mode))
      continue;
    if (copy_file (src, dst, err) < 0) {
      closedir (d);
      return cbw_err_prefix (err, "powerloss hook");
    }
  }
  closedir (d);

  /* Atomically point store.cur at the new copy, then drop the old one. */
  if (snprintf (link_cur, sizeof link_cur, "%s/store.cur", dir) >= (int) sizeof link_cur ||
      snprintf (link_tmp, sizeof link_tmp, "%s/store.cur.tmp", dir) >= (int) sizeof link_tmp)
    return cbw_err_set (err, ENAMETOOLONG, "powerloss hook: %s: name too long", dir);
  n = readlink (link_cur, old, sizeof old - 1);
  old[n > 0 ? n : 0] = '\0';
  unlink (link_tmp);
  if (symlink (target, link_tmp) < 0 || rename (link_tmp, link_cur) < 0)
    return cbw_err_set (err, errno, "powerloss hook: %s: %s", link_cur, strerror (errno));
  if (cbw_fsync_dir_of (link_cur, err) < 0)
    return -1;
  if (n > 0 && strchr (old, '/') == NULL &&
      snprintf (src, sizeof src, "%s/%s", dir, old) < (int) sizeof src)
    remove_tree (src);
  return 0;
}

/* Files of the store directory that are not part of its durable state. */
static bool
skip_name (const char *name, const char *journal_base)
{
  size_t len = strlen (name);

  if (name[0] == '.')
    return true;
  if (strcmp (name, journal_base) == 0)
    return true;                  /* mirrored separately, at its own syncs */
  if (len >= 4 && strcmp (name + len - 4, ".tmp") == 0)
    return true;
  if (strstr (name, ".tmp-") != NULL)
    return true;                  /* cbw_write_file_atomic's temp files */
  if (len >= 5 && strcmp (name + len - 5, ".lock") == 0)
    return true;
  /* the live-bitmap map is never synced: after a real power cut it is gone
   * or from another boot, which the test hook CBW_TEST_BOOT_ID simulates */
  if (len >= 8 && strcmp (name + len - 8, ".livemap") == 0)
    return true;
  return false;
}
