"""Every command in the README's bash blocks exists and parses: modules, their flags, config files, variants
and keys, launch scripts (run with --dry_run), make targets. The long commands themselves run in other
tests and in `make demo`; this keeps the README from drifting away from the code."""
import importlib.util
import os
import re
import shlex
import subprocess

import pytest

from mvlp_jax.demo import load_config
from tests.conftest import REPO

README = os.path.join(REPO, "README.md")


def _commands() -> list[str]:
    text = open(README).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


COMMANDS = _commands()


def test_the_readme_has_the_commands_a_user_needs():
    joined = "\n".join(COMMANDS)
    for needed in ("make demo", "make test", "data_prep.build_dataset --source=mimic_cxr",
                   "data_prep.precompute_text_embeddings", "mvlp_jax.main", "mvlp_jax.evaluate", "launch/tpu_pod.sh"):
        assert needed in joined, needed


def _module_source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"README runs python -m {module}, which does not exist"
    return open(spec.origin).read()


def _check_config_flags(args: list[str]) -> None:
    config_arg = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
    path, _, variant = config_arg.partition(":")
    assert os.path.exists(os.path.join(REPO, path)), path
    config = load_config(os.path.splitext(os.path.basename(path))[0], variant or None)
    for arg in args:
        if arg.startswith("--config."):
            node = config
            for part in arg[len("--config."):].split("=")[0].split("."):
                assert part in node, f"{arg}: no config key {part!r} in {config_arg}"
                node = node[part]


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_exists_and_parses(command):
    words = shlex.split(command)
    if words[0] == "make":
        assert re.search(rf"^{words[1]}:", open(os.path.join(REPO, "Makefile")).read(), re.M), command
    elif words[0] == "bash" and words[1].startswith("launch/"):
        out = subprocess.run([*words, "--dry_run"] if "--" not in words else
                             [*words[:words.index("--")], "--dry_run", *words[words.index("--"):]],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    elif (words[0] == "python" or words[0].endswith("/bin/python")) and words[1] == "-m":
        source = _module_source(words[2])
        for arg in words[3:]:
            if not arg.startswith("--") or arg.startswith("--config."):
                continue
            name = arg[2:].split("=")[0]
            assert re.search(rf"DEFINE_\w+\(\s*\"{name}\"|\"--{name}\"", source) or \
                re.search(rf"DEFINE_config_file\(\s*\"{name}\"", source), f"{command}: {words[2]} has no flag --{name}"
        if any(a.startswith("--config=") for a in words):
            _check_config_flags(words)
    elif words[0] == "export":
        name = words[1].split("=")[0]
        readers = [os.path.join(root, f) for root, _, files in os.walk(os.path.join(REPO, "mvlp_jax"))
                   for f in files if f.endswith(".py")]
        assert any(name in open(f).read() for f in readers), f"{command}: no module reads {name}"
    else:
        pytest.fail(f"README command of an unknown kind: {command}")


def test_readme_config_table_is_the_generated_one():
    from mvlp_jax import configuration

    with open(os.path.join(REPO, configuration.DOC)) as f:
        assert f.read() == configuration.config_doc(), "regenerate with python -m mvlp_jax.configuration"


def test_readme_scaling_table_is_the_recorded_compile_output():
    """The "Scaling up" table is benchmarks/aot_scaling.py's rendering of its recorded TPU compiles."""
    import json

    from benchmarks import aot_scaling

    with open(os.path.join(REPO, "benchmarks", "aot_scaling.json")) as f:
        rows = json.load(f)
    assert rows and aot_scaling.table(rows) in open(README).read(), "rerun python -m benchmarks.aot_scaling"
