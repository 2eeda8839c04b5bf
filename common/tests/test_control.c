/* cbw — common/tests/test_control.c: unit tests of the control-socket library.
 *
 * Part 1 drives cbw_ctl_dispatch_line() directly through every error class
 * and the validation rules; part 2 runs a real server on a Unix socket and
 * talks to it with the client helpers and with raw sockets (garbage, huge
 * lines, early disconnects, too many clients, stale/live socket files), each
 * time checking that the server still serves the next client.
 * Locking: the test table's handlers share one counter under a mutex.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <signal.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <json-c/json.h>

#include "cbw_err.h"
#include "cleanup.h"
#include "control.h"

/* ---- a test module ------------------------------------------------------ */

struct testmod {
  pthread_mutex_t lock;
  long long counter;             /* guarded by lock */
};

static int
h_echo (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  (void) data;
  r->ret = json_object_get (args);
  return 0;
}

static int
h_count (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct testmod *m = data;
  long long v;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&m->lock);
    v = m->counter += cbw_ctl_arg_int (args, "by", 1);
  }
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "counter", json_object_new_int64 (v));
  return 0;
}

static int
h_fail (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  const char *cls = cbw_ctl_arg_str (args, "class", NULL);
  int c;

  (void) data;
  if (cls == NULL)
    return -1;                   /* no cbw_ctl_fail: must become GenericError */
  c = cbw_ctl_error_class_from_name (cls);
  return cbw_ctl_fail (r, c < 0 ? CBW_CTL_GENERIC_ERROR : c, "failing as %s",
                       cls);
}

static int
h_none (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  (void) data; (void) args; (void) r;
  return 0;                      /* leaves ret NULL: reply must be {} */
}

static const struct cbw_ctl_arg echo_args[] = {
  { "s", CBW_ARG_STRING, true, "a string" },
  { "i", CBW_ARG_INT, false, "an int" },
  { "u", CBW_ARG_UINT, false, "a uint" },
  { "b", CBW_ARG_BOOL, false, "a bool" },
  { "o", CBW_ARG_OBJECT, false, "an object" },
  { "a", CBW_ARG_ARRAY, false, "an array" },
  { NULL }
};
static const struct cbw_ctl_arg count_args[] = {
  { "by", CBW_ARG_INT, false, "increment" }, { NULL }
};
static const struct cbw_ctl_arg fail_args[] = {
  { "class", CBW_ARG_STRING, false, "error class to fail with" }, { NULL }
};
static const struct cbw_ctl_arg no_args[] = { { NULL } };

static const struct cbw_ctl_command test_cmds[] = {
  { "echo", h_echo, echo_args, "Echo the arguments.", "the arguments" },
  { "count", h_count, count_args, "Add to a counter.", "`{\"counter\": INT}`" },
  { "fail", h_fail, fail_args, "Fail with a class.", "never returns" },
  { "none", h_none, no_args, "Do nothing.", NULL },
  { NULL }
};
static const struct cbw_ctl_table test_table = { "testmod", test_cmds };

static struct testmod mod = { PTHREAD_MUTEX_INITIALIZER, 0 };

/* Dispatch a line, parse the reply. */
static struct json_object *
dispatch (const char *line)
{
  char *s = cbw_ctl_dispatch_line (&test_table, &mod, line, strlen (line));
  struct json_object *o;

  cr_assert_not_null (s);
  cr_assert_null (strchr (s, '\n'), "reply contains a newline: %s", s);
  o = json_tokener_parse (s);
  cr_assert_not_null (o, "reply is not JSON: %s", s);
  free (s);
  return o;
}

/* Return the error class of a reply, or NULL for a success. */
static const char *
err_class (struct json_object *o)
{
  struct json_object *e, *c;
  if (!json_object_object_get_ex (o, "error", &e))
    return NULL;
  cr_assert (json_object_object_get_ex (e, "class", &c));
  cr_assert (json_object_object_get_ex (e, "desc", NULL));
  return json_object_get_string (c);
}

static void
expect_class (const char *line, const char *cls)
{
  struct json_object *o = dispatch (line);
  const char *got = err_class (o);
  cr_assert (got != NULL, "%s: expected error %s, got success %s", line, cls,
             json_object_to_json_string (o));
  cr_assert_str_eq (got, cls, "%s: expected %s, got %s (%s)", line, cls, got,
                    json_object_to_json_string (o));
  json_object_put (o);
}

static void
expect_ok (const char *line)
{
  struct json_object *o = dispatch (line);
  cr_assert (json_object_object_get_ex (o, "return", NULL),
             "%s: expected success, got %s", line,
             json_object_to_json_string (o));
  json_object_put (o);
}

/* ---- part 1: dispatch --------------------------------------------------- */

