"""The ``bdp`` command line (click). Heavy libraries are imported inside commands only, so that
``bdp --help`` starts fast and never imports torch or TVM.

Exit codes: 0 done; 2 the input was at fault (one line, no traceback); 1 a fault of bdp itself.
"""

from __future__ import annotations

import functools
import os
import sys

import click

from bdp.errors import InputError, first_line


def _target_names():
    from bdp.targets.spec import TARGET_NAMES  # the registry (reads /proc/cpuinfo; imports no TVM)

    return TARGET_NAMES


TRUST_KEY_HELP = ("refuse the bundle unless its manifest is signed by this Ed25519 public key (bdp keys new); "
                  "default $BDP_TRUST")
TRUST_HELP = ("load a .pt2 with torch.export.load as is: it may run code from the file (pickles, sympy "
              "strings); only for files you trust. Without it bdp inspects the archive and refuses such content")


def _fail(msg, code):
    if _TERMINATING and code != 143:  # the SIGTERM surfaced as another error (e.g. through a TVM callback)
        msg, code = "terminated", 143
    click.echo(f"bdp: error: {_one_line(msg)}", err=True)
    sys.exit(code)


def _one_line(msg):
    return " ".join(str(msg).split())


def guarded(fn):
    """Map InputError (and OSErrors of the user's paths: disk full, no permission) to exit 2 with
    one line; any other exception to exit 1 with one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from bdp.files import is_user_os_error

        try:
            return fn(*args, **kwargs)
        except InputError as e:
            _fail(str(e), 2)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except MemoryError:
            _fail("out of memory", 1)
        except OSError as e:
            if not is_user_os_error(e) or os.environ.get("BDP_DEBUG"):
                raise_or_fail(e)
            where = e.filename or ""
            _fail(f"{where}{': ' if where else ''}{e.strerror or type(e).__name__}", 2)
        except Exception as e:  # a fault of bdp itself
            raise_or_fail(e)

    return wrapper


def raise_or_fail(e):
    """A fault of bdp itself: the traceback with BDP_DEBUG=1, else one line and exit 1."""
    if os.environ.get("BDP_DEBUG"):
        raise e
    first = first_line(e, None, empty="")
    _fail(f"internal error: {type(e).__name__}: {first[:300]} (set BDP_DEBUG=1 for the traceback)", 1)


class _Group(click.Group):
    """click's group with usage errors on one line (``bdp: error: ... (see bdp CMD --help)``,
    exit 2) instead of click's three, and SIGTERM turned into a clean exit (temporary files and
    folders are removed on the way out)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        _exit_cleanly_on_sigterm()
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            _fail(e.format_message() + hint, e.exit_code)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        except _Terminated:
            _fail("terminated", 143)
        sys.exit(0)


