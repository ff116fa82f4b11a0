#!/usr/bin/env bash
# The seed example over JSON-RPC 2.0 with curl: evaluates the graph of
# examples/graphs/seed.json (a = -4, b = 2, output g) and prints g, dg/da and
# dg/db to 4 decimals: 24.7041, 138.8338, 645.5773.
#
# Usage: examples/curl_seed.sh [URL]   (or MICROGRAD_RPC_URL; default http://127.0.0.1:8080/rpc)
# With TLS and a token (a server run with --tls-cert, --tls-key, --auth-token-file):
#   MICROGRAD_RPC_TLS_CA=ca.pem MICROGRAD_RPC_TOKEN="$(cat token)" \
#     examples/curl_seed.sh https://127.0.0.1:8080/rpc
# and, for a server that also requires client certificates (--tls-client-ca),
# MICROGRAD_RPC_TLS_CLIENT_CERT=client.pem MICROGRAD_RPC_TLS_CLIENT_KEY=client.key.
# The token goes to curl through a file descriptor, not its command line.
# Needs curl; uses jq or python3 to pick the three numbers out of the
# response, and prints the raw response when neither is installed.
set -euo pipefail
url="${1:-${MICROGRAD_RPC_URL:-http://127.0.0.1:8080/rpc}}"
graph="$(dirname "$0")/graphs/seed.json"
security=()
[ -n "${MICROGRAD_RPC_TLS_CA:-}" ] && security+=(--cacert "$MICROGRAD_RPC_TLS_CA")
[ -n "${MICROGRAD_RPC_TLS_CLIENT_CERT:-}" ] && security+=(--cert "$MICROGRAD_RPC_TLS_CLIENT_CERT")
[ -n "${MICROGRAD_RPC_TLS_CLIENT_KEY:-}" ] && security+=(--key "$MICROGRAD_RPC_TLS_CLIENT_KEY")
if [ -n "${MICROGRAD_RPC_TOKEN:-}" ]; then
  exec 3< <(printf 'Authorization: Bearer %s\n' "$MICROGRAD_RPC_TOKEN")
  security+=(-H @/dev/fd/3)
fi

# SELECTION_NAMED reports the named nodes a, b and g; result.names maps each
# name to its position in result.values and result.grads.
request="{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"Evaluate\",
  \"params\": {\"graph\": $(cat "$graph"), \"selection\": \"SELECTION_NAMED\"}}"
response="$(curl --silent --show-error --fail-with-body "${security[@]}" \
  -H 'Content-Type: application/json' --data-binary "$request" "$url")"

if command -v jq >/dev/null; then
  jq -r 'if .error then error(.error.message) else .result end
         | .values[.names.g], .grads[.names.a], .grads[.names.b]' <<<"$response" \
    | xargs printf '%.4f\n'
elif command -v python3 >/dev/null; then
  python3 -c '
import json, sys
answer = json.load(sys.stdin)
if "error" in answer:
    sys.exit(answer["error"]["message"])
r = answer["result"]
for number in (r["values"][r["names"]["g"]], r["grads"][r["names"]["a"]], r["grads"][r["names"]["b"]]):
    print(f"{number:.4f}")
' <<<"$response"
else
  echo "$response"
fi
