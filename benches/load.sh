#!/usr/bin/env bash
# benches/load.sh [--quick] [--pinned | --unpinned] — keygate under load beside nginx doing
# the same job, on this one machine, in one run. Prints the tables (medians over the rounds),
# keygate/nginx ratios against issue 17's goals, and writes an SVG chart.
#
#   benches/load.sh             3 rounds × 8 s per target, pinned and unpinned (about 13 min)
#   benches/load.sh --quick     1 round × 2 s per target, debug build, for CI: exits 0 only if
#                               every target started and every check passed (never on a ratio)
#   benches/load.sh --pinned    only the pinned table;  --unpinned: only the unpinned one
#
# Targets (all on 127.0.0.1, driven with the same load, round-robin, so drift over the run hits
# every target alike):
#   direct        the upstream alone: nginx, one worker, `return 200 "ok\n"`, no access log
#   keygate       1 / 10,000 / 1,000,000 keys, `[server] workers = 1`, RUST_LOG=warn
#   nginx map     1 / 1,000,000 keys: `map $http_x_api_key`, 401 otherwise, key stripped,
#                 identity header added, keep-alive upstream, one worker, no access log
#   rejections    unknown keys and `kg_` keys with a bad checksum, against keygate (1M keys)
#                 and nginx (1M map): every answer must be 401 and the upstream untouched
#   HTTP/2 / TLS  h2load (one thread, LOAD_H2_CONNS × LOAD_H2_STREAMS, one valid key) against
#                 keygate (`tls_cert`/`tls_key`, workers = 1, 1 key) and nginx (`listen … ssl
#                 http2`, the same map, one worker), both with the same self-signed certificate
#   workers = 2   (unpinned only) keygate with `workers = 2`, over HTTP/1.1 (wrk) and HTTP/2
#                 over TLS (h2load), beside the same targets with `workers = 1`
#
# Two placements, each its own table, interleaved in every round:
#   pinned     the proxy (keygate, or the nginx proxy's master and worker) on CPU 0, the
#              upstream and the load generator on CPU 1: each proxy has one core of its own
#   unpinned   nothing pinned: the scheduler places every process, as on a shared host
#
# For 10k and 1M keys the requests cycle through 10,000 distinct valid keys spread across
# the table (benches/load/genkeys.py), so lookups do not all hit one hot cache line.
#
# Measured per run: requests/s, latency p50/p99/p99.9 (wrk, closed loop; h2load's per-request
# log), the proxy's CPU seconds per 100,000 requests (utime+stime from /proc/PID/stat; nginx:
# its worker) and its peak RSS (VmHWM; nginx: its worker, which shares the map with the idle
# master).
#
# Output: the report goes to stdout and, with the raw figures (results.tsv) and the chart
# (load.svg: requests/s and p50/p99/p99.9 per target, keygate beside nginx), into LOAD_OUT
# (default target/load/).
#
# Environment overrides: LOAD_ROUNDS, LOAD_DURATION (s), LOAD_WARMUP (s), LOAD_CONNECTIONS,
# LOAD_THREADS (wrk), LOAD_H2_CONNS (10), LOAD_H2_STREAMS (20), LOAD_OUT, LOAD_PIN=0 (same as
# --unpinned), LOAD_KEEP_TMP=1 (keep the temporary folder, for the logs), LOAD_PROFILE (cargo
# profile to build), LOAD_NO_BUILD=1 (use the binary already in target/, e.g. one copied in),
# LOAD_ONLY=kg-1,ng-1,… (only these targets; names in the Targets section of the script).
#
# Before/after: LOAD_BASELINE=/path/to/another/keygate adds a target "keygate (baseline)",
# that binary with 1 key, measured in the same rounds right after keygate's own 1-key run
# (pinned), and a ratio line. On a shared machine only such interleaved figures compare two
# builds: e.g.
#   git worktree add /tmp/kg-old HEAD~3 && (cd /tmp/kg-old && cargo build --release)
#   LOAD_BASELINE=/tmp/kg-old/target/release/keygate benches/load.sh
#
# Needs: root on a clean Debian/Ubuntu (it installs nginx-light, wrk, nghttp2-client (h2load),
# openssl, curl, python3 if missing), and cargo. Every process it starts is stopped on exit;
# temporary files live in one `mktemp -d` folder that is removed on exit.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
readonly SCRIPT_DIR ROOT
readonly ASSETS=$SCRIPT_DIR/load

# ---------------------------------------------------------------------------------------------
# Load shape.
#
# Why wrk: it holds a fixed number of keep-alive connections, each sending its next request as
# soon as the previous answer arrives (a closed loop, like a pool of API clients); its LuaJIT
# hooks let every request carry a different key (request()) and report what we need in one
# parseable line (done(): counts, errors, latency:percentile() — p99.9 included — from its
# exact per-microsecond latency histogram); and it is a Debian package (apt-get install wrk).
# Being closed-loop, its latencies include queueing behind the 64 in-flight requests and do
# not correct for coordinated omission (wrk2 would, at a fixed rate; it is not packaged).
#
# -t1 -c64: the machine this was written on has 2 cores, shared by wrk, the proxy and the
# upstream, each given one thread/worker. One wrk thread keeps wrk to one core's worth of work;
# 64 connections keep the proxy busy without measuring mostly queueing.
#
# Why h2load for the HTTP/2-over-TLS row: it is nghttp2's own load generator (a Debian package),
# it multiplexes many streams on few connections the way HTTP/2 clients do, and its
# --log-file gives every request's latency, from which the same percentiles are taken. It runs
# time-bounded (-D) with one thread, as wrk does, and sends one valid key.
#
# Placement. Pinned: once a target is up, the proxy (keygate, or the nginx proxy's master and
# worker) is pinned to CPU 0 and the upstream and the load generator to CPU 1, so each proxy
# has exactly one core of its own (= its one worker) and the client side the other. Unpinned,
# three busy threads on two cores preempt each other about once per request, and the
# throughput measures the scheduler as much as the proxy; it is what a shared host sees, so it
# is a table of its own. Every round runs the pinned targets, then unpins every process and
# runs the unpinned ones, so both tables see the same drift. Processes are pinned only after
# they are ready, so key loading runs (and peaks in memory) as in production. The "CPU %"
# column shows whether the proxy was the bottleneck (near 100% for one worker) or not.
# ---------------------------------------------------------------------------------------------
QUICK=0
PHASES=(pinned unpinned)
[[ ${LOAD_PIN:-1} != 0 ]] || PHASES=(unpinned)
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    --pinned) PHASES=(pinned) ;;
    --unpinned) PHASES=(unpinned) ;;
    -h | --help)
      sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "usage: $0 [--quick] [--pinned | --unpinned]" >&2
      exit 2
      ;;
  esac
