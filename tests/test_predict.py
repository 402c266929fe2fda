"""`medtune predict`: every prompt format read, greedy replies equal to unbatched generation, exact resume, n
replies, seeded sampling, one-line errors for bad input and for --backend vllm without vLLM or a GPU."""

from __future__ import annotations

import json
import sys
import types

import pytest

from medtune.cli import main
from medtune.config import AdapterArguments, GenerationArguments, ModelArguments, PredictArguments
from medtune.serve.predict import read_prompts, run_predict

RECORDS = [
    {"id": "plain", "prompt": "头痛怎么办？"},
    {"id": "with-system", "prompt": "发烧了", "system": "你是医生助手"},
    {"conversations": [{"from": "human", "value": "感冒吃什么药"}, {"from": "gpt", "value": "多喝水"}]},
    {"messages": [{"role": "user", "content": "高血压"}, {"role": "assistant", "content": "注意饮食"},
                  {"role": "user", "content": "还有呢？"}]},
    {"id": 7, "instruction": "解释糖尿病", "input": "简短", "output": "参考答案", "history": [["你好", "您好"]]},
]
EXPECTED_MESSAGES = {
    "plain": [{"role": "user", "content": "头痛怎么办？"}],
    "with-system": [{"role": "system", "content": "你是医生助手"}, {"role": "user", "content": "发烧了"}],
    3: [{"role": "user", "content": "感冒吃什么药"}],  # a training record: its last reply is asked again
    4: [{"role": "user", "content": "高血压"}, {"role": "assistant", "content": "注意饮食"},
        {"role": "user", "content": "还有呢？"}],
    7: [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好"},
        {"role": "user", "content": "解释糖尿病\n简短"}],
}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def predict(model, input_file, output_file, batch_size=2, **generation) -> int:
    generation = {"max_new_tokens": 10, **generation}
    return run_predict(ModelArguments(model_name_or_path=str(model)), AdapterArguments(),
                       GenerationArguments(**generation),
                       PredictArguments(input=str(input_file), output=str(output_file), batch_size=batch_size))


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_prompt_format_is_read_into_the_messages_it_asks(tmp_path):
    prompts = read_prompts(write_jsonl(tmp_path / "in.jsonl", RECORDS))
    assert {p.id: p.messages for p in prompts} == EXPECTED_MESSAGES
    as_array = tmp_path / "in.json"  # a .json array works too, ids defaulting to the line each record starts on
    as_array.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n]\n",
                        encoding="utf-8")
    assert [p.id for p in read_prompts(str(as_array))] == ["plain", "with-system", 4, 5, 7]


def test_greedy_replies_equal_unbatched_generation_of_the_same_rendered_prompt(glm4_dir, tmp_path):
    import torch

    from medtune.eval.backends import LocalBackend

    output = tmp_path / "out.jsonl"
    assert predict(glm4_dir, write_jsonl(tmp_path / "in.jsonl", RECORDS), output, batch_size=3) == len(RECORDS)
    written = lines(output)
    assert [r["id"] for r in written] == list(EXPECTED_MESSAGES)
    reference = LocalBackend(str(glm4_dir), batch_size=1)
    for record in written:  # one prompt at a time, no padding: what the batched, left-padded run must reproduce
        prompt = reference.template.prompt_ids(EXPECTED_MESSAGES[record["id"]])
        with torch.no_grad():
            out = reference.model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=10,
                                           eos_token_id=reference.template.stop_token_ids,
                                           pad_token_id=reference.tokenizer.pad_token_id)
        ids = reference.reply_ids(out[0][len(prompt):])
        assert ids and record["replies"] == [reference.tokenizer.decode(ids, skip_special_tokens=True).strip()]


@pytest.mark.parametrize("generation", [{}, {"temperature": 0.9, "num_return_sequences": 2}],
                         ids=["greedy", "sampled"])
