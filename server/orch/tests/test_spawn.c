/* cbw — server/orch/tests/test_spawn.c: starting and watching detached
 * helpers (orch_spawn_detached, orch_wait_socket, orch_kill_wait).
 *
 * - a detached helper runs only once the intermediate process of the double
 *   fork is gone, even when that process is slow to exit (test hook
 *   CBW_ORCH_SPAWN_HOLD_MS): its parent at exec time is not the session
 *   leader the intermediate made itself, so a parent-death signal the
 *   helper arms (nbdkit does, first thing) can never come from it;
 * - orch_wait_socket reports an exit only for POLLIN of the right pidfd: a
 *   closed descriptor or a readable unrelated file is an internal error
 *   (EBADF), never "the process exited" (which made the caller signal the
 *   process); a real exit is ECHILD, a live helper a timeout;
 * - orch_kill_wait stops a helper through its pidfd.
 * No locking: single-threaded tests.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "orch_internal.h"

static char dir[] = "/tmp/cbw-test-spawn.XXXXXX";

static void
setup (void)
{
  cr_assert_not_null (mkdtemp (dir));
}

static void
teardown (void)
{
  orch_rm_rf (dir);
}

/* Spawn sh -c SCRIPT detached; returns pid, pidfd in *pidfd. */
static pid_t
spawn_sh (const char *script, int *pidfd)
{
  char log[256];
  struct cbw_err err = { 0 };
  snprintf (log, sizeof log, "%s/log", dir);
  char *argv[] = { (char *) "sh", (char *) "-c", (char *) script, NULL };
  pid_t pid = orch_spawn_detached (argv, log, pidfd, &err);
  cr_assert_gt (pid, 0, "orch_spawn_detached: %s", err.msg);
  cr_assert_geq (*pidfd, 0);
  return pid;
}

static bool
wait_file (const char *path, int ms)
{
  for (int t = 0; t < ms; t += 10) {
    if (access (path, F_OK) == 0)
      return true;
    usleep (10000);
  }
  return false;
}

TestSuite (spawn, .init = setup, .fini = teardown, .timeout = 60);

Test (spawn, helper_runs_after_the_intermediate_exited)
{
  /* fields 4 and 6 of /proc/self/stat: ppid and session id; the
   * intermediate called setsid(), so the session id is its pid. */
  char script[1024], out[128];
  snprintf (out, sizeof out, "%s/ppid-sid", dir);
  snprintf (script, sizeof script,
            "read -r _ _ _ ppid _ sid _ < /proc/$$/stat; echo \"$ppid $sid\" > %s.tmp; "
            "mv %s.tmp %s; sleep 30", out, out, out);
  cr_assert_eq (setenv ("CBW_ORCH_SPAWN_HOLD_MS", "300", 1), 0);
  for (int i = 0; i < 3; i++) {
    int pidfd;
    unlink (out);
    pid_t pid = spawn_sh (script, &pidfd);
    cr_assert (wait_file (out, 20000), "the helper did not run");
    FILE *fp = fopen (out, "r");
    cr_assert_not_null (fp);
    long ppid = 0, sid = 0;
    cr_assert_eq (fscanf (fp, "%ld %ld", &ppid, &sid), 2);
    fclose (fp);
    cr_expect_neq (ppid, sid, "run %d: the helper was exec'd while the intermediate "
                   "process (pid %ld) was still its parent", i, sid);
    orch_kill_wait (pid, pidfd);
    struct pollfd p = { .fd = pidfd, .events = POLLIN };
    cr_expect_eq (poll (&p, 1, 0), 1, "orch_kill_wait returned before the exit");
    close (pidfd);
  }
  unsetenv ("CBW_ORCH_SPAWN_HOLD_MS");
}

Test (spawn, wait_socket_exit_timeout_and_internal_errors)
{
  char sock[256];
  struct cbw_err err = { 0 };
  snprintf (sock, sizeof sock, "%s/never.sock", dir);

  /* a live helper: timeout */
  int pidfd;
  pid_t pid = spawn_sh ("sleep 30", &pidfd);
  cr_expect_eq (orch_wait_socket (sock, pidfd, 0.2, &err), -1);
  cr_expect_eq (err.errnum, ETIMEDOUT, "%s", err.msg);
  orch_kill_wait (pid, pidfd);
  /* the same, exited: ECHILD */
  memset (&err, 0, sizeof err);
  cr_expect_eq (orch_wait_socket (sock, pidfd, 5, &err), -1);
  cr_expect_eq (err.errnum, ECHILD, "%s", err.msg);
  close (pidfd);

  /* a descriptor number that is not open (closed by other code) */
  int fds[2];
  cr_assert_eq (pipe (fds), 0);
  int closed = fds[0];
  close (fds[0]);
  close (fds[1]);
  memset (&err, 0, sizeof err);
  cr_expect_eq (orch_wait_socket (sock, closed, 5, &err), -1);
  cr_expect_eq (err.errnum, EBADF, "a closed descriptor: %d %s", err.errnum, err.msg);
  cr_expect (strstr (err.msg, "internal error") != NULL, "%s", err.msg);

  /* an unrelated readable file under that number */
  cr_assert_eq (pipe (fds), 0);
  cr_assert_eq (write (fds[1], "x", 1), 1);
  memset (&err, 0, sizeof err);
  cr_expect_eq (orch_wait_socket (sock, fds[0], 5, &err), -1);
  cr_expect_eq (err.errnum, EBADF, "a readable pipe: %d %s", err.errnum, err.msg);
  cr_expect (strstr (err.msg, "internal error") != NULL, "%s", err.msg);
  close (fds[0]);
  close (fds[1]);
}
