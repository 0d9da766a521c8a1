"""`xtf sft`: `trl sft` with XTF token filtering.

    xtf sft --config cfg.yaml [any trl sft flag ...] [--xtf KEY=VALUE ...]

It accepts every key and flag `trl sft` accepts (TRL's own `TrlParser` over `ScriptArguments`, `SFTConfig`,
`ModelConfig`, `DatasetMixtureConfig`; QLoRA with `--load_in_4bit --use_peft`), plus an `xtf:` block in the
YAML (the same `XTFConfig` as everywhere) and `--xtf KEY=VALUE` overrides with dotted keys. Like `trl sft`, it
runs under `accelerate launch` (unconsumed arguments such as `--num_processes 2` go to accelerate), and trains
with `XTFSFTTrainer`, which scores the training set with the model it is about to train.

The `xtf:` block is taken out of the YAML before TRL reads it: TRL forwards unknown keys to accelerate, which
would refuse them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from xtf_plugin.cli import build_config, read_yaml_mapping
from xtf_plugin.config import XTFConfig
from xtf_plugin.errors import XTFError

XTF_FLAG = "--xtf"
# copies of YAML files made for this process; removed at exit (also before `leave_group` ends a rank, skipping atexit)
_TEMP_FOLDERS: list[str] = []


def _remove_temp_folders() -> None:
    while _TEMP_FOLDERS:
        shutil.rmtree(_TEMP_FOLDERS.pop(), ignore_errors=True)


atexit.register(_remove_temp_folders)


def split_xtf_arguments(argv: list[str]) -> tuple[list[str], XTFConfig]:
    """Separate XTF's settings from TRL's arguments.

    Returns:
        (arguments for TRL, with `--config` pointing at a copy of the YAML without its `xtf:` block;
        the validated `XTFConfig`).
    Raises:
        XTFError: one line naming the file and key of a bad setting.
    """
    args = list(argv)
    overrides: list[str] = []
    while XTF_FLAG in args:
        index = args.index(XTF_FLAG)
        if index + 1 >= len(args):
            raise XTFError("--xtf: expected KEY=VALUE, e.g. --xtf drop_ratio=0.1")
        overrides.append(args[index + 1])
        del args[index : index + 2]
    config_file = None
    if "--config" in args:
        index = args.index("--config")
        if index + 1 >= len(args):
            raise XTFError("--config: expected a YAML file")
        config_file = args[index + 1]
        args[index + 1] = _yaml_without_xtf(config_file)
    xtf_config = build_config(config_file, overrides) if config_file and _has_xtf_block(config_file) else build_config(None, overrides)
    return args, xtf_config


def _has_xtf_block(path: str) -> bool:
    return "xtf" in read_yaml_mapping(path, "trl sft settings")


def _yaml_without_xtf(path: str) -> str:
    data = read_yaml_mapping(path, "trl sft settings")
    if "xtf" not in data:
        return path
    data.pop("xtf")
    folder = tempfile.mkdtemp(prefix="xtf-sft-")
    _TEMP_FOLDERS.append(folder)
    stripped = Path(folder) / Path(path).name
    stripped.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(stripped)


def make_parser():  # type: ignore[no-untyped-def]
    """TRL's own `trl sft` parser."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig), prog="xtf sft")


def train(script_args, training_args, model_args, dataset_args, xtf_config: XTFConfig):  # type: ignore[no-untyped-def]
    """What `trl sft` does, with `XTFSFTTrainer`; returns the trainer.

    The process group is left alive: destroying it while the DDP reducer still holds it lets the reducer's
    deallocation run gloo's teardown, which can deadlock (seen in CI and locally under load); the entry point
    ends the process with `distributed.leave_group` while the trainer is still referenced."""
    from datasets import load_dataset
    from trl import get_dataset, get_peft_config, get_quantization_config

    from xtf_plugin.integrations.trl.trainer import XTFSFTTrainer

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    else:
        raise XTFError("either `datasets` or `dataset_name` must be given")
    trainer = XTFSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        xtf_config=xtf_config,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    trainer.accelerator.wait_for_everyone()
    for tracker in trainer.accelerator.trackers:  # what end_training does, but the group's destruction
        tracker.finish()
    return trainer


def launch(argv: list[str]) -> int:
    """`xtf sft`: validate the arguments here (bad settings fail before anything starts), then run this module
    under `accelerate launch` the way `trl sft` runs its script."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    trl_args, _ = split_xtf_arguments(argv)
    parser = make_parser()
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        trl_args, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = config_remaining + cli_remaining
    script_args = _without_subsequence(argv, cli_remaining)
    accelerate_args = launch_command_parser().parse_args([*launch_args, "--module", __name__, *script_args])
    try:
        launch_command(accelerate_args)
    except subprocess.CalledProcessError as error:
        # the training processes have printed their own error already
        return error.returncode or 1
    return 0


def _without_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` without the ordered `subsequence` (the arguments accelerate consumes, e.g. `--num_processes 2`,
    removed where they occur, not wherever an equal string occurs)."""
    result, pending = [], list(subsequence)
    for item in items:
        if pending and item == pending[0]:
            pending.pop(0)
        else:
            result.append(item)
    return result


def main(argv: list[str] | None = None):  # type: ignore[no-untyped-def]
    """Entry point inside each process started by accelerate; returns the trainer."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    trl_args, xtf_config = split_xtf_arguments(argv)
    script_args, training_args, model_args, dataset_args = make_parser().parse_args_and_config(
        trl_args, fail_with_unknown_args=False
    )
    return train(script_args, training_args, model_args, dataset_args, xtf_config)


if __name__ == "__main__":
    from xtf_plugin.distributed import leave_group

    trainer = main()  # referenced until the process ends: its reducer must not tear the group down
    _remove_temp_folders()
    leave_group(0)  # in a multi-process run: ends the process here, past gloo's teardown
