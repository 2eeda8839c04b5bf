/* cbw — server/orch/job.c: push backup jobs, their API and their list.  A
 * job copies the point-in-time view of each of its disks (the PIT export
 * that backup-begin made) to a target: an NBD URI, a raw file or a qcow2
 * file (job_target.c), on a thread of its own (job_copy.c).  This file
 * starts jobs (checks the request, takes the backup's disks, plans what to
 * copy, opens the targets, starts the thread) and controls them: speed
 * limit (bytes/s of data read, changeable while running), pause (no new
 * requests; in-flight ones finish), resume, cancel (in-flight requests
 * drain, the target is left as is), progress.  Final state: completed,
 * cancelled or failed with a message.  Events: job-started, job-progress
 * (at most every 2 s), job-paused, job-resumed, job-completed,
 * job-cancelled, job-failed.
 *
 * What is copied: the whole disk (full), or only the extents dirty in the
 * backup's bitmap (incremental, onto the previous full copy; top, the top
 * overlay's clusters, onto any target), widened to the cbw session's
 * blocks so that the copy engine can release every range it copied.
 *
 * Persistence: STATE_DIR/jobs.json (crash-atomic, written when a job starts
 * and when it ends) so that a job that was running when cbwd stopped or
 * crashed is reported as failed ("interrupted") after the restart, and the
 * qemu-nbd it had started is stopped.  Job progress is not persisted.
 *
 * Locking: o->lock guards the job list (o->jobs, o->njobs) only; each job's
 * j->lock guards its state, flags, speed and counters.  Order: o->lock, then
 * j->lock; neither is held across I/O, events are emitted with neither held.
 * jobs_save_lock only serialises writers of jobs.json (it guards no memory).
 * The copy thread owns the handles, buffers and plan of its job.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "fileutil.h"
#include "job_internal.h"

#define JOB_FILE "jobs.json"
#define JOB_FILE_FORMAT "cbwd-jobs"
#define JOB_KEEP_FINISHED 64

static pthread_mutex_t jobs_save_lock = PTHREAD_MUTEX_INITIALIZER;


const char *
orch_job_state_name (enum orch_job_state s)
{
  switch (s) {
  case ORCH_JOB_RUNNING: return "running";
  case ORCH_JOB_PAUSED: return "paused";
  case ORCH_JOB_COMPLETED: return "completed";
  case ORCH_JOB_CANCELLED: return "cancelled";
  case ORCH_JOB_FAILED: return "failed";
  }
  return "?";
}

bool
job_active (const struct orch_job *j)
{
  return j->state == ORCH_JOB_RUNNING || j->state == ORCH_JOB_PAUSED;
}

/* ---------------------------------------------------------------- */
/* JSON view (status, list, jobs.json); caller holds j->lock. */

static struct json_object *
job_to_json_locked (const struct orch_job *j, bool for_file)
{
  struct json_object *o = json_object_new_object ();
  json_object_object_add (o, "id", json_object_new_string (j->id));
  json_object_object_add (o, "backup", json_object_new_string (j->backup));
  json_object_object_add (o, "mode", json_object_new_string (orch_backup_mode_name (j->mode)));
  json_object_object_add (o, "state", json_object_new_string (orch_job_state_name (j->state)));
  json_object_object_add (o, "error", j->error[0] ? json_object_new_string (j->error) : NULL);
  json_object_object_add (o, "started", json_object_new_int64 (j->started));
  json_object_object_add (o, "finished", json_object_new_int64 (j->finished));
  if (j->t0_ns)
    json_object_object_add (o, "elapsed-ms",
                            json_object_new_int64 (((j->t1_ns ? j->t1_ns : orch_now_ns ()) - j->t0_ns) / 1000000));
  json_object_object_add (o, "speed", json_object_new_int64 ((int64_t) j->speed));
  json_object_object_add (o, "bytes-done", json_object_new_int64 ((int64_t) j->done));
  json_object_object_add (o, "bytes-total", json_object_new_int64 ((int64_t) j->total));
  json_object_object_add (o, "percent", json_object_new_double (j->total ? 100.0 * (double) j->done / (double) j->total : (j->state == ORCH_JOB_COMPLETED ? 100.0 : 0.0)));
  json_object_object_add (o, "data-bytes", json_object_new_int64 ((int64_t) j->data_bytes));
  json_object_object_add (o, "zero-bytes", json_object_new_int64 ((int64_t) j->zero_bytes));
  json_object_object_add (o, "released-bytes", json_object_new_int64 ((int64_t) j->released));
  json_object_object_add (o, "release-errors", json_object_new_int64 ((int64_t) j->release_errors));
  if (j->release_error[0])
    json_object_object_add (o, "last-release-error", json_object_new_string (j->release_error));
  json_object_object_add (o, "in-flight", json_object_new_int (j->in_flight));
  json_object_object_add (o, "requests", json_object_new_int ((int) j->requests));
  json_object_object_add (o, "request-size", json_object_new_int64 ((int64_t) j->request_size));
  if (for_file)
    json_object_object_add (o, "backup-started", json_object_new_int64 (j->backup_started));
  struct json_object *a = json_object_new_array ();
  for (size_t i = 0; i < j->ndisks; i++) {
    const struct orch_job_disk *jd = &j->disks[i];
    struct json_object *d = json_object_new_object ();
    json_object_object_add (d, "name", json_object_new_string (jd->name));
    json_object_object_add (d, "target", json_object_new_string (jd->target ? jd->target : ""));
    json_object_object_add (d, "format", json_object_new_string (jd->format));
    json_object_object_add (d, "created", json_object_new_boolean (jd->fresh));
    json_object_object_add (d, "bytes-done", json_object_new_int64 ((int64_t) jd->done));
    json_object_object_add (d, "bytes-total", json_object_new_int64 ((int64_t) jd->total));
    json_object_object_add (d, "released-bytes", json_object_new_int64 ((int64_t) jd->released));
    if (for_file) {
      json_object_object_add (d, "helper-pid", json_object_new_int64 (jd->helper_pid));
      json_object_object_add (d, "helper-socket",
                              json_object_new_string (jd->helper_sock ? jd->helper_sock : ""));
    }
    json_object_array_add (a, d);
  }
  json_object_object_add (o, "disks", a);
  return o;
}

