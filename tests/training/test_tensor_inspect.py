"""nvdlfw-inspect statistics of the local layers during real policy steps on one CPU rank.

The logged values are checked against statistics computed here, in float64, from tensors
captured by separate hooks; the model's outputs and gradients must not change.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from launch_helpers import run_torchrun
from training_helpers import VOCAB, random_train_batch, tiny_run_config

from megatron_dapo.config.schema import TensorInspectConfig
from megatron_dapo.mcore.parallel import DistributedEnv, destroy_parallel, initialize_parallel
from megatron_dapo.mcore.tensor_inspect import TensorInspector, install_tensor_inspection
from pipeline.sglang_server import free_port

REPO = Path(__file__).resolve().parents[2]
STATS = ("min", "max", "mean", "std", "l1_norm", "l2_norm")
LINE = re.compile(
    r" - INFO - (?P<layer>\S+)_(?P<tensor>activation|output|weight|gradient)_"
    rf"(?P<stat>{'|'.join(STATS)})\s+iteration=(?P<iteration>\d+)\s+value=(?P<value>\S+)$"
)
CONFIG = {
    "linears": {
        "enabled": True,
        "layers": {"layer_name_regex_pattern": r"(linear_qkv|linear_fc2)$"},
        "LogTensorStats": {
            "enabled": True,
            "tensors": ["activation", "output", "weight", "gradient"],
            "stats": list(STATS),
            "freq": 1,
        },
    },
    "projection_of_layer_2": {
        "enabled": True,
        "layers": {"layer_numbers": [2], "layer_types": ["linear_proj"]},
        "LogTensorStats": {
            "enabled": True,
            "tensors_struct": [{"tensor": "output", "stats": ["max"], "freq": 2}],
        },
    },
    "token_ids": {
        "enabled": True,
        "layers": {"exact_layer_names": ["embedding.word_embeddings"]},
        "LogTensorStats": {"enabled": True, "tensors": ["activation"], "stats": ["max"]},
    },
    "disabled": {"enabled": False, "layers": {"layer_name_regex_pattern": "."}},
}


@pytest.fixture(scope="module")
def trainer():
    """A PolicyTrainer (DDP-wrapped tiny MoE policy, 4 experts + shared expert) on one rank."""
    from megatron_dapo.mcore.policy_step import PolicyTrainer

    config = tiny_run_config(moe=True, max_tokens=40)
    initialize_parallel(config.parallelism, DistributedEnv(0, 1, 0, "127.0.0.1", free_port()), 3)
    yield PolicyTrainer(config)
    destroy_parallel()


def _inspect(tmp_path: Path, sections: object, trainer) -> TensorInspector:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "inspect.yaml"
    path.write_text(yaml.safe_dump(sections))
    config = TensorInspectConfig(tensor_inspect_config=str(path), log_dir=str(tmp_path / "logs"))
    return install_tensor_inspection(config, trainer.chunks)


def _logged(log_dir: Path, rank: int = 0) -> dict[tuple[str, str, str, int], list[float]]:
    """(layer, tensor, stat, iteration) -> values, in log order, from a rank's statistics log."""
    logged = defaultdict(list)
    log = log_dir / f"nvdlfw_inspect_statistics_logs/nvdlfw_inspect_globalrank-{rank}.log"
    text = log.read_text()
    for match in map(LINE.search, text.splitlines()):
        assert match, "unexpected statistics line"
        key = (match["layer"], match["tensor"], match["stat"], int(match["iteration"]))
        logged[key].append(float(match["value"]))
    return logged


def _expected(tensor: torch.Tensor) -> dict[str, float]:
    x = tensor.double().flatten()
    mean = x.sum() / x.numel()
    return {
        "min": x.min().item(),
        "max": x.max().item(),
        "mean": mean.item(),
        "std": ((x - mean).square().sum() / (x.numel() - 1)).sqrt().item(),
        "l1_norm": x.abs().sum().item(),
        "l2_norm": x.square().sum().sqrt().item(),
    }


