/* cbw — common/tests/test_bufcache.c: the big I/O buffer cache of cbwd and
 * the cbw filter (common/bufcache.c): buffers are usable for their whole
 * length, freed buffers are reused instead of mapped again, and the cache
 * never holds more than (high-water in use - in use now) nor more than its
 * cap.  In sanitizer builds nothing is cached (cached stays 0) and the same
 * equations hold.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bufcache.h"

static void
check_bounds (uint64_t cap)
{
  struct cbw_bufcache_stats s;
  cbw_bufcache_stats (&s);
  cr_assert_leq (s.in_use + s.cached, s.peak, "cache raised the peak");
  cr_assert_leq (s.cached, cap);
}

Test (bufcache, reuse_and_bounds)
{
  enum { N = 8, SZ = 256 * 1024 };
  void *b[N];
  struct cbw_bufcache_stats s0, s1, s2;
  cbw_bufcache_set_cap (64 << 20);
  cbw_bufcache_stats (&s0);
  for (int i = 0; i < N; i++) {
    b[i] = cbw_buf_alloc (SZ - i);          /* all in the 256 KiB class */
    cr_assert (b[i]);
    memset (b[i], i, SZ - i);
  }
  cbw_bufcache_stats (&s1);
  cr_assert_eq (s1.in_use - s0.in_use, (uint64_t) N * SZ);
  cr_assert_eq (s1.maps - s0.maps, (uint64_t) N - s0.cached / SZ);
  for (int i = 0; i < N; i++) {
    cr_assert_eq (((unsigned char *) b[i])[SZ - i - 1], (unsigned char) i);
    cbw_buf_free (b[i], SZ - i);
    check_bounds (64 << 20);
  }
  cbw_bufcache_stats (&s2);
  cr_assert_eq (s2.in_use, s0.in_use);
  uint64_t kept = s2.cached / SZ;
  /* Again: the kept ones are reused, only the rest are new mappings. */
  for (int i = 0; i < N; i++) {
    b[i] = cbw_buf_alloc (SZ);
    cr_assert (b[i]);
    memset (b[i], 0xee, SZ);
  }
  cbw_bufcache_stats (&s1);
  cr_assert_eq (s1.maps - s2.maps, (uint64_t) N - kept);
  /* A small cap: at most cap bytes stay cached. */
  cbw_bufcache_set_cap (2 * SZ);
  for (int i = 0; i < N; i++) {
    cbw_buf_free (b[i], SZ);
    check_bounds (2 * SZ);
  }
  /* Small buffers come from malloc and do not count. */
  cbw_bufcache_stats (&s0);
  void *p = cbw_buf_alloc (100);
  cr_assert (p);
  cbw_bufcache_stats (&s1);
  cr_assert_eq (s1.in_use, s0.in_use);
  cbw_buf_free (p, 100);
  cbw_buf_free (NULL, 4096);
}

Test (bufcache, size_classes)
{
  /* Every class boundary, including the largest payload, works. */
  static const size_t lens[] = { 65535, 65536, 65537, 1 << 20, (1 << 20) + 1, 32 << 20 };
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    unsigned char *p = cbw_buf_alloc (lens[i]);
    cr_assert (p);
    p[0] = 1;
    p[lens[i] - 1] = 2;
    cbw_buf_free (p, lens[i]);
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
  struct cbw_bufcache_stats s0, s1;
  cbw_bufcache_set_cap (64 << 20);
  for (int i = 0; i < N; i++)                  /* phase 1: 4 MiB of 256K */
    cr_assert (b[i] = cbw_buf_alloc (SMALL));
  for (int i = 0; i < N; i++)
    cbw_buf_free (b[i], SMALL);
  for (int r = 0; r < ROUNDS; r++) {           /* phase 2: 4 x 1 MiB at a time */
    if (r == 1)
      cbw_bufcache_stats (&s0);
    for (int i = 0; i < 4; i++) {
      cr_assert (b[i] = cbw_buf_alloc (BIG));
      memset (b[i], r, BIG);
    }
    for (int i = 0; i < 4; i++) {
      cbw_buf_free (b[i], BIG);
      check_bounds (64 << 20);
    }
  }
  cbw_bufcache_stats (&s1);
  /* (asked at run time: the library may be built with ASan while this
   * file is not, as in the fuzz build) */
  if (s1.plain)
    cr_assert_eq (s1.cached, 0);               /* sanitizer builds never cache */
  else
    cr_assert_eq (s1.maps, s0.maps, "1 MiB buffers were mapped %llu more times "
                  "after the first round (the cache kept the old size class)",
                  (unsigned long long) (s1.maps - s0.maps));
}

/* Sanitizer builds hold callers to "free with the length of the alloc"
 * (a wrong length unmaps the wrong size in normal builds). */
Test (bufcache, wrong_length_aborts_in_sanitizer_builds)
{
  struct cbw_bufcache_stats s;
  cbw_bufcache_stats (&s);
  if (!s.plain)
    cr_skip_test ("only sanitizer builds check lengths");
  static const size_t lens[][2] = {
    { 1 << 20, 256 * 1024 }, { 256 * 1024, 256 * 1024 - 1 }, { 100, 65536 },
  };
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    pid_t pid = fork ();
    cr_assert_neq (pid, -1);
    if (pid == 0) {
      void *p = cbw_buf_alloc (lens[i][0]);
      cbw_buf_free (p, lens[i][1]);
      _exit (0);
    }
    int st;
    cr_assert_eq (waitpid (pid, &st, 0), pid);
    cr_assert (WIFSIGNALED (st) && WTERMSIG (st) == SIGABRT,
               "freeing %zu bytes as %zu was not caught", lens[i][0], lens[i][1]);
  }
  void *p = cbw_buf_alloc (1 << 20);           /* the right length is fine */
  cbw_buf_free (p, 1 << 20);
}

/* Buffers of CBW_BUF_MIN bytes and more are CBW_BUF_ALIGN-aligned in every
 * build (the filter writes them with O_DIRECT), reused ones too. */
Test (bufcache, big_buffers_aligned)
{
  static const size_t sizes[] = { CBW_BUF_MIN, CBW_BUF_MIN + 1, 100000,
                                  1 << 20, (1 << 20) - 512, CBW_BUF_MAX };
  for (int round = 0; round < 2; round++)
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
      char *p = cbw_buf_alloc (sizes[i]);
      cr_assert_not_null (p);
      cr_assert_eq ((uintptr_t) p % CBW_BUF_ALIGN, 0, "%zu bytes at %p",
                    sizes[i], (void *) p);
      p[sizes[i] - 1] = 1;
      cbw_buf_free (p, sizes[i]);
    }
}
