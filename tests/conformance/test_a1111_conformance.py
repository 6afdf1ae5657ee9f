"""The real AUTOMATIC1111 v1.10.1 (CPU, tiny random-weight checkpoints) under ``sdagent run``:
jobs through Kafka, outputs in S3 (moto), the WebUI launched by the shipped launcher."""

from __future__ import annotations

import base64
import io
import signal
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from PIL import Image

from sdagent.cache.testing import make_store
from sdagent.devstack.moto import aws_client
from sdagent.jobs import Status
from tests.conformance.conftest import MODELS, Stack, link_models, start_stack

TINY_A, TINY_B = MODELS["a1111"]
SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}
# Long enough on this CPU to act while it samples (a step of 256x256 takes tens of ms).
LONG = {"prompt": "a long one", "width": 256, "height": 256, "steps": 150}


@pytest.fixture(scope="module")
def a1111(webui_root, tiny_models, kafka_bootstrap, aws_endpoint, tmp_path_factory) -> Iterator[Stack]:
    stack = start_stack("a1111", webui_root, tmp_path_factory.mktemp("a1111"), kafka_bootstrap, aws_endpoint,
                        models=[TINY_A, TINY_B], install_models=link_models((TINY_A, TINY_B), tiny_models / "a1111"))  # fmt: skip
    yield stack
    stack.stop()


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_txt2img_runs_on_the_real_webui_and_lands_in_s3(a1111: Stack) -> None:
    answer = a1111.run({"model": TINY_A, "seed": 1234, **SMALL})
    assert answer.status is Status.SUCCEEDED, answer.message
    assert answer.info["seed"] == 1234 and answer.info["sd_model_name"] == "tiny-a"
    assert png(a1111.output(answer)).size == (64, 64)
    assert answer.timings_ms["inference_ms"] > 0


def test_a_batch_answers_one_output_per_image_with_their_seeds(a1111: Stack) -> None:
    answer = a1111.run({"model": TINY_A, "seed": 40, "batch_size": 2, **SMALL})
    assert answer.status is Status.SUCCEEDED, answer.message
    assert len(answer.outputs) == 2
    assert [png(a1111.output(answer, index)).size for index in range(2)] == [(64, 64)] * 2
    assert answer.info["all_seeds"] == [40, 41]


def test_img2img_takes_a_base64_and_an_s3_init_image(a1111: Stack) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), "blue").save(buffer, format="PNG")
    key = "inputs/blue.png"
    aws_client("s3", a1111.aws_endpoint).put_object(Bucket=a1111.bucket, Key=key, Body=buffer.getvalue())
    inline = {"base64": base64.b64encode(buffer.getvalue()).decode()}
    for init_image in (inline, {"s3_uri": f"s3://{a1111.bucket}/{key}"}):
        answer = a1111.run({"model": TINY_A, "kind": "img2img", "init_image": init_image, "denoising_strength": 0.5,
                            **SMALL})  # fmt: skip
        assert answer.status is Status.SUCCEEDED, answer.message
        assert png(a1111.output(answer)).size == (64, 64) and answer.info["denoising_strength"] == 0.5


def test_jobs_switch_between_two_checkpoints(a1111: Stack) -> None:
    on_b = a1111.run({"model": TINY_B, **SMALL})
    on_b_again = a1111.run({"model": TINY_B, **SMALL})
    on_a = a1111.run({"model": TINY_A, **SMALL})
    assert [answer.status for answer in (on_b, on_b_again, on_a)] == [Status.SUCCEEDED] * 3
    assert (on_b.info["sd_model_name"], on_a.info["sd_model_name"]) == ("tiny-b", "tiny-a")
    assert "switch_ms" not in on_b_again.timings_ms  # the model stays loaded
    assert on_a.timings_ms["switch_ms"] > 0
    assert a1111.get("/sdapi/v1/options")["sd_model_checkpoint"] == TINY_A


def test_a_model_named_without_its_extension_loads_once_and_runs(a1111: Stack) -> None:
    first = a1111.run({"model": "tiny-b", **SMALL})
    second = a1111.run({"model": "tiny-b", **SMALL})
    assert first.status is Status.SUCCEEDED, first.message
    assert second.status is Status.SUCCEEDED and "switch_ms" not in second.timings_ms
    assert first.info["sd_model_name"] == "tiny-b"


def test_an_unknown_model_fails_with_its_reason_and_the_next_job_runs(a1111: Stack) -> None:
    answer = a1111.run({"model": "no-such-model", **SMALL})
    assert answer.status is Status.FAILED and answer.reason == "model_not_found", answer
    assert "no-such-model" in (answer.message or "")
    assert a1111.run({"model": TINY_A, **SMALL}).status is Status.SUCCEEDED


