"""Losses of the dense prediction papers.

Per task (``task_loss``), as MTI-Net / Bi-MTDP train on NYUD-v2:

* ``semseg``: cross-entropy, pixels labelled :data:`IGNORE_INDEX` (255) ignored.
* ``depth``: L1 on valid pixels (target > 0); ``depth_loss="silog"`` gives BiDense's
  scale-invariant log loss ``s * sqrt(mean(g^2) - lambda * mean(g)^2)``, g = log(pred) - log(target),
  lambda = 0.85, s = 10 (the BTS / NeWCRFs form BiDense's depth code uses).
* ``normals``: L1 between the L2-normalised prediction and the unit target on valid pixels
  (target of norm > 0.5).
* ``edges``: class-balanced binary cross-entropy with positive weight 0.95 (MTI-Net's
  ``BalancedCrossEntropyLoss``): ``-(w y log s(p) + (1 - w)(1 - y) log(1 - s(p)))``, mean over pixels.

Default task weights (MTI-Net, NYUD): semseg 1, depth 1, normals 10, edges 50.

Also: deep supervision (the same task losses on each scale's initial predictions, resized to the
target; MTI-Net weighs every scale 1), the VIB KL term ``KL(N(mu, sigma^2) || N(0, I))`` (mean over
elements) and feature distillation ``sum_l MSE(F_student_l, F_teacher_l)``.

Every mean goes through :func:`bdp.models.distributed.batch_mean`: in one process the plain
mean (0 over an empty selection), under data-parallel training the mean over the whole global
batch, so that several processes train as one does (see :mod:`bdp.models.distributed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .distributed import batch_mean

TASK_WEIGHTS = {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edges": 50.0}
EDGE_POS_WEIGHT = 0.95


def _fit(pred, target):
    if pred.shape[-2:] != target.shape[-2:]:
        pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return pred


def semseg_loss(pred, target, ignore_index=IGNORE_INDEX):
    per_pixel = F.cross_entropy(_fit(pred, target), target, ignore_index=ignore_index, reduction="none")
    return batch_mean(per_pixel[target != ignore_index])


def depth_l1(pred, target):
    pred = _fit(pred, target)
    return batch_mean((pred - target).abs()[target > 0])


def silog_loss(pred, target, variance_focus=0.85, scale=10.0, eps=1e-3):
    """Scale-invariant log loss (Eigen et al.; BTS form): ``scale * sqrt(mean(g^2) - vf * mean(g)^2)``."""
    pred = _fit(pred, target)
    valid = target > 0
    g = torch.log(pred[valid].clamp_min(eps)) - torch.log(target[valid])
    # (no valid pixel at all: both means 0, the loss the constant scale * 1e-4 without gradient)
    return scale * torch.sqrt(batch_mean(g * g) - variance_focus * batch_mean(g) ** 2 + 1e-8)


def normals_l1(pred, target):
    pred = F.normalize(_fit(pred, target), dim=1, eps=1e-6)
    valid = (target.norm(dim=1, keepdim=True) > 0.5).expand_as(target)
    return batch_mean((pred - target).abs()[valid])


def balanced_bce(pred, target, pos_weight=EDGE_POS_WEIGHT):
    pred = _fit(pred, target)
    w = torch.where(target > 0.5, torch.full_like(target, pos_weight), torch.full_like(target, 1 - pos_weight))
    return batch_mean(F.binary_cross_entropy_with_logits(pred, target, weight=w, reduction="none"))


def task_loss(task, pred, target, depth_loss="l1"):
    if task == "semseg":
        return semseg_loss(pred, target)
    if task == "depth":
        return silog_loss(pred, target) if depth_loss == "silog" else depth_l1(pred, target)
    if task == "normals":
        return normals_l1(pred, target)
    if task == "edges":
        return balanced_bce(pred, target)
    raise KeyError(f"no loss for task '{task}'")


def multitask_loss(outputs, targets, weights=None, depth_loss="l1"):
    """Weighted sum of the task losses of the tasks both predicted and labelled.

    Returns ``(total, {task: loss value})``."""
    weights = {**TASK_WEIGHTS, **(weights or {})}
    total = 0.0
    parts = {}
    for t, p in outputs.items():
        if t not in targets:
            continue
        l = task_loss(t, p, targets[t], depth_loss)
        parts[t] = l
        total = total + weights.get(t, 1.0) * l
    return total, parts


def deep_supervision_loss(deep, targets, weights=None, scale_weights=None, depth_loss="l1"):
    """Task losses on every scale's initial predictions (``aux["deep_supervision"]``)."""
    total = 0.0
    for name, preds in deep.items():
        w = 1.0 if scale_weights is None else scale_weights.get(name, 1.0)
        total = total + w * multitask_loss(preds, targets, weights, depth_loss)[0]
    return total


def vib_kl(vib_stats):
    """KL(N(mu, exp(logvar)) || N(0, I)), averaged over elements, summed over the VIB layers."""
    total = 0.0
    for mu, logvar in vib_stats:
        total = total + 0.5 * batch_mean(mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return total


def feature_distillation(student_feats, teacher_feats, layers=("backbone", "mmd")):
    """``sum_l MSE(student_l, teacher_l)`` over the feature names that start with one of LAYERS
    (``backbone.s``, ``mmd.s.task``; teacher features detached). Shapes must agree."""
    total = 0.0
    n = 0
    for name, fs in student_feats.items():
        if not any(name == p or name.startswith(p + ".") for p in layers):
            continue
        if name not in teacher_feats:
            raise KeyError(f"teacher has no feature '{name}'")
        ft = teacher_feats[name].detach()
        if ft.shape != fs.shape:
            raise ValueError(f"feature '{name}': student {tuple(fs.shape)} vs teacher {tuple(ft.shape)}")
        total = total + batch_mean((fs - ft) ** 2)
        n += 1
    if n == 0:
        raise ValueError(f"no features matched layers {list(layers)}")
    return total
