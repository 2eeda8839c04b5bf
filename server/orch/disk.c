/* cbw — server/orch/disk.c: one nbdkit per disk, started and supervised.
 *
 * A disk is served by
 *   nbdkit -f -U DISKDIR/nbd.sock --filter=cbw --filter=dirtybitmap chain \
 *     file=IMAGE control=DISKDIR/chain.ctl \
 *     dirtybitmap=DISKDIR/bitmaps.json dirtybitmap-image=IMAGE \
 *     dirtybitmap-control=DISKDIR/dirtybitmap.ctl cbw-control=DISKDIR/cbw.ctl
 *     cbw-pit-export=pit disk-id=UUID
 * plus cbw-source=IMAGE when IMAGE is a regular file served raw (no overlay
 * chain): the cbw filter's first-write copies then go from the image to
 * the local store inside the kernel (copy_file_range / FICLONERANGE)
 * instead of through the filter's buffers (a block device, or a chain
 * whose top is not the image, must not be named: the copies would read
 * other bytes than the disk's)
 * plus dirtybitmap-create=true at disk-add only (later starts refuse a
 * missing bitmap descriptor: lost bitmaps are never recreated empty)
 * plus chain=DISKDIR/overlays/NAME.chain (or the descriptor given to
 * disk-add) for a disk added with overlays (and chain-create=true at
 * disk-add's start only: a later start never makes a new, empty chain in
 * place of a lost descriptor); without it the chain plugin
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
 * nbdkit is exec'd only after the intermediate process of the double fork
 * is reaped (see orch_spawn_detached): nbdkit arms a parent-death signal
 * first thing, and the intermediate's exit must never be its parent's.
 *
 * Supervision: one thread polls a pidfd per running nbdkit plus an eventfd
 * to rebuild its set.  When an nbdkit exits that nobody asked to stop, the
 * disk becomes "dead" and a "disk-dead" event is queued; it is never
 * restarted silently (`disk-start` does it on request).  Only POLLIN of a
 * descriptor that still is that process's pidfd means "exited"; anything
 * else is an internal error, reported, and never a reason to signal.
 * Signals go through pidfds, never kill(pid): a reused pid is never hit.
 *
 * Locking: o->lock guards d->run/pidfd/pidfd_serial/exit_status/pid and
 * pidfd_serials; the supervisor takes it to read the set and to mark exits,
 * and acts on a polled descriptor only if the disk is still listed and
 * holds that descriptor with the same serial.  Spawning, waiting for the
 * sockets and killing happen unlocked.  Stop protocol: the stopper negates
 * d->pid under the lock ("stop requested": no dead event), duplicates the
 * pidfd, signals through its duplicate and waits on exit_cond until the
 * supervisor has seen the exit, so only the supervisor reaps and closes a
 * running disk's pidfd and no fd is closed under its poll() by others.
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
/* Numbers each pidfd given to a disk (o->lock): the supervisor acts on a
 * descriptor it polled only if the disk still holds that very one. */
static uint64_t pidfd_serials;

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
void
orch_log_tail (const char *path, char *buf, size_t len)
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
 * again; the intermediate process exits at once, so the helper is not our
 * child and survives cbwd.  nbdkit arms PR_SET_PDEATHSIG(SIGTERM) first
 * thing in main(); that signal fires when the *thread* that forked it
 * exits, so it must be armed only once the intermediate is gone: else the
 * intermediate's exit stops the new nbdkit (a clean exit 0 with an empty
 * log, or death by SIGTERM before its handler is set), which a loaded
 * machine does now and then.  Hence a start handshake: the grandchild waits
 * on a "go" pipe before exec, and we write it only after waitpid() reaped
 * the intermediate (so the grandchild has been reparented, and its
 * parent-death signal refers to its new parent, never to us or to the
 * intermediate).  If we fail or die before "go", the grandchild reads EOF
 * and exits without running anything: no process is killed by pid.
 * Liveness is then followed through a pidfd (works for non-children, sees
 * zombies as dead).  Between fork and exec only async-signal-safe calls are
 * made. */
