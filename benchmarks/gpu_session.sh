#!/bin/bash
# The GPU checks of issues #8 and #9 as one script for a lent GPU box. That box runs torch 2.11 and
# transformers 5.17, and it has no internet access.
#
# Here (internet to PyPI):   bash benchmarks/gpu_session.sh prepare
#     downloads into .gpu/wheels (git-ignored; carry it with the run) the python 3.12 manylinux
#     wheels the box lacks: transformers 5.24, the server's stack, torchvision 0.26 (torch 2.11's)
#     and num2words.
# There ($OUT set by the device tool; each part fits its 600 s command limit):
#     PART=a bash benchmarks/gpu_session.sh run
#       tests/test_gpu.py and tests/test_multi_gpu.py, then the 8B engine: CUDA graphs vs --compile
#       vs --engine-process, in process and over HTTP (#8)                              ~6-8 min
#     PART=b bash benchmarks/gpu_session.sh run
#       benchmarks/gpu_vlm.py (#9)                                                      ~2 min
# A session's 15 device minutes include the box's start, so PART=a then PART=b, nothing else. The
# VLM tests under torchvision need no GPU: run them on a CPU machine with torchvision installed
# (`pytest tests/test_vlm_qwen2vl.py tests/test_vlm.py`).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.gpu/wheels}

if [ "${1:-}" = prepare ]; then
  mkdir -p "$WHEELS"
  PY=${PY:-.venv/bin/python}
  # transformers 5.24 and the server's own stack, at versions that have run on the box (torch and
  # triton are the box's own: not downloaded)
  $PY -m pip download -q -d "$WHEELS" --no-deps --only-binary :all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --implementation cp \
    annotated_doc==0.0.7 annotated_types==0.8.0 anyio==4.16.0 certifi==2026.10.19.post1 click==8.5.1 \
    fastapi==0.165.0 filelock==4.3.1 fsspec==2026.9.0 h11==0.16.0 hf_xet==1.8.0 httpcore==1.0.9 \
    httpcore2==2.16.2 httptools==0.9.0 httpx==0.28.1 httpx2==2.16.2 huggingface_hub==2.4.0 idna==3.20 \
    iniconfig==2.3.1 jsonschema==4.26.0 jsonschema_specifications==2025.9.1 markdown_it_py==4.3.0 \
    mdurl==0.1.2 opentelemetry_api==1.45.2 outlines_core==0.2.14 packaging==26.4 pillow==13.0.0 \
    pluggy==1.7.0 prometheus_client==0.26.0 pydantic==2.14.4 pydantic_core==2.50.5 pygments==2.21.0 \
    pytest==9.2.0 pyyaml==6.0.4 referencing==0.37.0 regex==2026.11.19 rich==15.0.0 rpds_py==2026.9.1 \
    safetensors==0.8.0 shellingham==1.5.4 sniffio==1.3.1 starlette==1.10.0 tokenizers==0.23.3 \
    torchvision==0.26.0 tqdm==4.70.1 transformers==5.24.0 truststore==0.10.5 typer==0.29.2 \
    typing_extensions==4.16.0 typing_inspection==0.4.5 uvicorn==0.54.0 num2words
  # docopt (num2words' dependency) ships only as a source archive: build its wheel here
  $PY -m pip wheel -q --no-deps -w "$WHEELS" docopt
  ls "$WHEELS" | wc -l
  exit 0
fi

: "${OUT:?run this on the device (OUT is the folder whose files come back)}"
PY=$(command -v python3 || command -v python)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
T0=$(date +%s)
el() { echo "[t=$(($(date +%s) - T0))s] $*"; }
PART=${PART:-a}
el install
$PY -m pip install --no-deps --no-index -q "$WHEELS"/*.whl 2>&1 | grep -v -i "warning\|notice" | tail -5
$PY -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPUs')" 2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee -a "$OUT/env.txt"
FILTER="^Loading\|Writing\|FutureWarning\|requested_implementation"
if [ "$PART" = a ]; then
  el tests
  timeout "${TT:-200}" $PY -m pytest tests/test_gpu.py tests/test_multi_gpu.py -q -p no:cacheprovider -rs --durations=5 2>&1 |
    tail -30 | tee "$OUT/tests.txt"
  el bench8b
  left=$((${BUDGET:-580} - ($(date +%s) - T0)))
  timeout $left $PY benchmarks/gpu_engine.py --shapes 8b --no-eager --skip-cb --compile --engine-process \
    --output "$OUT/gpu_engine_8b.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/gpu_engine_8b.txt"
fi
if [ "$PART" = b ]; then
  el bench_vlm
  left=$((${BUDGET:-580} - ($(date +%s) - T0)))
  timeout $left $PY benchmarks/gpu_vlm.py --output "$OUT/gpu_vlm.json" 2>&1 | grep -v "$FILTER" | tee "$OUT/gpu_vlm.txt"
fi
el done
