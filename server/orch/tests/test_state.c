/* cbw — server/orch/tests/test_state.c: the orchestrator's state file and
 * checkpoint arithmetic.
 *
 * - round trip of every field through orch_state_to_json/from_json;
 * - every corruption of the file is refused with a message naming the file
 *   and the problem (bad checksum, format, version, types, names,
 *   references, garbage, size);
 * - a model test of the checkpoint/bitmap scheme (plan.c): random writes and
 *   random checkpoint creates/deletes on random disk subsets, each disk's
 *   bitmaps kept as the dirtybitmap filter would (writes go to the latest
 *   checkpoint's bitmap of that disk; delete merges into the neighbour);
 *   the union given by orch_plan_since must equal the ground truth (every
 *   block written since that checkpoint was created), for every checkpoint
 *   and disk, after every step.
 * No locking: single-threaded tests.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "disk_id.h"
#include "orch_internal.h"

static void
make_state (struct orch_state *st)
{
  memset (st, 0, sizeof *st);
  st->generation = 7;
  st->ndisks = 2;
  st->disks = calloc (2, sizeof *st->disks);
  st->disks[0] = orch_disk_new ("/s", "vda", "/img/a.raw", 65536);
  st->disks[0]->pid = 1234;
  struct json_object *tcp = json_tokener_parse
    ("{\"listen\": \"[::1]:10810\", \"tls\": \"require\", "
     "\"tls-psk\": \"/k/keys.psk\", \"pid\": 4321}");
  struct cbw_err err = { 0 };
  cr_assert_eq (orch_disk_tcp_parse (tcp, true, &st->disks[0]->tcp, &err), 0, "%s", err.msg);
  json_object_put (tcp);
  st->disks[1] = orch_disk_new ("/s", "vdb", "/img/b.raw", 4096);
  st->ncps = 2;
  st->cps = calloc (2, sizeof *st->cps);
  strcpy (st->cps[0].name, "c1");
  st->cps[0].created = 1000;
  st->cps[0].ndisks = 2;
  st->cps[0].disks = calloc (2, sizeof (char *));
  st->cps[0].disks[0] = strdup ("vda");
  st->cps[0].disks[1] = strdup ("vdb");
  strcpy (st->cps[1].name, "c2");
  st->cps[1].created = 2000;
  st->cps[1].ndisks = 1;
  st->cps[1].disks = calloc (1, sizeof (char *));
  st->cps[1].disks[0] = strdup ("vdb");
  st->backup = calloc (1, sizeof *st->backup);
  strcpy (st->backup->id, "nightly");
  st->backup->mode = ORCH_BACKUP_INCREMENTAL;
  st->backup->readable = ORCH_READABLE_ALL;
  strcpy (st->backup->since, "c1");
  strcpy (st->backup->checkpoint, "c2");
  st->backup->started = 3000;
  st->backup->ndisks = 1;
  st->backup->disks = calloc (1, sizeof *st->backup->disks);
  strcpy (st->backup->disks[0].name, "vdb");
  st->backup->disks[0].pit_uri = strdup ("nbd+unix:///pit?socket=/x");
  st->backup->disks[0].bitmap = strdup ("backup-vdb");
  st->backup->disks[0].store_path = strdup ("/s/backups/nightly/vdb.store");
  st->backup->disks[0].store_sock = strdup ("/s/backups/nightly/vdb.store.sock");
  st->backup->disks[0].store_pid = 99;
  strcpy (st->pending.op, "backup-end");
  strcpy (st->pending.name, "nightly");
}

static char *
to_text (const struct orch_state *st)
{
  struct json_object *j = orch_state_to_json (st);
  char *s = strdup (json_object_to_json_string_ext (j, JSON_C_TO_STRING_PRETTY));
  json_object_put (j);
  return s;
}

Test (state, round_trip)
{
  struct orch_state a, b;
  struct cbw_err err = { 0 };
  make_state (&a);
  char *text = to_text (&a);
  cr_assert_eq (orch_state_from_json (text, strlen (text), "t.json", &b, &err), 0,
                "%s", err.msg);
  cr_assert_eq (b.generation, 7);
  cr_assert_eq (b.ndisks, 2);
  cr_assert_str_eq (b.disks[0]->name, "vda");
  cr_assert_str_eq (b.disks[0]->file, "/img/a.raw");
  cr_assert_eq (b.disks[0]->pid, 1234);
  cr_assert_eq (b.disks[1]->granularity, 4096);
  cr_assert_not_null (b.disks[0]->tcp);
  cr_assert_str_eq (b.disks[0]->tcp->host, "::1");
  cr_assert_str_eq (b.disks[0]->tcp->port, "10810");
  cr_assert_eq (b.disks[0]->tcp->tls, 2);
  cr_assert_str_eq (b.disks[0]->tcp->psk, "/k/keys.psk");
  cr_assert_null (b.disks[0]->tcp->certificates);
  cr_assert_eq (b.disks[0]->tcp->pid, 4321);
  cr_assert_null (b.disks[1]->tcp);
  cr_assert_eq (b.ncps, 2);
  cr_assert_str_eq (b.cps[1].name, "c2");
  cr_assert_eq (b.cps[1].ndisks, 1);
  cr_assert_str_eq (b.cps[1].disks[0], "vdb");
  cr_assert_eq (b.cps[0].created, 1000);
  cr_assert_not_null (b.backup);
  cr_assert_str_eq (b.backup->since, "c1");
  cr_assert_eq (b.backup->mode, ORCH_BACKUP_INCREMENTAL);
  cr_assert_eq (b.backup->readable, ORCH_READABLE_ALL);
  cr_assert_str_eq (b.backup->disks[0].bitmap, "backup-vdb");
  cr_assert_eq (b.backup->disks[0].store_pid, 99);
  cr_assert_null (b.backup->disks[0].export_name);
  cr_assert_str_eq (b.pending.op, "backup-end");
  /* The re-serialised text is identical (canonical). */
  char *text2 = to_text (&b);
  cr_assert_str_eq (text, text2);
  free (text); free (text2);
  orch_state_free (&a);
  orch_state_free (&b);
}

