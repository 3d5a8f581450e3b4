#!/bin/sh
# CURVE across two hosts: the sink on host A, a worker and a producer on host B, every
# connection encrypted, and only host B's key let in.
#
#   on host A:  ./curve_two_hosts.sh keys          # writes keys/, once
#               (copy keys/node.key_secret and keys/sink.key to host B's keys/)
#               ./curve_two_hosts.sh sink          # binds tcp://*:5557-5559
#   on host B:  SINK_HOST=host-a ./curve_two_hosts.sh node
#
#   ./curve_two_hosts.sh demo                      # both hosts on this machine, over loopback
#
# The endpoints' ports come from INTAKE_PORT, CONTROL_PORT and RESULTS_PORT (5557-5559).
set -eu

KEYS=${KEYS:-keys}
SINK_HOST=${SINK_HOST:-127.0.0.1}
INTAKE_PORT=${INTAKE_PORT:-5557}
CONTROL_PORT=${CONTROL_PORT:-5558}
RESULTS_PORT=${RESULTS_PORT:-5559}
ZFAN=${ZFAN:-zfan}

keys() {
  $ZFAN keys generate "$KEYS" sink
  $ZFAN keys generate "$KEYS" node
  mkdir -p "$KEYS/allowed"
  cp "$KEYS/node.key" "$KEYS/allowed/"   # the sink lets in the public keys in this folder
}

sink() {
  exec $ZFAN sink --ledger "${LEDGER:-zfan.db}" \
    --intake "tcp://*:$INTAKE_PORT" --control "tcp://*:$CONTROL_PORT" --results "tcp://*:$RESULTS_PORT" \
    --curve-secret "$KEYS/sink.key_secret" --allow-keys "$KEYS/allowed"
}

node() {
  client="--curve-secret $KEYS/node.key_secret --curve-server-key $KEYS/sink.key"
  control="tcp://$SINK_HOST:$CONTROL_PORT"
  $ZFAN worker --control "$control" $client --app zfan.apps:rollup &
  pids="${pids:-} $!"
  trap stop EXIT INT TERM
  $ZFAN produce --intake "tcp://$SINK_HOST:$INTAKE_PORT" --control "$control" $client \
    --count "${COUNT:-10000}" --no-progress
}

# Stop what this script started (SIGTERM: each drains), and wait for it.
stop() {
  for pid in ${pids:-}; do kill "$pid" 2>/dev/null || true; done
  for pid in ${pids:-}; do wait "$pid" 2>/dev/null || true; done
  if [ -n "${folder:-}" ]; then rm -rf "$folder"; fi
}

demo() {
  folder=$(mktemp -d)
  KEYS="$folder/keys" LEDGER="$folder/zfan.db"
  export KEYS LEDGER
  keys >/dev/null
  (sink) 2>"$folder/sink.log" &
  pids=$!
  trap stop EXIT INT TERM
  tries=0
  until grep -q ": ready " "$folder/sink.log"; do  # the sink has bound its sockets
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ]; then cat "$folder/sink.log" >&2; exit 1; fi
    sleep 0.1
  done
  node
}

case "${1:-}" in
  keys | sink | node | demo) "$1" ;;
  *) echo "usage: $0 keys|sink|node|demo" >&2; exit 2 ;;
esac
