/* cbw — server/orch/tests/test_config_disks.c: cbw_orch_apply_disks(), the
 * config file's "disks" applied to an orchestrator (no nbdkit: the module
 * directory is empty, so a disk that really has to be added fails at its
 * nbdkit start, which is what we want to see named).
 *
 * Checked: unknown keys and ill-typed values are errors naming the disk and
 * the key (from disk-add's own argument spec); a disk already in the state
 * with the same settings is kept, with another image or granularity it is a
 * conflict naming the key and both values; duplicates; all-or-nothing (a
 * bad entry after a good new one adds nothing); the state file's bytes do
 * not change on any refusal.
 * Locking: the test injects disks into o->st under o->lock.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cleanup.h"
#include "fileutil.h"
#include "orch_internal.h"
#include "orch_test_util.h"

static char dir[64], img_a[128], img_b[128];
static struct cbw_orch *orch;

static void
touch (const char *p)
{
  FILE *f = fopen (p, "w");
  cr_assert_not_null (f);
  fclose (f);
}

static void
setup (void)
{
  struct cbw_err err = { 0 };
  orch_test_mkdtemp (dir, sizeof dir, "cfgdisks");
  snprintf (img_a, sizeof img_a, "%s/a.img", dir);
  snprintf (img_b, sizeof img_b, "%s/b.img", dir);
  touch (img_a);
  touch (img_b);
  orch = orch_test_open (dir);
  /* an existing disk "vda" on a.img, granularity 4096, as a previous run
   * would have left it (not running here) */
  struct orch_disk *d = orch_disk_new (orch->state_dir, "vda", img_a, 4096);
  cr_assert_not_null (d);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&orch->lock);
    orch->st.disks = realloc (orch->st.disks, sizeof *orch->st.disks);
    orch->st.disks[0] = d;
    orch->st.ndisks = 1;
  }
  cr_assert_eq (orch_state_save (orch, &err), 0, "%s", err.msg);
}

static void
teardown (void)
{
  cbw_orch_close (orch, false);
  orch_test_rm_rf (dir);
}

static char *
state_bytes (void)
{
  char p[128], *buf = NULL;
  size_t len;
  struct cbw_err err = { 0 };
  snprintf (p, sizeof p, "%s/%s", dir, ORCH_STATE_FILE);
  cr_assert_eq (cbw_read_file (p, 1 << 20, &buf, &len, &err), 0, "%s", err.msg);
  return buf;
}

/* Apply a config's disks (printf-style JSON); returns 0/-1, *err set. */
static int
apply (struct cbw_err *err, const char *fmt, ...)
{
  char json[2048];
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (json, sizeof json, fmt, ap);
  va_end (ap);
  struct json_object *disks = json_tokener_parse (json);
  cr_assert_not_null (disks, "bad test JSON %s", json);
  memset (err, 0, sizeof *err);
  int r = cbw_orch_apply_disks (orch, disks, "test.json", err);
  json_object_put (disks);
  return r;
}

static size_t
ndisks (void)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&orch->lock);
  return orch->st.ndisks;
}

/* Refused, the message holds every needle, nothing changed. */
#define REFUSED(needles, ...)                                                   \
  do {                                                                          \
    struct cbw_err err_;                                                        \
    char *before_ = state_bytes ();                                             \
    cr_assert_eq (apply (&err_, __VA_ARGS__), -1, "accepted");                  \
    for (const char *const *n_ = (needles); *n_; n_++)                          \
      cr_assert_not_null (strstr (err_.msg, *n_), "\"%s\" not in: %s", *n_,     \
                          err_.msg);                                            \
    char *after_ = state_bytes ();                                              \
    cr_assert_str_eq (before_, after_, "state changed by a refused config");    \
    cr_assert_eq (ndisks (), 1);                                                \
    free (before_);                                                             \
    free (after_);                                                              \
  } while (0)
#define NEEDLES(...) ((const char *const[]) { __VA_ARGS__, NULL })

TestSuite (cfg, .init = setup, .fini = teardown);

Test (cfg, same_settings_kept)
{
  struct cbw_err err;
  char *before = state_bytes ();
  cr_assert_eq (apply (&err, "[{\"name\":\"vda\",\"file\":\"%s\",\"granularity\":4096}]",
                       img_a), 0, "%s", err.msg);
  /* keys left out are not compared */
  cr_assert_eq (apply (&err, "[{\"name\":\"vda\",\"file\":\"%s\"}]", img_a), 0, "%s", err.msg);
  /* the same file through another path */
  cr_assert_eq (apply (&err, "[{\"name\":\"vda\",\"file\":\"%s/./a.img\"}]", dir), 0, "%s",
                err.msg);
  char *after = state_bytes ();
  cr_assert_str_eq (before, after);
  cr_assert_eq (ndisks (), 1);
  free (before);
  free (after);
  /* an empty or absent section is no change either */
  cr_assert_eq (apply (&err, "[]"), 0);
  cr_assert_eq (cbw_orch_apply_disks (orch, NULL, "x", &err), 0);
}