/* Parse `text` expecting failure with both substrings in the message. */
static void
expect_bad (const char *text, const char *needle)
{
  struct orch_state st;
  struct cbw_err err = { 0 };
  cr_assert_eq (orch_state_from_json (text, strlen (text), "/s/cbwd-state.json", &st, &err),
                -1, "accepted bad input expecting \"%s\"", needle);
  cr_assert_neq (err.errnum, 0);
  cr_assert (strstr (err.msg, "/s/cbwd-state.json") != NULL, "no file name in: %s", err.msg);
  cr_assert (strstr (err.msg, needle) != NULL, "expected \"%s\" in: %s", needle, err.msg);
}

/* Re-sign a modified body, so that checks behind the checksum are reached. */
static char *
resign (struct json_object *top)
{
  struct json_object *body;
  json_object_object_get_ex (top, "body", &body);
  const char *t = json_object_to_json_string_ext (body, JSON_C_TO_STRING_PLAIN);
  char sum[40];
  snprintf (sum, sizeof sum, "xxh64:%016llx", (unsigned long long) XXH64 (t, strlen (t), 0));
  json_object_object_add (top, "checksum", json_object_new_string (sum));
  return strdup (json_object_to_json_string_ext (top, JSON_C_TO_STRING_PLAIN));
}
static struct json_object *
good_json (void)
{
  struct orch_state a;
  make_state (&a);
  struct json_object *j = orch_state_to_json (&a);
  orch_state_free (&a);
  return j;
}

static struct json_object *
body_of (struct json_object *top)
{
  struct json_object *b;
  json_object_object_get_ex (top, "body", &b);
  return b;
}

