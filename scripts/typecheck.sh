#!/usr/bin/env bash
# mypy on the packages as they install: flows/, tasks/ and deployments/ are hopflow.flows, hopflow.tasks and
# hopflow.deployments (setuptools package-dir), which mypy cannot see through the editable install's import hook, so it
# reads a throw-away tree of links laid out like the installed package. Settings: [tool.mypy] in pyproject.toml.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${HOPFLOW_PYTHON:-$ROOT/.venv/bin/python}
tree=$(mktemp -d /tmp/hopflow-typecheck.XXXXXX)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/hopflow"
for entry in "$ROOT"/hopflow/*; do
    ln -s "$entry" "$tree/hopflow/$(basename "$entry")"
done
for package in flows tasks deployments; do
    ln -s "$ROOT/$package" "$tree/hopflow/$package"
done
cd "$tree"
"$PY" -m mypy --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/.mypy_cache" -p hopflow "$@" \
    | sed "s#^hopflow/\(flows\|tasks\|deployments\)/#\1/#"
exit "${PIPESTATUS[0]}"
