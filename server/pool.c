/* cbw — server/pool.c: cbwd's worker pool (see pool.h for why it is not
 * libuv's).  A plain FIFO of jobs and N threads waiting on one condition
 * variable.
 *
 * Locking: p->lock guards head/tail/idle/stop.  A worker drops the lock
 * before running a job; the submitter signals only while idle workers exist,
 * once per new job, so a batch of 16 requests costs one lock round trip and
 * at most min(16, idle) wake-ups.
 */
#include <errno.h>
#include <stdlib.h>

#include "pool.h"

static void *
worker (void *arg)
{
  struct cbwd_pool *p = arg;
  pthread_mutex_lock (&p->lock);
  for (;;) {
    while (!p->head && !p->stop) {
      p->idle++;
      pthread_cond_wait (&p->cond, &p->lock);
      p->idle--;
    }
    if (!p->head)              /* stop and nothing left */
      break;
    struct cbwd_job *j = p->head;
    p->head = j->next;
    if (!p->head) p->tail = NULL;
    pthread_mutex_unlock (&p->lock);
    j->run (j);
    pthread_mutex_lock (&p->lock);
  }
  pthread_mutex_unlock (&p->lock);
  return NULL;
}

int
cbwd_pool_start (struct cbwd_pool *p, unsigned n, size_t stack_size)
{
  pthread_mutex_init (&p->lock, NULL);
  pthread_cond_init (&p->cond, NULL);
  p->head = p->tail = NULL;
  p->idle = 0;
  p->stop = false;
  p->nthreads = 0;
  p->threads = calloc (n, sizeof *p->threads);
  if (!p->threads) return -1;
  pthread_attr_t a;
  pthread_attr_init (&a);
  if (stack_size) pthread_attr_setstacksize (&a, stack_size);
  for (unsigned i = 0; i < n; i++) {
    int e = pthread_create (&p->threads[i], &a, worker, p);
    if (e) {
      pthread_attr_destroy (&a);
      if (p->nthreads > 0) break;          /* run with fewer */
      free (p->threads);
      p->threads = NULL;
      errno = e;
      return -1;
    }
    p->nthreads++;
  }
  pthread_attr_destroy (&a);
  return 0;
}

void
cbwd_pool_submit (struct cbwd_pool *p, struct cbwd_job *first,
                  struct cbwd_job *last, size_t n)
{
  last->next = NULL;
  pthread_mutex_lock (&p->lock);
  if (p->tail) p->tail->next = first; else p->head = first;
  p->tail = last;
  if (n >= p->idle)
    pthread_cond_broadcast (&p->cond);
  else
    while (n--) pthread_cond_signal (&p->cond);
  pthread_mutex_unlock (&p->lock);
}

void
cbwd_pool_stop (struct cbwd_pool *p)
{
  if (!p->threads) return;
  pthread_mutex_lock (&p->lock);
  p->stop = true;
  pthread_cond_broadcast (&p->cond);
  pthread_mutex_unlock (&p->lock);
  for (unsigned i = 0; i < p->nthreads; i++)
    pthread_join (p->threads[i], NULL);
  free (p->threads);
  p->threads = NULL;
  pthread_cond_destroy (&p->cond);
  pthread_mutex_destroy (&p->lock);
}
