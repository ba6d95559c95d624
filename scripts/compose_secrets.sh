#!/usr/bin/env bash
# Generate the compose stack's credentials, once: a random gRPC token, NATS and Redis passwords,
# and the NATS and Redis configuration files that carry them (docker-compose.yml mounts them as
# secrets). Files already there are kept, so a restarted stack keeps its credentials.
#
#   scripts/compose_secrets.sh          # into $TESSERA_SECRETS_DIR (.env: ./deploy/secrets)
#
# The folder is gitignored, kept out of image builds (.dockerignore) and mode 0700. The files
# are 0644 inside it: the containers' own users (tessera, redis, nats) read their bind mounts.
set -euo pipefail
# shellcheck source=scripts/compose_env.sh
. "$(dirname "${BASH_SOURCE[0]}")/compose_env.sh"

dir=${TESSERA_SECRETS_DIR:-./deploy/secrets}
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
random() { "$PY" -c 'import secrets; print(secrets.token_urlsafe(32))'; }
made=()
for name in auth_token nats_password redis_password; do
  if [ ! -s "$dir/$name" ]; then
    random > "$dir/$name.tmp" && mv "$dir/$name.tmp" "$dir/$name"
    made+=("$name")
  fi
done
nats_password=$(cat "$dir/nats_password")
redis_password=$(cat "$dir/redis_password")
# The configuration files follow the passwords (rewritten each time: cheap, and never stale).
cat > "$dir/nats.conf.tmp" <<CONF
authorization {
  users = [
    { user: "${NATS_USER:-tessera}", password: "$nats_password" }
  ]
}
CONF
mv "$dir/nats.conf.tmp" "$dir/nats.conf"
printf 'requirepass %s\n' "$redis_password" > "$dir/redis.conf.tmp"
mv "$dir/redis.conf.tmp" "$dir/redis.conf"
chmod 644 "$dir"/auth_token "$dir"/nats_password "$dir"/redis_password "$dir"/nats.conf "$dir"/redis.conf
if [ ${#made[@]} -gt 0 ]; then
  echo "compose_secrets: generated ${made[*]} in $dir"
else
  echo "compose_secrets: using the credentials in $dir"
fi
