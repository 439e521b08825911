"""``megacore serve`` over real HTTP against a tiny Hugging Face Llama directory on the CPU.

References: the same model's full-forward greedy tokens (``sampling.generate(use_cache=False)``) on
the tokenized prompt (and on the chat template rendered by jinja2 directly)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("aiohttp")
jinja2 = pytest.importorskip("jinja2")

from megacore.inference import serve_setup  # noqa: E402
from megacore.inference.sampling import generate  # noqa: E402
from megacore.inference.server import Server, build_parser  # noqa: E402

WORDS = ["<unk>", "<s>", "</s>", "user", "assistant", "system"] + [f"w{i}" for i in range(58)]
TEMPLATE = ("{{ bos_token }} {% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant{% endif %}")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if p.dim() == 1 else 0.3 * noise)
    out = tmp_path_factory.mktemp("serve") / "hf"
    model.save_pretrained(str(out), safe_serialization=True)
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>",
                                                           "eos_token": "</s>"}))
    return out


class Running:
    """A Server on its own event-loop thread, on a free port."""

    def __init__(self, hf_dir, *extra):
        args = build_parser().parse_args(["--model", str(hf_dir), "--device", "cpu", *extra])
        self.setup = serve_setup.prepare(args)
        self.engine = self.setup.engine
        self.server = Server(self.engine, self.setup.ctx)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.port = asyncio.run_coroutine_threadsafe(self.server.start("127.0.0.1", 0), self.loop).result(60)

    def post(self, path, body, raw=False):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", path, body if raw else json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read().decode()
        conn.close()
        return resp.status, data

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.shutdown(5), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def srv(hf_dir):
    running = Running(hf_dir, "--max-batch", "3", "--block-size", "4", "--decode-steps", "3", "--max-queue", "8")
    yield running
    running.close()


def words(ids):
    return " ".join(WORDS[i] for i in ids)


def greedy(srv, ids, n):
    model = srv.setup.engine.model
    return generate(model, torch.tensor(ids), n, use_cache=False)[len(ids):].tolist()


def events(data):
    out = [line[len("data: "):] for line in data.split("\n") if line.startswith("data: ")]
    assert out[-1] == "[DONE]"
    return [json.loads(e) for e in out[:-1]]


def test_completions_concurrent_requests_each_get_their_greedy_tokens(srv):
    prompts = [[6, 7, 8], [9, 30, 31, 12, 40, 41, 5], [50], [11, 12, 13, 14]]
    results = [None] * len(prompts)

    def ask(i):
        results[i] = srv.post("/v1/completions", {"prompt": words(prompts[i]), "max_tokens": 6 + i,
                                                  "temperature": 0, "ignore_eos": True})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (status, data) in enumerate(results):
        assert status == 200, data
        body = json.loads(data)
        want = greedy(srv, prompts[i], 6 + i)
        choice = body["choices"][0]
        assert choice["token_ids"] == want and choice["finish_reason"] == "length"
        assert choice["text"] == " " + words(want)
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == len(want)


def test_streaming_and_chat(srv):
    status, data = srv.post("/v1/completions", {"prompt": [6, 7, 8], "max_tokens": 7, "temperature": 0,
                                                "ignore_eos": True, "stream": True,
                                                "stream_options": {"include_usage": True}})
    assert status == 200
    chunks = events(data)
    want = greedy(srv, [6, 7, 8], 7)
    assert [t for c in chunks[:-1] for t in c["choices"][0]["token_ids"]] == want
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == " " + words(want)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 7

    messages = [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": "w10 w11 w12"}]
    rendered = jinja2.Environment().from_string(TEMPLATE).render(messages=messages, add_generation_prompt=True,
                                                                 bos_token="<s>")
    ids = [WORDS.index(w) for w in rendered.split()]
    want = greedy(srv, ids, 5)
    status, data = srv.post("/v1/chat/completions", {"messages": messages, "max_tokens": 5, "temperature": 0,
                                                     "ignore_eos": True})
    body = json.loads(data)
    assert status == 200 and body["choices"][0]["message"] == {"role": "assistant", "content": " " + words(want)}
    status, data = srv.post("/v1/chat/completions", {"messages": messages, "max_tokens": 5, "temperature": 0,
                                                     "ignore_eos": True, "stream": True})
    chunks = events(data)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == " " + words(want)


def test_stop_string_cuts_the_text(srv):
    want = greedy(srv, [6, 7, 8], 8)
    stop = words(want[3:5])
    status, data = srv.post("/v1/completions", {"prompt": [6, 7, 8], "max_tokens": 8, "temperature": 0,
                                                "ignore_eos": True, "stop": [stop]})
    choice = json.loads(data)["choices"][0]
    assert status == 200 and choice["finish_reason"] == "stop"
    assert choice["text"] == " " + words(want[:3]) + " "


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "w1", "temperature": -1}, "temperature"),
    ({"prompt": "w1", "top_p": 0}, "top_p"),
    ({"prompt": "w1", "n": 2}, "n"),
    ({"prompt": "w1", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "w1 " * 48}, "prompt"),                       # longer than the 48-token context
    ({"prompt": "w1 w2", "max_tokens": 47}, "max_tokens"),    # prompt + completion past the context
    ({"prompt": [1, 2, 999]}, "prompt"),
    ({"prompt": "w1", "logprobs": 3}, "logprobs"),
])
def test_bad_requests_get_400_with_the_parameter_named(srv, body, param):
    status, data = srv.post("/v1/completions", body, raw=isinstance(body, bytes))
    assert status == 400, data
    error = json.loads(data)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    status, data = srv.post("/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and json.loads(data)["error"]["param"] == "messages"


def _wait(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_queue_full_gets_429_and_disconnects_free_the_slot(hf_dir):
    run = Running(hf_dir, "--max-batch", "1", "--max-queue", "1", "--block-size", "4", "--decode-steps", "1")
    engine = run.engine
    try:
        decode = engine.runner.decode
        engine.runner.decode = lambda *a, **k: (time.sleep(0.02), decode(*a, **k))[1]  # slow enough to catch
        # A streaming client reads one chunk and hangs up: its request is cancelled, its slot freed.
        sock = socket.create_connection(("127.0.0.1", run.port))
        body = json.dumps({"prompt": [6, 7], "max_tokens": 40, "ignore_eos": True, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data:" not in got:  # the headers may come in a packet of their own
            chunk = sock.recv(4096)
            assert chunk, "the server closed the stream"
            got += chunk
        _wait(lambda: engine.running)
        blocker = engine.running[0]
        # While it decodes, one request may wait; the next one is refused.
        waiting = threading.Thread(target=run.post, args=("/v1/completions", {"prompt": [5], "max_tokens": 2}))
        waiting.start()
        _wait(lambda: engine.num_queued == 1)
        status, data = run.post("/v1/completions", {"prompt": [5], "max_tokens": 2})
        assert status == 429 and json.loads(data)["error"]["type"] == "rate_limit_exceeded"
        sock.close()
        _wait(lambda: blocker.finished)
        assert blocker.finish_reason == "cancelled" and len(blocker.token_ids) < 40
        waiting.join(60)
        # A client waiting for a whole response hangs up: cancelled too.
        sock = socket.create_connection(("127.0.0.1", run.port))
        body = json.dumps({"prompt": [9], "max_tokens": 40, "ignore_eos": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        _wait(lambda: engine.running)
        second = engine.running[0]
        sock.close()
        _wait(lambda: second.finished)
        assert second.finish_reason == "cancelled" and len(second.token_ids) < 40
        _wait(lambda: not engine.running and engine.free_slots == [0])
        assert sorted(engine.free_blocks) == list(range(1, engine.store.num_blocks))
    finally:
        run.close()


def test_cli_serves_and_exits_0_on_sigterm(hf_dir):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "megacore", "serve", "--model", str(hf_dir), "--port", "0",
                             "--device", "cpu"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "http://" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited before listening"
        port = int(line.split("http://")[1].split(":")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "w5 w6", "max_tokens": 3, "temperature": 0}))
        assert conn.getresponse().status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_example_client_streams_and_prints(srv):
    script = os.path.join(ROOT, "examples", "openai_client.py")
    url = f"http://127.0.0.1:{srv.port}"
    want = greedy(srv, [6, 7, 8], 5)
    for extra in ([], ["--stream"]):
        out = subprocess.run([sys.executable, script, "--url", url, "--prompt", "w0 w1 w2", "--max-tokens", "5",
                              *extra], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == words(want)
    bad = subprocess.run([sys.executable, script, "--url", url, "--prompt", "w0", "--top-p", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "HTTP 400" in bad.stderr and "top_p" in bad.stderr


def test_cli_refuses_bad_setups_with_one_line(hf_dir, tmp_path, capsys):
    from megacore.inference.server import main

    assert main(["--model", str(hf_dir), "--pp", "2"]) == 2
    assert "--pp 2 runs on 2 processes: torchrun --nproc-per-node 2" in capsys.readouterr().err
    assert main(["--model", str(hf_dir), "--pp", "2", "--tp", "2"]) == 2
    assert "tensor and pipeline parallelism together are not supported" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--model", str(hf_dir), "--device", "cpu", "--max-length", "4096"]) == 2
    assert "--max-length 4096 must be in [2, 48]" in capsys.readouterr().err
    assert main(["--model", str(hf_dir), "--device", "cpu", "--max-prefill-tokens", "0"]) == 2
    assert "--max-prefill-tokens must be >= 1, got 0" in capsys.readouterr().err


def test_chat_template_fallback_and_errors(tmp_path):
    from megacore.inference.chat import ChatTemplate, ChatTemplateError

    plain = ChatTemplate.find([tmp_path])
    assert plain.source == "fallback"
    assert plain.render([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "default", "template": "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                                        "{% endif %}{{ messages[0]['content'] }}"}]}))
    template = ChatTemplate.find([tmp_path])
    assert template.render([{"role": "user", "content": "x"}]) == "x"
    with pytest.raises(ChatTemplateError, match="user first"):
        template.render([{"role": "system", "content": "x"}])
