"""Optional nvdlfw-inspect tensor statistics of the policy's local (non-Transformer-Engine) layers.

    inspector = install_tensor_inspection(config.debug, trainer.chunks)  # None when off
    ...                                   # forward/backward passes log the configured statistics
    inspector.step()                      # once per training iteration
    inspector.close()                     # hooks removed, nvdlfw-inspect shut down

Transformer Engine calls nvdlfw-inspect from inside its own layers; Megatron-Core's local layers
(`transformer_impl: local`, the CPU path) do not, so this module drives nvdlfw-inspect from
PyTorch hooks instead. The YAML file is nvdlfw-inspect's own format (see
`configs/debug/tensor-inspect.yaml`); its `layers:` selectors are matched against module names from
`named_modules()` of each unwrapped model chunk, e.g. `decoder.layers.0.mlp.linear_fc1` or
`decoder.layers.1.mlp.experts.local_experts.3.linear_fc2`. Layer indices are local to the
pipeline stage and expert indices to the expert-parallel rank; with several chunks per rank
(virtual pipeline) names get a `chunk<i>.` prefix. Any submodule can be selected, by
`layer_name_regex_pattern`, `exact_layer_names` or `layer_numbers` (+ `layer_types`), the latter
only for names with exactly one number (so not the experts). A module may belong to one
section, and a section that selects no module on any rank is an error.

The features' `tensors` are, per selected module and forward call:

    activation  the first tensor argument of the forward call (integer inputs as float32)
    output      the first tensor of the forward output (Megatron linears return (out, bias))
    weight      the module's own `weight` parameter
    gradient    the gradient of the loss with respect to `output`, when it flows back

The hooks only read: the forward and backward math is unchanged. Only training passes are
logged: the forward-only pass that recomputes pi_old (`algorithm.old_log_probs`) runs without
autograd and is skipped. Statistics are those of
nvdlfw-inspect's `LogTensorStats` (min, max, mean, std, l1_norm, l2_norm; `freq`, `start_step`,
`end_step`, `start_end_list`), one log line per statistic and forward call (so one per
micro-batch), computed on this rank's tensor (a tensor-parallel shard under TP; no collective),
into `<log_dir>/nvdlfw_inspect_statistics_logs/nvdlfw_inspect_globalrank-<rank>.log`. Empty
tensors (an expert that received no tokens) are skipped. Transformer Engine's features (the
`transformer_engine` namespace: FP8 statistics, precision overrides) need TE layers and are
refused with an error naming them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from megatron_dapo.config.schema import TensorInspectConfig

TENSOR_NAMES = ("activation", "output", "weight", "gradient")
_STATS_API = "log_tensor_stats"
_TE_NAMESPACE = "transformer_engine"
# nvdlfw-inspect 0.2.2 adds file handlers to these loggers on `initialize` and never removes them.
_NVDLFW_LOGGERS = ("nvdlfw_inspect", "Default Statistics")


def install_tensor_inspection(
    config: TensorInspectConfig, chunks: Sequence[torch.nn.Module], start_iteration: int = 0
) -> TensorInspector | None:
    """A `TensorInspector` on `chunks`, or None (nvdlfw-inspect not imported) when it is off."""
    if config.tensor_inspect_config is None:
        return None
    return TensorInspector(config, chunks, start_iteration)


class TensorInspector:
    """nvdlfw-inspect's debug session plus the hooks that feed it; see the module docstring.

    Attributes:
        layers: selected module name -> the tensor names logged for it.
    """

    def __init__(
        self,
        config: TensorInspectConfig,
        chunks: Sequence[torch.nn.Module],
        start_iteration: int = 0,
    ):
        """Start nvdlfw-inspect with `config` and hook the modules its sections select.

        Args:
            config: `tensor_inspect_config` must be set.
            chunks: the model chunks of this rank, wrapped (DDP, Float16Module) or not.
            start_iteration: the iteration of the first forward pass (the step resumed from).

        Raises:
            FileNotFoundError: the YAML file does not exist.
            ValueError: the YAML is not nvdlfw-inspect's format, a section selects no module,
                names a tensor other than `TENSOR_NAMES` or `weight` of a module without one,
                or a feature needs Transformer Engine or is not a tensor-statistics feature.
            RuntimeError: another nvdlfw-inspect session is active in this process.
        """
        import nvdlfw_inspect.api as debug_api

        if config.tensor_inspect_config is None:
            raise ValueError("TensorInspectConfig.tensor_inspect_config is not set")
        path = Path(config.tensor_inspect_config)
        sections = _read_sections(path)
        missing = [d for d in config.feature_dirs if not Path(d).is_dir()]
        if missing:
            raise FileNotFoundError(f"tensor-inspect feature_dirs do not exist: {missing}")
        if debug_api.DEBUG_MANAGER is not None:
            raise RuntimeError("an nvdlfw-inspect session is already active in this process")
        self._api = debug_api
        self._handlers = {name: set(logging.getLogger(name).handlers) for name in _NVDLFW_LOGGERS}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        modules = dict(_named_modules(chunks))
        try:
            debug_api.initialize(
                config_file=sections,
                feature_dirs=list(config.feature_dirs),
                log_dir=config.log_dir,
                init_training_step=start_iteration,
            )
            enabled = [name for name, section in sections.items() if section.get("enabled")]
            self.layers = _select_layers(path, enabled, modules)
        except AssertionError as error:  # nvdlfw-inspect's way of rejecting a config
            self.close()
            raise ValueError(f"{path}: {error}") from error
        except BaseException:
            self.close()
            raise
        for name in self.layers:
            hook = modules[name].register_forward_hook(self._hook(name), with_kwargs=True)
            self._hooks.append(hook)

    def step(self) -> None:
        """Advance nvdlfw-inspect's iteration, which gates `freq`/`start_step` and labels lines.

        Call it after each training iteration: once per optimizer step, or once per rollout step
        when called after `PolicyTrainer.train` (its mini-batches then share one iteration).
        """
        self._api.step()

    def close(self) -> None:
        """Remove the hooks, end the nvdlfw-inspect session and close its log files."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._api.end_debug()
        for name, before in self._handlers.items():
            logger = logging.getLogger(name)
            for handler in set(logger.handlers) - before:
                logger.removeHandler(handler)
                handler.close()

    def _hook(self, name: str) -> Callable[..., None]:
        tensors = self.layers[name]

        def log(tensor_name: str, tensor: torch.Tensor) -> None:
            if tensor.numel():
                tensor = tensor.detach()
                self._api.log_tensor_stats(
                    layer_name=name,
                    tensor_name=tensor_name,
                    tensor=tensor if tensor.is_floating_point() else tensor.float(),
                    skip_reduction=True,
                )

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not torch.is_grad_enabled():
                return  # a forward pass that does not train (pi_old recomputed)
            found = {
                "activation": _first_tensor([*args, *kwargs.values()]),
                "output": _first_tensor(output if isinstance(output, tuple) else [output]),
                "weight": getattr(module, "weight", None),
            }
            for tensor_name in tensors:
                if tensor_name != "gradient" and found[tensor_name] is not None:
                    log(tensor_name, found[tensor_name])
            out = found["output"]
            if "gradient" in tensors and out is not None and out.requires_grad:
                out.register_hook(lambda grad: log("gradient", grad))

        return hook