Test (classes, names_unique_and_roundtrip)
{
  int i, j;
  for (i = 0; i < CBW_CTL_ERROR_CLASS_COUNT; ++i) {
    const char *n = cbw_ctl_error_class_name (i);
    cr_assert_not_null (n);
    cr_assert_eq (cbw_ctl_error_class_from_name (n), i);
    for (j = 0; j < i; ++j)
      cr_assert_str_neq (n, cbw_ctl_error_class_name (j));
  }
  cr_assert_eq (cbw_ctl_error_class_from_name ("NoSuchClass"), -1);
  cr_assert_str_eq (cbw_ctl_error_class_name (CBW_CTL_ERROR_CLASS_COUNT),
                    "GenericError");
}

Test (classes, every_class_documented)
{
  char *buf = NULL;
  size_t len = 0;
  int i;

  {
    FILE *fp = fopen (CBW_SRC_DIR "/docs/control-protocol.md", "r");
    cr_assert_not_null (fp, "docs/control-protocol.md missing");
    char chunk[4096];
    size_t n;
    FILE *mem = open_memstream (&buf, &len);
    while ((n = fread (chunk, 1, sizeof chunk, fp)) > 0)
      fwrite (chunk, 1, n, mem);
    fclose (fp);
    fclose (mem);
  }
  for (i = 0; i < CBW_CTL_ERROR_CLASS_COUNT; ++i) {
    char needle[64];
    snprintf (needle, sizeof needle, "`%s`", cbw_ctl_error_class_name (i));
    cr_assert_not_null (strstr (buf, needle),
                        "docs/control-protocol.md does not document %s",
                        needle);
  }
  /* ...and documents no class that does not exist: every `Name` in the
   * error-class table row position must be a real class. */
  {
    const char *p = strstr (buf, "<!-- error-classes -->");
    const char *end = p ? strstr (p, "<!-- /error-classes -->") : NULL;
    int rows = 0;
    cr_assert (p && end, "error-class table markers missing");
    while ((p = strstr (p, "\n| `")) != NULL && p < end) {
      char name[64];
      cr_assert_eq (sscanf (p, "\n| `%63[A-Za-z]`", name), 1);
      cr_assert_geq (cbw_ctl_error_class_from_name (name), 0,
                     "docs list unknown class %s", name);
      rows++;
      p++;
    }
    cr_assert_eq (rows, CBW_CTL_ERROR_CLASS_COUNT);
  }
  free (buf);
}

Test (dispatch, success_and_id_echo)
{
  struct json_object *o, *ret, *v;

  o = dispatch ("{\"execute\":\"echo\",\"arguments\":{\"s\":\"x\",\"i\":-5,"
                "\"u\":7,\"b\":true,\"o\":{\"k\":1},\"a\":[1,2]},\"id\":\"abc\"}");
  cr_assert_null (err_class (o));
  cr_assert (json_object_object_get_ex (o, "return", &ret));
  cr_assert_str_eq (cbw_ctl_arg_str (ret, "s", NULL), "x");
  cr_assert_eq (cbw_ctl_arg_int (ret, "i", 0), -5);
  cr_assert_eq (cbw_ctl_arg_int (ret, "u", 0), 7);
  cr_assert_eq (cbw_ctl_arg_bool (ret, "b", false), true);
  cr_assert (json_object_object_get_ex (o, "id", &v));
  cr_assert_str_eq (json_object_get_string (v), "abc");
  json_object_put (o);

  /* id of any type echoed verbatim, also on errors */
  o = dispatch ("{\"id\":{\"n\":[1,2,{\"z\":null}]},\"execute\":\"nope\"}");
  cr_assert_str_eq (err_class (o), "CommandNotFound");
  cr_assert (json_object_object_get_ex (o, "id", &v));
  cr_assert_str_eq (json_object_to_json_string_ext (v, JSON_C_TO_STRING_PLAIN),
                    "{\"n\":[1,2,{\"z\":null}]}");
  json_object_put (o);

  /* no id -> no id member */
  o = dispatch ("{\"execute\":\"none\"}");
  cr_assert_not (json_object_object_get_ex (o, "id", NULL));
  cr_assert (json_object_object_get_ex (o, "return", &ret));
  cr_assert (json_object_is_type (ret, json_type_object));
  cr_assert_eq (json_object_object_length (ret), 0);
  json_object_put (o);

  /* defaults of the getters */
  cr_assert_str_eq (cbw_ctl_arg_str (NULL, "x", "d"), "d");
  cr_assert_eq (cbw_ctl_arg_int (NULL, "x", 42), 42);
  cr_assert_eq (cbw_ctl_arg_bool (NULL, "x", true), true);
}

Test (dispatch, parse_errors)
{
  expect_class ("", "ParseError");
  expect_class ("   ", "ParseError");
  expect_class ("not json", "ParseError");
  expect_class ("{\"execute\":", "ParseError");
  expect_class ("{\"execute\":\"none\"} trailing", "ParseError");
  expect_class ("{\"execute\":\"none\"}{\"execute\":\"none\"}", "ParseError");
  expect_class ("[\"execute\",\"none\"]", "ParseError");
  expect_class ("\"execute\"", "ParseError");
  expect_class ("42", "ParseError");
  expect_class ("null", "ParseError");
  expect_class ("{'execute':'none'}", "ParseError");
  /* deep nesting beyond json-c's limit */
  {
    char deep[2100];
    int i;
    for (i = 0; i < 1000; ++i) deep[i] = '[';
    for (; i < 2000; ++i) deep[i] = ']';
    deep[i] = '\0';
    expect_class (deep, "ParseError");
  }
  /* a NUL byte inside the line */
  {
    const char l[] = "{\"execute\":\"no\0ne\"}";
    char *s = cbw_ctl_dispatch_line (&test_table, &mod, l, sizeof l - 1);
    struct json_object *o = json_tokener_parse (s);
    cr_assert_str_eq (err_class (o), "ParseError");
    json_object_put (o);
    free (s);
  }
  /* whitespace around the object is fine */
  expect_ok ("  {\"execute\":\"none\"}  \r");
}

