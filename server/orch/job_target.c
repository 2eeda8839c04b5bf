/* cbw — server/orch/job_target.c: the targets of push backup jobs.  A
 * target is an NBD URI (nbd://, nbd+unix://, ...), a raw file or block
 * device (raw:PATH or PATH; a new file is created sparse), or a qcow2 file
 * (qcow2:PATH or PATH.qcow2; created with `qemu-img create` if new, written
 * through a `qemu-nbd` we start on a Unix socket under STATE/jobs/,
 * supervised and stopped by the job).
 *
 * Nothing cbwd serves or keeps may become a target: a file is opened (or
 * created O_EXCL, never through a symlink) and what was opened is checked
 * by device and inode against the orchestrator's protected set; qemu-img
 * and qemu-nbd reach the checked file as /proc/CBWD/fd/N, never by name; an
 * NBD export that announces a cbw disk identity is refused.  An NBD URI
 * target is connected on the job's thread, with a deadline, so that the
 * control thread never waits for a remote server.
 *
 * Locking: none of its own.  Opening runs on the control thread (job start)
 * and connecting on the job's thread, each on a job the caller owns; o->lock
 * is taken only to read disk names for an error message, j->lock only to
 * see a cancel request.  Neither is held across I/O.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cleanup.h"
#include "disk_id.h"
#include "fileutil.h"
#include "job_internal.h"

/* Helper processes (qemu-nbd): wait for exit up to ms, then TERM/KILL. */
void
job_helper_stop (pid_t pid, int ms, bool is_child)
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

bool
job_is_nbd_uri (const char *s)
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

/* The last line of a helper's log (the last non-empty one if skip_blank),
 * without its newline; "" if none. */
static void
log_tail (const char *log, bool skip_blank, char *tail, size_t n)
{
  tail[0] = '\0';
  FILE *fp = fopen (log, "r");
  if (fp == NULL)
    return;
  char line[256];
  while (fgets (line, sizeof line, fp))
    if (!skip_blank || line[0] != '\n')
      snprintf (tail, n, "%s", line);
  fclose (fp);
  tail[strcspn (tail, "\n")] = '\0';
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
  char tail[256];
  log_tail (log, true, tail, sizeof tail);
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

int
job_target_connect (struct cbw_orch *o, struct orch_job *j, struct orch_job_disk *jd,
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

/* A raw target: an existing copy of this disk (same size), or a new file
 * of the disk's size, sparse. */
static int
target_open_raw (struct orch_job_disk *jd, const struct orch_protect *ps,
                 bool exists, struct cbw_err *err)
{
  const char *t = jd->path;
  struct stat sb;
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

/* A qcow2 target: qemu-img create if new, then qemu-nbd on a socket of
 * ours; both reach the file we opened and checked through
 * /proc/CBWD/fd/N. */
static int
target_open_qcow2 (struct cbw_orch *o, struct orch_job *j, struct orch_job_disk *jd,
                   const struct orch_protect *ps, bool exists, struct cbw_err *err)
{
  const char *t = jd->path;
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
    char tail[256];
    log_tail (jd->helper_log, false, tail, sizeof tail);
    return cbw_err_set (err, EIO, "target %s: qemu-nbd did not start%s%s", t,
                        tail[0] ? ": " : "", tail);
  }
  CLEANUP_FREE char *uri = orch_strdup_printf ("nbd+unix:///?socket=%s", jd->helper_sock);
  if (uri == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  return job_target_connect (o, j, jd, uri, err);
}

/* Open (or create) the target of one disk.  Runs on the control thread
 * without o->lock.  On failure, a file it created is removed. */
int
job_target_open (struct cbw_orch *o, struct orch_job *j, struct orch_job_disk *jd,
             const struct orch_protect *ps, bool incremental, struct cbw_err *err)
{
  const char *t = jd->target;
  if (job_is_nbd_uri (t)) {
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

  if (strcmp (jd->format, "raw") == 0)
    return target_open_raw (jd, ps, exists, err);
  return target_open_qcow2 (o, j, jd, ps, exists, err);
}

/* Undo job_target_open after a job-start failure. */
void
job_target_abandon (struct orch_job_disk *jd)
{
  if (jd->dst) {
    nbd_shutdown (jd->dst, 0);
    nbd_close (jd->dst);
    jd->dst = NULL;
  }
  if (jd->helper_pid > 0) {
    job_helper_stop ((pid_t) jd->helper_pid, 3000, true);
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

void
job_target_close (struct orch_job_disk *jd)
{
  if (jd->dst) {
    if (job_handle_live (jd->dst) && nbd_aio_in_flight (jd->dst) == 0)
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
    job_helper_stop ((pid_t) jd->helper_pid, 10000, true);
    jd->helper_pid = 0;
    unlink (jd->helper_sock);
  }
  if (jd->pin_fd >= 0) {
    close (jd->pin_fd);
    jd->pin_fd = -1;
  }
}

