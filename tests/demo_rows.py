"""The demo dataset as canonical rows (what validate writes), for stage tests that start later."""

from __future__ import annotations

from instructflow import demo_data


def canonical_demo_rows(n: int, seed: int = 0) -> list[dict]:
    rows = []
    for i, r in enumerate(demo_data.generate(n, seed)):
        user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        rows.append(
            {
                "id": f"demo.jsonl:{i}",
                "file": "demo.jsonl",
                "row": i,
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": r["output"]},
                ],
                "instruction": r["instruction"],
                "input": r["input"],
                "output": r["output"],
                "group": f"g{i}",
                "augmented_from": None,
                "meta": {"task": r["task"], "subject": r["subject"]},
            }
        )
    return rows


def demo_config_splits() -> dict[str, list[dict]]:
    """The demo config's train / validation / test rows, made by the real data stages'
    functions (download -> validate -> augment -> split) in the current workspace."""
    from instructflow.config import load_config
    from tasks.augment import augment
    from tasks.download import download
    from tasks.split import SPLITS, read_split, split
    from tasks.validate import validate

    cfg = load_config("configs/demo.yaml")
    splits = split(augment(validate(download(cfg.data), cfg.validate_), cfg.augment), cfg.split)
    return {name: read_split(splits, name) for name in SPLITS}
