#!/usr/bin/env bash
# The real infrastructure for tests and local runs: Kafka (KRaft) + PostgreSQL, natively, no Docker.
#
#   deploy/local/stack.sh up       start both (each is reused if already up)
#   deploy/local/stack.sh down     stop both (only what these scripts started)
#   deploy/local/stack.sh status   exit 0 when both answer
#   deploy/local/stack.sh env      print the exports the services and tests read:  eval "$(deploy/local/stack.sh env)"
#
# If KAFKA_BOOTSTRAP_SERVERS or DATABASE_URL is already set, `up` uses the given server and does not start the
# local one (and `env` echoes the given value). `down` always stops the local servers, whatever the environment
# says, so `eval "$(stack.sh env)"; ...; stack.sh down` works.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOCAL_KAFKA=127.0.0.1:9092
LOCAL_DATABASE_URL=postgresql://billing:billing@127.0.0.1:55432/billing

log() { printf '[stack] %s\n' "$*"; }

cmd_up() {
  local start=$SECONDS
  if [[ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
    log "KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS is set: using it, not starting local Kafka"
  else
    bash "$HERE/kafka.sh" up
  fi
  if [[ -n "${DATABASE_URL:-}" ]]; then
    log "DATABASE_URL is set: using it, not starting local PostgreSQL"
  else
    bash "$HERE/postgres.sh" up
  fi
  log "up in $((SECONDS - start)) s; for your shell: eval \"\$(bash $0 env)\""
}

cmd_down() {
  local rc=0
  bash "$HERE/kafka.sh" down || rc=1
  bash "$HERE/postgres.sh" down || rc=1
  return "$rc"
}

cmd_status() {
  local rc=0
  if [[ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
    log "Kafka: given by KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS (not checked)"
  else
    bash "$HERE/kafka.sh" status || rc=3
  fi
  if [[ -n "${DATABASE_URL:-}" ]]; then
    log "PostgreSQL: given by DATABASE_URL (not checked)"
  else
    bash "$HERE/postgres.sh" status || rc=3
  fi
  return "$rc"
}

cmd_env() {
  printf 'export KAFKA_BOOTSTRAP_SERVERS=%q\n' "${KAFKA_BOOTSTRAP_SERVERS:-$LOCAL_KAFKA}"
  printf 'export DATABASE_URL=%q\n' "${DATABASE_URL:-$LOCAL_DATABASE_URL}"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *)
    echo "usage: $0 up|down|status|env" >&2
    exit 2
    ;;
esac
