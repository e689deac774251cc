#!/usr/bin/env bash
# benches/fleet.sh [--quick] — what shared counters cost: keygate with a rate-limited key whose
# bucket lives in Redis ([cluster], a local redis-server) or in a [state] file, beside keygate
# with an unlimited key, with and without [cluster] configured — all in the same run, rounds
# interleaved, so the ratios hold on a busy machine where absolute figures do not.
#
#   benches/fleet.sh           3 rounds × 10 s per target
#   benches/fleet.sh --quick   1 round × 2 s per target (checks that the instrument works)
#
# Targets (keygate `[server] workers = 1`, RUST_LOG=warn, one key, nginx `return 200` upstream):
#   unlimited             no rate limit, no [cluster]: the baseline
#   unlimited +cluster    no rate limit, [cluster] configured: must not touch Redis at all
#   limited memory        rate_limit + quota, counts in memory
#   limited state         rate_limit + quota, [state] file
#   limited cluster       rate_limit + quota, [cluster] on a local redis-server: one script
#                         call (one round trip) per request
# The limits are far above what the machine can send, so nothing is refused: this measures the
# bookkeeping, not the 429 path. wrk: -t1 -c64 (closed loop), requests/s and p99, and the CPU
# time keygate and redis-server spent per request (utime+stime from /proc): on a machine
# shared with other work, CPU per request moves far less than requests/s does.
#
# Environment: FLEET_ROUNDS, FLEET_DURATION (s), FLEET_CONNECTIONS, FLEET_PROFILE (cargo
# profile; default release, dev with --quick). Needs wrk, nginx and redis-server (Debian:
# apt-get install wrk nginx-light redis-server; installed when missing and root).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
[[ ${1:-} == --quick ]] && QUICK=1
ROUNDS=${FLEET_ROUNDS:-$( ((QUICK)) && echo 1 || echo 3)}
DURATION=${FLEET_DURATION:-$( ((QUICK)) && echo 2 || echo 10)}
CONNECTIONS=${FLEET_CONNECTIONS:-64}
PROFILE=${FLEET_PROFILE:-$( ((QUICK)) && echo dev || echo release)}

log() { printf '[fleet] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

missing=()
for tool in wrk:wrk nginx:nginx-light redis-server:redis-server curl:curl; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
  ((EUID == 0)) || die "missing ${missing[*]}: apt-get install -y ${missing[*]}"
  apt-get update && apt-get install -y "${missing[@]}"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

log "building keygate (cargo build --profile $PROFILE --locked)"
(cd "$ROOT" && cargo build --profile "$PROFILE" --locked) >&2
dir=$PROFILE; [[ $PROFILE == dev ]] && dir=debug
KEYGATE=$ROOT/target/$dir/keygate

# The upstream: one nginx worker answering 200.
UPSTREAM_PORT=$(free_port)
mkdir -p "$TMP/nginx/tmp"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  client_body_temp_path $TMP/nginx/tmp;
  proxy_temp_path $TMP/nginx/tmp;
  fastcgi_temp_path $TMP/nginx/tmp;
  uwsgi_temp_path $TMP/nginx/tmp;
  scgi_temp_path $TMP/nginx/tmp;
  server { listen 127.0.0.1:$UPSTREAM_PORT; location / { return 200 "ok\n"; } }
}
EOF
nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" &
PIDS+=($!)

# Redis, persistence off.
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" >/dev/null &
REDIS_PID=$!
PIDS+=($REDIS_PID)
for _ in $(seq 100); do
  [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null || true) == PONG ]] && break
  sleep 0.05
done

KEY=bench-key-0123456789abcdef
HASH=$(printf %s "$KEY" | "$KEYGATE" keys hash)

