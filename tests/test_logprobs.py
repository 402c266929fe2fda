"""The LM head run only at labelled positions (`--loss_only_labels`, pt and sft) gives transformers' causal-LM
loss and the same gradients, on every tiny model family, with and without gradient-accumulation normalisation."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from medtune.data.collators import PaddingCollator
from medtune.stages.logprobs import has_plain_head, install_label_only_forward


def batch_with_prompts(vocab: int) -> dict:
    """Two right-padded rows whose first tokens (a prompt) carry no label, as sft builds them."""
    generator = torch.Generator().manual_seed(0)
    lengths, prompts = (23, 15), (9, 4)
    features = []
    for length, prompt in zip(lengths, prompts):
        ids = torch.randint(5, vocab, (length,), generator=generator)
        labels = ids.clone()
        labels[:prompt] = -100
        features.append({"input_ids": ids, "labels": labels})
    return PaddingCollator(pad_token_id=0)(features)


def loss_and_gradients(model, batch, **extra):
    model.zero_grad()
    loss = model(**batch, **extra).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["glm4", "qwen2", "llama"])
@pytest.mark.parametrize(("num_items", "token_chunk"), [(None, 1024), (40, 7)])
def test_label_only_loss_and_gradients_equal_the_standard_path(tiny_model, monkeypatch, arch, num_items, token_chunk):
    from medtune.stages import logprobs

    monkeypatch.setattr(logprobs, "TOKEN_CHUNK", token_chunk)  # 7: the labelled tokens span several chunks
    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch), dtype=torch.float32)
    assert has_plain_head(model) and install_label_only_forward(model)
    batch = batch_with_prompts(model.config.vocab_size)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    expected, expected_grads = loss_and_gradients(model, batch, **extra)
    loss, grads = loss_and_gradients(model, batch, label_only_loss=True, **extra)
    # float32, same arithmetic in another order (chunked logsumexp): agreement to 1e-5 absolute
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_without_the_flag_the_forward_is_the_models_own(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen2"), dtype=torch.float32)
    batch = batch_with_prompts(model.config.vocab_size)
    with torch.no_grad():
        before = model(**batch).logits
        install_label_only_forward(model)
        after = model(**batch)
    assert torch.equal(after.logits, before)


def test_a_head_that_scales_its_logits_keeps_the_standard_forward(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    model.config.logit_scale = 0.5
    assert not has_plain_head(model) and not install_label_only_forward(model)


@pytest.mark.parametrize("keep_softmax", [True, False])
def test_the_head_with_a_bias_gives_cross_entropys_values_and_gradients(keep_softmax):
    """The label-only head keeps the softmax its backward needs, or recomputes it there (DPO); either way its
    log-probs and the gradients of hidden states, weight and bias equal cross-entropy's, for any per-token upstream
    gradient."""
    from medtune.stages.logprobs import _LinearLogProbs

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    upstream = torch.randn(37, generator=generator)
    results = []
    for path in ("reference", "label_only"):
        for tensor in (hidden, weight, bias):
            tensor.grad = None
        if path == "reference":
            logits = torch.nn.functional.linear(hidden, weight, bias)
            log_probs = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        else:
            log_probs = _LinearLogProbs.apply(hidden, weight, bias, targets, ("log_probs",), keep_softmax)[0]
        (log_probs * upstream).sum().backward()
        results.append([log_probs.detach(), hidden.grad, weight.grad, bias.grad])
    for ours, reference in zip(*results[::-1]):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)


def test_a_second_backward_through_the_kept_softmax_is_refused():
    from medtune.stages.logprobs import _LinearLogProbs

    hidden = torch.randn(4, 8, requires_grad=True)
    log_probs = _LinearLogProbs.apply(hidden, torch.randn(10, 8), None, torch.tensor([1, 2, 3, 4]), ("log_probs",),
                                      True)[0]
    log_probs.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        log_probs.sum().backward()


@pytest.mark.parametrize("keep_softmax", [True, False])
def test_confident_targets_keep_their_gradient_under_bfloat16_autocast(keep_softmax):
    """softmax - onehot is formed in float32: cast to bfloat16 first, a target with p = 0.999 would round to 1 and
    its row's gradient would be mostly rounding error (25-100% of it). Each row of the hidden gradient equals
    cross-entropy's under the same autocast within 1%, and both are within 3% of the exact float64 one."""
    from medtune.stages.logprobs import _LinearLogProbs

    torch.manual_seed(0)
    weight = torch.cat([torch.eye(16), torch.randn(48, 16) * 0.05])
    targets = torch.arange(8)
    # row i scores token i with logit 9 to 12 and the 63 others near 0: p_t between 0.99 and 0.9999
    rows = torch.linspace(9, 12, 8)[:, None] * torch.eye(16)[:8]
    gradients = {}
    for path in ("ours", "cross-entropy", "exact"):
        hidden = rows.clone().double().requires_grad_() if path == "exact" else rows.clone().requires_grad_()
        if path == "exact":
            log_probs = torch.log_softmax(hidden @ weight.double().T, -1)[targets, targets]
            assert 0.99 < log_probs.exp().min() and log_probs.exp().max() < 0.9999
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path != "exact"):
            if path == "ours":
                log_probs = _LinearLogProbs.apply(hidden, weight, None, targets, ("log_probs",), keep_softmax)[0]
            elif path == "cross-entropy":
                log_probs = -torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")
        log_probs.sum().backward()
        gradients[path] = hidden.grad.double()

    def row_error(path, reference):
        return ((gradients[path] - gradients[reference]).norm(dim=1) / gradients[reference].norm(dim=1)).max()

    assert row_error("ours", "cross-entropy") < 0.01
    assert row_error("ours", "exact") < 0.03 and row_error("cross-entropy", "exact") < 0.03


