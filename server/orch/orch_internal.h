/* cbw — server/orch/orch_internal.h: the orchestrator's data model, shared by
 * the files of server/orch/ (not installed, not for cbwd's other parts).
 *
 * Persistent model (struct orch_state, saved as ONE crash-atomic JSON file
 * STATE_DIR/cbwd-state.json by state.c): disks (name, image, granularity,
 * nbdkit pid), checkpoints in creation order, the active backup, and the
 * "pending" record of a multi-step operation in progress (written before its
 * first side effect, cleared with its last), so that after a crash the
 * operation is rolled forward or back (orch.c: reconcile).
 *
 * Locking: struct cbw_orch.lock guards every field of the state and of the
 * disks, and the event ring.  Two threads use them: the control thread
 * (commands, one at a time) and the supervisor thread (marks a disk dead).
 * A command takes the lock only to read or update memory, never across I/O
 * (module control calls, spawning, fsync): it marks the orchestrator `busy`
 * under the lock, does its I/O unlocked, and updates memory under the lock.
 * Only the busy owner changes the disk list, checkpoints, backup or pending;
 * the supervisor only changes a disk's run-time fields (state, exit status).
 */
#ifndef CBW_ORCH_INTERNAL_H
#define CBW_ORCH_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <json-c/json.h>

#include "cbw_err.h"
#include "control.h"
#include "orch.h"

#define ORCH_NAME_MAX 64          /* disk/checkpoint names: [A-Za-z0-9_.-]{1,64} */
#define ORCH_STATE_FILE "cbwd-state.json"
#define ORCH_STATE_MAX (16 * 1024 * 1024)
#define ORCH_STATE_FORMAT "cbwd-state"
#define ORCH_STATE_VERSION 1
#define ORCH_EVENTS_MAX 256
/* Default bound on how long a guest write may wait for the backup (the cbw
 * filter's cbw-timeout): past it the backup breaks and the write goes on. */
#define ORCH_CBW_TIMEOUT_MS 5000
#define ORCH_CBW_TIMEOUT_MS_MAX 86400000

enum orch_disk_run {
  ORCH_DISK_STOPPED = 0,        /* not started (yet) by this cbwd */
  ORCH_DISK_RUNNING,
  ORCH_DISK_DEAD,               /* nbdkit exited or was killed: reported, not restarted */
};

/* A disk's TCP listener (disk_tcp.c): a forwarding nbdkit in front of the
 * disk's Unix socket.  Configuration never changes after disk-add; pid
 * (0: not running) under o->lock. */
struct orch_disk_tcp {
  char *listen;                 /* HOST:PORT as given */
  char *host, *port;            /* parsed from listen */
  int tls;                      /* 0 off, 1 on, 2 require */
  char *psk;                    /* absolute path of the PSK file, or NULL */
  char *certificates;           /* absolute X.509 directory, or NULL */
  bool verify_peer;
  int64_t pid;                  /* the front nbdkit, 0 if none */
};

struct orch_disk {
  /* persistent */
  char name[ORCH_NAME_MAX + 1];
  char *file;                   /* image path (absolute) */
  uint64_t granularity;         /* dirty bitmap granularity, bytes */
  int64_t pid;                  /* nbdkit pid, 0 if none */
  char *chain;                  /* overlay chain descriptor (absolute), NULL =
                                   raw fast path, no overlays (overlay.c) */
  char id[37];                  /* stable disk identity (UUID, common/disk_id.h),
                                   announced as the live export's description */
  bool id_new;                  /* id made at load: the state file had none */
  bool force_share;             /* served without exclusive image locks */
  uint32_t cbw_timeout_ms;      /* bound on a guest write's wait for the backup;
                                   0 = ORCH_CBW_TIMEOUT_MS (saved only if set) */
  char cbw_timeout_arg[40];     /* "cbw-timeout=SECS" for nbdkit's argv */
  struct orch_disk_tcp *tcp;    /* TCP listener for remote guests, or NULL */
  /* derived paths under STATE_DIR/disks/NAME/ */
  char *dir, *nbd_sock, *ctl_chain, *ctl_cbw, *ctl_bitmap, *log_path;
  char *bitmaps;                /* dirtybitmap descriptor DISKDIR/bitmaps.json */
  /* run time */
  enum orch_disk_run run;
  int pidfd;                    /* -1 if none; owned by the supervisor */
  uint64_t pidfd_serial;        /* which pidfd this is (disk.c) */
  bool is_child;                /* spawned by this process (reap with waitpid) */
  int exit_status;              /* wait status if known, -1 otherwise */
  uint64_t size;                /* bytes, 0 if unknown */
  bool create_bitmaps;          /* next start may create the bitmap store
                                   (disk-add only: a missing descriptor is
                                   otherwise a start error) */
  bool offline;                 /* part of the running backup while stopped:
                                   disk-start is refused and the orch_bm_*
                                   primitives edit the bitmap store file
                                   directly (bmstore.c); set and cleared with
                                   the backup record */
  bool chain_create;            /* the next start may create the chain descriptor
                                   (set by disk-add only: a lost descriptor of a
                                   known disk is an error, never a new chain) */
};

