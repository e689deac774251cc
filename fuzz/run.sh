#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS (default 20: all five in under two minutes,
# as CI does). Exits non-zero if any target crashed, panicked, leaked or timed out; the
# input that did it is left in fuzz/artifacts/<target>/ and printed at the end.
#
#   fuzz/run.sh                  # CI: 20 s per target
#   fuzz/run.sh 3600             # a long run: an hour per target (do this before a release)
#   fuzz/run.sh 600 key_extract  # one target
#
# Reproduce and minimise a crash:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/crash-…        (in fuzz/)
#   RUSTC_BOOTSTRAP=1 cargo fuzz tmin <target> fuzz/artifacts/<target>/crash-…
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). cargo-fuzz passes nightly-only
# flags (-Zsanitizer=address); RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
# Each target starts from the committed seeds in fuzz/seeds/<target>/ (with the tokens in
# fuzz/dicts/<target>.dict) and keeps what it learns in fuzz/corpus/<target>/ (ignored by
# git), so later runs resume from there.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-20}"
shift || true
if [[ $# -gt 0 ]]; then
  targets=("$@")
else
  targets=(path_normalize key_extract config_load upstream_response request_head)
fi
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [[ "$seconds" -eq 0 ]]; then
  echo "usage: fuzz/run.sh [seconds-per-target] [target…]" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
  exit 2
fi

export RUSTC_BOOTSTRAP=1
cargo fuzz build

failed=()
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  echo "=== $target: ${seconds}s"
  dict=()
  if [[ -f "dicts/$target.dict" ]]; then
    dict=("-dict=dicts/$target.dict")
  fi
  # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: runaway memory is a bug.
  if ! cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- "${dict[@]}" \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=16384 -print_final_stats=1; then
    failed+=("$target")
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzzing found problems in: ${failed[*]}" >&2
  for target in "${failed[@]}"; do
    ls -1 "artifacts/$target" >&2
  done
  exit 1
fi
echo "fuzzing: no crash in ${targets[*]} (${seconds}s each)"
