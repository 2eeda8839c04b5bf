/* cbw — client-tests/dirtybitmap/dbmtool.c: control-socket client and crash
 * checker for the dirtybitmap client tests (a C program because python3
 * start-up costs seconds on a loaded CI machine).
 *
 *   dbm-tool ctl SOCKET COMMAND [ARGS-JSON]
 *       one request; prints the "return" object (exit 0) or the "error"
 *       object (exit 2); exit 1 if the socket does not answer.
 *   dbm-tool raw SOCKET LINE      send LINE (+ newline) as is, print the reply
 *   dbm-tool wait SOCKET          retry "info" for up to 10 s
 *   dbm-tool extents SOCKET BITMAP
 *       all dirty extents, "OFFSET LENGTH" per line, paging with "next"
 *       through small replies (max-extents 7) so paging is exercised.
 *   dbm-tool check SOCKET BITMAP LOG BEFORE AFTER
 *       LOG is a dbm-crashwriter log.  Asserts, independently of the filter's
 *       bookkeeping, that (1) every granule of every acknowledged request is
 *       dirty and (2) every granule whose bytes differ between the image
 *       files BEFORE and AFTER is dirty (a request that reached the disk
 *       without a reply).  Prints one JSON line with counts and the
 *       over-reporting (dirty bytes no logged request touched); exit 1 on an
 *       under-report.  BEFORE and AFTER "-" skip check (2) (images too big
 *       to keep a copy of); touched_bytes then counts every granule of every
 *       logged request, in flight included.
 * Single-threaded, no locking.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json-c/json.h>

#include "cbw_err.h"
#include "control.h"

static struct cbw_ctl_client *
conn (const char *sock)
{
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *c = cbw_ctl_client_connect (sock, &err);
  if (c == NULL) {
    fprintf (stderr, "dbm-tool: %s\n", err.msg);
    exit (1);
  }
  return c;
}

/* Call and return the "return" object, exiting on any error. */
static struct json_object *
call (struct cbw_ctl_client *c, const char *cmd, struct json_object *args)
{
  struct cbw_err err = { 0 };
  struct json_object *ret = NULL;

  if (cbw_ctl_client_execute (c, cmd, args, &ret, NULL, &err) < 0) {
    fprintf (stderr, "dbm-tool: %s\n", err.msg);
    exit (1);
  }
  return ret;
}

static int64_t
geti (struct json_object *o, const char *k)
{
  struct json_object *v;
  if (!json_object_object_get_ex (o, k, &v)) {
    fprintf (stderr, "dbm-tool: reply has no '%s'\n", k);
    exit (1);
  }
  return json_object_get_int64 (v);
}

/* Dirty granules of a bitmap as a byte array (1 = dirty). */
static unsigned char *
load_dirty (struct cbw_ctl_client *c, const char *name, uint64_t *gran_out,
            uint64_t *size_out, uint64_t *ngran_out, int print, uint64_t *pages)
{
  struct json_object *lst = call (c, "list", NULL), *arr, *info;
  uint64_t gran = 0, size, ngran, off = 0, listed_dirty = 0;
  unsigned char *dirty;
  size_t i;

  json_object_object_get_ex (lst, "bitmaps", &arr);
  for (i = 0; i < json_object_array_length (arr); ++i) {
    struct json_object *b = json_object_array_get_idx (arr, i), *n;
    json_object_object_get_ex (b, "name", &n);
    if (strcmp (json_object_get_string (n), name) == 0) {
      gran = (uint64_t) geti (b, "granularity");
      listed_dirty = (uint64_t) geti (b, "dirty-bytes");
    }
  }
  json_object_put (lst);
  if (gran == 0) {
    fprintf (stderr, "dbm-tool: no bitmap '%s'\n", name);
    exit (1);
  }
  info = call (c, "info", NULL);
  size = (uint64_t) geti (info, "image-size");
  json_object_put (info);
  ngran = (size + gran - 1) / gran;
  dirty = calloc (ngran + 1, 1);
  *pages = 0;
  for (;;) {
    struct json_object *a = json_object_new_object (), *r, *ext, *next;
    json_object_object_add (a, "name", json_object_new_string (name));
    json_object_object_add (a, "offset", json_object_new_int64 ((int64_t) off));
    json_object_object_add (a, "max-extents", json_object_new_int64 (7));
    r = call (c, "extents", a);
    (*pages)++;
    json_object_object_get_ex (r, "extents", &ext);
    for (i = 0; i < json_object_array_length (ext); ++i) {
      struct json_object *e = json_object_array_get_idx (ext, i);
      uint64_t eo = (uint64_t) geti (e, "offset"), el = (uint64_t) geti (e, "length");
      if (eo < off || el == 0 || eo + el > size) {
        fprintf (stderr, "dbm-tool: bad extent %" PRIu64 "+%" PRIu64 "\n", eo, el);
        exit (1);
      }
      if (print)
        printf ("%" PRIu64 " %" PRIu64 "\n", eo, el);
      for (uint64_t g = eo / gran; g <= (eo + el - 1) / gran; ++g)
        dirty[g] = 1;
    }
    json_object_object_get_ex (r, "next", &next);
    if (next == NULL || json_object_is_type (next, json_type_null)) {
      json_object_put (r);
      break;
    }
    uint64_t n = (uint64_t) json_object_get_int64 (next);
    json_object_put (r);
    if (n <= off) {
      fprintf (stderr, "dbm-tool: extents: next %" PRIu64 " does not progress\n", n);
      exit (1);
    }
    off = n;
  }
  uint64_t db = 0;
  for (uint64_t g = 0; g < ngran; ++g)
    db += dirty[g] ? gran : 0;
  if (ngran && dirty[ngran - 1] && size % gran)
    db -= gran - size % gran;
  if (db != listed_dirty) {
    fprintf (stderr, "dbm-tool: extents cover %" PRIu64 " bytes, list says %" PRIu64 "\n",
             db, listed_dirty);
    exit (1);
  }
  *gran_out = gran; *size_out = size; *ngran_out = ngran;
  return dirty;
}

