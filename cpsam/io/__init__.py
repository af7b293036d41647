"""Read and write images and label masks without ever leaving a half-written file.

Every reader raises `InputFileError` (a ValueError) that names the file and the problem, so the
command line can report it per file and move on. Every writer goes through `atomic_path` (or
`atomic_paths` for a set of files that belong together): a temporary hidden file beside the target,
renamed onto it only when complete, removed on any failure (also on SIGTERM inside
`terminate_as_interrupt`). Files get the usual mode of the umask (0644 under umask 022).

One concept per module; callers use the names re-exported here (`from cpsam import io; io.read_image(...)`):

    errors.py    InputFileError, OutputPathError, storage errors and how an OSError reads
    atomic.py    atomic_path / atomic_paths, stale_temp_files, check_output_dir / check_output_file
    signals.py   terminate_as_interrupt (SIGTERM / SIGHUP -> Terminated), interrupt_exit_code / interrupt_name
    images.py    read_image / read_labels, write_tiff / write_labels / write_png, IMAGE_SUFFIXES
    overlays.py  masks_to_outlines, flows_to_rgb, display_rgb, outline_overlay
    seg_npy.py   seg_npy_dict / write_seg_npy (the cellpose GUI's NAME_seg.npy)
"""

from __future__ import annotations

from cpsam.io.atomic import (
    atomic_path,
    atomic_paths,
    check_output_dir,
    check_output_file,
    stale_temp_files,
)
from cpsam.io.errors import (
    STORAGE_ERRNOS,
    InputFileError,
    OutputPathError,
    describe_os_error,
    is_storage_error,
)
from cpsam.io.images import (
    IMAGE_SUFFIXES,
    label_dtype,
    not_a_file_problem,
    read_image,
    read_labels,
    squeeze_to_2d,
    write_labels,
    write_png,
    write_tiff,
)
from cpsam.io.overlays import display_rgb, flows_to_rgb, masks_to_outlines, outline_overlay
from cpsam.io.seg_npy import seg_npy_dict, write_seg_npy
from cpsam.io.signals import Terminated, interrupt_exit_code, interrupt_name, terminate_as_interrupt

__all__ = [
    "IMAGE_SUFFIXES",
    "STORAGE_ERRNOS",
    "InputFileError",
    "OutputPathError",
    "Terminated",
    "atomic_path",
    "atomic_paths",
    "check_output_dir",
    "check_output_file",
    "describe_os_error",
    "display_rgb",
    "flows_to_rgb",
    "interrupt_exit_code",
    "interrupt_name",
    "is_storage_error",
    "label_dtype",
    "masks_to_outlines",
    "not_a_file_problem",
    "outline_overlay",
    "read_image",
    "read_labels",
    "seg_npy_dict",
    "squeeze_to_2d",
    "stale_temp_files",
    "terminate_as_interrupt",
    "write_labels",
    "write_png",
    "write_seg_npy",
    "write_tiff",
]
