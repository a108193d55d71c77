"""Every fenced block of README.md and docs/*.md is accounted for, so the docs cannot drift from the code (#35.1):

- ```bash / ```sh / ```console commands and ```python blocks run, page by page, in order, in a workspace of the
  page's own (configs/, examples/, launch/, slurm/, benchmarks/ as in the repository), as a reader
  typing them would; ```python blocks of a page share one namespace (a doctest session), a block marked
  `<!-- docs-test: file PATH -->` is that file (written, or compared with the repository's) and runs as
  `python PATH` when it is a script;
- ```yaml blocks are dtrain configs and load with dtrain's config loader; ```text blocks are output;
- a block that cannot run here says why on the line before it: `<!-- docs-test: skip (why) -->`.

A block without a language, or a command this file does not know how to run, fails: a new block is run as soon
as it is written, or it says why not. What the test changes in a command, so that it runs here in seconds, is
all in REWRITES below; a page's own fixtures (files its blocks take as given) are in FIXTURES."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import REPO, _env, _run_here, run_ranks

PAGES = ["README.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md")))]
# generated from the README by docs/gen.py (tests/test_docs.py keeps it current): its blocks are the README's
COPIES = {"docs/index.md": "README.md"}
RUN, CONFIG, OUTPUT = {"bash", "sh", "console", "python"}, {"yaml"}, {"text"}
LINKED = ("configs", "examples", "launch", "slurm", "benchmarks")  # the repository's, in every page's workspace
MAX_STEPS = 3
# configs/gpt.yaml's own comment says how to run it on a CPU; and its bytes' vocabulary (not 50304, padded for GPUs)
# on 200 KB of its 4 MB of text (as examples/hf_gpt2.py), or 4 CPU ranks evaluate thousands of windows of 50304 logits
GPT_ON_CPU = [
    *re.search(r"try `([^`]+)`", (REPO / "configs" / "gpt.yaml").read_text().replace("\n# ", " "))[1].split(),
    "model.kwargs.vocab_size=256",
    "data.text_bytes=200000",
]

# Every change the test makes to a command of the docs, and why (`rewrite` applies them).
REWRITES = {
    "train": f"a command that trains (`dtrain train`, a script's default command, under any launcher) gets "
    f"`train.max_steps={MAX_STEPS}`: every key, file and flag it names is used, in seconds",
    "gpt.yaml": f"a command naming configs/gpt.yaml (GPT-2 124M) gets the overrides the file's own comment gives "
    f"for a CPU, with a vocabulary of 256 bytes and 200 KB of text: {' '.join(GPT_ON_CPU)}",
    "bench": "`dtrain bench` and benchmarks/*.sh time the fewest steps: `--steps 2 --reps 1 --warmup 1` "
    "(benchmarks/*.sh: `--steps 2 --reps 1`)",
    "pip": "`pip install` is not run (no network; the venv is the one under test): its torch pin must be the "
    "installed torch and each extra it names one of pyproject.toml's",
    "pytest": "`python -m pytest` is not run (it is the suite this test belongs to): each marker it selects must be "
    "declared in pyproject.toml and each path it names exist",
    "torchrun": "`torchrun` parses its options with torch's own parser; its N ranks are forked from "
    "tests/rank_server.py with the variables torchrun gives its workers (no agent, no new python)",
    "srun": "`srun --ntasks N` runs N ranks forked from tests/rank_server.py with the variables of an srun step",
    "dtrain launch": "`dtrain launch` on one node (no --ft) runs in this process up to torch's agent (its options, the "
    "command's pre-flight check, its launch line and logs directory), and its N workers are forked from "
    "tests/rank_server.py with the variables torchrun gives its workers (no agent, no new python: a real "
    "launch with its workers, signals and restarts is tests/test_launcher.py's and test_hooks_launch.py's)",
    "sbatch": "`sbatch SCRIPT` runs SCRIPT with bash and a job's variables (its #SBATCH nodes x ntasks-per-node), "
    "an `srun` that records its command line, which then runs as `srun` does here",
    "launch/*.sh": "launch/*.sh run with bash and PYTHON= a recorder; the command line they would start runs as "
    "written here, unless the page ran it already (parsed the same by dtrain's own parser), or it "
    "is several nodes' (only parsed: the other nodes are not here; tests/test_launcher.py runs two)",
    "wandb": "a command that turns W&B on runs as a process of its own (forked, run_ranks single), as the tests' "
    "W&B runs do: W&B's service outlives the command",
    "curl": "`curl -s https://host/` (no network here) reads the same file names with `curl -s file://WORKSPACE/`",
    "tensorboard": "`tensorboard --logdir DIR` (a server) is not run: tensorboard must be installed and DIR hold "
    "event files",
}
DTRAIN_CMDS = {
    "train",
    "launch",
    "shard",
    "index",
    "eval",
    "predict",
    "export",
    "plot",
    "augment-preview",
    "config",
    "bench",
    "doctor",
    "completion",
}


# ---- the blocks --------------------------------------------------------------------------------------------
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\s`]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<kind>\S+)\s*(?P<arg>.*?)\s*-->$")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    body: str
    marker: tuple[str, str] | None  # ("skip", "(why)") or ("file", "PATH")

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ```{self.lang}"


def blocks(page: str) -> list[Block]:
    text = (REPO / page).read_text()
    found = []
    for m in FENCE.finditer(text):
        before = [l.strip() for l in text[: m.start()].splitlines() if l.strip()]
        marker = MARKER.match(before[-1]) if before else None
        body = "\n".join(l[len(m["indent"]) :] for l in m["body"].splitlines())
        found.append(
            Block(
                page,
                text[: m.start()].count("\n") + 1,
                m["lang"],
                body,
                (marker["kind"], marker["arg"]) if marker else None,
            )
        )
    return found


def check_accounted(block: Block) -> str:
    """What the test does with the block: 'run', 'config', 'output' or 'skip'; a problem fails the test."""
    if block.marker and block.marker[0] == "skip":
        assert re.fullmatch(r"\(.{8,}\)", block.marker[1]), f"{block}: say why it is skipped: skip (why)"
        return "skip"
    if block.marker:
        assert block.marker[0] == "file" and block.marker[1] and block.lang == "python", (
            f"{block}: unknown marker {block.marker}; use `skip (why)` or, before a python block, `file PATH`"
        )
    assert block.lang, f"{block}: a block needs a language: bash, python, yaml (a dtrain config) or text (output)"
    assert block.lang in RUN | CONFIG | OUTPUT, f"{block}: unknown language {block.lang!r}"
    if block.lang in ("bash", "sh", "console"):
        for words in commands(block):
            plan(words, block)  # a command nobody knows how to run fails here, before anything runs
    return "run" if block.lang in RUN else "config" if block.lang in CONFIG else "output"


def commands(block: Block) -> list[list[str]]:
    """The block's commands as words: `\\` continuations joined, comments dropped, `a && b` as two; a console
    block's commands are its `$ ` lines. Only simple commands: a pipe, redirection, loop or variable fails."""
    lines = block.body.replace("\\\n", " ").splitlines()
    if block.lang == "console":
        lines = [l[2:] for l in lines if l.startswith("$ ")]
    out = []
    for line in lines:
        words = shlex.split(line, comments=True)
        bad = [w for w in words if w in ("|", ";", ">", "<", "for", "do", "done") or w.startswith(("$", ">"))]
        assert not bad, f"{block}: {line!r}: only simple commands run here (found {bad})"
        cmd: list[str] = []
        for w in [*words, "&&"]:
            if w == "&&":
                out += [cmd] if cmd else []
                cmd = []
            else:
                cmd.append(w)
    return out