/* A checkpoint that can no longer be honoured on one disk (its bitmaps
 * were reset or a recovery step on that disk could not be redone): refused
 * as an incremental base there ("take a full backup"). */
struct orch_unusable {
  char disk[ORCH_NAME_MAX + 1];
  int64_t since;                /* unix time it was marked */
  char *reason;
};

struct orch_checkpoint {
  char name[ORCH_NAME_MAX + 1];
  int64_t created;              /* unix time */
  size_t ndisks;
  char **disks;                 /* names of the disks it covers */
  size_t nunusable;
  struct orch_unusable *unusable;     /* per disk, at most one each */
};

struct orch_backup_disk {
  char name[ORCH_NAME_MAX + 1];
  char *pit_uri;                /* where a reader reads the point in time */
  char *bitmap;                 /* "backup-NAME" bitmap in the disk's dirtybitmap
                                   filter (incremental: changes since `since`;
                                   top: the top overlay's extents), NULL for
                                   full/none backups */
  char *store_path;             /* sparse backup target file */
  char *store_sock;             /* its NBD socket when served by our own nbdkit */
  int64_t store_pid;            /* that nbdkit, 0 if cbwd serves the store */
  char *export_name;            /* cbwd export name, NULL when cbwd has no exports */
  uint64_t store_limit;         /* bytes the store may take on the host, 0 = none */
  bool offline;                 /* the disk was stopped at begin: its image is
                                   served read-only by a cbwd file export, no
                                   session, no store (backup.c) */
  bool began;                   /* run time: this begin started its session
                                   (a rollback ends only those) */
  bool published;               /* run time: offline export is served by this
                                   cbwd (false after a restart until the
                                   watch publishes it again) */
  bool locked;                  /* run time: lock_fd holds the offline image's
                                   QEMU read locks (backup.c) */
  int lock_fd;
};

/* What a backup copies, and what its point-in-time export serves.  Parsed
 * once where a name comes in (control request, state file, job record); the
 * names live only in the tables of state.c. */
enum orch_backup_mode {
  ORCH_BACKUP_FULL,             /* the whole disk */
  ORCH_BACKUP_INCREMENTAL,      /* changes since a checkpoint (`since`) */
  ORCH_BACKUP_TOP,              /* what the top overlay holds */
  ORCH_BACKUP_NONE,             /* point in time only: no job may copy it */
};
/* Incremental backups: which blocks the point-in-time export serves.  ALL:
 * the whole disk at its point in time (every block protected, as libvirt
 * and QEMU do), the bitmap context still lists only the changes; CHANGED:
 * only the changed blocks (cheaper: unchanged blocks are never copied),
 * the others fail with an error saying why.  Full backups are ALL, top
 * backups CHANGED. */
enum orch_readable {
  ORCH_READABLE_ALL,
  ORCH_READABLE_CHANGED,
};
/* name -> value: 0, or -1 if the name is not one of the table's. */
int orch_backup_mode_parse (const char *name, enum orch_backup_mode *out);
const char *orch_backup_mode_name (enum orch_backup_mode m);
int orch_readable_parse (const char *name, enum orch_readable *out);
const char *orch_readable_name (enum orch_readable r);

struct orch_backup {
  char id[ORCH_NAME_MAX + 1];
  enum orch_backup_mode mode;
  enum orch_readable readable;  /* what its PIT exports serve */
  char since[ORCH_NAME_MAX + 1];      /* incremental base checkpoint or "" */
  char checkpoint[ORCH_NAME_MAX + 1]; /* checkpoint created with it or "" */
  int64_t started;
  uint32_t cbw_timeout_ms;      /* this backup's bound on a guest write's wait,
                                   0 = each disk's own */
  uint64_t seq;                 /* run time: which begin of this cbwd made it
                                   (0: loaded), so ids reused are told apart */
  size_t ndisks;
  struct orch_backup_disk *disks;
};

struct orch_pending {
  char op[32];                  /* "" = none; "checkpoint-create", "checkpoint-delete",
                                   "backup-begin", "backup-end" */
  char name[ORCH_NAME_MAX + 1]; /* checkpoint name or backup id */
  char prev[ORCH_NAME_MAX + 1]; /* checkpoint-create: JSON-less hint, unused = "" */
};

