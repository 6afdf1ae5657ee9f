"""Pictures the simulated WebUIs return, drawn by the in-process simulated backend's helpers.

A picture is a recipe (size, seed, prompt, source image) rendered only when its bytes are
needed, so a ComfyUI graph can pass batches between nodes without drawing them. A picture drawn
from the same seed and prompt is the very image the in-process backend returns for that job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from sdagent.backends.simulated import (
    _encode_animation,
    _encode_av,
    _encode_image,
    _encoded_image,
    _encoded_video,
    _render,
)
from sdagent.jobs import OutputFormat


class Picture(Protocol):
    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    def image(self) -> Image.Image: ...

    def png(self) -> bytes: ...


def prompt_key(prompt: str, negative_prompt: str) -> str:
    """The same digest the in-process backend draws from, so equal prompts give equal pictures."""
    return hashlib.sha256(f"{prompt}\0{negative_prompt}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Drawn:
    """A txt2img result: drawn from the seed and the prompt alone."""

    width: int
    height: int
    seed: int
    key: str

    def image(self) -> Image.Image:
        return _render(self.width, self.height, self.seed, self.key)

    def png(self) -> bytes:
        return _encoded_image(self.width, self.height, self.seed, self.key, OutputFormat.PNG)


@dataclass(frozen=True, eq=False)
class Blended:
    """An img2img result: the source blended toward a drawn picture by the denoising strength."""

    source: Picture
    width: int
    height: int
    seed: int
    key: str
    strength: float  # 0 keeps the source, 1 replaces it, as denoising_strength / denoise do

    def image(self) -> Image.Image:
        source = self.source.image().convert("RGB").resize((self.width, self.height))
        return Image.blend(source, _render(self.width, self.height, self.seed, self.key), self.strength)

    def png(self) -> bytes:
        return _encode_image(self.image(), OutputFormat.PNG)


@dataclass(frozen=True, eq=False)
class Loaded:
    """An image that came in from outside: an upload or a base64 init image."""

    pixels: Image.Image

    @property
    def width(self) -> int:
        return self.pixels.width

    @property
    def height(self) -> int:
        return self.pixels.height

    def image(self) -> Image.Image:
        return self.pixels

    def png(self) -> bytes:
        return _encode_image(self.pixels.convert("RGB"), OutputFormat.PNG)


@dataclass(frozen=True)
class Blank:
    """A latent decoded without sampling: flat grey, as an empty latent decodes in ComfyUI."""

    width: int
    height: int

    def image(self) -> Image.Image:
        return Image.new("RGB", (self.width, self.height), (128, 128, 128))

    def png(self) -> bytes:
        return _encode_image(self.image(), OutputFormat.PNG)


def animation(pictures: Sequence[Picture], fps: float, fmt: OutputFormat) -> bytes:
    """A batch played as one clip (animated WebP, WebM, ...), one frame per picture."""
    frame_rate = max(1, round(fps))
    first = pictures[0]
    if isinstance(first, Drawn):
        # A sampled batch plays as the in-process backend's video of its first seed: the same
        # cached encoder, and consecutive frames always differ.
        return _encoded_video(first.width, first.height, first.seed, first.key, fmt, len(pictures), frame_rate)
    frames = [picture.image().convert("RGB").resize((first.width, first.height)) for picture in pictures]
    if fmt in (OutputFormat.MP4, OutputFormat.WEBM):
        return _encode_av(iter(frames), first.width, first.height, frame_rate, fmt)
    return _encode_animation(frames, frame_rate, fmt)


def decode_image(data: bytes) -> Image.Image:
    """Open image bytes fully (a truncated file fails here); raises ValueError."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not an image Pillow can read: {exc}") from None


def decode_base64_image(text: str) -> Image.Image:
    """A base64 image as A1111 accepts it, bare or as a data URL; raises ValueError."""
    if text.startswith("data:image/"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not valid base64: {exc}") from None
    return decode_image(raw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
