"""bench/criteo1tb.py end to end on CPU, made tiny: data, reader, embedding (zipf and uniform
ids), dense head, the trainer from the Parquet with its evaluation, and a checkpoint saved and
resumed from; the UVM phases say why they are skipped. And past --hard-limit the report is
still written."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = ["--rows", "6144", "--test-rows", "1024", "--batch-size", "256", "--phase-seconds", "0.5",
        "--e2e-steps", "6", "--checkpoint-steps", "2", "--max-cardinality", "2000"]
SMALL_MODEL = ["--model.embedding_dim", "8", "--model.num_experts", "2", "--model.expert_layers", "[16, 8]",
               "--model.tower_layers", "[8]"]


def run(tmp_path: Path, *more: str) -> tuple[subprocess.CompletedProcess, str, dict]:
    out = tmp_path / "RESULTS.md"
    args = [sys.executable, str(REPO / "bench" / "criteo1tb.py"), "--work", str(tmp_path / "work"), "--out", str(out),
            *TINY, *more, "--", *SMALL_MODEL]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text().split("\n## ")[-1]  # this run's section
    record = json.loads(re.search(r"<!-- bench1tb (\{.*\}) -->", text).group(1))
    return proc, text, record


def row(text: str, phase: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {phase} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_every_phase_runs_on_cpu_and_the_section_says_what_it_measured(tmp_path):
    proc, text, record = run(tmp_path)
    assert "Criteo 1TB shape (`bench/criteo1tb.py`)" in text and "capped at 2,000 rows a table" in text
    rates = record["rates"]
    for phase in ("reader", "embedding fwd+bwd, zipf ids", "embedding fwd+bwd, uniform ids", "dense head bf16",
                  "e2e hbm"):
        assert rates[phase] > 0, phase
        assert float(row(text, phase)[1].replace(",", "")) > 0
    assert "214 ids a row, fresh each step (zipf alpha 1.05)" in row(text, "embedding fwd+bwd, zipf ids")[5]
    e2e = row(text, "e2e hbm")
    assert re.search(r"eval AUC click 0\.\d+ / convert 0\.\d+ \(best achievable", e2e[5]), e2e
    assert re.fullmatch(r"[\d.]+/[\d.]+/[\d.]+", e2e[2]) and "6 steps" in e2e[5]
    ckpt = record["checkpoint"]
    assert ckpt["save_s"] >= 0 and ckpt["load_s"] >= 0 and ckpt["bytes"] > 0
    assert re.search(r"save [\d.]+ s \([\d.]+ GB/s.*load [\d.]+ s .*extrapolated to all 26 tables", text)
    for phase in ("reader + copy to GPU", "e2e uvm", "embedding uvm fwd+bwd, zipf ids"):
        assert row(text, phase)[5].startswith("skipped: no GPU"), phase
    assert "Serial sum of the embedding (zipf ids) and the dense head" in text
    assert not (tmp_path / "work" / "run_checkpoint").exists()  # the checkpoint is deleted
    # the short table comes last, one line a phase
    tail = proc.stdout.rstrip().splitlines()
    assert tail[-10].startswith("phase") and tail[-1].startswith("embedding uvm fwd+bwd, zipf ids: skipped")
    # a second run reuses the data and skips what it is told to
    proc, text, _ = run(tmp_path, "--skip", "embedding,dense,e2e-hbm,checkpoint")
    assert "reusing" in proc.stdout and "Parquet" in text and row(text, "e2e hbm")[5] == "skipped (--skip)"


def test_past_the_hard_limit_the_report_is_written_with_what_finished(tmp_path):
    # the e2e run would take minutes: the limit stops it
    proc, text, record = run(tmp_path, "--hard-limit", "15", "--skip", "reader,embedding", "--e2e-steps", "100000")
    cut = "cut off at the hard limit (15 s from the start)"
    assert cut in text and "e2e hbm" not in record["rates"]
    if "dense head bf16" in record["rates"]:  # done before the limit (as it is unless the machine is busy)
        assert record["rates"]["dense head bf16"] > 0 and row(text, "e2e hbm")[5] == cut
    else:
        assert row(text, "dense head bf16")[5] == cut
    assert "checkpoint save + load" not in text  # never started
