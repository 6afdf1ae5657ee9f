"""ComfyUI's prompt queue, history and executor (``execution.py``, ``main.py``'s prompt_worker).

Message order for one prompt, as the real worker sends it: ``status`` (taken off the queue),
``execution_start``, ``execution_cached``, then per node ``progress_state`` (running),
``executing``, ``progress_state`` + ``progress`` (+ a binary preview) per sampler step, ``executed``
(nodes with UI output), ``progress_state`` (finished); then ``execution_success`` or
``execution_error`` or ``execution_interrupted`` (broadcast); a moment later the history entry,
``status`` and ``executing`` with ``node: null``. ``progress_state`` lists every node not pending.
Node outputs are cached by input signature between prompts, so resubmitting an identical prompt
re-runs nothing, as in ComfyUI.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import heapq
import io
import itertools
import json
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from PIL import Image

from sdagent.errors import SdagentError
from sdagent.sim.comfy_nodes import Dirs, Interrupted, Node, NodeFailure, NodeResult, RunContext
from sdagent.sim.comfy_ws import SocketHub
from sdagent.sim.engine import Engine, Generation, SimulatedOOM
from sdagent.sim.faults import Api, FaultKind

log = structlog.get_logger(__name__, simulator=True)

# server.py's binary frames: a big-endian event type, then for PREVIEW_IMAGE the image format.
PREVIEW_IMAGE = 1
JPEG_PREVIEW = struct.pack(">I", 1)
CYCLE_ERROR = "graph.DependencyCycleError"
MAX_HISTORY = 10000  # execution.py's MAXIMUM_HISTORY_SIZE: the oldest entry goes first
OOM_EXCEPTION_TYPE = "torch.cuda.OutOfMemoryError"
OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
)


@dataclass(frozen=True)
class ComfyBehaviour:
    """How the simulated ComfyUI differs between set-ups (its flags, its timing)."""

    history_delay_s: float = 0.0  # execution_success to history entry: observed up to ~0.9 s on CPU
    previews: bool = False  # --preview-method other than none: a JPEG frame after each progress


@dataclass(order=False)
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    def as_list(self) -> list[Any]:
        """The tuple /queue and /history show: [number, prompt_id, prompt, extra_data, outputs]."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class PromptQueue:
    """Pending prompts by number (lowest first), the running one, the history and /free's flags."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, QueueItem]] = []
        self._order = itertools.count()
        self._wakeup = asyncio.Event()
        self.running: QueueItem | None = None
        self.history: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.flags: dict[str, Any] = {}

    def put(self, item: QueueItem) -> None:
        heapq.heappush(self._heap, (item.number, next(self._order), item))
        self._wakeup.set()

    async def next(self) -> QueueItem | None:
        """The next prompt, now running; None when only flags woke the worker."""
        while not self._heap and not self.flags:
            self._wakeup.clear()
            await self._wakeup.wait()
        if not self._heap:
            return None
        self.running = heapq.heappop(self._heap)[2]
        return self.running

    def task_done(self, item: QueueItem, result: dict[str, Any], status: dict[str, Any]) -> None:
        self.running = None
        if len(self.history) > MAX_HISTORY:
            self.history.popitem(last=False)
        self.history[item.prompt_id] = {"prompt": item.as_list(), "outputs": {}, "status": status, **result}

    def remaining(self) -> int:
        return len(self._heap) + (1 if self.running else 0)

    def info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def snapshot(self) -> dict[str, Any]:
        pending = [entry[2].as_list() for entry in sorted(self._heap)]
        return {"queue_running": [self.running.as_list()] if self.running else [], "queue_pending": pending}

    def wipe(self) -> None:
        self._heap.clear()

    def delete(self, prompt_ids: list[str]) -> None:
        self._heap = [entry for entry in self._heap if entry[2].prompt_id not in prompt_ids]
        heapq.heapify(self._heap)

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None) -> dict[str, Any]:
        if prompt_id is not None:
            return {prompt_id: self.history[prompt_id]} if prompt_id in self.history else {}
        items = list(self.history.items())
        if max_items is not None:
            items = items[-max_items:] if max_items > 0 else []
        return dict(items)

    def set_flag(self, name: str, value: Any) -> None:
        self.flags[name] = value
        self._wakeup.set()

    def take_flags(self) -> dict[str, Any]:
        flags, self.flags = self.flags, {}
        return flags


@dataclass
class _NodeError(SdagentError):
    node_id: str
    error: Exception
    inputs: dict[str, Any]


@dataclass
class _Run:
    """One prompt's execution state."""

    item: QueueItem
    generation: Generation
    signatures: dict[str, str]
    outputs: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    ui: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cache: dict[str, NodeResult] = field(default_factory=dict)  # what this prompt leaves cached
    messages: list[list[Any]] = field(default_factory=list)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)  # progress.py's registry, by node

    @property
    def client_id(self) -> str | None:
        return self.item.extra_data.get("client_id")

    @property
    def prompt_id(self) -> str:
        return self.item.prompt_id


