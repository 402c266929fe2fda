"""Embedded tiny models: a randomly initialised GLM-4 / Qwen2 / Llama model of a few million parameters with a
byte-level BPE tokenizer trained on medtune's bundled medical corpus, built offline and deterministically.

They carry the real family's special tokens and chat format, so every code path (templates, masks, merge,
generation stops) is exercised exactly as with the full-size model; only the weights are random.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.paths import bundled_data_dir, cache_dir
from medtune.templates.registry import GLM4, LLAMA3, QWEN, ChatFormat

logger = logging.getLogger(__name__)

TINY_VERSION = 1  # bump when the recipe below changes, so cached default models are rebuilt
MARKER = "medtune_tiny.json"
VOCAB_SIZE = 6000
# Qwen2's pre-tokenizer split. transformers rebuilds a Qwen2Tokenizer with this exact regex (and NFC) whatever
# tokenizer.json says, so every tiny tokenizer is trained with it: all loading paths then give identical ids.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ARCHS: dict[str, dict] = {
    # GlmForCausalLM (model_type "glm") is the GLM-4-9B / GLM-4-9B-Chat layout.
    "glm4": {"model_type": "glm", "format": GLM4, "tokenizer_class": "PreTrainedTokenizerFast",
             "config": {"head_dim": 64, "partial_rotary_factor": 0.5, "attention_bias": True,
                        "tie_word_embeddings": False}},
    "qwen2": {"model_type": "qwen2", "format": QWEN, "tokenizer_class": "Qwen2Tokenizer",
              "config": {"tie_word_embeddings": True}},
    "llama": {"model_type": "llama", "format": LLAMA3, "tokenizer_class": "PreTrainedTokenizerFast",
              "config": {"head_dim": 64, "tie_word_embeddings": False}},
}
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 4096}


def corpus_texts() -> list[str]:
    """Every text of the bundled data, in a fixed order (the tokenizer's training corpus)."""
    from medtune.data.loading import load_records

    texts: list[str] = []
    for kind, folder in (("text", "pretrain"), ("sft", "finetune"), ("preference", "reward")):
        location = bundled_data_dir(folder)
        if not location.is_dir() or not any(location.iterdir()):
            continue
        records, _ = load_records(location, kind)
        for record in records:
            if kind == "text":
                texts.append(record.text)
            elif kind == "sft":
                texts.extend(m["content"] for m in record.messages)
            else:
                texts.extend([*(m["content"] for m in record.prompt), record.chosen, record.rejected])
    if not texts:
        raise MedtuneError(f"no bundled corpus under {bundled_data_dir()}; set MEDTUNE_HOME to the medtune checkout")
    return texts


def corpus_fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def train_tokenizer(texts: list[str], chat: ChatFormat, vocab_size: int = VOCAB_SIZE):
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(chat.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if chat.prefix_tokens:
        prefix = " ".join(chat.prefix_tokens)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{prefix} $A", pair=f"{prefix} $A $B",
            special_tokens=[(t, tokenizer.token_to_id(t)) for t in chat.prefix_tokens],
        )
    return tokenizer


def _model_config(arch: str, tokenizer, chat: ChatFormat):
    from transformers import AutoConfig

    spec = ARCHS[arch]
    vocab = -(-len(tokenizer) // 64) * 64  # real checkpoints pad the embedding to a multiple of 64
    ids = tokenizer.convert_tokens_to_ids
    return AutoConfig.for_model(
        spec["model_type"],
        vocab_size=vocab,
        pad_token_id=ids(chat.pad_token),
        bos_token_id=ids(chat.bos_token) if chat.bos_token else None,
        eos_token_id=[ids(t) for t in chat.stop_tokens],
        **SHAPE,
        **spec["config"],
    )


def build_tiny_model(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build tokenizer + random model of `arch` into `out_dir` (deterministic for a given seed and corpus)."""
    if arch not in ARCHS:
        raise MedtuneError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    started = time.perf_counter()
    spec, chat = ARCHS[arch], ARCHS[arch]["format"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = corpus_texts()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(texts, chat),
        bos_token=chat.bos_token,
        eos_token=chat.eos_token,
        pad_token=chat.pad_token,
        additional_special_tokens=[t for t in chat.special_tokens if t not in (chat.bos_token, chat.eos_token)],
        model_max_length=SHAPE["max_position_embeddings"],
        padding_side="left",  # generation pads on the left; trainers set their own side
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat.jinja
    fast.save_pretrained(out)
    _set_tokenizer_class(out, spec["tokenizer_class"])

    config = _model_config(arch, fast, chat)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
    )
    model.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({
        "arch": arch, "seed": seed, "version": TINY_VERSION, "corpus": corpus_fingerprint(texts),
        "parameters": sum(p.numel() for p in model.parameters()), "vocab": len(fast),
    }, indent=2))
    logger.info("built tiny %s model (%d parameters, vocab %d) in %s in %.1fs", arch,
                sum(p.numel() for p in model.parameters()), len(fast), out, time.perf_counter() - started)
    return out


def _set_tokenizer_class(out: Path, tokenizer_class: str) -> None:
    """Record the class the real family's checkpoints name, so AutoTokenizer takes the same path as for them."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = tokenizer_class
    path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def default_model_dir(arch: str = "glm4") -> Path:
    """The embedded default model, built on first use and reused after (rebuilt when the corpus changes)."""
    from filelock import FileLock

    fingerprint = corpus_fingerprint(corpus_texts())
    target = cache_dir("models") / f"tiny-{arch}-v{TINY_VERSION}-{fingerprint}"
    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (torchrun ranks, parallel runs); a reader never sees a half-written folder.
    with FileLock(str(target) + ".lock"):
        if (target / MARKER).is_file():
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            # A separate process: once torch.distributed is up (under torchrun), save_pretrained writes
            # nothing on ranks other than 0, and this may be any rank.
            subprocess.run([sys.executable, "-m", "medtune", "init-model", "--arch", arch, "--out", str(scratch)],
                           check=True, stdout=subprocess.DEVNULL)
            os.rename(scratch, target)
        except subprocess.CalledProcessError as exc:
            raise MedtuneError(f"building the default tiny {arch} model failed (exit code {exc.returncode})") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target
