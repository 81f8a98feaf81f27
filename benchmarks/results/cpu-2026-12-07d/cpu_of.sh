#!/usr/bin/env bash
# the machine's busy CPU-seconds and wall seconds over a command (run on an otherwise idle machine)
busy() { read -r _ u n s i w q sq st _ < /proc/stat; echo $((u+n+s+q+sq+st)); }
b0=$(busy); t0=$(date +%s.%N)
"$@" > /tmp/cpu_of.out 2>&1; rc=$?
b1=$(busy); t1=$(date +%s.%N)
echo "rc=$rc busy_cpu_s=$(echo "($b1-$b0)/$(getconf CLK_TCK)" | bc -l | xargs printf %.1f) wall_s=$(echo "$t1-$t0" | bc -l | xargs printf %.1f) :: $*"
