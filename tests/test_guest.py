"""A guest in anyone's process: nothing the backend changes outlives its calls, and every compiled
model keeps its own state (runtime and report), even next to another model of the same class."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from conftest import build
from era_compile import ERAConfig, last_report, make_era_backend, recompile_headroom, report_of
from era_compile.reference import EagerReference

# Run in a fresh interpreter: the snapshot before must be taken before era_compile is imported.
PROCESS_STATE = textwrap.dedent(r"""
    import gc, json, logging, sys, warnings
    import torch, transformers, torch.utils.flop_counter as flops
    from transformers import AttentionInterface, LlavaForConditionalGeneration
    from transformers.masking_utils import AttentionMaskInterface

    def loggers():
        named = dict(logging.Logger.manager.loggerDict, root=logging.getLogger())
        return {name: {"handlers": [id(h) for h in log.handlers], "filters": [id(f) for f in log.filters],
                       "level": log.level, "propagate": log.propagate, "disabled": log.disabled}
                for name, log in named.items() if isinstance(log, logging.Logger)}

    def setting(value):  # a set's repr follows its insertion order: a set restored by a patch may print otherwise
        return repr(sorted(map(repr, value)) if isinstance(value, (set, frozenset)) else value)

    def snapshot():
        return {
            "dynamo": {k: setting(v) for k, v in torch._dynamo.config.get_config_copy().items()},
            "inductor": {k: setting(v) for k, v in torch._inductor.config.get_config_copy().items()},
            "attention": {k: id(v) for k, v in AttentionInterface._global_mapping.items()},
            "masks": {k: id(v) for k, v in AttentionMaskInterface._global_mapping.items()},
            "flops": {str(k): id(v) for k, v in flops.flop_registry.items()},
            "loggers": loggers(),
            "warning_filters": repr(warnings.filters),
            "torch": [torch.get_default_dtype() is torch.float32, torch.is_grad_enabled(), torch.get_num_threads()],
        }

    torch.compile(lambda x: x + 1, backend="eager")(torch.ones(2))  # torch's own lazy set-up (its trace handler)
    torch._dynamo.reset()
    before = snapshot()
    import era_compile
    from era_compile import ERAConfig, make_era_backend, zoo

    # Inductor builds C++ for each graph: one decode step (its static graph) is enough there
    for strict, compiler, new_tokens in ((True, "eager", 3), (False, "inductor", 2)):
        model, inputs = zoo.build("llava")
        model.compile(backend=make_era_backend(ERAConfig(layer=1, strict=strict, compiler=compiler)))
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        assert era_compile.last_report().pruned_calls == 1
        torch._dynamo.reset()
    del model, inputs
    gc.collect()  # the compiled models are gone: so is whatever listened for them
    after = snapshot()
    changed = {}
    for part in before:
        if part == "loggers":  # a logger of our own may appear; no logger may gain a handler or filter
            old, new = before[part], after[part]
            diff = {n: (old.get(n), s) for n, s in new.items() if (n in old and old[n] != s)
                    or (n not in old and (s["handlers"] or s["filters"]))}
        else:
            old, new = before[part], after[part]
            diff = {k: (old.get(k) if isinstance(old, dict) else old, new.get(k) if isinstance(new, dict) else new)
                    for k in (set(old) | set(new) if isinstance(old, dict) else ["value"])
                    if (old.get(k) if isinstance(old, dict) else old) != (new.get(k) if isinstance(new, dict) else new)}
        if diff:
            changed[part] = diff
    print(json.dumps(changed, default=str))
""")


def test_nothing_outlives_the_calls():
    """Dynamo's and Inductor's settings, transformers' attention and mask registries, torch's flop
    registry, every logger's handlers, filters and level, the warning filters: the same after
    ``import era_compile`` and a strict and a non-strict compile + generate as before."""
    done = subprocess.run([sys.executable, "-c", PROCESS_STATE], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    changed = json.loads(done.stdout.strip().splitlines()[-1])
    assert changed == {}


def test_every_compiled_model_keeps_its_own_state():
    """Three models compiled with one backend object (what ``backend="era"`` is: one registered
    instance), generating alternately: a LLaVA, a Qwen2-VL, and a second LLaVA of the same class with
    other weights. Each report lists only its own calls, each model compiles its own graphs (Dynamo
    does not hand one model's graphs, which carry its runtime, to the other), and every output
    equals the eager reference, which is what each model compiled alone gives."""
    config = ERAConfig(layer=1, keep_ratio=0.25, compiler="eager", strict=True)
    greedy = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    models = [build("llava", seed=0), build("qwen2-vl", seed=1), build("llava", seed=2, batch=2)]  # seeded weights
    expected = [EagerReference(m, config).generate(**inputs, **greedy) for m, inputs in models]
    shared = make_era_backend(config)
    for model, _ in models:
        model.compile(backend=shared)
    with torch.no_grad(), recompile_headroom():  # every HF forward runs through one decorator: 3 models' entries
        for _ in range(2):  # a, b, c, a, b, c
            for (model, inputs), ref in zip(models, expected, strict=True):
                out = model.generate(**inputs, **greedy)
                assert torch.equal(out.sequences, ref.sequences)
                assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True)) <= 1e-4
                assert last_report() is report_of(model)
    reports = [report_of(model) for model, _ in models]
    assert len({id(r) for r in reports}) == 3 and shared.reports == reports
    for report, (_, inputs) in zip(reports, models, strict=True):
        assert report.pruned_calls == 2  # its own two prefills, nobody else's
        assert {p.seq_len_before for p in report.pruning} == {inputs["input_ids"].shape[1]}
    assert reports[0].graphs == reports[2].graphs > 0  # the second LLaVA compiled its own graphs