struct orch_state {
  uint64_t generation;
  size_t ndisks;
  struct orch_disk **disks;
  size_t ncps;
  struct orch_checkpoint *cps;  /* creation order */
  struct orch_backup *backup;   /* NULL = no backup */
  struct orch_pending pending;
};

struct orch_event {
  uint64_t seq;
  int64_t time;
  char *json;                   /* {"event":..., "data":{...}} */
};

struct orch_job;                /* job.c: push backup jobs */

struct cbw_orch {
  pthread_mutex_t lock;
  bool busy;
  char *state_dir, *state_path, *ctl_path, *module_dir;
  struct cbw_ctl_access ctl_access;     /* never changed after open */
  char **nbdkit_argv;           /* prefix words, NULL terminated */
  double start_timeout;
  bool file_plugin;             /* cfg.plugin == "file" */
  bool nbd_store;               /* cfg.store_target == "nbd" */
  const char *warning;          /* cfg.warning (static) */
  /* store bounds (backup.c): the default limit of a store, as a percentage
   * of the free space of its filesystem at begin (store_limit_pct) or in
   * bytes (store_limit_bytes), neither = none; the space kept free for the
   * state and bitmaps on the state directory's filesystem */
  unsigned store_limit_pct;
  uint64_t store_limit_bytes;
  uint64_t state_reserve;
  char *const *freeze_hooks;    /* cfg.freeze_hooks: "NAME=/PATH", read-only */
  size_t nfreeze_hooks;
  const struct cbw_orch_exports *exports;
  int lock_fd;
  struct orch_state st;
  /* events */
  uint64_t next_seq;
  struct orch_event events[ORCH_EVENTS_MAX];
  /* supervisor */
  pthread_t sup_thread;
  bool sup_started;
  int sup_wakefd;
  bool sup_stop;
  struct cbw_ctl_server *ctl;
  /* push jobs (job.c): the list is guarded by lock, each job by its own */
  struct orch_job **jobs;
  size_t njobs;
  uint64_t job_seq;             /* last N of generated ids job-N */
  char **listen;                /* cbwd's Unix NBD listener sockets (protect.c) */
  size_t nlisten;
  /* backup watch (backup.c): watch_stop under lock, signalled by watch_cond */
  pthread_t watch_thread;
  bool watch_started, watch_stop;
  pthread_cond_t watch_cond;
  uint64_t backup_seq;          /* last orch_backup.seq given (busy owner) */
};

/* ---- protect.c: is a file or socket one of ours (by device + inode)? ---- */
struct orch_prot;
struct orch_protect {
  size_t n, cap;
  struct orch_prot *v;
  char *state_dir;
  bool have_state;
  dev_t state_dev;
  ino_t state_ino;
};
/* Snapshot of everything cbwd serves or keeps: served images, chain files,
 * stores, bitmap and state files, every file in the state directory, the
 * sockets of the disks and of cbwd.  Takes o->lock briefly. */
int orch_protect_collect (struct cbw_orch *o, struct orch_protect *ps,
                          struct cbw_err *err);
void orch_protect_free (struct orch_protect *ps);
/* 0 if the file described by sb (named `name`, a `label` such as "job
 * target") is none of ours; else -1 (EINVAL) with *err naming what it is. */
int orch_protect_check_stat (const struct orch_protect *ps, const char *label,
                             const char *name, const struct stat *sb,
                             struct cbw_err *err);
int orch_protect_check_path (const struct orch_protect *ps, const char *label,
                             const char *path, struct cbw_err *err);
/* A new file `name` is about to be created in directory dirfd: refused in
 * the state directory (at any depth) and in a chain's directory. */
int orch_protect_check_newdir (const struct orch_protect *ps, const char *label,
                               const char *name, int dirfd, struct cbw_err *err);

/* ---- names ---- */
bool orch_valid_name (const char *s);

/* ---- repair.c ---- */
/* Size of a disk's image (file or block device), without nbdkit. */
int orch_image_size (const char *file, uint64_t *size, struct cbw_err *err);

/* ---- state.c ---- */
struct json_object *orch_state_to_json (const struct orch_state *st);
int orch_state_from_json (const char *text, size_t len, const char *what,
                          struct orch_state *st, struct cbw_err *err);
void orch_state_free (struct orch_state *st);
/* Save o->st (taking o->lock to snapshot it) to STATE_DIR/cbwd-state.json. */
int orch_state_save (struct cbw_orch *o, struct cbw_err *err);
int orch_state_load (struct cbw_orch *o, struct cbw_err *err);
struct orch_disk *orch_disk_new (const char *state_dir, const char *name,
                                 const char *file, uint64_t gran);
