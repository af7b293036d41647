"""The one output-folder guard of the workflows that make a run folder (finetune, binary train / distill, distill).

A workflow claims its folder (`claim_run_folder`) BEFORE it writes anything there: the folder must not exist, be
empty, or hold this same workflow's run made by the same request (a rerun resumes). The request (the options that
decide what goes into the folder: the model, the images, the split, ...) is recorded in RUN/request.json when the
folder is claimed; key=value training overrides are not part of it (the loop compares the configs itself, and a
rerun may change free keys such as max_steps). Any other folder is refused with one line naming it and what it
holds, so a mistyped --out never changes another run's files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cpsam import io

REQUEST_NAME = "request.json"


def request_value(value: Any) -> Any:
    """`value` as recorded in request.json: paths absolute (a rerun from another working folder is the same
    request), tuples as lists, everything else as given (JSON types)."""
    if isinstance(value, os.PathLike):
        return str(Path(value).resolve())
    if isinstance(value, (list, tuple)):
        return [request_value(v) for v in value]
    return value


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def check_run_folder(folder: str | os.PathLike[str], workflow: str, request: Mapping[str, Any],
                     option: str = "--out") -> dict[str, Any]:
    """Refuse (cpsam.io.OutputPathError naming `option` and the folder) unless `folder` is absent, empty, or holds
    a `workflow` run of the same `request`; writes nothing. Returns the record that claiming it writes."""
    run = Path(folder)
    record = {"workflow": workflow, "request": {k: request_value(v) for k, v in request.items()}}
    record = json.loads(json.dumps(record))  # the values as they read back from the file
    if not run.exists():
        return record
    if not run.is_dir():
        raise io.OutputPathError(run, f"{option} exists and is not a folder")
    try:
        entries = [e for e in os.listdir(run) if not e.startswith(".")]
    except OSError as exc:
        raise io.OutputPathError(run, f"{option} cannot be read ({io.describe_os_error(exc)})") from None
    if not entries:
        return record
    saved = run / REQUEST_NAME
    if not saved.is_file():
        what = "another run" if (run / "config.yaml").is_file() else f"{len(entries)} other file(s)"
        raise io.OutputPathError(run, f"{option} is not empty and holds {what}, not a `{workflow}` run; give an "
                                      "empty or new folder")
    try:
        old = json.loads(saved.read_text())
        old_workflow, old_request = old["workflow"], dict(old["request"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise io.OutputPathError(run, f"{option}: {saved} cannot be read ({exc}); give an empty or new folder") \
            from None
    if old_workflow != workflow:
        raise io.OutputPathError(run, f"{option} holds a `{old_workflow}` run, not a `{workflow}` run; give an "
                                      "empty or new folder")
    diff = _differences(old_request, record["request"])
    if diff:
        raise io.OutputPathError(run, f"{option} holds a `{workflow}` run of another request ({'; '.join(diff[:4])})"
                                      "; rerun it as it was made to resume it, or give an empty or new folder")
    return record


def claim_run_folder(folder: str | os.PathLike[str], workflow: str, request: Mapping[str, Any],
                     option: str = "--out") -> Path:
    """`check_run_folder`, then create the folder (proved writable) and record the request in RUN/request.json.
    Call it before the workflow writes anything in the folder. Raises cpsam.io.OutputPathError."""
    record = check_run_folder(folder, workflow, request, option)
    try:
        run = io.check_output_dir(folder)
    except io.OutputPathError as exc:
        raise io.OutputPathError(exc.path, f"{option}: {exc.problem}") from None
    saved = run / REQUEST_NAME
    if not saved.is_file():
        try:
            with io.atomic_path(saved) as tmp:
                Path(tmp).write_text(json.dumps(record, indent=1) + "\n")
        except OSError as exc:
            raise io.OutputPathError(saved, f"{option}: cannot be written ({io.describe_os_error(exc)})") from None
    return run
