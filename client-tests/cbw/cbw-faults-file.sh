#!/bin/bash
# cbw-faults-file: see cbw-faults.inc (FAULT=file), both failure policies.
FAULT=file
. "$(dirname "$0")/cbw-faults.inc"