# ---- how each command runs -----------------------------------------------------------------------------------
@dataclass
class Page:
    """A page's workspace and what its blocks did so far."""

    name: str
    ws: Path
    namespace: dict = field(default_factory=dict)
    ran: list = field(default_factory=list)  # (parsed dtrain command, how it ran), for launch/*.sh's "the same"
    log: list[str] = field(default_factory=list)


@dataclass
class Step:
    what: str  # how it runs, for the failure message and the timings
    run: object  # run(page) -> None, fails the test on a non-zero exit
    slow: bool = False  # a new python (or several), DeepSpeed or W&B: marks its page slow


def plan(words: list[str], block: Block, env: dict | None = None) -> Step:
    """How the command `words` of `block` runs here (REWRITES), checked before anything runs."""
    words, env = list(words), dict(env or {})
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    prog, args = words[0], words[1:]
    if prog == "pip":
        return Step("pip: checked, not run", lambda page: _pip(args, block))
    if prog == "dtrain":
        return _dtrain(args, block, env)
    if prog in ("python", "python3"):
        return _python(args, block, env)
    if prog == "torchrun":
        from torch.distributed.run import get_args_parser

        parsed = get_args_parser().parse_args(args)
        script = None if parsed.module else parsed.training_script
        assert not parsed.module or parsed.training_script == "dtrain", f"{block}: torchrun -m {parsed.training_script}"
        return _ranks(int(parsed.nproc_per_node), list(parsed.training_script_args), script, "torchrun", block, env)
    if prog == "srun":
        n = None
        while args and args[0].startswith("-"):
            opt = args.pop(0)
            if opt in ("--ntasks", "-n"):
                n = int(args.pop(0))
            elif opt.startswith("--ntasks="):
                n = int(opt.split("=", 1)[1])
            else:
                assert opt == "--kill-on-bad-exit=1", f"{block}: srun {opt} is not known here"
        n = n or int(env.get("SLURM_NTASKS", 1))
        assert args[0] in ("python", "python3"), f"{block}: srun runs python here, not {args[0]}"
        rest = args[1:]
        if rest[:2] == ["-m", "dtrain"]:
            return _ranks(n, rest[2:], None, "srun", block, env)
        return _ranks(n, rest[1:], rest[0], "srun", block, env)
    if prog == "sbatch":
        return Step(f"sbatch {args[0]}: bash with a recording srun", lambda page: _sbatch(args, block, env, page))
    if prog == "env":
        unset = []
        while args and args[0] == "-u":
            unset.append(args[1])
            args = args[2:]
        step = plan(args, block, {k: v for k, v in env.items() if k not in unset})
        return step
    if prog.startswith("launch/") and prog.endswith(".sh"):
        return Step(f"{prog}: bash with a recording PYTHON", lambda page: _launch_script(prog, args, block, env, page))
    if prog.startswith("benchmarks/") and prog.endswith(".sh"):
        args = _fewest(args, {"--steps": "2", "--reps": "1"})
        return Step(
            f"{prog} {shlex.join(args)}", lambda page: _process(["bash", prog, *args], page, env, block), slow=True
        )
    if prog == "tensorboard":
        assert args[0] == "--logdir", f"{block}: tensorboard {args}"
        return Step("tensorboard: checked, not run", lambda page: _tensorboard(Path(args[1]), page))
    raise AssertionError(
        f"{block}: {shlex.join(words)}: the docs test does not know how to run `{prog}`: teach "
        f"tests/test_docs_blocks.py (plan) or mark the block <!-- docs-test: skip (why) -->"
    )


