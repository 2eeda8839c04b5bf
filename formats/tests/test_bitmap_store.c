/* cbw — formats/tests/test_bitmap_store.c: the persistent bitmap store.
 *
 * Bad-input tests: one test per kind of corrupt or wrong input; each checks
 * the errno, that the message names the file and the problem, and that no
 * file in the store's directory changed (names, sizes, mtimes and contents;
 * the lock file, which open creates, excepted).  Descriptor edits recompute
 * the trailer checksum with this file's own implementation of the spec
 * (docs/formats/bitmaps.md), so semantic checks are reached.
 *
 * Crash tests: a forked child saves with CBW_BITMAP_STORE_CRASH_AFTER set
 * to each step and dies there; the parent reopens and must see exactly the
 * old or exactly the new state (whichever the step implies), compared with
 * a model kept in the test.
 *
 * Round trips: many bitmaps, granularities, states; add/remove/save/reopen,
 * data files checked byte by byte against the spec; a 16 TiB image.
 * Each test runs in its own scratch directory, removed at the end.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include "bitmap_store.h"

static char dir[256];
static char desc[512];

static void
setup (void)
{
  snprintf (dir, sizeof dir, "%s/cbw-bmstore.XXXXXX", getenv ("TMPDIR") ? getenv ("TMPDIR") : "/tmp");
  cr_assert_not_null (mkdtemp (dir));
  snprintf (desc, sizeof desc, "%s/disk.img.cbw-bitmaps.json", dir);
}

/* Remove a scratch directory and the files (or empty directories) in it. */
static void
remove_dir (const char *path)
{
  DIR *d = opendir (path);
  struct dirent *e;
  char p[1024];

  if (d == NULL) return;
  while ((e = readdir (d)) != NULL) {
    if (strcmp (e->d_name, ".") == 0 || strcmp (e->d_name, "..") == 0) continue;
    snprintf (p, sizeof p, "%s/%s", path, e->d_name);
    if (unlink (p) < 0)
      rmdir (p);
  }
  closedir (d);
  rmdir (path);
}

static void
teardown (void)
{
  char replay[300];

  snprintf (replay, sizeof replay, "%s.replay", dir);   /* see run_crash */
  remove_dir (replay);
  remove_dir (dir);
}

TestSuite (store, .init = setup, .fini = teardown);

/* ---- helpers ---- */

static uint64_t rs;
static uint64_t
rnd (void)
{
  rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17;
  return rs;
}

static char *
slurp (const char *path, size_t *len)
{
  FILE *f = fopen (path, "rb");
  char *buf;
  long n;

  cr_assert_not_null (f, "open %s", path);
  fseek (f, 0, SEEK_END);
  n = ftell (f);
  fseek (f, 0, SEEK_SET);
  buf = malloc ((size_t) n + 1);
  cr_assert_eq (fread (buf, 1, (size_t) n, f), (size_t) n);
  buf[n] = '\0';
  fclose (f);
  if (len) *len = (size_t) n;
  return buf;
}

static void
spit (const char *path, const void *buf, size_t len)
{
  FILE *f = fopen (path, "wb");
  cr_assert_not_null (f);
  cr_assert_eq (fwrite (buf, 1, len, f), len);
  fclose (f);
}

/* Spec: the file ends with a 40-byte trailer
 * '  "checksum": "xxh3:<16 hex>"\n}\n' and the checksum is XXH3-64 of all
 * bytes before it. */
#define TRAILER_LEN 40
static void
fix_descriptor_checksum (const char *path)
{
  size_t len;
  char *buf = slurp (path, &len), tr[TRAILER_LEN + 1];

  cr_assert_geq (len, TRAILER_LEN);
  snprintf (tr, sizeof tr, "  \"checksum\": \"xxh3:%016" PRIx64 "\"\n}\n",
            (uint64_t) XXH3_64bits (buf, len - TRAILER_LEN));
  memcpy (buf + len - TRAILER_LEN, tr, TRAILER_LEN);
  spit (path, buf, len);
  free (buf);
}

/* Replace the first occurrence of from with to; optionally re-checksum. */
static void
edit_file (const char *path, const char *from, const char *to, bool fix)
{
  size_t len;
  char *buf = slurp (path, &len), *p = strstr (buf, from), *out;

  cr_assert_not_null (p, "'%s' not in %s", from, path);
  out = malloc (len + strlen (to) + 1);
  memcpy (out, buf, (size_t) (p - buf));
  strcpy (out + (p - buf), to);
  strcat (out, p + strlen (from));
  spit (path, out, strlen (out));
  free (buf);
  free (out);
  if (fix)
    fix_descriptor_checksum (path);
}

/* Directory snapshot: every file but the lock file. */
struct snap {
  size_t n;
  char names[64][300];
  off_t size[64];
  struct timespec mtime[64];
  uint64_t hash[64];
};

static void
take_snap (struct snap *s)
{
  DIR *d = opendir (dir);
  struct dirent *e;

  memset (s, 0, sizeof *s);
  while ((e = readdir (d)) != NULL) {
    char p[1024];
    struct stat sb;
    size_t len;
    if (e->d_name[0] == '.' || strstr (e->d_name, ".lock")) continue;
    snprintf (p, sizeof p, "%s/%s", dir, e->d_name);
    cr_assert_eq (stat (p, &sb), 0);
    if (!S_ISREG (sb.st_mode)) continue;
    char *buf = slurp (p, &len);
    cr_assert_lt (s->n, 64);
    snprintf (s->names[s->n], sizeof s->names[0], "%s", e->d_name);
    s->size[s->n] = sb.st_size;
    s->mtime[s->n] = sb.st_mtim;
    s->hash[s->n] = XXH3_64bits (buf, len);
    free (buf);
    s->n++;
  }
  closedir (d);
}

static void
assert_same_snap (const struct snap *a, const struct snap *b)
{
  cr_assert_eq (a->n, b->n, "number of files changed (%zu -> %zu)", a->n, b->n);
  for (size_t i = 0; i < a->n; i++) {
    size_t j;
    for (j = 0; j < b->n; j++)
      if (strcmp (a->names[i], b->names[j]) == 0) break;
    cr_assert_lt (j, b->n, "file %s disappeared", a->names[i]);
    cr_assert_eq (a->size[i], b->size[j], "%s: size changed", a->names[i]);
    cr_assert_eq (a->hash[i], b->hash[j], "%s: contents changed", a->names[i]);
    cr_assert (a->mtime[i].tv_sec == b->mtime[j].tv_sec
               && a->mtime[i].tv_nsec == b->mtime[j].tv_nsec, "%s: mtime changed", a->names[i]);
  }
}

/* Open must fail with errnum; the message must contain every given
 * fragment (NULL-terminated list); the directory must be unchanged. */
