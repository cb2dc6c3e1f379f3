"""The exported program against the eager model with TorchRec's collection: multi-hot and
empty bags, batch 1, no ids at all, ids outside a table, a chained and a regression task."""
from __future__ import annotations

import copy

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.config import ModelConfig, TaskConfig
from app.data.schema import Columns
from app.export import PooledEmbeddings, Serving, serving_layout, trace
from app.model import MultiTaskModel, SparseArch, table_name

COLUMNS = Columns(labels=("click", "buy", "spend"), dense=("d0", "d1"), categorical=("a", "b", "c"),
                  cardinality=(7, 5, 11), multi_hot=frozenset({"c"}))
TASKS = {"click": TaskConfig(), "buy": TaskConfig(multiply_by="click"), "spend": TaskConfig(type="regression")}
BINARY = [True, True, False]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MultiTaskModel(COLUMNS, TASKS, ModelConfig(embedding_dim=4, num_experts=2, expert_layers=[8],
                                                   tower_layers=[4]))
    m.sparse = SparseArch(COLUMNS, 4, device="cpu")
    with torch.no_grad():
        for p in m.sparse.parameters():
            p.normal_(0, 1.0)  # trained tables are wider than the init: the scores spread
    return m.eval()


@pytest.fixture(scope="module")
def programs(model):
    tables = [model.sparse.ebc.embedding_bags[table_name(f)].weight for f in COLUMNS.categorical]
    head = copy.deepcopy(model)
    serving_layout(head)
    return {q: trace(Serving(PooledEmbeddings(tables, q), head, BINARY).eval(), 2, 3, torch.device("cpu")).module()
            for q in ("none", "int8", "int4")}


def inputs(batch: int, seed: int):
    """Single-hot a and b (some rows missing), multi-hot c with 0 to 3 ids a row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.cat([(torch.rand(batch, generator=g) > 0.3).int(), (torch.rand(batch, generator=g) > 0.3).int(),
                         torch.randint(0, 4, (batch,), generator=g, dtype=torch.int32)])
    per_feature = lengths.view(3, batch).sum(1).tolist()
    values = torch.cat([torch.randint(0, n, (k,), generator=g) for n, k in zip(COLUMNS.cardinality, per_feature)])
    return torch.randn(batch, 2, generator=g), values, lengths


@torch.no_grad()
def eager(model, dense, values, lengths):
    logits, _ = model(dense, KeyedJaggedTensor(keys=list(COLUMNS.categorical), values=values, lengths=lengths))
    return torch.where(torch.tensor(BINARY), logits.sigmoid(), logits)


@pytest.mark.parametrize("batch", [1, 2, 37])
def test_exported_program_equals_the_eager_model(model, programs, batch):
    dense, values, lengths = inputs(batch, seed=batch)
    expected = eager(model, dense, values, lengths)
    assert torch.equal(programs["none"](dense, values, lengths), expected)
    nothing = (dense, torch.zeros(0, dtype=torch.int64), torch.zeros(3 * batch, dtype=torch.int32))
    assert torch.equal(programs["none"](*nothing), eager(model, *nothing))
    # quantized tables: row-wise int8 close, int4 (a sixteenth of the steps) looser
    assert (programs["int8"](dense, values, lengths) - expected).abs().max() < 2e-3
    assert (programs["int4"](dense, values, lengths) - expected).abs().max() < 3e-2


def test_an_id_outside_its_table_pools_as_missing(programs):
    dense = torch.randn(2, 2)
    lengths = torch.tensor([1, 1, 1, 1, 2, 1], dtype=torch.int32)
    unknown = torch.tensor([3, 7, 4, -1, 2, 11, 5])  # a: 7 (row 1); b: -1 (row 1); c: 11 in row 0's bag
    known = torch.tensor([3, 4, 2, 5])
    without = torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.int32)
    for program in programs.values():
        assert torch.equal(program(dense, unknown, lengths), program(dense, known, without))
