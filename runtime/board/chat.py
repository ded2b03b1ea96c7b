"""Chat with a run's output from the board: `kubetune chat`'s loader (`runtime/chat.py`
`load_for_chat`, with the job's chat template), loaded once per output folder and kept, and
tokens streamed by transformers' `TextIteratorStreamer` from a generation thread. The training
stack is imported here, on the first chat, never when the board starts."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator


class ChatModels:
    def __init__(self):
        self._models: dict[tuple[str, str | None, int], tuple[Any, Any, threading.Lock]] = {}
        self._lock = threading.Lock()

    def get(self, path: str, template: str | None):
        try:  # a run deleted and made again under the same name: a new model, not the cached one
            stamp = max(f.stat().st_mtime_ns for f in Path(path).iterdir())
        except (OSError, ValueError):
            stamp = 0
        key = (path, template, stamp)
        with self._lock:
            if key not in self._models:
                from ..chat import load_for_chat

                m, tok = load_for_chat(path, template=template)
                self._models[key] = (m, tok, threading.Lock())
            return self._models[key]

    def stream(self, path: str, template: str | None, messages: list[dict[str, str]],
               max_new_tokens: int = 128) -> Iterator[str]:
        """Yield the answer piece by piece (greedy, as `kubetune chat` answers by default)."""
        import torch
        from transformers import TextIteratorStreamer

        m, tok, lock = self.get(path, template)
        with lock:  # one generation at a time per model
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            enc = {k: v.to(m.device) for k, v in enc.items()}
            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=300)
            failure: list[BaseException] = []

            def work():
                try:
                    with torch.no_grad():
                        m.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                   top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, streamer=streamer)
                except BaseException as err:  # noqa: BLE001 - reported to the client
                    failure.append(err)
                    streamer.end()

            thread = threading.Thread(target=work, name="kubetune-board-chat", daemon=True)
            thread.start()
            for piece in streamer:
                if piece:
                    yield piece
            thread.join()
            if failure:
                raise failure[0]
