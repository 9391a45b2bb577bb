# Sourced by the device scripts (device_check.sh, device_async.sh): their
# stages, each with its own time limit within the script's budget. Needs
# START (the script's $SECONDS at its start) and BUDGET (seconds in all);
# MIN_STAGE_S (default 30): a stage with less time left is skipped.
say() { echo "[$((SECONDS - START)) s] $*"; }
left() { echo $((BUDGET - (SECONDS - START))); }
# Runs "$@" with at most $1 seconds (capped by what is left), or skips it.
stage() {
  local limit="$1"
  shift
  local allowed
  allowed=$(left)
  [ "$allowed" -gt "$limit" ] && allowed="$limit"
  if [ "$allowed" -lt "${MIN_STAGE_S:-30}" ]; then
    say "SKIPPED (only $(left) s left): $*"
    return 0
  fi
  say "start (limit ${allowed} s): $*"
  timeout --signal=INT --kill-after=10 "$allowed" "$@"
  say "exit status $?: $1 ..."
}