void orch_disk_free (struct orch_disk *d);
struct orch_disk *orch_find_disk (const struct orch_state *st, const char *name);
/* Set d's cbw timeout (0 = default) and the nbdkit argument made of it. */
void orch_disk_set_cbw_timeout (struct orch_disk *d, uint32_t ms);
uint32_t orch_disk_cbw_timeout (const struct orch_disk *d);
struct orch_checkpoint *orch_find_cp (const struct orch_state *st, const char *name);
void orch_backup_free (struct orch_backup *b);
void orch_cp_clear (struct orch_checkpoint *c);
/* The unusable mark of checkpoint c on disk, or NULL. */
const struct orch_unusable *orch_cp_unusable (const struct orch_checkpoint *c,
                                              const char *disk);
/* Mark every checkpoint covering disk unusable there (kept marks keep their
 * first reason); the number of checkpoints newly marked, -1 on ENOMEM.
 * Caller holds o->lock; the state is not saved. */
int orch_cp_mark_unusable (struct orch_state *st, const char *disk, const char *reason);
/* Forget disk's mark on c (the disk left the checkpoint). */
void orch_cp_drop_unusable (struct orch_checkpoint *c, const char *disk);

/* ---- plan.c: pure checkpoint arithmetic (unit tested) ---- */
/* The bitmap that records writes after checkpoint `cp` on a disk. */
void orch_cp_bitmap (const char *cp, char *buf, size_t len);
bool orch_cp_has_disk (const struct orch_checkpoint *c, const char *disk);
/* Index of the latest checkpoint covering disk, or -1. */
ssize_t orch_latest_cp (const struct orch_state *st, const char *disk);
/* Indexes of checkpoints covering disk from `since` to the latest (the
 * bitmaps whose union is "changed since since").  Returns count, or -1 with
 * *err if since does not exist or does not cover disk. idx has st->ncps room. */
ssize_t orch_plan_since (const struct orch_state *st, const char *disk,
                         const char *since, size_t *idx, struct cbw_err *err);
/* Deleting checkpoint `ci` on disk: the neighbour whose bitmap absorbs it
 * (the previous checkpoint covering disk) or -1 if none. */
ssize_t orch_plan_delete_into (const struct orch_state *st, size_t ci,
                               const char *disk);

/* ---- events (orch.c) ---- */
void orch_event (struct cbw_orch *o, const char *type, struct json_object *data);
void orch_event_locked (struct cbw_orch *o, const char *type,
                        struct json_object *data);

/* ---- modctl.c: calls to the modules' control sockets ---- */
/* Call command on a module control socket; returns the "return" object
 * (caller puts) or NULL with *err naming the socket, command and the
 * module's error class + desc.  *cls (if non-NULL) gets the module's error
 * class name ("" on transport errors). */
struct json_object *orch_mod_call (const char *sock, const char *command,
                                   struct json_object *args, char *cls,
                                   size_t cls_len, struct cbw_err *err);

/* ---- disk.c ---- */
int orch_disk_start (struct cbw_orch *o, struct orch_disk *d, struct cbw_err *err);
int orch_disk_stop (struct cbw_orch *o, struct orch_disk *d, struct cbw_err *err);
/* At startup: adopt a still-running nbdkit of a previous cbwd or mark dead. */
void orch_disk_adopt (struct cbw_orch *o, struct orch_disk *d);
int orch_supervisor_start (struct cbw_orch *o, struct cbw_err *err);
void orch_supervisor_stop (struct cbw_orch *o);
void orch_supervisor_kick (struct cbw_orch *o);
bool orch_disk_running (struct cbw_orch *o, struct orch_disk *d);
const char *orch_disk_run_name (enum orch_disk_run r);
/* Start a helper process (argv) with stdout/stderr to log; pid or -1. */
pid_t orch_spawn (char *const argv[], const char *log_path, struct cbw_err *err);
/* Start a long-lived helper detached (not our child, survives cbwd); its
 * pid, and a pidfd for it in *pidfd_out. */
pid_t orch_spawn_detached (char *const argv[], const char *log_path, int *pidfd_out,
                           struct cbw_err *err);
/* Wait until a Unix socket accepts connections, failing early when the
 * process behind pidfd (if >= 0) exits. */
int orch_wait_socket (const char *path, int pidfd, double timeout, struct cbw_err *err);
/* CLOCK_MONOTONIC in nanoseconds: the one clock of timeouts and rates. */
static inline int64_t
orch_now_ns (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}
/* SIGTERM, wait up to 5 s, SIGKILL, all through the pidfd (-1: open one
 * now), so a reused pid is never signalled. */
void orch_kill_wait (pid_t pid, int pidfd);
/* orch_kill_wait if pid still is the process we started: a pidfd pins it
 * first, then its /proc/PID/cmdline must have needle (as in
 * orch_pid_cmdline_has), so the check and the signals are about the same
 * process. */
