"""A job as a ComfyUI graph: the built-in templates filled in, or the caller's graph with the job's explicit fields written into it."""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from sdagent.backends.comfyui.images import STILL_FORMATS, init_image_bytes
from sdagent.backends.workflows import BUILTIN, Template, TemplateError, load_template
from sdagent.errors import BackendError, ConfigError, UnsupportedJob
from sdagent.jobs import Job, JobKind, OutputFormat
from sdagent.modelnames import match_model

log = structlog.get_logger(__name__)

# The template each job kind runs, pinned: a new graph is a new file and a reviewed change here.
TEMPLATES: dict[JobKind, tuple[str, int]] = {
    JobKind.TXT2IMG: ("txt2img", 1),
    JobKind.IMG2IMG: ("img2img", 1),
    JobKind.TXT2VID: ("txt2vid", 1),
}
# What a template must let the job set, per kind; anything else it may leave out, and then a job
# that gives that value is refused rather than run without it.
REQUIRED_PARAMETERS: dict[JobKind, frozenset[str]] = {
    JobKind.TXT2IMG: frozenset({"model", "prompt", "width", "height", "seed", "steps", "cfg"}),
    JobKind.IMG2IMG: frozenset({"model", "prompt", "image", "denoise", "seed", "steps", "cfg"}),
    JobKind.TXT2VID: frozenset({"model", "prompt", "width", "height", "frames", "fps", "seed", "steps", "cfg"}),
}

CHECKPOINT_LOADER = "CheckpointLoaderSimple"


# Sampler nodes a workflow job's seed/steps/cfg_scale/sampler/denoising_strength are written into.
SAMPLER_INPUTS: dict[str, dict[str, str]] = {
    "KSampler": {
        "seed": "seed",
        "steps": "steps",
        "cfg_scale": "cfg",
        "sampler": "sampler_name",
        "denoising_strength": "denoise",
    },
    "KSamplerAdvanced": {"seed": "noise_seed", "steps": "steps", "cfg_scale": "cfg", "sampler": "sampler_name"},
}


FPS_NODES = ("CreateVideo", "SaveWEBM", "SaveAnimatedWEBP", "SaveAnimatedPNG")  # where a clip's frame rate is set


# A job's seed of -1 is drawn here: within the job schema's range, so a result's seed can be resent.
MAX_JOB_SEED = 2**32 - 1


# A1111 sampler names (what most callers know) -> ComfyUI's KSampler names (comfy/samplers.py).
_A1111_SAMPLERS = {
    "euler a": "euler_ancestral",
    "euler": "euler",
    "lms": "lms",
    "heun": "heun",
    "dpm2": "dpm_2",
    "dpm2 a": "dpm_2_ancestral",
    "dpm++ 2s a": "dpmpp_2s_ancestral",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ sde": "dpmpp_sde",
    "dpm++ 2m sde": "dpmpp_2m_sde",
    "dpm++ 3m sde": "dpmpp_3m_sde",
    "dpm fast": "dpm_fast",
    "dpm adaptive": "dpm_adaptive",
    "ddim": "ddim",
    "unipc": "uni_pc",
    "lcm": "lcm",
}


# A1111's legacy "<sampler> <schedule>" names (e.g. "DPM++ 2M Karras") -> ComfyUI scheduler.
_A1111_SCHEDULES = {"karras": "karras", "exponential": "exponential", "sgm uniform": "sgm_uniform"}


_UNSAFE_PREFIX = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class Plan:
    """A job made ready to queue: the graph and what the result must say about it."""

    graph: dict[str, Any]
    output_nodes: list[str] | None  # None: every node that saved files (workflow jobs)
    convert_to: OutputFormat | None  # re-encode still images into this format
    seed: int | None
    info: dict[str, Any]


def load_templates(workflows_dir: Path | None) -> dict[JobKind, Template]:
    """Every pinned template, overrides included, checked at start-up (a bad file fails it)."""
    templates = {}
    for kind, (name, version) in TEMPLATES.items():
        try:
            template = load_template(name, version, workflows_dir)
        except TemplateError as exc:
            raise ConfigError("backend.workflows_dir", str(exc)) from None
        missing = REQUIRED_PARAMETERS[kind] - set(template.parameters)
        if missing:
            raise ConfigError(
                "backend.workflows_dir",
                f"{template.source}: a {kind.value} template needs parameters {sorted(missing)}",
            )
        if template.source != BUILTIN:
            log.info("comfyui.template_overridden", template=template.ref, path=template.source)
        templates[kind] = template
    return templates