Test (cfg, conflicts_name_the_key)
{
  REFUSED (NEEDLES ("test.json", "disk \"vda\"", "key \"granularity\"", "65536", "4096"),
           "[{\"name\":\"vda\",\"file\":\"%s\",\"granularity\":65536}]", img_a);
  REFUSED (NEEDLES ("disk \"vda\"", "key \"file\"", img_b, img_a),
           "[{\"name\":\"vda\",\"file\":\"%s\"}]", img_b);
  /* a file that no longer exists is a conflict too (not "not found") */
  REFUSED (NEEDLES ("disk \"vda\"", "key \"file\"", "/nonexistent/x.img"),
           "[{\"name\":\"vda\",\"file\":\"/nonexistent/x.img\"}]");
}

Test (cfg, bad_entries)
{
  REFUSED (NEEDLES ("disk \"vdb\"", "unknown key \"granulrity\"", "allowed: name, file"),
           "[{\"name\":\"vdb\",\"file\":\"%s\",\"granulrity\":4096}]", img_b);
  REFUSED (NEEDLES ("disk \"vdb\"", "'granularity'", "expected uint"),
           "[{\"name\":\"vdb\",\"file\":\"%s\",\"granularity\":\"64k\"}]", img_b);
  REFUSED (NEEDLES ("disk \"vdb\"", "'granularity'"),
           "[{\"name\":\"vdb\",\"file\":\"%s\",\"granularity\":-1}]", img_b);
  REFUSED (NEEDLES ("disk \"vdb\"", "missing required argument 'file'"),
           "[{\"name\":\"vdb\"}]");
  REFUSED (NEEDLES ("disk \"?\"", "'name'"), "[{\"name\":7,\"file\":\"%s\"}]", img_b);
  REFUSED (NEEDLES ("disks[0] must be an object"), "[\"vdb\"]");
  REFUSED (NEEDLES ("\"disks\" must be an array"), "{\"name\":\"vdb\"}");
  REFUSED (NEEDLES ("disk \"vda\" defined twice"),
           "[{\"name\":\"vda\",\"file\":\"%s\"},{\"name\":\"vda\",\"file\":\"%s\"}]", img_a, img_a);
}

/* A new valid disk before a bad one: nothing is added. */
Test (cfg, all_or_nothing)
{
  REFUSED (NEEDLES ("disk \"vdc\"", "unknown key \"bogus\""),
           "[{\"name\":\"vdb\",\"file\":\"%s\"},{\"name\":\"vdc\",\"file\":\"%s\",\"bogus\":1}]",
           img_b, img_b);
  REFUSED (NEEDLES ("disk \"vda\"", "key \"granularity\""),
           "[{\"name\":\"vdb\",\"file\":\"%s\"},{\"name\":\"vda\",\"file\":\"%s\","
           "\"granularity\":512}]", img_b, img_a);
}

/* A new disk goes through disk-add itself: its checks and its failure. */
Test (cfg, new_disk_goes_through_disk_add)
{
  struct cbw_err err;
  /* disk-add's own semantic checks (not repeated here) */
  cr_assert_eq (apply (&err, "[{\"name\":\"-bad\",\"file\":\"%s\"}]", img_b), -1);
  cr_assert_not_null (strstr (err.msg, "disk \"-bad\": disk-add failed: InvalidParameter"),
                      "%s", err.msg);
  cr_assert_eq (apply (&err, "[{\"name\":\"vdb\",\"file\":\"%s\",\"granularity\":1000}]",
                       img_b), -1);
  cr_assert_not_null (strstr (err.msg, "power of two"), "%s", err.msg);
  cr_assert_eq (apply (&err, "[{\"name\":\"vdb\",\"file\":\"%s/nope.img\"}]", dir), -1);
  cr_assert_eq (err.errnum, ENOENT, "%s", err.msg);
  cr_assert_eq (apply (&err, "[{\"name\":\"vdb\",\"file\":\"%s\"}]", img_a), -1);
  cr_assert_not_null (strstr (err.msg, "already served as disk vda"), "%s", err.msg);
  /* valid: disk-add runs and fails at the nbdkit start (no modules here) */
  cr_assert_eq (apply (&err, "[{\"name\":\"vdb\",\"file\":\"%s\"}]", img_b), -1);
  cr_assert_not_null (strstr (err.msg, "disk \"vdb\": disk-add failed"), "%s", err.msg);
  cr_assert_eq (ndisks (), 1);
}
