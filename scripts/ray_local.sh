# Helpers for the run-*.sh launchers (sourced). A Ray head of our own on 127.0.0.1, stopped
# when the script exits; Ray processes of anyone else on the machine are left alone.
# Set RAY_ADDRESS to submit to an existing cluster instead (multi-node: run
# `ray start --address <head-ip>:6379` on each worker first); its authentication settings
# (RAY_AUTH_MODE, RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token) are used untouched.

ensure_ray_auth_token() {
  # Our head runs with Ray's token authentication. Ray looks for the token in RAY_AUTH_TOKEN,
  # then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token; `ray get-auth-token --generate` (Ray's
  # documented way) keeps an existing ~/.ray/auth_token or writes a new one. A bare machine
  # has none, and `ray start` refuses token mode without it. umask 077: readable by this user
  # only. The token itself is never printed.
  if [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then return; fi
  if ! (umask 077 && ray get-auth-token --generate > /dev/null); then
    echo "could not create a Ray auth token (ray get-auth-token --generate)" >&2
    exit 1
  fi
}

free_port() {  # a port free on 127.0.0.1 right now, outside Ray's worker port range
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_local_ray() {  # $1: CPUs, $2: GPUs
  if [ -n "${RAY_ADDRESS:-}" ]; then
    SUBMIT_ADDRESS=${RAY_ADDRESS}
    return
  fi
  # Token authentication (Ray's default for new local clusters); the CLI clients below must
  # run in the same mode to send the token. An explicit RAY_AUTH_MODE is respected.
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
  if [ "${RAY_AUTH_MODE}" = "token" ]; then ensure_ray_auth_token; fi
  RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
  # Ray's other fixed defaults (job agent 52365, client server 10001) would collide with any
  # other Ray head on the machine and leave the job agent dead: take free ports instead.
  local agent_port client_port
  agent_port=${RAY_AGENT_PORT:-$(free_port)}
  client_port=${RAY_CLIENT_PORT:-$(free_port)}
  ray start --head --block --port "${RAY_GCS_PORT:-6379}" --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 \
    --dashboard-port "${RAY_DASHBOARD_PORT}" --dashboard-agent-listen-port "${agent_port}" \
    --ray-client-server-port "${client_port}" --num-cpus "$1" --num-gpus "$2" --disable-usage-stats \
    > "${OUT}/ray_head.log" 2>&1 &
  RAY_HEAD_PID=$!
  trap 'kill "${RAY_HEAD_PID}" 2>/dev/null; wait "${RAY_HEAD_PID}" 2>/dev/null || true' EXIT
  SUBMIT_ADDRESS="http://127.0.0.1:${RAY_DASHBOARD_PORT}"
  for _ in $(seq 1 90); do
    if ray job list --address "${SUBMIT_ADDRESS}" > /dev/null 2>&1; then return; fi
    if ! kill -0 "${RAY_HEAD_PID}" 2>/dev/null; then
      echo "ray head failed to start; last lines of ${OUT}/ray_head.log:" >&2
      tail -n 20 "${OUT}/ray_head.log" >&2
      exit 1
    fi
    sleep 1
  done
  echo "ray head did not answer at ${SUBMIT_ADDRESS} within 90 s" >&2
  exit 1
}

submit_job() {  # ray job submit to ${SUBMIT_ADDRESS}; "$@": its options, then -- and the entrypoint
  # A head that answers `ray job list` may still refuse a submission for a while (seen on a
  # loaded machine: HTTP 500 "No available agent to submit job", or the connection dropped).
  # The job gets a fixed submission id, so a retry can tell "never created" (submit again)
  # from "created, then the connection dropped" (follow that job instead of a second one).
  # Any failure of the job itself is final.
  local id log rc
  id="slime-$(date +%Y%m%d-%H%M%S)-$$"
  log=$(mktemp)
  for _ in $(seq 1 30); do
    set +e
    ray job submit --address "${SUBMIT_ADDRESS}" --submission-id "${id}" "$@" 2>&1 | tee "${log}"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "${rc}" -eq 0 ] || ! grep -Eq "No available agent to submit job|Connection aborted|RemoteDisconnected|Connection refused" "${log}"; then
      rm -f "${log}"
      return "${rc}"
    fi
    if ray job status --address "${SUBMIT_ADDRESS}" "${id}" > /dev/null 2>&1; then  # it exists: follow it
      rm -f "${log}"
      ray job logs --address "${SUBMIT_ADDRESS}" --follow "${id}" || true
      ray job status --address "${SUBMIT_ADDRESS}" "${id}" | tee /dev/stderr | grep -q "succeeded"
      return
    fi
    echo "ray job submission was refused (job agent not ready); submitting again in 2 s" >&2
    sleep 2
  done
  rm -f "${log}"
  echo "ray never accepted the job at ${SUBMIT_ADDRESS}" >&2
  return 1
}
