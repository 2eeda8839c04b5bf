/* cbw — server/orch/job.c: push backup jobs.  A job copies the
 * point-in-time view of each of its disks (the PIT export that backup-begin
 * made) to a target: an NBD URI, a raw file (created sparse) or a qcow2 file
 * (created with `qemu-img create`, written through a `qemu-nbd` we start on
 * a Unix socket, supervised and stopped by the job).
 *
 * Copy engine (one thread per job, its disks one after another): async
 * libnbd with up to `requests` reads of `request-size` bytes in flight.  The
 * ranges come from base:allocation block status of the PIT export (zero
 * ranges are not read: nothing is written to a target we just created
 * sparse, write-zeroes otherwise) over the whole disk (full) or only the
 * extents dirty in the backup's bitmap (incremental, onto the previous full
 * copy; top, the top overlay's clusters, onto any target).  Every range is aligned to the cbw session's block size, so that
 * after a range is on the target the job releases it with the cbw filter's
 * `skip` (batched): the filter stops protecting it and trims it from the
 * store, which shrinks instead of growing.
 *
 * Source connections: cbwd's own PIT export takes pipelined requests; the
 * cbw filter's `pit` export of nbdkit 1.32 must not see a client vanish with
 * several requests in flight (nbdkit aborts, taking the guest's disk down),
 * so against it the job opens one connection per request slot with one
 * request in flight each (a killed cbwd then costs nothing).  A job never
 * closes a source connection with requests in flight.
 *
 * Control: speed limit (bytes/s of data read, changeable while running,
 * token bucket), pause (no new requests; in-flight ones finish), resume,
 * cancel (in-flight requests drain, the target is left as is), progress.
 * Final state: completed, cancelled or failed with a message.  Events:
 * job-started, job-progress (at most every 2 s), job-paused, job-resumed,
 * job-completed, job-cancelled, job-failed.
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
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

#include "cleanup.h"
#include "disk_id.h"
#include "fileutil.h"
#include "orch_internal.h"

#define JOB_FILE "jobs.json"
#define JOB_FILE_FORMAT "cbwd-jobs"
#define JOB_KEEP_FINISHED 64
#define JOB_BS_MAX (1ULL << 30)         /* one block-status query */
#define JOB_ZERO_MAX (1ULL << 30)       /* one write-zeroes request */
#define JOB_PROGRESS_EVERY_NS (2LL * 1000000000)
#define JOB_RELEASE_BATCH (64ULL << 20)
#define JOB_RELEASE_EVERY_NS (250LL * 1000000)
#define JOB_DRAIN_NS (30LL * 1000000000)

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

static bool
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

static void
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

/* Helper processes (qemu-nbd): wait for exit up to ms, then TERM/KILL. */
static void
helper_stop (pid_t pid, int ms, bool is_child)
{
  if (pid <= 0)
    return;
  if (is_child) {
    for (int t = 0; t < ms; t += 20) {
      pid_t r = waitpid (pid, NULL, WNOHANG);
      if (r == pid || (r < 0 && errno == ECHILD))
        return;
      usleep (20000);
    }
    kill (pid, SIGTERM);
    for (int t = 0; t < 5000; t += 20) {
      if (waitpid (pid, NULL, WNOHANG) == pid)
        return;
      usleep (20000);
    }
    kill (pid, SIGKILL);
    waitpid (pid, NULL, 0);
  }
  else
    orch_kill_wait (pid, -1);
}

/* ---------------------------------------------------------------- */
/* Targets */

static bool
is_nbd_uri (const char *s)
{
  return strncmp (s, "nbd://", 6) == 0 || strncmp (s, "nbds://", 7) == 0 ||
    strncmp (s, "nbd+unix://", 11) == 0 || strncmp (s, "nbds+unix://", 12) == 0 ||
    strncmp (s, "nbd+vsock://", 12) == 0 || strncmp (s, "nbds+vsock://", 13) == 0;
}

static bool
ends_with (const char *s, const char *suf)
{
  size_t a = strlen (s), b = strlen (suf);
  return a >= b && strcmp (s + a - b, suf) == 0;
}

/* Run argv to completion (timeout seconds); 0 if it exited 0, else -1 with
 * the last line of its log in *err. */
static int
run_helper (char *const argv[], const char *log, int timeout, struct cbw_err *err)
{
  pid_t pid = orch_spawn (argv, log, err);
  if (pid < 0)
    return -1;
  int st = -1;
  for (int t = 0; t < timeout * 50; t++) {
    pid_t r = waitpid (pid, &st, WNOHANG);
    if (r == pid)
      break;
    if (r < 0) {
      st = -1;
      break;
    }
    usleep (20000);
    if (t + 1 == timeout * 50) {
      kill (pid, SIGKILL);
      waitpid (pid, &st, 0);
      return cbw_err_set (err, ETIMEDOUT, "%s did not finish in %d s", argv[0], timeout);
    }
  }
  if (WIFEXITED (st) && WEXITSTATUS (st) == 0)
    return 0;
  char tail[256] = "";
  FILE *fp = fopen (log, "r");
  if (fp) {
    char line[256];
    while (fgets (line, sizeof line, fp))
      if (line[0] != '\n')
        snprintf (tail, sizeof tail, "%s", line);
    fclose (fp);
    tail[strcspn (tail, "\n")] = '\0';
  }
  return cbw_err_set (err, EIO, "%s failed%s%s", argv[0], tail[0] ? ": " : "", tail);
}

/* The socket path of an nbd+unix:// or nbds+unix:// URI (query parameter
 * socket=, percent-decoded), malloc'd; NULL if the URI has none. */
static char *
uri_socket_path (const char *uri)
{
  const char *q = strchr (uri, '?');
  while (q) {
    q++;
    if (strncmp (q, "socket=", 7) == 0) {
      q += 7;
      size_t n = strcspn (q, "&");
      char *p = malloc (n + 1), *w = p;
      if (p == NULL)
        return NULL;
      for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (q[i] == '%' && i + 2 < n && isxdigit ((unsigned char) q[i + 1]) &&
            isxdigit ((unsigned char) q[i + 2]) && sscanf (q + i + 1, "%2x", &v) == 1) {
          *w++ = (char) v;
          i += 2;
        }
        else
          *w++ = q[i];
      }
      *w = '\0';
      return p;
    }
    q = strchr (q, '&');
  }
  return NULL;
}

/* A target must not be a live cbw disk: refuse an export that announces a
 * cbw disk identity (ours or another cbwd's, whatever the transport). */
static int
check_target_identity (struct cbw_orch *o, struct orch_job_disk *jd, const char *uri,
                       struct cbw_err *err)
{
  CLEANUP_FREE char *desc = nbd_get_export_description (jd->dst);
  const char *id = cbw_disk_id_from_desc (desc);
  if (id == NULL)
    return 0;
  char name[ORCH_NAME_MAX + 1] = "";
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    for (size_t i = 0; i < o->st.ndisks; i++)
      if (strcmp (o->st.disks[i]->id, id) == 0)
        snprintf (name, sizeof name, "%s", o->st.disks[i]->name);
  }
  if (name[0])
    return cbw_err_set (err, EINVAL, "job target %s is disk %s's live export (it announces "
                        "cbw disk id %.40s); refusing to overwrite a live disk", uri, name, id);
  return cbw_err_set (err, EINVAL, "job target %s is a live cbw disk of another cbwd (it "
                      "announces cbw disk id %.40s); refusing to overwrite a live disk",
                      uri, id);
}

/* Connect and handshake with a deadline (libnbd's non-blocking API): a
 * server that accepts and never answers fails the job after timeout_s,
 * and a cancelled job stops waiting at once.  Runs on the job's thread. */
static int
connect_with_deadline (struct orch_job *j, struct nbd_handle *h, const char *uri,
                       unsigned timeout_s, struct cbw_err *err)
{
  int64_t deadline = orch_now_ns () + (int64_t) timeout_s * 1000000000;
  if (nbd_aio_connect_uri (h, uri) == -1)
    return cbw_err_set (err, EIO, "cannot connect to target %s: %s", uri, nbd_get_error ());
  while (nbd_aio_is_connecting (h) == 1) {
    if (j) {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
      if (j->cancel_req)
        return cbw_err_set (err, ECANCELED, "target %s: cancelled while connecting", uri);
    }
    int64_t left_ms = (deadline - orch_now_ns ()) / 1000000;
    if (left_ms <= 0)
      return cbw_err_set (err, ETIMEDOUT, "cannot connect to target %s: no NBD handshake "
                          "within %u s (the server accepted the connection but does not "
                          "answer)", uri, timeout_s);
    if (nbd_poll (h, (int) (left_ms < 200 ? left_ms : 200)) == -1)
      return cbw_err_set (err, EIO, "cannot connect to target %s: %s", uri, nbd_get_error ());
  }
  if (nbd_aio_is_ready (h) != 1)
    return cbw_err_set (err, EIO, "cannot connect to target %s: %s", uri,
                        nbd_get_error () ? nbd_get_error () : "connection closed");
  return 0;
}

