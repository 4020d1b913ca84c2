#!/usr/bin/env bash
# Installs dependencies, builds tailcoat (release build at build/ and an
# ASan+UBSan build at build-asan/), and runs the whole test suite under the
# sanitizers. Extra arguments go to ctest (e.g. -L unit).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
jobs=$(nproc)
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$jobs"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DTC_SANITIZE=ON >/dev/null
cmake --build build-asan -j"$jobs"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# Policy conformance pass counts per category (the CTest below enforces the
# ratchet; this prints the counts where a reader of the log sees them).
echo "== policy conformance (Tailscale captures) =="
./build/policy-conformance | grep -v '^FAIL' || true
cd build-asan
ctest --output-on-failure -j"$jobs" "$@"