Test (state, bad_inputs)
{
  expect_bad ("", "not valid JSON");
  expect_bad ("{\"format\": ", "not valid JSON");
  expect_bad ("[1,2]", "not a JSON object");
  expect_bad ("{\"format\":\"other\",\"version\":1}", "format is \"other\"");
  expect_bad ("{\"format\":\"cbwd-state\",\"version\":9}", "unsupported version 9");
  expect_bad ("{\"format\":\"cbwd-state\",\"version\":\"1\"}", "\"version\" has the wrong type");
  expect_bad ("{\"format\":\"cbwd-state\",\"version\":1}", "missing key \"body\"");

  /* checksum mismatch: change a value without re-signing */
  struct json_object *j = good_json ();
  json_object_object_add (body_of (j), "generation", json_object_new_int64 (8));
  expect_bad (json_object_to_json_string (j), "bad checksum");
  json_object_put (j);

  /* trailing garbage */
  j = good_json ();
  char *t = resign (j);
  char *t2 = malloc (strlen (t) + 8);
  sprintf (t2, "%s xyz", t);
  expect_bad (t2, "trailing garbage");
  free (t); free (t2);
  json_object_put (j);

  /* re-signed semantic errors */
  struct { const char *path; const char *bad; const char *needle; } cases[] = {
    { "disks.0.name", "\"../x\"", "not a valid name" },
    { "disks.0.name", "\"vdb\"", "duplicate disk" },
    { "disks.0.file", "\"rel/path\"", "not an absolute path" },
    { "disks.0.granularity", "1000", "bad granularity" },
    { "disks.0.granularity", "256", "bad granularity" },
    { "disks.0.pid", "-5", "bad pid" },
    { "disks.0.pid", "\"12\"", "wrong type" },
    { "checkpoints.0.disks", "[\"nope\"]", "not a known disk" },
    { "checkpoints.0.disks", "[]", "covers no disk" },
    { "checkpoints.1.name", "\"c1\"", "duplicate checkpoint" },
    { "backup.mode", "\"sideways\"", "bad mode" },
    { "backup.readable", "\"some\"", "bad readable" },
    { "backup.readable", "1", "bad readable" },
    { "backup.disks.0.name", "\"vdz\"", "unknown disk" },
    { "pending.op", "\"explode\"", "unknown op" },
    { "disks", "{}", "wrong type" },
    { "disks.0.tcp", "[]", "not a listener object" },
    { "disks.0.tcp", "{\"tls\": \"off\"}", "need listen" },
    { "disks.0.tcp", "{}", "not a listener object" },
    { "disks.0.tcp", "{\"listen\": \"h:1\"}", "needs tls" },
    { "disks.0.tcp", "{\"listen\": \"nocolon\", \"tls\": \"off\"}", "expected HOST:PORT" },
    { "disks.0.tcp", "{\"listen\": \"h:70000\", \"tls\": \"off\"}", "expected HOST:PORT" },
    { "disks.0.tcp", "{\"listen\": \"h:1\", \"tls\": \"maybe\"}", "expected off, on or require" },
    { "disks.0.tcp", "{\"listen\": \"h:1\", \"tls\": \"require\"}", "exactly one of" },
    { "disks.0.tcp", "{\"listen\": \"h:1\", \"tls\": \"require\", \"tls-psk\": \"rel\"}",
      "absolute path" },
    { "disks.0.tcp", "{\"listen\": \"h:1\", \"tls\": \"off\", \"tls-psk\": \"/k\"}",
      "off with TLS credentials" },
    { "disks.0.tcp", "{\"listen\": \"h:1\", \"tls\": \"on\", \"tls-psk\": \"/k\", "
      "\"tls-verify-peer\": true}", "needs tls-certificates" },
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    j = good_json ();
    struct json_object *o = body_of (j);
    char path[64], *save = NULL;
    strcpy (path, cases[i].path);
    char *k = strtok_r (path, ".", &save), *next;
    while ((next = strtok_r (NULL, ".", &save)) != NULL) {
      struct json_object *c;
      if (json_object_is_type (o, json_type_array))
        c = json_object_array_get_idx (o, (size_t) atoi (k));
      else
        json_object_object_get_ex (o, k, &c);
      o = c;
      k = next;
    }
    struct json_object *v = json_tokener_parse (cases[i].bad);
    if (json_object_is_type (o, json_type_array))
      json_object_array_put_idx (o, (size_t) atoi (k), v);
    else
      json_object_object_add (o, k, v);
    t = resign (j);
    expect_bad (t, cases[i].needle);
    free (t);
    json_object_put (j);
  }

  /* too large */
  size_t big = ORCH_STATE_MAX + 10;
  char *huge = malloc (big + 1);
  memset (huge, ' ', big);
  huge[big] = '\0';
  expect_bad (huge, "larger than");
  free (huge);
}

