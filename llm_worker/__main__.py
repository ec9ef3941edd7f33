"""python -m llm_worker: run the LLM worker on its own (another device or host than the visual worker)."""

import sys

from common.options import LLM_OPTIONS
from common.runtime import start_worker, worker_parser
from llm_worker import parallel
from llm_worker.worker import LLMWorker


def main() -> None:
    p = worker_parser("llm", "Qwen2.5-VL LLM worker: image embeddings + prompt → streamed text (it subscribes to the "
                             "visual workers the front end names)", LLM_OPTIONS)
    a = p.parse_args()
    options = start_worker(a)
    try:
        parallel.check_options(options)
    except ValueError as e:
        sys.exit(str(e))
    LLMWorker(options, a.name, a.device, a.results, a.control).run()


if __name__ == "__main__":
    main()
