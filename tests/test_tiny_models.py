"""The embedded tiny models: every family builds offline, deterministically, with its real chat layout, and every
way of loading the tokenizer gives the same ids."""

import hashlib

import pytest
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from medtune.models.tiny import build_tiny_model

TEXT = "孕妇禁用四环素类药物；eGFR<30 mL/min 时禁用二甲双胍。 Fever  38.5℃\n\n  end"
MESSAGES = [
    {"role": "system", "content": "你是医生助手。"},
    {"role": "user", "content": "头痛怎么办？"},
    {"role": "assistant", "content": "先休息，持续不缓解请就医。"},
]
EXPECTED_RENDERING = {
    "glm4": "[gMASK]<sop><|system|>\n你是医生助手。<|user|>\n头痛怎么办？<|assistant|>\n先休息，持续不缓解请就医。",
    "qwen2": "<|im_start|>system\n你是医生助手。<|im_end|>\n<|im_start|>user\n头痛怎么办？<|im_end|>\n"
             "<|im_start|>assistant\n先休息，持续不缓解请就医。<|im_end|>\n",
    "llama": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n你是医生助手。<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\n头痛怎么办？<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n先休息，持续不缓解请就医。<|eot_id|>",
}
MODEL_CLASS = {"glm4": "GlmForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@pytest.mark.parametrize("arch", ["glm4", "qwen2", "llama"])
def test_family_layout_and_identical_ids_on_every_loading_path(tiny_model, arch):
    folder = tiny_model(arch)
    auto = AutoTokenizer.from_pretrained(folder)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    plain = auto(TEXT, add_special_tokens=False)["input_ids"]
    assert plain == fast(TEXT, add_special_tokens=False)["input_ids"]
    assert plain == raw.encode(TEXT, add_special_tokens=False).ids
    assert auto.decode(plain) == TEXT
    assert auto.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED_RENDERING[arch]
    # the prompt rendered for generation is an exact prefix of the training rendering
    prompt = auto.apply_chat_template(MESSAGES[:-1], tokenize=False, add_generation_prompt=True)
    assert EXPECTED_RENDERING[arch].startswith(prompt)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == MODEL_CLASS[arch]
    assert 1_000_000 < model.num_parameters() < 10_000_000
    stops = model.generation_config.eos_token_id
    if arch == "glm4":  # GLM-4 replies end when the model starts the next role tag
        assert set(auto.convert_ids_to_tokens(stops)) == {"<|endoftext|>", "<|user|>", "<|observation|>"}


def test_build_is_deterministic(tmp_path):
    digests = []
    for name in ("a", "b"):
        folder = build_tiny_model("qwen2", tmp_path / name, seed=3)
        digests.append([hashlib.sha256((folder / f).read_bytes()).hexdigest()
                        for f in ("tokenizer.json", "model.safetensors")])
    assert digests[0] == digests[1]
