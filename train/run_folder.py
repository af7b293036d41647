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


class RunFolderError(io.OutputPathError):
    """An output folder a workflow may not use (another run's, not a folder, not writable): a usage error, exit 2
    (`cpsam.command`'s rule for an unusable output path). Reads `OPTION FOLDER: problem`."""

    def __init__(self, path: str | os.PathLike[str], problem: str, option: str = "--out") -> None:
        super().__init__(path, problem)
        self.option = option
        self.args = (f"{option} {self.path}: {problem}",)

    def __str__(self) -> str:
        return str(self.args[0])


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
    """Refuse (RunFolderError naming `option` and the folder) unless `folder` is absent, empty, or holds
    a `workflow` run of the same `request`; writes nothing. Returns the record that claiming it writes."""
    run = Path(folder)
    record = {"workflow": workflow, "request": {k: request_value(v) for k, v in request.items()}}
    record = json.loads(json.dumps(record))  # the values as they read back from the file
    if not run.exists():
        return record
    if not run.is_dir():
        raise RunFolderError(run, "exists and is not a folder", option)
    try:
        entries = [e for e in os.listdir(run) if not e.startswith(".")]
    except OSError as exc:
        raise RunFolderError(run, f"cannot be read ({io.describe_os_error(exc)})", option) from None
    if not entries:
        return record
    saved = run / REQUEST_NAME
    if not saved.is_file():
        what = "another run" if (run / "config.yaml").is_file() else f"{len(entries)} other file(s)"
        raise RunFolderError(run, f"is not empty and holds {what}, not a `{workflow}` run; give an empty or "
                                 "new folder", option)
    try:
        old = json.loads(saved.read_text())
        old_workflow, old_request = old["workflow"], dict(old["request"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunFolderError(run, f"{saved.name} cannot be read ({exc}); give an empty or new folder", option) \
            from None
    if old_workflow != workflow:
        raise RunFolderError(run, f"holds a `{old_workflow}` run, not a `{workflow}` run; give an empty or new "
                                 "folder", option)
    diff = _differences(old_request, record["request"])
    if diff:
        raise RunFolderError(run, f"holds a `{workflow}` run of another request ({'; '.join(diff[:4])}); rerun it "
                                 "as it was made to resume it, or give an empty or new folder", option)
    return record


def claim_run_folder(folder: str | os.PathLike[str], workflow: str, request: Mapping[str, Any],
                     option: str = "--out") -> Path:
    """`check_run_folder`, then create the folder (proved writable) and record the request in RUN/request.json.
    Call it before the workflow writes anything in the folder. Raises RunFolderError."""
    record = check_run_folder(folder, workflow, request, option)
    try:
        run = io.check_output_dir(folder)
    except io.OutputPathError as exc:
        raise RunFolderError(exc.path, exc.problem, option) from None
    saved = run / REQUEST_NAME
    if not saved.is_file():
        try:
            with io.atomic_path(saved) as tmp:
                Path(tmp).write_text(json.dumps(record, indent=1) + "\n")
        except OSError as exc:
            raise RunFolderError(run, f"{saved.name} cannot be written ({io.describe_os_error(exc)})", option) \
                from None
    return run