Test (dispatch, line_length_limit)
{
  /* exactly CBW_CTL_MAX_LINE bytes: accepted; one more: ParseError */
  size_t n = CBW_CTL_MAX_LINE;
  char *l = malloc (n + 2);
  const char *req = "{\"execute\":\"none\"}";
  char *s;
  struct json_object *o;

  memset (l, ' ', n + 1);
  memcpy (l, req, strlen (req));
  l[n + 1] = '\0';
  s = cbw_ctl_dispatch_line (&test_table, &mod, l, n);
  o = json_tokener_parse (s);
  cr_assert_null (err_class (o), "max-length line rejected: %s", s);
  json_object_put (o);
  free (s);
  s = cbw_ctl_dispatch_line (&test_table, &mod, l, n + 1);
  o = json_tokener_parse (s);
  cr_assert_str_eq (err_class (o), "ParseError");
  json_object_put (o);
  free (s);
  free (l);
}

Test (dispatch, request_shape_errors)
{
  expect_class ("{}", "InvalidParameter");
  expect_class ("{\"arguments\":{}}", "InvalidParameter");
  expect_class ("{\"execute\":42}", "InvalidParameter");
  expect_class ("{\"execute\":null}", "InvalidParameter");
  expect_class ("{\"execute\":\"none\",\"extra\":1}", "InvalidParameter");
  expect_class ("{\"execute\":\"none\",\"arguments\":[]}", "InvalidParameter");
  expect_class ("{\"execute\":\"none\",\"arguments\":\"x\"}",
                "InvalidParameter");
  expect_class ("{\"execute\":\"nope\"}", "CommandNotFound");
  expect_class ("{\"execute\":\"\"}", "CommandNotFound");
  expect_class ("{\"execute\":\"ECHO\",\"arguments\":{\"s\":\"x\"}}",
                "CommandNotFound");
}

Test (dispatch, argument_errors)
{
  /* missing required */
  expect_class ("{\"execute\":\"echo\"}", "InvalidParameter");
  expect_class ("{\"execute\":\"echo\",\"arguments\":{\"i\":1}}",
                "InvalidParameter");
  /* unknown argument */
  expect_class ("{\"execute\":\"echo\",\"arguments\":{\"s\":\"x\",\"zz\":1}}",
                "InvalidParameter");
  expect_class ("{\"execute\":\"none\",\"arguments\":{\"x\":1}}",
                "InvalidParameter");
  /* wrong types, one per declared type */
  static const char *bad[] = {
    "\"s\":1", "\"s\":null", "\"s\":true",
    "\"s\":\"x\",\"i\":\"1\"", "\"s\":\"x\",\"i\":1.5", "\"s\":\"x\",\"i\":true",
    "\"s\":\"x\",\"u\":-1", "\"s\":\"x\",\"u\":\"1\"", "\"s\":\"x\",\"u\":2.0",
    "\"s\":\"x\",\"b\":1", "\"s\":\"x\",\"b\":\"true\"",
    "\"s\":\"x\",\"o\":[]", "\"s\":\"x\",\"o\":\"{}\"",
    "\"s\":\"x\",\"a\":{}", "\"s\":\"x\",\"a\":\"[]\"",
    /* numbers json-c would silently clamp */
    "\"s\":\"x\",\"i\":9223372036854775808",
    "\"s\":\"x\",\"u\":99999999999999999999",
    "\"s\":\"x\",\"i\":-9223372036854775809",
    NULL
  };
  char line[256];
  int i;
  for (i = 0; bad[i]; ++i) {
    snprintf (line, sizeof line, "{\"execute\":\"echo\",\"arguments\":{%s}}",
              bad[i]);
    expect_class (line, "InvalidParameter");
  }
  /* boundary values that are fine */
  expect_ok ("{\"execute\":\"echo\",\"arguments\":{\"s\":\"\","
             "\"i\":9223372036854775807,\"u\":0}}");
  expect_ok ("{\"execute\":\"echo\",\"arguments\":{\"s\":\"x\","
             "\"i\":-9223372036854775807,\"u\":9223372036854775807}}");
}

