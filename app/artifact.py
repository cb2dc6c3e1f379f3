"""An exported model (`mmoe export`) as a callable: its folder's meta.json, checked, and its
program. Imports torch only, like any server that loads the artifact without this package.

The folder holds model.pt2 (`torch.export.save`), meta.json (what the program takes and
returns, the format number) and config.json (the training config, for `mmoe predict --artifact`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

FORMAT = 1  # meta.json "format": raise it when a reader of the old one would misread a new artifact
PROGRAM, META, CONFIG = "model.pt2", "meta.json", "config.json"


class ArtifactError(ValueError):
    """An artifact, or a checkpoint to export, that cannot be used: the message names the
    file and the fix."""


def read_meta(folder: str | Path) -> dict:
    """meta.json of an artifact folder, refused when its format is newer than this reader's."""
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text())
        version = meta["format"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: missing or not an artifact's meta.json ({' '.join(str(e).split())}); "
                            f"export the run again with `mmoe export RUN_DIR --out {folder}`") from None
    if not isinstance(version, int) or version > FORMAT:
        raise ArtifactError(f"{path}: artifact format {version!r} is newer than this reader's {FORMAT}; "
                            f"load it with the release that exported it, or export the run again with this one")
    return meta


class Artifact:
    """scores [B, T] = artifact(dense [B, D], values [N], lengths [F * B]); see meta.json
    "inputs" and "tasks". Inputs are cast to the dtypes and device the program was traced
    with, so int32 ids or int64 lengths are fine."""

    def __init__(self, folder: str | Path):
        self.meta = read_meta(folder)
        self.program = torch.export.load(str(Path(folder) / PROGRAM)).module()
        self.device = torch.device(self.meta["device"])
        self.num_features, self.num_dense = len(self.meta["features"]), len(self.meta["dense"])

    def __call__(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b = dense.shape[0]
        if dense.dim() != 2 or dense.shape[1] != self.num_dense:
            raise ValueError(f"dense: expected [B, {self.num_dense}], got {list(dense.shape)}")
        if values.dim() != 1 or lengths.shape != (self.num_features * b,):
            raise ValueError(f"values [N] and lengths [{self.num_features} * B = {self.num_features * b}] "
                             f"expected, got {list(values.shape)} and {list(lengths.shape)}")
        return self.program(dense.to(self.device, torch.float32).contiguous(),
                            values.to(self.device, torch.int64).contiguous(),
                            lengths.to(self.device, torch.int32).contiguous())
