"""Train every zoo architecture with one small budget and write a markdown results table.

    python -m bdp.toolchain.bench.results --out results.md [--epochs 3] [--n-train 256] [--size 64x80]

Every architecture (the two baselines included) trains with the same budget on the same
synthetic split (:class:`bdp.models.data.SyntheticScenes`, ``--seed``), ``mtinet`` first so that
``bi-mtdp-f`` distils from it. All are evaluated on one held-out synthetic test split
(``--n-test`` scenes, seed ``seed + 2``), counted with :func:`bdp.models.zoo.count_macs` at
``--mac-size`` (cost convention OPs = binary MACs / 64 + float MACs) and compiled with
``bdp.compile(checkpoint, target=--target)``; the bundle's ``manifest.json`` gives
``stats.weights_bytes`` and the bundle size is the sum of its files. A failed compile is
recorded in its cell ("compile failed: ...") and the table is still written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bdp.errors import first_line

ORDER = ["mtinet", "bi-mtdp", "bi-mtdp-c", "bi-mtdp-f", "bidense", "bnn-baseline", "reactnet-baseline", "bq-dense",
         "bireal-tiny"]

COLUMNS = [  # (header, metric key, format)
    ("mIoU", "semseg.mIoU", "{:.3f}"),
    ("pix acc", "semseg.pixel_acc", "{:.3f}"),
    ("depth RMSE (m)", "depth.rmse", "{:.3f}"),
    ("AbsRel", "depth.abs_rel", "{:.3f}"),
    ("δ1", "depth.delta1", "{:.3f}"),
    ("normals mean (°)", "normals.mean_deg", "{:.1f}"),
    ("edge ODS-F", "edges.odsF", "{:.3f}"),
]


def _size(s):
    h, w = s.lower().replace(",", "x").split("x")
    return int(h), int(w)


def _human(n, unit=""):
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suf}{unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip()


def _cell(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def bundle_stats(ckpt, bundle_dir, target):
    """(weights_bytes, total bytes) of the compiled bundle, or a 'compile failed: ...' string."""
    try:
        import bdp

        out = bdp.compile(ckpt, target=target, out=bundle_dir)
        bdir = out if isinstance(out, (str, os.PathLike)) and os.path.isdir(out) else bundle_dir
        from bdp.toolchain.bundle.format import read_manifest

        wb = read_manifest(bdir, verify=False).stats.get("weights_bytes")
        total = 0
        for root, _, files in os.walk(bdir):
            for f in files:
                total += os.path.getsize(os.path.join(root, f))
        return wb, total
    except Exception as e:  # noqa: BLE001 - any failure goes into the table
        msg = first_line(e, None)
        return f"compile failed: {msg[:160]}", None


def run(out, epochs=3, n_train=256, size=(64, 80), batch_size=8, seed=0, archs=None, workdir=None, n_test=64,
        mac_size=(256, 320), target="x86", compile_bundles=True, progress=True, log=print):
    from bdp.models.checkpoint import load_checkpoint
    from bdp.models.data import SyntheticScenes
    from bdp.models.train import evaluate, train
    from bdp.models.zoo import ARCHITECTURES, count_macs

    archs = list(archs) if archs else [a for a in ORDER if a in ARCHITECTURES] + \
        sorted(a for a in ARCHITECTURES if a not in ORDER)
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        raise SystemExit(f"unknown architecture(s): {', '.join(unknown)}")
    if "bi-mtdp-f" in archs and "mtinet" in archs:  # the teacher first
        archs.remove("mtinet")
        archs.insert(0, "mtinet")
    workdir = workdir or os.path.splitext(os.path.abspath(out))[0] + "-work"
    os.makedirs(workdir, exist_ok=True)
    test_set = SyntheticScenes(n_test, size, seed + 2)
    rows = []
    ckpts = {}
    for arch in archs:
        ck = os.path.join(workdir, f"{arch}.pt")
        teacher = ckpts.get("mtinet") if arch == "bi-mtdp-f" else None
        t0 = time.time()
        log(f"[results] training {arch} ({epochs} epochs, {n_train} scenes at {size[0]}x{size[1]})"
            + (" with mtinet teacher" if teacher else ""))
        row = {"arch": arch}
        try:
            train(arch, ck, epochs=epochs, n_train=n_train, size=size, batch_size=batch_size, seed=seed,
                  teacher=teacher, progress=progress)
            ckpts[arch] = ck
            row["train_s"] = time.time() - t0
            model = load_checkpoint(ck)
            row["metrics"] = evaluate(model, test_set, batch_size=batch_size)
            row["tasks"] = list(model.tasks)
            row["params"] = sum(p.numel() for p in model.parameters())
            macs = count_macs(model, (1, 3) + tuple(mac_size))
            row["bin"], row["flt"] = macs["binary"], macs["float"]
        except Exception as e:  # noqa: BLE001 - record and go on
            row["error"] = f"{type(e).__name__}: {first_line(e, None, empty='')}"[:200]
            log(f"[results] {arch} failed: {row['error']}")
            rows.append(row)
            continue
        if compile_bundles:
            log(f"[results] compiling {arch} for {target}")
            row["bundle"] = bundle_stats(ck, os.path.join(workdir, f"{arch}-bundle"), target)
        rows.append(row)
    write_table(out, rows, dict(epochs=epochs, n_train=n_train, size=size, batch_size=batch_size, seed=seed,
                                n_test=n_test, mac_size=mac_size, target=target, compile=compile_bundles))
    return out


def write_table(out, rows, s):
    lines = [
        "# bdp zoo results",
        "",
        f"Budget: {s['epochs']} epochs on {s['n_train']} synthetic scenes at {s['size'][0]}x{s['size'][1]} "
        f"(batch {s['batch_size']}, seed {s['seed']}), the same split for every model; metrics on "
        f"{s['n_test']} held-out scenes. MACs at {s['mac_size'][0]}x{s['mac_size'][1]}; "
        "OPs = binary MACs / 64 + float MACs. Bundles for target "
        f"`{s['target']}`" + ("" if s["compile"] else " (not compiled: --no-compile)") + ".",
        "",
    ]
    head = ["model", "tasks"] + [c[0] for c in COLUMNS] + ["params", "binary MACs", "float MACs", "OPs",
                                                          "binary share", "weights (bundle)", "bundle size",
                                                          "train (s)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for r in rows:
        if "error" in r:
            lines.append("| " + " | ".join([r["arch"], "–", _cell("failed: " + r["error"])] +
                                           ["–"] * (len(head) - 3)) + " |")
            continue
        m = r["metrics"]
        cells = [r["arch"], ", ".join(r["tasks"])]
        cells += [fmt.format(m[k]) if k in m else "–" for _, k, fmt in COLUMNS]
        total = r["bin"] + r["flt"]
        cells += [_human(r["params"]), _human(r["bin"]), _human(r["flt"]), _human(r["bin"] / 64 + r["flt"]),
                  f"{100 * r['bin'] / total:.1f}%" if total else "–"]
        b = r.get("bundle")
        if b is None:
            cells += ["–", "–"]
        elif isinstance(b[0], str):
            cells += [_cell(b[0]), "–"]
        else:
            cells += [_human(b[0], "B") if b[0] is not None else "?", _human(b[1], "B")]
        cells.append(f"{r['train_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Metrics: mIoU over classes present; depth RMSE / AbsRel / δ1 (<1.25) on valid pixels; normals mean "
              "angular error; edge F-score at the best of 99 fixed thresholds over the set, 1-pixel tolerance. "
              "'–': the model does not predict that task.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        fh.write("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bdp.toolchain.bench.results", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--size", type=_size, default=(64, 80), help="training/eval size HxW (default 64x80)")
    ap.add_argument("--mac-size", type=_size, default=(256, 320), help="size for MAC counts (default 256x320)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--archs", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--workdir", default=None, help="checkpoints and bundles (default: OUT without .md + -work)")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--no-compile", action="store_true", help="skip bdp.compile (no bundle sizes)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    run(a.out, epochs=a.epochs, n_train=a.n_train, size=a.size, batch_size=a.batch_size, seed=a.seed,
        archs=a.archs.split(",") if a.archs else None, workdir=a.workdir, n_test=a.n_test, mac_size=a.mac_size,
        target=a.target, compile_bundles=not a.no_compile, progress=not a.quiet,
        log=lambda m: print(m, file=sys.stderr, flush=True))
    print(a.out)


if __name__ == "__main__":
    main()