static int
connect_target_nbd (struct cbw_orch *o, struct orch_job *j, struct orch_job_disk *jd,
                    const char *uri, struct cbw_err *err)
{
  jd->dst = nbd_create ();
  if (jd->dst == NULL)
    return cbw_err_set (err, ENOMEM, "nbd_create: %s", nbd_get_error ());
  /* ask for the export description: a live cbw disk announces its id */
  if (nbd_set_full_info (jd->dst, true) == -1)
    return cbw_err_set (err, EIO, "target %s: %s", uri, nbd_get_error ());
  if (connect_with_deadline (j, jd->dst, uri, j && j->connect_timeout ? j->connect_timeout
                             : 30, err) < 0)
    return -1;
  if (check_target_identity (o, jd, uri, err) < 0)
    return -1;
  if (nbd_is_read_only (jd->dst) == 1)
    return cbw_err_set (err, EINVAL, "target %s is read-only", uri);
  int64_t sz = nbd_get_size (jd->dst);
  if (sz < 0)
    return cbw_err_set (err, EIO, "target %s: size: %s", uri, nbd_get_error ());
  if ((uint64_t) sz < jd->size)
    return cbw_err_set (err, EINVAL, "target %s is smaller (%" PRId64 " bytes) than disk %s "
                        "(%" PRIu64 " bytes)", uri, sz, jd->name, jd->size);
  if (strcmp (jd->format, "qcow2") == 0 && (uint64_t) sz != jd->size)
    return cbw_err_set (err, EINVAL, "target %s has a virtual size of %" PRId64 " bytes, "
                        "disk %s has %" PRIu64, jd->path, sz, jd->name, jd->size);
  jd->dst_can_zero = nbd_can_zero (jd->dst) == 1;
  return 0;
}

/* Open an existing target file, or create a new one with O_EXCL (a symlink
 * or another file put there meanwhile makes it fail, never redirects it),
 * and check what was opened (by device and inode, not by name) against
 * everything cbwd serves or keeps.  A new file's directory entry is made
 * durable at once. */
