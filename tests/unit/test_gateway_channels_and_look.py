"""Worker channels are closed once idle (workers come back at new addresses); the quarantine
responder's placements look like the real ones this gateway relayed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.quarantine import DEFAULT_ENGINE, FleetLook, Meower, Pace
from gateway.relay import TurnJob, TurnProgress, WorkerChannels
from kvgate.v1 import chat_pb2, common_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_channels_to_addresses_unused_for_a_while_are_closed() -> None:
    clock = Clock()
    channels = WorkerChannels(idle_close_s=100, clock=clock)
    channels.stub("10.0.0.1:50061")
    channels.done("10.0.0.1:50061")
    channels.stub("10.0.0.2:50061")  # a call still streaming: never closed under it
    clock.now += 50
    channels.stub("10.0.0.3:50061")
    channels.done("10.0.0.3:50061")
    assert channels.addresses == ["10.0.0.1:50061", "10.0.0.2:50061", "10.0.0.3:50061"]
    clock.now += 60  # .1 idle 110 s, .3 idle 60 s
    channels.stub("10.0.0.4:50061")
    assert channels.addresses == ["10.0.0.2:50061", "10.0.0.3:50061", "10.0.0.4:50061"]
    channels.done("10.0.0.2:50061")
    clock.now += 101
    channels.stub("10.0.0.4:50061")  # in use again: kept
    assert channels.addresses == ["10.0.0.4:50061"]
    await channels.close()
    assert channels.addresses == []


def _placement(worker_id: str, region: str, engine: str) -> chat_pb2.Placement:
    return chat_pb2.Placement(worker_id=worker_id, region=region, engine=engine)


def test_the_look_names_workers_real_placements_named() -> None:
    look = FleetLook(size=2)
    assert look.worker_for("s0")[2] == DEFAULT_ENGINE  # nothing seen yet
    look.observe(_placement("us-east-1", "us-east", "sim"))
    assert look.worker_for("s1") == ("us-east-1", "us-east", "sim")
    look.observe(_placement("eu-west-2", "eu-west", "sim"))
    picks = {look.worker_for(f"s{i}") for i in range(1, 40)}
    assert picks == {("us-east-1", "us-east", "sim"), ("eu-west-2", "eu-west", "sim")}
    look.observe(_placement("ap-south-1", "ap-south", "sim"))  # the oldest is forgotten
    assert {look.worker_for(f"new-{i}")[0] for i in range(40)} == {"eu-west-2", "ap-south-1"}


def test_a_session_keeps_its_fake_worker_while_the_workers_seen_churn() -> None:
    look = FleetLook(size=4)
    for i in range(4):
        look.observe(_placement(f"us-east-{i}", "us-east", "sim"))
    first = {f"s{i}": look.worker_for(f"s{i}") for i in range(20)}
    for i in range(4, 200):  # every worker first seen has long left the look
        look.observe(_placement(f"eu-west-{i}", "eu-west", "sim"))
        assert all(look.worker_for(session) == worker for session, worker in first.items())


def test_sessions_are_remembered_up_to_a_bound_then_picked_again() -> None:
    look = FleetLook(size=2, sessions=2)
    look.observe(_placement("us-east-1", "us-east", "sim"))
    look.worker_for("s1")
    look.worker_for("s2")
    look.worker_for("s1")  # used: the least recently used is now s2
    look.worker_for("s3")
    look.observe(_placement("eu-west-1", "eu-west", "sim"))
    look.observe(_placement("eu-west-2", "eu-west", "sim"))
    assert look.worker_for("s1")[0] == "us-east-1"
    assert look.worker_for("s3")[0] == "us-east-1"
    assert look.worker_for("s2")[0] in {"eu-west-1", "eu-west-2"}  # forgotten: a pick among those seen


def test_replicas_that_saw_the_same_workers_give_a_session_the_same_one() -> None:
    replicas = [FleetLook(), FleetLook()]
    for look, order in zip(replicas, (range(8), reversed(range(8))), strict=True):
        for i in order:
            look.observe(_placement(f"w{i}", "us-east", "sim"))
    sessions = [f"s{i}" for i in range(50)]
    assert [replicas[0].worker_for(s) for s in sessions] == [replicas[1].worker_for(s) for s in sessions]
    assert len({replicas[0].worker_for(s) for s in sessions}) > 4  # and spread over them


class _Fleet:
    async def stream(self, job: TurnJob, progress: TurnProgress) -> AsyncIterator[chat_pb2.SendEvent]:
        yield chat_pb2.SendEvent(placement=_placement("us-east-2", "us-east", "sim"))
        yield chat_pb2.SendEvent(delta=chat_pb2.TextDelta(text="hi"))


async def test_a_meow_is_placed_like_the_real_turns_before_it() -> None:
    look = FleetLook()
    job = TurnJob(
        session_id="s",
        model="m",
        tier="free",
        messages=[common_pb2.Message(role="user", content="hello")],
        prompt_tokens_estimate=5,
        max_tokens=3,
    )
    real = [event async for event in look.watch(_Fleet()).stream(job, TurnProgress())]
    meower = Meower(Pace(first_token_s=(0, 0), per_token_s=(0, 0)), look=look)
    fake = [event async for event in meower.stream(job, TurnProgress())]
    assert fake[0].placement == real[0].placement
