/* cbw — plugin/chain/tests/test_layer_files.c: the files of new layers never
 * clobber anything.  Two chains in one directory whose file names share a
 * stem (vm.chain.json and vm.chain) take snapshots in turn and both keep
 * every write; a file already at the name a new layer takes (planted through
 * the "new-layer" test hook) makes the snapshot fail naming it, untouched,
 * with the chain unchanged; a new chain is never created over an existing
 * descriptor; chains with old-style layer names keep working; a snapshot
 * failing after its commit point keeps the files the chain now names.
 * Single-threaded; no locking. */
#include <sys/stat.h>

#include "chain_test_util.h"

#define SIZE (2 * 1024 * 1024 + 4096)
#define CS 65536

static char dir[256];

static void setup (void) { tu_mkdtemp (dir, sizeof dir); }
static void teardown (void) { tu_rmrf (dir); }
TestSuite (layer_files, .init = setup, .fini = teardown);

static char *
P (const char *name)
{
  static char buf[4][512];
  static int i;
  i = (i + 1) % 4;
  snprintf (buf[i], sizeof buf[i], "%s/%s", dir, name);
  return buf[i];
}

/* A raw base NAME with random content (kept in *model) and a chain over it. */
static struct ovc *
mk (const char *base, const char *chain, uint64_t seed, unsigned char **model)
{
  struct cbw_err err;
  *model = malloc (SIZE);
  cr_assert_not_null (*model);
  tu_fill (*model, SIZE, seed);
  int fd = open (P (base), O_RDWR | O_CREAT | O_EXCL, 0644);
  cr_assert_geq (fd, 0);
  cr_assert_eq (cbw_pwrite_full (fd, *model, SIZE, 0), 0);
  close (fd);
  cr_assert_eq (ovc_create (P (chain), base, CS, &err), 0, "%s", err.msg);
  struct ovc *c = ovc_open (P (chain), NULL, NULL, &err);
  cr_assert_not_null (c, "%s", err.msg);
  return c;
}

/* Write a pattern at off (acknowledged with FUA) in c and in its model. */
static void
put (struct ovc *c, unsigned char *model, uint64_t off, uint32_t len, uint64_t seed)
{
  struct cbw_err err;
  unsigned char *buf = malloc (len);
  tu_fill (buf, len, seed);
  cr_assert_eq (ovc_pwrite (c, buf, len, off, true, &err), 0, "%s", err.msg);
  memcpy (model + off, buf, len);
  free (buf);
}

static void
check (struct ovc *c, const unsigned char *model, const char *what)
{
  uint64_t d = tu_diff (c, model, SIZE);
  cr_assert_eq (d, UINT64_MAX, "%s: differs from the model at %lu", what,
                (unsigned long) d);
}

static char *
snap (struct ovc *c)
{
  struct cbw_err err;
  char *name = NULL;
  cr_assert_eq (ovc_snapshot (c, NULL, &name, &err), 0, "snapshot: %s", err.msg);
  return name;
}

/* vm.chain.json and vm.chain have the same stem: the old names (stem +
 * generation) of their new layers were the same, and the second snapshot
 * truncated the other disk's live overlay. */
Test (layer_files, chains_with_the_same_stem)
{
  unsigned char *ma, *mb;
  struct cbw_err err;
  struct ovc *a = mk ("a.img", "vm.chain.json", 1, &ma);
  struct ovc *b = mk ("b.img", "vm.chain", 2, &mb);
  char *names[6];
  for (int round = 0; round < 3; round++) {
    names[2 * round] = snap (a);
    put (a, ma, (uint64_t) round * 3 * CS + 100, 2 * CS, 10 + (uint64_t) round);
    names[2 * round + 1] = snap (b);
    put (b, mb, (uint64_t) round * 3 * CS + 5000, CS + 77, 20 + (uint64_t) round);
    put (a, ma, SIZE - 3000, 3000, 30 + (uint64_t) round);
    check (a, ma, "disk a after b's snapshot");
    check (b, mb, "disk b");
  }
  for (int i = 0; i < 6; i++)
    for (int j = 0; j < i; j++)
      cr_assert_str_neq (names[i], names[j], "two layers named %s", names[i]);
  for (int i = 0; i < 6; i++) {
    cr_assert (strncmp (names[i], "vm.chain.ov-", 12) == 0 &&
               strlen (names[i]) == 12 + 32 + 5, "layer name %s", names[i]);
    free (names[i]);
  }
  ovc_close (a);
  ovc_close (b);
  a = ovc_open (P ("vm.chain.json"), NULL, NULL, &err);
  cr_assert_not_null (a, "reopen a: %s", err.msg);
  b = ovc_open (P ("vm.chain"), NULL, NULL, &err);
  cr_assert_not_null (b, "reopen b: %s", err.msg);
  cr_assert_eq (ovc_nlayers (a), 3);
  cr_assert_eq (ovc_nlayers (b), 3);
  check (a, ma, "disk a reopened");
  check (b, mb, "disk b reopened");
  ovc_close (a);
  ovc_close (b);
  free (ma);
  free (mb);
}

