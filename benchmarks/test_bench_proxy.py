"""``ProxyCore.handle_data``, I/O-free: what one dsbc worker spends per SIP message before
the socket call.  A call through dsbc is six messages (INVITE, 180, 200, ACK, BYE, 200);
``test_call_six_messages`` is the CPU floor of one call in the whole-system scenario.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.samples import PHONE, account_of, call_flow, make_core, register
from dsbc.store.memory import MemoryIndex
from sip.flow import Flow


@pytest.fixture(scope="module")
def core(million_index: MemoryIndex) -> Any:
    return make_core(million_index)


def test_register(benchmark: Any, core: Any) -> None:
    data = register(account_of(4242))
    src = Flow("udp", *PHONE)
    out = benchmark(core.handle_data, data, src, 0.0)
    assert len(out) == 1 and out[0].data.startswith(b"REGISTER ")


@pytest.mark.parametrize("step", ["INVITE", "180", "200", "ACK", "BYE", "200-BYE"])
def test_call_message(benchmark: Any, core: Any, step: str) -> None:
    msgs = {name: (data, flow) for name, data, flow in call_flow(core, account_of(77))}
    data, flow = msgs[step]
    out = benchmark(core.handle_data, data, flow, 0.0)
    assert len(out) == 1 and out[0].data


def test_call_six_messages(benchmark: Any, core: Any) -> None:
    flow = call_flow(core, account_of(99))
    handle = core.handle_data

    def one_call() -> int:
        n = 0
        for _, data, src in flow:
            n += len(handle(data, src, 0.0))
        return n

    assert benchmark(one_call) == 6
