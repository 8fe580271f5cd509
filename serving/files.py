"""The gateway file roots: every input file and output folder must resolve inside one of them."""

from __future__ import annotations

from pathlib import Path

from aicsd.errors import InputFileError

__all__ = ["resolve_inside"]


def resolve_inside(path: Path, roots: tuple[Path, ...], field: str, *, want_dir: bool) -> Path:
    """Resolve `path` (symlinks followed) and insist it exists, has the right kind and lies in a root."""
    if not path.is_absolute():
        raise InputFileError(f"{field} must be an absolute path, got '{path}'")
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise InputFileError(f"{field} '{path}' does not exist") from None
    except (OSError, RuntimeError) as exc:
        raise InputFileError(f"{field} '{path}' cannot be resolved: {exc}") from None
    inside = any(real.is_relative_to(root.resolve()) for root in roots)
    if not inside:
        shown = ":".join(str(r) for r in roots)
        raise InputFileError(f"{field} '{path}' is outside the allowed file roots ({shown}, PIPELINE_FILE_ROOTS)")
    if want_dir and not real.is_dir():
        raise InputFileError(f"{field} '{path}' is not a directory")
    if not want_dir and not real.is_file():
        raise InputFileError(f"{field} '{path}' is not a regular file")
    return real
