"""The process-wide quota of agents in flight, on its own (no steps)."""

from __future__ import annotations

import asyncio
import threading

from mesa_llm_parallel._permits import Permits


def test_permits_are_counted_across_callers_and_capped_by_each_callers_limit():
    permits = Permits()
    assert permits.try_acquire(2)
    assert permits.try_acquire(2)
    assert not permits.try_acquire(2)
    assert permits.try_acquire(3)  # a step with a larger cap sees the same count
    assert permits.held == 3
    for _ in range(3):
        permits.release()
    assert permits.held == 0


def test_a_released_permit_goes_to_the_oldest_waiting_thread():
    permits = Permits()
    assert permits.try_acquire(1)
    order: list[str] = []
    never = threading.Event()

    def wait(name: str) -> None:
        assert permits.acquire(1, never)
        order.append(name)
        permits.release()

    first = threading.Thread(target=wait, args=("first",))
    first.start()
    while not permits._waiters:
        pass
    second = threading.Thread(target=wait, args=("second",))
    second.start()
    while len(permits._waiters) < 2:
        pass
    permits.release()
    first.join(5)
    second.join(5)
    assert order == ["first", "second"]
    assert permits.held == 0


def test_a_waiting_thread_gives_up_when_its_step_halts():
    permits = Permits()
    assert permits.try_acquire(1)
    halted = threading.Event()
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(permits.acquire(1, halted)))
    thread.start()
    while not permits._waiters:
        pass
    halted.set()
    thread.join(5)
    assert result == [False]
    assert not permits._waiters
    permits.release()
    assert permits.held == 0


def test_a_loop_waits_without_blocking_and_gets_the_permit_handed_over():
    permits = Permits()
    assert permits.try_acquire(1)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        granted = loop.create_future()
        waiter = permits.acquire_soon(1, loop, lambda: granted.set_result(permits.held))
        assert waiter is not None
        threading.Timer(0.05, permits.release).start()  # released by another thread
        return await asyncio.wait_for(granted, 5)

    assert asyncio.run(main()) == 1  # handed over: still one held, now by the loop
    permits.release()
    assert permits.held == 0


def test_a_permit_handed_to_a_closed_loop_goes_to_the_next_waiter():
    permits = Permits()
    assert permits.try_acquire(1)
    dead = asyncio.new_event_loop()
    dead.close()
    assert permits.acquire_soon(1, dead, lambda: None) is not None
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(permits.acquire(1, threading.Event())))
    thread.start()
    while len(permits._waiters) < 2:
        pass
    permits.release()
    thread.join(5)
    assert got == [True]
    permits.release()
    assert permits.held == 0


def test_withdrawing_after_a_grant_gives_the_permit_back():
    permits = Permits()
    assert permits.try_acquire(1)
    loop = asyncio.new_event_loop()
    try:
        waiter = permits.acquire_soon(1, loop, lambda: None)
        permits.release()  # handed to the waiter: still held
        assert permits.held == 1
        permits.withdraw(waiter)  # the step ended before it used it
        assert permits.held == 0
    finally:
        loop.close()
