#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what bench/gpu_session.sh needs on the GPU machine and does not find
# there: wheels for Python 3.12 (the GPU image's) in .whl/ and SmolLM2's tokenizer in .gpu-carry/ (for
# the random-init models of bench/random_model.py). Both are ignored through .git/info/exclude, so they
# travel only as the device call's `carry: [".whl", ".gpu-carry"]` (a few MiB; the limit is 64 MiB).
# The GPU image already has torch, transformers, accelerate, peft, pandas, pyarrow, xxhash, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for ignored in /.whl/ /.gpu-carry/; do
  grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done
rm -rf .whl && mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
wheel() {  # NAME==VERSION, the version this machine's venv has (so both machines run the same code)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$1"
}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
for package in trl datasets dill multiprocess msgspec; do
  wheel "$package==$(version "$package")"
done
tokenizer=$("$PY" -c "
import sys; sys.path.insert(0, '.')
from service.settings import Settings
from workers.base_models import resolve_base_model
print(resolve_base_model('SmolLM2-135M-Instruct', Settings.from_env()))")
rm -rf .gpu-carry && mkdir -p .gpu-carry/tokenizer
for name in tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json special_tokens_map.json; do
  if [ -f "$tokenizer/$name" ]; then cp "$tokenizer/$name" .gpu-carry/tokenizer/; fi
done
du -sh .whl .gpu-carry
