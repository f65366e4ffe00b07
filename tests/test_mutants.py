"""The mutation runner (tests/mutants/run.py) on a tiny fake repository: killed, survived and broken mutants."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent / "mutants" / "run.py"


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("mutants_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutants_run"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


CALC = "def add(a, b):\n    return a + b\n\n\ndef double(x):\n    return x * 2\n"
TESTS = textwrap.dedent("""
    import pytest
    from calc import add, double

    def test_add():
        assert add(2, 3) == 5

    @pytest.mark.slow
    def test_double():
        assert double(4) == 8
""")
MUTANTS = textwrap.dedent("""
    - {name: add-subtracts, file: calc.py, find: "a + b", replace: "a - b", tests: [tests/test_calc.py], why: w}
    - {name: double-untested, file: calc.py, find: "x * 2", replace: "x * 3", tests: [tests/test_calc.py], why: w}
    - {name: double-slow, file: calc.py, find: "x * 2", replace: "x * 3", tests: [tests/test_calc.py],
       why: w, slow: true}
    - {name: not-there, file: calc.py, find: "a * b", replace: "a / b", tests: [tests/test_calc.py], why: w}
    - {name: twice, file: calc.py, find: "return", replace: "yield", tests: [tests/test_calc.py], why: w}
    - {name: not-python, file: calc.py, find: "a + b", replace: "a +", tests: [tests/test_calc.py], why: w}
    - {name: no-such-test, file: calc.py, find: "a + b", replace: "a - b", tests: [tests/test_nope.py], why: w}
