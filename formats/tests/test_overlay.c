/* cbw — formats/tests/test_overlay.c: the overlay chain format
 * (formats/overlay.h): round trips, and every kind of bad input (corrupt,
 * truncated, missing, wrong-size, loops) must give a clear error naming the
 * problem.  No locking (single-threaded tests). */
#include <criterion/criterion.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "fileutil.h"
#include "overlay.h"

static char dir[256];
#define SIZE (10 * 65536 + 4096)   /* last cluster partial */
#define CS 65536

static void
setup (void)
{
  snprintf (dir, sizeof dir, "/tmp/cbw-ovl-test.XXXXXX");
  cr_assert_not_null (mkdtemp (dir));
}

static void
teardown (void)
{
  char cmd[300];
  snprintf (cmd, sizeof cmd, "rm -rf '%s'", dir);
  cr_assert_eq (system (cmd), 0);
}

static char *
P (const char *name)
{
  static char buf[4][512];
  static int i;
  i = (i + 1) % 4;
  snprintf (buf[i], sizeof buf[i], "%s/%s", dir, name);
  return buf[i];
}

static void
mkfile (const char *name, uint64_t size)
{
  int fd = open (P (name), O_RDWR | O_CREAT | O_TRUNC, 0644);
  cr_assert_geq (fd, 0);
  cr_assert_eq (ftruncate (fd, (off_t) size), 0);
  close (fd);
}

/* base + n overlays o1..on, chain "c.json" */
static void
mkchain (int n)
{
  struct cbw_chain_desc d = { 0 };
  struct cbw_err err;
  char *layers[8];
  mkfile ("base.img", SIZE);
  for (int i = 0; i < n; i++) {
    char name[32], back[32];
    snprintf (name, sizeof name, "o%d", i + 1);
    snprintf (back, sizeof back, "o%d", i);
    cr_assert_eq (cbw_ovl_create (dir, name, i == 0 ? "base.img" : back, "t",
                                  SIZE, CS, &err), 0, "%s", err.msg);
    layers[i] = strdup (name);
  }
  d.size = SIZE;
  d.cluster_size = CS;
  d.base = "base.img";
  d.layers = layers;
  d.nlayers = (size_t) n;
  cr_assert_eq (cbw_chain_desc_save (P ("c.json"), &d, &err), 0, "%s", err.msg);
  for (int i = 0; i < n; i++) free (layers[i]);
}

/* Replace overlay NAME by a new one (cbw_ovl_create never overwrites). */
static void
recreate (const char *name, const char *backing, uint64_t size)
{
  struct cbw_err err;
  char f[64];
  unlink (P (name));
  snprintf (f, sizeof f, "%s.data", name); unlink (P (f));
  snprintf (f, sizeof f, "%s.map", name); unlink (P (f));
  cr_assert_eq (cbw_ovl_create (dir, name, backing, "", size, CS, &err), 0, "%s", err.msg);
}

static int
load_validate (struct cbw_err *err)
{
  struct cbw_chain_desc d;
  if (cbw_chain_desc_load (P ("c.json"), &d, err) < 0)
    return -1;
  int r = cbw_chain_validate (dir, &d, err);
  cbw_chain_desc_free (&d);
  return r;
}

static char *
slurp (const char *path, size_t *len)
{
  char *buf;
  struct cbw_err err;
  cr_assert_eq (cbw_read_file (path, 1 << 24, &buf, len, &err), 0, "%s", err.msg);
  return buf;
}

static void
spit (const char *path, const void *buf, size_t len)
{
  struct cbw_err err;
  cr_assert_eq (cbw_write_file_atomic (path, buf, len, &err), 0, "%s", err.msg);
}

TestSuite (overlay, .init = setup, .fini = teardown);

