"""The model side of `medtune serve`: a scheduler that decodes every active request in one batch.

Why our own scheduler and not transformers' continuous batching (`generate_batch` / `init_continuous_batching`):
that engine runs on the CPU and gives the same greedy tokens, but sampling (`do_sample`), the seed and the number
of replies are fixed for the whole manager rather than per request, and on our tiny CPU models it spent 35 s on its
paged cache set-up for 3 prompts x 20 tokens. What a server needs is small: one background thread that

- waits a few milliseconds after the first request of an idle period so that requests arriving together start
  together (`batch_wait_ms`), and takes new requests in between decode steps while others are running;
- runs the new prompts of a step together, left-padded (the attention mask hides the padding and positions count
  real tokens only, as in a left-padded `generate`), and appends their KV cache to the running batch's, padded on
  the left to a common length;
- decodes one token for every running sequence per forward pass, each with its own temperature, top_p and
  seeded generator, so a reply does not depend on which requests share its batch;
- drops finished and cancelled sequences from the batch right away, and the cache columns no sequence needs.

Tokens travel to the asyncio side through each request's queue, handed over once per step
(`loop.call_soon_threadsafe`), so the event loop wakes once per step rather than once per token.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class SamplingOptions:
    """One reply's decoding: temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Finished:
    """The last item of a reply's stream: why it ended."""

    reason: str  # "stop" (a stop token), "length" (max_tokens) or "cancelled"


class Generation:
    """One reply being generated: it puts `(tag, token id)` items on `queue` (an asyncio queue that the replies of
    one request share), then `(tag, Finished)`, or `(tag, exception)` if generation broke."""

    def __init__(self, prompt_ids: list[int], options: SamplingOptions, queue: asyncio.Queue, tag: int = 0,
                 device: str = "cpu"):
        self.prompt_ids = prompt_ids
        self.options = options
        self.loop = asyncio.get_running_loop()
        self.queue = queue
        self.tag = tag
        self.cancelled = threading.Event()
        # on the model's device: torch.multinomial draws with a generator of the device its input is on
        self.generator = torch.Generator(device=device).manual_seed(options.seed if options.seed is not None
                                                       else secrets.randbits(63))

    def cancel(self) -> None:
        """Stop generating (client gone, stop string seen); the scheduler drops it before its next step."""
        self.cancelled.set()


