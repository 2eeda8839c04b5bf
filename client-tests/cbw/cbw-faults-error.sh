#!/bin/bash
# cbw-faults-error: see cbw-faults.inc (FAULT=error), both failure policies.
FAULT=error
. "$(dirname "$0")/cbw-faults.inc"
