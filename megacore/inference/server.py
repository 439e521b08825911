"""``megacore serve``: an OpenAI-compatible HTTP server over the dynamic-batching engine.

    megacore serve --model DIR_OR_CHECKPOINT [--host 127.0.0.1] [--port 8000] [--max-batch 8]
        [--max-queue 64] [--max-length N] [--block-size 16] [--num-blocks N] [--decode-steps 8]
        [--tokenizer PATH] [--config CONFIG.yaml] [--dtype bf16] [--device auto] [--no-graphs]
        [--max-prefill-tokens 4096] [--prefix-caching]
        [--served-model-name NAME] [--shutdown-grace-s 30]
    torchrun --nproc-per-node 2 -m megacore serve --model CKPT_DIR --tp 2      (tensor parallel)
    torchrun --nproc-per-node 2 -m megacore serve --model CKPT_DIR --pp 2      (pipeline parallel)

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (request fields:
``megacore.inference.openai_api``), ``GET /v1/models``, ``GET /health``. ``--model`` and the
tokenizer are found as ``megacore generate`` finds them (``megacore.inference.generate``); the chat
template is the tokenizer's (``megacore.inference.chat``).

Behaviour: the engine runs on its own thread (``megacore.inference.engine``); each request streams
its tokens back to the event loop. At most ``--max-queue`` requests wait for a slot: one more gets
HTTP 429. A malformed body, a missing field, a bad sampling parameter or a prompt longer than the
context gets HTTP 400 with OpenAI's error body. A client that disconnects (during streaming or
while waiting for a whole response) has its request cancelled: its slot and blocks are freed.
SIGTERM or SIGINT: new requests get 503, the ones in flight may finish for ``--shutdown-grace-s``
seconds, the rest are cancelled, and the process exits 0.

Needs aiohttp (``pip install megacore[serve]``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from typing import Optional

from megacore.inference.engine import Engine, QueueFull, RequestOutput
from megacore.inference.openai_api import (ApiError, ServeContext, completion_body, new_id, parse_chat,
                                           parse_completion, usage)


class EngineThread:
    """Runs ``engine.step()`` on a background thread until ``stop()``; cancels what is left then."""

    def __init__(self, engine: Engine, on_exit=None):
        self.engine, self.on_exit = engine, on_exit
        self._stop = threading.Event()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="megacore-engine", daemon=True)

    def start(self) -> "EngineThread":
        self.thread.start()
        return self

    def _run(self) -> None:
        device = self.engine.store.device
        if device.type == "cuda":  # the current device is per thread (Triton launches, graph capture use it)
            import torch

            torch.cuda.set_device(device)
        try:
            while not self._stop.is_set():
                try:
                    if not self.engine.step():
                        self.engine.wait_for_work(0.05)
                except Exception as e:  # a failed step: the requests in it end with "error"; keep serving
                    print(f"engine step failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    self.error = e
                    self.engine.cancel_all("error")
        finally:
            self.engine.cancel_all("cancelled")
            if self.on_exit is not None:
                self.on_exit()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.engine._wake.set()
        self.thread.join(timeout)


class Server:
    """The aiohttp application around one engine (see the module docstring)."""

    def __init__(self, engine: Engine, ctx: ServeContext, on_engine_exit=None):
        from aiohttp import web

        self.engine, self.ctx = engine, ctx
        self.engine_thread = EngineThread(engine, on_engine_exit)
        self.accepting = True
        self.in_flight = 0
        self.app = web.Application(client_max_size=16 * 1024 * 1024)
        self.app.add_routes([web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat_completions),
                             web.get("/v1/models", self.models), web.get("/health", self.health)])
        self.runner = None
        self.port = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 8000) -> int:
        from aiohttp import web

        self.engine_thread.start()
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Refuse new requests, let those in flight finish for ``grace_s``, cancel the rest, stop."""
        self.accepting = False
        deadline = time.monotonic() + grace_s
        while (self.in_flight or self.engine.has_work()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, self.engine_thread.stop)
        if self.runner is not None:
            await self.runner.cleanup()

    # ------------------------------------------------------------------ handlers
    async def health(self, request):
        from aiohttp import web

        return web.json_response({"status": "ok" if self.accepting else "shutting down",
                                  "running": len(self.engine.running), "waiting": self.engine.num_queued})

    async def models(self, request):
        from aiohttp import web

        return web.json_response({"object": "list", "data": [{"id": self.ctx.model_name, "object": "model",
                                                              "created": 0, "owned_by": "megacore"}]})

    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request):
        return await self._generate(request, chat=True)

    async def _generate(self, request, chat: bool):
        from aiohttp import web

        def error(e: ApiError):
            return web.json_response(e.body(), status=e.status)

        if not self.accepting:
            return error(ApiError("the server is shutting down", status=503, kind="server_error"))
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            return error(ApiError(f"the request body is not valid JSON: {e}"))
        try:
            parsed = (parse_chat if chat else parse_completion)(body, self.ctx)
        except ApiError as e:
            return error(e)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def on_output(out: RequestOutput) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        rid = new_id("chatcmpl" if chat else "cmpl")
        try:
            self.engine.add_request(parsed.prompt_ids, parsed.params, on_output, request_id=rid)
        except QueueFull as e:
            return error(ApiError(str(e), status=429, kind="rate_limit_exceeded"))
        except ValueError as e:
            return error(ApiError(str(e)))
        self.in_flight += 1
        try:
            if parsed.stream:
                return await self._stream(request, rid, parsed, outputs, chat)
            return await self._whole(request, rid, parsed, outputs, chat)
        finally:
            self.in_flight -= 1
            self.engine.cancel(rid)  # no-op once finished; frees the slot of an abandoned request

    async def _next(self, request, outputs: asyncio.Queue) -> RequestOutput:
        """The request's next output; ConnectionResetError once the client has gone."""
        while True:
            try:
                return await asyncio.wait_for(outputs.get(), timeout=0.25)
            except asyncio.TimeoutError:
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("the client disconnected") from None

    async def _whole(self, request, rid, parsed, outputs, chat: bool):
        from aiohttp import web

        tokens, text = [], []
        while True:
            out = await self._next(request, outputs)
            tokens += out.new_token_ids
            text.append(out.new_text)
            if out.finished:
                break
        body = completion_body(rid, self.ctx.model_name, "".join(text), tokens, out.finish_reason, chat,
                               usage(len(parsed.prompt_ids), len(tokens)))
        return web.json_response(body)

    async def _stream(self, request, rid, parsed, outputs, chat: bool):
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        first, count = True, 0

        async def send(obj) -> None:
            await response.write(f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n".encode())

        while True:
            out = await self._next(request, outputs)
            count += len(out.new_token_ids)
            if out.new_token_ids or out.new_text or out.finished or first:
                await send(completion_body(rid, self.ctx.model_name, out.new_text, out.new_token_ids,
                                           out.finish_reason if out.finished else None, chat, chunk=True, first=first))
                first = False
            if out.finished:
                break
        if parsed.include_usage:
            end = completion_body(rid, self.ctx.model_name, "", [], None, chat, usage(len(parsed.prompt_ids), count),
                                  chunk=True)
            end["choices"] = []
            await send(end)
        await send("[DONE]")
        await response.write_eof()
        return response


# ------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    from megacore.precision.mixed import DTYPES

    p = argparse.ArgumentParser(prog="megacore serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory or megacore checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (the one chosen is printed)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--max-length", type=int, default=None, help="positions per request (default: the model's)")
    p.add_argument("--block-size", type=int, default=16, help="positions per KV-cache block")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV-cache blocks (default: max-batch full-length sequences)")
    p.add_argument("--decode-steps", type=int, default=8, help="tokens decoded per host synchronization")
    p.add_argument("--max-prefill-tokens", type=int, default=4096,
                   help="prompt tokens per prefill forward (newly admitted prompts are packed; longer ones split)")
    p.add_argument("--prefix-caching", action="store_true",
                   help="reuse the KV blocks of prompt prefixes seen before (not for Mamba layers)")
    p.add_argument("--tokenizer", help="tokenizer.json, a folder holding one, or a sentencepiece .model")
    p.add_argument("--config", help="run config YAML (checkpoints without a recorded model config; the tokenizer)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="parameter dtype (default: as stored)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun with this many ranks)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (under torchrun; not with --tp)")
    p.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--served-model-name", default=None, help="the model id of responses (default: --model)")
    p.add_argument("--shutdown-grace-s", type=float, default=30.0, help="time in-flight requests get on SIGTERM")
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: Optional[list] = None) -> int:
    from megacore.inference import serve_setup

    args = build_parser().parse_args(argv)
    try:
        setup = serve_setup.prepare(args)
    except serve_setup.SetupError as e:
        return _fail(str(e))
    if not setup.is_leader:
        setup.follow()
        return 0
    try:
        from aiohttp import web  # noqa: F401
    except ImportError:
        setup.release()
        return _fail("megacore serve needs aiohttp: pip install 'megacore[serve]'")
    return asyncio.run(_serve(setup, args))


async def _serve(setup, args) -> int:
    server = Server(setup.engine, setup.ctx, on_engine_exit=setup.release)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await server.start(args.host, args.port)
    except OSError as e:
        await asyncio.get_running_loop().run_in_executor(None, server.engine_thread.stop)
        return _fail(f"cannot listen on {args.host}:{args.port}: {e}")
    print(f"megacore serve: {setup.ctx.model_name} on http://{args.host}:{port} (max batch {setup.engine.max_batch}, "
          f"context {setup.ctx.max_length}, chat template: {setup.chat_source})", file=sys.stderr, flush=True)
    await stop.wait()
    print("megacore serve: shutting down", file=sys.stderr, flush=True)
    await server.shutdown(args.shutdown_grace_s)
    return 0
