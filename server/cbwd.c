/* cbw — server/cbwd.c: main() of cbwd, the cbw NBD server: parses the
 * command line and config file, builds the exports, listens, and runs the
 * libuv loop until SIGTERM/SIGINT, then closes connections (requests in
 * flight finish first) and exits.  With --state-dir it embeds the
 * orchestrator and adds the disks of the config file's "disks" section
 * (cbw_orch_apply_disks) before its control socket opens.  Under systemd
 * (Type=notify) it reports READY=1 once it listens and STOPPING=1 on a
 * stop signal (common/sdnotify.c).
 *
 * Threads: the loop thread runs everything here; cbwd's worker pool
 * (pool.c, --threads, started with the first request) runs export I/O and
 * sends replies (conn.c).
 */
#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json-c/json.h>

#include "cleanup.h"
#include "config.h"
#include "control.h"
#include "sdnotify.h"
#include "server.h"
#ifdef CBWD_HAVE_ORCH
#include "export_admin.h"
#include "orch.h"
#endif

static void
usage (FILE *f)
{
  fprintf (f,
"usage: cbwd [--config FILE] [--listen unix:PATH|tcp:HOST:PORT[,max-connections=N]]...\n"
"            [--export name=NAME,type=store|file|pit,KEY=VALUE...]...\n"
"            [--max-connections N] [--handshake-timeout SECS] [--threads N]\n"
"            [--max-inflight-bytes SIZE] [--max-memory SIZE] [--idle-timeout SECS]\n"
"            [--max-connections-per-peer N]\n"
"            [--tls=off|on|require] [--tls-psk FILE | --tls-certificates DIR\n"
"             [--tls-verify-peer]]  (a TCP listener needs one of these)\n"
"            [--pidfile FILE] [-v] [--version]\n"
"            [--state-dir DIR [--control PATH] [--control-group GROUP]\n"
"             [--module-dir DIR]  (orchestrator;\n"
"             [--pit-allow IDENTITY]... [--freeze-hook NAME=/PATH]...]\n"
"             the config file may then declare \"disks\")\n"
"export keys: path= size= limit= description= upstream= connections= release=on|off\n"
"             allow=IDENTITY[;IDENTITY...] (psk:USER, x509:DN, *)\n"
"             bitmap=NAME:raw:PATH:GRANULARITY | NAME:extents:PATH | NAME:store:DESC[:STORED]\n"
"see cbwd(8).\n");
}

/* --control-group: a group name, or a number.  Resolved once at start-up,
 * so the control thread never waits for the group database. */
static int
parse_group (const char *s, gid_t *gid)
{
  struct group gr, *res = NULL;
  char buf[16384];
  char *end;
  unsigned long n;

  if (getgrnam_r (s, &gr, buf, sizeof buf, &res) == 0 && res != NULL) {
    *gid = res->gr_gid;
    return 0;
  }
  errno = 0;
  n = strtoul (s, &end, 10);
  if (s[0] < '0' || s[0] > '9' || *end != '\0' || errno != 0 ||
      n >= (unsigned long) (gid_t) -1)
    return -1;
  *gid = (gid_t) n;
  return 0;
}

static void
on_signal (uv_signal_t *h, int sig)
{
  struct cbwd_server *srv = h->data;
  cbwd_log ("signal %d: shutting down", sig);
  cbw_sd_notify ("STOPPING=1");
  uv_signal_stop (&srv->sigterm);
  uv_signal_stop (&srv->sigint);
  uv_close ((uv_handle_t *) &srv->sigterm, NULL);
  uv_close ((uv_handle_t *) &srv->sigint, NULL);
  cbwd_server_stop (srv);
}

/* Everything main does between setting the defaults and freeing what the
 * options and the config allocated: any return, early or not, goes back
 * through main's single cleanup. */
