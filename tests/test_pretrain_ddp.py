"""DDP smoke: torchrun with 2 CPU processes on gloo trains and matches one process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from test_pretrain_train import SMALL, home, run  # noqa: F401  (fixture re-exported)


def test_ddp_two_gloo_processes(home, tmp_path):  # noqa: F811 (the fixture)
    """torchrun with 2 CPU processes: trains, rank 0 writes, and the result equals one process."""
    script = tmp_path / "ddp_run.py"
    overrides = [*SMALL, "text=files", f"text.paths=[{home.parent / 'corpus'}]", "text.val_fraction=0.1",
                 f"home={home}", "train.steps=3", "train.text_ratio=0.25"]
    script.write_text(textwrap.dedent(f"""
        import sys
        from hydra import compose, initialize_config_module
        from gravprobe.pretrain.train import main
        with initialize_config_module("gravprobe.conf", version_base="1.3"):
            cfg = compose("config", overrides={overrides!r})
        main(cfg, sys.argv[1])
    """))
    run(home, tmp_path / "single", "train.steps=3", "train.text_ratio=0.25")   # also builds data + text cache
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "ddp")], env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp/checkpoints/last.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    single = torch.load(tmp_path / "single/checkpoints/last.pt", weights_only=False)
    for k in single["model"]:   # same global batches, gradients averaged over ranks
        torch.testing.assert_close(ckpt["model"][k], single["model"][k], rtol=1e-3, atol=1e-4)
    assert (tmp_path / "ddp/results.json").is_file()
