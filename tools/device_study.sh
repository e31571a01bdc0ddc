#!/usr/bin/env bash
# Convergence study on the device machine, spread over chained `run` calls of <= 10 minutes.
#   tools/device_study.sh start SECONDS   launch the study in its own session (it outlives the call
#                                         while the machine stays held), then watch it
#   tools/device_study.sh watch SECONDS   watch an already running study
# Each call copies the small results (metrics, logs, summary, curves) to $OUT/study.tgz.
set -u
mode=$1; seconds=$2
root=${STUDY_ROOT:-/tmp/study}
steps=${STUDY_STEPS:-1000}
start=$(date +%s)
if [ "$mode" = start ]; then
  mkdir -p "$root"
  setsid nohup python3 -m lowbit.study --config small --steps "$steps" --workdir "$root" --jobs 9 --take-turns \
    checkpoint_every=0 >"$root/study.log" 2>&1 < /dev/null &
  echo "started study pid $! at $(date -u +%FT%TZ)"
fi
save() {
  (cd "$root" && tar czf "${OUT:-/tmp}/study.tgz" --exclude=checkpoints --exclude=xla_cache .) 2>/dev/null
}
while :; do
  now=$(date +%s); elapsed=$((now - start))
  line="t=${elapsed}s"
  for d in "$root"/*/; do
    r=$(basename "$d"); [ "$r" = xla_cache ] && continue
    s=$(tail -n 5 "$d/metrics.jsonl" 2>/dev/null | grep -o '"step": [0-9]*' | tail -1 | grep -o '[0-9]*$')
    line="$line $r=${s:-0}"
  done
  mem=$(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader 2>/dev/null | tr -d ' ')
  echo "$line gpu=$mem"
  save
  if [ -f "$root/summary.md" ]; then echo "study complete"; cat "$root/summary.md"; break; fi
  if ! pgrep -f "lowbit.study" >/dev/null; then echo "no study process running"; tail -n 30 "$root/study.log"; break; fi
  [ $elapsed -ge "$seconds" ] && break
  sleep 30
done
save
grep -h -i "error\|Traceback" "$root"/*.log 2>/dev/null | head -20