static void
expect_open_fail (uint64_t size, int errnum, const char *frag, ...)
{
  struct snap before, after;
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st;
  va_list ap;

  take_snap (&before);
  st = cbw_bitmap_store_open (desc, size, &err);
  cr_assert_null (st, "open unexpectedly succeeded");
  cr_assert_eq (err.errnum, errnum, "errnum %d (%s), expected %d; msg: %s",
                err.errnum, strerror (err.errnum), errnum, err.msg);
  va_start (ap, frag);
  for (const char *f = frag; f; f = va_arg (ap, const char *))
    cr_assert_not_null (strstr (err.msg, f), "message '%s' lacks '%s'", err.msg, f);
  va_end (ap);
  take_snap (&after);
  assert_same_snap (&before, &after);
}

#define GIB (1ULL << 30)
#define IMG (1 * GIB + 12345)     /* not a multiple of any granularity */

/* A store with bitmaps "a" (64 KiB) and "b" (4 KiB), some bits set, saved. */
static void
make_store (void)
{
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st = cbw_bitmap_store_open (desc, IMG, &err);
  struct cbw_stored_bitmap *a, *b;

  cr_assert_not_null (st, "%s", err.msg);
  a = cbw_bitmap_store_add (st, "a", 65536, true, &err);
  cr_assert_not_null (a, "%s", err.msg);
  b = cbw_bitmap_store_add (st, "b", 4096, false, &err);
  cr_assert_not_null (b, "%s", err.msg);
  cbw_bitmap_set_range (&a->bits, 10, 1000);
  cbw_bitmap_set_range (&b->bits, b->bits.nbits - 3, 3);
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  cbw_bitmap_store_close (st);
}

static char *
data_path (const char *name, uint64_t gen)
{
  char *p;
  cr_assert_geq (asprintf (&p, "%s/disk.img.cbw-bitmaps.%s.%" PRIu64 ".bmap", dir, name, gen), 0);
  return p;
}

/* ---- bad input ---- */

Test (store, malformed_json)
{
  spit (desc, "{ \"format\": \"cbw-bitmaps\", \"version\": 1,", 41);
  expect_open_fail (IMG, EIO, desc, "malformed JSON", NULL);
  spit (desc, "[1,2] x", 7);
  expect_open_fail (IMG, EIO, desc, "malformed JSON", NULL);
  spit (desc, "", 0);
  expect_open_fail (IMG, EIO, desc, "malformed JSON", NULL);
  spit (desc, "{\"a\":1}\0", 8);
  expect_open_fail (IMG, EIO, desc, "NUL", NULL);
  unlink (desc);
  make_store ();
  edit_file (desc, "\"bitmaps\": [", "\"bitmaps\": [[", false);
  expect_open_fail (IMG, EIO, desc, "malformed JSON", NULL);
  spit (desc, "[]", 2);
  expect_open_fail (IMG, EIO, desc, "expected an object", NULL);
}

Test (store, unknown_version)
{
  make_store ();
  edit_file (desc, "\"version\": 1,", "\"version\": 2,", true);
  expect_open_fail (IMG, ENOTSUP, desc, "unsupported version 2", NULL);
  /* even without a valid checksum, the version is what is reported */
  edit_file (desc, "\"version\": 2,", "\"version\": 7,", false);
  expect_open_fail (IMG, ENOTSUP, desc, "unsupported version 7", NULL);
  edit_file (desc, "\"version\": 7,", "\"version\": \"1\",", true);
  expect_open_fail (IMG, EIO, desc, "version", NULL);
}

Test (store, wrong_format)
{
  make_store ();
  edit_file (desc, "\"format\": \"cbw-bitmaps\"", "\"format\": \"qcow2\"", true);
  expect_open_fail (IMG, EINVAL, desc, "wrong format \"qcow2\"", NULL);
  edit_file (desc, "\"format\": \"qcow2\"", "\"format\": 3", true);
  expect_open_fail (IMG, EINVAL, desc, "wrong format", NULL);
  edit_file (desc, "\"format\": 3,", "", true);
  expect_open_fail (IMG, EINVAL, desc, "wrong format \"(missing)\"", NULL);
}

Test (store, bad_descriptor_checksum)
{
  make_store ();
  edit_file (desc, "\"enabled\": true", "\"enabled\": fals", false);
  edit_file (desc, "\"enabled\": fals", "\"enabled\": false", false);
  expect_open_fail (IMG, EIO, desc, "bad descriptor checksum", NULL);
  /* a trailer that is not ours */
  teardown ();
  setup ();
  make_store ();
  edit_file (desc, "\n  \"checksum\": \"xxh3:", "\n \"checksum\": \"xxh3:", false);
  expect_open_fail (IMG, EIO, desc, "checksum trailer", NULL);
}

Test (store, bad_data_checksum)
{
  char *p;
  int fd;
  unsigned char c;

  make_store ();
  p = data_path ("a", 1);
  fd = open (p, O_RDWR);
  cr_assert_geq (fd, 0);
  cr_assert_eq (pread (fd, &c, 1, 4096 + 5), 1);
  c ^= 0x40;
  cr_assert_eq (pwrite (fd, &c, 1, 4096 + 5), 1);
  close (fd);
  expect_open_fail (IMG, EIO, p, "bad data checksum", "'a'", NULL);
  free (p);
}

Test (store, bad_data_header)
{
  char *p;
  int fd;
  unsigned char c;

  make_store ();
  p = data_path ("b", 1);
  fd = open (p, O_RDWR);
  cr_assert_eq (pread (fd, &c, 1, 20), 1);     /* inside granularity */
  c ^= 1;
  cr_assert_eq (pwrite (fd, &c, 1, 20), 1);
  close (fd);
  expect_open_fail (IMG, EIO, p, "bad header checksum", NULL);
  fd = open (p, O_RDWR);
  cr_assert_eq (pwrite (fd, "X", 1, 0), 1);
  close (fd);
  expect_open_fail (IMG, EIO, p, "bad magic", NULL);
  free (p);
}

Test (store, data_file_from_other_generation)
{
  /* Descriptor says generation 1 but the referenced file is generation 2's:
   * the header's generation must match the descriptor. */
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st;

  make_store ();
  st = cbw_bitmap_store_open (desc, IMG, &err);
  cr_assert_not_null (st, "%s", err.msg);
  /* a changed bitmap is rewritten (an unchanged one keeps its file) */
  cbw_bitmap_set_range (&cbw_bitmap_store_find (st, "a")->bits, 0, 1);
  cbw_bitmap_set_range (&cbw_bitmap_store_find (st, "a")->bits, 5, 3);
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  cbw_bitmap_store_close (st);
  edit_file (desc, "\"generation\": 2,\n      \"data_file\": \"disk.img.cbw-bitmaps.a.2",
             "\"generation\": 1,\n      \"data_file\": \"disk.img.cbw-bitmaps.a.2", true);
  expect_open_fail (IMG, EIO, "disk.img.cbw-bitmaps.a.2.bmap", "does not match",
                    "generation 2/1", NULL);
}

