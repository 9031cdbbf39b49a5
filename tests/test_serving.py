"""The OpenAI-compatible server (`elastic_mdm.serving`) against a live uvicorn on 127.0.0.1, through the real
`openai` client and raw HTTP: completions and chat, streamed and not, `n > 1`, infilling, seeds, 16 concurrent
clients, disconnects, a full queue, deadlines, auth and bad input."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers import BOS, save_checkpoint, word_tokenizer

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w0{% endif %}"
)
KEY = "secret-key"
TIMEOUT = 30.0  # every request of this module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`elastic-mdm serve` in a thread of this process (uvicorn), stopped by the fixture's finalizer."""

    def __init__(self, checkpoint: Path, *flags: str) -> None:
        from elastic_mdm.commands.serve import build_app, serve_parser

        self.port = free_port()
        args = serve_parser().parse_args([str(checkpoint), "--port", str(self.port), "--device", "cpu", *flags])
        self.app = build_app(args)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()

    def healthy(self) -> bool:
        return httpx.get(self.url + "/health", timeout=TIMEOUT).json()["status"] == "ok"

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=TIMEOUT).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-elastic")
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(checkpoint):
    live = LiveServer(checkpoint, "--api_key", KEY, "--max_running", "32", "--max_batch_tokens", "4096")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


def post(server, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers, timeout=TIMEOUT, **kwargs)


def direct(checkpoint: Path, prompt: str, seed: int, max_tokens: int, num_steps: int) -> str:
    """What `generate()` samples for the same prompt, seed and caps."""
    from elastic_mdm import ElasticMDMForDiffusionLM

    model = ElasticMDMForDiffusionLM.from_pretrained(checkpoint).eval()
    tokenizer = word_tokenizer()
    ids = [BOS, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    out = model.generate([ids], seed=seed, max_new_tokens=max_tokens, num_steps=num_steps, return_dict_in_generate=True)
    sequence = out.sequences[0, : int(out.lengths[0])].tolist()
    return tokenizer.decode(sequence[len(ids) : len(sequence) - (sequence[-1] == model.config.eos_token_id)])


def test_completion_is_generate_with_the_same_seed(server, client, checkpoint) -> None:
    out = client.completions.create(
        model="tiny-elastic", prompt="w5 w6", max_tokens=6, seed=3, extra_body={"num_steps": 5}
    )
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].text == direct(checkpoint, "w5 w6", 3, 6, 5)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.prompt_tokens == 3  # BOS w5 w6
    assert out.usage.completion_tokens == len(out.choices[0].text.split())
    again = client.completions.create(
        model="tiny-elastic", prompt="w5 w6", max_tokens=6, seed=3, extra_body={"num_steps": 5}
    )
    assert again.choices[0].text == out.choices[0].text


def test_n_choices_and_a_list_of_prompts_carry_their_index(client) -> None:
    out = client.completions.create(
        model="tiny-elastic", prompt=["w5", "w7 w8"], n=3, max_tokens=4, seed=1, extra_body={"num_steps": 4}
    )
    assert [c.index for c in out.choices] == list(range(6))
    assert all(len(c.text.split()) <= 4 for c in out.choices)


def test_streamed_completion_with_drafts(client) -> None:
    stream = client.completions.create(
        model="tiny-elastic",
        prompt="w5",
        max_tokens=8,
        seed=2,
        n=2,
        stream=True,
        stream_options={"include_usage": True, "include_drafts": True},
        extra_body={"num_steps": 6},
    )
    chunks = list(stream)
    drafts = {0: [], 1: []}
    final = {}
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.finish_reason is None:
                assert choice.text == ""  # a standard client only accumulates the final text
                drafts[choice.index].append(choice.model_extra["draft"])
            else:
                final[choice.index] = choice.text
    assert set(final) == {0, 1} and chunks[-1].usage.completion_tokens == sum(len(t.split()) for t in final.values())
    for index in (0, 1):
        assert 1 <= len(drafts[index]) <= 7 and drafts[index][-1] == final[index]  # the last draft is the sample
        lengths = [len(d.split()) for d in drafts[index]]
        assert lengths == sorted(lengths)  # a draft only grows
    plain = client.completions.create(
        model="tiny-elastic", prompt="w5", max_tokens=8, seed=2, n=2, extra_body={"num_steps": 6}
    )
    assert [c.text for c in plain.choices] == [final[0], final[1]]  # drafts change no draw