Test (overlay, chain_roundtrip)
{
  struct cbw_chain_desc d;
  struct cbw_err err;
  mkchain (3);
  cr_assert_eq (load_validate (&err), 0, "%s", err.msg);
  cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d, &err), 0, "%s", err.msg);
  cr_assert_eq (d.nlayers, 3);
  cr_assert_str_eq (d.layers[2], "o3");
  cr_assert_eq (d.size, SIZE);
  cr_assert_eq (d.generation, 1);
  d.op = (struct cbw_chain_op) { CBW_CHAIN_OP_COMMIT, CBW_CHAIN_PHASE_FINISH,
                                 CBW_COMMIT_MAKE_EMPTY, 2, 3 };
  cr_assert_eq (cbw_chain_desc_save (P ("c.json"), &d, &err), 0);
  cbw_chain_desc_free (&d);
  cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d, &err), 0, "%s", err.msg);
  cr_assert_eq (d.generation, 2);
  cr_assert_eq (d.op.type, CBW_CHAIN_OP_COMMIT);
  cr_assert_eq (d.op.phase, CBW_CHAIN_PHASE_FINISH);
  cr_assert_eq (d.op.mode, CBW_COMMIT_MAKE_EMPTY);
  cr_assert_eq (d.op.lo, 2);
  cr_assert_eq (d.op.hi, 3);
  cbw_chain_desc_free (&d);

  char **names;
  size_t n;
  cr_assert_eq (cbw_ovl_resolve_backing (dir, "o3", &names, &n, &err), 0, "%s", err.msg);
  cr_assert_eq (n, 4);
  cr_assert_str_eq (names[0], "base.img");
  cr_assert_str_eq (names[3], "o3");
  for (size_t i = 0; i < n; i++) free (names[i]);
  free (names);
}

Test (overlay, map_roundtrip_random)
{
  struct cbw_ovl_map m, m2;
  struct cbw_err err;
  uint64_t size = 1000 * 4096 + 17;
  cr_assert_eq (cbw_ovl_map_init (&m, size, 4096, &err), 0, "%s", err.msg);
  cr_assert_eq (m.nclusters, 1001);
  enum cbw_ovl_state model[1001];
  srand (42);
  for (int i = 0; i < 1001; i++) model[i] = CBW_OVL_UNALLOC;
  for (int j = 0; j < 3000; j++) {
    uint64_t s = (uint64_t) rand () % 1001, n = 1 + (uint64_t) rand () % 20;
    enum cbw_ovl_state st = (enum cbw_ovl_state) (rand () % 3);
    cbw_ovl_map_set (&m, s, n, st);
    for (uint64_t i = s; i < s + n && i < 1001; i++) model[i] = st;
  }
  cr_assert_eq (cbw_ovl_map_save (P ("m"), &m, &err), 0, "%s", err.msg);
  cr_assert_eq (cbw_ovl_map_load (P ("m"), size, 4096, &m2, &err), 0, "%s", err.msg);
  cr_assert_eq (m2.generation, m.generation);
  for (uint64_t i = 0; i < 1001; i++)
    cr_assert_eq (cbw_ovl_map_get (&m2, i), model[i], "cluster %lu", (unsigned long) i);
  cbw_ovl_map_free (&m);
  cbw_ovl_map_free (&m2);
}

/* --- maps: bad input */

static void
mkmap (struct cbw_ovl_map *m)
{
  struct cbw_err err;
  cr_assert_eq (cbw_ovl_map_init (m, SIZE, CS, &err), 0);
  cbw_ovl_map_set (m, 1, 3, CBW_OVL_DATA);
  cbw_ovl_map_set (m, 6, 1, CBW_OVL_ZERO);
  cr_assert_eq (cbw_ovl_map_save (P ("m"), m, &err), 0);
}

Test (overlay, map_truncated)
{
  struct cbw_ovl_map m, m2;
  struct cbw_err err;
  size_t len;
  mkmap (&m);
  char *buf = slurp (P ("m"), &len);
  for (size_t cut = 0; cut < len; cut += (cut < 70 ? 1 : 3)) {
    spit (P ("m"), buf, cut);
    cr_assert_eq (cbw_ovl_map_load (P ("m"), SIZE, CS, &m2, &err), -1, "cut %zu", cut);
    cr_assert (err.errnum == EIO, "cut %zu: %s", cut, err.msg);
    cr_assert (strstr (err.msg, P ("m")) != NULL, "message names the file: %s", err.msg);
  }
  free (buf);
  cbw_ovl_map_free (&m);
}

