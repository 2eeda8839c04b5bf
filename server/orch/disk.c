/* cbw — server/orch/disk.c: one nbdkit per disk, started and supervised.
 *
 * A disk is served by
 *   nbdkit -f -U DISKDIR/nbd.sock --filter=cbw --filter=dirtybitmap chain \
 *     file=IMAGE control=DISKDIR/chain.ctl \
 *     dirtybitmap=DISKDIR/bitmaps.json dirtybitmap-image=IMAGE \
 *     dirtybitmap-control=DISKDIR/dirtybitmap.ctl cbw-control=DISKDIR/cbw.ctl
 *     cbw-pit-export=pit disk-id=UUID
 * plus dirtybitmap-create=true at disk-add only (later starts refuse a
 * missing bitmap descriptor: lost bitmaps are never recreated empty)
 * plus chain=DISKDIR/overlays/NAME.chain (or the descriptor given to
 * disk-add) for a disk added with overlays; without it the chain plugin
 * serves the raw image on its fast path and cannot take snapshots
 * (the bitmaps live in the state directory, not beside the image: an image
 * may be a block device, and all of cbwd's state is in one place).  With
 * plugin "file", nbdkit's own file plugin replaces chain (no chain.ctl).
 * The cbw filter is the OUTER one on purpose: its quiesce holds writes
 * before they reach the dirtybitmap filter, so a bitmap rotation done while
 * quiesced puts every write on exactly one side of the checkpoint.
 * nbdkit runs in its own process group (a ^C to cbwd does not stop guests'
 * disks) and survives a crash of cbwd; the next cbwd adopts it (the pid is in
 * the state file; /proc/PID/cmdline must name the disk's socket, so a reused
 * pid is never adopted).
 *
 * Supervision: one thread polls a pidfd per running nbdkit plus an eventfd
 * to rebuild its set.  When an nbdkit exits that nobody asked to stop, the
 * disk becomes "dead" and a "disk-dead" event is queued; it is never
 * restarted silently (`disk-start` does it on request).
 *
 * Locking: o->lock guards d->run/pidfd/exit_status/pid; the supervisor
 * takes it only to read the set and mark exits.  Spawning, waiting for the
 * sockets and killing happen unlocked.  Stop protocol: the stopper negates
 * d->pid under the lock ("stop requested": no dead event), sends SIGTERM and
 * waits on exit_cond until the supervisor has seen the exit, so only the
 * supervisor reaps and closes pidfds and no fd is closed under its poll().
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

#include "cleanup.h"
#include "orch_internal.h"

extern char **environ;

static pthread_cond_t exit_cond = PTHREAD_COND_INITIALIZER;

const char *
orch_disk_run_name (enum orch_disk_run r)
{
  switch (r) {
  case ORCH_DISK_RUNNING: return "running";
  case ORCH_DISK_DEAD: return "dead";
  default: return "stopped";
  }
}

static double
now_s (void)
{
  return (double) orch_now_ns () / 1e9;
}

static int
try_connect (const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  if (strlen (path) >= sizeof sun.sun_path)
    return -1;
  strcpy (sun.sun_path, path);
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  int r = connect (fd, (struct sockaddr *) &sun, sizeof sun);
  close (fd);
  return r;
}

/* Last non-empty line of a log file, for error messages. */
static void
log_tail (const char *path, char *buf, size_t len)
{
  char tmp[4096];
  buf[0] = '\0';
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return;
  off_t end = lseek (fd, 0, SEEK_END);
  off_t start = end > (off_t) sizeof tmp - 1 ? end - (off_t) sizeof tmp + 1 : 0;
  ssize_t n = pread (fd, tmp, sizeof tmp - 1, start);
  close (fd);
  if (n <= 0)
    return;
  tmp[n] = '\0';
  while (n > 0 && (tmp[n - 1] == '\n' || tmp[n - 1] == '\r'))
    tmp[--n] = '\0';
  char *nl = strrchr (tmp, '\n');
  const char *last = nl ? nl + 1 : tmp;
  size_t n2 = strlen (last);
  if (n2 >= len)
    n2 = len - 1;
  memcpy (buf, last, n2);
  buf[n2] = '\0';
}

