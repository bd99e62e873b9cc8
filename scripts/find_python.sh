#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 (jax 0.11 needs it), or fails loudly.
for candidate in "${JNA_PYTHON:-}" python3.12 python3.13 python3 \
    /root/.pyenv/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.13*/bin/python3.13 \
    /usr/bin/python3.12 /usr/local/bin/python3.12; do
  [ -n "$candidate" ] || continue
  path=$(command -v "$candidate" 2>/dev/null) || continue
  if "$path" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
    echo "$path"
    exit 0
  fi
done
echo "error: jna needs Python >= 3.12 (jax 0.11.2); none found. Install one or set JNA_PYTHON." >&2
exit 1