def rewrite(args: list[str], command: str) -> list[str]:
    """REWRITES['train'], ['gpt.yaml'], ['bench'] applied to a dtrain command's arguments."""
    args = list(args)
    if any(a.endswith("configs/gpt.yaml") for a in args):
        args += GPT_ON_CPU
    if command == "bench":
        args = _fewest(args, {"--steps": "2", "--reps": "1", "--warmup": "1"})
    if command == "train":
        args.append(f"train.max_steps={MAX_STEPS}")
    return args


def _fewest(args: list[str], values: dict) -> list[str]:
    out, it = [], iter(args)
    for a in it:
        if a in values:
            next(it)
        else:
            out.append(a)
    return out + [w for k, v in values.items() for w in (k, v)]


def _command_of(args: list[str], script: bool) -> str:
    """The dtrain command of `dtrain ARGS` (options such as -q first), or of a script's arguments (train when
    none is named)."""
    first = next((a for a in args if not a.startswith("-")), None)
    if first in DTRAIN_CMDS:
        return first
    assert script, f"dtrain {shlex.join(args)}: no command"
    return "train"


def _dtrain(args: list[str], block: Block, env: dict) -> Step:
    command = _command_of(args, script=False)
    if command == "launch":
        launch = _launch_args(args)
        target = rewrite(launch.target, _command_of(launch.target, script=launch.target[0].endswith(".py")))
        full = args[: len(args) - len(launch.target)] + target
        if launch.ft or launch.nnodes != "1":
            return Step(
                f"dtrain {shlex.join(full)} (a process)",
                lambda page: _process([sys.executable, "-m", "dtrain", *full], page, env, block, parsed=_parsed(full)),
                slow=True,
            )
        return Step(f"dtrain {shlex.join(full)} (workers forked)", lambda page: _launch_here(full, page, env, block))
    args = rewrite(args, command)
    if command == "train" and any(re.match(r"(wandb\.enabled=true|log\.loggers=.*wandb)", a) for a in args):
        return _ranks(1, args, None, "single", block, env, note=" (W&B: a process of its own)", rewritten=True)
    return Step(f"dtrain {shlex.join(args)}", lambda page: _here(args, None, page, env, block, parsed=_parsed(args)))


