#!/usr/bin/env bash
# Runs the four services as separate processes against KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL.
# Ctrl-C (or SIGTERM) stops them all gracefully.
set -euo pipefail
: "${KAFKA_BOOTSTRAP_SERVERS:?set it, e.g. eval \"\$(bash deploy/local/stack.sh env)\"}"
: "${DATABASE_URL:?set it, e.g. eval \"\$(bash deploy/local/stack.sh env)\"}"
BIN="${BIN:-.venv/bin}"
pids=()
for service in ingest rating ledger projections; do
  "$BIN/billing" serve "$service" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' INT TERM
wait
