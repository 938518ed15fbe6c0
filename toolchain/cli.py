"""The ``bdp`` command line (click). Heavy libraries are imported inside commands only, so that
``bdp --help`` starts fast and never imports torch or TVM.

Exit codes: 0 done; 2 the input was at fault (one line, no traceback); 1 a fault of bdp itself.
"""

from __future__ import annotations

import functools
import os
import sys

import click

from bdp.errors import InputError


def _target_names():
    from bdp.targets.spec import TARGET_NAMES  # the registry (reads /proc/cpuinfo; imports no TVM)

    return TARGET_NAMES


def _fail(msg, code):
    click.echo(f"bdp: error: {msg}", err=True)
    sys.exit(code)


def guarded(fn):
    """Map InputError to exit 2 with one line; any other exception to exit 1 with one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            _fail(" ".join(str(e).split("\n")), 2)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except MemoryError:
            _fail("out of memory", 1)
        except Exception as e:  # a fault of bdp itself
            if os.environ.get("BDP_DEBUG"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _fail(f"internal error: {type(e).__name__}: {first[:300]} (set BDP_DEBUG=1 for the traceback)", 1)

    return wrapper


def _quiet_tvm():
    os.environ.setdefault("TVM_LOG_DEBUG", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    kw = {"width": width} if width else {}
    model = zoo.build(arch, **kw)
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
@click.option("--batch-size", type=int, default=None)
@click.option("--width", type=int, default=None, help="base channel width")
@click.option("--resume", is_flag=True, help="continue from the checkpoint at -o")
@click.option("--seed", type=int, default=0, show_default=True)
@guarded
def train_cmd(arch, out, data, epochs, teacher, size, n_train, batch_size, width, resume, seed):
    """Train an architecture on the synthetic multi-task scene set (or a data folder)."""
    from bdp.models import train as _train
    from bdp.models import zoo

    if arch not in zoo.ARCHITECTURES:
        raise InputError(f"unknown architecture '{arch}'; `bdp models` lists them")
    try:
        hw = tuple(int(s) for s in size.split(","))
        assert len(hw) == 2 and min(hw) > 0
    except (ValueError, AssertionError):
        raise InputError(f"--size '{size}': expected H,W") from None
    kw = {k: v for k, v in dict(n_train=n_train, batch_size=batch_size, width=width).items() if v is not None}
    path = _train.train(arch, out, epochs=epochs, data=data, teacher=teacher, size=hw, resume=resume, seed=seed,
                        progress=True, **kw)
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

    hw = tuple(int(s) for s in size.split(","))
    net = load_checkpoint(model)
    metrics = _train.evaluate(net, data, n=n_eval, size=hw)
    for k, v in metrics.items():
        click.echo(f"{k:<24} {v:.4f}" if isinstance(v, float) else f"{k:<24} {v}")


@main.command("export")
@click.argument("model")
@click.option("-o", "--output", "out", required=True, help="ONNX file to write")
@click.option("--input-shape", default=None, help="N,C,H,W where the model leaves it open")
@click.option("--plain", is_flag=True, help="standard ops only (no bdp ops): the float graph as exported")
@guarded
def export_cmd(model, out, input_shape, plain):
    """Export MODEL to ONNX: standard ops plus the bdp domain's binary ops."""
    import onnx

    from bdp.passes import attach_functions, run_pipeline

    from .loading import parse_shape, to_onnx

    m, _info = to_onnx(model, parse_shape(input_shape))
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
                   "fast_exp, schedule_debug; see README")