struct json_object *
orch_job_to_json (struct orch_job *j)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
  return job_to_json_locked (j, false);
}

/* Save every job to STATE/jobs.json.  Errors are reported, not fatal: the
 * file only serves to report interrupted jobs after a restart. */
static int
jobs_save (struct cbw_orch *o, struct cbw_err *err)
{
  struct json_object *root = json_object_new_object ();
  struct json_object *a = json_object_new_array ();
  json_object_object_add (root, "format", json_object_new_string (JOB_FILE_FORMAT));
  json_object_object_add (root, "version", json_object_new_int (1));
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    for (size_t i = 0; i < o->njobs; i++) {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->jobs[i]->lock);
      json_object_array_add (a, job_to_json_locked (o->jobs[i], true));
    }
  }
  json_object_object_add (root, "jobs", a);
  const char *s = json_object_to_json_string_ext (root, JSON_C_TO_STRING_PRETTY);
  CLEANUP_FREE char *path = orch_strdup_printf ("%s/%s", o->state_dir, JOB_FILE);
  int r;
  if (path == NULL)
    r = cbw_err_set (err, ENOMEM, "out of memory");
  else {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&jobs_save_lock);
    r = cbw_write_file_atomic (path, s, strlen (s), err);
  }
  json_object_put (root);
  return r;
}

void
jobs_save_or_report (struct cbw_orch *o)
{
  struct cbw_err e = { 0 };
  if (jobs_save (o, &e) < 0)
    fprintf (stderr, "cbwd: saving the job list: %s\n", e.msg);
}

/* ---------------------------------------------------------------- */
/* Job memory */

static void
job_disk_clear (struct orch_job_disk *jd)
{
  if (jd->dst)
    nbd_close (jd->dst);
  jd->dst = NULL;
  if (jd->fd >= 0)
    close (jd->fd);
  jd->fd = -1;
  if (jd->pin_fd >= 0)
    close (jd->pin_fd);
  jd->pin_fd = -1;
  free (jd->src_uri); free (jd->ctl_cbw); free (jd->target); free (jd->path);
  free (jd->helper_sock); free (jd->helper_log); free (jd->want);
  jd->src_uri = jd->ctl_cbw = jd->target = jd->path = NULL;
  jd->helper_sock = jd->helper_log = NULL;
  jd->want = NULL;
}

static void
job_free (struct orch_job *j)
{
  if (j == NULL)
    return;
  for (size_t i = 0; i < j->ndisks; i++)
    job_disk_clear (&j->disks[i]);
  free (j->disks);
  if (j->wakefd >= 0)
    close (j->wakefd);
  pthread_mutex_destroy (&j->lock);
  pthread_cond_destroy (&j->cond);
  free (j);
}

static struct orch_job *
job_new (size_t ndisks)
{
  struct orch_job *j = calloc (1, sizeof *j);
  if (j == NULL)
    return NULL;
  j->disks = calloc (ndisks ? ndisks : 1, sizeof *j->disks);
  if (j->disks == NULL) {
    free (j);
    return NULL;
  }
  pthread_mutex_init (&j->lock, NULL);
  pthread_cond_init (&j->cond, NULL);
  j->wakefd = -1;
  for (size_t i = 0; i < ndisks; i++) {
    j->disks[i].fd = -1;
    j->disks[i].pin_fd = -1;
    snprintf (j->disks[i].format, sizeof j->disks[i].format, "raw");
  }
  j->ndisks = ndisks;
  return j;
}

static void
wake (struct orch_job *j)
{
  uint64_t one = 1;
  if (j->wakefd >= 0 && write (j->wakefd, &one, sizeof one) < 0) {
    /* the counter is saturated: the thread is awake anyway */
  }
}


/* ---------------------------------------------------------------- */
/* The API used by commands.c */

