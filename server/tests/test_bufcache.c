/* cbw — server/tests/test_bufcache.c: cbwd's request buffer cache
 * (bufcache.c): buffers are usable for their whole length, freed buffers
 * are reused instead of mapped again, and the cache never holds more than
 * (high-water in use - in use now) nor more than its cap.  In sanitizer
 * builds nothing is cached (cached stays 0) and the same equations hold.
 */
#include <criterion/criterion.h>
#include <string.h>

#include "bufcache.h"

static void
check_bounds (uint64_t cap)
{
  struct cbwd_bufcache_stats s;
  cbwd_bufcache_stats (&s);
  cr_assert_leq (s.in_use + s.cached, s.peak, "cache raised the peak");
  cr_assert_leq (s.cached, cap);
}

Test (bufcache, reuse_and_bounds)
{
  enum { N = 8, SZ = 256 * 1024 };
  void *b[N];
  struct cbwd_bufcache_stats s0, s1, s2;
  cbwd_bufcache_set_cap (64 << 20);
  cbwd_bufcache_stats (&s0);
  for (int i = 0; i < N; i++) {
    b[i] = cbwd_buf_alloc (SZ - i);          /* all in the 256 KiB class */
    cr_assert (b[i]);
    memset (b[i], i, SZ - i);
  }
  cbwd_bufcache_stats (&s1);
  cr_assert_eq (s1.in_use - s0.in_use, (uint64_t) N * SZ);
  cr_assert_eq (s1.maps - s0.maps, (uint64_t) N - s0.cached / SZ);
  for (int i = 0; i < N; i++) {
    cr_assert_eq (((unsigned char *) b[i])[SZ - i - 1], (unsigned char) i);
    cbwd_buf_free (b[i], SZ - i);
    check_bounds (64 << 20);
  }
  cbwd_bufcache_stats (&s2);
  cr_assert_eq (s2.in_use, s0.in_use);
  uint64_t kept = s2.cached / SZ;
  /* Again: the kept ones are reused, only the rest are new mappings. */
  for (int i = 0; i < N; i++) {
    b[i] = cbwd_buf_alloc (SZ);
    cr_assert (b[i]);
    memset (b[i], 0xee, SZ);
  }
  cbwd_bufcache_stats (&s1);
  cr_assert_eq (s1.maps - s2.maps, (uint64_t) N - kept);
  /* A small cap: at most cap bytes stay cached. */
  cbwd_bufcache_set_cap (2 * SZ);
  for (int i = 0; i < N; i++) {
    cbwd_buf_free (b[i], SZ);
    check_bounds (2 * SZ);
  }
  /* Small buffers come from malloc and do not count. */
  cbwd_bufcache_stats (&s0);
  void *p = cbwd_buf_alloc (100);
  cr_assert (p);
  cbwd_bufcache_stats (&s1);
  cr_assert_eq (s1.in_use, s0.in_use);
  cbwd_buf_free (p, 100);
  cbwd_buf_free (NULL, 4096);
}

Test (bufcache, size_classes)
{
  /* Every class boundary, including the largest payload, works. */
  static const size_t lens[] = { 65535, 65536, 65537, 1 << 20, (1 << 20) + 1, 32 << 20 };
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    unsigned char *p = cbwd_buf_alloc (lens[i]);
    cr_assert (p);
    p[0] = 1;
    p[lens[i] - 1] = 2;
    cbwd_buf_free (p, lens[i]);
  }
  check_bounds (64 << 20);
}

/* The workload changes size: after a phase of 256 KiB requests has filled
 * the cache, 1 MiB requests must be served from the cache again after their
 * first round (older classes are evicted to make room), not mapped afresh
 * every time (each fresh mapping pays a page fault per 4 KiB). */
Test (bufcache, follows_a_new_size)
{
  enum { N = 16, SMALL = 256 * 1024, BIG = 1 << 20, ROUNDS = 8 };
  void *b[N];
  struct cbwd_bufcache_stats s0, s1;
  cbwd_bufcache_set_cap (64 << 20);
  for (int i = 0; i < N; i++)                  /* phase 1: 4 MiB of 256K */
    cr_assert (b[i] = cbwd_buf_alloc (SMALL));
  for (int i = 0; i < N; i++)
    cbwd_buf_free (b[i], SMALL);
  for (int r = 0; r < ROUNDS; r++) {           /* phase 2: 4 x 1 MiB at a time */
    if (r == 1)
      cbwd_bufcache_stats (&s0);
    for (int i = 0; i < 4; i++) {
      cr_assert (b[i] = cbwd_buf_alloc (BIG));
      memset (b[i], r, BIG);
    }
    for (int i = 0; i < 4; i++) {
      cbwd_buf_free (b[i], BIG);
      check_bounds (64 << 20);
    }
  }
  cbwd_bufcache_stats (&s1);
  /* (asked at run time: the library may be built with ASan while this
   * file is not, as in the fuzz build) */
  if (s1.plain)
    cr_assert_eq (s1.cached, 0);               /* sanitizer builds never cache */
  else
    cr_assert_eq (s1.maps, s0.maps, "1 MiB buffers were mapped %llu more times "
                  "after the first round (the cache kept the old size class)",
                  (unsigned long long) (s1.maps - s0.maps));
}
