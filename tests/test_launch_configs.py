"""Every shipped accelerate config starts as documented: each `accelerate launch --config_file ...` command written
in the config itself, the README or docs/ gives every process a placement with the recipe's settings."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from hf_fsl_sage.transport.placement import Placement
from tests.helpers import load_script


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"one_gpu": (1, 1, "NO"), "eight_gpus": (8, 1, "MULTI_GPU"), "two_machines": (16, 2, "MULTI_GPU"),
           # MULTI_GPU selects the torchrun launcher; the processes run on CPU
           "cpu_3_processes": (3, 1, "MULTI_GPU")}
_COMMAND = re.compile(r"accelerate launch --config_file accelerate_configs/(\w+)\.yaml([^`\n]*)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, config name, arguments after the config)`` of every documented launch of a shipped config."""
    sources = [*sorted((ROOT / "accelerate_configs").glob("*.yaml")), ROOT / "README.md",
               *sorted((ROOT / "docs").glob("**/*.md"))]
    found = []
    for path in sources:
        text = re.sub(r"\\\n#?\s*", " ", path.read_text())  # commands continued on the next (comment) line
        for match in _COMMAND.finditer(text):
            words = re.sub(r"<[^>]*>", "HOST", match.group(2))  # placeholders such as <machine-0 address>
            found.append((str(path.relative_to(ROOT)), match.group(1), shlex.split(words, comments=True)))
    return found


def _placements(config, arguments: list[str]) -> tuple[int, int]:
    """Build every process's placement for one command; ``(processes, clients)``."""
    script = next(i for i, word in enumerate(arguments) if word.endswith(".py"))
    launcher, script_args = arguments[:script], arguments[script + 1:]
    processes = int(launcher[launcher.index("--num_processes") + 1]) if "--num_processes" in launcher \
        else config.num_processes
    assert processes % config.num_machines == 0, "torchrun starts the same number of processes on every machine"
    assert arguments[script] == "recipes/gpt2m_e2e.py"
    _, args = load_script(ROOT / "recipes" / "gpt2m_e2e.py", "gpt2m_e2e").parse_args(script_args)
    for rank in range(processes):
        Placement.build(rank, processes, args.num_clients, args.client_ranks)  # raises if a process has no client
    return processes, args.num_clients


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_documented_launch_of_a_shipped_config_starts(name):
    config = load_config_from_file(str(ROOT / "accelerate_configs" / f"{name}.yaml"))
    assert (config.num_processes, config.num_machines, config.distributed_type.value) == CONFIGS[name]
    commands = [(where, arguments) for where, config_name, arguments in documented_commands() if config_name == name]
    assert {where for where, _ in commands} >= {f"accelerate_configs/{name}.yaml", "docs/processes.md"}
    for where, arguments in commands:
        try:
            processes, clients = _placements(config, arguments)
        except ValueError as error:
            raise AssertionError(f"{where}: `{shlex.join(arguments)}` does not start: {error}") from None
        assert processes == config.num_processes or "--num_processes" in arguments


def test_the_two_machine_command_places_one_client_per_gpu():
    config = load_config_from_file(str(ROOT / "accelerate_configs" / "two_machines.yaml"))
    arguments = next(a for where, n, a in documented_commands()
                     if n == "two_machines" and where == "docs/processes.md")
    assert _placements(config, arguments) == (16, 15)