static struct orch_job *
find_job_locked (struct cbw_orch *o, const char *id)
{
  for (size_t i = 0; i < o->njobs; i++)
    if (strcmp (o->jobs[i]->id, id) == 0)
      return o->jobs[i];
  return NULL;
}

/* The job named id, or NULL and ENOENT in *err (o->lock held). */
static struct orch_job *
lookup_locked (struct cbw_orch *o, const char *id, struct cbw_err *err)
{
  struct orch_job *j = find_job_locked (o, id);
  if (j == NULL)
    cbw_err_set (err, ENOENT, "no job named %.80s", id);
  return j;
}

struct orch_job *
orch_job_find (struct cbw_orch *o, const char *id)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  return find_job_locked (o, id);
}

/* Drop the oldest finished jobs beyond JOB_KEEP_FINISHED (o->lock held). */
static void
trim_finished_locked (struct cbw_orch *o)
{
  size_t finished = 0;
  for (size_t i = 0; i < o->njobs; i++) {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->jobs[i]->lock);
    finished += !job_active (o->jobs[i]);
  }
  for (size_t i = 0; i < o->njobs && finished > JOB_KEEP_FINISHED;) {
    struct orch_job *j = o->jobs[i];
    bool active;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
      active = job_active (j);
    }
    if (!active && !j->thread_started) {
      memmove (&o->jobs[i], &o->jobs[i + 1], (o->njobs - i - 1) * sizeof *o->jobs);
      o->njobs--;
      finished--;
      job_free (j);
    }
    else
      i++;
  }
}

/* Split "DISK=TARGET"; a string without a known disk before '=' is the
 * target of the only disk. */
static int
assign_target (struct orch_job *j, const char *spec, struct cbw_err *err)
{
  const char *eq = strchr (spec, '=');
  struct orch_job_disk *jd = NULL;
  const char *t = spec;
  if (eq && eq > spec && (size_t) (eq - spec) <= ORCH_NAME_MAX) {
    char name[ORCH_NAME_MAX + 1];
    snprintf (name, sizeof name, "%.*s", (int) (eq - spec), spec);
    if (orch_valid_name (name) && !job_is_nbd_uri (spec)) {
      for (size_t i = 0; i < j->ndisks; i++)
        if (strcmp (j->disks[i].name, name) == 0)
          jd = &j->disks[i];
      if (jd == NULL)
        return cbw_err_set (err, EINVAL, "target \"%.200s\": %s is not a disk of this job",
                            spec, name);
      t = eq + 1;
    }
  }
  if (jd == NULL) {
    if (j->ndisks != 1)
      return cbw_err_set (err, EINVAL, "target \"%.200s\": name its disk (DISK=TARGET): "
                          "the job has %zu disks", spec, j->ndisks);
    jd = &j->disks[0];
  }
  if (t[0] == '\0')
    return cbw_err_set (err, EINVAL, "empty target for disk %s", jd->name);
  if (jd->target)
    return cbw_err_set (err, EINVAL, "disk %s has two targets", jd->name);
  jd->target = strdup (t);
  return jd->target ? 0 : cbw_err_set (err, ENOMEM, "out of memory");
}

static int
job_check_req (const struct orch_job_req *r, struct cbw_err *err)
{
  if (r->id && r->id[0] && !orch_valid_name (r->id))
    return cbw_err_set (err, EINVAL, "invalid job id \"%.80s\"", r->id);
  if (r->request_size < 65536 || r->request_size > (32u << 20) ||
      (r->request_size & (r->request_size - 1)))
    return cbw_err_set (err, EINVAL, "request-size must be a power of two from 64 KiB to 32 MiB");
  if (r->requests > 64)
    return cbw_err_set (err, EINVAL, "requests must be 1..64 (0: automatic)");
  if (r->ntargets == 0)
    return cbw_err_set (err, EINVAL, "no target given (\"targets\": [\"DISK=TARGET\", ...])");
  return 0;
}

/* Disk i of the job: disk `name` of backup b, copied (o->lock held). */
static int
job_disk_from_backup_locked (struct cbw_orch *o, struct orch_job *j, size_t i,
                             const struct orch_backup *b, const char *name,
                             struct cbw_err *err)
{
  struct orch_backup_disk *bd = NULL;
  for (size_t k = 0; k < b->ndisks; k++)
    if (strcmp (b->disks[k].name, name) == 0)
      bd = &b->disks[k];
  struct orch_disk *d = orch_find_disk (&o->st, name);
  if (bd == NULL || d == NULL)
    return cbw_err_set (err, ENOENT, "disk %.80s is not part of backup %s", name, b->id);
  for (size_t k = 0; k < i; k++)
    if (strcmp (j->disks[k].name, name) == 0)
      return cbw_err_set (err, EINVAL, "disk %s listed twice", name);
  if (bd->offline)
    /* A push job follows and releases a copy-before-write session, which a
     * stopped disk does not have. */
    return cbw_err_set (err, EINVAL, "disk %s is backed up offline (stopped): push jobs "
                        "need a running disk; pull its export %s instead (nbdcopy, "
                        "qemu-img convert)", name, bd->pit_uri ? bd->pit_uri : "");
  struct orch_job_disk *jd = &j->disks[i];
  snprintf (jd->name, sizeof jd->name, "%s", name);
  jd->src_uri = strdup (bd->pit_uri ? bd->pit_uri : "");
  jd->ctl_cbw = strdup (d->ctl_cbw);
  jd->size = d->size;
  jd->disk = d;
  if (bd->bitmap)
    snprintf (jd->bitmap, sizeof jd->bitmap, "%s", bd->bitmap);
  if (!jd->src_uri || !jd->ctl_cbw)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (jd->size == 0)
    return cbw_err_set (err, EIO, "disk %s: size unknown", name);
  j->pipelined = bd->export_name != NULL;
  return 0;
}

