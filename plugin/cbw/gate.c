/* cbw — plugin/cbw/gate.c: the write gate (drain/hold guest writes).
 *
 * Fast path (gate open): one atomic increment of `inflight`, one atomic load
 * of `closers`, and one atomic decrement on leave; no lock.  The two sides
 * pair like Dekker's algorithm with sequentially consistent atomics: a writer
 * increments `inflight` then reads `closers`; a closer increments `closers`
 * then reads `inflight`.  So either the writer sees the gate closed (and
 * backs out, waiting on `cond`), or the closer sees the writer and waits for
 * its leave.  A leaving writer that sees the gate closed takes `lock` and
 * broadcasts, so the closer's wait cannot miss it.
 *
 * Locking: `lock` guards the slow paths and the quiesce fields; `cond` is
 * broadcast on every change a waiter may wait for (inflight reached 0, gate
 * opened).  No I/O is done under `lock`.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "cleanup.h"
#include "gate.h"
#include "target.h"             /* cbw_now_ns */

static _Atomic uint64_t inflight;
static _Atomic int closers;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond;
static pthread_once_t cond_once = PTHREAD_ONCE_INIT;

/* guarded by lock */
static bool quiesced;
static bool quiesce_expired;
static int64_t quiesce_deadline_ns;

static void
init_cond (void)
{
  pthread_condattr_t ca;
  pthread_condattr_init (&ca);
  pthread_condattr_setclock (&ca, CLOCK_MONOTONIC);
  pthread_cond_init (&cond, &ca);
  pthread_condattr_destroy (&ca);
}

static void
to_ts (int64_t ns, struct timespec *ts)
{
  ts->tv_sec = ns / 1000000000;
  ts->tv_nsec = ns % 1000000000;
}

/* With lock held: if a quiesce hold is over, release it. */
static void
expire_quiesce_locked (void)
{
  if (quiesced && cbw_now_ns () >= quiesce_deadline_ns) {
    quiesced = false;
    quiesce_expired = true;
    atomic_fetch_sub (&closers, 1);
    pthread_cond_broadcast (&cond);
  }
}

void
cbw_gate_enter (void)
{
  struct timespec ts;

  atomic_fetch_add (&inflight, 1);
  if (atomic_load (&closers) == 0)
    return;

  /* Slow path: back out, wait for the gate to open, retry. */
  pthread_once (&cond_once, init_cond);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  for (;;) {
    if (atomic_fetch_sub (&inflight, 1) == 1)
      pthread_cond_broadcast (&cond);
    while (atomic_load (&closers) > 0) {
      expire_quiesce_locked ();
      if (atomic_load (&closers) == 0)
        break;
      if (quiesced) {
        to_ts (quiesce_deadline_ns, &ts);
        pthread_cond_timedwait (&cond, &lock, &ts);
      }
      else
        pthread_cond_wait (&cond, &lock);
    }
    atomic_fetch_add (&inflight, 1);
    if (atomic_load (&closers) == 0)
      return;
  }
}

void
cbw_gate_leave (void)
{
  if (atomic_fetch_sub (&inflight, 1) == 1 && atomic_load (&closers) > 0) {
    pthread_once (&cond_once, init_cond);
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
    pthread_cond_broadcast (&cond);
  }
}

int
cbw_gate_close_and_drain (int64_t deadline_ns)
{
  struct timespec ts;

  pthread_once (&cond_once, init_cond);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  atomic_fetch_add (&closers, 1);
  to_ts (deadline_ns, &ts);
  while (atomic_load (&inflight) > 0) {
    if (pthread_cond_timedwait (&cond, &lock, &ts) == ETIMEDOUT &&
        atomic_load (&inflight) > 0) {
      atomic_fetch_sub (&closers, 1);
      pthread_cond_broadcast (&cond);
      return -1;
    }
  }
  return 0;
}

void
cbw_gate_open (void)
{
  pthread_once (&cond_once, init_cond);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  atomic_fetch_sub (&closers, 1);
  pthread_cond_broadcast (&cond);
}

int
cbw_gate_quiesce (int64_t drain_deadline_ns, int64_t hold_ms)
{
  {
    pthread_once (&cond_once, init_cond);
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
    if (quiesced) {
      errno = EBUSY;
      return -1;
    }
  }
  if (cbw_gate_close_and_drain (drain_deadline_ns) == -1) {
    errno = ETIMEDOUT;
    return -1;
  }
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  quiesced = true;
  quiesce_expired = false;
  quiesce_deadline_ns = cbw_now_ns () + hold_ms * 1000000;
  return 0;
}

int
cbw_gate_resume (bool *was_quiesced)
{
  pthread_once (&cond_once, init_cond);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  expire_quiesce_locked ();
  *was_quiesced = quiesced;
  if (quiesced) {
    quiesced = false;
    atomic_fetch_sub (&closers, 1);
    pthread_cond_broadcast (&cond);
    return 0;
  }
  if (quiesce_expired) {
    quiesce_expired = false;
    return -1;
  }
  return 0;
}

bool
cbw_gate_quiesced (void)
{
  pthread_once (&cond_once, init_cond);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  expire_quiesce_locked ();
  return quiesced;
}

uint64_t
cbw_gate_in_flight (void)
{
  return atomic_load (&inflight);
}
