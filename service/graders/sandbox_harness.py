"""Runs inside the sandbox as the unprivileged sandbox user: read one request, call ``grade``, answer.

Standard library only, started as ``python -I -S -c <this file>``. The request arrives on stdin as
JSON ``{"source", "sample", "item", "site": [paths]}``; the answer is one JSON object on the
original stdout: ``{"reward": x}`` or ``{"error": "...", "details": "..."}``. The tenant's prints
go to stderr (the parent keeps a bounded tail of it), so they cannot corrupt the answer by accident.
"""

import json
import math
import os
import sys
import traceback


def _answer(channel, body):
    channel.write(json.dumps(body))
    channel.flush()
    os._exit(0)  # skip the tenant's atexit hooks and any lingering threads


def _main():
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    request = json.loads(sys.stdin.buffer.read())
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    sys.path.extend(request.get("site", []))
    namespace = {"__name__": "grader", "__builtins__": __builtins__}
    try:
        exec(compile(request["source"], "grader.py", "exec"), namespace)  # noqa: S102 - the sandboxed tenant code
        grade = namespace.get("grade")
        if not callable(grade):
            _answer(channel, {"error": "runtime", "details": "the source defines no function grade(sample, item)"})
        value = grade(request["sample"], request["item"])  # type: ignore[operator]
    except BaseException as exc:  # noqa: BLE001 - the tenant's exception is the answer
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # drop this frame
        lines = traceback.format_exception(type(exc), exc, tb)
        _answer(channel, {"error": "runtime", "details": "".join(lines)[-1500:]})
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, int | float):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        _answer(channel, {"error": "runtime",
                          "details": f"grade() returned {type(value).__name__} {shown}, not a number"})
    try:
        reward = float(value)
    except (OverflowError, ValueError):
        _answer(channel, {"error": "runtime", "details": "grade() returned an integer too large for a float"})
    if not math.isfinite(reward):
        _answer(channel, {"error": "runtime", "details": f"grade() returned {reward}, not a finite number"})
    _answer(channel, {"reward": reward})


_main()
