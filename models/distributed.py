"""Data-parallel training across processes (torch.distributed), equal to training in one process.

:func:`bdp.models.train.train` trains data-parallel when it runs under ``torchrun`` (the
environment holds ``WORLD_SIZE`` > 1 with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``): one process per device, backend ``nccl`` on CUDA (rank ``r`` on
``cuda:LOCAL_RANK``) and ``gloo`` on CPU, the model wrapped in ``DistributedDataParallel``.
``bdp train --nproc N`` starts torchrun itself (:func:`launch`).

A run with W processes computes what one process computes for the same global batch, to float
rounding (the order of sums differs), by construction:

* Batches (:class:`ShardSampler`): every epoch one permutation of the training set
  (``torch.randperm`` with a generator seeded from the seed and the epoch); global batch ``k`` is
  ``perm[k*B:(k+1)*B]`` and rank ``r`` takes its ``r``-th slice of ``B/W`` samples, so the ranks'
  micro-batches of a step are together the single-process batch. (``DistributedSampler`` shards
  a permutation round-robin, which is not the single-process batch order.)
* Losses (:func:`batch_mean`): every mean in :mod:`bdp.models.losses` is the mean over the whole
  global batch (the ranks' sums and counts, one all-reduce), valued as the single-process loss,
  with the gradient of the local part scaled by W, so that DDP's gradient averaging (a division
  by W) yields the single-process gradient. Averaging per-rank losses would not: masked means
  (ignored pixels, invalid depth) have different counts per rank, and BiDense's SILog is a
  non-linear function of two batch means. The loss every rank logs is thus the global batch's.
* BatchNorm: batch statistics of the global batch. CUDA: ``torch.nn.SyncBatchNorm``. Its
  forward refuses CPU tensors (torch 2.13: "SyncBatchNorm expected input tensor to be on GPU"),
  so CPU runs use :class:`GlobalBatchNorm2d`, SyncBatchNorm's algorithm (per-channel sums
  all-reduced in the forward, the sums of dy and (x - mean) dy in the backward) in torch's CPU
  BatchNorm arithmetic, so that its forward is one process's to the bit.
* Noise (the VIB of ``bi-mtdp-f``, :func:`randn_like_batch`): every rank draws the global batch's
  noise from its RNG (seeded alike, drawing alike, so equal on all ranks) and keeps its rows: the
  samples and the RNG stream are the single process's.

Only rank 0 evaluates, writes checkpoints and shows progress; the others wait at a barrier.

"To float rounding" is as close as two float computations of a binary net come: sums in another
order differ in the last bits, and a sign that lands on exactly 0 may fall either way, or Adam's
first step ``lr * g / (|g| + 1e-8)`` turn a gradient entry of round-off size into +-lr. The
tests see, 2 processes against 1, losses within 1e-7 (relative), every parameter's gradient
within 2e-5 of its tensor's largest, and weights after 2 to 4 Adam steps within 3e-4 (relative
L2) for ``bireal-tiny`` and ``bi-mtdp-f``. Some untrained nets are chaotic in float: ``bnn-baseline``'s first gradient
changes by O(1) in places when one process merely permutes its batch (BatchNorm over channels
of near-equal values divides round-off by sqrt(eps)), so no two runs of it agree closely, with
any number of processes.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import subprocess
import sys
import tempfile
import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from bdp.errors import InputError

DEVICES = ("auto", "cpu", "cuda")
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STATUS_ENV = "BDP_DIST_STATUS"  # folder where `bdp train --nproc` workers report a failure

_ACTIVE = None  # the Runtime while a data-parallel training step computes its loss (global_batch)


def resolve_device(device="auto") -> torch.device:
    """``auto`` -> cuda when ``torch.cuda.is_available()`` else cpu; ``cuda`` without a GPU is an InputError."""
    device = str(device or "auto").lower()
    if device not in DEVICES:
        raise InputError(f"--device '{device}': expected one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available to torch (torch.cuda.is_available() is "
                         "False); use --device cpu or auto")
    return torch.device(device)


class Runtime:
    """This process's place in the run: ``rank``, ``world`` (processes), ``device``."""

    def __init__(self, device, rank=0, world=1, local_rank=0, owns_group=False):
        self.device, self.rank, self.world, self.local_rank = device, rank, world, local_rank
        self.owns_group = owns_group

    @property
    def distributed(self):
        return self.world > 1

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def mean_scalar(self, value) -> float:
        """The mean over ranks of a scalar tensor (for logging), as a float."""
        if not self.distributed:
            return float(value.detach())
        t = value.detach().reshape(1).to(device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world

    def wrap(self, model):
        """MODEL with global-batch BatchNorm, in DistributedDataParallel (itself in one process)."""
        if not self.distributed:
            return model
        if self.device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ids = [self.device.index]
        else:
            convert_batchnorm(model)
            ids = None
        # static_graph: every step uses the same parameters; DDP finds any unused ones in step 1
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device="auto") -> Runtime:
    """The Runtime of this process: one process, or (under torchrun) the process group joined."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Runtime(dev)
    missing = [k for k in TORCHRUN_ENV if not os.environ.get(k)]
    if missing:
        raise InputError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start data-parallel training "
                         "with torchrun or bdp train --nproc N")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise InputError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): start at "
                             "most one process per GPU")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60))
        owns = True
    return Runtime(dev, dist.get_rank(), dist.get_world_size(), local, owns)


@contextlib.contextmanager
def global_batch(rt: Runtime):
    """While active (the forward and the loss of a data-parallel training step), losses, BatchNorm
    and noise work on the global batch (see the module docstring)."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, (rt if rt.distributed else None)
    try:
        yield
    finally:
        _ACTIVE = prev