def _python(args: list[str], block: Block, env: dict) -> Step:
    if args[:2] == ["-m", "dtrain"]:
        return _dtrain(args[2:], block, env)
    if args[:2] == ["-m", "pytest"]:
        return Step("pytest: checked, not run", lambda page: _pytest(args[2:], block))
    if args[0] == "-m":
        return Step(
            f"python -m {shlex.join(args[1:])}", lambda page: _here(args[2:], None, page, env, block, module=args[1])
        )
    script, rest = args[0], args[1:]
    assert script.endswith(".py"), f"{block}: python {shlex.join(args)}"
    command = _command_of(rest, script=True)
    rest = rewrite(rest, command)
    return Step(f"python {script} {shlex.join(rest)}", lambda page: _here(rest, script, page, env, block))


def _ranks(
    n: int,
    args: list[str],
    script: str | None,
    launcher: str,
    block: Block,
    env: dict,
    note: str = "",
    rewritten: bool = False,
) -> Step:
    if not rewritten:
        command = _command_of(args, script=script is not None)
        args = rewrite(args, command)
    what = f"{n} rank(s) ({launcher}) of {'python ' + script if script else 'dtrain'} {shlex.join(args)}{note}"

    def run(page: Page) -> None:
        proc = run_ranks(
            n,
            args,
            page.ws,
            env=_pythonpath(env, page),
            check=False,
            launcher=launcher,
            script=page.ws / script if script else None,
            timeout=600,
            preload=_preload(args, script),
        )
        _check(proc.returncode, proc.stdout, proc.stderr, block, what)

    # DeepSpeed's import (and its CPU op, built once), W&B's service: tens of seconds each
    return Step(what, run, slow=launcher == "single" or "train.engine=deepspeed" in args)


def _preload(args: list[str], script: str | None) -> tuple[str, ...]:
    """transformers, for a script or config that uses it: imported once in tests/rank_server.py, not per rank."""
    files = [f for f in [script, *(b for a, b in zip(args, args[1:]) if a == "--config")] if f]
    return ("transformers",) if any("transformers" in (REPO / f).read_text() for f in files) else ()


# ---- runners -------------------------------------------------------------------------------------------------
def _pythonpath(env: dict, page: Page) -> dict:
    """A relative PYTHONPATH (PYTHONPATH=examples) as the shell would hand it on: relative to the workspace."""
    env = dict(env)
    if "PYTHONPATH" in env:
        env["PYTHONPATH"] = os.pathsep.join(str(page.ws / p) for p in env["PYTHONPATH"].split(os.pathsep))
    return env


def _check(code: int, out: str, err: str, block: Block, what: str) -> None:
    if code != 0:
        pytest.fail(
            f"{block}: `{what}` exited {code}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-6000:]}", pytrace=False
        )


@contextlib.contextmanager
def _own_modules(ws: Path):
    """Modules imported from the workspace (train.py, examples/*, a page's mymodule) are the page's: forgotten
    afterwards, so another page's files of the same name are imported afresh. The dtrain logger's handlers and
    level too (docs/logging.md changes them)."""
    before, logger = set(sys.modules), logging.getLogger("dtrain")
    handlers, level = list(logger.handlers), logger.level
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        roots = (str(ws), str(REPO / "examples"))
        for name in set(sys.modules) - before:
            path = getattr(sys.modules[name], "__file__", None) or ""
            if path and os.path.abspath(path).startswith(roots):
                del sys.modules[name]


