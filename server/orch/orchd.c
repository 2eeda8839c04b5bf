/* cbw — server/orch/orchd.c: `cbwd-orch`, the orchestrator as a standalone
 * daemon: the same library and control API that cbwd embeds, without the
 * NBD server (readers then use the cbw filter's own point-in-time export and
 * the dirtybitmap filter's `extents`; see orch_exports.h).  Also renders the
 * control reference: `cbwd-orch --control-docs > docs/control/cbwd.md`.
 *
 * Locking: the main thread only waits for SIGINT/SIGTERM; the control
 * thread and the supervisor thread are the library's (see orch.h).
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "orch.h"

static void
usage (FILE *fp)
{
  fprintf (fp,
           "usage: cbwd-orch --state-dir DIR [--socket PATH] [--module-dir DIR]\n"
           "                 [--nbdkit 'CMD ...'] [--start-timeout SECS] [--stop-disks]\n"
           "                 [--plugin chain|file] [--freeze-hook NAME=/PATH]...\n"
           "       cbwd-orch --control-docs | --version\n"
           "Serves the cbwd control API on PATH (default DIR/control.sock).\n"
           "The environment variable CBW_NBDKIT overrides the nbdkit command.\n");
}

int
main (int argc, char **argv)
{
  static const struct option opts[] = {
    { "state-dir", required_argument, NULL, 'd' },
    { "socket", required_argument, NULL, 's' },
    { "module-dir", required_argument, NULL, 'm' },
    { "nbdkit", required_argument, NULL, 'n' },
    { "start-timeout", required_argument, NULL, 't' },
    { "stop-disks", no_argument, NULL, 'S' },
    { "plugin", required_argument, NULL, 'p' },
    { "control-docs", no_argument, NULL, 'D' },
    { "freeze-hook", required_argument, NULL, 'F' },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL }
  };
  struct cbw_orch_config cfg = { .nbdkit = getenv ("CBW_NBDKIT") };
  bool stop_disks = false;
  int c;
  /* checked by cbw_orch_open, which keeps the array: freed as main returns */
  CLEANUP_FREE char **hooks = calloc ((size_t) argc, sizeof *hooks);
  if (hooks == NULL) { perror ("calloc"); return 1; }
  cfg.freeze_hooks = hooks;

  while ((c = getopt_long (argc, argv, "d:s:m:n:t:p:SDh", opts, NULL)) != -1) {
    switch (c) {
    case 'd': cfg.state_dir = optarg; break;
    case 's': cfg.control_socket = optarg; break;
    case 'm': cfg.module_dir = optarg; break;
    case 'n': cfg.nbdkit = optarg; break;
    case 't': cfg.start_timeout = atof (optarg); break;
    case 'S': stop_disks = true; break;
    case 'p': cfg.plugin = optarg; break;
    case 'F': hooks[cfg.nfreeze_hooks++] = optarg; break;
    case 'D': {
      char *md = cbw_ctl_docs_markdown (&cbw_orch_ctl_table);
      if (md == NULL) { perror ("cbw_ctl_docs_markdown"); return 1; }
      fputs (md, stdout);
      free (md);
      return 0;
    }
    case 'h': usage (stdout); return 0;
    case 'V': printf ("cbwd-orch %s\n", CBW_VERSION); return 0;
    default: usage (stderr); return 2;
    }
  }
  if (optind != argc || cfg.state_dir == NULL) {
    usage (stderr);
    return 2;
  }

  sigset_t set;
  sigemptyset (&set);
  sigaddset (&set, SIGINT);
  sigaddset (&set, SIGTERM);
  sigaddset (&set, SIGHUP);
  pthread_sigmask (SIG_BLOCK, &set, NULL);   /* threads inherit the mask */
  signal (SIGPIPE, SIG_IGN);

  struct cbw_err err = { 0 };
  struct cbw_orch *o = cbw_orch_open (&cfg, &err);
  if (o == NULL) {
    fprintf (stderr, "cbwd-orch: %s\n", err.msg);
    return 1;
  }
  if (cbw_orch_serve (o, &err) < 0) {
    fprintf (stderr, "cbwd-orch: control socket: %s\n", err.msg);
    cbw_orch_close (o, false);
    return 1;
  }
  fprintf (stderr, "cbwd-orch: ready\n");
  int sig;
  sigwait (&set, &sig);
  cbw_orch_close (o, stop_disks);
  return 0;
}