/* The backup's readable set survives a save and load in both values; a
 * record written before the choice existed (no "readable") was an
 * incremental whose sessions protect only the changed blocks: it loads as
 * changed, never as all. */
Test (state, readable)
{
  struct orch_state a, b;
  struct cbw_err err = { 0 };
  make_state (&a);
  for (int r = ORCH_READABLE_ALL; r <= ORCH_READABLE_CHANGED; r++) {
    a.backup->readable = (enum orch_readable) r;
    char *text = to_text (&a);
    cr_assert_not_null (strstr (text, r == ORCH_READABLE_ALL ? "\"readable\":\"all\""
                                : "\"readable\":\"changed\""), "%s", text);
    cr_assert_eq (orch_state_from_json (text, strlen (text), "t.json", &b, &err), 0, "%s",
                  err.msg);
    cr_assert_eq (b.backup->readable, (enum orch_readable) r);
    orch_state_free (&b);
    free (text);
  }
  a.backup->readable = ORCH_READABLE_ALL;
  struct json_object *j = orch_state_to_json (&a), *bk;
  json_object_object_get_ex (body_of (j), "backup", &bk);
  json_object_object_del (bk, "readable");
  char *t = resign (j);
  cr_assert_eq (orch_state_from_json (t, strlen (t), "t.json", &b, &err), 0, "%s", err.msg);
  cr_assert_eq (b.backup->readable, ORCH_READABLE_CHANGED);
  orch_state_free (&b);
  free (t);
  json_object_put (j);
  orch_state_free (&a);

  enum orch_backup_mode m;
  enum orch_readable rd;
  cr_assert_eq (orch_backup_mode_parse ("top", &m), 0);
  cr_assert_eq (m, ORCH_BACKUP_TOP);
  cr_assert_str_eq (orch_backup_mode_name (ORCH_BACKUP_NONE), "none");
  cr_assert_eq (orch_backup_mode_parse ("Full", &m), -1);
  cr_assert_eq (orch_backup_mode_parse (NULL, &m), -1);
  cr_assert_eq (orch_readable_parse ("changed", &rd), 0);
  cr_assert_eq (rd, ORCH_READABLE_CHANGED);
  cr_assert_eq (orch_readable_parse ("", &rd), -1);
}

/* ---- model test of the checkpoint scheme ---- */

#define NDISK 3
#define MAXCP 40

struct model {
  struct orch_state st;
  /* bitmaps by checkpoint index (parallel to st.cps) and disk */
  uint64_t bm[MAXCP][NDISK];
  bool enabled[MAXCP][NDISK];
  /* ground truth: blocks written on disk d since cp i was created */
  uint64_t truth[MAXCP][NDISK];
};

static const char *dname[NDISK] = { "d0", "d1", "d2" };

static int
dix (const char *n)
{
  for (int i = 0; i < NDISK; i++)
    if (strcmp (n, dname[i]) == 0) return i;
  cr_assert_fail ("unknown disk %s", n);
  return -1;
}