static int
target_file_open (struct orch_job_disk *jd, const struct orch_protect *ps, bool exists,
                  int flags, struct cbw_err *err)
{
  const char *t = jd->path;
  int fd;
  if (exists) {
    fd = open (t, flags | O_CLOEXEC);
    if (fd < 0)
      return cbw_err_set (err, errno, "target %s: %s", t, strerror (errno));
  }
  else {
    CLEANUP_FREE char *dir = strdup (t);
    char *slash = dir ? strrchr (dir, '/') : NULL;
    if (slash == NULL)
      return cbw_err_set (err, ENOMEM, "out of memory");
    const char *base = slash + 1;
    slash[0] = '\0';
    CLEANUP_CLOSE int dfd = open (dir[0] ? dir : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
      return cbw_err_set (err, errno, "target %s: directory: %s", t, strerror (errno));
    if (orch_protect_check_newdir (ps, "job target", t, dfd, err) < 0)
      return -1;
    fd = openat (dfd, base, flags | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
      return cbw_err_set (err, errno, "target %s: cannot create: %s", t, strerror (errno));
    jd->created = true;
    if (cbw_fsync (dfd) < 0) {
      int e = errno;
      close (fd);
      return cbw_err_set (err, e, "target %s: fsync of its directory: %s", t, strerror (e));
    }
  }
  struct stat sb;
  if (fstat (fd, &sb) < 0) {
    int e = errno;
    close (fd);
    return cbw_err_set (err, e, "target %s: fstat: %s", t, strerror (e));
  }
  if (orch_protect_check_stat (ps, "job target", t, &sb, err) < 0) {
    close (fd);
    return -1;
  }
  if (!S_ISREG (sb.st_mode) && !(S_ISBLK (sb.st_mode) && strcmp (jd->format, "raw") == 0)) {
    close (fd);
    return cbw_err_set (err, EINVAL, "target %s is not a regular file%s", t,
                        strcmp (jd->format, "raw") == 0 ? " or block device" : "");
  }
  jd->regular = S_ISREG (sb.st_mode);
  return fd;
}

/* Open (or create) the target of one disk.  Runs on the control thread
 * without o->lock.  On failure, a file it created is removed. */
static int
target_open (struct cbw_orch *o, struct orch_job *j, struct orch_job_disk *jd,
             const struct orch_protect *ps, bool incremental, struct cbw_err *err)
{
  const char *t = jd->target;
  if (is_nbd_uri (t)) {
    snprintf (jd->format, sizeof jd->format, "nbd");
    /* The sockets of our disks and of cbwd, by device and inode. */
    CLEANUP_FREE char *sock = uri_socket_path (t);
    if (sock && orch_protect_check_path (ps, "job target's socket", sock, err) < 0)
      return -1;
    /* The control thread never waits for a remote server: the job's
     * thread connects, checks the export (identity, size, read-only)
     * before its first write, and fails the job if anything is wrong. */
    jd->connect_later = true;
    return 0;
  }
  if (strncmp (t, "raw:", 4) == 0) {
    snprintf (jd->format, sizeof jd->format, "raw");
    t += 4;
  }
  else if (strncmp (t, "qcow2:", 6) == 0) {
    snprintf (jd->format, sizeof jd->format, "qcow2");
    t += 6;
  }
  else if (strstr (t, "://"))
    return cbw_err_set (err, EINVAL, "target \"%.200s\": unknown URI scheme (want nbd://, "
                        "nbd+unix://, raw:PATH, qcow2:PATH or a file path)", t);
  else
    snprintf (jd->format, sizeof jd->format, "%s", ends_with (t, ".qcow2") ? "qcow2" : "raw");
  if (t[0] != '/')
    return cbw_err_set (err, EINVAL, "target path \"%.200s\" must be absolute", t);
  jd->path = strdup (t);
  if (jd->path == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");

  struct stat sb;
  bool exists = stat (t, &sb) == 0;
  if (!exists && errno != ENOENT)
    return cbw_err_set (err, errno, "target %s: %s", t, strerror (errno));
  if (exists && !S_ISREG (sb.st_mode) && !(S_ISBLK (sb.st_mode) && strcmp (jd->format, "raw") == 0))
    return cbw_err_set (err, EINVAL, "target %s is not a regular file%s", t,
                        strcmp (jd->format, "raw") == 0 ? " or block device" : "");
  if (!exists && incremental)
    return cbw_err_set (err, ENOENT, "target %s does not exist: an incremental job writes "
                        "onto the previous full copy", t);

  if (strcmp (jd->format, "raw") == 0) {
    jd->fd = target_file_open (jd, ps, exists, O_RDWR, err);
    if (jd->fd < 0)
      return -1;
    if (exists) {
      if (fstat (jd->fd, &sb) < 0)
        return cbw_err_set (err, errno, "target %s: %s", t, strerror (errno));
      off_t end = lseek (jd->fd, 0, SEEK_END);
      if (end < 0)
        return cbw_err_set (err, errno, "target %s: %s", t, strerror (errno));
      if (S_ISREG (sb.st_mode) ? (uint64_t) end != jd->size : (uint64_t) end < jd->size)
        return cbw_err_set (err, EINVAL, "target %s has %lld bytes, disk %s has %" PRIu64
                            " (not a copy of this disk)", t, (long long) end, jd->name, jd->size);
      return 0;
    }
    if (ftruncate (jd->fd, (off_t) jd->size) < 0)
      return cbw_err_set (err, errno, "target %s: ftruncate: %s", t, strerror (errno));
    jd->fresh = true;
    return 0;
  }

  /* qcow2: qemu-img create if new, then qemu-nbd on a socket of ours; both
   * reach the file we opened and checked through /proc/CBWD/fd/N. */
  jd->pin_fd = target_file_open (jd, ps, exists, O_RDWR, err);
  if (jd->pin_fd < 0)
    return -1;
  CLEANUP_FREE char *pinned = orch_strdup_printf ("/proc/%ld/fd/%d", (long) getpid (),
                                                  jd->pin_fd);
  CLEANUP_FREE char *jdir = orch_strdup_printf ("%s/jobs", o->state_dir);
  jd->helper_sock = orch_strdup_printf ("%s/jobs/%s-%s.sock", o->state_dir, j->id, jd->name);
  jd->helper_log = orch_strdup_printf ("%s/jobs/%s-%s.log", o->state_dir, j->id, jd->name);
  if (!pinned || !jdir || !jd->helper_sock || !jd->helper_log)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (mkdir (jdir, 0700) < 0 && errno != EEXIST)
    return cbw_err_set (err, errno, "%s: mkdir: %s", jdir, strerror (errno));
  unlink (jd->helper_log);
  if (!exists) {
    char size[32];
    snprintf (size, sizeof size, "%" PRIu64, jd->size);
    char *argv[] = { (char *) "qemu-img", (char *) "create", (char *) "-q", (char *) "-f",
                     (char *) "qcow2", pinned, size, NULL };
    if (run_helper (argv, jd->helper_log, 60, err) < 0)
      return cbw_err_prefix (err, "target %s", t);
    if (cbw_fsync (jd->pin_fd) < 0)
      return cbw_err_set (err, errno, "target %s: fsync: %s", t, strerror (errno));
    jd->fresh = true;
  }
  unlink (jd->helper_sock);
  /* the description names the file (ps, logs) */
  CLEANUP_FREE char *desc = orch_strdup_printf ("--description=cbw job %s target %s",
                                                j->id, t);
  if (desc == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  char *argv[] = { (char *) "qemu-nbd", (char *) "--format=qcow2", (char *) "--socket",
                   jd->helper_sock, (char *) "--cache=writeback", (char *) "--discard=unmap",
                   desc, pinned, NULL };
  pid_t pid = orch_spawn (argv, jd->helper_log, err);
  if (pid < 0)
    return cbw_err_prefix (err, "target %s", t);
  jd->helper_pid = pid;
  int pidfd = (int) syscall (SYS_pidfd_open, pid, 0);
  int r = orch_wait_socket (jd->helper_sock, pidfd, 30, err);
  if (pidfd >= 0)
    close (pidfd);
  if (r < 0) {
    char tail[256] = "";
    FILE *fp = fopen (jd->helper_log, "r");
    if (fp) {
      char line[256];
      while (fgets (line, sizeof line, fp))
        snprintf (tail, sizeof tail, "%s", line);
      fclose (fp);
      tail[strcspn (tail, "\n")] = '\0';
    }
    return cbw_err_set (err, EIO, "target %s: qemu-nbd did not start%s%s", t,
                        tail[0] ? ": " : "", tail);
  }
  CLEANUP_FREE char *uri = orch_strdup_printf ("nbd+unix:///?socket=%s", jd->helper_sock);
  if (uri == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  return connect_target_nbd (o, j, jd, uri, err);
}

/* Undo target_open after a job-start failure. */
static void
target_abandon (struct orch_job_disk *jd)
{
  if (jd->dst) {
    nbd_shutdown (jd->dst, 0);
    nbd_close (jd->dst);
    jd->dst = NULL;
  }
  if (jd->helper_pid > 0) {
    helper_stop ((pid_t) jd->helper_pid, 3000, true);
    jd->helper_pid = 0;
  }
  if (jd->helper_sock)
    unlink (jd->helper_sock);
  if (jd->fd >= 0) {
    close (jd->fd);
    jd->fd = -1;
  }
  if (jd->pin_fd >= 0) {
    close (jd->pin_fd);
    jd->pin_fd = -1;
  }
  if (jd->created && jd->path)
    unlink (jd->path);
  jd->created = false;
}

/* ---------------------------------------------------------------- */
/* The copy engine (job thread) */

enum slot_state { SL_FREE, SL_READ, SL_READ_DONE, SL_WRITE, SL_WRITE_DONE };

struct slot {
  enum slot_state st;
  int err;
  bool zero;                    /* a write-zeroes request */
  uint64_t off, len;
  char *buf;
  struct nbd_handle *src;
};

struct seg {
  uint64_t off, len;
  bool zero;
};

struct copier {
  struct cbw_orch *o;
  struct orch_job *j;
  struct orch_job_disk *jd;
  uint64_t gran;                /* alignment of ranges = the session's block size */
  uint64_t rs;                  /* request size (multiple of gran when possible) */
  size_t nslots;
  struct slot *slots;
  size_t nsrc;
  struct nbd_handle **src;      /* data connections */
  struct nbd_handle *bs;        /* block-status connection, NULL = all data */
  /* ranges still to plan: jd->want[wi] from wpos */
  size_t wi;
  uint64_t wpos;
  /* block status in flight */
  bool bs_inflight, bs_done;
  int bs_err;
  uint64_t bs_off, bs_end, bs_covered;
  size_t bs_wi;                 /* want cursor of the extent callback */
  /* planned segments (FIFO) */
  struct seg *plan;
  size_t phead, pn, pcap;
  uint64_t pbytes;              /* bytes in plan[phead..pn) */
  /* releases not yet sent */
  uint64_t (*rel)[2];
  size_t nrel, relcap;
  uint64_t rel_bytes;
  int64_t rel_last;
  struct cbw_ctl_client *ctl;
  /* rate limiting */
  uint64_t rate_speed, rate_bytes;
  int64_t rate_t0;
  /* failure */
  bool failed;
  char msg[CBW_ERR_MSG_MAX];
};

static void
copier_fail (struct copier *c, const char *fmt, ...) __attribute__ ((format (printf, 2, 3)));
static void
copier_fail (struct copier *c, const char *fmt, ...)
{
  if (c->failed)
    return;
  va_list ap;
  va_start (ap, fmt);
  int n = snprintf (c->msg, sizeof c->msg, "disk %s: ", c->jd->name);
  if (n < 0 || (size_t) n >= sizeof c->msg)
    n = 0;
  vsnprintf (c->msg + n, sizeof c->msg - (size_t) n, fmt, ap);
  va_end (ap);
  c->failed = true;
}

static int
plan_push (struct copier *c, uint64_t off, uint64_t len, bool zero)
{
  if (len == 0)
    return 0;
  c->pbytes += len;
  if (c->pn > c->phead) {
    struct seg *last = &c->plan[c->pn - 1];
    if (last->zero == zero && last->off + last->len == off) {
      last->len += len;
      return 0;
    }
  }
  if (c->pn == c->pcap) {
    if (c->phead > 0) {
      memmove (c->plan, c->plan + c->phead, (c->pn - c->phead) * sizeof *c->plan);
      c->pn -= c->phead;
      c->phead = 0;
    }
    if (c->pn == c->pcap) {
      size_t ncap = c->pcap ? c->pcap * 2 : 256;
      struct seg *np = realloc (c->plan, ncap * sizeof *np);
      if (np == NULL)
        return -1;
      c->plan = np;
      c->pcap = ncap;
    }
  }
  c->plan[c->pn++] = (struct seg) { off, len, zero };
  return 0;
}

/* A zero extent shrinks to whole blocks (the partial blocks at its ends are
 * copied as data), so that every range the job releases is whole blocks. */
static int
plan_extent (struct copier *c, uint64_t off, uint64_t end, bool zero)
{
  if (!zero)
    return plan_push (c, off, end - off, false);
  uint64_t g = c->gran;
  uint64_t za = (off + g - 1) / g * g;
  uint64_t zb = end == c->jd->size ? end : end / g * g;
  if (za >= zb)
    return plan_push (c, off, end - off, false);
  if (plan_push (c, off, za - off, false) < 0 || plan_push (c, za, zb - za, true) < 0 ||
      plan_push (c, zb, end - zb, false) < 0)
    return -1;
  return 0;
}

/* Plan the part of extent [a, b) that is wanted (cursor bs_wi moves on). */
static int
plan_want (struct copier *c, uint64_t a, uint64_t b, bool zero)
{
  struct orch_job_disk *jd = c->jd;
  while (c->bs_wi < jd->nwant && jd->want[c->bs_wi][0] + jd->want[c->bs_wi][1] <= a)
    c->bs_wi++;
  for (size_t k = c->bs_wi; k < jd->nwant && jd->want[k][0] < b; k++) {
    uint64_t ws = jd->want[k][0], we = ws + jd->want[k][1];
    uint64_t s = ws > a ? ws : a, e = we < b ? we : b;
    if (s < e && plan_extent (c, s, e, zero) < 0)
      return -1;
  }
  return 0;
}

static int
bs_extent_cb (void *user_data, const char *metacontext, uint64_t offset,
              uint32_t *entries, size_t nr_entries, int *error)
{
  struct copier *c = user_data;
  (void) error;
  if (strcmp (metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  if (offset != c->bs_off || nr_entries % 2 != 0) {
    c->bs_err = EPROTO;
    return 0;
  }
  uint64_t pos = c->bs_covered > offset ? c->bs_covered : offset;
  uint64_t p = offset;
  for (size_t i = 0; i + 1 < nr_entries && p < c->bs_end; i += 2) {
    uint64_t len = entries[i];
    if (len == 0) {
      c->bs_err = EPROTO;
      return 0;
    }
    uint64_t end = p + len > c->bs_end ? c->bs_end : p + len;
    if (end > pos) {
      uint64_t from = p > pos ? p : pos;
      if (plan_want (c, from, end, (entries[i + 1] & LIBNBD_STATE_ZERO) != 0) < 0) {
        c->bs_err = ENOMEM;
        return 0;
      }
      pos = end;
    }
    p = end;
  }
  c->bs_covered = pos;
  return 0;
}

static int
bs_done_cb (void *user_data, int *error)
{
  struct copier *c = user_data;
  if (*error && c->bs_err == 0)
    c->bs_err = *error;
  c->bs_done = true;
  return 1;
}

static int
read_done_cb (void *user_data, int *error)
{
  struct slot *s = user_data;
  s->err = *error;
  s->st = SL_READ_DONE;
  return 1;
}

static int
write_done_cb (void *user_data, int *error)
{
  struct slot *s = user_data;
  s->err = *error;
  s->st = SL_WRITE_DONE;
  return 1;
}

/* Move the planning cursor to the first wanted byte at or after wpos. */
static void
want_normalize (struct copier *c)
{
  struct orch_job_disk *jd = c->jd;
  while (c->wi < jd->nwant) {
    uint64_t ws = jd->want[c->wi][0], we = ws + jd->want[c->wi][1];
    if (c->wpos < ws)
      c->wpos = ws;
    if (c->wpos < we)
      return;
    c->wi++;
  }
}

/* Plan the next piece of the wanted ranges: one block-status query over up
 * to 1 GiB (spanning as many wanted ranges as fall in it: an incremental
 * with thousands of small dirty extents needs few round trips), or, without
 * a block-status connection, the wanted ranges as data. */
static void
plan_more (struct copier *c)
{
  struct orch_job_disk *jd = c->jd;
  want_normalize (c);
  if (c->wi >= jd->nwant || c->bs_inflight)
    return;
  if (c->bs == NULL) {
    while (c->wi < jd->nwant && c->pbytes < 64 * c->rs) {
      uint64_t we = jd->want[c->wi][0] + jd->want[c->wi][1];
      uint64_t len = we - c->wpos > JOB_BS_MAX ? JOB_BS_MAX : we - c->wpos;
      if (plan_push (c, c->wpos, len, false) < 0) {
        copier_fail (c, "out of memory");
        return;
      }
      c->wpos += len;
      want_normalize (c);
    }
    return;
  }
  uint64_t last = jd->want[jd->nwant - 1][0] + jd->want[jd->nwant - 1][1];
  uint64_t len = last - c->wpos > JOB_BS_MAX ? JOB_BS_MAX : last - c->wpos;
  c->bs_off = c->wpos;
  c->bs_end = c->wpos + len;
  c->bs_covered = c->wpos;
  c->bs_wi = c->wi;
  c->bs_done = false;
  c->bs_err = 0;
  if (nbd_aio_block_status (c->bs, len, c->wpos,
                            (nbd_extent_callback) { .callback = bs_extent_cb, .user_data = c },
                            (nbd_completion_callback) { .callback = bs_done_cb, .user_data = c },
                            0) == -1) {
    copier_fail (c, "block status at offset %" PRIu64 ": %s", c->wpos, nbd_get_error ());
    return;
  }
  c->bs_inflight = true;
}

static void
bs_finish (struct copier *c)
{
  c->bs_inflight = false;
  if (c->bs_err) {
    copier_fail (c, "block status of %" PRIu64 "+%" PRIu64 " on the point-in-time export: %s",
                 c->bs_off, c->bs_end - c->bs_off, strerror (c->bs_err));
    return;
  }
  if (c->bs_covered <= c->bs_off) {
    copier_fail (c, "block status at offset %" PRIu64 " returned no extents", c->bs_off);
    return;
  }
  c->wpos = c->bs_covered;
}

static void
release_add (struct copier *c, uint64_t off, uint64_t len)
{
  if (c->nrel == c->relcap) {
    size_t ncap = c->relcap ? c->relcap * 2 : 64;
    void *n = realloc (c->rel, ncap * sizeof *c->rel);
    if (n == NULL)
      return;                   /* not released: the store just keeps it */
    c->rel = n;
    c->relcap = ncap;
  }
  c->rel[c->nrel][0] = off;
  c->rel[c->nrel][1] = len;
  c->nrel++;
  c->rel_bytes += len;
}

static int
cmp_range (const void *a, const void *b)
{
  const uint64_t *x = a, *y = b;
  return x[0] < y[0] ? -1 : x[0] > y[0];
}

/* Send `skip` for the ranges on the target (merged).  Failures are counted
 * and reported in the job status, not fatal: the copy stays correct, the
 * store just keeps the blocks until backup-end. */
/* Does [a, b) contain a wanted byte? (want is sorted, disjoint) */
static bool
want_overlaps (const struct orch_job_disk *jd, uint64_t a, uint64_t b)
{
  size_t lo = 0, hi = jd->nwant;
  while (lo < hi) {             /* first range ending after a */
    size_t mid = lo + (hi - lo) / 2;
    if (jd->want[mid][0] + jd->want[mid][1] <= a)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < jd->nwant && jd->want[lo][0] < b;
}

static void
release_flush (struct copier *c)
{
  c->rel_last = orch_now_ns ();
  if (c->nrel == 0)
    return;
  qsort (c->rel, c->nrel, sizeof *c->rel, cmp_range);
  /* Merge neighbours, and ranges separated only by bytes the job does not
   * want (an incremental's clean blocks: the session does not protect
   * them, skipping them changes nothing): hundreds of scattered dirty
   * extents then cost a few `skip` calls, not one each. */
  size_t n = 0;
  uint64_t *pushed = calloc (c->nrel, sizeof *pushed);   /* job bytes per merged range */
  if (pushed == NULL)
    return;                     /* kept for the next flush */
  for (size_t i = 0; i < c->nrel; i++) {
    uint64_t pend = n > 0 ? c->rel[n - 1][0] + c->rel[n - 1][1] : 0;
    if (n > 0 && (pend == c->rel[i][0] || !want_overlaps (c->jd, pend, c->rel[i][0])))
      c->rel[n - 1][1] = c->rel[i][0] + c->rel[i][1] - c->rel[n - 1][0];
    else {
      c->rel[n][0] = c->rel[i][0];
      c->rel[n][1] = c->rel[i][1];
      n++;
    }
    pushed[n - 1] += c->rel[i][1];
  }
  uint64_t released = 0, errors = 0;
  struct cbw_err e = { 0 };
  for (size_t i = 0; i < n; i++) {
    if (c->ctl == NULL) {
      c->ctl = cbw_ctl_client_connect (c->jd->ctl_cbw, &e);
      if (c->ctl)
        cbw_ctl_client_set_timeout (c->ctl, 30000);
    }
    if (c->ctl == NULL) {
      errors++;
      continue;
    }
    struct json_object *a = json_object_new_object (), *ret = NULL;
    json_object_object_add (a, "offset", json_object_new_int64 ((int64_t) c->rel[i][0]));
    json_object_object_add (a, "length", json_object_new_int64 ((int64_t) c->rel[i][1]));
    int cls = -1;
    if (cbw_ctl_client_execute (c->ctl, "skip", a, &ret, &cls, &e) < 0) {
      errors++;
      if (cls < 0) {            /* transport failure: reconnect next time */
        cbw_ctl_client_close (c->ctl);
        c->ctl = NULL;
      }
    }
    else
      released += pushed[i];
    json_object_put (ret);
  }
  free (pushed);
  c->nrel = 0;
  c->rel_bytes = 0;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->j->lock);
  c->j->released += released;
  c->jd->released += released;
  if (errors) {
    c->j->release_errors += errors;
    snprintf (c->j->release_error, sizeof c->j->release_error, "%s", e.msg);
  }
}

static void
range_done (struct copier *c, uint64_t off, uint64_t len, bool zero)
{
  release_add (c, off, len);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->j->lock);
  c->j->done += len;
  c->jd->done += len;
  if (zero)
    c->j->zero_bytes += len;
  else
    c->j->data_bytes += len;
}

static bool
buf_is_zero (const char *b, size_t len)
{
  static const char z[4096];
  size_t i = 0;
  for (; i + sizeof z <= len; i += sizeof z)
    if (memcmp (b + i, z, sizeof z) != 0)
      return false;
  return memcmp (b + i, z, len - i) == 0;
}

/* Zero a range of the target that is not known to be zero already. */
static int
zero_file (struct copier *c, uint64_t off, uint64_t len)
{
  int fd = c->jd->fd;
  if (fallocate (fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t) off, (off_t) len) == 0)
    return 0;
  if (fallocate (fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t) off, (off_t) len) == 0)
    return 0;
  static const char z[65536];
  for (uint64_t p = 0; p < len; p += sizeof z) {
    size_t n = len - p < sizeof z ? (size_t) (len - p) : sizeof z;
    if (cbw_pwrite_full (fd, z, n, off + p) < 0)
      return -1;
  }
  return 0;
}

/* A read finished: write it (or zero, or nothing for a fresh target). */
static void
slot_read_done (struct copier *c, struct slot *s)
{
  if (s->err) {
    copier_fail (c, "reading %" PRIu64 " bytes at offset %" PRIu64 " from the point-in-time "
                 "export: %s", s->len, s->off, strerror (s->err));
    s->st = SL_FREE;
    return;
  }
  bool zero = buf_is_zero (s->buf, s->len);
  if (zero && c->jd->fresh) {
    range_done (c, s->off, s->len, true);
    s->st = SL_FREE;
    return;
  }
  if (c->jd->fd >= 0) {
    int r = zero ? zero_file (c, s->off, s->len) : cbw_pwrite_full (c->jd->fd, s->buf, s->len, s->off);
    if (r < 0)
      copier_fail (c, "writing %" PRIu64 " bytes at offset %" PRIu64 " of %s: %s", s->len,
                   s->off, c->jd->path, strerror (errno));
    else
      range_done (c, s->off, s->len, zero);
    s->st = SL_FREE;
    return;
  }
  int64_t r;
  s->zero = zero && c->jd->dst_can_zero;
  s->st = SL_WRITE;
  if (s->zero)
    r = nbd_aio_zero (c->jd->dst, s->len, s->off,
                      (nbd_completion_callback) { .callback = write_done_cb, .user_data = s }, 0);
  else
    r = nbd_aio_pwrite (c->jd->dst, s->buf, s->len, s->off,
                        (nbd_completion_callback) { .callback = write_done_cb, .user_data = s }, 0);
  if (r == -1) {
    copier_fail (c, "writing to the target: %s", nbd_get_error ());
    s->st = SL_FREE;
  }
}

static void
slot_write_done (struct copier *c, struct slot *s)
{
  if (s->err)
    copier_fail (c, "writing %" PRIu64 " bytes at offset %" PRIu64 " of the target: %s",
                 s->len, s->off, strerror (s->err));
  else
    range_done (c, s->off, s->len, s->zero);
  s->st = SL_FREE;
}

static struct slot *
free_slot (struct copier *c)
{
  for (size_t i = 0; i < c->nslots; i++)
    if (c->slots[i].st == SL_FREE)
      return &c->slots[i];
  return NULL;
}

static size_t
busy_slots (struct copier *c)
{
  size_t n = 0;
  for (size_t i = 0; i < c->nslots; i++)
    n += c->slots[i].st != SL_FREE;
  return n;
}

/* Issue requests for planned segments.  Returns the poll timeout wanted by
 * the rate limiter (ms), or -1. */
static int
issue (struct copier *c, uint64_t speed)
{
  int64_t now = orch_now_ns ();
  if (speed != c->rate_speed) {         /* (re)start the bucket at each change */
    c->rate_speed = speed;
    c->rate_bytes = 0;
    c->rate_t0 = now;
  }
  while (!c->failed && c->phead < c->pn) {
    struct seg *sg = &c->plan[c->phead];
    if (sg->zero && c->jd->fresh) {
      range_done (c, sg->off, sg->len, true);
      c->pbytes -= sg->len;
      c->phead++;
      continue;
    }
    if (sg->zero && c->jd->fd >= 0) {
      if (zero_file (c, sg->off, sg->len) < 0) {
        copier_fail (c, "zeroing %" PRIu64 "+%" PRIu64 " of %s: %s", sg->off, sg->len,
                     c->jd->path, strerror (errno));
        return -1;
      }
      range_done (c, sg->off, sg->len, true);
      c->pbytes -= sg->len;
      c->phead++;
      continue;
    }
    struct slot *s = free_slot (c);
    if (s == NULL)
      return -1;
    if (sg->zero && c->jd->dst_can_zero) {
      uint64_t len = sg->len > JOB_ZERO_MAX ? JOB_ZERO_MAX : sg->len;
      s->off = sg->off;
      s->len = len;
      s->zero = true;
      s->err = 0;
      s->st = SL_WRITE;
      if (nbd_aio_zero (c->jd->dst, len, sg->off,
                        (nbd_completion_callback) { .callback = write_done_cb, .user_data = s },
                        0) == -1) {
        s->st = SL_FREE;
        copier_fail (c, "write-zeroes on the target: %s", nbd_get_error ());
        return -1;
      }
    }
    else {
      /* data (or zeroes to write as data: the target cannot zero) */
      uint64_t limit = c->rs;
      if (speed) {
        uint64_t per = speed / 8 / c->gran * c->gran;   /* ~8 requests a second */
        if (per < c->gran)
          per = c->gran;
        if (per < limit)
          limit = per;
        double allowed = (double) speed * (double) (now - c->rate_t0) / 1e9;
        if ((double) c->rate_bytes > allowed) {
          double wait_s = ((double) c->rate_bytes - allowed) / (double) speed;
          int ms = (int) (wait_s * 1000) + 1;
          return ms > 200 ? 200 : ms;
        }
      }
      uint64_t next = (sg->off / limit + 1) * limit;    /* keep requests aligned */
      uint64_t end = sg->off + sg->len < next ? sg->off + sg->len : next;
      uint64_t len = end - sg->off;
      s->off = sg->off;
      s->len = len;
      s->zero = false;
      s->err = 0;
      s->st = SL_READ;
      c->rate_bytes += len;
      if (nbd_aio_pread (s->src, s->buf, len, sg->off,
                         (nbd_completion_callback) { .callback = read_done_cb, .user_data = s },
                         0) == -1) {
        s->st = SL_FREE;
        copier_fail (c, "reading from the point-in-time export: %s", nbd_get_error ());
        return -1;
      }
      sg->off += len;
      sg->len -= len;
      c->pbytes -= len;
      if (sg->len == 0)
        c->phead++;
      continue;
    }
    sg->off += s->len;
    sg->len -= s->len;
    c->pbytes -= s->len;
    if (sg->len == 0)
      c->phead++;
  }
  return -1;
}

static bool
handle_live (struct nbd_handle *h)
{
  return h && !nbd_aio_is_dead (h) && !nbd_aio_is_closed (h);
}

/* One poll round over every connection and the wake eventfd. */
static void
poll_once (struct copier *c, int timeout_ms)
{
  struct pollfd pfd[80];
  struct nbd_handle *hs[80];
  size_t n = 0;
  for (size_t i = 0; i <= c->nsrc + 1 && n < 79; i++) {
    struct nbd_handle *h = i < c->nsrc ? c->src[i] : i == c->nsrc ? c->bs : c->jd->dst;
    if (!handle_live (h))
      continue;
    unsigned dir = nbd_aio_get_direction (h);
    int fd = nbd_aio_get_fd (h);
    if (fd < 0)
      continue;
    pfd[n].fd = fd;
    pfd[n].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
      ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
    pfd[n].revents = 0;
    hs[n++] = h;
  }
  pfd[n].fd = c->j->wakefd;
  pfd[n].events = POLLIN;
  pfd[n].revents = 0;
  if (poll (pfd, n + 1, timeout_ms) < 0) {
    if (errno != EINTR)
      copier_fail (c, "poll: %s", strerror (errno));
    return;
  }
  if (pfd[n].revents & POLLIN) {
    uint64_t v;
    if (read (c->j->wakefd, &v, sizeof v) < 0) {
      /* nothing to read: fine */
    }
  }
  for (size_t i = 0; i < n; i++) {
    int r = 0;
    if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR))
      r = nbd_aio_notify_read (hs[i]);
    if (r != -1 && (pfd[i].revents & POLLOUT) && handle_live (hs[i]) &&
        (nbd_aio_get_direction (hs[i]) & LIBNBD_AIO_DIRECTION_WRITE))
      r = nbd_aio_notify_write (hs[i]);
    if (r == -1)
      copier_fail (c, "%s connection: %s", hs[i] == c->jd->dst ? "target" : "source",
                   nbd_get_error ());
  }
}

static void
publish_progress (struct copier *c, int64_t *last_ev, uint64_t *last_done)
{
  int64_t now = orch_now_ns ();
  size_t inflight = busy_slots (c);
  uint64_t done, total;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->j->lock);
    c->j->in_flight = (int) inflight;
    if (c->j->state == ORCH_JOB_PAUSED && inflight == 0 && !c->j->paused_drained)
      c->j->paused_drained = true;
    done = c->j->done;
    total = c->j->total;
  }
  if (now - *last_ev >= JOB_PROGRESS_EVERY_NS && done != *last_done) {
    *last_ev = now;
    *last_done = done;
    struct json_object *d = json_object_new_object ();
    json_object_object_add (d, "job", json_object_new_string (c->j->id));
    json_object_object_add (d, "bytes-done", json_object_new_int64 ((int64_t) done));
    json_object_object_add (d, "bytes-total", json_object_new_int64 ((int64_t) total));
    orch_event (c->o, "job-progress", d);
  }
}