void orch_kill_wait_if (pid_t pid, const char *needle, bool whole_arg);
/* The last lines of a log file, on one line (for error messages). */
void orch_log_tail (const char *path, char *buf, size_t len);

/* disk_tcp.c: a disk's TCP listener with nbdkit's TLS. */
/* From disk-add's arguments or a state file's "tcp" object (with_pid: it
 * carries "pid"): *out = NULL if there is no "listen"; -1 with *err on a
 * bad or unsafe combination. */
int orch_disk_tcp_parse (struct json_object *j, bool with_pid,
                         struct orch_disk_tcp **out, struct cbw_err *err);
struct json_object *orch_disk_tcp_json (const struct orch_disk_tcp *t,
                                        bool with_pid);
bool orch_disk_tcp_loopback (const struct orch_disk_tcp *t);
const char *orch_disk_tcp_tls_name (int tls);
bool orch_disk_tcp_alive (struct cbw_orch *o, struct orch_disk *d);
/* Start the front unless it runs; checks the key files first. */
int orch_disk_tcp_start (struct cbw_orch *o, struct orch_disk *d,
                         struct cbw_err *err);
void orch_disk_tcp_stop (struct cbw_orch *o, struct orch_disk *d);
void orch_disk_tcp_free (struct orch_disk_tcp *t);
/* Is pid still the process we started (pid-reuse guard)?  True if one
 * argument of /proc/PID/cmdline equals needle (whole_arg) or contains it. */
bool orch_pid_cmdline_has (int64_t pid, const char *needle, bool whole_arg);

/* ---- repair.c: explicit recovery of lost metadata ---- */
/* `disk-repair --reset-bitmaps` on a stopped disk: a new bitmap store with
 * every checkpoint's bitmap all set, those checkpoints marked unusable on
 * the disk, state saved; *ret = {"disk","bitmaps","unusable","message"}. */
int orch_disk_repair_bitmaps (struct cbw_orch *o, struct orch_disk *d,
                              struct json_object **ret, struct cbw_err *err);

/* ---- diskfiles.c: image identity, a disk's own files ---- */
/* disk-add: refuse an image that is another disk's (by device + inode), a
 * file in the state directory or of another disk's chain, and a given chain
 * (chain_given) inside the state directory; chain may be NULL. */
int orch_disk_check_files (struct cbw_orch *o, const char *name, const char *image,
                           const char *chain, bool chain_given, struct cbw_err *err);
/* Before nbdkit starts: is the image free of QEMU image locks that
 * conflict with serving it (skipped with force-share)?  EBUSY naming the
 * image otherwise. */
int orch_disk_check_lock (struct orch_disk *d, struct cbw_err *err);
/* disk-remove: delete the files cbwd made for d (and its directory if then
 * empty); returns the JSON array of the paths left in place. */
struct json_object *orch_disk_remove_files (struct cbw_orch *o, struct orch_disk *d);

/* ---- checkpoint.c ---- */
int orch_checkpoint_create (struct cbw_orch *o, const char *name,
                            char **disks, size_t ndisks, struct cbw_err *err);
int orch_checkpoint_delete (struct cbw_orch *o, const char *name, struct cbw_err *err);
/* Inside a quiesced window: rotate bitmaps of new checkpoint on disks. */
int orch_cp_rotate (struct cbw_orch *o, const char *name, char **disks,
                    size_t ndisks, struct cbw_err *err);
/* Finish (roll forward or back) an interrupted checkpoint-create/-delete. */
int orch_cp_reconcile (struct cbw_orch *o, const char *op, const char *name,
                       struct cbw_err *err);
int orch_reconcile (struct cbw_orch *o, struct cbw_err *err);
/* Record checkpoint `name` on disks with pending={op,name} and save. */
int orch_cp_prepare (struct cbw_orch *o, const char *name, char **disks,
                     size_t n, const char *op, const char *pending_name,
                     struct cbw_err *err);
/* Undo a recorded, maybe partly rotated checkpoint (state not saved). */
int orch_cp_undo (struct cbw_orch *o, const char *name, struct cbw_err *err);
int orch_cp_rotate_finish (struct cbw_orch *o, const char *name, struct cbw_err *err);
/* Recovery that cannot finish: roll checkpoint `name` back (deleting: finish
 * its delete) on each disk where that still works, drop it from the state,
 * and mark every checkpoint of the other disks unusable there with `why`;
 * their names are appended to `failed`.  Not saved; -1 on ENOMEM. */
int orch_cp_abandon (struct cbw_orch *o, const char *name, bool deleting, const char *why,
                     struct json_object *failed);
