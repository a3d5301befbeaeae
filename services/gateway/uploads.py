"""Multipart uploads (voice clips, LoRA adapters): the form parsed within bounds, and its one file read
within a cap.

A body's size is bounded before it gets here: the body size middleware refuses it past the route's cap
(`BodyCap`, and then reports the client gone, which ends the parse). Starlette's parser streams the body
through python-multipart's: it bounds the files, the fields and each field's size, and spools the file
part (to disk past 1 MiB) instead of holding the raw body."""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from shared.errors import ChorusError, InvalidRequest


async def read_form(request: Request, not_multipart: Callable[[], ChorusError]) -> FormData:
    """The request's multipart form; `not_multipart()` is raised for any other content type."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise not_multipart()
    parser = MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=8, max_part_size=4096)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"invalid multipart body: {exc.message}") from None
    except ClientDisconnect:
        raise InvalidRequest("the client left before the whole body arrived") from None


async def file_bytes(
    form: FormData, max_bytes: int, *, missing: str, too_large: Callable[[int], ChorusError]
) -> bytes:
    """The form's `file`, at most `max_bytes` read (`too_large(size read)` past them); `missing` says
    what to attach when there is none."""
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest(f"the `file` field is missing: {missing}")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(len(data))
    return data
