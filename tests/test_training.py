import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from lmsys_trl.training import push_to_hub

from conftest import ARENA_SAMPLE, PANDALM, REPO


TINY_RECIPE = str(REPO / "tests" / "recipes" / "tiny.yaml")
SHARED_DATA = str(REPO.parent / "shared" / "data" / "lmsys_arena_sample100.csv")
HUB_TOKEN = "hf_lmsysTrlTestToken0123456789"


def sft_argv(model, output_dir, *extra):
    return [TINY_RECIPE, "--model_name_or_path", str(model), "--output_dir", str(output_dir),
            "--train_files", SHARED_DATA, "--max_length", "160", *extra]


def run_sft_main(argv):
    """scripts/sft.py's main, in-process: returns (trainer, metrics)."""
    spec = importlib.util.spec_from_file_location("sft_script", REPO / "scripts" / "sft.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.cli(argv)


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """One tiny training run with --push_to_hub, the Hub calls mocked: (trainer, metrics, output_dir, mocks)."""
    out = tmp_path_factory.mktemp("trained") / "adapter"
    with mock.patch("huggingface_hub.HfApi.create_repo") as create_repo, \
            mock.patch("huggingface_hub.HfApi.upload_folder") as upload_folder:
        upload_folder.return_value = mock.Mock(commit_url="https://hub.local/me/tiny/commit/1")
        create_repo.return_value = mock.Mock(repo_id="me/tiny")
        trainer, metrics = run_sft_main(
            sft_argv(tiny_llama, out, "--max_steps", "3", "--push_to_hub", "true", "--hub_model_id", "me/tiny",
                     "--hub_token", HUB_TOKEN)
        )
    return trainer, metrics, out, create_repo, upload_folder


@pytest.mark.slow
def test_training_logs_loss_and_validation_log_loss(trained):
    trainer, metrics, out, *_ = trained
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    # Pinned losses of this tiny run (CPU, fp32, seed 42: deterministic). A torch / transformers / TRL / PEFT upgrade
    # may move them: re-pin by running this test, reading the new values from the failure (or printing
    # `metrics`), and checking the change comes from the library, not from lmsys_trl.
    assert metrics["train_loss"] == pytest.approx(11.59349282582601, rel=1e-4)
    assert metrics["eval_log_loss"] == pytest.approx(1.054288024996599, rel=1e-4)
    assert metrics["eval_accuracy"] == 0.5
    assert json.loads((out / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_adapter_is_saved_non_trivial_and_every_lora_pair_trained(trained, tiny_llama):
    _, _, out, *_ = trained
    adapter = out / "adapter_model.safetensors"
    assert adapter.stat().st_size > 20_000  # never the 40-byte empty adapter
    weights = load_file(str(adapter))
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert len(lora_b) == 2 * 4  # 2 layers x q, k, v, o
    assert all(v.abs().sum() > 0 for v in lora_b.values())  # lora_B starts at zero: each one got gradient
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(out))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert len(loaded) == len(lora_b)
    assert (out / "tokenizer_config.json").exists()


@pytest.mark.slow
def test_model_card_names_base_data_hparams_and_metrics(trained, tiny_llama):
    _, metrics, out, *_ = trained
    card = (out / "README.md").read_text()
    assert "- trl" in card and "- sft" in card and "- lmsys-arena" in card  # TRL's own card, this run's tags
    assert f"- base model: {tiny_llama}" in card
    assert "lmsys_arena_sample100.csv" in card and '"learning_rate": 0.001' in card
    assert f'"eval_log_loss": {metrics["eval_log_loss"]}' in card


@pytest.mark.slow
def test_push_to_hub_uploads_the_adapter_folder_once(trained):
    _, _, out, create_repo, upload_folder = trained
    create_repo.assert_called_once()
    assert create_repo.call_args.args[0] == "me/tiny"
    upload_folder.assert_called_once()
    kwargs = upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/tiny" and kwargs["folder_path"] == str(out)
    assert "checkpoint-*" in kwargs["ignore_patterns"]
    uploaded = set(os.listdir(kwargs["folder_path"]))
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer_config.json"} <= uploaded


@pytest.mark.slow
def test_push_failure_keeps_the_local_adapter_and_says_how_to_retry(trained):
    trainer, _, out, *_ = trained
    before = (out / "adapter_model.safetensors").read_bytes()
    with mock.patch("huggingface_hub.HfApi.upload_folder", side_effect=ConnectionError("network down")):
        with pytest.raises(RuntimeError, match=r"saved locally in .*retry with `hf upload me/tiny"):
            push_to_hub(trainer, "me/tiny")
    assert (out / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_the_hub_token_is_in_no_file_of_the_output_folder(trained):
    _, _, out, *_ = trained
    files = [os.path.join(root, f) for root, _, names in os.walk(out) for f in names]
    assert any(f.endswith("training_args.bin") for f in files)
    assert not [f for f in files if HUB_TOKEN.encode() in open(f, "rb").read()]


@pytest.mark.slow
def test_resume_from_checkpoint_ends_where_an_uninterrupted_run_ends(tiny_llama, tmp_path):
    steps = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--max_val_rows", "2"]
    run_sft_main(sft_argv(tiny_llama, tmp_path / "full", *steps))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed / "checkpoint-2")  # as if killed after step 2
    trainer, _ = run_sft_main(sft_argv(tiny_llama, resumed, *steps, "--resume_from_checkpoint", "true"))
    assert trainer.state.global_step == 4
    full = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    again = load_file(str(resumed / "adapter_model.safetensors"))
    assert full.keys() == again.keys()
    for key in full:
        torch.testing.assert_close(again[key], full[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_run_that_starts_over_resumes_only_its_own_checkpoints(tiny_llama, tmp_path, capsys):
    """An earlier run left checkpoint-4; a run started over with --overwrite_output_dir saved checkpoint-2 (then was
    killed, say). Resuming must take checkpoint-2 and train steps 3-4, not the earlier run's checkpoint-4 (0 steps)."""
    out = tmp_path / "run"
    saving = ["--save_strategy", "steps", "--max_val_rows", "2"]
    run_sft_main(sft_argv(tiny_llama, out, "--max_steps", "4", "--save_steps", "4", *saving))
    assert (out / "checkpoint-4").is_dir()
    run_sft_main(sft_argv(tiny_llama, out, "--max_steps", "2", "--save_steps", "2", "--overwrite_output_dir", "true",
                          *saving))
    assert not (out / "checkpoint-4").exists()  # the earlier run's checkpoints are cleared when a run starts over
    capsys.readouterr()
    trainer, _ = run_sft_main(sft_argv(tiny_llama, out, "--max_steps", "4", "--save_steps", "2", *saving,
                                       "--resume_from_checkpoint", "true"))
    assert f"Resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert trainer.state.global_step == 4
    assert {h["step"] for h in trainer.state.log_history if "loss" in h} >= {3, 4}  # steps 3 and 4 were trained


@pytest.mark.slow
def test_resume_errors_are_one_line(tiny_llama, tmp_path, capsys):
    from lmsys_trl.configs import run_main

    out = tmp_path / "finished"
    run_sft_main(sft_argv(tiny_llama, out, "--max_steps", "1", "--max_val_rows", "2"))  # an adapter, no checkpoint
    spec = importlib.util.spec_from_file_location("sft_script_cli", REPO / "scripts" / "sft.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for resume, expected in (("true", f"nothing to resume in {out}"),
                             (str(tmp_path / "no" / "such"), "no checkpoint folder there")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            run_main(script.cli, sft_argv(tiny_llama, out, "--resume_from_checkpoint", resume))
        err = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 2 and err[-1].startswith("error: ") and expected in err[-1], err[-3:]
        assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("num_processes", [1, 2])
@pytest.mark.slow
def test_accelerate_launch_on_cpu(tiny_llama, tmp_path, num_processes):
    out = tmp_path / f"launch{num_processes}"
    # accelerate's --cpu flag always runs one process; several CPU processes (gloo) come from the torchrun
    # launcher (--multi_gpu) with the recipe's use_cpu: true.
    mode = "--cpu" if num_processes == 1 else "--multi_gpu"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "scripts" / "sft.py"), *sft_argv(tiny_llama, out, "--max_steps", "2", "--max_val_rows", "2"),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").stat().st_size > 20_000
    assert f"Adapter saved to {out}" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert "eval_log_loss" in metrics and metrics["world_size"] == num_processes
    if num_processes == 2:  # the recipe's 2 accumulation steps are split over the 2 processes
        assert "gradient_accumulation_steps 2 -> 1" in result.stderr


@pytest.mark.slow
def test_two_processes_train_packed_sequences(tiny_llama, tmp_path):
    """TRL's packing under DDP (2 CPU processes, gloo): each process takes its packed sequences, the accumulation is
    divided over the processes, and training ends in a saved adapter."""
    out = tmp_path / "packed2"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "scripts" / "sft.py"),
        *sft_argv(tiny_llama, out, "--max_steps", "2", "--max_val_rows", "2", "--train_files", str(PANDALM),
                  str(ARENA_SAMPLE), "--max_train_rows", "16", "--row_max_length", "256", "--max_length", "1024",
                  "--packing", "true", "--packing_strategy", "bfd", "--eval_packing", "false",
                  "--pad_to_multiple_of", "1024", "--per_device_train_batch_size", "1",
                  "--gradient_accumulation_steps", "2"),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").stat().st_size > 20_000
    assert "gradient_accumulation_steps 2 -> 1" in result.stderr


@pytest.mark.slow
def test_an_empty_adapter_file_is_refused(trained, tmp_path):
    from safetensors.torch import save_file

    from lmsys_trl.training import check_adapter

    trainer, _, out, *_ = trained
    check_adapter(str(out), trainer.model)  # the real one passes
    save_file({}, str(tmp_path / "adapter_model.safetensors"))  # what ZeRO-3 without gathering produced
    with pytest.raises(RuntimeError, match="expected 16 non-empty LoRA weights"):
        check_adapter(str(tmp_path), trainer.model)


def test_adapter_saved_from_an_fsdp_gathered_state_dict_equals_the_plain_save(tiny_llama, tmp_path):
    """Under FSDP (auto-wrapped as the Trainer wraps a PEFT model; CPU, gloo, one process) the gathered full state dict
    gives the same adapter file as PEFT's save of the unwrapped model: same keys, same tensors."""
    import socket

    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
    from transformers import AutoModelForCausalLM

    from lmsys_trl.trainer import save_sharded_adapter
    from lmsys_trl.training import check_adapter

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "plain")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                       device_id=torch.device("cpu"))
        assert any("._fsdp_wrapped_module." in name for name, _ in model.named_modules())  # nested wrappers
        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)  # as accelerate gathers for the Trainer
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
            state_dict = wrapped.state_dict()
        (tmp_path / "fsdp").mkdir()
        save_sharded_adapter(model, state_dict, str(tmp_path / "fsdp"))
        (tmp_path / "fsdp16").mkdir()
        save_sharded_adapter(model, state_dict, str(tmp_path / "fsdp16"), torch.bfloat16)
    finally:
        dist.destroy_process_group()
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    sharded = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    assert sorted(sharded) == sorted(plain) and len(plain) == 8
    for key, tensor in plain.items():
        torch.testing.assert_close(sharded[key], tensor, rtol=0, atol=0)
    check_adapter(str(tmp_path / "fsdp"), model)
    assert {t.dtype for t in load_file(tmp_path / "fsdp16" / "adapter_model.safetensors").values()} == {torch.bfloat16}
    with pytest.raises(RuntimeError, match="no LoRA weights of adapter 'default'"):
        save_sharded_adapter(model, {"lm_head.weight": torch.zeros(2)}, str(tmp_path / "fsdp"))