done
if ((QUICK)); then
  ROUNDS=${LOAD_ROUNDS:-1}
  DURATION=${LOAD_DURATION:-2}
else
  ROUNDS=${LOAD_ROUNDS:-3}
  DURATION=${LOAD_DURATION:-8}
fi
WARMUP=${LOAD_WARMUP:-1}
CONNECTIONS=${LOAD_CONNECTIONS:-64}
THREADS=${LOAD_THREADS:-1}
H2_CONNS=${LOAD_H2_CONNS:-10}
H2_STREAMS=${LOAD_H2_STREAMS:-20}
OUT=${LOAD_OUT:-$ROOT/target/load}
readonly QUICK ROUNDS DURATION WARMUP CONNECTIONS THREADS H2_CONNS H2_STREAMS OUT
readonly PROXY_CPU=0 CLIENT_CPU=1

# nginx map sizing for a million keys (keys like "bench-key-123456"): with 256-byte buckets a
# hash of up to 2M slots is found at once (~3 s to load) and never falls back to the
# "could not build optimal map_hash" path, which load.sh treats as a failure.
readonly MAP_MAX_SIZE=2097152 MAP_BUCKET_SIZE=256

readonly KEY_COUNTS=(1 10000 1000000)
CLK_TCK=$(getconf CLK_TCK)
readonly CLK_TCK
readonly START_TIMEOUT_S=180 # bound on any one process becoming ready (1M keys: a few seconds)

# ---------------------------------------------------------------------------------------------
# State.
# ---------------------------------------------------------------------------------------------
WORK=""            # the mktemp -d folder
STARTED_PIDS=()    # every process this script started (nginx masters and keygates)
EXTRA_PIDS=()      # nginx workers, killed too if a master dies without them
FAILURES=()        # failed checks; any → exit 1
BACKGROUND=()      # per run: "BUSY/NICED" % of all cores just before it, while no load of ours ran
declare -A PORT=() ADMIN_PORT=() PID=() MEASURE_PIDS=() LOG_FILE=() COMM=() SCHEME=()
INSTANCES=()       # every instance started (upstream, keygates, nginx proxies), for `place`
PLACEMENT=pinned   # pinned | unpinned: set by `place`, read by the load generators
UPSTREAM_PORT="" UPSTREAM_STATUS_PORT=""
KEYGATE=""

