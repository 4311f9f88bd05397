#!/usr/bin/env bash
# Set up this machine for mmgroupmamba: the pinned OpenMMLab stack, mmcv 2.1.0 *with ops*, then the plugin
# itself (editable). Installs into the Python that `python` names (make a venv first if you want isolation).
#
#   bash tools/install.sh
#
# mmcv: PyPI has no mmcv 2.1.0 wheel with compiled ops, so it comes from ../shared/wheels/ when that folder holds
# one for this torch/Python, and is otherwise built from the sdist (~25 min on 2 cores; FORCE_CUDA=1 with
# TORCH_CUDA_ARCH_LIST set builds the CUDA ops too).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python}
pip=("$py" -m pip install --disable-pip-version-check --progress-bar off)

torch_pins=(torch==2.14.1 torchvision==0.29.1)
if "$py" -c "import torch" 2>/dev/null && [ -n "${MMGM_KEEP_TORCH:-}" ]; then
  # A machine whose torch is given (e.g. a GPU image): keep it, build mmcv against it.
  torch_pins=()
fi
if [ ${#torch_pins[@]} -gt 0 ]; then
  "${pip[@]}" "${torch_pins[@]}"
fi

# Build requirements of mmcv (its build has to see torch, so no build isolation).
"${pip[@]}" numpy 'setuptools<82' wheel ninja
"${pip[@]}" mmengine==0.10.7

if ! "$py" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  wheels="$here/../shared/wheels"
  torch_ver=$("$py" -c "import torch; print(torch.__version__.split('+')[0])")
  if [ -d "$wheels" ] && ls "$wheels"/mmcv-2.1.0-*.whl >/dev/null 2>&1 && [ "$torch_ver" = 2.14.1 ] \
     && [ -z "${FORCE_CUDA:-}" ]; then
    echo "install.sh: mmcv 2.1.0 (with ops) from $wheels"
    "${pip[@]}" --no-deps --no-index --find-links "$wheels" mmcv==2.1.0
  else
    echo "install.sh: building mmcv 2.1.0 with ops from the sdist (torch $torch_ver)"
    build=$(mktemp -d)
    "$py" -m pip download --disable-pip-version-check --no-deps --no-binary :all: -d "$build" mmcv==2.1.0
    tar -xzf "$build"/mmcv-2.1.0.tar.gz -C "$build"
    # torch >= 2.14's headers need C++20; mmcv 2.1.0 asks for C++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$build"/mmcv-2.1.0/setup.py
    (cd "$build"/mmcv-2.1.0 && MMCV_WITH_OPS=1 "${pip[@]}" --no-deps --no-build-isolation .)
    rm -rf "$build"
  fi
  # mmcv's own runtime requirements (installed with --no-deps above).
  "${pip[@]}" addict 'opencv-python-headless' packaging pillow pyyaml yapf
fi

"${pip[@]}" mmdet==3.3.0 mmsegmentation==1.2.2 ftfy regex mmpretrain==1.2.0 triton
# openmim 0.3.9 requires opendatalab, whose latest release (0.0.10) requires openxlab, which pins setuptools 60:
# take mim alone, then its requirements with opendatalab 0.0.9, the last release without openxlab (it only
# provides the `odl` command of `mim download --dataset`). With every requirement of openmim met, pip prints no
# "ERROR: pip's dependency resolver ... openmim 0.3.9 requires opendatalab" here or at later installs.
"${pip[@]}" --no-deps openmim==0.3.9
"${pip[@]}" click colorama model-index opendatalab==0.0.9 pandas requests rich tabulate
"${pip[@]}" pytest

"${pip[@]}" --no-deps --no-build-isolation -e "$here"
# The plugin first: it names package combinations that break the imports after it (e.g. transformers >= 5 on an
# image that had it installed) and their fix.
"$py" -c "import mmgroupmamba, mmgroupmamba.cls, mmcv.ops, mmdet.models, mmseg.models, mmpretrain.models; print('install.sh: ok')"
"$py" -m mim --version >/dev/null
