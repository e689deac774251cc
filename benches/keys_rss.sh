#!/usr/bin/env bash
# benches/keys_rss.sh [KEYGATE…] — memory and time of loading a large key file: for each binary
# (default: target/release/keygate), `keygate serve` with workers = 1 on a file of 1,000,000
# keys, then SIGHUP reloads. Prints, per binary:
#
#   start s       spawn → "listening on" logged (the whole key load, single process)
#   CPU s         the CPU time (user + system, all threads) that start-up took
#   peak start    VmHWM right after start-up: the peak of the first load
#   RSS start     VmRSS right after start-up
#   reload ms     median of keygate's own elapsed_ms over the reloads (includes its 20 ms settle)
#   reload CPU s  median CPU time of one reload (the process is otherwise idle)
#   peak reload   VmHWM after the reloads: a reload holds the running table and the new one's
#                 load at once, so this is the process's true peak
#   RSS reload    VmRSS after the last reload
#
# Several binaries are measured in turn on the same file, so a before/after pair compares:
#   git worktree add /tmp/kg-old main && (cd /tmp/kg-old && cargo build --release)
#   benches/keys_rss.sh /tmp/kg-old/target/release/keygate target/release/keygate
#
# Times on a shared machine move with its load; memory does not. CPU times move less than wall
# times, and KEYS_RSS_ROUNDS=N (default 1) measures the binaries in turn N times, then prints
# the medians over rounds, so a busy spell hits every binary alike.
#
# Environment: KEYS_RSS_COUNT (default 1000000), KEYS_RSS_RELOADS (default 3),
# KEYS_RSS_FORMAT=plain (default: benches/load/genkeys.py's entries — id, name, hash, one
# scope) or rich (also tail, two scopes, created_at, expires_at and a distinct name, as
# `keygate keys create` writes them), KEYS_RSS_KEEP_TMP=1 (keep the folder and logs).
# Loopback only; no upstream runs (a valid key gets 502, which is how the check below tells
# it from an unknown key's 401). Needs python3 and curl.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
COUNT=${KEYS_RSS_COUNT:-1000000}
RELOADS=${KEYS_RSS_RELOADS:-3}
ROUNDS=${KEYS_RSS_ROUNDS:-1}
CLK_TCK=$(getconf CLK_TCK)
FORMAT=${KEYS_RSS_FORMAT:-plain}
readonly START_TIMEOUT_S=180 RELOAD_TIMEOUT_S=120

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 0
fi
BINARIES=("$@")
((${#BINARIES[@]})) || BINARIES=("$ROOT/target/release/keygate")
for binary in "${BINARIES[@]}"; do
  [[ -x $binary ]] || { echo "keys_rss: $binary is not an executable (cargo build --release?)" >&2; exit 1; }
done
command -v curl >/dev/null || { echo "keys_rss: needs curl (apt-get install curl)" >&2; exit 1; }

WORK=$(mktemp -d -t keygate-rss.XXXXXX)
GATEWAY_PID=""
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  [[ -n $GATEWAY_PID ]] && kill -KILL "$GATEWAY_PID" 2>/dev/null
  if [[ ${KEYS_RSS_KEEP_TMP:-0} == 1 ]]; then echo "kept $WORK" >&2; else rm -rf -- "$WORK"; fi
  exit "$status"
}
trap cleanup EXIT INT TERM

log() { printf '[keys_rss %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
field_kb() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$2/status"; }
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
secs() { awk -v v="$1" -v d="$2" 'BEGIN { printf "%.2f", v / d }'; }
# utime + stime of the process, in clock ticks (keygate's comm has no spaces).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : "-") }'; }

# wait_for_count PATTERN N TIMEOUT_S: until the log holds N lines matching PATTERN.
wait_for_count() {
  local deadline=$(($(date +%s) + $3))
  while (($(grep -c -- "$1" "$WORK/keygate.log" || true) < $2)); do
    kill -0 "$GATEWAY_PID" 2>/dev/null || { tail -5 "$WORK/keygate.log" >&2; log "keygate exited"; exit 1; }
    (($(date +%s) < deadline)) || { tail -5 "$WORK/keygate.log" >&2; log "no $1 within $3 s"; exit 1; }
    sleep 0.01
  done
}

log "writing $COUNT keys ($FORMAT)"
case $FORMAT in
  plain)
    python3 "$SCRIPT_DIR/load/genkeys.py" "$WORK/gen" "$COUNT"
    mv "$WORK/gen/keys-$COUNT.toml" "$WORK/keys.toml"
    rm -rf "$WORK/gen"
    ;;
  rich)
    python3 - "$WORK/keys.toml" "$COUNT" <<'EOF'
import hashlib, sys
path, count = sys.argv[1], int(sys.argv[2])
with open(path, "w", encoding="ascii") as f:
    for start in range(0, count, 50_000):
        out = []
        for i in range(start, min(start + 50_000, count)):
            key = f"bench-key-{i}"
            digest = hashlib.sha256(key.encode()).hexdigest()
            out.append(
                f'[[keys]]\nid = "k{i:07d}"\nname = "customer-k{i:07d}"\nhash = "sha256:{digest}"\n'
                f'tail = "{key[-6:]}"\nscopes = ["read", "write"]\ncreated_at = 2026-11-22T10:00:00Z\n'
                f'expires_at = 2036-11-22T10:00:00Z\n\n'
            )
        f.write("".join(out))
EOF
    ;;
  *) log "KEYS_RSS_FORMAT is plain or rich, not $FORMAT"; exit 2 ;;