/* A save writes only the bitmaps whose bits changed since their file was
 * written: the others keep their file (same name, same inode) and their
 * generation; flags-only changes rewrite the descriptor alone. */
Test (store, save_writes_only_changed)
{
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st;
  struct stat a1, b1, a2, b2;
  char *pa1, *pb1, *pa2, *pb3;

  make_store ();                                  /* a.1, b.1 */
  pa1 = data_path ("a", 1); pb1 = data_path ("b", 1);
  cr_assert_eq (stat (pa1, &a1), 0);
  cr_assert_eq (stat (pb1, &b1), 0);
  st = cbw_bitmap_store_open (desc, IMG, &err);
  cr_assert_not_null (st, "%s", err.msg);
  cbw_bitmap_store_find (st, "b")->enabled = true;  /* flags only */
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  cr_assert_eq (st->generation, 2);
  cr_assert_eq (cbw_bitmap_store_find (st, "a")->generation, 1);
  cr_assert_eq (cbw_bitmap_store_find (st, "b")->generation, 1);
  cbw_bitmap_clear_range (&cbw_bitmap_store_find (st, "a")->bits, 10, 1);  /* bits */
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  cr_assert_eq (cbw_bitmap_store_find (st, "a")->generation, 3);
  cr_assert_eq (cbw_bitmap_store_find (st, "b")->generation, 1);
  cbw_bitmap_store_close (st);

  pa2 = data_path ("a", 3); pb3 = data_path ("b", 3);
  cr_assert_eq (stat (pa2, &a2), 0, "the changed bitmap was not rewritten");
  cr_assert_neq (stat (pa1, &a2), 0, "the old file of the changed bitmap was kept");
  cr_assert_eq (stat (pb1, &b2), 0, "the unchanged bitmap lost its file");
  cr_assert_eq (b1.st_ino, b2.st_ino, "the unchanged bitmap was rewritten");
  cr_assert_eq (b1.st_mtim.tv_nsec, b2.st_mtim.tv_nsec);
  cr_assert_neq (stat (pb3, &b2), 0, "an unchanged bitmap got a new file");
  /* reopen: both bitmaps, with the new flag and the new bits */
  st = cbw_bitmap_store_open (desc, IMG, &err);
  cr_assert_not_null (st, "%s", err.msg);
  cr_assert (cbw_bitmap_store_find (st, "b")->enabled);
  cr_assert (!cbw_bitmap_test (&cbw_bitmap_store_find (st, "a")->bits, 10));
  cr_assert (cbw_bitmap_test (&cbw_bitmap_store_find (st, "a")->bits, 11));
  cr_assert (cbw_bitmap_test (&cbw_bitmap_store_find (st, "b")->bits,
                              cbw_bitmap_store_find (st, "b")->bits.nbits - 1));
  cbw_bitmap_store_close (st);
  free (pa1); free (pb1); free (pa2); free (pb3);
}

Test (store, truncated_data_file)
{
  char *p;
  struct stat sb;

  make_store ();
  p = data_path ("a", 1);
  cr_assert_eq (stat (p, &sb), 0);
  cr_assert_eq (truncate (p, sb.st_size - 1), 0);
  expect_open_fail (IMG, EIO, p, "truncated", NULL);
  cr_assert_eq (truncate (p, 100), 0);
  expect_open_fail (IMG, EIO, p, "truncated", NULL);
  cr_assert_eq (truncate (p, sb.st_size + 1), 0);
  expect_open_fail (IMG, EIO, p, "too long", NULL);
  free (p);
}

Test (store, data_file_missing)
{
  char *p;

  make_store ();
  p = data_path ("b", 1);
  cr_assert_eq (unlink (p), 0);
  expect_open_fail (IMG, ENOENT, p, "'b'", NULL);
  free (p);
}

Test (store, image_size_mismatch)
{
  char want[64], have[64];

  make_store ();
  snprintf (want, sizeof want, "%llu", (unsigned long long) IMG);
  snprintf (have, sizeof have, "%llu", (unsigned long long) (IMG + 512));
  expect_open_fail (IMG + 512, EINVAL, desc, "image size mismatch", want, have, NULL);
  /* the top-level size counts even with no bitmaps */
  {
    struct cbw_err err = { 0 };
    struct cbw_bitmap_store *st;
    char d2[sizeof desc];
    snprintf (d2, sizeof d2, "%s", desc);
    snprintf (desc, sizeof desc, "%s/empty.json", dir);
    st = cbw_bitmap_store_open (desc, IMG, &err);
    cr_assert_not_null (st, "%s", err.msg);
    cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
    cbw_bitmap_store_close (st);
    expect_open_fail (IMG + 512, EINVAL, desc, "image size mismatch: descriptor is for",
                      want, have, NULL);
    snprintf (desc, sizeof desc, "%s", d2);
  }
  /* per-bitmap size */
  snprintf (have, sizeof have, "\"image_size\": %llu,\n      \"enabled\": false",
            (unsigned long long) IMG + 1);
  snprintf (want, sizeof want, "\"image_size\": %llu,\n      \"enabled\": false",
            (unsigned long long) IMG);
  edit_file (desc, want, have, true);
  expect_open_fail (IMG, EINVAL, desc, "bitmap 'b'", "image size mismatch", NULL);
}

Test (store, duplicate_names)
{
  make_store ();
  edit_file (desc, "\"name\": \"b\"", "\"name\": \"a\"", true);
  expect_open_fail (IMG, EIO, desc, "duplicate bitmap name 'a'", NULL);
}

