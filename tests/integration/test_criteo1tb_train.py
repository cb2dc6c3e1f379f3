"""configs/criteo1tb_mmoe.toml trains and learns on CPU at the Criteo 1TB shape made small: the
same 26 columns and multi-hot sizes (214 ids a row), tables cut to at most 500 rows, zipf ids,
small layers."""
import json
import subprocess
import sys

from app.sources.synthetic import SHAPES, SyntheticSpec, fixed_multi_hot, generate

SMALL_MODEL = ["--model.embedding_dim", "8", "--model.num_experts", "2", "--model.expert_layers", "[32, 16]",
               "--model.tower_layers", "[8]", "--model.precision", "fp32", "--data.batch_size", "256",
               "--data.eval_batch_size", "1024", "--data.num_workers", "0", "--optim.dense_lr", "3e-3",
               "--optim.sparse_lr", "0.1", "--train.tensorboard", "false"]


def test_criteo1tb_config_learns_on_zipf_ids(tmp_path):
    rows, sizes = SHAPES["criteo1tb"]
    data, run = tmp_path / "data", tmp_path / "run"
    schema = generate(data, SyntheticSpec(rows={"train": 8000, "test": 2000}, cardinalities=[min(r, 500) for r in rows],
                                          multi_hot_sizes=fixed_multi_hot(sizes), distribution="zipf",
                                          row_group_size=1024, files_per_split=2))
    subprocess.run([sys.executable, "-m", "app", "train", "--config", "configs/criteo1tb_mmoe.toml",
                    "--data.path", str(data), "--train.run_dir", str(run), "--train.epochs", "3", *SMALL_MODEL],
                   check=True, capture_output=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 * -(-8000 // 256)  # 3 epochs of 32 batches, the last one short
    best = schema.meta["best_auc"]["test"]
    for task, metrics in summary["tasks"].items():
        assert 0.6 < metrics["auc"] <= best[task] + 0.02, (task, metrics, best[task])