static struct nbd_handle *
open_src (struct copier *c, bool meta)
{
  struct nbd_handle *h = nbd_create ();
  if (h == NULL) {
    copier_fail (c, "nbd_create: %s", nbd_get_error ());
    return NULL;
  }
  if (meta)
    nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  if (nbd_connect_uri (h, c->jd->src_uri) == -1) {
    copier_fail (c, "cannot connect to the point-in-time export %s: %s", c->jd->src_uri,
                 nbd_get_error ());
    nbd_close (h);
    return NULL;
  }
  int64_t sz = nbd_get_size (h);
  if (sz < 0 || (uint64_t) sz != c->jd->size) {
    copier_fail (c, "the point-in-time export %s has %" PRId64 " bytes, the disk %" PRIu64,
                 c->jd->src_uri, sz, c->jd->size);
    nbd_close (h);
    return NULL;
  }
  return h;
}

/* Copy one disk.  Returns 0 = done, 1 = cancelled, -1 = failed (c->msg). */
static int
copy_disk (struct cbw_orch *o, struct orch_job *j, struct orch_job_disk *jd,
           char *msg, size_t msglen)
{
  struct copier cc = { .o = o, .j = j, .jd = jd }, *c = &cc;
  int ret = -1;
  bool cancelled = false;
  int64_t last_ev = orch_now_ns (), drain_start = 0;
  uint64_t last_done = UINT64_MAX;

  c->gran = jd->gran ? jd->gran : 65536;
  c->rs = j->request_size;
  if (c->rs % c->gran != 0 && c->gran <= (32u << 20))
    c->rs = (c->rs + c->gran - 1) / c->gran * c->gran;
  c->nslots = j->requests;
  c->nsrc = j->pipelined ? 1 : c->nslots;
  c->slots = calloc (c->nslots, sizeof *c->slots);
  c->src = calloc (c->nsrc, sizeof *c->src);
  if (!c->slots || !c->src) {
    copier_fail (c, "out of memory");
    goto out;
  }
  for (size_t i = 0; i < c->nslots; i++)
    if ((c->slots[i].buf = malloc (c->rs)) == NULL) {
      copier_fail (c, "out of memory");
      goto out;
    }
  for (size_t i = 0; i < c->nsrc; i++)
    if ((c->src[i] = open_src (c, false)) == NULL)
      goto out;
  for (size_t i = 0; i < c->nslots; i++)
    c->slots[i].src = c->src[i % c->nsrc];
  c->bs = open_src (c, true);
  if (c->bs == NULL)
    goto out;
  if (nbd_can_meta_context (c->bs, LIBNBD_CONTEXT_BASE_ALLOCATION) != 1) {
    nbd_shutdown (c->bs, 0);
    nbd_close (c->bs);
    c->bs = NULL;               /* every wanted byte is data */
  }
  c->wi = 0;
  c->wpos = 0;
  c->rel_last = orch_now_ns ();

  for (;;) {
    bool cancel, pause;
    uint64_t speed;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
      cancel = j->cancel_req;
      pause = j->state == ORCH_JOB_PAUSED;
      speed = j->speed;
    }
    if (cancel)
      cancelled = true;
    if (pause)
      c->rate_speed = UINT64_MAX;       /* restart the bucket after a pause */
    int timeout = 100;
    if (c->bs_inflight && c->bs_done)
      bs_finish (c);
    /* completions first, so that the slots they free are reused at once */
    for (size_t i = 0; i < c->nslots; i++) {
      if (c->slots[i].st == SL_READ_DONE) {
        if (c->failed || cancelled)
          c->slots[i].st = SL_FREE;       /* stopping: not written */
        else
          slot_read_done (c, &c->slots[i]);
      }
      else if (c->slots[i].st == SL_WRITE_DONE)
        slot_write_done (c, &c->slots[i]);
    }
    bool stop = c->failed || cancelled;
    if (!stop && !pause) {
      if (c->pbytes < 64 * c->rs)
        plan_more (c);
      int t = issue (c, speed);
      if (t >= 0)
        timeout = t;
    }
    if (c->rel_bytes >= JOB_RELEASE_BATCH ||
        (c->nrel && orch_now_ns () - c->rel_last >= JOB_RELEASE_EVERY_NS))
      release_flush (c);
    publish_progress (c, &last_ev, &last_done);
    size_t busy = busy_slots (c);
    bool all_planned = c->wi >= jd->nwant && !c->bs_inflight && c->phead >= c->pn;
    if (busy == 0 && !c->bs_inflight && (c->failed || cancelled || all_planned))
      break;
    /* more work ready without waiting? */
    bool ready = false;
    for (size_t i = 0; i < c->nslots; i++)
      if (c->slots[i].st == SL_READ_DONE || c->slots[i].st == SL_WRITE_DONE)
        ready = true;
    if (c->bs_inflight && c->bs_done)
      ready = true;
    if (ready)
      continue;
    if ((c->failed || cancelled) && busy > 0) {
      if (drain_start == 0)
        drain_start = orch_now_ns ();
      if (orch_now_ns () - drain_start > JOB_DRAIN_NS)
        break;                  /* give up waiting: a dead server */
    }
    poll_once (c, timeout);
  }

  release_flush (c);
  if (!c->failed && !cancelled) {
    /* durable before "completed" */
    if (jd->fd >= 0) {
      if (cbw_fsync (jd->fd) < 0)
        copier_fail (c, "fsync %s: %s", jd->path, strerror (errno));
    }
    else if (nbd_can_flush (jd->dst) == 1 && nbd_flush (jd->dst, 0) == -1)
      copier_fail (c, "flush of the target: %s", nbd_get_error ());
    /* and its directory entry: a "completed" file must survive a power cut */
    struct cbw_err de = { 0 };
    if (!c->failed && jd->path && jd->regular && cbw_fsync_dir_of (jd->path, &de) < 0)
      copier_fail (c, "target %s: %s", jd->path, de.msg);
  }
  ret = c->failed ? -1 : cancelled ? 1 : 0;

 out:
  if (c->failed)
    ret = -1;
  memcpy (msg, c->msg, msglen < sizeof c->msg ? msglen : sizeof c->msg);
  msg[msglen - 1] = '\0';
  /* Close source connections only with nothing in flight (see top). */
  for (size_t i = 0; c->src && i < c->nsrc; i++)
    if (c->src[i]) {
      if (handle_live (c->src[i]) && nbd_aio_in_flight (c->src[i]) == 0)
        nbd_shutdown (c->src[i], 0);
      nbd_close (c->src[i]);
    }
  if (c->bs) {
    if (handle_live (c->bs) && nbd_aio_in_flight (c->bs) == 0)
      nbd_shutdown (c->bs, 0);
    nbd_close (c->bs);
  }
  if (c->ctl)
    cbw_ctl_client_close (c->ctl);
  /* A target that never answered still holds requests naming our slots:
   * close it before the slots go. */
  if (jd->dst && nbd_aio_in_flight (jd->dst) > 0) {
    nbd_close (jd->dst);
    jd->dst = NULL;
  }
  for (size_t i = 0; c->slots && i < c->nslots; i++)
    free (c->slots[i].buf);
  free (c->slots);
  free (c->src);
  free (c->plan);
  free (c->rel);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
    j->in_flight = 0;
  }
  return ret;
}