# write_target NAME EXTRA_SECTIONS KEY_FIELDS
write_target() {
  local name=$1 extra=$2 fields=$3 d="$TMP/$1"
  mkdir -p "$d"
  cat >"$d/keygate.toml" <<EOF
[server]
listen = "127.0.0.1:0"
workers = 1
[admin]
listen = "127.0.0.1:0"
$extra
[auth]
keys_file = "keys.toml"
[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
EOF
  printf '[[keys]]\nid = "bench"\nname = "bench"\nhash = "%s"\nscopes = []\n%s' "$HASH" "$fields" >"$d/keys.toml"
}

CLUSTER=$(printf '[cluster]\nredis = "redis://127.0.0.1:%s/0"\nnamespace = "bench"\ntimeout = "50ms"\n' "$REDIS_PORT")
STATE=$(printf '[state]\npath = "keygate.state"\n')
LIMITS=$(printf 'rate_limit = "100000000/s"\nquota = "1000000000000/month"\n')
TARGETS=("unlimited" "unlimited +cluster" "limited memory" "limited state" "limited cluster")
write_target t0 "" ""
write_target t1 "$CLUSTER" ""
write_target t2 "" "$LIMITS"
write_target t3 "$STATE" "$LIMITS"
write_target t4 "$CLUSTER" "$LIMITS"

# CPU ticks (utime + stime) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# Script calls Redis has served so far (EVALSHA and EVAL).
script_calls() {
  redis-cli -p "$REDIS_PORT" info commandstats |
    awk -F'[=,:]' '/^cmdstat_(evalsha|eval):/ {n += $3} END {print n + 0}'
}

# run_target INDEX → "rps p99_ms keygate_cpu_us_per_request redis_cpu_us_per_request
# requests_per_script_call"
run_target() {
  local d="$TMP/t$1"
  rm -f "$d/keygate.state"
  # Only the server's own lines at info: "listening on ADDR", no access events.
  # Not on this function's stdout (the caller reads it to its end), and stopped however the
  # function ends.
  RUST_LOG=warn,keygate::server=info "$KEYGATE" serve -c "$d/keygate.toml" >/dev/null 2>"$d/log" &
  local pid=$!
  trap "kill $pid 2>/dev/null || true" EXIT
  local addr=""
  for _ in $(seq 200); do
    addr=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$d/log" 2>/dev/null | grep -v admin | head -1 | awk '{print $3}' || true)
    [[ -n $addr ]] && break
    sleep 0.05
  done
  [[ -n $addr ]] || die "keygate ($d) did not start: $(cat "$d/log")"
  local check
  check=$(curl -s -o /dev/null -w '%{http_code}' -H "x-api-key: $KEY" "http://$addr/warm" || true)
  [[ $check == 200 ]] || die "target t$1 answered $check"
  local out k0 r0 k1 r1 c0 c1
  k0=$(cpu_ticks "$pid"); r0=$(cpu_ticks "$REDIS_PID"); c0=$(script_calls)
  out=$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "x-api-key: $KEY" "http://$addr/x") ||
    die "target t$1: wrk failed: $out"
  k1=$(cpu_ticks "$pid"); r1=$(cpu_ticks "$REDIS_PID"); c1=$(script_calls)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local rps p99 total
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; print v}' <<<"$out")
  local non2xx
  non2xx=$(awk '/Non-2xx/ {print $4}' <<<"$out")
  [[ -z $non2xx ]] || die "target t$1: $non2xx non-2xx answers"
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  echo "$rps $p99 $(awk -v d=$((k1 - k0)) -v n="$total" -v hz="$HZ" 'BEGIN {printf "%.1f", d / hz / n * 1e6}') \
    $(awk -v d=$((r1 - r0)) -v n="$total" -v hz="$HZ" 'BEGIN {printf "%.1f", d / hz / n * 1e6}') \
    $(awk -v c=$((c1 - c0)) -v n="$total" 'BEGIN {if (c > 0) printf "%.1f", n / c; else print 0}')"
}

declare -A RPS P99 KCPU RCPU BATCH
COUNT=${#TARGETS[@]}
for round in $(seq "$ROUNDS"); do
  # Each round starts one target later, so no target always runs first (or right after the
  # same neighbour): position effects fall on every target alike.
  for k in $(seq 0 $((COUNT - 1))); do
    i=$(((k + round - 1) % COUNT))
    log "round $round: ${TARGETS[$i]}"
    read -r rps p99 kcpu rcpu batch < <(run_target "$i") || die "target ${TARGETS[$i]} gave no figures"
    RPS[$i]+="$rps "
    P99[$i]+="$p99 "
    KCPU[$i]+="$kcpu "
    RCPU[$i]+="$rcpu "
    BATCH[$i]+="$batch "
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

printf '\n%-20s %12s %10s %10s %10s %14s %12s %14s\n' target "requests/s" "p99 ms" "rps ratio" "p99 ratio" \
  "keygate µs/req" "redis µs/req" "req/Redis call"
base_rps=$(median <<<"${RPS[0]}")
base_p99=$(median <<<"${P99[0]}")
for i in "${!TARGETS[@]}"; do
  rps=$(median <<<"${RPS[$i]}")
  p99=$(median <<<"${P99[$i]}")
  printf '%-20s %12.0f %10.2f %10.2f %10.2f %14.1f %12.1f %14s\n' "${TARGETS[$i]}" "$rps" "$p99" \
    "$(awk -v a="$rps" -v b="$base_rps" 'BEGIN {print a/b}')" "$(awk -v a="$p99" -v b="$base_p99" 'BEGIN {print a/b}')" \
    "$(median <<<"${KCPU[$i]}")" "$(median <<<"${RCPU[$i]}")" "$(median <<<"${BATCH[$i]}" | awk '{print ($1 > 0) ? $1 : "—"}')"
done
printf '(medians of %s round(s) × %s s, wrk -t1 -c%s, profile %s, ratios against "unlimited")\n' \
  "$ROUNDS" "$DURATION" "$CONNECTIONS" "$PROFILE"
