"""`benchmark --loader`: the train pipeline alone against the PIL DataLoader users write first, same shards."""

from __future__ import annotations

import json

from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig
from alexnet_pipe.convert.job import run_convert


def test_loader_rows_against_the_pil_dataloader(tmp_path, raw_tree):
    run_convert(ConvertConfig(src=raw_tree, dst=tmp_path / "data", formats=("lmdb",), workers=1, progress=False))
    out = tmp_path / "rows.jsonl"
    res = CliRunner().invoke(main, ["benchmark", "-b", "cpu", "-z", "4", "--crop", "67", "--iterations", "3",
                                    "--throughput-steps", "3", "--loader", str(tmp_path / "data"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r["baseline"]) for r in rows] == [("model", True), ("model", False), ("loader", True),
                                                          ("loader", False)]
    base, ours = rows[2], rows[3]
    assert "torch DataLoader, PIL decode" in base["name"] and base["x_baseline"] == 1.0
    assert ours["img_per_s"] > 0 and abs(ours["x_baseline"] - ours["img_per_s"] / base["img_per_s"]) < 1e-9
    # each side timed at its steady rate: the PIL workers' prefetched batches (2 per worker) and
    # DALI's prefetch queue are consumed with the warm-up, untimed; both see the same cores
    assert base["skipped_steps"] == 2 + 2 * base["workers"] and base["workers"] == base["cores"]
    assert ours["skipped_steps"] == 2 + 2 and ours["cores"] == base["cores"]
    assert base["timed_steps"] == ours["timed_steps"] == 3
    assert ours["loader"]["read_workers"] == 0  # train -b cpu's
    for r in rows[:2]:
        assert {"fprop_ms", "bprop_ms", "update_ms", "iteration_ms", "img_per_s"} <= r.keys()
    assert "| loader: DALI train pipeline |" in res.output
