"""A faithful simulator of the Stable Diffusion WebUIs' HTTP APIs (AUTOMATIC1111 and ComfyUI).

One aiohttp server on one port answers both APIs with their real request and response shapes,
timing (steps, model loads and switches), VRAM limits and failure modes, drawing real images and
videos without a model or a GPU. It stands in for the WebUI in tests, benchmarks and the demo, and
says so: every log event carries ``simulator=True`` and ``/system_stats`` names the device
"SIMULATED".

Modules: ``options`` (configuration), ``catalog`` (checkpoints), ``engine`` (the shared simulated
GPU), ``faults`` (injected failures), ``render`` (pictures), ``a1111``/``a1111_schema`` (the
A1111 API), ``comfyui``/``comfy_nodes``/``comfy_validate``/``comfy_exec``/``comfy_ws`` (the ComfyUI
API), ``control`` (``/sim`` routes), ``server`` (the app), ``thread`` (in-process harness),
``cli`` (the command line).
"""

from sdagent.sim.options import SimOptions

__all__ = ["SimOptions"]