Test (store, invalid_names)
{
  static const char *bad[] = {
    "\"\"", "\"..\"", "\".\"", "\"a/b\"", "\"a b\"", "\"\\u00e4\"", "\"a\\u0000b\"", "\"x\\n\"",
    NULL,     /* CBW_BITMAP_NAME_MAX + 1 characters, built below */
  };
  char toolong[CBW_BITMAP_NAME_MAX + 4];
  char cur[200] = "\"name\": \"b\"", next[200];

  toolong[0] = '"';
  memset (toolong + 1, 'a', CBW_BITMAP_NAME_MAX + 1);
  strcpy (toolong + CBW_BITMAP_NAME_MAX + 2, "\"");
  make_store ();
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    snprintf (next, sizeof next, "\"name\": %s", bad[i] ? bad[i] : toolong);
    edit_file (desc, cur, next, true);
    strcpy (cur, next);
    cr_log_info ("invalid name case %zu: %s", i, bad[i] ? bad[i] : "(too long)");
    expect_open_fail (IMG, EIO, desc, "bitmap #1", NULL);
  }
  /* and through the API */
  struct cbw_err err = { 0 };
  cr_assert_eq (cbw_bitmap_name_valid ("a/b", &err), -1);
  cr_assert_eq (err.errnum, EINVAL);
  cr_assert_not_null (strstr (err.msg, "invalid bitmap name 'a/b'"), "%s", err.msg);
  cr_assert_eq (cbw_bitmap_name_valid ("", &err), -1);
  cr_assert_eq (cbw_bitmap_name_valid ("..", &err), -1);
  toolong[CBW_BITMAP_NAME_MAX + 2] = '\0';
  cr_assert_eq (cbw_bitmap_name_valid (toolong + 1, &err), -1);
  cr_assert_not_null (strstr (err.msg, "longer than"), "%s", err.msg);
  cr_assert_eq (cbw_bitmap_name_valid ("Ok_1.2:3-x", &err), 0);
  char max[CBW_BITMAP_NAME_MAX + 1];
  memset (max, 'z', CBW_BITMAP_NAME_MAX);
  max[CBW_BITMAP_NAME_MAX] = '\0';
  cr_assert_eq (cbw_bitmap_name_valid (max, &err), 0);
}

Test (store, bad_granularity)
{
  static const struct { const char *v; const char *why; } bad[] = {
    { "1000", "not a power of two" }, { "65537", "not a power of two" },
    { "256", "smaller than" }, { "0", "smaller than" },
    { "4294967296", "larger than" }, { "-65536", "negative" },
  };
  char cur[100] = "\"granularity\": 65536", next[100];

  make_store ();
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    snprintf (next, sizeof next, "\"granularity\": %s", bad[i].v);
    edit_file (desc, cur, next, true);
    strcpy (cur, next);
    expect_open_fail (IMG, EIO, desc, bad[i].why, NULL);
  }
  struct cbw_err err = { 0 };
  cr_assert_eq (cbw_bitmap_granularity_valid (3 << 10, &err), -1);
  cr_assert_eq (err.errnum, EINVAL);
  cr_assert_eq (cbw_bitmap_granularity_valid (256, &err), -1);
  cr_assert_eq (cbw_bitmap_granularity_valid (4ULL << 30, &err), -1);
  cr_assert_eq (cbw_bitmap_granularity_valid (512, &err), 0);
  cr_assert_eq (cbw_bitmap_granularity_valid (2ULL << 30, &err), 0);
  /* the data file must match a valid granularity too */
  teardown ();
  setup ();
  make_store ();
  edit_file (desc, "\"granularity\": 65536", "\"granularity\": 131072", true);
  expect_open_fail (IMG, EIO, "disk.img.cbw-bitmaps.a.1.bmap", "too long", NULL);
}

Test (store, wrong_json_types)
{
  static const struct { const char *from, *to, *frag; } cases[] = {
    { "\"granularity\": 65536", "\"granularity\": \"65536\"", "expected int, got string" },
    { "\"granularity\": 65536", "\"granularity\": 65536.0", "expected int, got double" },
    { "\"enabled\": true", "\"enabled\": 1", "expected boolean, got int" },
    { "\"state\": \"clean\"", "\"state\": null", "expected string, got null" },
    { "\"state\": \"clean\"", "\"state\": \"dirty\"", "invalid state" },
    { "\"name\": \"a\"", "\"name\": 5", "expected string, got int" },
    { "\"generation\": 1,\n  \"image", "\"generation\": [1],\n  \"image", "expected int, got array" },
    { "\"bitmaps\": [", "\"bitmaps\": 0, \"x\": [", "unknown key" },
    { "\"garbage\": []", "\"garbage\": [1]", "garbage entry #0" },
    { "\"garbage\": []", "\"garbage\": {}", "expected array" },
    { "\"checksum\": \"xxh3:", "\"checksum\": \"md5:", "malformed checksum" },
    { "\"data_file\": \"disk", "\"data_file\": \"../disk", "invalid data file name" },
    { "\"enabled\": true,", "", "missing key \"enabled\"" },
    { "\"enabled\": true,", "\"enabled\": true, \"color\": 1,", "unknown key \"color\"" },
    { "\"generation\": 1,\n      \"data", "\"generation\": 9,\n      \"data", "out of range" },
  };
  make_store ();
  char *orig = slurp (desc, NULL);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    spit (desc, orig, strlen (orig));
    edit_file (desc, cases[i].from, cases[i].to, true);
    expect_open_fail (IMG, EIO, desc, cases[i].frag, NULL);
  }
  /* garbage naming a live file would delete it: rejected */
  spit (desc, orig, strlen (orig));
  edit_file (desc, "\"garbage\": []", "\"garbage\": [\"disk.img.cbw-bitmaps.a.1.bmap\"]", true);
  expect_open_fail (IMG, EIO, desc, "garbage entry", NULL);
  /* a garbage entry that is not a .bmap file (e.g. the descriptor) */
  spit (desc, orig, strlen (orig));
  edit_file (desc, "\"garbage\": []", "\"garbage\": [\"disk.img.cbw-bitmaps.json\"]", true);
  expect_open_fail (IMG, EIO, desc, ".bmap", NULL);
  free (orig);
}

Test (store, too_many_bitmaps)
{
  /* 1025 entries (the limit is checked before the entries themselves). */
  size_t cap = 64 + 4 * (CBW_BITMAP_MAX_COUNT + 1) + TRAILER_LEN, n = 0;
  char *buf = malloc (cap);

  n += (size_t) sprintf (buf, "{\"format\": \"cbw-bitmaps\", \"version\": 1, \"bitmaps\": [{}");
  for (int i = 0; i < CBW_BITMAP_MAX_COUNT; i++)
    n += (size_t) sprintf (buf + n, ",{}");
  n += (size_t) sprintf (buf + n, "], \"generation\": 1, \"image_size\": %llu, \"garbage\": [],\n",
                         (unsigned long long) IMG);
  memset (buf + n, ' ', TRAILER_LEN);
  spit (desc, buf, n + TRAILER_LEN);
  fix_descriptor_checksum (desc);
  expect_open_fail (IMG, EIO, desc, "too many bitmaps", NULL);
  free (buf);
}

Test (store, huge_descriptor)
{
  size_t n = CBW_BITMAP_DESCRIPTOR_MAX + 1;
  char *buf = malloc (n);

  memset (buf, ' ', n);
  buf[0] = '{';
  buf[n - 1] = '}';
  spit (desc, buf, n);
  free (buf);
  expect_open_fail (IMG, EFBIG, desc, "too large", NULL);
}

/* Every truncation and every single-byte change of the descriptor, and of
 * the data file's header page plus a sample of its bitmap bytes, must be
 * refused with a clean error naming the file; nothing may crash (ASan). */
