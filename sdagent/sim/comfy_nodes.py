"""The ComfyUI node classes the simulator runs: a small set, with their real schemas.

Schemas (inputs, limits, return types, categories) follow ``nodes.py`` and, for the two video
savers, ``comfy_extras/nodes_images.py`` (SaveAnimatedWEBP) and ``comfy_extras/nodes_video.py``
(SaveWEBM, CreateVideo, SaveVideo). Values flowing between nodes are recipes, not tensors: a MODEL is the checkpoint's
name, a LATENT knows its size and the pictures sampling will draw, an IMAGE is a batch of
:mod:`sdagent.sim.render` pictures. Files really are written to the output directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sdagent.errors import SdagentError
from sdagent.jobs import OutputFormat
from sdagent.sim.catalog import Catalog
from sdagent.sim.engine import Engine, Generation, Outcome
from sdagent.sim.render import Blank, Blended, Drawn, Loaded, Picture, animation, decode_image, prompt_key

MAX_RESOLUTION = 16384
MAX_SEED = 0xFFFFFFFFFFFFFFFF
# comfy/samplers.py 0.3.64: KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"] (SAMPLER_NAMES, 42).
SAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]  # fmt: skip
SCHEDULER_NAMES = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
]  # fmt: skip
PREFIX_TOOLTIP = "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."  # noqa: E501 - ComfyUI's text, verbatim
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
DIR_TYPES = ("input", "output", "temp")


# --- values flowing between nodes ---


@dataclass(frozen=True)
class CheckpointRef:
    """MODEL, CLIP and VAE alike: which checkpoint they came from."""

    name: str


@dataclass(frozen=True)
class Conditioning:
    text: str


@dataclass(frozen=True, eq=False)
class Latent:
    width: int
    height: int
    batch_size: int
    source: tuple[Picture, ...] | None = None  # VAEEncode's pixels: sampling blends toward them
    sampled: tuple[Picture, ...] | None = None  # what VAEDecode will show


@dataclass(frozen=True)
class Mask:
    width: int
    height: int


@dataclass
class NodeResult:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None = None


class NodeFailure(SdagentError):
    """Raised by a node the way a Python exception escapes a real one; ``exception_type`` is reported."""

    def __init__(self, message: str, exception_type: str = "Exception") -> None:
        super().__init__(message)
        self.exception_type = exception_type


class Interrupted(SdagentError):
    """comfy.model_management.InterruptProcessingException: ``/interrupt`` reached a running node."""


@dataclass(frozen=True)
class Dirs:
    """ComfyUI's input, output and temp directories."""

    root: Path

    def by_type(self, kind: str) -> Path | None:
        return self.root / kind if kind in DIR_TYPES else None

    @staticmethod
    def split_annotation(name: str) -> tuple[str | None, str]:
        """(directory type, file name): ``x.png [output]`` names the output dir, as folder_paths does."""
        match = re.fullmatch(r"(.*) \[(input|output|temp)\]", name)
        return (match.group(2), match.group(1)) if match else (None, name)

    def create(self) -> None:
        for kind in DIR_TYPES:
            (self.root / kind).mkdir(parents=True, exist_ok=True)


@dataclass
class RunContext:
    """What a running node may use: the engine, its generation, the dirs, and progress reporting."""

    engine: Engine
    generation: Generation
    dirs: Dirs
    on_progress: Callable[[int, int], Awaitable[None]]


# --- node classes ---


