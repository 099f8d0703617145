#!/usr/bin/env bash
# run_doc_block.sh DOC HEADING DIR BIN_DIR
#
# Runs the first ```sh block after the line HEADING in DOC (a path under
# the source tree) exactly as written, with two substitutions only: the
# scratch directory DIR it names (e.g. /tmp/custos-dev) becomes a fresh
# temporary directory, and "build/bin/" becomes BIN_DIR/ when the tests
# run from another build directory. CUSTOS_DEV_PORT is set to a free port,
# so scripts/dev-env in the block listens there. It runs from the source
# root, under bash -e -o pipefail; any process left running under the
# temporary directory is killed at the end. Exit code: the block's.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DOC=$1 HEADING=$2 DIR=$3 BIN_DIR=$4

block=$(awk -v h="$HEADING" '
  $0 == h { found = 1; next }
  found && !inside && /^```sh$/ { inside = 1; next }
  inside && /^```$/ { exit }
  inside { print }' "$ROOT/$DOC")
if [ -z "$block" ]; then
  echo "no \`\`\`sh block after '$HEADING' in $DOC" >&2
  exit 2
fi

WORK=$(mktemp -d /tmp/custos-docblock.XXXXXX)
cleanup() {
  pkill -f -- "$WORK/" 2>/dev/null || true
  sleep 0.2
  pkill -9 -f -- "$WORK/" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
block=${block//"$DIR"/"$WORK/dir"}
if [ "$(cd "$BIN_DIR" && pwd)" != "$ROOT/build/bin" ]; then
  block=${block//build\/bin\//"$BIN_DIR/"}
fi
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf '%s: running the block after "%s" (%s -> %s, port %s):\n%s\n---\n' \
  "$DOC" "$HEADING" "$DIR" "$WORK/dir" "$PORT" "$block"
cd "$ROOT"
# A shell of its own: the block may use job control (kill %1) and cd.
CUSTOS_DEV_PORT=$PORT bash -e -o pipefail -c "$block"
echo "--- the block ran to the end"