static void
expect_refused (const char *path)
{
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st = cbw_bitmap_store_open (desc, IMG, &err);

  if (st) cbw_bitmap_store_close (st);
  cr_assert_null (st, "corrupted %s accepted", path);
  cr_assert (err.errnum == EIO || err.errnum == EINVAL || err.errnum == ENOTSUP,
             "errnum %d: %s", err.errnum, err.msg);
  cr_assert_not_null (strstr (err.msg, path), "message '%s' does not name %s", err.msg, path);
}

Test (store, corruption_sweep)
{
  size_t len;
  char *orig, *buf, *p;

  make_store ();
  orig = slurp (desc, &len);
  buf = malloc (len);
  for (size_t cut = 0; cut < len; cut += cut + 48 < len ? 5 : 1) {
    spit (desc, orig, cut);
    expect_refused (desc);
  }
  for (size_t i = 0; i < len; i++) {
    memcpy (buf, orig, len);
    buf[i] ^= (char) (1u << (i % 8));
    spit (desc, buf, len);
    expect_refused (desc);
  }
  spit (desc, orig, len);
  free (orig);
  free (buf);

  p = data_path ("a", 1);
  orig = slurp (p, &len);
  buf = malloc (len);
  rs = 5;
  for (size_t k = 0; k < 64 + 64 + 32; k++) {
    size_t i = k < 64 ? k                                  /* header fields */
             : k < 128 ? 64 + rnd () % (4096 - 64)         /* header padding */
             : 4096 + rnd () % (len - 4096);               /* bitmap bytes */
    memcpy (buf, orig, len);
    buf[i] ^= (char) (1u << (k % 8));
    spit (p, buf, len);
    expect_refused (p);
  }
  spit (p, orig, len);
  free (orig);
  free (buf);
  free (p);
  /* intact again: opens */
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st = cbw_bitmap_store_open (desc, IMG, &err);
  cr_assert_not_null (st, "%s", err.msg);
  cbw_bitmap_store_close (st);
}

Test (store, lock_ebusy)
{
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st, *st2;
  pid_t pid;
  int status;

  make_store ();
  st = cbw_bitmap_store_open (desc, IMG, &err);
  cr_assert_not_null (st, "%s", err.msg);
  /* another process */
  pid = fork ();
  if (pid == 0) {
    struct cbw_err e = { 0 };
    struct cbw_bitmap_store *s = cbw_bitmap_store_open (desc, IMG, &e);
    _exit (s == NULL && e.errnum == EBUSY && strstr (e.msg, ".lock") ? 0 : 1);
  }
  cr_assert_eq (waitpid (pid, &status, 0), pid);
  cr_assert (WIFEXITED (status) && WEXITSTATUS (status) == 0, "child did not get EBUSY");
  /* same process, second open */
  expect_open_fail (IMG, EBUSY, ".lock", "locked", NULL);
  cbw_bitmap_store_close (st);
  st2 = cbw_bitmap_store_open (desc, IMG, &err);
  cr_assert_not_null (st2, "reopen after close: %s", err.msg);
  cbw_bitmap_store_close (st2);
}

Test (store, missing_dir)
{
  struct cbw_err err = { 0 };
  char p[600];
  snprintf (p, sizeof p, "%s/nodir/x.json", dir);
  cr_assert_null (cbw_bitmap_store_open (p, IMG, &err));
  cr_assert_eq (err.errnum, ENOENT);
  cr_assert_not_null (strstr (err.msg, "nodir/x.json.lock"), "%s", err.msg);
}

Test (store, api_errors)
{
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st = cbw_bitmap_store_open (desc, IMG, &err);

  cr_assert_not_null (st, "%s", err.msg);
  cr_assert_eq (st->count, 0);
  cr_assert_not_null (cbw_bitmap_store_add (st, "x", CBW_BITMAP_GRAN_DEFAULT, true, &err));
  cr_assert_null (cbw_bitmap_store_add (st, "x", 512, true, &err));
  cr_assert_eq (err.errnum, EEXIST);
  cr_assert_null (cbw_bitmap_store_add (st, "y", 1000, true, &err));
  cr_assert_eq (err.errnum, EINVAL);
  cr_assert_null (cbw_bitmap_store_add (st, "y/", 512, true, &err));
  cr_assert_eq (err.errnum, EINVAL);
  cr_assert_eq (cbw_bitmap_store_remove (st, "nope", &err), -1);
  cr_assert_eq (err.errnum, ENOENT);
  cr_assert_not_null (strstr (err.msg, "nope"));
  cr_assert_null (cbw_bitmap_store_find (st, "nope"));
  for (int i = 1; i < CBW_BITMAP_MAX_COUNT; i++) {
    char n[32];
    snprintf (n, sizeof n, "m%d", i);
    cr_assert_not_null (cbw_bitmap_store_add (st, n, 2ULL << 30, false, &err), "%s", err.msg);
  }
  cr_assert_null (cbw_bitmap_store_add (st, "over", 2ULL << 30, false, &err));
  cr_assert_eq (err.errnum, ENOSPC);
  cbw_bitmap_store_close (st);
  cbw_bitmap_store_close (NULL);
  char *d = cbw_bitmap_store_default_path ("/x/disk.img");
  cr_assert_str_eq (d, "/x/disk.img.cbw-bitmaps.json");
  free (d);
}

/* ---- models and round trips ---- */

struct mbitmap {
  char name[CBW_BITMAP_NAME_MAX + 1];
  uint64_t gran;
  bool enabled;
  enum cbw_bitmap_state state;
  uint64_t nbits;
  unsigned char *bytes;     /* expected serialisation, bit i = byte i/8 bit i%8 */
};

struct mstore {
  size_t n;
  struct mbitmap b[64];
};


static void
mstore_free (struct mstore *m)
{
  for (size_t i = 0; i < m->n; i++)
    free (m->b[i].bytes);
  m->n = 0;
}

static void
mstore_copy (struct mstore *dst, const struct mstore *src)
{
  *dst = *src;
  for (size_t i = 0; i < src->n; i++) {
    size_t len = (src->b[i].nbits + 7) / 8;
    dst->b[i].bytes = malloc (len + 1);
    memcpy (dst->b[i].bytes, src->b[i].bytes, len);
  }
}

/* Set bits [s, s+c) in both the store bitmap and the model. */
static void
set_both (struct cbw_stored_bitmap *sb, struct mbitmap *mb, uint64_t s, uint64_t c)
{
  cbw_bitmap_set_range (&sb->bits, s, c);
  for (uint64_t i = s; i < s + c && i < mb->nbits; i++)
    mb->bytes[i / 8] |= (unsigned char) (1u << (i % 8));
}

static void
clear_both (struct cbw_stored_bitmap *sb, struct mbitmap *mb, uint64_t s, uint64_t c)
{
  cbw_bitmap_clear_range (&sb->bits, s, c);
  for (uint64_t i = s; i < s + c && i < mb->nbits; i++)
    mb->bytes[i / 8] &= (unsigned char) ~(1u << (i % 8));
}

