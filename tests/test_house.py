"""The shape of the code: one-way layers and toolchain stages, no import loops (function-local
imports included), no file over 800 lines."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("toolchain", "passes", "targets", "models")
# what each layer may import from bdp (data flows model -> ONNX -> passes -> targets -> bundle)
ALLOWED = {
    "models": {"models", "errors", "files"},
    "passes": {"passes", "errors", "files"},
    "targets": {"targets", "passes", "errors", "files"},
    "toolchain": {"toolchain", "targets", "passes", "models", "errors", "files", "__init__"},
}
# toolchain/ by stage: a module may import its own stage and the ones before it, never a later one
# (the CLI sits on top; compile is the frontend + passes + targets + bundle; bench and the demo
# compile, run and time)
STAGES = (("frontend",), ("bundle",), ("runtime",), ("compile",), ("bench", "demo"), ("cli", "cli_devices"))


def _modules():
    out = {}
    for folder in FOLDERS:
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            for n in names:
                if n.endswith(".py"):
                    path = os.path.join(dirpath, n)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    mod = "bdp." + (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)
                    out[mod] = path
    for n in ("__init__", "errors", "files"):
        out["bdp" if n == "__init__" else f"bdp.{n}"] = os.path.join(ROOT, n + ".py")
    return out


def _imports(mod, path, top_level_only):
    tree = ast.parse(open(path).read())
    pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bdp")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("bdp"):
                found.add(name)
                found |= {f"{name}.{a.name}" for a in node.names}
    return found


def test_layers_import_one_way():
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        layer = mod.split(".")[1] if mod.count(".") >= 1 else "__init__"
        if layer not in ALLOWED:
            continue
        for name in _imports(mod, path, top_level_only=False):
            parts = name.split(".")
            target = parts[1] if len(parts) > 1 else "__init__"
            if target not in ALLOWED[layer]:
                bad.append(f"{mod} imports {name}")
    assert not bad, "\n".join(sorted(bad))


def _stage(mod):
    parts = mod.split(".")
    if len(parts) < 3 or parts[1] != "toolchain":
        return None
    stage = next((i for i, names in enumerate(STAGES) if parts[2] in names), None)
    assert stage is not None, f"{mod}: toolchain/{parts[2]} is in no stage of STAGES; add it to one"
    return stage


def test_toolchain_stages_import_one_way():
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        stage = _stage(mod)
        if stage is None:
            continue
        for name in _imports(mod, path, top_level_only=False):
            if name in mods and _stage(name) is not None and _stage(name) > stage:
                bad.append(f"{mod} ({'/'.join(STAGES[stage])}) imports {name} ({'/'.join(STAGES[_stage(name)])})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_loops():
    """No cycle among bdp's modules, counting imports inside functions too: a loop hidden in a
    function-local import is still a loop (the two modules cannot be understood apart)."""
    mods = _modules()
    graph = {m: {i for i in _imports(m, p, top_level_only=False) if i in mods and i != m} for m, p in mods.items()}
    # a package's __init__ importing its own submodules is how packages are built, not a loop
    for m in graph:
        graph[m] = {i for i in graph[m] if not (i.startswith(m + ".") and mods[m].endswith("__init__.py"))}
    state, stack, loops = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                loops.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not loops, "\n".join(" -> ".join(c) for c in loops)


def test_no_file_over_800_lines():
    long = []
    for dirpath, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("docs", "__pycache__", "build")
                   and not d.endswith(".egg-info")]
        for n in names:
            if n.endswith((".py", ".cc", ".c", ".h", ".md", ".toml")) and "fixtures" not in dirpath:
                path = os.path.join(dirpath, n)
                with open(path, errors="replace") as f:
                    count = sum(1 for _ in f)
                if count > 800:
                    long.append(f"{os.path.relpath(path, ROOT)}: {count}")
    assert not long, long


def _spec_keywords(key):
    """The string values KEY takes in the TargetSpec entries of targets/spec.py."""
    tree = ast.parse(open(os.path.join(ROOT, "targets", "spec.py")).read())
    return {kw.value.value for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords
            if kw.arg == key and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str)}


def _str_constants(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def _target_fact(node):
    """NODE reads a target fact by name: ``x.popcount_isa``, ``x.arch``, ``x["arch"]``, ``x.get("arch")``."""
    facts = ("popcount_isa", "popcount", "arch")
    if isinstance(node, ast.Attribute):
        return node.attr in facts
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value in facts
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value in facts
    return False


def test_target_facts_live_on_the_spec():
    """Only targets/spec.py compares ISA or architecture names; everything else asks the
    TargetSpec (its ScheduleTraits, elf_machine, library_arch, ...), so that a new target is one
    spec entry (and at most one device module), not an edit in every file that compares names."""
    isas = _spec_keywords("popcount_isa") - {""}
    assert {"avx2", "neon-cnt"} <= isas
    bad = []
    for mod, path in _modules().items():
        if mod == "bdp.targets.spec":
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            consts = set().union(*(_str_constants(o) for o in operands))
            if consts & isas or (consts and any(_target_fact(o) for o in operands)) or any(
                    isinstance(o, ast.Attribute) and o.attr == "popcount_isa" for o in operands):
                bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "\n".join(bad)


def test_no_tables_keyed_by_isa():
    """The ISA name (``popcount_isa``) is reported, never looked up: no ``TABLE[spec.popcount_isa]``
    or ``TABLE.get(spec.popcount_isa)`` outside targets/spec.py (such a table is a spec field)."""
    bad = []
    for mod, path in _modules().items():
        if mod == "bdp.targets.spec":
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            keys = []
            if isinstance(node, ast.Subscript):
                keys = [node.slice]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                keys = node.args[:1]
            if any(isinstance(k, ast.Attribute) and k.attr == "popcount_isa" for k in keys):
                bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "\n".join(bad)


def test_readme_stays_a_guide():
    """The README says how to use bdp and how it works in at most 350 lines; dated runs and
    details live in docs/."""
    with open(os.path.join(ROOT, "README.md")) as f:
        n = sum(1 for _ in f)
    assert n <= 350, f"README.md has {n} lines; move details to docs/"
