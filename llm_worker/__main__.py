"""python -m llm_worker: run the LLM worker on its own (another device or host than the visual worker)."""

from common.runtime import die_with_parent, resolve_dtype, set_threads, worker_args
from llm_worker.worker import LLMWorker


def main() -> None:
    p = worker_args("Qwen2.5-VL LLM worker: image embeddings + prompt → streamed text", "visual worker's endpoint to subscribe to")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-len", type=int, default=4096, help="context length per request (prompt + output)")
    a = p.parse_args()
    if a.exit_with_parent:
        die_with_parent()
    set_threads(a.threads)
    LLMWorker(a.model, a.device, resolve_dtype(a.model, a.dtype), a.embeds, a.results, a.max_batch, a.max_len).run()


if __name__ == "__main__":
    main()