class Node:
    """One node class: its ``/object_info`` schema and what running it does."""

    name: ClassVar[str]
    display_name: ClassVar[str | None]
    category: ClassVar[str]
    description: ClassVar[str] = ""
    return_types: ClassVar[tuple[str, ...]] = ()
    output_node: ClassVar[bool] = False
    python_module: ClassVar[str] = "nodes"
    experimental: ClassVar[bool] = False
    output_tooltips: ClassVar[tuple[str | None, ...] | None] = None
    # A node of ComfyUI's V3 schema (comfy_api.latest.io): described with COMBO inputs and more fields.
    v3: ClassVar[bool] = False
    # Inputs a VALIDATE_INPUTS takes; validation then skips their list/min/max checks.
    validated_inputs: ClassVar[tuple[str, ...]] = ()

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        raise NotImplementedError

    def validate(self, inputs: dict[str, Any], dirs: Dirs) -> bool | str:
        """VALIDATE_INPUTS: True, or why the inputs are invalid."""
        return True

    def is_changed(self, inputs: dict[str, Any], dirs: Dirs) -> str:
        """IS_CHANGED: part of the cache key, for nodes whose output depends on more than inputs."""
        return ""

    async def run(self, ctx: RunContext, *args: Any, **inputs: Any) -> NodeResult:
        raise NotImplementedError

    def info(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        """The node's entry in ``GET /object_info``."""
        types = self.input_types(catalog, dirs)
        info: dict[str, Any] = {
            "input": types,
            "input_order": {key: list(value) for key, value in types.items()},
            "output": list(self.return_types),
            "output_is_list": [False] * len(self.return_types),
            "output_name": list(self.return_types),
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }
        if self.output_tooltips is not None:
            info["output_tooltips"] = list(self.output_tooltips)
        if self.v3:
            info["input"] = {category: {name: _v3_spec(spec) for name, spec in inputs.items()}
                             for category, inputs in types.items()}  # fmt: skip
            info.update(deprecated=False, experimental=self.experimental, api_node=False)
        elif self.experimental:
            info["experimental"] = True
        return info


def _v3_spec(spec: Any) -> list[Any]:
    """An input as the V3 schema describes it: a list becomes COMBO with options, STRING says multiline."""
    if isinstance(spec, str):  # a hidden input
        return [spec]
    kind, options = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    if isinstance(kind, list):
        kind, options = "COMBO", {**options, "multiselect": False, "options": kind}
    elif kind == "STRING":
        options.setdefault("multiline", False)
    return [kind, options]


class CheckpointLoaderSimple(Node):
    name = "CheckpointLoaderSimple"
    output_tooltips = (
        "The model used for denoising latents.",
        "The CLIP model used for encoding text prompts.",
        "The VAE model used for encoding and decoding images to and from latent space.",
    )
    display_name = "Load Checkpoint"
    category = "loaders"
    description = "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."
    return_types = ("MODEL", "CLIP", "VAE")

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        names = catalog.names()
        return {"required": {"ckpt_name": (names, {"tooltip": "The name of the checkpoint (model) to load."})}}

    async def run(self, ctx: RunContext, ckpt_name: str) -> NodeResult:
        checkpoint = ctx.engine.catalog.get(ckpt_name)
        if checkpoint is None:  # deleted between validation and execution
            raise NodeFailure(f"[Errno 2] No such file or directory: '{ckpt_name}'", "FileNotFoundError")
        await ctx.engine.ensure_loaded(checkpoint)
        ref = CheckpointRef(ckpt_name)
        return NodeResult((ref, ref, ref))


class CLIPTextEncode(Node):
    name = "CLIPTextEncode"
    output_tooltips = ("A conditioning containing the embedded text used to guide the diffusion model.",)
    display_name = "CLIP Text Encode (Prompt)"
    category = "conditioning"
    description = (
        "Encodes a text prompt using a CLIP model into an embedding that can be used to guide the diffusion model "
        "towards generating specific images."
    )
    return_types = ("CONDITIONING",)

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        return {
            "required": {
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}),
                "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
            }
        }

    async def run(self, ctx: RunContext, text: str, clip: CheckpointRef) -> NodeResult:
        return NodeResult((Conditioning(text),))


