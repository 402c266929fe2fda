"""`medtune chat` driven through a pseudo-terminal, as a user types: streamed replies, the history each turn
renders (checked by the prompt ids it prints with --show_prompt_ids), /clear, /system, /exit and end of input."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from medtune.config.args import DEFAULT_SYSTEM_PROMPT

MAX_NEW_TOKENS = 8


class Terminal:
    """`medtune chat` on a pty: write lines, read what the terminal shows up to the next `>>> ` prompt."""

    def __init__(self, model, stderr_path, *args: str):
        self.master, slave = pty.openpty()
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", TOKENIZERS_PARALLELISM="false")
        with open(stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "medtune", "chat", "--model", str(model), "--max_new_tokens",
                 str(MAX_NEW_TOKENS), *args], stdin=slave, stdout=slave, stderr=stderr, env=env, close_fds=True,
                # a pytest-xdist worker ignores SIGINT and a child would inherit that; a user's terminal does not
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        os.close(slave)
        self.buffer = b""

    def read_until_prompt(self, limit_s: float = 180) -> str:
        """Everything shown up to the next `>>> ` (a generous limit so a stuck chat fails instead of hanging)."""
        deadline = time.monotonic() + limit_s
        while b">>> " not in self.buffer:
            assert time.monotonic() < deadline, f"no prompt; the terminal shows {self.buffer[-500:]!r}"
            ready, _, _ = select.select([self.master], [], [], 1)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the chat ended: the pty is closed
                    break
                if not chunk:
                    break
                self.buffer += chunk
        shown, _, self.buffer = self.buffer.partition(b">>> ")
        return shown.decode("utf-8").replace("\r", "")

    def type(self, text: str) -> str:
        os.write(self.master, text.encode("utf-8") + b"\n")
        return self.read_until_prompt()

    def close(self, failed: bool = False) -> int:
        """The exit code (the chat is killed first when the test has already failed)."""
        if failed:
            self.process.kill()
        code = self.process.wait(timeout=60)
        os.close(self.master)
        return code


def prompt_and_reply(shown: str, question: str) -> tuple[list[int], str]:
    """The prompt ids printed for a turn and the streamed reply after them."""
    match = re.search(r"^prompt_ids: (\[[^\]]*\])\n", shown, re.M)
    assert match, shown
    assert question in shown[:match.start()]  # the terminal echoed what was typed
    return json.loads(match.group(1)), shown[match.end():].strip()


@pytest.fixture(scope="module")
def reference(glm4_dir):
    from medtune.eval.backends import LocalBackend

    return LocalBackend(str(glm4_dir), batch_size=1)


def test_chat_streams_replies_keeps_history_and_obeys_clear_system_and_exit(glm4_dir, reference, tmp_path):
    template = reference.template
    system = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    terminal = Terminal(glm4_dir, tmp_path / "stderr.txt", "--show_prompt_ids", "true")
    try:
        banner = terminal.read_until_prompt()
        assert "not a doctor" in banner and "不能替代医生" in banner

        first = [system, {"role": "user", "content": "头痛怎么办？"}]
        ids, reply = prompt_and_reply(terminal.type("头痛怎么办？"), "头痛怎么办？")
        expected_reply = reference.generate([first], MAX_NEW_TOKENS)[0]
        assert ids == template.prompt_ids(first)
        assert reply == expected_reply and reply  # streamed to the terminal: the reply evaluation would give

        second = first + [{"role": "assistant", "content": expected_reply}, {"role": "user", "content": "还有呢？"}]
        ids, _ = prompt_and_reply(terminal.type("还有呢？"), "还有呢？")
        assert ids == template.prompt_ids(second)  # the earlier turn is in the history

        assert "[conversation cleared]" in terminal.type("/clear")
        ids, _ = prompt_and_reply(terminal.type("发烧了"), "发烧了")
        assert ids == template.prompt_ids([system, {"role": "user", "content": "发烧了"}])

        assert "[system prompt set" in terminal.type("/system 你是儿科医生助手")
        ids, _ = prompt_and_reply(terminal.type("发烧了"), "发烧了")
        assert ids == template.prompt_ids([{"role": "system", "content": "你是儿科医生助手"},
                                           {"role": "user", "content": "发烧了"}])

        os.write(terminal.master, b"/exit\n")
    except BaseException:
        terminal.close(failed=True)
        raise
    code = terminal.close()
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-2000:]


@pytest.mark.parametrize("leave", ["ctrl-d", "ctrl-c"])
def test_end_of_input_or_ctrl_c_at_the_prompt_ends_the_chat_cleanly(glm4_dir, tmp_path, leave):
    terminal = Terminal(glm4_dir, tmp_path / "stderr.txt")
    try:
        terminal.read_until_prompt()
        if leave == "ctrl-d":
            os.write(terminal.master, b"\x04")  # Ctrl-D at an empty prompt: end of input
        else:  # what the terminal sends for Ctrl-C (the chat is not the pty's foreground job here)
            terminal.process.send_signal(signal.SIGINT)
    except BaseException:
        terminal.close(failed=True)
        raise
    code = terminal.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 0 and "Traceback" not in stderr, stderr[-2000:]
