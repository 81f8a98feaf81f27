#!/usr/bin/env bash
# follow-ups for the families the higher lr did not improve
cd /work/main
export GENPIPE_HOME=/tmp/cpuhome16
while pgrep -f /work/b16/run.sh > /dev/null; do sleep 5; done
for pair in "realnvp:model.lr=5e-4" "ebm:model.buffer_size=1000"; do
  f=${pair%%:*}; ch=${pair#*:}
  echo "$(date +%T) start $f $ch" >> /work/b16/status
  .venv/bin/python benchmarks/cpu_commands.py --change $ch $f > /work/b16/${f}_2.log 2>&1
  echo "$(date +%T) end $f rc=$?" >> /work/b16/status
done
.venv/bin/genpipe head stop