/* A disk whose PIT a job has already released cannot be pushed again
 * (released ranges read as EIO), nor can two jobs run on one disk
 * (o->lock held). */
static int
job_check_conflicts_locked (struct cbw_orch *o, const struct orch_job *j, struct cbw_err *err)
{
  for (size_t k = 0; k < o->njobs; k++) {
    struct orch_job *p = o->jobs[k];
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
    if (p->backup_ended || strcmp (p->backup, j->backup) != 0 ||
        p->backup_started != j->backup_started)
      continue;
    for (size_t a = 0; a < p->ndisks; a++)
      for (size_t c = 0; c < j->ndisks; c++)
        if (strcmp (p->disks[a].name, j->disks[c].name) == 0 &&
            (job_active (p) || p->disks[a].released > 0))
          return cbw_err_set (err, EBUSY, "disk %s of backup %s %s job %s; begin a new "
                              "backup to push it again", j->disks[c].name, j->backup,
                              job_active (p) ? "is being pushed by" : "was released by",
                              p->id);
  }
  return 0;
}

/* The job's id: the requested one, or the next free job-N (o->lock held). */
static int
job_name_locked (struct cbw_orch *o, struct orch_job *j, const char *id, struct cbw_err *err)
{
  if (id && id[0]) {
    if (find_job_locked (o, id))
      return cbw_err_set (err, EEXIST, "job %s already exists", id);
    snprintf (j->id, sizeof j->id, "%s", id);
  }
  else
    do
      snprintf (j->id, sizeof j->id, "job-%" PRIu64, ++o->job_seq);
    while (find_job_locked (o, j->id));
  return 0;
}

/* A new job on the running backup's disks, copied under o->lock; NULL and
 * *err on failure. */
static struct orch_job *
job_from_backup (struct cbw_orch *o, const struct orch_job_req *r, struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  struct orch_backup *b = o->st.backup;
  if (b == NULL) {
    cbw_err_set (err, ENOENT, "no backup is running (begin one first)");
    return NULL;
  }
  if (r->backup && r->backup[0] && strcmp (r->backup, b->id) != 0) {
    cbw_err_set (err, ENOENT, "no backup named %.80s (running: %s)", r->backup, b->id);
    return NULL;
  }
  size_t nd = r->ndisks ? r->ndisks : b->ndisks;
  struct orch_job *j = job_new (nd);
  if (j == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    return NULL;
  }
  j->mode = b->mode == ORCH_BACKUP_NONE ? ORCH_BACKUP_FULL : b->mode;
  snprintf (j->backup, sizeof j->backup, "%s", b->id);
  j->backup_started = b->started;
  for (size_t i = 0; i < nd; i++)
    if (job_disk_from_backup_locked (o, j, i, b, r->ndisks ? r->disks[i] : b->disks[i].name,
                                     err) < 0)
      goto fail;
  if (job_check_conflicts_locked (o, j, err) < 0 || job_name_locked (o, j, r->id, err) < 0)
    goto fail;
  return j;

 fail:
  job_free (j);
  return NULL;
}

/* Every disk gets exactly one target, no two disks the same one (by
 * name; job_open_targets compares the files). */
static int
job_assign_targets (struct orch_job *j, const struct orch_job_req *r, struct cbw_err *err)
{
  for (size_t i = 0; i < r->ntargets; i++)
    if (assign_target (j, r->targets[i], err) < 0)
      return -1;
  for (size_t i = 0; i < j->ndisks; i++) {
    if (j->disks[i].target == NULL)
      return cbw_err_set (err, EINVAL, "no target for disk %s", j->disks[i].name);
    for (size_t k = 0; k < i; k++)
      if (strcmp (j->disks[k].target, j->disks[i].target) == 0)
        return cbw_err_set (err, EINVAL, "disks %s and %s have the same target",
                            j->disks[k].name, j->disks[i].name);
  }
  return 0;
}

/* jd->want from the dirty extents ext ([[offset, length], ...]), widened
 * to whole session blocks (what the session protects) and merged. */
