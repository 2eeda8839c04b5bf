/* cbw — plugin/chain/tests/chain_test_util.h: helpers shared by the overlay
 * chain engine tests: scratch directories, a deterministic data generator
 * and whole-disk comparisons against an in-memory model.  Single-threaded
 * helpers; no locking. */
#ifndef CBW_CHAIN_TEST_UTIL_H
#define CBW_CHAIN_TEST_UTIL_H

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ctl_test_util.h"
#include "fileutil.h"
#include "overlay_chain.h"

/* xorshift64* — deterministic, seedable */
static inline uint64_t
tu_rand (uint64_t *s)
{
  uint64_t x = *s;
  x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1DULL;
}

static inline void
tu_fill (void *buf, size_t len, uint64_t seed)
{
  uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
  unsigned char *p = buf;
  for (size_t i = 0; i < len; i++) {
    if (i % 8 == 0) tu_rand (&s);
    p[i] = (unsigned char) (s >> (8 * (i % 8)));
  }
}

/* Scratch directory: $CBW_TEST_TMPDIR, else /dev/shm (these tests check
 * process crashes, not power loss, and fsync on a busy disk is slow), else
 * /tmp. */
static inline void
tu_mkdtemp (char *dir, size_t n)
{
  const char *t = getenv ("CBW_TEST_TMPDIR");
  if (t == NULL || !*t)
    t = access ("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
  snprintf (dir, n, "%s/cbw-ovc-test.XXXXXX", t);
  cr_assert_not_null (mkdtemp (dir));
}

static inline void
tu_rmrf (const char *dir)
{
  char cmd[512];
  snprintf (cmd, sizeof cmd, "rm -rf '%s'", dir);
  cr_assert_eq (system (cmd), 0);
}

/* Create DIR/base.img (size bytes, random content returned in *model) and
 * the chain DIR/disk.chain over it. */
static inline void
tu_mkdisk (const char *dir, uint64_t size, uint32_t cs, uint64_t seed,
           unsigned char **model, char *chain, size_t chain_len)
{
  char p[512];
  struct cbw_err err;
  *model = malloc (size);
  cr_assert_not_null (*model);
  tu_fill (*model, size, seed);
  snprintf (p, sizeof p, "%s/base.img", dir);
  int fd = open (p, O_RDWR | O_CREAT | O_TRUNC, 0644);
  cr_assert_geq (fd, 0);
  cr_assert_eq (cbw_pwrite_full (fd, *model, size, 0), 0);
  close (fd);
  snprintf (chain, chain_len, "%s/disk.chain", dir);
  cr_assert_eq (ovc_create (chain, "base.img", cs, &err), 0, "%s", err.msg);
}

/* Compare the whole disk as read through c with model; returns the first
 * differing offset or UINT64_MAX. */
static inline uint64_t
tu_diff (struct ovc *c, const unsigned char *model, uint64_t size)
{
  struct cbw_err err;
  unsigned char *buf = malloc (size);
  uint64_t r = UINT64_MAX;
  cr_assert_not_null (buf);
  /* read in odd-sized pieces to cross cluster boundaries */
  for (uint64_t off = 0; off < size;) {
    uint32_t n = (uint32_t) (size - off < 300000 ? size - off : 300000);
    cr_assert_eq (ovc_pread (c, buf + off, n, off, &err), 0, "%s", err.msg);
    off += n;
  }
  for (uint64_t i = 0; i < size; i++)
    if (buf[i] != model[i]) { r = i; break; }
  free (buf);
  return r;
}

static inline void
tu_file_equals (const char *path, const unsigned char *model, uint64_t size)
{
  unsigned char *buf = malloc (size);
  int fd = open (path, O_RDONLY);
  cr_assert_geq (fd, 0);
  cr_assert_eq (cbw_pread_full (fd, buf, size, 0), 0);
  close (fd);
  for (uint64_t i = 0; i < size; i++)
    cr_assert_eq (buf[i], model[i], "%s differs from the model at %lu", path,
                  (unsigned long) i);
  free (buf);
}

#endif