struct req { char kind; uint64_t off, len; int acked; };

static int
check (const char *sock, const char *name, const char *logp, const char *before,
       const char *after)
{
  struct cbw_ctl_client *c = conn (sock);
  uint64_t gran, size, ngran, pages;
  unsigned char *dirty = load_dirty (c, name, &gran, &size, &ngran, 0, &pages);
  unsigned char *touched = calloc (ngran + 1, 1);
  struct req *reqs = NULL;
  size_t nreqs = 0, cap = 0;
  FILE *fp = fopen (logp, "r");
  char line[256];
  uint64_t bad_acked = 0, bad_changed = 0, changed = 0, unacked_not_dirty = 0;
  uint64_t over = 0, dirty_bytes = 0, touched_bytes = 0, nacked = 0;

  if (fp == NULL) { perror (logp); return 1; }
  while (fgets (line, sizeof line, fp)) {
    uint64_t seq, off, len;
    char k;
    if (strchr (line, '\n') == NULL)
      continue;                 /* torn last line: never sent */
    if (sscanf (line, "S %" SCNu64 " %c %" SCNu64 " %" SCNu64, &seq, &k, &off, &len) == 4) {
      if (seq != nreqs) { fprintf (stderr, "log: bad seq %" PRIu64 "\n", seq); return 1; }
      if (nreqs == cap) reqs = realloc (reqs, (cap = cap ? 2 * cap : 1024) * sizeof *reqs);
      reqs[nreqs++] = (struct req) { k, off, len, 0 };
    }
    else if (sscanf (line, "A %" SCNu64, &seq) == 1) {
      if (seq >= nreqs) { fprintf (stderr, "log: ack of unsent %" PRIu64 "\n", seq); return 1; }
      reqs[seq].acked = 1;
      nacked++;
    }
  }
  fclose (fp);

  for (size_t i = 0; i < nreqs; ++i) {
    struct req *r = &reqs[i];
    int all = 1;
    if (r->kind == 'F' || r->len == 0)
      continue;
    for (uint64_t g = r->off / gran; g <= (r->off + r->len - 1) / gran; ++g) {
      touched[g] = 1;
      if (!dirty[g]) all = 0;
    }
    if (!all && r->acked) {
      if (bad_acked++ < 5)
        fprintf (stderr, "UNDER-REPORT: acknowledged %c %" PRIu64 "+%" PRIu64 " not dirty\n",
                 r->kind, r->off, r->len);
    }
    if (!all && !r->acked)
      unacked_not_dirty++;
  }

  int images = strcmp (before, "-") != 0 || strcmp (after, "-") != 0;
  FILE *fb = images ? fopen (before, "r") : NULL, *fa = images ? fopen (after, "r") : NULL;
  char *bb = malloc (gran), *ba = malloc (gran);
  if (images && (!fb || !fa)) { perror ("image"); return 1; }
  for (uint64_t g = 0; g < ngran; ++g) {
    size_t nb = images ? fread (bb, 1, gran, fb) : 0, na = images ? fread (ba, 1, gran, fa) : 0;
    if (images && (nb != na || memcmp (bb, ba, nb) != 0)) {
      changed++;
      if (!dirty[g] && bad_changed++ < 5)
        fprintf (stderr, "UNDER-REPORT: granule at %" PRIu64 " changed but is not dirty\n",
                 g * gran);
    }
    if (dirty[g]) dirty_bytes += gran;
    if (touched[g]) touched_bytes += gran;
    if (dirty[g] && !touched[g]) over += gran;
  }
  if (images) { fclose (fb); fclose (fa); }
  printf ("{\"sent\": %zu, \"acked\": %" PRIu64 ", \"changed_granules\": %" PRIu64
          ", \"dirty_bytes\": %" PRIu64 ", \"touched_bytes\": %" PRIu64
          ", \"over_reported_bytes\": %" PRIu64 ", \"unacked_not_dirty\": %" PRIu64
          ", \"extent_pages\": %" PRIu64 ", \"violations\": %" PRIu64 "}\n",
          nreqs, nacked, changed, dirty_bytes, touched_bytes, over, unacked_not_dirty,
          pages, bad_acked + bad_changed);
  free (bb); free (ba);
  free (reqs); free (touched); free (dirty);
  cbw_ctl_client_close (c);
  return bad_acked + bad_changed ? 1 : 0;
}

