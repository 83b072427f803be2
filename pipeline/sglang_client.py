"""Asyncio HTTP client of one SGLang server (0.5.23 native API).

`SGLangServerClient` speaks to one server: `/generate` with token ids and per-token sampling
log-probs (or, prefill only, the log-probs of a given sequence), `/abort_request`,
`/flush_cache`, `/health_generate`, and the weight-update endpoints. A group of responses to one
prompt is one batched `/generate` request (a list of G copies of the prompt, each with its own
sampling parameters and seed; SGLang answers a list in the same order). The client bounds the
samples outstanding on its server (back-pressure: a group holds one slot per sample), applies a
per-request timeout, and retries timeouts and 5xx answers with exponential backoff. A connection
failure on a server that no longer answers `/health` raises `ServerUnavailable` at once, so the
fleet (`pipeline.rollout_client`) can re-issue the request elsewhere. A 2xx answer that does not
follow the `/generate` schema raises `MalformedResponse` naming the server and the problem,
without retrying (such a server is broken or of another version, not busy). With `routing` set
(MoE routing replay) every generation also asks for the experts the server routed each token to.

Schemas: `sglang/srt/managers/io_struct.py` (`GenerateReqInput`, `UpdateWeightFromDiskReqInput`,
`InitWeightsUpdateGroupReqInput`, `UpdateWeightsFromDistributedReqInput`,
`UpdateWeightsFromTensorReqInput`, `AbortReq`, `ReleaseMemoryOccupationReqInput`,
`ResumeMemoryOccupationReqInput`) and `sglang/srt/entrypoints/http_server.py`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import torch

from pipeline.metrics import FleetMetrics
from pipeline.train_batch import ExpertRouting


class ServerUnavailable(RuntimeError):
    """The server stopped answering (connection refused or dropped, and `/health` fails)."""


class ServerRequestError(RuntimeError):
    """The server answered with an error that retrying will not fix (4xx, `success: false`)."""


class ResponseCutShort(ServerRequestError):
    """A server ended a response at its own limit, below the request's `max_new_tokens`."""


class MalformedResponse(ServerRequestError):
    """The server answered 2xx with a body that is not the `/generate` schema (not JSON, or
    fields missing or of the wrong type)."""


@dataclass(frozen=True)
class SamplingParams:
    """SGLang sampling parameters of one request (lengths in tokens)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    sampling_seed: int | None = None
    """Seeds this request's sampling (servers started with `--enable-deterministic-inference`)."""

    def to_json(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "ignore_eos": self.ignore_eos,
        }
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        if self.stop:
            params["stop"] = list(self.stop)
        if self.sampling_seed is not None:
            params["sampling_seed"] = self.sampling_seed
        return params


