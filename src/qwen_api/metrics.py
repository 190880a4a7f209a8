"""Prometheus metrics: one registry per app (so several apps can live in one process, as in tests).

Requests by route and status, rejections and cancellations by reason, tokens in and out, per-sequence time to
first token, time per output token and end-to-end latency, the engine's batch size per step, and what is read
from the engine and admission at scrape time: running, waiting and admitted sequences, and where the engine keeps
its own KV cache (native, llama.cpp), its usage and preemptions, and prefix-cache lookups and hits (every engine)
(each only from an engine that reports it: a missing series is not a zero).

The same load also goes out under vLLM's names, labelled `model_name` as vLLM's are (`vllm:num_requests_running`,
`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` and its older name `vllm:gpu_cache_usage_perc`, a 0-1
share, and the token counters `vllm:prompt_tokens_total` and `vllm:generation_tokens_total`): what the tools built
around vLLM read from a model server, such as the Gateway API inference extension's endpoint picker and KEDA
autoscalers, so that they can balance and scale qwen-api as they do vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from qwen_api.engine.base import EngineStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _LoadCollector(Collector):
    def __init__(
        self,
        engine_stats: Callable[[], EngineStats | None],
        admitted: Callable[[], int],
        model_name: Callable[[], str],
        tokens: Callable[[], tuple[float, float]],
    ) -> None:
        self._engine_stats, self._admitted = engine_stats, admitted
        self._model_name, self._tokens = model_name, tokens

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._engine_stats()
        running = GaugeMetricFamily("qwen_api_running_sequences", "Sequences in the engine, not finished")
        waiting = GaugeMetricFamily("qwen_api_waiting_sequences", "Sequences waiting for a batch slot (queue depth)")
        running.add_metric([], stats.running if stats else 0)
        waiting.add_metric([], stats.waiting if stats else 0)
        admitted = GaugeMetricFamily("qwen_api_admitted_sequences", "Sequences holding an admission slot")
        admitted.add_metric([], self._admitted())
        yield from (running, waiting, admitted)
        yield from self._vllm(stats)
        if stats is None:
            return
        if stats.kv_usage is not None:
            yield GaugeMetricFamily(
                "qwen_api_kv_cache_usage_ratio", "Share of the KV cache held by unfinished sequences", stats.kv_usage
            )
        for name, doc, value in (
            ("qwen_api_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
             stats.prefix_queried_tokens),
            ("qwen_api_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache, not computed again",
             stats.prefix_hit_tokens),
            ("qwen_api_preemptions", "Sequences put back in the queue to free KV cache for others", stats.preemptions),
        ):  # fmt: skip
            if value is not None:
                yield CounterMetricFamily(name, doc, value)

    def _vllm(self, stats: EngineStats | None) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The load under vLLM's names (see the module's docstring)."""
        label = [self._model_name()]
        gauges: list[tuple[str, str, float]] = [
            # vLLM's running requests are those in its batch, its waiting ones not among them (ours: `running` are
            # all unfinished sequences, `waiting` some of them)
            (
                "vllm:num_requests_running",
                "Requests in the engine's batch",
                max(0, stats.running - stats.waiting) if stats else 0,  # a cancelled one may linger in a queue
            ),
            ("vllm:num_requests_waiting", "Requests waiting for a batch slot", stats.waiting if stats else 0),
        ]
        if stats is not None and stats.kv_usage is not None:
            gauges += [
                ("vllm:kv_cache_usage_perc", "KV cache usage, 0-1", stats.kv_usage),
                ("vllm:gpu_cache_usage_perc", "KV cache usage, 0-1 (vLLM's older name)", stats.kv_usage),
            ]
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(label, value)
            yield gauge
        prompt, generation = self._tokens()
        for name, doc, value in (
            ("vllm:prompt_tokens", "Prompt tokens of admitted requests", prompt),
            ("vllm:generation_tokens", "Tokens generated", generation),
        ):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(label, value)
            yield counter


class Metrics:
    def __init__(
        self,
        engine_stats: Callable[[], EngineStats | None],
        admitted: Callable[[], int],
        model_name: Callable[[], str] = lambda: "",
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "qwen_api_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.rejections = Counter(
            "qwen_api_rejections", "Requests refused before any work, by reason", ["reason"], registry=r
        )
        self.cancellations = Counter("qwen_api_cancellations", "Requests cancelled, by reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("qwen_api_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("qwen_api_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "qwen_api_time_to_first_token_seconds", "Per sequence", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "qwen_api_time_per_output_token_seconds",
            "Per sequence, after the first",
            buckets=PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram("qwen_api_e2e_latency_seconds", "Per sequence", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "qwen_api_batch_size", "Sequences per engine forward step", buckets=BATCH_BUCKETS, registry=r
        )
        r.register(_LoadCollector(engine_stats, admitted, model_name, self._token_counts))

    def _token_counts(self) -> tuple[float, float]:
        """The prompt and generation token counters' values (for their vLLM-named copies)."""
        return _value(self.prompt_tokens), _value(self.generation_tokens)

    def sequence_finished(self, completion_tokens: int, ttft: float, e2e: float) -> None:
        """Called by the text layer when a sequence ends normally."""
        self.generation_tokens.inc(completion_tokens)
        self.ttft.observe(ttft)
        self.e2e.observe(e2e)
        if completion_tokens > 1:
            self.tpot.observe((e2e - ttft) / (completion_tokens - 1))

    def sequence_left(self, completion_tokens: int) -> None:
        """Called by the text layer when a sequence ends early (cancelled, timed out, failed): the tokens it
        generated count as generated, as vLLM counts every step's; its latencies are no answer's."""
        self.generation_tokens.inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _value(counter: Counter) -> float:
    """A counter's value, read through the client's public `collect`."""
    return next(s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total"))