class EmptyLatentImage(Node):
    name = "EmptyLatentImage"
    output_tooltips = ("The empty latent image batch.",)
    display_name = "Empty Latent Image"
    category = "latent"
    description = "Create a new batch of empty latent images to be denoised via sampling."
    return_types = ("LATENT",)

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        side = {"min": 16, "max": MAX_RESOLUTION, "step": 8}
        return {
            "required": {
                "width": ("INT", {"default": 512, **side, "tooltip": "The width of the latent images in pixels."}),
                "height": ("INT", {"default": 512, **side, "tooltip": "The height of the latent images in pixels."}),
                "batch_size": (
                    "INT",
                    {"default": 1, "min": 1, "max": 4096, "tooltip": "The number of latent images in the batch."},
                ),
            }
        }

    async def run(self, ctx: RunContext, width: int, height: int, batch_size: int) -> NodeResult:
        # Latents are 1/8 of the pixels, so sizes round down to a multiple of 8.
        return NodeResult((Latent(width // 8 * 8, height // 8 * 8, batch_size),))


class KSampler(Node):
    name = "KSampler"
    output_tooltips = ("The denoised latent.",)
    display_name = "KSampler"
    category = "sampling"
    description = "Uses the provided model, positive and negative conditioning to denoise the latent image."
    return_types = ("LATENT",)

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_SEED,
                        "control_after_generate": True,
                        "tooltip": "The random seed used for creating the noise.",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 20,
                        "min": 1,
                        "max": 10000,
                        "tooltip": "The number of steps used in the denoising process.",
                    },
                ),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 8.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher values result in images more closely matching the prompt however too high values will negatively impact quality.",  # noqa: E501 - ComfyUI's text, verbatim
                    },
                ),
                "sampler_name": (
                    SAMPLER_NAMES,
                    {
                        "tooltip": "The algorithm used when sampling, this can affect the quality, speed, and style of the generated output."  # noqa: E501 - ComfyUI's text, verbatim
                    },
                ),
                "scheduler": (
                    SCHEDULER_NAMES,
                    {"tooltip": "The scheduler controls how noise is gradually removed to form the image."},
                ),
                "positive": (
                    "CONDITIONING",
                    {"tooltip": "The conditioning describing the attributes you want to include in the image."},
                ),
                "negative": (
                    "CONDITIONING",
                    {"tooltip": "The conditioning describing the attributes you want to exclude from the image."},
                ),
                "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "The amount of denoising applied, lower values will maintain the structure of the initial image allowing for image to image sampling.",  # noqa: E501 - ComfyUI's text, verbatim
                    },
                ),
            }
        }

    async def run(
        self,
        ctx: RunContext,
        model: CheckpointRef,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        positive: Conditioning,
        negative: Conditioning,
        latent_image: Latent,
        denoise: float,
    ) -> NodeResult:
        engine = ctx.engine
        if engine.loaded is None or engine.loaded.name != model.name:
            # The loader's output was cached but the weights left VRAM (/free, an OOM, the other API).
            checkpoint = engine.catalog.get(model.name)
            if checkpoint is None:
                raise NodeFailure(f"[Errno 2] No such file or directory: '{model.name}'", "FileNotFoundError")
            await engine.ensure_loaded(checkpoint)
        latent = latent_image
        with engine.working_memory(latent.width, latent.height, latent.batch_size):
            outcome = await engine.run_steps(ctx.generation, steps, ctx.on_progress)
        if outcome is Outcome.INTERRUPTED:
            raise Interrupted("Processing interrupted")
        key = prompt_key(positive.text, negative.text)
        sampled: list[Picture] = []
        for index in range(latent.batch_size):
            if latent.source is None:
                sampled.append(Drawn(latent.width, latent.height, seed + index, key))
            else:
                source = latent.source[index % len(latent.source)]
                sampled.append(Blended(source, latent.width, latent.height, seed + index, key, denoise))
        return NodeResult((Latent(latent.width, latent.height, latent.batch_size, latent.source, tuple(sampled)),))


class VAEDecode(Node):
    name = "VAEDecode"
    output_tooltips = ("The decoded image.",)
    display_name = "VAE Decode"
    category = "latent"
    description = "Decodes latent images back into pixel space images."
    return_types = ("IMAGE",)

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
                "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."}),
            }
        }

    async def run(self, ctx: RunContext, samples: Latent, vae: CheckpointRef) -> NodeResult:
        if samples.sampled is not None:
            return NodeResult((samples.sampled,))
        if samples.source is not None:
            return NodeResult((samples.source,))
        return NodeResult((tuple(Blank(samples.width, samples.height) for _ in range(samples.batch_size)),))


