#!/usr/bin/env bash
# The smoke tier against an installed wheel, as a user would have it:
#   1. build jna's wheel;
#   2. make a fresh virtual environment holding jax==JAX_VERSION (the user's jax, installed first);
#   3. install the wheel the way the notebook's first cell does (pip, not editable; a jax that jna
#      supports is kept as it is) and check that jax was not changed;
#   4. from a directory outside the checkout, run jna_tests/test_smoke.py against it.
# Usage: scripts/smoke_wheel.sh JAX_VERSION     (.ci/run calls it for both ends of the jax range)
set -euo pipefail
jax_version=${1:?usage: scripts/smoke_wheel.sh JAX_VERSION}
root=$(cd "$(dirname "$0")/.." && pwd)
python=$("$root/scripts/find_python.sh")
work=$(mktemp -d "${TMPDIR:-/tmp}/jna-smoke-XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

"$python" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$root"
wheel=$(ls "$work"/dist/jna-*.whl)
"$py" -m pip install --quiet "jax==$jax_version" "jaxlib==$jax_version"

cd "$work"  # outside the checkout from here on
"$py" - "$root/notebooks/quickstart.ipynb" "$wheel" <<'PY'
import json, re, sys
notebook, wheel = sys.argv[1:]
cells = json.load(open(notebook))["cells"]
cell = next(c for c in cells if c["cell_type"] == "code" and "JNA_SOURCE" in "".join(c["source"]))
code = re.sub(r"^JNA_SOURCE = .*$", f"JNA_SOURCE = {wheel!r}", "".join(cell["source"]), count=1,
              flags=re.M)
exec(compile(code, "quickstart.ipynb: install cell", "exec"), {"__name__": "__main__"})
PY
"$py" -c "import jax, sys; sys.exit(0 if jax.__version__ == '$jax_version' else
           f'the install changed jax {\"$jax_version\"} to {jax.__version__}')"
"$py" -m pip install --quiet pytest

mkdir -p "$work/suite" && cp -r "$root/jna_tests" "$work/suite/"
cd "$work/suite"
JAX_PLATFORMS=cpu JNA_SMOKE_INSTALLED=1 "$py" -m pytest -q -p no:cacheprovider jna_tests/test_smoke.py
echo "smoke tier (wheel, jax $jax_version): $(( $(date +%s) - start )) s"
