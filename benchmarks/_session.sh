# Shared by the device-session scripts (gpu_session.sh, multi_gpu_session.sh): source it after setting OUT.
# step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output to $OUT/NAME.log (with its exit
# status), and print the log's last lines without JSON rows and warnings.
# want STEP-NAMES...: whether $STEP is among the names (all steps when none are given).
step() {
    local name=$1 secs=$2; shift 2
    echo "== $name ($(date -u +%H:%M:%S))"
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "rc=$rc" >> "$OUT/$name.log"
    grep -v '^{' "$OUT/$name.log" | grep -v -i 'warn' | tail -12
    return $rc
}
want() { [ $# -eq 0 ] || [[ " $* " == *" $STEP "* ]]; }
