#!/bin/bash
# cbw — client-tests/dirtybitmap/chain.sh: the dirtybitmap filter on top of
# the cbw chain plugin: kill -9 crash rounds (see crash-common.sh), fewer of
# them since crash-kill9.sh covers the filter itself.  Skipped if the chain
# plugin is not built.
MODE=kill9
USE_CHAIN=1
CBW_DBM_ROUNDS=${CBW_DBM_ROUNDS:-5}
. "$(dirname "$0")/crash-common.sh"
