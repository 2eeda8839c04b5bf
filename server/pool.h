/* cbw — server/pool.h: cbwd's worker pool for blocking export I/O.
 *
 * Why not libuv's uv_queue_work: its after-work callback always runs on the
 * loop (a wake-up of the loop thread for every completion batch), and it
 * takes the pool lock once per item.  cbwd's workers finish a request
 * completely themselves (conn.c: they send the reply), so the loop only
 * submits: cbwd_pool_submit() appends a whole batch under one lock and wakes
 * at most as many idle workers as there are new jobs.
 *
 * Locking: `lock` guards the job queue, `idle` and `stop`; it is held only
 * for list and counter updates, never while a job runs.
 */
#ifndef CBWD_POOL_H
#define CBWD_POOL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>

struct cbwd_job {
  struct cbwd_job *next;
  void (*run) (struct cbwd_job *j);   /* on a worker thread; owns j */
};

struct cbwd_pool {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  struct cbwd_job *head, *tail;
  unsigned nthreads, idle;
  bool stop;
  pthread_t *threads;
};

/* Start n workers (stack of stack_size bytes, 0 = default).  0 or -1 with
 * errno set. */
int cbwd_pool_start (struct cbwd_pool *p, unsigned n, size_t stack_size);
/* Append the jobs first..last (linked through ->next, last->next ignored),
 * count of them n.  Never fails, never blocks on a job. */
void cbwd_pool_submit (struct cbwd_pool *p, struct cbwd_job *first,
                       struct cbwd_job *last, size_t n);
/* Let queued jobs finish, then join the workers. */
void cbwd_pool_stop (struct cbwd_pool *p);

#endif