int
main (int argc, char **argv)
{
  if (argc >= 4 && strcmp (argv[1], "ctl") == 0) {
    struct cbw_ctl_client *c = conn (argv[2]);
    struct json_object *args = NULL, *reply, *v;
    struct cbw_err err = { 0 };
    if (argc >= 5 && (args = json_tokener_parse (argv[4])) == NULL) {
      fprintf (stderr, "dbm-tool: bad JSON arguments\n");
      return 1;
    }
    reply = cbw_ctl_client_call (c, argv[3], args, &err);
    if (reply == NULL) { fprintf (stderr, "dbm-tool: %s\n", err.msg); return 1; }
    int rc = json_object_object_get_ex (reply, "return", &v) ? 0 : 2;
    if (rc) json_object_object_get_ex (reply, "error", &v);
    printf ("%s\n", json_object_to_json_string_ext (v, JSON_C_TO_STRING_PLAIN));
    json_object_put (reply);
    cbw_ctl_client_close (c);
    return rc;
  }
  if (argc == 4 && strcmp (argv[1], "raw") == 0) {
    struct cbw_ctl_client *c = conn (argv[2]);
    struct cbw_err err = { 0 };
    size_t n = strlen (argv[3]);
    char *l = malloc (n + 1), *reply;
    memcpy (l, argv[3], n);
    l[n] = '\n';
    if (cbw_ctl_client_send_raw (c, l, n + 1, &err) < 0 ||
        (reply = cbw_ctl_client_read_line (c, &err)) == NULL) {
      fprintf (stderr, "dbm-tool: %s\n", err.msg);
      return 1;
    }
    printf ("%s\n", reply);
    free (reply);
    free (l);
    cbw_ctl_client_close (c);
    return 0;
  }
  if (argc == 3 && strcmp (argv[1], "wait") == 0) {
    for (int i = 0; i < 200; ++i) {
      struct cbw_err err = { 0 };
      struct cbw_ctl_client *c = cbw_ctl_client_connect (argv[2], &err);
      struct json_object *ret = NULL;
      if (c && cbw_ctl_client_execute (c, "info", NULL, &ret, NULL, &err) == 0) {
        json_object_put (ret);
        cbw_ctl_client_close (c);
        return 0;
      }
      cbw_ctl_client_close (c);
      usleep (50000);
    }
    fprintf (stderr, "dbm-tool: %s does not answer\n", argv[2]);
    return 1;
  }
  if (argc == 4 && strcmp (argv[1], "extents") == 0) {
    struct cbw_ctl_client *c = conn (argv[2]);
    uint64_t g, s, n, p;
    free (load_dirty (c, argv[3], &g, &s, &n, 1, &p));
    cbw_ctl_client_close (c);
    return 0;
  }
  if (argc == 7 && strcmp (argv[1], "check") == 0)
    return check (argv[2], argv[3], argv[4], argv[5], argv[6]);
  fprintf (stderr, "usage: dbm-tool ctl SOCK CMD [ARGS] | wait SOCK | extents SOCK BITMAP |"
           " check SOCK BITMAP LOG BEFORE AFTER\n");
  return 1;
}