def test_suffix_infills_between_prompt_and_suffix(client, server) -> None:
    out = client.completions.create(
        model="tiny-elastic",
        prompt="w5",
        suffix="w9",
        max_tokens=5,
        seed=0,
        extra_body={"num_steps": 4, "stream_options": None},
    )
    text = out.choices[0].text
    assert len(text.split()) <= 5
    stream = post(
        server,
        "/v1/completions",
        {
            "prompt": "w5",
            "suffix": "w9",
            "max_tokens": 5,
            "seed": 0,
            "num_steps": 4,
            "stream": True,
            "stream_options": {"include_drafts": True},
        },
    )
    events = [json.loads(line[5:]) for line in stream.text.splitlines() if line.startswith("data:") and "{" in line]
    assert events[-2]["choices"][0]["draft"] == text == events[-1]["choices"][0]["text"]


def test_chat_streamed_and_not(client) -> None:
    messages = [{"role": "user", "content": "w5 w6"}]
    out = client.chat.completions.create(
        model="tiny-elastic", messages=messages, max_tokens=5, seed=4, extra_body={"num_steps": 4}
    )
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="tiny-elastic", messages=messages, max_tokens=5, seed=4, stream=True, extra_body={"num_steps": 4}
        )
        if chunk.choices
    )
    assert text == out.choices[0].message.content


def test_sixteen_concurrent_clients_each_get_their_own_answer(client, server) -> None:
    """Distinct prompts and seeds; each answer equals the one its request gets alone (per-request generators)."""
    requests = [(f"w{10 + i} w{30 + i}", 100 + i) for i in range(16)]

    def ask(request: tuple[str, int]) -> str:
        prompt, seed = request
        out = client.completions.create(
            model="tiny-elastic", prompt=prompt, seed=seed, max_tokens=6, extra_body={"num_steps": 8}
        )
        return out.choices[0].text

    alone = [ask(r) for r in requests]
    passes = server.metric("elastic_mdm_passes_total")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone and len(set(together)) > 8
    assert server.metric("elastic_mdm_passes_total") - passes < 16 * 9  # they shared passes