def _here(
    args: list[str], script: str | None, page: Page, env: dict, block: Block, module: str | None = None, parsed=None
) -> None:
    """`dtrain ARGS`, `python SCRIPT ARGS` or `python -m MODULE ARGS` in this process (tests/conftest.py's
    runner: the command line's own main, output captured)."""
    what = (
        f"python -m {module} {shlex.join(args)}"
        if module
        else f"python {script} {shlex.join(args)}"
        if script
        else f"dtrain {shlex.join(args)}"
    )
    same = _ran_before(parsed, page)
    if same:
        page.log.append(f"  = {what}: parsed the same as `{same}`, run above")
        return
    with _own_modules(page.ws):
        if module:
            proc = _run_module(module, args, page, env)
        else:
            proc = _run_here(args, page.ws, _pythonpath(env, page), script=page.ws / script if script else None)
    _check(proc.returncode, proc.stdout, proc.stderr, block, what)
    if parsed is not None:
        page.ran.append((parsed, what))


def _run_module(module: str, args: list[str], page: Page, env: dict) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ), list(sys.path), os.getcwd(), list(sys.argv)
    code = 0
    try:
        extra = _pythonpath(env, page)
        sys.path[:0] = [str(page.ws), *extra.pop("PYTHONPATH", "").split(os.pathsep)]
        os.environ.update(extra)
        os.chdir(page.ws)
        sys.argv = [module, *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        sys.path[:], _, sys.argv = saved[1], os.chdir(saved[2]), saved[3]
    return subprocess.CompletedProcess(["python", "-m", module, *args], code, out.getvalue(), err.getvalue())


def _process(cmd: list[str], page: Page, env: dict, block: Block, parsed=None) -> None:
    what = shlex.join(cmd)
    same = _ran_before(parsed, page)
    if same:
        page.log.append(f"  = {what}: parsed the same as `{same}`, run above")
        return
    proc = subprocess.run(
        cmd,
        cwd=page.ws,
        env=_env(_pythonpath(env, page)),
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    _check(proc.returncode, proc.stdout, proc.stderr, block, what)
    if parsed is not None:
        page.ran.append((parsed, what))


def _parsed(args: list[str]):
    """A dtrain command line as dtrain's own parser reads it (what `the same as` compares)."""
    from dtrain.cli import build_parser

    ns = vars(build_parser().parse_args(args))
    return {k: v for k, v in ns.items() if k not in ("func", "parser")}


def _ran_before(parsed, page: Page) -> str | None:
    return next((what for p, what in page.ran if parsed is not None and p == parsed), None)


def _launch_here(args: list[str], page: Page, env: dict, block: Block) -> None:
    """REWRITES['dtrain launch']: dtrain's launcher in this process, its agent's part done by forked ranks."""
    from unittest import mock

    from dtrain import launcher

    def agent(_args, nproc, _min_nodes, _max_nodes, _rdzv_configs, entry, _run_dir, _logs) -> int:
        script, argv = (None, entry[2:]) if entry[:2] == ["-m", "dtrain"] else (entry[0], entry[1:])
        proc = run_ranks(
            nproc,
            argv,
            page.ws,
            env={**_pythonpath(env, page), "DTRAIN_LAUNCH_COMMAND": os.environ["DTRAIN_LAUNCH_COMMAND"]},
            check=False,
            script=page.ws / script if script else None,
            timeout=600,
            preload=_preload(argv, script),
        )
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        return proc.returncode

    with mock.patch.object(launcher, "_run_agent", agent):
        _here(args, None, page, env, block, parsed=_parsed(args))


def _launch_args(args: list[str]):
    from dtrain.cli import build_parser

    ns = build_parser().parse_args(args)
    assert ns.target, f"dtrain {shlex.join(args)}: no command to launch"
    return ns


def _record(page: Page) -> tuple[Path, Path]:
    """A program that writes its arguments (NUL-separated) to a file and exits 0; `python3 -c CODE` (a script
    asking torch for the GPU count) runs."""
    bin_dir, record = page.ws / ".record", page.ws / ".record" / "argv"
    bin_dir.mkdir(exist_ok=True)
    record.unlink(missing_ok=True)
    for name in ("python3", "srun"):
        (bin_dir / name).write_text(
            f'#!/bin/sh\n[ "$1" = -c ] && exec {shlex.quote(sys.executable)} "$@"\n'
            f"printf '%s\\0' \"$@\" > {shlex.quote(str(record))}\n"
        )
        (bin_dir / name).chmod(0o755)
    return bin_dir, record


def _recorded(bash: list[str], env: dict, page: Page, block: Block) -> list[str]:
    bin_dir, record = _record(page)
    full = _env({**env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python3")})
    proc = subprocess.run(["bash", *bash], cwd=page.ws, env=full, capture_output=True, text=True, timeout=60)
    _check(proc.returncode, proc.stdout, proc.stderr, block, shlex.join(bash))
    assert record.exists(), f"{block}: {shlex.join(bash)} started nothing\n{proc.stderr}"
    return record.read_text().split("\0")[:-1]


def _launch_script(prog: str, args: list[str], block: Block, env: dict, page: Page) -> None:
    argv = _recorded([prog, *args], env, page, block)
    assert argv[:3] == ["-m", "dtrain", "launch"] or argv[:3] == ["-m", "dtrain", "train"], f"{prog} started {argv}"
    if argv[2] == "launch" and _launch_args(argv[2:]).nnodes != "1":
        page.log.append(f"  ~ {prog}: python {shlex.join(argv)}: several nodes, parsed only")
        return
    step = plan(["python", *argv], block, env)
    page.log.append(f"  > {prog} started python {shlex.join(argv)}")
    step.run(page)


def _sbatch(args: list[str], block: Block, env: dict, page: Page) -> None:
    script = page.ws / args[0]
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), re.M))
    nodes, per_node = int(directives.get("nodes", 1)), int(directives.get("ntasks-per-node", 1))
    job = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": "127.0.0.1",
    }
    argv = [
        a if a != str(page.ws / ".record" / "python3") else "python3"
        for a in _recorded([args[0], *args[1:]], {**env, **job}, page, block)
    ]
    page.log.append(f"  > {args[0]} started srun {shlex.join(argv)}")
    plan(["srun", *argv], block, {**env, "SLURM_NTASKS": job["SLURM_NTASKS"]}).run(page)


