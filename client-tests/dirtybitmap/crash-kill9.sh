#!/bin/bash
# cbw — client-tests/dirtybitmap/crash-kill9.sh: kill -9 crash rounds (see crash-common.sh).
MODE=kill9
. "$(dirname "$0")/crash-common.sh"