Test (overlay, map_bitflips)
{
  struct cbw_ovl_map m, m2;
  struct cbw_err err;
  size_t len;
  mkmap (&m);
  char *buf = slurp (P ("m"), &len);
  for (size_t i = 0; i < len; i++)
    for (int bit = 0; bit < 8; bit += 3) {
      buf[i] ^= (char) (1 << bit);
      spit (P ("m"), buf, len);
      cr_assert_eq (cbw_ovl_map_load (P ("m"), SIZE, CS, &m2, &err), -1,
                    "flip byte %zu bit %d accepted", i, bit);
      buf[i] ^= (char) (1 << bit);
    }
  spit (P ("m"), buf, len);
  cr_assert_eq (cbw_ovl_map_load (P ("m"), SIZE, CS, &m2, &err), 0, "%s", err.msg);
  cbw_ovl_map_free (&m2);
  /* wrong disk size */
  cr_assert_eq (cbw_ovl_map_load (P ("m"), SIZE + CS, CS, &m2, &err), -1);
  cr_assert_eq (err.errnum, EINVAL, "%s", err.msg);
  cr_assert (strstr (err.msg, "expected") != NULL, "%s", err.msg);
  free (buf);
  cbw_ovl_map_free (&m);
}

Test (overlay, map_zero_without_alloc)
{
  struct cbw_ovl_map m, m2;
  struct cbw_err err;
  void *vb;
  size_t len;
  mkmap (&m);
  cr_assert_eq (cbw_ovl_map_encode (&m, &vb, &len, &err), 0);
  unsigned char *b = vb;
  size_t bl = (m.nclusters + 7) / 8;
  b[64 + bl] |= 1;   /* zero bit of cluster 0, which is unallocated */
  uint64_t v = htole64 (XXH64 (b + 64, 2 * bl, 0));
  memcpy (b + 48, &v, 8);
  v = htole64 (XXH64 (b, 56, 0));
  memcpy (b + 56, &v, 8);
  cr_assert_eq (cbw_ovl_map_decode (&m2, b, len, SIZE, CS, "x", &err), -1);
  cr_assert (strstr (err.msg, "zero bit without") != NULL, "%s", err.msg);
  free (vb);
  cbw_ovl_map_free (&m);
}

/* --- descriptors: bad input */

Test (overlay, chain_desc_truncated_and_corrupt)
{
  struct cbw_chain_desc d;
  struct cbw_err err;
  size_t len;
  mkchain (2);
  char *buf = slurp (P ("c.json"), &len);
  for (size_t cut = 0; cut < len - 1; cut++) {   /* keep at least the final '}' off */
    spit (P ("c.json"), buf, cut);
    cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d, &err), -1, "cut %zu accepted", cut);
    cr_assert (strstr (err.msg, "c.json") != NULL, "%s", err.msg);
  }
  /* every single-byte change is caught (checksum or parse error) */
  for (size_t i = 0; i < len; i++) {
    char o = buf[i];
    if (o == ' ' || o == '\n') continue;   /* whitespace is not content */
    buf[i] = (o == 'x') ? 'y' : 'x';
    spit (P ("c.json"), buf, len);
    cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d, &err), -1,
                  "change at %zu accepted", i);
    buf[i] = o;
  }
  spit (P ("c.json"), buf, len);
  cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d, &err), 0, "%s", err.msg);
  cbw_chain_desc_free (&d);
  free (buf);
  /* missing */
  unlink (P ("c.json"));
  cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d, &err), -1);
  cr_assert_eq (err.errnum, ENOENT);
}

