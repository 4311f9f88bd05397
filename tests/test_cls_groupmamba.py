"""GroupMamba classification in mmpretrain: official parity, checkpoint conversion, distillation, FLOPs."""
import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

from log_capture import mmengine_messages
from mmgroupmamba.checkpoint import unwrap_state_dict
from mmgroupmamba.cls import GroupMambaClsBackbone
from mmgroupmamba.cls.convert import WEIGHT_KEYS, convert_official
from mmgroupmamba.cls.demo_data import make_demo_imagenet
from mmgroupmamba.cls.distill import distillation_loss
from mmgroupmamba.cls.flops import SCAN_OP_NAME, groupwise_forward, model_complexity
from mmgroupmamba.models import ARCH_SETTINGS, GroupMamba, GroupMambaLayer

REPO = Path(__file__).resolve().parents[1]
T_CONFIG = REPO / 'configs/mmpretrain/groupmamba_t_8xb128_in1k.py'
DEMO_CONFIG = REPO / 'configs/mmpretrain/demo/groupmamba_mini_distill_demo.py'
GOLDEN = Path('/work/shared/golden/golden_mini_seed0.pt')
SMALL_ARCH = ARCH_SETTINGS['mini']
TINY_TEACHER = dict(
    type='ImageClassifier',
    backbone=dict(type='ResNet', depth=18, stem_channels=8, base_channels=8),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=10, in_channels=64))


@pytest.fixture(scope='module')
def golden():
    if not GOLDEN.exists():
        pytest.skip(f'golden file {GOLDEN} not present')
    return torch.load(GOLDEN, map_location='cpu', weights_only=True)


def build_t_model(arch, num_classes=10):
    init_default_scope('mmpretrain')
    cfg = Config.fromfile(str(T_CONFIG))
    cfg.model.backbone.arch = arch
    cfg.model.head.num_classes = num_classes
    return MODELS.build(cfg.model)


def test_t_config_matches_official_golden_logits(golden):
    model = build_t_model(golden['arch_cfg'], golden['num_classes'])
    state_dict, _ = unwrap_state_dict(golden, WEIGHT_KEYS)
    converted, unplaced = convert_official(state_dict)
    assert unplaced == []
    model.load_state_dict(converted, strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(golden['input'], mode='tensor')
        class_logits, dist_logits = model.head.forward_heads(model.extract_feat(golden['input']))
    scale = golden['logits'].abs().max()
    assert (logits - golden['logits']).abs().max() <= 1e-4 * scale
    assert (class_logits - golden['head']).abs().max() <= 1e-4 * scale
    assert (dist_logits - golden['dist_head']).abs().max() <= 1e-4 * scale
    # Evaluation never builds the RegNetY teacher (timm is not even needed).
    assert model.teacher is None and 'timm' not in sys.modules


def load_converter_cli():
    path = REPO / 'tools/model_converters/groupmamba_to_mmpretrain.py'
    spec = importlib.util.spec_from_file_location('groupmamba_to_mmpretrain', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converter_cli_raw_ema_wrapped_and_unplaced(golden, tmp_path, capsys):
    cli = load_converter_cli()
    official = golden['state_dict']
    raw, wrapped = tmp_path / 'raw.pth', tmp_path / 'wrapped.pth'
    torch.save(official, raw)
    # A training checkpoint: the EMA copy is the one converted by default.
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in official.items()}
    torch.save({'model': official, 'model_ema': ema}, wrapped)
    for src, expected, extra in ((raw, official, []), (wrapped, ema, []), (wrapped, official, ['--weights', 'model'])):
        dst = tmp_path / 'out.pth'
        assert cli.main([str(src), str(dst)] + extra) == 0
        converted = torch.load(dst, weights_only=True)['state_dict']
        assert len(converted) == len(official)
        assert torch.equal(converted['backbone.post_network.0.attn.mamba_g3.A_logs'],
                           expected['post_network.0.attn.mamba_g3.A_logs'])
        assert torch.equal(converted['head.dist_head.weight'], expected['dist_head.weight'])

    stray = tmp_path / 'stray.pth'
    torch.save({**official, 'cls_token': torch.zeros(3)}, stray)
    assert cli.main([str(stray), str(tmp_path / 'no.pth')]) == 1
    assert 'not placed: cls_token (3,)' in capsys.readouterr().out
    assert not (tmp_path / 'no.pth').exists()


def test_distillation_loss_modes():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10), torch.randn(6, 10)
    hard = distillation_loss(student, teacher, 'hard')
    assert torch.allclose(hard, torch.nn.functional.cross_entropy(student, teacher.argmax(1)))
    tau = 2.0
    p_teacher = torch.softmax(teacher / tau, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student / tau, 1))).sum()
    assert torch.allclose(distillation_loss(student, teacher, 'soft', tau), kl * tau**2 / student.numel())
    # Soft matching of the teacher's distribution is exact at zero; hard targets keep a loss.
    assert distillation_loss(teacher, teacher, 'soft', tau).abs() < 1e-6
    assert distillation_loss(teacher, teacher, 'hard') > 0
    with pytest.raises(ValueError, match='distillation mode'):
        distillation_loss(student, teacher, 'none')


