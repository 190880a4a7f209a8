"""The model's life in the server: loaded in the background while the server already answers, then held.

`/health` is 503 until loading finishes, while draining, and for good if loading fails or the engine dies;
routes ask `Runtime.generator()` for a ready `TextGenerator` and get `ModelNotReady` otherwise. A failed load
or a dead engine calls `on_fatal`, so the server can exit non-zero and a supervisor can restart it.

The runtime's collaborators are named by whoever builds it, never attached later by the objects that use it: as
constructor arguments, or, where they are built from the runtime itself (the app's metrics read its stats, the
server runs the app that holds it), once through `Runtime.connect` before it starts.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from qwen_api.engine.base import EngineStats, favour_worker_threads
from qwen_api.engine.loading import ModelSource, load_model, pick_device, pick_dtype, sampling_defaults
from qwen_api.settings import Settings
from qwen_api.textgen import TextGenerator

log = logging.getLogger(__name__)

Loader = Callable[[], TextGenerator]
ReadyHook = Callable[[TextGenerator], None]
"""Called once with the loaded generator, before any request can get it (e.g. to attach the metrics observer)."""
FatalHook = Callable[[], None]
"""Called when the model failed to load or its engine died (e.g. to make the server exit with `exit_code`)."""


class ModelNotReady(Exception):
    """The model is still loading, failed to load, or its engine has died."""


class Runtime:
    """Loads the model off the event loop and hands out the TextGenerator once it is ready."""

    def __init__(
        self, loader: Loader, model_name: str, *, on_ready: ReadyHook | None = None, on_fatal: FatalHook | None = None
    ) -> None:
        self._loader = loader
        self.model_name = model_name
        self.created = int(time.time())
        self._generator: TextGenerator | None = None
        self.state: Literal["idle", "loading", "ready", "failed", "dead"] = "idle"
        self.error: BaseException | None = None
        self.draining = False
        self._closing = False
        self._on_ready, self._on_fatal = on_ready, on_fatal
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    def connect(self, *, on_ready: ReadyHook | None = None, on_fatal: FatalHook | None = None) -> None:
        """Name a collaborator that could not be a constructor argument because it is built from this runtime.
        Each hook is named once, and only before `start`: a hook that replaced another, or came after the load
        began, would be wiring hidden in whatever object happened to call this last."""
        if self.state != "idle":
            raise RuntimeError("Runtime.connect after start: name its hooks where it is built")
        for name, hook, current in (("on_ready", on_ready, self._on_ready), ("on_fatal", on_fatal, self._on_fatal)):
            if hook is not None and current is not None:
                raise RuntimeError(f"Runtime.{name} is already connected")
        self._on_ready = on_ready or self._on_ready
        self._on_fatal = on_fatal or self._on_fatal

    def start(self) -> None:
        self.state = "loading"
        self._task = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            self._generator = await asyncio.to_thread(self._loader)
        except Exception as exc:
            log.exception("loading the model failed")
            self.state, self.error = "failed", exc
            self._fatal()
        else:
            if self._on_ready is not None:
                self._on_ready(self._generator)
            self.state = "ready"
            log.info("model loaded; serving")
            if not self._closing:  # a SIGTERM during the load: the engine is about to be shut down, not watched
                self._watchdog = asyncio.create_task(self._watch())

    async def _watch(self, period: float = 0.5) -> None:
        """Notice a dead engine even when no request is running."""
        assert self._generator is not None
        while self._generator.engine.is_healthy():
            await asyncio.sleep(period)
        if self._closing:  # shut down on purpose
            return
        log.error("the engine has died; the server will exit so that it can be restarted")
        self.state = "dead"
        self._fatal()

    def _fatal(self) -> None:
        if self._on_fatal is not None:
            self._on_fatal()

    @property
    def exit_code(self) -> int:
        return 1 if self.state in ("failed", "dead") else 0

    @property
    def skip_teardown(self) -> bool:
        """True when the process must end without the interpreter's teardown (see `ClusterRuntime`)."""
        return False

    async def wait_ready(self) -> None:
        if self._task is not None:
            await self._task

    def healthy(self) -> bool:
        return not self.draining and self._generator is not None and self._generator.engine.is_healthy()

    @property
    def retry_after(self) -> str | None:
        """Seconds a client refused for want of a model may wait before it tries again, while that is passing (the
        model loads; a cluster's replicas restart); None when it is not (loading failed, the engine died: the
        process exits for its supervisor)."""
        return None if self.state in ("failed", "dead") else "5"

    def stats(self) -> EngineStats | None:
        return None if self._generator is None else self._generator.engine.stats()

    def generator(self) -> TextGenerator:
        if self._generator is None or not self._generator.engine.is_healthy():
            raise ModelNotReady()
        return self._generator

    async def close(self) -> None:
        self._closing = True
        if self._task is not None and not self._task.done():
            await asyncio.shield(self._task)  # a half-loaded model cannot be interrupted; let it finish
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._generator is not None:
            self._generator.grammars.close()
            await asyncio.to_thread(self._generator.engine.shutdown)