static void
model_write (struct model *m, int d, int block)
{
  uint64_t bit = 1ULL << block;
  for (size_t i = 0; i < m->st.ncps; i++) {
    if (m->enabled[i][d])       /* the filter: every enabled bitmap records */
      m->bm[i][d] |= bit;
    if (orch_cp_has_disk (&m->st.cps[i], dname[d]))
      m->truth[i][d] |= bit;
  }
}

static void
model_create (struct model *m, unsigned mask, int seq)
{
  size_t ci = m->st.ncps++;
  struct orch_checkpoint *c = &m->st.cps[ci];
  memset (c, 0, sizeof *c);
  snprintf (c->name, sizeof c->name, "c%d", seq);
  c->disks = calloc (NDISK, sizeof (char *));
  for (int d = 0; d < NDISK; d++) {
    if (!(mask & (1u << d)))
      continue;
    c->disks[c->ndisks++] = strdup (dname[d]);
  }
  /* rotation as checkpoint.c does it: add new (enabled), disable previous */
  for (size_t k = 0; k < c->ndisks; k++) {
    int d = dix (c->disks[k]);
    m->bm[ci][d] = 0;
    m->enabled[ci][d] = true;
    m->truth[ci][d] = 0;
    ssize_t p = orch_plan_delete_into (&m->st, ci, dname[d]);
    if (p >= 0)
      m->enabled[p][d] = false;
  }
}

static void
model_delete (struct model *m, size_t ci)
{
  struct orch_checkpoint *c = &m->st.cps[ci];
  for (size_t k = 0; k < c->ndisks; k++) {
    int d = dix (c->disks[k]);
    bool latest = orch_latest_cp (&m->st, dname[d]) == (ssize_t) ci;
    ssize_t p = orch_plan_delete_into (&m->st, ci, dname[d]);
    if (p >= 0) {
      if (latest)
        m->enabled[p][d] = true;
      m->bm[p][d] |= m->bm[ci][d];
    }
  }
  orch_cp_clear (c);
  size_t rest = m->st.ncps - ci - 1;
  memmove (&m->st.cps[ci], &m->st.cps[ci + 1], rest * sizeof *c);
  memmove (&m->bm[ci], &m->bm[ci + 1], rest * sizeof m->bm[0]);
  memmove (&m->enabled[ci], &m->enabled[ci + 1], rest * sizeof m->enabled[0]);
  memmove (&m->truth[ci], &m->truth[ci + 1], rest * sizeof m->truth[0]);
  m->st.ncps--;
}

static void
model_check (struct model *m)
{
  size_t idx[MAXCP];
  for (size_t i = 0; i < m->st.ncps; i++)
    for (int d = 0; d < NDISK; d++) {
      struct cbw_err err = { 0 };
      ssize_t n = orch_plan_since (&m->st, dname[d], m->st.cps[i].name, idx, &err);
      if (!orch_cp_has_disk (&m->st.cps[i], dname[d])) {
        cr_assert_eq (n, -1);
        cr_assert_eq (err.errnum, ENOENT);
        continue;
      }
      cr_assert_geq (n, 1);
      uint64_t u = 0;
      for (ssize_t k = 0; k < n; k++)
        u |= m->bm[idx[k]][d];
      cr_assert_eq (u, m->truth[i][d],
                    "disk %s since %s: plan gives %#llx, truth %#llx", dname[d],
                    m->st.cps[i].name, (unsigned long long) u,
                    (unsigned long long) m->truth[i][d]);
    }
}

Test (plan, model_random)
{
  for (unsigned seed = 1; seed <= 200; seed++) {
    struct model *m = calloc (1, sizeof *m);
    m->st.cps = calloc (MAXCP, sizeof *m->st.cps);
    srand (seed);
    int seq = 0;
    for (int step = 0; step < 300; step++) {
      int r = rand () % 10;
      if (r < 6)
        model_write (m, rand () % NDISK, rand () % 64);
      else if (r < 8 && m->st.ncps < MAXCP - 1) {
        unsigned mask = (unsigned) (rand () % 7) + 1;
        model_create (m, mask, seq++);
      }
      else if (m->st.ncps > 0)
        model_delete (m, (size_t) rand () % m->st.ncps);
      model_check (m);
    }
    orch_state_free (&m->st);
    free (m);
  }
}

