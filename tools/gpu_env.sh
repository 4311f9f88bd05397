#!/usr/bin/env bash
# Prepare a GPU machine that has torch and triton but no OpenMMLab packages and no network:
# install the pinned OpenMMLab stack from carried wheels, mmcv 2.1.0 with CUDA ops for the local card, and
# the plugin, all into one folder to put on PYTHONPATH.
#
#   bash tools/gpu_env.sh WHEEL_DIR SITE_DIR && export PYTHONPATH=SITE_DIR
#
# WHEEL_DIR holds the pure-Python wheels (mmengine, mmdet, mmsegmentation, mmpretrain, openmim and their
# missing dependencies; see benchmarks/README.md for the download command) and the mmcv 2.1.0 sdist. mmcv is
# built with FORCE_CUDA=1 for the local card's arch only (~4.5 min on 16 cores); with MMCV_EXPORT_DIR set,
# the built package is also written there as mmcv-cuda.tar.gz.part* (15 MB parts), and a later run that finds
# such parts in WHEEL_DIR unpacks them instead of building.
set -euo pipefail
wheels=$(cd "$1" && pwd)
site=$2
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$site"
export PYTHONPATH="$site"
# mmpretrain 1.2.0 is left out: its multimodal models fail at import (TypeError) against the transformers >= 5
# of GPU images, and mmdet.models imports mmpretrain when it is present (it tolerates its absence).
python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
  --target "$site" $(ls "$wheels"/*.whl | grep -v '/mmpretrain-')

if ls "$wheels"/mmcv-cuda.tar.gz.part* >/dev/null 2>&1; then
  cat "$wheels"/mmcv-cuda.tar.gz.part* | tar -xz -C "$site"
else
  build=$(mktemp -d)
  tar -xzf "$wheels"/mmcv-2.1.0.tar.gz -C "$build"
  if python3 -c "import torch, sys; v = tuple(int(p) for p in torch.__version__.split('.')[:2]); sys.exit(v < (2, 14))"; then
    sed -i 's/-std=c++17/-std=c++20/g' "$build"/mmcv-2.1.0/setup.py  # torch >= 2.14 headers need C++20
  fi
  arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  (cd "$build"/mmcv-2.1.0 && MMCV_WITH_OPS=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) \
     python3 -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation --no-compile \
     --target "$site" .)
  strip --strip-debug "$site"/mmcv/_ext*.so
  rm -rf "$build"
  if [ -n "${MMCV_EXPORT_DIR:-}" ]; then
    (cd "$site" && tar -cz mmcv mmcv-*.dist-info) | split -b 15M - "$MMCV_EXPORT_DIR"/mmcv-cuda.tar.gz.part
  fi
fi
# --upgrade: on a machine kept warm between calls, replace the plugin installed by the previous call.
python3 -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation --no-compile --upgrade \
  --target "$site" "$repo"
# From / : in the repo root, Python would import the source folder, which lacks the kernels.
(cd / && python3 -c "import mmcv.ops, mmdet.models, mmseg.models, mmgroupmamba, torch; \
from mmcv.ops import nms; b = torch.rand(8, 4, device='cuda'); b[:, 2:] += b[:, :2]; \
nms(b, torch.rand(8, device='cuda'), 0.5); print('gpu_env: OpenMMLab stack with mmcv CUDA ops ready in $site')")
