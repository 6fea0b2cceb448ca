"""Adapters served by name from one folder, with no way out of it.

A name is a relative path inside the folder (``my-adapter`` or ``org/my-adapter``). It is refused
when it is absolute or has ``..`` components, and the folder and the files the loader reads are
resolved (symlinks followed) and must stay inside the folder's own resolved path. The loader is
then given the resolved path, so what was checked is what gets read.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from server.protocol import ApiError

# what load_peft_adapter reads (or looks for to refuse)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class LoraDir:
    """Resolve adapter names (or runtime-load paths) inside ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve(strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"--lora-dir {root} is not a folder")

    def _inside(self, p: Path) -> bool:
        return p == self.root or p.is_relative_to(self.root)

    @staticmethod
    def _missing(name: str, param: str) -> ApiError:
        return ApiError(
            404,
            f"The model `{name}` does not exist (no such adapter in the adapter folder either).",
            param=param,
            code="model_not_found",
        )

    def resolve(self, name: str, param: str = "model", allow_absolute: bool = False) -> Path:
        """The adapter folder for ``name``; ApiError 400 for names that try to leave the
        folder, 404 when there is no adapter under that name."""
        if not name or "\x00" in name or "\\" in name:
            raise ApiError(400, f"invalid adapter name {name!r}", param=param, code="invalid_value")
        p = PurePosixPath(name)
        if p.is_absolute() and not allow_absolute:
            raise ApiError(
                400,
                "adapter names are paths relative to the adapter folder",
                param=param,
                code="invalid_value",
            )
        if ".." in p.parts:
            raise ApiError(
                400, "adapter names may not contain '..'", param=param, code="invalid_value"
            )
        try:
            folder = (self.root / p).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            raise self._missing(name, param) from None
        if not self._inside(folder):
            raise ApiError(
                400,
                f"adapter {name!r} resolves outside the adapter folder",
                param=param,
                code="invalid_value",
            )
        if not folder.is_dir() or not (folder / "adapter_config.json").is_file():
            raise self._missing(name, param)
        for f in ADAPTER_FILES:
            target = folder / f
            if target.is_symlink() or target.exists():
                try:
                    real = target.resolve(strict=True)
                except (OSError, RuntimeError):
                    continue  # dangling: the loader reports the missing file
                if not self._inside(real):
                    raise ApiError(
                        400,
                        f"adapter {name!r}: {f} resolves outside the adapter folder",
                        param=param,
                        code="invalid_value",
                    )
        return folder
