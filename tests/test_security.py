"""Security defaults: no remote code, safe deserialisation, http(s)-only sources, loopback."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from instructflow.config import PipelineConfig
from tasks.download import DownloadError, source_kind

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("instructflow", "tasks", "flows", "bench")


def _calls(name: str):
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                    yield path, node


def test_defaults_trust_no_remote_code():
    cfg = PipelineConfig()
    assert cfg.model.trust_remote_code is False


def unsafe_torch_loads(paths) -> list[str]:
    """`path:line` of every torch.load call (also `from torch import load [as x]`) without
    `weights_only=True`."""
    found = []
    for path in paths:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        aliases = {"torch.load"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                aliases |= {a.asname or a.name for a in node.names if a.name == "load"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in aliases:
                kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if kwargs.get("weights_only") != "True":
                    found.append(f"{path}:{node.lineno}")
    return found


def test_every_torch_load_is_weights_only(tmp_path):
    code = [p for folder in CODE_DIRS for p in (ROOT / folder).rglob("*.py")]
    assert unsafe_torch_loads(code) == []
    # The check finds what it must: plain, aliased and explicit-False calls; not a safe one.
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import torch\nfrom torch import load as tl\n"
        "a = torch.load('x.pt')\nb = tl('y.pt')\n"
        "c = torch.load('z.pt', weights_only=False)\nd = torch.load('w.pt', weights_only=True)\n"
    )
    assert unsafe_torch_loads([planted]) == [f"{planted}:{n}" for n in (3, 4, 5)]


def test_no_code_passes_trust_remote_code_true_literally():
    for path, node in _calls("from_pretrained"):
        for k in node.keywords:
            assert not (k.arg == "trust_remote_code" and ast.unparse(k.value) == "True"), (
                f"{path}:{node.lineno}"
            )


@pytest.mark.parametrize(
    "source", ["file:///etc/passwd", "ftp://example.org/d.json", "s3://bucket/d.json"]
)
def test_only_http_urls_are_fetched(source):
    with pytest.raises(DownloadError, match="only http"):
        source_kind(source)


def test_servers_bind_to_loopback_by_default():
    import argparse

    from instructflow.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for command in ("serve", "ui"):
        args, _ = parser.parse_known_args(
            [command, "--model", "builtin:tiny"] if command == "serve" else [command]
        )
        assert args.host == "127.0.0.1", command
    server_script = (ROOT / "mlflow" / "server.sh").read_text()
    assert "127.0.0.1" in server_script