def save_tiny_teacher(path):
    init_default_scope('mmpretrain')
    torch.manual_seed(1)
    teacher = MODELS.build(copy.deepcopy(TINY_TEACHER))
    torch.save(teacher.state_dict(), path)
    return {k: v.clone() for k, v in teacher.state_dict().items()}


def demo_cfg(tmp_path, teacher_checkpoint, **model_overrides):
    root = make_demo_imagenet(str(tmp_path / 'data'), num_classes=10, train_per_class=1, val_per_class=1, size=32)
    cfg = Config.fromfile(str(DEMO_CONFIG))
    cfg.work_dir = str(tmp_path / 'work')
    cfg.model.teacher = dict(model=copy.deepcopy(TINY_TEACHER), checkpoint=str(teacher_checkpoint))
    cfg.model.update(model_overrides)
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.update(num_workers=0, persistent_workers=False, batch_size=10)
        loader.dataset.data_root = root
    for pipeline in (cfg.train_dataloader.dataset.pipeline, cfg.test_dataloader.dataset.pipeline):
        for step in pipeline:
            if step['type'] in ('RandomResizedCrop', 'CenterCrop', 'ResizeEdge'):
                step.update({'scale' if 'scale' in step else 'crop_size': 32})
    cfg.train_cfg = dict(by_epoch=True, max_epochs=2, val_interval=2)  # one 10-image batch per epoch
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 2
    return cfg


def test_distillation_training_with_mixup_and_frozen_teacher(tmp_path):
    teacher_path = tmp_path / 'teacher.pth'
    teacher_weights = save_tiny_teacher(teacher_path)
    runner = Runner.from_cfg(demo_cfg(tmp_path, teacher_path))
    assert runner.model.teacher is None  # not built by building the model
    runner.train()  # 2 iterations (Mixup/CutMix, label smoothing, EMA, clipping, warm-up + cosine), validation

    student = runner.model
    teacher = student.teacher
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_weights[key]), key
    # The teacher is not part of the student: not in its checkpoint nor its optimizer.
    assert not any(k.startswith('teacher') for k in student.state_dict())
    optimized = {id(p) for group in runner.optim_wrapper.optimizer.param_groups for p in group['params']}
    assert not optimized & {id(p) for p in teacher.parameters()}
    for name in ('train/loss_cls', 'train/loss_distill'):
        assert runner.message_hub.get_scalar(name).current() > 0
    assert (tmp_path / 'work' / 'epoch_2.pth').exists()


@pytest.mark.parametrize('mode', ['hard', 'soft'])
def test_classifier_loss_terms_per_mode(tmp_path, mode):
    teacher_path = tmp_path / 'teacher.pth'
    save_tiny_teacher(teacher_path)
    cfg = demo_cfg(tmp_path, teacher_path, distillation=mode, alpha=0.3, tau=2.0)
    # The loss and the expected terms below come from two forwards in training mode: without stochastic depth
    # both see the same network (with it, they agreed only when neither forward happened to drop a block).
    cfg.model.backbone.drop_path_rate = 0.0
    init_default_scope('mmpretrain')
    model = MODELS.build(cfg.model)
    torch.manual_seed(0)
    inputs = torch.randn(4, 3, 32, 32)
    samples = [DataSample().set_gt_label(i).set_gt_score(torch.full((10, ), 0.1)) for i in range(4)]
    losses = model.loss(inputs, samples)
    with torch.no_grad():
        class_logits, dist_logits = model.head.forward_heads(model.extract_feat(inputs))
        teacher_logits = model.teacher(inputs, mode='tensor')
    expected_distill = 0.3 * distillation_loss(dist_logits, teacher_logits, mode, 2.0)
    assert torch.allclose(losses['loss_distill'], expected_distill)
    assert torch.allclose(losses['loss_cls'], 0.7 * model.head.label_loss(class_logits, samples))
    (losses['loss_cls'] + losses['loss_distill']).backward()
    assert model.head.dist_head.weight.grad is not None