@dataclass(frozen=True)
class Generation:
    """One generated response.

    Attributes:
        output_ids: [T] response token ids (a matched stop/eos token included).
        output_logprobs: [T] sampling log-probability of each response token, nats.
        finish_reason: `"stop"` (eos or stop token), `"length"` (hit max_new_tokens) or
            `"abort"` (aborted; the response is partial and must not be trained on).
        server_weight_version: the weight version the server reported (string, as set by the
            last weight update; `"default"` before any).
        server_url: the server that generated it.
        weight_version: the policy version that generated it, as tracked by the fleet client
            (-1 from a bare server client).
        routed_experts: `[P + T - 1, L, K]` (`routing.dtype`) the K experts the server's
            router chose for each token of prompt + response at each of its L MoE layers, all
            but the last token (sampled, never fed to the model); None unless routes were
            asked for (and for an aborted response).
    """

    output_ids: tuple[int, ...]
    output_logprobs: tuple[float, ...]
    finish_reason: str
    server_weight_version: str
    server_url: str
    weight_version: int = -1
    routed_experts: torch.Tensor | None = field(default=None, compare=False)

    @classmethod
    def from_response(
        cls,
        body: Any,
        server_url: str,
        prompt_length: int = 0,
        routing: ExpertRouting | None = None,
    ) -> Generation:
        """Parse a `/generate` answer (decoded JSON, or the raw text if it was not JSON); with
        `routing`, also its routes (`meta_info["routed_experts"]`: base64 of int32
        `[prompt_length + T - 1, L, K]`, SGLang's `routed_experts_start_len` 0).

        Raises:
            MalformedResponse: `body` does not follow the schema; the message names the server,
                the problem and the start of the body.
        """

        def malformed(problem: str) -> MalformedResponse:
            return MalformedResponse(
                f"{server_url}/generate answered with {problem}: {str(body)[:200]!r}"
            )

        if not isinstance(body, dict):
            raise malformed(f"a {type(body).__name__}, not a JSON object")
        try:
            meta = body["meta_info"]
            logprobs = meta["output_token_logprobs"]
            output_ids = tuple(int(t) for t in body["output_ids"])
            token_ids = [int(entry[1]) for entry in logprobs]
            generation = cls(
                output_ids=output_ids,
                output_logprobs=tuple(float(entry[0]) for entry in logprobs),
                finish_reason=str(meta["finish_reason"]["type"]),
                server_weight_version=str(meta.get("weight_version", "default")),
                server_url=server_url,
            )
        except KeyError as error:
            raise malformed(f"no field {error}") from error
        except (TypeError, ValueError, IndexError) as error:
            raise malformed(f"a field of the wrong type ({error})") from error
        if token_ids != list(output_ids):
            raise malformed("log-prob token ids that differ from output_ids")
        if routing is None or generation.finish_reason == "abort":
            return generation
        encoded = meta.get("routed_experts")
        if not isinstance(encoded, str):
            raise malformed(
                "no routed_experts (routing replay needs servers started with "
                "--enable-return-routed-experts)"
            )
        rows = prompt_length + len(output_ids) - 1
        shape = (rows, routing.num_layers, routing.topk)
        try:
            flat = torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.int32)
            routes = flat.reshape(shape)
        except (ValueError, RuntimeError) as error:
            raise malformed(f"routed_experts that are not int32 {list(shape)} ({error})") from error
        if bool((routes < 0).any() | (routes >= routing.num_experts).any()):
            raise malformed(f"routed_experts outside [0, {routing.num_experts})")
        return replace(generation, routed_experts=routes.to(routing.dtype))


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of timeouts and 5xx answers: `max_retries` more attempts, waiting
    `backoff_s * 2**attempt` seconds (capped at `max_backoff_s`) before each."""

    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int) -> float:
        return min(self.backoff_s * 2**attempt, self.max_backoff_s)


def sample_rids(rid: str, count: int) -> list[str]:
    """The request ids of the `count` samples of group request `rid` (SGLang aborts by exact
    request id, so a group is aborted sample by sample)."""
    return [f"{rid}-{index}" for index in range(count)]


class Slots:
    """A counting limit whose holders take several units at once (a group request holds one
    per sample); `capacity` may change while held (the router's follows the live workers)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        """Units that may be held at once; waiters see a change at the next release."""
        self.used = 0
        self._released = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, units: int) -> AsyncIterator[None]:
        """Hold `units` (at most the whole capacity, so a group larger than it still runs,
        alone) for the block."""
        async with self._released:
            await self._released.wait_for(
                lambda: self.used + min(units, self.capacity) <= self.capacity
            )
            taken = min(units, self.capacity)
            self.used += taken
        try:
            yield
        finally:
            async with self._released:
                self.used -= taken
                self._released.notify_all()


