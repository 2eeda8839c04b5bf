/* cbw — server/orch/tests/orch_test_util.h: set-up shared by the
 * orchestrator's unit tests (no nbdkit): a scratch state directory with an
 * empty module directory (so a disk that must really start fails at its
 * nbdkit start, by name), an orchestrator on it, and control requests
 * dispatched on the test thread.
 * Locking: none; everything runs on the Criterion test thread.  Failures
 * are Criterion assertions. */
#ifndef CBW_ORCH_TEST_UTIL_H
#define CBW_ORCH_TEST_UTIL_H

#include <stddef.h>
#include <json-c/json.h>

#include "orch_internal.h"

/* Make /tmp/cbw-TAG.XXXXXX into dir (size bytes). */
void orch_test_mkdtemp (char *dir, size_t size, const char *tag);
/* Open an orchestrator with state in dir and DIR/no-modules as modules. */
struct cbw_orch *orch_test_open (const char *dir);
/* rm -rf dir. */
void orch_test_rm_rf (const char *dir);
/* One control request line through the command table; the parsed reply. */
struct json_object *orch_test_call (struct cbw_orch *o, const char *line);

#endif
