#!/bin/sh
# Prepares the one GPU run of benchmarks/gpu.py (its docstring): the files that must travel to the lent
# machine, which reaches nothing outside it. Into .gpu/ (ignored by git; the run names it in `carry`):
#   .gpu/images/  the first 8 coco-mini val images (the ../shared beside the checkout does not travel)
#   .gpu/whl/     wheels of what the machine's Python lacks: pycocotools (our data and eval code)
# Then, on the device, one command (as in benchmarks/gpu.py):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl &&
#   PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 timeout 520 python3 benchmarks/gpu.py --out $OUT --images .gpu/images
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/images .gpu/whl
src=../shared/data/coco-mini/val2017
if [ -d "$src" ]; then
    ls "$src" | sort | head -8 | while read -r f; do cp "$src/$f" .gpu/images/; done
else
    echo "gpu_prepare: $src missing: benchmarks/gpu.py will time random images" >&2
fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d .gpu/whl "pycocotools==2.0.11"
du -sh .gpu