static struct cbw_stored_bitmap *
add_both (struct cbw_bitmap_store *st, struct mstore *m, const char *name,
          uint64_t gran, bool enabled)
{
  struct cbw_err err = { 0 };
  struct cbw_stored_bitmap *sb = cbw_bitmap_store_add (st, name, gran, enabled, &err);
  struct mbitmap *mb = &m->b[m->n++];

  cr_assert_not_null (sb, "%s", err.msg);
  snprintf (mb->name, sizeof mb->name, "%s", name);
  mb->gran = gran;
  mb->enabled = enabled;
  mb->state = CBW_BITMAP_CLEAN;
  mb->nbits = st->image_size / gran + (st->image_size % gran != 0);
  mb->bytes = calloc ((mb->nbits + 7) / 8 + 1, 1);
  cr_assert_eq (sb->bits.nbits, mb->nbits);
  return sb;
}

static void
remove_both (struct cbw_bitmap_store *st, struct mstore *m, const char *name)
{
  struct cbw_err err = { 0 };
  size_t i;

  cr_assert_eq (cbw_bitmap_store_remove (st, name, &err), 0, "%s", err.msg);
  for (i = 0; i < m->n; i++)
    if (strcmp (m->b[i].name, name) == 0) break;
  cr_assert_lt (i, m->n);
  free (m->b[i].bytes);
  memmove (&m->b[i], &m->b[i + 1], (m->n - i - 1) * sizeof m->b[0]);
  m->n--;
}

static void
randomize (struct cbw_stored_bitmap *sb, struct mbitmap *mb, int ops)
{
  for (int k = 0; k < ops; k++) {
    uint64_t s = rnd () % (mb->nbits + 1), c = rnd () % (rnd () & 1 ? 200 : mb->nbits / 3 + 1);
    if (rnd () % 3) set_both (sb, mb, s, c);
    else clear_both (sb, mb, s, c);
  }
}

/* Does the open store equal the model?  (Order, fields, every bit.) */
static bool
store_equals (const struct cbw_bitmap_store *st, const struct mstore *m, char *why, size_t wl)
{
  if (st->count != m->n) {
    snprintf (why, wl, "count %zu vs %zu", st->count, m->n);
    return false;
  }
  for (size_t i = 0; i < m->n; i++) {
    const struct cbw_stored_bitmap *sb = &st->bitmaps[i];
    const struct mbitmap *mb = &m->b[i];
    if (strcmp (sb->name, mb->name) || sb->granularity != mb->gran || sb->enabled != mb->enabled
        || sb->state != mb->state || sb->bits.nbits != mb->nbits) {
      snprintf (why, wl, "bitmap %zu ('%s' vs '%s') fields differ", i, sb->name, mb->name);
      return false;
    }
    if (mb->nbits > (1u << 20)) {     /* big maps: compare serialisations */
      size_t len = (mb->nbits + 7) / 8;
      unsigned char *buf = malloc (len);
      cbw_bitmap_serialize (&sb->bits, buf);
      bool same = memcmp (buf, mb->bytes, len) == 0;
      free (buf);
      if (!same) {
        snprintf (why, wl, "bitmap '%s' contents differ", mb->name);
        return false;
      }
      continue;
    }
    for (uint64_t b = 0; b < mb->nbits; b++)
      if (cbw_bitmap_test (&sb->bits, b) != ((mb->bytes[b / 8] >> (b % 8)) & 1)) {
        snprintf (why, wl, "bitmap '%s' bit %" PRIu64 " differs", mb->name, b);
        return false;
      }
  }
  return true;
}

static void
assert_reopen_equals (uint64_t size, const struct mstore *m)
{
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st = cbw_bitmap_store_open (desc, size, &err);
  char why[256];

  cr_assert_not_null (st, "%s", err.msg);
  cr_assert (store_equals (st, m, why, sizeof why), "%s", why);
  cbw_bitmap_store_close (st);
}

/* Exactly the descriptor, the lock and one data file per bitmap remain;
 * each data file is checked against the spec byte by byte. */
static void
assert_files_exact (uint64_t image_size, const struct mstore *m)
{
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st = cbw_bitmap_store_open (desc, image_size, &err);
  DIR *d;
  struct dirent *e;
  size_t nfiles = 0;

  cr_assert_not_null (st, "%s", err.msg);
  for (size_t i = 0; i < m->n; i++) {
    char *p = data_path (m->b[i].name, st->bitmaps[i].generation);
    size_t len;
    unsigned char *buf = (unsigned char *) slurp (p, &len);
    uint64_t v, nbytes = (m->b[i].nbits + 7) / 8;

    cr_assert_eq (len, 4096 + nbytes, "%s: size", p);
    cr_assert_eq (memcmp (buf, "CBWBMAP\0", 8), 0);
    memcpy (&v, buf + 8, 4); cr_assert_eq ((uint32_t) v, 1);
    memcpy (&v, buf + 12, 4); cr_assert_eq ((uint32_t) v, 4096);
    memcpy (&v, buf + 16, 8); cr_assert_eq (v, m->b[i].gran);
    memcpy (&v, buf + 24, 8); cr_assert_eq (v, image_size);
    memcpy (&v, buf + 32, 8); cr_assert_eq (v, m->b[i].nbits);
    memcpy (&v, buf + 40, 8); cr_assert_eq (v, st->bitmaps[i].generation);
    memcpy (&v, buf + 48, 8); cr_assert_eq (v, XXH3_64bits (buf + 4096, nbytes));
    memcpy (&v, buf + 56, 8); cr_assert_eq (v, XXH3_64bits (buf, 56));
    for (size_t k = 64; k < 4096; k++) cr_assert_eq (buf[k], 0);
    cr_assert_eq (memcmp (buf + 4096, m->b[i].bytes, nbytes), 0, "%s: data differs", p);
    free (buf);
    free (p);
  }
  cbw_bitmap_store_close (st);
  d = opendir (dir);
  while ((e = readdir (d)) != NULL) {
    if (e->d_name[0] == '.') continue;
    nfiles++;
    if (strcmp (e->d_name, "disk.img.cbw-bitmaps.json") == 0
        || strcmp (e->d_name, "disk.img.cbw-bitmaps.json.lock") == 0)
      continue;
    cr_assert_not_null (strstr (e->d_name, ".bmap"), "stray file %s", e->d_name);
  }
  closedir (d);
  cr_assert_eq (nfiles, 2 + m->n, "%zu files for %zu bitmaps (stray data files left)",
                nfiles, m->n);
}

