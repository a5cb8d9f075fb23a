"""The README's example runs as written (CPU), and stays the 20 lines it promises."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python example"
    code = blocks[0]
    assert len(code.splitlines()) <= 20
    scope: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), scope)
    x = scope["x"]
    assert x.grad is not None and x.grad.abs().sum() > 0  # the backward reached the input
    assert scope["experts"].grad is not None and scope["router"].weight.grad is not None