Test (overlay, checksum_message_and_version)
{
  struct cbw_chain_desc d;
  struct cbw_err err;
  size_t len;
  mkchain (1);
  char *buf = slurp (P ("c.json"), &len);
  char *p = strstr (buf, "\"base.img\"");
  cr_assert_not_null (p);
  p[1] = 'B';                                   /* valid JSON, wrong content */
  spit (P ("c.json"), buf, len);
  cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d, &err), -1);
  cr_assert_eq (err.errnum, EIO);
  cr_assert (strstr (err.msg, "bad checksum") != NULL, "%s", err.msg);
  free (buf);
  /* future version */
  const char *v2 = "{\"format\":\"cbw-chain\",\"version\":2,\"checksum\":\"xxh64:0\"}";
  spit (P ("c.json"), v2, strlen (v2));
  cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d, &err), -1);
  cr_assert_eq (err.errnum, ENOTSUP, "%s", err.msg);
  /* not our format */
  spit (P ("c.json"), "[1,2]", 5);
  cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d, &err), -1);
  cr_assert (strstr (err.msg, "not a JSON object") != NULL, "%s", err.msg);
  spit (P ("c.json"), "{}  x", 5);
  cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d, &err), -1);
  cr_assert (strstr (err.msg, "trailing garbage") || strstr (err.msg, "not valid JSON"),
             "%s", err.msg);
}

Test (overlay, missing_layer_files)
{
  struct cbw_err err;
  mkchain (3);
  cr_assert_eq (load_validate (&err), 0, "%s", err.msg);
  rename (P ("o2.map"), P ("o2.map.x"));
  cr_assert_eq (load_validate (&err), -1);
  cr_assert_eq (err.errnum, ENOENT);
  cr_assert (strstr (err.msg, "layer 2 'o2'") && strstr (err.msg, "o2.map"), "%s", err.msg);
  rename (P ("o2.map.x"), P ("o2.map"));
  unlink (P ("o3.data"));
  cr_assert_eq (load_validate (&err), -1);
  cr_assert (strstr (err.msg, "o3.data") != NULL, "%s", err.msg);
  unlink (P ("o3"));
  cr_assert_eq (load_validate (&err), -1);
  cr_assert (strstr (err.msg, "layer 3") && err.errnum == ENOENT, "%s", err.msg);
  unlink (P ("base.img"));
  cr_assert_eq (load_validate (&err), -1);
  cr_assert (strstr (err.msg, "base") != NULL && err.errnum == ENOENT, "%s", err.msg);
}

Test (overlay, wrong_sizes)
{
  struct cbw_err err;
  mkchain (2);
  mkfile ("o1.data", SIZE - 512);
  cr_assert_eq (load_validate (&err), -1);
  cr_assert (strstr (err.msg, "wrong size") && strstr (err.msg, "o1.data"), "%s", err.msg);
  mkfile ("o1.data", SIZE);
  mkfile ("base.img", SIZE * 2);
  cr_assert_eq (load_validate (&err), -1);
  cr_assert (strstr (err.msg, "base") && strstr (err.msg, "wrong size"), "%s", err.msg);
  mkfile ("base.img", SIZE);
  /* an overlay made for another disk size */
  recreate ("o2", "o1", SIZE * 2);
  cr_assert_eq (load_validate (&err), -1);
  cr_assert (strstr (err.msg, "does not match the chain"), "%s", err.msg);
}

Test (overlay, loops)
{
  struct cbw_err err;
  struct cbw_chain_desc d = { 0 };
  char *layers[3] = { "o1", "o2", "o1" };
  mkchain (2);
  /* the same layer twice in the chain */
  d.size = SIZE; d.cluster_size = CS; d.base = "base.img";
  d.layers = layers; d.nlayers = 3;
  cr_assert_eq (cbw_chain_desc_save (P ("c.json"), &d, &err), 0);
  cr_assert_eq (load_validate (&err), -1);
  cr_assert_eq (err.errnum, ELOOP, "%s", err.msg);
  cr_assert (strstr (err.msg, "appears twice") != NULL, "%s", err.msg);
  /* backing links forming a cycle: o1 -> o2 -> o1 */
  recreate ("o1", "o2", SIZE);
  d.nlayers = 2;
  cr_assert_eq (cbw_chain_desc_save (P ("c.json"), &d, &err), 0);
  cr_assert_eq (load_validate (&err), -1);
  cr_assert_eq (err.errnum, ELOOP, "%s", err.msg);
  char **names;
  size_t n;
  cr_assert_eq (cbw_ovl_resolve_backing (dir, "o2", &names, &n, &err), -1);
  cr_assert_eq (err.errnum, ELOOP, "%s", err.msg);
  cr_assert (strstr (err.msg, "loop in backing chain") != NULL, "%s", err.msg);
  /* self loop */
  recreate ("o1", "o1", SIZE);
  cr_assert_eq (load_validate (&err), -1);
  cr_assert_eq (err.errnum, ELOOP, "%s", err.msg);
  /* base named as a layer */
  char *l2[1] = { "base.img" };
  d.layers = l2; d.nlayers = 1;
  cr_assert_eq (cbw_chain_desc_save (P ("c.json"), &d, &err), 0);
  cr_assert_eq (load_validate (&err), -1);
  cr_assert_eq (err.errnum, ELOOP, "%s", err.msg);
}

