/* cbw — common/bufcache.c: the process's cache of big I/O buffers, for
 * cbwd's request buffers and the cbw filter's copy buffers (see bufcache.h
 * for why each needs it).  Size classes are powers of two from CBW_BUF_MIN
 * (64 KiB) to CBW_BUF_MAX (32 MiB, also cbwd's largest payload); a free
 * buffer's first bytes link it into its class's list.
 *
 * When the workload changes size (nbdcopy reads 256 KiB requests, then a
 * writer sends 1 MiB ones; or the filter's copies grow from 256 KiB runs
 * to 1 MiB ones), the cache is full of the old class and the peak rule
 * would unmap every new buffer on free: each request then pays a fresh
 * mapping and a page fault per 4 KiB received (bench/cbwd/results.md has
 * the figures of 1 MiB writes after a read phase).  So a buffer that does not
 * fit evicts cached buffers of other classes (largest first) to make room:
 * the cache follows the current workload, and the bounds still hold.
 *
 * Locking: `lock` guards freel[], in_use, cached, peak, cap and maps; no
 * system call runs under it (evicted buffers are unmapped after it).
 */
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "bufcache.h"

#if defined(__SANITIZE_ADDRESS__)
#define CBW_BUF_PLAIN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CBW_BUF_PLAIN 1
#endif
#endif

#define MIN_SHIFT 16                   /* 64 KiB */
#define NCLASS 10                      /* 64 KiB .. 32 MiB */
_Static_assert ((1u << MIN_SHIFT) == CBW_BUF_MIN,
                "the smallest class must be CBW_BUF_MIN");
_Static_assert ((1u << (MIN_SHIFT + NCLASS - 1)) == CBW_BUF_MAX,
                "size classes must reach CBW_BUF_MAX");

struct fbuf { struct fbuf *next; int cls; };   /* in a free buffer's first bytes */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct fbuf *freel[NCLASS];
static uint64_t in_use, cached, peak, maps;
static uint64_t cap = 64ULL << 20;

/* Class index of len, or -1 for small (malloc) or too big. */
static int
class_of (size_t len)
{
  if (len < (1u << MIN_SHIFT) || len > CBW_BUF_MAX) return -1;
  int k = 0;
  while (((size_t) 1 << (MIN_SHIFT + k)) < len) k++;
  return k;
}

void *
cbw_buf_alloc (size_t len)
{
  int k = class_of (len);
  if (k < 0)
    return malloc (len);
  size_t sz = (size_t) 1 << (MIN_SHIFT + k);
  pthread_mutex_lock (&lock);
  struct fbuf *b = freel[k];
  if (b) {
    freel[k] = b->next;
    cached -= sz;
  }
  in_use += sz;
  if (in_use > peak) peak = in_use;
  if (!b) maps++;
  pthread_mutex_unlock (&lock);
  if (b) return b;
#ifdef CBW_BUF_PLAIN
  /* exact size, so ASan sees overflows; page-aligned like a mapping */
  void *p = NULL;
  if (posix_memalign (&p, CBW_BUF_ALIGN, len) == 0) return p;
#else
  void *p = mmap (NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p != MAP_FAILED) return p;
#endif
  pthread_mutex_lock (&lock);
  in_use -= sz;
  pthread_mutex_unlock (&lock);
  errno = ENOMEM;
  return NULL;
}

void
cbw_buf_free (void *p, size_t len)
{
  if (!p) return;
#ifdef CBW_BUF_PLAIN
  /* A free with another length than the alloc would unmap the wrong size
   * or file the buffer in the wrong class in normal builds; ASan's
   * malloc_usable_size is the exact size asked for, so catch it here. */
  if (malloc_usable_size (p) != len) {
    fprintf (stderr, "cbw_buf_free: buffer of %zu bytes freed as %zu\n",
             malloc_usable_size (p), len);
    abort ();
  }
#endif
  int k = class_of (len);
  if (k < 0) {
    free (p);
    return;
  }
  size_t sz = (size_t) 1 << (MIN_SHIFT + k);
  bool keep;
  struct fbuf *victims = NULL;     /* evicted, unmapped after the lock */
  pthread_mutex_lock (&lock);
  in_use -= sz;
#ifdef CBW_BUF_PLAIN
  keep = false;                    /* never cached: ASan sees use-after-free */
  (void) victims;
#else
  keep = in_use + sz <= peak && sz <= cap;
  /* make room by evicting other classes, largest first */
  for (int j = NCLASS - 1; keep && j >= 0 &&
         (in_use + cached + sz > peak || cached + sz > cap); j--) {
    size_t jsz = (size_t) 1 << (MIN_SHIFT + j);
    while (j != k && freel[j] &&
           (in_use + cached + sz > peak || cached + sz > cap)) {
      struct fbuf *v = freel[j];
      freel[j] = v->next;
      cached -= jsz;
      v->next = victims;
      victims = v;
    }
  }
  keep = keep && in_use + cached + sz <= peak && cached + sz <= cap;
#endif
  if (keep) {
    struct fbuf *b = p;
    b->next = freel[k];
    b->cls = k;
    freel[k] = b;
    cached += sz;
  }
  pthread_mutex_unlock (&lock);
#ifndef CBW_BUF_PLAIN
  while (victims) {
    struct fbuf *v = victims;
    victims = v->next;
    munmap (v, (size_t) 1 << (MIN_SHIFT + v->cls));
  }
#endif
  if (keep) return;
#ifdef CBW_BUF_PLAIN
  free (p);
#else
  munmap (p, sz);
#endif
}

void
cbw_bufcache_set_cap (uint64_t bytes)
{
  pthread_mutex_lock (&lock);
  cap = bytes;
  pthread_mutex_unlock (&lock);
}

void
cbw_bufcache_stats (struct cbw_bufcache_stats *s)
{
  pthread_mutex_lock (&lock);
  s->in_use = in_use;
  s->cached = cached;
  s->peak = peak;
  s->maps = maps;
  pthread_mutex_unlock (&lock);
#ifdef CBW_BUF_PLAIN
  s->plain = 1;
#else
  s->plain = 0;
#endif
}
