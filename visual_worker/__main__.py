"""python -m visual_worker: run the visual worker on its own (another device or host than the LLM worker)."""

from common.options import VISUAL_OPTIONS
from common.runtime import start_worker, worker_parser
from visual_worker.worker import VisualWorker


def main() -> None:
    p = worker_parser("visual", "Qwen2.5-VL visual worker: pixels → image embeddings", VISUAL_OPTIONS)
    p.add_argument("--requests", required=True, help="front end's requests endpoint to connect to")
    p.add_argument("--embeds", required=True, help="endpoint to bind and publish embeddings on")
    a = p.parse_args()
    VisualWorker(start_worker(a), a.name, a.device, a.requests, a.embeds, a.results, a.control).run()


if __name__ == "__main__":
    main()