def test_models_health_metrics_and_auth(server) -> None:
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT).json()
    assert [m["id"] for m in models["data"]] == ["tiny-elastic"]
    assert server.healthy()
    metrics = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    for name in ("queue_depth", "running_sequences", "passes_total", "generated_tokens_per_second", "step_seconds"):
        assert f"elastic_mdm_{name}" in metrics
    for key in (None, "wrong"):
        response = post(server, "/v1/completions", {"prompt": "w5"}, key=key)
        assert response.status_code == 401 and "Bearer" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ("{not json", 400, None),
        ([1, 2], 400, None),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": "w5", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "w5", "max_tokens": 10**9}, 400, "max_tokens"),
        ({"prompt": "w5", "max_tokens": "8"}, 400, "max_tokens"),
        ({"prompt": "w5", "n": 10**6}, 400, "n"),
        ({"prompt": "w5", "temperature": True}, 400, "temperature"),
        ({"prompt": "w5", "logprobs": 2}, 400, "logprobs"),
        ({"prompt": "w5", "best_of": 3}, 400, "best_of"),
        ({"prompt": "w5", "echo": True}, 400, "echo"),
        ({"prompt": "w5", "presence_penalty": 0.5}, 400, "presence_penalty"),
        ({"prompt": "w5", "frobnicate": 1}, 400, "frobnicate"),
        ({"prompt": "w5", "schedule": "nope"}, 400, "schedule"),
        ({"prompt": "w5", "stream_options": {"include_drafts": True}}, 400, "stream_options"),
        ({"prompt": "w5", "model": "gpt-4"}, 404, "model"),
        ({"prompt": " ".join(["w5"] * 70)}, 400, "prompt"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(server, body, status, param) -> None:
    response = post(server, "/v1/completions", body)
    assert response.status_code == status and response.json()["error"]["message"]
    assert response.json()["error"]["param"] == param
    assert server.healthy()


def test_a_request_the_sampler_refuses_fails_alone(server, client, monkeypatch) -> None:
    """An error while a request joins the batch answers that request (400) and the server runs on."""
    engine = server.app.state.engine
    plain_add = engine.stepper.add

    def refuse_once(*args, **kwargs):
        monkeypatch.setattr(engine.stepper, "add", plain_add)
        raise ValueError("refused for the test")

    monkeypatch.setattr(engine.stepper, "add", refuse_once)
    response = post(server, "/v1/completions", {"prompt": "w5", "max_tokens": 3, "num_steps": 2})
    assert response.status_code == 400 and response.json()["error"]["message"] == "refused for the test"
    assert server.healthy() and client.completions.create(model="tiny-elastic", prompt="w5", max_tokens=3).choices


def test_neutral_values_of_refused_fields_are_accepted(client) -> None:
    out = client.completions.create(
        model="tiny-elastic",
        prompt="w5",
        max_tokens=3,
        echo=False,
        best_of=1,
        presence_penalty=0,
        frequency_penalty=0.0,
        extra_body={"num_steps": 2},
    )
    assert len(out.choices) == 1


def test_stop_cuts_the_text(client) -> None:
    out = client.completions.create(
        model="tiny-elastic", prompt="w5", max_tokens=12, seed=5, extra_body={"num_steps": 6}
    )
    words = out.choices[0].text.split()
    if len(words) >= 2:
        cut = client.completions.create(
            model="tiny-elastic", prompt="w5", max_tokens=12, seed=5, stop=[words[1]], extra_body={"num_steps": 6}
        )
        assert cut.choices[0].text == out.choices[0].text[: out.choices[0].text.find(words[1])]
        assert cut.choices[0].finish_reason == "stop"


def test_chat_without_a_template_is_a_400(checkpoint, tmp_path) -> None:
    save_checkpoint(tmp_path / "plain")
    live = LiveServer(tmp_path / "plain")
    try:
        response = post(live, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}]}, key=None)
        assert response.status_code == 400 and "chat template" in response.json()["error"]["message"]
        assert live.healthy()
    finally:
        live.stop()


@pytest.fixture(scope="module")
def small_server(checkpoint):
    """One running sequence, one waiting request: the queue and deadline tests."""
    live = LiveServer(checkpoint, "--max_running", "1", "--max_queue", "1", "--max_num_steps", "100000")
    yield live
    live.stop()


LONG = {"prompt": "w5", "max_tokens": 8, "num_steps": 60000, "stream": True}
LONG_DRAFTS = {**LONG, "stream_options": {"include_drafts": True}}


def test_disconnect_mid_stream_retires_the_request(small_server) -> None:
    cancelled = small_server.metric('elastic_mdm_requests_total{outcome="cancelled"}')
    with httpx.stream("POST", small_server.url + "/v1/completions", json=LONG_DRAFTS, timeout=TIMEOUT) as response:
        for line in response.iter_lines():
            if "draft" in line:
                break
    deadline = time.monotonic() + 10
    while small_server.metric('elastic_mdm_requests_total{outcome="cancelled"}') == cancelled:
        assert time.monotonic() < deadline, "the disconnected request kept running"
        time.sleep(0.05)
    assert small_server.metric("elastic_mdm_running_sequences") == 0 and small_server.healthy()