/* A disk set is non-empty, known, running, without duplicates. */
int orch_check_disks (struct cbw_orch *o, char **disks, size_t n, struct cbw_err *err);
/* The same, but stopped disks are allowed (*offline[i] set for them). */
int orch_check_disks_offline (struct cbw_orch *o, char **disks, size_t n, bool *offline,
                              struct cbw_err *err);
void orch_set_pending (struct cbw_orch *o, const char *op, const char *name);
/* dirtybitmap filter primitives on one disk (checkpoint.c) */
int orch_bm_add (struct orch_disk *d, const char *bm, bool enabled, struct cbw_err *err);
/* The same with an explicit granularity (0 = the disk's). */
int orch_bm_add_gran (struct orch_disk *d, const char *bm, bool enabled, uint64_t gran,
                      struct cbw_err *err);
int orch_bm_remove (struct orch_disk *d, const char *bm, bool missing_ok, struct cbw_err *err);
int orch_bm_enable (struct orch_disk *d, const char *bm, bool on, struct cbw_err *err);
int orch_bm_merge (struct orch_disk *d, const char *src, const char *dst, struct cbw_err *err);
/* Dirty extents of bitmap bm as a JSON array [[offset,length],...] of at
 * most max entries (neighbours joined if needed: a superset, never less);
 * *dirty_bytes = exact dirty bytes.  NULL with *err on failure. */
struct json_object *orch_bm_extents (struct orch_disk *d, const char *bm, uint64_t size,
                                     size_t max, uint64_t *dirty_bytes, struct cbw_err *err);
/* 1 exists, 0 not, -1 error */
int orch_bm_exists (struct orch_disk *d, const char *bm, struct cbw_err *err);
int orch_quiesce (struct cbw_orch *o, char **disks, size_t n, size_t *done,
                  struct cbw_err *err);
void orch_resume (struct cbw_orch *o, char **disks, size_t n);

/* ---- bmstore.c: the same primitives on a stopped disk's bitmap store ---- */
/* Each call opens the store (its lock must be free), refuses a store whose
 * bitmaps are "in-use" (the disk's nbdkit died; only its dirtybitmap filter
 * can recover them), edits it and saves it crash-atomically. */
int orch_bm_store_add (struct orch_disk *d, const char *bm, bool enabled, uint64_t gran,
                       struct cbw_err *err);
int orch_bm_store_remove (struct orch_disk *d, const char *bm, bool missing_ok,
                          struct cbw_err *err);
int orch_bm_store_enable (struct orch_disk *d, const char *bm, bool on, struct cbw_err *err);
int orch_bm_store_merge (struct orch_disk *d, const char *src, const char *dst,
                         struct cbw_err *err);
int orch_bm_store_exists (struct orch_disk *d, const char *bm, struct cbw_err *err);
/* Check a stopped disk can be backed up offline: image size in *size, the
 * store opens and is clean. */
int orch_bm_store_check (struct orch_disk *d, uint64_t *size, struct cbw_err *err);
/* Write to `path` (crash-atomically) the union of bitmaps bms[0..n) as an
 * "OFFSET LENGTH" extents file (server/meta_bitmap.c, source extents);
 * every bitmap must exist.  *dirty = bytes listed. */
int orch_bm_store_union_file (struct orch_disk *d, char *const *bms, size_t n,
                              const char *path, uint64_t *dirty, struct cbw_err *err);

/* ---- overlay.c: a disk's overlay chain ---- */
/* STATE/disks/NAME/overlays/NAME.chain (malloc'd) */
char *orch_chain_default_path (const char *state_dir, const char *name);
/* The chain plugin's status "chain" object (layers, operation); NULL + err
 * (EINVAL if the disk has no chain). */
struct json_object *orch_chain_status (struct orch_disk *d, struct cbw_err *err);
struct orch_chain_info {
  unsigned overlays;            /* layers above the base */
  uint64_t cluster_size;
  bool commit_running;
  char top[256];                /* name of the top layer */
};
int orch_chain_info (struct orch_disk *d, struct orch_chain_info *ci, struct cbw_err *err);
/* The range of a commit (`disk-commit` base/top): layers (the chain
 * status "layers" array, bottom to top) and the LAYER arguments (a decimal
 * index or a layer name as disk-chain shows them; NULL = default: top = the
 * active layer, base = the layer below top) give *lo..*hi, the overlays
 * merged into layer *lo - 1.  EINVAL with a message naming the problem:
 * no overlay, unknown name, index out of range, base not below top, top is
 * the image. */
int orch_commit_range (const char *disk, struct json_object *layers, const char *base,
                       const char *top, unsigned *lo, unsigned *hi, struct cbw_err *err);