def saved_format(template: Template, job: Job) -> tuple[str, OutputFormat | None]:
    """(the format the graph saves, the format to convert stills into or None)."""
    wanted = job.output_format
    if wanted.value in template.outputs:
        return wanted.value, None
    if wanted in STILL_FORMATS and not wanted.is_video and "png" in template.outputs:
        return "png", wanted  # ComfyUI's SaveImage writes PNG only: stills are re-encoded, as A1111's are
    raise UnsupportedJob(
        f"output format {wanted.value}: ComfyUI template {template.ref} saves "
        f"{', '.join(template.outputs)}; ask for one of those"
    )


def filename_prefix(job: Job) -> str:
    return f"sdagent/{_UNSAFE_PREFIX.sub('_', job.job_id)}"


def literal(graph: dict[str, Any], template: Template, parameter: str) -> Any:
    """What the filled graph has for a parameter the job left alone (for the result's info)."""
    targets = template.parameters.get(parameter)
    if not targets or targets[0].node not in graph:
        return None
    return graph[targets[0].node]["inputs"].get(targets[0].input)


def nodes_of(graph: dict[str, Any], class_type: str) -> list[str]:
    return [node for node, spec in graph.items() if spec.get("class_type") == class_type]


def linked(graph: dict[str, Any], node: str, input_name: str) -> str | None:
    """The node linked into ``node.input_name``, if that input is a link to a node of the graph."""
    value = graph[node]["inputs"].get(input_name)
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in graph:
        return str(value[0])
    return None


def linked_nodes(graph: dict[str, Any], nodes: Iterable[str], input_name: str) -> set[str]:
    """The nodes linked directly to ``input_name`` of any of ``nodes``."""
    return {source for node in nodes if (source := linked(graph, node, input_name)) is not None}


def put(graph: dict[str, Any], node: str, input_name: str, value: Any, job_field: str) -> None:
    if isinstance(graph[node]["inputs"].get(input_name), list):
        raise UnsupportedJob(
            f"workflow: {job_field} has no place: {node}.{input_name} ({graph[node].get('class_type')}) is a link"
        )
    graph[node]["inputs"][input_name] = value


def job_name(name: str) -> str:
    """A checkpoint as jobs name it: ComfyUI lists nested files with the OS's separator."""
    return name.replace("\\", "/")


def resolve(model: str, names: Iterable[str]) -> str | None:
    """ComfyUI's name for a job's model: the same path, or the same path without its extension."""
    spelled = {job_name(name): name for name in names}
    found = match_model(model, spelled)
    return spelled[found] if found is not None else None


def combo(body: dict[str, Any], node: str, input_name: str) -> tuple[str, ...] | None:
    """The choices of a list input in an ``/object_info`` entry: ``[[choices], {...}]`` or
    ``["COMBO", {"options": [choices]}]`` (the newer node schema)."""
    entry = body.get(node)
    inputs = entry.get("input") if isinstance(entry, dict) else None
    spec = None
    if isinstance(inputs, dict):
        for section in ("required", "optional"):
            candidates = inputs.get(section)
            if isinstance(candidates, dict) and input_name in candidates:
                spec = candidates[input_name]
                break
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return tuple(str(choice) for choice in spec[0])
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict) and isinstance(spec[1].get("options"), list):
        return tuple(str(choice) for choice in spec[1]["options"])
    return None