Test (dispatch, handler_errors_pass_through)
{
  int c;
  char line[200];
  for (c = 0; c < CBW_CTL_ERROR_CLASS_COUNT; ++c) {
    snprintf (line, sizeof line,
              "{\"execute\":\"fail\",\"arguments\":{\"class\":\"%s\"}}",
              cbw_ctl_error_class_name (c));
    expect_class (line, cbw_ctl_error_class_name (c));
  }
  /* handler returned -1 without saying why */
  {
    struct json_object *o = dispatch ("{\"execute\":\"fail\"}");
    struct json_object *e, *d;
    cr_assert_str_eq (err_class (o), "GenericError");
    json_object_object_get_ex (o, "error", &e);
    json_object_object_get_ex (e, "desc", &d);
    cr_assert_gt (strlen (json_object_get_string (d)), 0);
    json_object_put (o);
  }
}

Test (dispatch, query_commands_matches_table)
{
  struct json_object *o = dispatch ("{\"execute\":\"query-commands\"}");
  struct json_object *ret, *cmds, *md;
  char *want_md = cbw_ctl_docs_markdown (&test_table);
  size_t i, n, ntable = 0;
  bool seen_self = false;

  cr_assert (json_object_object_get_ex (o, "return", &ret));
  cr_assert (json_object_object_get_ex (ret, "commands", &cmds));
  cr_assert (json_object_object_get_ex (ret, "markdown", &md));
  cr_assert_str_eq (json_object_get_string (md), want_md);
  n = json_object_array_length (cmds);
  for (i = 0; i < n; ++i) {
    struct json_object *c = json_object_array_get_idx (cmds, i), *nm, *args;
    const struct cbw_ctl_command *t;
    cr_assert (json_object_object_get_ex (c, "name", &nm));
    cr_assert (json_object_object_get_ex (c, "doc", NULL));
    cr_assert (json_object_object_get_ex (c, "returns", NULL));
    cr_assert (json_object_object_get_ex (c, "args", &args));
    if (strcmp (json_object_get_string (nm), "query-commands") == 0) {
      seen_self = true;
      continue;
    }
    for (t = test_cmds; t->name; ++t)
      if (strcmp (t->name, json_object_get_string (nm)) == 0)
        break;
    cr_assert_not_null (t->name, "unknown command %s listed",
                        json_object_get_string (nm));
    ntable++;
    /* args listed exactly as declared */
    size_t k, na = 0;
    for (; t->args[na].name; ++na) ;
    cr_assert_eq (json_object_array_length (args), na);
    for (k = 0; k < na; ++k) {
      struct json_object *a = json_object_array_get_idx (args, k), *an, *rq;
      json_object_object_get_ex (a, "name", &an);
      json_object_object_get_ex (a, "required", &rq);
      cr_assert_str_eq (json_object_get_string (an), t->args[k].name);
      cr_assert_eq (json_object_get_boolean (rq), t->args[k].required);
    }
    cr_assert_not_null (strstr (want_md, t->name));
  }
  cr_assert (seen_self);
  cr_assert_eq (ntable, sizeof test_cmds / sizeof test_cmds[0] - 1);
  /* the markdown documents every argument */
  cr_assert_not_null (strstr (want_md, "| `s` | string | yes |"));
  cr_assert_not_null (strstr (want_md, "| `u` | uint | no |"));
  /* query-commands takes no arguments */
  expect_class ("{\"execute\":\"query-commands\",\"arguments\":{\"x\":1}}",
                "InvalidParameter");
  free (want_md);
  json_object_put (o);
}

/* ---- part 2: a real socket ---------------------------------------------- */

static char dir[64], sock[128];
static struct cbw_ctl_server *srv;

static void
start_server (void)
{
  struct cbw_err err = { 0 };
  strcpy (dir, "/tmp/cbw-ctl-test.XXXXXX");
  cr_assert_not_null (mkdtemp (dir));
  snprintf (sock, sizeof sock, "%s/ctl.sock", dir);
  srv = cbw_ctl_server_start (sock, &test_table, &mod, &err);
  cr_assert_not_null (srv, "server_start: %s", err.msg);
}

static void
stop_server (void)
{
  cbw_ctl_server_stop (srv);
  srv = NULL;
  cr_assert_eq (access (sock, F_OK), -1, "socket not unlinked");
  rmdir (dir);
}

static int
raw_connect (const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  cr_assert_geq (fd, 0);
  strcpy (sun.sun_path, path);
  cr_assert_eq (connect (fd, (struct sockaddr *) &sun, sizeof sun), 0,
                "connect: %m");
  return fd;
}

/* Read one line from a raw fd (byte by byte: tests only). */
static char *
raw_line (int fd)
{
  char *buf = NULL;
  size_t len = 0;
  FILE *mem = open_memstream (&buf, &len);
  char ch;
  ssize_t r;
  for (;;) {
    r = read (fd, &ch, 1);
    if (r <= 0) {
      fclose (mem);
      free (buf);
      return NULL;
    }
    if (ch == '\n') break;
    fputc (ch, mem);
  }
  fclose (mem);
  return buf;
}

