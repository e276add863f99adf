#!/usr/bin/env bash
# Print `export NAME=VALUE` lines for the secrets a TriPosT cluster node needs, read from
# the cloud's secret store with the node's own identity (instance profile / service
# account). Used as `eval "$(bash secrets_env.sh aws)"; ray start ...` so the values live
# only in the environment of the Ray processes: never in a file, a YAML or a log.
# A secret that does not exist is skipped (a job may use only one provider).
#
#   aws: SSM Parameter Store SecureStrings  /tripost/openai-api-key, /tripost/anthropic-api-key,
#        /tripost/hf-token, /tripost/ray-auth-token
#   gcp: Secret Manager secrets             tripost-openai-api-key, tripost-anthropic-api-key,
#        tripost-hf-token, tripost-ray-auth-token
#
# When a Ray auth token is found, RAY_AUTH_MODE=token is exported too, so every node of
# the cluster (and `tripost submit` with the same token) uses Ray's token authentication.
set -uo pipefail

cloud=${1:?usage: secrets_env.sh aws|gcp}
case "$cloud" in
  aws|gcp) ;;
  *) echo "secrets_env.sh: unknown cloud '$cloud' (aws|gcp)" >&2; exit 2 ;;
esac

fetch() {  # fetch <name> -> the secret's value on stdout, or nothing
  case "$cloud" in
    aws) aws ssm get-parameter --with-decryption --name "/tripost/$1" \
           --query Parameter.Value --output text 2>/dev/null ;;
    gcp) gcloud secrets versions access latest --secret "tripost-$1" 2>/dev/null ;;
  esac
}

emit() {  # emit <ENV_NAME> <secret-name>
  local value
  value=$(fetch "$2") || return 0
  [ -n "$value" ] || return 0
  printf 'export %s=%q\n' "$1" "$value"
}

emit OPENAI_API_KEY openai-api-key
emit ANTHROPIC_API_KEY anthropic-api-key
emit HF_TOKEN hf-token
token=$(fetch ray-auth-token) || token=""
if [ -n "$token" ]; then
  printf 'export RAY_AUTH_MODE=token\nexport RAY_AUTH_TOKEN=%q\n' "$token"
fi
