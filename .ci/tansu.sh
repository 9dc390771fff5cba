#!/usr/bin/env bash
# Installs the Tansu broker for the real-broker tests, or reuses an installed one.
# SQLite storage only (the `memory://` engine skips messages on mid-batch fetches).
set -euo pipefail

if [ -n "${TANSU_BIN:-}" ] && [ -x "$TANSU_BIN" ]; then
    exit 0
fi
if [ -x "$HOME/.cargo/bin/tansu" ] || command -v tansu >/dev/null 2>&1; then
    exit 0
fi
echo "installing the Tansu broker (about 8 minutes on 2 cores)"
cargo install tansu@0.6.0 --locked --features libsql
