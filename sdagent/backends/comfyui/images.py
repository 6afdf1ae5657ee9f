"""Images in and out of ComfyUI: a job's init image, and saved files converted to the job's format."""

from __future__ import annotations

import base64
import binascii
import io
import os

from PIL import Image, UnidentifiedImageError

from sdagent.errors import BackendError, UnsupportedJob
from sdagent.jobs import Job, OutputFormat

JPEG_QUALITY = 90  # as the A1111 adapter converts, so a job's output looks alike on both backends


WEBP_QUALITY = 90


MEDIA_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "mp4": "video/mp4",
    "webm": "video/webm",
}


STILL_FORMATS = {OutputFormat.PNG: "PNG", OutputFormat.JPEG: "JPEG", OutputFormat.WEBP: "WEBP"}


def init_image_bytes(job: Job) -> bytes:
    init = job.init_image
    assert init is not None
    if init.base64 is None:
        raise BackendError("init_image has no base64: the agent inlines S3 images before the backend")
    text = init.base64.partition(",")[2] if init.base64.startswith("data:") else init.base64
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BackendError(f"init_image.base64 is not valid base64: {exc}") from None


def extension_of(filename: str) -> str:
    extension = os.path.splitext(filename)[1].lower().lstrip(".")
    return "jpeg" if extension == "jpg" else extension


def convert(data: bytes, filename: str, fmt: OutputFormat) -> tuple[bytes, str]:
    """A still image re-encoded into ``fmt``; anything else cannot honestly become it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if fmt not in STILL_FORMATS or getattr(image, "n_frames", 1) > 1:
                raise UnsupportedJob(f"the graph saved {filename}, which cannot be made into {fmt.value}")
            image.load()
            if fmt is not OutputFormat.PNG and image.mode not in ("RGB", "L"):
                # JPEG has no alpha. (Pillow types open() as ImageFile.)
                image = image.convert("RGB")  # type: ignore[assignment]
            buffer = io.BytesIO()
            quality = {OutputFormat.JPEG: {"quality": JPEG_QUALITY}, OutputFormat.WEBP: {"quality": WEBP_QUALITY}}
            image.save(buffer, format=STILL_FORMATS[fmt], **quality.get(fmt, {}))
    except (UnidentifiedImageError, OSError) as exc:
        raise UnsupportedJob(f"the graph saved {filename}, which is no image to make {fmt.value} of: {exc}") from None
    return buffer.getvalue(), fmt.value
