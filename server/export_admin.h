/* cbw — server/export_admin.h: fills the orchestrator's struct
 * cbw_orch_exports (server/orch/orch_exports.h) with cbwd's run-time export
 * API, so the orchestrator running inside cbwd publishes store and PIT
 * exports here.  Threads: see export_admin.c. */
#ifndef CBWD_EXPORT_ADMIN_H
#define CBWD_EXPORT_ADMIN_H

#include "orch/orch_exports.h"

struct cbwd_server;
void cbwd_orch_exports_init (struct cbw_orch_exports *x, struct cbwd_server *srv);

#endif
