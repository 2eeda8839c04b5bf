/* cbw — plugin/dirtybitmap/tests/test_journal.c: unit tests of the write-ahead
 * region journal format (journal.c): round trips, slot alternation, torn,
 * corrupt and truncated files, and the power-loss mirror hook.
 * Single-threaded; each test uses its own temporary directory. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "journal.h"
#include "powerloss.h"

#define MiB (1ULL << 20)

static char dir[64], path[128];

static void
setup (void)
{
  strcpy (dir, "/tmp/dbm-jtest.XXXXXX");
  cr_assert_not_null (mkdtemp (dir));
  snprintf (path, sizeof path, "%s/j", dir);
  unsetenv ("CBW_TEST_POWERLOSS_DIR");
}

static void
teardown (void)
{
  char cmd[128];
  snprintf (cmd, sizeof cmd, "rm -rf '%s'", dir);
  cr_assert_eq (system (cmd), 0);
}

TestSuite (journal, .init = setup, .fini = teardown);

static off_t
file_size (const char *p)
{
  struct stat sb;
  cr_assert_eq (stat (p, &sb), 0);
  return sb.st_size;
}

static void
poke (const char *p, off_t off, const void *b, size_t n)
{
  int fd = open (p, O_WRONLY);
  cr_assert_geq (fd, 0);
  cr_assert_eq (pwrite (fd, b, n, off), (ssize_t) n);
  close (fd);
}

Test (journal, nregions_and_slot_size)
{
  cr_assert_eq (dbm_journal_nregions (0, 64 * MiB), 1);
  cr_assert_eq (dbm_journal_nregions (64 * MiB, 64 * MiB), 1);
  cr_assert_eq (dbm_journal_nregions (64 * MiB + 1, 64 * MiB), 2);
  cr_assert_eq (dbm_journal_nregions (1ULL << 40, 64 * MiB), 16384);
  cr_assert_eq (dbm_journal_nregions (1 << 30, 3 * MiB), 0, "not a power of two");
  cr_assert_eq (dbm_journal_nregions (1 << 30, 4096), 0, "below the minimum");
  cr_assert_eq (dbm_journal_nregions (1ULL << 62, MiB), 0, "too many regions");
  cr_assert_eq (dbm_journal_slot_size (1), 4096);
  cr_assert_eq (dbm_journal_slot_size (8 * (4096 - 64)), 4096);
  cr_assert_eq (dbm_journal_slot_size (8 * (4096 - 64) + 1), 8192);
}

Test (journal, encode_decode_round_trip)
{
  uint64_t nr = 77, size = 77 * MiB - 5;
  size_t slot = dbm_journal_slot_size (nr);
  unsigned char *buf = malloc (slot);
  uint8_t bits[10] = { 0 };
  struct dbm_journal_state s;
  struct cbw_err err = { 0 };

  bits[0] = 0x81; bits[9] = 0x10;         /* regions 0, 7, 76 */
  dbm_journal_encode_slot (buf, slot, 5, MiB, size, nr, bits);
  cr_assert_eq (dbm_journal_decode_slot (buf, slot, &s, "t", &err), 0, "%s", err.msg);
  cr_assert_eq (s.seq, 5);
  cr_assert_eq (s.region_size, MiB);
  cr_assert_eq (s.image_size, size);
  cr_assert_eq (s.nregions, nr);
  cr_assert_eq (memcmp (s.bits, bits, 10), 0);
  dbm_journal_state_free (&s);

  /* any single flipped bit in the used part is detected */
  for (size_t i = 0; i < 64 + 10; ++i) {
    buf[i] ^= 0x04;
    cr_assert_eq (dbm_journal_decode_slot (buf, slot, &s, "t", &err), -1, "byte %zu", i);
    cr_assert_eq (err.errnum, EIO);
    buf[i] ^= 0x04;
  }
  free (buf);
}

Test (journal, padding_bits_rejected)
{
  size_t slot = dbm_journal_slot_size (3);
  unsigned char *buf = calloc (1, slot);
  uint8_t bits = 0xff;
  struct dbm_journal_state s;
  struct cbw_err err = { 0 };

  /* the encoder masks padding, so a decoded state never has them */
  dbm_journal_encode_slot (buf, slot, 1, MiB, 3 * MiB, 3, &bits);
  cr_assert_eq (dbm_journal_decode_slot (buf, slot, &s, "t", &err), 0);
  cr_assert_eq (s.bits[0], 0x07);
  dbm_journal_state_free (&s);
  free (buf);
}

