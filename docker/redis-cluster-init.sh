#!/bin/sh
# Create the 3-master Redis Cluster of docker/compose.yaml once (idempotent).
# redis-cli --cluster create wants IP addresses: resolve the service names first.
set -eu
NODES="${REDIS_NODES:-redis-1 redis-2 redis-3}"
PORT="${REDIS_PORT:-6379}"
first=$(echo "$NODES" | cut -d' ' -f1)
for node in $NODES; do
  until redis-cli -h "$node" -p "$PORT" ping >/dev/null 2>&1; do sleep 0.5; done
done
if redis-cli -h "$first" -p "$PORT" cluster info | grep -q 'cluster_state:ok'; then
  echo "cluster already created"; exit 0
fi
addresses=""
for node in $NODES; do
  ip=$(getent hosts "$node" | awk '{print $1}')
  addresses="$addresses $ip:$PORT"
done
redis-cli --cluster create $addresses --cluster-replicas 0 --cluster-yes
until redis-cli -h "$first" -p "$PORT" cluster info | grep -q 'cluster_state:ok'; do sleep 0.5; done
echo "cluster ok:$addresses"
