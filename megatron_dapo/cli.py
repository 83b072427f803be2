"""The `megatron-dapo` command line.

megatron-dapo check-config CONFIG [dotted.key=value ...]   validate and print the config
megatron-dapo demo CONFIG [dotted.key=value ...]           the embedded CPU main job
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from megatron_dapo.config import RunConfig
from megatron_dapo.yaml_config import ConfigError, load_config


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


def _demo(config: RunConfig, args: argparse.Namespace) -> int:
    """Run the main job on the embedded CPU default."""
    from megatron_dapo.algorithm_demo import StepReport, run_algorithm_demo

    print(
        f"megatron-dapo demo ({args.config})\n"
        "  The Megatron-Core trainer and the SGLang rollout fleet are not built yet, so this run\n"
        "  trains a toy tabular policy on `a+b` prompts with the real DAPO algorithm core: rule\n"
        "  reward, soft overlong punishment, dynamic sampling, group advantages, clip-higher\n"
        f"  token-level loss ({config.algorithm.policy_loss}, {config.algorithm.loss_aggregation},"
        f" eps {config.algorithm.eps_low}/{config.algorithm.eps_high}), "
        f"G = {config.rollout.n_samples_per_prompt}, {config.training.steps} steps.",
        flush=True,
    )

    def show(report: StepReport) -> None:
        print(
            f"step {report.step + 1:3d}/{config.training.steps}  accuracy {report.accuracy:.3f}  "
            f"entropy {report.entropy:.3f}  clip low/high {report.clip_low:.3f}/"
            f"{report.clip_high:.3f}  generation rounds {report.generation_rounds}",
            flush=True,
        )

    reports = run_algorithm_demo(config, progress=show)
    first, last = reports[0].accuracy, reports[-1].accuracy
    print(f"accuracy {first:.3f} -> {last:.3f} over {len(reports)} steps")
    return 0


COMMANDS = {"check-config": _check_config, "demo": _demo}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-dapo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        command = sub.add_parser(name, help=(fn.__doc__ or name).split("\n")[0])
        command.add_argument("config", help="run config YAML (see configs/)")
        command.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.steps=5")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return COMMANDS[args.command](config, args)


if __name__ == "__main__":
    sys.exit(main())
