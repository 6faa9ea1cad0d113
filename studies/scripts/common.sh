# Sourced by the scripts here: one torch thread per process (runs share the 2 cores), and `t NAME CMD...`,
# which runs CMD and appends "NAME <seconds>" to $OUT/times.txt.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
t() { local name=$1; shift; local s=$(date +%s); "$@"; echo "$name $(( $(date +%s) - s ))" >> "$OUT/times.txt"; }
