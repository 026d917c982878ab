#!/usr/bin/env bash
# Gets what `fineserve bench gpu` needs on the lent GPU machine, besides onnxruntime-gpu
# (../shared/gpu/ort-gpu-parts makes .gpu/p1..p5), ready to carry: the served models' fp16
# variants (a tar in parts of at most 45 MB: one call carries 64 MiB with the working tree) in
# .gpu/m1, .gpu/m2, ..., and, in the last part, the wheels the server needs that the machine
# lacks (pydantic and pydantic-settings, grpcio-health-checking and -reflection, and grpcio and
# protobuf at this checkout's versions, which its generated stubs need). .gpu/ is ignored by git.
# The device calls that use them are in docs/performance.md ("GPU check").
#
#   bench/gpu_carry.sh [MODEL_REPOSITORY [MODELS]]     default: models imagenet,sentiment
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
repo=${1:-models}
models=${2:-imagenet,sentiment}
python=${PYTHON:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
rm -rf .gpu/models .gpu/m[0-9]* .gpu/wheels .gpu/models.tar
mkdir -p .gpu/models .gpu/wheels

# The served versions: model.json, the tokenizer, and the fp16 graph (what CUDA serves).
for name in ${models//,/ }; do
  version=$(ls "$repo/$name" | grep -E '^[0-9]+$' | sort -n | tail -n 1)
  src="$repo/$name/$version"
  fp16=$("$python" -c "import json,sys; print(json.load(open(sys.argv[1]))['variants']['fp16']['file'])" "$src/model.json") || {
    echo "error: $src has no fp16 variant: make it with the export pipeline (docs/export.md)" >&2; exit 2; }
  mkdir -p ".gpu/models/$name/$version"
  cp "$src/model.json" "$src/$fp16" ".gpu/models/$name/$version/"
  [ -f "$src/tokenizer.json" ] && cp "$src/tokenizer.json" ".gpu/models/$name/$version/"
done
tar -C .gpu -cf .gpu/models.tar models
rm -rf .gpu/models

# Wheels for CPython 3.12 on x86-64, at the versions this checkout runs with.
version_of() { "$python" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
wanted=()
for pkg in pydantic pydantic-core pydantic-settings annotated-types typing-inspection typing-extensions \
           python-dotenv grpcio grpcio-health-checking grpcio-reflection protobuf; do
  v=$(version_of "$pkg"); [ -n "$v" ] || { echo "error: $pkg is not installed in $python" >&2; exit 2; }
  wanted+=("$pkg==$v")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels "${wanted[@]}"

# The tar in parts of 45 MB; the last part also holds the wheels and the script that unpacks all.
split -b 45000000 -d -a 1 .gpu/models.tar .gpu/models.part
rm .gpu/models.tar
parts=$(ls .gpu/models.part* | wc -l)
for i in $(seq 1 "$parts"); do mkdir -p ".gpu/m$i"; mv ".gpu/models.part$((i - 1))" ".gpu/m$i/"; done
mv .gpu/wheels ".gpu/m$parts/wheels"
cat > ".gpu/m$parts/unpack.sh" <<'EOS'
# On the GPU machine, after every .gpu/mN was copied to /tmp/gpu: the models to /tmp/gpu/models,
# the wheels into /tmp/site (beside onnxruntime-gpu's install.sh).
set -e
cd /tmp/gpu
cat models.part* | tar -xf -
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheels/*.whl
ls models
EOS
du -sh .gpu/m*
echo "ready: carry .gpu/m1 .. .gpu/m$parts, one a call, after .gpu/p1 .. .gpu/p4 (docs/performance.md, GPU check)"