class _Capture:
    """Copies of each hooked module's input, output, weight and output gradient per call."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.iteration = 0
        self.tensors: dict[tuple[str, str, int], list[torch.Tensor]] = defaultdict(list)
        self.handles = [
            module.register_forward_hook(self._hook(name)) for name, module in modules.items()
        ]

    def _hook(self, name: str):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return  # the forward-only pass that recomputes pi_old is not inspected
            out = output[0] if isinstance(output, tuple) else output
            iteration = self.iteration
            for tensor_name, tensor in (("activation", args[0]), ("output", out)):
                self.tensors[name, tensor_name, iteration].append(tensor.detach().clone())
            self.tensors[name, "weight", iteration].append(module.weight.detach().clone())
            out.register_hook(
                lambda grad: self.tensors[name, "gradient", iteration].append(grad.clone())
            )

        return hook


@pytest.mark.slow
def test_logged_statistics_equal_independent_ones_per_call_and_iteration(tmp_path, trainer):
    inspector = _inspect(tmp_path, CONFIG, trainer)
    (model,) = [chunk.module for chunk in trainer.chunks]
    modules = dict(model.named_modules())
    linears = {name for name in modules if re.search(r"(linear_qkv|linear_fc2)$", name)}
    projection = "decoder.layers.2.self_attention.linear_proj"
    embedding = "embedding.word_embeddings"
    assert len(linears) == 4 + 4 * 5  # per layer: qkv; fc2 of 4 routed experts + shared expert
    assert inspector.layers == {
        **dict.fromkeys(linears, ("activation", "output", "weight", "gradient")),
        projection: ("output",),
        embedding: ("activation",),
    }
    capture = _Capture({name: modules[name] for name in inspector.layers})
    try:
        for iteration in range(2):
            capture.iteration = iteration
            metrics = trainer.step(random_train_batch(seed=iteration))
            assert metrics.num_microbatches > 1 and metrics.update_successful
            inspector.step()
    finally:
        inspector.close()
        for handle in capture.handles:
            handle.remove()

    logged = _logged(tmp_path / "logs")
    expected: dict[tuple[str, str, str, int], list[float]] = defaultdict(list)
    for (layer, tensor_name, iteration), tensors in capture.tensors.items():
        if layer == projection:  # output max, every second iteration from 0
            if tensor_name == "output" and iteration % 2 == 0:
                expected[layer, "output", "max", iteration] = [t.max().item() for t in tensors]
            continue
        if layer == embedding:  # integer token ids, logged as float32
            if tensor_name == "activation":
                expected[layer, tensor_name, "max", iteration] = [t.max().item() for t in tensors]
            continue
        for tensor in tensors:
            if tensor.numel():  # an expert that received no tokens logs nothing
                for stat, value in _expected(tensor).items():
                    expected[layer, tensor_name, stat, iteration].append(value)
    assert logged.keys() == expected.keys()
    assert {key[3] for key in logged} == {0, 1}
    assert {key[0] for key in logged} == set(inspector.layers)
    for key, values in expected.items():
        # the log prints 4 decimals
        assert logged[key] == pytest.approx(values, rel=1e-5, abs=6e-5), key


@pytest.mark.slow
def test_hooks_only_read_and_close_removes_them(tmp_path, trainer):
    (model,) = [chunk.module for chunk in trainer.chunks]
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    causal = torch.ones(24, 24, dtype=torch.bool).triu(1).view(1, 1, 24, 24)

    def forward_backward():
        logits = model(tokens, torch.arange(24).unsqueeze(0), causal)
        loss = logits.float().logsumexp(-1).mean()
        return logits.detach(), torch.autograd.grad(loss, params)

    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    inspector = _inspect(tmp_path, CONFIG, trainer)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before + 26
    inspected = forward_backward()
    inspector.close()
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    log = tmp_path / "logs/nvdlfw_inspect_statistics_logs/nvdlfw_inspect_globalrank-0.log"
    lines = log.read_text()
    plain = forward_backward()
    assert log.read_text() == lines  # nothing logged after close
    assert len(lines.splitlines()) > 26
    assert torch.equal(inspected[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(inspected[1], plain[1], strict=True))


@pytest.mark.slow
def test_example_config_selects_every_linear_layer(trainer, tmp_path):
    config = TensorInspectConfig(
        tensor_inspect_config=str(REPO / "configs/debug/tensor-inspect.yaml"), log_dir=str(tmp_path)
    )
    inspector = install_tensor_inspection(config, trainer.chunks)
    inspector.close()
    (model,) = [chunk.module for chunk in trainer.chunks]
    linear = [n for n, m in model.named_modules() if type(m).__name__.endswith("ParallelLinear")]
    assert set(inspector.layers) == set(linear)
    assert inspector.layers["output_layer"] == ("output", "gradient")


def _section(layers: dict, **features: object) -> dict:
    stats = {"enabled": True, "tensors": ["output"], "stats": ["max"], **features}
    return {"section": {"enabled": True, "layers": layers, "LogTensorStats": stats}}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sections", "error", "match"),
    [
        (None, FileNotFoundError, "does not exist"),
        ("just text", ValueError, "expected nvdlfw-inspect sections"),
        (
            _section({"layer_name_regex_pattern": "no_such_layer"}),
            ValueError,
            r"\['section'\] select no layer.*decoder\.layers\.0",
        ),
        (
            {
                "fp8": {
                    "enabled": True,
                    "layers": {"layer_name_regex_pattern": "linear_qkv"},
                    "transformer_engine": {"LogFp8TensorStats": {"enabled": True}},
                }
            },
            ValueError,
            "Transformer Engine feature.*LogFp8TensorStats",
        ),
        (
            _section({"layer_name_regex_pattern": "linear_qkv"}, tensors=["wgrad"]),
            ValueError,
            "no tensor.*wgrad",
        ),
        (
            _section({"layer_name_regex_pattern": "core_attention$"}, tensors=["weight"]),
            ValueError,
            "DotProductAttention.*weight",
        ),
        (
            {
                "a": _section({"layer_name_regex_pattern": "linear_qkv"})["section"],
                **_section({"layer_numbers": [1]}),
            },
            ValueError,
            r"selected by sections \['a', 'section'\]",
        ),
        (
            _section({"layer_name_regex_pattern": "linear_qkv"}, stats=["max", "cur_amax"]),
            ValueError,
            r"LogTensorStats does not compute \['cur_amax'\]",
        ),
        (
            {"s": {"enabled": True, "layers": {"layer_numbers": [1]}, "NoSuchFeature": {}}},
            ValueError,
            "Could not find feature 'NoSuchFeature'",
        ),
    ],
    ids=[
        "missing",
        "not-sections",
        "no-layer",
        "te-feature",
        "tensor",
        "weight",
        "two",
        "te-stat",
        "feature",
    ],
)
def test_bad_config_is_a_clear_error_and_leaves_no_session(
    tmp_path, trainer, sections, error, match
):
    import nvdlfw_inspect.api as debug_api

    path = tmp_path / "inspect.yaml"
    if sections is not None:
        path.write_text(yaml.safe_dump(sections))
    config = TensorInspectConfig(tensor_inspect_config=str(path), log_dir=str(tmp_path / "logs"))
    with pytest.raises(error, match=match):
        install_tensor_inspection(config, trainer.chunks)
    assert debug_api.DEBUG_MANAGER is None


@pytest.mark.slow
def test_off_by_default_imports_nothing():
    code = (
        "import sys\n"
        "from megatron_dapo.mcore.tensor_inspect import install_tensor_inspection\n"
        "from megatron_dapo.config.loading import load_config\n"
        "config = load_config('configs/demo-cpu.yaml', ['debug.log_dir=elsewhere'])\n"
        "assert config.debug.tensor_inspect_config is None\n"
        "assert install_tensor_inspection(config.debug, []) is None\n"
        "assert 'nvdlfw_inspect' not in sys.modules, 'nvdlfw_inspect was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def _max_of(*patterns: str) -> dict:
    """One section per regex pattern, logging the max of the selected modules' outputs."""
    stats = {"enabled": True, "tensors": ["output"], "stats": ["max"]}
    return {
        f"s{index}": {
            "enabled": True,
            "layers": {"layer_name_regex_pattern": pattern},
            "LogTensorStats": stats,
        }
        for index, pattern in enumerate(patterns)
    }