/* The "new-layer" hook plants a file at one of the new layer's names. */
static const char *plant_suffix;
static char planted[600];
static int plant_calls;
static int
plant_hook (const char *point, const char *path, void *opaque)
{
  (void) opaque;
  if (path == NULL || strcmp (point, "new-layer") != 0)
    return 0;
  plant_calls++;
  snprintf (planted, sizeof planted, "%s%s", path, plant_suffix);
  FILE *f = fopen (planted, "w");
  cr_assert_not_null (f);
  fputs ("another chain's file\n", f);
  fclose (f);
  return 0;
}

static void
check_planted (void)
{
  char *buf;
  size_t len;
  struct cbw_err err;
  cr_assert_eq (cbw_read_file (planted, 4096, &buf, &len, &err), 0, "%s", err.msg);
  cr_assert (len == 21 && memcmp (buf, "another chain's file\n", len) == 0,
             "%s was changed (%zu bytes)", planted, len);
  free (buf);
}

Test (layer_files, taken_name_fails_snapshot_untouched)
{
  static const char *suffix[] = { ".data", ".map", "" };
  unsigned char *m;
  struct cbw_err err;
  struct ovc *c = mk ("a.img", "disk.chain", 3, &m);
  free (snap (c));
  put (c, m, 7 * CS, 3 * CS, 40);
  for (int k = 0; k < 3; k++) {
    plant_suffix = suffix[k];
    plant_calls = 0;
    ovc_set_test_hook (plant_hook, NULL);
    char *name = NULL;
    int r = ovc_snapshot (c, NULL, &name, &err);
    ovc_set_test_hook (NULL, NULL);
    cr_assert_eq (plant_calls, 1, "the new-layer hook ran %d times", plant_calls);
    cr_assert_eq (r, -1, "snapshot succeeded over an existing %s", planted);
    cr_assert_eq (err.errnum, EEXIST, "%s", err.msg);
    cr_assert (strstr (err.msg, planted) && strstr (err.msg, "already exists"),
               "%s", err.msg);
    check_planted ();
    /* the files this snapshot created are gone, the planted one stays */
    size_t pl = strlen (planted) - strlen (suffix[k]);
    for (int j = 0; j < 3; j++) {
      char p[620];
      snprintf (p, sizeof p, "%.*s%s", (int) pl, planted, suffix[j]);
      cr_assert_eq (access (p, F_OK) == 0, j == k, "%s %s", p,
                    j == k ? "removed" : "left behind");
    }
    cr_assert_eq (ovc_nlayers (c), 1);
    put (c, m, (uint64_t) k * CS, 100, 50 + (uint64_t) k);
    check (c, m, "after the refused snapshot");
  }
  free (snap (c));      /* the next name is free again */
  put (c, m, 0, CS, 60);
  ovc_close (c);
  c = ovc_open (P ("disk.chain"), NULL, NULL, &err);
  cr_assert_not_null (c, "%s", err.msg);
  cr_assert_eq (ovc_nlayers (c), 2);
  check (c, m, "reopened");
  ovc_close (c);
  free (m);
}

/* ovc_create over anything already at the descriptor's path fails and
 * leaves it (an existing chain, or a dangling symlink). */
Test (layer_files, create_never_replaces_a_descriptor)
{
  unsigned char *m;
  struct cbw_err err;
  struct ovc *c = mk ("a.img", "disk.chain", 4, &m);
  free (snap (c));
  put (c, m, 0, 2 * CS, 70);
  ovc_close (c);
  cr_assert_eq (ovc_create (P ("disk.chain"), "a.img", CS, &err), -1);
  cr_assert_eq (err.errnum, EEXIST, "%s", err.msg);
  cr_assert (strstr (err.msg, P ("disk.chain")) != NULL, "%s", err.msg);
  c = ovc_open (P ("disk.chain"), NULL, NULL, &err);
  cr_assert_not_null (c, "%s", err.msg);
  cr_assert_eq (ovc_nlayers (c), 1);
  check (c, m, "after the refused create");
  ovc_close (c);
  cr_assert_eq (symlink (P ("elsewhere.chain"), P ("link.chain")), 0);
  cr_assert_eq (ovc_create (P ("link.chain"), "a.img", CS, &err), -1);
  cr_assert_eq (err.errnum, EEXIST, "%s", err.msg);
  cr_assert_eq (access (P ("elsewhere.chain"), F_OK), -1, "created through a symlink");
  free (m);
}

