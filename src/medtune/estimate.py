"""`medtune estimate-memory`: per-GPU training memory from a model's config.json alone (no weights are loaded).

Parameters are counted from the decoder layout (llama, mistral, qwen2, glm = GLM-4-9B/-Chat-hf, glm4 = GLM-4-0414):
with hidden size h, intermediate size I, L layers, nq query and nkv key/value heads of size d, vocabulary V,

    per layer  P_layer = h·nq·d + 2·h·nkv·d + nq·d·h            (q, k, v, o projections)
                       + 3·h·I                                   (gate, up, down; GLM fuses gate+up, same count)
                       + biases (qwen2 and glm: q, k, v; llama: all four when attention_bias)
                       + norms·h                                 (2 RMSNorms; glm4: 4)
    P = L·P_layer + V·h (embeddings) + h (final norm) + V·h (output head, unless tied)

LoRA of rank r on every linear layer of the decoder (medtune's default targets) adds r·(in + out) per linear layer,
as peft builds it (GLM's fused gate_up_proj is one layer, h → 2I).

Per GPU, with T trainable parameters, N GPUs and ZeRO stage z (bytes):

    weights     frozen + T·w        frozen: full 0; lora 2·(P) (bf16); qlora: the decoder's linear weights in
                                    4 bits (0.5 B + one 8-bit absmax per 64 weights + one fp32 scale per 256 blocks
                                    with double quantisation = 0.5159 B; 0.5625 B without), everything else in
                                    float32 (peft's prepare_model_for_kbit_training upcasts it; bf16 under DeepSpeed)
    gradients   T·g
    optimizer   T·o                 AdamW: two moments (+ a float32 master copy under DeepSpeed)

    (w, g, o) per trainable parameter:
      z = 0, medtune's Trainer    full: (2, 2, 4)   bf16 weights, bf16 grads, bf16 moments
                                  lora/qlora: (4, 4, 8)   peft keeps the adapter in float32
      z ≥ 1, DeepSpeed bf16       (2, 2, 12)   the ZeRO paper's K = 12: fp32 master + two fp32 moments
    ZeRO shards the optimizer over N GPUs from stage 1, the gradients from stage 2, the weights at stage 3.

Activations (not sharded: each GPU holds its own micro-batch b of sequence length s), in bf16 with flash/sdpa
attention (no s×s score matrix is kept):

    per token and layer  A_layer = 2·(6h + 2·(nq + nkv)·d + 4I) bytes
        6h: each of the 2 RMSNorms keeps its input in float32 (2h) and its output (h); 2(nq+nkv)d: q, k, v and the
        attention output; 4I: gate, up, silu(gate) and their product (the down projection's input)
      + LoRA with dropout > 0: each adapted layer keeps its dropped-out input and a one-byte mask: 3·Σ in bytes
    per token, the loss   10·V bytes: bf16 logits (2), their float32 copy (4) and the log-softmax kept for
                          the backward pass (4)
    total  b·s·(L·A_layer + 10V);  with gradient checkpointing b·s·(L·2h + A_layer + 10V) (each layer's input
           is kept and one layer is recomputed at a time)

The CUDA context and allocator fragmentation (typically 0.5–2 GiB) are not included.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from medtune.errors import ConfigError

GIB = 2**30
METHODS = ("lora", "qlora", "full")
# bytes per 4-bit weight: the packed nibble, an absmax per block of 64 (8-bit with double quantisation, else
# float32), and with double quantisation one float32 scale per 256 absmax values
NF4_BYTES = {True: 0.5 + (1 + 4 / 256) / 64, False: 0.5 + 4 / 64}
# model_type -> (q/k/v bias rule, fused gate+up, RMSNorms per layer)
FAMILIES = {
    "llama": ("attention_bias", False, 2),
    "mistral": ("attention_bias", False, 2),
    "qwen2": ("always", False, 2),
    "glm": ("attention_bias", True, 2),
    "glm4": ("attention_bias", True, 4),
}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    fused_gate_up: bool
    norms_per_layer: int

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> Architecture:
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not one estimate-memory knows (one of "
                              f"{', '.join(FAMILIES)})")
        bias_rule, fused, norms = FAMILIES[model_type]
        try:
            hidden, heads = config["hidden_size"], config["num_attention_heads"]
            biased = bias_rule == "always" or bool(config.get("attention_bias", False))
            return cls(model_type=model_type, hidden=hidden, intermediate=config["intermediate_size"],
                       layers=config["num_hidden_layers"], heads=heads,
                       kv_heads=config.get("num_key_value_heads") or heads,
                       head_dim=config.get("head_dim") or hidden // heads, vocab=config["vocab_size"],
                       tied=bool(config.get("tie_word_embeddings", False)), qkv_bias=biased,
                       o_bias=biased and bias_rule == "attention_bias" and model_type in ("llama", "mistral"),
                       fused_gate_up=fused, norms_per_layer=norms)
        except KeyError as exc:
            raise ConfigError(f"{source}: {exc.args[0]}: missing (needed to count the parameters)") from None

    def layer_linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer, as the model (and peft) builds them."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        mlp = [(h, 2 * i), (i, h)] if self.fused_gate_up else [(h, i), (h, i), (i, h)]
        return [(h, q), (h, kv), (h, kv), (q, h), *mlp]

    def layer_biases(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (q + 2 * kv if self.qkv_bias else 0) + (self.hidden if self.o_bias else 0)

    def linear_weights(self) -> int:
        """The decoder's linear weights: what bitsandbytes quantises (it keeps the output head unquantised)."""
        return self.layers * sum(i * o for i, o in self.layer_linears())

    def parameters(self) -> int:
        per_layer = sum(i * o for i, o in self.layer_linears()) + self.layer_biases()
        per_layer += self.norms_per_layer * self.hidden
        heads = 1 if self.tied else 2
        return self.layers * per_layer + heads * self.vocab * self.hidden + self.hidden

    def lora_parameters(self, rank: int) -> int:
        return self.layers * sum(rank * (i + o) for i, o in self.layer_linears())

    def activation_bytes_per_token_and_layer(self, lora_dropout: bool) -> int:
        h, i = self.hidden, self.intermediate
        elements = 6 * h + 2 * (self.heads + self.kv_heads) * self.head_dim + 4 * i
        dropout = 3 * sum(inp for inp, _ in self.layer_linears()) if lora_dropout else 0
        return 2 * elements + dropout


