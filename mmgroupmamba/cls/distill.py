"""DeiT-style distillation for mmpretrain: a classifier that trains its distillation head from a teacher.

The teacher is any mmpretrain classifier, given as a model config (or a config file) and a checkpoint. It is
built on the first training step, never for evaluation, inference or ``mode='tensor'``, so a teacher that needs
an optional package (timm for RegNetY through ``TIMMBackbone``) is only needed for training. It is kept out of
the student's modules on purpose: it is not in the student's checkpoints, parameters, optimizer or EMA copy.
It runs in eval mode without gradients, on the same (Mixup/CutMix-mixed, normalised) batch as the student.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader
from mmpretrain.models.classifiers import BaseClassifier, ImageClassifier
from mmpretrain.registry import MODELS

from mmgroupmamba.checkpoint import unwrap_state_dict

DISTILLATION_MODES = ('hard', 'soft')


def distillation_loss(student_logits, teacher_logits, mode, tau=1.0):
    """Loss of the distillation head against the teacher's logits.

    ``'hard'``: cross-entropy with the teacher's top-1 class. ``'soft'``: KL divergence between the
    temperature-``tau`` softmaxes, scaled by ``tau**2`` and averaged over all logits (DeiT's normalisation).
    """
    if mode == 'hard':
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))
    if mode == 'soft':
        kl = F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                      reduction='sum', log_target=True)
        return kl * (tau * tau) / student_logits.numel()
    raise ValueError(f'distillation mode must be one of {DISTILLATION_MODES}, got {mode!r}')


def load_teacher_state_dict(path, revise_keys=()):
    """The state dict of a teacher checkpoint: mmengine's (``state_dict``), DeiT/timm's (``model``) or raw
    (:func:`mmgroupmamba.checkpoint.unwrap_state_dict`).

    ``revise_keys``: ``(pattern, replacement)`` regex pairs applied in order to every key, to place a foreign
    checkpoint's keys in the teacher model.
    """
    checkpoint = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    state_dict, _ = unwrap_state_dict(checkpoint, source=f'teacher checkpoint {path}')
    for pattern, replacement in revise_keys:
        state_dict = {re.sub(pattern, replacement, key): value for key, value in state_dict.items()}
    return state_dict


@MODELS.register_module()
class DistillationImageClassifier(ImageClassifier):
    """An :class:`ImageClassifier` whose two-head head learns labels (``head``) and a teacher (``dist_head``).

    Training loss: ``loss_cls = (1 - alpha) * label_loss(head)`` (the head's loss, e.g. label smoothing on
    Mixup/CutMix targets) and ``loss_distill = alpha * distillation_loss(dist_head, teacher)``. Inference is the
    plain ImageClassifier's: the mean of both heads, no teacher.

    Args:
        backbone, neck, head, pretrained, train_cfg, data_preprocessor, init_cfg: as in ``ImageClassifier``;
            the head needs ``forward_heads`` and ``label_loss`` (:class:`DistillationLinearClsHead`). Without
            ``head.in_channels`` the head takes the backbone's last ``embed_dims``.
        teacher (dict): ``model`` (an mmpretrain classifier config, or the path of a config file whose
            ``model`` is used), ``checkpoint`` (path or URL; required) and optional ``revise_keys``
            (regex pairs, see :func:`load_teacher_state_dict`). The teacher must load strictly.
        distillation (str): ``'hard'`` (the paper's) or ``'soft'``.
        alpha (float): weight of the distillation term, in [0, 1].
        tau (float): temperature of soft distillation.
    """

    def __init__(self, backbone, teacher, head, distillation='hard', alpha=0.5, tau=1.0, **kwargs):
        unknown = set(teacher) - {'model', 'checkpoint', 'revise_keys'}
        if unknown or 'model' not in teacher or not teacher.get('checkpoint'):
            raise KeyError(f'DistillationImageClassifier: teacher needs "model" and "checkpoint" (optional '
                           f'"revise_keys"); got keys {sorted(teacher)}')
        if distillation not in DISTILLATION_MODES:
            raise ValueError(f'DistillationImageClassifier: distillation must be one of {DISTILLATION_MODES}, '
                             f'got {distillation!r}')
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f'DistillationImageClassifier: alpha must lie in [0, 1], got {alpha}')
        if tau <= 0:
            raise ValueError(f'DistillationImageClassifier: tau must be positive, got {tau}')
        # Built here (ImageClassifier takes modules too) so that the head's width can follow the backbone's.
        if not isinstance(backbone, nn.Module):
            backbone = MODELS.build(backbone)
        feat_dims = getattr(backbone, 'embed_dims', None)
        if isinstance(head, dict) and head.get('in_channels') is None:
            if feat_dims is None:
                raise KeyError(f'DistillationImageClassifier: set head.in_channels: {type(backbone).__name__} has '
                               f'no embed_dims to take it from')
            head = dict(head, in_channels=feat_dims[-1])
        super().__init__(backbone=backbone, head=head, **kwargs)
        missing = [name for name in ('forward_heads', 'label_loss') if not hasattr(self.head, name)]
        if missing:
            raise TypeError(f'DistillationImageClassifier: head {type(self.head).__name__} lacks {missing}; use '
                            f'head=dict(type="DistillationLinearClsHead", ...)')
        if not self.with_neck and feat_dims is not None and feat_dims[-1] != self.head.in_channels:
            raise ValueError(f'DistillationImageClassifier: head.in_channels={self.head.in_channels} but the '
                             f'backbone outputs {feat_dims[-1]} channels (backbone.arch embed_dims {feat_dims})')
        self.teacher_cfg = dict(teacher)
        self.distillation = distillation
        self.alpha = alpha
        self.tau = tau
        # Set through __dict__ so that nn.Module does not register it (see the module docstring).
        self.__dict__['teacher'] = None

    def build_teacher(self):
        """Build the teacher, load its checkpoint strictly, freeze it; returns it. Called on the first loss.

        Building it leaves torch's generator as it was, so training draws the same numbers whether the teacher
        is built at the first iteration or again at the first iteration after a resume.
        """
        model_cfg = self.teacher_cfg['model']
        if isinstance(model_cfg, str):
            model_cfg = Config.fromfile(model_cfg).model
        # Its initial weights are overwritten by the checkpoint: drawing them must not move the generator that
        # training draws from, or a resumed run (which builds the teacher again) would draw other numbers.
        with torch.random.fork_rng(devices=[]):
            teacher = MODELS.build(model_cfg)
        if not isinstance(teacher, BaseClassifier):
            raise TypeError(f'DistillationImageClassifier: the teacher must be an mmpretrain classifier, got '
                            f'{type(teacher).__name__}')
        checkpoint = self.teacher_cfg['checkpoint']
        state_dict = load_teacher_state_dict(checkpoint, self.teacher_cfg.get('revise_keys', ()))
        teacher.load_state_dict(state_dict, strict=True)
        teacher.eval()
        teacher.requires_grad_(False)
        print_log(f'Distillation teacher {type(teacher.backbone).__name__} loaded from {checkpoint} '
                  f'({self.distillation}, alpha={self.alpha})', logger='current')
        return teacher

    def teacher_logits(self, inputs):
        if self.teacher is None:
            self.__dict__['teacher'] = self.build_teacher()
        teacher = self.teacher.to(inputs.device)
        teacher.eval()  # stays in eval mode whatever mode the student is switched to
        # In fp32 even under AMP, as in the official train.py, whose distillation loss (the teacher's forward
        # included) runs outside autocast: the hard labels are the fp32 teacher's top-1.
        with torch.no_grad(), torch.autocast(device_type=inputs.device.type, enabled=False):
            logits = teacher(inputs.float(), mode='tensor')
        if not isinstance(logits, torch.Tensor) or logits.shape != (inputs.shape[0], self.head.num_classes):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f'DistillationImageClassifier: the teacher must return ({inputs.shape[0]}, '
                             f'{self.head.num_classes}) logits for mode="tensor", got {shape}')
        return logits

    def loss(self, inputs, data_samples):
        teacher_logits = self.teacher_logits(inputs)
        class_logits, dist_logits = self.head.forward_heads(self.extract_feat(inputs))
        return dict(
            loss_cls=(1.0 - self.alpha) * self.head.label_loss(class_logits, data_samples),
            loss_distill=self.alpha * distillation_loss(dist_logits, teacher_logits, self.distillation, self.tau))