static int
job_want_from_extents (struct orch_job_disk *jd, struct json_object *ext, struct cbw_err *err)
{
  size_t n = json_object_array_length (ext);
  jd->want = calloc (n ? n : 1, sizeof *jd->want);
  if (jd->want == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  for (size_t k = 0; k < n; k++) {
    struct json_object *e = json_object_array_get_idx (ext, k);
    uint64_t off = (uint64_t) json_object_get_int64 (json_object_array_get_idx (e, 0));
    uint64_t len = (uint64_t) json_object_get_int64 (json_object_array_get_idx (e, 1));
    if (len == 0 || off >= jd->size || len > jd->size - off)
      continue;
    uint64_t a = off / jd->gran * jd->gran;
    uint64_t b = (off + len + jd->gran - 1) / jd->gran * jd->gran;
    if (b > jd->size)
      b = jd->size;
    if (jd->nwant && jd->want[jd->nwant - 1][0] + jd->want[jd->nwant - 1][1] >= a) {
      uint64_t e0 = jd->want[jd->nwant - 1][0];
      if (b > e0 + jd->want[jd->nwant - 1][1])
        jd->want[jd->nwant - 1][1] = b - e0;
    }
    else {
      jd->want[jd->nwant][0] = a;
      jd->want[jd->nwant][1] = b - a;
      jd->nwant++;
    }
  }
  return 0;
}

/* What to copy of one disk, and its session's block size (for aligned
 * releases).  Unlocked I/O: the disks stay put while we are the busy
 * owner.  ranged: only the backup bitmap's extents (incremental, top). */
static int
job_plan_disk (struct orch_job *j, struct orch_job_disk *jd, bool ranged, struct cbw_err *err)
{
  struct json_object *st = orch_mod_call (jd->ctl_cbw, "status", NULL, NULL, 0, err), *g, *s;
  if (st == NULL)
    return cbw_err_prefix (err, "disk %s: session status", jd->name);
  bool active = json_object_object_get_ex (st, "state", &s) &&
    strcmp (json_object_get_string (s), "active") == 0;
  if (json_object_object_get_ex (st, "granularity", &g) && json_object_get_int64 (g) > 0)
    jd->gran = (uint64_t) json_object_get_int64 (g);
  json_object_put (st);
  if (!active)
    return cbw_err_set (err, EIO, "disk %s: the copy-before-write session is not active "
                        "(broken or ended): its point in time cannot be read", jd->name);
  if (jd->gran == 0 || (jd->gran & (jd->gran - 1)))
    jd->gran = 65536;
  if (ranged) {
    uint64_t dirty;
    struct json_object *ext = orch_bm_extents (jd->disk, jd->bitmap, jd->size, 1u << 20,
                                               &dirty, err);
    if (ext == NULL)
      return cbw_err_prefix (err, "disk %s: dirty extents of %s", jd->name, jd->bitmap);
    int r = job_want_from_extents (jd, ext, err);
    json_object_put (ext);
    if (r < 0)
      return -1;
  }
  else {
    jd->want = calloc (1, sizeof *jd->want);
    if (jd->want == NULL)
      return cbw_err_set (err, ENOMEM, "out of memory");
    jd->want[0][0] = 0;
    jd->want[0][1] = jd->size;
    jd->nwant = 1;
  }
  for (size_t k = 0; k < jd->nwant; k++)
    jd->total += jd->want[k][1];
  j->total += jd->total;
  return 0;
}

/* Open every disk's target.  What a target must never be is collected
 * now and checked on what each job_target_open actually opens (device and
 * inode, not names); two names of one file are one target. */
static int
job_open_targets (struct cbw_orch *o, struct orch_job *j, bool incremental,
                  struct cbw_err *err)
{
  struct orch_protect ps;
  if (orch_protect_collect (o, &ps, err) < 0)
    return -1;
  int tr = 0;
  for (size_t i = 0; i < j->ndisks && tr == 0; i++)
    if ((tr = job_target_open (o, j, &j->disks[i], &ps, incremental, err)) < 0)
      cbw_err_prefix (err, "disk %s", j->disks[i].name);
  orch_protect_free (&ps);
  if (tr < 0)
    return -1;
  for (size_t i = 0; i < j->ndisks; i++)
    for (size_t k = 0; k < i; k++) {
      int fi = j->disks[i].fd >= 0 ? j->disks[i].fd : j->disks[i].pin_fd;
      int fk = j->disks[k].fd >= 0 ? j->disks[k].fd : j->disks[k].pin_fd;
      struct stat si, sk;
      if (fi >= 0 && fk >= 0 && fstat (fi, &si) == 0 && fstat (fk, &sk) == 0 &&
          si.st_dev == sk.st_dev && si.st_ino == sk.st_ino)
        return cbw_err_set (err, EINVAL, "disks %s and %s have the same target (%s and %s "
                            "are one file)", j->disks[k].name, j->disks[i].name,
                            j->disks[k].path, j->disks[i].path);
    }
  return 0;
}

/* Put the job on the list, record it and start its thread.  On failure
 * the job is off the list again and the caller frees it. */
static int
job_launch (struct cbw_orch *o, struct orch_job *j, struct cbw_err *err)
{
  j->wakefd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (j->wakefd < 0)
    return cbw_err_set (err, errno, "eventfd: %s", strerror (errno));
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    struct orch_job **nj = realloc (o->jobs, (o->njobs + 1) * sizeof *nj);
    if (nj == NULL)
      return cbw_err_set (err, ENOMEM, "out of memory");
    o->jobs = nj;
    o->jobs[o->njobs++] = j;
    trim_finished_locked (o);
  }
  /* Recorded before the copy starts: a crash from now on is reported. */
  jobs_save_or_report (o);
  int e = pthread_create (&j->thread, NULL, job_thread, j);
  if (e != 0) {
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
      o->njobs--;
    }
    jobs_save_or_report (o);
    return cbw_err_set (err, e, "cannot start the job thread: %s", strerror (e));
  }
  j->thread_started = true;
  struct json_object *d = json_object_new_object ();
  json_object_object_add (d, "job", json_object_new_string (j->id));
  json_object_object_add (d, "backup", json_object_new_string (j->backup));
  json_object_object_add (d, "mode", json_object_new_string (orch_backup_mode_name (j->mode)));
  json_object_object_add (d, "bytes-total", json_object_new_int64 ((int64_t) j->total));
  orch_event (o, "job-started", d);
  return 0;
}