_TERMINATING = False


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanups run (BaseException: no handler of
    bdp's own catches it)."""


def _exit_cleanly_on_sigterm():
    import signal

    def handler(signum, frame):
        global _TERMINATING
        _TERMINATING = True
        raise _Terminated()

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


def _parse_hw(size, opt="--size", limit=8192):
    """'64,80' -> (64, 80); InputError for anything but two integers in 1..LIMIT."""
    try:
        hw = tuple(int(s) for s in str(size).split(","))
    except ValueError:
        hw = ()
    if len(hw) != 2 or not all(1 <= v <= limit for v in hw):
        raise InputError(f"{opt} '{size}': expected H,W (two integers from 1 to {limit})")
    return hw


def _quiet_tvm():
    os.environ.setdefault("TVM_LOG_DEBUG", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bdp", prog_name="bdp")
def main():
    """bdp: binary dense prediction, from PyTorch to the robot.

    Train binarized multi-task dense predictors, export them to ONNX with binary ops, compile
    them into packed-bit XNOR/popcount bundles with Apache TVM (x86, Raspberry Pi 4, CUDA), run
    and profile them.
    """


@main.command("models")
@guarded
def models_cmd():
    """List the built-in architectures: name, tasks, parameters, share of binary MACs."""
    from bdp.models import zoo

    describe = getattr(zoo, "describe", None)
    click.echo(f"{'name':<18} {'tasks':<30} {'params':>10} {'binary MACs':>12}  description")
    for name in sorted(zoo.ARCHITECTURES):
        if describe:
            d = describe(name)
            tasks, params, share, desc = d["tasks"], d["params"], d["binary_mac_share"], d["description"]
        else:
            arch = zoo.ARCHITECTURES[name]
            m = arch.make()
            macs = zoo.count_macs(m)
            tasks = list(getattr(m, "tasks", []))
            params = sum(p.numel() for p in m.parameters())
            share = macs["binary"] / max(1, macs["binary"] + macs["float"])
            desc = arch.description
        click.echo(f"{name:<18} {','.join(tasks):<30} {params:>10,} {100 * share:>11.1f}%  {desc}")


@main.command("init")
@click.argument("arch")
@click.option("-o", "--output", "out", required=True, help="checkpoint to write (.pt)")
@click.option("--width", type=int, default=None, help="base channel width")
@click.option("--seed", type=int, default=0, show_default=True)
@guarded
def init_cmd(arch, out, width, seed):
    """Write an untrained checkpoint of a built-in architecture."""
    import torch

    from bdp.models import zoo
    from bdp.models.checkpoint import save_checkpoint

    if arch not in zoo.ARCHITECTURES:
        raise InputError(f"unknown architecture '{arch}'; `bdp models` lists them")
    torch.manual_seed(seed)
    kw = {"width": width} if width is not None else {}
    model = zoo.build_checked(arch, kw, where=f"bdp init {arch}")
    save_checkpoint(model, out, meta={"epoch": 0, "trained": False})
    click.echo(f"wrote {out} ({arch}, {sum(p.numel() for p in model.parameters()):,} parameters)")


@main.command("train")
@click.argument("arch")
@click.option("-o", "--output", "out", required=True, help="checkpoint to write (.pt)")
@click.option("--data", default="synth", show_default=True, help="'synth' or a data folder (see README)")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--teacher", default=None, help="teacher checkpoint (mtinet) for bi-mtdp-f")
@click.option("--size", default="64,80", show_default=True, help="training resolution H,W")
@click.option("--n-train", type=int, default=None, help="number of synthetic training scenes")
@click.option("--batch-size", type=int, default=None, help="global batch size (split among --nproc processes)")
@click.option("--width", type=int, default=None, help="base channel width")
@click.option("--resume", is_flag=True, help="continue from the checkpoint at -o")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (cuda when available), cuda or cpu")
@click.option("--amp/--no-amp", default=None,
              help="mixed precision (torch.autocast) [default: on for cuda, off for cpu]")
@click.option("--nproc", type=int, default=None,
              help="data-parallel processes on this machine: starts torchrun (one process per GPU with cuda)")
@click.option("--workers", type=int, default=0, show_default=True, help="data loader processes per training process")
@guarded
def train_cmd(arch, out, data, epochs, teacher, size, n_train, batch_size, width, resume, seed, device, amp, nproc,
              workers):
    """Train an architecture on the synthetic multi-task scene set (or a data folder).

    Data-parallel: --nproc N, or start this command under torchrun (torchrun --nproc-per-node N
    -m bdp.toolchain.cli train ...); the result equals one process's for the same --batch-size."""
    from bdp.models import distributed as _dist
    from bdp.models import train as _train
    from bdp.models import zoo

    if arch not in zoo.ARCHITECTURES:
        raise InputError(f"unknown architecture '{arch}'; `bdp models` lists them")
    try:
        hw = tuple(int(s) for s in size.split(","))
        assert len(hw) == 2 and min(hw) > 0
    except (ValueError, AssertionError):
        raise InputError(f"--size '{size}': expected H,W") from None
    if workers < 0:
        raise InputError(f"--workers {workers}: must be 0 or more")
    kw = {k: v for k, v in dict(n_train=n_train, batch_size=batch_size, width=width).items() if v is not None}
    if nproc is not None:
        if os.environ.get("RANK") is not None and os.environ.get("WORLD_SIZE") is not None:
            raise InputError("--nproc starts torchrun itself; leave it out when running under torchrun")
        if nproc < 1:
            raise InputError(f"--nproc {nproc}: must be at least 1")
    if nproc is not None and nproc > 1:
        dev = _dist.resolve_device(device)
        if dev.type == "cuda":
            import torch

            if torch.cuda.device_count() < nproc:
                raise InputError(f"--nproc {nproc} with --device cuda: only {torch.cuda.device_count()} GPU(s) visible")
        # the checks every worker would make, here, so that bad input fails in one line
        _train.prepare(arch, out, epochs, data, teacher, hw, resume=resume, seed=seed, world=nproc,
                       **{**kw, "workers": workers})
        args = ["train", arch, "-o", out, "--data", data, "--epochs", epochs, "--size", size, "--seed", seed,
                "--device", dev.type, "--workers", workers]
        args += [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
        args += (["--teacher", teacher] if teacher else []) + (["--resume"] if resume else [])
        args += [] if amp is None else ["--amp" if amp else "--no-amp"]
        code, msg = _dist.launch(args, nproc)  # rank 0 says "wrote OUT"
        if code:
            _fail(msg, code)
        return
    rank = int(os.environ.get("RANK", "0") or 0)  # under torchrun: only rank 0 speaks
    try:
        path = _train.train(arch, out, epochs=epochs, data=data, teacher=teacher, size=hw, resume=resume, seed=seed,
                            progress=True, device=device, amp=amp, workers=workers, **kw)
    except InputError as e:
        if _dist.report_failure(2, e) or rank != 0:
            sys.exit(2)
        raise
    except Exception as e:  # reported to `bdp train --nproc`, which prints it; else guarded does
        first = first_line(e, None, empty="")
        if not os.environ.get("BDP_DEBUG") and _dist.report_failure(1, f"internal error: {type(e).__name__}: {first}"):
            sys.exit(1)
        raise
    if rank == 0:
        click.echo(f"wrote {path}")


@main.command("eval")
@click.argument("model")
@click.option("--data", default="synth", show_default=True)
@click.option("--n", "n_eval", type=int, default=64, show_default=True, help="synthetic scenes to evaluate on")
@click.option("--size", default="64,80", show_default=True)
@guarded
def eval_cmd(model, data, n_eval, size):
    """Evaluate a checkpoint: mIoU, depth RMSE / AbsRel / delta1, normals angle error, edge F-score."""
    from bdp.models import train as _train
    from bdp.models.checkpoint import load_checkpoint

    hw = _parse_hw(size)
    if n_eval < 1:
        raise InputError(f"--n {n_eval}: must be at least 1")
    net = load_checkpoint(model)
    metrics = _train.evaluate(net, data, n=n_eval, size=hw)
    for k, v in metrics.items():
        click.echo(f"{k:<24} {v:.4f}" if isinstance(v, float) else f"{k:<24} {v}")


@main.command("export")
@click.argument("model")
@click.option("-o", "--output", "out", required=True, help="ONNX file to write")
@click.option("--input-shape", default=None, help="N,C,H,W where the model leaves it open")
@click.option("--plain", is_flag=True, help="standard ops only (no bdp ops): the float graph as exported")
@click.option("--trust-model", is_flag=True, help=TRUST_HELP)
@guarded
def export_cmd(model, out, input_shape, plain, trust_model):
    """Export MODEL to ONNX: standard ops plus the bdp domain's binary ops."""
    import onnx

    from bdp.passes import attach_functions, run_pipeline

    from .frontend.loading import parse_shape, to_onnx

    m, _info = to_onnx(model, parse_shape(input_shape), trust_model=trust_model)
    if not plain:
        m, report = run_pipeline(m, "default")
        click.echo(f"{len(report.fused)} binary convs as bdp.BinaryConv, {len(report.left_float)} convs left in float")
    m = attach_functions(m)
    if m.ir_version > 10:
        m.ir_version = 10
    from bdp.files import atomic_path

    with atomic_path(out) as tmp:
        onnx.save(m, tmp)
    click.echo(f"wrote {out}")


@main.command("compile")
@click.argument("model")
@click.option("--target", "-t", type=click.Choice(_target_names()), default="x86", show_default=True)
@click.option("-o", "--output", "out", default="bundle", show_default=True, help="bundle folder to write")
@click.option("--input-shape", default=None, help="N,C,H,W where the model leaves it open")
@click.option("--pipeline", default="default", show_default=True, help="pass pipeline (`bdp passes` lists them)")
@click.option("--dump-after", default=None, help="write the ONNX after this pass (or 'all') to BUNDLE.passes/")
@click.option("--verify", is_flag=True, help="check every pass and the compiled bundle against onnxruntime")
@click.option("--no-reference", is_flag=True, help="leave the float reference.onnx out of the bundle")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="compile option (repeatable): float_schedule, pack_apart, bits_in_tile, binary_orient=auto|x|k, "
                   "binary_word=auto|8|16|32|64, stack_buffers, fast_exp, schedule_debug; see README")
@click.option("--trust-model", is_flag=True, help=TRUST_HELP)
@click.option("--force", is_flag=True, help="replace OUT (and OUT.passes/) even when it is a folder bdp did not write, "
              "deleting everything in it")
@click.option("--sign", "sign_key", default=None, metavar="KEY", help="sign the bundle with this private key "
              "(`bdp keys new`): manifest.sig, checked by --trust")
@click.option("--require-binary", is_flag=True, help="fail (exit 2) when a layer with 1-bit weights would run in "
              "float, instead of the warning")
@guarded
def compile_cmd(model, target, out, input_shape, pipeline, dump_after, verify, no_reference, options, trust_model,
                force, sign_key, require_binary):
    """Compile MODEL (.pt, .pt2 or .onnx) into a bundle folder for TARGET."""
    _quiet_tvm()
    from .bundle.format import read_manifest
    from .compile import compile_model
    from bdp.targets.options import CompileOptions

    from .frontend.loading import parse_shape

    compile_model(model, target=target, out=out, input_shape=parse_shape(input_shape), pipeline=pipeline,
                  dump_after=dump_after, verify=verify, reference=not no_reference,
                  progress=sys.stderr.isatty(), options=CompileOptions.parse(options), trust_model=trust_model,
                  force=force, sign=sign_key, require_binary=require_binary)
    man = read_manifest(out, verify=False, trust=False)
    st = man.stats
    click.echo(f"wrote {out}/ for {target}: {st['binary_convs']} binary convs (packed-bit), {st['fp_convs']} float convs, "
               f"weights {st['weights_bytes'] / 1024:.1f} KiB (source {st['source_weights_bytes'] / 1024:.1f} KiB), "
               f"{man.compile_seconds['total']:.1f} s" + (", signed" if sign_key else ""))
    links = st.get("binary_links") or {}
    if links.get("packed") or links.get("float"):
        click.echo(f"  binary -> binary links: {links.get('packed', 0)} packed bits, {links.get('float', 0)} float "
                   f"(read as float elsewhere too, e.g. by a shortcut)")
    import json

    with open(os.path.join(out, "report.json")) as f:
        rep = json.load(f)
    for item in rep["left_float"]:
        click.echo(f"  float: {item['node']} ({item['op']}): {item['reason']}")
    if man.target.note:
        click.echo(f"  note: {man.target.note}")
    if man.verify:
        v = man.verify
        worst = max((p["max_relative_diff"] for p in rep.get("verified", [])), default=0.0)
        click.echo(f"  verified: {len(rep.get('verified', []))} passes node by node (worst {worst:.2g}); "
                   f"bundle vs onnxruntime {v['max_relative_diff']:.2g}: {v['result']}")


@main.command("passes")
@guarded
def passes_cmd():
    """List the graph passes and the named pipelines."""
    from bdp.passes import PASSES, PIPELINES

    click.echo("passes:")
    for name, p in PASSES.items():
        click.echo(f"  {name:<22} {p.description}")
    click.echo("pipelines:")
    for name, names in PIPELINES.items():
        click.echo(f"  {name:<22} {' -> '.join(names)}")
    from bdp.passes.binarizers import describe

    click.echo("binarizer forms recognised (bdp.passes.binarizers):")
    for name, what in describe():
        click.echo(f"  {name:<22} {what}")


@main.command("run")
@click.argument("bundle")
@click.option("--input", "-i", "input_path", required=True, help=".npy tensor or an image (.png/.jpg)")
@click.option("-o", "--output", "out", default=None, help="write outputs to this .npz")
@click.option("--viz", default=None, help="write PNG pictures of the dense outputs to this folder")
@click.option("--force", is_flag=True, help="replace the --viz folder even when it holds files bdp did not write")
@click.option("--trust", default=None, metavar="PUBKEY", help=TRUST_KEY_HELP)
@guarded
def run_cmd(bundle, input_path, out, viz, force, trust):
    """Run a bundle on one input; write OUT.npz (one array per output) and pictures."""
    _quiet_tvm()
    from .runtime.run import run_bundle

    outputs = run_bundle(bundle, input_path, out, viz, force=force, trust=trust)
    for k, v in outputs.items():
        click.echo(f"{k}: {list(v.shape)} {v.dtype} min {float(v.min()):.4g} max {float(v.max()):.4g}")
    if out:
        click.echo(f"wrote {out}")
    if viz:
        click.echo(f"wrote pictures to {viz}/")


@main.command("profile")
@click.argument("bundle", required=False, default=".")
@click.option("--device", default="local", show_default=True,
              help="'local', a board name from the device config, or 'cortex-a72-model' (an estimate for a "
                   "Raspberry Pi 4 of an rpi4/arm64 bundle, made here under qemu + llvm-mca)")
@click.option("--rpc", default=None, help="HOST:PORT of a TVM RPC server")
@click.option("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker")
@click.option("--key", default=None, help="device key at the tracker")
@click.option("--runs", type=int, default=None, help="timed runs [default: 50; 1 model run for cortex-a72-model]")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--json", "json_path", default=None, help="write the results as JSON")
@click.option("--chart", default=None, help="write a chart: FILE.png or FILE.svg")
@click.option("--trust", default=None, metavar="PUBKEY", help=TRUST_KEY_HELP)
@guarded
def profile_cmd(bundle, device, rpc, tracker, key, runs, warmup, json_path, chart, trust):
    """Latency of a bundle: median, p90, p99, per-op breakdown, FP32 baseline beside it.
    With --device cortex-a72-model: an estimate for a Raspberry Pi 4 (Cortex-A72, 1 thread) of an
    rpi4/arm64 bundle: instructions counted exactly under qemu, cycles from llvm-mca."""
    _quiet_tvm()
    from bdp.files import check_output_file, refuse_inside

    from .runtime import profile as prof

    if runs is not None:
        prof.check_runs(runs)
    if warmup < 0:
        raise InputError(f"--warmup {warmup}: must be 0 or more")
    for path, what in ((json_path, "--json file"), (chart, "--chart file")):
        if path:
            check_output_file(path, what)
            refuse_inside(path, bundle, what, "bundle")
    if chart:
        from .runtime.charts import chart_format

        chart_format(chart)  # a wrong extension fails before the measuring
    from .bundle.format import read_manifest

    read_manifest(bundle, trust=trust)  # a configured trust key is checked before anything runs or is sent
    res = prof.run_profile(bundle, device=device, rpc=rpc, tracker=tracker, key=key, runs=runs, warmup=warmup,
                           trust=trust)
    click.echo(prof.format_text(res))
    if json_path:
        prof.write_json(json_path, res)
        click.echo(f"wrote {json_path}")
    if chart:
        if res.get("estimate"):
            from .runtime.estimate import chart_png as estimate_chart

            estimate_chart(chart, res)
        else:
            prof.chart_png(chart, res)
        click.echo(f"wrote {chart}")


@main.command("bench")
@click.option("--json", "json_path", default="bench.json", show_default=True)
@click.option("--chart", default="bench.png", show_default=True, help="the chart: FILE.png or FILE.svg")
@click.option("--quick", is_flag=True, help="fewer runs and smaller models (a smoke run, not for the README)")
@click.option("--only", type=click.Choice(["layers", "models", "all", "wild", "float-layers", "training-code"]), default="all",
              show_default=True,
              help="wild: Larq / Brevitas / training-code networks from the wild; training-code: ReActNet-A and "
                   "Bi-Real-18 as their training code writes them, alone; float-layers: bdp's float layers (stems, "
                   "heads, shortcuts, pooling) vs onnxruntime, speed and round-off (none is part of all)")
@click.option("--wild-dir", type=click.Path(file_okay=False), default=None,
              help="with --only wild: Larq networks made by make_larq.py --full (default: the small test fixtures)")
@click.option("--target", "-t", type=click.Choice(["x86", "rpi4"]), default="x86", show_default=True,
              help="rpi4: the tables ESTIMATED for a Raspberry Pi 4 with the Cortex-A72 model (qemu + llvm-mca)")
@click.option("--arch", "archs", multiple=True, help="zoo architecture(s) for the model table (default: all)")
@click.option("--runs", type=int, default=1, show_default=True, help="rpi4: model runs per estimator process")
@guarded
def bench_cmd(json_path, chart, quick, only, wild_dir, target, archs, runs):
    """The performance suite: binary conv layers and zoo models vs onnxruntime FP32 / INT8, TVM, PyTorch FP32.
    With --target rpi4: bdp and TVM FP32 on the Cortex-A72 estimator (estimates, not measurements)."""
    _quiet_tvm()
    from bdp.files import check_output_file

    from .bench import suite as bench
    from .runtime.charts import chart_format

    chart_format(chart)  # a wrong extension fails before the suite's minutes of measuring
    check_output_file(json_path, "--json file")
    check_output_file(chart, "--chart file")
    if only in ("wild", "float-layers", "training-code") and target != "x86":
        raise InputError(f"--only {only} runs on x86 only")
    if runs < 1:
        raise InputError("--runs must be at least 1")
    if archs:
        from bdp.models import zoo

        bad = [a for a in archs if a not in zoo.ARCHITECTURES]
        if bad:
            raise InputError(f"unknown architecture '{bad[0]}'; `bdp models` lists them")
    bench.run(json_path=json_path, chart=chart, quick=quick, only=only, archs=archs or None, target=target,
              runs=runs, wild_dir=wild_dir)


@main.command("demo")
@click.option("-o", "--output", "out", default="demo-out", show_default=True, help="folder for everything the demo makes")
@click.option("--arch", default="bireal-tiny", show_default=True)
@click.option("--epochs", type=int, default=4, show_default=True)
@click.option("--rpi4/--no-rpi4", default=True, show_default=True, help="also build and check a Raspberry Pi 4 bundle under qemu")
@click.option("--force", is_flag=True, help="write into the folder even when it holds files the demo did not write")
@guarded
def demo_cmd(out, arch, epochs, rpi4, force):
    """Train a small model, compile it, run it on a photograph, profile it (the README's demo).

    A second run replaces what the first wrote; a folder holding anything else is refused."""
    _quiet_tvm()
    from .demo import run_demo

    run_demo(out=out, arch=arch, epochs=epochs, rpi4=rpi4, force=force)


@main.group("keys")
def keys():
    """Ed25519 keys for signed bundles (bdp compile --sign, bdp run --trust, bin/bdp-run --trust)."""


@keys.command("new")
@click.argument("name")
@click.option("--force", is_flag=True, help="overwrite existing NAME.key / NAME.pub")
@guarded
def keys_new(name, force):
    """Write a key pair: NAME.key (private, mode 0600, keep it secret) and NAME.pub (give it to the devices)."""
    from .bundle.signing import new_key_pair

    priv, pub = new_key_pair(name, force=force)
    click.echo(f"wrote {priv} (private: signs bundles, keep it secret) and {pub} (public: --trust {pub})")


from .cli_devices import devices  # noqa: E402  (click group: bdp devices add/list/remove)

main.add_command(devices)

if __name__ == "__main__":
    main()
