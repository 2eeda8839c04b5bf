/* cbw — formats/tests/fuzz_bitmap_store.c: libFuzzer target for the bitmap
 * store's readers (descriptor JSON and data-file header), CBW_FUZZ=ON.
 *
 * Input: one mode byte, then the bytes to try.
 *   mode bit 0: append a correct checksum trailer to the bytes (so the fuzzer
 *               gets past the checksum and reaches the semantic checks);
 *   mode bit 1: open with a different image size;
 *   mode bit 2: the bytes replace the start of a valid data file instead of
 *               the descriptor (the descriptor stays valid).
 * A fixed valid store (bitmaps "a" and "b", see init_store) lives in a
 * scratch directory made at start-up and removed at exit; its descriptor is
 * written to $CBW_FUZZ_WRITE_SEED if set (to regenerate fuzz_corpus/).  Open must never
 * crash or leak, and must not change the data files (checked).
 * Single-threaded, no locking.
 */
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "bitmap_store.h"

#define IMG (64ULL << 20)
static char dir[256], desc[300], dfile[300];
static unsigned char *dorig;
static size_t dlen;

static void
cleanup (void)
{
  DIR *d = opendir (dir);
  struct dirent *e;
  char p[600];
  if (!d) return;
  while ((e = readdir (d)) != NULL) {
    if (e->d_name[0] == '.') continue;
    snprintf (p, sizeof p, "%s/%s", dir, e->d_name);
    unlink (p);
  }
  closedir (d);
  rmdir (dir);
}

static void
write_file (const char *path, const void *buf, size_t len)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || write (fd, buf, len) != (ssize_t) len) abort ();
  close (fd);
}

static unsigned char *
read_all (const char *path, size_t *len)
{
  FILE *f = fopen (path, "rb");
  if (!f) abort ();
  fseek (f, 0, SEEK_END);
  *len = (size_t) ftell (f);
  fseek (f, 0, SEEK_SET);
  unsigned char *b = malloc (*len + 1);
  if (fread (b, 1, *len, f) != *len) abort ();
  fclose (f);
  return b;
}

/* Deterministic store; its descriptor is the seed in fuzz_corpus/. */
static void
init_store (void)
{
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st = cbw_bitmap_store_open (desc, IMG, &err);
  struct cbw_stored_bitmap *a, *b;

  if (!st) { fprintf (stderr, "%s\n", err.msg); abort (); }
  a = cbw_bitmap_store_add (st, "a", 65536, true, &err);
  b = cbw_bitmap_store_add (st, "b", 4096, false, &err);
  if (!a || !b) abort ();
  cbw_bitmap_set_range (&a->bits, 3, 100);
  cbw_bitmap_set_range (&b->bits, 1000, 5000);
  b->state = CBW_BITMAP_IN_USE;
  if (cbw_bitmap_store_save (st, &err) < 0) abort ();
  cbw_bitmap_store_close (st);
}

int
LLVMFuzzerInitialize (int *argc, char ***argv)
{
  (void) argc; (void) argv;
  snprintf (dir, sizeof dir, "/tmp/cbw-fuzz-bmstore.XXXXXX");
  if (!mkdtemp (dir)) abort ();
  atexit (cleanup);
  snprintf (desc, sizeof desc, "%s/fz.json", dir);
  snprintf (dfile, sizeof dfile, "%s/fz.a.1.bmap", dir);
  init_store ();
  dorig = read_all (dfile, &dlen);
  if (getenv ("CBW_FUZZ_WRITE_SEED")) {   /* regenerate the seed corpus */
    size_t n;
    unsigned char *d = read_all (desc, &n);
    char hdr[600];
    write_file (getenv ("CBW_FUZZ_WRITE_SEED"), d, n);
    snprintf (hdr, sizeof hdr, "%s.hdr", getenv ("CBW_FUZZ_WRITE_SEED"));
    write_file (hdr, dorig, 64);             /* data file header */
    free (d);
    exit (0);
  }
  return 0;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  static unsigned char *valid_desc;
  static size_t valid_len;
  struct cbw_err err = { 0 };
  struct cbw_bitmap_store *st;
  unsigned mode;

  if (size == 0)
    return 0;
  if (valid_desc == NULL)
    valid_desc = read_all (desc, &valid_len);
  mode = data[0];
  data++, size--;
  if (mode & 4) {
    unsigned char *f = malloc (dlen);
    memcpy (f, dorig, dlen);
    memcpy (f, data, size < dlen ? size : dlen);
    write_file (desc, valid_desc, valid_len);
    write_file (dfile, f, dlen);
    free (f);
  }
  else {
    unsigned char *buf = malloc (size + 41);
    memcpy (buf, data, size);
    if (mode & 1) {
      char tr[41];
      snprintf (tr, sizeof tr, "  \"checksum\": \"xxh3:%016" PRIx64 "\"\n}\n",
                (uint64_t) XXH3_64bits (data, size));
      memcpy (buf + size, tr, 40);
      size += 40;
    }
    write_file (desc, buf, size);
    free (buf);
  }
  unsigned char *before = read_all (dfile, &(size_t){ 0 });
  st = cbw_bitmap_store_open (desc, mode & 2 ? IMG + 512 : IMG, &err);
  if (st)
    cbw_bitmap_store_close (st);
  else if (err.errnum == 0 || err.msg[0] == '\0')
    abort ();                       /* failure without an error */
  size_t alen;
  unsigned char *after = read_all (dfile, &alen);
  if (memcmp (before, after, alen) != 0)
    abort ();                       /* open changed a data file */
  free (before);
  free (after);
  if (mode & 4)
    write_file (dfile, dorig, dlen);
  return 0;
}