int
orch_job_start (struct cbw_orch *o, const struct orch_job_req *r,
                struct json_object **ret, struct cbw_err *err)
{
  if (job_check_req (r, err) < 0)
    return -1;
  struct orch_job *j = job_from_backup (o, r, err);
  if (j == NULL)
    return -1;
  j->o = o;
  j->speed = r->speed;
  j->request_size = r->request_size;
  j->connect_timeout = r->connect_timeout ? r->connect_timeout : 30;
  /* Automatic: the filter's PIT export gets one connection per request,
   * and nbdkit's CPU per byte grows with the number of connections
   * (16 x 256 KiB requests cost twice the nbdkit CPU of 8, with no gain). */
  j->requests = r->requests ? r->requests : j->pipelined ? 16 : 8;
  j->started = (int64_t) time (NULL);
  j->state = ORCH_JOB_RUNNING;

  bool incremental = j->mode == ORCH_BACKUP_INCREMENTAL;
  /* top: only the backup bitmap's extents too, but onto any target (a new
   * one then holds just the top overlay's clusters) */
  bool ranged = incremental || j->mode == ORCH_BACKUP_TOP;
  if (job_assign_targets (j, r, err) < 0)
    goto fail;
  for (size_t i = 0; i < j->ndisks; i++)
    if (job_plan_disk (j, &j->disks[i], ranged, err) < 0)
      goto fail;
  if (job_open_targets (o, j, incremental, err) < 0 || job_launch (o, j, err) < 0)
    goto fail;
  *ret = orch_job_to_json (j);
  return 0;

 fail:
  for (size_t i = 0; i < j->ndisks; i++)
    job_target_abandon (&j->disks[i]);
  job_free (j);
  return -1;
}

int
orch_job_pause (struct cbw_orch *o, const char *id, bool pause, struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  struct orch_job *j = lookup_locked (o, id, err);
  if (j == NULL)
    return -1;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
    if (!job_active (j) || j->cancel_req)
      return cbw_err_set (err, EALREADY, "job %s is %s: it cannot be %s", id,
                          j->cancel_req && job_active (j) ? "being cancelled"
                          : orch_job_state_name (j->state), pause ? "paused" : "resumed");
    if (pause && j->state == ORCH_JOB_PAUSED)
      return cbw_err_set (err, EALREADY, "job %s is already paused", id);
    if (!pause && j->state == ORCH_JOB_RUNNING)
      return cbw_err_set (err, EALREADY, "job %s is not paused", id);
    j->state = pause ? ORCH_JOB_PAUSED : ORCH_JOB_RUNNING;
    j->paused_drained = false;
  }
  wake (j);
  struct json_object *d = json_object_new_object ();
  json_object_object_add (d, "job", json_object_new_string (id));
  orch_event_locked (o, pause ? "job-paused" : "job-resumed", d);
  return 0;
}

int
orch_job_set_speed (struct cbw_orch *o, const char *id, uint64_t speed, struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  struct orch_job *j = lookup_locked (o, id, err);
  if (j == NULL)
    return -1;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
  if (!job_active (j))
    return cbw_err_set (err, EALREADY, "job %s is %s: its speed cannot change", id,
                        orch_job_state_name (j->state));
  j->speed = speed;
  wake (j);
  return 0;
}

/* Ask the thread to stop and wait for it (join). */
static void
cancel_and_join (struct orch_job *j)
{
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
    j->cancel_req = true;
  }
  wake (j);
  if (j->thread_started) {
    pthread_join (j->thread, NULL);
    j->thread_started = false;
  }
}

