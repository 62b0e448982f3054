"""
A small mutation tester: plant one plausible single-line bug at a time in a module, run that module's
tests, and count the bugs the tests catch ("killed") and the ones they miss ("survived").

    python tests/tools/mutate.py tess2.py tests/test_tess2.py --max 40 --seed 0
    python tests/tools/mutate.py support/fused_loss.py tests/test_fused_loss.py --list   # the mutants only

It never touches the working tree: the tracked files are copied once into a temporary folder and
each mutant is written there, tested, and reverted. A mutant whose tests fail, error or run past
--timeout counts as killed. Not part of CI (a pass over one module takes minutes); the scores are
recorded in docs/mutation.md with the command that produced them.

Mutants come from the module's syntax tree, one operator at a time:
  comparisons  <  <=  >  >=  ==  !=  (each to its neighbour), `is` <-> `is not`, `in` <-> `not in`
  arithmetic   + <-> -, * <-> /, // -> /, ** -> *
  booleans     and <-> or, `not x` -> x, True <-> False
  numbers      n -> n + 1, 0.5 -> 0.25 style halving for floats, 1 <-> 0, -1 <-> 1
  calls        .any() <-> .all(), min <-> max, .amax <-> .amin, argmax <-> argmin
  subscripts   [:-1] -> [:], [1:] -> [:]
Docstrings and comments are never mutated; lines marked `# pragma: no mutate` are skipped.
"""
import argparse
import ast
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPARE = {ast.Lt: "<=", ast.LtE: "<", ast.Gt: ">=", ast.GtE: ">", ast.Eq: "!=", ast.NotEq: "==",
           ast.Is: "is not", ast.IsNot: "is", ast.In: "not in", ast.NotIn: "in"}
BINOP = {ast.Add: "-", ast.Sub: "+", ast.Mult: "/", ast.Div: "*", ast.FloorDiv: "/", ast.Pow: "*"}
SWAP_NAMES = {"any": "all", "all": "any", "min": "max", "max": "min", "amax": "amin", "amin": "amax",
              "argmax": "argmin", "argmin": "argmax", "minimum": "maximum", "maximum": "minimum"}