Test (overlay, bad_names_and_fields)
{
  struct cbw_err err;
  cr_assert_eq (cbw_ovl_name_valid ("../x", &err), -1);
  cr_assert_eq (cbw_ovl_name_valid ("a/b", &err), -1);
  cr_assert_eq (cbw_ovl_name_valid ("..", &err), -1);
  cr_assert_eq (cbw_ovl_name_valid ("", &err), -1);
  cr_assert_eq (cbw_ovl_name_valid ("disk.ov1.json", &err), 0);
  /* a chain whose layer name escapes the directory */
  mkchain (1);
  size_t len;
  char *buf = slurp (P ("c.json"), &len);
  free (buf);
  struct cbw_chain_desc d = { 0 };
  char *layers[1] = { "../etc" };
  d.size = SIZE; d.cluster_size = CS; d.base = "base.img";
  d.layers = layers; d.nlayers = 1;
  cr_assert_eq (cbw_chain_desc_save (P ("c.json"), &d, &err), 0);
  struct cbw_chain_desc d2;
  cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d2, &err), -1);
  cr_assert (strstr (err.msg, "layers[0]") != NULL, "%s", err.msg);
  /* operation range not in the chain */
  layers[0] = "o1";
  d.op = (struct cbw_chain_op) { CBW_CHAIN_OP_COMMIT, CBW_CHAIN_PHASE_COPY,
                                 CBW_COMMIT_DELETE, 1, 5 };
  cr_assert_eq (cbw_chain_desc_save (P ("c.json"), &d, &err), 0);
  cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d2, &err), -1);
  cr_assert (strstr (err.msg, "not in the chain") != NULL, "%s", err.msg);
  /* bad cluster size */
  d.op.type = CBW_CHAIN_OP_NONE;
  d.cluster_size = 3000;
  cr_assert_eq (cbw_chain_desc_save (P ("c.json"), &d, &err), 0);
  cr_assert_eq (cbw_chain_desc_load (P ("c.json"), &d2, &err), -1);
  cr_assert (strstr (err.msg, "cluster size") != NULL, "%s", err.msg);
}

/* ---- new files never replace anything */

static uint64_t
file_size (const char *name)
{
  struct stat st;
  cr_assert_eq (stat (P (name), &st), 0, "%s: %s", name, strerror (errno));
  return (uint64_t) st.st_size;
}

static void
plant (const char *name, const char *text)
{
  FILE *f = fopen (P (name), "w");
  cr_assert_not_null (f);
  fputs (text, f);
  fclose (f);
}

static void
check_planted (const char *name, const char *text)
{
  size_t len;
  char *got = slurp (P (name), &len);
  cr_assert (len == strlen (text) && memcmp (got, text, len) == 0,
             "%s was changed: now %zu bytes", name, len);
  free (got);
}

/* Whichever of the three names of a new overlay is taken, cbw_ovl_create
 * fails with EEXIST naming that file, leaves it as it was, and removes only
 * the files it created itself. */