Test (plan, since_errors)
{
  struct orch_state a;
  struct cbw_err err = { 0 };
  size_t idx[8];
  make_state (&a);
  cr_assert_eq (orch_plan_since (&a, "vda", "nope", idx, &err), -1);
  cr_assert (strstr (err.msg, "does not exist"));
  cr_assert_eq (orch_plan_since (&a, "vda", "c2", idx, &err), -1);
  cr_assert (strstr (err.msg, "does not cover disk"));
  cr_assert_eq (orch_plan_since (&a, "vdb", "c1", idx, &err), 2);
  cr_assert_eq (orch_latest_cp (&a, "vda"), 0);
  cr_assert_eq (orch_latest_cp (&a, "vdb"), 1);
  cr_assert_eq (orch_latest_cp (&a, "zzz"), -1);
  orch_state_free (&a);
}

Test (names, validity)
{
  cr_assert (orch_valid_name ("vda"));
  cr_assert (orch_valid_name ("a.b-c_d9"));
  cr_assert_not (orch_valid_name (""));
  cr_assert_not (orch_valid_name (".hidden"));
  cr_assert_not (orch_valid_name ("-opt"));
  cr_assert_not (orch_valid_name ("a/b"));
  cr_assert_not (orch_valid_name ("a b"));
  cr_assert_not (orch_valid_name (NULL));
  char long_name[ORCH_NAME_MAX + 2];
  memset (long_name, 'x', sizeof long_name - 1);
  long_name[ORCH_NAME_MAX + 1] = '\0';
  cr_assert_not (orch_valid_name (long_name));
  long_name[ORCH_NAME_MAX] = '\0';
  cr_assert (orch_valid_name (long_name));
}

/* Overlays: a disk's chain path and a `top` backup round-trip; a disk
 * without "chain" (a file of an older cbwd) is a raw disk; a relative or
 * non-string chain is refused. */
Test (state, chain_and_top)
{
  struct orch_state a, b;
  struct cbw_err err = { 0 };
  make_state (&a);
  a.disks[0]->chain = strdup ("/s/disks/vda/overlays/vda.chain");
  a.backup->mode = ORCH_BACKUP_TOP;
  a.backup->readable = ORCH_READABLE_CHANGED;
  a.backup->since[0] = '\0';
  char *text = to_text (&a);
  cr_assert_eq (orch_state_from_json (text, strlen (text), "t.json", &b, &err), 0, "%s", err.msg);
  cr_assert_str_eq (b.disks[0]->chain, "/s/disks/vda/overlays/vda.chain");
  cr_assert_null (b.disks[1]->chain);
  cr_assert_eq (b.backup->mode, ORCH_BACKUP_TOP);
  char *text2 = to_text (&b);
  cr_assert_str_eq (text, text2);
  cr_assert_null (strstr (strstr (text, "\"vdb\""), "\"chain\""),
                  "a raw disk must not get a chain key");
  free (text); free (text2);
  orch_state_free (&b);

  struct json_object *top = orch_state_to_json (&a), *disks, *d0;
  json_object_object_get_ex (body_of (top), "disks", &disks);
  d0 = json_object_array_get_idx (disks, 0);
  json_object_object_add (d0, "chain", json_object_new_string ("rel/vda.chain"));
  char *t = resign (top);
  expect_bad (t, "is not an absolute path");
  free (t);
  json_object_object_add (d0, "chain", json_object_new_int (3));
  t = resign (top);
  expect_bad (t, "\"chain\" must be a string");
  free (t);
  json_object_put (top);
  orch_state_free (&a);
}

/* Disk identity: every disk gets a distinct UUID, it round-trips; a disk
 * without "id" (a file of an older cbwd) gets a new one marked id_new
 * (saved at load); an id that is not a UUID is refused. */