def _pip(args: list[str], block: Block) -> None:
    assert args[0] == "install", f"{block}: pip {args}"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    for a in args[1:]:
        if a.startswith("torch=="):
            assert torch.__version__.split("+")[0] == a[len("torch==") :], (
                f"{block}: {a}, installed {torch.__version__}"
            )
        elif a != "-e":
            m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", a)
            assert m, f"{block}: pip install {a}: expected . or .[extra,...]"
            unknown = set((m[1] or "").split(",")) - extras - {""}
            assert not unknown, f"{block}: pip install {a}: no extra {unknown} in pyproject.toml ({sorted(extras)})"


def _pytest(args: list[str], block: Block) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    markers = {m.split(":")[0] for m in pyproject["tool"]["pytest"]["ini_options"]["markers"]}
    it = iter(args)
    for a in it:
        if a == "-m":
            names = set(re.findall(r"\w+", next(it))) - {"and", "or", "not"}
            assert names <= markers, f"{block}: pytest -m: {names - markers} not in pyproject's markers"
        elif a == "-n":
            int(next(it))
        elif not a.startswith("-"):
            assert (REPO / a.split("::")[0]).exists(), f"{block}: pytest {a}: no such path"


def _tensorboard(logdir: Path, page: Page) -> None:
    import importlib.util

    assert importlib.util.find_spec("tensorboard"), "tensorboard is not installed"
    assert list((page.ws / logdir).rglob("events.out.tfevents.*")), f"no TensorBoard events under {logdir}"


