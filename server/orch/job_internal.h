/* cbw — server/orch/job_internal.h: what the three files of push backup
 * jobs share (not for the rest of the orchestrator, which uses the API in
 * orch_internal.h).
 *
 *   job.c         the API (start, pause, speed, cancel, list), job memory,
 *                 the job list and its persistence (STATE/jobs.json);
 *   job_target.c  opening, checking and closing targets (NBD URI, raw file,
 *                 qcow2 file behind a qemu-nbd the job starts);
 *   job_copy.c    the job's thread: the copy engine.
 *
 * Locking is described once, at the top of job.c: o->lock guards the job
 * list, j->lock a job's state and counters; order o->lock then j->lock,
 * neither held across I/O.
 */
#ifndef CBW_ORCH_JOB_INTERNAL_H
#define CBW_ORCH_JOB_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include <libnbd.h>

#include "orch_internal.h"

#define JOB_BS_MAX (1ULL << 30)         /* one block-status query */
#define JOB_ZERO_MAX (1ULL << 30)       /* one write-zeroes request */
#define JOB_PROGRESS_EVERY_NS (2LL * 1000000000)
#define JOB_RELEASE_BATCH (64ULL << 20)
#define JOB_RELEASE_EVERY_NS (250LL * 1000000)
#define JOB_DRAIN_NS (30LL * 1000000000)

/* job.c */
/* Running or paused; caller holds j->lock. */
bool job_active (const struct orch_job *j);
/* Rewrite STATE/jobs.json; a failure is reported on stderr (the file only
 * serves to report interrupted jobs after a restart).  No lock held. */
void jobs_save_or_report (struct cbw_orch *o);

/* job_target.c */
bool job_is_nbd_uri (const char *s);
/* A helper process (qemu-nbd): wait for its exit up to ms, then TERM/KILL.
 * is_child: ours to reap; otherwise a process of a previous cbwd. */
void job_helper_stop (pid_t pid, int ms, bool is_child);
/* Open (or create) the target of one disk; control thread, no lock held.
 * An NBD URI target is only checked here and connected later on the job's
 * thread (job_target_connect). */
int job_target_open (struct cbw_orch *o, struct orch_job *j, struct orch_job_disk *jd,
                     const struct orch_protect *ps, bool incremental, struct cbw_err *err);
/* Connect to an NBD target and check it (identity, size, read-only); on the
 * job's thread, within the job's connect timeout.  ECANCELED if cancelled. */
int job_target_connect (struct cbw_orch *o, struct orch_job *j, struct orch_job_disk *jd,
                        const char *uri, struct cbw_err *err);
/* Undo job_target_open after a job-start failure (a file it created goes). */
void job_target_abandon (struct orch_job_disk *jd);
/* The job's end: close the target, stop its qemu-nbd. */
void job_target_close (struct orch_job_disk *jd);

/* job_copy.c */
/* The job's thread (pthread start routine, arg = the job). */
void *job_thread (void *arg);

static inline bool
job_handle_live (struct nbd_handle *h)
{
  return h && !nbd_aio_is_dead (h) && !nbd_aio_is_closed (h);
}

#endif /* CBW_ORCH_JOB_INTERNAL_H */