def eos_token_ids(tokenizer: Any, configured: int | list[int] | None = None) -> set[int]:
    """Every token that ends the assistant's turn: the model's EOS ids, the tokenizer's, and ChatML's <|im_end|>."""
    ids: set[int] = set()
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


def choose_engine(requested: str, source: ModelSource, device: str) -> str:
    """`auto`: llama.cpp for GGUF weights on the CPU (several times faster there), the native engine for
    Qwen2/Llama safetensors on CUDA, transformers otherwise."""
    if requested != "auto":
        return requested
    if source.gguf_file and device == "cpu" and importlib.util.find_spec("llama_cpp") is not None:
        return "llamacpp"
    if not source.gguf_file and device.startswith("cuda"):
        from qwen_api.engine.native import supports_model_dir

        if supports_model_dir(source.path):
            return "native"
    return "transformers"


def default_loader(settings: Settings, source: ModelSource) -> Loader:
    """Load the model with the engine `--engine` names (`auto`: the fastest for it), behind a TextGenerator."""

    def load() -> TextGenerator:
        device = pick_device(settings.device)
        if device.startswith("cuda"):
            favour_worker_threads()  # the engine's worker launches GPU steps between the event loop's tokens
        engine = choose_engine(settings.engine, source, device)
        if engine == "llamacpp":
            return _load_llamacpp(settings, source, device)
        if engine == "native":
            return _load_native(settings, source, device)
        return _load_transformers(settings, source, device)

    return load


def _load_transformers(settings: Settings, source: ModelSource, device: str) -> TextGenerator:
    from qwen_api.engine.transformers_engine import TransformersEngine

    dtype = pick_dtype(settings.dtype, device, is_gguf=source.gguf_file is not None)
    log.info("loading %s from %s on %s as %s (transformers engine)", source.name, source.path, device, dtype)
    model, tokenizer = load_model(source, device, dtype, settings.trust_remote_code)
    engine = TransformersEngine(
        model,
        eos_token_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None)),
        max_batch_size=settings.max_batch_size,
        kv_cache_tokens=settings.kv_cache_tokens,
        decodable_tokens=len(tokenizer),
    )
    return TextGenerator(engine, tokenizer, sampling_defaults=sampling_defaults(source))


def _load_llamacpp(settings: Settings, source: ModelSource, device: str) -> TextGenerator:
    from transformers import AutoTokenizer

    from qwen_api.engine.llamacpp_engine import LlamaCppEngine

    if source.gguf_file is None or device != "cpu":
        raise ValueError("the llama.cpp engine serves GGUF files on the CPU")
    log.info("loading %s from %s (llama.cpp engine)", source.name, source.path / source.gguf_file)
    # The same tokenizer as the transformers path (read from the GGUF), so templates and ids agree.
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    engine = LlamaCppEngine(
        source.path / source.gguf_file,
        eos_token_ids(tokenizer),
        max_batch_size=settings.max_batch_size,
        kv_cache_tokens=settings.kv_cache_tokens,
        prefix_cache=settings.prefix_cache,
    )
    return TextGenerator(engine, tokenizer, sampling_defaults=sampling_defaults(source))


def _load_native(settings: Settings, source: ModelSource, device: str) -> TextGenerator:
    from transformers import AutoTokenizer, GenerationConfig

    from qwen_api.engine.native.engine import NativeEngine

    if source.gguf_file is not None:
        raise ValueError("the native engine reads safetensors model directories, not GGUF files")
    dtype = pick_dtype(settings.dtype, device, is_gguf=False)
    log.info("loading %s from %s on %s as %s (native engine)", source.name, source.path, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=settings.trust_remote_code)
    try:
        configured = GenerationConfig.from_pretrained(source.path).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    engine = NativeEngine(
        source.path,
        eos_token_ids(tokenizer, configured),
        device=device,
        dtype=dtype,
        max_batch_size=settings.max_batch_size,
        kv_cache_tokens=settings.kv_cache_tokens,
        prefix_cache=settings.prefix_cache,
        fuse_kernels=settings.fuse_kernels,
        prefill_delay=settings.prefill_delay,
        decodable_tokens=len(tokenizer),
    )
    return TextGenerator(engine, tokenizer, sampling_defaults=sampling_defaults(source))