static void
close_target (struct orch_job_disk *jd)
{
  if (jd->dst) {
    if (handle_live (jd->dst) && nbd_aio_in_flight (jd->dst) == 0)
      nbd_shutdown (jd->dst, 0);
    nbd_close (jd->dst);
    jd->dst = NULL;
  }
  if (jd->fd >= 0) {
    close (jd->fd);
    jd->fd = -1;
  }
  if (jd->helper_pid > 0) {
    /* qemu-nbd exits when its client disconnects */
    helper_stop ((pid_t) jd->helper_pid, 10000, true);
    jd->helper_pid = 0;
    unlink (jd->helper_sock);
  }
  if (jd->pin_fd >= 0) {
    close (jd->pin_fd);
    jd->pin_fd = -1;
  }
}

static void *
job_thread (void *arg)
{
  struct orch_job *j = arg;
  struct cbw_orch *o = j->o;
  char msg[CBW_ERR_MSG_MAX] = "";
  int r = 0;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
    j->t0_ns = orch_now_ns ();
  }
  for (size_t i = 0; i < j->ndisks && r == 0; i++) {
    struct orch_job_disk *jd = &j->disks[i];
    if (!jd->connect_later)
      continue;
    struct cbw_err e = { 0 };
    if (connect_target_nbd (o, j, jd, jd->target, &e) < 0) {
      r = e.errnum == ECANCELED ? 1 : -1;
      int n = snprintf (msg, sizeof msg, "disk %s: ", jd->name);
      if (n > 0 && (size_t) n < sizeof msg)
        memcpy (msg + n, e.msg, strnlen (e.msg, sizeof msg - (size_t) n - 1) + 1);
      msg[sizeof msg - 1] = '\0';
    }
  }
  for (size_t i = 0; i < j->ndisks && r == 0; i++)
    r = copy_disk (o, j, &j->disks[i], msg, sizeof msg);
  for (size_t i = 0; i < j->ndisks; i++)
    close_target (&j->disks[i]);
  const char *ev;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
    j->finished = (int64_t) time (NULL);
    j->t1_ns = orch_now_ns ();
    if (r == 0) {
      j->state = ORCH_JOB_COMPLETED;
      ev = "job-completed";
    }
    else if (r == 1) {
      j->state = ORCH_JOB_CANCELLED;
      ev = "job-cancelled";
    }
    else {
      j->state = ORCH_JOB_FAILED;
      snprintf (j->error, sizeof j->error, "%s", msg[0] ? msg : "unknown error");
      ev = "job-failed";
    }
    pthread_cond_broadcast (&j->cond);
  }
  jobs_save_or_report (o);
  struct json_object *d;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
    d = json_object_new_object ();
    json_object_object_add (d, "job", json_object_new_string (j->id));
    json_object_object_add (d, "backup", json_object_new_string (j->backup));
    json_object_object_add (d, "bytes-done", json_object_new_int64 ((int64_t) j->done));
    json_object_object_add (d, "bytes-total", json_object_new_int64 ((int64_t) j->total));
    if (j->error[0])
      json_object_object_add (d, "error", json_object_new_string (j->error));
  }
  orch_event (o, ev, d);
  return NULL;
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
    if (orch_valid_name (name) && !is_nbd_uri (spec)) {
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

int
orch_job_start (struct cbw_orch *o, const struct orch_job_req *r,
                struct json_object **ret, struct cbw_err *err)
{
  struct orch_job *j = NULL;
  size_t nd = 0;
  enum orch_backup_mode mode;
  int rc = -1;

  if (r->id && r->id[0] && !orch_valid_name (r->id))
    return cbw_err_set (err, EINVAL, "invalid job id \"%.80s\"", r->id);
  if (r->request_size < 65536 || r->request_size > (32u << 20) ||
      (r->request_size & (r->request_size - 1)))
    return cbw_err_set (err, EINVAL, "request-size must be a power of two from 64 KiB to 32 MiB");
  if (r->requests > 64)
    return cbw_err_set (err, EINVAL, "requests must be 1..64 (0: automatic)");
  if (r->ntargets == 0)
    return cbw_err_set (err, EINVAL, "no target given (\"targets\": [\"DISK=TARGET\", ...])");

  /* The backup and its disks, copied under the lock. */
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    struct orch_backup *b = o->st.backup;
    if (b == NULL)
      return cbw_err_set (err, ENOENT, "no backup is running (begin one first)");
    if (r->backup && r->backup[0] && strcmp (r->backup, b->id) != 0)
      return cbw_err_set (err, ENOENT, "no backup named %.80s (running: %s)", r->backup, b->id);
    mode = b->mode == ORCH_BACKUP_NONE ? ORCH_BACKUP_FULL : b->mode;
    nd = r->ndisks ? r->ndisks : b->ndisks;
    j = job_new (nd);
    if (j == NULL)
      return cbw_err_set (err, ENOMEM, "out of memory");
    snprintf (j->backup, sizeof j->backup, "%s", b->id);
    j->backup_started = b->started;
    for (size_t i = 0; i < nd; i++) {
      const char *name = r->ndisks ? r->disks[i] : b->disks[i].name;
      struct orch_backup_disk *bd = NULL;
      for (size_t k = 0; k < b->ndisks; k++)
        if (strcmp (b->disks[k].name, name) == 0)
          bd = &b->disks[k];
      struct orch_disk *d = orch_find_disk (&o->st, name);
      if (bd == NULL || d == NULL) {
        cbw_err_set (err, ENOENT, "disk %.80s is not part of backup %s", name, b->id);
        goto fail;
      }
      for (size_t k = 0; k < i; k++)
        if (strcmp (j->disks[k].name, name) == 0) {
          cbw_err_set (err, EINVAL, "disk %s listed twice", name);
          goto fail;
        }
      if (bd->offline) {
        /* A push job follows and releases a copy-before-write session,
         * which a stopped disk does not have. */
        cbw_err_set (err, EINVAL, "disk %s is backed up offline (stopped): push jobs "
                     "need a running disk; pull its export %s instead (nbdcopy, "
                     "qemu-img convert)", name, bd->pit_uri ? bd->pit_uri : "");
        goto fail;
      }
      struct orch_job_disk *jd = &j->disks[i];
      snprintf (jd->name, sizeof jd->name, "%s", name);
      jd->src_uri = strdup (bd->pit_uri ? bd->pit_uri : "");
      jd->ctl_cbw = strdup (d->ctl_cbw);
      jd->size = d->size;
      jd->disk = d;
      if (bd->bitmap)
        snprintf (jd->bitmap, sizeof jd->bitmap, "%s", bd->bitmap);
      if (!jd->src_uri || !jd->ctl_cbw) {
        cbw_err_set (err, ENOMEM, "out of memory");
        goto fail;
      }
      if (jd->size == 0) {
        cbw_err_set (err, EIO, "disk %s: size unknown", name);
        goto fail;
      }
      j->pipelined = bd->export_name != NULL;
    }
    /* A disk whose PIT a job has already released cannot be pushed again
     * (released ranges read as EIO), nor can two jobs run on one disk. */
    for (size_t k = 0; k < o->njobs; k++) {
      struct orch_job *p = o->jobs[k];
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
      if (p->backup_ended || strcmp (p->backup, j->backup) != 0 ||
          p->backup_started != j->backup_started)
        continue;
      for (size_t a = 0; a < p->ndisks; a++)
        for (size_t c = 0; c < nd; c++)
          if (strcmp (p->disks[a].name, j->disks[c].name) == 0 &&
              (job_active (p) || p->disks[a].released > 0)) {
            cbw_err_set (err, EBUSY, "disk %s of backup %s %s job %s; begin a new backup to "
                         "push it again", j->disks[c].name, j->backup,
                         job_active (p) ? "is being pushed by" : "was released by", p->id);
            goto fail;
          }
    }
    if (r->id && r->id[0]) {
      if (find_job_locked (o, r->id)) {
        cbw_err_set (err, EEXIST, "job %s already exists", r->id);
        goto fail;
      }
      snprintf (j->id, sizeof j->id, "%s", r->id);
    }
    else
      do
        snprintf (j->id, sizeof j->id, "job-%" PRIu64, ++o->job_seq);
      while (find_job_locked (o, j->id));
  }
  j->mode = mode;
  j->o = o;
  j->speed = r->speed;
  j->request_size = r->request_size;
  j->connect_timeout = r->connect_timeout ? r->connect_timeout : 30;
  /* Automatic: the filter's PIT export gets one connection per request,
   * and nbdkit's CPU per byte grows with the number of connections
   * (measured: 16 x 256 KiB cost 2x the nbdkit CPU of 8, with no gain). */
  j->requests = r->requests ? r->requests : j->pipelined ? 16 : 8;
  j->started = (int64_t) time (NULL);
  j->state = ORCH_JOB_RUNNING;

  for (size_t i = 0; i < r->ntargets; i++)
    if (assign_target (j, r->targets[i], err) < 0)
      goto fail;
  for (size_t i = 0; i < nd; i++) {
    if (j->disks[i].target == NULL) {
      cbw_err_set (err, EINVAL, "no target for disk %s", j->disks[i].name);
      goto fail;
    }
    for (size_t k = 0; k < i; k++)
      if (strcmp (j->disks[k].target, j->disks[i].target) == 0) {
        cbw_err_set (err, EINVAL, "disks %s and %s have the same target", j->disks[k].name,
                     j->disks[i].name);
        goto fail;
      }
  }

  /* What to copy, and each session's block size (for aligned releases).
   * Unlocked I/O: the disks stay put while we are the busy owner. */
  bool incremental = mode == ORCH_BACKUP_INCREMENTAL;
  /* top: only the backup bitmap's extents too, but onto any target (a new
   * one then holds just the top overlay's clusters) */
  bool ranged = incremental || mode == ORCH_BACKUP_TOP;
  for (size_t i = 0; i < nd; i++) {
    struct orch_job_disk *jd = &j->disks[i];
    struct json_object *st = orch_mod_call (jd->ctl_cbw, "status", NULL, NULL, 0, err), *g, *s;
    if (st == NULL) {
      cbw_err_prefix (err, "disk %s: session status", jd->name);
      goto fail;
    }
    bool active = json_object_object_get_ex (st, "state", &s) &&
      strcmp (json_object_get_string (s), "active") == 0;
    if (json_object_object_get_ex (st, "granularity", &g) && json_object_get_int64 (g) > 0)
      jd->gran = (uint64_t) json_object_get_int64 (g);
    json_object_put (st);
    if (!active) {
      cbw_err_set (err, EIO, "disk %s: the copy-before-write session is not active "
                   "(broken or ended): its point in time cannot be read", jd->name);
      goto fail;
    }
    if (jd->gran == 0 || (jd->gran & (jd->gran - 1)))
      jd->gran = 65536;
    if (ranged) {
      uint64_t dirty;
      struct json_object *ext = orch_bm_extents (jd->disk, jd->bitmap, jd->size, 1u << 20,
                                                 &dirty, err);
      if (ext == NULL) {
        cbw_err_prefix (err, "disk %s: dirty extents of %s", jd->name, jd->bitmap);
        goto fail;
      }
      size_t n = json_object_array_length (ext);
      jd->want = calloc (n ? n : 1, sizeof *jd->want);
      if (jd->want == NULL) {
        json_object_put (ext);
        cbw_err_set (err, ENOMEM, "out of memory");
        goto fail;
      }
      /* Widen to whole session blocks (what the session protects) and merge. */
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
      json_object_put (ext);
    }
    else {
      jd->want = calloc (1, sizeof *jd->want);
      if (jd->want == NULL) {
        cbw_err_set (err, ENOMEM, "out of memory");
        goto fail;
      }
      jd->want[0][0] = 0;
      jd->want[0][1] = jd->size;
      jd->nwant = 1;
    }
    for (size_t k = 0; k < jd->nwant; k++)
      jd->total += jd->want[k][1];
    j->total += jd->total;
  }
  {
    /* What a target must never be: collected now, checked on what each
     * target_open actually opens (device and inode, not names). */
    struct orch_protect ps;
    if (orch_protect_collect (o, &ps, err) < 0)
      goto fail;
    int tr = 0;
    for (size_t i = 0; i < nd && tr == 0; i++)
      if ((tr = target_open (o, j, &j->disks[i], &ps, incremental, err)) < 0)
        cbw_err_prefix (err, "disk %s", j->disks[i].name);
    orch_protect_free (&ps);
    if (tr < 0)
      goto fail;
    /* two names of one file are one target */
    for (size_t i = 0; i < nd; i++)
      for (size_t k = 0; k < i; k++) {
        int fi = j->disks[i].fd >= 0 ? j->disks[i].fd : j->disks[i].pin_fd;
        int fk = j->disks[k].fd >= 0 ? j->disks[k].fd : j->disks[k].pin_fd;
        struct stat si, sk;
        if (fi >= 0 && fk >= 0 && fstat (fi, &si) == 0 && fstat (fk, &sk) == 0 &&
            si.st_dev == sk.st_dev && si.st_ino == sk.st_ino) {
          cbw_err_set (err, EINVAL, "disks %s and %s have the same target (%s and %s are "
                       "one file)", j->disks[k].name, j->disks[i].name, j->disks[k].path,
                       j->disks[i].path);
          goto fail;
        }
      }
  }

  j->wakefd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (j->wakefd < 0) {
    cbw_err_set (err, errno, "eventfd: %s", strerror (errno));
    goto fail;
  }
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    struct orch_job **nj = realloc (o->jobs, (o->njobs + 1) * sizeof *nj);
    if (nj == NULL) {
      cbw_err_set (err, ENOMEM, "out of memory");
      goto fail;
    }
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
    cbw_err_set (err, e, "cannot start the job thread: %s", strerror (e));
    goto fail;
  }
  j->thread_started = true;
  struct json_object *d = json_object_new_object ();
  json_object_object_add (d, "job", json_object_new_string (j->id));
  json_object_object_add (d, "backup", json_object_new_string (j->backup));
  json_object_object_add (d, "mode", json_object_new_string (orch_backup_mode_name (j->mode)));
  json_object_object_add (d, "bytes-total", json_object_new_int64 ((int64_t) j->total));
  orch_event (o, "job-started", d);
  *ret = orch_job_to_json (j);
  return 0;

 fail:
  if (j) {
    for (size_t i = 0; i < j->ndisks; i++)
      target_abandon (&j->disks[i]);
    job_free (j);
  }
  return rc;
}