static int
run (struct cbwd_server *srv, int argc, char **argv)
{
  static const struct option opts[] = {
    { "config", required_argument, 0, 'c' },
    { "listen", required_argument, 0, 'l' },
    { "export", required_argument, 0, 'e' },
    { "max-connections", required_argument, 0, 'm' },
    { "handshake-timeout", required_argument, 0, 't' },
    { "threads", required_argument, 0, 'T' },
    { "pidfile", required_argument, 0, 'p' },
    { "max-inflight-bytes", required_argument, 0, 'B' },
    { "max-memory", required_argument, 0, 'G' },
    { "idle-timeout", required_argument, 0, 'I' },
    { "max-connections-per-peer", required_argument, 0, 'N' },
    { "verbose", no_argument, 0, 'v' },
    { "state-dir", required_argument, 0, 'S' },
    { "control", required_argument, 0, 'C' },
    { "control-group", required_argument, 0, 'g' },
    { "module-dir", required_argument, 0, 'M' },
    { "tls", required_argument, 0, 'L' },
    { "tls-psk", required_argument, 0, 'P' },
    { "tls-certificates", required_argument, 0, 'X' },
    { "tls-verify-peer", no_argument, 0, 'Y' },
    { "pit-allow", required_argument, 0, 'A' },
    { "freeze-hook", required_argument, 0, 'F' },
    { "help", no_argument, 0, 'h' },
    { "version", no_argument, 0, 'V' },
    { 0, 0, 0, 0 },
  };
  const char *config = NULL, *pidfile = NULL;
  const char *state_dir = NULL, *control = NULL, *module_dir = NULL;
  struct cbw_ctl_access control_access = { .group_set = false };
  /* arrays of pointers into argv: freed however main returns */
  CLEANUP_FREE char **listens = calloc (argc, sizeof *listens);
  CLEANUP_FREE char **exports = calloc (argc, sizeof *exports);
  size_t nl = 0, ne = 0;
  long threads = 0;
  int c;
  struct cbw_err err = { 0 };

  signal (SIGPIPE, SIG_IGN);
  /* Memory: request buffers >= 64 KiB come from common/bufcache.c
   * (reused mappings, never more cached than the in-flight high-water), so
   * malloc only sees small objects.  Without a limit glibc gives each worker
   * thread its own arena, which keeps its own high-water of small objects
   * and fragments: two arenas are plenty for the loop + workers. */
  mallopt (M_ARENA_MAX, 2);
  while ((c = getopt_long (argc, argv, "c:l:e:vh", opts, NULL)) != -1) {
    switch (c) {
    case 'c': config = optarg; break;
    case 'l': listens[nl++] = optarg; break;
    case 'e': exports[ne++] = optarg; break;
    case 'm':
      if (cbwd_parse_limit (optarg, "max-connections", &srv->limits, &err) == -1) {
        cbwd_log ("%s", err.msg);
        return 2;
      }
      break;
    case 't':
      if (cbwd_parse_limit (optarg, "handshake-timeout", &srv->limits, &err) == -1) {
        cbwd_log ("%s", err.msg);
        return 2;
      }
      break;
    case 'T': {
      char *end;
      errno = 0;
      threads = strtol (optarg, &end, 10);
      if (errno || end == optarg || *end || threads < 1 || threads > 128) {
        cbwd_log ("--threads %s: expected a number 1..128", optarg);
        return 2;
      }
      break;
    }
    case 'p': pidfile = optarg; break;
    case 'B':
      if (cbwd_parse_size (optarg, &srv->limits.max_inflight_bytes) == -1 ||
          srv->limits.max_inflight_bytes < 65536) {
        cbwd_log ("--max-inflight-bytes %s: expected a size >= 64K", optarg);
        return 2;
      }
      break;
    case 'G':
      if (cbwd_parse_limit (optarg, "max-memory", &srv->limits, &err) == -1) {
        cbwd_log ("%s", err.msg);
        return 2;
      }
      break;
    case 'I':
      if (cbwd_parse_limit (optarg, "idle-timeout", &srv->limits, &err) == -1) {
        cbwd_log ("%s", err.msg);
        return 2;
      }
      break;
    case 'N':
      if (cbwd_parse_limit (optarg, "max-connections-per-peer", &srv->limits, &err) == -1) {
        cbwd_log ("%s", err.msg);
        return 2;
      }
      break;
    case 'v': srv->verbose++; break;
    case 'S': state_dir = optarg; break;
    case 'C': control = optarg; break;
    case 'g':
      if (parse_group (optarg, &control_access.group) == -1) {
        cbwd_log ("--control-group %s: no such group", optarg);
        return 2;
      }
      control_access.group_set = true;
      break;
    case 'M': module_dir = optarg; break;
    case 'L':
      if ((srv->tls.mode = cbwd_tls_parse_mode (optarg)) == -1) {
        cbwd_log ("--tls %s: expected off, on or require", optarg);
        return 2;
      }
      break;
    case 'P': free (srv->tls.psk); srv->tls.psk = strdup (optarg); break;
    case 'X': free (srv->tls.certificates); srv->tls.certificates = strdup (optarg); break;
    case 'Y': srv->tls.verify_peer = true; break;
    case 'A':
      if (cbwd_add_pit_allow (srv, optarg, &err) == -1) {
        cbwd_log ("--pit-allow: %s", err.msg);
        return 2;
      }
      break;
    case 'F':
      if (cbwd_add_freeze_hook (srv, optarg, &err) == -1) {
        cbwd_log ("--freeze-hook: %s", err.msg);
        return 2;
      }
      break;
    case 'h': usage (stdout); return 0;
    case 'V': printf ("cbwd %s\n", CBW_VERSION); return 0;
    default: usage (stderr); return 2;
    }
  }
  if (optind != argc) { usage (stderr); return 2; }

  for (size_t i = 0; i < ne; i++) {
    struct cbwd_export_spec s;
    struct cbwd_export *e = NULL;
    if (cbwd_parse_export_kv (exports[i], &s, &err) == 0)
      e = cbwd_build_export (&s, &err);
    cbwd_export_spec_free (&s);
    if (!e || cbwd_add_export (srv, e, &err) == -1) {
      cbwd_log ("%s", err.msg);
      if (e) cbwd_export_free (e);
      return 1;
    }
  }
  /* The config's "disks" (orchestrator only) are applied once the
   * orchestrator has opened its state directory, below. */
  struct json_object *config_disks = NULL;
  if (config && cbwd_load_config_ex (config, srv, state_dir ? &config_disks : NULL,
                                     &err) == -1) {
    cbwd_log ("%s", err.msg);
    return 1;
  }
  if (state_dir == NULL && control_access.group_set) {
    cbwd_log ("--control-group needs the orchestrator (--state-dir)");
    return 2;
  }
  if (state_dir == NULL && srv->nfreeze_hooks) {
    cbwd_log ("--freeze-hook needs the orchestrator (--state-dir)");
    return 2;
  }
  if (srv->exports.n == 0 && state_dir == NULL) {
    cbwd_log ("no exports configured (--export or --config)");
    return 1;
  }
  /* Thread pool: enough for the upstream pools plus local file I/O.  Must be
   * set before libuv starts its pool (first uv_queue_work). */
  if (threads <= 0) threads = 8;
  srv->threads = (unsigned) threads;
  char tbuf[16];
  snprintf (tbuf, sizeof tbuf, "%ld", threads);
  setenv ("UV_THREADPOOL_SIZE", tbuf, 0);

  for (size_t i = 0; i < nl; i++)
    if (cbwd_listen (srv, listens[i]) == -1)
      return 1;
  if (srv->nlisteners == 0) {
    cbwd_log ("nothing to listen on (--listen)");
    return 1;
  }
  if (cbwd_tls_setup (srv) == -1)
    return 1;
  if (cbwd_admin_init (srv) == -1) {
    cbwd_log ("cannot set up the admin channel");
    return 1;
  }
#ifdef CBWD_HAVE_ORCH
  /* The orchestrator (server/orch): disks, checkpoints, backups; it
   * publishes store and PIT exports here through export_admin.c. */
  static struct cbw_orch_exports orch_exports;
  struct cbw_orch *orch = NULL;
  if (state_dir) {
    cbwd_orch_exports_init (&orch_exports, srv);
    struct cbw_orch_config oc = { .state_dir = state_dir, .control_socket = control,
                                  .control_access = control_access,
                                  .module_dir = module_dir, .nbdkit = getenv ("CBW_NBDKIT"),
                                  .exports = &orch_exports,
                                  .listen_paths = srv->unix_paths,
                                  .nlisten_paths = srv->nlisteners,
                                  .warning = cbwd_server_tls_warning (srv),
                                  .freeze_hooks = srv->freeze_hooks,
                                  .nfreeze_hooks = srv->nfreeze_hooks };
    orch = cbw_orch_open (&oc, &err);
    if (orch == NULL || cbw_orch_apply_disks (orch, config_disks, config, &err) == -1 ||
        cbw_orch_serve (orch, &err) == -1) {
      cbwd_log ("orchestrator: %s", err.msg);
      cbw_orch_close (orch, false);
      json_object_put (config_disks);
      return 1;
    }
    json_object_put (config_disks);
  }
#else
  if (state_dir) {
    cbwd_log ("--state-dir: this cbwd was built without the orchestrator");
    return 2;
  }
  (void) control; (void) module_dir; (void) control_access;
#endif
  uv_signal_init (srv->loop, &srv->sigterm);
  uv_signal_init (srv->loop, &srv->sigint);
  srv->sigterm.data = srv->sigint.data = srv;
  uv_signal_start (&srv->sigterm, on_signal, SIGTERM);
  uv_signal_start (&srv->sigint, on_signal, SIGINT);
  if (pidfile) {
    FILE *f = fopen (pidfile, "w");
    if (!f || fprintf (f, "%d\n", (int) getpid ()) < 0 || fclose (f) != 0) {
      cbwd_log ("pidfile %s: %m", pidfile);
      return 1;
    }
  }
  cbwd_log ("serving %zu export(s)", srv->exports.n);
  /* Listeners bound, orchestrator serving: systemd (Type=notify) may now
   * start the units ordered after cbwd. */
  int nr = cbw_sd_notify ("READY=1\nSTATUS=serving");
  if (nr < 0)
    cbwd_log ("NOTIFY_SOCKET: cannot report readiness: %s", strerror (-nr));
  uv_run (srv->loop, UV_RUN_DEFAULT);
  cbwd_server_cleanup (srv);
#ifdef CBWD_HAVE_ORCH
  cbw_orch_close (orch, false);   /* disks (nbdkit) keep running */
#endif
  uv_loop_close (srv->loop);
  if (pidfile) unlink (pidfile);
  cbwd_log ("exited");
  return 0;
}

/* What the options, the config and the exports allocated (the loop's
 * handles are closed by cbwd_server_cleanup once the loop has run). */
static void
free_server_config (struct cbwd_server *srv)
{
  for (size_t i = 0; i < srv->exports.n; i++)
    cbwd_export_unref (srv->exports.v[i]);
  free (srv->exports.v);
  free (srv->first_listen);
  cbwd_tls_creds_free (srv->tls_creds);
  free (srv->tls.psk);
  free (srv->tls.certificates);
  cbwd_config_free (srv);
}

int
main (int argc, char **argv)
{
  struct cbwd_server srv;
  memset (&srv, 0, sizeof srv);
  srv.limits.max_connections = 1024;
  srv.limits.max_inflight = 64;
  srv.limits.max_inflight_bytes = 8ULL * 1024 * 1024;
  srv.limits.handshake_timeout_ms = 30000;
  srv.limits.max_memory = CBWD_DEFAULT_MAX_MEMORY;
  srv.limits.idle_timeout_ms = 300 * 1000;
  srv.limits.max_conns_per_peer = 64;
  srv.tls.mode = -1;
  srv.loop = uv_default_loop ();
  int rc = run (&srv, argc, argv);
  free_server_config (&srv);
  return rc;
}
