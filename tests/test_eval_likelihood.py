"""Likelihood mode: predictions and scores equal a slow reference that renders every prompt + reply through the
chat template (the tiny model's template and GLM-4-9B-Chat's own, whose generation prompt ends without a newline),
the multiple-choice rule, and batches of exactly --batch_size prompts through the runner."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medtune.config import EvalArguments
from medtune.data.loading import load_records
from medtune.eval import runner
from medtune.eval.backends import Choice, LocalBackend, answer_candidates, shared_start_length
from medtune.eval.cmb import item_messages
from medtune.models.loader import load_chat_template

from .conftest import REPO

CMB = REPO / "data" / "eval" / "cmb"

# THUDM/glm-4-9b-chat's chat_template without its tool-calling branch: the generation prompt is `<|assistant|>`
# with no newline, and a reply is rendered as `<|assistant|>` + metadata (empty here) + "\n" + content.
GLM4_9B_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}"
    "{% if item['role'] == 'system' %}<|system|>\n{{ item['content'] }}"
    "{% elif item['role'] == 'user' %}<|user|>\n{{ item['content'] }}"
    "{% elif item['role'] == 'assistant' %}<|assistant|>{{ item['metadata'] }}\n{{ item['content'] }}"
    "{% elif item['role'] == 'observation' %}<|observation|>\n{{ item['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def glm4_chat_dir(glm4_dir, tmp_path_factory):
    """The tiny GLM-4 model with GLM-4-9B-Chat's exact chat template."""
    folder = tmp_path_factory.mktemp("glm4-9b-chat-template") / "model"
    shutil.copytree(glm4_dir, folder)
    (folder / "chat_template.jinja").write_text(GLM4_9B_CHAT_TEMPLATE, encoding="utf-8")
    return folder


def reference_scores(model, template, messages, letters: str, multiple: bool) -> dict[str, float]:
    """Unbatched and uncached: the full prompt + reply of every candidate through the model. The answer starts at
    the reply's first token that is not whitespace; single choice scores that letter's log-probability,
    multiple choice the mean log-probability of the answer's tokens through the stop marker."""
    scores = {}
    for candidate in answer_candidates(letters, multiple):
        prompt, reply = template.encode_reply(messages, candidate)
        start = next(k for k in range(len(reply)) if template.tokenizer.decode(reply[:k + 1]).strip())
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        answer = [log_probs[len(prompt) - 1 + k, reply[k]].item() for k in range(start, len(reply))]
        scores[candidate] = answer[0] if not multiple else sum(answer) / len(answer)
    return scores


@pytest.mark.parametrize("model_folder", ["glm4_dir", "glm4_chat_dir"])
def test_likelihood_scores_equal_a_full_rendering_reference(model_folder, request):
    folder = request.getfixturevalue(model_folder)
    items, _ = load_records(CMB / "test.json", "exam")
    items = [i for i in items if not i.multiple][:24] + [i for i in items if i.multiple][:4]
    backend = LocalBackend(str(folder), batch_size=16)
    choices = [Choice(item_messages(i, []), "".join(i.options), i.multiple) for i in items]
    batched = backend.choose(choices)

    template = load_chat_template(str(folder), AutoTokenizer.from_pretrained(folder))
    if model_folder == "glm4_chat_dir":  # the template under test really ends its generation prompt without "\n"
        assert template.render(choices[0].messages, add_generation_prompt=True).endswith("<|assistant|>")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for item, choice, (prediction, scores) in zip(items, choices, batched):
        reference = reference_scores(model, template, choice.messages, choice.letters, item.multiple)
        assert scores.keys() == reference.keys(), item.id
        for candidate, value in reference.items():
            assert scores[candidate] == pytest.approx(value, abs=1e-4), (item.id, candidate)
        best = max(reference, key=reference.get)
        # identical, or a tie within float noise between batched and unbatched arithmetic
        assert prediction == best or reference[best] - reference[prediction] < 1e-4, item.id


def test_single_choice_is_decided_by_the_letter_after_glm4s_newline(glm4_chat_dir):
    backend = LocalBackend(str(glm4_chat_dir))
    messages = [{"role": "user", "content": "下列哪项正确？\nA. 甲\nB. 乙\nC. 丙"}]
    (plan,) = backend.scoring_plans([Choice(messages, "ABC", False)])
    newline = backend.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert plan.first_token_decides
    assert plan.context == backend.template.prompt_ids(messages) + newline
    letters = backend.tokenizer(["A", "B", "C"], add_special_tokens=False)["input_ids"]
    assert [ids[:1] for _, ids in plan.candidates] == letters


def test_multiple_choice_candidates_are_sets_of_two_or_more_letters():
    assert answer_candidates("ABCDE", True)[:3] == ["AB", "AC", "AD"]
    assert len(answer_candidates("ABCDE", True)) == 26 and len(answer_candidates("ABCDEFG", True)) == 120
    assert answer_candidates("ABCDE", True)[-1] == "ABCDE"
    assert answer_candidates("C", True) == ["C"]  # --official left one option: still answerable
    assert answer_candidates("ABC", False) == ["A", "B", "C"]


def test_distinct_prompt_starts_are_shared_where_that_saves_the_most_tokens():
    assert shared_start_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9, 9]]) == 2  # 2 tokens saved twice > 3 once
    assert shared_start_length([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [1, 2, 3, 4, 8, 8], [1, 2, 3, 4, 8, 9]]) == 4
    assert shared_start_length([[5, 1, 2], [5, 1, 2], [6, 1, 2]]) == 2  # each prompt keeps a token of its own
    assert shared_start_length([[1, 2], [3, 4]]) == 0 and shared_start_length([[1, 2, 3]]) == 0


def test_runner_sends_the_model_exactly_batch_size_prompts(glm4_dir, tmp_path):
    items, _ = load_records(CMB / "test.json", "exam")
    single = [i for i in items if not i.multiple][:8]
    multiple = [i for i in items if i.multiple and len(i.options) == 5][:2]
    mixed = single[:3] + multiple[:1] + single[3:] + multiple[1:]  # file order interleaves the two kinds
    backend = LocalBackend(str(glm4_dir), batch_size=4)
    calls = []  # (rows, whether a KV cache was passed) of every forward pass

    def record(module, args, kwargs):
        calls.append((len(kwargs["input_ids"]), bool({"cache", "past_key_values"} & set(kwargs))))

    backend.model.register_forward_pre_hook(record, with_kwargs=True)
    eval_args = EvalArguments(batch_size=4, output_dir=str(tmp_path))
    tmp_path.mkdir(exist_ok=True)
    answers = runner.predict_exam(mixed, [], backend, eval_args, "likelihood", tmp_path, {})
    # each multiple-choice prompt once, then its 26 candidate replies (sets of 2-5 of 5 letters) 4 at a time on the
    # prompt's KV cache
    per_multiple = [(1, False)] + [(4, True)] * 6 + [(2, True)]
    assert calls[-16:] == per_multiple * 2
    # before them, the 8 single-choice prompts: two passes of exactly 4 on the KV cache of their starts, which
    # run once each (the second pass may reuse the first one's)
    single_choice = calls[:-16]
    assert [rows for rows, cached in single_choice if cached] == [4, 4] and single_choice[0][1] is False
    assert all(rows <= 4 for rows, cached in single_choice if not cached)
    assert list(answers) == [i.id for i in mixed] and all(len(answers[i.id]) >= 2 for i in multiple)