class Executor:
    """Runs queued prompts one at a time on the engine; ``worker()`` is the long-running loop."""

    def __init__(
        self, engine: Engine, nodes: dict[str, Node], dirs: Dirs, queue: PromptQueue, hub: SocketHub,
        behaviour: ComfyBehaviour,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.behaviour = behaviour
        self.nodes = nodes
        self.dirs = dirs
        self.queue = queue
        self.hub = hub
        self._cache: dict[str, NodeResult] = {}

    async def worker(self) -> None:
        while True:
            item = await self.queue.next()
            if item is not None:
                await self.hub.send_status()
                try:
                    await self.execute(item)
                except Exception:  # a simulator bug: fail this prompt, keep serving the queue
                    log.exception("sim.comfy_worker_failed", prompt_id=item.prompt_id)
                    if self.queue.running is item:
                        status = {"status_str": "error", "completed": False, "messages": []}
                        self.queue.task_done(item, {"outputs": {}, "meta": {}}, status)
            self._apply_flags(self.queue.take_flags())

    def _apply_flags(self, flags: dict[str, Any]) -> None:
        """/free's requests, applied between prompts as the real worker does."""
        free_memory = flags.get("free_memory", False)
        if flags.get("unload_models", free_memory):
            self.engine.unload()
        if free_memory:
            self._cache.clear()

    async def execute(self, item: QueueItem) -> None:
        async with self.engine.exclusive():
            generation = self.engine.begin(Api.COMFYUI)
            run = _Run(item, generation, self._signatures(item))
            self.hub.running_client = run.client_id
            try:
                success = await self._run_graph(run)
            finally:
                self.engine.end(generation)
                self.hub.running_client = self.hub.last_node = None
        # The worker thread finishes the prompt after its last message went out: the entry lags.
        await asyncio.sleep(self.behaviour.history_delay_s)
        self._cache = run.cache
        meta = {node_id: _meta(node_id) for node_id in run.ui}
        status = {"status_str": "success" if success else "error", "completed": success, "messages": run.messages}
        self.queue.task_done(item, {"outputs": run.ui, "meta": meta}, status)
        await self.hub.send_status()
        if run.client_id is not None:
            await self.hub.send("executing", {"node": None, "prompt_id": item.prompt_id}, run.client_id)
        log.info(
            "sim.comfy_executed",
            prompt_id=item.prompt_id,
            success=success,
            executed=len(run.executed),
            ms=round((self.engine.clock() - generation.started) * 1000, 1),
        )

    async def _run_graph(self, run: _Run) -> bool:
        prompt_id = run.prompt_id
        await self._message(run, "execution_start", {"prompt_id": prompt_id})
        cached = [node_id for node_id, signature in run.signatures.items() if signature in self._cache]
        await self._message(run, "execution_cached", {"nodes": cached, "prompt_id": prompt_id})
        try:
            for node_id in self._execution_order(run):
                await self._execute_node(run, node_id, staged=node_id in run.item.outputs)
        except _NodeError as failure:
            await self._report_failure(run, failure)
            return False
        await self._message(run, "execution_success", {"prompt_id": prompt_id})
        return True

    async def _execute_node(self, run: _Run, node_id: str, *, staged: bool = False) -> None:
        if node_id in run.outputs:
            return
        signature = run.signatures[node_id]
        hit = self._cache.get(signature)
        if hit is not None:
            self._keep(run, node_id, signature, hit)
            if staged and run.client_id is not None:
                payload = {"node": node_id, "display_node": node_id, "output": hit.ui, "prompt_id": run.prompt_id}
                await self.hub.send("executed", payload, run.client_id)
            await self._progress_state(run, node_id, "finished")
            return
        node = run.item.prompt[node_id]
        node_class = self.nodes[node["class_type"]]
        await self._progress_state(run, node_id, "running", 0.0, 1.0)
        inputs = self._input_values(run, node, node_class)
        if run.client_id is not None:
            self.hub.last_node = node_id
            await self.hub.send(
                "executing", {"node": node_id, "display_node": node_id, "prompt_id": run.prompt_id}, run.client_id
            )
        if run.generation.interrupted:  # nodes.before_node_execution, after "executing" went out
            raise _NodeError(node_id, Interrupted(), inputs)
        context = RunContext(self.engine, run.generation, self.dirs, self._progress_reporter(run, node_id))
        try:
            result = await node_class.run(context, **inputs)
        except Exception as exc:  # as in ComfyUI, anything a node raises fails the prompt at that node
            raise _NodeError(node_id, exc, inputs) from None
        self._keep(run, node_id, signature, result)
        run.executed.append(node_id)
        if result.ui:
            payload = {"node": node_id, "display_node": node_id, "output": result.ui, "prompt_id": run.prompt_id}
            if run.client_id is not None:
                await self.hub.send("executed", payload, run.client_id)
        await self._progress_state(run, node_id, "finished")

    async def _progress_state(
        self, run: _Run, node_id: str, state: str, value: float | None = None, maximum: float | None = None
    ) -> None:
        """progress.py's registry update and its ``progress_state`` message (finished: value = max)."""
        entry = run.progress.setdefault(node_id, {"value": 0, "max": 1})
        entry["state"] = state
        if maximum is not None:
            entry["max"] = maximum
        entry["value"] = entry["max"] if state == "finished" else value
        nodes = {
            node: {
                **values, "node_id": node, "prompt_id": run.prompt_id, "display_node_id": node,
                "parent_node_id": None, "real_node_id": node,
            }
            for node, values in run.progress.items()
        }  # fmt: skip
        await self.hub.send("progress_state", {"prompt_id": run.prompt_id, "nodes": nodes}, run.client_id)

    def _execution_order(self, run: _Run) -> list[str]:
        """The nodes to run, in the order graph.py's ExecutionList runs them.

        Each output is added depth first (inputs pushed in order, popped from the end), skipping
        cached inputs; then, of the nodes whose inputs are done, an output node goes first, then a
        node an output waits for, then one two links from an output, else the first added.
        """
        pending: dict[str, None] = {}
        blocked_by: dict[str, int] = {}
        blocking: dict[str, dict[str, None]] = {}
        for output_id in run.item.outputs:
            stack, links = [output_id], []
            while stack:
                node_id = stack.pop()
                if node_id in pending:
                    continue
                pending[node_id], blocked_by[node_id], blocking[node_id] = None, 0, {}
                for value in run.item.prompt[node_id]["inputs"].values():
                    if not _is_link(value):
                        continue
                    source = str(value[0])
                    hit = self._cache.get(run.signatures[source])
                    if hit is not None:
                        self._keep(run, source, run.signatures[source], hit)
                        continue
                    stack.append(source)
                    links.append((source, node_id))
            for source, target in links:
                if target not in blocking[source]:
                    blocking[source][target] = None
                    blocked_by[target] += 1
        order = []
        while pending:
            ready = [node_id for node_id in pending if blocked_by[node_id] == 0]
            if not ready:
                raise _NodeError(next(iter(pending)), NodeFailure("Dependency cycle detected", CYCLE_ERROR), {})
            node_id = self._pick(run, ready, blocking)
            order.append(node_id)
            del pending[node_id]
            for target in blocking.pop(node_id):
                blocked_by[target] -= 1
        return order

    def _pick(self, run: _Run, ready: list[str], blocking: dict[str, dict[str, None]]) -> str:
        """graph.py's ux_friendly_pick_node: what gets an output on screen soonest."""

        def is_output(node_id: str) -> bool:
            return self.nodes[run.item.prompt[node_id]["class_type"]].output_node

        for near in (
            lambda node_id: is_output(node_id),
            lambda node_id: any(is_output(blocked) for blocked in blocking[node_id]),
            lambda node_id: any(is_output(far) for blocked in blocking[node_id] for far in blocking[blocked]),
        ):
            chosen = next((node_id for node_id in ready if near(node_id)), None)
            if chosen is not None:
                return chosen
        return ready[0]

    def _keep(self, run: _Run, node_id: str, signature: str, result: NodeResult) -> None:
        run.outputs[node_id] = result.outputs
        run.cache[signature] = result
        if result.ui:
            run.ui[node_id] = result.ui

    def _input_values(self, run: _Run, node: dict[str, Any], node_class: Node) -> dict[str, Any]:
        """Inputs the node's schema names: literals as validated, links from upstream outputs."""
        types = node_class.input_types(self.engine.catalog, self.dirs)
        names = [*types.get("required", {}), *types.get("optional", {})]
        values = {}
        for name in names:
            if name not in node["inputs"]:
                continue
            value = node["inputs"][name]
            values[name] = run.outputs[str(value[0])][value[1]] if _is_link(value) else value
        return values

    def _progress_reporter(self, run: _Run, node_id: str) -> Callable[[int, int], Awaitable[None]]:
        async def report(step: int, steps: int) -> None:
            await self._progress_state(run, node_id, "running", step, steps)
            payload = {"value": step, "max": steps, "prompt_id": run.prompt_id, "node": node_id}
            await self.hub.send("progress", payload, run.client_id)  # no client: every socket, as in ComfyUI
            if self.behaviour.previews:
                await self.hub.send_bytes(PREVIEW_IMAGE, JPEG_PREVIEW + _preview_jpeg(), run.client_id)
            if run.generation.fault_of(FaultKind.WS_DROP):
                run.generation.fault = None
                self.hub.drop(run.client_id)

        return report

    async def _report_failure(self, run: _Run, failure: _NodeError) -> None:
        node_type = run.item.prompt[failure.node_id]["class_type"]
        base = {
            "prompt_id": run.prompt_id,
            "node_id": failure.node_id,
            "node_type": node_type,
            "executed": list(run.executed),
        }
        if isinstance(failure.error, Interrupted):
            await self._message(run, "execution_interrupted", base, broadcast=True)
            return
        if isinstance(failure.error, SimulatedOOM):
            exception_type, message = OOM_EXCEPTION_TYPE, f"{failure.error}\n{OOM_TIPS}"
            self.engine.unload()  # "Got an OOM, unloading all loaded models."
        else:
            exception_type = getattr(failure.error, "exception_type", None) or _full_type_name(type(failure.error))
            message = f"{failure.error}\n"
        details = {
            **base,
            "exception_message": message,
            "exception_type": exception_type,
            "traceback": [],
            "current_inputs": {name: [_format(value)] for name, value in failure.inputs.items()},
            "current_outputs": [node_id for node_id in run.outputs],
        }
        log.info("sim.comfy_node_failed", node=failure.node_id, exception_type=exception_type)
        await self._message(run, "execution_error", details)

    async def _message(self, run: _Run, event: str, data: dict[str, Any], *, broadcast: bool = False) -> None:
        """PromptExecutor.add_message: kept for the history's status, sent when someone listens."""
        data = {**data, "timestamp": int(time.time() * 1000)}
        run.messages.append([event, data])
        if run.client_id is not None or broadcast:
            await self.hub.send(event, data, run.client_id)

    def _signatures(self, item: QueueItem) -> dict[str, str]:
        """Cache keys of every node the outputs need: class, IS_CHANGED, inputs, upstream keys."""
        signatures: dict[str, str] = {}

        def signature(node_id: str) -> str:
            if node_id not in signatures:
                node = item.prompt[node_id]
                node_class = self.nodes[node["class_type"]]
                parts: list[Any] = [node["class_type"], node_class.is_changed(node["inputs"], self.dirs)]
                for name in sorted(node["inputs"]):
                    value = node["inputs"][name]
                    parts.append([name, ["link", signature(str(value[0])), value[1]] if _is_link(value) else value])
                encoded = json.dumps(parts, sort_keys=True, default=str).encode()
                signatures[node_id] = hashlib.sha256(encoded).hexdigest()
            return signatures[node_id]

        for output_id in item.outputs:
            signature(output_id)
        return signatures


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2


def _meta(node_id: str) -> dict[str, Any]:
    return {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}


def _full_type_name(cls: type) -> str:
    """execution.full_type_name: builtins bare, anything else with its module."""
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _format(value: Any) -> Any:
    """execution.format_value: scalars as they are, anything else as its str()."""
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


@functools.cache
def _preview_jpeg() -> bytes:
    """The latent preview's image: what it shows does not matter to any client here."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "gray").save(out, format="JPEG", quality=95)
    return out.getvalue()