/* A full healthy round trip through the client helpers. */
static void
check_healthy (void)
{
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *c = cbw_ctl_client_connect (sock, &err);
  struct json_object *ret = NULL, *args;
  int cls;

  cr_assert_not_null (c, "connect: %s", err.msg);
  cr_assert_str_eq (cbw_ctl_client_module (c), "testmod");
  args = json_object_new_object ();
  json_object_object_add (args, "s", json_object_new_string ("hello"));
  cr_assert_eq (cbw_ctl_client_execute (c, "echo", args, &ret, &cls, &err), 0,
                "echo: %s", err.msg);
  cr_assert_str_eq (cbw_ctl_arg_str (ret, "s", ""), "hello");
  json_object_put (ret);
  cbw_ctl_client_close (c);
}

Test (socket, round_trip_and_errors, .init = start_server, .fini = stop_server)
{
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *c = cbw_ctl_client_connect (sock, &err);
  struct json_object *ret = NULL, *reply, *args;
  long long before, after;
  int cls;

  cr_assert_not_null (c, "connect: %s", err.msg);
  cr_assert_str_eq (cbw_ctl_client_module (c), "testmod");

  cr_assert_eq (cbw_ctl_client_execute (c, "count", NULL, &ret, &cls, &err), 0);
  before = cbw_ctl_arg_int (ret, "counter", -1);
  json_object_put (ret);
  args = json_object_new_object ();
  json_object_object_add (args, "by", json_object_new_int64 (10));
  cr_assert_eq (cbw_ctl_client_execute (c, "count", args, &ret, &cls, &err), 0);
  after = cbw_ctl_arg_int (ret, "counter", -1);
  json_object_put (ret);
  cr_assert_eq (after, before + 10);

  /* errors come back as classes + errno */
  cr_assert_eq (cbw_ctl_client_execute (c, "nope", NULL, &ret, &cls, &err), -1);
  cr_assert_eq (cls, CBW_CTL_COMMAND_NOT_FOUND);
  cr_assert_eq (err.errnum, ENOTSUP);
  cr_assert_not_null (strstr (err.msg, "CommandNotFound"));
  args = json_object_new_object ();
  json_object_object_add (args, "class", json_object_new_string ("NotFound"));
  cr_assert_eq (cbw_ctl_client_execute (c, "fail", args, &ret, &cls, &err), -1);
  cr_assert_eq (cls, CBW_CTL_NOT_FOUND);
  cr_assert_eq (err.errnum, ENOENT);
  args = json_object_new_object ();
  json_object_object_add (args, "s", json_object_new_int (1));
  cr_assert_eq (cbw_ctl_client_execute (c, "echo", args, &ret, &cls, &err), -1);
  cr_assert_eq (cls, CBW_CTL_INVALID_PARAMETER);
  cr_assert_eq (err.errnum, EINVAL);

  /* raw call returns the whole reply with our id */
  reply = cbw_ctl_client_call (c, "query-commands", NULL, &err);
  cr_assert_not_null (reply);
  cr_assert (json_object_object_get_ex (reply, "return", NULL));
  cr_assert (json_object_object_get_ex (reply, "id", NULL));
  json_object_put (reply);
  cbw_ctl_client_close (c);
}

Test (socket, garbage_then_next_client, .init = start_server,
      .fini = stop_server)
{
  int fd = raw_connect (sock);
  char *l = raw_line (fd);
  struct json_object *o;
  const char garbage[] = "\x01\x02\xff\xfe}{][\n\n{\"execute\":\"none\"}\n";

  cr_assert_not_null (l);
  o = json_tokener_parse (l);
  cr_assert (json_object_object_get_ex (o, "cbw", NULL), "greeting: %s", l);
  json_object_put (o);
  free (l);
  cr_assert_eq (write (fd, garbage, sizeof garbage - 1),
                (ssize_t) sizeof garbage - 1);
  l = raw_line (fd);             /* ParseError for the garbage line */
  o = json_tokener_parse (l);
  cr_assert_str_eq (err_class (o), "ParseError");
  json_object_put (o);
  free (l);
  l = raw_line (fd);             /* the blank line is ignored; next is ok */
  o = json_tokener_parse (l);
  cr_assert_null (err_class (o), "after garbage: %s", l);
  json_object_put (o);
  free (l);
  close (fd);
  check_healthy ();
}

Test (socket, huge_line_drops_client_only, .init = start_server,
      .fini = stop_server)
{
  int fd = raw_connect (sock);
  size_t total = (size_t) CBW_CTL_MAX_LINE + 256 * 1024, sent = 0;
  char *big = malloc (total);
  char *l;
  struct json_object *o;

  free (raw_line (fd));          /* greeting */
  memset (big, 'x', total);
  while (sent < total) {
    ssize_t r = send (fd, big + sent, total - sent, MSG_NOSIGNAL);
    if (r < 0) {
      cr_assert (errno == EPIPE || errno == ECONNRESET, "send: %m");
      break;
    }
    sent += (size_t) r;
  }
  l = raw_line (fd);
  cr_assert_not_null (l, "no ParseError reply before close");
  o = json_tokener_parse (l);
  cr_assert_str_eq (err_class (o), "ParseError");
  json_object_put (o);
  free (l);
  cr_assert_null (raw_line (fd), "connection not closed after huge line");
  close (fd);
  free (big);
  check_healthy ();
}

