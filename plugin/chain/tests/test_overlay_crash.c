/* cbw — plugin/chain/tests/test_overlay_crash.c: kill -9 at random points
 * of snapshots and commits, then reopen: the disk must hold exactly the last
 * acknowledged (flushed) content, the interrupted operation must be undone
 * or finished, and the chain must keep working (a full commit into the base
 * gives the same bytes).
 *
 * A forked child runs a seeded script of guest writes (+flush), snapshots and
 * commits (with guest writes during the commit) and reports over a pipe each
 * write before it starts and after its flush returned.  The engine's test
 * hook counts the crash points reached inside operations and SIGKILLs the
 * child at the K-th one; K is drawn at random from the count of a dry run.
 * CBW_CRASH_POINTS=N overrides the number of crash points (default 20).
 * Half of the scripts run commits with small copy windows and 3 copy
 * threads (ovc_set_commit_tuning), half with the production defaults.
 * Locking: the hook counter is atomic (commit thread + main thread). */
#include <signal.h>
#include <stdatomic.h>
#include <sys/wait.h>

#include "chain_test_util.h"

#define SIZE (2 * 1024 * 1024 + 4096 * 3)
#define CS 4096
#define STEPS 30

enum { R_ABOUT = 1, R_ACKED = 2, R_END = 3, R_POINT = 4 };
struct rec {
  uint32_t type, zero;
  uint64_t off, len, dseed;
  char point[32];
};

static atomic_long hook_count;
static long kill_at;              /* 0 = never */
static atomic_int in_op;
static int rec_fd;

static void
send_rec (const struct rec *r)
{
  if (write (rec_fd, r, sizeof *r) != (ssize_t) sizeof *r)
    _exit (3);
}

static char mirror_dir[300];     /* power-loss mode: durable copies go here */

/* Copy PATH into mirror_dir crash-atomically (tmp + rename). */
static void
mirror_file (const char *path)
{
  char *buf;
  size_t len;
  struct cbw_err err;
  char tmp[700], dst[700];
  const char *b = strrchr (path, '/');
  b = b ? b + 1 : path;
  if (cbw_read_file (path, 1 << 26, &buf, &len, &err) < 0)
    _exit (10);
  snprintf (tmp, sizeof tmp, "%s/.tmp.%ld", mirror_dir, (long) gettid ());
  snprintf (dst, sizeof dst, "%s/%s", mirror_dir, b);
  int fd = open (tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || cbw_pwrite_full (fd, buf, len, 0) < 0 || close (fd) < 0 ||
      rename (tmp, dst) < 0)
    _exit (11);
  free (buf);
}

static int
crash_hook (const char *point, const char *path, void *opaque)
{
  (void) opaque;
  if (path) {
    if (mirror_dir[0] && strcmp (point, "durable") == 0)
      mirror_file (path);
    return 0;
  }
  if (!atomic_load (&in_op))
    return 0;
  long n = atomic_fetch_add (&hook_count, 1) + 1;
  if (kill_at && n == kill_at) {
    struct rec r = { .type = R_POINT };
    snprintf (r.point, sizeof r.point, "%s", point);
    send_rec (&r);
    raise (SIGKILL);
  }
  return 0;
}

static void
guest_op (struct ovc *c, uint64_t *rs)
{
  struct cbw_err err;
  struct rec r = { .type = R_ABOUT };
  r.off = tu_rand (rs) % SIZE;
  r.len = 1 + tu_rand (rs) % (3 * CS + 100);
  if (r.len > SIZE - r.off) r.len = SIZE - r.off;
  r.zero = tu_rand (rs) % 5 == 0;
  r.dseed = tu_rand (rs);
  send_rec (&r);
  if (r.zero) {
    if (ovc_zero (c, (uint32_t) r.len, r.off, false, &err) < 0) _exit (4);
  } else {
    unsigned char *buf = malloc (r.len);
    tu_fill (buf, r.len, r.dseed);
    if (ovc_pwrite (c, buf, (uint32_t) r.len, r.off, false, &err) < 0) _exit (4);
    free (buf);
  }
  if (ovc_flush (c, &err) < 0) _exit (5);
  r.type = R_ACKED;
  send_rec (&r);
}

