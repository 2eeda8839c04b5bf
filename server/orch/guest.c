/* cbw — server/orch/guest.c: guest freeze/thaw around a point in time.
 *
 * A hook command, run as `/bin/sh -c 'HOOK "$1"' cbw-hook freeze|thaw`, in
 * its own process group, with a timeout: exit 0 is success; a non-zero exit
 * or no answer in time is a failure (and the hook's process group is
 * killed).  A guest that does not answer never blocks the disks: the caller
 * then fails the backup or proceeds crash-consistent, as the user chose
 * (freeze.required).  Output goes to STATE_DIR/hook.log.
 *
 * Locking: none (runs as the busy owner, no shared state).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "orch_internal.h"

int
orch_guest_run (const struct orch_freeze *f, const char *phase, struct cbw_err *err)
{
  char script[4200];
  if (f->hook == NULL || f->hook[0] == '\0')
    return 0;
  if (snprintf (script, sizeof script, "%s \"$1\"", f->hook) >= (int) sizeof script)
    return cbw_err_set (err, ENAMETOOLONG, "freeze hook command too long");
  char *argv[] = { (char *) "/bin/sh", (char *) "-c", script, (char *) "cbw-hook",
                   (char *) phase, NULL };
  pid_t pid = orch_spawn (argv, f->log ? f->log : "/dev/null", err);
  if (pid < 0)
    return -1;
  double timeout = f->timeout > 0 ? f->timeout : 10;
  struct timespec t0, t;
  clock_gettime (CLOCK_MONOTONIC, &t0);
  for (;;) {
    int status;
    pid_t r = waitpid (pid, &status, WNOHANG);
    if (r == pid) {
      if (WIFEXITED (status) && WEXITSTATUS (status) == 0)
        return 0;
      if (WIFEXITED (status))
        return cbw_err_set (err, EIO, "guest %s hook exited with status %d",
                            phase, WEXITSTATUS (status));
      return cbw_err_set (err, EIO, "guest %s hook killed by signal %d", phase,
                          WIFSIGNALED (status) ? WTERMSIG (status) : 0);
    }
    clock_gettime (CLOCK_MONOTONIC, &t);
    if ((double) (t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 > timeout) {
      kill (-pid, SIGKILL);
      kill (pid, SIGKILL);
      waitpid (pid, NULL, 0);
      return cbw_err_set (err, ETIMEDOUT, "guest %s hook did not answer within %.1f s",
                          phase, timeout);
    }
    usleep (10000);
  }
}
