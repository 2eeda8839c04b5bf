/* cbw — server/cli/cbw.c: `cbw`, the command-line client of cbwd's control
 * API (virsh-like: `cbw disk add`, `cbw checkpoint create`, `cbw backup
 * begin`, ...).  Man page: docs/cbw.1.md.
 *
 * Each subcommand is one row of `subs[]`: the control command it sends,
 * its positional argument and its options with their JSON types, so the CLI
 * never invents semantics of its own; cbwd validates again.  Output is
 * human-readable by default and the raw "return" object with --json.
 * Exit codes (stable, for scripts): 0 success, 1 the command failed (cbwd
 * answered with an error), 2 usage error (nothing was sent), 3 cannot
 * connect to cbwd or the connection broke.  `cbw job wait` exits 0 only if
 * the job completed (1 if it failed or was cancelled) and draws a progress
 * bar on stderr when stderr is a terminal.  `cbw events [--follow]` prints
 * the event ring, then (--follow) the events cbwd pushes after `subscribe`
 * until interrupted (0) or until the stream ends (3).  `cbw --complete
 * WORD...` (hidden; used by the bash completion, cbw-completion.bash) prints the
 * candidates for the word after WORDs: subcommands and options from subs[],
 * disk, checkpoint, backup and job names from the running daemon.
 *
 * Locking: single-threaded.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "cbw_err.h"
#include "control.h"
#include "units.h"

#define EXIT_CMD 1
#define EXIT_USAGE 2
#define EXIT_CONNECT 3
#define DEFAULT_SOCKET "/run/cbwd/control.sock"

enum opt_type { O_STR, O_UINT, O_BOOL, O_LIST, O_INCR, O_FULL, O_SIZE, O_TARGET,
                O_SECS /* seconds (decimals allowed), sent as milliseconds */,
                O_DIR /* a directory, made absolute */ };

struct opt {
  const char *flag;       /* "--file" */
  const char *key;        /* JSON argument */
  enum opt_type type;
  const char *help;
};

typedef void (*printer) (struct json_object *ret);

struct sub {
  const char *group, *verb;
  const char *command;
  const char *positional;     /* JSON key of the one positional argument */
  bool pos_required;
  const char *pos_name;       /* for help: NAME */
  struct opt opts[16];
  const char *help;
  printer print;
};

static bool json_out;

/* ---- printers ---- */

static const char *
jstr (struct json_object *o, const char *k, const char *dflt)
{
  struct json_object *v;
  if (o && json_object_object_get_ex (o, k, &v) && v &&
      !json_object_is_type (v, json_type_null))
    return json_object_get_string (v);
  return dflt;
}

static int64_t
jint (struct json_object *o, const char *k)
{
  struct json_object *v;
  if (o && json_object_object_get_ex (o, k, &v) && v)
    return json_object_get_int64 (v);
  return 0;
}

static struct json_object *
jget (struct json_object *o, const char *k)
{
  struct json_object *v = NULL;
  if (o)
    json_object_object_get_ex (o, k, &v);
  return v;
}

