"""README.md's and the docs/ pages' code, run as a newcomer runs it.

Every fenced block is shell (no language, or bash/sh), Python, YAML (a deployment: validated, not run),
or ```text (output, not code). Each shell or Python block either runs here, in order (README.md, then
the pages in mkdocs.yml's navigation) and sharing what earlier blocks made (a checkpoint, a server),
or carries `<!-- illustrative: why -->` on the line before it. Blocks that talk to a server get one
`maverick serve deploy/tiny-cpu.yaml` (what `make serve` runs) on free ports: their 127.0.0.1:8000
and 127.0.0.1:9000 are rewritten to its ports, and every /tmp/ to this module's own folder.

Illustrative or not, every `maverick` command must parse with the CLI as it is now (flags, choices,
presets), every `make` target must exist and every repository file a command names must be there.
A `$ command` followed by output must print that output (a shown line ending in `...` stands for
any line that starts with what precedes it); an executed Python block must print something.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cluster.probe import wait_until
from tests.router.conftest import free_port

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHELL_LANGS = ("", "bash", "sh", "shell")
REPO_PATH = re.compile(r"^(deploy|tests|cluster|router|model|workers)/")
SEPARATORS = {"&&", "||", "|", ";", "&"}


@dataclass
class Block:
    page: str  # README.md, or docs/...
    line: int  # of the opening fence, 1-based
    lang: str
    body: str
    illustrative: str | None  # the reason, when marked

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[str]:
    """README.md, then every page of the site in its navigation's order."""
    def files(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from (files(value) if isinstance(value, list) else [value])

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return ["README.md"] + [f"docs/{name}" for name in files(nav)]


def read_blocks(text: str, page: str = "README.md") -> list[Block]:
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)\s*", lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = re.fullmatch(r"<!-- illustrative: (.*) -->", lines[i - 1].strip()) if i else None
        blocks.append(Block(page, i + 1, fence[1], "\n".join(lines[i + 1:end]), marker[1].strip() if marker else None))
        i = end + 1
    return blocks


BLOCKS = [b for name in pages() for b in read_blocks((ROOT / name).read_text(), name)]
SHELL = [b for b in BLOCKS if b.lang in SHELL_LANGS]
YAML = [b for b in BLOCKS if b.lang == "yaml"]
EXECUTED = [b for b in BLOCKS if b.illustrative is None and b.lang in SHELL_LANGS + ("python",)]