pid_t
orch_spawn_detached (char *const argv[], const char *log_path, int *pidfd_out,
                     struct cbw_err *err)
{
  int pfd[2], gfd[2];
  *pidfd_out = -1;
  if (pipe2 (pfd, O_CLOEXEC) < 0)
    return cbw_err_set (err, errno, "pipe: %s", strerror (errno));
  if (pipe2 (gfd, O_CLOEXEC) < 0) {
    int e = errno;
    close (pfd[0]); close (pfd[1]);
    return cbw_err_set (err, e, "pipe: %s", strerror (e));
  }
  int logfd = open (log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (logfd < 0) {
    int e = errno;
    close (pfd[0]); close (pfd[1]); close (gfd[0]); close (gfd[1]);
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
    close (pfd[0]); close (pfd[1]); close (gfd[0]); close (gfd[1]); close (logfd);
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
    close (gfd[1]);             /* only cbwd holds the write end: EOF = no go */
    pid_t pid = fork ();
    if (pid != 0) {
      ssize_t w = write (pfd[1], &pid, sizeof pid);
      (void) w;
      if (hold.tv_sec || hold.tv_nsec)
        nanosleep (&hold, NULL);
      _exit (pid < 0 ? 1 : 0);
    }
    char go = 0;
    ssize_t r;
    do r = read (gfd[0], &go, 1); while (r < 0 && errno == EINTR);
    if (r != 1 || go != 'g')
      _exit (0);                /* the starter gave up or died */
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
  close (gfd[0]);
  close (logfd);
  if (nullfd >= 0) close (nullfd);
  pid_t pid = -1;
  ssize_t n;
  do n = read (pfd[0], &pid, sizeof pid); while (n < 0 && errno == EINTR);
  close (pfd[0]);
  /* Reaped: the grandchild is reparented, its parent is not mid any more. */
  while (waitpid (mid, NULL, 0) < 0 && errno == EINTR)
    ;
  if (n != sizeof pid || pid <= 0) {
    close (gfd[1]);
    return cbw_err_set (err, ECHILD, "cannot start %s (fork failed)", argv[0]);
  }
  /* The grandchild waits for "go": it cannot have exited and its pid
   * cannot have been reused yet, so this pidfd is the right process. */
  int pidfd = (int) syscall (SYS_pidfd_open, pid, 0);
  if (pidfd < 0) {
    int e = errno;
    close (gfd[1]);             /* it exits on EOF without running argv */
    return cbw_err_set (err, e, "%s: pidfd_open: %s", argv[0], strerror (e));
  }
  ssize_t w;
  do w = write (gfd[1], "g", 1); while (w < 0 && errno == EINTR);
  int e = errno;
  close (gfd[1]);
  if (w != 1) {
    close (pidfd);
    return cbw_err_set (err, e, "cannot start %s: start handshake: %s", argv[0],
                        strerror (e));
  }
  *pidfd_out = pidfd;
  return pid;
}

/* The pid a pidfd refers to, from /proc/self/fdinfo: > 0 the pid, -1 the
 * process was reaped, 0 unknown (no /proc, another pid namespace), -2 the
 * descriptor is not open or not a pidfd. */
static pid_t
pidfd_pid (int pidfd)
{
  char path[64], buf[1024];
  snprintf (path, sizeof path, "/proc/self/fdinfo/%d", pidfd);
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return errno == ENOENT && access ("/proc/self/fdinfo", F_OK) == 0 ? -2 : 0;
  ssize_t n = read (fd, buf, sizeof buf - 1);
  close (fd);
  if (n <= 0)
    return 0;
  buf[n] = '\0';
  const char *p = strstr (buf, "\nPid:");
  if (p == NULL)
    return -2;
  return (pid_t) strtol (p + 5, NULL, 10);
}

/* Has the process behind pidfd (pid `pid`, 0 = not known) exited?  Waits
 * up to ms.  1: exited; 0: running; -1 with err set: internal error, the
 * descriptor is no longer a pidfd of that process (closed or replaced by
 * other code).  Only POLLIN of the right pidfd means "exited": POLLNVAL,
 * POLLERR or a readable unrelated file are never taken for an exit (acting
 * on them would signal a healthy process). */
static int
pidfd_check (int pidfd, pid_t pid, int ms, struct cbw_err *err)
{
  struct pollfd p = { .fd = pidfd, .events = POLLIN };
  int r;
  do r = poll (&p, 1, ms); while (r < 0 && errno == EINTR);
  if (r < 0)
    return cbw_err_set (err, errno, "internal error: poll on the pidfd of "
                        "process %d: %s", (int) pid, strerror (errno));
  if (r == 0)
    return 0;
  if (p.revents & POLLNVAL)
    return cbw_err_set (err, EBADF, "internal error: the pidfd (%d) of process "
                        "%d was closed by other code", pidfd, (int) pid);
  pid_t now = pidfd_pid (pidfd);
  if (!(p.revents & POLLIN) || now == -2 || (pid > 0 && now > 0 && now != pid))
    return cbw_err_set (err, EBADF, "internal error: descriptor %d is no longer "
                        "the pidfd of process %d (poll revents %#x)", pidfd,
                        (int) pid, (unsigned) p.revents);
  return 1;
}

static int
pidfd_signal (int pidfd, int sig)
{
  return (int) syscall (SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

int
orch_wait_socket (const char *path, int pidfd, double timeout, struct cbw_err *err)
{
  double end = now_s () + timeout;
  pid_t pid = pidfd >= 0 ? pidfd_pid (pidfd) : 0;
  if (pid == -2)
    return cbw_err_set (err, EBADF, "internal error: descriptor %d is not a pidfd",
                        pidfd);
  for (;;) {
    if (try_connect (path) == 0)
      return 0;
    if (pidfd >= 0) {
      int r = pidfd_check (pidfd, pid, 0, err);
      if (r < 0)
        return -1;
      if (r > 0)
        return cbw_err_set (err, ECHILD, "the process exited before %s appeared", path);
    }
    if (now_s () > end)
      return cbw_err_set (err, ETIMEDOUT, "%s did not answer within %.0f s",
                          path, timeout);
    usleep (20000);
  }
}

void
orch_kill_wait (pid_t pid, int pidfd)
{
  struct cbw_err e = { 0 };
  int own = -1;
  if (pid <= 0)
    return;
  if (pidfd < 0)
    pidfd = own = (int) syscall (SYS_pidfd_open, pid, 0);
  if (pidfd < 0)
    return;                     /* gone already */
  /* Signals go through the pidfd: a reused pid is never signalled. */
  if (pidfd_signal (pidfd, SIGTERM) == 0 && pidfd_check (pidfd, pid, 5000, &e) == 0 &&
      pidfd_signal (pidfd, SIGKILL) == 0)
    pidfd_check (pidfd, pid, 5000, &e);
  if (e.msg[0])
    fprintf (stderr, "cbwd: stopping process %d: %s\n", (int) pid, e.msg);
  if (own >= 0)
    close (own);
}

void
orch_kill_wait_if (pid_t pid, const char *needle, bool whole_arg)
{
  if (pid <= 0)
    return;
  int pidfd = (int) syscall (SYS_pidfd_open, pid, 0);
  if (pidfd < 0)
    return;                     /* gone already */
  if (orch_pid_cmdline_has (pid, needle, whole_arg))
    orch_kill_wait (pid, pidfd);
  close (pidfd);
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
  CLEANUP_FREE char *a_chain = NULL, *chain_dir = NULL, *a_id = NULL, *a_src = NULL;
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
    /* The chain plugin creates a missing descriptor over file= only with
     * chain-create=true, which disk-add alone asks for. */
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
  struct stat img;
  if (a_chain == NULL && stat (d->file, &img) == 0 && S_ISREG (img.st_mode) &&
      (a_src = orch_strdup_printf ("cbw-source=%s", d->file)) == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
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
  if (a_chain && d->chain_create)
    argv[n++] = (char *) "chain-create=true";
  argv[n++] = a_desc;
  if (d->create_bitmaps)        /* only disk-add: else a lost descriptor is an error */
    argv[n++] = (char *) "dirtybitmap-create=true";
  argv[n++] = a_dbimg;
  argv[n++] = a_dbctl;
  argv[n++] = a_cbwctl;
  argv[n++] = d->cbw_timeout_arg;
  if (a_src)
    argv[n++] = a_src;
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
      if (err->errnum != EBADF) {
        orch_kill_wait (pid, pidfd);
        close (pidfd);
      }
      else                      /* not our descriptor any more: never close
                                   or trust it; stop the nbdkit we started
                                   through a new pidfd, if it is still it */
        orch_kill_wait_if (pid, d->nbd_sock, true);
      orch_log_tail (d->log_path, tail, sizeof tail);
      memcpy (msg, err->msg, sizeof msg);
      return cbw_err_set (err, err->errnum, "disk %s: nbdkit did not start: %s%s%s",
                          d->name, msg, tail[0] ? "; nbdkit said: " : "", tail);
    }
  }
  /* The TCP front last: a disk start is all or nothing. */
  if (orch_disk_tcp_start (o, d, err) < 0) {
    orch_kill_wait (pid, pidfd);
    close (pidfd);
    return -1;
  }
  uint64_t size = nbd_size (d->nbd_sock);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    d->pid = pid;
    d->pidfd = pidfd;
    d->pidfd_serial = ++pidfd_serials;
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
  /* The pidfd first, then the identity check: the pidfd pins the process,
   * so the check cannot be about a pid reused in between. */
  int pidfd = d->pid > 0 ? (int) syscall (SYS_pidfd_open, (pid_t) d->pid, 0) : -1;
  struct cbw_err e = { 0 };
  bool ok = pidfd >= 0 && orch_pid_cmdline_has (d->pid, d->nbd_sock, true) &&
    pidfd_check (pidfd, (pid_t) d->pid, 0, &e) == 0;
  if (ok && try_connect (d->nbd_sock) == 0) {
    uint64_t size = nbd_size (d->nbd_sock);
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
      d->pidfd = pidfd;
      d->pidfd_serial = ++pidfd_serials;
      d->is_child = false;
      d->run = ORCH_DISK_RUNNING;
      d->size = size;
    }
    /* The front is stateless: one that is gone is started again. */
    if (orch_disk_tcp_start (o, d, &e) < 0)
      fprintf (stderr, "cbwd: %s (the disk serves its Unix socket; "
               "`cbw disk stop` and `disk start` retry)\n", e.msg);
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
  int sigfd = -1;
  (void) err;
  orch_disk_tcp_stop (o, d);    /* remote guests first, then the disk */
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    if (d->run != ORCH_DISK_RUNNING) {
      d->run = ORCH_DISK_STOPPED;
      d->pid = 0;
      return 0;
    }
    pid = (pid_t) d->pid;
    d->pid = -d->pid;            /* negative: stop requested, no dead event */
    /* Our own copy of the pidfd to signal through: the supervisor may
     * close d->pidfd as soon as the process exits. */
    if (d->pidfd >= 0)
      sigfd = fcntl (d->pidfd, F_DUPFD_CLOEXEC, 0);
  }
  /* The pidfd pins the process: a pid reused since is never signalled.
   * Without one (EMFILE), the pid only if it still is this disk's nbdkit. */
  if (sigfd < 0 && !orch_pid_cmdline_has (pid, d->nbd_sock, true))
    pid = 0;
#define STOP_SIGNAL(sig) \
  (sigfd >= 0 ? pidfd_signal (sigfd, (sig)) : pid > 0 ? kill (pid, (sig)) : 0)
  STOP_SIGNAL (SIGTERM);
  struct timespec dl;
  clock_gettime (CLOCK_REALTIME, &dl);
  dl.tv_sec += 10;
  bool killed = false;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  while (d->run == ORCH_DISK_RUNNING) {
    if (pthread_cond_timedwait (&exit_cond, &o->lock, &dl) == ETIMEDOUT) {
      if (killed)
        break;
      STOP_SIGNAL (SIGKILL);
      killed = true;
      clock_gettime (CLOCK_REALTIME, &dl);
      dl.tv_sec += 5;
    }
  }
#undef STOP_SIGNAL
  d->pid = 0;
  if (sigfd >= 0)
    close (sigfd);
  return 0;
}

/* ---- supervisor ---- */

static bool
disk_listed (struct cbw_orch *o, const struct orch_disk *d)
{
  for (size_t i = 0; i < o->st.ndisks; i++)
    if (o->st.disks[i] == d)
      return true;
  return false;
}

static void
mark_exited (struct cbw_orch *o, struct orch_disk *d, pid_t pid, int status,
             const char *why)
{
  d->exit_status = status;
  if (d->pid < 0)               /* asked to stop */
    d->run = ORCH_DISK_STOPPED;
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
    if (why)
      json_object_object_add (data, "reason", json_object_new_string (why));
    orch_event_locked (o, "disk-dead", data);
  }
  pthread_cond_broadcast (&exit_cond);
}

/* d's pidfd was closed or replaced by other code (a bug elsewhere in cbwd):
 * say so, never close that number again (it may be someone else's now),
 * and go on supervising through a new pidfd if the process still is this
 * disk's nbdkit.  Called with o->lock held. */
static void
pidfd_lost (struct cbw_orch *o, struct orch_disk *d, pid_t pid, const char *msg)
{
  fprintf (stderr, "cbwd: disk %s: %s\n", d->name, msg);
  int fd = (int) syscall (SYS_pidfd_open, pid, 0);
  struct cbw_err e = { 0 };
  if (fd >= 0 && orch_pid_cmdline_has (pid, d->nbd_sock, true) &&
      pidfd_check (fd, pid, 0, &e) == 0) {
    d->pidfd = fd;
    d->pidfd_serial = ++pidfd_serials;
    return;
  }
  if (fd >= 0)
    close (fd);
  d->pidfd = -1;
  mark_exited (o, d, pid, -1, "its process could not be followed any more "
               "(internal error: pidfd lost) and is gone");
}

static void *
supervisor (void *arg)
{
  struct cbw_orch *o = arg;
  for (;;) {
    struct pollfd pfd[1 + 256];
    struct orch_disk *who[1 + 256];
    uint64_t serial[1 + 256];
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
          serial[n] = d->pidfd_serial;
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
      if (pfd[i].revents == 0)
        continue;
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
      /* Act only on a descriptor the disk still holds: between poll() and
       * here the disk may have been stopped, removed (who[i] freed: it is
       * only compared until found listed) or restarted with a new pidfd,
       * maybe under the same number. */
      struct orch_disk *d = who[i];
      if (!disk_listed (o, d) || d->run != ORCH_DISK_RUNNING ||
          d->pidfd != pfd[i].fd || d->pidfd_serial != serial[i])
        continue;
      pid_t pid = (pid_t) (d->pid < 0 ? -d->pid : d->pid);
      struct cbw_err e = { 0 };
      if (pfd[i].revents & (POLLNVAL | POLLERR)) {
        char msg[128];
        snprintf (msg, sizeof msg, "internal error: its pidfd (%d) was closed by "
                  "other code (poll revents %#x)", pfd[i].fd, (unsigned) pfd[i].revents);
        pidfd_lost (o, d, pid, msg);
        continue;
      }
      if (pidfd_check (d->pidfd, pid, 0, &e) < 0) {
        pidfd_lost (o, d, pid, e.msg);
        continue;
      }
      if (!(pfd[i].revents & POLLIN))
        continue;               /* cannot happen on a valid pidfd */
      int status = -1;
      if (d->is_child && waitpid (pid, &status, WNOHANG) != pid)
        status = -1;
      close (d->pidfd);
      d->pidfd = -1;
      mark_exited (o, d, pid, status, NULL);
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