@pytest.mark.slow
def test_a_full_disk_while_saving_leaves_no_partial_output_and_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    """The tokenizer write runs out of space half way: one `error:` line, and the output folder holds none of the
    run's final files (no truncated tokenizer.json beside a complete-looking adapter)."""
    import errno

    from transformers import PreTrainedTokenizerBase

    from lmsys_trl.configs import run_main

    def full_disk(self, save_directory, *args, **kwargs):
        with open(os.path.join(save_directory, "tokenizer.json"), "w") as f:
            f.write('{"truncat')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    spec = importlib.util.spec_from_file_location("sft_script_disk", REPO / "scripts" / "sft.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_main(script.cli, sft_argv(tiny_llama, out, "--max_steps", "1", "--max_val_rows", "2"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exited.value.code == 2 and "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert "No space left on device" in errors[0] and str(out) in errors[0]
    assert not [f for f in os.listdir(out) if not f.startswith("runs")], os.listdir(out)  # nothing final, no staging


@pytest.mark.slow
def test_training_logs_the_answer_log_loss_beside_trls_loss(trained):
    """The A/B/C log loss of each step (what the task is scored on) is logged where TRL's loss is."""
    trainer, *_ = trained
    logged = [h for h in trainer.state.log_history if "answer_log_loss" in h]
    assert len(logged) == 3 and all(math.isfinite(h["answer_log_loss"]) for h in logged)
    assert all(h["answer_log_loss"] != h["loss"] for h in logged)  # the letter alone, not letter + end of turn
