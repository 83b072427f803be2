"""The `megatron-dapo` command line.

megatron-dapo check-config CONFIG [dotted.key=value ...]   validate and print the config
megatron-dapo train CONFIG [dotted.key=value ...]          DAPO training (the main job)
megatron-dapo sft CONFIG [dotted.key=value ...]            supervised warm-up (`sft:` section)
megatron-dapo plan CONFIG [--gpu-memory-gib 80] [...]     per-GPU memory and GPU counts
megatron-dapo eval CONFIG CHECKPOINT [...] [--output F]    held-out evaluation of a checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from megatron_dapo.config.loading import ConfigError, load_config
from megatron_dapo.config.schema import RunConfig


def _check_config(config: RunConfig, args: argparse.Namespace) -> int:
    """Validate a config and print it with every default filled in."""
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    par = config.parallelism
    print(
        f"# OK: {args.config} is valid; world {config.launch.world_size} = TP {par.tensor} x "
        f"PP {par.pipeline} x DP {config.data_parallel_size} (EP {par.expert})",
        file=sys.stderr,
    )
    return 0


def _on_local_ranks(
    config: RunConfig, args: argparse.Namespace, run: Callable[[RunConfig], None]
) -> int:
    """`run(config)` on this rank; a run that wants several local ranks and was not started by
    torchrun first re-executes `megatron-dapo COMMAND CONFIG overrides...` under it."""
    from megatron_dapo.train import needs_relaunch, relaunch_under_torchrun
    from pipeline.parent_death import exit_with_parent

    if needs_relaunch(config):
        return relaunch_under_torchrun(config, [args.command, args.config, *args.overrides])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun rank, in a session of its own
        exit_with_parent()
    run(config)
    return 0


def _train(config: RunConfig, args: argparse.Namespace) -> int:
    """Train a policy with DAPO: the trainer, its rollout fleet and metrics (the main job)."""
    from megatron_dapo.train import run

    return _on_local_ranks(config, args, run)


def _sft(config: RunConfig, args: argparse.Namespace) -> int:
    """Supervised warm-up of the policy on prompt/response pairs (`sft:`), writing an HF
    checkpoint that `train` starts from."""
    from megatron_dapo.sft import check_output_dir, run
    from pipeline.prompts import MalformedPromptData, read_rows

    sft = config.sft
    if sft is None:
        print(f"error: {args.config} has no sft section", file=sys.stderr)
        return 2
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # bad input stops the command before any rank
        if sft.data.path is not None and not Path(sft.data.path).is_file():
            print(f"error: sft.data.path={sft.data.path}: no such file", file=sys.stderr)
            return 2
        try:
            check_output_dir(sft)
            read_rows(sft.data)
        except (FileExistsError, MalformedPromptData) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return _on_local_ranks(config, args, run)


def _plan(config: RunConfig, args: argparse.Namespace) -> int:
    """Per-GPU memory of the trainer's ranks and the fleet's servers, and the GPUs each role
    needs, estimated from the config alone (`megatron_dapo.config.memory_plan`)."""
    from megatron_dapo.config.memory_plan import format_plan, memory_plan

    print(f"plan of {args.config} on {args.gpu_memory_gib:g} GiB GPUs")
    print(format_plan(config, memory_plan(config, args.gpu_memory_gib)))
    return 0


def _eval(config: RunConfig, args: argparse.Namespace) -> int:
    """Evaluate an HF checkpoint (a run's `weights/v<N>`, any HF directory) on the config's
    `eval.datasets` with an embedded SGLang fleet: prints a table and writes a JSON result
    (numbers and every judged sample). Generation and scoring only: no torchrun, no Megatron."""
    from pipeline.checkpoint_eval import evaluate_checkpoint

    checkpoint = Path(os.path.expanduser(args.checkpoint))
    run_dir = Path(config.checkpoint.dir).parent
    output = Path(args.output) if args.output else run_dir / "eval" / f"{checkpoint.name}.json"
    try:
        report = evaluate_checkpoint(
            config.data_plane_config(), checkpoint, output.parent / f"{checkpoint.name}-fleet"
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"eval of {checkpoint} ({report.seconds:.1f}s)")
    print(report.table())
    output.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": str(args.config), "checkpoint": str(checkpoint), **report.record(True)}
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"result: {output}")
    return 0


COMMANDS = {
    "check-config": _check_config,
    "train": _train,
    "sft": _sft,
    "plan": _plan,
    "eval": _eval,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-dapo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        command = sub.add_parser(name, help=(fn.__doc__ or name).split("\n")[0])
        command.add_argument("config", help="run config YAML (see configs/)")
        if fn is _eval:
            command.add_argument("checkpoint", help="HF checkpoint directory to evaluate")
            command.add_argument(
                "--output", help="JSON result (default: <run dir>/eval/<checkpoint name>.json)"
            )
        command.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.steps=5")
        if fn is _plan:
            command.add_argument(
                "--gpu-memory-gib", type=float, default=80.0, help="GPU memory (80: H100 SXM)"
            )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return COMMANDS[args.command](config, args)


if __name__ == "__main__":
    sys.exit(main())
