#!/usr/bin/env bash
# The main job: a local federation on loopback.
#   1. installs missing Debian packages, builds Release into build/ (binaries in build/bin/);
#   2. makes a tiny Llama-architecture model and 3 sites' private JSONL data sets;
#   3. creates a dev PKI, starts a coordinator (embedded RocksDB under build/demo/coordinator)
#      and 3 agents over mutual TLS on 127.0.0.1;
#   4. runs 3 federated rounds, printing per round: participants, mean local training loss,
#      held-out loss of the global adapter before -> after, bytes up/down per agent, version;
#      the last line is one JSON object summing up the run.
# Idempotent: reuses the build, starts from clean state every time. Stops all it started.
# Environment: ROUNDS (3), STEPS (local steps per round, 40), LR (3e-3), PORT (random free port),
#              DEMO_DIR (build/demo), JOBS (build parallelism),
#              MODE (sync | async: FedBuff, a version every BUFFER (2) updates; docs/aggregation.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

./scripts/deps.sh
./scripts/build.sh --target fedlora-coordinator fedlora-agent fedlora-admin fedlora-sim >&2

BIN=$ROOT/${BUILD_DIR:-build}/bin
DEMO=${DEMO_DIR:-$ROOT/build/demo}
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-40}
SITES=3

pick_port() {
  local p
  for _ in $(seq 1 50); do
    p=$(( 20000 + RANDOM % 20000 ))
    if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo $p; return 0; fi
  done
  echo "demo: no free port found" >&2; return 1
}
PORT=${PORT:-$(pick_port)}

PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

rm -rf "$DEMO"
mkdir -p "$DEMO/logs"
echo "demo: making data and model in $DEMO" >&2
"$BIN/fedlora-sim" make-data --out "$DEMO/data" --sites $SITES >&2
"$BIN/fedlora-sim" make-model --out "$DEMO/model" >&2
"$BIN/fedlora-admin" pki init "$DEMO/pki" >&2
for i in $(seq 0 $((SITES - 1))); do
  "$BIN/fedlora-admin" pki issue --ca-dir "$DEMO/pki" --name "site-$i" --role agent --out "$DEMO/pki" >&2
done

echo "demo: coordinator on 127.0.0.1:$PORT, $SITES agents, $ROUNDS rounds (logs in $DEMO/logs)" >&2
"$BIN/fedlora-coordinator" \
  --listen-address "127.0.0.1:$PORT" --data-dir "$DEMO/coordinator" \
  --tls-ca "$DEMO/pki/ca.pem" --tls-cert "$DEMO/pki/coordinator.pem" \
  --tls-key "$DEMO/pki/coordinator.key" \
  --base-model-dir "$DEMO/model" --min-participants $SITES --rounds "$ROUNDS" \
  --local-steps "$STEPS" --learning-rate "${LR:-3e-3}" \
  --lora-target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --mode "${MODE:-sync}" --async-buffer-size "${BUFFER:-2}" \
  >"$DEMO/logs/coordinator.out" 2>"$DEMO/logs/coordinator.log" &
COORD=$!
PIDS+=($COORD)

for i in $(seq 0 $((SITES - 1))); do
  "$BIN/fedlora-agent" run --coordinator "127.0.0.1:$PORT" \
    --ca "$DEMO/pki/ca.pem" --cert "$DEMO/pki/site-$i.pem" --key "$DEMO/pki/site-$i.key" \
    --model "$DEMO/model" --data "$DEMO/data/site-$i/train.jsonl" \
    --eval "$DEMO/data/site-$i/heldout.jsonl" --threads 1 --seed $i --max-offline 15 \
    >"$DEMO/logs/agent-$i.out" 2>"$DEMO/logs/agent-$i.log" &
  PIDS+=($!)
done

# Show the coordinator's round lines as they come.
tail -n +1 -f --pid=$COORD "$DEMO/logs/coordinator.out" &
TAIL=$!
status=0
wait $COORD || status=$?
wait $TAIL 2>/dev/null || true
if [ $status -ne 0 ]; then
  echo "demo: coordinator exited with status $status; last log lines:" >&2
  tail -n 30 "$DEMO/logs/coordinator.log" >&2
  exit $status
fi