def _pipeline_worker(out_dir: Path) -> None:
    """Rank of a 2-stage pipeline: sections are matched over all stages, errors raised on all."""
    import torch.distributed as dist

    from megatron_dapo.mcore.policy_step import PolicyTrainer

    config = tiny_run_config(moe=True, world_size=2, max_tokens=40, pipeline=2)
    initialize_parallel(config.parallelism, DistributedEnv.from_environ(), seed=3)
    trainer = PolicyTrainer(config)
    rank_dir = out_dir / f"rank{dist.get_rank()}"
    # `embedding` (stage 0 only) has no weight of its own: stage 1 must fail too, not wait.
    no_weight = _max_of("^(embedding|output_layer)$")
    no_weight["s0"]["LogTensorStats"]["tensors"] = ["weight"]
    with pytest.raises(ValueError, match=r"layer embedding \(LanguageModelEmbedding\) has no"):
        _inspect(rank_dir / "bad", no_weight, trainer)
    inspector = _inspect(rank_dir, _max_of("^output_layer$", "linear_qkv$"), trainer)
    trainer.step(random_train_batch(seed=0))
    inspector.step()
    inspector.close()
    destroy_parallel()


@pytest.mark.slow
@pytest.mark.multirank
def test_sections_are_matched_over_pipeline_stages(tmp_path):
    run_torchrun(Path(__file__), str(tmp_path), nproc=2, timeout=300)
    qkv = {f"decoder.layers.{i}.self_attention.linear_qkv" for i in range(2)}  # stage-local
    for rank, layers in enumerate([qkv, {*qkv, "output_layer"}]):
        logged = _logged(tmp_path / f"rank{rank}/logs", rank)
        assert {layer for layer, *_ in logged} == layers
        assert {(tensor, stat, iteration) for _, tensor, stat, iteration in logged} == {
            ("output", "max", 0)
        }


if __name__ == "__main__":
    _pipeline_worker(Path(sys.argv[1]))
