"""One request's run on the engine, from admission to its last byte: submit its sequences, hand their updates to the
route (an asyncio queue fed from the engine thread), and end them early when the client goes away.

A request holds one admission (``ServerState.admit``) until :meth:`Generation.close`, which also cancels its
unfinished sequences (the scheduler frees their rows at its next step). A streamed response closes it when the
stream ends or the client disconnects; a non-streamed one waits with :meth:`Generation.wait`, which watches the
connection, so an abandoned request stops generating and gives its slot back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from dscoder.engine import SamplingParams, Sequence
from dscoder.errors import DscoderError
from dscoder.serve.errors import APIError
from dscoder.serve.state import ServerState


class ClientGone(APIError):
    """The client closed the connection before its answer was ready (nginx's 499; nobody reads it)."""

    def __init__(self):
        super().__init__(499, "the client closed the connection", code="client_closed_request")


class Generation:
    """Take an admission (429 when full) and submit one sequence per prompt. If a submission fails, the sequences
    already submitted are cancelled and the admission is given back."""

    def __init__(self, state: ServerState, prompts: list[list[int]], params: list[SamplingParams]):
        state.admit()
        self.state = state
        self.seqs: list[Sequence] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self._closed = False
        # when the request was submitted, its first token came and its last sequence ended (time.monotonic())
        self.started_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        loop = asyncio.get_running_loop()
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                def on_update(seq, delta, new, done, i=i):  # on the engine thread
                    try:
                        loop.call_soon_threadsafe(self._queue.put_nowait, (i, delta, new, done))
                    except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
                        pass
                self.seqs.append(state.engine.submit(ids, p, on_update=on_update, background=True))
        except BaseException as e:
            self.close()
            if isinstance(e, DscoderError):  # the engine refuses work (closed)
                raise APIError(503, str(e), "server_error") from None
            raise

    async def updates(self) -> AsyncIterator[tuple[int, Sequence, str, list[int], bool]]:
        """``(index, sequence, new_text, new_ids, done)`` as the engine produces them, until every sequence is done."""
        left = len(self.seqs)
        while left:
            i, delta, new, done = await self._queue.get()
            left -= done
            if new and self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if not left:
                self.finished_at = time.monotonic()
            yield i, self.seqs[i], delta, new, done

    async def wait(self, request: Request | None = None, watch=None) -> None:
        """Until every sequence is done, or raise :class:`ClientGone` as soon as ``request``'s client disconnects
        (the caller's ``close`` then cancels the sequences); a failed sequence is a 500. ``watch(i, seq, delta, new,
        done)``, when given, sees every update (a route that ends sequences early by its own rules)."""
        async def finish():
            async for update in self.updates():
                if watch is not None:
                    watch(*update)

        finished = asyncio.ensure_future(finish())
        gone = asyncio.ensure_future(_disconnect(request)) if request is not None else None
        try:
            await asyncio.wait([t for t in (finished, gone) if t is not None], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (finished, gone):
                if t is not None:
                    t.cancel()
        if not finished.done() or finished.cancelled():
            raise ClientGone()
        finished.result()
        for s in self.seqs:
            if s.error is not None:
                raise APIError(500, f"generation failed: {s.error}", "server_error")

    def close(self) -> None:
        """Cancel the unfinished sequences and give the admission back (once)."""
        if self._closed:
            return
        self._closed = True
        for s in self.seqs:
            if not s.finished:
                s.cancelled = True
        self.state.release()

    def stream(self, events: AsyncIterator[str], media_type: str = "text/event-stream") -> StreamingResponse:
        """Server-sent ``events`` (or lines of another ``media_type``, e.g. Ollama's NDJSON); the generation is closed
        when the response ends, however it ends (also when the client leaves before the first event, when the events
        never start)."""
        return _ClosingStream(events, self.close, media_type=media_type,
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage(self, n: int = 1) -> dict:
        prompt = sum(len(s.prompt_ids) for s in self.seqs[::n])  # n samples of one prompt count it once
        completion = sum(len(s.token_ids) for s in self.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _ClosingStream(StreamingResponse):
    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _disconnect(request: Request) -> None:
    """Return when the client disconnects: after the body, the next ASGI message on ``receive`` is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_error(seq: Sequence) -> str:
    return sse({"error": {"message": f"generation failed: {seq.error}", "type": "server_error", "param": None,
                          "code": None}})