# ---- python blocks -------------------------------------------------------------------------------------------
def _python_block(block: Block, page: Page) -> None:
    if block.marker and block.marker[0] == "file":
        path = block.marker[1]
        if (REPO / path).exists():
            assert (REPO / path).read_text() == block.body + "\n", f"{block}: differs from {path}: copy it again"
        else:
            (page.ws / path).parent.mkdir(parents=True, exist_ok=True)
            (page.ws / path).write_text(block.body + "\n")
        if 'if __name__ == "__main__":' in block.body:
            plan(["python", path], block).run(page)
        return
    ns = page.namespace
    ns.setdefault("__name__", "__docs__")
    out, err = io.StringIO(), io.StringIO()
    saved = list(sys.argv), list(sys.path), os.getcwd(), torch.get_num_threads()
    # REWRITES['train'] for a python block: its dtrain.fit()/main() without arguments read sys.argv[1:]
    sys.argv, sys.path[:0] = [block.page, f"train.max_steps={MAX_STEPS}"], [str(page.ws)]
    try:
        os.chdir(page.ws)
        torch.set_num_threads(1)
        with _own_modules(page.ws), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exec(compile(block.body, f"{block.page}:{block.line}", "exec"), ns)
    except Exception:
        sys.stderr.write(f"--- stdout\n{out.getvalue()[-3000:]}\n--- stderr\n{err.getvalue()[-6000:]}\n")
        raise
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        os.chdir(saved[2])
        torch.set_num_threads(saved[3])


# ---- fixtures: what a page's blocks take as given -------------------------------------------------------------
def _readme_script(page: Page) -> None:
    """train.py: the README's script (A script of your own)."""
    script = next(b for b in blocks("README.md") if b.marker == ("file", "train.py"))
    (page.ws / "train.py").write_text(script.body + "\n")


def _new_shards(page: Page) -> None:
    """New data for `dtrain predict`: digits shards as shards/new-00000N.tar (N = 0..9) and shards/new.json."""
    from dtrain.data import make_builtin
    from dtrain.data.sources import count_shards, descriptor, write_descriptor

    tmp = page.ws / ".new"
    make_builtin("digits", tmp, 30)
    tars = sorted(tmp.glob("test-*.tar"))[:10]
    (page.ws / "shards").mkdir()
    for i, tar in enumerate(tars):
        shutil.copy(tar, page.ws / "shards" / f"new-{i:06d}.tar")
    out = page.ws / "shards" / "new.json"
    write_descriptor(descriptor(count_shards([str(page.ws / "shards" / "new-{000000..000009}.tar")]), out), out)


def _any_webdataset(page: Page) -> None:
    """your-data.md's placeholders made real: shards/train-000000..000099.tar and val-0000..0009.tar (jpg + cls,
    4 samples each), an image folder photos/CLASS/*.jpg and mymodule.py with `augment`."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)

    def jpg(label: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray((rng.random((8, 8, 3)) * 60 + label * 20).astype(np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    (page.ws / "shards").mkdir()
    for pattern, n in (("shards/train-{:06d}.tar", 100), ("val-{:04d}.tar", 10)):
        for s in range(n):
            with wds.TarWriter(str(page.ws / pattern.format(s))) as w:
                for i in range(4):
                    label = (s + i) % 3
                    w.write({"__key__": f"s{s}-{i}", "jpg": jpg(label), "cls": label})
    for cls in ("cat", "dog"):
        (page.ws / "photos" / cls).mkdir(parents=True)
        for i in range(12):
            (page.ws / "photos" / cls / f"{i}.jpg").write_bytes(jpg(cls == "dog"))
    (page.ws / "mymodule.py").write_text("def augment(x):\n    return x\n")


FIXTURES = {"docs/python-api.md": [_readme_script, _new_shards], "docs/your-data.md": [_any_webdataset]}


# ---- the tests -------------------------------------------------------------------------------------------------
def _pages_with_runs():
    params = []
    for page in PAGES:
        if page in COPIES:
            continue
        try:  # a block that is not accounted for fails test_every_block_is_accounted_for and the page's test
            found = [b for b in blocks(page) if check_accounted(b) in ("run", "config")]
            slow = any(plan(w, b).slow for b in found if b.lang in ("bash", "sh", "console") for w in commands(b))
        except AssertionError:
            found, slow = [None], False
        if not found:
            continue
        params.append(pytest.param(page, marks=[pytest.mark.slow] if slow else [], id=page))
    return params


def test_every_block_is_accounted_for():
    """Each block runs, is a config that loads, is output, or says why it is skipped; each command is one the
    test knows how to run; the copies are their sources' blocks; each rewrite still applies to some command."""
    counts = {}
    used = set()
    for page in PAGES:
        found = blocks(page)
        if page in COPIES:
            assert [(b.lang, b.body) for b in found] == [(b.lang, b.body) for b in blocks(COPIES[page])], page
            continue
        kinds = [check_accounted(b) for b in found]
        counts[page] = {k: kinds.count(k) for k in ("run", "config", "output", "skip") if kinds.count(k)}
        for b in found:
            if b.lang in ("bash", "sh", "console") and not b.marker:
                for words in commands(b):
                    used |= {name for name, test in _REWRITE_USES.items() if test(words)}
    assert set(REWRITES) - used == set(), f"rewrites no command needs any more: {set(REWRITES) - used}"
    print(counts)