int
orch_job_cancel (struct cbw_orch *o, const char *id, struct json_object **ret,
                 struct cbw_err *err)
{
  struct orch_job *j;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    if ((j = lookup_locked (o, id, err)) == NULL)
      return -1;
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
    if (!job_active (j))
      return cbw_err_set (err, EALREADY, "job %s is %s already", id,
                          orch_job_state_name (j->state));
  }
  /* The caller is the busy owner: nothing removes j meanwhile. */
  cancel_and_join (j);
  *ret = orch_job_to_json (j);
  return 0;
}

int
orch_jobs_cancel_backup (struct cbw_orch *o, const char *backup_id)
{
  int n = 0;
  for (;;) {
    struct orch_job *victim = NULL;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
      for (size_t i = 0; i < o->njobs && !victim; i++) {
        struct orch_job *j = o->jobs[i];
        ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
        if ((backup_id == NULL || strcmp (j->backup, backup_id) == 0) &&
            (job_active (j) || j->thread_started))
          victim = j;
      }
    }
    if (victim == NULL)
      break;
    bool was_active;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&victim->lock);
      was_active = job_active (victim);
    }
    cancel_and_join (victim);
    n += was_active;
  }
  /* The backup ends: its jobs no longer stand in the way of a new backup
   * with the same id (see the released-disk check in job start). */
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  for (size_t i = 0; i < o->njobs; i++) {
    struct orch_job *j = o->jobs[i];
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
    if (backup_id == NULL || strcmp (j->backup, backup_id) == 0)
      j->backup_ended = true;
  }
  return n;
}

struct json_object *
orch_jobs_list (struct cbw_orch *o)
{
  struct json_object *a = json_object_new_array ();
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  for (size_t i = 0; i < o->njobs; i++)
    json_object_array_add (a, orch_job_to_json (o->jobs[i]));
  return a;
}

/* One disk of a job of the previous run; the qemu-nbd it had started, if
 * still running (and still that process), is stopped. */
static void
job_disk_from_json (struct orch_job_disk *jd, struct json_object *y)
{
  struct json_object *v;
  if (!json_object_is_type (y, json_type_object))
    return;
  if (json_object_object_get_ex (y, "name", &v) && orch_valid_name (json_object_get_string (v)))
    snprintf (jd->name, sizeof jd->name, "%s", json_object_get_string (v));
  if (json_object_object_get_ex (y, "target", &v))
    jd->target = strdup (json_object_get_string (v));
  if (json_object_object_get_ex (y, "format", &v))
    snprintf (jd->format, sizeof jd->format, "%s", json_object_get_string (v));
  if (json_object_object_get_ex (y, "released-bytes", &v) && json_object_get_int64 (v) > 0)
    jd->released = (uint64_t) json_object_get_int64 (v);
  if (json_object_object_get_ex (y, "bytes-done", &v) && json_object_get_int64 (v) > 0)
    jd->done = (uint64_t) json_object_get_int64 (v);
  if (json_object_object_get_ex (y, "bytes-total", &v) && json_object_get_int64 (v) > 0)
    jd->total = (uint64_t) json_object_get_int64 (v);
  int64_t hp = json_object_object_get_ex (y, "helper-pid", &v) ? json_object_get_int64 (v) : 0;
  const char *hs = json_object_object_get_ex (y, "helper-socket", &v)
    ? json_object_get_string (v) : "";
  if (hp > 0 && hs[0] && orch_pid_cmdline_has (hp, hs, false)) {
    job_helper_stop ((pid_t) hp, 0, false);
    unlink (hs);
  }
}

/* The final state of a loaded job: one that was running (or paused) when
 * the previous cbwd stopped is failed, interrupted, and reported. */
static void
job_settle_loaded (struct cbw_orch *o, struct orch_job *j, const char *state)
{
  if (strcmp (state, "completed") == 0)
    j->state = ORCH_JOB_COMPLETED;
  else if (strcmp (state, "cancelled") == 0)
    j->state = ORCH_JOB_CANCELLED;
  else {
    bool was_running = strcmp (state, "failed") != 0;
    j->state = ORCH_JOB_FAILED;
    if (was_running) {
      snprintf (j->error, sizeof j->error, "interrupted: cbwd stopped while the job was "
                "%s (target left as is, %" PRIu64 " of %" PRIu64 " bytes copied)",
                state[0] ? state : "running", j->done, j->total);
      if (j->finished == 0)
        j->finished = (int64_t) time (NULL);
      struct json_object *d = json_object_new_object ();
      json_object_object_add (d, "job", json_object_new_string (j->id));
      json_object_object_add (d, "backup", json_object_new_string (j->backup));
      json_object_object_add (d, "error", json_object_new_string (j->error));
      orch_event (o, "job-failed", d);
    }
  }
}

/* One job of jobs.json: 0 and *jp, 1 if the entry is not a job (skipped),
 * -1 out of memory. */
