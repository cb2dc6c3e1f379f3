"""`mmoe export`: a run's checkpoint as an artifact for inference that torch alone can load
(`app.artifact` reads it; the README shows it without this package).

The format is `torch.export` of a module made of ATen ops only. At our pins (torch 2.13,
torchrec 1.8) the other routes fail or tie the server to the trainer's stack:
`torch.jit.script` fails in the heads (a ParameterList's len), a trace bakes the batch's
split sizes in, and `torch.export` of the model with TorchRec's EmbeddingBagCollection pickles
its KeyedJaggedTensor, so loading imports torchrec. Hence `PooledEmbeddings` replaces the
collection here: every table in one weight, one pooled lookup; the head and towers are the
model's own `dense_forward`.

Quantized tables use ATen's row-wise lookups (`quantized::embedding_bag_byte_rowwise_offsets`,
`..._4bit_...`; FBGEMM's kernels built into torch), not TorchRec's inference collection: that
one cannot be scripted, and exported it needs fbgemm_gpu to load (see README, "Serving").
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from app import checkpoint
from app.artifact import CONFIG, FORMAT, META, PROGRAM, ArtifactError
from app.config import Config, load_config
from app.data.schema import Columns
from app.heads import Experts
from app.model import MultiTaskModel, MultiTaskTrain, table_name
from app.sharded import resolve_columns

# --quantize: how PooledEmbeddings packs the fused weight (rows of uint8 + fp32 scale and bias
# for int8, two ids a byte + fp16 scale and bias for int4) and looks it up
PREPACK = {"none": lambda w: w, "int8": torch.ops.quantized.embedding_bag_byte_prepack,
           "int4": torch.ops.quantized.embedding_bag_4bit_prepack}
LOOKUP = {
    "none": lambda w, ids, offsets: nn.functional.embedding_bag(ids, w, offsets, mode="sum",
                                                                include_last_offset=True),
    "int8": lambda w, ids, offsets: torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        w, ids, offsets, include_last_offset=True),
    "int4": lambda w, ids, offsets: torch.ops.quantized.embedding_bag_4bit_rowwise_offsets(
        w, ids, offsets, include_last_offset=True),
}


def _int4_shape(weight, indices, offsets=None, scale_grad_by_freq=False, mode=0, pruned_weights=False,
                per_sample_weights=None, compressed_indices_mapping=None, include_last_offset=False):
    bags = offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]
    return weight.new_empty((bags, (weight.shape[1] - 4) * 2), dtype=torch.float32)  # 4 bytes: fp16 scale, bias


# ATen's 4-bit lookup comes without the shape-only (Meta) kernel that torch.export traces with;
# the exported program runs the real one, so only the exporting process needs this
INT4_OP = "quantized::embedding_bag_4bit_rowwise_offsets"
if not torch._C._dispatch_has_kernel_for_dispatch_key(INT4_OP, "Meta"):
    torch.library.impl(INT4_OP, "Meta", _int4_shape)


class PooledEmbeddings(nn.Module):
    """Every table (SUM pooling, one feature each) in one weight [sum(rows) + 1, d] and one
    pooled lookup: (values [N], lengths [F * B], B) -> [B, F * d], features in column order
    (what `DenseInput` builds). The last row is zeros: an id outside its table pools as a
    missing value (the reader refuses such ids; a server may meet new ones)."""

    def __init__(self, tables: list[torch.Tensor], quantize: str):
        super().__init__()
        self.quantize, self.num_features, self.dim = quantize, len(tables), tables[0].shape[1]
        rows = torch.tensor([t.shape[0] for t in tables], device=tables[0].device)
        self.register_buffer("rows", rows)  # [F] each table's rows
        self.register_buffer("start", torch.cumsum(rows, 0) - rows)  # [F] its first row in `weight`
        self.zero_row = int(rows.sum())
        weight = torch.cat([*(t.detach().float() for t in tables), tables[0].new_zeros(1, self.dim)])
        # ATen packs on the CPU only; the packed rows then go where the lookup runs
        self.register_buffer("weight", PREPACK[quantize](weight.cpu()).to(weight.device))

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, batch: int) -> torch.Tensor:
        # `batch` is dense.shape[0]: lengths.shape[0] // F would be a symbol of its own to
        # torch.export, and the view below would then make the program refuse batch 1
        f, d = self.num_features, self.dim
        offsets = torch.cat([lengths.new_zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        feature = torch.arange(f * batch, device=values.device) // batch  # [F * B] each bag's feature
        feature = torch.repeat_interleave(feature, lengths, output_size=values.shape[0])  # [N]
        known = (values >= 0) & (values < self.rows[feature])
        ids = torch.where(known, values + self.start[feature], self.zero_row)
        pooled = LOOKUP[self.quantize](self.weight, ids, offsets)  # [F * B, d], feature-major
        return pooled.view(f, batch, d).transpose(0, 1).reshape(batch, f * d)


class Serving(nn.Module):
    """(dense float32 [B, D], values int64 [N], lengths int32 [F * B], the KJT's layout) ->
    scores [B, T] in task order: probabilities for binary tasks, the raw value for regression."""

    def __init__(self, embeddings: PooledEmbeddings, model: MultiTaskModel, binary: list[bool]):
        super().__init__()
        self.embeddings, self.model = embeddings, model
        self.register_buffer("binary", torch.tensor(binary, device=embeddings.weight.device))

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.embeddings(values, lengths, dense.shape[0]), dense], dim=1)
        logits, _ = self.model.dense_forward(x)
        return torch.where(self.binary, logits.sigmoid(), logits)


def load_trained(run: str | Path, overrides: list[str], device: torch.device
                 ) -> tuple[Config, Columns, MultiTaskModel, Path, dict]:
    """The unsharded model of a run's checkpoint (any world size or plan: DCP reassembles the
    shards), in eval mode, with its config, columns, checkpoint folder and train state."""
    path = checkpoint.resolve(run)
    cfg = load_config(path / "config.json", overrides)
    columns = resolve_columns(cfg)
    model = MultiTaskModel(columns, cfg.tasks, cfg.model, device=device)
    model.sparse.to_empty(device=device)  # from `meta`; every value comes from the checkpoint
    try:
        state = checkpoint.load(path, MultiTaskTrain(model, cfg.tasks))  # the trainer's tensor names
    except CheckpointException as e:  # a BaseException: DCP's wrapper of the first rank's error
        reason = " ".join(str(next(iter(e.failures.values()))[0]).split())
        given = f" with {' '.join(overrides)}" if overrides else ""
        raise ArtifactError(f"{path}: its tensors do not fit the model of its config.json{given} ({reason}); "
                            f"export with the config it was trained with") from None
    return cfg, columns, model.eval().requires_grad_(False), path, state


def serving_layout(model: MultiTaskModel) -> None:
    """Stores each `Experts`' first weight [E, in, H] as a view of an [in, E, H] tensor: its
    einsum reads it as one [in, E * H] matrix, which otherwise copies the whole weight on every
    call (the Criteo-shape head's 55 MB: a batch-1 call took 65 ms with the copy, 4 without,
    on one CPU thread)."""
    for module in model.modules():
        if isinstance(module, Experts):
            weight = module.weights[0]
            weight.data = weight.data.transpose(0, 1).contiguous().transpose(0, 1)  # same values


def trace(serving: Serving, num_dense: int, num_features: int, device: torch.device) -> torch.export.ExportedProgram:
    """torch.export with the batch and the number of ids dynamic (N may be 0: all missing)."""
    b = 3  # an example batch of 0, 1 and 2 ids a bag (0 and 1 would be specialized)
    lengths = (torch.arange(num_features * b, device=device) % 3).int()
    example = (torch.zeros(b, num_dense, device=device), torch.zeros(int(lengths.sum()), dtype=torch.int64,
                                                                     device=device), lengths)
    batch, ids = torch.export.Dim("batch"), torch.export.Dim("ids", min=0)
    with torch.no_grad():
        return torch.export.export(serving, example, strict=False,
                                   dynamic_shapes=({0: batch}, {0: ids}, {0: num_features * batch}))


def describe(cfg: Config, columns: Columns, quantize: str, device: str, checkpoint_path: Path, step: int) -> dict:
    """meta.json: what the program takes and returns, and where it came from."""
    meta = {
        "format": FORMAT,
        "call": "scores = torch.export.load('model.pt2').module()(dense, values, lengths)",
        "inputs": {
            "dense": "float32 [B, D]: the columns of 'dense', in that order",
            "values": "int64 [N]: the ids of feature 0 for rows 0..B-1, then of feature 1, ... "
                      "(a KeyedJaggedTensor's values, keys in 'features' order)",
            "lengths": "int32 [F * B]: ids of feature f in row b at f * B + b (the KeyedJaggedTensor's "
                       "lengths); 0 or an id outside [0, cardinality) is a missing value",
        },
        "outputs": "float32 [B, T]: one column per task of 'tasks', in that order; a probability for "
                   "a binary task, the predicted value for a regression task",
        "dense": list(columns.dense),
        "features": list(columns.categorical),
        "cardinality": list(columns.cardinality),
        "multi_hot": sorted(columns.multi_hot),
        "tasks": list(cfg.tasks),
        "task_types": [t.type for t in cfg.tasks.values()],
        "quantize": quantize,
        "device": device,
        "torch": torch.__version__,
        "checkpoint": str(checkpoint_path),
        "step": step,
    }
    if columns.offsets:  # HugeCTR's slot offsets: the program takes keys with them taken off
        meta["key_offsets"] = list(columns.offsets)
    return meta


def export(run: str | Path, out: str | Path, quantize: str = "none", device: str = "cpu",
           overrides: list[str] | None = None) -> dict:
    """Writes OUT/model.pt2, OUT/config.json and, last, OUT/meta.json; returns the meta."""
    if quantize not in PREPACK:
        raise ArtifactError(f"quantize is {quantize!r}; use one of {', '.join(PREPACK)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"--device cuda, but torch {torch.__version__} sees no GPU here; export on the "
                            f"machine (and torch build) that will serve, or use --device cpu")
    dev = torch.device(device)
    cfg, columns, model, path, state = load_trained(run, overrides or [], dev)
    if quantize == "int4" and cfg.model.embedding_dim % 2:
        raise ArtifactError(f"--quantize int4 packs two values a byte; model.embedding_dim "
                            f"{cfg.model.embedding_dim} is odd: use int8")
    tables = [model.sparse.ebc.embedding_bags[table_name(f)].weight for f in columns.categorical]
    embeddings = PooledEmbeddings(tables, quantize)
    del model.sparse, tables  # the collection is not part of the artifact
    serving_layout(model)
    binary = [t.type == "binary" for t in cfg.tasks.values()]
    program = trace(Serving(embeddings, model, binary).eval(), len(columns.dense), len(columns.categorical), dev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # an older export's meta must not vouch for a half-written one
    torch.export.save(program, str(out / PROGRAM))
    (out / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    meta = describe(cfg, columns, quantize, device, path, state["step"])
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta
