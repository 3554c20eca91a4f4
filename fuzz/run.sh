#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each), one after
# the other, starting from the committed seeds in fuzz/corpus/<target>/.
# New inputs the fuzzer finds go to fuzz/target/corpus/<target>/ (not
# committed); a crash, hang or out-of-memory stops with the input saved in
# fuzz/artifacts/<target>/ and a non-zero exit.
#
#   bash fuzz/run.sh            # 60 s per target
#   bash fuzz/run.sh 10         # 10 s per target
#   bash fuzz/run.sh 60 frames  # only the named targets
#
# Needs the nightly toolchain and cargo-fuzz (cargo install --locked cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: bash fuzz/run.sh [seconds-per-target] [target...]" >&2
  exit 64
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: the nightly toolchain is missing (cargo-fuzz needs it): rustup toolchain install nightly" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: cargo-fuzz is missing: cargo install --locked cargo-fuzz" >&2
  exit 1
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

# Build once (release with debug assertions and AddressSanitizer, as
# cargo-fuzz does by default), then run each target from that build.
cargo +nightly fuzz build

failed=()
for t in "${targets[@]}"; do
  work=fuzz/target/corpus/$t
  mkdir -p "$work"
  echo "==> fuzz $t for ${seconds}s"
  # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: a run
  # growing past 2 GiB is a finding (the default, spelled out).
  if ! cargo +nightly fuzz run "$t" "$work" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz/run.sh: findings in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz/run.sh: ${#targets[@]} targets ran ${seconds}s each with no finding"
