"""`medtune serve --backend vllm`: the same routes on vLLM's engine (continuous batching, paged attention, tensor
parallelism over `--tensor_parallel_size` GPUs).

Prompts are still rendered by medtune's ChatTemplate and handed to vLLM as token ids, so a served reply starts from
exactly the prompt training and evaluation use. Written against vLLM's documented `AsyncLLMEngine` API
(`from_engine_args`, `generate(prompt, sampling_params, request_id, lora_request=...)`, `abort`), which keeps
requests in flight together itself.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from medtune.optional import require_vllm
from medtune.serve.engine import EngineStats, Finished, SamplingOptions


class VllmGeneration:
    """One reply on vLLM; `cancel` aborts it there."""

    def __init__(self, request_id: str):
        self.request_id, self.task = request_id, None

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()


class VllmEngine:
    """The BatchingEngine interface (`submit`, `start`, `stop`, `stats`) over vLLM's AsyncLLMEngine."""

    def __init__(self, engine, stop_token_ids: list[int], lora_request=None):
        self.engine, self.stop_token_ids, self.lora_request = engine, stop_token_ids, lora_request
        self.stats = EngineStats()

    @classmethod
    def create(cls, model_args, adapter: str | None, serve_args):
        """(engine, chat template) for the model folder (+ LoRA adapter, unmerged)."""
        require_vllm()
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from medtune.models.loader import load_chat_template, load_tokenizer

        # as in evaluation: an adapter trained by medtune carries the tokenizer and chat template it was trained with
        tokenizer_path = model_args.tokenizer_name_or_path or (
            adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_args.model_name_or_path)
        tokenizer = load_tokenizer(tokenizer_path, model_args.trust_remote_code)
        template = load_chat_template(model_args.model_name_or_path, tokenizer, model_args.template,
                                      serve_args.system_prompt)
        engine_args = AsyncEngineArgs(
            model=model_args.model_name_or_path, tokenizer=tokenizer_path,
            tensor_parallel_size=serve_args.tensor_parallel_size, trust_remote_code=model_args.trust_remote_code,
            dtype=model_args.torch_dtype, max_num_seqs=serve_args.max_batch_size if serve_args.batching else 1,
            enable_lora=bool(adapter))
        lora_request = None
        if adapter:
            from vllm.lora.request import LoRARequest

            lora_request = LoRARequest("adapter", 1, adapter)
        return cls(AsyncLLMEngine.from_engine_args(engine_args), template.stop_token_ids, lora_request), template

    def start(self) -> None:
        pass  # vLLM starts its own loop on the first request

    def stop(self) -> None:
        pass

    def submit(self, prompt_ids: list[int], options: SamplingOptions, queue: asyncio.Queue,
               tag: int = 0) -> VllmGeneration:
        generation = VllmGeneration(uuid.uuid4().hex)
        generation.task = asyncio.get_running_loop().create_task(self._run(generation, prompt_ids, options, queue, tag))
        return generation

    async def _run(self, generation: VllmGeneration, prompt_ids: list[int], options: SamplingOptions,
                   queue: asyncio.Queue, tag: int) -> None:
        from vllm import SamplingParams

        params = SamplingParams(n=1, temperature=options.temperature, top_p=options.top_p, seed=options.seed,
                                max_tokens=options.max_tokens, stop_token_ids=self.stop_token_ids,
                                skip_special_tokens=True)
        sent = 0
        try:
            async for output in self.engine.generate({"prompt_token_ids": prompt_ids}, params,
                                                     generation.request_id, lora_request=self.lora_request):
                tokens = list(output.outputs[0].token_ids)  # cumulative: the reply so far
                for token in tokens[sent:]:
                    queue.put_nowait((tag, token))
                sent = len(tokens)
                if output.finished:
                    reason = output.outputs[0].finish_reason
                    self.stats.completed += 1
                    queue.put_nowait((tag, Finished("length" if reason == "length" else "stop")))
                    return
        except asyncio.CancelledError:
            await self.engine.abort(generation.request_id)
            self.stats.cancelled += 1
            queue.put_nowait((tag, Finished("cancelled")))
        except Exception as exc:  # reported to the request, as the local engine does
            queue.put_nowait((tag, exc))