Test (journal, create_write_read_alternates_slots)
{
  struct cbw_err err = { 0 };
  uint64_t size = 10 * 64 * MiB;
  struct dbm_journal *j = dbm_journal_create (path, size, 64 * MiB, &err);
  struct dbm_journal_state s;
  uint8_t bits[2] = { 0 };

  cr_assert_not_null (j, "%s", err.msg);
  cr_assert_eq (file_size (path), 2 * 4096);
  cr_assert_eq (dbm_journal_read (path, &s, &err), 0, "%s", err.msg);
  cr_assert_eq (s.nregions, 10);
  cr_assert_eq (s.bits[0] | s.bits[1], 0);
  dbm_journal_state_free (&s);

  for (int round = 0; round < 6; ++round) {
    bits[0] = (uint8_t) (1u << round);
    bits[1] = (uint8_t) (round & 3);
    cr_assert_eq (dbm_journal_write (j, bits, &err), 0, "%s", err.msg);
    cr_assert_eq (dbm_journal_read (path, &s, &err), 0, "%s", err.msg);
    cr_assert_eq (s.seq, dbm_journal_get_seq (j));
    cr_assert_eq (s.bits[0], bits[0]);
    cr_assert_eq (s.bits[1], bits[1]);
    dbm_journal_state_free (&s);
  }
  dbm_journal_close (j);
}

/* A torn write of the newest slot falls back to the previous state, which
 * is a superset for additions (the write needing the new region never went
 * down) — the journal never loses a state whose write completed. */
Test (journal, torn_newest_slot_falls_back)
{
  struct cbw_err err = { 0 };
  struct dbm_journal *j = dbm_journal_create (path, 64 * MiB * 16, 64 * MiB, &err);
  struct dbm_journal_state s;
  uint8_t a[2] = { 0x01, 0 }, b[2] = { 0x03, 0x80 };
  unsigned char junk[100];

  cr_assert_not_null (j);
  cr_assert_eq (dbm_journal_write (j, a, &err), 0);   /* seq 3, slot 1 */
  cr_assert_eq (dbm_journal_write (j, b, &err), 0);   /* seq 4, slot 0 */
  dbm_journal_close (j);
  memset (junk, 0xa5, sizeof junk);
  poke (path, 30, junk, sizeof junk);                 /* tear slot 0 */
  cr_assert_eq (dbm_journal_read (path, &s, &err), 0, "%s", err.msg);
  cr_assert_eq (s.seq, 3);
  cr_assert_eq (s.bits[0], 0x01);
  dbm_journal_state_free (&s);

  /* both slots torn: an error naming the file and both problems */
  poke (path, 4096 + 60, junk, sizeof junk);
  cr_assert_eq (dbm_journal_read (path, &s, &err), -1);
  cr_assert_eq (err.errnum, EIO);
  cr_assert_not_null (strstr (err.msg, path), "%s", err.msg);
  cr_assert_not_null (strstr (err.msg, "no valid slot"), "%s", err.msg);
}

Test (journal, truncated_and_garbage_files)
{
  struct cbw_err err = { 0 };
  struct dbm_journal *j = dbm_journal_create (path, 64 * MiB, 64 * MiB, &err);
  struct dbm_journal_state s;

  cr_assert_not_null (j);
  dbm_journal_close (j);
  cr_assert_eq (truncate (path, 4096), 0);
  cr_assert_eq (dbm_journal_read (path, &s, &err), -1);
  cr_assert_eq (err.errnum, EIO);
  cr_assert_not_null (strstr (err.msg, "bad size"), "%s", err.msg);
  cr_assert_eq (truncate (path, 0), 0);
  cr_assert_eq (dbm_journal_read (path, &s, &err), -1);
  cr_assert_eq (err.errnum, EIO);
  cr_assert_eq (truncate (path, 8192), 0);            /* all zeroes */
  cr_assert_eq (dbm_journal_read (path, &s, &err), -1);
  cr_assert_not_null (strstr (err.msg, "bad magic"), "%s", err.msg);
  unlink (path);
  cr_assert_eq (dbm_journal_read (path, &s, &err), -1);
  cr_assert_eq (err.errnum, ENOENT);
  cr_assert_eq (mkdir (path, 0755), 0);
  cr_assert_eq (dbm_journal_read (path, &s, &err), -1);
  cr_assert_eq (err.errnum, EINVAL);
}

