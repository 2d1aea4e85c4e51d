"""Two "machines" x one process each on localhost (gloo, CPU): the multi-node launch trains one step to one adapter."""

import json
import socket
import subprocess
import sys

import pytest

from conftest import REPO


TINY_RECIPE = str(REPO / "tests" / "recipes" / "tiny.yaml")
SHARED_DATA = str(REPO.parent / "shared" / "data" / "lmsys_arena_sample100.csv")


@pytest.mark.slow
def test_two_machines_one_process_each_train_to_one_adapter(tiny_llama, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "adapter"

    def machine(rank: int):
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            str(REPO / "scripts" / "sft.py"), TINY_RECIPE, "--model_name_or_path", str(tiny_llama),
            "--output_dir", str(out), "--train_files", SHARED_DATA, "--max_length", "160", "--max_steps", "1",
            "--max_val_rows", "2",
        ]
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    machines = [machine(0), machine(1)]
    results = [m.communicate(timeout=600) for m in machines]
    for m, (stdout, stderr) in zip(machines, results):
        assert m.returncode == 0, stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert (out / "adapter_model.safetensors").stat().st_size > 20_000
    assert "gradient_accumulation_steps 2 -> 1" in results[0][1]  # the recipe's 2 steps split over the 2 machines