static int
job_from_json (struct cbw_orch *o, struct json_object *x, struct orch_job **jp)
{
  struct json_object *v, *dj;
  if (!json_object_is_type (x, json_type_object))
    return 1;
  const char *id = json_object_object_get_ex (x, "id", &v) ? json_object_get_string (v) : "";
  if (!orch_valid_name (id))
    return 1;
  size_t nd = json_object_object_get_ex (x, "disks", &dj) &&
    json_object_is_type (dj, json_type_array) ? json_object_array_length (dj) : 0;
  if (nd > 4096)
    return 1;
  struct orch_job *j = job_new (nd);
  if (j == NULL)
    return -1;
  j->o = o;
  snprintf (j->id, sizeof j->id, "%s", id);
#define S(key, dst) do { if (json_object_object_get_ex (x, key, &v) && json_object_is_type (v, json_type_string)) snprintf (dst, sizeof dst, "%s", json_object_get_string (v)); } while (0)
#define I(key, dst) do { if (json_object_object_get_ex (x, key, &v) && json_object_is_type (v, json_type_int) && json_object_get_int64 (v) >= 0) dst = json_object_get_int64 (v); } while (0)
  char state[16] = "";
  S ("backup", j->backup);
  if (json_object_object_get_ex (x, "mode", &v) && json_object_is_type (v, json_type_string))
    orch_backup_mode_parse (json_object_get_string (v), &j->mode);   /* else full */
  S ("state", state);
  S ("error", j->error);
  I ("started", j->started);
  I ("finished", j->finished);
  I ("speed", j->speed);
  I ("bytes-done", j->done);
  I ("bytes-total", j->total);
  I ("data-bytes", j->data_bytes);
  I ("zero-bytes", j->zero_bytes);
  I ("released-bytes", j->released);
  I ("backup-started", j->backup_started);
  I ("requests", j->requests);
  I ("request-size", j->request_size);
#undef S
#undef I
  for (size_t k = 0; k < nd; k++)
    job_disk_from_json (&j->disks[k], json_object_array_get_idx (dj, k));
  job_settle_loaded (o, j, state);
  *jp = j;
  return 0;
}

/* At startup: jobs of the previous run.  One that was running is failed
 * (interrupted) and the qemu-nbd it started is stopped. */
void
orch_jobs_load (struct cbw_orch *o)
{
  CLEANUP_FREE char *path = orch_strdup_printf ("%s/%s", o->state_dir, JOB_FILE);
  CLEANUP_FREE char *text = NULL;
  size_t len;
  struct cbw_err e = { 0 };
  if (path == NULL)
    return;
  if (access (path, F_OK) != 0)
    return;
  if (cbw_read_file (path, 16 << 20, &text, &len, &e) < 0) {
    fprintf (stderr, "cbwd: %s: %s (job history lost)\n", path, e.msg);
    return;
  }
  struct json_object *root = json_tokener_parse (text), *v, *jobs;
  if (root == NULL || !json_object_is_type (root, json_type_object) ||
      !json_object_object_get_ex (root, "format", &v) ||
      strcmp (json_object_get_string (v), JOB_FILE_FORMAT) != 0 ||
      !json_object_object_get_ex (root, "jobs", &jobs) ||
      !json_object_is_type (jobs, json_type_array)) {
    fprintf (stderr, "cbwd: %s: not a job list (ignored; job history lost)\n", path);
    struct json_object *d = json_object_new_object ();
    json_object_object_add (d, "file", json_object_new_string (path));
    orch_event (o, "jobs-file-invalid", d);
    json_object_put (root);
    return;
  }
  size_t n = json_object_array_length (jobs);
  for (size_t i = 0; i < n; i++) {
    struct orch_job *j = NULL;
    int r = job_from_json (o, json_object_array_get_idx (jobs, i), &j);
    if (r < 0)
      break;
    if (r > 0)
      continue;
    unsigned long long seq;
    if (sscanf (j->id, "job-%llu", &seq) == 1 && seq > o->job_seq)
      o->job_seq = seq;
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    struct orch_job **nj = realloc (o->jobs, (o->njobs + 1) * sizeof *nj);
    if (nj == NULL) {
      job_free (j);
      break;
    }
    o->jobs = nj;
    o->jobs[o->njobs++] = j;
  }
  json_object_put (root);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    trim_finished_locked (o);
  }
  jobs_save_or_report (o);
}

/* cbwd is stopping: cancel running jobs (they are reported as failed,
 * interrupted, like after a crash), then free every job. */
void
orch_jobs_shutdown (struct cbw_orch *o)
{
  bool any = false;
  for (size_t i = 0; i < o->njobs; i++) {
    struct orch_job *j = o->jobs[i];
    bool active;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
      active = job_active (j);
    }
    if (active || j->thread_started) {
      cancel_and_join (j);
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
      if (active && j->state == ORCH_JOB_CANCELLED) {
        j->state = ORCH_JOB_FAILED;
        snprintf (j->error, sizeof j->error, "interrupted: cbwd stopped while the job was "
                  "running (target left as is, %" PRIu64 " of %" PRIu64 " bytes copied)",
                  j->done, j->total);
        any = true;
      }
    }
  }
  if (any)
    jobs_save_or_report (o);
  for (size_t i = 0; i < o->njobs; i++)
    job_free (o->jobs[i]);
  free (o->jobs);
  o->jobs = NULL;
  o->njobs = 0;
}