static void
human_size (uint64_t n, char *buf, size_t len)
{
  const char *u[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB" };
  double v = (double) n;
  int i = 0;
  while (v >= 1024 && i < 5) { v /= 1024; i++; }
  if (i == 0)
    snprintf (buf, len, "%" PRIu64 " B", n);
  else
    snprintf (buf, len, "%.1f %s", v, u[i]);
}

static void
print_kv (struct json_object *ret)
{
  json_object_object_foreach (ret, k, v)
    printf ("%-12s %s\n", k, v ? json_object_get_string (v) : "-");
}

static void
print_disk (struct json_object *d)
{
  printf ("disk %s: %s, %s\n  nbd: %s\n", jstr (d, "name", "?"), jstr (d, "state", "?"),
          jstr (d, "file", "?"), jstr (d, "uri", "?"));
  if (jstr (d, "id", NULL))
    printf ("  id: %s\n", jstr (d, "id", ""));
  if (jstr (d, "chain", NULL))
    printf ("  overlay chain: %s\n", jstr (d, "chain", ""));
  if (json_object_get_boolean (jget (d, "force-share")))
    printf ("  force-share: image locks not exclusive (another writer can corrupt it)\n");
  struct json_object *t = jget (d, "tcp");
  if (t) {
    printf ("  tcp: %s (listen %s, tls %s", jstr (t, "uri", "?"), jstr (t, "listen", "?"),
            jstr (t, "tls", "?"));
    if (jstr (t, "tls-psk", NULL))
      printf (", psk file %s", jstr (t, "tls-psk", ""));
    if (jstr (t, "tls-certificates", NULL))
      printf (", x509 %s%s", jstr (t, "tls-certificates", ""),
              json_object_get_boolean (jget (t, "tls-verify-peer")) ? ", verify-peer" : "");
    printf (", pid %" PRId64 ")\n", jint (t, "pid"));
    if (jstr (t, "warning", NULL))
      printf ("  warning: %s\n", jstr (t, "warning", ""));
  }
}

static void
print_removed (struct json_object *ret)
{
  struct json_object *a = jget (ret, "left");
  for (size_t i = 0; a && i < json_object_array_length (a); i++)
    printf ("left in place (not made by cbwd): %s\n",
            json_object_get_string (json_object_array_get_idx (a, i)));
}

static void
print_disks (struct json_object *ret)
{
  struct json_object *a = jget (ret, "disks");
  size_t n = a ? json_object_array_length (a) : 0;
  if (n == 0) {
    printf ("no disks\n");
    return;
  }
  printf ("%-16s %-8s %-8s %10s  %-36s  %s\n", "NAME", "STATE", "PID", "SIZE", "ID", "FILE");
  for (size_t i = 0; i < n; i++) {
    struct json_object *d = json_object_array_get_idx (a, i);
    char sz[32];
    human_size ((uint64_t) jint (d, "size"), sz, sizeof sz);
    struct json_object *t = jget (d, "tcp");
    printf ("%-16s %-8s %-8" PRId64 " %10s  %-36s  %s%s", jstr (d, "name", "?"),
            jstr (d, "state", "?"), jint (d, "pid"), sz, jstr (d, "id", "-"),
            jstr (d, "file", "?"),
            json_object_get_boolean (jget (d, "force-share")) ? " (force-share)" : "");
    if (t)
      printf (" (tcp %s, tls %s)", jstr (t, "listen", "?"), jstr (t, "tls", "?"));
    printf ("\n");
  }
}

static void
print_cps (struct json_object *ret)
{
  struct json_object *a = jget (ret, "checkpoints");
  size_t n = a ? json_object_array_length (a) : 0;
  if (n == 0) {
    printf ("no checkpoints\n");
    return;
  }
  printf ("%-20s %-20s %s\n", "NAME", "CREATED (UTC)", "DISKS");
  for (size_t i = 0; i < n; i++) {
    struct json_object *c = json_object_array_get_idx (a, i), *d = jget (c, "disks");
    char when[32];
    time_t t = (time_t) jint (c, "created");
    struct tm tm;
    gmtime_r (&t, &tm);
    strftime (when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
    printf ("%-20s %-20s ", jstr (c, "name", "?"), when);
    for (size_t j = 0; d && j < json_object_array_length (d); j++)
      printf ("%s%s", j ? "," : "", json_object_get_string (json_object_array_get_idx (d, j)));
    printf ("%s\n", json_object_get_boolean (jget (c, "pending")) ? " (pending)" : "");
    struct json_object *u = jget (c, "unusable");
    for (size_t j = 0; u && j < json_object_array_length (u); j++) {
      struct json_object *e = json_object_array_get_idx (u, j);
      printf ("  unusable on %s: %s (take a full backup of %s)\n", jstr (e, "disk", "?"),
              jstr (e, "reason", "?"), jstr (e, "disk", "?"));
    }
  }
}

static void
print_repair (struct json_object *ret)
{
  printf ("%s\n", jstr (ret, "message", ""));
}

static void
print_backup (struct json_object *ret)
{
  printf ("backup %s: mode %s", jstr (ret, "id", "?"), jstr (ret, "mode", "?"));
  const char *since = jstr (ret, "since", "");
  const char *cp = jstr (ret, "checkpoint", "");
  if (since[0]) printf (", since checkpoint %s", since);
  if (since[0] && jstr (ret, "readable", NULL))
    printf (", readable %s", jstr (ret, "readable", ""));
  if (cp[0]) printf (", created checkpoint %s", cp);
  if (json_object_get_boolean (jget (ret, "broken")))
    printf (" -- BROKEN (see `cbw event list`: backup-broken)");
  printf ("\n");
  struct json_object *a = jget (ret, "disks");
  for (size_t i = 0; a && i < json_object_array_length (a); i++) {
    struct json_object *d = json_object_array_get_idx (a, i);
    printf ("  %-16s %s\n", jstr (d, "name", "?"), jstr (d, "pit-uri", "-"));
    if (json_object_get_boolean (jget (d, "offline")))
      printf ("  %-16s offline: yes (stopped disk: its image, read-only)\n", "");
    if (jstr (d, "bitmap", NULL))
      printf ("  %-16s dirty bitmap: %s\n", "", jstr (d, "bitmap", ""));
    struct json_object *s = jget (d, "session");
    if (s)
      printf ("  %-16s session: %s\n", "",
              json_object_to_json_string_ext (s, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
    if (jstr (d, "session-error", NULL))
      printf ("  %-16s session error: %s\n", "", jstr (d, "session-error", ""));
  }
}

static void
print_events (struct json_object *ret)
{
  struct json_object *a = jget (ret, "events");
  for (size_t i = 0; a && i < json_object_array_length (a); i++) {
    struct json_object *e = json_object_array_get_idx (a, i);
    char when[32];
    time_t t = (time_t) jint (e, "time");
    struct tm tm;
    gmtime_r (&t, &tm);
    strftime (when, sizeof when, "%H:%M:%S", &tm);
    printf ("%6" PRId64 " %s %-20s %s\n", jint (e, "seq"), when, jstr (e, "event", "?"),
            json_object_to_json_string_ext (jget (e, "data"), JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
  }
  if (json_object_get_boolean (jget (ret, "lost")))
    printf ("(older events were dropped)\n");
}

static void
print_created (struct json_object *ret)
{
  printf ("checkpoint %s created\n", jstr (ret, "name", "?"));
}

static void
print_job (struct json_object *j)
{
  char done[32], total[32];
  human_size ((uint64_t) jint (j, "bytes-done"), done, sizeof done);
  human_size ((uint64_t) jint (j, "bytes-total"), total, sizeof total);
  printf ("job %s (backup %s, %s): %s, %s of %s", jstr (j, "id", "?"), jstr (j, "backup", "?"),
          jstr (j, "mode", "?"), jstr (j, "state", "?"), done, total);
  struct json_object *p = jget (j, "percent");
  if (p)
    printf (" (%.1f%%)", json_object_get_double (p));
  if (jint (j, "speed") > 0) {
    char sp[32];
    human_size ((uint64_t) jint (j, "speed"), sp, sizeof sp);
    printf (", limit %s/s", sp);
  }
  printf ("\n");
  if (jstr (j, "error", NULL))
    printf ("  error: %s\n", jstr (j, "error", ""));
  struct json_object *a = jget (j, "disks");
  for (size_t i = 0; a && i < json_object_array_length (a); i++) {
    struct json_object *d = json_object_array_get_idx (a, i);
    char r[32];
    human_size ((uint64_t) jint (d, "released-bytes"), r, sizeof r);
    printf ("  %-16s -> %s (%s%s), released %s\n", jstr (d, "name", "?"), jstr (d, "target", "?"),
            jstr (d, "format", "?"), json_object_get_boolean (jget (d, "created")) ? ", created" : "", r);
  }
}

static void
print_jobs (struct json_object *ret)
{
  struct json_object *a = jget (ret, "jobs");
  size_t n = a ? json_object_array_length (a) : 0;
  if (n == 0) {
    printf ("no jobs\n");
    return;
  }
  printf ("%-16s %-16s %-12s %-10s %7s  %s\n", "ID", "BACKUP", "MODE", "STATE", "DONE", "ERROR");
  for (size_t i = 0; i < n; i++) {
    struct json_object *j = json_object_array_get_idx (a, i);
    struct json_object *p = jget (j, "percent");
    printf ("%-16s %-16s %-12s %-10s %6.1f%%  %s\n", jstr (j, "id", "?"), jstr (j, "backup", "?"),
            jstr (j, "mode", "?"), jstr (j, "state", "?"), p ? json_object_get_double (p) : 0.0,
            jstr (j, "error", ""));
  }
}

static void
print_snapshot (struct json_object *ret)
{
  printf ("disk %s: new top overlay %s (%" PRId64 " overlay%s)\n", jstr (ret, "disk", "?"),
          jstr (ret, "layer", "?"), jint (ret, "overlays"), jint (ret, "overlays") == 1 ? "" : "s");
}

static void
print_commit (struct json_object *ret)
{
  char layers[64];
  if (jint (ret, "hi") > jint (ret, "lo"))
    snprintf (layers, sizeof layers, "layers %" PRId64 "..%" PRId64, jint (ret, "lo"),
              jint (ret, "hi"));
  else
    snprintf (layers, sizeof layers, "layer %" PRId64, jint (ret, "lo"));
  bool keep = strcmp (jstr (ret, "mode", "delete"), "make-empty") == 0;
  printf ("disk %s: committing %s into layer %" PRId64 "%s%s (progress: cbw disk chain %s)\n",
          jstr (ret, "disk", "?"), layers, jint (ret, "lo") - 1,
          json_object_get_boolean (jget (ret, "active")) ? ", live" : "",
          keep ? ", keeping them emptied" : "", jstr (ret, "disk", "?"));
}

static void
print_operation (struct json_object *op)
{
  if (op == NULL)
    return;
  uint64_t done = (uint64_t) jint (op, "done"), total = (uint64_t) jint (op, "total");
  char d[32], t[32];
  human_size (done, d, sizeof d);
  human_size (total, t, sizeof t);
  printf ("  %s of layers %" PRId64 "..%" PRId64 ": %s, %s of %s (%.1f%%)%s%s\n",
          jstr (op, "type", "?"), jint (op, "lo"), jint (op, "hi"), jstr (op, "state", "?"),
          d, t, total ? 100.0 * (double) done / (double) total : 100.0,
          jstr (op, "error", NULL) ? ": " : "", jstr (op, "error", ""));
}

static void
print_chain (struct json_object *ret)
{
  const char *chain = jstr (ret, "chain", NULL);
  printf ("disk %s: %" PRId64 " overlay%s%s%s%s\n", jstr (ret, "disk", "?"),
          jint (ret, "overlays"), jint (ret, "overlays") == 1 ? "" : "s",
          chain ? " (chain " : " (no overlay chain: raw fast path", chain ? chain : "", ")");
  struct json_object *a = jget (ret, "layers");
  printf ("  %-5s %-28s %-8s %-8s %10s %10s  %s\n", "INDEX", "NAME", "KIND", "WRITABLE",
          "ALLOCATED", "ZERO", "LABEL");
  for (size_t i = 0; a && i < json_object_array_length (a); i++) {
    struct json_object *l = json_object_array_get_idx (a, i);
    char al[32] = "-", z[32] = "-";
    if (jget (l, "allocated_bytes")) {
      human_size ((uint64_t) jint (l, "allocated_bytes"), al, sizeof al);
      human_size ((uint64_t) jint (l, "zero_bytes"), z, sizeof z);
    }
    printf ("  %-5" PRId64 " %-28s %-8s %-8s %10s %10s  %s\n", jint (l, "index"),
            jstr (l, "name", "?"), jstr (l, "kind", "?"),
            json_object_get_boolean (jget (l, "writable")) ? "yes" : "no", al, z,
            jstr (l, "label", ""));
  }
  print_operation (jget (ret, "operation"));
}

/* ---- the subcommand table ---- */

static const struct sub subs[] = {
  { "status", NULL, "status", NULL, false, NULL, { { NULL } },
    "show the daemon's summary", print_kv },
  { "disk", "add", "disk-add", "name", true, "NAME",
    { { "--file", "file", O_STR, "image file or block device (required)" },
      { "--granularity", "granularity", O_UINT, "dirty bitmap granularity in bytes" },
      { "--overlays", "overlays", O_BOOL, "serve it through an overlay chain (live "
        "snapshots, commits, `top` backups; default: raw fast path)" },
      { "--chain", "chain", O_STR, "PATH: chain descriptor to use or create (absolute; "
        "implies --overlays)" },
      { "--force-share", "force-share", O_BOOL, "serve it even if QEMU/qemu-nbd holds "
        "it, without exclusive image locks (dangerous: two writers corrupt it)" },
      { "--cbw-timeout", "cbw-timeout-ms", O_SECS, "SECS: longest wait of a guest write "
        "for a backup; past it the backup breaks (default 5)" },
      { "--listen", "listen", O_STR, "HOST:PORT: also serve it on TCP for remote guests "
        "(needs --tls)" },
      { "--tls", "tls", O_STR, "require|on|off: TLS of the TCP listener (off: plain, "
        "explicit only)" },
      { "--tls-psk", "tls-psk", O_STR, "FILE: PSK file (absolute, mode 600)" },
      { "--tls-certificates", "tls-certificates", O_STR, "DIR: X.509 server-cert.pem, "
        "server-key.pem (mode 600), ca-cert.pem" },
      { "--tls-verify-peer", "tls-verify-peer", O_BOOL, "X.509: require client "
        "certificates signed by ca-cert.pem" },
      { NULL } },
    "add a disk and start serving it", print_disk },
  { "disk", "list", "disk-list", NULL, false, NULL, { { NULL } },
    "list disks and their state", print_disks },
  { "disk", "remove", "disk-remove", "name", true, "NAME", { { NULL } },
    "stop serving a disk and forget it", print_removed },
  { "disk", "start", "disk-start", "name", true, "NAME", { { NULL } },
    "start a stopped or dead disk's nbdkit", print_disk },
  { "disk", "repair", "disk-repair", "name", true, "NAME",
    { { "--reset-bitmaps", "reset-bitmaps", O_BOOL, "new bitmaps, all dirty (after a lost or "
        "unreadable bitmap descriptor); the disk's checkpoints become unusable" },
      { NULL } },
    "recover a stopped disk's lost metadata explicitly", print_repair },
  { "disk", "stop", "disk-stop", "name", true, "NAME", { { NULL } },
    "stop a disk's nbdkit", NULL },
  { "disk", "snapshot", "disk-snapshot", "name", true, "NAME",
    { { "--label", "label", O_STR, "free text stored with the new overlay" }, { NULL } },
    "live snapshot: a new top overlay takes the writes from now on", print_snapshot },
  { "disk", "commit", "disk-commit", "name", true, "NAME",
    { { "--base", "base", O_STR, "LAYER: index or name (see disk chain) receiving the "
        "data; default: the layer below --top" },
      { "--top", "top", O_STR, "LAYER: highest layer merged; default: the active layer" },
      { "--keep", "keep", O_BOOL, "make-empty: keep the merged layers, emptied (the active "
        "one keeps taking writes); default: delete them" },
      { "--speed", "speed", O_SIZE, "limit in bytes/s (suffixes K, M, G; default none)" },
      { "--wait", "wait", O_BOOL, "follow the commit until it ends; exit 0 only if it "
        "completed (progress bar on a terminal)" },
      { NULL } },
    "live commit: merge layers base+1..top into base (default: the top overlay into "
    "the layer below)", print_commit },
  { "disk", "commit-cancel", "disk-commit-cancel", "name", true, "NAME", { { NULL } },
    "cancel a disk's running commit", NULL },
  { "disk", "chain", "disk-chain", "name", true, "NAME", { { NULL } },
    "list a disk's layers and its running or last commit", print_chain },
  { "checkpoint", "create", "checkpoint-create", "name", true, "NAME",
    { { "--disk", "disks", O_LIST, "a disk of the set (repeat; default all)" }, { NULL } },
    "create a checkpoint atomically across disks", print_created },
  { "checkpoint", "list", "checkpoint-list", NULL, false, NULL,
    { { "--disk", "disk", O_STR, "only checkpoints covering this disk" }, { NULL } },
    "list checkpoints, oldest first", print_cps },
  { "checkpoint", "delete", "checkpoint-delete", "name", true, "NAME", { { NULL } },
    "delete a checkpoint (its bitmap merges into its neighbour)", NULL },
  { "backup", "begin", "backup-begin", NULL, false, NULL,
    { { "--id", "id", O_STR, "backup id (default backup)" },
      { "--disk", "disks", O_LIST, "a disk of the set (repeat; default all)" },
      { "--full", "mode", O_FULL, "full backup (default)" },
      { "--incremental", "since", O_INCR, "CHECKPOINT: only blocks changed since it" },
      { "--mode", "mode", O_STR, "full | incremental | top | none (top: what each "
        "disk's top overlay holds)" },
      { "--readable", "readable", O_STR, "all | changed: incremental exports serve the "
        "whole disk (default, as libvirt) or only the changed blocks (cheaper)" },
      { "--checkpoint", "checkpoint", O_STR, "create this checkpoint at the point in time" },
      { "--freeze-hook", "freeze-hook", O_STR, "NAME of a hook configured in cbwd (--freeze-hook NAME=/PATH)" },
      { "--freeze-qga", "freeze-qga", O_STR, "qemu-guest-agent socket: fsfreeze through it" },
      { "--freeze-timeout", "freeze-timeout", O_UINT, "seconds (default 10)" },
      { "--freeze-required", "freeze-required", O_BOOL, "fail if the guest does not freeze" },
      { "--cbw-timeout", "cbw-timeout-ms", O_SECS, "SECS: longest wait of a guest write for "
        "this backup (default: the disk's, 5)" },
      { "--store-dir", "store-dir", O_DIR, "DIR: put the backup stores there (e.g. another "
        "filesystem; default the state directory)" },
      { "--store-limit", "store-limit", O_SIZE, "SIZE: most each disk's store may take; "
        "past it the backup breaks (default: half the free space)" },
      { NULL } },
    "begin a pull backup with one point in time", print_backup },
  { "backup", "end", "backup-end", NULL, false, NULL,
    { { "--id", "id", O_STR, "backup id (default: the running one)" }, { NULL } },
    "end the running backup", NULL },
  { "backup", "status", "backup-status", NULL, false, NULL, { { NULL } },
    "show the running backup", print_backup },
  { "job", "start", "job-start", NULL, false, NULL,
    { { "--target", "targets", O_TARGET, "DISK=TARGET or TARGET, repeat per disk: nbd URI, "
        "[raw:]PATH or [qcow2:]PATH.qcow2 (required)" },
      { "--backup", "backup", O_STR, "backup id (default: the running one)" },
      { "--disk", "disks", O_LIST, "a disk of the backup (repeat; default all)" },
      { "--id", "id", O_STR, "job id (default job-N)" },
      { "--speed", "speed", O_SIZE, "limit in bytes/s (suffixes K, M, G; default none)" },
      { "--request-size", "request-size", O_SIZE, "bytes per request (default 256K)" },
      { "--requests", "requests", O_UINT, "requests in flight (default: automatic, 8 or 16)" },
      { "--connect-timeout", "connect-timeout", O_UINT, "seconds for an NBD target's handshake (default 30)" },
      { NULL } },
    "push the running backup to targets (a job)", print_job },
  { "job", "list", "job-list", NULL, false, NULL, { { NULL } },
    "list push jobs", print_jobs },
  { "job", "status", "job-status", "id", true, "ID", { { NULL } },
    "show a job's progress", print_job },
  { "job", "wait", "job-status", "id", true, "ID", { { NULL } },
    "wait for a job (progress bar on a terminal); exit 0 only if it completed", print_job },
  { "job", "pause", "job-pause", "id", true, "ID", { { NULL } },
    "pause a job", NULL },
  { "job", "resume", "job-resume", "id", true, "ID", { { NULL } },
    "resume a paused job", NULL },
  { "job", "cancel", "job-cancel", "id", true, "ID", { { NULL } },
    "cancel a job (the target is left as is)", print_job },
  { "job", "set-speed", "job-set-speed", "id", true, "ID",
    { { "--speed", "speed", O_SIZE, "bytes/s, 0 = unlimited (required)" }, { NULL } },
    "change a job's speed limit", NULL },
  { "event", "list", "event-list", NULL, false, NULL,
    { { "--since", "since", O_UINT, "only events after this sequence number" }, { NULL } },
    "show recent events", print_events },
  { NULL }
};

static void
usage (FILE *fp)
{
  fprintf (fp, "usage: cbw [-c SOCKET] [--json] COMMAND [SUBCOMMAND] [ARGS]\n\n"
           "  -c, --connect SOCKET  cbwd control socket (default $CBW_SOCKET or %s)\n"
           "  --json                print cbwd's reply as JSON\n"
           "  -h, --help            this help; `cbw COMMAND --help` for one command\n"
           "  --version             print cbw's version\n\n"
           "commands:\n", DEFAULT_SOCKET);
  for (const struct sub *s = subs; s->group; s++) {
    char head[64];
    snprintf (head, sizeof head, "%s%s%s%s%s", s->group, s->verb ? " " : "",
              s->verb ? s->verb : "", s->pos_name ? " " : "", s->pos_name ? s->pos_name : "");
    fprintf (fp, "  %-28s %s\n", head, s->help);
  }
  fprintf (fp, "  %-28s %s\n", "events [--follow] [--json]", "print events; --follow: stream them");
  fprintf (fp, "  %-28s %s\n", "raw COMMAND [JSON]", "send any control command");
  fprintf (fp, "\nexit status: 0 ok, 1 command failed, 2 usage error, 3 cannot connect\n");
}

static void
sub_usage (FILE *fp, const struct sub *s)
{
  fprintf (fp, "usage: cbw %s%s%s%s%s [OPTIONS]\n  %s\n", s->group, s->verb ? " " : "",
           s->verb ? s->verb : "", s->pos_name ? " " : "", s->pos_name ? s->pos_name : "",
           s->help);
  for (const struct opt *o = s->opts; o->flag; o++)
    fprintf (fp, "  %-20s %s%s\n", o->flag,
             o->type == O_BOOL || o->type == O_FULL ? "" : "VALUE  ", o->help);
}

static int
usage_error (const char *fmt, const char *a, const char *b)
{
  fprintf (stderr, "cbw: ");
  fprintf (stderr, fmt, a, b);
  fprintf (stderr, "\n(try `cbw --help`)\n");
  return EXIT_USAGE;
}

static bool
parse_uint (const char *s, int64_t *out)
{
  char *end;
  errno = 0;
  if (s[0] < '0' || s[0] > '9')
    return false;
  unsigned long long v = strtoull (s, &end, 10);
  if (errno || *end || v > INT64_MAX)
    return false;
  *out = (int64_t) v;
  return true;
}

/* "10M" -> 10485760 (K, M, G, T: powers of 1024; an optional trailing B). */
/* A size in cbw's one grammar (common/units.h), at most INT64_MAX. */
static bool
parse_size (const char *s, int64_t *out)
{
  uint64_t v;
  if (cbw_parse_size (s, INT64_MAX, &v) < 0)
    return false;
  *out = (int64_t) v;
  return true;
}

/* "2.5" seconds -> 2500 ms; at least 1 ms, at most a day. */
static bool
parse_secs_ms (const char *s, int64_t *out)
{
  char *end;
  errno = 0;
  if ((s[0] < '0' || s[0] > '9') && s[0] != '.')
    return false;
  double v = strtod (s, &end);
  if (errno || *end || !(v * 1000 >= 1) || v > 86400)
    return false;
  *out = (int64_t) (v * 1000 + 0.5);
  return true;
}

/* A --target value with a relative file path gets the current directory
 * (cbwd runs elsewhere).  NBD URIs and absolute paths are kept. */
static char *
absolute_target (const char *val)
{
  const char *t = val;
  const char *eq = strchr (val, '=');
  if (eq && !strstr (val, "://")) {
    bool name = eq > val;
    for (const char *p = val; p < eq; p++)
      if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
            *p == '_' || *p == '.' || *p == '-'))
        name = false;
    if (name)
      t = eq + 1;
  }
  if (strncmp (t, "raw:", 4) == 0)
    t += 4;
  else if (strncmp (t, "qcow2:", 6) == 0)
    t += 6;
  if (strstr (t, "://") || t[0] == '/' || t[0] == '\0')
    return strdup (val);
  char cwd[4096];
  if (getcwd (cwd, sizeof cwd) == NULL)
    return strdup (val);
  size_t pre = (size_t) (t - val);
  size_t len = pre + strlen (cwd) + 1 + strlen (t) + 1;
  char *r = malloc (len);
  if (r)
    snprintf (r, len, "%.*s%s/%s", (int) pre, val, cwd, t);
  return r;
}

/* Add option o (given as flag, with value val or NULL) to the request's
 * arguments as its JSON type: 0, or EXIT_USAGE after the message. */
static int
add_option (const struct opt *o, const char *flag, const char *val,
            struct json_object *args)
{
  int64_t n;
  struct json_object *list;
  switch (o->type) {
  case O_STR:
    if (json_object_object_get_ex (args, o->key, NULL))
      return usage_error ("%s given twice (or conflicts with another option)%s", flag, "");
    json_object_object_add (args, o->key, json_object_new_string (val));
    break;
  case O_UINT:
    if (!parse_uint (val, &n))
      return usage_error ("%s: \"%s\" is not a non-negative integer", flag, val);
    json_object_object_add (args, o->key, json_object_new_int64 (n));
    break;
  case O_DIR: {
    char cwd[4096];
    if (json_object_object_get_ex (args, o->key, NULL))
      return usage_error ("%s given twice%s", flag, "");
    if (val[0] == '/' || getcwd (cwd, sizeof cwd) == NULL)
      json_object_object_add (args, o->key, json_object_new_string (val));
    else {
      size_t len = strlen (cwd) + strlen (val) + 2;
      char *abs = malloc (len);
      if (abs == NULL)
        return usage_error ("out of memory%s%s", "", "");
      snprintf (abs, len, "%s/%s", cwd, val);
      json_object_object_add (args, o->key, json_object_new_string (abs));
      free (abs);
    }
    break;
  }
  case O_SECS:
    if (!parse_secs_ms (val, &n))
      return usage_error ("%s: \"%s\" is not a number of seconds (0.001..86400)", flag, val);
    json_object_object_add (args, o->key, json_object_new_int64 (n));
    break;
  case O_SIZE:
    if (!parse_size (val, &n))
      return usage_error ("%s: \"%s\" is not a size (e.g. 1048576, 512K, 10M)", flag, val);
    json_object_object_add (args, o->key, json_object_new_int64 (n));
    break;
  case O_TARGET: {
    char *abs = absolute_target (val);
    if (abs == NULL)
      return usage_error ("out of memory%s%s", "", "");
    if (!json_object_object_get_ex (args, o->key, &list)) {
      list = json_object_new_array ();
      json_object_object_add (args, o->key, list);
    }
    json_object_array_add (list, json_object_new_string (abs));
    free (abs);
    break;
  }
  case O_BOOL:
    json_object_object_add (args, o->key, json_object_new_boolean (true));
    break;
  case O_LIST:
    if (!json_object_object_get_ex (args, o->key, &list)) {
      list = json_object_new_array ();
      json_object_object_add (args, o->key, list);
    }
    json_object_array_add (list, json_object_new_string (val));
    break;
  case O_FULL:
  case O_INCR:
    if (json_object_object_get_ex (args, "mode", NULL))
      return usage_error ("%s conflicts with another mode option%s", flag, "");
    json_object_object_add (args, "mode",
                            json_object_new_string (o->type == O_FULL ? "full"
                                                    : "incremental"));
    if (o->type == O_INCR)
      json_object_object_add (args, "since", json_object_new_string (val));
    break;
  }
  return 0;
}

/* Build the arguments of subcommand s from argv[i..]; EXIT_USAGE on error. */
static int
build_args (const struct sub *s, int argc, char **argv, int i, struct json_object *args)
{
  bool have_pos = false;
  for (; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp (a, "-h") == 0 || strcmp (a, "--help") == 0) {
      sub_usage (stdout, s);
      exit (0);
    }
    if (a[0] == '-' && a[1] == '-') {
      const struct opt *o;
      const char *val = NULL;
      char flag[64];
      const char *eq = strchr (a, '=');
      snprintf (flag, sizeof flag, "%.*s", eq ? (int) (eq - a) : (int) strlen (a), a);
      for (o = s->opts; o->flag; o++)
        if (strcmp (o->flag, flag) == 0)
          break;
      if (o->flag == NULL)
        return usage_error ("unknown option %s for `%s`", flag, s->command);
      if (o->type == O_BOOL || o->type == O_FULL) {
        if (eq)
          return usage_error ("option %s takes no value%s", flag, "");
      }
      else {
        if (eq)
          val = eq + 1;
        else if (i + 1 < argc)
          val = argv[++i];
        else
          return usage_error ("option %s needs a value%s", flag, "");
      }
      if (add_option (o, flag, val, args) != 0)
        return EXIT_USAGE;
    }
    else if (a[0] == '-' && a[1] != '\0')
      return usage_error ("unknown option %s for `%s`", a, s->command);
    else if (s->positional && !have_pos) {
      json_object_object_add (args, s->positional, json_object_new_string (a));
      have_pos = true;
    }
    else
      return usage_error ("unexpected argument \"%s\" for `%s`", a, s->command);
  }
  if (s->pos_required && !have_pos)
    return usage_error ("`%s` needs a %s", s->command, s->pos_name);
  /* Required options (the ones whose help says so). */
  for (const struct opt *o = s->opts; o->flag; o++)
    if (strstr (o->help, "(required)") && !json_object_object_get_ex (args, o->key, NULL))
      return usage_error ("`%s` needs %s", s->command, o->flag);
  return 0;
}

static int
run (const char *sock, const char *command, struct json_object *args, printer print)
{
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *c = cbw_ctl_client_connect (sock, &err);
  if (c == NULL) {
    json_object_put (args);
    fprintf (stderr, "cbw: cannot connect to cbwd: %s\n", err.msg);
    return EXIT_CONNECT;
  }
  struct json_object *reply = cbw_ctl_client_call (c, command, args, &err);
  cbw_ctl_client_close (c);
  if (reply == NULL) {
    fprintf (stderr, "cbw: connection to cbwd failed: %s\n", err.msg);
    return EXIT_CONNECT;
  }
  struct json_object *ret, *e;
  int rc;
  if (json_object_object_get_ex (reply, "return", &ret)) {
    if (json_out)
      printf ("%s\n", json_object_to_json_string_ext (ret, JSON_C_TO_STRING_PRETTY |
                                                      JSON_C_TO_STRING_SPACED | JSON_C_TO_STRING_NOSLASHESCAPE));
    else if (print)
      print (ret);
    rc = 0;
  }
  else if (json_object_object_get_ex (reply, "error", &e)) {
    if (json_out)
      printf ("%s\n", json_object_to_json_string_ext (reply, JSON_C_TO_STRING_PRETTY |
                                                      JSON_C_TO_STRING_SPACED | JSON_C_TO_STRING_NOSLASHESCAPE));
    fprintf (stderr, "cbw: error: %s: %s\n", jstr (e, "class", "?"), jstr (e, "desc", "?"));
    rc = EXIT_CMD;
  }
  else {
    fprintf (stderr, "cbw: malformed reply from cbwd\n");
    rc = EXIT_CONNECT;
  }
  json_object_put (reply);
  return rc;
}

/* ---- waiting for a long operation (`disk commit --wait`, `job wait`) ---- */

/* One kind of long operation, as poll_until_final() follows it. */
struct poll_ops {
  const char *command;          /* status command polled with the args */
  long interval_ms;
  /* The object holding state/progress in a reply's "return" (may be NULL). */
  struct json_object *(*progress) (struct json_object *ret);
  bool (*is_final) (const char *state);
  /* Progress line on a tty, without the leading "\r". */
  void (*draw) (struct json_object *args, struct json_object *ret,
                struct json_object *pr, const char *state, bool final, double secs);
  void (*print) (struct json_object *ret);              /* final, human */
  void (*failed) (struct json_object *args, struct json_object *ret,
                  struct json_object *pr, const char *state);   /* not completed */
};

/* The done fraction (a final state with no total counts as all done), and
 * 40 columns of '#' for it, '.' for the rest. */
static double
progress_bar (char bar[41], uint64_t done, uint64_t total, bool final)
{
  double frac = total ? (double) done / (double) total : (final ? 1.0 : 0.0);
  int fill = (int) (frac * 40);
  for (int i = 0; i < 40; i++)
    bar[i] = i < fill ? '#' : '.';
  bar[40] = '\0';
  return frac;
}

/* Poll ops->command until the operation's state is final; a progress line
 * on stderr when it is a terminal.  Returns 0 (completed), EXIT_CMD
 * (failed, cancelled, or an error reply) or EXIT_CONNECT.  Takes args. */
static int
poll_until_final (const char *sock, struct json_object *args,
                  const struct poll_ops *ops)
{
  struct cbw_err err = { 0 };
  bool tty = isatty (2), drawn = false;
  struct timespec t0;
  int rc = EXIT_CONNECT;
  struct cbw_ctl_client *c = cbw_ctl_client_connect (sock, &err);

  if (c == NULL) {
    json_object_put (args);
    fprintf (stderr, "cbw: cannot connect to cbwd: %s\n", err.msg);
    return EXIT_CONNECT;
  }
  clock_gettime (CLOCK_MONOTONIC, &t0);
  for (;;) {
    struct json_object *reply = cbw_ctl_client_call (c, ops->command, json_object_get (args),
                                                     &err);
    struct json_object *ret, *e, *pr;
    if (reply == NULL) {
      fprintf (stderr, "%scbw: connection to cbwd failed: %s\n", drawn ? "\n" : "", err.msg);
      break;
    }
    if (json_object_object_get_ex (reply, "error", &e)) {
      fprintf (stderr, "%scbw: error: %s: %s\n", drawn ? "\n" : "", jstr (e, "class", "?"),
               jstr (e, "desc", "?"));
      json_object_put (reply);
      rc = EXIT_CMD;
      break;
    }
    if (!json_object_object_get_ex (reply, "return", &ret)) {
      fprintf (stderr, "cbw: malformed reply from cbwd\n");
      json_object_put (reply);
      break;
    }
    pr = ops->progress (ret);
    const char *state = pr ? jstr (pr, "state", "?") : "none";
    bool final = ops->is_final (state);
    if (tty) {
      struct timespec t1;
      clock_gettime (CLOCK_MONOTONIC, &t1);
      fputc ('\r', stderr);
      ops->draw (args, ret, pr, state, final, (double) (t1.tv_sec - t0.tv_sec) +
                 (double) (t1.tv_nsec - t0.tv_nsec) / 1e9);
      drawn = true;
    }
    if (final) {
      if (drawn)
        fprintf (stderr, "\n");
      if (json_out)
        printf ("%s\n", json_object_to_json_string_ext (ret, JSON_C_TO_STRING_PRETTY |
                                                        JSON_C_TO_STRING_SPACED |
                                                        JSON_C_TO_STRING_NOSLASHESCAPE));
      else
        ops->print (ret);
      rc = strcmp (state, "completed") == 0 ? 0 : EXIT_CMD;
      if (rc != 0)
        ops->failed (args, ret, pr, state);
      json_object_put (reply);
      break;
    }
    json_object_put (reply);
    struct timespec ts = { 0, ops->interval_ms * 1000000 };
    nanosleep (&ts, NULL);
  }
  cbw_ctl_client_close (c);
  json_object_put (args);
  return rc;
}

/* `cbw disk commit NAME --wait`: disk-chain's "operation". */
static struct json_object *
commit_progress (struct json_object *ret)
{
  return jget (ret, "operation");
}

static bool
commit_is_final (const char *state)
{
  return strcmp (state, "running") != 0;
}

static void
commit_draw (struct json_object *args, struct json_object *ret, struct json_object *op,
             const char *state, bool final, double secs)
{
  uint64_t done = (uint64_t) jint (op, "done"), total = (uint64_t) jint (op, "total");
  char bar[41];
  (void) args; (void) secs;
  double frac = progress_bar (bar, done, total, final);
  fprintf (stderr, "commit %s [%s] %5.1f%% %-9s", jstr (ret, "disk", "?"), bar,
           frac * 100, state);
}

static void
commit_failed (struct json_object *args, struct json_object *ret, struct json_object *op,
               const char *state)
{
  (void) args;
  fprintf (stderr, "cbw: commit of disk %s %s%s%s\n", jstr (ret, "disk", "?"), state,
           jstr (op, "error", NULL) ? ": " : "", jstr (op, "error", ""));
}

static const struct poll_ops commit_ops = {
  .command = "disk-chain", .interval_ms = 200, .progress = commit_progress,
  .is_final = commit_is_final, .draw = commit_draw, .print = print_chain,
  .failed = commit_failed,
};

/* Start the commit, then poll disk-chain until its operation ends.  0
 * completed, 1 failed/cancelled/refused. */
static int
commit_wait (const char *sock, struct json_object *args)
{
  struct json_object *name_args = json_object_new_object ();
  json_object_object_add (name_args, "name", json_object_new_string (jstr (args, "name", "")));
  bool jo = json_out;
  json_out = false;             /* one JSON document: the final chain */
  int rc = run (sock, "disk-commit", args, jo ? NULL : print_commit);
  json_out = jo;
  if (rc != 0) {
    json_object_put (name_args);
    return rc;
  }
  return poll_until_final (sock, name_args, &commit_ops);
}

/* `cbw job wait ID`: job-status itself. */
static struct json_object *
job_progress (struct json_object *ret)
{
  return ret;
}

static bool
job_is_final (const char *state)
{
  return strcmp (state, "running") && strcmp (state, "paused");
}

static void
job_draw (struct json_object *args, struct json_object *ret, struct json_object *pr,
          const char *state, bool final, double secs)
{
  uint64_t done = (uint64_t) jint (ret, "bytes-done"), total = (uint64_t) jint (ret, "bytes-total");
  char bar[41], d[32], tt[32], rate[32];
  (void) pr;
  double frac = progress_bar (bar, done, total, final);
  human_size (done, d, sizeof d);
  human_size (total, tt, sizeof tt);
  human_size (secs > 0.5 ? (uint64_t) ((double) jint (ret, "data-bytes") / secs) : 0,
              rate, sizeof rate);
  fprintf (stderr, "%s [%s] %5.1f%% %s / %s %s/s %-9s", jstr (args, "id", ""), bar,
           frac * 100, d, tt, rate, state);
}

static void
job_failed (struct json_object *args, struct json_object *ret, struct json_object *pr,
            const char *state)
{
  (void) pr;
  fprintf (stderr, "cbw: job %s %s%s%s\n", jstr (args, "id", ""), state,
           jstr (ret, "error", NULL) ? ": " : "", jstr (ret, "error", ""));
}

static const struct poll_ops job_ops = {
  .command = "job-status", .interval_ms = 250, .progress = job_progress,
  .is_final = job_is_final, .draw = job_draw, .print = print_job, .failed = job_failed,
};

/* Poll job-status until the job ends.  0 completed, 1 failed/cancelled. */
static int
job_wait (const char *sock, struct json_object *args)
{
  return poll_until_final (sock, args, &job_ops);
}

/* ---- `cbw events`: the event ring, and with --follow the live stream ---- */

/* One event, human-readable or as its JSON line. */
static void
print_event_line (const char *line)
{
  struct json_object *e = json_tokener_parse (line);
  if (json_out || e == NULL) {
    printf ("%s\n", line);
    json_object_put (e);
    return;
  }
  struct json_object *ts = jget (e, "timestamp");
  time_t t = ts ? (time_t) jint (ts, "seconds") : (time_t) jint (e, "time");
  long us = ts ? (long) jint (ts, "microseconds") : 0;
  char when[32];
  struct tm tm;
  gmtime_r (&t, &tm);
  strftime (when, sizeof when, "%H:%M:%S", &tm);
  printf ("%6" PRId64 " %s.%03ld %-20s %s\n", jint (e, "seq"), when, us / 1000,
          jstr (e, "event", "?"),
          json_object_to_json_string_ext (jget (e, "data"), JSON_C_TO_STRING_PLAIN |
                                          JSON_C_TO_STRING_NOSLASHESCAPE));
  json_object_put (e);
}

static void
on_stop_signal (int sig)
{
  (void) sig;
  _exit (0);                    /* stdout is line-buffered: nothing is lost */
}

static void
events_usage (FILE *fp)
{
  fprintf (fp, "usage: cbw events [--follow] [--json] [--since SEQ]\n"
           "  print cbwd's recent events (the last 256 are kept), oldest first\n"
           "  -f, --follow   then keep printing events as they happen, until interrupted\n"
           "  --json         one JSON object per line, as cbwd sends them\n"
           "  --since SEQ    only events with a sequence number above SEQ\n"
           "exit status: 0 ok (also when interrupted with --follow), 1 cbwd refused,\n"
           "2 usage error, 3 cannot connect or the connection was lost\n");
}

/* `cbw events`: without --follow the ring (event-list); with --follow one
 * "subscribe" with since, which replays the ring and then streams, so
 * nothing falls between the two.  The connection ends only when cbwd goes
 * away or drops a reader that does not keep up: exit 3. */
static int
events_cmd (const char *sock, int argc, char **argv, int i)
{
  bool follow = false;
  int64_t since = 0;
  for (; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp (a, "-f") == 0 || strcmp (a, "--follow") == 0)
      follow = true;
    else if (strcmp (a, "--json") == 0)
      json_out = true;
    else if (strcmp (a, "--since") == 0 || strncmp (a, "--since=", 8) == 0) {
      const char *v = a[7] == '=' ? a + 8 : (i + 1 < argc ? argv[++i] : NULL);
      if (v == NULL || !parse_uint (v, &since))
        return usage_error ("--since needs a sequence number%s%s", "", "");
    }
    else if (strcmp (a, "-h") == 0 || strcmp (a, "--help") == 0) {
      events_usage (stdout);
      return 0;
    }
    else
      return usage_error ("unexpected argument \"%s\" for `events`%s", a, "");
  }
  setvbuf (stdout, NULL, _IOLBF, 0);
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *c = cbw_ctl_client_connect (sock, &err);
  if (c == NULL) {
    fprintf (stderr, "cbw: cannot connect to cbwd: %s\n", err.msg);
    return EXIT_CONNECT;
  }
  struct json_object *args = json_object_new_object (), *ret = NULL;
  json_object_object_add (args, "since", json_object_new_int64 (since));
  int cls, rc = 0;
  if (cbw_ctl_client_execute (c, follow ? "subscribe" : "event-list", args, &ret, &cls,
                              &err) < 0) {
    fprintf (stderr, "cbw: %s%s\n", cls < 0 ? "connection to cbwd failed: " : "error: ",
             err.msg);
    cbw_ctl_client_close (c);
    return cls < 0 ? EXIT_CONNECT : EXIT_CMD;
  }
  if (json_object_get_boolean (jget (ret, "lost")))
    fprintf (stderr, "cbw: older events were dropped (cbwd keeps the last 256)\n");
  if (!follow) {
    struct json_object *a = jget (ret, "events");
    for (size_t k = 0; a && k < json_object_array_length (a); k++) {
      struct json_object *e = json_object_array_get_idx (a, k);
      if (jget (e, "timestamp"))
        json_object_object_del (e, "time");   /* as pushed: one shape */
      print_event_line (json_object_to_json_string_ext (e, JSON_C_TO_STRING_PLAIN |
                                                        JSON_C_TO_STRING_NOSLASHESCAPE));
    }
    json_object_put (ret);
    cbw_ctl_client_close (c);
    return 0;
  }
  json_object_put (ret);
  signal (SIGINT, on_stop_signal);
  signal (SIGTERM, on_stop_signal);
  signal (SIGPIPE, on_stop_signal);       /* the reader of our output went away */
  for (;;) {
    char *line = cbw_ctl_client_read_event (c, -1, &err);
    if (line == NULL) {
      fprintf (stderr, "cbw: event stream ended: %s\n", err.msg);
      rc = EXIT_CONNECT;
      break;
    }
    print_event_line (line);
    free (line);
  }
  cbw_ctl_client_close (c);
  return rc;
}

/* ---- shell completion (the bash script cbw-completion.bash calls
 * `cbw --complete WORD...` with the words before the cursor and filters the
 * candidates printed here, one a line).  Subcommands and options come from
 * subs[], names from the running daemon; "@files" asks for file names. ---- */

static void
print_names (const char *sock, const char *command, const char *array, const char *key)
{
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *c = cbw_ctl_client_connect (sock, &err);
  struct json_object *ret = NULL;
  int cls;
  if (c == NULL)
    return;                     /* no daemon: no names, never an error */
  if (cbw_ctl_client_execute (c, command, NULL, &ret, &cls, &err) == 0) {
    struct json_object *a = array ? jget (ret, array) : NULL;
    if (array == NULL)
      printf ("%s\n", jstr (ret, key, ""));
    for (size_t k = 0; a && k < json_object_array_length (a); k++)
      printf ("%s\n", jstr (json_object_array_get_idx (a, k), key, ""));
  }
  json_object_put (ret);
  cbw_ctl_client_close (c);
}

/* Existing names of a kind: "disk", "checkpoint", "backup" or "job". */
static void
complete_names (const char *sock, const char *kind)
{
  if (strcmp (kind, "disk") == 0)
    print_names (sock, "disk-list", "disks", "name");
  else if (strcmp (kind, "checkpoint") == 0)
    print_names (sock, "checkpoint-list", "checkpoints", "name");
  else if (strcmp (kind, "backup") == 0)
    print_names (sock, "backup-status", NULL, "id");
  else if (strcmp (kind, "job") == 0)
    print_names (sock, "job-list", "jobs", "id");
}

/* The kind of name an option's value is, or "@files", or NULL (free text). */
static const char *
opt_value_kind (const struct sub *s, const struct opt *o)
{
  if (strcmp (o->flag, "--disk") == 0)
    return "disk";
  if (o->type == O_INCR)
    return "checkpoint";
  if (strcmp (o->flag, "--backup") == 0 ||
      (strcmp (o->flag, "--id") == 0 && strcmp (s->group, "backup") == 0 &&
       strcmp (s->verb, "begin") != 0))
    return "backup";
  if (strcmp (o->key, "file") == 0 || strcmp (o->key, "chain") == 0 ||
      strncmp (o->key, "freeze-", 7) == 0 || o->type == O_TARGET || o->type == O_DIR)
    return "@files";
  return NULL;
}

static int
complete (const char *sock, int n, char **w)
{
  int i = 0;
  for (; i < n && w[i][0] == '-'; i++)
    if ((strcmp (w[i], "-c") == 0 || strcmp (w[i], "--connect") == 0) && i + 1 < n)
      sock = w[++i];
  if (i == n || (i == n - 1 && (strcmp (w[i], "-c") == 0 || strcmp (w[i], "--connect") == 0))) {
    if (i < n) {                /* the socket itself */
      printf ("@files\n");
      return 0;
    }
    const char *prev = NULL;
    for (const struct sub *t = subs; t->group; t++)
      if (prev == NULL || strcmp (prev, t->group) != 0)
        printf ("%s\n", prev = t->group);
    printf ("events\nraw\nhelp\n-c\n--connect\n--json\n--help\n--version\n");
    return 0;
  }
  const char *group = w[i++];
  const struct sub *s = NULL;
  for (const struct sub *t = subs; t->group; t++) {
    if (strcmp (t->group, group) != 0)
      continue;
    if (t->verb == NULL) {
      s = t;
      break;
    }
    if (i == n) {               /* the verb */
      printf ("%s\n", t->verb);
      continue;
    }
    if (strcmp (t->verb, w[i]) == 0) {
      s = t;
      i++;
      break;
    }
  }
  if (s == NULL) {
    if (strcmp (group, "events") == 0 && i == n)
      printf ("--follow\n--json\n");
    return 0;
  }
  bool pos_given = false;
  for (; i < n; i++) {
    const struct opt *o = NULL;
    for (const struct opt *p = s->opts; p->flag; p++)
      if (strcmp (p->flag, w[i]) == 0)
        o = p;
    if (o && o->type != O_BOOL && o->type != O_FULL) {
      if (i == n - 1) {         /* the cursor is on this option's value */
        const char *kind = opt_value_kind (s, o);
        if (kind && kind[0] == '@')
          printf ("%s\n", kind);
        else if (kind)
          complete_names (sock, kind);
        return 0;
      }
      i++;
    }
    else if (o == NULL && w[i][0] != '-')
      pos_given = true;
  }
  for (const struct opt *p = s->opts; p->flag; p++)
    printf ("%s\n", p->flag);
  printf ("--help\n");
  /* A new name (disk add, checkpoint create) has nothing to complete. */
  if (s->positional && !pos_given && !strstr (s->command, "-add") &&
      !strstr (s->command, "-create"))
    complete_names (sock, s->group);
  return 0;
}

/* The options before the command (--json, --connect, --help, --version,
 * --complete).  -1 to go on with argv[*ip] (*sockp set), else the exit
 * status. */
static int
global_options (int argc, char **argv, int *ip, const char **sockp)
{
  int i = *ip;
  for (; i < argc && argv[i][0] == '-'; i++) {
    if (strcmp (argv[i], "--json") == 0)
      json_out = true;
    else if (strcmp (argv[i], "-c") == 0 || strcmp (argv[i], "--connect") == 0) {
      if (++i >= argc)
        return usage_error ("%s needs a socket path%s", argv[i - 1], "");
      *sockp = argv[i];
    }
    else if (strncmp (argv[i], "--connect=", 10) == 0)
      *sockp = argv[i] + 10;
    else if (strcmp (argv[i], "-h") == 0 || strcmp (argv[i], "--help") == 0) {
      usage (stdout);
      return 0;
    }
    else if (strcmp (argv[i], "--version") == 0) {
      printf ("cbw %s\n", CBW_VERSION);
      return 0;
    }
    else if (strcmp (argv[i], "--complete") == 0)
      return complete (*sockp && (*sockp)[0] ? *sockp : DEFAULT_SOCKET, argc - i - 1,
                       argv + i + 1);
    else
      return usage_error ("unknown option %s%s", argv[i], "");
  }
  if (*sockp == NULL || (*sockp)[0] == '\0')
    *sockp = DEFAULT_SOCKET;
  *ip = i;
  return -1;
}

/* `cbw raw COMMAND [JSON-ARGUMENTS]`: any control command, JSON out. */
static int
raw_cmd (const char *sock, int argc, char **argv, int i)
{
  if (i >= argc || i + 2 < argc)
    return usage_error ("usage: cbw raw COMMAND [JSON-ARGUMENTS]%s%s", "", "");
  struct json_object *args = NULL;
  if (i + 1 < argc) {
    args = json_tokener_parse (argv[i + 1]);
    if (args == NULL || !json_object_is_type (args, json_type_object)) {
      json_object_put (args);
      return usage_error ("raw: arguments must be a JSON object: %s%s", argv[i + 1], "");
    }
  }
  json_out = true;
  return run (sock, argv[i], args, NULL);
}

/* A group given without a verb it knows: its help, or a usage error that
 * lists its verbs (from subs[]). */
static int
missing_verb (const char *group, int argc, char **argv, int i)
{
  if (i < argc && (strcmp (argv[i], "--help") == 0 || strcmp (argv[i], "-h") == 0)) {
    for (const struct sub *t = subs; t->group; t++)
      if (strcmp (t->group, group) == 0)
        sub_usage (stdout, t);
    return 0;
  }
  char verbs[512] = "";
  size_t n = 0;
  for (const struct sub *t = subs; t->group && n < sizeof verbs; t++)
    if (strcmp (t->group, group) == 0 && t->verb)
      n += (size_t) snprintf (verbs + n, sizeof verbs - n, "%s%s", n ? ", " : "", t->verb);
  return usage_error ("`%s` needs a subcommand (%s)", group, verbs);
}

/* The row of subs[] for GROUP [VERB] at argv[*ip] (advanced past the
 * verb); NULL with *group_known telling an unknown group from a missing
 * or unknown verb. */
static const struct sub *
find_sub (const char *group, int argc, char **argv, int *ip, bool *group_known)
{
  *group_known = false;
  for (const struct sub *t = subs; t->group; t++) {
    if (strcmp (t->group, group) != 0)
      continue;
    *group_known = true;
    if (t->verb == NULL)
      return t;
    if (*ip < argc && strcmp (t->verb, argv[*ip]) == 0) {
      (*ip)++;
      return t;
    }
  }
  return NULL;
}

/* Send subcommand s with the rest of argv as its arguments. */
static int
sub_cmd (const char *sock, const struct sub *s, int argc, char **argv, int i)
{
  struct json_object *args = json_object_new_object ();
  int r = build_args (s, argc, argv, i, args);
  if (r != 0) {
    json_object_put (args);
    return r;
  }
  if (strcmp (s->group, "job") == 0 && strcmp (s->verb, "wait") == 0)
    return job_wait (sock, args);
  if (strcmp (s->command, "disk-commit") == 0 && json_object_object_get_ex (args, "wait", NULL)) {
    json_object_object_del (args, "wait");      /* the CLI's own option */
    return commit_wait (sock, args);
  }
  return run (sock, s->command, args, s->print);
}

int
main (int argc, char **argv)
{
  const char *sock = getenv ("CBW_SOCKET");
  int i = 1;
  int r = global_options (argc, argv, &i, &sock);
  if (r >= 0)
    return r;
  if (i >= argc) {
    usage (stderr);
    return EXIT_USAGE;
  }
  const char *group = argv[i++];
  if (strcmp (group, "help") == 0) {
    usage (stdout);
    return 0;
  }
  if (strcmp (group, "raw") == 0)
    return raw_cmd (sock, argc, argv, i);
  if (strcmp (group, "events") == 0) {
    if (i < argc && strcmp (argv[i], "list") == 0)
      group = "event";          /* `cbw events list` as before */
    else
      return events_cmd (sock, argc, argv, i);
  }
  bool group_known;
  const struct sub *s = find_sub (group, argc, argv, &i, &group_known);
  if (!group_known)
    return usage_error ("unknown command \"%s\"%s", group, "");
  if (s == NULL)
    return missing_verb (group, argc, argv, i);
  return sub_cmd (sock, s, argc, argv, i);
}
