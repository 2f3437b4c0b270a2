"""The README's four Hugging Face round trips, run as written, in order, in one scope."""
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the round trips need the hf extra")
pytest.importorskip("matplotlib")


def test_readme_round_trips_run():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    snippets = [s for s in re.findall(r"```python\n(.*?)```", text, flags=re.S) if s.startswith("# round trip")]
    assert [int(s.split()[3].rstrip(":")) for s in snippets] == [1, 2, 3, 4]
    scope = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), scope)
    assert type(scope["mixtral"]).__name__ == "MixtralForCausalLM"
    assert type(scope["back"]).__name__ == "MixtralForCausalLM"
    assert len(scope["recorder"].stats) == 2
