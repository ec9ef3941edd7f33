"""python -m visual_worker: run the visual worker on its own (another device or host than the LLM worker)."""

from common.runtime import die_with_parent, resolve_dtype, set_threads, worker_args
from visual_worker.worker import VisualWorker


def main() -> None:
    p = worker_args("Qwen2.5-VL visual worker: pixels → image embeddings", "endpoint to bind and publish embeddings on")
    p.add_argument("--requests", required=True, help="front end's requests endpoint to connect to")
    p.add_argument("--chunk-width", type=int, default=640, help="split image_embeds along hidden into this width")
    a = p.parse_args()
    if a.exit_with_parent:
        die_with_parent()
    set_threads(a.threads)
    worker = VisualWorker(a.model, a.device, resolve_dtype(a.model, a.dtype), a.requests, a.embeds, a.results, a.chunk_width)
    worker.run()


if __name__ == "__main__":
    main()