class VAEEncode(Node):
    name = "VAEEncode"
    display_name = "VAE Encode"
    category = "latent"
    return_types = ("LATENT",)

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    async def run(self, ctx: RunContext, pixels: tuple[Picture, ...], vae: CheckpointRef) -> NodeResult:
        first = pixels[0]
        # vae_encode_crop_pixels: the pixels are cropped to a multiple of 8.
        return NodeResult((Latent(first.width // 8 * 8, first.height // 8 * 8, len(pixels), source=pixels),))


class LoadImage(Node):
    name = "LoadImage"
    display_name = "Load Image"
    category = "image"
    return_types = ("IMAGE", "MASK")
    validated_inputs = ("image",)

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        input_dir = dirs.root / "input"
        files = sorted(path.name for path in input_dir.iterdir() if path.is_file()) if input_dir.is_dir() else []
        return {"required": {"image": (files, {"image_upload": True})}}

    def validate(self, inputs: dict[str, Any], dirs: Dirs) -> bool | str:
        if _input_file(dirs, str(inputs.get("image", ""))) is None:
            return f"Invalid image file: {inputs.get('image')}"
        return True

    def is_changed(self, inputs: dict[str, Any], dirs: Dirs) -> str:
        path = _input_file(dirs, str(inputs.get("image", "")))
        return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else ""

    async def run(self, ctx: RunContext, image: str) -> NodeResult:
        path = _input_file(ctx.dirs, image)
        if path is None:  # deleted between validation and execution
            raise NodeFailure(f"[Errno 2] No such file or directory: '{image}'", "FileNotFoundError")
        try:
            pixels = await asyncio.to_thread(lambda: decode_image(path.read_bytes()))
        except (OSError, ValueError) as exc:
            raise NodeFailure(str(exc), "PIL.UnidentifiedImageError") from None
        return NodeResult(((Loaded(pixels),), Mask(pixels.width, pixels.height)))


class SaveImage(Node):
    name = "SaveImage"
    display_name = "Save Image"
    category = "image"
    description = "Saves the input images to your ComfyUI output directory."
    output_node = True

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": PREFIX_TOOLTIP}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    async def run(self, ctx: RunContext, images: tuple[Picture, ...], filename_prefix: str) -> NodeResult:
        folder, base, counter, subfolder = save_path(ctx.dirs.root / "output", filename_prefix)
        results = []
        for offset, picture in enumerate(images):
            filename = f"{base}_{counter + offset:05}_.png"
            await asyncio.to_thread(_write_png, folder / filename, picture)  # drawn off the event loop
            results.append({"filename": filename, "subfolder": subfolder, "type": "output"})
        return NodeResult((), {"images": results})


class _SaveAnimation(Node):
    """A batch saved as one clip, as AnimateDiff-style txt2vid graphs end."""

    output_node = True
    fmt: ClassVar[OutputFormat]
    fps_default: ClassVar[float]

    async def _save(self, ctx: RunContext, images: tuple[Picture, ...], filename_prefix: str, fps: float) -> NodeResult:
        folder, base, counter, subfolder = save_path(ctx.dirs.root / "output", filename_prefix)
        filename = f"{base}_{counter:05}_.{self.fmt.value}"
        data = await asyncio.to_thread(animation, images, fps, self.fmt)
        await asyncio.to_thread((folder / filename).write_bytes, data)
        return NodeResult(
            (), {"images": [{"filename": filename, "subfolder": subfolder, "type": "output"}], "animated": [True]}
        )


class SaveAnimatedWEBP(_SaveAnimation):
    name = "SaveAnimatedWEBP"
    display_name = "SaveAnimatedWEBP"
    category = "image/animation"
    python_module = "comfy_extras.nodes_images"
    fmt = OutputFormat.WEBP

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
                "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "lossless": ("BOOLEAN", {"default": True}),
                "quality": ("INT", {"default": 80, "min": 0, "max": 100}),
                "method": (["default", "fastest", "slowest"],),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    async def run(  # lossless, quality and method only change the file size: the simulator ignores them
        self, ctx: RunContext, images: tuple[Picture, ...], filename_prefix: str, fps: float, **_: Any
    ) -> NodeResult:
        return await self._save(ctx, images, filename_prefix, fps)


class SaveWEBM(_SaveAnimation):
    name = "SaveWEBM"
    v3 = True
    output_tooltips = ()
    display_name = "SaveWEBM"
    category = "image/video"
    python_module = "comfy_extras.nodes_video"
    experimental = True
    fmt = OutputFormat.WEBM

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
                "codec": (["vp9", "av1"],),
                "fps": ("FLOAT", {"default": 24.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "crf": (
                    "FLOAT",
                    {
                        "default": 32.0,
                        "min": 0,
                        "max": 63.0,
                        "step": 1,
                        "tooltip": "Higher crf means lower quality with a smaller file size, lower crf means higher quality higher filesize.",  # noqa: E501 - ComfyUI's text, verbatim
                    },
                ),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    async def run(  # the simulator always encodes VP9 (or VP8), whatever codec and crf say
        self, ctx: RunContext, images: tuple[Picture, ...], filename_prefix: str, fps: float, **_: Any
    ) -> NodeResult:
        return await self._save(ctx, images, filename_prefix, fps)


@dataclass(frozen=True)
class Clip:
    """A VIDEO value: the frames and their rate, encoded only when saved."""

    frames: tuple[Picture, ...]
    fps: float


class CreateVideo(Node):
    name = "CreateVideo"
    v3 = True
    output_tooltips = (None,)
    display_name = "Create Video"
    category = "image/video"
    description = "Create a video from images."
    python_module = "comfy_extras.nodes_video"
    return_types = ("VIDEO",)

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to create a video from."}),
                "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0}),
            },
            "optional": {"audio": ("AUDIO", {"tooltip": "The audio to add to the video."})},
        }

    async def run(self, ctx: RunContext, images: tuple[Picture, ...], fps: float, **_: Any) -> NodeResult:
        return NodeResult((Clip(images, fps),), None)


class SaveVideo(Node):
    name = "SaveVideo"
    v3 = True
    output_tooltips = ()
    display_name = "Save Video"
    category = "image/video"
    description = "Saves the input images to your ComfyUI output directory."
    python_module = "comfy_extras.nodes_video"
    output_node = True

    def input_types(self, catalog: Catalog, dirs: Dirs) -> dict[str, Any]:
        return {
            "required": {
                "video": ("VIDEO", {"tooltip": "The video to save."}),
                "filename_prefix": ("STRING", {"default": "video/ComfyUI", "tooltip": PREFIX_TOOLTIP}),
                "format": (["auto", "mp4"], {"default": "auto", "tooltip": "The format to save the video as."}),
                "codec": (["auto", "h264"], {"default": "auto", "tooltip": "The codec to use for the video."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    async def run(self, ctx: RunContext, video: Clip, filename_prefix: str, **_: Any) -> NodeResult:
        folder, base, counter, subfolder = save_path(ctx.dirs.root / "output", filename_prefix)
        filename = f"{base}_{counter:05}_.mp4"  # "auto" and "mp4" both write MP4 (H.264)
        data = await asyncio.to_thread(animation, video.frames, video.fps, OutputFormat.MP4)
        await asyncio.to_thread((folder / filename).write_bytes, data)
        return NodeResult(
            (), {"images": [{"filename": filename, "subfolder": subfolder, "type": "output"}], "animated": [True]}
        )


NODE_CLASSES: tuple[type[Node], ...] = (
    CheckpointLoaderSimple,
    CLIPTextEncode,
    EmptyLatentImage,
    KSampler,
    VAEDecode,
    VAEEncode,
    LoadImage,
    SaveImage,
    SaveAnimatedWEBP,
    SaveWEBM,
    CreateVideo,
    SaveVideo,
)


def registry() -> dict[str, Node]:
    """NODE_CLASS_MAPPINGS: class name -> node."""
    return {cls.name: cls() for cls in NODE_CLASSES}


def save_path(output_dir: Path, prefix: str) -> tuple[Path, str, int, str]:
    """(folder, file base name, next counter, subfolder), as ``folder_paths.get_save_image_path``."""
    subfolder, base = os.path.split(os.path.normpath(prefix))
    folder = (output_dir / subfolder).resolve()
    if os.path.commonpath((output_dir.resolve(), folder)) != str(output_dir.resolve()):
        raise NodeFailure(
            f"**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {folder}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"{re.escape(base)}_(\d+)_")
    counters = [int(match.group(1)) for path in folder.iterdir() if (match := pattern.match(path.name))]
    return folder, base, max(counters, default=0) + 1, subfolder


def _input_file(dirs: Dirs, name: str) -> Path | None:
    """The existing file an image input names, or None (missing, or outside its folder)."""
    kind, filename = dirs.split_annotation(name)
    folder = dirs.root / (kind or "input")
    if not filename or "\0" in filename:
        return None
    path = (folder / filename).resolve()
    if os.path.commonpath((folder.resolve(), path)) != str(folder.resolve()) or not path.is_file():
        return None
    return path


def _write_png(path: Path, picture: Picture) -> None:
    path.write_bytes(picture.png())
