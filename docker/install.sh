#!/bin/sh
# The image's Python environment, run by the Dockerfile in /app after the sources are copied (torch is
# installed in an earlier layer), and by tests/unit/test_compose.py in a temporary venv: one script, so
# the test builds exactly what the image builds. PYTHON picks the interpreter (default: `python`).
#
# Order matters, as in the Makefile: the protos are generated before the editable install, because
# setuptools' editable finder maps only the top-level packages that exist when it is installed, and the
# console scripts (`twotower health`, the compose health check) do not have /app on sys.path, so a
# ./twotower generated afterwards would raise ModuleNotFoundError in every health check.
set -eu
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."  # the project root (/app in the image)

"$PYTHON" -m pip install -c constraints.txt grpcio-tools
rm -rf twotower
"$PYTHON" -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/twotower/v1/*.proto
touch twotower/__init__.py twotower/v1/__init__.py
"$PYTHON" -m pip install -c constraints.txt -e ".[dev]"
# Fail the build here rather than in the first health check: the installed packages import from /.
cd / && "$PYTHON" -c "import shared, twotower_cli, twotower.v1"
