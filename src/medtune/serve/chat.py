"""`medtune chat`: a multi-turn conversation with a model in the terminal, the reply streamed token by token.

Each turn renders the whole conversation with the model's ChatTemplate (`prompt_ids`, the rendering training and
evaluation use) and stops at the template's stop tokens; the reply kept in the history is the decoded reply, as
evaluation decodes it. Commands: /system TEXT, /clear, /exit; end of input (Ctrl-D) or Ctrl-C at the prompt exits,
Ctrl-C during a reply stops that reply.
"""

from __future__ import annotations

import json
import sys
import threading

DESCRIPTION = ("Talk to a model in the terminal: streamed replies, multi-turn history, /system TEXT, /clear, /exit. "
               "Medical information only: the model is not a doctor.")
HELP = ("commands: /system TEXT  set the system prompt (and start over) · /system  show it · /clear  forget the "
        "conversation · /exit  quit")
NOTICE = "本模型提供医学信息，不能替代医生的诊断与治疗。This model gives medical information; it is not a doctor."


class Conversation:
    """The system prompt and the turns so far, as chat messages."""

    def __init__(self, system_prompt: str):
        self.system_prompt = system_prompt
        self.turns: list[dict[str, str]] = []

    def messages(self, question: str | None = None) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
        asked = [{"role": "user", "content": question}] if question is not None else []
        return system + self.turns + asked

    def add(self, question: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def command_reply(conversation: Conversation, line: str) -> str | None:
    """Carry out a /command and return what to print; None for /exit."""
    name, _, argument = line.partition(" ")
    if name in ("/exit", "/quit"):
        return None
    if name == "/clear":
        conversation.turns.clear()
        return "[conversation cleared]"
    if name == "/system":
        if not argument.strip():
            return f"[system prompt] {conversation.system_prompt or '(none)'}"
        conversation.system_prompt = argument.strip()
        conversation.turns.clear()  # earlier replies answered another system prompt
        return "[system prompt set; conversation cleared]"
    return f"[unknown command {name}] {HELP}"


def stream_reply(backend, prompt_ids: list[int], generation_args, out) -> str:
    """Generate on a worker thread, writing the text to `out` as it comes; returns the decoded reply. Ctrl-C stops
    the generation and is raised again once the worker has finished."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    interrupted = threading.Event()

    class StopOnInterrupt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), interrupted.is_set(), dtype=torch.bool, device=input_ids.device)

    streamer = TextIteratorStreamer(backend.tokenizer, skip_prompt=True, skip_special_tokens=True)
    input_ids = torch.tensor([prompt_ids], device=backend.device)
    result: dict = {}

    def work():
        try:
            options = backend.decoding_options(generation_args.max_new_tokens, generation_args.temperature,
                                               generation_args.top_p)
            with torch.no_grad():
                result["ids"] = backend.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                       streamer=streamer, stopping_criteria=StoppingCriteriaList([StopOnInterrupt()]),
                                                       **options)
        except BaseException as exc:  # shown by the main thread, which would otherwise wait on the streamer forever
            result["error"] = exc
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    started = False
    try:
        for piece in streamer:
            if not started:  # templates often open a reply with a newline (GLM-4); the terminal needs none
                piece = piece.lstrip()
                started = bool(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        interrupted.set()
        worker.join()
        raise
    worker.join()
    out.write("\n")
    out.flush()
    if "error" in result:
        raise result["error"]
    return backend.decode(backend.reply_ids(result["ids"][0][len(prompt_ids):]))


def run_chat(model_args, adapter_args, generation_args, chat_args, out=None) -> int:
    import torch

    from medtune.eval.backends import LocalBackend

    out = out or sys.stdout
    if generation_args.num_return_sequences != 1:
        from medtune.errors import ConfigError

        raise ConfigError("chat writes one reply per turn; --n applies to `medtune predict`")
    backend = LocalBackend(model_args.model_name_or_path, adapter_args.adapter_name_or_path, model_args.template,
                           model_args.torch_dtype, model_args.trust_remote_code, 1, model_args.tokenizer_name_or_path,
                           model_args.attn_implementation)
    torch.manual_seed(generation_args.seed)  # sampled chats replay the same way for the same inputs
    conversation = Conversation(chat_args.system_prompt)
    out.write(f"medtune chat · {backend.name}\n{NOTICE}\n{HELP}\n")
    while True:
        try:  # the prompt inside: a Ctrl-C just as it appears also ends the chat cleanly
            out.write(">>> ")  # written here, not by input(), which sends it to stderr when stdin is a terminal
            out.flush()
            line = input().strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not line:
            continue
        if line.startswith("/"):
            shown = command_reply(conversation, line)
            if shown is None:
                return 0
            out.write(shown + "\n")
            continue
        prompt_ids = backend.template.prompt_ids(conversation.messages(line))
        if chat_args.show_prompt_ids:
            out.write(f"prompt_ids: {json.dumps(prompt_ids)}\n")
        try:
            reply = stream_reply(backend, prompt_ids, generation_args, out)
        except KeyboardInterrupt:
            out.write("\n[reply stopped; not kept in the conversation]\n")
            continue
        conversation.add(line, reply)
