/* cbw — plugin/cbw/cbw.h: state shared by the filter glue (cbw.c) and the
 * control commands (ctl.c).  See cbw.c for the locking. */
#ifndef CBW_FILTER_H
#define CBW_FILTER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <pthread.h>

#include <nbdkit-filter.h>

#include "control.h"
#include "session.h"

struct cbw_config {
  const char *control_path;     /* cbw-control= */
  const char *pit_export;       /* cbw-pit-export=, NULL: not served */
  uint32_t granularity;         /* cbw-granularity=, 0 = auto */
  enum cbw_policy policy;       /* on-cbw-error= */
  int64_t timeout_ns;           /* cbw-timeout= */
  unsigned connections;         /* cbw-connections= */
  unsigned workers;             /* cbw-workers= (write-back copy workers) */
  uint64_t buffer_bytes;        /* cbw-buffer= (break-snapshot write-back) */
  const char *source;           /* cbw-source=: the raw image below, or NULL */
  uint32_t debug_pit_delay_us;  /* cbw-debug-pit-delay-us= (tests) */
  bool debug_no_recheck;        /* cbw-debug-unsafe-no-recheck= (tests) */
};
extern struct cbw_config cbw_cfg;

/* The active session: published and withdrawn only by the control thread
 * with the write gate closed and drained, under cbw_session_lock (which PIT
 * opens take to grab a reference). */
extern _Atomic (struct cbw_session *) cbw_active;
extern pthread_mutex_t cbw_session_lock;
extern nbdkit_backend *cbw_backend;    /* from .after_fork */

extern const struct cbw_ctl_table cbw_ctl_table;

#endif