def test_teacher_runs_in_fp32_under_autocast(tmp_path):
    """The official distillation loss (and its teacher forward) runs outside autocast: so does ours."""
    teacher_path = tmp_path / 'teacher.pth'
    save_tiny_teacher(teacher_path)
    init_default_scope('mmpretrain')
    model = MODELS.build(demo_cfg(tmp_path, teacher_path).model)
    inputs = torch.randn(2, 3, 32, 32)
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        # Autocast is on: the student's linear layers compute in bf16 ...
        assert model.head.forward_heads(model.extract_feat(inputs))[1].dtype == torch.bfloat16
        teacher_logits = model.teacher_logits(inputs)
    # ... and the teacher's logits are fp32 and equal to its plain fp32 forward.
    assert teacher_logits.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(teacher_logits, model.teacher(inputs, mode='tensor'))


def test_teacher_config_errors_are_loud(tmp_path):
    init_default_scope('mmpretrain')
    cfg = Config.fromfile(str(T_CONFIG))
    cfg.model.teacher.pop('checkpoint')
    with pytest.raises(KeyError, match='checkpoint'):
        MODELS.build(cfg.model)
    cfg = Config.fromfile(str(T_CONFIG))
    cfg.model.backbone.arch = SMALL_ARCH
    cfg.model.head.in_channels = 512
    with pytest.raises(ValueError, match='in_channels=512'):
        MODELS.build(cfg.model)


def test_runner_test_of_converted_checkpoint_on_demo_data(golden, tmp_path):
    converted, _ = convert_official(unwrap_state_dict(golden, WEIGHT_KEYS)[0])
    checkpoint = tmp_path / 'golden_mmpretrain.pth'
    torch.save(dict(state_dict=converted), checkpoint)
    cfg = demo_cfg(tmp_path, tmp_path / 'never_built.pth')
    cfg.load_from = str(checkpoint)
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    assert 0 <= metrics['accuracy/top1'] <= 100
    assert runner.model.teacher is None


def test_groupwise_forward_is_the_layer():
    torch.manual_seed(0)
    layer = GroupMambaLayer(32).eval()
    for param in layer.parameters():
        param.data.normal_(0, 0.3)  # no symmetry left by the initialisation
    x = torch.randn(2, 5, 7, 32)
    with torch.no_grad():
        assert torch.allclose(groupwise_forward(layer, x), layer(x), atol=1e-5)


def test_flops_count_the_scan_and_match_the_paper():
    backbone = GroupMamba(SMALL_ARCH, out_type='cls_token')
    result = model_complexity(backbone, (3, 64, 96))
    # Every layer scans L tokens of C channels: 9*L*C*d_state + L*C (d_state=1); the class block scans 1 token.
    tokens = [16 * 24, 8 * 12, 4 * 6, 2 * 3]
    expected = sum(10 * L * C * depth for L, C, depth in zip(tokens, SMALL_ARCH['embed_dims'], SMALL_ARCH['depths']))
    expected += 10 * SMALL_ARCH['embed_dims'][-1]
    assert result['flops_by_operator'][SCAN_OP_NAME.split('::')[1]] == expected
    # The scan is no longer counted through its reference's matmuls (only the FFNs' and projections' linears).
    assert 'matmul' not in result['flops_by_operator']

    tiny = model_complexity(build_t_model(ARCH_SETTINGS['tiny'], num_classes=1000))
    assert abs(tiny['flops'] / 4.5e9 - 1) < 0.05  # the paper: 4.5 GFLOPs at 224x224
    assert abs(tiny['params'] / 1e6 - 23.36) < 0.01


def test_deprecated_cls_backbone_is_group_mamba_cls_token(monkeypatch):
    monkeypatch.setattr(GroupMambaClsBackbone, 'deprecation_logged', False)
    init_default_scope('mmpretrain')
    with mmengine_messages() as messages:
        aliases = [MODELS.build(dict(type='GroupMambaClsBackbone', arch=SMALL_ARCH)) for _ in range(2)]
    warnings = [m for m in messages if 'GroupMambaClsBackbone is deprecated' in m]
    assert len(warnings) == 1 and "type='GroupMamba'" in warnings[0] and "out_type='cls_token'" in warnings[0]

    torch.manual_seed(0)
    model = GroupMamba(SMALL_ARCH, out_type='cls_token').eval()
    alias = aliases[0].eval()
    assert alias.out_type == 'cls_token'
    alias.load_state_dict(model.state_dict(), strict=True)  # its checkpoints load into the new type and back
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(alias(x), model(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="out_type is not an argument.*type='GroupMamba', out_type='featmap'"):
        GroupMambaClsBackbone(SMALL_ARCH, out_type='featmap')
