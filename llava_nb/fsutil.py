"""Files on disk: atomic folders (a killed run leaves the previous version or nothing, never half a folder)
with a manifest, the reader of checkpoint files, and the error for files the hub cannot give.

Light on purpose (torch is imported when a checkpoint is read): `runs` reads it before transformers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MANIFEST = "llava_nb_manifest.json"  # written last into a folder: lists its files and their sizes


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, unlisted: Collection[str] = ()) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename.

    `unlisted`: files left out of the manifest because they are replaced later on their own (in one
    rename each), such as an export's model card."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        write_manifest(tmp, unlisted)
        old = None
        if final.exists():  # move the old one aside first: os.replace cannot replace a non-empty folder
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(folder: Path, unlisted: Collection[str] = ()) -> None:
    """Record every file's size (but those `unlisted`), so `is_complete` can tell a whole folder from a
    damaged one."""
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and str(p.relative_to(folder)) not in unlisted
    }
    with open(folder / MANIFEST, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def is_complete(folder: str | os.PathLike) -> bool:
    """True when `folder` has its manifest and every file listed there, at the recorded size."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items()
    )


def folder_listing(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """Every file under `folder` (links followed, as the hub cache uses them) with its size in bytes."""
    folder = Path(folder)
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]


def percent(x: float | None) -> str:
    """0.9849 -> '98.5%'; None -> 'n/a' (a score that could not be computed)."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def human_size(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the hub shows file sizes)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` or `.bin` checkpoint; a damaged file is an error naming it."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: run prepare_backbones() (notebook 01)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        if path.suffix == ".bin":
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files raise many different types
        raise ValueError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {e}); it is damaged or "
            "incomplete: delete it and run prepare_backbones() again"
        ) from e
    raise ValueError(f"unsupported checkpoint format {path.name!r}: expected .safetensors or .bin")


class HubUnreachable(ConnectionError):
    """A hub repo could neither be downloaded nor found in the local cache."""


def hub_unreachable(repo_id: str, kind: str, error: BaseException) -> HubUnreachable:
    """The error to raise when `repo_id` cannot be had: which repo, why, and what to do instead."""
    why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
    return HubUnreachable(
        f"cannot reach the {kind} {repo_id!r} on the Hugging Face Hub, and it is not in the local cache "
        f"({why}). The t4 profile downloads its models and streams its data from the hub: check the network "
        "(and that HF_HUB_OFFLINE is not set), or use the profile that needs no hub: --profile offline "
        '(PROFILE = "offline" in a notebook).'
    )