/* A chain written by an older version, whose layers have the old names
 * (STEM.ovGEN.json), opens, takes writes and new snapshots (new-style
 * names beside the old ones) and reopens: readers take every name from the
 * descriptors. */
Test (layer_files, old_style_names_keep_working)
{
  unsigned char *m;
  struct cbw_err err;
  struct ovc *c = mk ("a.img", "vm.chain", 5, &m);
  ovc_close (c);
  struct cbw_chain_desc d;
  cr_assert_eq (cbw_chain_desc_load (P ("vm.chain"), &d, &err), 0, "%s", err.msg);
  cr_assert_eq (cbw_ovl_create (dir, "vm.chain.ov2.json", "a.img", "old", SIZE, CS, &err),
                0, "%s", err.msg);
  char *layers[] = { "vm.chain.ov2.json" };
  char **keep = d.layers;
  d.layers = layers;
  d.nlayers = 1;
  cr_assert_eq (cbw_chain_desc_save (P ("vm.chain"), &d, &err), 0, "%s", err.msg);
  d.layers = keep;
  d.nlayers = 0;
  cbw_chain_desc_free (&d);
  c = ovc_open (P ("vm.chain"), NULL, NULL, &err);
  cr_assert_not_null (c, "%s", err.msg);
  cr_assert_eq (ovc_nlayers (c), 1);
  put (c, m, 3 * CS, 2 * CS, 80);
  char *name = snap (c);
  cr_assert (strncmp (name, "vm.chain.ov-", 12) == 0, "%s", name);
  free (name);
  put (c, m, 4 * CS, CS + 10, 81);
  ovc_close (c);
  c = ovc_open (P ("vm.chain"), NULL, NULL, &err);
  cr_assert_not_null (c, "%s", err.msg);
  cr_assert_eq (ovc_nlayers (c), 2);
  check (c, m, "old-style chain after a new snapshot, reopened");
  cr_assert_eq (ovc_commit_start (c, 1, 2, CBW_COMMIT_DELETE, 0, &err), 0, "%s", err.msg);
  cr_assert_eq (ovc_commit_wait (c, &err), 0, "%s", err.msg);
  cr_assert_eq (ovc_nlayers (c), 0);
  check (c, m, "after committing both");
  ovc_close (c);
  free (m);
}

/* A snapshot that fails after the chain descriptor naming its new layer
 * reached the disk (injected at "snapshot-saved", as a failed directory
 * fsync after the rename would) keeps the new layer's files: the chain on
 * disk needs them.  The disk keeps every write, also across a reopen. */
static int
saved_hook (const char *point, const char *path, void *opaque)
{
  (void) opaque;
  return path == NULL && strcmp (point, "snapshot-saved") == 0;
}

Test (layer_files, failure_after_commit_point_keeps_files)
{
  unsigned char *m;
  struct cbw_err err;
  struct ovc *c = mk ("a.img", "disk.chain", 6, &m);
  free (snap (c));
  put (c, m, 2 * CS, CS, 90);
  ovc_set_test_hook (saved_hook, NULL);
  int r = ovc_snapshot (c, NULL, NULL, &err);
  ovc_set_test_hook (NULL, NULL);
  cr_assert_eq (r, -1, "the injected failure did not fail the snapshot");
  cr_assert (strstr (err.msg, "injected") != NULL, "%s", err.msg);
  put (c, m, 2 * CS + 100, 300, 91);      /* into the old top, still in use */
  check (c, m, "after the failed snapshot");
  ovc_close (c);
  c = ovc_open (P ("disk.chain"), NULL, NULL, &err);
  cr_assert_not_null (c, "reopen after a failure past the commit point: %s", err.msg);
  cr_assert_eq (ovc_nlayers (c), 2);
  check (c, m, "reopened");
  put (c, m, 0, 5000, 92);
  check (c, m, "written after the reopen");
  ovc_close (c);
  free (m);
}