def test_progress_events_come_while_it_samples(a1111: Stack) -> None:
    answer = a1111.run({"model": TINY_A, **LONG})
    assert answer.status is Status.SUCCEEDED, answer.message
    steps = [event.progress.step for event in a1111.seen[answer.job_id] if event.progress is not None]
    assert len(steps) >= 2 and steps == sorted(steps) and 0 < steps[-1] <= LONG["steps"]


def test_a_queued_job_and_a_sampling_job_are_cancelled(a1111: Stack) -> None:
    running: dict[str, object] = {}
    started = threading.Event()

    def run_long() -> None:
        running["answer"] = a1111.client.run({"model": TINY_A, "job_id": "a1111-cancel-running", **LONG},
                                             timeout_s=120, on_event=lambda e: e.progress and started.set())  # fmt: skip

    runner = threading.Thread(target=run_long)
    runner.start()
    assert started.wait(60), "the long job never reported progress"
    queued = a1111.client.submit({"model": TINY_A, "job_id": "a1111-cancel-queued", **SMALL})
    a1111.client.cancel(queued.job_id)
    time.sleep(0.5)  # the cancel of the queued one lands first
    since = time.monotonic()
    a1111.client.cancel("a1111-cancel-running")
    runner.join(60)
    answer = running["answer"]
    assert answer.status is Status.CANCELLED, answer  # type: ignore[attr-defined]
    assert time.monotonic() - since < 10  # interrupted, not run to the end
    assert a1111.run({"model": TINY_A, **SMALL}).status is Status.SUCCEEDED


def test_the_api_listens_on_loopback_only(a1111: Stack) -> None:
    listening = [conn.laddr for pid in a1111.webui_pids() for conn in psutil.Process(pid).net_connections("inet")
                 if conn.status == psutil.CONN_LISTEN]  # fmt: skip
    assert listening and {address.ip for address in listening} == {"127.0.0.1"}, listening


def test_a_webui_killed_mid_job_is_restarted_and_the_job_still_succeeds(a1111: Stack) -> None:
    result: dict[str, object] = {}
    started = threading.Event()
    job = {"model": TINY_A, "job_id": "a1111-killed-mid-job", **LONG}
    runner = threading.Thread(target=lambda: result.update(answer=a1111.client.run(
        job, timeout_s=240, on_event=lambda e: e.progress and started.set())))  # fmt: skip
    runner.start()
    assert started.wait(60)
    for pid in a1111.webui_pids():
        psutil.Process(pid).send_signal(signal.SIGKILL)
    runner.join(240)
    answer = result["answer"]
    assert answer.status is Status.SUCCEEDED, answer  # type: ignore[attr-defined]
    names = [event.get("event") for event in a1111.log_events()]
    assert "webui.exited" in names and "webui.restarted" in names


@pytest.fixture
def fresh_instance(webui_root, tiny_models, kafka_bootstrap, aws_endpoint, tmp_path) -> Iterator[Stack]:
    """An instance whose WebUI has no checkpoint of its own: the store has them, the cache stages."""
    store = tmp_path / "store"
    make_store(store, {name: (tiny_models / "a1111" / name).read_bytes() for name in (TINY_A, TINY_B)})
    cache = {"source": str(store), "dir": str(tmp_path / "models"), "prewarm": [TINY_B], "watch": False}
    stack = start_stack("a1111", webui_root, tmp_path, kafka_bootstrap, aws_endpoint, models=[], cache=cache)
    yield stack
    stack.stop()


def test_a_fresh_instance_prewarms_from_the_store_and_stages_the_rest_on_demand(fresh_instance: Stack) -> None:
    events = fresh_instance.log_events()
    assert any(event.get("event") == "agent.prewarmed" for event in events)
    prewarmed = fresh_instance.run({"model": TINY_B, **SMALL})
    assert prewarmed.status is Status.SUCCEEDED, prewarmed.message
    assert "stage_ms" not in prewarmed.timings_ms and "switch_ms" not in prewarmed.timings_ms  # loaded at start
    staged = fresh_instance.run({"model": "tiny-a", **SMALL})
    assert staged.status is Status.SUCCEEDED, staged.message
    assert staged.timings_ms["stage_ms"] > 0 and staged.info["sd_model_name"] == "tiny-a"
    assert (fresh_instance.models_dir / "checkpoints" / TINY_A).is_file()