""")


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    (root / "tests" / "mutants").mkdir(parents=True)
    (root / "calc.py").write_text(CALC)
    (root / "tests" / "test_calc.py").write_text(TESTS)
    (root / "tests" / "mutants" / "fake.yaml").write_text(MUTANTS)
    (root / "pytest.ini").write_text("[pytest]\naddopts = -m 'not slow'\nmarkers = slow: slow\n")
    (root / ".gitignore").write_text("ignored.txt\n")
    (root / "ignored.txt").write_text("not copied")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "calc.py"], cwd=root, check=True)  # the rest untracked: copied all the same
    return root


def test_runner_classifies_mutants_and_restores_files(runner, repo, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert runner.main(["--root", str(repo), "--json", str(out)]) == 1  # some survive or are broken
    results = {r["name"]: r for r in json.loads(out.read_text())["mutants"]}
    status = {name: r["status"] for name, r in results.items()}
    assert status == {
        "add-subtracts": "killed",
        "double-untested": "survived",
        "double-slow": "killed",
        "not-there": "broken",
        "twice": "broken",
        "not-python": "broken",
        "no-such-test": "broken",
    }
    assert "test_add" in results["add-subtracts"]["detail"]
    assert results["not-there"]["detail"] == "find occurs 0 times in calc.py"
    assert results["twice"]["detail"] == "find occurs 2 times in calc.py"
    assert "not valid Python" in results["not-python"]["detail"]
    summary = json.loads(out.read_text())["summary"]
    assert (summary["mutants"], summary["killed"], summary["survived"], summary["broken"]) == (7, 2, 1, 4)
    printed = capsys.readouterr().out
    assert "killed 2/7 (29%)" in printed and "double-untested  survived" in printed
    assert (repo / "calc.py").read_text() == CALC  # the checkout itself is never touched


def test_runner_only_and_copy(runner, repo, tmp_path):
    assert runner.main(["--root", str(repo), "--only", "add-subtracts", "--only", "double-slow"]) == 0
    copy = runner.copy_repo(repo, tmp_path / "scratch")
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == [
        ".gitignore",
        "calc.py",
        "pytest.ini",
        "tests/mutants/fake.yaml",
        "tests/test_calc.py",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("- {name: a, file: f.py, find: x, replace: y, why: w}\n", "entry 1: missing keys ['tests']"),
        ("- {name: a, file: f.py, find: x, replace: x, tests: [t.py], why: w}\n", "replace equals find"),
        ("- {name: a, file: f.py, find: x, replace: y, tests: [t.py], why: w}\n" * 2, "mutant name 'a' already used"),
        ("name: a\n", "expected a list of mutants"),
        ("- [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_mutant_files_are_usage_errors(runner, repo, text, message, capsys):
    bad = repo / "tests" / "mutants" / "bad.yaml"
    bad.write_text(text)
    assert runner.main(["--root", str(repo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}") and message in err and len(err.splitlines()) == 1
    bad.unlink()
    assert runner.main(["--root", str(repo), "--only", "nosuch"]) == 2


def test_a_hanging_mutant_is_stopped_and_counts_as_killed(runner, repo, tmp_path):
    (repo / "tests" / "mutants" / "hang.yaml").write_text(
        '- {name: hangs, file: calc.py, find: "return a + b", replace: "while True: pass", '
        'tests: [tests/test_calc.py], why: an endless loop}\n'
    )
    out = tmp_path / "results.json"
    assert runner.main(["--root", str(repo), "--only", "hangs", "--timeout", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["mutants"][0]
    assert (result["status"], result["detail"]) == ("killed", "timed out after 3 s")


def test_every_listed_mutant_still_applies():
    """Each mutant of this repository finds its text exactly once (code changes move the text under a mutant; a
    mutant that no longer applies is reported broken only when `make mutants` runs, so check it here) and names
    tests that exist."""
    import yaml

    root = RUNNER.parents[2]
    names = set()
    for listing in sorted(RUNNER.parent.glob("*.yaml")):
        for m in yaml.safe_load(listing.read_text()):
            assert m["name"] not in names, m["name"]
            names.add(m["name"])
            assert (root / m["file"]).read_text().count(m["find"]) == 1, (listing.name, m["name"])
            for test in m["tests"]:
                assert (root / test.split("::")[0]).is_file(), (m["name"], test)
    assert len(names) > 90


def test_changed_runs_only_the_mutants_of_changed_files(runner, repo, tmp_path, capsys):
    (repo / "other.py").write_text("def half(x):\n    return x / 2\n")
    (repo / "tests" / "test_other.py").write_text(
        "from other import half\n\ndef test_half():\n    assert half(4) == 2\n"
    )
    (repo / "tests" / "mutants" / "other.yaml").write_text(
        "- {name: half-doubles, file: other.py, find: 'x / 2', replace: 'x * 2', tests: [tests/test_other.py], "
        "why: w}\n"
    )
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"], cwd=repo, check=True)
    assert runner.main(["--root", str(repo), "--changed", "HEAD"]) == 0  # nothing changed: nothing to run
    assert "no mutant's file or tests changed since HEAD" in capsys.readouterr().out
    (repo / "other.py").write_text("def half(x):\n    # halves\n    return x / 2\n")
    out = tmp_path / "changed.json"
    assert runner.main(["--root", str(repo), "--changed", "HEAD", "--json", str(out)]) == 0
    assert [r["name"] for r in json.loads(out.read_text())["mutants"]] == ["half-doubles"]
    (repo / "tests" / "test_calc.py").write_text(TESTS + "\n")  # a changed test file selects its mutants too
    assert runner.main(["--root", str(repo), "--changed", "HEAD", "--json", str(out)]) == 1  # calc's are mixed
    assert len(json.loads(out.read_text())["mutants"]) == 7  # every calc.py mutant naming test_calc.py
    assert runner.main(["--root", str(repo), "--changed", "no-such-rev"]) == 2
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)  # back to the commit
    with open(repo / "tests" / "mutants" / "other.yaml", "a") as f:  # a new mutant of an unchanged file runs
        f.write(
            "- {name: half-thirds, file: other.py, find: 'x / 2', replace: 'x / 3', tests: [tests/test_other.py], "
            "why: w}\n"
        )
    assert runner.main(["--root", str(repo), "--changed", "HEAD", "--json", str(out)]) == 0
    assert [r["name"] for r in json.loads(out.read_text())["mutants"]] == ["half-thirds"]
