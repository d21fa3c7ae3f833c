#!/usr/bin/env bash
# One device check (see benchmarks/device_check.py): the test suite on the device, the
# training step (six algorithms, B = 128 and 1,024, fp32 and bf16), evaluation, one
# end-to-end epoch and, with two GPUs, a 2-process nccl run. One table on stdout, and
# OUT_DIR/device_check.json. Under 8 minutes on one GPU; under 3 minutes on a 2-core CPU
# (small sizes; --quick: seconds, for the tests).
#
#   bash benchmarks/device_check.sh OUT_DIR [--device cpu|cuda] [--skip-tests] [--quick]
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/device_check.sh OUT_DIR [--device cpu|cuda] [--skip-tests] [--quick]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec python3 benchmarks/device_check.py "$@"
