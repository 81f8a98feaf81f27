#!/bin/bash
# /tmp/run1.sh NAME REV: fresh clone of /work/main at REV, the whole suite with its timeline, CPU sampled
NAME=$1; REV=$2
rm -rf /work/clone$NAME
git clone -q /work/main /work/clone$NAME && cd /work/clone$NAME && git checkout -q $REV
/tmp/cpusample.sh /work/suite_$NAME.cpu &
SP=$!
start=$(date +%s); echo "$NAME $REV start $(date +%T)" >> /work/runs.status
SUITE_TIMELINE=/work/suite_$NAME.timeline PYTHONPATH=benchmarks bash scripts/test.sh -p suite_timeline > /work/suite_$NAME.log 2>&1
rc=$?
end=$(date +%s)
kill $SP
echo "$NAME $REV rc=$rc wall=$((end-start))s end $(date +%T)" >> /work/runs.status
