"""Chat messages to prompt text: the tokenizer's chat template, or a plain documented fallback.

    template = ChatTemplate.find([model_dir, tokenizer_dir])
    text = template.render([{"role": "user", "content": "Hi"}])       # ends with the assistant's turn

The template is ``chat_template`` of a ``tokenizer_config.json`` in the first of the directories
that has one (a string, or a list of ``{"name", "template"}`` where ``"default"`` is used), rendered
with jinja2 in a sandbox with ``messages``, ``add_generation_prompt=True``, ``bos_token`` /
``eos_token`` (from the same file) and ``raise_exception`` -- what Hugging Face's
``apply_chat_template`` passes. Without a template (or without jinja2 installed) the fallback is::

    <role>: <content>\\n        (one line per message)
    assistant:

which any base model can continue; ``ChatTemplate.source`` says which was used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

FALLBACK = "fallback"


class ChatTemplateError(ValueError):
    """The template cannot render these messages (the message says why)."""


def _token_text(value) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} (AddedToken serialized)
        return str(value.get("content", ""))
    return "" if value is None else str(value)


class ChatTemplate:
    def __init__(self, template: Optional[str] = None, bos_token: str = "", eos_token: str = "", source: str = FALLBACK):
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self._compiled = None
        if template is not None:
            try:
                from jinja2.exceptions import TemplateError
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:  # the fallback, said in ``source``
                self.source = f"{FALLBACK} (jinja2 is not installed; {source} not used)"
                return
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            try:
                self._compiled = env.from_string(template)
            except TemplateError as e:
                raise ChatTemplateError(f"the chat template in {source} does not parse: {e}") from None

    @classmethod
    def find(cls, dirs: Iterable) -> "ChatTemplate":
        for d in dirs:
            path = Path(d) / "tokenizer_config.json" if d else None
            if path is None or not path.is_file():
                continue
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            template = config.get("chat_template")
            if isinstance(template, list):
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if isinstance(template, str) and template.strip():
                return cls(template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")),
                           source=str(path))
        return cls()

    def render(self, messages: list) -> str:
        if self._compiled is None:
            lines = [f"{m['role']}: {m['content']}\n" for m in messages]
            return "".join(lines) + "assistant:"
        from jinja2.exceptions import TemplateError

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                         eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, KeyError, IndexError) as e:
            raise ChatTemplateError(f"the chat template cannot render these messages: {e}") from None


def _raise(message: str):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")