pid_t
orch_spawn (char *const argv[], const char *log_path, struct cbw_err *err)
{
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  pid_t pid;

  posix_spawn_file_actions_init (&fa);
  posix_spawnattr_init (&at);
  posix_spawn_file_actions_addopen (&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen (&fa, 1, log_path,
                                    O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2 (&fa, 1, 2);
  /* Own process group; default signal mask and dispositions. */
  sigset_t none, all;
  sigemptyset (&none);
  sigfillset (&all);
  posix_spawnattr_setpgroup (&at, 0);
  posix_spawnattr_setsigmask (&at, &none);
  posix_spawnattr_setsigdefault (&at, &all);
  posix_spawnattr_setflags (&at, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK |
                            POSIX_SPAWN_SETSIGDEF);
  int r = posix_spawnp (&pid, argv[0], &fa, &at, argv, environ);
  posix_spawn_file_actions_destroy (&fa);
  posix_spawnattr_destroy (&at);
  if (r != 0) {
    cbw_err_set (err, r, "cannot run %s: %s", argv[0], strerror (r));
    return -1;
  }
  return pid;
}

/* Long-lived helpers (nbdkit) are started detached: fork, setsid, fork
 * again; the middle process exits at once, so the helper is not our child.
 * nbdkit arms PR_SET_PDEATHSIG, which fires when the *thread* that forked it
 * ends: a child of cbwd's control thread would die with cbwd, and guests
 * must not lose their disk because cbwd restarts.  Liveness is then
 * followed through a pidfd (works for non-children, sees zombies as dead).
 * Between fork and exec only async-signal-safe calls are made. */
pid_t
orch_spawn_detached (char *const argv[], const char *log_path, int *pidfd_out,
                     struct cbw_err *err)
{
  int pfd[2];
  *pidfd_out = -1;
  if (pipe2 (pfd, O_CLOEXEC) < 0)
    return cbw_err_set (err, errno, "pipe: %s", strerror (errno));
  int logfd = open (log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (logfd < 0) {
    int e = errno;
    close (pfd[0]); close (pfd[1]);
    return cbw_err_set (err, e, "%s: %s", log_path, strerror (e));
  }
  int nullfd = open ("/dev/null", O_RDONLY | O_CLOEXEC);
  /* Test hook, read before fork (getenv is not async-signal-safe): keep
   * the intermediate process alive this long after it forked the helper,
   * the slow exit that a loaded machine produces now and then. */
  const char *hold_env = getenv ("CBW_ORCH_SPAWN_HOLD_MS");
  long hold_ms = hold_env ? strtol (hold_env, NULL, 10) : 0;
  struct timespec hold = { .tv_sec = hold_ms > 0 ? hold_ms / 1000 : 0,
                           .tv_nsec = hold_ms > 0 ? (hold_ms % 1000) * 1000000 : 0 };
  pid_t mid = fork ();
  if (mid < 0) {
    int e = errno;
    close (pfd[0]); close (pfd[1]); close (logfd);
    if (nullfd >= 0) close (nullfd);
    return cbw_err_set (err, e, "fork: %s", strerror (e));
  }
  if (mid == 0) {
    sigset_t none;
    struct sigaction dfl;
    memset (&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset (&none);
    for (int sig = 1; sig < NSIG; sig++)
      sigaction (sig, &dfl, NULL);
    sigprocmask (SIG_SETMASK, &none, NULL);
    setsid ();
    pid_t pid = fork ();
    if (pid != 0) {
      ssize_t w = write (pfd[1], &pid, sizeof pid);
      (void) w;
      if (hold.tv_sec || hold.tv_nsec)
        nanosleep (&hold, NULL);
      _exit (pid < 0 ? 1 : 0);
    }
    if (nullfd >= 0) dup2 (nullfd, 0);
    dup2 (logfd, 1);
    dup2 (logfd, 2);
    execvp (argv[0], argv);
    static const char msg[] = "cbwd: exec failed\n";
    ssize_t w = write (2, msg, sizeof msg - 1);
    (void) w;
    _exit (127);
  }
  close (pfd[1]);
  close (logfd);
  if (nullfd >= 0) close (nullfd);
  pid_t pid = -1;
  ssize_t n;
  do n = read (pfd[0], &pid, sizeof pid); while (n < 0 && errno == EINTR);
  close (pfd[0]);
  waitpid (mid, NULL, 0);
  if (n != sizeof pid || pid <= 0)
    return cbw_err_set (err, ECHILD, "cannot start %s (fork failed)", argv[0]);
  int pidfd = (int) syscall (SYS_pidfd_open, pid, 0);
  if (pidfd < 0) {
    int e = errno;
    kill (pid, SIGKILL);
    return cbw_err_set (err, e, "%s: pidfd_open: %s (already exited?)", argv[0],
                        strerror (e));
  }
  *pidfd_out = pidfd;
  return pid;
}

static bool
pidfd_exited (int pidfd, int ms)
{
  struct pollfd p = { .fd = pidfd, .events = POLLIN };
  return poll (&p, 1, ms) > 0;
}

int
orch_wait_socket (const char *path, int pidfd, double timeout, struct cbw_err *err)
{
  double end = now_s () + timeout;
  for (;;) {
    if (try_connect (path) == 0)
      return 0;
    if (pidfd >= 0 && pidfd_exited (pidfd, 0))
      return cbw_err_set (err, ECHILD, "the process exited before %s appeared", path);
    if (now_s () > end)
      return cbw_err_set (err, ETIMEDOUT, "%s did not answer within %.0f s",
                          path, timeout);
    usleep (20000);
  }
}

void
orch_kill_wait (pid_t pid, int pidfd)
{
  int own = -1;
  if (pid <= 0)
    return;
  if (pidfd < 0)
    pidfd = own = (int) syscall (SYS_pidfd_open, pid, 0);
  if (pidfd < 0)
    return;                     /* gone already */
  kill (pid, SIGTERM);
  if (!pidfd_exited (pidfd, 5000)) {
    kill (pid, SIGKILL);
    pidfd_exited (pidfd, 5000);
  }
  if (own >= 0)
    close (own);
}

static char *
module_path (struct cbw_orch *o, const char *file, const char *name)
{
  if (o->module_dir)
    return orch_strdup_printf ("%s/%s", o->module_dir, file);
  return strdup (name);
}

static uint64_t
nbd_size (const char *sock)
{
  struct nbd_handle *h = nbd_create ();
  int64_t sz = -1;
  if (h == NULL)
    return 0;
  if (nbd_connect_unix (h, sock) == 0)
    sz = nbd_get_size (h);
  nbd_close (h);
  return sz > 0 ? (uint64_t) sz : 0;
}

int
orch_disk_start (struct cbw_orch *o, struct orch_disk *d, struct cbw_err *err)
{
  CLEANUP_FREE char *chain = o->file_plugin ? strdup ("file")
    : module_path (o, "nbdkit-chain-plugin.so", "chain");
  CLEANUP_FREE char *fcbw = module_path (o, "nbdkit-cbw-filter.so", "cbw");
  CLEANUP_FREE char *fdb = module_path (o, "nbdkit-dirtybitmap-filter.so", "dirtybitmap");
  CLEANUP_FREE char *a_fcbw = NULL, *a_fdb = NULL, *a_file = NULL, *a_ctl = NULL;
  CLEANUP_FREE char *a_dbimg = NULL, *a_dbctl = NULL, *a_cbwctl = NULL, *a_desc = NULL;
  CLEANUP_FREE char *a_chain = NULL, *chain_dir = NULL, *a_id = NULL;
  char *argv[64];
  size_t n = 0;

  if (!chain || !fcbw || !fdb)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (o->module_dir) {
    const char *mods[] = { fcbw, fdb, chain };
    for (size_t i = 0; i < (o->file_plugin ? 2 : 3); i++)
      if (access (mods[i], R_OK) < 0)
        return cbw_err_set (err, ENOENT, "nbdkit module %s: %s (is it built?)",
                            mods[i], strerror (errno));
  }
  if (orch_disk_check_lock (d, err) < 0)   /* a clear error, not "nbdkit did not start" */
    return -1;
  if (mkdir (d->dir, 0700) < 0 && errno != EEXIST)
    return cbw_err_set (err, errno, "%s: mkdir: %s", d->dir, strerror (errno));
  if (d->chain) {
    if (o->file_plugin)
      return cbw_err_set (err, EINVAL, "disk %s has an overlay chain: it needs the chain "
                          "plugin (this cbwd runs disks with nbdkit's file plugin)", d->name);
    /* the chain plugin creates the descriptor over file= when it is missing */
    chain_dir = strdup (d->chain);
    char *slash = chain_dir ? strrchr (chain_dir, '/') : NULL;
    if (slash == NULL)
      return cbw_err_set (err, ENOMEM, "out of memory");
    *slash = '\0';
    if (chain_dir[0] && mkdir (chain_dir, 0700) < 0 && errno != EEXIST)
      return cbw_err_set (err, errno, "%s: mkdir: %s", chain_dir, strerror (errno));
    a_chain = orch_strdup_printf ("chain=%s", d->chain);
    if (a_chain == NULL)
      return cbw_err_set (err, ENOMEM, "out of memory");
  }
  /* Stale sockets of a dead nbdkit: nothing answers on them any more. */
  const char *socks[] = { d->nbd_sock, d->ctl_cbw, d->ctl_bitmap, d->ctl_chain };
  size_t nsocks = o->file_plugin ? 3 : 4;
  for (size_t i = 0; i < nsocks; i++) {
    if (try_connect (socks[i]) == 0)
      return cbw_err_set (err, EADDRINUSE, "%s: a live process answers on it",
                          socks[i]);
    unlink (socks[i]);
  }

  a_fcbw = orch_strdup_printf ("--filter=%s", fcbw);
  a_fdb = orch_strdup_printf ("--filter=%s", fdb);
  a_file = orch_strdup_printf ("file=%s", d->file);
  a_ctl = orch_strdup_printf ("control=%s", d->ctl_chain);
  a_dbimg = orch_strdup_printf ("dirtybitmap-image=%s", d->file);
  a_desc = orch_strdup_printf ("dirtybitmap=%s", d->bitmaps);
  a_dbctl = orch_strdup_printf ("dirtybitmap-control=%s", d->ctl_bitmap);
  a_cbwctl = orch_strdup_printf ("cbw-control=%s", d->ctl_cbw);
  a_id = orch_strdup_printf ("disk-id=%s", d->id);
  if (!a_id || !a_fcbw || !a_fdb || !a_file || !a_ctl || !a_dbimg || !a_dbctl || !a_cbwctl || !a_desc)
    return cbw_err_set (err, ENOMEM, "out of memory");
  for (size_t i = 0; o->nbdkit_argv[i] && n < 40; i++)
    argv[n++] = o->nbdkit_argv[i];
  argv[n++] = (char *) "-f";
  argv[n++] = (char *) "-U";
  argv[n++] = d->nbd_sock;
  argv[n++] = a_fcbw;
  argv[n++] = a_fdb;
  argv[n++] = chain;
  argv[n++] = a_file;
  if (!o->file_plugin) {
    argv[n++] = a_ctl;
    argv[n++] = a_id;           /* the export description names the disk */
  }
  if (a_chain)
    argv[n++] = a_chain;        /* overlays: every request goes through the chain */
  if (d->force_share && !o->file_plugin)
    argv[n++] = (char *) "force-share=true";
  argv[n++] = a_desc;
  if (d->create_bitmaps)        /* only disk-add: else a lost descriptor is an error */
    argv[n++] = (char *) "dirtybitmap-create=true";
  argv[n++] = a_dbimg;
  argv[n++] = a_dbctl;
  argv[n++] = a_cbwctl;
  /* The filter's own PIT export: only cbwd's PIT exports (one request in
   * flight per upstream connection) should connect to it; see "Which
   * clients may connect" in nbdkit-cbw-filter(1). */
  argv[n++] = (char *) "cbw-pit-export=pit";
  argv[n] = NULL;

  int pidfd;
  pid_t pid = orch_spawn_detached (argv, d->log_path, &pidfd, err);
  if (pid < 0)
    return cbw_err_prefix (err, "disk %s", d->name);
  for (size_t i = 0; i < nsocks; i++) {
    if (orch_wait_socket (socks[i], pidfd, o->start_timeout, err) < 0) {
      char tail[300], msg[CBW_ERR_MSG_MAX];
      orch_kill_wait (pid, pidfd);
      close (pidfd);
      log_tail (d->log_path, tail, sizeof tail);
      memcpy (msg, err->msg, sizeof msg);
      return cbw_err_set (err, err->errnum, "disk %s: nbdkit did not start: %s%s%s",
                          d->name, msg, tail[0] ? "; nbdkit said: " : "", tail);
    }
  }
  uint64_t size = nbd_size (d->nbd_sock);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    d->pid = pid;
    d->pidfd = pidfd;
    d->is_child = false;
    d->run = ORCH_DISK_RUNNING;
    d->exit_status = -1;
    d->size = size;
  }
  orch_supervisor_kick (o);
  return 0;
}

bool
orch_pid_cmdline_has (int64_t pid, const char *needle, bool whole_arg)
{
  char path[64], buf[8192];
  if (pid <= 0)
    return false;
  snprintf (path, sizeof path, "/proc/%lld/cmdline", (long long) pid);
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return false;
  ssize_t n = read (fd, buf, sizeof buf - 1);
  close (fd);
  if (n <= 0)
    return false;
  buf[n] = '\0';
  for (ssize_t i = 0; i < n; i += (ssize_t) strlen (buf + i) + 1)
    if (whole_arg ? strcmp (buf + i, needle) == 0 : strstr (buf + i, needle) != NULL)
      return true;
  return false;
}

void
orch_disk_adopt (struct cbw_orch *o, struct orch_disk *d)
{
  bool ok = orch_pid_cmdline_has (d->pid, d->nbd_sock, true);
  int pidfd = ok ? (int) syscall (SYS_pidfd_open, (pid_t) d->pid, 0) : -1;
  if (pidfd >= 0 && try_connect (d->nbd_sock) == 0) {
    uint64_t size = nbd_size (d->nbd_sock);
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    d->pidfd = pidfd;
    d->is_child = false;
    d->run = ORCH_DISK_RUNNING;
    d->size = size;
    return;
  }
  if (pidfd >= 0)
    close (pidfd);
  struct json_object *data = json_object_new_object ();
  json_object_object_add (data, "disk", json_object_new_string (d->name));
  json_object_object_add (data, "pid", json_object_new_int64 (d->pid));
  json_object_object_add (data, "reason",
                          json_object_new_string ("nbdkit not running when cbwd started"));
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  d->run = ORCH_DISK_DEAD;
  orch_event_locked (o, "disk-dead", data);
}

bool
orch_disk_running (struct cbw_orch *o, struct orch_disk *d)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  return d->run == ORCH_DISK_RUNNING;
}

int
orch_disk_stop (struct cbw_orch *o, struct orch_disk *d, struct cbw_err *err)
{
  pid_t pid;
  (void) err;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    if (d->run != ORCH_DISK_RUNNING) {
      d->run = ORCH_DISK_STOPPED;
      d->pid = 0;
      return 0;
    }
    pid = (pid_t) d->pid;
    d->pid = -d->pid;            /* negative: stop requested, no dead event */
  }
  kill (pid, SIGTERM);
  struct timespec dl;
  clock_gettime (CLOCK_REALTIME, &dl);
  dl.tv_sec += 10;
  bool killed = false;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  while (d->run == ORCH_DISK_RUNNING) {
    if (pthread_cond_timedwait (&exit_cond, &o->lock, &dl) == ETIMEDOUT) {
      if (killed)
        break;
      kill (pid, SIGKILL);
      killed = true;
      clock_gettime (CLOCK_REALTIME, &dl);
      dl.tv_sec += 5;
    }
  }
  d->pid = 0;
  return 0;
}

/* ---- supervisor ---- */

static void *
supervisor (void *arg)
{
  struct cbw_orch *o = arg;
  for (;;) {
    struct pollfd pfd[1 + 256];
    struct orch_disk *who[1 + 256];
    size_t n = 0;
    pfd[n].fd = o->sup_wakefd;
    pfd[n].events = POLLIN;
    who[n++] = NULL;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
      if (o->sup_stop)
        return NULL;
      for (size_t i = 0; i < o->st.ndisks && n < 257; i++) {
        struct orch_disk *d = o->st.disks[i];
        if (d->run == ORCH_DISK_RUNNING && d->pidfd >= 0) {
          pfd[n].fd = d->pidfd;
          pfd[n].events = POLLIN;
          who[n++] = d;
        }
      }
    }
    int r = poll (pfd, n, -1);
    if (r < 0)
      continue;
    if (pfd[0].revents & POLLIN) {
      uint64_t v;
      if (read (o->sup_wakefd, &v, sizeof v) < 0) { /* nothing */ }
    }
    for (size_t i = 1; i < n; i++) {
      if (!(pfd[i].revents & (POLLIN | POLLHUP | POLLERR)))
        continue;
      struct orch_disk *d = who[i];
      int status = -1;
      pid_t pid;
      {
        ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
        pid = (pid_t) (d->pid < 0 ? -d->pid : d->pid);
      }
      if (d->is_child && waitpid (pid, &status, 0) != pid)
        status = -1;
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
      close (d->pidfd);
      d->pidfd = -1;
      d->exit_status = status;
      if (d->pid < 0) {           /* asked to stop */
        d->run = ORCH_DISK_STOPPED;
      }
      else {
        d->run = ORCH_DISK_DEAD;
        struct json_object *data = json_object_new_object ();
        json_object_object_add (data, "disk", json_object_new_string (d->name));
        json_object_object_add (data, "pid", json_object_new_int64 (pid));
        if (status >= 0 && WIFEXITED (status))
          json_object_object_add (data, "exit-status",
                                  json_object_new_int (WEXITSTATUS (status)));
        else if (status >= 0 && WIFSIGNALED (status))
          json_object_object_add (data, "signal", json_object_new_int (WTERMSIG (status)));
        orch_event_locked (o, "disk-dead", data);
      }
      pthread_cond_broadcast (&exit_cond);
    }
  }
}

int
orch_supervisor_start (struct cbw_orch *o, struct cbw_err *err)
{
  o->sup_wakefd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (o->sup_wakefd < 0)
    return cbw_err_set (err, errno, "eventfd: %s", strerror (errno));
  int r = pthread_create (&o->sup_thread, NULL, supervisor, o);
  if (r != 0) {
    close (o->sup_wakefd);
    o->sup_wakefd = -1;
    return cbw_err_set (err, r, "pthread_create: %s", strerror (r));
  }
  o->sup_started = true;
  return 0;
}

void
orch_supervisor_kick (struct cbw_orch *o)
{
  uint64_t one = 1;
  if (o->sup_wakefd >= 0 && write (o->sup_wakefd, &one, sizeof one) < 0) {
    /* counter full: a wakeup is pending anyway */
  }
}

void
orch_supervisor_stop (struct cbw_orch *o)
{
  if (!o->sup_started)
    return;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    o->sup_stop = true;
  }
  orch_supervisor_kick (o);
  pthread_join (o->sup_thread, NULL);
  o->sup_started = false;
  close (o->sup_wakefd);
  o->sup_wakefd = -1;
}
