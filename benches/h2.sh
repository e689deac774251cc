#!/usr/bin/env bash
# benches/h2.sh [--quick] — HTTP/2 clients (h2load) through keygate to an HTTP/2 upstream,
# beside the same upstream alone and beside keygate to that upstream over HTTP/1.1. Prints one
# table (medians over the rounds). Loopback only; every run is bounded in requests and time.
#
#   benches/h2.sh           3 rounds × 100,000 requests per target (a few minutes)
#   benches/h2.sh --quick   1 round × 10,000 requests per target, debug build; exits 0 only
#                           if every target started and every request succeeded (for CI)
#
# Targets, driven round-robin with the same load (h2load -c CONNS -m STREAMS, h2c prior
# knowledge, one valid key in x-api-key):
#   direct            the upstream alone: nginx, one worker, `http2` (h2c) listener,
#                     `return 200 "ok\n"`, no access log
#   keygate -> h2      keygate (`workers = 1`, RUST_LOG=warn), route `protocol = "h2"`
#   keygate -> http1   the same keygate config with the route on HTTP/1.1 to nginx's
#                     HTTP/1.1 listener
# After each keygate run the table shows `keygate_upstream_connections` from its /metrics:
# HTTP/2 shares a few connections among all streams; HTTP/1.1 needs one per request in flight.
#
# Environment overrides: H2_ROUNDS, H2_REQUESTS, H2_CONNS (64), H2_STREAMS (10), H2_PIN=0 (no
# CPU pinning: keygate on CPU 0, nginx and h2load on CPU 1, as benches/load.sh does),
# H2_PROFILE (cargo profile to build; default release, dev with --quick), H2_TIMEOUT (s per
# h2load run, 120).
#
# Needs: nginx (nginx-light, with http_v2), h2load (nghttp2-client), curl, python3 (installed
# from Debian if missing and root), and cargo.
# Every process it starts is stopped on exit; temporary files live in one mktemp -d folder.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
readonly SCRIPT_DIR ROOT

QUICK=0
case "${1:-}" in
  --quick) QUICK=1 ;;
  "") ;;
  -h | --help)
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "usage: $0 [--quick]" >&2
    exit 2
    ;;
esac
if ((QUICK)); then
  ROUNDS=${H2_ROUNDS:-1}
  REQUESTS=${H2_REQUESTS:-10000}
else
  ROUNDS=${H2_ROUNDS:-3}
  REQUESTS=${H2_REQUESTS:-100000}
fi
CONNS=${H2_CONNS:-64}
STREAMS=${H2_STREAMS:-10}
PIN=${H2_PIN:-1}
TIMEOUT=${H2_TIMEOUT:-120}
readonly QUICK ROUNDS REQUESTS CONNS STREAMS TIMEOUT

WORK=""
STARTED_PIDS=()
FAILURES=()

log() { printf '[h2 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

cleanup() {
  local status=$? pid i
  trap - EXIT INT TERM
  for pid in "${STARTED_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((i = 0; i < 50; i++)); do
    local alive=0
    for pid in "${STARTED_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${STARTED_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  [[ -n $WORK && -d $WORK ]] && rm -rf -- "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
if ((${#missing[@]})); then
  ((EUID == 0)) || die "missing ${missing[*]} and not root: apt-get install -y ${missing[*]}"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y "${missing[@]}"
fi
command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs)"
nginx -V 2>&1 | grep -q -- --with-http_v2_module || die "this nginx lacks the http_v2 module (install nginx-light)"
if ((PIN)) && { ! command -v taskset >/dev/null || (($(nproc) < 2)); }; then
  log "no taskset or fewer than 2 CPUs: running unpinned"
  PIN=0
fi
pin() { ((PIN)) && taskset -a -p -c "$1" "$2" >/dev/null || true; }

# --quick only checks that the instrument works (CI), so it takes the debug build that the
# tests already made; its figures mean nothing. H2_PROFILE=release gives real ones.
profile=${H2_PROFILE:-$( ((QUICK)) && echo dev || echo release)}
log "building keygate (cargo build --profile $profile --locked)"
(cd "$ROOT" && cargo build --profile "$profile" --locked)
KEYGATE=${CARGO_TARGET_DIR:-$ROOT/target}/$([[ $profile == dev ]] && echo debug || echo "$profile")/keygate
[[ -x $KEYGATE ]] || die "no binary at $KEYGATE"

WORK=$(mktemp -d)
mkdir -p "$WORK/tmp"
read -r H2_PORT H1_PORT KG_H2_PORT KG_H1_PORT ADMIN_H2 ADMIN_H1 < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)

# Waits until URL answers (any HTTP status) or the bound runs out.
wait_http() {
  local url=$1 what=$2 i
  shift 2
  for ((i = 0; i < 300; i++)); do
    curl -s -o /dev/null "$@" "$url" && return 0
    sleep 0.05
  done
  die "$what did not come up at $url"
}

# ---------------------------------------------------------------------------------------------
# The upstream: one nginx worker with an h2c listener and an HTTP/1.1 listener.
# ---------------------------------------------------------------------------------------------
cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type text/plain;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    client_body_temp_path $WORK/tmp/body;
    proxy_temp_path $WORK/tmp/proxy;
    fastcgi_temp_path $WORK/tmp/fastcgi;
    uwsgi_temp_path $WORK/tmp/uwsgi;
    scgi_temp_path $WORK/tmp/scgi;
    server {
        listen 127.0.0.1:$H2_PORT http2;
        location / { return 200 "ok\n"; }
    }
    server {
        listen 127.0.0.1:$H1_PORT;
        location / { return 200 "ok\n"; }
    }
}
EOF
nginx -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log" &
STARTED_PIDS+=($!)
wait_http "http://127.0.0.1:$H1_PORT/" "nginx"
wait_http "http://127.0.0.1:$H2_PORT/" "nginx (h2c)" --http2-prior-knowledge
for pid in $(pgrep -f "nginx -c $WORK/nginx.conf" || true); do pin 1 "$pid"; done

# ---------------------------------------------------------------------------------------------
# keygate, twice: the route on h2 and on HTTP/1.1.
# ---------------------------------------------------------------------------------------------
KEY="h2bench-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
HASH=$(printf '%s' "$KEY" | sha256sum | cut -d' ' -f1)
cat >"$WORK/keys.toml" <<EOF
[[keys]]
id = "h2bench1"
name = "h2 bench"
hash = "sha256:$HASH"
scopes = ["read"]
created_at = 2026-01-01T00:00:00Z
EOF

start_keygate() {
  local name=$1 port=$2 admin=$3 upstream=$4 protocol=$5
  cat >"$WORK/$name.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
workers = 1
[admin]
listen = "127.0.0.1:$admin"
[auth]
keys_file = "$WORK/keys.toml"
[[routes]]
prefix = "/"
upstream = "$upstream"
protocol = "$protocol"
[routes.scopes]
GET = "read"
EOF
  RUST_LOG=warn "$KEYGATE" serve -c "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
  STARTED_PIDS+=($!)
  local pid=$!
  wait_http "http://127.0.0.1:$admin/readyz" "keygate ($name)"
  pin 0 "$pid"
}
start_keygate kg-h2 "$KG_H2_PORT" "$ADMIN_H2" "http://127.0.0.1:$H2_PORT" h2
start_keygate kg-h1 "$KG_H1_PORT" "$ADMIN_H1" "http://127.0.0.1:$H1_PORT" http1

# ---------------------------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------------------------
declare -A RPS=() MEAN=() CONNS_SEEN=()
TARGETS=("direct" "keygate -> h2" "keygate -> http1")
url_of() {
  case $1 in
    "direct") echo "http://127.0.0.1:$H2_PORT/" ;;
    "keygate -> h2") echo "http://127.0.0.1:$KG_H2_PORT/" ;;
    "keygate -> http1") echo "http://127.0.0.1:$KG_H1_PORT/" ;;
  esac
}
admin_of() {
  case $1 in
    "keygate -> h2") echo "$ADMIN_H2" ;;
    "keygate -> http1") echo "$ADMIN_H1" ;;
    *) echo "" ;;
  esac
}

