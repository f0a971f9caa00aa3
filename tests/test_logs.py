"""What the backend did, where PyTorch users look: ``TORCH_LOGS``, the ``era_graphs`` artifact,
``TORCH_TRACE`` (tlparse), and ``ERA_COMPILE_DUMP`` as sugar over the same writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

COMPILE_LLAVA = textwrap.dedent("""
    import torch
    from era_compile import ERAConfig, make_era_backend, zoo
    model, inputs = zoo.build("llava")
    with torch.no_grad():
        torch.compile(model, backend=make_era_backend(ERAConfig(compiler="eager", layer=1, strict=True)))(**inputs)
""")
PIPELINE = ("normalize", "classify", "span", "layers", "kvcache", "prune", "attention", "publish")


def _run(env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_LLAVA], capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_torch_logs_shows_each_pass_and_its_graphs(tmp_path):
    """One run, the three sinks of the one writer: ``TORCH_LOGS="+era_compile"`` gives a line per pass
    of the pruned graph (what it counted, its time) and every changed graph before and after;
    ``TORCH_TRACE`` gives each pass's graph, for tlparse, under the Dynamo frame it came from;
    ``ERA_COMPILE_DUMP`` the same texts as numbered files."""
    trace, dump = tmp_path / "trace", tmp_path / "dump"
    logged = _run({"TORCH_LOGS": "+era_compile", "TORCH_TRACE": str(trace), "ERA_COMPILE_DUMP": str(dump)}).stderr
    prefill = [line for line in logged.splitlines() if "passes/manager.py" in line and "graph" in line]
    for name in PIPELINE:
        assert any(f": {name} " in line for line in prefill), name
    assert "prune " in logged and "gathered_tensors=" in logged
    assert "04_prune_after:" in logged and "# inserted by prune:" in logged  # the artifact, at DEBUG
    records = [
        json.loads(line.split("] ", 1)[1])
        for f in trace.iterdir()
        for line in f.read_text().splitlines()
        if line.startswith("V") and '"artifact"' in line
    ]
    names = {r["artifact"]["name"]: r for r in records if r["artifact"]["name"].startswith("era_")}
    prune = next(r for name, r in names.items() if name.endswith("_04_prune_after"))
    assert "frame_id" in prune and any(name.endswith("_compiled") for name in names)
    (folder,) = [p for p in dump.iterdir() if (p / "compiled.py").exists()]
    assert (folder / "04_prune_after.py").read_text().startswith("# inserted by")
    assert (folder / "dynamo.py").exists()


def test_info_lines_without_graphs_then_the_artifact_alone():
    """At INFO (``set_logs(modules={"era_compile": logging.INFO})``, as ``TORCH_LOGS="era_compile"``):
    what each pass did, no graphs. Then, in the same process, ``set_logs(modules={"era_graphs": True})``:
    only the graphs. (A process of its own: ``set_logs`` hands our logger to torch's handlers for good.)"""
    both = (
        "import logging, sys, torch, era_compile\n"
        "torch._logging.set_logs(modules={'era_compile': logging.INFO})\n"
        + COMPILE_LLAVA
        + textwrap.dedent("""
        print("=== artifact alone", file=sys.stderr, flush=True)
        torch._logging.set_logs(modules={"era_graphs": True})
        model, inputs = zoo.build("llava", seed=1)
        with torch.no_grad():
            torch.compile(model, backend=make_era_backend(ERAConfig(compiler="eager", layer=1, strict=True)))(**inputs)
    """)
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}  # the variable would overrule set_logs
    done = subprocess.run([sys.executable, "-c", both], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    info, artifact = done.stderr.split("=== artifact alone")
    assert ": prune " in info and "# inserted by" not in info
    assert "04_prune_after:" in artifact and ": prune " not in artifact  # the graphs, not the pass lines
