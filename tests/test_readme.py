"""The README's self-contained snippet runs as written."""
import re
from pathlib import Path


def test_readme_subclass_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    first = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    scope = {}
    exec(compile(first, "README.md", "exec"), scope)
    assert tuple(scope["y"].shape) == (8, 16, 5)
    assert scope["moe"].routing.num_tokens == 128
    moe2 = scope["moe2"]
    assert (moe2.k, moe2.hole, moe2.layer_id, moe2.aux_weights) == (2, True, 1, {"switch": 0.01})
    assert "layer_id=1, experts=4, hole=True, token_choice(k=2, normalize=True)" in repr(moe2)
