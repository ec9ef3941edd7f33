"""python -m llm_worker: run the LLM worker on its own (another device or host than the visual worker)."""

from common.options import LLM_OPTIONS
from common.runtime import start_worker, worker_parser
from llm_worker.worker import LLMWorker


def main() -> None:
    p = worker_parser("Qwen2.5-VL LLM worker: image embeddings + prompt → streamed text", LLM_OPTIONS)
    p.add_argument("--embeds", required=True, help="visual worker's endpoint to subscribe to")
    a = p.parse_args()
    LLMWorker(start_worker(a), a.device, a.embeds, a.results, a.control).run()


if __name__ == "__main__":
    main()