def test_a_probability_that_underflows_in_the_softmax_still_gets_its_exact_log():
    """log p is read off the softmax except where p is below 2^-100: there it comes from the logits (a target
    150 nats below the best logit has p = 0 in float32, log p = -150, and so the loss)."""
    from medtune.stages.logprobs import _LinearLogProbs

    logits_row = torch.tensor([[0.0, 150.0, 10.0, 40.0]])
    weight, hidden = logits_row.T, torch.ones(3, 1)  # every row's logits are logits_row
    targets = torch.tensor([0, 1, 3])
    log_probs = _LinearLogProbs.apply(hidden, weight, None, targets, ("log_probs",), True)[0]
    torch.testing.assert_close(log_probs, torch.log_softmax(logits_row, -1)[0, targets])
    assert log_probs[0].item() < -149.9 and torch.isfinite(log_probs).all()


def test_under_bfloat16_autocast_the_head_matches_cross_entropy_with_a_float32_trainable_head():
    """Autocast multiplies in bfloat16 while the trained head's weight stays float32 (LoRA's modules_to_save): the
    backward multiplies in the forward's dtype and returns each gradient in its tensor's dtype."""
    from medtune.stages.logprobs import _LinearLogProbs

    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(24, 32, generator=generator).bfloat16().requires_grad_()
    weight = torch.randn(40, 32, generator=generator).requires_grad_()
    targets = torch.randint(0, 40, (24,), generator=generator)
    results = []
    for path in ("reference", "label_only"):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if path == "reference":
                logits = torch.nn.functional.linear(hidden, weight).float()
                log_probs = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            else:
                log_probs = _LinearLogProbs.apply(hidden, weight, None, targets, ("log_probs",), True)[0]
        log_probs.sum().backward()
        results.append((log_probs.detach(), hidden.grad, weight.grad))
    (ref_lp, ref_hidden, ref_weight), (lp, grad_hidden, grad_weight) = results
    assert grad_hidden.dtype == torch.bfloat16 and grad_weight.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(grad_hidden, ref_hidden, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad_weight, ref_weight, atol=2e-2, rtol=2e-2)


def test_the_statistics_trl_logs_equal_those_of_the_full_logits():
    from medtune.stages.logprobs import _LinearLogProbs

    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(30, 16, generator=generator, requires_grad=True)
    weight, bias = torch.randn(50, 16, generator=generator), torch.randn(50, generator=generator)
    logits = torch.nn.functional.linear(hidden, weight, bias).detach()
    targets = logits.argmax(-1)
    targets[::2] = torch.randint(0, 50, (15,), generator=generator)  # half the targets are the top logit
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    log_probs, entropy, log_sum_sq, mean_logits, is_top1 = _LinearLogProbs.apply(hidden, weight, bias, targets,
                                                                                  outputs, False)
    probs = logits.softmax(-1)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1))
    torch.testing.assert_close(log_sum_sq, (probs * probs).sum(-1).log())
    torch.testing.assert_close(mean_logits, logits.mean(-1))
    assert torch.equal(is_top1, logits.argmax(-1) == targets) and 15 <= int(is_top1.sum()) < 30
    assert not any(x.requires_grad for x in (entropy, log_sum_sq, mean_logits)) and log_probs.requires_grad