class GraphPlanner:
    """Turns a job into the API-format graph ComfyUI queues (rules in
    :meth:`sdagent.backends.comfyui.backend.ComfyUIBackend.generate`).

    ``sampler_lists`` returns ComfyUI's (samplers, schedulers); ``upload`` stores an init image and
    returns the name LoadImage takes; ``rng`` draws the seed of ``seed: -1`` jobs.
    """

    def __init__(
        self,
        templates: dict[JobKind, Template],
        sampler_lists: Callable[[], tuple[tuple[str, ...], tuple[str, ...]]],
        upload: Callable[..., str],
        rng: random.Random,
    ) -> None:
        self._templates = templates
        self._sampler_lists = sampler_lists
        self._upload = upload
        self._rng = rng

    def plan(self, job: Job, checkpoint: str) -> Plan:
        if job.kind is JobKind.WORKFLOW:
            return self._plan_workflow(job, checkpoint)
        return self._plan_template(job, checkpoint)

    def _plan_template(self, job: Job, checkpoint: str) -> Plan:
        template = self._templates[job.kind]
        saved, convert_to = saved_format(template, job)
        seed = self._seed(job.seed)
        values: dict[str, Any] = {
            "model": checkpoint,
            "prompt": job.prompt,
            "seed": seed,
            "steps": job.steps,
            "cfg": job.cfg_scale,
        }
        optional: list[tuple[str, Any, bool]] = [  # (parameter, value, given: not the neutral value)
            ("negative_prompt", job.negative_prompt, job.negative_prompt != ""),
            ("batch_size", job.batch_size, job.batch_size != 1),
            ("filename_prefix", filename_prefix(job), False),
        ]
        if job.sampler is not None:
            sampler_name, scheduler = self._sampler(job.sampler)
            optional.append(("sampler_name", sampler_name, True))
            if scheduler is not None:
                optional.append(("scheduler", scheduler, True))
        if job.kind is JobKind.IMG2IMG:
            values["denoise"] = job.denoising_strength
        else:
            values.update(width=job.width, height=job.height)
        if job.kind is JobKind.TXT2VID:
            assert job.video is not None  # the schema requires it for txt2vid
            values.update(frames=job.video.frames, fps=float(job.video.fps))
        for parameter, value, given in optional:
            if template.accepts(parameter):
                values[parameter] = value
            elif given:
                raise UnsupportedJob(
                    f"template {template.ref} has no place for {parameter} (the job gives {value!r}); "
                    f"it takes: {', '.join(template.parameters)}"
                )
        if job.kind is JobKind.IMG2IMG:  # last: nothing is uploaded for a job refused above
            values["image"] = self._upload(init_image_bytes(job), resize_to=(job.width, job.height))
        graph = template.fill(values, saved)
        info = {
            "model": job.model,
            "ckpt_name": checkpoint,
            "template": template.ref,
            "template_source": template.source,
            "seed": seed,
            "steps": job.steps,
            "cfg_scale": job.cfg_scale,
            "sampler": values.get("sampler_name", literal(graph, template, "sampler_name")),
            "scheduler": values.get("scheduler", literal(graph, template, "scheduler")),
            "width": job.width,
            "height": job.height,
        }
        if job.kind is JobKind.IMG2IMG:
            info["denoising_strength"] = job.denoising_strength
        if job.kind is JobKind.TXT2VID:
            info.update(frames=values["frames"], fps=values["fps"])
        else:
            info["batch_size"] = job.batch_size
        info = {key: value for key, value in info.items() if value is not None}
        return Plan(graph, [template.outputs[saved]], convert_to, seed, info)

    def _plan_workflow(self, job: Job, checkpoint: str) -> Plan:
        assert job.workflow is not None  # the schema requires it for workflow jobs
        graph = copy.deepcopy(job.workflow)
        if not all(isinstance(node, dict) and isinstance(node.get("inputs", {}), dict) for node in graph.values()):
            raise BackendError("workflow is not an API-format graph {node_id: {class_type, inputs}}")
        for node in graph.values():
            node.setdefault("inputs", {})
        given = job.model_fields_set
        self._override_checkpoint(job, graph, checkpoint)
        samplers = [node for node, spec in graph.items() if spec.get("class_type") in SAMPLER_INPUTS]
        seed = self._override_samplers(job, graph, samplers, given)
        self._override_prompts(job, graph, samplers, given)
        self._override_latents(job, graph, samplers, given)
        if job.video is not None and "video" in given:
            savers = [node for node, spec in graph.items() if spec.get("class_type") in FPS_NODES]
            if not savers:
                raise UnsupportedJob(f"workflow: video.fps has no place: no {', '.join(FPS_NODES)} node")
            for node in savers:
                put(graph, node, "fps", float(job.video.fps), "video.fps")
        if job.init_image is not None:  # last: nothing is uploaded for a job refused above
            loads = nodes_of(graph, "LoadImage")
            if len(loads) != 1:
                raise UnsupportedJob(
                    f"workflow: init_image needs exactly one LoadImage node, the graph has {len(loads)}"
                )
            put(graph, loads[0], "image", self._upload(init_image_bytes(job)), "init_image")
        seeds = sorted(
            {value for node in samplers if isinstance(value := graph[node]["inputs"].get(
                SAMPLER_INPUTS[graph[node]["class_type"]]["seed"]), int)}
        )  # fmt: skip
        if seed is None and len(seeds) == 1:
            seed = seeds[0]
        info: dict[str, Any] = {"model": job.model, "ckpt_name": checkpoint, "template": "workflow", "seeds": seeds}
        if seed is not None:
            info["seed"] = seed
        return Plan(graph, None, job.output.format, seed, info)

    def _override_checkpoint(self, job: Job, graph: dict[str, Any], checkpoint: str) -> None:
        loaders = nodes_of(graph, CHECKPOINT_LOADER)
        if len(loaders) == 1:
            put(graph, loaders[0], "ckpt_name", checkpoint, "model")
            return
        named = [graph[node]["inputs"].get("ckpt_name") for node in loaders]
        if not any(isinstance(name, str) and job_name(name) == job_name(checkpoint) for name in named):
            raise UnsupportedJob(
                f"workflow: the job's model {job.model!r} has no place: the graph has {len(loaders)} "
                f"{CHECKPOINT_LOADER} nodes; the model is written into a single one, or must already be "
                "named by one of several"
            )

    def _override_samplers(self, job: Job, graph: dict[str, Any], samplers: list[str], given: set[str]) -> int | None:
        """Write the sampling fields the job sets into every sampler node; returns the seed written."""
        values: dict[str, Any] = {name: getattr(job, name) for name in ("steps", "cfg_scale", "denoising_strength")
                                  if name in given}  # fmt: skip
        seed = None
        if "seed" in given:
            values["seed"] = seed = self._seed(job.seed)
        scheduler = None
        if "sampler" in given and job.sampler is not None:
            values["sampler"], scheduler = self._sampler(job.sampler)
        for job_field, value in values.items():
            targets = [
                (node, name) for node in samplers if (name := SAMPLER_INPUTS[graph[node]["class_type"]].get(job_field))
            ]
            if not targets:
                raise UnsupportedJob(f"workflow: {job_field} has no place: no {' or '.join(SAMPLER_INPUTS)} takes it")
            for node, input_name in targets:
                put(graph, node, input_name, value, job_field)
                if job_field == "sampler" and scheduler is not None:
                    put(graph, node, "scheduler", scheduler, job_field)
        return seed

    def _override_prompts(self, job: Job, graph: dict[str, Any], samplers: list[str], given: set[str]) -> None:
        wanted = {"prompt": ("positive", job.prompt), "negative_prompt": ("negative", job.negative_prompt)}
        written: dict[str, str] = {}
        for job_field, (slot, text) in wanted.items():
            if job_field not in given:
                continue
            encoders = {
                node
                for node in linked_nodes(graph, samplers, slot)
                if graph[node].get("class_type") == "CLIPTextEncode"
            }
            if not encoders:
                raise UnsupportedJob(
                    f"workflow: {job_field} has no place: no CLIPTextEncode is linked directly to a sampler's {slot}"
                )
            for node in sorted(encoders):
                if written.get(node, text) != text:
                    raise UnsupportedJob(f"workflow: CLIPTextEncode {node} feeds both positive and negative")
                put(graph, node, "text", text, job_field)
                written[node] = text

    def _override_latents(self, job: Job, graph: dict[str, Any], samplers: list[str], given: set[str]) -> None:
        values = {name: getattr(job, name) for name in ("width", "height", "batch_size") if name in given}
        if job.video is not None and "video" in given:
            if "batch_size" in values and values["batch_size"] != job.video.frames:
                raise UnsupportedJob("workflow: batch_size and video.frames both set the latent batch; give one")
            values["batch_size"] = job.video.frames
        if not values:
            return
        latents = {
            node
            for node in linked_nodes(graph, samplers, "latent_image")
            if graph[node].get("class_type") == "EmptyLatentImage"
        }
        if not latents:
            raise UnsupportedJob(
                f"workflow: {', '.join(values)} have no place: no EmptyLatentImage is linked directly to a "
                "sampler's latent_image"
            )
        for node in sorted(latents):
            for name, value in values.items():
                put(graph, node, name, value, name)

    def _seed(self, seed: int) -> int:
        return seed if seed != -1 else self._rng.randrange(MAX_JOB_SEED)

    def _sampler(self, name: str) -> tuple[str, str | None]:
        """ComfyUI's (sampler_name, scheduler or None) for a job's sampler, ComfyUI's or A1111's name."""
        samplers, schedulers = self._sampler_lists()
        if name in samplers:
            return name, None
        lowered, scheduler = name.lower(), None
        for label, comfy_name in _A1111_SCHEDULES.items():
            if lowered.endswith(f" {label}") and comfy_name in schedulers:
                lowered, scheduler = lowered[: -len(label) - 1], comfy_name
                break
        translated = _A1111_SAMPLERS.get(lowered, lowered)
        if translated not in samplers:
            raise UnsupportedJob(
                f"sampler {name!r} is neither a ComfyUI sampler ({', '.join(samplers)}) nor an A1111 name with one"
            )
        return translated, scheduler
