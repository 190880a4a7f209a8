"""Write the demo model (SmolLM2-135M-Instruct, a Q4_1 GGUF file) out as a plain Hugging Face directory.

Peers that cannot read that GGUF file (`transformers serve` in transformers 5.24 refuses to load GGUF weights
into its serving path) can then serve the very same weights, de-quantised to fp32, in the serving benchmark:

    .venv/bin/python bench/export_demo.py bench-results/smollm2-fp32
    .venv/bin/python bench/serve_bench.py --launch transformers-serve   # does this itself when not given a model
"""

from __future__ import annotations

import argparse
from pathlib import Path


def export(out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_api.engine.loading import load_model, resolve_model

    model, tokenizer = load_model(resolve_model("demo"), "cpu", torch.float32)
    # The GGUF loader leaves quantisation bookkeeping on the model that save_pretrained refuses to write;
    # a fresh model from the same config, given the de-quantised tensors, is an ordinary checkpoint.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise SystemExit(f"weights do not match: missing {missing}, unexpected {unexpected}")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to write")
    print(export(parser.parse_args().out))


if __name__ == "__main__":
    main()