esac
log "key file: $(($(stat -c %s "$WORK/keys.toml") >> 20)) MiB"

HEADER=$(printf '%-40s %8s %7s %6s %12s %10s %9s %12s %12s %11s' binary keys "start s" "CPU s" "peak start" \
  "RSS start" "reload ms" "reload CPU s" "peak reload" "RSS reload")
row() { # NAME START_MS START_TICKS HWM RSS RELOAD_MS RELOAD_TICKS HWM RSS
  local name=$1
  ((${#name} <= 40)) || name="…${name: -39}"
  printf '%-40s %8s %7s %6s %9s MB %7s MB %9s %12s %9s MB %8s MB\n' "$name" "$COUNT" "$(secs "$2" 1000)" \
    "$(secs "$3" "$CLK_TCK")" "$(mb "$4")" "$(mb "$5")" "$6" "$(secs "$7" "$CLK_TCK")" "$(mb "$8")" "$(mb "$9")"
}

RESULTS=() # per binary: "start_ms start_ticks hwm rss reload_ms reload_ticks hwm rss;" per round
echo "$HEADER"
for ((round = 1; round <= ROUNDS; round++)); do
  for b in "${!BINARIES[@]}"; do
    binary=${BINARIES[$b]}
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat >"$WORK/keygate.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
workers = 1

[auth]
keys_file = "keys.toml"
sources = ["header:x-api-key"]

[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:9"
TOML
    : >"$WORK/keygate.log"
    started=$(now_ms)
    RUST_LOG=info NO_COLOR=1 "$binary" serve -c "$WORK/keygate.toml" 2>"$WORK/keygate.log" >/dev/null &
    GATEWAY_PID=$!
    wait_for_count "listening on" 1 "$START_TIMEOUT_S"
    start_ms=$(($(now_ms) - started))
    start_ticks=$(cpu_ticks "$GATEWAY_PID")
    hwm_start=$(field_kb VmHWM "$GATEWAY_PID")
    rss_start=$(field_kb VmRSS "$GATEWAY_PID")

    # The table works: the last key is found (502: no upstream), an unknown one is not (401).
    last=$(curl -s -o /dev/null -w '%{http_code}' -H "x-api-key: bench-key-$((COUNT - 1))" "http://127.0.0.1:$port/")
    unknown=$(curl -s -o /dev/null -w '%{http_code}' -H "x-api-key: not-a-key-$COUNT" "http://127.0.0.1:$port/")
    [[ $last == 502 && $unknown == 401 ]] || {
      log "$binary: last key → $last (want 502), unknown → $unknown (want 401)"
      exit 1
    }

    loads=() ticks=()
    for ((r = 1; r <= RELOADS; r++)); do
      before=$(cpu_ticks "$GATEWAY_PID")
      kill -HUP "$GATEWAY_PID"
      wait_for_count "configuration reloaded" "$r" "$RELOAD_TIMEOUT_S"
      ticks+=("$(($(cpu_ticks "$GATEWAY_PID") - before))")
      loads+=("$(grep "configuration reloaded" "$WORK/keygate.log" | sed -n "${r}s/.*elapsed_ms=\([0-9]*\).*/\1/p")")
    done
    hwm_reload=$(field_kb VmHWM "$GATEWAY_PID")
    rss_reload=$(field_kb VmRSS "$GATEWAY_PID")
    kill -TERM "$GATEWAY_PID"
    wait "$GATEWAY_PID" 2>/dev/null || true
    GATEWAY_PID=""
    result="$start_ms $start_ticks $hwm_start $rss_start $(median "${loads[@]}") $(median "${ticks[@]}") $hwm_reload $rss_reload"
    RESULTS[b]="${RESULTS[b]:-}$result;"
    # shellcheck disable=SC2086 # the fields, one argument each
    row "$binary" $result
    log "round $round, $binary: reloads elapsed_ms ${loads[*]}"
  done
done

if ((ROUNDS > 1)); then
  echo "medians over $ROUNDS rounds:"
  echo "$HEADER"
  for b in "${!BINARIES[@]}"; do
    medians=()
    for col in 1 2 3 4 5 6 7 8; do
      # shellcheck disable=SC2046 # one value per round
      medians+=("$(median $(tr ';' '\n' <<<"${RESULTS[b]}" | awk -v c="$col" 'NF { print $c }'))")
    done
    row "${BINARIES[$b]}" "${medians[@]}"
  done
fi