Test (socket, early_disconnects, .init = start_server, .fini = stop_server)
{
  int i;
  for (i = 0; i < 20; ++i) {
    int fd = raw_connect (sock);
    switch (i % 4) {
    case 0: break;                                   /* before greeting */
    case 1: free (raw_line (fd)); break;             /* after greeting */
    case 2:                                          /* mid-line */
      cr_assert_eq (write (fd, "{\"execute\":\"co", 14), 14);
      break;
    case 3:                                          /* before our reply */
      cr_assert_eq (write (fd, "{\"execute\":\"query-commands\"}\n", 29), 29);
      break;
    }
    close (fd);
  }
  check_healthy ();
}

Test (socket, half_close_still_answered, .init = start_server,
      .fini = stop_server)
{
  int fd = raw_connect (sock);
  char *l;
  struct json_object *o;

  cr_assert_eq (write (fd, "{\"execute\":\"none\",\"id\":1}\n"
                       "{\"execute\":\"none\",\"id\":2}\n{\"exec", 58), 58);
  shutdown (fd, SHUT_WR);
  free (raw_line (fd));          /* greeting */
  for (int i = 1; i <= 2; ++i) {
    l = raw_line (fd);
    cr_assert_not_null (l);
    o = json_tokener_parse (l);
    cr_assert_null (err_class (o));
    struct json_object *id;
    cr_assert (json_object_object_get_ex (o, "id", &id));
    cr_assert_eq (json_object_get_int (id), i);
    json_object_put (o);
    free (l);
  }
  cr_assert_null (raw_line (fd));  /* partial last line discarded, closed */
  close (fd);
}

/* One client pipelines N large-reply requests with non-blocking I/O.
 * Fails (instead of hanging) if the server stops making progress (10 s
 * without a byte moving either way; a slow server on a loaded machine
 * still moves bytes, a wedged one does not): a
 * server that drained its output with complete lines still buffered and
 * then waited for input used to hang here about once in 50 runs, so the
 * test repeats the exchange to make that window likely. */
static void
pipeline_once (void)
{
  enum { N = 2000 };
  int fd = raw_connect (sock);
  struct timespec t0, now;
  char *buf = NULL;
  size_t len = 0;
  FILE *mem = open_memstream (&buf, &len);
  int i;

  for (i = 0; i < N; ++i)
    fprintf (mem, "{\"execute\":\"query-commands\",\"id\":%d}\n", i);
  fclose (mem);
  /* query-commands replies are large: the server must stop reading while
   * we are not reading, without losing requests or replies.  Interleave
   * non-blocking writes and reads. */
  fcntl (fd, F_SETFL, O_NONBLOCK);
  size_t off = 0;
  int got = 0;
  char *rbuf = malloc (1 << 20);
  size_t rlen = 0;
  clock_gettime (CLOCK_MONOTONIC, &t0);
  while (got < N + 1) {
    clock_gettime (CLOCK_MONOTONIC, &now);
    cr_assert_lt (now.tv_sec - t0.tv_sec, 10,
                  "server stalled: no progress for 10 s at %d of %d replies", got - 1, N);
    if (off < len) {
      ssize_t w = send (fd, buf + off, len - off, MSG_NOSIGNAL);
      if (w > 0) { off += (size_t) w; t0 = now; }
    }
    ssize_t r = recv (fd, rbuf + rlen, (1 << 20) - rlen, 0);
    if (r == 0) cr_assert_fail ("server closed");
    if (r > 0) {
      t0 = now;
      rlen += (size_t) r;
      char *nl;
      while ((nl = memchr (rbuf, '\n', rlen)) != NULL) {
        *nl = '\0';
        if (got > 0) {           /* got == 0 is the greeting */
          struct json_object *o = json_tokener_parse (rbuf), *id;
          cr_assert_not_null (o);
          cr_assert (json_object_object_get_ex (o, "id", &id));
          cr_assert_eq (json_object_get_int (id), got - 1);
          json_object_put (o);
        }
        got++;
        size_t used = (size_t) (nl - rbuf) + 1;
        memmove (rbuf, nl + 1, rlen - used);
        rlen -= used;
      }
    }
    else
      usleep (100);
  }
  free (rbuf);
  free (buf);
  close (fd);
}

Test (socket, pipelined_requests_in_order, .init = start_server,
      .fini = stop_server, .timeout = 120)
{
  for (int round = 0; round < 25; ++round)
    pipeline_once ();
  check_healthy ();
}