int
orch_job_pause (struct cbw_orch *o, const char *id, bool pause, struct cbw_err *err)
{
  struct orch_job *j;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  if ((j = find_job_locked (o, id)) == NULL)
    return cbw_err_set (err, ENOENT, "no job named %.80s", id);
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
  struct orch_job *j;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  if ((j = find_job_locked (o, id)) == NULL)
    return cbw_err_set (err, ENOENT, "no job named %.80s", id);
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
    if ((j = find_job_locked (o, id)) == NULL)
      return cbw_err_set (err, ENOENT, "no job named %.80s", id);
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
    struct json_object *x = json_object_array_get_idx (jobs, i), *dj;
    if (!json_object_is_type (x, json_type_object))
      continue;
    const char *id = json_object_object_get_ex (x, "id", &v) ? json_object_get_string (v) : "";
    if (!orch_valid_name (id))
      continue;
    size_t nd = json_object_object_get_ex (x, "disks", &dj) &&
      json_object_is_type (dj, json_type_array) ? json_object_array_length (dj) : 0;
    if (nd > 4096)
      continue;
    struct orch_job *j = job_new (nd);
    if (j == NULL)
      break;
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
    for (size_t k = 0; k < nd; k++) {
      struct json_object *y = json_object_array_get_idx (dj, k);
      struct orch_job_disk *jd = &j->disks[k];
      if (!json_object_is_type (y, json_type_object))
        continue;
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
        helper_stop ((pid_t) hp, 0, false);
        unlink (hs);
      }
    }
#undef S
#undef I
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
