#!/usr/bin/env bash
# Start the MLflow tracking server (UI + REST API + artifact proxy) for a team.
#
#   mlflow/server.sh                                   # the workspace's sqlite store, 127.0.0.1:5000
#   mlflow/server.sh --backend-store-uri postgresql://user@db:5432/mlflow \
#                    --artifacts-destination s3://bucket/mlflow --host 0.0.0.0 --port 5000
#
# Then point runs at it: `tracking.tracking_uri: http://HOST:PORT` in the config (or
# MLFLOW_TRACKING_URI). Options (each also read from the environment variable in brackets):
#   --backend-store-uri URI       runs + model registry   [MLFLOW_BACKEND_STORE_URI]
#                                 default: sqlite:///$INSTRUCTFLOW_HOME/mlflow.db
#   --artifacts-destination URI   where artifacts land    [MLFLOW_ARTIFACTS_DESTINATION]
#                                 default: $INSTRUCTFLOW_HOME/mlartifacts
#   --host HOST                   bind address            [MLFLOW_HOST]     default: 127.0.0.1
#   --port PORT                                           [MLFLOW_PORT]     default: 5000
#   --workers N                                           [MLFLOW_WORKERS]  default: 2
# Anything else is passed to `mlflow server` (e.g. --allowed-hosts when exposing it).
# PostgreSQL needs a driver: pip install "psycopg[binary]" (SQLAlchemy 2.1's default).
set -euo pipefail

home="${INSTRUCTFLOW_HOME:-.instructflow}"
mkdir -p "$home"
home="$(cd "$home" && pwd)"

backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$home/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$home/mlartifacts}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-2}"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --backend-store-uri) backend="$2"; shift 2 ;;
    --artifacts-destination | --artifact-root) artifacts="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done

case "$artifacts" in
  *://*) ;;
  *) mkdir -p "$artifacts" ;;
esac

# Never echo the backend URI: it may carry a database password.
echo "MLflow tracking server on http://$host:$port (artifacts: $artifacts)" >&2
exec "${MLFLOW:-mlflow}" server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host "$host" --port "$port" --workers "$workers" \
  ${extra[@]+"${extra[@]}"}