def sample_next_token(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """The next token from one row of logits: argmax at temperature 0, else temperature + nucleus sampling."""
    if options.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest set of tokens whose mass reaches top_p (the most likely token always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= options.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Running:
    """A sequence in the batch: its reply so far and the token to feed next."""

    generation: Generation
    generated: int = 0
    last_token: int = 0
    done: bool = False


@dataclass
class EngineStats:
    """What /health reports; `largest_batch` is how many sequences one forward pass decoded at most."""

    largest_batch: int = 0
    steps: int = 0
    completed: int = 0
    cancelled: int = 0
    running: int = 0
    waiting: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # batch size -> decode steps at that size


class BatchingEngine:
    """Generates replies for many requests at once on a local model (a `LocalBackend`'s model and template)."""

    def __init__(self, backend, max_batch_size: int = 16, batch_wait_ms: float = 5.0):
        self.model = backend.model
        self.device = backend.device
        self.cache_keyword = backend.cache_keyword
        self.stop_token_ids = set(backend.template.stop_token_ids)
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.stats = EngineStats()
        self._waiting: deque[Generation] = deque()
        self._wake = threading.Condition()
        self._running: list[Running] = []
        self._cache = None  # the batch's KV cache, one row per running sequence
        self._mask: torch.Tensor | None = None  # [rows, cache length]: 1 for real tokens, 0 for left padding
        self._outbox: list[tuple[Generation, object]] = []  # what this step produced, delivered after it
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="medtune-engine", daemon=True)

    # -- asyncio side ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def submit(self, prompt_ids: list[int], options: SamplingOptions, queue: asyncio.Queue, tag: int = 0) -> Generation:
        """Queue one reply (called on the event loop); its tokens arrive on `queue` tagged `tag`."""
        generation = Generation(prompt_ids, options, queue, tag, self.device)
        with self._wake:
            self._waiting.append(generation)
            self._wake.notify()
        return generation

    # -- the scheduler thread -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                arrivals = self._take_arrivals()
                if arrivals is None:
                    return
                try:
                    self.step(arrivals)
                except Exception as exc:  # a bug: fail the requests in flight, keep serving the next ones
                    logger.exception("generation failed")
                    for generation in [*arrivals, *(r.generation for r in self._running)]:
                        self._emit(generation, exc)
                    self._running, self._cache, self._mask = [], None, None
                self._deliver()

    def _emit(self, generation: Generation, item) -> None:
        self._outbox.append((generation, item))

    def _deliver(self) -> None:
        """Hand the step's tokens to the event loop in one call per loop: one wake-up per step, not per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for generation, item in self._outbox:
            by_loop.setdefault(generation.loop, []).append((generation.queue, (generation.tag, item)))
        self._outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(put_all, items)

    def _take_arrivals(self) -> list[Generation] | None:
        """New requests to join the batch (None: shutting down). When idle, blocks for the first one, then waits
        `batch_wait` for others arriving with it."""
        with self._wake:
            if not self._running:
                while not self._waiting and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return None
                if self.batch_wait > 0 and self.max_batch_size > 1:
                    deadline = time.monotonic() + self.batch_wait
                    while len(self._waiting) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                        self._wake.wait(left)
            room = self.max_batch_size - len(self._running)
            arrivals = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            self.stats.waiting = len(self._waiting)
            return arrivals

    def step(self, arrivals: list[Generation]) -> None:
        """Admit `arrivals` (one prefill pass, first tokens), then decode one token for every running sequence."""
        for generation in arrivals:
            if generation.cancelled.is_set():
                self._finish(Running(generation), "cancelled")
        arrivals = [g for g in arrivals if not g.cancelled.is_set()]
        if arrivals:
            self._admit(arrivals)
        self._drop_finished()
        if self._running:
            self._decode_step()
            self._drop_finished()
        self.stats.running = len(self._running)

    def _admit(self, arrivals: list[Generation]) -> None:
        """Run the new prompts together, left-padded (padding hidden by the mask; positions count real tokens
        only), append their KV cache to the batch's and take each one's first token."""
        width = max(len(g.prompt_ids) for g in arrivals)
        ids = torch.zeros((len(arrivals), width), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(arrivals), width), dtype=torch.long, device=self.device)
        for row, generation in enumerate(arrivals):
            ids[row, width - len(generation.prompt_ids):] = torch.tensor(generation.prompt_ids)
            mask[row, width - len(generation.prompt_ids):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        self._join_batch(out[self.cache_keyword], mask)
        sequences = [Running(generation) for generation in arrivals]
        self._running += sequences
        self._accept_all(sequences, out.logits[:, -1])

    def _join_batch(self, cache, mask: torch.Tensor) -> None:
        """Append new rows (their cache and mask) to the batch, left-padding the shorter side."""
        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        width = max(mask.shape[1], self._mask.shape[1])
        for batch_layer, new_layer in zip(self._cache.layers, cache.layers):
            batch_layer.keys = torch.cat([left_pad(batch_layer.keys, width), left_pad(new_layer.keys, width)])
            batch_layer.values = torch.cat([left_pad(batch_layer.values, width), left_pad(new_layer.values, width)])
        self._mask = torch.cat([left_pad(self._mask, width), left_pad(mask, width)])

    def _decode_step(self) -> None:
        batch = len(self._running)
        input_ids = torch.tensor([[s.last_token] for s in self._running], device=self.device)
        # each row's position is the number of real tokens before it, whatever padding sits on its left
        position_ids = self._mask.sum(dim=1, keepdim=True)
        self._mask = torch.cat([self._mask, torch.ones((batch, 1), dtype=self._mask.dtype, device=self.device)], 1)
        logits = self.model(input_ids=input_ids, attention_mask=self._mask, position_ids=position_ids,
                            use_cache=True, **{self.cache_keyword: self._cache}).logits[:, -1]
        self.stats.steps += 1
        self.stats.largest_batch = max(self.stats.largest_batch, batch)
        self.stats.batch_sizes[batch] = self.stats.batch_sizes.get(batch, 0) + 1
        self._accept_all(self._running, logits)

    def _accept_all(self, sequences: list[Running], logits: torch.Tensor) -> None:
        """Each sequence's next token from its row of `logits`; mark those that end their reply finished."""
        greedy = logits.argmax(dim=-1).tolist()  # one call for the whole batch; sampled rows draw on their own
        for row, sequence in enumerate(sequences):
            generation = sequence.generation
            token = greedy[row] if generation.options.temperature == 0 else sample_next_token(
                logits[row], generation.options, generation.generator)
            sequence.generated += 1
            sequence.last_token = token
            self._emit(generation, token)
            if token in self.stop_token_ids:
                self._finish(sequence, "stop")
            elif sequence.generated >= generation.options.max_tokens:
                self._finish(sequence, "length")

    def _finish(self, sequence: Running, reason: str) -> None:
        self._emit(sequence.generation, Finished(reason))
        sequence.done = True  # the next _drop_finished removes it from the batch
        if reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.completed += 1

    def _drop_finished(self) -> None:
        for sequence in self._running:
            if sequence.generation.cancelled.is_set() and not sequence.done:
                self._finish(sequence, "cancelled")
        keep = [row for row, s in enumerate(self._running) if not s.done]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[row] for row in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        first_used = int((self._mask.sum(dim=0) > 0).nonzero()[0])  # columns left of it are padding in every row
        self._mask = self._mask[:, first_used:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first_used:]
            layer.values = layer.values[index, :, first_used:]


def put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence axis (dim 2 of a [batch, heads, seq, dim] cache, dim 1 of a mask)."""
    axis = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