Test (store, empty_store)
{
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st = cbw_bitmap_store_open (desc, 0, &err);
  struct mstore m = { 0 };

  cr_assert_not_null (st, "%s", err.msg);
  cr_assert_eq (st->count, 0);
  cr_assert_eq (st->generation, 0);
  cr_assert_eq (access (desc, F_OK), -1, "open created the descriptor");
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  cbw_bitmap_store_close (st);
  assert_reopen_equals (0, &m);
  /* image size 0: bitmaps of 0 bits are legal */
  st = cbw_bitmap_store_open (desc, 0, &err);
  add_both (st, &m, "zero", 512, true);
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  cbw_bitmap_store_close (st);
  assert_reopen_equals (0, &m);
  assert_files_exact (0, &m);
  mstore_free (&m);
}

/* A missing descriptor is an error unless a new store is asked for: lost
 * metadata is never silently an empty store. */
Test (store, missing_descriptor_needs_create)
{
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st = cbw_bitmap_store_open_ex (desc, 1 << 20, 0, &err);

  cr_assert_null (st);
  cr_assert_eq (err.errnum, ENOENT);
  cr_assert (strstr (err.msg, desc) && strstr (err.msg, "descriptor missing"), "%s", err.msg);
  cr_assert_eq (access (desc, F_OK), -1, "a failed open created the descriptor");

  st = cbw_bitmap_store_open_ex (desc, 1 << 20, CBW_BITMAP_STORE_CREATE, &err);
  cr_assert_not_null (st, "%s", err.msg);
  cr_assert_eq (st->count, 0);
  cr_assert_eq (access (desc, F_OK), 0, "CREATE did not write the descriptor at once");
  cbw_bitmap_store_close (st);

  /* From now on it opens without CREATE; CREATE does not replace it. */
  st = cbw_bitmap_store_open_ex (desc, 1 << 20, 0, &err);
  cr_assert_not_null (st, "%s", err.msg);
  cr_assert_not_null (cbw_bitmap_store_add (st, "a", 65536, true, &err), "%s", err.msg);
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  cbw_bitmap_store_close (st);
  st = cbw_bitmap_store_open_ex (desc, 1 << 20, CBW_BITMAP_STORE_CREATE, &err);
  cr_assert_not_null (st, "%s", err.msg);
  cr_assert_eq (st->count, 1);
  cbw_bitmap_store_close (st);
}

Test (store, round_trips)
{
  struct mstore m = { 0 };
  struct cbw_err err = { 0 };
  uint64_t size = 3 * GIB + 4096 * 3 + 1;

  rs = 0x1234567;
  for (int round = 0; round < 6; round++) {
    struct cbw_bitmap_store *st = cbw_bitmap_store_open (desc, size, &err);
    cr_assert_not_null (st, "round %d: %s", round, err.msg);
    char why[256];
    cr_assert (store_equals (st, &m, why, sizeof why), "round %d: %s", round, why);
    /* remove a few */
    for (int k = 0; k < 3 && m.n > 0; k++) {
      char name[CBW_BITMAP_NAME_MAX + 1];
      strcpy (name, m.b[rnd () % m.n].name);
      remove_both (st, &m, name);
    }
    /* add some, every granularity class */
    for (int k = 0; k < 8 && m.n < 40; k++) {
      char name[CBW_BITMAP_NAME_MAX + 1];
      uint64_t gran = 512ULL << (rnd () % 23);        /* 512 B .. 2 GiB */
      snprintf (name, sizeof name, "r%d.k%d:%s-_x", round, k, k % 2 ? "a" : "B");
      if (k == 7) memset (name, 'n', CBW_BITMAP_NAME_MAX), name[CBW_BITMAP_NAME_MAX] = 0,
                    name[0] = (char) ('a' + round);
      add_both (st, &m, name, gran, rnd () & 1);
    }
    /* modify all */
    for (size_t i = 0; i < m.n; i++) {
      struct cbw_stored_bitmap *sb = cbw_bitmap_store_find (st, m.b[i].name);
      cr_assert_eq (sb, &st->bitmaps[i]);
      randomize (sb, &m.b[i], 4);
      m.b[i].state = sb->state = rnd () & 1 ? CBW_BITMAP_IN_USE : CBW_BITMAP_CLEAN;
      m.b[i].enabled = sb->enabled = rnd () & 1;
    }
    cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
    if (round % 2)      /* saving twice in a row is fine too */
      cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
    cbw_bitmap_store_close (st);
    assert_reopen_equals (size, &m);
  }
  assert_files_exact (size, &m);
  mstore_free (&m);
}

Test (store, failed_save_leaves_old_state)
{
  /* D.tmp is a directory: the save fails after writing the new data files;
   * it must remove them, leave disk and memory as they were, and a retry
   * after the obstacle is gone must succeed. */
  struct mstore m = { 0 }, old;
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st = cbw_bitmap_store_open (desc, IMG, &err);
  struct snap before, after;
  char tmpdir[600];

  cr_assert_not_null (st, "%s", err.msg);
  rs = 4242;
  randomize (add_both (st, &m, "x", 65536, true), &m.b[0], 5);
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  mstore_copy (&old, &m);
  randomize (cbw_bitmap_store_find (st, "x"), &m.b[0], 5);
  add_both (st, &m, "y", 512, false);
  snprintf (tmpdir, sizeof tmpdir, "%s.tmp", desc);
  cr_assert_eq (mkdir (tmpdir, 0700), 0);
  take_snap (&before);
  cr_assert_eq (cbw_bitmap_store_save (st, &err), -1);
  cr_assert_eq (err.errnum, EISDIR, "%d %s", err.errnum, err.msg);
  cr_assert_not_null (strstr (err.msg, ".tmp"), "%s", err.msg);
  take_snap (&after);
  assert_same_snap (&before, &after);
  cr_assert_eq (st->generation, 1);
  cr_assert_eq (st->bitmaps[0].generation, 1);
  cr_assert_eq (rmdir (tmpdir), 0);
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  cbw_bitmap_store_close (st);
  assert_reopen_equals (IMG, &m);
  assert_files_exact (IMG, &m);
  mstore_free (&m);
  mstore_free (&old);
}

Test (store, descriptor_checksum_spec)
{
  /* The trailer rule, checked independently of the library. */
  size_t len;
  char *buf;
  uint64_t want;

  make_store ();
  buf = slurp (desc, &len);
  cr_assert_gt (len, TRAILER_LEN);
  cr_assert_eq (sscanf (buf + len - TRAILER_LEN, "  \"checksum\": \"xxh3:%16" SCNx64 "\"", &want), 1);
  cr_assert_eq (want, XXH3_64bits (buf, len - TRAILER_LEN));
  cr_assert_str_eq (buf + len - 4, "\"\n}\n");
  free (buf);
}

