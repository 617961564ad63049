# Helpers for the run-*.sh launchers (sourced). A Ray head of our own on 127.0.0.1, stopped
# when the script exits; Ray processes of anyone else on the machine are left alone.
# Set RAY_ADDRESS to submit to an existing cluster instead (multi-node: run
# `ray start --address <head-ip>:6379` on each worker first).

start_local_ray() {  # $1: CPUs, $2: GPUs
  # Ray's token authentication (the default for local clusters since Ray 2.59): the CLI
  # clients below must run in the same mode to send the token from ~/.ray/auth_token.
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
  if [ -n "${RAY_ADDRESS:-}" ]; then
    SUBMIT_ADDRESS=${RAY_ADDRESS}
    return
  fi
  RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
  ray start --head --block --port "${RAY_GCS_PORT:-6379}" --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 \
    --dashboard-port "${RAY_DASHBOARD_PORT}" --num-cpus "$1" --num-gpus "$2" --disable-usage-stats \
    > "${OUT}/ray_head.log" 2>&1 &
  RAY_HEAD_PID=$!
  trap 'kill "${RAY_HEAD_PID}" 2>/dev/null; wait "${RAY_HEAD_PID}" 2>/dev/null || true' EXIT
  SUBMIT_ADDRESS="http://127.0.0.1:${RAY_DASHBOARD_PORT}"
  for _ in $(seq 1 90); do
    if ray job list --address "${SUBMIT_ADDRESS}" > /dev/null 2>&1; then return; fi
    if ! kill -0 "${RAY_HEAD_PID}" 2>/dev/null; then echo "ray head failed to start: see ${OUT}/ray_head.log" >&2; exit 1; fi
    sleep 1
  done
  echo "ray head did not answer at ${SUBMIT_ADDRESS} within 90 s" >&2
  exit 1
}