/* Overlays listed in the descriptor on disk (for a disk that is not
 * running); 0 if there is no descriptor yet. */
int orch_chain_overlays_offline (struct orch_disk *d, unsigned *n, struct cbw_err *err);
/* Mark the top overlay's allocated extents in bitmap bm (which must exist)
 * of the disk's dirtybitmap filter; *bytes = bytes marked.  Call quiesced. */
int orch_chain_top_to_bitmap (struct orch_disk *d, const char *bm, uint64_t size,
                              uint64_t *bytes, struct cbw_err *err);

/* ---- guest.c ---- */
struct orch_freeze {
  const char *hook;             /* program (absolute path) run as `HOOK freeze`
                                   / `HOOK thaw`, without a shell */
  const char *qga;              /* or: qemu-guest-agent socket */
  double timeout;               /* seconds */
  bool required;                /* freeze failure fails the backup */
  const char *log;              /* hook output, NULL = /dev/null */
};
/* The program of the freeze hook named name, or NULL if none is. */
const char *orch_freeze_hook (const struct cbw_orch *o, const char *name);
int orch_guest_run (const struct orch_freeze *f, const char *phase, struct cbw_err *err);
int orch_guest_agent (const char *socket_path, const char *phase, double timeout,
                      struct cbw_err *err);

/* ---- backup.c ---- */
struct orch_backup_req {
  const char *id;
  char **disks; size_t ndisks;
  const char *mode;             /* a name of orch_backup_mode, NULL = full */
  const char *readable;         /* all | changed, NULL = the mode's default */
  const char *since;
  const char *checkpoint;
  uint32_t cbw_timeout_ms;      /* 0 = each disk's own */
  const char *store_dir;        /* NULL = STATE_DIR/backups */
  uint64_t store_limit;         /* per store, bytes; 0 = the configured default */
  struct orch_freeze freeze;
};
int orch_backup_begin (struct cbw_orch *o, const struct orch_backup_req *r,
                       struct json_object **ret, struct cbw_err *err);
int orch_backup_end (struct cbw_orch *o, const char *id, struct cbw_err *err);
int orch_backup_reconcile (struct cbw_orch *o, struct cbw_err *err);
/* Recovery of a backup-begin/-end that cannot finish: best-effort teardown,
 * a checkpoint begun with it abandoned (orch_cp_abandon), record dropped.
 * Not saved; -1 on ENOMEM. */
int orch_backup_abandon (struct cbw_orch *o, const char *why, struct json_object *failed);
/* Resolve the pending operation for good: orch_reconcile(), and if that
 * fails, record it as failed (event `recovery-failed`), abandon it and mark
 * the checkpoints of the disks it could not repair unusable.  -1 only if
 * the state cannot be saved. */
int orch_reconcile_or_abandon (struct cbw_orch *o, struct cbw_err *err);
/* Store bounds from CBW_ORCH_STORE_LIMIT ("N%" of the free space, a size
 * such as 10G, or "none"; default 50%) and CBW_ORCH_STATE_RESERVE (a size,
 * default 128M). */
#define ORCH_STORE_LIMIT_PCT 50
#define ORCH_STATE_RESERVE (128ULL << 20)
int orch_backup_config (struct cbw_orch *o, const char *limit, const char *reserve,
                        struct cbw_err *err);
struct json_object *orch_backup_to_json (const struct orch_backup *b);
/* The backup watch: a thread that turns a disk's session going broken
 * (copy-before-write gave up: target stalled, lost or full) into the event
 * `backup-broken` with the filter's reason, within ORCH_WATCH_MS. */
#define ORCH_WATCH_MS 200
int orch_backup_watch_start (struct cbw_orch *o, struct cbw_err *err);
void orch_backup_watch_stop (struct cbw_orch *o);

/* ---- job.c: push backup jobs (locking: see the top of job.c) ---- */
struct nbd_handle;
enum orch_job_state {
  ORCH_JOB_RUNNING = 0,
  ORCH_JOB_PAUSED,
  ORCH_JOB_COMPLETED,
  ORCH_JOB_CANCELLED,
  ORCH_JOB_FAILED,
};

