#!/usr/bin/env bash
# benches/instructions.sh [KEYGATE [OTHER_KEYGATE]] — user-space instructions per request on
# the proxied path (valid key → upstream), on the rejection path (invalid key → JSON 401) and
# on the bad-checksum path (a key in keygate's format whose checksum is wrong → JSON 401),
# counted by callgrind: a figure that, unlike requests/s on a shared machine, moves by about 1 %
# between runs, so it can show what one change bought.
#
#   benches/instructions.sh                       the release build of this tree
#   benches/instructions.sh old/keygate new/keygate   two builds, measured twice each, alternating
#
# Each measurement: keygate (1 key, workers = 1) under valgrind --tool=callgrind in front of
# the same nginx upstream as benches/load.sh; per path, wrk -t1 -c16 for a 2 s warm-up, then the
# counters are zeroed, wrk runs 10 s more, and the instructions counted are divided by the
# requests wrk completed. Both paths are measured in the same keygate process.
# INSTRUCTIONS_KEEP=DIR keeps each callgrind profile there (for callgrind_annotate). Under
# valgrind the machine is saturated, so the figure is the busy steady state
# (few idle wake-ups per request). Only keygate's own process is counted, not the kernel.
#
# Needs valgrind, nginx, wrk, curl, python3 (installed with apt-get if missing, as root), and
# cargo. All traffic on 127.0.0.1; everything it starts is stopped; its temporary folder is
# removed on exit.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
ASSETS=$SCRIPT_DIR/load
readonly SCRIPT_DIR ROOT ASSETS
WARMUP_S=2
MEASURE_S=10

log() { printf '[instructions %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

WORK=""
PIDS=()
cleanup() {
  local status=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [[ -z $WORK ]] || rm -rf -- "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

missing=()
for tool in valgrind nginx wrk curl python3; do
  command -v "$tool" >/dev/null || missing+=("$([[ $tool == nginx ]] && echo nginx-light || echo "$tool")")
done
if ((${#missing[@]})); then
  ((EUID == 0)) || die "missing ${missing[*]}: apt-get install -y ${missing[*]}"
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

BINARIES=("$@")
if ((${#BINARIES[@]} == 0)); then
  log "building keygate (cargo build --release --locked)"
  (cd "$ROOT" && cargo build --release --locked)
  BINARIES=("${CARGO_TARGET_DIR:-$ROOT/target}/release/keygate")
fi
for binary in "${BINARIES[@]}"; do [[ -x $binary ]] || die "not an executable: $binary"; done

WORK=$(mktemp -d -t keygate-instructions.XXXXXX)
read -ra ports <<<"$(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')"
UPSTREAM_PORT=${ports[0]} STATUS_PORT=${ports[1]} PORT=${ports[2]}

mkdir -p "$WORK/upstream/tmp" "$WORK/keys" "$WORK/keygate"
sed -e "s|@DIR@|$WORK/upstream|g" -e "s|@PORT@|$UPSTREAM_PORT|g" -e "s|@STATUS_PORT@|$STATUS_PORT|g" \
  "$ASSETS/upstream.conf.in" >"$WORK/upstream/nginx.conf"
(exec nginx -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf" 2>>"$WORK/upstream/error.log") &
PIDS+=($!)
python3 "$ASSETS/genkeys.py" "$WORK/keys" 1 >/dev/null
# No admin listener: nothing but the measured requests reaches keygate.
sed -e "s|@PORT@|$PORT|g" -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" -e "s|@KEYS_FILE@|$WORK/keys/keys-1.toml|g" \
  -e '/^\[admin\]/,/^$/d' "$ASSETS/keygate.toml.in" >"$WORK/keygate/keygate.toml"

url=http://127.0.0.1:$PORT/
status() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "x-api-key: bench-key-0" "$1" || true; }

# run_path PID KEY → instructions per request of wrk's requests with that key, counted in PID
run_path() {
  local pid=$1 key=$2 name=$3 out=$WORK/callgrind.out requests total profile
  timeout 60 wrk -t1 -c16 -d${WARMUP_S}s -H "x-api-key: $key" "$url" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  requests=$(timeout 60 wrk -t1 -c16 -d${MEASURE_S}s -H "x-api-key: $key" "$url" |
    awk '/requests in/ { print $1 }')
  callgrind_control -d "$pid" >/dev/null 2>&1
  profile=$(ls -t "$out".* | head -n 1)
  [[ -z ${INSTRUCTIONS_KEEP:-} ]] || cp "$profile" "$INSTRUCTIONS_KEEP/$name.callgrind"
  total=$(callgrind_annotate "$profile" 2>/dev/null |
    awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
  [[ $requests =~ ^[0-9]+$ && $requests -gt 0 && $total =~ ^[0-9]+$ ]] ||
    die "no figure (requests '$requests', instructions '$total')"
  echo $((total / requests))
}

# measure BINARY TAG → "proxied N rejection M checksum C" instructions per request
measure() {
  local binary=$1 tag=$2 out=$WORK/callgrind.out pid i proxied rejection checksum
  rm -f "$out"*
  (RUST_LOG=warn exec valgrind --tool=callgrind --callgrind-out-file="$out" "$binary" serve \
    -c "$WORK/keygate/keygate.toml" 2>"$WORK/valgrind.log") &
  pid=$!
  for ((i = 0; i < 600; i++)); do
    [[ $(status "$url") == 200 ]] && break
    kill -0 "$pid" 2>/dev/null || die "keygate under valgrind exited: $(tail -n 5 "$WORK/valgrind.log")"
    sleep 0.1
  done
  [[ $(status "$url") == 200 ]] || die "keygate under valgrind not ready after 60 s"
  proxied=$(run_path "$pid" bench-key-0 "$tag-proxied")
  # A key of the right length that is in no table: the 401 flood of benches/load.sh.
  rejection=$(run_path "$pid" bench-key-not-in-any-table "$tag-rejection")
  # keygate's own key format (`kg_<id>_<secret><checksum>`) with a checksum that does not
  # match: refused before the table is looked at (load.sh's reject-badcrc row).
  checksum=$(run_path "$pid" kg_jcz74bnl_EMLiRwnRTq2fh69rAozSgYqEiPzQfzSQ4T2dg0 "$tag-checksum")
  kill -INT "$pid"
  wait "$pid" 2>/dev/null || true
  printf 'proxied %7s   rejection %7s   bad checksum %7s' "$proxied" "$rejection" "$checksum"
}

for ((i = 0; i < 100; i++)); do
  [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$UPSTREAM_PORT/" || true) == 200 ]] && break
  sleep 0.1
done

rounds=1
((${#BINARIES[@]} == 1)) || rounds=2
for ((round = 1; round <= rounds; round++)); do
  for binary in "${BINARIES[@]}"; do
    log "measuring $binary (round $round)"
    printf '%-60s %s instructions per request\n' "$binary" "$(measure "$binary" "$(basename "$binary")-$round")"
  done
done