Test (socket, too_many_clients, .init = start_server, .fini = stop_server)
{
  struct cbw_ctl_client *c[CBW_CTL_MAX_CLIENTS];
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *extra;
  int i;

  for (i = 0; i < CBW_CTL_MAX_CLIENTS; ++i) {
    c[i] = cbw_ctl_client_connect (sock, &err);
    cr_assert_not_null (c[i], "client %d: %s", i, err.msg);
  }
  extra = cbw_ctl_client_connect (sock, &err);
  cr_assert_null (extra, "client %d accepted", CBW_CTL_MAX_CLIENTS + 1);
  cr_assert_eq (err.errnum, EBUSY, "errnum %d: %s", err.errnum, err.msg);
  cr_assert_not_null (strstr (err.msg, "too many"));
  /* all the admitted ones still work */
  for (i = 0; i < CBW_CTL_MAX_CLIENTS; ++i) {
    struct json_object *ret = NULL;
    cr_assert_eq (cbw_ctl_client_execute (c[i], "none", NULL, &ret, NULL,
                                          &err), 0, "%s", err.msg);
    json_object_put (ret);
  }
  cbw_ctl_client_close (c[0]);
  /* the freed slot is reused (the server notices the close asynchronously) */
  for (i = 0; i < 100; ++i) {
    extra = cbw_ctl_client_connect (sock, &err);
    if (extra) break;
    usleep (10000);
  }
  cr_assert_not_null (extra, "slot not freed: %s", err.msg);
  cbw_ctl_client_close (extra);
  for (i = 1; i < CBW_CTL_MAX_CLIENTS; ++i)
    cbw_ctl_client_close (c[i]);
}

Test (socket, stop_with_clients_connected)
{
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *c;
  int fd;

  start_server ();
  c = cbw_ctl_client_connect (sock, &err);
  cr_assert_not_null (c);
  fd = raw_connect (sock);
  cr_assert_eq (write (fd, "{\"exe", 5), 5);
  stop_server ();                /* joins the thread; must not hang */
  /* the client sees EOF, not a hang */
  cr_assert_null (cbw_ctl_client_call (c, "none", NULL, &err));
  cbw_ctl_client_close (c);
  close (fd);
  cbw_ctl_server_stop (NULL);
}

Test (socket, stale_live_and_bad_paths)
{
  struct cbw_err err = { 0 };
  struct cbw_ctl_server *s2;
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  char longpath[200];
  int fd;

  strcpy (dir, "/tmp/cbw-ctl-test.XXXXXX");
  cr_assert_not_null (mkdtemp (dir));
  snprintf (sock, sizeof sock, "%s/ctl.sock", dir);

  /* stale socket: bound, never listened, closed -> file left behind */
  fd = socket (AF_UNIX, SOCK_STREAM, 0);
  strcpy (sun.sun_path, sock);
  cr_assert_eq (bind (fd, (struct sockaddr *) &sun, sizeof sun), 0);
  close (fd);
  cr_assert_eq (access (sock, F_OK), 0);
  srv = cbw_ctl_server_start (sock, &test_table, &mod, &err);
  cr_assert_not_null (srv, "stale socket not replaced: %s", err.msg);
  check_healthy ();

  /* live socket: a second server must refuse, the first keeps working */
  s2 = cbw_ctl_server_start (sock, &test_table, &mod, &err);
  cr_assert_null (s2);
  cr_assert_eq (err.errnum, EADDRINUSE, "%s", err.msg);
  check_healthy ();
  stop_server ();

  /* a regular file in the way is not deleted */
  cr_assert_not_null (mkdtemp (strcpy (dir, "/tmp/cbw-ctl-test.XXXXXX")));
  snprintf (sock, sizeof sock, "%s/ctl.sock", dir);
  fd = open (sock, O_CREAT | O_WRONLY, 0644);
  cr_assert_geq (fd, 0);
  close (fd);
  s2 = cbw_ctl_server_start (sock, &test_table, &mod, &err);
  cr_assert_null (s2);
  cr_assert_eq (err.errnum, EEXIST, "%s", err.msg);
  cr_assert_eq (access (sock, F_OK), 0, "regular file was removed");
  unlink (sock);

  /* too long */
  memset (longpath, 'a', sizeof longpath - 1);
  longpath[0] = '/';
  longpath[sizeof longpath - 1] = '\0';
  s2 = cbw_ctl_server_start (longpath, &test_table, &mod, &err);
  cr_assert_null (s2);
  cr_assert_eq (err.errnum, ENAMETOOLONG);
  cr_assert_not_null (strstr (err.msg, "too long"));
  cr_assert_null (cbw_ctl_client_connect (longpath, &err));
  cr_assert_eq (err.errnum, ENAMETOOLONG);

  /* directory missing */
  s2 = cbw_ctl_server_start ("/nonexistent-dir/x.sock", &test_table, &mod,
                             &err);
  cr_assert_null (s2);
  cr_assert_eq (err.errnum, ENOENT, "%s", err.msg);

  /* connecting to nothing */
  cr_assert_null (cbw_ctl_client_connect (sock, &err));
  cr_assert_eq (err.errnum, ENOENT);
  rmdir (dir);
}