struct orch_job_disk {
  char name[ORCH_NAME_MAX + 1];
  char *src_uri;                /* the backup's PIT export of the disk */
  char *ctl_cbw;                /* cbw filter control socket (skip) */
  char bitmap[ORCH_NAME_MAX + 16];    /* incremental: backup-DISK */
  struct orch_disk *disk;       /* job-start only (busy owner) */
  uint64_t size, gran;          /* disk bytes, session block size */
  uint64_t (*want)[2];          /* ranges to copy (offset, length), sorted */
  size_t nwant;
  char *target;                 /* as given */
  char format[8];               /* nbd | raw | qcow2 */
  char *path;                   /* raw/qcow2 file */
  bool fresh;                   /* created sparse by this job: zeroes need no write */
  bool created;                 /* the file was created by this job */
  bool dst_can_zero;
  int fd;                       /* raw file, -1 otherwise */
  int pin_fd;                   /* qcow2 file, opened (or created O_EXCL) and
                                   checked by us; qemu-img and qemu-nbd open
                                   it as /proc/CBWD/fd/N, never by name */
  bool regular;                 /* a regular file (its directory is fsynced) */
  struct nbd_handle *dst;       /* NBD target (also qcow2 via qemu-nbd) */
  bool connect_later;           /* an NBD URI target: connected (and checked)
                                   on the job's thread, never on the control
                                   thread, within the job's connect timeout */
  int64_t helper_pid;           /* qemu-nbd, 0 if none */
  char *helper_sock, *helper_log;
  /* progress (job lock) */
  uint64_t total, done, released;
};

struct orch_job {
  struct cbw_orch *o;
  char id[ORCH_NAME_MAX + 1];
  char backup[ORCH_NAME_MAX + 1];
  int64_t backup_started;       /* tells two backups with one id apart */
  bool backup_ended;            /* j->lock: its backup has ended (backup-end);
                                   `started` has 1 s resolution, so a new
                                   backup with the same id may share it */
  enum orch_backup_mode mode;   /* full, incremental or top (none: full) */
  unsigned requests;            /* requests in flight */
  unsigned connect_timeout;     /* seconds: NBD targets' connect + handshake */
  uint64_t request_size;
  bool pipelined;               /* source takes pipelined requests (cbwd's PIT export) */
  size_t ndisks;
  struct orch_job_disk *disks;
  pthread_t thread;             /* control thread only: */
  bool thread_started;          /*   set at start, cleared when joined */
  int wakefd;                   /* eventfd: wakes the copy loop */
  pthread_mutex_t lock;         /* guards everything below */
  pthread_cond_t cond;
  enum orch_job_state state;
  bool cancel_req, paused_drained;
  uint64_t speed;               /* bytes/s, 0 = unlimited */
  int64_t started, finished;
  int64_t t0_ns, t1_ns;         /* copy thread start/end, CLOCK_MONOTONIC */
  uint64_t total, done, data_bytes, zero_bytes, released, release_errors;
  int in_flight;
  char error[CBW_ERR_MSG_MAX];
  char release_error[CBW_ERR_MSG_MAX];
};

struct orch_job_req {
  const char *id;               /* NULL = job-N */
  const char *backup;           /* NULL = the running backup */
  char **disks; size_t ndisks;  /* 0 = every disk of the backup */
  char **targets; size_t ntargets;    /* "DISK=TARGET" (or TARGET, one disk) */
  uint64_t speed;
  uint64_t request_size;
  unsigned requests;
  unsigned connect_timeout;     /* seconds for an NBD target's handshake, 0 = 30 */
};
const char *orch_job_state_name (enum orch_job_state s);
int orch_job_start (struct cbw_orch *o, const struct orch_job_req *r,
                    struct json_object **ret, struct cbw_err *err);
struct orch_job *orch_job_find (struct cbw_orch *o, const char *id);
struct json_object *orch_job_to_json (struct orch_job *j);
struct json_object *orch_jobs_list (struct cbw_orch *o);
int orch_job_pause (struct cbw_orch *o, const char *id, bool pause, struct cbw_err *err);
int orch_job_set_speed (struct cbw_orch *o, const char *id, uint64_t speed,
                        struct cbw_err *err);
/* Cancel a running job and wait until it stopped; *ret = its final status. */
int orch_job_cancel (struct cbw_orch *o, const char *id, struct json_object **ret,
                     struct cbw_err *err);
/* Cancel (and join) every job of backup_id (NULL = all); count cancelled. */
int orch_jobs_cancel_backup (struct cbw_orch *o, const char *backup_id);
/* Startup: load STATE/jobs.json, report jobs that were running as failed. */
void orch_jobs_load (struct cbw_orch *o);
/* Shutdown: cancel running jobs (reported failed, interrupted), free all. */
void orch_jobs_shutdown (struct cbw_orch *o);

/* Test hook: when the environment variable CBW_ORCH_CRASH_AT equals
 * `point`, exit at once with status 99 and no cleanup (a kill -9 at a
 * chosen step; the crash tests in client-tests/backup use it). */
void orch_crash_point (const char *point);

/* helpers */
void orch_rm_rf (const char *dir);
char *orch_strdup_printf (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
int orch_begin_busy (struct cbw_orch *o, struct cbw_err *err);
void orch_end_busy (struct cbw_orch *o);

#endif