@dataclass
class SGLangServerClient:
    """HTTP client of one SGLang server; share one `aiohttp.ClientSession` across servers.

    Args:
        url: base URL, e.g. `http://127.0.0.1:30000`.
        session: the aiohttp session (owned by the caller).
        max_inflight: back-pressure, the most samples outstanding at once (a group request
            holds one slot per sample; the router client's follows the live workers, see
            `RolloutClient`).
        timeout_s: limit of one HTTP call, seconds.
        retry: retry policy of timeouts and 5xx answers.
        metrics: fleet metrics to update (a private registry when not given).
        routing: the MoE routing to ask every generation's routes of (`Generation.
            routed_experts`; the server runs with `--enable-return-routed-experts`); None =
            no routes.
        batched: a group is one batched request; False = one request per sample (an
            `sglang-router` answers a batch with 422: its `/generate` schema has one prompt).
    """

    url: str
    session: aiohttp.ClientSession
    max_inflight: int = 64
    timeout_s: float = 3600.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    metrics: FleetMetrics = field(default_factory=FleetMetrics)
    routing: ExpertRouting | None = None
    batched: bool = True
    inflight: int = field(default=0, init=False)
    """Samples outstanding on this server."""
    _tp_size: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.slots = Slots(self.max_inflight)

    async def is_alive(self) -> bool:
        """True if GET `/health` answers 200 within 5 s."""
        try:
            timeout = aiohttp.ClientTimeout(total=5.0)
            async with self.session.get(f"{self.url}/health", timeout=timeout) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _get(self, path: str) -> Any:
        """GET `path` once; the decoded JSON body."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.session.get(f"{self.url}{path}", timeout=timeout) as response:
                status, text = response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ServerUnavailable(f"{self.url}{path} did not answer: {error!r}") from error
        if status != 200:
            raise ServerRequestError(f"{self.url}{path} -> {status}: {text[:500]}")
        return _decode(text)

    async def _post(self, path: str, payload: dict[str, Any] | None) -> Any:
        """POST with retries; the decoded JSON body (None for an empty body)."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        attempt = 0
        while True:
            try:
                async with self.session.post(
                    f"{self.url}{path}", json=payload, timeout=timeout
                ) as response:
                    text = await response.text()
                    if response.status < 500:
                        if response.status >= 400:
                            raise ServerRequestError(
                                f"{self.url}{path} -> {response.status}: {text[:500]}"
                            )
                        return _decode(text)
                    failure = f"HTTP {response.status}: {text[:200]}"
            except aiohttp.ClientConnectionError as error:
                if not await self.is_alive():
                    raise ServerUnavailable(f"{self.url} is unreachable: {error!r}") from error
                failure = repr(error)
            except TimeoutError:
                failure = f"timed out after {self.timeout_s} s"
            if attempt == self.retry.max_retries:
                raise ServerUnavailable(
                    f"{self.url}{path} failed {attempt + 1} times, last: {failure}"
                )
            self.metrics.retries.labels(self.url).inc()
            await asyncio.sleep(self.retry.delay(attempt))
            attempt += 1

    async def _post_generate(self, payload: dict[str, Any], samples: int) -> Any:
        """POST `/generate` of `samples` samples once their slots are free (counted as in
        flight meanwhile: `inflight` in samples, the metric in requests)."""
        async with self.slots.hold(samples):
            self.inflight += samples
            self.metrics.inflight_requests.labels(self.url).inc()
            try:
                return await self._post("/generate", payload)
            finally:
                self.inflight -= samples
                self.metrics.inflight_requests.labels(self.url).dec()

    async def generate(
        self, input_ids: Sequence[int], params: SamplingParams, rid: str | None = None
    ) -> Generation:
        """One response to `input_ids` ([P] token ids): `generate_group` of one sample."""
        (generation,) = await self.generate_group(input_ids, [params], rid)
        return generation

    async def generate_group(
        self, input_ids: Sequence[int], params: Sequence[SamplingParams], rid: str | None = None
    ) -> list[Generation]:
        """`len(params)` responses to `input_ids` ([P] token ids), the i-th sampled with
        `params[i]` (request id `sample_rids(rid, G)[i]`): one `/generate` request, or with
        `batched` False one per sample, each waiting for a slot per sample.

        Raises:
            ServerRequestError: the server refused the request (the message names the prompt
                length and `max_new_tokens`).
            MalformedResponse: the answer is not `len(params)` responses.
            ResponseCutShort: the server stopped a response at its context or KV-pool limit
                before `max_new_tokens` (SGLang does so silently).
        """
        rids = sample_rids(rid or uuid.uuid4().hex, len(params))
        if self.batched:
            return await self._generate(input_ids, params, rids)
        singles = await asyncio.gather(
            *(self._generate(input_ids, [p], [r]) for p, r in zip(params, rids, strict=True))
        )
        return [generation for (generation,) in singles]

    async def _generate(
        self, input_ids: Sequence[int], params: Sequence[SamplingParams], rids: list[str]
    ) -> list[Generation]:
        """One `/generate` request of `len(params)` samples (a batch, or with `batched` False
        a single one)."""
        count = len(params)
        longest = max(p.max_new_tokens for p in params)
        request = f"{count} x prompt of {len(input_ids)} tokens, max_new_tokens {longest}"
        payload: dict[str, Any] = {"return_logprob": True}
        if self.batched:
            payload["input_ids"] = [list(input_ids)] * count
            payload["sampling_params"] = [p.to_json() for p in params]
            payload["rid"] = rids
        else:
            (single,), (payload["rid"],) = params, rids
            payload["input_ids"], payload["sampling_params"] = list(input_ids), single.to_json()
        if self.routing is not None:
            payload["return_routed_experts"] = True
        try:
            body = await self._post_generate(payload, count)
        except ServerRequestError as error:
            raise ServerRequestError(f"{error} (request: {request})") from error
        answers = body if self.batched else [body]
        if not isinstance(answers, list) or len(answers) != count:
            kind = type(answers).__name__
            shape = f"a list of {len(answers)}" if isinstance(answers, list) else f"a {kind}"
            raise MalformedResponse(
                f"{self.url}/generate answered with {shape}, not a list of {count} responses: "
                f"{str(body)[:200]!r}"
            )
        generations = [
            Generation.from_response(answer, self.url, len(input_ids), self.routing)
            for answer in answers
        ]
        for generation, sample in zip(generations, params, strict=True):
            length = len(generation.output_ids)
            if generation.finish_reason == "length" and length < sample.max_new_tokens:
                raise ResponseCutShort(
                    f"{self.url} ended a response at {length} tokens, finish reason 'length' "
                    f"({request}): its context or KV pool cannot hold the request; give it "
                    "more (SGLang --context-length / --max-total-tokens) or lower the lengths"
                )
        self.metrics.requests.labels(self.url).inc()
        self.metrics.generated_tokens.inc(sum(len(g.output_ids) for g in generations))
        return generations

    async def request_capacity(self) -> int:
        """min(context length, KV pool) of this server, in tokens: what one request may span
        (see `sglang_server.sample_token_budget`). Read from `/server_info`'s
        `max_req_input_len`, which SGLang sets to that capacity - 6.

        Raises:
            MalformedResponse: `/server_info` does not hold it.
        """
        info = await self._get("/server_info")
        try:
            return int(info["max_req_input_len"]) + 6
        except (KeyError, TypeError, ValueError) as error:
            raise MalformedResponse(
                f"{self.url}/server_info has no max_req_input_len ({error!r}): {str(info)[:200]!r}"
            ) from error

    async def sequence_logprobs(self, input_ids: Sequence[int]) -> tuple[float, ...]:
        """[L - 1] log p(input_ids[t] | input_ids[:t]) for t = 1..L-1, nats, under the served
        weights: a prefill of the L given token ids, nothing sampled.

        The whole sequence is recomputed (`logprob_start_len` 0 allows no radix-cache reuse), so
        equal weights give equal log-probs whatever was served before.

        Raises:
            MalformedResponse: the answer has no input log-prob per token.
        """
        if len(input_ids) < 2:
            raise ValueError("sequence_logprobs needs at least 2 tokens")
        body = await self._post_generate(
            {
                "input_ids": list(input_ids),
                "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True,
                "logprob_start_len": 0,
                "rid": uuid.uuid4().hex,
            },
            samples=1,
        )
        try:
            entries = body["meta_info"]["input_token_logprobs"]  # [[logprob, id, text]] * L
            logprobs = tuple(float(entry[0]) for entry in entries[1:])  # the first is null
            ids = [int(entry[1]) for entry in entries]
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise MalformedResponse(
                f"{self.url}/generate answered without input log-probs ({error!r}): "
                f"{str(body)[:200]!r}"
            ) from error
        if ids != list(input_ids):
            raise MalformedResponse(f"{self.url}/generate scored other tokens than it was given")
        self.metrics.requests.labels(self.url).inc()
        return logprobs

    async def abort(self, rid: str | None = None) -> None:
        """Abort request `rid`, or every request on the server when `rid` is None; the
        aborted `generate` calls return with finish reason `"abort"`."""
        await self._post("/abort_request", {"rid": rid or "", "abort_all": rid is None})

    async def flush_cache(self) -> None:
        """Drop the prefix (radix) cache; SGLang skips it while requests are running."""
        await self._post("/flush_cache", None)

    async def health_generate(self) -> bool:
        """True if the server generates a token (GET `/health_generate`)."""
        try:
            timeout = aiohttp.ClientTimeout(total=min(self.timeout_s, 60.0))
            async with self.session.get(f"{self.url}/health_generate", timeout=timeout) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def update_weights_from_disk(self, model_path: str, weight_version: str) -> None:
        """Load new weights from an HF checkpoint directory readable by the server."""
        await self._checked(
            "/update_weights_from_disk",
            {"model_path": model_path, "weight_version": weight_version},
        )

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "gloo",
    ) -> None:
        """Join the broadcast group whose rank 0 is the trainer (blocks until all ranks join)."""
        await self._checked(
            "/init_weights_update_group",
            {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": rank_offset,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            },
        )

    async def destroy_weights_update_group(self, group_name: str) -> None:
        await self._checked("/destroy_weights_update_group", {"group_name": group_name})

    async def tp_size(self) -> int:
        """The server's tensor-parallel size (`/server_info`'s `tp_size`): its ranks in a weight
        update group, and the copies of a tensor payload it reads (one per TP rank)."""
        if self._tp_size is None:
            info = await self._get("/server_info")
            try:
                self._tp_size = int(info["tp_size"])
            except (KeyError, TypeError, ValueError) as error:
                raise MalformedResponse(
                    f"{self.url}/server_info has no tp_size ({error!r}): {str(info)[:200]!r}"
                ) from error
        return self._tp_size

    async def begin_weight_update(self) -> None:
        """Open a weight-update session; SGLang 0.5.23 takes `update_weights_from_distributed`
        and `update_weights_from_tensor` calls only inside one."""
        await self._checked("/begin_weight_update", {"selector": "all"})

    async def end_weight_update(self) -> None:
        """Close the session (the server finishes loading: post-processing of the weights)."""
        await self._checked("/end_weight_update", {})

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        group_name: str,
        weight_version: str,
        load_format: str | None = None,
    ) -> None:
        """Receive the named tensors broadcast by rank 0 of `group_name` and load them: one
        broadcast per tensor in order, or with `load_format="flattened_bucket"` one broadcast of
        all their bytes back to back. `dtypes` are torch dtype names (`"float32"`). Inside a
        `begin_weight_update` session."""
        await self._checked(
            "/update_weights_from_distributed",
            {
                "names": list(names),
                "dtypes": list(dtypes),
                "shapes": [list(s) for s in shapes],
                "group_name": group_name,
                "weight_version": weight_version,
                "load_format": load_format,
            },
        )

    async def update_weights_from_tensor(
        self, serialized: Sequence[bytes], weight_version: str, load_format: str | None = None
    ) -> None:
        """Load tensors pickled by `pipeline.weight_sync.serialize_for_sglang` (named tensors, or
        a flattened bucket with `load_format="flattened_bucket"`), one pickle per TP rank of the
        server (each unpickling drops one reference of the shared storage). Inside a
        `begin_weight_update` session.

        The tensors are passed by shared memory (CUDA IPC on GPU): keep them alive until this
        returns.
        """
        if len(serialized) != await self.tp_size():
            raise ValueError(f"{self.url} has {self._tp_size} TP ranks, got {len(serialized)}")
        await self._checked(
            "/update_weights_from_tensor",
            {
                "serialized_named_tensors": [base64.b64encode(s).decode() for s in serialized],
                "load_format": load_format,
                "weight_version": weight_version,
            },
        )

    async def release_memory_occupation(self, tags: Sequence[str]) -> None:
        """Free the GPU memory of `tags` (`kv_cache`, `weights`); the server must be idle and
        started with `--enable-memory-saver` to free anything (else the call only flushes)."""
        await self._post("/release_memory_occupation", {"tags": list(tags)})

    async def resume_memory_occupation(self, tags: Sequence[str]) -> None:
        """Take back the memory of released `tags` (released weights hold no values until the
        next weight update)."""
        await self._post("/resume_memory_occupation", {"tags": list(tags)})

    async def _checked(self, path: str, payload: dict[str, Any]) -> None:
        body = await self._post(path, payload)
        if isinstance(body, dict) and body.get("success") is False:
            raise ServerRequestError(f"{self.url}{path}: {body.get('message')}")


def _decode(text: str) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
