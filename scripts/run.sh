#!/usr/bin/env bash
# Installs dependencies, builds tailcoat, and starts it on the embedded
# defaults: SQLite under ./data, a generated ./data/config.yaml, listening on
# http://127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)"
mkdir -p data
if [ ! -f data/config.yaml ]; then
  ./build/tailcoat config init -o data/config.yaml
fi
exec ./build/tailcoat serve -c data/config.yaml