def test_a_run_cut_by_a_kill_resumes_to_the_same_file_as_an_uninterrupted_run(glm4_dir, tmp_path, generation):
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    straight, resumed = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    predict(glm4_dir, source, straight, **generation)
    complete = straight.read_bytes()
    kept = b"".join(complete.splitlines(keepends=True)[:2])
    third = complete.splitlines(keepends=True)[2]
    resumed.write_bytes(kept + third[: len(third) // 2])  # killed while writing the third line (second batch)
    assert predict(glm4_dir, source, resumed, **generation) == len(RECORDS) - 2
    assert resumed.read_bytes() == complete
    assert predict(glm4_dir, source, resumed, **generation) == 0  # nothing left: nothing appended
    assert resumed.read_bytes() == complete


def test_resuming_with_other_decoding_options_is_refused_and_the_file_kept(glm4_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS[:3])
    output = tmp_path / "out.jsonl"
    predict(glm4_dir, source, output, batch_size=3)
    kept = b"".join(output.read_bytes().splitlines(keepends=True)[:1])
    output.write_bytes(kept)
    capsys.readouterr()
    code = main(["predict", "--model", str(glm4_dir), "--input", source, "--output", str(output),
                 "--max_new_tokens", "10", "--temperature", "0.5"])
    assert code == 2 and output.read_bytes() == kept
    assert capsys.readouterr().err.strip() == (
        f"medtune: error: {output}: its 1 replies were made with other settings (changed: temperature; see "
        "out.jsonl.settings.json); resume with the same options or choose another --output")
    assert predict(glm4_dir, source, output, batch_size=3) == 2  # the same options carry on


def test_n_sampled_replies_per_prompt_reproducible_by_seed(glm4_dir, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS[:2])
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        predict(glm4_dir, source, tmp_path / f"{name}.jsonl", temperature=1.0, num_return_sequences=3, seed=seed)
        runs[name] = lines(tmp_path / f"{name}.jsonl")
    assert all(len(r["replies"]) == 3 for r in runs["a"])
    assert any(len(set(r["replies"])) > 1 for r in runs["a"])  # samples, not one reply three times
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_bad_input_is_one_line_naming_file_line_and_field_and_nothing_is_written(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [RECORDS[0], {"messages": [{"role": "user", "content": " "}]}])
    output = tmp_path / "out.jsonl"
    assert main(["predict", "--input", source, "--output", str(output)]) == 2
    assert capsys.readouterr().err.strip() == f"medtune: error: {source}:2: messages[0].content: empty"
    assert [path.name for path in tmp_path.iterdir()] == ["in.jsonl"]  # nothing written
    repeated = write_jsonl(tmp_path / "twice.jsonl", [RECORDS[0], RECORDS[0]])
    assert main(["predict", "--input", repeated, "--output", str(output)]) == 2
    assert capsys.readouterr().err.strip() == (f"medtune: error: {repeated}:2: id: 'plain' repeats the id of "
                                               "line 1")
    assert not output.exists()


def test_backend_vllm_without_vllm_or_a_gpu_is_one_line_and_exit_2(glm4_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS[:1])
    output = tmp_path / "out.jsonl"
    code = main(["predict", "--model", str(glm4_dir), "--input", source, "--output", str(output),
                 "--backend", "vllm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("medtune: error: --backend vllm needs ") and err[0].endswith("use --backend hf "
                                                                                      "(transformers) instead")
    assert [path.name for path in tmp_path.iterdir()] == ["in.jsonl"]  # nothing written


class FakeVLLM:
    """Stands in for the vllm package (not installable here): records what medtune passes to vLLM's documented
    offline API (LLM, SamplingParams, generate with token-id prompts, LoRARequest) and answers in prompt order."""

    def __init__(self):
        self.engine_options, self.calls = None, []
        fake = self

        class LLM:
            def __init__(self, **options):
                fake.engine_options = options

            def generate(self, prompts, params, lora_request=None, use_tqdm=True):
                fake.calls.append((prompts, params, lora_request))
                return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" reply {k}.{j}\n")
                                                       for j in range(params.n)]) for k in range(len(prompts))]

        self.module = types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw))
        self.lora = types.SimpleNamespace(LoRARequest=lambda *args: ("lora", *args))


def test_vllm_backend_is_given_the_rendered_token_ids_stop_ids_seed_and_adapter(glm4_dir, tmp_path, monkeypatch):
    from medtune.eval.backends import load_tokenizer_and_template
    from medtune.serve import predict as module

    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", fake.lora)
    monkeypatch.setattr(module, "require_vllm", lambda: None)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS[:3])
    output = tmp_path / "out.jsonl"
    run_predict(ModelArguments(model_name_or_path=str(glm4_dir)), AdapterArguments(str(adapter)),
                GenerationArguments(max_new_tokens=9, temperature=0.7, top_p=0.9, seed=3, num_return_sequences=2),
                PredictArguments(input=source, output=str(output), backend="vllm", tensor_parallel_size=2))
    assert fake.engine_options == {"model": str(glm4_dir), "tokenizer": str(glm4_dir), "dtype": "auto",
                                   "trust_remote_code": False, "tensor_parallel_size": 2, "seed": 3,
                                   "enable_lora": True, "max_lora_rank": 16}
    _, template = load_tokenizer_and_template(str(glm4_dir), None, None)
    (prompts, params, lora), = fake.calls
    assert prompts == [{"prompt_token_ids": template.prompt_ids(EXPECTED_MESSAGES[key])}
                       for key in ("plain", "with-system", 3)]
    assert vars(params) == {"n": 2, "temperature": 0.7, "top_p": 0.9, "max_tokens": 9, "seed": 3,
                            "stop_token_ids": template.stop_token_ids, "skip_special_tokens": True}
    assert lora == ("lora", "adapter", 1, str(adapter.resolve()))
    assert lines(output) == [{"id": key, "replies": [f"reply {k}.0", f"reply {k}.1"]}
                             for k, key in enumerate(("plain", "with-system", 3))]
