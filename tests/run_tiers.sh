#!/usr/bin/env bash
# `make test`: every tier, each in its own pytest session (see the Makefile for why), and the kind
# tier's tools and images built in the background meanwhile (niced), so a cold machine does the Go
# builds and image builds while the other tiers run instead of after them. Exits non-zero when any
# tier fails; every tier runs regardless, so one report shows all failures.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
V=.venv/bin
mkdir -p .cache
log=.cache/kind-prepare.log
nice -n 19 bash tests/kind/kind.sh prepare >"$log" 2>&1 &
prep=$!
trap 'kill "$prep" 2>/dev/null || true' EXIT

failed=()
"$V/pytest" -m "not ray and not kind" tests || failed+=("unit/cluster/e2e")
"$V/pytest" -m ray tests/ray || failed+=("ray")
echo "== waiting for the kind tier's tools and images (log: $log)"
if wait "$prep"; then
  "$V/pytest" -m kind tests/kind || failed+=("kind")
else
  tail -n 50 "$log"
  failed+=("kind (prepare)")
fi
trap - EXIT
if [ ${#failed[@]} -gt 0 ]; then
  echo "== failed tiers: ${failed[*]}"
  exit 1
fi
echo "== all tiers passed"