log() { printf '[load %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
fail_check() {
  FAILURES+=("$*")
  log "CHECK FAILED: $*"
}

cleanup() {
  local status=$? pid i
  trap - EXIT INT TERM
  for pid in "${STARTED_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # Bounded wait for a graceful exit (keygate drains, nginx masters stop their workers).
  for ((i = 0; i < 50; i++)); do
    local alive=0
    for pid in "${STARTED_PIDS[@]}" "${EXTRA_PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${STARTED_PIDS[@]}" "${EXTRA_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  if [[ -n $WORK && -d $WORK ]]; then
    if [[ ${LOAD_KEEP_TMP:-0} == 1 ]]; then
      log "kept $WORK"
    else
      rm -rf -- "$WORK"
    fi
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Tools and build.
# ---------------------------------------------------------------------------------------------
ensure_tools() {
  local missing=()
  command -v nginx >/dev/null || missing+=(nginx-light)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v curl >/dev/null || missing+=(curl)
  command -v python3 >/dev/null || missing+=(python3)
  command -v h2load >/dev/null || missing+=(nghttp2-client)
  command -v openssl >/dev/null || missing+=(openssl)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    ((EUID == 0)) || die "missing ${missing[*]} and not root: apt-get install -y ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y "${missing[@]}"
  fi
  command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs)"
  if [[ " ${PHASES[*]} " == *" pinned "* ]] &&
    { ! command -v taskset >/dev/null || (($(nproc) < 2)); }; then
    log "no taskset or fewer than 2 CPUs: running unpinned only"
    PHASES=(unpinned)
  fi
  # The comparison needs nginx's map module (built in unless configured out) and stub_status
  # (the upstream's request counter); nginx -t on the real configs checks them again.
  local configure
  configure=$(nginx -V 2>&1)
  [[ $configure != *--without-http_map_module* ]] || die "this nginx was built without the map module"
  [[ $configure == *http_stub_status_module* ]] || die "this nginx lacks stub_status (install nginx-light)"
  [[ $configure == *http_ssl_module* && $configure == *http_v2_module* ]] ||
    die "this nginx lacks ssl or http_v2 (install nginx-light)"
}

# --quick only checks that the instrument works (CI runs it right after `cargo test`), so it
# takes the debug build that is already there instead of a several-minute release build; its
# figures mean nothing. LOAD_PROFILE=release gives a quick run with real figures.
build_keygate() {
  local profile=${LOAD_PROFILE:-$( ((QUICK)) && echo dev || echo release)}
  local dir=$([[ $profile == dev ]] && echo debug || echo "$profile")
  if [[ ${LOAD_NO_BUILD:-0} == 1 ]]; then
    log "LOAD_NO_BUILD=1: using the $profile binary as it is"
  else
    log "building keygate (cargo build --profile $profile --locked)"
    (cd "$ROOT" && cargo build --profile "$profile" --locked)
  fi
  KEYGATE=${CARGO_TARGET_DIR:-$ROOT/target}/$dir/keygate
  [[ -x $KEYGATE ]] || die "no binary at $KEYGATE"
}

# Prints N free TCP ports on 127.0.0.1 (all bound at once, so they are distinct, then freed).
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# render TEMPLATE OUT NAME=VALUE… — replaces each @NAME@ (values must not contain '|').
render() {
  local template=$1 out=$2 pair args=()
  shift 2
  for pair in "$@"; do args+=(-e "s|@${pair%%=*}@|${pair#*=}|g"); done
  sed "${args[@]}" "$template" >"$out"
  ! grep -q '@[A-Z_]*@' "$out" || die "unfilled placeholder in $out"
}

# ---------------------------------------------------------------------------------------------
# /proc readings.
# ---------------------------------------------------------------------------------------------
# Children of a process, from /proc (no procps needed).
children_of() {
  local parent=$1 f stat fields
  for f in /proc/[0-9]*/stat; do
    stat=$(cat "$f" 2>/dev/null) || continue
    read -ra fields <<<"${stat##*) }" # after "pid (comm) ": state ppid …
    if [[ ${fields[1]} == "$parent" ]]; then
      f=${f#/proc/}
      echo "${f%/stat}"
    fi
  done
}

# "UTIME STIME" of the given processes, in clock ticks (all threads, live and exited): time
# in the process's own code and time in the kernel on its behalf (for a proxy on loopback,
# mostly TCP: the syscalls, and the peer's receive path that runs inside them).
cpu_ticks() {
  local user=0 sys=0 pid stat fields
  for pid in "$@"; do
    stat=$(<"/proc/$pid/stat")
    read -ra fields <<<"${stat##*) }" # fields[11] = utime (field 14), fields[12] = stime (15)
    user=$((user + fields[11]))
    sys=$((sys + fields[12]))
  done
  echo "$user $sys"
}

# rss_kb FIELD PID…: sum of VmHWM (peak resident set) or VmRSS (now) of the processes, in kB.
rss_kb() {
  local field=$1 total=0 pid kb
  shift
  for pid in "$@"; do
    kb=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$pid/status")
    total=$((total + kb))
  done
  echo "$total"
}

# expect_comm NAME COMM PID…: the processes we measure must be what we think they are.
expect_comm() {
  local name=$1 comm=$2 pid
  shift 2
  for pid in "$@"; do
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] ||
      die "$name: process $pid is '$(cat "/proc/$pid/comm" 2>/dev/null)', not $comm"
  done
}

# background_busy_pct SECONDS: "BUSY NICED" — % of all cores busy over SECONDS at normal
# priority (user+system+irq+steal; the kernel books niced processes' system time here too)
# and % spent in niced user code (a `nice`d fuzzer or build yields most of its share to us).
background_busy_pct() {
  local before after
  before=$(head -n 1 /proc/stat)
  sleep "$1"
  after=$(head -n 1 /proc/stat)
  # cpu user nice system idle iowait irq softirq steal …
  awk -v a="$before" -v b="$after" 'BEGIN {
    n = split(a, x); split(b, y)
    for (i = 2; i <= 9 && i <= n; i++) {
      d = y[i] - x[i]; total += d
      if (i == 3) niced += d; else if (i != 5 && i != 6) busy += d
    }
    if (!total) total = 1
    printf "%d %d\n", 100 * busy / total + 0.5, 100 * niced / total + 0.5 }'
}

# set_cpus CPUS PID…: moves every thread of each process onto CPUS (a taskset list: "0", "0-1").
set_cpus() {
  local cpus=$1 pid
  shift
  for pid in "$@"; do taskset -a -p -c "$cpus" "$pid" >/dev/null || die "cannot move $pid to CPUs $cpus"; done
}

all_alive() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null || return 1; done
}

# ---------------------------------------------------------------------------------------------
# Processes.
# ---------------------------------------------------------------------------------------------
# HTTP status of one request ("000" when nothing answered). Extra curl arguments pass through.
http_status() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" || true
}