Test (overlay, create_never_overwrites)
{
  static const char *suffix[] = { ".data", ".map", "" };
  struct cbw_err err;
  mkfile ("base.img", SIZE);
  for (int k = 0; k < 3; k++) {
    char name[32], taken[48], other[2][48];
    snprintf (name, sizeof name, "n%d", k);
    snprintf (taken, sizeof taken, "%s%s", name, suffix[k]);
    plant (taken, "somebody else's data\n");
    cr_assert_eq (cbw_ovl_create (dir, name, "base.img", "", SIZE, CS, &err), -1,
                  "created over an existing %s", taken);
    cr_assert_eq (err.errnum, EEXIST, "%s", err.msg);
    cr_assert (strstr (err.msg, P (taken)) && strstr (err.msg, "already exists"),
               "%s", err.msg);
    check_planted (taken, "somebody else's data\n");
    for (int j = 0, m = 0; j < 3; j++)
      if (j != k)
        snprintf (other[m++], sizeof other[0], "%s%s", name, suffix[j]);
    cr_assert_eq (access (P (other[0]), F_OK), -1, "%s left behind", other[0]);
    cr_assert_eq (access (P (other[1]), F_OK), -1, "%s left behind", other[1]);
  }
  /* a dangling symlink is taken too (O_EXCL does not follow it) */
  cr_assert_eq (symlink (P ("nowhere"), P ("s.data")), 0);
  cr_assert_eq (cbw_ovl_create (dir, "s", "base.img", "", SIZE, CS, &err), -1);
  cr_assert_eq (err.errnum, EEXIST, "%s", err.msg);
  cr_assert_eq (access (P ("nowhere"), F_OK), -1, "created through a symlink");
  /* a free name works, and creating it again fails without touching it */
  cr_assert_eq (cbw_ovl_create (dir, "ok", "base.img", "", SIZE, CS, &err), 0, "%s", err.msg);
  int fd = open (P ("ok.data"), O_WRONLY);
  cr_assert_geq (fd, 0);
  cr_assert_eq (pwrite (fd, "live", 4, 4096), 4);
  close (fd);
  cr_assert_eq (cbw_ovl_create (dir, "ok", "base.img", "", SIZE, CS, &err), -1);
  cr_assert_eq (err.errnum, EEXIST, "%s", err.msg);
  cr_assert_eq (file_size ("ok.data"), SIZE);
  char buf[4];
  fd = open (P ("ok.data"), O_RDONLY);
  cr_assert_eq (pread (fd, buf, 4, 4096), 4);
  close (fd);
  cr_assert (memcmp (buf, "live", 4) == 0, "existing data file was truncated");
  struct cbw_ovl_desc d;
  cr_assert_eq (cbw_ovl_desc_load (dir, "ok", &d, &err), 0, "%s", err.msg);
  cbw_ovl_desc_free (&d);
}

/* A new chain descriptor never replaces an existing one. */
Test (overlay, chain_create_never_overwrites)
{
  struct cbw_err err;
  struct cbw_chain_desc d = { .size = SIZE, .cluster_size = CS, .base = "base.img" };
  mkchain (1);
  size_t len;
  char *before = slurp (P ("c.json"), &len);
  cr_assert_eq (cbw_chain_desc_create (P ("c.json"), &d, &err), -1);
  cr_assert_eq (err.errnum, EEXIST, "%s", err.msg);
  cr_assert (strstr (err.msg, P ("c.json")) != NULL, "%s", err.msg);
  check_planted ("c.json", before);
  free (before);
  cr_assert_eq (load_validate (&err), 0, "%s", err.msg);
  cr_assert_eq (cbw_chain_desc_create (P ("new.json"), &d, &err), 0, "%s", err.msg);
  struct cbw_chain_desc l;
  cr_assert_eq (cbw_chain_desc_load (P ("new.json"), &l, &err), 0, "%s", err.msg);
  cr_assert_eq (l.nlayers, 0);
  cbw_chain_desc_free (&l);
}

/* The temp file of a crash-atomic replace is private to one save, never a
 * fixed name that two writers would share: a file at the old fixed name
 * PATH.tmp is left alone, and no temp file is left behind. */
Test (overlay, atomic_replace_temp_is_private)
{
  plant ("d.json.tmp", "not yours\n");
  spit (P ("d.json"), "one\n", 4);
  spit (P ("d.json"), "two\n", 4);
  check_planted ("d.json.tmp", "not yours\n");
  check_planted ("d.json", "two\n");
  char cmd[600];
  snprintf (cmd, sizeof cmd, "test $(ls -A '%s' | wc -l) -eq 2", dir);
  cr_assert_eq (system (cmd), 0, "temp files left behind");
}