static void
child (const char *chain, uint64_t seed)
{
  struct cbw_err err;
  uint64_t rs = seed;
  struct ovc *c = ovc_open (chain, NULL, NULL, &err);
  if (c == NULL) {
    fprintf (stderr, "child open: %s\n", err.msg);
    _exit (2);
  }
  ovc_set_test_hook (crash_hook, NULL);
  unsigned n = ovc_nlayers (c);
  for (int step = 0; step < STEPS; step++) {
    uint64_t r = tu_rand (&rs) % 10;
    if (r < 3 || (r >= 6 && n == 0)) {
      guest_op (c, &rs);
    } else if (r < 6) {
      if (n >= 8) { guest_op (c, &rs); continue; }
      atomic_store (&in_op, 1);
      if (ovc_snapshot (c, "crash", NULL, &err) < 0) _exit (6);
      atomic_store (&in_op, 0);
      n++;
    } else {
      unsigned hi = 1 + (unsigned) (tu_rand (&rs) % n);
      unsigned lo = 1 + (unsigned) (tu_rand (&rs) % hi);
      enum cbw_commit_mode m = tu_rand (&rs) % 2 ? CBW_COMMIT_DELETE : CBW_COMMIT_MAKE_EMPTY;
      atomic_store (&in_op, 1);
      if (ovc_commit_start (c, lo, hi, m, 0, &err) < 0) _exit (7);
      int w = (int) (tu_rand (&rs) % 3);
      for (int i = 0; i < w; i++)
        guest_op (c, &rs);
      if (ovc_commit_wait (c, &err) < 0) _exit (8);
      atomic_store (&in_op, 0);
      if (m == CBW_COMMIT_DELETE) n -= hi - lo + 1;
    }
  }
  struct rec e = { .type = R_END, .off = (uint64_t) atomic_load (&hook_count) };
  send_rec (&e);
  ovc_close (c);
  _exit (0);
}

struct outcome {
  bool ended;
  long points;            /* R_END: points counted */
  char point[32];         /* where it was killed */
  bool pending;
  struct rec pend;
};

/* Run the child; apply acknowledged writes to model. */
static void
run_child (const char *chain, uint64_t seed, long k, unsigned char *model,
           struct outcome *o)
{
  int pfd[2];
  memset (o, 0, sizeof *o);
  cr_assert_eq (pipe (pfd), 0);
  pid_t pid = fork ();
  cr_assert_geq (pid, 0);
  if (pid == 0) {
    close (pfd[0]);
    rec_fd = pfd[1];
    kill_at = k;
    child (chain, seed);
  }
  close (pfd[1]);
  struct rec r;
  ssize_t got;
  while ((got = read (pfd[0], &r, sizeof r)) == (ssize_t) sizeof r) {
    switch (r.type) {
    case R_ABOUT: o->pending = true; o->pend = r; break;
    case R_ACKED:
      if (r.zero) memset (model + r.off, 0, r.len);
      else tu_fill (model + r.off, r.len, r.dseed);
      o->pending = false;
      break;
    case R_END: o->ended = true; o->points = (long) r.off; break;
    case R_POINT: snprintf (o->point, sizeof o->point, "%s", r.point); break;
    }
  }
  close (pfd[0]);
  int st;
  cr_assert_eq (waitpid (pid, &st, 0), pid);
  if (o->ended)
    cr_assert (WIFEXITED (st) && WEXITSTATUS (st) == 0, "child failed: status %d", st);
  else
    cr_assert (WIFSIGNALED (st) && WTERMSIG (st) == SIGKILL,
               "child died without being killed: status 0x%x", st);
}

/* After a crash: every byte equals the acknowledged model, except inside the
 * one unacknowledged write, where it may also equal the new data. */
static void
check_after_crash (struct ovc *c, unsigned char *model, const struct outcome *o,
                   const char *what)
{
  struct cbw_err err;
  unsigned char *buf = malloc (SIZE), *newd = NULL;
  cr_assert_eq (ovc_pread (c, buf, SIZE, 0, &err), 0, "%s", err.msg);
  if (o->pending) {
    newd = malloc (o->pend.len);
    if (o->pend.zero) memset (newd, 0, o->pend.len);
    else tu_fill (newd, o->pend.len, o->pend.dseed);
  }
  for (uint64_t i = 0; i < SIZE; i++) {
    if (buf[i] == model[i]) continue;
    bool in_pend = o->pending && i >= o->pend.off && i < o->pend.off + o->pend.len;
    cr_assert (in_pend && buf[i] == newd[i - o->pend.off],
               "%s: byte %lu is 0x%02x, last acknowledged content is 0x%02x",
               what, (unsigned long) i, buf[i], model[i]);
  }
  memcpy (model, buf, SIZE);   /* the unacknowledged write settled either way */
  free (buf);
  free (newd);
}

