"""AUTOMATIC1111's API shapes: request models, sampler tables and error bodies.

Field names and defaults follow ``modules/api/models.py`` (generated there from the processing
classes) and ``modules/processing.py``. A1111 1.x runs on pydantic 1 behind FastAPI, so a bad
field answers 422 ``{"detail": [{"loc", "msg", "type"}]}`` with pydantic-1 wording; this module
maps pydantic 2's errors onto that wording.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

# Not an A1111 limit (it tries any size and fails on the GPU): the pictures need a few pixels, and
# very large sizes already fail the VRAM check.
MIN_SIDE, MAX_SIDE = 8, 16384
DEFAULT_SAMPLER = "Euler"  # models.py: sampler_index defaults to "Euler" when sampler_name is unset

# (name, aliases, options) as GET /sdapi/v1/samplers lists them in A1111 1.10.1: option values
# are strings ("True"), as the real server sends them.
SAMPLERS: tuple[tuple[str, list[str], dict[str, Any]], ...] = (
    ("DPM++ 2M", ["k_dpmpp_2m"], {"scheduler": "karras"}),
    ("DPM++ SDE", ["k_dpmpp_sde"], {"scheduler": "karras", "second_order": "True", "brownian_noise": "True"}),
    ("DPM++ 2M SDE", ["k_dpmpp_2m_sde"], {"scheduler": "exponential", "brownian_noise": "True"}),
    (
        "DPM++ 2M SDE Heun",
        ["k_dpmpp_2m_sde_heun"],
        {"scheduler": "exponential", "brownian_noise": "True", "solver_type": "heun"},
    ),
    ("DPM++ 2S a", ["k_dpmpp_2s_a"], {"scheduler": "karras", "uses_ensd": "True", "second_order": "True"}),
    (
        "DPM++ 3M SDE",
        ["k_dpmpp_3m_sde"],
        {"scheduler": "exponential", "discard_next_to_last_sigma": "True", "brownian_noise": "True"},
    ),
    ("Euler a", ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": "True"}),
    ("Euler", ["k_euler"], {}),
    ("LMS", ["k_lms"], {}),
    ("Heun", ["k_heun"], {"second_order": "True"}),
    ("DPM2", ["k_dpm_2"], {"scheduler": "karras", "discard_next_to_last_sigma": "True", "second_order": "True"}),
    (
        "DPM2 a",
        ["k_dpm_2_a"],
        {"scheduler": "karras", "discard_next_to_last_sigma": "True", "uses_ensd": "True", "second_order": "True"},
    ),
    ("DPM fast", ["k_dpm_fast"], {"uses_ensd": "True"}),
    ("DPM adaptive", ["k_dpm_ad"], {"uses_ensd": "True"}),
    ("Restart", ["restart"], {"scheduler": "karras", "second_order": "True"}),
    ("DDIM", ["ddim"], {}),
    ("DDIM CFG++", ["ddim_cfgpp"], {}),
    ("PLMS", ["plms"], {}),
    ("UniPC", ["unipc"], {}),
    ("LCM", ["k_lcm"], {}),
)
# An unknown sampler_name is not refused: A1111 1.10 logs "Sampler Scheduler autocorrection" and
# runs this one (fix_p_invalid_sampler_and_scheduler).
FALLBACK_SAMPLER = "DPM++ 2M"
SAMPLER_NAMES = frozenset(name for name, _, _ in SAMPLERS)

# (name, label, aliases, default_rho, need_inner_model) as GET /sdapi/v1/schedulers lists them.
SCHEDULERS: tuple[tuple[str, str, list[str] | None, float, bool], ...] = (
    ("automatic", "Automatic", None, -1, False),
    ("uniform", "Uniform", None, -1, True),
    ("karras", "Karras", None, 7.0, False),
    ("exponential", "Exponential", None, -1, False),
    ("polyexponential", "Polyexponential", None, 1.0, False),
    ("sgm_uniform", "SGM Uniform", ["SGMUniform"], -1, True),
    ("kl_optimal", "KL Optimal", None, -1, False),
    ("align_your_steps", "Align Your Steps", None, -1, False),
    ("simple", "Simple", None, -1, True),
    ("normal", "Normal", None, -1, True),
    ("ddim", "DDIM", None, -1, True),
    ("beta", "Beta", None, -1, True),
)


class GenerationRequest(BaseModel):
    """Fields txt2img and img2img share. Every A1111 field is Optional; null means the default."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0  # echoed as given: A1111's default is the int 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    # No bounds, as in A1111's models: a zero fails inside the pipeline (see a1111._pipeline_error).
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = Field(512, ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(512, ge=MIN_SIDE, le=MAX_SIDE)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    sampler_index: str = DEFAULT_SAMPLER
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None
    infotext: str | None = None
    firstpass_image: str | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name is not None:
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)
        return value


