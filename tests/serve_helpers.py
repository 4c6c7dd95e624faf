"""A live quantship server on 127.0.0.1 for tests: uvicorn in a thread, on a free port."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, config_kwargs: dict, *, load: bool = True):
        import uvicorn

        from quantship.serve.app import ServeConfig, Server, build_asgi

        self.server = Server(ServeConfig(**config_kwargs))
        if load:
            self.server.load()
            assert self.server.ready, self.server.load_error
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._uv = uvicorn.Server(uvicorn.Config(build_asgi(self.server), host="127.0.0.1", port=self.port,
                                                 log_level="warning", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._uv.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._uv.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self._uv.should_exit = True
        self._thread.join(10)
        self.server.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def with_chat_template(src: Path, dst: Path) -> Path:
    """A copy of a tiny model folder whose tokenizer has a (simple) chat template."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.chat_template = ("{% for m in messages %}<|pad|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|pad|>assistant\n{% endif %}")
    tok.save_pretrained(dst)
    return dst


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in data.items()) + "\n")
    return path