def docstring_lines(tree):
    """Line numbers of every docstring (module, class, function): never mutated."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.update(range(first.lineno, first.end_lineno + 1))
    return out


def operator_span(line: str, start: int, end: int, symbols):
    """The column of the first of `symbols` between columns start and end of one line, outside strings."""
    segment = line[start:end]
    for symbol in symbols:
        col = segment.find(symbol)
        if col >= 0:
            return start + col, start + col + len(symbol)
    return None


def mutants(source: str):
    """Every mutant of `source` as (line number, column start, column end, replacement, description)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    skip = docstring_lines(tree)
    found = []

    def add(node_line, col0, col1, new, what):
        if node_line in skip or "pragma: no mutate" in lines[node_line - 1]:
            return
        found.append((node_line, col0, col1, new, what))

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and node.lineno == node.end_lineno:
            left_end = node.left.end_col_offset
            for op, right in zip(node.ops, node.comparators):
                symbols = {ast.Lt: ["<"], ast.LtE: ["<="], ast.Gt: [">"], ast.GtE: [">="], ast.Eq: ["=="],
                           ast.NotEq: ["!="], ast.Is: ["is not", "is"], ast.IsNot: ["is not"],
                           ast.In: ["not in", "in"], ast.NotIn: ["not in"]}[type(op)]
                if type(op) is ast.Is:
                    symbols = ["is"]
                span = operator_span(lines[node.lineno - 1], left_end, right.col_offset, symbols)
                if span:
                    add(node.lineno, *span, COMPARE[type(op)], f"{lines[node.lineno - 1][span[0]:span[1]]} -> {COMPARE[type(op)]}")
                left_end = right.end_col_offset
        elif isinstance(node, ast.BinOp) and type(node.op) in BINOP and node.lineno == node.end_lineno:
            sym = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Pow: "**"}[type(node.op)]
            span = operator_span(lines[node.lineno - 1], node.left.end_col_offset, node.right.col_offset, [sym])
            if span:
                add(node.lineno, *span, BINOP[type(node.op)], f"{sym} -> {BINOP[type(node.op)]}")
        elif isinstance(node, ast.BoolOp) and node.lineno == node.end_lineno:
            sym, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
            span = operator_span(lines[node.lineno - 1], node.values[0].end_col_offset, node.values[1].col_offset, [sym])
            if span:
                add(node.lineno, *span, new, f"{sym} -> {new}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add(node.lineno, node.col_offset, node.operand.col_offset, "", "drop `not`")
        elif isinstance(node, ast.Constant) and node.lineno == node.end_lineno:
            value = node.value
            if isinstance(value, bool):
                new = repr(not value)
            elif isinstance(value, int):
                new = repr(value + 1) if value not in (0, 1) else repr(1 - value)
            elif isinstance(value, float) and value != 0:
                new = repr(value / 2)
            else:
                continue
            add(node.lineno, node.col_offset, node.end_col_offset, new, f"{value!r} -> {new}")
        elif isinstance(node, ast.Attribute) and node.attr in SWAP_NAMES and node.end_lineno == node.lineno:
            add(node.lineno, node.end_col_offset - len(node.attr), node.end_col_offset, SWAP_NAMES[node.attr],
                f".{node.attr} -> .{SWAP_NAMES[node.attr]}")
        elif isinstance(node, ast.Name) and node.id in ("min", "max"):
            add(node.lineno, node.col_offset, node.end_col_offset, SWAP_NAMES[node.id], f"{node.id} -> {SWAP_NAMES[node.id]}")
        elif isinstance(node, ast.Slice) and node.lineno == node.end_lineno:
            text = lines[node.lineno - 1][node.col_offset:node.end_col_offset]
            if text in (":-1", "1:"):
                add(node.lineno, node.col_offset, node.end_col_offset, ":", f"[{text}] -> [:]")
    # a unary minus constant (-1) is a UnaryOp(USub, 1): -1 -> 1
    for node in ast.walk(tree):
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
                and node.operand.value == 1 and node.lineno == node.end_lineno:
            add(node.lineno, node.col_offset, node.end_col_offset, "1", "-1 -> 1")
    return sorted(set(found))


def apply(source: str, mutant) -> str:
    line_no, col0, col1, new, _ = mutant
    lines = source.splitlines(keepends=True)
    line = lines[line_no - 1]
    lines[line_no - 1] = line[:col0] + new + line[col1:]
    return "".join(lines)


def copy_tree(dest: str):
    """The tracked files (and the untracked ones git does not ignore) of the repository, into dest."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def run_tests(work: str, tests, timeout: float) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                               *tests], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)"
    if done.returncode == 0:
        return "survived"
    return "killed" if done.returncode in (1, 2) else f"killed (pytest exit {done.returncode})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("module", help="the file to mutate, relative to the repository root (e.g. tess2.py)")
    p.add_argument("tests", nargs="+", help="the test files that should catch its bugs")
    p.add_argument("--max", type=int, default=0, help="test at most this many mutants, drawn with --seed (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per test run; past it the mutant counts as killed")
    p.add_argument("--list", action="store_true", help="print the mutants and stop")
    args = p.parse_args(argv)
    source = open(os.path.join(ROOT, args.module), encoding="utf-8").read()
    found = mutants(source)
    if args.max and len(found) > args.max:
        found = sorted(random.Random(args.seed).sample(found, args.max))
    if args.list:
        for m in found:
            print(f"{args.module}:{m[0]}:{m[1]}: {m[4]}")
        return 0
    with tempfile.TemporaryDirectory(prefix="mutate-") as work:
        copy_tree(work)
        target = os.path.join(work, args.module)
        if run_tests(work, args.tests, args.timeout) != "survived":
            print(f"the tests fail on the unmutated code: fix them first ({' '.join(args.tests)})", file=sys.stderr)
            return 2
        killed, survivors, t0 = 0, [], time.time()
        for i, m in enumerate(found, 1):
            with open(target, "w", encoding="utf-8") as f:
                f.write(apply(source, m))
            verdict = run_tests(work, args.tests, args.timeout)
            with open(target, "w", encoding="utf-8") as f:
                f.write(source)
            killed += verdict.startswith("killed")
            if verdict == "survived":
                survivors.append(m)
            print(f"[{i}/{len(found)}] {args.module}:{m[0]}:{m[1]}: {m[4]}: {verdict}", flush=True)
    total = len(found)
    print(f"\n{args.module}: {killed}/{total} mutants killed ({100 * killed / max(total, 1):.0f}%) by "
          f"{' '.join(args.tests)} in {time.time() - t0:.0f} s")
    lines = source.splitlines()
    for m in survivors:
        print(f"  survived {args.module}:{m[0]}:{m[1]}: {m[4]}    | {lines[m[0] - 1].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