static void
crash_points (bool powerloss)
{
  const char *env = getenv ("CBW_CRASH_POINTS");
  int npoints = env ? atoi (env) : 20;
  int crashed = 0, attempts = 0;
  uint64_t krs = 4242;
  char hist[2048] = "";
  struct cbw_err err;

  for (int p = 0; crashed < npoints; p++) {
    char dir[256], chain[512], what[128], base[600];
    unsigned char *model;
    struct outcome o;
    uint64_t seed = 500 + (uint64_t) p;
    cr_assert (++attempts < npoints * 3, "could not reach %d crash points", npoints);
    /* Every other script copies commits in windows of 3 clusters with 3
     * threads (many windows in flight, kills between and inside windows);
     * the others use the production defaults (one window holding the whole
     * disk: kills between the segments of a big window). */
    if (p % 2)
      ovc_set_commit_tuning (3 * CS, 3, p % 4 == 1 ? 0 : OVC_TUNE_NO_COPY_FILE_RANGE);
    else
      ovc_set_commit_tuning (0, 0, 0);

    /* Dry run on a scratch copy to count the crash points of this script. */
    tu_mkdtemp (dir, sizeof dir);
    tu_mkdisk (dir, SIZE, CS, seed, &model, chain, sizeof chain);
    run_child (chain, seed, 0, model, &o);
    cr_assert (o.ended && o.points > 0);
    long total = o.points;
    free (model);
    tu_rmrf (dir);

    /* The real run, killed at a random point. */
    tu_mkdtemp (dir, sizeof dir);
    tu_mkdisk (dir, SIZE, CS, seed, &model, chain, sizeof chain);
    if (powerloss) {
      /* The mirror starts as the durable initial state. */
      char cmd[1400];
      snprintf (mirror_dir, sizeof mirror_dir, "%s/mirror", dir);
      snprintf (cmd, sizeof cmd, "mkdir '%s' && cp '%s/base.img' '%s/disk.chain' '%s/'",
                mirror_dir, dir, dir, mirror_dir);
      cr_assert_eq (system (cmd), 0);
    }
    long k = 1 + (long) (tu_rand (&krs) % (uint64_t) total);
    run_child (chain, seed, k, model, &o);
    if (powerloss) {
      /* Power cut: only what was durable survives. */
      snprintf (chain, sizeof chain, "%s/disk.chain", mirror_dir);
      snprintf (dir + strlen (dir), sizeof dir - strlen (dir), "/mirror");
      mirror_dir[0] = 0;
    }
    if (!o.ended) {
      crashed++;
      char *recovered = NULL;
      struct ovc *c = ovc_open (chain, NULL, &recovered, &err);
      cr_assert_not_null (c, "reopen after kill at %s: %s", o.point, err.msg);
      snprintf (what, sizeof what, "seed %lu killed at point %ld/%ld (%s)%s%s",
                (unsigned long) seed, k, total, o.point, recovered ? ": " : "",
                recovered ? recovered : "");
      cr_log_info ("%s", what);
      size_t hl = strlen (hist);
      snprintf (hist + hl, sizeof hist - hl, " %s", o.point);
      free (recovered);
      check_after_crash (c, model, &o, what);
      /* The chain keeps working: write, snapshot, full commit into the base. */
      unsigned char wb[10000];
      tu_fill (wb, sizeof wb, seed);
      cr_assert_eq (ovc_pwrite (c, wb, sizeof wb, 12345, true, &err), 0, "%s", err.msg);
      memcpy (model + 12345, wb, sizeof wb);
      cr_assert_eq (ovc_snapshot (c, NULL, NULL, &err), 0, "%s: %s", what, err.msg);
      cr_assert_eq (ovc_commit_start (c, 1, ovc_nlayers (c), CBW_COMMIT_DELETE, 0, &err), 0,
                    "%s: %s", what, err.msg);
      cr_assert_eq (ovc_commit_wait (c, &err), 0, "%s: %s", what, err.msg);
      cr_assert_eq (ovc_nlayers (c), 0);
      ovc_close (c);
      snprintf (base, sizeof base, "%s/base.img", dir);
      tu_file_equals (base, model, SIZE);
    }
    free (model);
    if (powerloss) *strrchr (dir, '/') = 0;
    tu_rmrf (dir);
  }
  ovc_set_commit_tuning (0, 0, 0);
  cr_log_info ("crash points:%s", hist);
  fprintf (stderr, "%s test: %d points:%s\n", powerloss ? "power-loss" : "kill -9",
           crashed, hist);
}

Test (crash, kill9_during_snapshot_and_commit, .timeout = 240)
{
  crash_points (false);
}

/* Same, but only what was durable (fdatasync'd data, atomically replaced
 * metadata) survives: the child mirrors files at the engine's durability
 * points, and the mirror is reopened. */
Test (crash, powerloss_during_snapshot_and_commit, .timeout = 240)
{
  crash_points (true);
}
