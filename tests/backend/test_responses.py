"""Every request of an execute() gets its own answer: a failure reaches only its culprit."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from backend.responses import answer_requests, respond
from hps_core.request import answer_each


class Boom(Exception):
    pass


def _doubling(calls: list[list[int]]):
    """answer(): doubles each item; raises for a batch holding 99 (the culprit)."""

    def answer(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if 99 in items:
            raise Boom(f"cannot answer {list(items)}")
        return [2 * i for i in items]

    return answer


def test_answer_each_is_one_pass_when_it_succeeds() -> None:
    calls: list[list[int]] = []
    assert answer_each([1, 2, 3], _doubling(calls)) == [2, 4, 6]
    assert calls == [[1, 2, 3]]


def test_answer_each_retries_alone_so_only_the_culprit_fails() -> None:
    calls: list[list[int]] = []
    results = answer_each([1, 99, 3], _doubling(calls))
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], Boom) and str(results[1]) == "cannot answer [99]"
    assert calls == [[1, 99, 3], [1], [99], [3]]


def test_answer_each_of_one_item_is_not_retried() -> None:
    calls: list[list[int]] = []
    (result,) = answer_each([99], _doubling(calls))
    assert isinstance(result, Boom) and calls == [[99]]


def test_respond_turns_an_encoding_failure_into_that_requests_error() -> None:
    def encode(value: int) -> str:
        if value == 4:
            raise MemoryError("no room for the output tensor")
        return f"ok {value}"

    responses = respond([2, ValueError("bad input"), 4, 6], encode, lambda exc: f"error {type(exc).__name__}: {exc}")
    assert responses == ["ok 2", "error ValueError: bad input", "error MemoryError: no room for the output tensor",
                         "ok 6"]


@pytest.mark.parametrize("culprit_step", ["read", "answer", "encode", None])
def test_answer_requests_isolates_each_step(culprit_step: str | None) -> None:
    """Requests 0..3 answered 2 * (request + 10); request 2 fails at ``culprit_step``, alone."""

    def read(request: int) -> int:
        if culprit_step == "read" and request == 2:
            raise KeyError("input KEYS missing")
        return 99 if culprit_step == "answer" and request == 2 else request + 10

    def encode(value: int) -> str:
        if culprit_step == "encode" and value == 24:
            raise MemoryError("no room for the output tensor")
        return f"ok {value}"

    calls: list[list[int]] = []
    responses = answer_requests([0, 1, 2, 3], read, _doubling(calls), encode, lambda exc: type(exc).__name__)
    failed = {"read": "KeyError", "answer": "Boom", "encode": "MemoryError"}
    expected = ["ok 20", "ok 22", failed.get(culprit_step or "", "ok 24"), "ok 26"]
    assert responses == expected
    first_pass = [10, 11, 99, 13] if culprit_step == "answer" else [10, 11, 12, 13]
    assert calls[0] == ([10, 11, 13] if culprit_step == "read" else first_pass)


def test_answer_requests_without_requests_answers_nothing() -> None:
    calls: list[list[int]] = []
    assert answer_requests([], int, _doubling(calls), str, repr) == [] and calls == []
