"""GET /metrics: Prometheus counters, gauges and histograms of the requests the server answered, under vLLM's names
(vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds, vllm:e2e_request_latency_seconds,
vllm:request_queue_time_seconds, vllm:num_requests_running / _waiting, vllm:prompt_tokens_total,
vllm:generation_tokens_total, vllm:request_success_total, vllm:mm_cache_queries_total / _hits_total), so dashboards
built for vLLM read them. Times are the front end's: from the request's arrival to each token's."""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from common.messages import Error, Finish, TokenEntry

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0, 640.0, 2560.0)  # vLLM's TTFT buckets, used for every histogram here


class Metrics:
    def __init__(self, model_name: str = ""):
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, registry=self.registry, buckets=LATENCY_BUCKETS).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.")
        self.itl = histogram("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.")
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End to end request latency in seconds.")
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Time a request waited in the LLM worker for a batch row, in seconds.")
        self.running = Gauge("vllm:num_requests_running", "Requests generating tokens.", labels,
                             registry=self.registry).labels(model_name)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests sent to the workers with no token yet.", labels,
                             registry=self.registry).labels(model_name)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens processed.")
        self.success = Counter("vllm:request_success", "Requests finished, by finish reason.",
                               [*labels, "finished_reason"], registry=self.registry)
        self.model_name = model_name
        self.mm_queries = counter("vllm:mm_cache_queries", "Images looked up in the visual workers' encoder caches.")
        self.mm_hits = counter("vllm:mm_cache_hits", "Images found in the visual workers' encoder caches.")

    def start(self, rids: list[str]) -> "RequestTiming":
        return RequestTiming(self, rids)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTiming:
    """The metrics of one HTTP request's choices, fed its events as they arrive."""

    def __init__(self, metrics: Metrics, rids: list[str]):
        self.metrics, self.started = metrics, time.perf_counter()
        self.last: dict[str, float | None] = dict.fromkeys(rids)  # each choice's previous token time
        self.open = set(rids)
        metrics.waiting.inc(len(rids))

    def event(self, rid: str, event) -> None:
        now, m = time.perf_counter(), self.metrics
        if isinstance(event, TokenEntry):
            if self.last[rid] is None:
                m.ttft.observe(now - self.started)
                m.waiting.dec()
                m.running.inc()
            else:
                m.itl.observe(now - self.last[rid])
            self.last[rid] = now
        elif isinstance(event, (Finish, Error)) and rid in self.open:
            self.end(rid)
            if isinstance(event, Finish):
                m.e2e.observe(now - self.started)
                m.prompt_tokens.inc(event.prompt_tokens)
                m.generation_tokens.inc(event.completion_tokens)
                m.success.labels(m.model_name, event.finish_reason).inc()
                m.queue.observe(event.timings.get("queue_s", 0.0))
                m.mm_queries.inc(event.timings.get("encoder_cache_queries", 0.0))
                m.mm_hits.inc(event.timings.get("encoder_cache_hits", 0.0))

    def end(self, rid: str) -> None:
        self.open.discard(rid)
        (self.metrics.waiting if self.last[rid] is None else self.metrics.running).dec()

    def close(self) -> None:
        """The request is over (answered, failed or abandoned): its choices still open leave the gauges."""
        for rid in list(self.open):
            self.end(rid)
