#!/usr/bin/env bash
# The test suite as a fresh machine runs it: no mosquitto, mosquitto_pub or chromium installed.
#
#   devtools/fresh_machine.sh [pytest arguments]      (as root)
#
# In a private mount namespace (`unshare --mount`), every such program is hidden behind an empty,
# non-executable file bound over it, so `shutil.which` no longer finds it; the suite then runs in
# a fresh `git clone` of HEAD, reusing this checkout's venv (a symlink) and built models (a copy).
# The broker tests run on the embedded amqtt broker; only what truly needs Mosquitto or a
# browser is skipped, each with its reason (`-rs` lists them). Nothing outside the namespace
# changes, and the clone is removed at the end.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
hide=(mosquitto mosquitto_pub mosquitto_sub mosquitto_passwd mosquitto_rr chromium chromium-browser)

if [ "$(id -u)" != 0 ]; then
  echo "fresh_machine.sh: needs root for unshare --mount" >&2
  exit 2
fi
if [ -z "${FRESH_MACHINE_NAMESPACE:-}" ]; then
  exec unshare --mount --propagation private env FRESH_MACHINE_NAMESPACE=1 "$0" "$@"
fi

work=$(mktemp -d /tmp/fresh-machine.XXXXXX)
trap 'rm -rf "$work"' EXIT
empty="$work/hidden"
: > "$empty"
chmod 0644 "$empty"

declare -A done_paths=()
for name in "${hide[@]}"; do
  for dir in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
    [ -e "$dir/$name" ] || continue
    real=$(readlink -f "$dir/$name")
    [ -z "${done_paths[$real]:-}" ] || continue
    done_paths[$real]=1
    mount --bind "$empty" "$real"
  done
done
# The tests look programs up with shutil.which: check with it, not with the shell.
"$repo/.venv/bin/python" - "${hide[@]}" <<'PY'
import shutil, sys
seen = {name: shutil.which(name) for name in sys.argv[1:] if shutil.which(name)}
if seen:
    sys.exit(f"fresh_machine.sh: still visible: {seen}")
PY

git clone -q --no-checkout "$repo" "$work/clone"
git -C "$work/clone" checkout -q --detach "$(git -C "$repo" rev-parse HEAD)"
ln -s "$(readlink -f "$repo/.venv")" "$work/clone/.venv"
# The built models are copied, not linked: `bentoml build` does not follow a symlinked folder.
for model in "$repo"/models/*/; do
  [ -d "$model" ] && cp -rL "$model" "$work/clone/models/$(basename "$model")"
done

cd "$work/clone"
echo "fresh_machine.sh: hidden ${!done_paths[*]}; running the suite in $work/clone at $(git rev-parse --short HEAD)"
.venv/bin/python -m pytest -q -p no:cacheprovider -rs "$@"