run_one() {
  local target=$1 round=$2 out url
  url=$(url_of "$target")
  out=$WORK/run-$round-${target// /_}.txt
  local cmd=(timeout "$TIMEOUT" h2load -n "$REQUESTS" -c "$CONNS" -m "$STREAMS" -t 1 -H "x-api-key: $KEY" "$url")
  if ((PIN)); then cmd=(taskset -c 1 "${cmd[@]}"); fi
  "${cmd[@]}" >"$out" 2>&1 || true
  local rps succeeded statuses mean
  rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$out")
  succeeded=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' "$out")
  statuses=$(sed -n 's/^status codes: \([0-9]*\) 2xx.*/\1/p' "$out")
  mean=$(awk '/^time for request:/ {print $5}' "$out")
  if [[ -z $rps || $statuses != "$REQUESTS" || $succeeded != "$REQUESTS" ]]; then
    FAILURES+=("$target round $round: ${statuses:-?} of $REQUESTS answered 2xx (see below)")
    sed 's/^/    /' "$out" >&2
  fi
  RPS[$target]+="${rps:-0} "
  MEAN[$target]+="${mean:-?} "
  local admin
  admin=$(admin_of "$target")
  if [[ -n $admin ]]; then
    CONNS_SEEN[$target]=$(curl -s "http://127.0.0.1:$admin/metrics" |
      awk '/^keygate_upstream_connections\{/ {s += $2} END {print s + 0}')
  fi
  log "$target, round $round: ${rps:-?} req/s, mean ${mean:-?}"
}

# A first pass, not counted, so every target's connections are open and warm.
for target in "${TARGETS[@]}"; do
  timeout "$TIMEOUT" h2load -n 2000 -c "$CONNS" -m "$STREAMS" -t 1 -H "x-api-key: $KEY" "$(url_of "$target")" >/dev/null 2>&1 || true
done
for ((round = 1; round <= ROUNDS; round++)); do
  for target in "${TARGETS[@]}"; do run_one "$target" "$round"; done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR] = $1} END {print (NR ? a[int((NR + 1) / 2)] : "?")}'; }
printf '\nh2load -n %s -c %s -m %s (h2c), %s round(s), medians; keygate workers = 1%s\n' \
  "$REQUESTS" "$CONNS" "$STREAMS" "$ROUNDS" "$( ((PIN)) && echo ', pinned' || echo '')"
printf '%-18s %12s %12s %20s %22s\n' target "req/s" "vs direct" "mean (last round)" "upstream connections"
direct=$(echo "${RPS[direct]}" | median)
for target in "${TARGETS[@]}"; do
  rps=$(echo "${RPS[$target]}" | median)
  ratio=$(python3 -c "print(f'{$rps / $direct:.2f}' if $direct else '?')")
  mean=$(echo "${MEAN[$target]}" | tr ' ' '\n' | grep -v '^$' | tail -1)
  printf '%-18s %12s %12s %20s %22s\n' "$target" "$rps" "$ratio" "$mean" "${CONNS_SEEN[$target]:--}"
done

if ((${#FAILURES[@]})); then
  printf '\nFAILED:\n' >&2
  printf '  %s\n' "${FAILURES[@]}" >&2
  exit 1
fi