class Txt2ImgRequest(GenerationRequest):
    denoising_strength: float | None = None  # only used by the hires pass
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    denoising_strength: float = 0.75
    include_init_images: bool = False


# pydantic 2 error type -> pydantic 1 (type, msg), the wording A1111's 422 answers carry.
_PYDANTIC1: dict[str, tuple[str, str]] = {
    "int_parsing": ("type_error.integer", "value is not a valid integer"),
    "int_type": ("type_error.integer", "value is not a valid integer"),
    "int_from_float": ("type_error.integer", "value is not a valid integer"),
    "float_parsing": ("type_error.float", "value is not a valid float"),
    "float_type": ("type_error.float", "value is not a valid float"),
    "string_type": ("type_error.str", "str type expected"),
    "bool_parsing": ("type_error.bool", "value could not be parsed to a boolean"),
    "bool_type": ("type_error.bool", "value could not be parsed to a boolean"),
    "list_type": ("type_error.list", "value is not a valid list"),
    "dict_type": ("type_error.dict", "value is not a valid dict"),
}


def validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic 2 errors as FastAPI + pydantic 1 would list them under ``detail``."""
    detail = []
    for error in exc.errors(include_url=False):
        loc = ["body", *error["loc"]]
        kind = error["type"]
        ctx = error.get("ctx") or {}
        if kind == "greater_than_equal":
            entry = {
                "type": "value_error.number.not_ge",
                "msg": f"ensure this value is greater than or equal to {ctx['ge']}",
                "ctx": {"limit_value": ctx["ge"]},
            }
        elif kind == "less_than_equal":
            entry = {
                "type": "value_error.number.not_le",
                "msg": f"ensure this value is less than or equal to {ctx['le']}",
                "ctx": {"limit_value": ctx["le"]},
            }
        else:
            typ, msg = _PYDANTIC1.get(kind, (f"value_error.{kind}", error["msg"]))
            entry = {"type": typ, "msg": msg}
        detail.append({"loc": loc, **entry})
    return detail


def unprocessable(detail: list[dict[str, Any]]) -> web.Response:
    return web.json_response({"detail": detail}, status=422)


def error_response(status: int, error: str, *, detail: str = "", errors: str = "") -> web.Response:
    """The body A1111's exception middleware answers with (``api.py``, ``handle_exception``)."""
    return web.json_response({"error": error, "detail": detail, "body": "", "errors": errors}, status=status)


def http_exception(status: int, detail: str) -> web.Response:
    """What ``raise HTTPException(status, detail)`` in an A1111 handler turns into."""
    return error_response(status, "HTTPException", detail=detail)


async def parse_request(request: web.Request, model: type[GenerationRequest]) -> GenerationRequest | web.Response:
    """The validated request, or the 422 answer A1111 gives for it."""
    raw = await request.read()
    try:
        document = json.loads(raw)
    except ValueError as exc:
        position = getattr(exc, "pos", 0)
        return unprocessable([{"loc": ["body", position], "msg": str(exc), "type": "value_error.jsondecode"}])
    if not isinstance(document, dict):
        return unprocessable([{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}])
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        return unprocessable(validation_detail(exc))


def resolve_sampler(name: str, scheduler: str | None) -> tuple[str, str | None]:
    """(sampler, scheduler label or None) as A1111 1.10 runs them.

    A legacy name with the schedule folded in ("DPM++ 2M Karras") is split; an unknown sampler
    becomes FALLBACK_SAMPLER and an unknown scheduler "Automatic", silently, as in
    ``sd_samplers.fix_p_invalid_sampler_and_scheduler``. "Automatic" is reported as the
    sampler's own default schedule, or not at all when it has none (Euler).
    """
    labels = {label: label for _, label, _, _, _ in SCHEDULERS}
    labels.update({key: label for key, label, _, _, _ in SCHEDULERS})
    if name not in SAMPLER_NAMES:
        for label in labels.values():
            if name.endswith(f" {label}") and name[: -len(label) - 1] in SAMPLER_NAMES:
                return name[: -len(label) - 1], label
        name = FALLBACK_SAMPLER
    label = labels.get(scheduler or "", "Automatic")
    if label != "Automatic":
        return name, label
    default = next(options.get("scheduler") for sampler, _, options in SAMPLERS if sampler == name)
    return name, labels.get(default) if default else None


def samplers_payload() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": aliases, "options": options} for name, aliases, options in SAMPLERS]


def schedulers_payload() -> list[dict[str, Any]]:
    return [
        {"name": name, "label": label, "aliases": aliases, "default_rho": rho, "need_inner_model": inner}
        for name, label, aliases, rho, inner in SCHEDULERS
    ]
