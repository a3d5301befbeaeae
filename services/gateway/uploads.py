"""Multipart uploads (voice clips, LoRA adapters): the form's small fields in memory, its one file
streamed to a temporary file on the store's own disk, chunk by chunk, within a cap.

A body's size is bounded before it gets here: the body size middleware refuses it past the route's cap
(`BodyCap`, and then reports the client gone, which ends the parse). Here python-multipart's push parser
takes the body as it arrives; each chunk's file bytes are written to the file before the next chunk is
read, so memory holds one chunk whatever the file's size. The fields, their number and size, each part's
headers and the file count are bounded too, and so is the time the body takes: a client that sends
nothing for `stall_s`, or has not sent it all within `timeout_s`, is answered 408 (a trickled body must
not hold an upload slot, a socket and a scratch file forever). The file stays in the store's `scratch()`
folder while the caller checks it, and is removed when `receive_form`'s block is left, however it is
left (a client gone mid-body, a refusal, an error), unless the caller moved it into place
(`Storage.put_file`)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from shared.errors import ChorusError, InvalidRequest, RequestTimeout

FORM_OVERHEAD = 64 * 1024  # a route's body cap past its file's: boundaries, part headers, the small fields
MAX_FIELDS = 8
MAX_FIELD_BYTES = 4096
MAX_PART_HEADER_BYTES = 8192


@dataclass
class Upload:
    """A received form: its text fields, and its file (`path`, `size` bytes) in the scratch folder."""

    path: Path
    fields: dict[str, str] = field(default_factory=dict)
    size: int = 0
    has_file: bool = False

    def text(self, name: str) -> str | None:
        """A field's value stripped; None when absent or blank."""
        return self.fields.get(name, "").strip() or None


@dataclass(frozen=True)
class UploadRules:
    """How one route's form is read: its file's cap, and how each refusal reads."""

    max_bytes: int
    not_multipart: Callable[[], ChorusError]
    too_large: Callable[[int], ChorusError]  # given the size read so far
    missing: str  # what to attach, when the form has no file
    timeout_s: float  # the whole body's time
    stall_s: float  # the longest wait for the body's next bytes


@asynccontextmanager
async def receive_form(request: Request, scratch: Path, rules: UploadRules) -> AsyncIterator[Upload]:
    """The request's multipart form, its file written under `scratch` (removed on leaving the block)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise rules.not_multipart()
    fd, name = tempfile.mkstemp(dir=scratch, prefix=".upload-", suffix=".part")
    upload = Upload(Path(name))
    try:
        with os.fdopen(fd, "wb") as sink:
            await _FormReader(request, upload, rules).read_into(sink)
        if not upload.has_file:
            raise InvalidRequest(f"the `file` field is missing: {rules.missing}")
        yield upload
    finally:
        upload.path.unlink(missing_ok=True)


class _FormReader:
    """python-multipart's callbacks: fields kept (bounded), the file part's bytes queued for the sink."""

    def __init__(self, request: Request, upload: Upload, rules: UploadRules) -> None:
        self.request, self.upload, self.rules = request, upload, rules
        self._field: str | None = None  # the text part being read (None: the file part)
        self._value = bytearray()
        self._header_size, self._disposition = 0, b""  # the part's headers: their bytes so far, the one kept
        self._header_field, self._header_value = b"", b""  # the header being read: its name and its value
        self._pending: list[bytes] = []  # the file's bytes from the current chunk
        self._complete = False  # the closing boundary was read
        self._deadline: float | None = None  # the loop time by which the whole body must have arrived

    async def read_into(self, sink: BinaryIO) -> None:
        boundary = parse_options_header(self.request.headers["content-type"])[1].get(b"boundary")
        if not boundary:
            raise InvalidRequest("invalid multipart body: no boundary in its content type")
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begins,
                "on_header_field": self._header_name_read,
                "on_header_value": self._header_value_read,
                "on_header_end": self._header_ends,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_ends,
                "on_end": self._form_ends,
            },
        )
        chunks = self.request.stream()
        try:
            while (chunk := await self._next(chunks)) is not None:
                parser.write(chunk)
                await self._flush(sink)
            parser.finalize()
            await self._flush(sink)
            if not self._complete:  # python-multipart's finalize() accepts a body cut short silently
                raise InvalidRequest("invalid multipart body: it ends before its closing boundary")
        except FormParserError as exc:
            raise InvalidRequest(f"invalid multipart body: {exc}") from None
        except ClientDisconnect:
            raise InvalidRequest("the client left before the whole body arrived") from None
        finally:
            await chunks.aclose()

    async def _next(self, chunks: AsyncGenerator[bytes, None]) -> bytes | None:
        """The body's next bytes (None at its end), within the stall and whole-body bounds."""
        loop = asyncio.get_running_loop()
        if self._deadline is None:
            self._deadline = loop.time() + self.rules.timeout_s
        left = self._deadline - loop.time()
        try:
            async with asyncio.timeout(min(left, self.rules.stall_s)):
                return await anext(chunks)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise self._too_slow(whole_body=left <= self.rules.stall_s) from None

    def _too_slow(self, *, whole_body: bool) -> RequestTimeout:
        """408: the whole body's bound ran out (`too_slow`), or the body sent nothing for the stall bound."""
        if whole_body:
            what, reason, limit = (
                f"did not arrive within {self.rules.timeout_s:g} s",
                "too_slow",
                self.rules.timeout_s,
            )
        else:
            what, reason, limit = f"sent nothing for {self.rules.stall_s:g} s", "stalled", self.rules.stall_s
        return RequestTimeout(f"the upload's body {what}", reason=reason, limit=limit, unit="s")

    async def _flush(self, sink: BinaryIO) -> None:
        if not self._pending:
            return
        data, self._pending = b"".join(self._pending), []
        self.upload.size += len(data)
        if self.upload.size > self.rules.max_bytes:
            raise self.rules.too_large(self.upload.size)
        await asyncio.to_thread(sink.write, data)

    def _part_begins(self) -> None:
        self._field, self._value = None, bytearray()
        self._header_size, self._disposition = 0, b""

    def _header_name_read(self, data: bytes, start: int, end: int) -> None:
        self._header_field += self._counted(data[start:end])

    def _header_value_read(self, data: bytes, start: int, end: int) -> None:
        self._header_value += self._counted(data[start:end])

    def _counted(self, piece: bytes) -> bytes:
        """A piece of the part's headers, within their bound."""
        self._header_size += len(piece)
        if self._header_size > MAX_PART_HEADER_BYTES:
            raise InvalidRequest("invalid multipart body: a part's headers are too long")
        return piece

    def _header_ends(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        options = parse_options_header(self._disposition)[1]
        if b"name" not in options:
            raise InvalidRequest("invalid multipart body: a part has no name in its Content-Disposition")
        if b"filename" not in options:
            self._field = options[b"name"].decode("utf-8", "replace")
            if len(self.upload.fields) >= MAX_FIELDS:
                raise InvalidRequest(f"invalid multipart body: more than {MAX_FIELDS} fields")
        elif self.upload.has_file or options[b"name"] != b"file":
            raise InvalidRequest("invalid multipart body: one file is accepted, in the `file` field")
        else:
            self.upload.has_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field is None:
            self._pending.append(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise InvalidRequest(
                f"invalid multipart body: field `{self._field}` is over {MAX_FIELD_BYTES} bytes"
            )

    def _part_ends(self) -> None:
        if self._field is not None:
            self.upload.fields[self._field] = self._value.decode("utf-8", "replace")

    def _form_ends(self) -> None:
        self._complete = True