def batch_mean(values):
    """Mean (float32) of VALUES' elements (a selection from a batch), 0 when there are none.

    One process: ``values.mean()``. Data-parallel (in :func:`global_batch`): the mean over the
    global batch ``S / N`` (sums and counts all-reduced), whose gradient with respect to this
    rank's values is W / N per element, so that DDP's averaging gives the single-process 1 / N."""
    s = values.sum(dtype=torch.float32)
    rt = _ACTIVE
    if rt is None:
        return s / values.numel() if values.numel() else s * 0
    t = torch.stack([s.detach().double(), torch.tensor(float(values.numel()), dtype=torch.float64, device=s.device)])
    dist.all_reduce(t)
    total, n = t[0].float(), t[1].float()
    return torch.where(n > 0, (total + rt.world * (s - s.detach())) / n.clamp_min(1), s * 0)


def randn_like_batch(x):
    """``torch.randn_like(x)`` for a batch-first X; data-parallel: this rank's rows of the global
    batch's noise (all ranks draw the same, as the single process does)."""
    rt = _ACTIVE
    if rt is None:
        return torch.randn_like(x)
    b = x.shape[0]
    full = torch.randn((rt.world * b, *x.shape[1:]), dtype=x.dtype, device=x.device, layout=x.layout)
    return full[rt.rank * b:(rt.rank + 1) * b]


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (data-parallel, any
    backend; :class:`_GlobalBatchNorm` does the work). Outside :func:`global_batch`, and in eval
    mode, it is a plain BatchNorm2d."""

    def forward(self, x):
        if _ACTIVE is None or not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        f = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        w = self.weight if self.affine else torch.ones(x.shape[1], device=x.device)
        b = self.bias if self.affine else torch.zeros(x.shape[1], device=x.device)
        return _GlobalBatchNorm.apply(x, w, b, self.eps, f, self.running_mean if self.track_running_stats else None,
                                      self.running_var if self.track_running_stats else None)


class _GlobalBatchNorm(torch.autograd.Function):
    """Training-mode batch norm over the global batch, computed as torch's CPU BatchNorm computes
    it so that the forward is one process's to the bit where the data allow: float64 sums
    (all-reduced), mean and variance rounded to float32, two-pass variance, ``x * alpha + beta``
    fused as this machine's kernel does (:func:`_native_bn_fuses`). Binary nets take signs of
    BatchNorm outputs; a channel of equal values gives outputs at exactly the bias, where a
    last-bit difference flips a sign. The backward is BatchNorm's (SyncBatchNorm's: the sums of
    dy and (x - mean) dy all-reduced for the input's gradient, the weight's and bias's gradients
    local for DDP to average), exactly 0 where x - mean is."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, momentum, running_mean, running_var):
        c = x.shape[1]
        dims, shape = [0, 2, 3], (1, c, 1, 1)
        xf = x.float()
        stats = torch.cat([xf.sum(dims, dtype=torch.float64),
                           torch.full((1,), float(x.numel() // c), dtype=torch.float64, device=x.device)])
        dist.all_reduce(stats)
        n = stats[c]
        mean = (stats[:c] / n).float()
        d = xf - mean.view(shape)
        var_sum = (d * d).sum(dims, dtype=torch.float64)
        dist.all_reduce(var_sum)
        var_sum = var_sum.float()
        invstd = (1 / torch.sqrt((var_sum / n.float()).double() + eps)).float()
        alpha = invstd * weight.float()
        beta = bias.float() - mean * alpha
        if _native_bn_fuses():  # one rounding (x * alpha is exact in float64)
            y = (xf.double() * alpha.double().view(shape) + beta.double().view(shape)).float()
        else:
            y = xf * alpha.view(shape) + beta.view(shape)
        if running_mean is not None:
            m = torch.tensor(momentum, dtype=torch.float32).item()  # as torch: the momentum in float
            running_mean.copy_(m * mean + (1 - m) * running_mean)
            unbiased = var_sum.double() / (n - 1).clamp_min(1)
            running_var.copy_((m * unbiased + (1 - m) * running_var.double()).to(running_var.dtype))
        ctx.save_for_backward(xf, weight, mean, invstd, n)
        ctx.in_dtype = x.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xf, weight, mean, invstd, n = ctx.saved_tensors
        c = xf.shape[1]
        dims, shape = [0, 2, 3], (1, c, 1, 1)
        dy = dy.float()
        xmu = xf - mean.view(shape)
        local = torch.cat([dy.sum(dims, dtype=torch.float64), (xmu * dy).sum(dims, dtype=torch.float64)])
        grad_weight = (local[c:] * invstd.double()).float()
        grad_bias = local[:c].float()
        grad_x = None
        if ctx.needs_input_grad[0]:
            total = local.clone()
            dist.all_reduce(total)
            nf = n.float()
            k = (total[c:].float() * invstd * invstd / nf).view(shape)
            grad_mean = (total[:c].float() / nf).view(shape)
            grad_x = ((dy - grad_mean - xmu * k) * (invstd * weight.float()).view(shape)).to(ctx.in_dtype)
        return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None, None, None, None


@functools.lru_cache(maxsize=None)
def _native_bn_fuses():
    """Whether this machine's torch computes BatchNorm's ``x * alpha + beta`` with a fused
    multiply-add (its AVX2 kernels do), probed on random data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * 3 + 0.5
    w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    ref = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    mean = (x.sum([0, 2, 3], dtype=torch.float64) / 128).float()
    var = ((x - mean.view(1, 4, 1, 1)) ** 2).sum([0, 2, 3], dtype=torch.float64).float() / 128
    alpha = ((1 / torch.sqrt(var.double() + 1e-5)).float() * w).view(1, 4, 1, 1)
    beta = (b - mean * alpha.flatten()).view(1, 4, 1, 1)
    fused = (x.double() * alpha.double() + beta.double()).float()
    return bool((fused == ref).sum() > (x * alpha + beta == ref).sum())


def convert_batchnorm(module):
    """Replace every ``nn.BatchNorm2d`` under MODULE by a :class:`GlobalBatchNorm2d` sharing its
    parameters and buffers (state-dict keys unchanged); returns MODULE (or the replacement)."""
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new = convert_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


class ShardSampler(Sampler):
    """Batch sampler: this rank's slice of each of ``steps`` global batches of ``batch_size`` from
    one permutation of ``n`` samples (``torch.randperm(n)`` with a generator seeded by ``seed``).
    With ``world=1`` it yields the global batches themselves."""

    def __init__(self, n, batch_size, steps, seed, rank=0, world=1):
        if batch_size % world:
            raise InputError(f"--batch-size {batch_size} is not divisible by the {world} processes")
        if steps * batch_size > n:
            raise ValueError(f"{steps} batches of {batch_size} need {steps * batch_size} samples, have {n}")
        self.n, self.bs, self.steps, self.seed, self.rank, self.world = n, batch_size, steps, seed, rank, world

    def __len__(self):
        return self.steps

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        m = self.bs // self.world
        for k in range(self.steps):
            start = k * self.bs + self.rank * m
            yield perm[start:start + m]


# ---------------------------------------------------------------------------------------------
# bdp train --nproc N: torchrun started for the user


def report_failure(code, message):
    """In a worker started by :func:`launch`: record this rank's failure (exit code, one line)
    for the launcher to print; returns False when not started by launch (print it yourself)."""
    folder = os.environ.get(STATUS_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    rank = os.environ.get("RANK", "0")
    tmp = os.path.join(folder, f".rank{rank}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{int(code)}\n{' '.join(str(message).split())}\n")
    os.replace(tmp, os.path.join(folder, f"rank{rank}"))
    return True


def _failures(folder):
    out = {}
    for name in os.listdir(folder):
        if name.startswith("rank") and name[4:].isdigit():
            with open(os.path.join(folder, name)) as f:
                code, _, msg = f.read().partition("\n")
            out[int(name[4:])] = (int(code), msg.strip())
    return out


def launch(cli_args, nproc):
    """Run ``python -m torch.distributed.run --standalone --nproc-per-node NPROC -m
    bdp.toolchain.cli CLI_ARGS...`` with the workers' output passed through. A failed worker
    reports its one-line error (:func:`report_failure`); torchrun's own failure report (a
    traceback) is then held back. Returns ``(exit code, message or None)``: 0 done, else the
    first-ranked failure's code and line."""
    env = dict(os.environ)
    # torchrun defaults to one thread per worker (and warns about it); share the cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "bdp.toolchain.cli", *map(str, cli_args)]
    with tempfile.TemporaryDirectory(prefix="bdp-dist-") as folder:
        env[STATUS_ENV] = folder
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)

        def relay():  # stderr through, byte for byte (tqdm redraws with \r), until a worker failed
            fd, raw = proc.stderr.fileno(), getattr(sys.stderr, "buffer", None)
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                if _failures(folder):
                    continue
                if raw is not None:
                    raw.write(chunk)
                    raw.flush()
                else:
                    sys.stderr.write(chunk.decode(errors="replace"))
                    sys.stderr.flush()

        t = threading.Thread(target=relay, daemon=True)
        t.start()
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        t.join(timeout=10)
        fails = _failures(folder)
    if rc == 0:
        return 0, None
    if fails:
        codes = {c for c, _ in fails.values()}
        rank = min(fails)  # an input error is the same on every rank; else the lowest rank's fault
        if 2 in codes:
            rank = min(r for r, (c, _) in fails.items() if c == 2)
        code, msg = fails[rank]
        return code, msg if code == 2 else f"rank {rank}: {msg}"
    return 1, f"torchrun failed (exit code {rc}); see its output above"