def test_full_queue_is_a_429_with_retry_after_and_a_deadline_a_504(small_server) -> None:
    with httpx.stream("POST", small_server.url + "/v1/completions", json=LONG_DRAFTS, timeout=TIMEOUT) as running:
        lines = running.iter_lines()  # held: a dropped iterator closes the response (a disconnect)
        next(line for line in lines if "draft" in line)  # it runs
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                post, small_server, "/v1/completions", {"prompt": "w5", "max_tokens": 3, "timeout": 2.0}, None
            )
            deadline = time.monotonic() + 10
            while small_server.metric("elastic_mdm_queue_depth") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            full = post(small_server, "/v1/completions", {"prompt": "w5", "max_tokens": 3}, None)
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            late = waiting.result(timeout=TIMEOUT)  # waited in the queue past its 2 s deadline
            assert late.status_code == 504 and "deadline" in late.json()["error"]["message"]
    running_late = post(small_server, "/v1/completions", {**LONG, "stream": False, "timeout": 0.5}, None)
    assert running_late.status_code == 504 and small_server.healthy()
    assert small_server.metric("elastic_mdm_queue_depth") == 0


def test_the_remote_code_root_never_imports_the_server() -> None:
    """The package root is what a checkpoint ships as remote code: none of its modules imports the serving
    subpackage or its web stack."""
    import ast

    import elastic_mdm

    banned = ("fastapi", "uvicorn", "sse_starlette", "prometheus_client", "openai", "httpx")
    for path in Path(elastic_mdm.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.lstrip(".").startswith(("serving", *banned)), f"{path.name} imports {name}"


def test_a_client_leaving_mid_batch_changes_no_other_answer(server, client) -> None:
    """A streamed request that disconnects while another runs next to it leaves before the next step; the other
    answer is the one it gets alone."""

    def short() -> str:
        out = client.completions.create(
            model="tiny-elastic", prompt="w7", seed=11, max_tokens=8, extra_body={"num_steps": 1500}
        )
        return out.choices[0].text

    alone = short()
    cancelled = server.metric('elastic_mdm_requests_total{outcome="cancelled"}')
    headers = {"Authorization": f"Bearer {KEY}"}
    long = {**LONG_DRAFTS, "num_steps": 4000}  # this server's --max_num_steps is 4096
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", server.url + "/v1/completions", json=long, headers=headers, timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            next(line for line in lines if "draft" in line)
            beside = pool.submit(short)
            time.sleep(0.3)  # the short request runs next to the long one when the long one leaves
        assert not beside.done()
    assert beside.result(timeout=TIMEOUT) == alone
    assert server.metric('elastic_mdm_requests_total{outcome="cancelled"}') == cancelled + 1


def test_an_mdlm_checkpoint_is_served_the_same_way(tmp_path) -> None:
    """MDLM's sampler behind the same server: its answer is `generate()`'s for the same seed and canvas (prompt
    plus `max_tokens`), infilling fills a budget of `max_tokens` positions, and its drafts show unrevealed positions
    as the mask token."""
    folder = save_checkpoint(tmp_path / "tiny-mdlm", objective="mdlm")
    live = LiveServer(folder)
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        ask = dict(model="tiny-mdlm", prompt="w5 w6", max_tokens=6, seed=3, extra_body={"num_steps": 5})
        assert client.completions.create(**ask).choices[0].text == direct(folder, "w5 w6", 3, 6, 5)
        infill = client.completions.create(**{**ask, "suffix": "w9"}).choices[0].text
        assert len(infill.split()) <= 6
        # a client slower than the steps gets only the latest draft (they never queue up): over 64 steps the last of
        # 6 positions is revealed late, so the first draft the client takes still shows masks however late it reads
        request = {"prompt": "w5", "max_tokens": 6, "num_steps": 64, "seed": 0, "stream": True,
                   "stream_options": {"include_drafts": True}}  # fmt: skip
        stream = post(live, "/v1/completions", request, key=None)
        drafts = [json.loads(line[5:])["choices"][0]["draft"] for line in stream.text.splitlines() if '"draft"' in line]
        assert "<mask>" in drafts[0] and "<mask>" not in drafts[-1]
        assert live.healthy()
    finally:
        live.stop()
