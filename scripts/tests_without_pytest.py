"""Run test files of this suite without pytest, for a machine that has none (a lent GPU's image may not).

    python scripts/tests_without_pytest.py tests/test_attention_op.py [--marks cuda gpu] [-k auto] [--collect-only]

A stand-in ``pytest`` module gives the test files what they use at import and inside a test:
``mark.parametrize`` (stacked, with ``ids``), ``mark.skipif``, any other ``mark.NAME``, ``skip``,
``raises`` (with ``match``), ``approx`` (scalars) and ``fixture``. Tests are named as pytest names
them (``file::test[id-id]``), so ``--collect-only`` lists what ``pytest -m ... -k ... --collect-only -q``
lists (scripts/gpu-check.sh compares the two). ``--marks``: tests with any of these marks;
``-k``: a plain substring of the test's name (not pytest's expressions). A test that asks for a
fixture is not run and is listed as such; conftest.py is not loaded, but its TRITON_INTERPRET
default is set. Exit status 1 when a test failed or none was selected.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import itertools
import math
import os
import re
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Skipped(Exception):
    """pytest.skip(reason), and a true skipif."""


class MarkDecorator:
    """``pytest.mark.NAME`` and ``pytest.mark.NAME(args)``: applied, it records itself on the function."""

    def __init__(self, name: str, args: tuple = (), kwargs: dict | None = None):
        self.name, self.args, self.kwargs = name, args, kwargs or {}

    def __call__(self, *args, **kwargs):
        configured = bool(self.args or self.kwargs)  # mark.NAME(...) applied to a function
        if configured or (len(args) == 1 and inspect.isfunction(args[0]) and not kwargs):
            fn = args[0]
            fn.__dict__.setdefault("stand_in_marks", []).append(self)  # innermost first, as pytest orders ids
            return fn
        return MarkDecorator(self.name, args, kwargs)


class MarkGenerator:
    def __getattr__(self, name: str) -> MarkDecorator:
        return MarkDecorator(name)


class RaisesContext:
    def __init__(self, expected, match: str | None):
        self.expected, self.match, self.value = expected, match, None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            raise AssertionError(f"DID NOT RAISE {self.expected}")
        if not issubclass(kind, self.expected):
            return False  # another exception: it propagates
        if self.match is not None and not re.search(self.match, str(value)):
            raise AssertionError(f"{str(value)!r} does not match {self.match!r}")
        self.value = value
        return True


class Approx:
    def __init__(self, expected: float, rel: float | None = None, abs: float | None = None):
        self.expected, self.rel, self.abs = expected, 1e-6 if rel is None else rel, 1e-12 if abs is None else abs

    def __eq__(self, actual) -> bool:
        return math.isclose(actual, self.expected, rel_tol=self.rel, abs_tol=self.abs)

    def __repr__(self) -> str:
        return f"approx({self.expected})"


def stand_in_pytest() -> types.ModuleType:
    module = types.ModuleType("pytest")
    module.mark = MarkGenerator()

    def skip(reason: str = "") -> None:
        raise Skipped(reason)

    def fixture(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    module.skip = skip
    module.fixture = fixture
    module.raises = lambda expected, match=None: RaisesContext(expected, match)
    module.approx = Approx
    return module


def _value_id(value, argname: str, index: int) -> str:
    """pytest's id for one parameter value without ``ids``: the value for plain scalars, else name+index."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return str(value)
    return f"{argname}{index}"


def expand(fn) -> list[tuple[str, dict]]:
    """(id, arguments) for every parametrisation of a test function; [("", {})] when it has none."""
    axes = []
    for mark in getattr(fn, "stand_in_marks", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], list(mark.args[1])
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        ids = mark.kwargs.get("ids")
        axis = []
        for i, value in enumerate(values):
            row = value if len(names) > 1 else (value,)
            label = str(ids[i]) if ids else "-".join(_value_id(v, n, i) for n, v in zip(names, row, strict=True))
            axis.append((label, dict(zip(names, row, strict=True))))
        axes.append(axis)
    cases = []
    for combo in itertools.product(*axes):
        cases.append(("-".join(label for label, _ in combo), {k: v for _, args in combo for k, v in args.items()}))
    return cases


def collect(paths: list[str], marks: list[str], substring: str | None) -> list[tuple[str, object, dict]]:
    """(pytest-style id, function, arguments) of every selected test in these files."""
    selected = []
    for path in paths:
        file = (ROOT / path).resolve()
        spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[file.stem] = module
        spec.loader.exec_module(module)
        for name, fn in vars(module).items():
            if not (name.startswith("test") and inspect.isfunction(fn)) or fn.__module__ != module.__name__:
                continue
            names = {m.name for m in getattr(fn, "stand_in_marks", [])}
            if marks and not names & set(marks):
                continue
            for label, args in expand(fn):
                test_id = f"{path}::{name}" + (f"[{label}]" if label else "")
                if substring is None or substring in test_id.split("::", 1)[1]:
                    selected.append((test_id, fn, args))
    return selected


def run(test_id: str, fn, args: dict) -> tuple[str, str]:
    """(outcome, detail): passed, skipped (reason), failed (traceback) or not run (a fixture it needs)."""
    for mark in getattr(fn, "stand_in_marks", []):
        if mark.name == "skipif" and mark.args and mark.args[0]:
            return "skipped", mark.kwargs.get("reason", "skipif")
    missing = [p for p in inspect.signature(fn).parameters if p not in args]
    if missing:
        return "not run", f"needs the fixture(s) {', '.join(missing)}"
    try:
        fn(**args)
    except Skipped as skip:
        return "skipped", str(skip)
    except Exception:
        return "failed", traceback.format_exc()
    return "passed", ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="test files, relative to the repository root")
    parser.add_argument("--marks", nargs="+", default=[], help="only tests with one of these marks")
    parser.add_argument("-k", dest="substring", help="only tests whose name holds this substring")
    parser.add_argument("--collect-only", action="store_true", help="list the selected tests; run none")
    args = parser.parse_args(argv)

    sys.modules["pytest"] = stand_in_pytest()  # before the test files import it
    sys.path.insert(0, str(ROOT / "tests"))  # what pytest's rootdir handling gives them (their helpers)
    import torch

    if not torch.cuda.is_available():  # as tests/conftest.py does: the Triton kernel through its interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")

    tests = collect(args.paths, args.marks, args.substring)
    if args.collect_only:
        print("\n".join(test_id for test_id, _, _ in tests))
        print(f"\n{len(tests)} tests collected (stand-in for pytest)")
        return 0 if tests else 1

    outcomes: dict[str, list[tuple[str, str]]] = {}
    start = time.perf_counter()
    for test_id, fn, fn_args in tests:
        outcome, detail = run(test_id, fn, fn_args)
        outcomes.setdefault(outcome, []).append((test_id, detail))
        if outcome == "failed":
            print(f"FAILED {test_id}\n{detail}", flush=True)
    reasons: dict[str, int] = {}
    for _, detail in outcomes.get("skipped", []) + outcomes.get("not run", []):
        reasons[detail] = reasons.get(detail, 0) + 1
    for reason, count in sorted(reasons.items()):
        print(f"SKIPPED [{count}] {reason}")
    for test_id, _ in outcomes.get("failed", []):
        print(f"FAILED {test_id}")
    counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(outcomes.items()))
    print(f"{counts or 'no tests ran'} in {time.perf_counter() - start:.1f}s (stand-in for pytest)")
    return 1 if outcomes.get("failed") or not tests else 0


if __name__ == "__main__":
    sys.exit(main())
