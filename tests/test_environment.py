"""Environments a new user meets: transformers >= 5 beside mmpretrain 1.2.0 (issue #17, item 8)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def installed_transformers(root, version):
    """A directory that, on sys.path, is an installed ``transformers`` of ``version``: a package and its metadata.

    mmpretrain (and the plugin's check) decide from the installed version, read from the metadata. The package
    itself is empty, so mmpretrain's import fails here with an ImportError at its first transformers name
    (which mmdet.models swallows, leaving a half-imported mmpretrain); with the real transformers 5.0.0 it fails
    with "TypeError: NoneType takes no arguments", which nothing catches (seen once with
    `pip install --target DIR transformers==5.0.0` and DIR on PYTHONPATH). The check reports both the same way.
    """
    package = root / 'transformers'
    package.mkdir(parents=True)
    (package / '__init__.py').write_text(f'__version__ = {version!r}\n')
    metadata = root / f'transformers-{version}.dist-info'
    metadata.mkdir()
    (metadata / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: transformers\nVersion: {version}\n')
    return root


def run_python(args, site, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get('PYTHONPATH', '')]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_transformers_5_is_reported_at_plugin_import_with_the_fix(tmp_path):
    site = installed_transformers(tmp_path / 'site', '5.0.0')
    result = run_python(['-c', 'import mmgroupmamba'], site, tmp_path)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith('RuntimeError: mmpretrain 1.2.0 cannot be imported beside transformers 5.0.0')
    assert 'mmdet.models' in last_line and 'pip install "transformers<5"' in last_line, last_line


def test_mim_train_mmdet_with_transformers_5_says_what_to_do(tmp_path):
    site = installed_transformers(tmp_path / 'site', '5.0.0')
    result = run_python(['-m', 'mim', 'train', 'mmdet', str(REPO / 'configs/mmdet/mask_rcnn_groupmamba_t.py')],
                        site, tmp_path)
    assert result.returncode != 0
    # mmdet's train.py fails first (at the config's custom_imports); mim's own traceback follows.
    train_error = result.stderr[:result.stderr.rindex('Traceback (most recent call last):')]
    last_line = train_error.strip().splitlines()[-1]
    assert last_line.startswith('RuntimeError: mmpretrain 1.2.0 cannot be imported beside transformers 5.0.0'), \
        train_error[-3000:]
    assert 'pip install "transformers<5"' in last_line


def test_mmpretrain_config_with_transformers_5_says_what_to_do(tmp_path):
    site = installed_transformers(tmp_path / 'site', '5.0.0')
    code = ('from mmengine.config import Config; '
            f'Config.fromfile({str(REPO / "configs/mmpretrain/groupmamba_t_8xb128_in1k.py")!r})')
    result = run_python(['-c', code], site, tmp_path)
    assert result.returncode != 0 and 'pip install "transformers<5"' in result.stderr.strip().splitlines()[-1]


def test_transformers_4_passes_the_check(tmp_path):
    site = installed_transformers(tmp_path / 'site', '4.57.1')
    code = ('import mmgroupmamba; from mmgroupmamba.environment import check_classification_imports; '
            'check_classification_imports()')
    result = run_python(['-c', code], site, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_environment_meets_openmim_requirements():
    """pip finds every requirement of openmim in the environment tools/install.sh built (issue #17, item 5).

    An unmet one makes pip print "ERROR: pip's dependency resolver ... openmim 0.3.9 requires opendatalab" at
    every later install of a package openmim depends on, install.sh's own included, which a new user reads as
    a failed install. `pip check` reports the same conflicts without installing anything.
    """
    result = subprocess.run([sys.executable, '-m', 'pip', 'check'], capture_output=True, text=True)
    openmim = [line for line in result.stdout.splitlines() if line.lower().startswith('openmim')]
    assert not openmim, f'{openmim}: this environment was not set up by the current tools/install.sh; run it'
