"""The structure guard: short functions, thin front ends, and a training loop a learner can follow.

The code is read as a lesson as much as it is run, so its shape is held by a test like any other
behaviour: every function of the package at most 66 lines, each front-end script at most 160
(argparse and printing; the logic lives in the package), and `Trainer.run` with `train_step` at
most 80 lines together (what the loop reports about itself lives in training/progress.py).
Counted from the parsed source (`ast`): a function's lines run from its `def` to its last line,
docstring and comments included.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minigpt2"
SCRIPTS = ("train.py", "sample.py", "compare.py")
MAX_FUNCTION_LINES = 66
MAX_SCRIPT_LINES = 160
MAX_LOOP_LINES = 80  # Trainer.run + Trainer.train_step

# Functions allowed past the guard, each with its reason beside it: none.
KNOWN_LONG: set[tuple[str, str]] = set()


def functions(path: Path):
    """(qualified name, lines) of every function and method in `path`, nested ones included."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found.append((name, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "")
    return found


def too_long(paths):
    long = []
    for path in paths:
        where = path.relative_to(ROOT).as_posix()
        for name, lines in functions(path):
            if lines > MAX_FUNCTION_LINES and (where, name.split(".")[-1]) not in KNOWN_LONG:
                long.append(f"{where}: {name} is {lines} lines")
    return long


def test_every_package_function_is_at_most_66_lines():
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 30  # the whole package was walked
    assert too_long(paths) == []


def test_the_scripts_are_thin_front_ends():
    for script in SCRIPTS:
        lines = len((ROOT / script).read_text(encoding="utf-8").splitlines())
        assert lines <= MAX_SCRIPT_LINES, f"{script} is {lines} lines: move its logic into minigpt2/"
    assert too_long([ROOT / s for s in SCRIPTS]) == []


def test_the_training_loop_reads_in_80_lines():
    lines = dict(functions(PACKAGE / "training" / "trainer.py"))
    loop = lines["Trainer.run"] + lines["Trainer.train_step"]
    assert loop <= MAX_LOOP_LINES, f"Trainer.run + Trainer.train_step are {loop} lines"


def test_the_guard_sees_a_long_function(tmp_path):
    """The counting itself: a function one line over the limit is reported, one at it is not."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    ok, over = tmp_path / "ok.py", tmp_path / "over.py"
    ok.write_text(f"def f():\n{body}\n")
    over.write_text(f"class C:\n    def f(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n        y = 0\n")
    assert dict(functions(ok)) == {"f": MAX_FUNCTION_LINES}
    assert dict(functions(over)) == {"C.f": MAX_FUNCTION_LINES + 1}