def logical_lines(body: str) -> list[str]:
    """Lines with their `\\` continuations joined."""
    out, pending = [], ""
    for line in body.splitlines():
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def commands(block: Block) -> list[tuple[str, list[str] | None]]:
    """(command, the output the README shows for it or None), in order."""
    lines = logical_lines(block.body)
    if not any(line.startswith("$ ") for line in lines):
        return [(line, None) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    out: list[tuple[str, list[str] | None]] = []
    for line in lines:
        if line.startswith("$ "):
            out.append((line[2:], []))
        else:
            out[-1][1].append(line)
    return out


def simple_commands(command: str) -> list[list[str]]:
    """argv of each command in a pipeline or list, comments dropped."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    result, argv = [], []
    for token in lex:
        if token in SEPARATORS:
            result.append(argv)
            argv = []
        else:
            argv.append(token)
    return [a for a in result + [argv] if a]


def check_argv(argv: list[str], where: str) -> None:
    from router.cli import build_parser

    name = Path(argv[0]).name
    if name == "maverick":
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                build_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{shlex.join(argv)}` no longer parses: {err.getvalue().strip()}")
    if name == "make":
        targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
        for target in (a for a in argv[1:] if not a.startswith("-") and "=" not in a):
            assert target in targets, f"{where}: make has no target {target!r}"
    for arg in argv[1:]:
        if " " in arg:  # a command handed to another, e.g. `ray exec CONFIG 'cd ~/maverick && maverick serve ...'`
            for inner in simple_commands(arg):
                check_argv(inner, where)
        elif REPO_PATH.match(arg):
            assert (ROOT / arg).exists(), f"{where}: `{shlex.join(argv)}` names {arg}, which does not exist"


def test_every_block_runs_or_says_why_not():
    assert {b.page for b in BLOCKS} >= {"README.md", "docs/http-api.md", "docs/grpc.md", "docs/tools.md"}
    for block in BLOCKS:
        assert block.lang in SHELL_LANGS + ("python", "text", "yaml"), f"{block.id}: a ```{block.lang} block"
        if block.illustrative is not None:
            assert block.lang in SHELL_LANGS + ("python",), f"{block.id}: only code is marked illustrative"
            assert len(block.illustrative) > 10, f"{block.id}: say why it is illustrative"
    readme = [b for b in EXECUTED if b.page == "README.md"]
    assert len(readme) >= 2 and len(EXECUTED) >= 20, [b.id for b in EXECUTED]  # NOTES.md gives the count


@pytest.mark.parametrize("block", SHELL, ids=lambda b: b.id)
def test_commands_parse_and_name_what_exists(block):
    for command, _ in commands(block):
        for argv in simple_commands(command):
            check_argv(argv, block.id)


@pytest.mark.parametrize("block", YAML, ids=lambda b: b.id)
def test_yaml_blocks_are_valid_deployments(block):
    from cluster.serve_config import validate_serve_config

    _, apps = validate_serve_config(yaml.safe_load(block.body), block.id)
    assert apps and all(app is not None for app in apps), f"{block.id}: no application of ours"


def test_a_checkpoint_written_is_the_one_served():
    """A block that writes a checkpoint and then serves a YAML serves that checkpoint."""
    for block in SHELL:
        written, served = None, None
        for command, _ in commands(block):
            for argv in simple_commands(command):
                if Path(argv[0]).name == "maverick" and argv[1:2] == ["make-tiny"]:
                    written = argv[2]
                if Path(argv[0]).name == "maverick" and argv[1:2] == ["serve"] and argv[2].endswith(".yaml"):
                    served = yaml.safe_load((ROOT / argv[2]).read_text())["applications"][0]["args"]["model"]
        if written and served:
            assert written == served, f"{block.id}: writes {written} but serves {served}"


# -- running ---------------------------------------------------------------------------------------

@dataclass
class Server:
    proc: subprocess.Popen
    http: int
    grpc: int
    logs: Path

    def out(self) -> str:
        return (self.logs / "stdout").read_text()

    def err(self) -> str:
        return (self.logs / "stderr").read_text()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """What the pages call /tmp/, and the Python blocks' working folder (with a cat.png)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("readme")
    Image.new("RGB", (64, 48), (200, 120, 40)).save(path / "cat.png")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    http, grpc_port = free_port(), free_port()
    logs = tmp_path_factory.mktemp("serve")
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen([str(BIN / "maverick"), "serve", "deploy/tiny-cpu.yaml", "--http-port", str(http),
                                 "--grpc-port", str(grpc_port)], cwd=ROOT, stdout=out, stderr=err,
                                env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                                start_new_session=True)  # its own process group, as a terminal's job
    live = Server(proc, http, grpc_port, logs)
    try:
        def ready() -> bool:
            assert proc.poll() is None, live.err()[-3000:]
            return "maverick: ready" in live.out()

        wait_until(ready, 300, "maverick serve to print that it is ready", poll_s=0.5)
        yield live
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def localize(text: str, home: Path, server: Server | None) -> str:
    text = text.replace("/tmp/", f"{home}/")
    if server is not None:
        text = text.replace("127.0.0.1:8000", f"127.0.0.1:{server.http}")
        text = text.replace("127.0.0.1:9000", f"127.0.0.1:{server.grpc}")
    return text


def matches(shown: list[str], actual: list[str]) -> bool:
    if len(shown) != len(actual):
        return False
    return all(a.rstrip() == s.rstrip() or (s.endswith("...") and a.startswith(s[:-3]))
               for s, a in zip(shown, actual))


def check_output(argv: list[str], stdout: str, where: str) -> None:
    """What the README promises each subcommand prints."""
    if Path(argv[0]).name != "maverick" or len(argv) < 2:
        return
    if argv[1] == "make-tiny":
        assert stdout.strip() == argv[2] and (Path(argv[2]) / "config.json").is_file(), where
    if argv[1] == "generate":  # one JSON object per prompt: {"token_ids": [...], "text": ...}
        results = [json.loads(line) for line in stdout.splitlines()]
        assert len(results) == sum(a in ("--prompt", "--prompt-ids") for a in argv), where
        for r in results:
            assert set(r) == {"token_ids", "text"} and all(isinstance(t, int) for t in r["token_ids"]), where
            assert isinstance(r["text"], str), where
    if argv[1] == "plan":
        assert "fits: yes" in stdout, where


@pytest.mark.parametrize("block", EXECUTED, ids=lambda b: b.id)
def test_block_runs(block, home, request, monkeypatch):
    where = block.id
    needs_server = "127.0.0.1:" in block.body
    server = request.getfixturevalue("server") if needs_server else None
    if block.lang == "python":
        monkeypatch.chdir(home)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(localize(block.body, home, server), where, "exec"), {"__name__": "__readme__"})
        assert printed.getvalue().strip(), f"{where}: copied as it is, it prints nothing"
        return
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}  # `maverick` as in an activated venv
    for command, shown in commands(block):
        command = localize(command, home, server)
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, f"{where}: `{command}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{where}: `{command}`:\n{proc.stderr[-3000:]}"
        if shown is not None:
            assert matches(shown, proc.stdout.rstrip("\n").split("\n")), \
                f"{where}: `{command}` now prints:\n{proc.stdout}"
        for argv in simple_commands(command):
            check_output(argv, proc.stdout, f"{where}: `{command}`")


def test_the_banner_names_the_model_urls_and_key_and_a_wrong_model_lists_them(server):
    import openai

    banner = server.out()
    assert "model: `tiny-maverick`" in banner, banner
    assert f"OpenAI API: http://127.0.0.1:{server.http}/v1" in banner, banner
    assert f"gRPC maverick.v1.Generation: 127.0.0.1:{server.grpc}" in banner, banner
    assert "API key: none required" in banner, banner
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="Served models: `tiny-maverick`"):
        client.completions.create(model="/tmp/tiny", prompt="Hi", max_tokens=2)


def test_ctrl_c_drains_says_stopped_and_shows_no_noise(server):
    """The last test of the module: Ctrl-C (SIGINT to the job's process group), as in a terminal."""
    os.killpg(server.proc.pid, signal.SIGINT)
    assert server.proc.wait(timeout=120) == 0, server.err()[-3000:]
    err = server.err()
    assert err.rstrip("\n").splitlines()[-1] == "maverick: stopped", err[-3000:]
    drained = err[err.index("maverick: draining"):]
    assert "SharedRouterLongPollClient" not in drained, drained  # nothing "Started" while stopping
    assert "Token authentication is enabled" not in err and "Traceback" not in err, err[-3000:]
