"""No Docker engine runs here: check that the image would build from what the repository holds."""

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _instructions():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def test_every_copied_file_exists():
    copies = [rest for word, rest in _instructions() if word in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        for source in parts[:-1]:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which the repository lacks"


def test_image_runs_predict_sh_with_a_config_that_exists():
    instructions = list(_instructions())
    assert ("WORKDIR", "/workspace") in instructions
    args = dict(re.match(r"(\w+)=(\S+)", rest).groups() for word, rest in instructions if word == "ARG")
    assert (REPO / args["CONFIG"]).is_file()
    assert any("predict.sh" in rest for word, rest in instructions if word == "CMD")
    assert any("torch==2.13.0" in rest for word, rest in instructions if word == "RUN")
