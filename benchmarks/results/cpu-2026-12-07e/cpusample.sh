#!/bin/bash
# busy % of the machine every 10 s -> $1
out=$1
read -r _ a b c d e f g h _ < /proc/stat
prev_total=$((a+b+c+d+e+f+g+h)); prev_idle=$((d+e))
while [ ! -e /tmp/stop_sampler ]; do
  sleep 10
  read -r _ a b c d e f g h _ < /proc/stat
  total=$((a+b+c+d+e+f+g+h)); idle=$((d+e))
  dt=$((total-prev_total)); di=$((idle-prev_idle))
  echo "$(date +%T) $(( (dt-di)*100/dt ))" >> "$out"
  prev_total=$total; prev_idle=$idle
done
