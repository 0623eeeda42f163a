"""The layout docs/architecture.md describes: what one run imports, no import circles, no
module over 450 lines, and docs/cli.md's flag table against TrainConfig's fields."""

import ast
import dataclasses
import os
import re
import subprocess
import sys

from resnet_cifar import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("resnet_cifar", "analysis", "experiments")
MAX_LINES = 450
MAX_RUN_MODULES = 12


def test_a_small_synthetic_run_imports_the_twelve_modules_the_architecture_page_names(tmp_path):
    code = ("import sys\nfrom resnet_cifar import train\n"
            f"sys.argv = ['train', '--model_dir={tmp_path / 'run'}', '--data_source=synthetic', "
            "'--train_epochs=1', '--steps_per_epoch=2', '--eval_steps=1', '--batch_size=8']\n"
            "try:\n    train.run()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'resnet_cifar')))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    imported = set(r.stdout.split("\n")[-2].split())
    assert len(imported) <= MAX_RUN_MODULES, sorted(imported)
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        page = f.read()
    named = page[page.index("A small synthetic run imports"):page.index("(`tests/test_architecture.py`")]
    listed = {"resnet_cifar" if m == "resnet_cifar" else f"resnet_cifar.{m}"
              for m in re.findall(r"`(\w+)`", named) if m != "__init__"}
    assert listed == imported


def project_modules():
    """module name -> path, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                out[module] = os.path.join(ROOT, package, name)
    return out


def imports_of(path, modules):
    """The project modules a file imports anywhere in it (at its top or inside a function)."""
    found = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                whole = f"{node.module}.{a.name}"
                found.add(whole if whole in modules else node.module)
    return found & set(modules)


def test_no_import_circle_and_no_module_over_450_lines():
    modules = project_modules()
    graph = {m: imports_of(p, modules) - {m} for m, p in modules.items()}
    # A package's __init__ is imported with each of its modules: not an arrow worth a circle.
    graph = {m: {d for d in deps if d not in PACKAGES} for m, deps in graph.items()}
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                circles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles
    long = {m: n for m, p in modules.items() if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert not long, long


def cli_table():
    """flag -> (default cell, meaning cell) of docs/cli.md's training flag table."""
    with open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8") as f:
        text = f.read()
    table = text[text.index("| flag | default | meaning |"):text.index("\n\n", text.index("| flag | default | meaning |"))]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()[2:]]
    return {row[0].strip("`").lstrip("-"): row[1:] for row in rows}


def test_the_cli_table_lists_every_setting_once_with_its_default():
    """Each TrainConfig field has its row (conv_l2 under its documented spelling, --noconv_l2),
    and nothing else is listed but --flag_noconv_l2; plain defaults read as the field's."""
    table = cli_table()
    fields = {f.name: f for f in dataclasses.fields(config_lib.TrainConfig)}
    spelled = {"conv_l2": "noconv_l2"}
    assert set(table) == {spelled.get(n, n) for n in fields} | {"flag_noconv_l2"}
    for name, field in fields.items():
        default, meaning = table[spelled.get(name, name)]
        assert meaning, name
        value = field.default
        if isinstance(value, bool) or value is None or value is dataclasses.MISSING:
            continue            # off / none / required / computed: worded in the table
        if isinstance(value, tuple):
            value = ",".join(f"{v:g}" for v in value)
        shown = default.strip("`").split(" ")[0]
        if isinstance(value, float):
            assert float(shown) == value, (name, default)
        else:
            assert shown == str(value), (name, default)


def test_every_setting_is_a_flag_with_the_fields_default_and_help():
    from resnet_cifar import train

    for field in dataclasses.fields(config_lib.TrainConfig):
        flag = train.FLAGS[field.name]
        assert field.metadata["help"] and flag.help.endswith(field.metadata["help"]), field.name   # enums: absl puts <a|b|c>: first
        if field.default is not dataclasses.MISSING and field.name != "jit_compile":
            want = field.default
            if isinstance(want, tuple):
                want = [f"{v:g}" for v in want]
            assert flag.default == want, field.name