Test (store, image_16tib)
{
  const uint64_t size = 16ULL << 40;
  struct mstore m = { 0 };
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st = cbw_bitmap_store_open (desc, size, &err);
  struct cbw_stored_bitmap *sb;
  struct stat sbuf;
  char *p;

  cr_assert_not_null (st, "%s", err.msg);
  sb = add_both (st, &m, "big", CBW_BITMAP_GRAN_DEFAULT, true);
  cr_assert_eq (sb->bits.nbits, 1ULL << 28);          /* 32 MiB of bits */
  set_both (sb, &m.b[0], 0, 3);
  set_both (sb, &m.b[0], (1ULL << 27) + 5, 1ULL << 20); /* 128 KiB dense run */
  set_both (sb, &m.b[0], (1ULL << 28) - 1, 1);         /* the last block */
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  cbw_bitmap_store_close (st);
  p = data_path ("big", 1);
  cr_assert_eq (stat (p, &sbuf), 0);
  cr_assert_eq ((uint64_t) sbuf.st_size, 4096 + (32ULL << 20));
  cr_log_info ("16 TiB bitmap data file: %lld bytes, %lld allocated",
               (long long) sbuf.st_size, (long long) sbuf.st_blocks * 512);
  free (p);
  assert_reopen_equals (size, &m);
  assert_files_exact (size, &m);
  mstore_free (&m);
}

/* ---- crash atomicity ---- */

struct crash_case {
  const char *step;
  bool expect_new;
};

/* Old state: a, b, c saved.  New state (child): a modified, b removed,
 * c modified + state change, d added. */
static void
build_old (struct mstore *m)
{
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st = cbw_bitmap_store_open (desc, IMG, &err);
  cr_assert_not_null (st, "%s", err.msg);
  rs = 99;
  randomize (add_both (st, m, "a", 65536, true), &m->b[0], 5);
  randomize (add_both (st, m, "b", 4096, true), &m->b[1], 5);
  randomize (add_both (st, m, "c", 1 << 20, false), &m->b[2], 5);
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  /* a second save so that the first generation's files are garbage */
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  cbw_bitmap_store_close (st);
}

static void
build_new (struct cbw_bitmap_store *st, struct mstore *m)
{
  rs = 77;
  randomize (cbw_bitmap_store_find (st, "a"), &m->b[0], 5);
  remove_both (st, m, "b");
  struct cbw_stored_bitmap *c = cbw_bitmap_store_find (st, "c");
  randomize (c, &m->b[1], 5);
  c->state = m->b[1].state = CBW_BITMAP_IN_USE;
  randomize (add_both (st, m, "d", 512, true), &m->b[2], 5);
}

static void
run_crash (const char *step, bool expect_new)
{
  struct mstore old = { 0 }, nw = { 0 };
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st;
  pid_t pid;
  int status;
  char why[256];

  build_old (&old);
  mstore_copy (&nw, &old);
  pid = fork ();
  cr_assert_geq (pid, 0);
  if (pid == 0) {
    struct cbw_bitmap_store *s = cbw_bitmap_store_open (desc, IMG, &err);
    if (s == NULL) _exit (2);
    build_new (s, &nw);
    setenv (CBW_BITMAP_STORE_CRASH_ENV, step, 1);
    cbw_bitmap_store_save (s, &err);
    _exit (3);                 /* the crash point was not reached */
  }
  cr_assert_eq (waitpid (pid, &status, 0), pid);
  cr_assert (WIFEXITED (status), "child died by signal");
  cr_assert_eq (WEXITSTATUS (status), CBW_BITMAP_STORE_CRASH_EXIT,
                "step %s: child exit %d (crash point not reached)", step, WEXITSTATUS (status));

  /* Build the same "new" model in the parent (the child's copy is gone). */
  st = cbw_bitmap_store_open (desc, IMG, &err);
  cr_assert_not_null (st, "step %s: reopen after crash: %s", step, err.msg);
  {
    /* replay build_new on a scratch store object to get the model only */
    struct mstore scratch;
    mstore_copy (&scratch, &old);
    mstore_free (&nw);
    nw = scratch;
  }
  bool is_old = store_equals (st, &old, why, sizeof why);
  cbw_bitmap_store_close (st);
  if (!expect_new) {
    cr_assert (is_old, "step %s: expected the old state: %s", step, why);
  }
  else {
    /* Recompute the new model by replaying the edits through a throwaway
     * store in a sibling directory. */
    char d2[300], desc2[400];
    snprintf (d2, sizeof d2, "%s.replay", dir);
    mkdir (d2, 0700);
    snprintf (desc2, sizeof desc2, "%s/r.json", d2);
    struct cbw_bitmap_store *r = cbw_bitmap_store_open (desc2, IMG, &err);
    cr_assert_not_null (r, "%s", err.msg);
    struct mstore tmp = { 0 };
    rs = 99;
    randomize (add_both (r, &tmp, "a", 65536, true), &tmp.b[0], 5);
    randomize (add_both (r, &tmp, "b", 4096, true), &tmp.b[1], 5);
    randomize (add_both (r, &tmp, "c", 1 << 20, false), &tmp.b[2], 5);
    build_new (r, &tmp);
    cbw_bitmap_store_close (r);
    char lk[450];
    snprintf (lk, sizeof lk, "%s.lock", desc2);
    unlink (lk);
    rmdir (d2);
    st = cbw_bitmap_store_open (desc, IMG, &err);
    cr_assert_not_null (st, "%s", err.msg);
    cr_assert (!is_old, "step %s: still the old state", step);
    cr_assert (store_equals (st, &tmp, why, sizeof why), "step %s: expected the new state: %s",
               step, why);
    cbw_bitmap_store_close (st);
    mstore_free (&nw);
    nw = tmp;
  }
  /* The next normal save cleans up whatever the crash left (except, before
   * the commit, the new file of bitmap 'd' which the old state never knew;
   * see the spec, "Known limits"). */
  st = cbw_bitmap_store_open (desc, IMG, &err);
  cr_assert_not_null (st, "%s", err.msg);
  cr_assert_eq (cbw_bitmap_store_save (st, &err), 0, "%s", err.msg);
  cbw_bitmap_store_close (st);
  if (expect_new) {
    assert_files_exact (IMG, &nw);
  }
  else {
    char *orphan = data_path ("d", 3);
    unlink (orphan);          /* the documented leftover, if the step made it */
    free (orphan);
    assert_files_exact (IMG, &old);
  }
  mstore_free (&old);
  mstore_free (&nw);
}

Test (store, crash_after_first_data_file) { run_crash ("data-file", false); }
Test (store, crash_after_data_files) { run_crash ("data-files", false); }
Test (store, crash_after_descriptor_tmp) { run_crash ("descriptor-tmp", false); }
Test (store, crash_after_rename) { run_crash ("rename", true); }
Test (store, crash_during_cleanup) { run_crash ("cleanup", true); }
