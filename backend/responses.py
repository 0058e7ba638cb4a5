"""Every request of an ``execute()`` gets its own answer: shared by our Python-based backends.

Triton hands a backend several requests per ``execute`` (dynamic batching) and the backends
answer them in one pass. A failure must reach only the request that causes it:

* :func:`answer_requests` is a backend's whole ``execute``: read each request's inputs (a bad
  one fails alone), answer the good ones in one pass, one response each, in order;
* the shared pass runs through :func:`hps_core.request.answer_each`: should it raise, each
  request is answered alone, so that only the culprit gets the exception (as
  ``LookupSession.lookup_requests`` does for the lookup itself);
* :func:`respond` turns each request's result into its response, and an exception raised
  while encoding one response (building its output tensor) answers that request with the
  error instead of failing the whole ``execute``.

The INTERNAL answers of unexpected failures are logged, one line per cause per interval: a
fault that hits every request (a bug, a lost device) must not flood Triton's log. The model
files log them through :class:`hps_core.logs.RateLimitedLog` writing to :func:`triton_log`
(Triton's ``pb_utils.Logger``), and flush it in ``finalize``.

Free of ``triton_python_backend_utils``: the model files pass in the functions that build
responses and the logger, so the isolation is unit-tested without Triton.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from hps_core.logs import LogSink
from hps_core.request import Item, Result, answer_each

__all__ = ["answer_requests", "respond", "triton_log"]


def answer_requests(
    requests: Sequence[Any],
    read: Callable[[Any], Item],
    answer: Callable[[Sequence[Item]], Sequence[Result]],
    encode: Callable[[Result], Any],
    error: Callable[[Exception], Any],
) -> list[Any]:
    """One response per request, in order: ``read(request)`` its inputs, ``answer`` every
    request read in one pass (:func:`answer_each`), ``encode`` each result as a response
    (:func:`respond`). An exception at any step (or a result that is an exception) answers
    that request alone with ``error(exc)``; the others are answered normally."""
    results: list[Any] = [None] * len(requests)
    items: list[Item] = []
    slots: list[int] = []
    for i, request in enumerate(requests):
        try:
            items.append(read(request))
        except Exception as exc:  # noqa: BLE001 - this request's inputs, not the batch's
            results[i] = exc
            continue
        slots.append(i)
    if items:
        for i, result in zip(slots, answer_each(items, answer)):
            results[i] = result
    return respond(results, encode, error)


def respond(
    results: Sequence[Any], encode: Callable[[Any], Any], error: Callable[[Exception], Any]
) -> list[Any]:
    """One response per result: ``encode(result)``, or ``error(exc)`` where the result is an
    exception or where ``encode`` raises one (only that request fails)."""
    responses = []
    for result in results:
        if not isinstance(result, Exception):
            try:
                responses.append(encode(result))
                continue
            except Exception as exc:  # noqa: BLE001 - this response's encoding, not the batch's
                result = exc
        responses.append(error(result))
    return responses


def triton_log(logger: Any) -> LogSink:
    """Triton's ``pb_utils.Logger`` as a :class:`hps_core.logs.RateLimitedLog` sink, by level:
    ERROR → ``log_error``, WARNING → ``log_warn``, INFO → ``log_info``, below (tracebacks) →
    ``log_verbose`` (shown with ``tritonserver --log-verbose=1``)."""

    def write(level: int, line: str) -> None:
        if level >= logging.ERROR:
            logger.log_error(line)
        elif level >= logging.WARNING:
            logger.log_warn(line)
        elif level >= logging.INFO:
            logger.log_info(line)
        else:
            logger.log_verbose(line)

    return write
