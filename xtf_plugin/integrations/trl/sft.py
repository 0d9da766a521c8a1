"""`xtf sft`: `trl sft` with one more setting, `xtf`.

    xtf sft --config cfg.yaml [any trl sft flag ...] [--xtf '{"drop_ratio": 0.1}' | --xtf xtf.yaml]

The arguments are parsed by TRL's own `TrlParser` over `ScriptArguments`, `XTFSFTConfig`, `ModelConfig` and
`DatasetMixtureConfig`, so every `trl sft` key and flag means the same here, and the YAML's `xtf:` block is
`XTFSFTConfig.xtf`. The training is the installed TRL's own `trl sft` script (`trl.scripts.sft.main`), run with
`XTFSFTTrainer` where it builds an `SFTTrainer`: whatever `trl sft` does in that TRL version (the eval split,
dataset mixtures, `push_to_hub`, resuming, finishing the trackers), `xtf sft` does too. Like `trl sft`, it runs
under `accelerate launch`; arguments that TRL does not know (such as `--num_processes 2`) go to accelerate.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from xtf_plugin.config import XTFConfigError
from xtf_plugin.errors import XTFError

if TYPE_CHECKING:
    from xtf_plugin.integrations.trl.trainer import XTFSFTTrainer

# the trainers built in this process: referenced until it ends (see `train`)
_TRAINERS: list[XTFSFTTrainer] = []


def make_parser():  # type: ignore[no-untyped-def]
    """TRL's `trl sft` parser, with `XTFSFTConfig` in place of `SFTConfig`."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from xtf_plugin.integrations.trl.config import XTFSFTConfig

    return TrlParser((ScriptArguments, XTFSFTConfig, ModelConfig, DatasetMixtureConfig), prog="xtf sft")


def train(script_args, training_args, model_args, dataset_args) -> XTFSFTTrainer:  # type: ignore[no-untyped-def]
    """Run TRL's `trl sft` training function with `XTFSFTTrainer`; returns the trainer.

    TRL's script imports `SFTTrainer` from the `trl` package when it runs, so the name is pointed at
    `XTFSFTTrainer` for that call (and restored): the script itself stays TRL's, for every TRL version.
    """
    import trl
    from trl.scripts import sft as trl_sft

    from xtf_plugin.integrations.trl.trainer import XTFSFTTrainer

    class ReferencedTrainer(XTFSFTTrainer):
        # Freeing the trainer frees the DDP reducer, whose deallocation after the process group was destroyed
        # runs gloo's teardown, which can deadlock (seen in CI): `distributed.leave_group` ends the process while
        # the trainer is still alive.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _TRAINERS.append(self)

    original = trl.SFTTrainer
    trl.SFTTrainer = ReferencedTrainer
    try:
        trl_sft.main(script_args, training_args, model_args, dataset_args)
    finally:
        trl.SFTTrainer = original
    return _TRAINERS[-1]


def launch(argv: list[str]) -> int:
    """`xtf sft`: parse here (a bad setting fails before anything starts), then run this module under
    `accelerate launch`, the way `trl sft` runs its script."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = make_parser()
    try:
        *_, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except XTFConfigError as error:
        # the block came from the YAML unless --xtf replaced it: name the file, as for every other bad input
        if "--config" in argv and "--xtf" not in argv and argv.index("--config") + 1 < len(argv):
            raise XTFConfigError(f"{argv[argv.index('--config') + 1]}: {error}") from error
        raise
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


def main(argv: list[str] | None = None) -> XTFSFTTrainer:
    """Entry point inside each process started by accelerate; returns the trainer."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    script_args, training_args, model_args, dataset_args = make_parser().parse_args_and_config(
        argv, fail_with_unknown_args=False
    )
    return train(script_args, training_args, model_args, dataset_args)


if __name__ == "__main__":
    from xtf_plugin.distributed import is_main_process, leave_group
    from xtf_plugin.models import import_model_libraries

    import_model_libraries(with_peft=True)
    try:
        trainer = main()
    except XTFError as error:  # e.g. a streaming dataset: one line, as the `xtf` command prints its errors
        if is_main_process():
            print(f"xtf sft: error: {error}", file=sys.stderr)
        sys.exit(2)
    leave_group(0)  # in a multi-process run: ends the process here, past gloo's teardown
