/* cbw — server/orch/orch.h: the orchestrator library behind cbwd's control
 * API (disks, nbdkit supervision, checkpoints, pull backups, guest
 * freeze/thaw).  Design: docs/design/orchestration.md.  Command reference
 * (generated from the one table in commands.c): docs/control/cbwd.md.
 *
 * Use: cbw_orch_open() loads (or creates) the state directory, adopts the
 * nbdkit processes of the previous run that are still alive (a dead one is
 * reported, never restarted silently), finishes or rolls back an operation a
 * crash interrupted, and starts the supervisor thread.  cbw_orch_serve()
 * starts the control socket (common/control.h) with cbw_orch_ctl_table.
 * cbw_orch_close() stops both; the nbdkit processes keep running (guests
 * must not notice a restart of cbwd) unless `stop_disks` is set.
 *
 * Locking: see orch_internal.h.  All functions here are called from one
 * thread (cbwd's main or the control thread).
 */
#ifndef CBW_ORCH_H
#define CBW_ORCH_H

#include <stdbool.h>
#include <stdint.h>

#include "cbw_err.h"
#include "control.h"
#include "orch_exports.h"

struct cbw_orch_config {
  const char *state_dir;        /* required; created if missing */
  const char *control_socket;   /* default STATE_DIR/control.sock */
  struct cbw_ctl_access control_access;  /* who besides root and cbwd's uid
                                   may use it (--control-group) */
  const char *module_dir;       /* dir holding nbdkit-{chain-plugin,cbw-filter,
                                   dirtybitmap-filter}.so; NULL = by name */
  const char *nbdkit;           /* command prefix, words split on spaces,
                                   default "nbdkit" (tests add an env wrapper) */
  double start_timeout;         /* seconds to wait for a new nbdkit, default 30 */
  const char *plugin;           /* "chain" (default) or "file": nbdkit's own file
                                   plugin fronts the image (no chain control
                                   socket, no overlays); NULL = environment
                                   variable CBW_ORCH_PLUGIN, else "chain" */
  const char *store_target;     /* how a disk's cbw session writes to its
                                   backup store: "local" (default: the
                                   store file as a file: target, written in
                                   the guest write's thread) or "nbd" (through
                                   cbwd's store export / an nbdkit, with
                                   cbw-timeout on every copy); NULL =
                                   environment variable CBW_ORCH_STORE_TARGET,
                                   else "local" */
  const struct cbw_orch_exports *exports;  /* cbwd's export API, or NULL */
  char *const *listen_paths;    /* cbwd's Unix listener sockets (NULL entries
                                   skipped), never a push job's target */
  size_t nlisten_paths;
  char *const *freeze_hooks;    /* named freeze hooks "NAME=/PATH" (checked by
                                   cbwd at start-up; the strings outlive the
                                   orchestrator): backup-begin's freeze-hook
                                   selects one by NAME */
  size_t nfreeze_hooks;
  const char *warning;          /* shown by `status` (static string), or NULL:
                                   e.g. cbwd serves plain NBD on TCP */
};

struct cbw_orch;

struct cbw_orch *cbw_orch_open (const struct cbw_orch_config *cfg,
                                struct cbw_err *err);
int cbw_orch_serve (struct cbw_orch *o, struct cbw_err *err);
void cbw_orch_close (struct cbw_orch *o, bool stop_disks);

/* Disks declared in cbwd's config file: `disks` is a JSON array of
 * objects holding the arguments of the `disk-add` command (name, file,
 * granularity, ...); file paths are already absolute.  Applied once at
 * start-up, after cbw_orch_open(): every entry is checked first (unknown
 * or ill-typed keys; a disk of that name already in the state directory
 * with another file or granularity is a conflict), nothing is changed if
 * one fails; then disks already present with the same settings are kept
 * as they are and the others are added through `disk-add` itself.  Errors
 * name `source` (the config file), the disk and the key. */
int cbw_orch_apply_disks (struct cbw_orch *o, struct json_object *disks,
                          const char *source, struct cbw_err *err);

/* The cbwd control command table (one source of truth for commands,
 * arguments, dispatch and docs). */
extern const struct cbw_ctl_table cbw_orch_ctl_table;

#endif