def test_a_block_nobody_runs_fails_unless_it_says_why():
    new = [
        Block("new.md", 1, "bash", "make all\n", None),
        Block("new.md", 1, "", "dtrain train\n", None),
        Block("new.md", 1, "bash", "dtrain train | tee log\n", None),
        Block("new.md", 1, "rust", "fn main()\n", None),
        Block("new.md", 1, "bash", "make all\n", ("skip", "()")),
    ]
    for block in new:
        with pytest.raises(AssertionError):
            check_accounted(block)
    assert check_accounted(Block("new.md", 1, "bash", "make all\n", ("skip", "(needs make)"))) == "skip"
    assert check_accounted(Block("new.md", 1, "bash", "dtrain train --config configs/gpt.yaml\n", None)) == "run"


_REWRITE_USES = {
    "train": lambda w: "train" in w or any(a.endswith(".py") for a in w),
    "gpt.yaml": lambda w: "configs/gpt.yaml" in w,
    "bench": lambda w: "bench" in w or w[0].startswith("benchmarks/"),
    "pip": lambda w: w[0] == "pip",
    "pytest": lambda w: "pytest" in w,
    "torchrun": lambda w: w[0] == "torchrun",
    "dtrain launch": lambda w: w[:2] == ["dtrain", "launch"] and "--ft" not in w,
    "srun": lambda w: w[0] == "srun",
    "sbatch": lambda w: w[0] == "sbatch",
    "launch/*.sh": lambda w: w[0].startswith("launch/"),
    "wandb": lambda w: any(a.startswith("wandb.enabled=true") for a in w),
    "curl": lambda w: any("curl -s https://host/" in a for a in w),
    "tensorboard": lambda w: w[0] == "tensorboard",
}


@pytest.mark.parametrize("page", _pages_with_runs())
def test_the_page_runs(page, tmp_path, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in LINKED:
        (ws / name).symlink_to(REPO / name)
    state = Page(page, ws)
    for fixture in FIXTURES.get(page, []):
        fixture(state)
    try:
        for block in blocks(page):
            kind = check_accounted(block)
            start = time.monotonic()
            if kind == "config":
                from dtrain.config import load_config

                (ws / "example.yaml").write_text(block.body)
                load_config(ws / "example.yaml")
                state.log.append(f"{block}: loads with dtrain's config loader")
            elif kind == "run" and block.lang == "python":
                _python_block(block, state)
                state.log.append(f"{block}: {time.monotonic() - start:.1f} s")
            elif kind == "run":
                for words in commands(block):
                    step = plan(_curl_local(words, ws), block)
                    t0 = time.monotonic()
                    step.run(state)
                    state.log.append(f"{block}: {time.monotonic() - t0:5.1f} s  {step.what}")
            else:
                state.log.append(f"{block}: {kind}")
    finally:
        with capsys.disabled():
            print(f"\n{page}\n" + "\n".join(state.log))


def _curl_local(words: list[str], ws: Path) -> list[str]:
    """REWRITES['curl']."""
    return [w.replace("curl -s https://host/", f"curl -s file://{ws}/") for w in words]
