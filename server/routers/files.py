"""OpenAI's Files API for media handles: POST /v1/files (upload once), GET /v1/files,
GET /v1/files/{file_id}, DELETE /v1/files/{file_id}. A handle is then used as a chat content
part {"type": "file", "file": {"file_id"}} or as /chat's `file_id` form field."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from xllm.server.deps import FilesDep, OwnerDep, ServiceDep
from xllm.server.protocol import FileDeleted, FileList, FileObject
from xllm.server.routers.responses import MEDIA_ERRORS, error_responses

router = APIRouter(prefix="/v1", tags=["files"])

NOT_FOUND = error_responses(401, 404)


@router.post(
    "/files",
    response_model=FileObject,
    responses=MEDIA_ERRORS,
    summary="Upload an image, audio or video once; refer to it by id",
)
async def create_file(
    service: ServiceDep,
    owner: OwnerDep,
    file: Annotated[UploadFile, File(description="the media file (its kind is sniffed)")],
    purpose: Annotated[str, Form(description="OpenAI's purpose, e.g. 'vision' (kept as given)")],
) -> FileObject:
    data = await file.read()
    stored = await service.create_file(owner, file.filename or "upload", purpose, data)
    return FileObject.of(stored)


@router.get("/files", response_model=FileList, responses=error_responses(401))
async def list_files(files: FilesDep, owner: OwnerDep) -> FileList:
    return FileList(data=[FileObject.of(f) for f in files.list(owner)])


@router.get("/files/{file_id}", response_model=FileObject, responses=NOT_FOUND)
async def retrieve_file(file_id: str, files: FilesDep, owner: OwnerDep) -> FileObject:
    return FileObject.of(files.get(owner, file_id))


@router.delete("/files/{file_id}", response_model=FileDeleted, responses=NOT_FOUND)
async def delete_file(file_id: str, files: FilesDep, owner: OwnerDep) -> FileDeleted:
    return FileDeleted(id=files.delete(owner, file_id).id)