@dataclass(frozen=True)
class Setup:
    method: str = "lora"
    zero: int = 0
    gpus: int = 1
    seq: int = 2048
    batch: int = 1
    lora_rank: int = 8
    lora_dropout: bool = True
    gradient_checkpointing: bool = False
    double_quant: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"zero={self.zero} is not one of 0, 1, 2, 3")
        for name in ("gpus", "seq", "batch", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


def trainable_bytes(setup: Setup) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes per trainable parameter."""
    if setup.zero >= 1:
        return 2, 2, 12
    return (2, 2, 4) if setup.method == "full" else (4, 4, 8)


def estimate(arch: Architecture, setup: Setup) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients, optimizer states and activations, and their total."""
    params = arch.parameters()
    trainable = params if setup.method == "full" else arch.lora_parameters(setup.lora_rank)
    w, g, o = trainable_bytes(setup)
    if setup.method == "full":
        frozen = 0.0
    elif setup.method == "lora":
        frozen = 2.0 * params
    else:
        rest_bytes = 2 if setup.zero >= 1 else 4
        frozen = arch.linear_weights() * NF4_BYTES[setup.double_quant] + (params - arch.linear_weights()) * rest_bytes
    n = setup.gpus
    weights = (frozen + trainable * w) / (n if setup.zero == 3 else 1)
    gradients = trainable * g / (n if setup.zero >= 2 else 1)
    optimizer = trainable * o / (n if setup.zero >= 1 else 1)
    layer = arch.activation_bytes_per_token_and_layer(setup.lora_dropout and setup.method != "full")
    per_token = arch.layers * 2 * arch.hidden + layer if setup.gradient_checkpointing else arch.layers * layer
    activations = setup.batch * setup.seq * (per_token + 10 * arch.vocab)
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations}
    return {**parts, "total": sum(parts.values()), "parameters": params, "trainable_parameters": trainable}


def read_config(model: str) -> tuple[dict, str]:
    path = Path(model).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"{model}: no config.json there (give a model folder or its config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def report(arch: Architecture, setup: Setup, result: dict) -> str:
    zero = f"ZeRO-{setup.zero}" if setup.zero else "no ZeRO"
    lines = [f"{arch.model_type}: {result['parameters'] / 1e9:.2f} B parameters, {result['trainable_parameters']:,} "
             f"trainable; {setup.method}, {zero}, {setup.gpus} GPU(s), seq {setup.seq}, batch {setup.batch}"
             f"{', gradient checkpointing' if setup.gradient_checkpointing else ''}",
             "per GPU:"]
    lines += [f"  {name:<12}{result[name] / GIB:8.2f} GiB"
              for name in ("weights", "gradients", "optimizer", "activations", "total")]
    lines.append("(CUDA context and allocator overhead not included; formulas: medtune/estimate.py)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="medtune estimate-memory",
        description="Per-GPU training memory (weights, gradients, optimizer states, activations) from a model's "
                    "config.json alone; the formulas are in the docs (docs/scale.md).")
    parser.add_argument("--model", required=True, help="Model folder (or its config.json); no weights are read.")
    parser.add_argument("--method", choices=METHODS, default="lora", help="lora (bf16 base), qlora (4-bit base) "
                        "or full fine-tuning (default lora).")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0,
                        help="DeepSpeed ZeRO stage; 0: medtune's Trainer without DeepSpeed (default).")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs sharing the ZeRO shards (default 1).")
    parser.add_argument("--seq", type=int, default=2048, help="Tokens per sequence (default 2048).")
    parser.add_argument("--batch", type=int, default=1, help="Sequences per GPU per step (default 1).")
    parser.add_argument("--lora_rank", type=int, default=8, help="LoRA rank (default 8, medtune's).")
    parser.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout (>0 keeps extra inputs).")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations per layer.")
    parser.add_argument("--json", action="store_true", help="Print JSON (bytes) instead of the table.")
    args = parser.parse_args(argv)
    config, source = read_config(args.model)
    arch = Architecture.from_config(config, source)
    setup = Setup(method=args.method, zero=args.zero, gpus=args.gpus, seq=args.seq, batch=args.batch,
                  lora_rank=args.lora_rank, lora_dropout=args.lora_dropout > 0,
                  gradient_checkpointing=args.gradient_checkpointing)
    result = estimate(arch, setup)
    print(json.dumps(result) if args.json else report(arch, setup, result))
    return 0
