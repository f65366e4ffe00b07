"""`make mutants`: plant each listed bug in a scratch copy of the repository and check that its tests catch it.

Mutants are listed in tests/mutants/*.yaml, each entry a mapping:
    name: short-kebab-name                 # unique over all files
    file: mellama_jax/model/layers.py      # path from the repository root
    find: "text that occurs exactly once in the file"
    replace: "the planted bug"
    tests: [tests/test_parity.py]          # test files (or pytest node ids) that must fail with the bug in place
    why: one line: the realistic bug this stands for
    slow: true                             # optional: the tests are marked slow, so run them with -m ''
The repository's files (tracked and untracked-but-not-ignored, as git lists them) are copied once to a temporary
directory; for each mutant the file is edited there, `python -m pytest -q -x -p no:cacheprovider <tests>` runs
with PYTHONPATH at the copy, and the file is restored. A mutant is killed when pytest reports failures (exit 1)
or cannot collect the tests it imports (exit 2) or hangs past --timeout (both said in the table), survives when
the tests pass (skipped tests pass: a mutant whose tests skip survives, visibly), and is broken
when it cannot be applied: `find` missing or not unique, the edit is not valid Python, or no named test ran.
The copy sits next to a link to the checkout's sibling `shared/`, so tests that read ../shared/data run there as
they do in the checkout (instead of skipping, which would let a mutant survive unseen).

This lives with the mutant lists, not in the package: it is a development tool that tests the tests.
Usage: python tests/mutants/run.py [--only NAME ...] [--changed REV] [--json FILE] [--baseline] [--timeout S]
--changed REV runs only the mutants whose file, or one of whose test files, differs from commit REV (committed,
staged, unstaged or untracked), and those listed or edited since REV: `make mutants MUTANTS_ARGS="--changed
origin/main"` before a submission.
Exit status: 0 every mutant killed; 1 some survived or are broken; 2 bad arguments or a bad mutant file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ("name", "file", "find", "replace", "tests", "why")
OPTIONAL = ("slow",)


class MutantFileError(ValueError):
    """A mutant list that cannot be used; the message names the file and the entry."""


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    why: str
    slow: bool = False
    source: str = ""  # the YAML file it came from


@dataclasses.dataclass
class Result:
    name: str
    status: str  # killed | survived | broken
    seconds: float
    detail: str  # the first failing test, or why the mutant is broken
    source: str = ""


def _entry(raw, where: str) -> Mutant:
    if not isinstance(raw, dict):
        raise MutantFileError(f"{where}: expected a mapping with keys {list(REQUIRED)}, got {raw!r}")
    missing = [k for k in REQUIRED if k not in raw]
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        raise MutantFileError(f"{where}: missing keys {missing}" if missing else f"{where}: unknown keys {unknown}")
    tests = raw["tests"]
    if isinstance(tests, str):
        tests = [tests]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t for t in tests):
        raise MutantFileError(f"{where}: tests must be a non-empty list of test files, got {raw['tests']!r}")
    for key in ("name", "file", "find", "replace", "why"):
        if not isinstance(raw[key], str) or (key != "replace" and not raw[key]):
            raise MutantFileError(f"{where}: {key} must be a non-empty string, got {raw[key]!r}")
    if raw["find"] == raw["replace"]:
        raise MutantFileError(f"{where}: replace equals find (no mutation)")
    return Mutant(
        raw["name"],
        raw["file"],
        raw["find"],
        raw["replace"],
        tuple(tests),
        raw["why"],
        bool(raw.get("slow", False)),
        where.split(":")[0],
    )


def load_mutants(paths: list[Path]) -> list[Mutant]:
    """Every entry of the given YAML lists, checked for shape and for unique names."""
    mutants, seen = [], {}
    for path in paths:
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise MutantFileError(f"{path}: invalid YAML{where} ({getattr(e, 'problem', None) or e})") from None
        if data is None:
            continue
        if not isinstance(data, list):
            raise MutantFileError(f"{path}: expected a list of mutants, got {type(data).__name__}")
        for i, raw in enumerate(data):
            m = _entry(raw, f"{path}: entry {i + 1}")
            if m.name in seen:
                raise MutantFileError(f"{path}: mutant name {m.name!r} already used in {seen[m.name]}")
            seen[m.name] = path
            mutants.append(m)
    return mutants


def repo_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f]


def copy_repo(root: Path, scratch: Path) -> Path:
    """The repository's files copied to scratch/<name>, with scratch/shared linked to the checkout's sibling."""
    dest = scratch / root.name
    for rel in repo_files(root):
        src = root / rel
        if src.is_file():  # deleted-but-tracked files and submodule directories are skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shared = root.parent / "shared"
    if shared.exists():
        (scratch / "shared").symlink_to(shared.resolve())
    return dest


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:160]
    tail = [line for line in output.splitlines() if line.strip()]
    return tail[-1][:160] if tail else ""


def run_tests(copy: Path, tests: tuple[str, ...], slow: bool, timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    if slow:
        cmd[4:4] = ["-m", ""]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONDONTWRITEBYTECODE="1",
    )
    # its own process group, so that a timeout also ends the processes the tests started (training CLIs)
    proc = subprocess.Popen(
        cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return -1, f"timed out after {timeout:.0f} s"
    return proc.returncode, output


def _broken_reason(m: Mutant, copy: Path, text: str) -> str:
    count = text.count(m.find)
    if count != 1:
        return f"find occurs {count} times in {m.file}"
    absent = [t for t in m.tests if not (copy / t.split("::")[0]).exists()]
    if absent:
        return f"no such test file {absent[0]}"
    if m.file.endswith(".py"):
        try:
            compile(text.replace(m.find, m.replace), m.file, "exec")
        except SyntaxError as e:
            return f"the mutated file is not valid Python ({e.msg}, line {e.lineno})"
    return ""


def run_mutant(m: Mutant, copy: Path, timeout: float) -> Result:
    start = time.perf_counter()
    path = copy / m.file
    if not path.is_file():
        return Result(m.name, "broken", 0.0, f"no such file {m.file}", m.source)
    original = path.read_bytes()
    reason = _broken_reason(m, copy, original.decode())
    if reason:
        return Result(m.name, "broken", 0.0, reason, m.source)
    path.write_bytes(original.decode().replace(m.find, m.replace).encode())
    try:
        code, output = run_tests(copy, m.tests, m.slow, timeout)
    finally:
        path.write_bytes(original)
    seconds = time.perf_counter() - start
    if code == 0:
        status, detail = "survived", "the named tests pass with the bug in place"
    elif code == 1:
        status, detail = "killed", _first_failure(output)
    elif code == 2:
        status, detail = "killed", "collection error: " + _first_failure(output)
    elif code == -1:
        status, detail = "killed", output
    elif code == 5:
        status, detail = "broken", "no tests ran (deselected, or a wrong node id)"
    else:
        status, detail = "broken", f"pytest exit {code}: {_first_failure(output)}"
    return Result(m.name, status, seconds, detail, m.source)


def table(results: list[Result]) -> str:
    width = max([len(r.name) for r in results] + [6])
    lines = [f"{'mutant':<{width}}  {'status':<8}  {'seconds':>7}  detail"]
    lines += [f"{r.name:<{width}}  {r.status:<8}  {r.seconds:7.1f}  {r.detail}" for r in results]
    return "\n".join(lines)


def summary(results: list[Result], seconds: float) -> dict:
    killed = sum(r.status == "killed" for r in results)
    return {
        "mutants": len(results),
        "killed": killed,
        "survived": sum(r.status == "survived" for r in results),
        "broken": sum(r.status == "broken" for r in results),
        "kill_rate": killed / len(results) if results else 1.0,
        "seconds": round(seconds, 1),
    }


def write_json(path: Path, results: list[Result], totals: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"summary": totals, "mutants": [dataclasses.asdict(r) for r in results]}, indent=1))
    tmp.replace(path)


def baseline(mutants: list[Mutant], copy: Path, timeout: float) -> str:
    """'' when every named test passes on the unmutated copy, else the first failure."""
    for slow in (False, True):
        tests = sorted({t for m in mutants if m.slow == slow for t in m.tests})
        if tests:
            code, output = run_tests(copy, tuple(tests), slow, timeout)
            if code != 0:
                return _first_failure(output)
    return ""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=REPO, help="repository root (default: this checkout)")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this mutant (repeatable)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per mutant's test run (a timeout kills it)")
    p.add_argument("--baseline", action="store_true", help="first check that the named tests pass unmutated")
    p.add_argument("--changed", metavar="REV", help="only mutants of files (or test files) changed since commit REV")
    return p.parse_args(argv)


def changed_files(root: Path, rev: str) -> set[str]:
    """Paths that differ from `rev` in the work tree, and untracked files; a bad revision is a MutantFileError."""

    def git(*args):
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        if done.returncode:
            raise MutantFileError(f"--changed {rev}: {done.stderr.strip() or 'git failed'}")
        return set(done.stdout.split())

    return git("diff", "--name-only", "--relative", rev, "--") | git("ls-files", "--others", "--exclude-standard")


def listed_before(root: Path, rev: str) -> dict[str, dict]:
    """The mutant entries as the lists at `rev` had them, by name (a list that did not exist then: none)."""
    entries = {}
    for path in sorted((root / "tests" / "mutants").glob("*.yaml")):
        shown = subprocess.run(
            ["git", "show", f"{rev}:./{path.relative_to(root)}"], cwd=root, capture_output=True, text=True
        )
        for raw in (yaml.safe_load(shown.stdout) or []) if shown.returncode == 0 else []:
            if isinstance(raw, dict) and "name" in raw:
                entries[raw["name"]] = raw
    return entries


def touched(m: Mutant, changed: set[str], before: dict[str, dict]) -> bool:
    """The mutant's file or one of its test files changed, or the mutant itself is new or edited."""
    old = before.get(m.name)
    edited = old is None or any(
        old.get(k) != (list(v) if isinstance(v, tuple) else v)
        for k, v in (("file", m.file), ("find", m.find), ("replace", m.replace), ("tests", m.tests))
    )
    return edited or m.file in changed or any(t.split("::")[0] in changed for t in m.tests)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = args.root.resolve()
    try:
        mutants = load_mutants(sorted((root / "tests" / "mutants").glob("*.yaml")))
    except (MutantFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.only) - {m.name for m in mutants})
    if unknown:
        print(f"error: --only {unknown[0]}: no such mutant in {root / 'tests' / 'mutants'}/*.yaml", file=sys.stderr)
        return 2
    mutants = [m for m in mutants if not args.only or m.name in args.only]
    if args.changed:
        try:
            changed = changed_files(root, args.changed)
        except MutantFileError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        before = listed_before(root, args.changed)
        mutants = [m for m in mutants if touched(m, changed, before)]
        if not mutants:
            print(f"no mutant's file or tests changed since {args.changed}")
            return 0
    if not mutants:
        print(f"error: no mutants listed in {root / 'tests' / 'mutants'}/*.yaml", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        copy = copy_repo(root, Path(scratch))
        if args.baseline:
            failure = baseline(mutants, copy, args.timeout)
            if failure:
                print(f"error: the named tests fail without any mutant: {failure}", file=sys.stderr)
                return 2
        results = []
        for m in mutants:
            results.append(run_mutant(m, copy, args.timeout))
            r = results[-1]
            print(f"[{len(results)}/{len(mutants)}] {r.name}: {r.status} ({r.seconds:.1f} s)", flush=True)
    totals = summary(results, time.perf_counter() - start)
    print(table(results))
    print(
        f"killed {totals['killed']}/{totals['mutants']} ({100 * totals['kill_rate']:.0f}%), "
        f"{totals['survived']} survived, {totals['broken']} broken, in {totals['seconds']:.0f} s"
    )
    if args.json:
        write_json(args.json, results, totals)
    return 0 if totals["killed"] == totals["mutants"] else 1


if __name__ == "__main__":
    sys.exit(main())
