"""A client for ``megacore serve`` using only the standard library (urllib).

    megacore serve --model path/to/hf_or_checkpoint --port 8000 &
    python examples/openai_client.py --prompt "Once upon a time" --max-tokens 32
    python examples/openai_client.py --chat "Write a haiku about GPUs" --stream
    python examples/openai_client.py --prompt-ids 5,17,3          # a model served without a tokenizer

Any OpenAI-compatible client works too (``openai.OpenAI(base_url="http://127.0.0.1:8000/v1",
api_key="none")``); this file shows the wire format: one JSON POST, and for ``stream`` server-sent
events (``data: {...}`` lines, ending with ``data: [DONE]``).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def post(url: str, body: dict):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=600)
    except urllib.error.HTTPError as e:  # 400 / 429 / 503 carry {"error": {"message": ...}}
        message = json.loads(e.read() or b"{}").get("error", {}).get("message", e.reason)
        sys.exit(f"HTTP {e.code}: {message}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue (/v1/completions)")
    what.add_argument("--prompt-ids", help="comma-separated token ids to continue (/v1/completions)")
    what.add_argument("--chat", help="a user message (/v1/chat/completions)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", action="store_true")
    args = p.parse_args()

    body = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
            "stream": args.stream}
    if args.chat is not None:
        url, chat = f"{args.url}/v1/chat/completions", True
        body["messages"] = [{"role": "user", "content": args.chat}]
    else:
        url, chat = f"{args.url}/v1/completions", False
        body["prompt"] = args.prompt if args.prompt is not None else [int(t) for t in args.prompt_ids.split(",")]

    with post(url, body) as resp:
        if not args.stream:
            choice = json.load(resp)["choices"][0]
            print(choice["message"]["content"] if chat else choice["text"] or choice["token_ids"])
            return
        for raw in resp:  # server-sent events, one "data: ..." line each
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            choice = json.loads(data)["choices"][0]
            piece = choice["delta"].get("content", "") if chat else choice["text"]
            print(piece or "".join(f" {t}" for t in choice["token_ids"]), end="", flush=True)
        print()


if __name__ == "__main__":
    main()
