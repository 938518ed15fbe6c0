"""Training and evaluation of the zoo's dense predictors.

:func:`train` trains an architecture on the synthetic scene set (``data="synth"``) or on a data
folder (:class:`bdp.models.data.FolderDataset`), writing a bdp checkpoint after every epoch
(``meta``: epoch, step, optimizer state, validation metrics, history, the training settings and
the RNG state, all plain values and tensors so ``weights_only=True`` loads it; ``history`` holds
every epoch's metrics and per-step losses). ``resume=True`` continues from the checkpoint at ``out``.

Devices: ``device="auto"`` (cuda when available), ``"cuda"`` or ``"cpu"``; mixed precision
(``amp``, on by default on CUDA) with ``torch.autocast``. Data-parallel under ``torchrun`` (or
``bdp train --nproc N``): :mod:`bdp.models.distributed`, equal to one process for the same
global batch.

Every epoch visits a fresh permutation of the training set (seeded by ``seed`` and the epoch) in
batches of ``batch_size``, the last partial batch dropped.

Recipe (BNN practice, ReActNet/Bi-Real): Adam, learning rate ``lr`` (1e-3) with a cosine decay to
0 over all steps, no weight decay (``weight_decay``), batch size 8. Progress-dependent
binarizers (IR-Net's EDE) get ``p = step / total_steps`` before every step
(:func:`~bdp.models.binarize.set_training_progress`).

Losses: :func:`bdp.models.losses.multitask_loss` with MTI-Net's task weights (``weights``
overrides them); depth uses SILog for the BiDense-skeleton models (``bidense``, ``bnn-baseline``,
``reactnet-baseline``, as BiDense trains) and L1 otherwise (``depth_loss``). MTI-Net family:
deep supervision on the initial predictions of every scale (``ds_weight``, 1), the VIB KL term
for ``bi-mtdp-f`` (``vib_weight``, 1e-3), and with ``teacher`` (an ``mtinet`` checkpoint of the
same width and tasks) feature distillation ``kd_weight * sum_l MSE`` over the backbone and
distillation outputs (``kd_layers``).

:func:`evaluate` computes the standard metrics (see :class:`Metrics`).
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from bdp.errors import InputError

from .binarize import set_training_progress
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .data import IGNORE_INDEX, FolderDataset, SyntheticScenes
from .distributed import ShardSampler, global_batch, setup
from .losses import deep_supervision_loss, feature_distillation, multitask_loss, vib_kl
from .zoo import ARCHITECTURES, build

SILOG_ARCHS = ("bidense", "bnn-baseline", "reactnet-baseline")

TRAIN_DEFAULTS = dict(lr=1e-3, weight_decay=0.0, weights=None, depth_loss=None, ds_weight=1.0, vib_weight=1e-3,
                      kd_weight=1.0, kd_layers=["backbone", "mmd"], n_val=64, steps_per_epoch=None,
                      eval_batches=None, clip_grad=None, workers=0)


# ---------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Accumulates dense-prediction metrics over batches (pixel-pooled over the whole set).

    * semseg: ``semseg.mIoU`` (mean over the classes present in the labels or the predictions of
      IoU from the confusion matrix; 255 ignored), ``semseg.pixel_acc``.
    * depth (valid = target > 0; predictions clamped to >= 1e-3 for ratios): ``depth.rmse``,
      ``depth.abs_rel`` = mean |p - g| / g, ``depth.delta1`` = share of max(p/g, g/p) < 1.25.
    * normals (valid = |target| > 0.5; prediction L2-normalised): ``normals.mean_deg``,
      ``normals.median_deg`` (0.01-degree histogram), ``normals.within_11.25``.
    * edges: ODS-like F-score at ``edge_thresholds`` fixed thresholds t_k = k / (K + 1) on
      sigmoid(logit), counts pooled over the set (the dataset-scale optimum); a predicted edge
      pixel is correct when a true edge lies within ``edge_tolerance`` pixels (Chebyshev), a true
      edge is recalled when a predicted edge lies within the same distance (a dilation, not
      BSDS's one-to-one matching). ``edges.odsF``, ``edges.precision``, ``edges.recall``,
      ``edges.threshold`` at the best threshold.
    """

    def __init__(self, num_classes=None, edge_thresholds=99, edge_tolerance=1):
        self.num_classes = num_classes
        self.conf = None
        self.depth = torch.zeros(4, dtype=torch.float64)  # n, sq err, abs rel, delta1 count
        self.normal_hist = torch.zeros(18000, dtype=torch.float64)
        self.normal_sum = 0.0
        self.normal_in = 0.0
        self.k = int(edge_thresholds)
        self.tol = int(edge_tolerance)
        self.edge = torch.zeros(self.k, 4, dtype=torch.float64)  # pred, pred matched, gt, gt matched
        self.seen = set()

    @torch.no_grad()
    def update(self, outputs: dict, targets: dict):
        for t, p in outputs.items():
            if t not in targets:
                continue
            g = targets[t]
            p = p.detach().float()
            if p.shape[-2:] != g.shape[-2:]:
                p = F.interpolate(p, size=g.shape[-2:], mode="bilinear", align_corners=False)
            self.seen.add(t)
            getattr(self, "_" + t)(p, g)

    def _semseg(self, p, g):
        c = self.num_classes or p.shape[1]
        self.num_classes = c
        if self.conf is None:
            self.conf = torch.zeros(c, c, dtype=torch.float64)
        pred = p.argmax(1)
        valid = (g != IGNORE_INDEX) & (g >= 0) & (g < c)
        idx = g[valid] * c + pred[valid]
        self.conf += torch.bincount(idx, minlength=c * c).reshape(c, c).double()

    def _depth(self, p, g):
        valid = g > 0
        if not valid.any():
            return
        pv, gv = p[valid].double(), g[valid].double()
        pc = pv.clamp_min(1e-3)
        ratio = torch.maximum(pc / gv, gv / pc)
        self.depth += torch.stack([torch.tensor(float(gv.numel()), dtype=torch.float64), ((pv - gv) ** 2).sum(),
                                   ((pv - gv).abs() / gv).sum(), (ratio < 1.25).double().sum()])

    def _normals(self, p, g):
        valid = g.norm(dim=1) > 0.5
        if not valid.any():
            return
        pn = F.normalize(p, dim=1, eps=1e-8)
        gn = F.normalize(g, dim=1, eps=1e-8)
        cos = (pn * gn).sum(1).clamp(-1, 1)[valid].double()
        ang = torch.rad2deg(torch.acos(cos))
        self.normal_sum += float(ang.sum())
        self.normal_in += float((ang < 11.25).sum())
        self.normal_hist += torch.histc(ang, bins=18000, min=0, max=180)

    def _edges(self, p, g):
        prob = torch.sigmoid(p)
        gt = g > 0.5
        r = self.tol
        dil = (lambda m: F.max_pool2d(m.float(), 2 * r + 1, 1, r) > 0) if r > 0 else (lambda m: m)
        gt_d = dil(gt)
        ngt = float(gt.sum())
        for i in range(self.k):
            thr = (i + 1) / (self.k + 1)
            pr = prob >= thr
            self.edge[i, 0] += float(pr.sum())
            self.edge[i, 1] += float((pr & gt_d).sum())
            self.edge[i, 2] += ngt
            self.edge[i, 3] += float((gt & dil(pr)).sum())

    def compute(self) -> dict:
        out = {}
        if "semseg" in self.seen and self.conf is not None:
            tp = self.conf.diag()
            union = self.conf.sum(0) + self.conf.sum(1) - tp
            present = union > 0
            out["semseg.mIoU"] = float((tp[present] / union[present]).mean()) if present.any() else float("nan")
            tot = self.conf.sum()
            out["semseg.pixel_acc"] = float(tp.sum() / tot) if tot > 0 else float("nan")
        if "depth" in self.seen and self.depth[0] > 0:
            n, sq, ar, d1 = self.depth.tolist()
            out["depth.rmse"] = math.sqrt(sq / n)
            out["depth.abs_rel"] = ar / n
            out["depth.delta1"] = d1 / n
        if "normals" in self.seen:
            n = float(self.normal_hist.sum())
            if n > 0:
                out["normals.mean_deg"] = self.normal_sum / n
                cdf = torch.cumsum(self.normal_hist, 0)
                out["normals.median_deg"] = float(torch.searchsorted(cdf, torch.tensor([n / 2], dtype=torch.float64))[0]) * 0.01
                out["normals.within_11.25"] = self.normal_in / n
        if "edges" in self.seen:
            pred, pm, gt, gm = self.edge.T
            prec = torch.where(pred > 0, pm / pred.clamp_min(1), torch.where(gt > 0, torch.zeros_like(pred),
                                                                              torch.ones_like(pred)))
            rec = torch.where(gt > 0, gm / gt.clamp_min(1), torch.ones_like(gt))
            f = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp_min(1e-12), torch.zeros_like(prec))
            i = int(torch.argmax(f))
            out["edges.odsF"] = float(f[i])
            out["edges.precision"] = float(prec[i])
            out["edges.recall"] = float(rec[i])
            out["edges.threshold"] = (i + 1) / (self.k + 1)
        return out