Test (state, disk_id)
{
  struct orch_state a, b;
  struct cbw_err err = { 0 };
  make_state (&a);
  cr_assert (cbw_disk_id_valid (a.disks[0]->id), "bad id %s", a.disks[0]->id);
  cr_assert_str_neq (a.disks[0]->id, a.disks[1]->id);
  char *text = to_text (&a);
  cr_assert_eq (orch_state_from_json (text, strlen (text), "t.json", &b, &err), 0, "%s", err.msg);
  cr_assert_str_eq (b.disks[0]->id, a.disks[0]->id);
  cr_assert_str_eq (b.disks[1]->id, a.disks[1]->id);
  cr_assert (!b.disks[0]->id_new);
  free (text);
  orch_state_free (&b);

  struct json_object *top = orch_state_to_json (&a), *disks, *d0;
  json_object_object_get_ex (body_of (top), "disks", &disks);
  d0 = json_object_array_get_idx (disks, 0);
  json_object_object_del (d0, "id");
  char *t = resign (top);
  cr_assert_eq (orch_state_from_json (t, strlen (t), "t.json", &b, &err), 0, "%s", err.msg);
  cr_assert (b.disks[0]->id_new);
  cr_assert (cbw_disk_id_valid (b.disks[0]->id));
  cr_assert_str_neq (b.disks[0]->id, a.disks[0]->id);
  cr_assert (!b.disks[1]->id_new);
  orch_state_free (&b);
  free (t);
  json_object_object_add (d0, "id", json_object_new_string ("not-a-uuid"));
  t = resign (top);
  expect_bad (t, "id \"not-a-uuid\" is not a UUID");
  free (t);
  json_object_put (top);
  orch_state_free (&a);
}

/* Unusable marks: kept across save/load, refused when they do not match
 * the checkpoint, and the marking helper marks every checkpoint of a disk
 * once (the first reason stays). */
Test (state, unusable_marks)
{
  struct orch_state a, b;
  struct cbw_err err = { 0 };
  make_state (&a);
  cr_assert_eq (orch_cp_mark_unusable (&a, "vdb", "reset"), 2);
  cr_assert_eq (orch_cp_mark_unusable (&a, "vdb", "again"), 0);
  cr_assert_eq (orch_cp_mark_unusable (&a, "vda", "lost"), 1);
  cr_assert_null (orch_cp_unusable (&a.cps[1], "vda"));
  cr_assert_str_eq (orch_cp_unusable (&a.cps[0], "vdb")->reason, "reset");
  char *text = to_text (&a);
  cr_assert_eq (orch_state_from_json (text, strlen (text), "t.json", &b, &err), 0,
                "%s", err.msg);
  cr_assert_eq (b.cps[0].nunusable, 2);
  cr_assert_str_eq (orch_cp_unusable (&b.cps[0], "vda")->reason, "lost");
  cr_assert_str_eq (orch_cp_unusable (&b.cps[1], "vdb")->reason, "reset");
  char *text2 = to_text (&b);
  cr_assert_str_eq (text, text2);
  orch_cp_drop_unusable (&b.cps[0], "vda");
  cr_assert_null (orch_cp_unusable (&b.cps[0], "vda"));
  cr_assert_not_null (orch_cp_unusable (&b.cps[0], "vdb"));
  free (text); free (text2);
  orch_state_free (&b);

  /* c2 covers only vdb: a mark for vda there is refused, naming the file */
  struct json_object *top = orch_state_to_json (&a), *cps, *u;
  json_object_object_get_ex (body_of (top), "checkpoints", &cps);
  json_object_object_get_ex (json_object_array_get_idx (cps, 1), "unusable", &u);
  json_object_object_add (json_object_array_get_idx (u, 0), "disk",
                          json_object_new_string ("vda"));
  char *bad = resign (top);
  expect_bad (bad, "is not covered by the checkpoint");
  free (bad);
  json_object_put (top);
  orch_state_free (&a);
}
