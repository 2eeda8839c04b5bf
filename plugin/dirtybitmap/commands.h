/* cbw — plugin/dirtybitmap/commands.h: the control-socket command table of
 * the dirtybitmap filter (the one source of truth for its commands; the
 * reference docs/control/dirtybitmap.md is generated from it).
 *
 * Locking: the handlers only call dbm_tracker_* functions, which take the
 * tracker's own locks; module_data is the struct dbm_tracker *.
 */
#ifndef CBW_DBM_COMMANDS_H
#define CBW_DBM_COMMANDS_H

#include "control.h"

#define DBM_EXTENTS_DEFAULT 1024
#define DBM_EXTENTS_MAX 65536

extern const struct cbw_ctl_table dbm_ctl_table;

#endif