/* Slots whose header is self-consistent but lies about the file. */
Test (journal, inconsistent_slots_rejected)
{
  size_t slot = 4096;
  unsigned char *file = calloc (2, slot);
  struct dbm_journal_state s;
  struct cbw_err err = { 0 };
  FILE *fp;

  /* seq 3 placed in slot 0 (must be slot 1), slot 1 empty */
  dbm_journal_encode_slot (file, slot, 3, MiB, 8 * MiB, 8, NULL);
  fp = fopen (path, "w");
  fwrite (file, 1, 2 * slot, fp);
  fclose (fp);
  cr_assert_eq (dbm_journal_read (path, &s, &err), -1);
  cr_assert_not_null (strstr (err.msg, "wrong slot"), "%s", err.msg);

  /* a slot describing more regions than fit in the file's slot size */
  dbm_journal_encode_slot (file, slot, 2, MiB, 8ULL * 5000 * MiB, 40000, NULL);
  fp = fopen (path, "w");
  fwrite (file, 1, 2 * slot, fp);
  fclose (fp);
  cr_assert_eq (dbm_journal_read (path, &s, &err), -1);
  free (file);
}

Test (journal, bad_parameters)
{
  struct cbw_err err = { 0 };
  cr_assert_null (dbm_journal_create (path, 1 << 30, 1000000, &err));
  cr_assert_eq (err.errnum, EINVAL);
  cr_assert_eq (access (path, F_OK), -1, "nothing created");
}

/* The power-loss hook mirrors the journal only after a completed sync. */
Test (journal, powerloss_mirror)
{
  struct cbw_err err = { 0 };
  char pl[160], mirror[200];
  struct dbm_journal_state s;
  uint8_t bits[1] = { 0x05 };

  snprintf (pl, sizeof pl, "%s/pl", dir);
  cr_assert_eq (mkdir (pl, 0755), 0);
  setenv ("CBW_TEST_POWERLOSS_DIR", pl, 1);
  struct dbm_journal *j = dbm_journal_create (path, 8 * 64 * MiB, 64 * MiB, &err);
  cr_assert_not_null (j, "%s", err.msg);
  snprintf (mirror, sizeof mirror, "%s/journal", pl);
  cr_assert_eq (dbm_journal_read (mirror, &s, &err), 0, "%s", err.msg);
  cr_assert_eq (s.bits[0], 0);
  dbm_journal_state_free (&s);
  cr_assert_eq (dbm_journal_write (j, bits, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_journal_read (mirror, &s, &err), 0, "%s", err.msg);
  cr_assert_eq (s.bits[0], 0x05);
  dbm_journal_state_free (&s);
  dbm_journal_close (j);

  /* store mirror: copies store files, skips lock/tmp/journal */
  char f[200];
  snprintf (f, sizeof f, "%s/desc.json", dir); fclose (fopen (f, "w"));
  snprintf (f, sizeof f, "%s/desc.json.lock", dir); fclose (fopen (f, "w"));
  snprintf (f, sizeof f, "%s/x.tmp", dir); fclose (fopen (f, "w"));
  cr_assert_eq (dbm_powerloss_store_saved (dir, path, &err), 0, "%s", err.msg);
  snprintf (f, sizeof f, "%s/store.cur/desc.json", pl);
  cr_assert_eq (access (f, F_OK), 0);
  snprintf (f, sizeof f, "%s/store.cur/desc.json.lock", pl);
  cr_assert_eq (access (f, F_OK), -1);
  snprintf (f, sizeof f, "%s/store.cur/j", pl);
  cr_assert_eq (access (f, F_OK), -1);
  unsetenv ("CBW_TEST_POWERLOSS_DIR");
}
