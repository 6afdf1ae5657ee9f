"""Fault specs and which request meets an armed fault."""

from __future__ import annotations

import pytest

from sdagent.sim.faults import UNLIMITED, Api, Fault, FaultKind, FaultPlan, Scope


def test_command_line_spec_parses_kind_count_and_options() -> None:
    fault = Fault.parse("error:3:status=503,scope=all,api=comfyui")
    assert (fault.kind, fault.count, fault.status, fault.scope, fault.api) == (
        FaultKind.ERROR, 3, 503, Scope.ALL, Api.COMFYUI,
    )  # fmt: skip
    assert Fault.parse("hang") == Fault(FaultKind.HANG)
    assert Fault.parse("slow:-1:delay_s=0.5") == Fault(FaultKind.SLOW, count=UNLIMITED, delay_s=0.5)


@pytest.mark.parametrize(
    "spec",
    ["boom", "error:0", "error:x", "error:1:status=404", "slow:1:delay_s=-1", "error:1:colour=red", "error:1:status",
     "ws_drop:1:api=a1111"],
)  # fmt: skip
def test_bad_specs_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        Fault.parse(spec)


def test_http_faults_meet_generation_requests_unless_scoped_to_all() -> None:
    plan = FaultPlan()
    plan.arm(Fault(FaultKind.ERROR))
    assert plan.take_http(Api.A1111, starts_generation=False) is None
    assert plan.take_http(Api.A1111, starts_generation=True) is not None
    assert plan.take_http(Api.A1111, starts_generation=True) is None  # count 1 is used up
    plan.arm(Fault(FaultKind.SLOW, scope=Scope.ALL))
    assert plan.take_http(Api.COMFYUI, starts_generation=False) is not None
    assert plan.fired == {"error": 1, "slow": 1}


def test_faults_fire_in_arming_order_and_respect_the_api_filter() -> None:
    plan = FaultPlan()
    plan.arm(Fault(FaultKind.OOM, api=Api.COMFYUI))
    plan.arm(Fault(FaultKind.HANG))
    assert plan.take_generation(Api.A1111).kind is FaultKind.HANG
    assert plan.take_generation(Api.A1111) is None
    assert plan.take_generation(Api.COMFYUI).kind is FaultKind.OOM


def test_ws_drop_is_only_taken_by_comfyui_generations() -> None:
    plan = FaultPlan()
    plan.arm(Fault(FaultKind.WS_DROP))
    assert plan.take_generation(Api.A1111) is None
    assert plan.take_generation(Api.COMFYUI).kind is FaultKind.WS_DROP


def test_unlimited_fault_stays_armed_until_cleared() -> None:
    plan = FaultPlan()
    plan.arm(Fault(FaultKind.ERROR, count=UNLIMITED))
    for _ in range(5):
        assert plan.take_http(Api.A1111, starts_generation=True) is not None
    assert plan.armed()[0]["count"] == UNLIMITED
    plan.clear()
    assert plan.take_http(Api.A1111, starts_generation=True) is None


def test_from_dict_rejects_unknown_fields_and_a_missing_kind() -> None:
    with pytest.raises(ValueError, match="unknown"):
        Fault.from_dict({"kind": "error", "colour": "red"})
    with pytest.raises(ValueError, match="kind is required"):
        Fault.from_dict({"count": 1})
    assert Fault.from_dict({"kind": "oom", "count": 2}).to_dict()["kind"] == "oom"