Test (socket, not_a_control_socket)
{
  /* a listener that greets with something else (like an NBD server) */
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct cbw_err err = { 0 };
  int lfd, afd;

  strcpy (dir, "/tmp/cbw-ctl-test.XXXXXX");
  cr_assert_not_null (mkdtemp (dir));
  snprintf (sock, sizeof sock, "%s/other.sock", dir);
  lfd = socket (AF_UNIX, SOCK_STREAM, 0);
  strcpy (sun.sun_path, sock);
  cr_assert_eq (bind (lfd, (struct sockaddr *) &sun, sizeof sun), 0);
  cr_assert_eq (listen (lfd, 1), 0);
  pid_t pid = fork ();
  if (pid == 0) {
    afd = accept (lfd, NULL, NULL);
    if (write (afd, "{\"hello\":1}\n", 12) < 0) _exit (1);
    sleep (2);
    _exit (0);
  }
  cr_assert_null (cbw_ctl_client_connect (sock, &err));
  cr_assert_eq (err.errnum, EPROTO, "%s", err.msg);
  kill (pid, SIGKILL);
  waitpid (pid, NULL, 0);
  close (lfd);
  unlink (sock);
  rmdir (dir);
}

Test (client, timeout)
{
  struct cbw_err err = { 0 };
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct cbw_ctl_client *c;
  int lfd;

  strcpy (dir, "/tmp/cbw-ctl-test.XXXXXX");
  cr_assert_not_null (mkdtemp (dir));
  snprintf (sock, sizeof sock, "%s/mute.sock", dir);
  lfd = socket (AF_UNIX, SOCK_STREAM, 0);
  strcpy (sun.sun_path, sock);
  cr_assert_eq (bind (lfd, (struct sockaddr *) &sun, sizeof sun), 0);
  cr_assert_eq (listen (lfd, 1), 0);
  pid_t pid = fork ();
  if (pid == 0) {
    int afd = accept (lfd, NULL, NULL);
    const char g[] = "{\"cbw\":{\"module\":\"mute\",\"version\":\"0\"}}\n";
    if (write (afd, g, sizeof g - 1) < 0) _exit (1);
    sleep (5);                   /* never answers */
    _exit (0);
  }
  c = cbw_ctl_client_connect (sock, &err);
  cr_assert_not_null (c, "%s", err.msg);
  cbw_ctl_client_set_timeout (c, 200);
  cr_assert_null (cbw_ctl_client_call (c, "x", NULL, &err));
  cr_assert_eq (err.errnum, ETIMEDOUT);
  /* connection is now unusable, reported as such */
  cr_assert_null (cbw_ctl_client_call (c, "x", NULL, &err));
  cr_assert_eq (err.errnum, EPIPE);
  cbw_ctl_client_close (c);
  kill (pid, SIGKILL);
  waitpid (pid, NULL, 0);
  close (lfd);
  unlink (sock);
  rmdir (dir);
}

/* Run fn in a child process as uid/gid 65534 (nobody); its exit status. */
static int
as_nobody (int (*fn) (void))
{
  pid_t pid = fork ();
  cr_assert_geq (pid, 0);
  if (pid == 0) {
    if (setgroups (0, NULL) == -1 || setgid (65534) == -1 || setuid (65534) == -1)
      _exit (100);
    _exit (fn ());
  }
  int st;
  cr_assert_eq (waitpid (pid, &st, 0), pid);
  cr_assert (WIFEXITED (st), "child killed");
  return WEXITSTATUS (st);
}

static int
connect_errno (void)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  strcpy (sun.sun_path, sock);
  if (connect (fd, (struct sockaddr *) &sun, sizeof sun) == 0)
    return 0;
  return errno == EACCES ? 13 : 1;
}

/* Connected as another uid: the only line is PermissionDenied, then EOF. */
static int
connect_denied (void)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  strcpy (sun.sun_path, sock);
  if (connect (fd, (struct sockaddr *) &sun, sizeof sun) == -1)
    return 2;
  const char req[] = "{\"execute\":\"echo\",\"arguments\":{\"s\":\"x\"}}\n";
  if (send (fd, req, sizeof req - 1, MSG_NOSIGNAL) < 0) { /* the server may have closed */ }
  char *line = raw_line (fd);
  if (line == NULL || strstr (line, "\"PermissionDenied\"") == NULL ||
      strstr (line, "\"cbw\"") != NULL)
    return 3;
  free (line);
  line = raw_line (fd);
  return line == NULL ? 0 : 4;  /* closed: no greeting, no reply */
}

/* A control socket is owner-only whatever the umask, and a peer of another
 * uid that gets through (mode widened by hand) is refused before any
 * command: cbwd's control commands run hooks as root. */
Test (socket, owner_only_and_peer_checked)
{
  mode_t old = umask (0);
  start_server ();
  umask (old);
  struct stat st;
  cr_assert_eq (stat (sock, &st), 0);
  cr_assert_eq (st.st_mode & 07777, 0600, "socket mode %o", st.st_mode & 07777);
  if (geteuid () != 0) {
    stop_server ();
    cr_skip_test ("needs root to connect as another uid");
  }
  cr_assert_eq (chmod (dir, 0711), 0);
  cr_assert_eq (as_nobody (connect_errno), 13, "another uid could connect to a 0600 socket");
  cr_assert_eq (chmod (sock, 0666), 0);
  cr_assert_eq (as_nobody (connect_denied), 0, "another uid was served");
  check_healthy ();              /* the owner still is */
  stop_server ();
}
