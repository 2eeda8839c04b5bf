#!/bin/bash
# cbw-faults-kill: see cbw-faults.inc (FAULT=kill), both failure policies.
FAULT=kill
. "$(dirname "$0")/cbw-faults.inc"