def _read_sections(path: Path) -> dict[str, Any]:
    """The YAML's sections, with Transformer Engine features refused by name."""
    if not path.is_file():
        raise FileNotFoundError(f"tensor-inspect config {path} does not exist")
    sections = yaml.safe_load(path.read_text())
    if not isinstance(sections, dict) or not all(isinstance(s, dict) for s in sections.values()):
        raise ValueError(f"{path}: expected nvdlfw-inspect sections (name: {{enabled, layers}})")
    for section_name, section in sections.items():
        te_features = section.get(_TE_NAMESPACE) or {}
        if section.get("enabled") and te_features:
            raise ValueError(
                f"{path} section {section_name!r}: Transformer Engine feature(s) "
                f"{', '.join(te_features)} need TE layers (model.transformer_impl: "
                "transformer_engine with TE's debug features); the local layers run "
                "nvdlfw-inspect's tensor-statistics features such as LogTensorStats"
            )
    return sections


def _named_modules(chunks: Sequence[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) of every submodule of the unwrapped chunks; see the module docstring."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module
    from megatron.core.utils import unwrap_model

    models = unwrap_model(list(chunks), (DistributedDataParallel, Float16Module))
    for index, model in enumerate(models):
        prefix = f"chunk{index}." if len(models) > 1 else ""
        for name, module in model.named_modules():
            if name:
                yield prefix + name, module


def _select_layers(
    path: Path, section_names: Sequence[str], modules: dict[str, torch.nn.Module]
) -> dict[str, tuple[str, ...]]:
    """Module name -> tensor names to log, for the modules the loaded sections select.

    Collective when torch.distributed is initialized: pipeline stages (and expert-parallel ranks)
    hold different modules, so a section must select a module on some rank, and a problem found
    on one rank is raised on all of them (none is left waiting).

    Args:
        section_names: the enabled sections of the YAML, in file order (as nvdlfw-inspect
            loaded them into `ConfigManager.configs`).
        modules: this rank's modules by name.
    """
    from nvdlfw_inspect.config_manager import ConfigManager

    specs = dict(zip(section_names, ConfigManager.configs, strict=True))
    _check_features(path, specs)
    matched: set[str] = set()
    problems: list[str] = []
    layers: dict[str, tuple[str, ...]] = {}
    for name, module in modules.items():
        matching = [section for section, spec in specs.items() if _matches(name, spec)]
        if len(matching) > 1:
            problems.append(
                f"layer {name} is selected by sections {matching}, nvdlfw-inspect allows one"
            )
        if len(matching) != 1:
            continue
        matched.add(matching[0])
        extensions = specs[matching[0]].extension_config
        # nvdlfw-inspect would re-run its matcher, which raises on names it cannot parse.
        ConfigManager.layer_name_to_config_cache[name] = extensions
        features = extensions.get("base", {})
        tensors = {t for f in features.values() if f.get("enabled") for t in _tensors(f)}
        unknown = tensors - set(TENSOR_NAMES)
        if "weight" in tensors and not isinstance(getattr(module, "weight", None), torch.Tensor):
            unknown.add("weight")
        if unknown:
            problems.append(
                f"layer {name} ({type(module).__name__}) has no tensor(s) {sorted(unknown)}; "
                f"the hooks provide {', '.join(TENSOR_NAMES)} (weight only for modules with one)"
            )
        if tensors:
            layers[name] = tuple(t for t in TENSOR_NAMES if t in tensors)
    matched, problems = _union_over_ranks(matched, problems)
    unmatched = [section for section in section_names if section not in matched]
    if unmatched:
        examples = ", ".join(list(modules)[:: max(1, len(modules) // 8)])
        problems.append(
            f"section(s) {unmatched} select no layer; layer names are module names from "
            f"named_modules(), e.g. {examples}"
        )
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return layers


def _union_over_ranks(matched: set[str], problems: list[str]) -> tuple[set[str], list[str]]:
    """The matched sections and the problems of all ranks (this rank's alone without a group)."""
    if not dist.is_initialized():
        return matched, problems
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (matched, problems))
    every_problem = [p for _, rank_problems in gathered for p in rank_problems]
    return set().union(*(m for m, _ in gathered)), list(dict.fromkeys(every_problem))


def _check_features(path: Path, specs: dict[str, Any]) -> None:
    """Refuse features the hooks cannot drive, now rather than at the first forward pass.

    A feature must implement `log_tensor_stats` (the one API the hooks call) and compute every
    statistic its section asks for.
    """
    from nvdlfw_inspect.registry import Registry

    base = Registry.data["base"]
    stats_features = set(base.feat_api_to_features[_STATS_API])
    for section, spec in specs.items():
        for namespace, features in spec.extension_config.items():
            unsupported = [f for f in features if namespace != "base" or f not in stats_features]
            if unsupported:
                raise ValueError(
                    f"{path} section {section!r}: feature(s) {', '.join(unsupported)} (namespace "
                    f"{namespace!r}) do not implement {_STATS_API}, the only nvdlfw-inspect API "
                    f"the local-layer hooks call; features that do: {sorted(stats_features)}"
                )
            for feature, feature_config in features.items():
                supported = getattr(base.features[feature], "_get_supported_stats_list", None)
                items = [feature_config, *feature_config.get("tensors_struct", [])]
                stats = {stat.lower() for item in items for stat in item.get("stats", [])}
                if supported is not None and stats - supported():
                    raise ValueError(
                        f"{path} section {section!r}: {feature} does not compute "
                        f"{sorted(stats - supported())} (it computes {sorted(supported())}; "
                        "cur_amax, dynamic_range and the FP8 statistics are Transformer Engine's)"
                    )


def _matches(name: str, spec: Any) -> bool:
    """nvdlfw-inspect's layer matching, with its failures on names it cannot parse as False.

    It raises for a name outside `exact_layer_names` and for `layer_numbers` on a name without
    exactly one number (e.g. `embedding.word_embeddings`, `...local_experts.3.linear_fc1`).
    """
    from nvdlfw_inspect.config_manager import is_layer_in_cfg

    try:
        return is_layer_in_cfg(name, spec)
    except (ValueError, IndexError):
        return False


def _tensors(feature: dict[str, Any]) -> list[str]:
    """The tensor names of one feature's config (`tensors` or `tensors_struct`)."""
    return feature.get("tensors") or [item["tensor"] for item in feature.get("tensors_struct", [])]


def _first_tensor(values: Sequence[Any]) -> torch.Tensor | None:
    return next((value for value in values if isinstance(value, torch.Tensor)), None)