@guarded
def compile_cmd(model, target, out, input_shape, pipeline, dump_after, verify, no_reference, options):
    """Compile MODEL (.pt, .pt2 or .onnx) into a bundle folder for TARGET."""
    _quiet_tvm()
    from .bundle import read_manifest
    from .compile import compile_model
    from bdp.targets.options import CompileOptions

    from .loading import parse_shape

    compile_model(model, target=target, out=out, input_shape=parse_shape(input_shape), pipeline=pipeline,
                  dump_after=dump_after, verify=verify, reference=not no_reference,
                  progress=sys.stderr.isatty(), options=CompileOptions.parse(options))
    man = read_manifest(out, verify=False)
    st = man["stats"]
    click.echo(f"wrote {out}/ for {target}: {st['binary_convs']} binary convs (packed-bit), {st['fp_convs']} float convs, "
               f"weights {st['weights_bytes'] / 1024:.1f} KiB (source {st['source_weights_bytes'] / 1024:.1f} KiB), "
               f"{man['compile_seconds']['total']:.1f} s")
    links = st.get("binary_links") or {}
    if links.get("packed") or links.get("float"):
        click.echo(f"  binary -> binary links: {links.get('packed', 0)} packed bits, {links.get('float', 0)} float "
                   f"(read as float elsewhere too, e.g. by a shortcut)")
    import json

    with open(os.path.join(out, "report.json")) as f:
        rep = json.load(f)
    for item in rep["left_float"]:
        click.echo(f"  float: {item['node']} ({item['op']}): {item['reason']}")
    if man["target"].get("note"):
        click.echo(f"  note: {man['target']['note']}")
    if man.get("verify"):
        v = man["verify"]
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
@guarded
def run_cmd(bundle, input_path, out, viz):
    """Run a bundle on one input; write OUT.npz (one array per output) and pictures."""
    _quiet_tvm()
    from .run import run_bundle

    outputs = run_bundle(bundle, input_path, out, viz)
    for k, v in outputs.items():
        click.echo(f"{k}: {list(v.shape)} {v.dtype} min {float(v.min()):.4g} max {float(v.max()):.4g}")
    if out:
        click.echo(f"wrote {out}")
    if viz:
        click.echo(f"wrote pictures to {viz}/")


@main.command("profile")
@click.argument("bundle", required=False, default=".")
@click.option("--device", default="local", show_default=True, help="'local' or a board name from the device config")
@click.option("--rpc", default=None, help="HOST:PORT of a TVM RPC server")
@click.option("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker")
@click.option("--key", default=None, help="device key at the tracker")
@click.option("--runs", type=int, default=50, show_default=True)
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--json", "json_path", default=None, help="write the results as JSON")
@click.option("--chart", default=None, help="write a chart: FILE.png or FILE.svg")
@guarded
def profile_cmd(bundle, device, rpc, tracker, key, runs, warmup, json_path, chart):
    """Latency of a bundle: median, p90, p99, per-op breakdown, FP32 baseline beside it."""
    _quiet_tvm()
    from . import profile as prof

    prof.check_runs(runs)
    if chart:
        from .charts import chart_format

        chart_format(chart)  # a wrong extension fails before the measuring
    if rpc or tracker or device != "local":
        from . import remote

        res = remote.profile_remote(bundle, device=device, rpc=rpc, tracker=tracker, key=key, runs=runs,
                                    warmup=warmup)
    else:
        res = prof.profile_local(bundle, runs=runs, warmup=warmup)
    click.echo(prof.format_text(res))
    if json_path:
        prof.write_json(json_path, res)
        click.echo(f"wrote {json_path}")
    if chart:
        prof.chart_png(chart, res)
        click.echo(f"wrote {chart}")


@main.command("bench")
@click.option("--json", "json_path", default="bench.json", show_default=True)
@click.option("--chart", default="bench.png", show_default=True, help="the chart: FILE.png or FILE.svg")
@click.option("--quick", is_flag=True, help="fewer runs and smaller models (a smoke run, not for the README)")
@click.option("--only", type=click.Choice(["layers", "models", "all", "float-layers"]), default="all", show_default=True,
              help="float-layers: bdp's float layers (stems, heads, shortcuts, pooling) vs onnxruntime, "
                   "speed and round-off (no chart)")
@guarded
def bench_cmd(json_path, chart, quick, only):
    """The performance suite: binary conv layers and zoo models vs onnxruntime / TVM / PyTorch FP32."""
    _quiet_tvm()
    from . import bench
    from .charts import chart_format

    chart_format(chart)  # a wrong extension fails before the suite's minutes of measuring
    bench.run(json_path=json_path, chart=chart, quick=quick, only=only)


@main.command("demo")
@click.option("-o", "--output", "out", default="demo-out", show_default=True, help="folder for everything the demo makes")
@click.option("--arch", default="bireal-tiny", show_default=True)
@click.option("--epochs", type=int, default=4, show_default=True)
@click.option("--rpi4/--no-rpi4", default=True, show_default=True, help="also build and check a Raspberry Pi 4 bundle under qemu")
@guarded
def demo_cmd(out, arch, epochs, rpi4):
    """Train a small model, compile it, run it on a photograph, profile it (the README's demo)."""
    _quiet_tvm()
    from .demo import run_demo

    run_demo(out=out, arch=arch, epochs=epochs, rpi4=rpi4)


from .cli_devices import devices  # noqa: E402  (click group: bdp devices add/list/remove)

main.add_command(devices)

if __name__ == "__main__":
    main()