@torch.no_grad()
def evaluate(model, data="synth", batch_size=8, max_batches=None, num_classes=None, edge_thresholds=99,
             edge_tolerance=1, n=64, size=(64, 80), seed=2) -> dict:
    """Metrics (see :class:`Metrics`) of MODEL (any callable ``x -> {task: tensor}``; an
    ``nn.Module`` is put in eval mode for the call) over DATA: a Dataset yielding
    ``(image, targets)``, a DataLoader, any iterable of batched ``(images, targets)``, the string
    ``"synth"`` (N synthetic scenes at SIZE with SEED; the default seed 2 is a split that
    :func:`train` with seed 0 never sees) or a data folder path (:class:`FolderDataset`, resized
    to SIZE when given). Images go to the module's device, predictions come back to the CPU."""
    if isinstance(data, (str, os.PathLike)):
        tasks = list(getattr(model, "tasks", ["semseg", "depth", "normals", "edges"]))
        if str(data) in ("synth", "synthetic"):
            data = SyntheticScenes(n, size, seed, tasks)
        elif os.path.isdir(data):
            data = FolderDataset(data, size, None, tasks)
        else:
            raise InputError(f"{data}: data must be 'synth' or a data folder")
    if isinstance(data, Dataset):
        # its own generator: a DataLoader draws a seed per iteration, from torch's global RNG
        # otherwise (which the training's noise uses; only rank 0 evaluates)
        data = DataLoader(data, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    m = Metrics(num_classes, edge_thresholds, edge_tolerance)
    was = getattr(model, "training", None)
    dev = None
    if isinstance(model, torch.nn.Module):
        model.eval()
        dev = next(iter(model.parameters()), torch.empty(0)).device
    try:
        for i, (x, tg) in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            out = model(x if dev is None else x.to(dev))
            m.update({t: v.float().cpu() for t, v in out.items()}, tg)
    finally:
        if isinstance(model, torch.nn.Module) and was:
            model.train()
    return m.compute()


# ---------------------------------------------------------------------------------------------
# Data


def make_datasets(data, size, n_train, n_val, seed, tasks):
    """(train, val) data sets: ``"synth"`` (seeds ``seed`` and ``seed + 1000003``) or a folder
    (``train.txt`` / ``val.txt`` splits when present, else the last 10% of the samples as val)."""
    if data in (None, "synth", "synthetic"):
        return (SyntheticScenes(n_train, size, seed, tasks), SyntheticScenes(n_val, size, seed + 1000003, tasks))
    root = str(data)
    if not os.path.isdir(root):
        raise InputError(f"{root}: data must be 'synth' or a data folder")
    if os.path.isfile(os.path.join(root, "train.txt")) and os.path.isfile(os.path.join(root, "val.txt")):
        tr = FolderDataset(root, size, "train", tasks)
        va = FolderDataset(root, size, "val", tasks)
    else:
        full = FolderDataset(root, size, None, tasks)
        nv = max(1, len(full) // 10) if len(full) > 1 else 0
        tr = Subset(full, range(len(full) - nv)) if nv else full
        va = Subset(full, range(len(full) - nv, len(full))) if nv else full
    if n_train is not None and len(tr) > n_train:
        tr = Subset(tr, range(n_train))
    if n_val is not None and len(va) > n_val:
        va = Subset(va, range(n_val))
    return tr, va


# ---------------------------------------------------------------------------------------------
# Training


def _plain(v):
    """A value made of ints, floats, strings, bools, None, lists and dicts (weights_only-safe)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)


def _load_teacher(path, model):
    teacher = load_checkpoint(path)
    if getattr(teacher, "bdp_arch", None) != "mtinet":
        raise InputError(f"{path}: the teacher must be an 'mtinet' checkpoint, not '{teacher.bdp_arch}'")
    if not hasattr(model, "widths"):
        raise InputError(f"feature distillation needs an MTI-Net family student (mtinet, bi-mtdp*), "
                         f"not '{model.bdp_arch}'")
    if list(teacher.widths) != list(model.widths) or list(teacher.tasks) != list(model.tasks):
        raise InputError(f"{path}: teacher widths {teacher.widths} / tasks {teacher.tasks} differ from the "
                         f"student's {model.widths} / {model.tasks}; train the teacher with the same width and tasks")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _count(name, value):
    if value is None:
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} '{value}': expected a whole number") from None
    if v < 1 or v != value:
        raise InputError(f"{name} {value}: must be a whole number of at least 1")
    return v


def prepare(arch, out, epochs=10, data="synth", teacher=None, size=(64, 80), batch_size=8, n_train=256, seed=0,
            resume=False, width=None, world=1, **cfg) -> dict:
    """Check the settings of :func:`train` and build what it trains: the model (restored from OUT
    with ``resume``), the data sets, the teacher, the step counts; InputError on anything wrong.
    WORLD is the number of data-parallel processes, among which the global batch must split
    evenly. ``bdp train --nproc`` calls it before starting torchrun, to fail in one line."""
    if arch not in ARCHITECTURES:
        raise InputError(f"unknown architecture '{arch}'; known: {', '.join(sorted(ARCHITECTURES))}")
    arch_keys = set(ARCHITECTURES[arch].defaults)
    unknown = [k for k in cfg if k not in arch_keys and k not in TRAIN_DEFAULTS]
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(unknown)} for '{arch}' (architecture options: "
                         f"{', '.join(sorted(arch_keys))}; training options: {', '.join(sorted(TRAIN_DEFAULTS))})")
    epochs, batch_size = _count("--epochs", epochs), _count("--batch-size", batch_size)
    n_train, world = _count("--n-train", n_train), _count("--nproc", world)
    tcfg = {k: cfg.get(k, v) for k, v in TRAIN_DEFAULTS.items()}
    overrides = {k: v for k, v in cfg.items() if k in arch_keys}
    if width is not None:
        overrides["width"] = int(width)
    if tcfg["depth_loss"] is None:
        tcfg["depth_loss"] = "silog" if arch in SILOG_ARCHS else "l1"
    size = (int(size[0]), int(size[1]))

    torch.manual_seed(seed)
    st = dict(start_epoch=0, step=0, history=[], optimizer=None, scaler=None, cuda_rng=None)
    if resume and os.path.exists(out):
        ck = read_checkpoint(out)
        if ck["arch"] != arch:
            raise InputError(f"{out}: cannot resume: checkpoint is of architecture '{ck['arch']}', not '{arch}'")
        model = load_checkpoint(out)
        meta = ck.get("meta", {})
        st.update(start_epoch=int(meta.get("epoch", -1)) + 1, step=int(meta.get("step", 0)),
                  history=list(meta.get("history", [])), optimizer=meta.get("optimizer"),
                  scaler=meta.get("grad_scaler"), cuda_rng=meta.get("cuda_rng"))
        if "rng" in meta:
            torch.set_rng_state(meta["rng"])
    else:
        model = build(arch, **overrides)
    rng = torch.get_rng_state()
    tasks = list(model.tasks)
    train_set, val_set = make_datasets(data, size, n_train, tcfg["n_val"], seed, tasks)
    if len(train_set) == 0:
        raise InputError("the training set is empty")
    bs = min(batch_size, len(train_set))
    if bs % world:
        raise InputError(f"--batch-size {bs}{' (the training set size)' if bs < batch_size else ''} does not split "
                         f"evenly among {world} processes; use a multiple of {world}")
    steps_per_epoch = len(train_set) // bs
    if tcfg["steps_per_epoch"]:
        steps_per_epoch = min(steps_per_epoch, int(tcfg["steps_per_epoch"]))
    teacher_model = _load_teacher(teacher, model) if teacher else None
    return dict(model=model, teacher=teacher_model, tcfg=tcfg, train_set=train_set, val_set=val_set, bs=bs,
                steps_per_epoch=steps_per_epoch, total=max(1, steps_per_epoch * epochs), epochs=epochs, seed=seed,
                rng=rng,
                settings=_plain({**tcfg, "data": str(data), "size": list(size), "batch_size": bs, "n_train": n_train,
                                 "seed": seed, "teacher": teacher}), **st)


def train(arch, out, epochs=10, data="synth", teacher=None, size=(64, 80), batch_size=8, n_train=256, seed=0,
          resume=False, width=None, progress=True, device="auto", amp=None, **cfg) -> str:
    """Train ARCH and write its checkpoint to OUT after every epoch; returns OUT.

    ``cfg`` holds architecture overrides (any key of the architecture's defaults, e.g.
    ``tasks``, ``blocks``) and training settings (:data:`TRAIN_DEFAULTS`: ``lr``,
    ``weight_decay``, ``weights``, ``depth_loss``, ``ds_weight``, ``vib_weight``, ``kd_weight``,
    ``kd_layers``, ``n_val``, ``steps_per_epoch``, ``eval_batches``, ``clip_grad``, ``workers``:
    DataLoader worker processes).

    ``device``: ``auto`` (cuda when available), ``cuda`` or ``cpu``. ``amp``: mixed precision
    (``torch.autocast``: bf16 where the GPU has it, else fp16 with a GradScaler; bf16 on CPU);
    None = on for cuda, off for cpu. Under torchrun (``WORLD_SIZE`` > 1) each process trains
    its share of every global batch of ``batch_size`` (see :mod:`bdp.models.distributed`: the
    result equals one process's), rank 0 alone evaluates, writes OUT and shows progress.
    """
    rt = setup(device)
    try:
        plan = prepare(arch, out, epochs, data, teacher, size, batch_size, n_train, seed, resume, width,
                       world=rt.world, **cfg)
        _fit(plan, rt, out, arch, amp, progress and rt.is_main)
    finally:
        rt.close()
    return out


def _amp(device, amp):
    """(autocast dtype or None, GradScaler, enabled only for fp16)."""
    if amp is None:
        amp = device.type == "cuda"
    dtype = None
    if amp:
        dtype = torch.bfloat16
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            dtype = torch.float16
    return dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def batch_loss(net, x, tg, tcfg, teacher=None, is_mti=None):
    """The training loss of one (micro-)batch: tasks, deep supervision, VIB KL, distillation
    (TCFG: the settings of :data:`TRAIN_DEFAULTS`, ``depth_loss`` resolved). NET may be the
    model or its DistributedDataParallel wrapper (then IS_MTI says whether it is an MTI-Net)."""
    if is_mti is None:
        is_mti = hasattr(net, "widths")
    if is_mti:
        outputs, aux = net(x, return_aux=True)
    else:
        outputs, aux = net(x), None
    loss, _ = multitask_loss(outputs, tg, tcfg["weights"], tcfg["depth_loss"])
    if aux is not None:
        if tcfg["ds_weight"]:
            loss = loss + tcfg["ds_weight"] * deep_supervision_loss(aux["deep_supervision"], tg, tcfg["weights"],
                                                                    depth_loss=tcfg["depth_loss"])
        if aux["vib"] and tcfg["vib_weight"]:
            loss = loss + tcfg["vib_weight"] * vib_kl(aux["vib"])
        if teacher is not None and tcfg["kd_weight"]:
            with torch.no_grad():
                _, taux = teacher(x, return_aux=True)
            loss = loss + tcfg["kd_weight"] * feature_distillation(aux["features"], taux["features"],
                                                                   tcfg["kd_layers"])
    return loss


def _fit(p, rt, out, arch, amp, progress):
    model, tcfg, dev = p["model"], p["tcfg"], rt.device
    epochs, total, bs, step, history = p["epochs"], p["total"], p["bs"], p["step"], p["history"]
    model.to(dev)
    teacher = p["teacher"].to(dev) if p["teacher"] is not None else None
    net = rt.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    if p["optimizer"] is not None:
        opt.load_state_dict(p["optimizer"])
    amp_dtype, scaler = _amp(dev, amp)
    if p["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(p["scaler"])
    torch.set_rng_state(p["rng"])  # here: whatever building and wrapping drew, training draws alike
    if dev.type == "cuda" and p["cuda_rng"] is not None:
        torch.cuda.set_rng_state(p["cuda_rng"], dev)
    is_mti = hasattr(model, "widths")
    settings = {**p["settings"], "device": dev.type, "world_size": rt.world,
                "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=min(step, total), desc=f"train {arch}", unit="step", dynamic_ncols=True)
    try:
        for epoch in range(p["start_epoch"], epochs):
            model.train()
            sampler = ShardSampler(len(p["train_set"]), bs, p["steps_per_epoch"], p["seed"] * 1000003 + epoch,
                                   rt.rank, rt.world)
            loader = DataLoader(p["train_set"], batch_sampler=sampler, generator=torch.Generator(),
                                num_workers=int(tcfg["workers"]), pin_memory=dev.type == "cuda")
            t0 = time.time()
            losses = []
            for x, tg in loader:
                set_training_progress(model, step / total)
                lr = tcfg["lr"] * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
                for pg in opt.param_groups:
                    pg["lr"] = lr
                x = x.to(dev, non_blocking=True)
                tg = {k: v.to(dev, non_blocking=True) for k, v in tg.items()}
                with global_batch(rt), torch.autocast(dev.type, dtype=amp_dtype or torch.bfloat16,
                                                      enabled=amp_dtype is not None):
                    loss = batch_loss(net, x, tg, tcfg, teacher, is_mti)
                value = rt.mean_scalar(loss)  # the global batch's loss on every rank already; the same on all
                if not math.isfinite(value):
                    raise RuntimeError(f"loss became {value} at step {step} (epoch {epoch})")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tcfg["clip_grad"]:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg["clip_grad"]))
                scaler.step(opt)
                scaler.update()
                step += 1
                losses.append(value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{sum(losses) / len(losses):.3f}")
            set_training_progress(model, min(step / total, 1.0))
            if rt.is_main:
                metrics = evaluate(model, p["val_set"], batch_size=bs, max_batches=tcfg["eval_batches"])
                metrics["train_loss"] = sum(losses) / max(len(losses), 1)
                metrics["epoch_seconds"] = time.time() - t0
                history.append({"epoch": epoch, **metrics, "step_losses": losses})
                meta = {"epoch": epoch, "epochs": epochs, "step": step, "optimizer": opt.state_dict(),
                        "metrics": metrics, "history": history, "rng": torch.get_rng_state(), "train": settings}
                if scaler.is_enabled():
                    meta["grad_scaler"] = scaler.state_dict()
                if dev.type == "cuda":
                    meta["cuda_rng"] = torch.cuda.get_rng_state(dev)
                save_checkpoint(model, out, meta=meta)
                if bar is not None:
                    bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            rt.barrier()
    finally:
        if bar is not None:
            bar.close()