# wait_ready NAME PID URL [CURL ARGS…]: waits (bounded) until URL answers at all; fails if PID exits.
# Extra arguments go to curl (-k for a TLS listener).
wait_ready() {
  local name=$1 pid=$2 url=$3 i
  shift 3
  for ((i = 0; i < START_TIMEOUT_S * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || {
      tail -n 20 "${LOG_FILE[$name]}" >&2 || true
      die "$name exited while starting (log above)"
    }
    [[ $(http_status "$@" "$url") != 000 ]] && return 0
    sleep 0.1
  done
  die "$name not ready after ${START_TIMEOUT_S}s"
}

# start_nginx NAME CONF: nginx in the foreground (daemon off), our child, so its PID is known.
start_nginx() {
  local name=$1 conf=$2 dir
  dir=$(dirname "$conf")
  LOG_FILE[$name]=$dir/error.log
  nginx -t -q -p "$dir" -c "$conf" 2>"$dir/test.log" || {
    cat "$dir/test.log" >&2
    die "nginx -t failed for $name"
  }
  # exec: the PID we record must be nginx itself, not a bash subshell around it.
  (exec nginx -p "$dir" -c "$conf" 2>>"$dir/error.log") &
  PID[$name]=$!
  STARTED_PIDS+=("${PID[$name]}")
}

# After an nginx is ready: its workers are the processes to measure.
adopt_nginx_workers() {
  local name=$1 workers
  workers=$(children_of "${PID[$name]}")
  [[ -n $workers ]] || die "$name has no worker process"
  # shellcheck disable=SC2206 # word splitting of PIDs is intended
  MEASURE_PIDS[$name]=$(echo $workers)
  # shellcheck disable=SC2086
  EXTRA_PIDS+=($workers)
}

start_upstream() {
  local dir=$WORK/upstream
  mkdir -p "$dir/tmp"
  render "$ASSETS/upstream.conf.in" "$dir/nginx.conf" \
    DIR="$dir" PORT="$UPSTREAM_PORT" STATUS_PORT="$UPSTREAM_STATUS_PORT"
  start_nginx upstream "$dir/nginx.conf"
  PORT[upstream]=$UPSTREAM_PORT
}

# start_nginx_proxy NAME KEYS [tls]: with tls, the listener speaks HTTPS with HTTP/2 (ALPN).
start_nginx_proxy() {
  local name=$1 keys=$2 tls=${3:-} dir=$WORK/$1 flags=""
  mkdir -p "$dir/tmp"
  if [[ $tls == tls ]]; then
    flags="ssl http2"
    SCHEME[$name]=https
  fi
  render "$ASSETS/proxy.conf.in" "$dir/nginx.conf" \
    DIR="$dir" PORT="${PORT[$name]}" LISTEN_FLAGS="$flags" UPSTREAM_PORT="$UPSTREAM_PORT" \
    CERT="$WORK/tls/cert.pem" KEY="$WORK/tls/key.pem" \
    MAP_FILE="$WORK/keys/map-$keys.conf" MAP_MAX_SIZE=$MAP_MAX_SIZE MAP_BUCKET_SIZE=$MAP_BUCKET_SIZE
  start_nginx "$name" "$dir/nginx.conf"
}

# start_keygate NAME KEYS [BINARY [WORKERS [tls]]] — config in its own folder (keygate watches
# it: nothing else is written there), log outside it. The template (shared with
# instructions.sh) says `workers = 1` and no TLS; other settings are edited in here.
start_keygate() {
  local name=$1 keys=$2 binary=${3:-$KEYGATE} workers=${4:-1} tls=${5:-} dir=$WORK/$1
  mkdir -p "$dir"
  render "$ASSETS/keygate.toml.in" "$dir/keygate.toml" \
    PORT="${PORT[$name]}" ADMIN_PORT="${ADMIN_PORT[$name]}" \
    KEYS_FILE="$WORK/keys/keys-$keys.toml" UPSTREAM_PORT="$UPSTREAM_PORT"
  local -a edits=(-e "s/^workers = 1\$/workers = $workers/")
  if [[ $tls == tls ]]; then
    edits+=(-e "/^workers = /a tls_cert = \"$WORK/tls/cert.pem\"\ntls_key = \"$WORK/tls/key.pem\"")
    SCHEME[$name]=https
  fi
  sed -i "${edits[@]}" "$dir/keygate.toml"
  grep -q "^workers = $workers\$" "$dir/keygate.toml" || die "could not set workers = $workers for $name"
  "$binary" check -c "$dir/keygate.toml" >&2 || die "keygate check failed for $name"
  LOG_FILE[$name]=$WORK/logs/$name.log
  # RUST_LOG=warn: keygate's access log is an info event per request; nginx's is off too.
  (RUST_LOG=warn exec "$binary" serve -c "$dir/keygate.toml" 2>"${LOG_FILE[$name]}") &
  PID[$name]=$!
  MEASURE_PIDS[$name]=${PID[$name]}
  STARTED_PIDS+=("${PID[$name]}")
  # What /proc/PID/comm will say: the binary's name, cut to 15 bytes.
  COMM[$name]=$(basename "$binary" | cut -c1-15)
}

wait_keygate_ready() {
  local name=$1 i
  for ((i = 0; i < START_TIMEOUT_S * 10; i++)); do
    kill -0 "${PID[$name]}" 2>/dev/null || {
      tail -n 20 "${LOG_FILE[$name]}" >&2 || true
      die "$name exited while starting (log above)"
    }
    [[ $(http_status "http://127.0.0.1:${ADMIN_PORT[$name]}/readyz") == 200 ]] && return 0
    sleep 0.1
  done
  die "$name not ready after ${START_TIMEOUT_S}s"
}

# ---------------------------------------------------------------------------------------------
# Checks and readings around a run.
# ---------------------------------------------------------------------------------------------
# The upstream's total request count (stub_status; the reading itself counts as one).
upstream_requests() {
  curl -sf --max-time 5 "http://127.0.0.1:$UPSTREAM_STATUS_PORT/" | awk 'NR == 3 { print $3 }'
}

# keygate's request counters, one "labels value" line each.
keygate_counters() {
  curl -sf --max-time 5 "http://127.0.0.1:${ADMIN_PORT[$1]}/metrics" |
    awk '/^keygate_requests_total\{/ { print $1, $2 }'
}

# counter_deltas BEFORE AFTER: "labels delta" for every counter that moved.
counter_deltas() {
  awk 'NR == FNR { before[$1] = $2; next }
       { d = $2 - before[$1]; if (d != 0) print $1, d }' "$1" "$2"
}

# One spot check per target before any load: a valid key passes, an unknown one gets 401.
# Over TLS the answer must also have come over HTTP/2 (ALPN), as h2load will ask for it.
spot_check() {
  local name=$1 scheme=${SCHEME[$1]:-http} got body
  local url="$scheme://127.0.0.1:${PORT[$1]}/"
  local -a tls=()
  [[ $scheme == http ]] || tls=(-k --http2)
  body=$(curl -s "${tls[@]}" --max-time 5 -H "x-api-key: bench-key-0" "$url" || true)
  [[ $body == ok ]] || fail_check "$name: a valid key got '$body', not the upstream's 'ok'"
  if ((${#tls[@]})); then
    got=$(curl -s -o /dev/null -w '%{http_version}' "${tls[@]}" --max-time 5 -H "x-api-key: bench-key-0" "$url" || true)
    [[ $got == 2 ]] || fail_check "$name: TLS with ALPN h2 answered over HTTP/$got, not HTTP/2"
  fi
  [[ $name == upstream ]] && return 0
  got=$(http_status "${tls[@]}" -H "x-api-key: not-a-valid-key" "$url")
  [[ $got == 401 ]] || fail_check "$name: an unknown key got $got, not 401"
  got=$(http_status "${tls[@]}" "$url")
  [[ $got == 401 ]] || fail_check "$name: no key got $got, not 401"
}

# run_wrk URL KEYLIST SECONDS → the WRK_RESULT line (without its tag).
run_wrk() {
  local url=$1 list=$2 seconds=$3 out
  local -a pin_client=()
  [[ $PLACEMENT == unpinned ]] || pin_client=(taskset -c "$CLIENT_CPU")
  out=$(timeout $((seconds + 30)) "${pin_client[@]}" wrk "-t$THREADS" "-c$CONNECTIONS" "-d${seconds}s" \
    -s "$ASSETS/keys.lua" "$url" -- "$list" 2>&1) || {
    echo "$out" >&2
    return 1
  }
  out=$(grep '^WRK_RESULT ' <<<"$out") || return 1
  echo "${out#WRK_RESULT }"
}

# run_h2load URL SECONDS TAG → the same fields as run_wrk, from h2load over TLS (one key).
run_h2load() {
  local url=$1 seconds=$2 tag=$3 out=$WORK/h2load/$3.out log=$WORK/h2load/$3.log
  local -a pin_client=()
  [[ $PLACEMENT == unpinned ]] || pin_client=(taskset -c "$CLIENT_CPU")
  mkdir -p "$WORK/h2load"
  timeout $((seconds + 30)) "${pin_client[@]}" h2load -t1 "-c$H2_CONNS" "-m$H2_STREAMS" -D "$seconds" \
    --log-file="$log" -H "x-api-key: bench-key-0" "$url" >"$out" 2>&1 || {
    tail -n 20 "$out" >&2
    return 1
  }
  python3 "$ASSETS/h2result.py" "$out" "$log" "$seconds" || {
    tail -n 20 "$out" >&2
    return 1
  }
}

# ---------------------------------------------------------------------------------------------
# Targets: name → the process it loads and the key list wrk cycles through. Names with
# "reject" expect every answer to be a 401; names with "h2tls" are driven by h2load over TLS
# (report.py holds the table labels).
# ---------------------------------------------------------------------------------------------
PINNED_TARGETS=(direct kg-1 kg-10k kg-1m ng-1 ng-1m kg-1m-reject-unknown kg-1m-reject-badcrc
  ng-1m-reject-unknown ng-1m-reject-badcrc kg-h2tls ng-h2tls)
# Unpinned: the rows issue 17 judges, and keygate with workers = 2 beside workers = 1.
UNPINNED_TARGETS=(kg-1 ng-1 kg-1m ng-1m kg-1m-reject-unknown ng-1m-reject-unknown kg-h2tls ng-h2tls
  kg-1-w2 kg-h2tls-w2)
declare -A T_INST=(
  [direct]=upstream [kg-1]=kg1 [kg-10k]=kg10k [kg-1m]=kg1m [ng-1]=ng1 [ng-1m]=ng1m
  [kg-1m-reject-unknown]=kg1m [kg-1m-reject-badcrc]=kg1m
  [ng-1m-reject-unknown]=ng1m [ng-1m-reject-badcrc]=ng1m
  [kg-h2tls]=kgtls [ng-h2tls]=ngtls [kg-1-w2]=kg1w2 [kg-h2tls-w2]=kgtls2
)
# The baseline build, when LOAD_BASELINE names one: measured right after kg-1 (pinned).
BASELINE=${LOAD_BASELINE:-}
BASELINE_INST=()
if [[ -n $BASELINE ]]; then
  [[ -x $BASELINE ]] || die "LOAD_BASELINE=$BASELINE is not an executable"
  BASELINE_INST=(kgb1)
  PINNED_TARGETS=(direct kg-1 kg-1-baseline "${PINNED_TARGETS[@]:2}")
  T_INST[kg-1-baseline]=kgb1
fi
# LOAD_ONLY=kg-1,kg-1-w2 keeps only the targets named (to look at a few rows quickly).
if [[ -n ${LOAD_ONLY:-} ]]; then
  only() {
    local t
    for t in "$@"; do [[ ",$LOAD_ONLY," != *",$t,"* ]] || echo "$t"; done
  }
  mapfile -t PINNED_TARGETS < <(only "${PINNED_TARGETS[@]}")
  mapfile -t UNPINNED_TARGETS < <(only "${UNPINNED_TARGETS[@]}")
fi
declare -A T_LIST=(
  [direct]=valid-1.txt [kg-1]=valid-1.txt [kg-1-baseline]=valid-1.txt [kg-10k]=valid-10000.txt [kg-1m]=valid-1000000.txt
  [ng-1]=valid-1.txt [ng-1m]=valid-1000000.txt [kg-1-w2]=valid-1.txt
  [kg-1m-reject-unknown]=reject-unknown.txt [kg-1m-reject-badcrc]=reject-badcrc.txt
  [ng-1m-reject-unknown]=reject-unknown.txt [ng-1m-reject-badcrc]=reject-badcrc.txt
)

# place PLACEMENT: pins every process for "pinned" (proxies on PROXY_CPU, the upstream on
# CLIENT_CPU; the load generator is pinned as it starts), or lets them all run anywhere.
place() {
  PLACEMENT=$1
  local name all_cpus="0-$(($(nproc) - 1))" pids
  for name in "${INSTANCES[@]}"; do
    # shellcheck disable=SC2206 # word splitting of PIDs is intended
    pids=("${PID[$name]}" ${MEASURE_PIDS[$name]})
    if [[ $PLACEMENT == unpinned ]]; then
      set_cpus "$all_cpus" "${pids[@]}"
    elif [[ $name == upstream ]]; then
      set_cpus "$CLIENT_CPU" "${pids[@]}"
    else
      set_cpus "$PROXY_CPU" "${pids[@]}"
    fi
  done
}

# measure TARGET ROUND: warm-up, then the measured run, with checks; appends to results.tsv.
# The placement (pinned or unpinned) is the one `place` set last.
measure() {
  local target=$1 round=$2 inst=${T_INST[$1]} reject=0 h2=0
  local url="${SCHEME[${T_INST[$1]}]:-http}://127.0.0.1:${PORT[${T_INST[$1]}]}/" list=$WORK/keys/${T_LIST[$1]:-}
  local tag="$PLACEMENT-$target-$round" label="$target ($PLACEMENT)"
  local -a pids
  read -ra pids <<<"${MEASURE_PIDS[$inst]}"
  [[ $target == *reject* ]] && reject=1
  [[ $target == *h2tls* ]] && h2=1

  if ! all_alive "${PID[$inst]}" "${pids[@]}"; then
    fail_check "$label round $round: $inst is not running"
    return 0
  fi
  # Let the previous run's in-flight requests and closed connections settle, and meanwhile
  # see how busy the machine is without our load: other work (a build, tests) makes noise.
  BACKGROUND+=("$(background_busy_pct 1 | tr ' ' /)")

  local up_before="" up_after="" kg_before=$WORK/counters.before kg_after=$WORK/counters.after
  if ((reject)); then
    up_before=$(upstream_requests) || true
    if [[ $inst == kg* ]] && ! keygate_counters "$inst" >"$kg_before"; then
      fail_check "$label round $round: could not read $inst's /metrics"
      return 0
    fi
  fi

  local warm main t0 t1 u0 s0 u1 s1
  drive() {
    if ((h2)); then run_h2load "$url" "$1" "$tag-$2"; else run_wrk "$url" "$list" "$1"; fi
  }
  warm=$(drive "$WARMUP" warm) || {
    fail_check "$label round $round: wrk (warm-up) failed"
    return 0
  }
  read -r u0 s0 < <(cpu_ticks "${pids[@]}") || {
    fail_check "$label round $round: $inst exited during the warm-up"
    return 0
  }
  t0=$((u0 + s0))
  main=$(drive "$DURATION" main) || {
    fail_check "$label round $round: wrk failed"
    return 0
  }
  local rss rss_now
  if ! read -r u1 s1 < <(cpu_ticks "${pids[@]}") || ! rss=$(rss_kb VmHWM "${pids[@]}") ||
    ! rss_now=$(rss_kb VmRSS "${pids[@]}"); then
    fail_check "$label round $round: $inst exited during the run"
    return 0
  fi
  t1=$((u1 + s1))

  local -A w m
  local kv
  for kv in $warm; do w[${kv%%=*}]=${kv#*=}; done
  for kv in $main; do m[${kv%%=*}]=${kv#*=}; done
  local sock_errors=$((m[connect_err] + m[read_err] + m[write_err] + m[timeout_err]))

  printf '%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\n' "$PLACEMENT" "$target" "$round" \
    "${m[requests]}" "${m[duration_us]}" "${m[sent]}" "${m[non2xx]}" "$sock_errors" \
    "${m[p50_us]}" "${m[p99_us]}" "${m[p999_us]}" "${m[max_us]}" "$((t1 - t0))" "$rss" "$rss_now" \
    "$((u1 - u0))" "$((s1 - s0))" >>"$WORK/results.tsv"
  log "$(awk -v t="$label" -v r="$round" -v n="${m[requests]}" -v d="${m[duration_us]}" \
    -v p99="${m[p99_us]}" -v c="$((t1 - t0))" -v hz="$CLK_TCK" -v e="${m[non2xx]}" -v se="$sock_errors" \
    'BEGIN { printf "%-31s round %d: %7.0f req/s  p99 %6d us  CPU %5.3f s/100k (%3.0f%%)  status>399 %d  socket errors %d",
             t, r, n / d * 1e6, p99, n ? c / hz / n * 1e5 : 0, c / hz / d * 1e8, e, se }')"

  if ((h2)); then
    [[ ${m[alpn]} == h2 ]] || fail_check "$label round $round: h2load spoke ${m[alpn]}, not h2"
    echo "$target ${m[tls]}" >>"$WORK/tls-seen.txt"
  fi
  ((m[requests] > 0)) || fail_check "$label round $round: no request completed"
  ((sock_errors == 0)) || fail_check "$label round $round: $sock_errors socket errors (connect/read/write/timeout)"
  ((w[connect_err] + w[read_err] + w[write_err] + w[timeout_err] == 0)) ||
    fail_check "$label round $round: socket errors during warm-up"
  if ((!reject)); then
    ((m[non2xx] == 0 && w[non2xx] == 0)) ||
      fail_check "$label round $round: valid keys got $((m[non2xx] + w[non2xx])) error statuses"
    return 0
  fi

  # Rejection path: every answer an error status, and the upstream never reached. The proof
  # for both proxies is the upstream's own stub_status `requests` counter, read before the
  # warm-up and after the run: it counts every request on every connection, where a
  # connection counter would miss requests on the proxies' pooled keep-alive connections,
  # and a separate dead upstream would need a second proxy config that differs from the
  # one measured.
  ((m[non2xx] == m[requests] && w[non2xx] == w[requests])) ||
    fail_check "$label round $round: only $((m[non2xx] + w[non2xx])) of $((m[requests] + w[requests])) invalid keys were refused"
  up_after=$(upstream_requests) || true
  # The second stub_status reading is the only request the upstream may have seen.
  if [[ ! $up_before =~ ^[0-9]+$ || ! $up_after =~ ^[0-9]+$ ]]; then
    fail_check "$label round $round: could not read the upstream's stub_status"
  elif ((up_after - up_before != 1)); then
    fail_check "$label round $round: the upstream saw $((up_after - up_before - 1)) requests during the flood"
  fi
  if [[ $inst == kg* ]]; then
    keygate_counters "$inst" >"$kg_after" || fail_check "$label round $round: could not read $inst's /metrics"
    local deltas sent=$((m[sent] + w[sent])) done_=$((m[requests] + w[requests])) n401
    deltas=$(counter_deltas "$kg_before" "$kg_after")
    n401=$(awk '$1 == "keygate_requests_total{route=\"/\",status=\"401\"}" { print $2 }' <<<"$deltas")
    n401=${n401:-0}
    # wrk may stop with up to -c requests written but unanswered: keygate can have answered
    # any number of those, so the count lies between completed and sent.
    if ((n401 < done_ || n401 > sent)); then
      fail_check "$label round $round: keygate counted $n401 × 401, wrk completed $done_ and sent $sent"
    fi
    if grep -qv 'status="401"' <<<"$deltas"; then
      fail_check "$label round $round: keygate answered other statuses during the flood: $(grep -v 'status="401"' <<<"$deltas" | tr '\n' ' ')"
    fi
    echo "$label $round completed=$done_ sent=$sent keygate_401=$n401" >>"$WORK/reject-counts.txt"
  fi
}

# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------
main() {
  local started_at=$SECONDS
  ensure_tools
  build_keygate
  local busy niced
  read -r busy niced < <(background_busy_pct 1)
  ((busy < 10)) || log "warning: ${busy}% of the CPU is busy before we start: the numbers will be noisy"
  ((niced < 10)) || log "note: ${niced}% of the CPU runs niced work; it yields to the bench, mostly"

  WORK=$(mktemp -d -t keygate-load.XXXXXX)
  mkdir -p "$WORK/keys" "$WORK/logs" "$WORK/tls" "$OUT"
  printf 'placement\ttarget\tround\trequests\tduration_us\tsent\tnon2xx\tsock_errors\tp50_us\tp99_us\tp999_us\tmax_us\tcpu_ticks\trss_kb\trss_now_kb\tuser_ticks\tsys_ticks\n' \
    >"$WORK/results.tsv"

  log "generating 1, 10,000 and 1,000,000 keys"
  python3 "$ASSETS/genkeys.py" "$WORK/keys" "${KEY_COUNTS[@]}"
  # One self-signed certificate for both TLS listeners (P-256: the handshake is the same
  # work for both; there are only LOAD_H2_CONNS of them per run anyway).
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
    -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" 2>"$WORK/tls/openssl.log" ||
    die "openssl could not make a certificate: $(cat "$WORK/tls/openssl.log")"

  local unpinned=0
  [[ " ${PHASES[*]} " != *" unpinned "* ]] || unpinned=1
  local ports
  read -ra ports <<<"$(free_ports 19)"
  UPSTREAM_PORT=${ports[0]} UPSTREAM_STATUS_PORT=${ports[1]}
  PORT[kg1]=${ports[2]} ADMIN_PORT[kg1]=${ports[3]}
  PORT[kg10k]=${ports[4]} ADMIN_PORT[kg10k]=${ports[5]}
  PORT[kg1m]=${ports[6]} ADMIN_PORT[kg1m]=${ports[7]}
  PORT[ng1]=${ports[8]} PORT[ng1m]=${ports[9]}
  PORT[kgb1]=${ports[10]} ADMIN_PORT[kgb1]=${ports[11]}
  PORT[kgtls]=${ports[12]} ADMIN_PORT[kgtls]=${ports[13]} PORT[ngtls]=${ports[14]}
  PORT[kg1w2]=${ports[15]} ADMIN_PORT[kg1w2]=${ports[16]}
  PORT[kgtls2]=${ports[17]} ADMIN_PORT[kgtls2]=${ports[18]}

  local keygates=(kg1 kg10k kg1m kgtls "${BASELINE_INST[@]}") nginxes=(ng1 ng1m ngtls)
  ((unpinned == 0)) || keygates+=(kg1w2 kgtls2)
  log "starting the upstream, ${#keygates[@]} keygates and ${#nginxes[@]} nginx proxies"
  start_upstream
  wait_ready upstream "${PID[upstream]}" "http://127.0.0.1:$UPSTREAM_PORT/"
  adopt_nginx_workers upstream
  # shellcheck disable=SC2086
  expect_comm upstream nginx "${PID[upstream]}" ${MEASURE_PIDS[upstream]}
  INSTANCES+=(upstream)
  start_keygate kg1 1
  start_keygate kg10k 10000
  start_keygate kg1m 1000000
  start_keygate kgtls 1 "$KEYGATE" 1 tls
  ((${#BASELINE_INST[@]} == 0)) || start_keygate kgb1 1 "$BASELINE"
  if ((unpinned)); then
    start_keygate kg1w2 1 "$KEYGATE" 2
    start_keygate kgtls2 1 "$KEYGATE" 2 tls
  fi
  start_nginx_proxy ng1 1
  start_nginx_proxy ng1m 1000000
  start_nginx_proxy ngtls 1 tls
  local name
  for name in "${keygates[@]}"; do
    wait_keygate_ready "$name"
    expect_comm "$name" "${COMM[$name]}" "${PID[$name]}"
    INSTANCES+=("$name")
  done
  for name in "${nginxes[@]}"; do
    wait_ready "$name" "${PID[$name]}" "${SCHEME[$name]:-http}://127.0.0.1:${PORT[$name]}/" -k
    adopt_nginx_workers "$name"
    # shellcheck disable=SC2086
    expect_comm "$name" nginx "${PID[$name]}" ${MEASURE_PIDS[$name]}
    INSTANCES+=("$name")
    if grep -q 'could not build optimal' "${LOG_FILE[$name]}"; then
      fail_check "$name: nginx could not size its map hash (raise MAP_MAX_SIZE / MAP_BUCKET_SIZE)"
    fi
  done
  for name in "${INSTANCES[@]}"; do spot_check "$name"; done

  local round target phase runs=0
  for phase in "${PHASES[@]}"; do
    if [[ $phase == pinned ]]; then runs=$((runs + ${#PINNED_TARGETS[@]})); else runs=$((runs + ${#UNPINNED_TARGETS[@]})); fi
  done
  log "load: wrk -t$THREADS -c$CONNECTIONS / h2load -t1 -c$H2_CONNS -m$H2_STREAMS, ${WARMUP}s warm-up + ${DURATION}s measured, $ROUNDS round(s) of $runs runs (${PHASES[*]}): about $((ROUNDS * runs * (DURATION + WARMUP + 2) / 60 + 1)) min"
  for ((round = 1; round <= ROUNDS; round++)); do
    for phase in "${PHASES[@]}"; do
      place "$phase"
      if [[ $phase == pinned ]]; then
        for target in "${PINNED_TARGETS[@]}"; do measure "$target" "$round"; done
      else
        for target in "${UNPINNED_TARGETS[@]}"; do measure "$target" "$round"; done
      fi
    done
  done

  # After the load: every process still up, keygate never reloaded, nothing logged.
  for name in "${INSTANCES[@]}"; do
    all_alive "${PID[$name]}" || fail_check "$name died during the run"
  done
  for name in "${keygates[@]}"; do
    local generation
    generation=$(curl -sf --max-time 5 "http://127.0.0.1:${ADMIN_PORT[$name]}/status" |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["generation"])' 2>/dev/null || echo "?")
    [[ $generation == 1 ]] || fail_check "$name: /status generation is $generation, expected 1 (no reload during the bench)"
  done

  local keygate_version nginx_version wrk_version h2load_version
  keygate_version=$("$KEYGATE" --version 2>&1 | head -n 1)
  [[ -z $BASELINE ]] || keygate_version+=" (baseline: $BASELINE)"
  nginx_version=$(nginx -v 2>&1 | head -n 1)
  wrk_version=$({ wrk -v 2>&1 || true; } | head -n 1 | cut -d' ' -f1-2)
  h2load_version=$(h2load --version 2>&1 | head -n 1)
  cp "$WORK/results.tsv" "$OUT/results.tsv"
  {
    echo "benches/load.sh${*:+ $*} — $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')"
    LOAD_NPROC=$(nproc) \
      LOAD_CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo) \
      LOAD_KERNEL=$(uname -sr) \
      LOAD_BACKGROUND="${BACKGROUND[*]}" \
      LOAD_VERSIONS="$keygate_version | $nginx_version | $wrk_version | $h2load_version" \
      LOAD_SHAPE="wrk -t$THREADS -c$CONNECTIONS; h2load -t1 -c$H2_CONNS -m$H2_STREAMS over TLS; ${WARMUP} s warm-up + ${DURATION} s measured per run, $ROUNDS round(s), round-robin" \
      LOAD_PINNING="pinned: proxy on CPU $PROXY_CPU, upstream and load generator on CPU $CLIENT_CPU; unpinned: nothing pinned" \
      LOAD_TLS_SEEN="$(sort -u "$WORK/tls-seen.txt" 2>/dev/null | tr '\n' ';')" \
      LOAD_CLK_TCK=$CLK_TCK \
      LOAD_WHEN="$(date -u '+%Y-%m-%d %H:%M UTC'), git $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')" \
      LOAD_SVG="$OUT/load.svg" \
      python3 "$ASSETS/report.py" "$WORK/results.tsv"

    if [[ -s $WORK/reject-counts.txt ]]; then
      echo
      echo "keygate 401 counter vs wrk, per rejection run (warm-up + measured):"
      sed 's/^/  /' "$WORK/reject-counts.txt"
    fi
    for name in "${keygates[@]}"; do
      if [[ -s ${LOG_FILE[$name]} ]]; then
        echo
        echo "keygate $name logged $(wc -l <"${LOG_FILE[$name]}") line(s) at warn or above; the first:"
        head -n 5 "${LOG_FILE[$name]}" | sed 's/^/  /'
      fi
    done
  } | tee "$OUT/report.txt"

  echo
  echo "written: $OUT/report.txt (this report), $OUT/load.svg (chart), $OUT/results.tsv (every run)"
  echo "total time: $(((SECONDS - started_at) / 60)) min $(((SECONDS - started_at) % 60)) s"
  if ((${#FAILURES[@]})); then
    echo "FAILED checks (${#FAILURES[@]}):"
    printf '  - %s\n' "${FAILURES[@]}"
    exit 1
  fi
  echo "all checks passed"
}

main "$@"
