"""The README's quick start and its demo-model examples, run as the README writes them.

The quick start (the bash blocks of "## Two commands") runs as one bash script, command by
command as written, `make test` aside (it is this suite), in a shell whose PATH has no
`instructflow`: a README that forgets `source .venv/bin/activate` fails here with `command not
found`, as it did for a new user. Two things differ from a fresh clone: INSTRUCTFLOW_HOME
points at a temporary `.instructflow` (the default workspace, `./.instructflow`, would land in
the checkout), and the session's per-user cache and Prefect server are used (the base is
pre-trained once per session; the README's demo timing assumes it cached too). Nothing is made
cheaper: `make demo` trains the real demo (~3 min on 2 idle cores), and the examples below
reuse its model rather than train another.

Every README example that shows an answer of the demo model (`generate`, `serve`'s curl, the
MLflow pyfunc, the base vs fine-tuned table) is then checked against the model that `make
demo` trained, with the answer the README shows; and each generate/serve/pyfunc example must
ask a held-out fact (no train or validation row mentions it) and show its true answer.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from instructflow.builtin import world

ROOT = Path(__file__).resolve().parents[1]
# The README is the quick start; the depth it links lives in docs/*.md. Examples are checked
# wherever they moved: the README and its docs, read as one text.
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = "\n".join(path.read_text() for path in DOCS)
# How the README shows a command's output: the line after it in the same block.
SHOWN = "# → "
MARK = "@@readme-command@@"
UI_PORT = 5000  # `instructflow ui`'s default, as the README runs it

# `make demo` takes ~3 min on 2 idle cores; a shared, loaded machine has taken 8x that.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def section(heading: str) -> str:
    """The README's (or a doc's) text under `heading` (a whole line) up to the next heading of
    its level or above; a `#` line inside a code block is no heading."""
    level = len(heading.split(" ")[0])
    lines = README.splitlines()
    start = lines.index(heading)
    fenced = False
    for end in range(start + 1, len(lines)):
        fenced ^= lines[end].strip().startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", lines[end]):
            break
    else:
        end = len(lines)
    return "\n".join(lines[start + 1 : end])


def code_blocks(text: str, lang: str) -> list[str]:
    """The fenced blocks of `lang` in `text`, de-indented (a block may sit in a list item)."""
    blocks, current, indent = [], None, ""
    for line in text.splitlines():
        if current is None:
            if line.strip() == f"```{lang}":
                current, indent = [], line[: len(line) - len(line.lstrip())]
        elif line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        else:
            current.append(line.removeprefix(indent))
    return blocks


def commands(block: str) -> list[tuple[str, str | None]]:
    """(command as written, its shown output or None) for each command of a shell block; a
    command continues over lines ending in a backslash."""
    out: list[list] = []
    pending = ""
    for line in block.splitlines():
        if pending:
            pending += "\n" + line
        elif line.startswith(SHOWN) and out:
            out[-1][1] = line.removeprefix(SHOWN)
            continue
        elif not line.strip() or line.lstrip().startswith("#"):
            continue
        else:
            pending = line
        if not pending.endswith("\\"):
            out.append([pending, None])
            pending = ""
    return [(c, shown) for c, shown in out]


def fact(instruction: str, input_: str = "") -> tuple[str, str]:
    """(subject, true answer) of a prompt in one of the demo's phrasings (world.ASKS)."""
    for relation, facts in world.FACTS.items():
        pairs = [*facts, *((b, a) for a, b in facts)] if relation == "opposite" else facts
        for subject, answer in pairs:
            for ask in world.ASKS[relation]:
                if (ask.instruction.format(a=subject), ask.input.format(a=subject)) == (
                    instruction,
                    input_,
                ):
                    return subject, answer
    raise AssertionError(f"not a question the demo data asks: {instruction!r} {input_!r}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def activated(command: str) -> list[str]:
    """A README command after the README's activation step, from the checkout."""
    return ["bash", "-c", f"source .venv/bin/activate && exec {command}"]


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_processes_of(home: Path) -> list[str]:
    """SIGKILLs every process whose environment names this INSTRUCTFLOW_HOME; their commands."""
    marker = f"INSTRUCTFLOW_HOME={home}".encode()
    killed = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if marker not in (proc_dir / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            os.kill(int(proc_dir.name), signal.SIGKILL)
            killed.append(cmdline)
        except (OSError, ValueError):
            continue  # gone, or not ours to read
    return killed


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """Runs the quick start; yields what each command printed and the trained workspace."""
    if (
        not (ROOT / ".venv" / "bin" / "instructflow").exists()
        or subprocess.run(["make", "-q", "install"], cwd=ROOT, capture_output=True).returncode
    ):
        pytest.skip(
            ".venv is missing or older than pyproject.toml/constraints.txt: `make demo`"
            " would (re)install it; run `make install` first (`make test` does)"
        )
    cmds = [c for block in code_blocks(section("## Two commands"), "bash") for c in commands(block)]
    assert ("make demo", None) in [(c.split("#")[0].strip(), s) for c, s in cmds], cmds
    cmds = [(c, s) for c, s in cmds if c.split("#")[0].strip() != "make test"]
    ui = [i for i, (c, _) in enumerate(cmds) if c.startswith("instructflow ui")]
    # `instructflow ui` serves until Ctrl-C: it can only be the last command.
    assert ui in ([], [len(cmds) - 1]), cmds
    ui_skipped = None
    if ui and port_open(UI_PORT):
        ui_skipped = f"port {UI_PORT} is taken by another process: `instructflow ui` needs it"
        cmds = cmds[:-1]

    tmp = tmp_path_factory.mktemp("readme")
    home = tmp / ".instructflow"
    path = os.pathsep.join(
        p
        for p in os.environ["PATH"].split(os.pathsep)
        if p and not Path(p, "instructflow").exists()
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    env.update(PATH=path, INSTRUCTFLOW_HOME=str(home))
    script = "set -e\n" + "".join(f"echo '{MARK}{i}'\n{c}\n" for i, (c, _) in enumerate(cmds))
    (tmp / "quickstart.sh").write_text(script)
    out, err = tmp / "stdout", tmp / "stderr"
    started = time.monotonic()
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            ["bash", str(tmp / "quickstart.sh")],
            cwd=ROOT,
            env=env,
            stdout=o,
            stderr=e,
            start_new_session=True,
            # A terminal's Ctrl-C: a test session started in the background (`cmd &`) ignores
            # SIGINT, its children would inherit that, and `instructflow ui` would not stop.
            preexec_fn=_sigint_as_in_a_terminal,
        )
    ui_seen = None
    try:
        while proc.poll() is None:
            time.sleep(1)
            if ui and not ui_skipped and f"{MARK}{ui[0]}" in out.read_text():
                ui_seen = ui_seen or ui_view(proc)
                if ui_seen:
                    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
                    proc.wait(timeout=60)
            assert time.monotonic() - started < 3000, out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # The MLflow UI's job consumers start their own sessions: a killed quick start would
        # leave them holding UI_PORT for the rest of the suite.
        stray = kill_processes_of(home)
    text = out.read_text()
    printed = {
        int(i): o for i, o in re.findall(rf"^{MARK}(\d+)\n(.*?)(?=^{MARK}|\Z)", text, re.M | re.S)
    }
    yield {
        "rc": proc.returncode,
        "commands": cmds,
        "printed": printed,
        "log": text[-3000:] + err.read_text()[-3000:],
        "home": home,
        "path": path,
        "ui": ui_seen,
        "ui_skipped": ui_skipped,
        "ui_port_after": port_open(UI_PORT) if ui_seen else None,
        "stray": stray,
        "seconds": time.monotonic() - started,
    }


def ui_view(proc: subprocess.Popen) -> dict | None:
    """What the MLflow UI on UI_PORT shows of the demo's experiment, once it answers."""
    for _ in range(120):
        if proc.poll() is not None:
            return None
        try:
            base = f"http://127.0.0.1:{UI_PORT}"
            page = httpx.get(base, timeout=5)
            exp = httpx.get(
                f"{base}/api/2.0/mlflow/experiments/get-by-name",
                params={"experiment_name": "instructflow-demo"},
                timeout=5,
            ).json()["experiment"]
            runs = httpx.post(
                f"{base}/api/2.0/mlflow/runs/search",
                json={"experiment_ids": [exp["experiment_id"]]},
                timeout=5,
            ).json()["runs"]
            return {"page": page.status_code, "runs": [r["info"]["status"] for r in runs]}
        except (httpx.HTTPError, KeyError, ValueError):
            time.sleep(1)
    return None


def only(home: Path, pattern: str) -> Path:
    """The one path under the workspace matching `pattern` (the run made one of each)."""
    found = list(home.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def trained(quickstart) -> Path:
    """The workspace `make demo` left, or a failure naming why there is none."""
    home = quickstart["home"]
    if not list(home.glob("artifacts/register/*/decision.json")):
        pytest.fail(f"the quick start's `make demo` registered no model:\n{quickstart['log']}")
    return home


def assert_held_out(home: Path, instruction: str, input_: str, shown: str) -> None:
    """The example asks a demo fact, shows its true answer, and no train or validation row of
    the run's split mentions its subject or answer."""
    subject, answer = fact(instruction, input_)
    assert shown == answer, (instruction, input_, shown, answer)
    split = only(home, "artifacts/split/*")
    for part in ("train", "validation"):
        for line in (split / f"{part}.jsonl").read_text().splitlines():
            row = json.loads(line)
            said = " ".join((row["instruction"], row["input"], row["output"]))
            for word in (subject, answer):
                assert not re.search(rf"\b{re.escape(word)}\b", said, re.I), (word, part, row)


def test_quickstart_runs_as_written_without_instructflow_on_path(quickstart):
    import shutil

    # The state the issue reported: after `make demo`, `instructflow` is not a command.
    assert shutil.which("instructflow", path=quickstart["path"]) is None
    assert quickstart["rc"] == 0, quickstart["log"]
    cmds, printed = quickstart["commands"], quickstart["printed"]
    assert sorted(printed) == list(range(len(cmds))), quickstart["log"]
    shown = [(i, c, s) for i, (c, s) in enumerate(cmds) if s is not None]
    assert shown, "the quick start shows no answer of the demo model"
    for i, command, answer in shown:
        assert printed[i].strip().splitlines()[-1] == answer, (command, printed[i][-500:])
        prompt = shlex.split(command)[-1]
        assert_held_out(quickstart["home"], prompt, "", answer)


def test_quickstart_ui_shows_the_demo_run_and_stops_on_ctrl_c(quickstart):
    if quickstart["ui_skipped"]:
        pytest.skip(quickstart["ui_skipped"])
    if not any(c.startswith("instructflow ui") for c, _ in quickstart["commands"]):
        pytest.skip("the quick start no longer opens the UI")
    ui = quickstart["ui"]
    assert ui is not None, quickstart["log"]
    assert ui["page"] == 200 and ui["runs"] == ["FINISHED"], ui
    assert quickstart["ui_port_after"] is False  # the MLflow UI stopped with it
    assert not [c for c in quickstart["stray"] if "mlflow" in c], quickstart["stray"]
    printed = quickstart["printed"][len(quickstart["commands"]) - 1]
    assert "Prefect UI: http" in printed
    # It links the experiment's runs in the "Model training" view with the stored columns.
    link = re.search(r"^  instructflow-demo: (\S+)$", printed, re.M)
    assert link and link.group(1).endswith(
        "/runs?workflowType=machine_learning&viewStateShareKey=instructflow-runs"
    ), printed


GENERATE = re.compile(
    r'instructflow generate --model (models:/instructflow-demo@\w+) "([^"]+)"`?'
    r"\s*(?:#\s*)?→ (?:`([^`]+)`|(\S+))"
)


def test_generate_examples_answer_as_shown(quickstart):
    home = trained(quickstart)
    # The quick start's own example is run (and checked) by the quick start itself.
    rest = README.replace(section("## Two commands"), "")
    examples = GENERATE.findall(rest)
    # Each demo-model generate example shows its answer, in a form this test reads.
    assert len(examples) == rest.count("instructflow generate --model models:/instructflow-demo")
    assert examples
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home)}
    for model, prompt, quoted, bare in examples:
        answer = quoted or bare
        command = f"instructflow generate --model {model} {shlex.quote(prompt)}"
        proc = subprocess.run(
            activated(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == answer, (prompt, proc.stdout)
        assert_held_out(home, prompt, "", answer)


def test_serve_example_answers_as_shown(quickstart):
    home = trained(quickstart)
    [block] = code_blocks(section("### Try a trained model: `instructflow serve`"), "bash")
    (serve, _), (curl, shown) = commands(block)
    assert serve.startswith("instructflow serve --model models:/instructflow-demo@")
    body = json.loads(re.search(r"-d '(\{.*\})'", curl).group(1))
    path = re.search(r"127\.0\.0\.1:8000(/\S+)", curl).group(1)
    expected = json.loads(re.search(r'"choices":(\[.*?\}\])', shown).group(1))
    # A free port, not the README's 8000: the only change, so a test never takes a real one.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home)}
    command = f"{serve.split('#')[0].strip()} --port {port}"
    proc = subprocess.Popen(
        activated(command),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(180):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        reply = httpx.post(f"http://127.0.0.1:{port}{path}", json=body, timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"] == expected, reply.text
    [message] = body["messages"]
    assert_held_out(home, message["content"], "", expected[0]["message"]["content"])


def test_pyfunc_example_prints_what_readme_shows(quickstart):
    home = trained(quickstart)
    [block] = [
        b
        for b in code_blocks(
            section("## Operating it: schedule → nightly run → gate → champion → serve"), "python"
        )
        if "mlflow.pyfunc.load_model" in b
    ]
    shown = block.splitlines()[-1].removeprefix(SHOWN)
    # Run where `make demo` left its workspace, `.instructflow`, as the README says.
    proc = subprocess.run(
        [sys.executable, "-c", block],
        cwd=home.parent,
        env={
            k: v
            for k, v in os.environ.items()
            if k not in ("MLFLOW_TRACKING_URI", "INSTRUCTFLOW_HOME")
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == shown, proc.stdout
    [row] = ast.literal_eval(re.search(r"\.predict\((\[.*\])\)", block).group(1))
    [answer] = ast.literal_eval(shown)
    assert_held_out(home, row["instruction"], row.get("input", ""), answer)


def test_demo_answer_table_is_the_runs(quickstart):
    """The base vs fine-tuned answers in "What the demo shows" are the run's evaluate/examples."""
    home = trained(quickstart)
    text = section("## What the demo shows: instruction tuning that works")
    rows = re.findall(r"^\| (.+?) \| `(.*?)` \| `(.*?)` \|$", text, re.M)
    assert len(rows) >= 3, rows
    sentence = re.search(r'asked "(.+?)" in the Alpaca format, it continues\s+with "(.+?)"', text)
    examples = json.loads(only(home, "artifacts/evaluate/*/examples.json").read_text())
    got = {
        (i, x): (b, t)
        for i, x, b, t in zip(
            examples["instruction"],
            examples["input"],
            examples["base_output"],
            examples["finetuned_output"],
            strict=True,
        )
    }
    for prompt, base, tuned in rows:
        instruction, input_ = re.fullmatch(r"(.+?)(?: \((.+)\))?", prompt).groups()
        assert got[instruction, input_ or ""] == (base, tuned), prompt
    assert got[sentence.group(1), ""][0] == sentence.group(2)


def test_make_demo_tunes_a_model_that_beats_the_base_and_mlflow_shows_it(quickstart):
    """`make demo`, as the quick start runs it: instruction tuning visibly works (the suite
    trains the demo once, here). The guard against a regression to "the model learned to
    stop" (the random base of old): on held-out test rows the QLoRA-tuned model's
    case-sensitive exact match beats the base's by at least 0.50, the base stays at or below
    0.10, and every task improves."""
    from mlflow.tracking import MlflowClient

    home = trained(quickstart)
    [demo] = [i for i, (c, _) in enumerate(quickstart["commands"]) if c.startswith("make demo")]
    out = quickstart["printed"][demo]
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("instructflow-demo")
    [run] = client.search_runs([exp.experiment_id])
    m = run.data.metrics
    tuned, base = m["evaluate/exact_match"], m["evaluate/base/exact_match"]
    assert base <= 0.10 and tuned - base >= 0.50, (base, tuned)
    for task in world.FACTS:
        assert m[f"evaluate/em/{task}"] > m[f"evaluate/base/em/{task}"], task
    assert m["evaluate/perplexity"] < m["evaluate/base/perplexity"]
    assert run.data.params["train.method.name"] == "qlora"

    # The console shows base vs tuned, per task, and answers side by side.
    assert "evaluation on" in out and "exact match per meta.task" in out
    assert all(task in out for task in world.FACTS)
    assert "test prompts, answered by both models" in out
    assert "Successfully registered" not in out  # no third-party chatter
    # The demo's judge (the same tiny model) fails calibration: flagged, and the gate says so.
    assert m["evaluate/judge_trusted"] == 0.0 and "NOT EVIDENCE" in out
    assert "untrusted: calibration accuracy" in out
    reasons = run.data.tags["instructflow.gate.reasons"]
    assert "judge untrusted" in reasons and "rule skipped" in reasons
    # The console's last line links the run's page in the "Model training" view.
    link = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    assert f"{link}?workflowType=machine_learning" in out

    # MLflow has the per-task figures, the tables and base vs fine-tuned in one place: a
    # chart (an image logged with a key) and a table in the run's description, 0.00 shown.
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/examples.json", "evaluate/groups.json"} <= logged
    assert {"evaluate/judge_calibration.json", "evaluate/base_vs_tuned.png"} <= logged
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(p.startswith("images/evaluate~base_vs_tuned+step+0") for p in images), images
    note = run.data.tags["mlflow.note.content"]
    assert "**Base vs fine-tuned**" in note
    assert (
        f"| exact_match | 0.0 | {tuned:.4g} |" in note
        or f"| exact_match | 0 | {tuned:.4g} |" in note
    )
    assert "judge_score (untrusted judge)" in note
